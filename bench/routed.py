"""The full competition against the routed one (train.route_k), side by side in one run.

    python bench/routed.py                         # configs/scale.yaml: 48 experts, batch 64, k = 2, 4, 8
    python bench/routed.py --experts 24 --k 4      # one rank's half of the scale committee
    python bench/routed.py --set expert.norm=layer
    python bench/routed.py --device cuda --largest  # also: the largest committee whose full step fits

Times :func:`icm_dist.step.competition_step` on one process: the full competition (every expert on every
example, as the config has it, compiled if it says so) and routed steps with ``k`` candidates per example,
one step of each per round so that all see the same machine state; medians after warm-up. The candidates
are every example's top k of seeded random logits: a balanced routing, each expert running on about
``B * k / N'`` examples, as a trained router gives once the division has settled (a router that sends most
examples to a few experts does the same total work in fewer, larger batches). The batches are real
transformed digits of the config's mechanisms.

Also printed: the mean cost of an iteration of a routed run, ``(full + (F - 1) * routed) / F`` for
``train.route_full_every`` = F, against the full competition's, and on CUDA each path's peak memory.
``--from-run RUN`` adds the mean cost of an iteration as routing actually ran in that run: its metrics
give, for every logged window, the share of routed iterations (gate closures and splits included) and
their candidates per example (``route/pass_share``: the router's k, the exploration draws, divisions),
and each window costs that mix of this machine's full step and a routed step at those candidates. With
``--experts`` other than the run's, that schedule is carried over to the other committee size (an
extrapolation: the same routed share and candidates per example).
``--largest`` then doubles N' from the config's until a full step no longer fits in the GPU's memory (or
``--max-experts``) and prints the largest committee that ran, its step time and peak memory. The last line
reads ``routed N.NNx`` (full over that mean, for the config's k, or the middle k given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.step import sync  # noqa: E402
from icm_dist.competition import build_competition, draw_batch  # noqa: E402
from icm_dist.config import load_config  # noqa: E402
from icm_dist.dist import Dist, ShardPlan  # noqa: E402
from icm_dist.precision import describe_cpu, resolve_precision  # noqa: E402
from icm_dist.protocol import build_protocol  # noqa: E402
from icm_dist.routing import route_candidates  # noqa: E402
from icm_dist.step import competition_step  # noqa: E402


def _paths(cfg, ks, device):
    """A fresh committee, D and D's Adam per path (None: the full competition)."""
    out, dist = {}, Dist(0, 1, 0, device)
    for k in ks:
        comp = build_competition(cfg, dist)
        out["full" if k is None else f"k={k}"] = (k, comp.experts, comp.disc, comp.disc_opt)
    return out


def _time(cfg, proto, paths, dist, steps: int, warmup: int = 2) -> tuple[dict, dict]:
    """Median seconds per step of each path, one step of each per round; peak CUDA memory (MiB) per path."""
    N, B = cfg.expert.num, cfg.train.batch_size
    plan, device = ShardPlan(N, 1), dist.device
    gen = torch.Generator().manual_seed(0)
    times, peak = {name: [] for name in paths}, {}
    for t in range(warmup + steps):
        f, r = (x.to(device) for x in draw_batch(cfg, proto.transformed_x, proto.canonical_x, t))
        logits = torch.rand(B, N, generator=gen).to(device)
        for name, (k, ex, D, opt) in paths.items():
            cand = None if k is None else route_candidates(logits, k)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            competition_step(ex, D, opt, f, r, plan, dist, candidates_BN=cand)
            sync(device)
            if t >= warmup:
                times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    return {name: statistics.median(v) for name, v in times.items()}, peak


def run_schedule(run_dir: Path) -> list[tuple[float, float]]:
    """Every logged window of a routed run: (share of routed iterations, candidates per example of a routed
    step), from its metrics.jsonl (``route/routed_share``, ``route/pass_share``) and its config's N'."""
    N = yaml.safe_load((run_dir / "config.yaml").read_text())["expert"]["num"]
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "route/pass_share" not in row:
            continue
        rs = row["route/routed_share"]
        # pass_share = (1 - rs) * 1 + rs * c / N over the window's steps
        out.append((rs, (row["route/pass_share"] - (1 - rs)) / rs * N if rs > 0 else 0.0))
    if not out:
        raise SystemExit(f"bench/routed.py: {run_dir}/metrics.jsonl has no route/pass_share (a routed run "
                         "of this version logs it)")
    return out


