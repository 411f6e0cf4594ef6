"""Predicted step time and parallel efficiency of the sharded step for W = 1..64 ranks and committees up to
1024 experts, from measured single-process step times and the step's exact byte counts.

    python bench/cost_model.py                                  # H200 step times of docs/performance.md
    python bench/cost_model.py --points 10:374.6,40:1872.0      # the 2-core CPU's (docs/performance.md)
    python bench/cost_model.py --points 10:51.7,100:63.1 --experts 100 1024 --json model.json

The model (docs/distributed.md, "A cost model"), per step and per rank, with m = ceil(N'/W) experts a rank:

* compute: t1(m), the measured step time of one process holding m experts (linear between the measured
  points, extended above them with the slope of the last two, and held at the smallest point's time
  below it: measure the per-rank sizes you care about, rows outside the points are marked "extrap.").
  It holds the experts' passes, D's rows for their outputs, and the part that does not shrink with W:
  D's pass over the real batch, its Adam step, launch overhead. Each rank runs its experts on the whole
  batch, so this is all the compute a rank does.
* D's gradient all-reduce: 4|D| bytes, a ring: 2(W-1)/W * 4|D| / bandwidth + 2(W-1) * latency.
* the all_gather of the scores: each rank's 4*B*m bytes to every other: (W-1) * 4*B*m / bandwidth +
  (W-1) * latency.
* with more ranks than --gpus-per-node, the ring crosses nodes: its bandwidth is the network's.
* the routed competition (``--routed-share R --candidates C``: a share R of the iterations routed with C
  candidates per example, exploration included, the rest full competitions): the expert passes are a
  share P = (1 - R) + R * C / N' of a full competition's. The per-expert part of t1(m) (the slope between
  the two smallest points, times m) shrinks by P, the fixed part does not; and rank 0 broadcasts each
  step's candidate mask, B*N' bytes, along a tree: ceil(log2 W) * (B*N' / bandwidth + latency). A run's
  summary has R (``routing.routed_steps`` / iterations) and P (``routing.pass_share``), hence C.
Nothing overlaps (DDP can overlap its all-reduce with D's backward: the prediction is an upper bound),
and every rank is assumed to hold its share of the candidates (an uneven share is a straggler).
Efficiency is t1(N') / (W * step(W)), both at the same pass share.
"""

from __future__ import annotations

import argparse
import json
import math

D_PARAMS = 1_122_417  # configs/paper.yaml's discriminator (docs/distributed.md)


def t1(points: list[tuple[int, float]], m: int) -> float:
    """One process's step time (ms) with m experts: piecewise linear through the measured points, extended
    above them with the last slope; below the smallest it is that point's time (a step never gets cheaper
    than the smallest committee measured: the fixed part is not known below it, so this errs slow)."""
    pts = sorted(points)
    if m <= pts[0][0] or len(pts) == 1:
        return pts[0][1] if m <= pts[0][0] else pts[0][1] * m / pts[0][0]
    for (n0, t0), (n1, t1_) in zip(pts, pts[1:]):
        if m <= n1 or n1 == pts[-1][0]:
            return t0 + (t1_ - t0) / (n1 - n0) * (m - n0)
    raise AssertionError("unreachable")


def routed_t1(points: list[tuple[int, float]], m: int, pass_share: float) -> float:
    """t1(m) with its per-expert part scaled by ``pass_share``: the fixed part (D on the real batch, the
    optimizer steps, launches) is the intercept of the two smallest points, at least 0 (all of t1 is
    per-expert when only one point is known)."""
    pts = sorted(points)
    fixed = 0.0
    if len(pts) > 1:
        (n0, t0), (n1, t1_) = pts[0], pts[1]
        fixed = max(0.0, t0 - (t1_ - t0) / (n1 - n0) * n0)
    return fixed + (t1(points, m) - fixed) * pass_share


def pass_share_of(n_experts: int, routed_share: float, candidates: float) -> float:
    """Expert passes of a routed run's mean iteration as a share of a full competition's."""
    return (1 - routed_share) + routed_share * min(candidates, n_experts) / n_experts


