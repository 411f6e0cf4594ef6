"""``icm-dist compare RUN_DIR...``: final metrics of finished runs, grouped by config, side by side.

Needs nothing but the run directories (``config.yaml``, ``summary.json``, ``metrics.jsonl``, and
``generalization.json`` where ``icm-dist generalize`` wrote one): no wandb, no checkpoints, no data
set. Runs whose configs are equal apart from the keys in :data:`icm_dist.config.IGNORED_KEYS` (the
seed, where the run was written, how it was tracked) form one group; a group's label is the keys in
which it differs from the other groups. For each group the table gives the mean and the sample
standard deviation over its runs (normally: over seeds), and a PNG shows restored accuracy over
training (one line per run, a colour per group) and the number of captured mechanisms per run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from ..config import experiment_config, experiment_hash  # noqa: E402
from ..errors import IcmError  # noqa: E402
from ..rundir import CONFIG, SUMMARY, RunDir  # noqa: E402
from .outputs import PNG_METADATA, claim_file, image_is_ours, json_is, write_file, write_text  # noqa: E402

# What --json writes: a list of groups, each with these keys (how a JSON file is known to be compare's own).
_GROUP_KEYS = {"label", "experiment", "runs", "stats"}
_json_is_ours = json_is(lambda d: isinstance(d, list) and all(isinstance(g, dict) and _GROUP_KEYS <= set(g) for g in d))


class CompareError(IcmError):
    """A run directory that cannot be compared."""


# ----------------------------------------------------------------------------- reading runs


def load_run(run_dir: str | Path) -> dict:
    """One run directory as {dir, config, summary, curve}; raises CompareError if it is not a finished run."""
    run = RunDir(run_dir)
    d = run.path
    if not d.is_dir():
        raise CompareError(f"'{d}' is not a directory (pass run directories, the run.out_dir of each run)")
    if not run.config_file.is_file():
        raise CompareError(f"'{d}' has no {CONFIG}: not a run directory")
    if not run.summary_file.is_file():
        raise CompareError(f"'{d}' has no {SUMMARY}: the run has not finished (resume it with resume=auto)")
    try:
        cfg = run.read_config()
        summary = run.read_summary()
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise CompareError(f"'{d}': cannot read {CONFIG} / {SUMMARY} ({e})") from None
    curve = [(row["iteration"], row["eval/accuracy/restored"]) for row in run.read_metrics()
             if row.get("eval/accuracy/restored") is not None]
    return {"dir": str(d), "config": cfg, "summary": summary, "curve": curve,
            "generalization": _generalization(run, summary)}


def _generalization(run: RunDir, summary: dict) -> dict | None:
    """The run's generalization.json, or None if there is none, it is unreadable, or it is stale."""
    g_p = run.generalization_file
    try:
        gen = run.read_generalization()
    except json.JSONDecodeError as e:
        # A broken side file should not drop the run's own metrics from the comparison.
        print(f"ignored '{g_p}': cannot read it ({e}); rerun icm-dist generalize", file=sys.stderr)
        return None
    # A run trained on after `icm-dist generalize` (train.iterations raised, resume=auto) keeps the old
    # file; its numbers describe other experts than the summary's, so they must not sit in one row.
    if gen is not None and gen.get("iteration") not in (None, summary.get("iterations")):
        print(f"ignored '{g_p}': measured at iteration {gen['iteration']}, the run is at {summary.get('iterations')}; "
              "rerun icm-dist generalize", file=sys.stderr)
        return None
    return gen


# ----------------------------------------------------------------------------- grouping and statistics

METRICS = (
    ("restored", lambda s: s["accuracy"]["restored"]),
    ("transformed", lambda s: s["accuracy"]["transformed"]),
    ("original", lambda s: s["accuracy"]["original"]),
    ("captured", lambda s: s["mechanisms_captured"]),
    ("wall_s", lambda s: s.get("wall_seconds")),
)


def _captors(g: dict) -> list[dict]:
    return [r for r in g["generalization"]["per_mechanism"].values() if r.get("captured_by") is not None]


