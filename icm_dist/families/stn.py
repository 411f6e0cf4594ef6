"""``expert.arch: stn``: a spatial-transformer expert. A localization network predicts one warp of the
whole input, ``grid_sample`` applies it, and a small convolutional stack refines the warped image.

The warp is a similarity by default (``warp: similarity``: a rotation angle, a log scale and a
translation, so a rotation is one number to learn rather than four coupled ones), or a general affine
map (``warp: affine``). The localization network's last layer starts at zero, so every expert starts
from the identity warp; identity initialization then trains the refinement towards the identity.

Gradient descent on a warp's angle from the identity does not find a half turn: every path from 0 to
180 degrees passes through sideways digits that look worse than doing nothing. ``rotations`` (degrees,
e.g. ``[0, 90, 180, 270]``) gives an expert several warp hypotheses: the learned warp followed by each
fixed base rotation, each sampled from the input, mixed with softmax weights: by default one logit
per hypothesis as a parameter of the expert (``select: expert``), so that an expert commits to one
rotation as a mechanism does; ``select: example`` predicts them from each example instead.
``select: spread`` learns no choice: expert ``i`` of the committee (of its part, with ``expert.parts``) applies
``rotations[i % K]`` after
its learned warp, a fixed buffer, so that the committee starts with experts at every base rotation and
the competition (and the splits, which copy a donor's base with its weights but never over the last
expert at a base: ``train.split_keeps_niches``) decides which are kept;
pair it with ``residual: true`` and ``identity_init.enabled=false``, since an expert turned by its base
cannot learn the identity. The
mixture is linear in the weights, so the path from "upright" to "upside down" is a straight blend that
the discriminator's gradient can follow; the learned warp then only has to find the residual (at most
45 degrees with four hypotheses). The logits start equal and identity initialization raises the
0-degree one. This is an experiment, not a solved problem:
docs/results.md ("Expert families on rotations and a shrink") shows the choice settling on the
hypothesis an expert already wins rather than on its mechanism's inverse.

``warp_gain`` (other than 1) gives the expert a warp of its own, the same for every example (a
mechanism's inverse is one warp), added to the localization network's per-example one and scaled by the
gain: Adam moves each parameter by about ``lr`` a step whatever its gradient, so at gain 1 the angle
(radians), the log scale and the translation (half image widths) move by about 0.001 a step, and a
30-degree turn takes some 500 steps of one sign. ``own_scale: false`` (similarity only) keeps the scale out of
the own warp. Measured in docs/results.md ("A warp of the expert's own"): the fast own warp follows D to
zoomed-out digits rather than to the inverse of a rotation, so it is off by default.

``residual: true`` makes the refinement a correction added to the warped image, its last layer zero at
the start, so that the expert starts as the identity without identity training. ``refine: false`` drops
the refinement: the expert only moves pixels (its output is the warped input), so it cannot paint a digit
that D likes from one it cannot undo, and cannot invert a colour, noise or a blur either. ``kernel: 1``
keeps a refinement that cannot paint either: 1x1 convolutions map each pixel's value (GroupNorm adds
the image's statistics) to a new one, an inversion or a threshold, and move nothing; so the warp carries
the geometry and the refinement the intensities.

``paint`` (e.g. ``[false, true]``) makes a committee of two kinds from one family: expert ``i`` applies its
residual refinement only if ``paint[(i // K) % P]`` holds (``K`` the spread's base rotations, 1 without
a spread; ``P`` the list's length), so with four spread bases and ``[false, true]`` experts 0-3 only move
pixels, experts 4-7 also paint, each kind at every base. A non-painting expert's refinement is computed
and multiplied by zero: its gradient is zero and the masked Adam leaves it where it is. The kind is a
buffer, so a split's copy takes its donor's kind, and it is part of the expert's niche (the splits keep
one expert of every base and kind). It needs ``residual: true``: a non-painting expert's output is then
its warped input.

Normalization is per example (GroupNorm), so one example's output never depends on another's and the
winners' backward is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class STNExpert(nn.Module):
    def __init__(self, channels: int = 1, width: int = 32, depth: int = 3, loc_width: int = 16,
                 warp: str = "similarity", rotations: tuple = (0,), select: str = "expert",
                 select_gain: float = 10.0, residual: bool = False, warp_gain: float = 1.0, own_scale: bool = True,
                 refine: bool = True, kernel: int = 3, paint: tuple | None = None, expert_id: int = 0):
        super().__init__()
        if warp not in ("similarity", "affine"):
            raise ValueError(f"warp must be similarity or affine, not {warp!r}")
        if select not in ("example", "expert", "spread"):
            raise ValueError(f"select must be example, expert or spread, not {select!r}")
        if not rotations:
            raise ValueError("rotations must hold at least one angle (degrees), e.g. [0] or [0, 90, 180, 270]")
        if not own_scale and not (warp == "similarity" and float(warp_gain) != 1.0):
            raise ValueError("own_scale: false keeps the scale out of the expert's own warp, which only a similarity "
                             f"warp with a warp_gain other than 1 has (here warp {warp!r}, warp_gain {warp_gain})")
        if kernel not in (1, 3):
            raise ValueError(f"kernel (the refinement's convolutions) must be 1 or 3, not {kernel!r}")
        if residual and not refine:
            raise ValueError("residual: true adds the refinement's correction, so it needs refine: true")
        if paint is not None and (not residual or not paint or not all(isinstance(v, bool) for v in paint)):
            raise ValueError("paint is a list of true/false (which experts apply their refinement) and needs "
                             f"residual: true, so that an expert that does not paint outputs its warped input "
                             f"(here paint {paint!r}, residual {residual})")
        self.warp = warp
        # cos and sin of each base rotation, rounded so that quarter turns sample pixel centres exactly
        self.rotations = [(round(math.cos(math.radians(a)), 12), round(math.sin(math.radians(a)), 12))
                          for a in rotations]
        # Adam moves a parameter by about lr a step; the gain lets the choice between hypotheses settle
        # within a few hundred steps (a logit gap of several units) instead of thousands.
        self.select_gain = float(select_gain)
        # The same holds for the warp: at gain 1 a half-degree turn costs ten steps, so the refinement,
        # whose many weights each move by lr, paints a digit upright long before the warp turns it.
        self.warp_gain = float(warp_gain)
        n_warp = 4 if warp == "similarity" else 6
        if self.warp_gain != 1.0:  # the expert's own warp, the same for every example, as a mechanism's inverse is
            self.warp_p = nn.Parameter(torch.zeros(n_warp))
        # own_scale false (similarity only): the own warp turns and translates but does not scale, so that the
        # fast warp cannot zoom out (a smaller digit fools D cheaply); the per-example warp still scales.
        self.own_mask = [1.0, 0.0, 1.0, 1.0] if warp == "similarity" and not own_scale else None
        self.per_example = select == "example"
        self.spread = select == "spread" and len(rotations) > 1
        self.loc = nn.Sequential(
            nn.Conv2d(channels, loc_width, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(loc_width, 2 * loc_width, 3, stride=2, padding=1), nn.ELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * loc_width * 16, 64), nn.ELU())
        self.head = nn.Linear(64, n_warp)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.spread:  # a buffer, so that a split's copy takes its donor's base rotation with its weights
            self.register_buffer("base", torch.tensor(self.rotations[expert_id % len(rotations)]))
        elif len(rotations) > 1 and self.per_example:
            self.choose = nn.Linear(64, len(rotations))
            nn.init.zeros_(self.choose.weight)
            nn.init.zeros_(self.choose.bias)
        elif len(rotations) > 1:
            self.choose = nn.Parameter(torch.zeros(len(rotations)))
        self.kinds = paint is not None
        if self.kinds:  # a buffer for the same reason as the base: a split's copy takes its donor's kind
            k = len(rotations) if self.spread else 1
            self.register_buffer("paints", torch.tensor(float(paint[(expert_id // k) % len(paint)])))
        # The splits keep at least one expert at every base and kind (StackedExperts.niches).
        self.niche_buffer = tuple(n for n, on in (("base", self.spread), ("paints", self.kinds)) if on) or None
        layers: list[nn.Module] = []
        cin = channels
        pad = kernel // 2
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, kernel, padding=pad, bias=False), nn.GroupNorm(_groups(width), width),
                       nn.ELU()]
            cin = width
        self.refine = nn.Sequential(*layers, nn.Conv2d(cin, channels, kernel, padding=pad)) if refine else None
        self.residual = residual
        if residual:  # the refinement adds a correction that starts at zero: the expert starts as the identity
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

    def theta(self, feat: torch.Tensor) -> torch.Tensor:
        """The warp of each example as ``affine_grid``'s ``[B, 2, 3]`` (the identity at initialization)."""
        p = self.head(feat).float()
        if self.warp_gain != 1.0:
            own = self.warp_gain * self.warp_p.float()
            if self.own_mask is not None:
                own = own * torch.tensor(self.own_mask, device=own.device)
            p = p + own
        if self.warp == "affine":
            eye = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=p.device)
            return (p + eye).view(-1, 2, 3)
        angle, scale, tx, ty = p.unbind(1)
        s = torch.exp(scale)
        cos, sin = s * torch.cos(angle), s * torch.sin(angle)
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)

    def weights(self, feat: torch.Tensor) -> torch.Tensor:
        """The mixture weights of the base rotations, ``[B, K]`` or ``[K]`` (uniform at initialization)."""
        logits = self.choose(feat) if self.per_example else self.choose
        return torch.softmax(logits.float() * self.select_gain, -1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        feat = self.loc(x_BCHW)
        theta = self.theta(feat)
        # affine_grid(theta, align_corners=False) written out: vmap has a batching rule for these ops and
        # none for affine_grid's kernel, which would run the copies one by one.
        H, W = x_BCHW.shape[-2:]
        ys = (torch.arange(H, device=theta.device, dtype=theta.dtype) * 2 + 1) / H - 1
        xs = (torch.arange(W, device=theta.device, dtype=theta.dtype) * 2 + 1) / W - 1
        base_HW3 = torch.stack([xs.expand(H, W), ys[:, None].expand(H, W), torch.ones(H, W, dtype=theta.dtype,
                                                                                        device=theta.device)], -1)
        grid = torch.einsum("hwk,bjk->bhwj", base_HW3, theta)
        x = x_BCHW.float()
        if self.spread:
            warped = self._sample(x, grid, *self.base.unbind())
        elif len(self.rotations) == 1:
            warped = self._sample(x, grid, *self.rotations[0])
        else:
            w = self.weights(feat)
            w = w[:, :, None, None, None] if self.per_example else w[None, :, None, None, None]
            warped = sum(w[:, k] * self._sample(x, grid, c, s) for k, (c, s) in enumerate(self.rotations))
        warped = warped.to(x_BCHW.dtype)
        if self.refine is None:  # bilinear samples of [0, 1] inputs with zero padding: already in [0, 1]
            return warped.clamp(0, 1)
        if self.residual:
            correction = self.refine(warped)
            if self.kinds:
                correction = correction * self.paints
            return (warped + correction).clamp(0, 1)
        return torch.sigmoid(self.refine(warped))

    @staticmethod
    def _sample(x: torch.Tensor, grid: torch.Tensor, cos, sin) -> torch.Tensor:
        """``x`` sampled at ``grid``'s points turned by the base rotation (about the image centre); ``cos``
        and ``sin`` are floats or 0-d tensors (a spread expert's buffer)."""
        if isinstance(cos, torch.Tensor) or (cos, sin) != (1.0, 0.0):
            gx, gy = grid.unbind(-1)
            grid = torch.stack([cos * gx - sin * gy, sin * gx + cos * gy], -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
