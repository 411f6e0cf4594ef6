"""The networks of appendix B: Expert, Discriminator, Classifier, and the bank of local experts.

``Expert`` is the plain nn.Module that a user reuses on its own (one checkpoint file is one
Expert). ``ExpertBank`` holds a rank's block of experts as one module of grouped convolutions:
expert ``j`` of the bank owns output channels ``[j*width, (j+1)*width)`` of every layer, and BatchNorm
statistics are per channel, so the bank computes exactly what ``E`` separate experts would, in
one kernel per layer. Parameter names are shared: ``bank.expert_state(j)`` is a state dict that
``Expert.load_state_dict`` takes as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, DiscriminatorConfig, ExpertConfig
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


def _resampling(cfg: ExpertConfig) -> tuple[set, set]:
    """The receptive-field ablation (``expert.pool``): blocks followed by 2x2 average pooling (the first
    ``pool``) and blocks preceded by 2x nearest upsampling (the last ``pool``).

    Upsampling comes before a block's convolution, not after it: then the last blocks and the output
    convolution work at full resolution and smooth the nearest-neighbour copies. Upsampling after
    the convolutions left only the 3x3 output convolution to do that; its outputs were visibly
    blocky, and the discriminator told them from digits (docs/results.md, pooled experts).
    """
    pools = set(range(cfg.pool))
    ups = set(range(cfg.depth - cfg.pool, cfg.depth))
    return pools, ups


def run_blocks(cfg: ExpertConfig, h: torch.Tensor, conv, norm, act) -> torch.Tensor:
    """The expert's hidden blocks, ``depth`` x (upsample?, 3x3 conv, norm, activation, pool?).

    ``conv(i, h)`` and ``norm(i, h)`` compute layer ``i``: the one loop serves a lone ``Expert``, the
    batched ``ExpertBank`` and one expert of the bank (:meth:`ExpertBank.forward_one`), so the three
    cannot disagree about the architecture.
    """
    pools, ups = _resampling(cfg)
    for i in range(cfg.depth):
        if i in ups:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = act(norm(i, conv(i, h)))
        if i in pools:
            h = F.avg_pool2d(h, 2)
    return h


class Expert(nn.Module):
    """One expert: ``depth`` x (3x3 conv, BatchNorm, ELU), then a 3x3 conv to one channel and a sigmoid.

    Fully convolutional, so it applies to any image size (46x46 symbols as well as 32x32 digits),
    provided the size is divisible by ``2**pool``.
    """

    def __init__(self, cfg: ExpertConfig):
        super().__init__()
        self.cfg = cfg
        chans = [1] + [cfg.width] * cfg.depth
        # Convolutions before BatchNorm carry no bias: BN's shift makes it redundant.
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False)
                                   for i in range(cfg.depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(cfg.width) for _ in range(cfg.depth))
        self.out = nn.Conv2d(cfg.width, 1, 3, padding=1)

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        h = run_blocks(self.cfg, x_B1HW, lambda i, h: self.convs[i](h), lambda i, h: self.norms[i](h), F.elu)
        return torch.sigmoid(self.out(h))


def make_expert(cfg: ExpertConfig, seed: int, expert_id: int) -> Expert:
    """Expert ``expert_id`` initialized from the stream keyed by (seed, expert id): the same on any rank."""
    with seeded(seed, "expert-init", expert_id):
        return Expert(cfg)


class ExpertBank(nn.Module):
    """A block of ``E`` experts with global ids ``ids``, computed as grouped convolutions.

    ``forward`` takes ``[B, E, H, W]`` (input ``j`` goes to expert ``j``; expand one batch to give
    every expert the same input) and returns ``[B, E, H, W]``.
    """

    def __init__(self, cfg: ExpertConfig, ids: list[int]):
        super().__init__()
        self.cfg = cfg
        self.ids = list(ids)
        E, width = len(ids), cfg.width
        self.num = E
        self.convs = nn.ModuleList(
            nn.Conv2d(E * (1 if i == 0 else width), E * width, 3, padding=1, bias=False, groups=E)
            for i in range(cfg.depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(E * width) for _ in range(cfg.depth))
        self.out = nn.Conv2d(E * width, E, 3, padding=1, groups=E)
        self._template = {k: v.shape for k, v in Expert(cfg).state_dict().items()}

    @classmethod
    def create(cls, cfg: ExpertConfig, seed: int, ids: list[int]) -> "ExpertBank":
        bank = cls(cfg, ids)
        for j, gid in enumerate(ids):
            bank.load_expert_state(j, make_expert(cfg, seed, gid).state_dict())
        return bank

    def forward(self, x_BEHW: torch.Tensor, collect_stats: list | None = None) -> torch.Tensor:
        """All experts at once: ``[B, E, H, W]`` in, ``[B, E, H, W]`` out.

        With ``collect_stats`` (a list, training mode, no autograd), BatchNorm normalizes with batch
        statistics computed here, updates the running statistics as nn.BatchNorm2d would, and
        appends each layer's ``(mean, invstd)`` to the list, so that :meth:`forward_one` can later
        reproduce exactly these outputs for a subset of the examples.
        """
        def norm(i, h):
            bn = self.norms[i]
            if collect_stats is None or not self.training:
                return bn(h)
            # The stock BatchNorm kernel (running statistics updated as nn.BatchNorm2d does), asked
            # for the batch mean and inverse std it used, so forward_one can reuse them exactly.
            h, mean, invstd = torch.native_batch_norm(h, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                                                      bn.momentum, bn.eps)
            bn.num_batches_tracked += 1
            collect_stats.append((mean.float(), invstd.float()))
            return h

        h = run_blocks(self.cfg, x_BEHW, lambda i, h: self.convs[i](h), norm, fast_elu)
        return torch.sigmoid(self.out(h))

    def forward_one(self, j: int, x_B1HW: torch.Tensor, stats: list) -> torch.Tensor:
        """Local expert ``j`` alone on ``x``, its BatchNorm using fixed ``stats`` from :meth:`forward`.

        The statistics are constants here (no gradient flows through them), so an example's output is
        the one it had in the full pass, and the backward touches only the examples passed in.
        """
        E, width = self.num, self.cfg.width
        sl = slice(j * width, (j + 1) * width)

        def conv(i, h):
            # A slice of a channels_last weight is not contiguous in any format some conv kernels
            # accept for grad_weight: copy the (small) slice, which autograd routes back to the bank.
            return F.conv2d(h, self.convs[i].weight.unflatten(0, (E, -1))[j].contiguous(), padding=1)

        def norm(i, h):
            mean, invstd = stats[i]
            bn = self.norms[i]
            scale = (invstd[sl] * bn.weight[sl]).view(1, width, 1, 1)
            return (h - mean[sl].view(1, width, 1, 1)) * scale + bn.bias[sl].view(1, width, 1, 1)

        h = run_blocks(self.cfg, x_B1HW, conv, norm, fast_elu)
        w = self.out.weight.unflatten(0, (E, -1))[j].contiguous()
        return torch.sigmoid(F.conv2d(h, w, self.out.bias[j:j + 1], padding=1))

    # -- per-expert views ------------------------------------------------------------------
    def _expert_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shape = self._template[name]
        if name.endswith("num_batches_tracked"):
            return t.expand(self.num)
        # Split only the leading dim: a view under any memory format (channels_last too). Expert j
        # owns rows [j*k, (j+1)*k) of every leading dim, so the split is exactly the expert's shape.
        v = t.unflatten(0, (self.num, -1))
        assert v.shape[1:] == shape, (name, v.shape, shape)
        return v

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer viewed as ``[E, *expert_shape]`` (views: writes go to the bank)."""
        return {k: self._expert_view(k, v) for k, v in self.state_dict(keep_vars=True).items()}

    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        """State dict of local expert ``j`` in ``Expert``'s layout (copies)."""
        return {k: v[j].detach().clone() for k, v in self.expert_tensors().items()}

    def load_expert_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        views = self.expert_tensors()
        if set(state) != set(views):
            missing, extra = set(views) - set(state), set(state) - set(views)
            raise ValueError(f"expert state does not fit: missing {sorted(missing)}, unexpected {sorted(extra)}")
        with torch.no_grad():
            for k, v in state.items():
                if k.endswith("num_batches_tracked"):
                    self.norms[int(k.split(".")[1])].num_batches_tracked.copy_(v)
                    continue
                if tuple(v.shape) != tuple(self._template[k]):
                    raise ValueError(f"expert tensor '{k}' has shape {tuple(v.shape)}, the config needs "
                                     f"{tuple(self._template[k])}")
                views[k][j].copy_(v)

    def to_experts(self) -> list[Expert]:
        experts = []
        for j in range(self.num):
            e = Expert(self.cfg).to(next(self.parameters()).device)
            e.load_state_dict(self.expert_state(j))
            experts.append(e)
        return experts


