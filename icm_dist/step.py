"""One step of Algorithm 1 with the experts sharded across ranks (the fast path).

The contract (docs/architecture.md, "One step, top to bottom"): every rank sees the same global
batches; each rank runs its own experts on all of them; the scores are all-gathered into ``[B, N]``
so every rank knows every winner; D (replicated, DDP) learns equation (3) from every expert's
output; each expert learns only from the examples it won, through D as it was when the scores
were taken; an expert that won nothing stays bitwise unchanged (weights, BatchNorm buffers, Adam
moments and step).

Fast means: the experts run batched (the family's block: grouped convolutions for ``conv``), one D pass both scores
the experts and builds D's update, and D's backward for the experts runs only on the winners'
outputs. ``reference.py`` computes the same step plainly; tests hold the two to the same result.

A routed step (``train.route_k``) is the same step on a candidate mask: each expert runs only on the
examples it is a candidate for, the others score -inf, and D learns from the candidates' outputs.
With every expert a candidate it is the full step (tests/test_routed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .dist import Dist, ShardPlan, real_slice
from .experts import LocalExperts
from .precision import autocast
from .routing import divide_wins, settle_winners, settle_winners_capped


@dataclass
class StepResult:
    winners_B: torch.Tensor  # global expert id of each example's winner (same on every rank)
    scores_BN: torch.Tensor  # D logits of every expert's output, [B, N] (same on every rank)
    disc_loss_local: torch.Tensor  # this rank's share of equation (3) (the shares sum to the loss)
    expert_loss_E: torch.Tensor  # per local expert: mean -log D over the examples it won (nan if none)
    won_E: torch.Tensor  # examples won by each local expert


def _fmt(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x


def expert_backward(cfg: Config, couples_batch: bool) -> str:
    """``dense`` or ``winners`` (train.expert_backward); ``auto`` is ``winners`` exactly where it is the
    exact gradient: when the family does not couple a batch's examples (a per-example norm)."""
    if cfg.train.expert_backward != "auto":
        return cfg.train.expert_backward
    return "dense" if couples_batch else "winners"


def settle(scores_BN: torch.Tensor, capacity: int | None, divisions) -> torch.Tensor:
    """Every example's winner: the argmax, under the capacity cap if any, then the splits' divisions.

    Divisions come after the cap: donor and copy each held at most ``capacity``, and a division only
    halves what the two held, so the cap still holds.
    """
    winners_B = settle_winners(scores_BN) if capacity is None else settle_winners_capped(scores_BN, capacity)
    for donor, copy in divisions:
        winners_B = divide_wins(winners_B, scores_BN, donor, copy)
    return winners_B


