"""The networks of appendix B beside the experts: Discriminator, Classifier, Router, and the fast ELU.

The experts are a family of their own (``expert.arch``, :mod:`icm_dist.families`): the paper's five 3x3
convolutions are :mod:`icm_dist.families.conv`. D, the classifier and the router take images of
``channels`` C (1 for MNIST, 3 for colour).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config, DiscriminatorConfig
from .rng import seeded


class _ELU(torch.autograd.Function):
    """ELU from exp and clamps: on CPUs, ``F.elu`` in bf16 runs a slow scalar expm1 (docs/performance.md);
    this form vectorizes. ``elu(x) = (exp(min(x,0)) - 1) +
    max(x,0)`` and its derivative is ``exp(min(x,0))``, which is all backward needs to keep."""

    @staticmethod
    def forward(ctx, x):
        e = torch.exp(x.clamp(max=0))
        ctx.save_for_backward(e)
        # (e - 1) first: it is exactly 0 where x > 0, so positive inputs pass through unrounded.
        return (e - 1).add_(x.clamp(min=0))

    @staticmethod
    def backward(ctx, g):
        (e,) = ctx.saved_tensors
        return g * e


def fast_elu(x: torch.Tensor) -> torch.Tensor:
    return _ELU.apply(x)


class FastELU(nn.Module):
    def forward(self, x):
        return fast_elu(x)


class Discriminator(nn.Module):
    """Table 1's discriminator: pairs of 3x3 conv + ELU, each pair followed by 2x2 average pooling,
    then FC ``hidden`` + ELU and FC 1. Returns logits (trained with BCE-with-logits)."""

    def __init__(self, cfg: DiscriminatorConfig, image_size: int = 32, channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for w in cfg.widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), FastELU(), nn.Conv2d(w, w, 3, padding=1), FastELU(),
                       nn.AvgPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(cfg.widths)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, cfg.hidden), FastELU(),
                                nn.Linear(cfg.hidden, 1))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.features(x_BCHW)
        # The head runs in fp32 even under bf16 autocast: the logits decide every winner, and bf16's
        # 8-bit mantissa would turn near-equal scores into exact ties (all going to the lowest id).
        with torch.autocast(h.device.type, enabled=False):
            return self.fc(h.float()).squeeze(1)


def make_discriminator(cfg: Config, channels: int = 1) -> Discriminator:
    # Keyed by seed only: every rank builds the same D (DDP would broadcast rank 0's anyway).
    with seeded(cfg.seed, "discriminator-init"):
        return Discriminator(cfg.discriminator, cfg.data.image_size, channels)


class Classifier(nn.Module):
    """A small CNN for evaluation, trained on the canonical half (>= 99% on clean MNIST test digits)."""

    def __init__(self, channels: int = 1, image_size: int = 32, classes: int = 10):
        super().__init__()
        side = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(128, classes))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW)


class Router(nn.Module):
    """The routed competition's proposer (``train.route_k``): an image to one logit per expert, trained to
    predict the competition's winner. Two strided 3x3 convolutions, average pooling to 4x4 (where the
    content sits is what tells one translation from another), a linear layer."""

    def __init__(self, num_experts: int, channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width // 2, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, num_experts))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW)


def make_router(cfg: Config, channels: int = 1) -> Router:
    with seeded(cfg.seed, "router-init"):
        return Router(cfg.expert.num, channels)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