class Discriminator(nn.Module):
    """Table 1's discriminator: pairs of 3x3 conv + ELU, each pair followed by 2x2 average pooling,
    then FC ``hidden`` + ELU and FC 1. Returns logits (trained with BCE-with-logits)."""

    def __init__(self, cfg: DiscriminatorConfig, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for w in cfg.widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), FastELU(), nn.Conv2d(w, w, 3, padding=1), FastELU(),
                       nn.AvgPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(cfg.widths)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, cfg.hidden), FastELU(),
                                nn.Linear(cfg.hidden, 1))

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        h = self.features(x_B1HW)
        # The head runs in fp32 even under bf16 autocast: the logits decide every winner, and bf16's
        # 8-bit mantissa would turn near-equal scores into exact ties (all going to the lowest id).
        with torch.autocast(h.device.type, enabled=False):
            return self.fc(h.float()).squeeze(1)


def make_discriminator(cfg: Config) -> Discriminator:
    # Keyed by seed only: every rank builds the same D (DDP would broadcast rank 0's anyway).
    with seeded(cfg.seed, "discriminator-init"):
        return Discriminator(cfg.discriminator)


class Classifier(nn.Module):
    """A small CNN for evaluation, trained on the canonical half (>= 99% on clean MNIST test digits)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10))

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        return self.net(x_B1HW)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
