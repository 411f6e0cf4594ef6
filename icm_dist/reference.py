"""Algorithm 1 written plainly: the slow, obviously correct path that the fast step is tested against.

One process, fp32: a loop over plain expert modules (any family's ``to_experts()``), one
``torch.optim.Adam`` each, a dense backward through every expert's graph, and a separate D update. It
shares no code with ``step.py`` but the winner rule (:func:`routing.settle_winners`), so a bug in the fast path's loss,
masking or batching shows up as a disagreement.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .routing import settle_winners
from .step import StepResult


def _batch_norms(expert: nn.Module) -> list[nn.Module]:
    return [m for m in expert.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _batch_stats_hooks(expert: nn.Module, store: list):
    """Forward hooks that record each BatchNorm layer's batch mean and (biased) variance."""

    def hook(module, inputs, output):
        var, mean = torch.var_mean(inputs[0].detach(), dim=(0, 2, 3), unbiased=False)
        store.append((mean, var))

    return [m.register_forward_hook(hook) for m in _batch_norms(expert)]


def _with_batch_stats(expert: nn.Module, x: torch.Tensor, stats: list) -> torch.Tensor:
    """The expert on ``x`` with each BatchNorm using the given batch statistics as constants.

    Plainly: eval mode, with the running statistics temporarily replaced by the batch statistics
    (eval-mode BatchNorm divides by sqrt(running_var + eps), so the biased batch variance reproduces
    the training-mode normalization), then the running statistics put back.
    """
    # Swap the buffer tensors rather than copying into them: eval-mode batch_norm saves them for
    # backward, so they must not be modified in place afterwards.
    norms = _batch_norms(expert)
    saved = [(n.running_mean, n.running_var) for n in norms]
    for n, (mean, var) in zip(norms, stats):
        n.running_mean, n.running_var = mean.clone(), var.clone()
    expert.eval()
    try:
        return expert(x)
    finally:
        expert.train()
        for n, (mean, var) in zip(norms, saved):
            n.running_mean, n.running_var = mean, var


def reference_step(experts: list[nn.Module], expert_opts: list[torch.optim.Optimizer], disc: torch.nn.Module,
                   disc_opt: torch.optim.Optimizer, x_fake_BCHW: torch.Tensor, x_real_BCHW: torch.Tensor,
                   expert_backward: str = "dense") -> StepResult:
    """Algorithm 1 written plainly, one process, fp32: a loop over experts and a dense backward.

    ``expert_backward="winners"`` trains each winner on a second forward of just its examples with the
    scoring pass's batch statistics held fixed (what the fast path's ``winners`` mode computes).
    """
    N = len(experts)
    saved = [[b.clone() for n, b in e.named_buffers() if not n.endswith("num_batches_tracked")] for e in experts]
    for e in experts:
        e.train()
    stats: list[list] = [[] for _ in experts]
    hooks = [h for e, st in zip(experts, stats) for h in _batch_stats_hooks(e, st)]
    outs = [e(x_fake_BCHW) for e in experts]  # N x [B, C, H, W], graph kept
    for h in hooks:
        h.remove()
    scores_BN = torch.stack([disc(o) for o in outs], dim=1)  # D logits, graph through D and the experts
    winners_B = settle_winners(scores_BN.detach())

    # Experts: -log D(E_w(x)) for each example and its winner, averaged per expert.
    won_E = torch.bincount(winners_B, minlength=N)
    losses = []
    expert_loss_E = torch.full((N,), float("nan"))
    for j in range(N):
        mask = winners_B == j
        if mask.any():
            if expert_backward == "winners":
                logits = disc(_with_batch_stats(experts[j], x_fake_BCHW[mask], stats[j]))
            else:
                logits = scores_BN[mask, j]
            loss_j = F.softplus(-logits).mean()
            losses.append(loss_j)
            expert_loss_E[j] = loss_j.detach()
    for opt in expert_opts:
        opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()  # through every expert's graph and through D
    for j in range(N):
        if won_E[j] > 0:
            expert_opts[j].step()
        else:  # a loser keeps its running statistics too
            with torch.no_grad():
                bufs = [b for n, b in experts[j].named_buffers() if not n.endswith("num_batches_tracked")]
                for b, s in zip(bufs, saved[j]):
                    b.copy_(s)

    # D: equation (3) on the canonical batch and on every expert's output (losers punished too).
    disc_opt.zero_grad(set_to_none=True)
    disc_loss = F.softplus(-disc(x_real_BCHW)).mean()
    for o in outs:
        disc_loss = disc_loss + F.softplus(disc(o.detach())).mean() / N
    disc_loss.backward()
    disc_opt.step()
    return StepResult(winners_B, scores_BN.detach(), disc_loss.detach(), expert_loss_E, won_E)
