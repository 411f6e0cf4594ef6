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
Nothing overlaps (DDP can overlap its all-reduce with D's backward: the prediction is an upper bound).
Efficiency is t1(N') / (W * step(W)).
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


def predict(points, n_experts: int, world: int, batch: int, d_params: int, bw_node: float, bw_net: float,
            latency_us: float, gpus_per_node: int) -> dict:
    """The step of one rank, in ms, split into its parts; bandwidths in GB/s."""
    m = math.ceil(n_experts / world)
    bw = (bw_node if world <= gpus_per_node else bw_net) * 1e9 / 1e3  # bytes per ms
    lat = latency_us / 1e3
    compute = t1(points, m)
    allreduce = 2 * (world - 1) / world * 4 * d_params / bw + 2 * (world - 1) * lat if world > 1 else 0.0
    gather = (world - 1) * 4 * batch * m / bw + (world - 1) * lat if world > 1 else 0.0
    step = compute + allreduce + gather
    parts = {"compute": compute, "D all-reduce": allreduce, "score all_gather": gather}
    lo, hi = min(n for n, _ in points), max(n for n, _ in points)
    return {"experts": n_experts, "world": world, "per_rank": m, "step_ms": step,
            "extrapolated": not (lo <= m <= hi and lo <= n_experts <= hi),
            "efficiency": t1(points, n_experts) / (world * step), "dominant": max(parts, key=parts.get),
            **{k: round(v, 4) for k, v in parts.items()}}


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
    p.add_argument("--json", help="also write every prediction to this file")
    a = p.parse_args()
    points = [(int(n), float(t)) for n, t in (x.split(":") for x in a.points.split(","))]
    rows = []
    for label, bw_node in (("NVLink inside a node, network between nodes", a.nvlink),
                           ("network between every rank", a.network)):
        print(f"\n{label} ({bw_node:g} GB/s up to {a.gpus_per_node} ranks, then {a.network:g} GB/s; "
              f"latency {a.latency_us:g} us; |D| = {a.d_params:,}; B = {a.batch}; measured points {points})")
        print(f"{'experts':>8} {'W':>4} {'per rank':>9} {'step ms':>9} {'efficiency':>11}  "
              "dominant (compute / all-reduce / gather ms)")
        for n in a.experts:
            for w in a.worlds:
                if w > n:
                    continue
                r = predict(points, n, w, a.batch, a.d_params, bw_node, a.network, a.latency_us, a.gpus_per_node)
                rows.append({"setting": label, **r})
                print(f"{n:>8} {w:>4} {r['per_rank']:>9} {r['step_ms']:>9.2f} {r['efficiency']:>10.0%}  "
                      f"{r['dominant']} ({r['compute']:.2f} / {r['D all-reduce']:.2f} / {r['score all_gather']:.3f})"
                      + ("  extrap." if r["extrapolated"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