# From generalization.json (``icm-dist generalize``, the paper's Figures 7 and 8), per run: how much of
# the error of doing nothing the capturing experts remove on unseen symbols (mean over captured
# mechanisms), the share of captured mechanisms whose captor is also the best expert on the symbols,
# and the MSE left after undoing the chained mechanisms. None for a run without the file.
GEN_METRICS = (
    ("sym_error_cut", lambda g: mean_std([r["captured_error_reduction"] for r in _captors(g)])[0]),
    ("sym_captor_best", lambda g: mean_std([r["captured_is_best"] for r in _captors(g)])[0]),
    ("chain_mse", lambda g: g["composition"].get("final_mse")),
)


def mean_std(xs: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def group_runs(runs: list[dict]) -> list[dict]:
    """Groups of runs with equal experiment configs, in order of first appearance, each with a label
    made of the keys that differ between groups and the statistics of its runs."""
    groups: dict[str, dict] = {}
    for r in runs:
        exp = experiment_config(r["config"])
        key = json.dumps(exp, sort_keys=True)
        groups.setdefault(key, {"config": exp, "runs": []})["runs"].append(r)
    gl = list(groups.values())
    all_keys = sorted(set().union(*(g["config"].keys() for g in gl)))
    differing = [k for k in all_keys if len({json.dumps(g["config"].get(k), sort_keys=True) for g in gl}) > 1]
    out = []
    for g in gl:
        label = ", ".join(f"{k}={_fmt_value(g['config'].get(k))}" for k in differing) or "(one config)"
        stats = {}
        for source, metrics in (("summary", METRICS), ("generalization", GEN_METRICS)):
            for name, get in metrics:
                vals = []
                for r in g["runs"]:
                    try:
                        vals.append(get(r[source]) if r.get(source) is not None else None)
                    except (KeyError, TypeError):
                        vals.append(None)
                m, s = mean_std(vals)
                stats[name] = {"mean": m, "std": s, "values": vals}
        seeds = [r["config"].get("seed") for r in g["runs"]]
        mechs = g["runs"][0]["summary"].get("mechanisms") or []
        out.append({
            "label": label, "differs_in": {k: g["config"].get(k) for k in differing}, "n": len(g["runs"]),
            # The paper's own measure of a run: did every mechanism end up with an expert of its own?
            "all_captured": sum(1 for v in stats["captured"]["values"] if mechs and v == len(mechs)),
            "seeds": seeds, "num_mechanisms": len(mechs),
            "iterations": [r["summary"].get("iterations") for r in g["runs"]],
            "runs": [r["dir"] for r in g["runs"]], "stats": stats,
            "experiment": experiment_hash(g["runs"][0]["config"]),
        })
    return out


# ----------------------------------------------------------------------------- output


def _cell(stat: dict, digits: int) -> str:
    m, s = stat["mean"], stat["std"]
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def format_table(groups: list[dict]) -> str:
    """A plain-text table: one row per group, mean ± sample std over its runs."""
    head = ["group", "experiment", "runs", "seeds", "restored acc", "transformed acc", "original acc", "captured",
            "all captured", "wall s"]
    # Columns from generalization.json only when some run has one, so plain comparisons stay narrow.
    gen = any(v is not None for g in groups for v in g["stats"]["sym_error_cut"]["values"])
    if gen:
        head += ["symbols: error cut", "captor best", "chain mse"]
    rows = []
    for g in groups:
        st = g["stats"]
        cap = _cell(st["captured"], 2) + (f" / {g['num_mechanisms']}" if g["num_mechanisms"] else "")
        rows.append([g["label"], g["experiment"], str(g["n"]), ",".join(map(str, g["seeds"])), _cell(st["restored"], 3),
                     _cell(st["transformed"], 3), _cell(st["original"], 3), cap,
                     f"{g['all_captured']} of {g['n']}" if g["num_mechanisms"] else "-", _cell(st["wall_s"], 0)])
        if gen:
            rows[-1] += [_cell(st["sym_error_cut"], 3), _cell(st["sym_captor_best"], 2), _cell(st["chain_mse"], 4)]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(runs: list[dict], groups: list[dict], path: Path) -> Path:
    """Restored accuracy over training (left) and captured mechanisms per run (right), coloured by group."""
    by_dir = {r["dir"]: r for r in runs}
    cmap = plt.get_cmap("tab10")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    bars_x, bars_h, bars_c, bars_lbl = [], [], [], []
    for gi, g in enumerate(groups):
        color = cmap(gi % 10)
        for ri, d in enumerate(g["runs"]):
            r = by_dir[d]
            if r["curve"]:
                ax1.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], "o-", ms=3, lw=1.2, color=color,
                         alpha=0.85, label=g["label"] if ri == 0 else None)
            bars_x.append(len(bars_x))
            bars_h.append(r["summary"].get("mechanisms_captured", 0))
            bars_c.append(color)
            bars_lbl.append(f"{Path(d).name}\nseed {r['config'].get('seed')}")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("restored accuracy")
    ax1.set_ylim(0, 1.01)
    ax1.set_title("restored accuracy over training")
    if groups:
        ax1.legend(fontsize=7, loc="lower right")
    ax2.bar(bars_x, bars_h, color=bars_c)
    ax2.set_xticks(bars_x, bars_lbl, fontsize=6, rotation=60, ha="right")
    M = max((g["num_mechanisms"] for g in groups), default=0)
    if M:
        ax2.axhline(M, ls="--", color="gray", lw=1)
        ax2.set_ylim(0, M + 0.5)
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax2.set_ylabel("mechanisms captured")
    ax2.set_title("captured mechanisms per run")
    fig.tight_layout()
    write_file(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=PNG_METADATA))
    plt.close(fig)
    return Path(path)


