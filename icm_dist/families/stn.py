"""``expert.arch: stn``: a spatial-transformer expert. A localization network predicts one warp of the
whole input, ``grid_sample`` applies it, and a small convolutional stack refines the warped image.

The warp is a similarity by default (``warp: similarity``: a rotation angle, a log scale and a
translation, so a rotation is one number to learn rather than four coupled ones), or a general affine
map (``warp: affine``). The localization network's last layer starts at zero, so every expert starts
from the identity warp; identity initialization then trains the refinement towards the identity.
Normalization is per example (GroupNorm), so one example's output never depends on another's and the
winners' backward is exact.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class STNExpert(nn.Module):
    def __init__(self, channels: int = 1, width: int = 32, depth: int = 3, loc_width: int = 16,
                 warp: str = "similarity"):
        super().__init__()
        if warp not in ("similarity", "affine"):
            raise ValueError(f"warp must be similarity or affine, not {warp!r}")
        self.warp = warp
        self.loc = nn.Sequential(
            nn.Conv2d(channels, loc_width, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(loc_width, 2 * loc_width, 3, stride=2, padding=1), nn.ELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * loc_width * 16, 64), nn.ELU())
        self.head = nn.Linear(64, 4 if warp == "similarity" else 6)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        layers: list[nn.Module] = []
        cin = channels
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width), nn.ELU()]
            cin = width
        self.refine = nn.Sequential(*layers, nn.Conv2d(cin, channels, 3, padding=1))

    def theta(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The warp of each example as ``affine_grid``'s ``[B, 2, 3]`` (the identity at initialization)."""
        p = self.head(self.loc(x_BCHW)).float()
        if self.warp == "affine":
            eye = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=p.device)
            return (p + eye).view(-1, 2, 3)
        angle, scale, tx, ty = p.unbind(1)
        s = torch.exp(scale)
        cos, sin = s * torch.cos(angle), s * torch.sin(angle)
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        theta = self.theta(x_BCHW)
        # affine_grid(theta, align_corners=False) written out: vmap has a batching rule for these ops and
        # none for affine_grid's kernel, which would run the copies one by one.
        H, W = x_BCHW.shape[-2:]
        ys = (torch.arange(H, device=theta.device, dtype=theta.dtype) * 2 + 1) / H - 1
        xs = (torch.arange(W, device=theta.device, dtype=theta.dtype) * 2 + 1) / W - 1
        base_HW3 = torch.stack([xs.expand(H, W), ys[:, None].expand(H, W), torch.ones(H, W, dtype=theta.dtype,
                                                                                        device=theta.device)], -1)
        grid = torch.einsum("hwk,bjk->bhwj", base_HW3, theta)
        warped = F.grid_sample(x_BCHW.float(), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False).to(x_BCHW.dtype)
        return torch.sigmoid(self.refine(warped))
