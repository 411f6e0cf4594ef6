"""The paper's expert (appendix B): five 3x3 convolutions, ``expert.arch: conv``, the default family.

``Expert`` is the plain nn.Module that a user reuses on its own (one checkpoint file is one Expert).
``ExpertBank`` holds a rank's block of experts as one module of grouped convolutions: expert ``j`` of the
bank owns output channels ``[j*width, (j+1)*width)`` of every layer, and BatchNorm statistics are per
channel, so the bank computes exactly what ``E`` separate experts would, in one kernel per layer.
Parameter names are shared: ``bank.expert_state(j)`` is a state dict that ``Expert.load_state_dict``
takes as it is. An expert maps C channels to C channels.

The bank's native layout is ``[B, E*C, H, W]`` (expert ``j`` reads and writes channels ``[j*C, (j+1)*C)``);
:meth:`ExpertBank.inputs` and :meth:`ExpertBank.outputs` translate from and to the family seam's
``[B, E, C, H, W]`` (:mod:`icm_dist.families.base`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ExpertConfig
from ..models import fast_elu
from ..rng import seeded
from .base import check_state_fits


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


PER_EXAMPLE_NORMS = ("group", "instance", "layer", "none")


def norm_groups(cfg: ExpertConfig) -> int:
    """Groups of channels per expert that a per-example norm takes its statistics over."""
    return {"group": cfg.groups, "instance": cfg.width, "layer": 1}[cfg.norm]


def make_norm(cfg: ExpertConfig, experts: int = 1) -> nn.Module:
    """The normalization of one hidden layer for ``experts`` experts side by side (their channels
    contiguous, ``width`` each).

    ``batch`` is the paper's BatchNorm (statistics over the batch: every example's output depends on
    the others'). The per-example norms are GroupNorm over each expert's own channels (``layer``: one
    group, ``instance``: one per channel, ``group``: ``expert.groups``): a group never straddles two
    experts, so side by side they compute exactly what each would alone, and one example's output never
    depends on another's.
    """
    if cfg.norm == "batch":
        return nn.BatchNorm2d(experts * cfg.width)
    if cfg.norm == "none":
        return nn.Identity()
    return nn.GroupNorm(experts * norm_groups(cfg), experts * cfg.width)


def standardized(w: torch.Tensor, cfg: ExpertConfig) -> torch.Tensor:
    """Weight standardization (``expert.weight_standardization``): each output channel's filter to zero
    mean and unit variance, so that a per-example norm sees well-scaled activations; else ``w``."""
    if not cfg.weight_standardization:
        return w
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (w - mean) / torch.sqrt(var + 1e-5)


def conv_forward(conv: nn.Conv2d, h: torch.Tensor, cfg: ExpertConfig) -> torch.Tensor:
    """A hidden convolution (of one expert or of a bank: ``conv.groups`` experts) on ``h``, with its filters
    standardized when ``expert.weight_standardization`` asks for it."""
    if not cfg.weight_standardization:
        return conv(h)
    return F.conv2d(h, standardized(conv.weight, cfg), conv.bias, padding=1, groups=conv.groups)


def hidden_conv(cfg: ExpertConfig, i: int, experts: int = 1, channels: int = 1) -> nn.Conv2d:
    """Layer ``i``'s 3x3 convolution for ``experts`` experts side by side (a grouped convolution) on images
    of ``channels`` channels. Only without a norm does it carry a bias: every norm's shift makes one redundant."""
    cin = experts * (channels if i == 0 else cfg.width)
    return nn.Conv2d(cin, experts * cfg.width, 3, padding=1, bias=cfg.norm == "none", groups=experts)


