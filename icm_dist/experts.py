"""A rank's experts: the family's block, their masked Adam, and one expert's state (get, load, copy).

:class:`LocalExperts` is the rank's block of the committee, built by the family ``expert.arch`` names, or by
one family per part with ``expert.parts`` (:mod:`icm_dist.families`); nothing here knows an expert's layers.
:class:`ExpertState` is everything one expert is (its family's state dict and its Adam moments and step): what
a checkpoint file holds, what a split copies from one expert into another, and what surgery moves between
committees.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import Config, expert_config
from .dist import Dist, ShardPlan
from .families import get_family
from .families.base import locate
from .utils import strip_prefix


class ExpertState(NamedTuple):
    """One expert: ``model`` in ``Expert``'s state-dict layout, ``optim`` its Adam state
    (``<param>.exp_avg``, ``<param>.exp_avg_sq``, ``step``)."""

    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]

    def flat(self) -> dict[str, torch.Tensor]:
        """One flat dict, ``model.*`` and ``optim.*``: the tensors of an expert file."""
        return {**{f"model.{k}": v for k, v in self.model.items()}, **{f"optim.{k}": v for k, v in self.optim.items()}}

    @classmethod
    def from_flat(cls, tensors: dict[str, torch.Tensor]) -> "ExpertState":
        return cls(strip_prefix(tensors, "model."), strip_prefix(tensors, "optim."))

    def cpu(self) -> "ExpertState":
        return ExpertState({k: v.cpu() for k, v in self.model.items()}, {k: v.cpu() for k, v in self.optim.items()})


class MaskedAdam:
    """Adam over a block's stacked parameters, stepping only the experts in a mask.

    ``torch.optim.Adam`` on the stacked tensors would move every expert every step (zero gradient
    still moves the weights through the first moment), so a loser would drift. Here each expert has
    its own step count and the update is written back only where the mask is set, bitwise leaving
    the others alone. The arithmetic follows torch.optim.Adam's single-tensor path. A block of several
    parts (families) is stepped part by part, each on its slice of the mask.
    """

    def __init__(self, bank, lr: float, betas, eps: float):
        self.bank, self.lr, self.eps = bank, lr, eps
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        # Per part: (first local index, experts, block, names, parameters, exp_avg, exp_avg_sq).
        self.groups = []
        for first, part in bank.parts():
            names, params = [n for n, _ in part.expert_params()], [p for _, p in part.expert_params()]
            self.groups.append((first, part.num, part, names, params, [torch.zeros_like(p) for p in params],
                                [torch.zeros_like(p) for p in params]))
        self.names = [n for g in self.groups for n in g[3]]
        self.params = [p for g in self.groups for p in g[4]]
        self.step_E = torch.zeros(bank.num, dtype=torch.float32, device=self.params[0].device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, mask_E: torch.Tensor) -> None:
        if not bool(mask_E.any()):
            return
        self.step_E += mask_E.to(self.step_E.dtype)
        step = self.step_E.double().clamp(min=1)
        bc1 = 1 - self.beta1 ** step
        bc2_sqrt_E = (1 - self.beta2 ** step).sqrt()
        for first, E, _, _, params, exp_avg, exp_avg_sq in self.groups:
            dtype = params[0].dtype
            step_size = (self.lr / bc1[first:first + E]).to(dtype)
            bc2_sqrt = bc2_sqrt_E[first:first + E].to(dtype)
            mask = mask_E[first:first + E]
            for p, m, v in zip(params, exp_avg, exp_avg_sq):
                if p.grad is None:
                    continue
                # Split only the leading dim into [E, ...]: a view under any memory format (channels_last too).
                g = p.grad.unflatten(0, (E, -1))
                pv, mv, vv = p.unflatten(0, (E, -1)), m.unflatten(0, (E, -1)), v.unflatten(0, (E, -1))
                bshape = (E,) + (1,) * (pv.dim() - 1)
                keep = mask.view(bshape)
                m_new = mv.lerp(g, 1 - self.beta1)
                v_new = vv.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (v_new.sqrt() / bc2_sqrt.view(bshape)).add_(self.eps)
                p_new = pv.addcdiv(m_new * step_size.view(bshape), denom, value=-1.0)
                mv.copy_(torch.where(keep, m_new, mv))
                vv.copy_(torch.where(keep, v_new, vv))
                pv.copy_(torch.where(keep, p_new, pv))

    # -- per-expert state, for checkpoints -------------------------------------------------
    def _moments_of(self, j: int):
        """(index within its part, experts of the part, the part's views, names, exp_avg, exp_avg_sq) of ``j``."""
        p, k = locate(self.bank.parts(), j)
        _, E, part, names, _, exp_avg, exp_avg_sq = self.groups[p]
        return k, E, part.expert_tensors(), names, exp_avg, exp_avg_sq

    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        k, E, views, names, exp_avg, exp_avg_sq = self._moments_of(j)
        out = {}
        for n, m, v in zip(names, exp_avg, exp_avg_sq):
            shape = views[n].shape[1:]
            out[f"{n}.exp_avg"] = m.view(E, *shape)[k].clone()
            out[f"{n}.exp_avg_sq"] = v.view(E, *shape)[k].clone()
        out["step"] = self.step_E[j:j + 1].clone()
        return out

    @torch.no_grad()
    def load_expert_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        k, E, views, names, exp_avg, exp_avg_sq = self._moments_of(j)
        for n, m, v in zip(names, exp_avg, exp_avg_sq):
            shape = views[n].shape[1:]
            m.view(E, *shape)[k].copy_(state[f"{n}.exp_avg"])
            v.view(E, *shape)[k].copy_(state[f"{n}.exp_avg_sq"])
        self.step_E[j] = state["step"].reshape(())


class LocalExperts:
    """A rank's block of experts: the family's block (``bank``), its masked Adam, and buffer bookkeeping."""

    def __init__(self, cfg: Config, ids: list[int], device: torch.device, channels: int = 1):
        self.cfg, self.channels = cfg, channels
        self.ids = list(ids)
        self.family = get_family(cfg.expert)
        # The block first: it checks the family's expert on a probe batch (one line for a bad arch_args).
        self.bank = self.family.block(cfg.expert, cfg.seed, self.ids, channels, cfg.data.image_size).to(device)
        self.couples_batch = self.family.couples_batch(cfg.expert)
        # Which experts identity initialization trains (their part's expert.train_identity).
        self.train_identity_E = torch.tensor([expert_config(cfg.expert, g).train_identity for g in self.ids],
                                             dtype=torch.bool, device=device)
        if cfg.train.channels_last:
            for _, part in self.bank.parts():  # in place: the parameters stay the block's
                if part.channels_last:
                    part.to(memory_format=torch.channels_last)
        self.opt = self.new_optimizer()
        # The training-mode pass over all experts: the step's full pass and identity initialization call
        # it with the same [B, E, H, W] shape, so one compiled graph serves them. Evaluation (eval-mode
        # BatchNorm, other batch sizes), the full pass that keeps BatchNorm's statistics for the winners
        # mode, and the winners' own passes (shapes change every step) stay eager. The compiled module
        # shares the bank's parameters and buffers: checkpoints see no difference.
        self.train_forward = torch.compile(self.bank, dynamic=False) if cfg.train.compile else self.bank

    def new_optimizer(self) -> MaskedAdam:
        t = self.cfg.train
        return MaskedAdam(self.bank, t.lr_expert, t.betas, t.eps)

    @property
    def num(self) -> int:
        return len(self.ids)

    def _part_buffers(self):
        """(first local index, experts, buffers) of each part of the block."""
        for first, part in self.bank.parts():
            yield first, part.num, [b for n, b in part.named_buffers() if not n.endswith("num_batches_tracked")]

    def buffers(self) -> list[torch.Tensor]:
        return [b for _, _, bufs in self._part_buffers() for b in bufs]

    def snapshot_buffers(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.buffers()]

    @torch.no_grad()
    def restore_buffers(self, saved: list[torch.Tensor], restore_E: torch.Tensor) -> None:
        """Put back the running statistics of the experts in ``restore_E`` (the losers of a step)."""
        saved = iter(saved)
        for first, E, bufs in self._part_buffers():
            restore = restore_E[first:first + E].view(E, 1)
            for b in bufs:
                bv, sv = b.view(E, -1), next(saved).view(E, -1)
                bv.copy_(torch.where(restore, sv, bv))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """One batch for every local expert (``[B, C, H, W]``) or one per expert (``[B, E, C, H, W]``) in the
        block's own layout, for ``bank(...)`` and ``train_forward(...)``."""
        return self.bank.inputs(x, self.cfg.train.channels_last)

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        """The block's output as ``[B, E, C, H, W]``."""
        return self.bank.outputs(y)

    def niches(self) -> list | None:
        """What each local expert is fixed to (the family's ``niches``), or None."""
        return self.bank.niches()

    # -- one expert's state ----------------------------------------------------------------
    def state(self, j: int) -> ExpertState:
        """Local expert ``j``'s weights, BatchNorm buffers and Adam state (copies)."""
        return ExpertState(self.bank.expert_state(j), self.opt.expert_state(j))

    def load_state(self, j: int, state: ExpertState) -> None:
        """Make local expert ``j`` the expert ``state`` describes (raises ValueError/KeyError if it does not fit)."""
        self.bank.load_expert_state(j, state.model)
        self.opt.load_expert_state(j, state.optim)


@torch.no_grad()
def copy_expert(experts: LocalExperts, plan: ShardPlan, dist: Dist, src: int, dst: int) -> None:
    """Make global expert ``dst`` a copy of global expert ``src``: weights, BatchNorm buffers, Adam moments
    and step count. Every rank must call it with the same ids (a collective when the owners differ)."""
    src_rank, dst_rank = plan.owner(src), plan.owner(dst)
    payload = None
    if dist.rank == src_rank:
        # On the CPU so that the pickled broadcast never carries device tensors (NCCL or not, the
        # receiving rank puts them on its own device when it loads them).
        payload = experts.state(src - plan.starts[src_rank]).cpu()
    if src_rank != dst_rank:
        # A broadcast from the owner over the whole group, not a send to one rank: every rank takes part
        # in the same collectives in the same order, which keeps the group's sequence numbers aligned.
        payload = dist.broadcast_object(payload, src=src_rank)
    if dist.rank == dst_rank:
        experts.load_state(dst - plan.starts[dst_rank], ExpertState(*payload))