def predict(points, n_experts: int, world: int, batch: int, d_params: int, bw_node: float, bw_net: float,
            latency_us: float, gpus_per_node: int, routed_share: float = 0.0, candidates: float = 0.0) -> dict:
    """The step of one rank, in ms, split into its parts; bandwidths in GB/s. ``routed_share`` > 0: the
    routed competition's mean iteration."""
    pass_share = pass_share_of(n_experts, routed_share, candidates)
    m = math.ceil(n_experts / world)
    bw = (bw_node if world <= gpus_per_node else bw_net) * 1e9 / 1e3  # bytes per ms
    lat = latency_us / 1e3
    compute = routed_t1(points, m, pass_share)
    allreduce = 2 * (world - 1) / world * 4 * d_params / bw + 2 * (world - 1) * lat if world > 1 else 0.0
    gather = (world - 1) * 4 * batch * m / bw + (world - 1) * lat if world > 1 else 0.0
    mask = math.ceil(math.log2(world)) * (batch * n_experts / bw + lat) if routed_share > 0 else 0.0
    step = compute + allreduce + gather + mask
    parts = {"compute": compute, "D all-reduce": allreduce, "score all_gather": gather, "mask broadcast": mask}
    lo, hi = min(n for n, _ in points), max(n for n, _ in points)
    return {"experts": n_experts, "world": world, "per_rank": m, "step_ms": step,
            "extrapolated": not (lo <= m <= hi and lo <= n_experts <= hi),
            "efficiency": routed_t1(points, n_experts, pass_share) / (world * step),
            "dominant": max(parts, key=parts.get),
            "pass_share": round(pass_share, 4), **{k: round(v, 4) for k, v in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", default="10:51.7,100:63.1",
                   help="measured single-process step times, EXPERTS:MS,... (default: one H200, docs/performance.md)")
    p.add_argument("--experts", type=int, nargs="+", default=[10, 100, 1024])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-params", type=int, default=D_PARAMS)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink", type=float, default=300.0, help="GB/s a ring sees inside a node (NVLink)")
    p.add_argument("--network", type=float, default=12.5, help="GB/s between nodes (100 Gb/s)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per message and hop")
    p.add_argument("--routed-share", type=float, default=0.0,
                   help="the routed competition: the share of iterations that route (0: the full competition)")
    p.add_argument("--candidates", type=float, default=6.0,
                   help="with --routed-share: candidates per example in a routed step, exploration included")
    p.add_argument("--json", help="also write every prediction to this file")
    a = p.parse_args()
    points = [(int(n), float(t)) for n, t in (x.split(":") for x in a.points.split(","))]
    if not 0 <= a.routed_share <= 1:
        p.error(f"--routed-share must be in [0, 1], got {a.routed_share}")
    if a.routed_share and a.candidates < 1:
        p.error(f"--candidates must be >= 1, got {a.candidates}")
    rows = []
    for label, bw_node in (("NVLink inside a node, network between nodes", a.nvlink),
                           ("network between every rank", a.network)):
        print(f"\n{label} ({bw_node:g} GB/s up to {a.gpus_per_node} ranks, then {a.network:g} GB/s; "
              f"latency {a.latency_us:g} us; |D| = {a.d_params:,}; B = {a.batch}; measured points {points}; "
              f"routed share {a.routed_share:g}, {a.candidates:g} candidates)")
        print(f"{'experts':>8} {'W':>4} {'per rank':>9} {'step ms':>9} {'efficiency':>11}  "
              "pass share  dominant (compute / all-reduce / gather / mask ms)")
        for n in a.experts:
            for w in a.worlds:
                if w > n:
                    continue
                r = predict(points, n, w, a.batch, a.d_params, bw_node, a.network, a.latency_us, a.gpus_per_node,
                            a.routed_share, a.candidates)
                rows.append({"setting": label, **r})
                print(f"{n:>8} {w:>4} {r['per_rank']:>9} {r['step_ms']:>9.2f} {r['efficiency']:>10.0%}  "
                      f"{r['pass_share']:>10.3f}  {r['dominant']} ({r['compute']:.2f} / {r['D all-reduce']:.2f}"
                      f" / {r['score all_gather']:.3f} / {r['mask broadcast']:.3f})"
                      + ("  extrap." if r["extrapolated"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
