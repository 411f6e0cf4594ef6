"""One rank of tests/test_checkpoint_ranks.py (not a test module): a list of phases, each in a process
group of its own.

    RANK=r python tests/ranks_worker.py '{"phases": [{"world": W, "port": P, "train": [...]}, ...]}'

A phase runs on ranks ``0 .. world - 1`` (the others skip it) and is either

- ``train``: ``icm-dist train`` arguments, run exactly as ``launch/train.py`` runs them under the
  "python" launcher (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT=port describe the env:// group);
- ``eval``: ``{"ckpt", "out", "n"}``: join a gloo group on ``port``, load the experts this rank owns
  under that world's shard plan with ``checkpoint.load_into``, run ``evaluate.evaluate`` and
  ``evaluate.run_committee`` on the first ``n`` transformed test digits, and write what this rank saw
  to ``out/w{world}_r{rank}.safetensors`` (rank 0 adds the metrics as ``out/w{world}_metrics.json``).

One process runs several phases because starting a process that imports torch costs seconds on a
small CI machine; every phase still has its own process group, on its own port.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

T0 = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from icm_dist import checkpoint as ck  # noqa: E402
from icm_dist.commands import reuse  # noqa: E402
from icm_dist.commands.cli import main as cli_main  # noqa: E402
from icm_dist.competition import build_competition  # noqa: E402
from icm_dist.dist import Dist, ShardPlan  # noqa: E402
from icm_dist.evaluate import evaluate, run_committee, train_classifier  # noqa: E402
from icm_dist.protocol import build_protocol  # noqa: E402


def evaluate_phase(rank: int, world: int, port: int, ckpt: Path, out: Path, n: int, cache: dict) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        src = reuse.open_source(ckpt)
        cfg, device = src.cfg, torch.device("cpu")
        if "proto" not in cache:  # the same digits in every phase: built once per process
            cache["proto"] = build_protocol(cfg)
            cache["classifier"] = train_classifier(cfg, cache["proto"], device) if rank == 0 else None
        proto, classifier = cache["proto"], cache["classifier"]
        plan = ShardPlan(cfg.expert.num, world)
        dist = Dist(rank, world, 0, device)
        comp = build_competition(cfg, dist, plan.block(rank))
        experts, disc = comp.experts, comp.disc_module
        ck.load_into(ckpt, cfg, experts, disc, comp.disc_opt)
        ev = evaluate(experts, disc, proto, classifier, plan, dist, cfg, n)
        res = run_committee(experts, disc, proto.test_x[:n], plan, dist, cfg)
        tensors = {"scores": res["scores"], "winners": res["winners"], "restored": res["restored"]}
        if rank == 0:
            tensors.update({"ev.win_matrix": ev["win_matrix"], "ev.winners": ev["winners"],
                            "ev.restored": ev["restored"], "ev.mean_scores": ev["mean_scores"]})
            keep = ("accuracy", "accuracy_per_mechanism", "captured", "mechanisms_captured", "inactive_experts")
            (out / f"w{world}_metrics.json").write_text(json.dumps({k: ev[k] for k in keep}))
        elif ev is not None:
            raise AssertionError(f"evaluate returned metrics on rank {rank}: only rank 0 classifies")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"w{world}_r{rank}.safetensors"),
                  metadata={"experts": json.dumps(experts.ids)})
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def main() -> int:
    phases = json.loads(sys.argv[1])["phases"]
    rank = int(os.environ["RANK"])
    cache: dict = {}

    def say(what: str) -> None:  # shown, with every rank's output, when a launch fails
        print(f"[rank {rank}, {time.time() - T0:.1f}s] {what}", flush=True)

    say("imported")
    for i, ph in enumerate(phases):
        world, port = ph["world"], ph["port"]
        if rank >= world:
            continue
        torch.set_num_threads(1)
        if "train" in ph:
            os.environ.update({"WORLD_SIZE": str(world), "MASTER_PORT": str(port), "LOCAL_RANK": str(rank)})
            rc = cli_main(["train", *ph["train"]])
            if rc:
                say(f"phase {i}: training on {world} rank(s) exited with {rc}")
                return rc
        else:
            e = ph["eval"]
            evaluate_phase(rank, world, port, Path(e["ckpt"]), Path(e["out"]), e["n"], cache)
        say(f"phase {i} ({'train' if 'train' in ph else 'eval'}, {world} ranks) done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
