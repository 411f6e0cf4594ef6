"""The sharded training step, 1 process vs 2 (gloo, one thread each), and what it communicates.

    python bench/dist.py [--steps 10] [--warmup 2] [--experts 10] [--batch 32]

Runs the real :func:`icm_dist.step.competition_step` of the paper config (configs/paper.yaml)
on real MNIST inputs (``build_protocol`` over ``--data-root``, the same batches for every set-up,
drawn as the trainer draws them), in three set-ups, side by side: all their processes are spawned
with torch.multiprocessing at once and take turns, one step of one set-up at a time (A, B, C, A, ...),
so a change in the machine's background load hits every set-up alike:

    W=1, 1 thread       the baseline
    W=2, 1 thread each  the experts split 5+5 (gloo on this machine)
    W=1, 2 threads      for reference: the same two cores given to one process instead
    W=1, 1 thread, N'/2 weak scaling: half the committee (rounded down) on one process, what a rank holds

The strong-scaling ratio is the W=1 step time over the W=2 step time (ideal 2.00x, the last line:
``scaling N.NNx``); the weak-scaling one is the step time of N'/2 experts on one process over that of N'
on two (ideal 1.00x: what the second rank's share of D's work, the all-reduce and the gather cost).

It prints the median step time after warm-up (for W=2 the slower rank of each step), the ratio,
and the bytes each collective moves per step, twice: counted analytically from the shapes, and
measured. Measured means: the torch.distributed functions (all_gather, all_reduce, broadcast,
barrier) are wrapped in the worker processes, so every tensor the trainer's collectives pass is
counted, including those inside all_gather_object (its size exchange and pickled payload), and a
DDP communication hook (the default all-reduce, wrapped) counts D's gradient buckets, which DDP
all-reduces from C++ without going through those functions. "Sent" is the bytes of the tensor a rank
hands to the collective, "received" the bytes it gets back; what crosses the wire depends on the
backend's algorithm (a ring all-reduce sends about 2(W-1)/W times the tensor per rank).

After the timed steps each worker also runs, once, the collectives of one logging interval
(tracking.log_every) and of one evaluation batch of ``--eval-rows`` test digits (the trainer uses
eval.batch_size, 64 by default; the bytes are linear in the rows), and the start-up config-hash check.
Not counted: DDP's one-off start-up broadcast of D's parameters from rank 0 and its shape check,
both from C++ (|D| x 4 bytes once; see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# ----------------------------------------------------------------------------- counting


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class Counter:
    """Bytes per (phase, collective), from wrapped torch.distributed functions and a DDP comm hook."""

    OPS = ("all_gather", "all_reduce", "broadcast", "barrier")

    def __init__(self):
        self.phase = "setup"
        self.in_hook = False
        self.rows = defaultdict(lambda: {"calls": 0, "sent": 0, "received": 0})
        self.gather_s = 0.0  # wall time inside the timed steps' all_gathers

    def add(self, op: str, sent: int, received: int) -> None:
        if self.in_hook:  # the DDP hook's own all_reduce: counted once, as ddp_all_reduce
            return
        r = self.rows[f"{self.phase}/{op}"]
        r["calls"] += 1
        r["sent"] += sent
        r["received"] += received

    def install(self) -> None:
        import torch.distributed.distributed_c10d as c10d

        for op in self.OPS:
            orig = getattr(c10d, op)

            def wrapped(*args, _orig=orig, _op=op, **kwargs):
                if _op == "all_gather":  # all_gather(output_list, input)
                    self.add("all_gather", _nbytes(args[1]), _nbytes(args[0]))
                elif _op == "all_reduce":
                    self.add("all_reduce", _nbytes(args[0]), _nbytes(args[0]))
                elif _op == "broadcast":
                    self.add("broadcast", _nbytes(args[0]), _nbytes(args[0]))
                else:
                    self.add(_op, 0, 0)
                t0 = time.perf_counter()
                out = _orig(*args, **kwargs)
                if _op == "all_gather" and self.phase == "step":
                    self.gather_s += time.perf_counter() - t0
                return out

            # c10d's own module globals (all_gather_object calls all_gather through them) and the
            # torch.distributed names that icm_dist.dist calls.
            setattr(c10d, op, wrapped)
            setattr(tdist, op, wrapped)

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        n = _nbytes(bucket.buffer())
        self.add("ddp_all_reduce", n, n)
        self.in_hook = True
        try:
            return allreduce_hook(None, bucket)  # what DDP does without a hook: average, all-reduce
        finally:
            self.in_hook = False


# ----------------------------------------------------------------------------- the worker


def _overrides(args, experts: int) -> list[str]:
    return [f"data.root={args.data_root}", f"expert.num={experts}", f"train.batch_size={args.batch}",
            "tracking.wandb.mode=disabled"]


class Turns:
    """Set-ups take turns, one step each (A, B, C, A, B, C, ...), so that a change in the machine's
    background load during the run hits every set-up alike; only one set-up computes at a time."""

    def __init__(self, ctx, n_setups: int, n_procs: int):
        self.cond = ctx.Condition()
        self.ticket = ctx.Value("i", 0, lock=False)  # turns taken so far; set-up k's step t is turn t*n + k
        self.done = ctx.Value("i", 0, lock=False)
        self.start = ctx.Barrier(n_procs)
        self.n = n_setups

    def wait(self, k: int, t: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.ticket.value == t * self.n + k, timeout=600):
                raise RuntimeError(f"set-up {k} waited 10 minutes for its turn at step {t} (another set-up failed?)")

    def finish(self, k: int, world: int) -> None:
        with self.cond:
            self.done.value += 1
            if self.done.value == world:  # the set-up's last rank hands the turn on
                self.done.value = 0
                self.ticket.value += 1
                self.cond.notify_all()


def _worker(k: int, rank: int, world: int, threads: int, experts_num: int, init_file: str, args, inputs_path: str,
            out_path: str, turns: Turns):
    import faulthandler

    faulthandler.enable()  # a crash in a worker prints its Python stack
    torch.set_num_threads(threads)
    counter = Counter()
    counter.install()
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from icm_dist.competition import build_competition
    from icm_dist.config import load_config
    from icm_dist.dist import Dist, ShardPlan, check_same_config
    from icm_dist.evaluate import run_committee
    from icm_dist.precision import resolve_precision
    from icm_dist.step import competition_step

    cfg = load_config(REPO / "configs" / "paper.yaml", _overrides(args, experts_num))
    dist = Dist(rank, world, 0, torch.device("cpu"), launcher="bench")
    counter.phase = "startup"
    check_same_config(dist, cfg)
    counter.phase = "setup"
    plan = ShardPlan(cfg.expert.num, world)
    comp = build_competition(cfg, dist, plan.block(rank))
    experts, disc_module, disc_opt, disc = comp.experts, comp.disc_module, comp.disc_opt, comp.disc
    if world > 1:
        disc.register_comm_hook(None, counter.ddp_hook)

    inputs = load_file(inputs_path)
    fake, real = inputs["fake"], inputs["real"]
    times, winners = [], []
    won_local = torch.zeros(experts.num, dtype=torch.long)
    turns.start.wait()  # nobody times a step while another set-up is still starting
    for t in range(fake.shape[0]):
        counter.phase = "warmup" if t < args.warmup else "step"
        turns.wait(k, t)
        t0 = time.perf_counter()
        res = competition_step(experts, disc, disc_opt, fake[t], real[t], plan, dist)
        times.append(time.perf_counter() - t0)
        turns.finish(k, world)
        if t >= args.warmup:
            won_local += res.won_E.cpu()
            winners.append(res.winners_B.tolist())

    # The collectives of one logging interval, as the trainer calls them, and one evaluation batch.
    turns.wait(k, fake.shape[0])
    counter.phase = "log"
    dist.all_reduce_sum(res.disc_loss_local.clone().float())
    dist.all_gather_object(res.expert_loss_E.cpu().tolist())
    counter.phase = "eval"
    run_committee(experts, disc_module, inputs["test"], plan, dist, cfg)
    turns.finish(k, world)

    result = {"rank": rank, "times": times, "rows": dict(counter.rows), "gather_s": counter.gather_s,
              "won_local": won_local.tolist(), "winners": winners,
              "precision": resolve_precision(cfg.train.precision, dist.device),
              "threads": torch.get_num_threads(), "experts": list(experts.ids)}
    Path(out_path).write_text(json.dumps(result))
    if world > 1:
        tdist.destroy_process_group()


def run_setups(setups: list[tuple[int, int, int]], args, inputs_path: str) -> list[list[dict]]:
    """All set-ups at once, in processes spawned by torch.multiprocessing, taking turns step by step."""
    ctx = mp.get_context("spawn")
    turns = Turns(ctx, len(setups), sum(w for w, _, _ in setups))
    tmp = tempfile.mkdtemp(prefix="icm_bench_")
    procs, outs = [], []
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    for k, (world, threads, n) in enumerate(setups):
        init = os.path.join(tmp, f"pg_init_{k}")
        outs.append([os.path.join(tmp, f"setup{k}_rank{r}.json") for r in range(world)])
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the child at start
        for r in range(world):
            p = ctx.Process(target=_worker, args=(k, r, world, threads, n, init, args, inputs_path, outs[k][r],
                                                  turns), daemon=False)
            p.start()
            procs.append(p)
    if saved_omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved_omp
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):  # one failed: the others would wait for it
            for p in procs:
                if p.is_alive():
                    p.terminate()
            break
        time.sleep(0.2)
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise SystemExit(f"bench/dist.py: a worker failed (exit codes {bad})")
    results = [[json.loads(Path(o).read_text()) for o in group] for group in outs]
    shutil.rmtree(tmp, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- analytic counts


def analytic(B: int, N: int, W: int, nD: int, eval_rows: int, pickled: int, pickled_hash: int) -> dict:
    """Bytes a rank sends / receives per collective, from the shapes (fp32 scores and gradients)."""
    m = math.ceil(N / W)  # the largest expert block: scores are padded to it
    return {
        "startup/all_gather": {"calls": 2, "sent": 8 + pickled_hash, "received": W * (8 + pickled_hash)},
        "step/all_gather": {"calls": 1, "sent": B * m * 4, "received": W * B * m * 4},
        "step/ddp_all_reduce": {"calls": None, "sent": nD * 4, "received": nD * 4},
        "log/all_reduce": {"calls": 1, "sent": 4, "received": 4},
        # all_gather_object: an int64 size exchange, then the pickled object padded to the largest.
        "log/all_gather": {"calls": 2, "sent": 8 + pickled, "received": W * (8 + pickled)},
        "eval/all_gather": {"calls": 1, "sent": eval_rows * m * 4, "received": W * eval_rows * m * 4},
        "eval/all_reduce": {"calls": 1, "sent": eval_rows * 32 * 32 * 4, "received": eval_rows * 32 * 32 * 4},
    }


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per set-up (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--experts", type=int, default=10, help="N' (paper: 10)")
    p.add_argument("--batch", type=int, default=32, help="B (paper: 32)")
    p.add_argument("--eval-rows", type=int, default=64, help="test digits in the one evaluation batch counted")
    p.add_argument("--data-root", default=str(REPO / "data"), help="MNIST cache (data.root)")
    args = p.parse_args(argv)
    if args.experts < 2:
        p.error("--experts must be at least 2 (the 2-process run needs an expert per rank)")

    from icm_dist.competition import draw_batch
    from icm_dist.config import load_config
    from icm_dist.models import make_discriminator, num_params
    from icm_dist.precision import describe_cpu
    from icm_dist.protocol import build_protocol

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "paper.yaml", _overrides(args, args.experts))
    proto = build_protocol(cfg)
    T, B = args.warmup + args.steps, args.batch
    drawn = [draw_batch(cfg, proto.transformed_x, proto.canonical_x, t) for t in range(T)]
    fake, real = torch.stack([f for f, _ in drawn]), torch.stack([r for _, r in drawn])
    tmp = tempfile.mkdtemp(prefix="icm_bench_inputs_")
    inputs_path = os.path.join(tmp, "inputs.safetensors")
    save_file({"fake": fake.contiguous(), "real": real.contiguous(),
               "test": proto.test_x[:args.eval_rows].contiguous()}, inputs_path)
    nD = num_params(make_discriminator(cfg))

    print(f"bench/dist.py: configs/paper.yaml with N'={args.experts} experts, B={B}, |D|={nD:,} parameters; "
          f"{args.warmup} warm-up + {args.steps} timed steps per set-up; {os.cpu_count()} CPUs ({describe_cpu()}), "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    N, half = args.experts, args.experts // 2
    setups = [(1, 1, N), (2, 1, N), (1, 2, N), (1, 1, half)]
    t0 = time.time()
    results = dict(zip(setups, run_setups(setups, args, inputs_path)))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"  ran the {len(setups)} set-ups, taking turns step by step, in {time.time() - t0:.0f}s", flush=True)

    def step_times(res):
        # Per step, the slowest rank (the step ends for the group when its last rank is done).
        per_step = list(zip(*[r["times"][args.warmup:] for r in res]))
        return [max(s) for s in per_step]

    one, two, weak = (1, 1, N), (2, 1, N), (1, 1, half)
    base = statistics.median(step_times(results[one]))
    meds = {k: statistics.median(step_times(v)) for k, v in results.items()}
    print(f"\nprecision {results[one][0]['precision']}; median step time (ms), after warm-up:")
    print(f"  {'set-up':<30}{'median':>9}{'min':>9}{'max':>9}{'vs W=1x1':>10}")
    for (world, threads, n), res in results.items():
        ts = step_times(res)
        med = statistics.median(ts)
        label = f"W={world}, {threads} thread(s){'' if world == 1 else ' each'}, N'={n}"
        print(f"  {label:<30}{1000 * med:>9.0f}{1000 * min(ts):>9.0f}{1000 * max(ts):>9.0f}{base / med:>9.2f}x")
    # Where W=2 loses against the ideal: the slower rank sets the step, and the all-gather of the scores
    # is where the faster one waits for it.
    per_rank = [statistics.median(r["times"][args.warmup:]) for r in results[two]]
    gather = [r["gather_s"] / args.steps for r in results[two]]
    print(f"  W=2 per rank: median step {', '.join(f'{1000 * t:.0f}' for t in per_rank)} ms; in the scores' "
          f"all_gather {', '.join(f'{1000 * g:.0f}' for g in gather)} ms per step (waiting for the other rank)")
    two = results[two]
    if two[0]["winners"] != results[one][0]["winners"]:
        print("  note: W=2 and W=1 picked different winners at some step (float reduction order)")
    won = [sum(r["won_local"]) for r in two]
    print(f"  W=2 experts per rank {[len(r['experts']) for r in two]}; examples won per rank over the timed steps "
          f"{won} (the winners-only backward runs where the winners are)")

    # Bytes: measured (rank 0 of the W=2 run, per timed step) next to the analytic counts.
    rows = two[0]["rows"]
    import pickle

    pickled = max(len(pickle.dumps([float("nan")] * len(r["experts"]))) for r in two)
    from icm_dist.config import config_hash

    ana = analytic(B, args.experts, 2, nD, args.eval_rows, pickled, len(pickle.dumps(config_hash(cfg))))
    print(f"\nbytes per rank, W=2 (rank 0); 'step' rows are per training step; "
          f"'log' once per tracking.log_every steps; 'eval' per evaluation batch of {args.eval_rows} digits:")
    print(f"  {'collective':<22}{'calls':>7}{'sent':>13}{'received':>13}   {'analytic sent / received':>26}")
    phases = ["startup", "setup", "warmup", "step", "log", "eval"]
    for key in sorted(rows, key=lambda k: (phases.index(k.split("/")[0]), k)):
        if key.startswith("warmup/") or key.startswith("setup/"):
            continue
        r = rows[key]
        div = args.steps if key.startswith("step/") else 1
        calls, sent, recv = r["calls"] / div, r["sent"] / div, r["received"] / div
        a = ana.get(key)
        astr = f"{a['sent']:>12,} / {a['received']:,}" if a else ""
        print(f"  {key:<22}{calls:>7.4g}{sent:>13,.0f}{recv:>13,.0f}   {astr}")
    per_step = sum(rows[k]["sent"] for k in rows if k.startswith("step/")) / args.steps
    print(f"  total sent per training step: {per_step:,.0f} bytes "
          f"(D's gradients {nD * 4:,} = |D| x 4, independent of N'; scores {B * math.ceil(args.experts / 2) * 4:,})")
    print(f"\nW=1 with 2 threads: {meds[one] / meds[(1, 2, N)]:.2f}x of W=1 with 1; weak scaling (N'={half} on one "
          f"process over N'={N} on two, ideal 1.00x): {meds[weak] / meds[(2, 1, N)]:.2f}x; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print(f"scaling {meds[one] / meds[(2, 1, N)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
