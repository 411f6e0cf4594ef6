"""The training step: the reference path against the fast path, side by side in one run.

    python bench/step.py                      # paper config (10 experts, batch 32) and 40 experts
    python bench/step.py --experts 10 --steps 20 --device cuda
    python bench/step.py --set expert.norm=group      # any config override, applied to every path
    python bench/step.py --arch conv stn unet         # each expert family's step beside the first's

Reference path: ``reference.reference_step``, a plain loop over ``Expert`` modules in fp32 with a
dense backward through every expert and D, and a separate D update (what the public
implementations do). Fast path: ``step.competition_step`` with configs/paper.yaml as it is
(batched experts as grouped convolutions, channels_last, bf16 autocast where native, one D pass that
both scores and trains, the dense expert backward, ``torch.compile`` of the experts' pass). Timed
beside it: the same with ``train.compile`` flipped, and the ``winners`` expert-backward mode (which
backpropagates only through the examples each expert won). One step of every path per round, so
that all see the same machine state; the medians are compared. Also: identity-initialization and
evaluation throughput, and peak memory of the reference and the fast path (a child process each).

The last line reads ``speedup N.NNx`` (reference over fast, paper config).

With ``--arch``, the families instead: the fast step of each family (``expert.arch``, on top of the
paper config and ``--set``) at each committee size, one step of each per round, with its ratio to the
first family's step and its peak memory; the last line reads ``<arch> N.NNx`` for each family after the
first (its step over the first's, headline size).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from icm_dist.competition import build_competition, draw_batch  # noqa: E402
from icm_dist.config import apply_override, load_config  # noqa: E402
from icm_dist.dist import Dist, ShardPlan  # noqa: E402
from icm_dist.evaluate import run_committee  # noqa: E402
from icm_dist.families import get_family  # noqa: E402
from icm_dist.identity import identity_init  # noqa: E402
from icm_dist.precision import describe_cpu, resolve_precision  # noqa: E402
from icm_dist.protocol import build_protocol  # noqa: E402
from icm_dist.reference import reference_step  # noqa: E402
from icm_dist.step import competition_step, expert_backward  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(experts: int, device: str, overrides=()):
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "paper.yaml"),
                      [f"expert.num={experts}", f"device={device}", *overrides])
    proto = build_protocol(cfg)
    dist = Dist(0, 1, 0, torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")))
    return cfg, proto, dist


def batch(proto, cfg, t, device):
    """The trainer's batch of iteration ``t + 1``, on ``device``."""
    f, r = draw_batch(cfg, proto.transformed_x, proto.canonical_x, t)
    return f.to(device), r.to(device)


def fast_path(cfg, dist):
    """The trainer's experts, D and D's optimizer for one process holding every expert."""
    comp = build_competition(cfg, dist)
    return comp.experts, comp.disc, comp.disc_opt


def make_paths(cfg, dist):
    fast, D_fast, opt_fast = fast_path(cfg, dist)
    ref = [e.float().to(memory_format=torch.contiguous_format) for e in fast.bank.to_experts()]
    adam = {"betas": tuple(cfg.train.betas), "eps": cfg.train.eps}
    ref_opts = [torch.optim.Adam(e.parameters(), lr=cfg.train.lr_expert, **adam) for e in ref]
    D_ref = copy.deepcopy(D_fast).to(memory_format=torch.contiguous_format)
    opt_ref = torch.optim.Adam(D_ref.parameters(), lr=cfg.train.lr_discriminator, **adam)
    return (fast, D_fast, opt_fast), (ref, ref_opts, D_ref, opt_ref)


def variants(cfg) -> list[tuple[str, list[str]]]:
    """The fast paths timed beside the reference: the config as it is (the headline), the same with
    ``train.compile`` flipped, and with BatchNorm also the ``winners`` expert-backward mode (compile does
    not apply to it) and the same committee with a per-example norm (``layer``, whose step
    back-propagates only the winners: the exact gradient)."""
    flip = "eager" if cfg.train.compile else "compiled"
    out = [("fast", []), (flip, [f"train.compile={not cfg.train.compile}"])]
    if cfg.expert.norm == "batch":
        out.append(("winners", ["train.expert_backward=winners", "train.compile=false"]))
        out.append(("layernorm", ["expert.norm=layer", "train.expert_backward=auto"]))
    return out