def competition_step(experts: LocalExperts, disc, disc_opt: torch.optim.Optimizer, x_fake_BCHW: torch.Tensor,
                     x_real_BCHW: torch.Tensor, plan: ShardPlan, dist: Dist, capacity: int | None = None,
                     divisions: tuple | list = (), candidates_BN: torch.Tensor | None = None) -> StepResult:
    """One iteration of Algorithm 1 on this rank. ``disc`` may be wrapped in DDP.

    ``capacity``: if set, no expert wins more than this many examples of the batch
    (:func:`routing.settle_winners_capped`); None is the paper's plain argmax. ``divisions``:
    ``(donor, copy)`` pairs of global ids that divide the donor's wins after a split
    (:func:`routing.divide_wins`). ``candidates_BN``: the routed competition (``train.route_k``), a
    ``[B, N]`` mask, the same on every rank, of the experts that run on each example; the others score
    -inf and D learns from the candidates' outputs only. None: every expert on every example.
    """
    cfg = experts.cfg
    B, C, H, W = x_fake_BCHW.shape
    E, N = experts.num, plan.num_experts
    amp = autocast(dist.device, cfg.train.precision)

    saved = experts.snapshot_buffers()
    sparse = expert_backward(cfg, experts.couples_batch) == "winners"
    stats: list | None = [] if sparse else None
    if candidates_BN is None:
        out_BECHW = _experts_forward(experts, x_fake_BCHW, stats, amp)  # [B, E, C, H, W]
        fakes = out_BECHW.detach().float().reshape(B * E, C, H, W)  # row i*E + j: local expert j on example i
    else:
        start = plan.starts[dist.rank]
        pairs_BE, out_PCHW = _routed_forward(experts, x_fake_BCHW, candidates_BN[:, start:start + E], sparse, amp)
        fakes = out_PCHW.detach().float()

    # One D pass both scores the experts and builds D's update: its outputs, taken before D's step,
    # are the scores c_j of Algorithm 1. Going through the DDP wrapper here is what arms its hooks.
    reals = x_real_BCHW[real_slice(B, dist.world_size, dist.rank)]
    R = reals.shape[0]
    with amp:
        logits = disc(torch.cat([reals, fakes], dim=0)).float()
    real_logits = logits[:R]
    if candidates_BN is None:
        fake_logits_BE = logits[R:].view(B, E)
        fake_term = F.softplus(fake_logits_BE).sum() / (B * N)
    else:
        fake_logits_BE = logits.new_full((B, E), float("-inf"))
        fake_logits_BE[pairs_BE >= 0] = logits[R:]  # pairs are numbered in row-major order of the mask
        fake_term = F.softplus(logits[R:]).sum() / int(candidates_BN.sum())
    scores_BN = dist.gather_scores(fake_logits_BE.detach(), plan)
    winners_B = settle(scores_BN, capacity, divisions)

    # Equation (3), this rank's share: its slice of the real batch and its experts' fakes (the mean over
    # every fake of the step, all B * N of them or the candidates'). DDP averages gradients over ranks,
    # so the share is scaled by the world size to make the average the single-process gradient.
    disc_loss_local = F.softplus(-real_logits).sum() / B + fake_term

    if candidates_BN is not None and not bool(candidates_BN[torch.arange(B, device=winners_B.device), winners_B].all()):
        raise RuntimeError("routed step: a winner that was no candidate (its output was never computed)")
    local_B = winners_B - plan.starts[dist.rank]
    mine_B = (local_B >= 0) & (local_B < E)
    won_E = torch.bincount(local_B[mine_B], minlength=E)
    experts.opt.zero_grad()
    if candidates_BN is None:
        def won_outputs(rows, cols):
            return out_BECHW[rows, cols]
    else:
        def won_outputs(rows, cols):
            return out_PCHW[pairs_BE[rows, cols]]
    expert_loss_E = _experts_backward(experts, getattr(disc, "module", disc), x_fake_BCHW, won_outputs, local_B,
                                      mine_B, won_E, stats, amp, dist.device)

    disc_opt.zero_grad(set_to_none=True)
    (disc_loss_local * dist.world_size).backward()  # DDP all-reduces D's gradients here
    disc_opt.step()

    won_any_E = won_E > 0
    experts.opt.step(won_any_E)
    experts.restore_buffers(saved, ~won_any_E)
    return StepResult(winners_B, scores_BN, disc_loss_local.detach(), expert_loss_E, won_E)


def _experts_forward(experts: LocalExperts, x_fake_BCHW: torch.Tensor, stats: list | None, amp) -> torch.Tensor:
    """Every local expert on the whole batch, ``[B, E, C, H, W]``, in training mode.

    dense (``stats`` is None): the experts' graph is kept over the whole batch, as in the paper's
    formulation, where BatchNorm's batch statistics carry gradient from every example.
    winners: no graph; each winner later re-runs on just its examples (with BatchNorm, with the batch
    statistics of this pass held fixed), so the backward runs only where a loss exists.
    """
    experts.bank.train()
    with amp, torch.set_grad_enabled(stats is None):
        x = experts.inputs(x_fake_BCHW)
        if stats is not None and experts.couples_batch:
            return experts.outputs(experts.bank(x, collect_stats=stats))  # batch statistics, kept for forward_one
        return experts.outputs(experts.train_forward(x))