def _largest(args, over, proto, dist) -> None:
    """Double N' until a full step does not fit (CUDA out of memory) or --max-experts; print the last that ran."""
    n, best = load_config(args.config, over).expert.num, None
    while n <= args.max_experts:
        # Eager: a compiled pass would recompile at every size.
        cfg = load_config(args.config, [*over, f"expert.num={n}", "train.compile=false"])
        try:
            med, peak = _time(cfg, proto, _paths(cfg, [None], dist.device), dist, steps=2, warmup=1)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if "out of memory" not in str(e).lower():
                raise
            print(f"  N'={n}: out of memory")
            break
        best = (n, med["full"], peak.get("full"))
        print(f"  N'={n}: full step {1000 * med['full']:.0f} ms"
              + (f", peak {peak['full']:.0f} MiB" if "full" in peak else ""), flush=True)
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
        n *= 2
    if best:
        print(f"largest committee that ran: {best[0]} experts, {1000 * best[1]:.0f} ms per full step"
              + (f", peak {best[2]:.0f} MiB" if best[2] else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "scale.yaml"))
    p.add_argument("--experts", type=int, help="N' (default: the config's)")
    p.add_argument("--k", type=int, nargs="*", default=[2, 4, 8], help="candidates per example")
    p.add_argument("--full-every", type=int, default=20, help="train.route_full_every for the mean cost")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--largest", action="store_true", help="then find the largest committee whose full step fits")
    p.add_argument("--max-experts", type=int, default=4096, help="where --largest stops doubling")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--from-run", type=Path, help="a routed run's directory: also the mean cost as it routed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    over = [f"data.root={args.data_root}", "tracking.wandb.mode=disabled", f"device={args.device}", *args.set]
    if args.experts:
        over.append(f"expert.num={args.experts}")
    cfg = load_config(args.config, over)
    N, B = cfg.expert.num, cfg.train.batch_size
    proto = build_protocol(cfg)
    dist = Dist(0, 1, 0, torch.device(args.device))
    schedule = run_schedule(args.from_run) if args.from_run else []

    def run_k(c: float) -> int:  # a window's candidates per example, as a k this committee can route with
        return max(1, min(N - 1, round(c)))

    run_ks = sorted({run_k(c) for rs, c in schedule if rs > 0})
    med, peak = _time(cfg, proto, _paths(cfg, sorted({None, *args.k, *run_ks}, key=lambda k: k or 0), dist.device),
                      dist, args.steps)

    print(f"bench/routed.py: {os.path.relpath(args.config, REPO)}, N'={N}, B={B}, {len(cfg.data.mechanisms)} "
          f"mechanisms, norm {cfg.expert.norm}, precision {resolve_precision(cfg.train.precision, dist.device)}, "
          f"compile {cfg.train.compile} (full steps); {args.device}, {args.threads} thread(s); "
          f"{describe_cpu()}")
    F = args.full_every
    print(f"  {'path':<8}{'median ms':>11}{'vs full':>9}{f'mean ms/iter (F={F})':>22}{'vs full':>9}")
    means = {}
    for name, m in med.items():
        mean = m if name == "full" else (med["full"] + (F - 1) * m) / F
        means[name] = mean
        mem = f"{peak[name]:>10.0f} MiB" if name in peak else ""
        print(f"  {name:<8}{1000 * m:>11.0f}{med['full'] / m:>8.2f}x{1000 * mean:>22.0f}"
              f"{med['full'] / mean:>8.2f}x{mem}")
    if schedule:
        run_mean = statistics.mean((1 - rs) * med["full"] + rs * med[f"k={run_k(c)}"] if rs > 0 else med["full"]
                                   for rs, c in schedule)
        routed = statistics.mean(rs for rs, _ in schedule)
        print(f"  as {args.from_run} routed ({len(schedule)} windows, {routed:.0%} of iterations routed, "
              f"candidates per example {', '.join(map(str, run_ks))}): {1000 * run_mean:.0f} ms/iter, "
              f"{med['full'] / run_mean:.2f}x against the full competition")
    if args.largest:
        _largest(args, over, proto, dist)
    k = cfg.train.route_k if cfg.train.route_k in args.k else args.k[len(args.k) // 2]
    print(f"routed {med['full'] / means[f'k={k}']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