def rotate(paths: dict, proto, cfg, dist, steps: int, warmup: int) -> dict[str, float]:
    """Median times (s) of ``paths[name](fake, real)``, one step of each per round on the same batch."""
    times: dict[str, list] = {k: [] for k in paths}
    for t in range(warmup + steps):
        f, r = batch(proto, cfg, t, dist.device)
        for name, step in paths.items():
            sync(dist.device)
            t0 = time.perf_counter()
            step(f, r)
            sync(dist.device)
            if t >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_steps(cfg, proto, dist, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median step times (s) of the reference path and of every fast variant, measured in rotation
    (one step of each per round) so that all see the same machine state. Compilation happens in the
    warm-up steps."""
    plan = ShardPlan(cfg.expert.num, 1)
    (fast, D_fast, opt_fast), (ref, ref_opts, D_ref, opt_ref) = make_paths(cfg, dist)
    paths = {"reference": lambda f, r: reference_step(ref, ref_opts, D_ref, opt_ref, f, r)}
    for name, over in variants(cfg):
        vcfg = copy.deepcopy(cfg)
        for o in over:
            apply_override(vcfg, o)
        (ex, D, opt), _ = make_paths(vcfg, dist) if over else ((fast, D_fast, opt_fast), None)
        paths[name] = functools.partial(lambda ex, D, opt, f, r: competition_step(ex, D, opt, f, r, plan, dist),
                                        ex, D, opt)
    return rotate(paths, proto, cfg, dist, steps, warmup)


def time_families(cfg, proto, dist, arches: list[str], steps: int, warmup: int = 3) -> dict[str, float]:
    """Median fast-step times (s) of each family (``cfg`` with ``expert.arch`` set to it), in rotation."""
    paths, plan = {}, ShardPlan(cfg.expert.num, 1)
    for arch in arches:
        acfg = copy.deepcopy(cfg)
        apply_override(acfg, f"expert.arch={arch}")
        paths[arch] = functools.partial(competition_step, *fast_path(acfg, dist), plan=plan, dist=dist)
    return rotate(paths, proto, cfg, dist, steps, warmup)


def families_main(args) -> None:
    rows = []
    for n in args.experts:
        cfg, proto, dist = setup(n, args.device, args.set)
        med = time_families(cfg, proto, dist, args.arch, args.steps)
        for arch in args.arch:
            mem = None if args.no_memory else peak_memory("fast", n, args.device,
                                                          [*args.set, f"expert.arch={arch}"])
            rows.append({"experts": n, "arch": arch, "step_ms": 1000 * med[arch],
                         "ratio": med[arch] / med[args.arch[0]], "peak_mib": mem})
    name = (torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads, {describe_cpu()}")
    print(f"device: {name}; precision {resolve_precision(cfg.train.precision, dist.device)}, "
          f"compile {cfg.train.compile}; batch {cfg.train.batch_size}; overrides {args.set or 'none'}")
    print(f"{'experts':>7} {'arch':>24} {'step ms':>8} {'ratio':>6} {'peak MiB':>9}")
    for r in rows:
        mem = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        print(f"{r['experts']:>7} {r['arch']:>24} {r['step_ms']:8.1f} {r['ratio']:5.2f}x {mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    head = [r for r in rows if r["experts"] == args.experts[0]]
    print(" ".join(f"{r['arch']} {r['ratio']:.2f}x" for r in head[1:]))


def throughput(cfg, proto, dist):
    """Identity-init steps/s and evaluation examples/s of the fast path."""
    ex, D, _ = fast_path(cfg, dist)
    cfg_id = copy.deepcopy(cfg)
    cfg_id.identity_init.max_steps = 10
    cfg_id.identity_init.mse = 1e-9  # never converges: times exactly max_steps steps
    identity_init(ex, proto.transformed_x.to(dist.device), cfg_id, dist.device)  # warm-up
    sync(dist.device)
    t0 = time.perf_counter()
    identity_init(ex, proto.transformed_x.to(dist.device), cfg_id, dist.device)
    sync(dist.device)
    id_rate = 10 / (time.perf_counter() - t0)
    plan = ShardPlan(cfg.expert.num, 1)
    n = 2000
    run_committee(ex, D, proto.test_x[:500], plan, dist, cfg)
    sync(dist.device)
    t0 = time.perf_counter()
    run_committee(ex, D, proto.test_x[:n], plan, dist, cfg)
    sync(dist.device)
    return id_rate, n / (time.perf_counter() - t0)


def peak_memory(path: str, experts: int, device: str, overrides=(), steps: int = 5) -> float:
    """Peak memory in MiB of ``steps`` steps of one path, in a fresh child process: the rise of the
    peak resident set (Linux VmHWM, reset after set-up) on the CPU, torch's peak allocation on CUDA."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
sys.argv = ['x']
from bench.step import setup, make_paths, batch
from icm_dist.reference import reference_step
from icm_dist.step import competition_step
from icm_dist.dist import ShardPlan
cfg, proto, dist = setup({experts}, {device!r}, {list(overrides)!r})
(fast, Df, of), (ref, ro, Dr, orf) = make_paths(cfg, dist)
del proto.test_x, proto.test_clean
import gc; gc.collect()
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
if dist.device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
else:
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS (VmHWM) to the current RSS
base = status('VmRSS')
for t in range({steps}):
    f, r = batch(proto, cfg, t, dist.device)
    if {path!r} == 'fast':
        competition_step(fast, Df, of, f, r, ShardPlan(cfg.expert.num, 1), dist)
    else:
        reference_step(ref, ro, Dr, orf, f, r)
if dist.device.type == 'cuda':
    print(torch.cuda.max_memory_allocated() / 2**20)
else:
    print(status('VmHWM') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="*", default=[10, 40], help="committee sizes (first is the headline)")
    ap.add_argument("--steps", type=int, default=15, help="measured steps per path (after 3 warm-up steps)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides on top of configs/paper.yaml, e.g. expert.norm=group")
    ap.add_argument("--arch", nargs="*", metavar="ARCH",
                    help="time these expert families' fast steps side by side instead (the first is the baseline), "
                         "e.g. conv stn unet")
    args = ap.parse_args()
    if args.arch:
        return families_main(args)
    rows = []
    for n in args.experts:
        cfg, proto, dist = setup(n, args.device, args.set)
        med = time_steps(cfg, proto, dist, args.steps)
        id_rate, eval_rate = throughput(cfg, proto, dist)
        mem = (None, None) if args.no_memory else (peak_memory("reference", n, args.device, args.set),
                                                   peak_memory("fast", n, args.device, args.set))
        row = {"experts": n, "reference_ms": 1000 * med["reference"]}
        for name in med:
            if name != "reference":
                row[f"{name}_ms"] = 1000 * med[name]
                row[f"speedup_{name}" if name != "fast" else "speedup"] = med["reference"] / med[name]
        row.update({"identity_steps_per_s": id_rate, "eval_examples_per_s": eval_rate,
                    "reference_peak_mib": mem[0], "fast_peak_mib": mem[1]})
        rows.append(row)
    dev = dist.device
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads, {describe_cpu()}")
    print(f"device: {name}; fast path: precision {resolve_precision(cfg.train.precision, dev)}, "
          f"channels_last {cfg.train.channels_last}, "
          f"expert_backward {expert_backward(cfg, get_family(cfg.expert).couples_batch(cfg.expert))}, "
          f"compile {cfg.train.compile}; batch {cfg.train.batch_size}")
    others = [v for v, _ in variants(cfg)[1:]]
    print(f"{'experts':>7} {'reference ms':>13} {'fast ms':>8} {'ratio':>6} "
          + "".join(f"{v + ' ms':>12} {'ratio':>6} " for v in others)
          + f"{'id steps/s':>10} {'eval ex/s':>9} {'ref MiB':>8} {'fast MiB':>8}")
    for r in rows:
        mem = (f"{r['reference_peak_mib']:8.0f} {r['fast_peak_mib']:8.0f}" if r["fast_peak_mib"] is not None
               else f"{'-':>8} {'-':>8}")
        print(f"{r['experts']:>7} {r['reference_ms']:13.1f} {r['fast_ms']:8.1f} {r['speedup']:5.2f}x "
              + "".join(f"{r[f'{v}_ms']:12.1f} {r[f'speedup_{v}']:5.2f}x " for v in others)
              + f"{r['identity_steps_per_s']:10.2f} {r['eval_examples_per_s']:9.0f} {mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    print(f"speedup {rows[0]['speedup']:.2f}x")


if __name__ == "__main__":
    main()
