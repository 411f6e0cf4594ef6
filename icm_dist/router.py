"""The routed competition's router (``train.route_k``): it proposes candidate experts and learns from the scores.

It lives on rank 0 only. Rank 0 decides every step's candidates and broadcasts them (all experts: a full
competition), so every rank runs the same ones whatever its hardware rounds, and the router itself never
needs synchronizing.

What it learns from: every full competition, towards its winners (``train.route_target=winners``) or
towards the softmax of D's scores over all experts (``scores``: the whole score matrix, so the router
learns who comes close as well as who wins). With ``train.route_explore`` each routed step also runs a
few candidates per example drawn at random beside the router's own, and teaches the router over the
candidates that were scored: which of them scored best. Without exploration a routed step teaches
nothing, since its winner is always one of the router's picks and learning from those labels teaches it
its own choices (docs/results.md). The full competitions measure its recall before it learns from them,
and routing pauses while the recall is below ``train.route_min_recall``, so that a router that has not
learned the division costs speed rather than quality. With ``train.route_k_max`` the recall is measured
at every k up to it, and a routed step takes the smallest k that has the recall: an unsure router runs a
few more candidates rather than every expert. Evaluations measure it on the test examples, which it never
learns from (:meth:`Proposer.heldout_recall`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .models import make_router
from .rng import generator
from .routing import explore_candidates, route_candidates, routed_iteration

RECALL_WEIGHT = 0.25  # weight of the newest full competition in the running recall


class Proposer:
    """The router network, its Adam, its running recall at each k it may route with (``ks``), and the step's
    k, logits and scored mask (for learn)."""

    def __init__(self, cfg: Config, channels: int, device: torch.device):
        self.t, self.seed = cfg.train, cfg.seed
        self.module = make_router(cfg, channels).to(device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=self.t.lr_router, betas=tuple(self.t.betas),
                                    eps=self.t.eps)
        self.ks = list(range(self.t.route_k, (self.t.route_k_max or self.t.route_k) + 1))
        # Running recall at each of ks, over recent full competitions; checkpoints keep it in
        # router.safetensors' metadata.
        self.recall_K = [0.0] * len(self.ks)
        self.k: int | None = None  # the step's k (None: a full competition)
        self.logits_BN: torch.Tensor | None = None
        self.scored_BN: torch.Tensor | None = None  # the step's candidates (None: a full competition)
        self.divisions: list = []

    @property
    def recall(self) -> float:
        """The running recall at ``train.route_k``."""
        return self.recall_K[0]

    def routing_k(self) -> int | None:
        """The fewest candidates whose running recall is at least ``route_min_recall`` (None: none has it)."""
        return next((k for k, r in zip(self.ks, self.recall_K) if r >= self.t.route_min_recall), None)

    def candidates(self, x_fake_BCHW: torch.Tensor, it: int, divisions=()) -> torch.Tensor:
        """Iteration ``it``'s ``[B, N]`` candidate mask: all True for a full competition (the warm-up, every
        ``route_full_every``-th, and whenever no k has the recall), else each example's top k
        (:func:`routing.route_candidates`, k from :meth:`routing_k`) and ``route_explore`` random others."""
        t = self.t
        k = self.routing_k() if routed_iteration(it, t.route_k, t.route_warmup, t.route_full_every) else None
        self.k = k
        routed = k is not None
        teaches = not routed or t.route_explore > 0
        self.module.train()
        with torch.set_grad_enabled(teaches):  # a step that teaches the router keeps the graph
            logits_BN = self.module(x_fake_BCHW)
        self.logits_BN, self.divisions = (logits_BN if teaches else None), list(divisions)
        if not routed:
            self.scored_BN = None
            return torch.ones(logits_BN.shape, dtype=torch.bool, device=logits_BN.device)
        explore_BN = None
        if t.route_explore:
            top_BN = route_candidates(logits_BN, k)
            explore_BN = explore_candidates(top_BN, t.route_explore, generator(self.seed, "route-explore", it))
        self.scored_BN = route_candidates(logits_BN, k, divisions, explore_BN)
        return self.scored_BN

    def learn(self, winners_B: torch.Tensor, scores_BN: torch.Tensor) -> tuple[float, float | None] | None:
        """After a step that teaches the router (every full competition; a routed one with exploration):
        one Adam step of cross-entropy towards the step's targets over the experts it scored. Returns the
        loss and, after a full competition, the recall (the share of examples whose winner was among the
        candidates the router would have proposed at ``route_k``, measured before it learns from them, as
        at every k of ``ks``); None after a step that teaches nothing."""
        logits = self.logits_BN
        if logits is None:
            return None
        self.logits_BN = None
        recall = None
        if self.scored_BN is None:
            rows_B = torch.arange(len(winners_B), device=logits.device)
            recalls = [float(route_candidates(logits, k, self.divisions)[rows_B, winners_B].float().mean())
                       for k in self.ks]
            self.recall_K = [(1 - RECALL_WEIGHT) * old + RECALL_WEIGHT * new
                             for old, new in zip(self.recall_K, recalls)]
            recall = recalls[0]
        loss = self._loss(logits, winners_B, scores_BN.detach().float(), self.scored_BN)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item(), recall

    def _loss(self, logits_BN, winners_B, scores_BN, scored_BN) -> torch.Tensor:
        if scored_BN is None and self.t.route_target == "winners":
            return F.cross_entropy(logits_BN, winners_B)
        # Over the scored experts only: a routed step says nothing about the experts it did not run.
        scored_BN = torch.ones_like(logits_BN, dtype=torch.bool) if scored_BN is None else scored_BN
        logp_BN = torch.log_softmax(logits_BN.float().masked_fill(~scored_BN, -1e9), 1)
        if self.t.route_target == "winners":  # the best-scored candidate, which is the step's winner
            return F.nll_loss(logp_BN, winners_B)
        target_BN = torch.softmax(scores_BN.masked_fill(~scored_BN, -torch.inf) / self.t.route_temperature, 1)
        return -(target_BN * logp_BN).sum(1).mean()

    @torch.no_grad()
    def heldout_recall(self, x_BCHW: torch.Tensor, winners_B: torch.Tensor, batch: int = 1000) -> float:
        """The share of ``x``'s examples whose (full-competition) winner is among the router's top k: on the
        evaluation's test examples, which the router never learns from."""
        hits = []
        for i in range(0, len(x_BCHW), batch):
            cand_BN = route_candidates(self.module(x_BCHW[i:i + batch]), self.t.route_k)
            w_B = winners_B[i:i + batch].to(cand_BN.device)
            hits.append(cand_BN[torch.arange(len(w_B), device=cand_BN.device), w_B])
        return float(torch.cat(hits).float().mean())
