"""The routed competition's router (``train.route_k``): it proposes candidate experts and learns from the winners.

It lives on rank 0 only. Rank 0 decides every step's candidates and broadcasts them (all experts: a full
competition), so every rank runs the same ones whatever its hardware rounds, and the router itself never
needs synchronizing. It learns only from full competitions: in a routed step the winner is always one of
its own candidates, and learning from those labels taught it its own choices (docs/results.md). The same
full competitions measure its recall, and routing pauses while the recall is below
``train.route_min_recall``, so that a router that has not learned the division costs speed rather than
quality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .models import make_router
from .routing import route_candidates, routed_iteration

RECALL_WEIGHT = 0.25  # weight of the newest full competition in the running recall


class Proposer:
    """The router network, its Adam, its running recall, and the logits of the current step (for learn)."""

    def __init__(self, cfg: Config, channels: int, device: torch.device):
        self.t = cfg.train
        self.module = make_router(cfg, channels).to(device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=self.t.lr_router, betas=tuple(self.t.betas),
                                    eps=self.t.eps)
        self.recall = 0.0  # over recent full competitions; checkpoints keep it in router.safetensors' metadata
        self.logits_BN: torch.Tensor | None = None
        self.divisions: list = []

    def candidates(self, x_fake_BCHW: torch.Tensor, it: int, divisions=()) -> torch.Tensor:
        """Iteration ``it``'s ``[B, N]`` candidate mask: all True for a full competition (the warm-up, every
        ``route_full_every``-th, and whenever the recall is below ``route_min_recall``), else each example's
        top k (:func:`routing.route_candidates`)."""
        t = self.t
        routed = routed_iteration(it, t.route_k, t.route_warmup, t.route_full_every) and \
            self.recall >= t.route_min_recall
        self.module.train()
        with torch.set_grad_enabled(not routed):  # full competitions teach the router: keep the graph
            logits_BN = self.module(x_fake_BCHW)
        self.logits_BN, self.divisions = (None if routed else logits_BN), list(divisions)
        if routed:
            return route_candidates(logits_BN, t.route_k, divisions)
        return torch.ones(logits_BN.shape, dtype=torch.bool, device=logits_BN.device)

    def learn(self, winners_B: torch.Tensor) -> tuple[float, float] | None:
        """After a full competition: one Adam step of cross-entropy towards its winners. Returns the loss
        and the recall (the share of examples whose winner was among the candidates the router would have
        proposed, :func:`routing.route_candidates`); None after a routed step."""
        logits = self.logits_BN
        if logits is None:
            return None
        cand_BN = route_candidates(logits, self.t.route_k, self.divisions)
        recall = float(cand_BN[torch.arange(len(winners_B), device=cand_BN.device), winners_B].float().mean())
        self.recall = (1 - RECALL_WEIGHT) * self.recall + RECALL_WEIGHT * recall
        loss = F.cross_entropy(logits, winners_B)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.logits_BN = None
        return loss.item(), recall
