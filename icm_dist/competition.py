"""What one rank's competition is made of, built in one place for the trainer, ``bench/`` and the tests:
its block of experts, the discriminator (replicated, DDP-wrapped when there are several ranks) with its
Adam, and the batch that iteration ``t`` draws. A bench or test that builds its competition here times or
checks the trainer's, not a copy that may drift from it (another optimizer's betas, another layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .config import Config
from .dist import Dist, ShardPlan
from .experts import LocalExperts
from .models import make_discriminator
from .rng import sample_indices


@dataclass
class Competition:
    """One rank's share of the competition."""

    experts: LocalExperts
    """The experts it was built with: in the trainer, this rank's block (``plan.block(rank)``)."""
    disc_module: nn.Module
    """The discriminator itself: what checkpoints hold and evaluation scores with."""
    disc_opt: torch.optim.Optimizer
    """The discriminator's Adam (``train.lr_discriminator``, ``train.betas``, ``train.eps``)."""
    disc: nn.Module
    """The discriminator the step calls: ``disc_module`` wrapped in DDP when the world has several ranks."""


def build_competition(cfg: Config, dist: Dist, ids: Sequence[int] | None = None, channels: int = 1) -> Competition:
    """The experts ``ids`` (default: this rank's block of ``ShardPlan(expert.num, dist.world_size)``), D and D's
    optimizer, on ``dist.device``, initialized from ``cfg.seed`` alone."""
    if ids is None:
        ids = ShardPlan(cfg.expert.num, dist.world_size).block(dist.rank)
    experts = LocalExperts(cfg, list(ids), dist.device, channels)
    disc_module = make_discriminator(cfg, channels).to(dist.device)
    if cfg.train.channels_last:
        disc_module = disc_module.to(memory_format=torch.channels_last)
    disc_opt = torch.optim.Adam(disc_module.parameters(), lr=cfg.train.lr_discriminator,
                                betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    return Competition(experts, disc_module, disc_opt, dist.wrap_discriminator(disc_module))


def batch_indices(cfg: Config, num_fake: int, num_real: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the transformed and of the canonical pool that iteration ``t + 1`` draws (``B`` each),
    the same on every rank and at every world size."""
    B = cfg.train.batch_size
    return (sample_indices(num_fake, B, cfg.seed, "fake-batch", t),
            sample_indices(num_real, B, cfg.seed, "real-batch", t))


def draw_batch(cfg: Config, fake_x: torch.Tensor, real_x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration ``t + 1``'s fake and real examples from the pools ``fake_x`` and ``real_x`` (on their device)."""
    idx_fake, idx_real = batch_indices(cfg, fake_x.shape[0], real_x.shape[0], t)
    return fake_x[idx_fake.to(fake_x.device)], real_x[idx_real.to(real_x.device)]