class Expert(nn.Module):
    """One expert: ``depth`` x (3x3 conv, norm, ELU), then a 3x3 conv back to the image's channels and a sigmoid.

    Fully convolutional, so it applies to any image size (46x46 symbols as well as 32x32 digits),
    provided the size is divisible by ``2**pool``.
    """

    def __init__(self, cfg: ExpertConfig, channels: int = 1):
        super().__init__()
        self.cfg, self.channels = cfg, channels
        self.convs = nn.ModuleList(hidden_conv(cfg, i, channels=channels) for i in range(cfg.depth))
        self.norms = nn.ModuleList(make_norm(cfg) for _ in range(cfg.depth))
        self.out = nn.Conv2d(cfg.width, channels, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (each of the ``pool`` poolings halves them)."""
        return 2 ** self.cfg.pool

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = run_blocks(self.cfg, x_BCHW, lambda i, h: conv_forward(self.convs[i], h, self.cfg),
                       lambda i, h: self.norms[i](h), F.elu)
        return torch.sigmoid(self.out(h))


def make_expert(cfg: ExpertConfig, seed: int, expert_id: int, channels: int = 1) -> Expert:
    """Expert ``expert_id`` initialized from the stream keyed by (seed, expert id): the same on any rank."""
    with seeded(seed, "expert-init", expert_id):
        return Expert(cfg, channels)


class ExpertBank(nn.Module):
    """A block of ``E`` experts with global ids ``ids``, computed as grouped convolutions.

    ``forward`` takes ``[B, E*C, H, W]`` (channels ``[j*C, (j+1)*C)`` go to expert ``j``; expand one
    batch to give every expert the same input) and returns ``[B, E*C, H, W]``.
    """

    channels_last = True  # its weights are 4-D convolutions: train.channels_last applies

    def __init__(self, cfg: ExpertConfig, ids: list[int], channels: int = 1):
        super().__init__()
        self.cfg, self.channels = cfg, channels
        self.ids = list(ids)
        E, width = len(ids), cfg.width
        self.num = E
        self.convs = nn.ModuleList(hidden_conv(cfg, i, E, channels) for i in range(cfg.depth))
        self.norms = nn.ModuleList(make_norm(cfg, E) for _ in range(cfg.depth))
        self.out = nn.Conv2d(E * width, E * channels, 3, padding=1, groups=E)
        self._template = {k: v.shape for k, v in Expert(cfg, channels).state_dict().items()}

    @classmethod
    def create(cls, cfg: ExpertConfig, seed: int, ids: list[int], channels: int = 1) -> "ExpertBank":
        bank = cls(cfg, ids, channels)
        for j, gid in enumerate(ids):
            bank.load_expert_state(j, make_expert(cfg, seed, gid, channels).state_dict())
        return bank

    # -- the seam's layout (icm_dist/families/base.py) -----------------------------------------
    def inputs(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """The bank's ``[B, E*C, H, W]`` from one batch for every expert (``[B, C, H, W]``, expanded: still a
        view when C is 1) or one batch per expert (``[B, E, C, H, W]``)."""
        if x.dim() == 4:
            B, C, H, W = x.shape
            x = x.unsqueeze(1).expand(B, self.num, C, H, W)
        x = x.flatten(1, 2)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, E*C, H, W]`` as ``[B, E, C, H, W]`` (a view)."""
        return y.unflatten(1, (self.num, self.channels))

    def expert_params(self) -> list[tuple[str, nn.Parameter]]:
        """The bank's parameters: their names are the lone ``Expert``'s."""
        return list(self.named_parameters())

    def forward(self, x_BECHW: torch.Tensor, collect_stats: list | None = None) -> torch.Tensor:
        """All experts at once: ``[B, E*C, H, W]`` in, ``[B, E*C, H, W]`` out.

        With ``collect_stats`` (a list, training mode, no autograd) and BatchNorm, BatchNorm normalizes
        with batch statistics computed here, updates the running statistics as nn.BatchNorm2d would,
        and appends each layer's ``(mean, invstd)`` to the list, so that :meth:`forward_one` can later
        reproduce exactly these outputs for a subset of the examples. Per-example norms need no
        statistics for that: the list stays empty.
        """
        def norm(i, h):
            bn = self.norms[i]
            if collect_stats is None or not self.training or self.cfg.norm != "batch":
                return bn(h)
            # The stock BatchNorm kernel (running statistics updated as nn.BatchNorm2d does), asked
            # for the batch mean and inverse std it used, so forward_one can reuse them exactly.
            h, mean, invstd = torch.native_batch_norm(h, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                                                      bn.momentum, bn.eps)
            bn.num_batches_tracked += 1
            collect_stats.append((mean.float(), invstd.float()))
            return h

        h = run_blocks(self.cfg, x_BECHW, lambda i, h: conv_forward(self.convs[i], h, self.cfg), norm, fast_elu)
        return torch.sigmoid(self.out(h))

    def forward_one(self, j: int, x_BCHW: torch.Tensor, stats: list | None) -> torch.Tensor:
        """Local expert ``j`` alone on ``x``: the outputs it had in the full pass of :meth:`forward`.

        BatchNorm uses the fixed ``stats`` of that pass (constants: no gradient flows through them);
        a per-example norm needs none. Either way the backward touches only the examples passed in.
        With ``stats=None`` and BatchNorm (the routed competition, training mode), ``x`` is the expert's
        whole batch: BatchNorm normalizes with its statistics and updates the expert's running statistics,
        exactly what :meth:`forward` would do with this batch alone.
        """
        E, width, cfg = self.num, self.cfg.width, self.cfg
        sl = slice(j * width, (j + 1) * width)

        def conv(i, h):
            c = self.convs[i]
            # A slice of a channels_last weight is not contiguous in any format some conv kernels
            # accept for grad_weight: copy the (small) slice, which autograd routes back to the bank.
            w = standardized(c.weight.unflatten(0, (E, -1))[j].contiguous(), cfg)
            return F.conv2d(h, w, None if c.bias is None else c.bias[sl], padding=1)

        def norm(i, h):
            n = self.norms[i]
            if cfg.norm == "none":
                return h
            if cfg.norm != "batch":
                return F.group_norm(h, norm_groups(cfg), n.weight[sl], n.bias[sl], n.eps)
            if stats is None:
                # Slices of the bank's running buffers are views: batch_norm updates the expert's own rows.
                return F.batch_norm(h, n.running_mean[sl], n.running_var[sl], n.weight[sl], n.bias[sl], True,
                                    n.momentum, n.eps)
            mean, invstd = stats[i]
            scale = (invstd[sl] * n.weight[sl]).view(1, width, 1, 1)
            return (h - mean[sl].view(1, width, 1, 1)) * scale + n.bias[sl].view(1, width, 1, 1)

        h = run_blocks(self.cfg, x_BCHW, conv, norm, fast_elu)
        C = self.channels
        w = self.out.weight.unflatten(0, (E, -1))[j].contiguous()
        return torch.sigmoid(F.conv2d(h, w, self.out.bias[j * C:(j + 1) * C], padding=1))

    @torch.no_grad()
    def count_batch(self) -> None:
        """Advance BatchNorm's batch counters once, as a training-mode :meth:`forward` does (for passes that
        run the experts one by one)."""
        for n in self.norms:
            if isinstance(n, nn.BatchNorm2d):
                n.num_batches_tracked += 1

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

    def parts(self) -> list[tuple[int, nn.Module]]:
        """One part: the bank itself."""
        return [(0, self)]

    def niches(self) -> None:
        """Nothing about a conv expert is fixed: every one can become a copy of any other."""
        return None

    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        """State dict of local expert ``j`` in ``Expert``'s layout (copies)."""
        return {k: v[j].detach().clone() for k, v in self.expert_tensors().items()}

    def load_expert_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        views = self.expert_tensors()
        check_state_fits(state, self._template)
        with torch.no_grad():
            for k, v in state.items():
                if k.endswith("num_batches_tracked"):
                    self.norms[int(k.split(".")[1])].num_batches_tracked.copy_(v)
                    continue
                views[k][j].copy_(v)

    def to_experts(self) -> list[Expert]:
        experts = []
        for j in range(self.num):
            e = Expert(self.cfg, self.channels).to(next(self.parameters()).device)
            e.load_state_dict(self.expert_state(j))
            experts.append(e)
        return experts