def _routed_forward(experts: LocalExperts, x_fake_BCHW: torch.Tensor, cand_BE: torch.Tensor, sparse: bool,
                    amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Each local expert on its candidate examples only, in training mode: returns ``pairs_BE`` (the row of
    ``out_PCHW`` holding expert j's output on example i, -1 where j is not a candidate; numbered in
    row-major order of the mask) and ``out_PCHW``.

    dense: the graph is kept, over each expert's candidates (with BatchNorm, its batch). winners (a
    per-example norm): no graph; the winners re-run later, as in the full competition.
    """
    experts.bank.train()
    C, H, W = x_fake_BCHW.shape[1:]
    rows_P, cols_P = torch.nonzero(cand_BE, as_tuple=True)  # row-major: pair p is (rows_P[p], cols_P[p])
    pairs_BE = torch.full(cand_BE.shape, -1, dtype=torch.long, device=cand_BE.device)
    pairs_BE[rows_P, cols_P] = torch.arange(len(rows_P), device=cand_BE.device)
    by_expert = torch.argsort(cols_P, stable=True)  # the pairs grouped by expert, examples in order
    counts = torch.bincount(cols_P, minlength=experts.num).tolist()  # synced once, not once per expert
    outs, start = [], 0
    with amp, torch.set_grad_enabled(not sparse):
        for j, n in enumerate(counts):
            if n:
                sel = rows_P[by_expert[start:start + n]]
                outs.append(experts.bank.forward_one(j, _fmt(x_fake_BCHW[sel], experts.cfg), None))
                start += n
    experts.bank.count_batch()  # BatchNorm's batch counter moves once per step, as in one full pass
    if not outs:
        return pairs_BE, x_fake_BCHW.new_zeros(0, C, H, W)
    return pairs_BE, torch.cat(outs)[torch.argsort(by_expert)]  # back to row-major


def _experts_backward(experts: LocalExperts, disc_module, x_fake_BCHW, won_outputs, local_B, mine_B, won_E, stats,
                      amp, device) -> torch.Tensor:
    """Each local winner maximizes log D on the examples it won, through D before its update.

    ``won_outputs(rows, cols)``: the outputs, with their graph, of local experts ``cols`` on examples
    ``rows`` (the dense pass's); with ``stats`` (the winners mode) the winners re-run here instead.
    D is called as the plain module (not the DDP wrapper) and backward is restricted to the experts'
    parameters, so D takes no gradient and DDP's hooks never fire for this pass. Returns each local
    expert's mean -log D over its wins (nan where it won nothing).
    """
    E = experts.num
    expert_loss_E = torch.full((E,), float("nan"), device=device)
    if not bool(mine_B.any()):
        return expert_loss_E
    rows = torch.nonzero(mine_B).squeeze(1)
    cols = local_B[mine_B]
    if stats is not None:
        parts, part_cols = [], []
        for j in torch.unique(cols).tolist():
            sel = rows[cols == j]
            with amp:
                parts.append(experts.bank.forward_one(j, _fmt(x_fake_BCHW[sel], experts.cfg), stats))
            part_cols.append(torch.full((len(sel),), j, device=device, dtype=torch.long))
        won_out, cols = torch.cat(parts), torch.cat(part_cols)
    else:
        won_out = won_outputs(rows, cols)  # [k, C, H, W]
    with amp:
        won_logits = disc_module(won_out.float()).float()
    per_example = F.softplus(-won_logits)  # -log sigmoid
    sum_E = torch.zeros(E, device=device).index_add(0, cols, per_example)
    mean_E = sum_E / won_E.clamp(min=1)
    mean_E.sum().backward(inputs=list(experts.bank.parameters()))
    return torch.where(won_E > 0, mean_E.detach(), expert_loss_E)
