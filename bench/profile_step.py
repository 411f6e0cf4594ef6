"""Where one training step's time goes: torch.profiler over a few steps of the fast path.

    python bench/profile_step.py                          # configs/paper.yaml as it ships
    python bench/profile_step.py --set expert.norm=layer  # any config override
    python bench/profile_step.py --threads 1 --steps 5

Prints the mean step time and the operators by self CPU time (after warm-up steps, so compilation is
not counted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.step import batch, make_paths, setup  # noqa: E402
from icm_dist.dist import ShardPlan  # noqa: E402
from icm_dist.precision import describe_cpu  # noqa: E402
from icm_dist.step import competition_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--rows", type=int, default=15, help="operators to list")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, proto, dist = setup(args.experts, "cpu", args.set)
    (experts, disc, disc_opt), _ = make_paths(cfg, dist)
    plan = ShardPlan(cfg.expert.num, 1)
    for t in range(args.warmup):
        competition_step(experts, disc, disc_opt, *batch(proto, cfg, t, dist.device), plan, dist)
    t0 = time.perf_counter()
    with torch.profiler.profile() as prof:
        for t in range(args.warmup, args.warmup + args.steps):
            competition_step(experts, disc, disc_opt, *batch(proto, cfg, t, dist.device), plan, dist)
    per_step = (time.perf_counter() - t0) / args.steps
    print(f"{describe_cpu()}; overrides {args.set or 'none'}, {torch.get_num_threads()} threads: "
          f"{1000 * per_step:.0f} ms a step (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