NORMS = {"batch": "BatchNorm2d (eval: running stats, eps 1e-5)", "none": "no norm (the conv has a bias)",
         "group": "GroupNorm(groups, eps 1e-5)", "instance": "GroupNorm(width groups, eps 1e-5)",
         "layer": "GroupNorm(1 group, eps 1e-5)"}


class ConvFamily:
    """``expert.arch: conv``: the paper's expert, batched as grouped convolutions."""

    name = "conv"

    def describe(self, cfg: ExpertConfig) -> str:
        """The expert's network in words, for an exported file's metadata."""
        ws = "weight-standardized " if cfg.weight_standardization else ""
        return (f"depth x [{ws}conv3x3 -> {NORMS[cfg.norm]} -> ELU -> avg_pool2d(2) after the first `pool` blocks, "
                "nearest 2x upsampling before the last `pool` blocks] -> conv3x3 back to C channels (with bias) -> "
                "sigmoid; input and output [B, C, H, W] in [0, 1], C the metadata's 'channels'")

    def expert(self, cfg: ExpertConfig, channels: int) -> Expert:
        return Expert(cfg, channels)

    def numbered_from(self, first: int) -> "ConvFamily":
        """As a part of a mixed committee: the same (a conv expert depends on its global id only)."""
        return self

    def block(self, cfg: ExpertConfig, seed: int, ids: list[int], channels: int, image_size: int) -> ExpertBank:
        return ExpertBank.create(cfg, seed, ids, channels)

    def couples_batch(self, cfg: ExpertConfig) -> bool:
        return cfg.norm == "batch"
