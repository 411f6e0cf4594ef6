"""Processes and what passes between them: the process group, the shard plan and the collectives.

:class:`ShardPlan` and the score padding are pure logic, tested without a process group.
:class:`Dist` wraps the few collectives the trainer needs and degrades to no-ops in a single
process, so world size 1 runs exactly the same code. It is the one place that calls
``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .config import Config, config_hash
from .errors import LaunchError, on_every_rank

# ----------------------------------------------------------------------------- the shard plan


@dataclass(frozen=True)
class ShardPlan:
    """Rank ``r`` owns the contiguous global expert ids ``blocks[r]``; block sizes differ by at most one."""

    num_experts: int
    world_size: int

    def __post_init__(self):
        if self.world_size > self.num_experts:
            raise on_every_rank(LaunchError(
                f"{self.world_size} ranks but only {self.num_experts} experts: every rank must own at least one "
                f"expert; launch at most {self.num_experts} processes or raise expert.num"))

    @property
    def sizes(self) -> list[int]:
        q, r = divmod(self.num_experts, self.world_size)
        return [q + (1 if i < r else 0) for i in range(self.world_size)]

    @property
    def starts(self) -> list[int]:
        s, out = 0, []
        for n in self.sizes:
            out.append(s)
            s += n
        return out

    def block(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank] + self.sizes[rank])

    @property
    def max_block(self) -> int:
        return max(self.sizes)

    def owner(self, expert_id: int) -> int:
        for r in range(self.world_size):
            if expert_id in self.block(r):
                return r
        raise IndexError(expert_id)


def real_slice(batch: int, world_size: int, rank: int) -> slice:
    """This rank's share of the canonical batch; shares differ in size by at most one (some may be empty)."""
    q, r = divmod(batch, world_size)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (1 if rank < r else 0))


def pad_scores(scores_BE: torch.Tensor, max_block: int) -> torch.Tensor:
    """Pad a rank's ``[B, E]`` scores to ``[B, K]`` (K = ``max_block``) with -inf: collectives want equal shapes."""
    B, E = scores_BE.shape
    if E == max_block:
        return scores_BE.contiguous()
    pad = scores_BE.new_full((B, max_block - E), float("-inf"))
    return torch.cat([scores_BE, pad], dim=1)


def unpad_scores(gathered_RBK: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    """``[R, B, K]`` gathered blocks to the ``[B, N]`` score matrix in global expert order."""
    return torch.cat([gathered_RBK[r, :, :n] for r, n in enumerate(plan.sizes)], dim=1)


# ----------------------------------------------------------------------------- process groups


def launched_by_accelerate() -> bool:
    return any(k.startswith("ACCELERATE_") for k in os.environ) and "ACCELERATE_DISABLE" not in os.environ


class Dist:
    """Rank, world size, device and the collectives of the step; no-ops in a single process."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, accelerator=None,
                 launcher: str = "python"):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.accelerator = accelerator
        self.launcher = launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def gather_scores(self, scores_BE: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
        """All ranks' local ``[B, E]`` scores as one ``[B, N]`` matrix, identical on every rank."""
        if not self.enabled:
            return scores_BE
        padded = pad_scores(scores_BE, plan.max_block)
        # all_gather of a list works on gloo and nccl alike (gloo has no all_gather_into_tensor).
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        return unpad_scores(torch.stack(parts), plan)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_mask(self, mask: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s boolean tensor on every rank (the others pass one of the same shape)."""
        if not self.enabled:
            return mask
        buf = mask.to(torch.uint8).contiguous()  # bool is not a dtype every backend reduces or sends
        tdist.broadcast(buf, src=src)
        return buf.bool()

    def barrier(self) -> None:
        if self.enabled:
            # gloo's barrier is a real collective; nccl's wants the device, which is already set.
            tdist.barrier()

    def wrap_discriminator(self, disc: torch.nn.Module) -> torch.nn.Module:
        """D replicated with DDP; the experts never go through DDP (each lives on one rank)."""
        if not self.enabled:
            return disc
        if self.accelerator is not None:
            # accelerate's prepare wraps the whole model it is given in DDP: only D goes through it.
            return self.accelerator.prepare_model(disc)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(disc, device_ids=ids)

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def _pick_device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _restart_store(rank: int, world: int, timeout) -> dict:
    """After a torchrun restart: the agent's store under a prefix of this attempt's own.

    torchrun's agent keeps one TCPStore for the whole job, and this torch's env:// rendezvous adds no
    per-attempt prefix, so restarted workers read the failed attempt's keys (gloo's peer addresses) and
    cannot connect (the problem of pytorch#135712). Prefixing by TORCHELASTIC_RESTART_COUNT isolates
    the attempts; the first launch is left exactly as torch sets it up.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt in ("", "0"):
        return {}
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return {"store": tdist.PrefixStore(f"/icm-dist/attempt_{attempt}", store), "rank": rank, "world_size": world}


def init_distributed(cfg: Config) -> Dist:
    """Join the process group that the launcher describes (torchrun, accelerate, or none).

    torchrun and ``accelerate launch`` both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR;
    under accelerate the Accelerator creates the group (``cpu=True`` when no CUDA device exists,
    so a CPU-only ``--multi_gpu --num_processes N`` launch gets N gloo processes).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(cfg, local_rank)
    accelerator = None
    if world > 1:
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise LaunchError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on the CPU")
        timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
        if launched_by_accelerate():
            from accelerate import Accelerator, InitProcessGroupKwargs

            accelerator = Accelerator(cpu=device.type != "cuda",
                                      kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)])
        else:
            tdist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None,
                                    **_restart_store(rank, world, timeout))
    launcher = "accelerate" if launched_by_accelerate() else ("torchrun" if "TORCHELASTIC_RUN_ID" in os.environ
                                                                else "python")
    dist = Dist(rank, world, local_rank, device, accelerator, launcher)
    check_same_config(dist, cfg)
    return dist


def check_same_config(dist: Dist, cfg: Config) -> None:
    """Every rank must run the same config: compare hashes before any work (an error on all ranks, no hang)."""
    hashes = dist.all_gather_object(config_hash(cfg))
    if len(set(hashes)) > 1:
        detail = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hashes))
        raise LaunchError(f"ranks were started with different configs ({detail}); launch every rank with the "
                          "same --config and overrides")
