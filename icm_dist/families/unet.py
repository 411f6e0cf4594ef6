"""``expert.arch: unet``: an expert whose every output pixel sees the whole image (blur and other non-local
mechanisms). A small U-Net: ``levels`` times (two 3x3 convolutions, 2x2 average pooling) down, a
bottleneck that adds the image-wide mean of its features to every position (so the receptive field is
the whole image whatever its size), then up again with the skip connections, and a 3x3 convolution
back to the image's channels and a sigmoid. GroupNorm throughout: per example, so the winners' backward
is exact. The image size must be divisible by ``2**levels``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    g = next(k for k in (8, 4, 2, 1) if cout % k == 0)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(g, cout), nn.ELU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(g, cout), nn.ELU())


class UNetExpert(nn.Module):
    def __init__(self, channels: int = 1, width: int = 16, levels: int = 2):
        super().__init__()
        widths = [width * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList(_block(channels if i == 0 else widths[i - 1], widths[i]) for i in range(levels))
        self.bottom = _block(widths[levels - 1], widths[levels])
        self.glob = nn.Linear(widths[levels], widths[levels])
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels)))
        self.out = nn.Conv2d(widths[0], channels, 3, padding=1)
        self.size_multiple = 2 ** levels  # image sides: each level halves them

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        skips, h = [], x_BCHW
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.avg_pool2d(h, 2)
        h = self.bottom(h)
        h = h + self.glob(h.mean(dim=(2, 3)))[:, :, None, None]  # every position sees the whole image
        for block, skip in zip(self.up, reversed(skips)):
            h = block(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip], 1))
        return torch.sigmoid(self.out(h))
