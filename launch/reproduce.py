"""Run the paper's experiments over seeds and put the measurements in one table.

    python launch/reproduce.py --out runs/suite                       # everything in configs/paper/suite.yaml
    python launch/reproduce.py --out runs/suite --only main,no_identity --jobs 8 device=cuda
    python launch/reproduce.py --out runs/suite --report-only         # re-aggregate finished runs

Each (experiment, seed) is one ``launch/train.py`` process writing ``OUT/EXPERIMENT/seedN``; runs
that already have a summary.json are skipped, so an interrupted suite picks up where it stopped.
``--jobs`` runs several at once (on one GPU, small committees leave most of it idle, so several
processes share it well). A suite entry's ``overrides`` go to its runs, trailing ``key=value``
overrides to every run. The aggregate goes to
``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icm_dist.rundir import RunDir  # noqa: E402


def load_suite(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["experiments"]


def run_one(name: str, cfg: Path, seed: int, out: Path, overrides: list[str], log_dir: Path) -> dict:
    run_dir = out / name / f"seed{seed}"
    if RunDir(run_dir).summary_file.is_file():
        return {"name": name, "seed": seed, "status": "done before"}
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg), f"seed={seed}",
           f"run.out_dir={run_dir}", "run.progress=false", "resume=auto", *overrides]
    t0 = time.time()
    with open(log_dir / f"{name}_seed{seed}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    return {"name": name, "seed": seed, "status": "ok" if rc == 0 else f"failed rc={rc}", "seconds": time.time() - t0}


def _stat(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def aggregate(suite: dict, out: Path) -> dict:
    results = {}
    for name, spec in suite.items():
        runs = []
        for seed in range(spec["seeds"]):
            summary = RunDir(out / name / f"seed{seed}").read_summary()
            if summary is not None:
                runs.append(summary)
        if not runs:
            continue
        M = len(runs[0]["mechanisms"])
        per_mech = {}
        for m in runs[0]["mechanisms"]:
            per_mech[m] = _stat([r.get("accuracy_per_mechanism", {}).get(m, {}).get("restored") for r in runs])
        # A mechanism is "learned" in a run when its restored accuracy is within 5 points of the original
        # digits' accuracy: the measure that applies to single networks as well as committees.
        learned = [sum(1 for m, a in r.get("accuracy_per_mechanism", {}).items()
                       if a.get("restored") is not None and a["restored"] >= a["original"] - 0.05) for r in runs]
        results[name] = {
            "config": spec["config"],
            "paper": spec.get("paper", ""),
            "seeds": [r["seed"] for r in runs],
            "restored": _stat([r["accuracy"]["restored"] for r in runs]),
            "transformed": _stat([r["accuracy"]["transformed"] for r in runs]),
            "original": _stat([r["accuracy"]["original"] for r in runs]),
            "mechanisms_captured": _stat([r["mechanisms_captured"] for r in runs]),
            "all_captured": sum(1 for r in runs if r["mechanisms_captured"] == M),
            "mechanisms_learned": _stat(learned),
            "inactive_experts": _stat([len(r.get("inactive_experts", [])) for r in runs]),
            "wall_seconds": _stat([r["wall_seconds"] for r in runs]),
            "restored_per_mechanism": per_mech,
            "per_seed": [{"seed": r["seed"], "restored": round(r["accuracy"]["restored"], 4),
                          "captured": r["mechanisms_captured"], "inactive": r.get("inactive_experts", [])}
                         for r in runs],
        }
    return results


def to_markdown(results: dict, suite: dict) -> str:
    def f(s, pct=True, digits=1):
        if s is None:
            return "-"
        if pct:
            return f"{100 * s['mean']:.{digits}f} ± {100 * s['std']:.{digits}f}"
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    lines = ["| experiment | seeds | transformed % | restored % | original % | captured (of M) "
             "| runs with all captured "
             "| learned (of M) | inactive experts | wall s | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        M = len(r["restored_per_mechanism"])
        lines.append(f"| {name} | {len(r['seeds'])} | {f(r['transformed'])} | {f(r['restored'])} "
                     f"| {f(r['original'])} | "
                     f"{f(r['mechanisms_captured'], False)} / {M} | {r['all_captured']} / {len(r['seeds'])} | "
                     f"{f(r['mechanisms_learned'], False)} / {M} | {f(r['inactive_experts'], False)} | "
                     f"{r['wall_seconds']['mean']:.0f} | {r['paper']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default=str(REPO / "configs" / "paper" / "suite.yaml"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="comma-separated experiment names")
    ap.add_argument("--seeds", type=int, help="run this many seeds of each experiment instead of the suite's")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. device=cuda)")
    args = ap.parse_args()
    suite_path = Path(args.suite)
    suite = load_suite(suite_path)
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in suite]
        if unknown:
            print(f"error: unknown experiments {unknown}; known: {', '.join(suite)}", file=sys.stderr)
            return 2
        suite = {k: v for k, v in suite.items() if k in wanted}
    if args.seeds is not None:
        suite = {k: {**v, "seeds": args.seeds} for k, v in suite.items()}
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    if not args.report_only:
        # Seeds first, experiments second: with a time limit, every experiment gets its early seeds.
        jobs = [(name, suite_path.parent / spec["config"], seed, [*spec.get("overrides", []), *args.overrides])
                for seed in range(max(s["seeds"] for s in suite.values()))
                for name, spec in suite.items() if seed < spec["seeds"]]
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for res in pool.map(lambda j: run_one(j[0], j[1], j[2], out, j[3], log_dir), jobs):
                failed += res["status"].startswith("failed")
                print(f"[{time.time() - t0:6.0f}s] {res['name']} seed {res['seed']}: {res['status']}"
                      + (f" ({res['seconds']:.0f}s)" if "seconds" in res else ""), flush=True)
    results = aggregate(suite, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = to_markdown(results, suite)
    (out / "results.md").write_text(md)
    print(md)
    if failed:
        print(f"error: {failed} run(s) failed; their logs are in {log_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
