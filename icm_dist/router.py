"""The routed competition's router (``train.route_k``): it proposes candidate experts and learns from the winners.

It lives on rank 0 only. Rank 0 proposes each step's candidates and broadcasts them, so every rank runs
the same candidates whatever its hardware rounds, and the router itself never needs synchronizing. It
learns from every step's winners (identical on every rank); only full competitions measure it honestly:
in a routed step the winner is always one of its own candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .models import make_router


class Proposer:
    """The router network, its Adam, and the logits of the current step (kept for :meth:`learn`)."""

    def __init__(self, cfg: Config, channels: int, device: torch.device):
        t = cfg.train
        self.k = t.route_k
        self.module = make_router(cfg, channels).to(device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=t.lr_router, betas=tuple(t.betas), eps=t.eps)
        self.logits_BN: torch.Tensor | None = None

    def propose(self, x_fake_BCHW: torch.Tensor) -> torch.Tensor:
        """The router's logits ``[B, N]`` for this step's transformed batch (the graph is kept for learn)."""
        self.module.train()
        self.logits_BN = self.module(x_fake_BCHW)
        return self.logits_BN.detach()

    def learn(self, winners_B: torch.Tensor) -> tuple[float, float]:
        """One Adam step of cross-entropy towards the step's winners. Returns the loss and the recall: the
        fraction of examples whose winner was among the k experts the router ranked highest before it."""
        logits = self.logits_BN
        top_Bk = torch.topk(logits.detach(), self.k, dim=1).indices
        recall = float((top_Bk == winners_B.view(-1, 1)).any(dim=1).float().mean())
        loss = F.cross_entropy(logits, winners_B)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.logits_BN = None
        return loss.item(), recall
