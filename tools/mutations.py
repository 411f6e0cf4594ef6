"""Break one line at a time and show that a test fails for each: the suite's mutation check.

    python tools/mutations.py                 # every mutation below, each against its tests
    python tools/mutations.py --only tie-rule,masked-adam
    python tools/mutations.py --list

Each mutation replaces one exact piece of source (it must occur exactly once) in a scratch copy of the
work tree, then runs the tests named for it there (PYTHONPATH points at the copy, so ``import
icm_dist`` is the mutated code). A mutation is *caught* when those tests fail. docs/testing.md lists
the mutations with the tests that catch them; this script is how that table was made. Exits 1 if any
mutation survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTATIONS = [
    Mutation("world-size-factor", "icm_dist/step.py",
             "(disc_loss_local * dist.world_size).backward()", "disc_loss_local.backward()",
             ("tests/test_distributed.py",),
             "D's loss share is not scaled by the world size (DDP then averages 1/W of the gradient)"),
    Mutation("tie-rule", "icm_dist/routing.py",
             "return torch.where(is_max, ids, big).min(dim=1).values",
             "return torch.where(is_max, ids, torch.full_like(ids, -1)).max(dim=1).values",
             ("tests/test_routing.py", "tests/test_distributed.py"),
             "ties go to the highest expert id instead of the lowest"),
    Mutation("masked-adam", "icm_dist/experts.py",
             "pv.copy_(torch.where(keep, p_new, pv))", "pv.copy_(p_new)",
             ("tests/test_competition.py", "tests/test_norms.py"),
             "the masked Adam moves every expert's weights, losers included"),
    Mutation("rank-score-offset", "icm_dist/dist.py",
             "return torch.cat([gathered_RBK[r, :, :n] for r, n in enumerate(plan.sizes)], dim=1)",
             "return torch.cat([gathered_RBK[r, :, :n].roll(1 if r == 1 else 0, dims=1) "
             "for r, n in enumerate(plan.sizes)], dim=1)",
             ("tests/test_distributed.py",),
             "rank 1's block of gathered scores is shifted by one expert"),
    Mutation("sha256-check", "icm_dist/checkpoint.py",
             'if sha256_file(p) != entry["sha256"]:', "if False:",
             ("tests/test_checkpoint.py", "tests/test_checkpoint_ranks.py"),
             "a checkpoint file is loaded without checking its sha256"),
    Mutation("capacity-cut-off", "icm_dist/trainer.py",
             "t < cfg.train.capacity_iterations", "t <= cfg.train.capacity_iterations",
             ("tests/test_policies.py",),
             "the capacity cap applies one iteration longer than train.capacity_iterations"),
    Mutation("split-cut-off", "icm_dist/trainer.py",
             "it > cfg.train.split_iterations", "it > cfg.train.split_iterations + cfg.train.split_every",
             ("tests/test_policies.py",),
             "splits go on one check past train.split_iterations"),
    Mutation("winners-rerun-norm", "icm_dist/families/conv.py",
             "return F.group_norm(h, norm_groups(cfg), n.weight[sl], n.bias[sl], n.eps)",
             "return F.group_norm(h, 1, n.weight[sl], n.bias[sl], n.eps)",
             ("tests/test_norms.py",),
             "a winner's re-run normalizes over other groups than the scoring pass did"),
]


def _scratch_copy() -> Path:
    """The work tree (without runs, data, the venv or caches) in a temporary folder; data linked in."""
    dst = Path(tempfile.mkdtemp(prefix="icm-mut-")) / "repo"
    skip = shutil.ignore_patterns(".venv", "runs", "data", "wandb", ".git", "__pycache__", ".pytest_cache",
                                  "*.egg-info")
    shutil.copytree(REPO, dst, ignore=skip)
    if (REPO / "data").is_dir():
        os.symlink(REPO / "data", dst / "data")
    return dst


def run(m: Mutation, timeout: int) -> tuple[bool, float, str]:
    """(caught, seconds, the first failing test or why not)."""
    copy = _scratch_copy()
    try:
        path = copy / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            return False, 0.0, f"the line to mutate occurs {text.count(m.old)} times in {m.file}"
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(copy)}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        failed = [ln.split(" ")[1] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
        why = failed[0] if failed else (r.stdout.strip().splitlines() or ["no output"])[-1]
        return r.returncode != 0, time.time() - t0, why
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation's test run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:24s} {m.file:26s} {m.what}")
        return 0
    survived = 0
    for m in chosen:
        caught, seconds, why = run(m, args.timeout)
        survived += not caught
        print(f"{m.name:24s} {'caught' if caught else 'SURVIVED':8s} {seconds:5.0f}s  {why}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