def compare(run_dirs: list[str], out_png: str | Path | None = "comparison.png", json_path: str | Path | None = None,
            strict: bool = False, stream=None, force: bool = False) -> list[dict]:
    """Load, group, print the table, write the PNG (and JSON if asked). Unfinished runs are skipped
    with a note unless ``strict``; no finished run at all is an error. An existing PNG or JSON that
    icm-dist did not write is replaced only with ``force``."""
    if out_png:
        claim_file(out_png, image_is_ours, force)
    if json_path:
        claim_file(json_path, _json_is_ours, force, flag="--json")
    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except CompareError as e:
            if strict:
                raise
            print(f"skipped: {e}", file=sys.stderr)
    if not runs:
        raise CompareError("no finished run to compare (each RUN_DIR needs config.yaml and summary.json)")
    groups = group_runs(runs)
    stream = stream or sys.stdout
    print(format_table(groups), file=stream)
    if out_png:
        p = plot(runs, groups, Path(out_png))
        print(f"plots: {p}", file=stream)
    if json_path:
        write_text(Path(json_path), json.dumps(groups, indent=1), flag="--json")
    return groups


# ----------------------------------------------------------------------------- command line


def _run(args) -> int:
    compare(args.run_dirs, out_png=None if args.no_plot else args.out, json_path=args.json, strict=args.strict,
            force=args.force)
    return 0


def add_parser(sub) -> None:
    """Register ``icm-dist compare`` on the CLI's subparsers (kept here so cli.py needs one line)."""
    c = sub.add_parser(
        "compare", help="final metrics of runs, grouped by config, mean ± std over seeds, and plots",
        description="Print the final metrics of finished runs, grouped by config (equal apart from seed, run "
                    "directory, resume and tracking settings), as mean ± sample std over each group's runs, and "
                    "plot restored accuracy over training and captured mechanisms per run. Reads only the run "
                    "directories (config.yaml, summary.json, metrics.jsonl); where `icm-dist generalize` left a "
                    "generalization.json, adds its measures on unseen symbols.")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each a run.out_dir)")
    c.add_argument("--out", "-o", default="comparison.png", help="PNG with the comparison plots (default: %(default)s)")
    c.add_argument("--no-plot", action="store_true", help="print the table only")
    c.add_argument("--json", metavar="PATH", help="also write the groups and their statistics as JSON")
    c.add_argument("--force", action="store_true", help="replace --out and --json even if icm-dist did not write them")
    c.add_argument("--strict", action="store_true", help="fail on an unfinished run instead of skipping it")
    c.set_defaults(func=_run)
