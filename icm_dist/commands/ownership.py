"""``icm-dist ownership RUN_DIR...``: which expert leads each mechanism over training, from the log.

The paper explains its failed runs by one expert winning several mechanisms early. This reads the
answer for a finished (or running) run out of ``metrics.jsonl``: every ``tracking.log_every``
iterations the trainer logs ``score/<mechanism>/e<expert>``, D's mean score of each expert's output
on the examples of each mechanism over that window (the data of the paper's Figure 4). Each example
goes to the expert D scores highest, so the expert with the highest mean score on a mechanism's
examples is, in effect, the one that wins them: the argmax per mechanism is the committee's
division of labour at that moment. Printed every ``--every`` iterations: one group per expert, with
the mechanisms it leads (``e6:down+noise`` is a shared expert), and a verdict per run: the iteration
from which the division no longer changed, the experts that ended up leading several mechanisms,
those that lead none at the end (idle), and those that never led any.

Needs only ``metrics.jsonl`` (and ``summary.json`` or ``config.yaml`` for the mechanism names).
"""

from __future__ import annotations

from pathlib import Path

from ..data.library import resolve_mechanisms
from ..errors import IcmError
from ..rundir import CONFIG, METRICS, SUMMARY, RunDir
from .args import at_least


class OwnershipError(IcmError):
    """A run directory whose log cannot be read for ownership."""


def leaders(row: dict, names: list[str], num_experts: int) -> dict[str, int]:
    """Mechanism -> the expert with the highest logged score on it in this row's window (mechanisms
    with no examples in the window are left out; ties go to the lowest expert id, as in training)."""
    out = {}
    for m in names:
        scores = [row.get(f"score/{m}/e{e}") for e in range(num_experts)]
        if any(s is None for s in scores):
            continue
        out[m] = max(range(num_experts), key=lambda e: (scores[e], -e))
    return out


def groups(lead: dict[str, int]) -> dict[int, list[str]]:
    """Expert -> the mechanisms it leads, in the order of ``lead``."""
    out: dict[int, list[str]] = {}
    for m, e in lead.items():
        out.setdefault(e, []).append(m)
    return dict(sorted(out.items()))


def timeline(rows: list[dict], names: list[str], num_experts: int) -> list[tuple[int, dict[str, int]]]:
    """(iteration, leaders) for every logged row that holds scores of all mechanisms."""
    out = []
    for r in rows:
        lead = leaders(r, names, num_experts)
        if len(lead) == len(names):
            out.append((int(r["iteration"]), lead))
    return out


def verdict(tl: list[tuple[int, dict[str, int]]], num_experts: int) -> dict:
    """What the timeline says: when the last division settled, who shares at the end, who leads
    nothing at the end (idle), and who never led anything."""
    if not tl:
        return {"settled_at": None, "final": {}, "shared": {}, "idle": list(range(num_experts)),
                "never_led": list(range(num_experts))}
    final = tl[-1][1]
    settled = tl[-1][0]
    for it, lead in reversed(tl):
        if lead != final:
            break
        settled = it
    ever = {e for _, lead in tl for e in lead.values()}
    return {
        "settled_at": settled,
        "final": final,
        "shared": {e: ms for e, ms in groups(final).items() if len(ms) > 1},
        "idle": [e for e in range(num_experts) if e not in final.values()],
        "never_led": [e for e in range(num_experts) if e not in ever],
    }


def _fmt(lead: dict[str, int]) -> str:
    return " ".join(f"e{e}:{'+'.join(ms)}" for e, ms in groups(lead).items())


def read_run(run_dir: str | Path) -> tuple[list[dict], list[str], int, list[dict]]:
    """The run's metric rows, mechanism names, expert count, and its splits (``summary.json``; [] if none)."""
    run = RunDir(run_dir)
    d = run.path
    if not run.metrics_file.is_file():
        raise OwnershipError(f"'{d}' has no {METRICS}: not a run directory")
    names, N, splits = None, None, []
    s = run.read_summary()
    cfg = run.read_config() if s is None else None
    if s is not None:
        names, N, splits = s["mechanisms"], s["num_experts"], s.get("splits") or []
    elif cfg is not None:  # a run in progress: the labels of its config's mechanism entries
        entries, N = cfg.get("data", {}).get("mechanisms"), cfg.get("expert", {}).get("num")
        names = [r.label for r in resolve_mechanisms(entries, import_functions=False)] if entries else None
    if not names or not N:
        raise OwnershipError(f"'{d}': neither {SUMMARY} nor {CONFIG} names the mechanisms and experts")
    rows = [r for r in run.read_metrics() if "iteration" in r]
    return rows, list(names), int(N), splits


def report(run_dir: str | Path, every: int = 100) -> tuple[str, dict]:
    rows, names, N, splits = read_run(run_dir)
    tl = timeline(rows, names, N)
    v = verdict(tl, N)
    lines = [f"{run_dir}"]
    last = None
    for i, (it, lead) in enumerate(tl):
        # The grid keeps the output short; '*' marks a division unlike the one printed before it.
        if it % every == 0 or i == len(tl) - 1:
            mark = "" if lead == last else "  *"
            lines.append(f"  {it:>6}  {_fmt(lead)}{mark}")
            last = lead
    shared = ", ".join(f"e{e} ({'+'.join(ms)})" for e, ms in v["shared"].items()) or "none"
    idle = ", ".join(f"e{e}" for e in v["idle"]) or "none"
    never = ", ".join(f"e{e}" for e in v["never_led"]) or "none"
    lines.append(f"  settled at iteration {v['settled_at']}; at the end shared: {shared}, idle: {idle}; "
                 f"never led a mechanism: {never}")
    if splits:  # train.split_every: an idle expert became a copy of a busy one (the division above follows it)
        lines.append("  splits: " + ", ".join(f"e{s['copy']} <- e{s['donor']} at {s['iteration']}" for s in splits))
    return "\n".join(lines), v


def _run(args) -> int:
    for d in args.run_dirs:
        text, _ = report(d, args.every)
        print(text)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser(
        "ownership", help="which expert leads each mechanism over training (from metrics.jsonl)",
        description=__doc__.split("\n\n")[1])
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--every", type=at_least(1), default=100, help="print the division every this many iterations "
                                                         "(a '*' marks a change; default: %(default)s)")
    c.set_defaults(func=_run)
