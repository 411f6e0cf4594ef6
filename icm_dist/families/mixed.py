"""A committee of several families (``expert.parts``): each part is a block of its own family, and the
rank's block is the parts it holds, side by side.

Part ``p`` holds consecutive global ids (after the parts before it), so a rank's experts are at most one
run of ids from each part it overlaps, and a local index ``j`` names one expert of one part. A part's
experts are built by its family exactly as in a committee of that family alone (expert ``gid`` from the
stream keyed by (seed, gid)), numbered within the part for what depends on the number (a spread ``stn``
part's bases start at its first expert).

The layout rule of :mod:`icm_dist.families.base` holds part by part: the masked Adam, the loser's buffer
restore and the per-expert views go through :meth:`MixedBlock.parts`. An expert's state is its part's
expert's state, so a checkpoint's expert file and an exported expert are those of its family.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ExpertConfig, expert_parts
from .base import locate


class MixedBlock(nn.Module):
    """A rank's experts of a committee of several families: the blocks of the parts it holds, in id order."""

    # Not the block as a whole: LocalExperts applies train.channels_last to each part that takes it.
    channels_last = False

    def __init__(self, blocks: list[nn.Module], part_ids: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.part_ids = list(part_ids)  # the committee's part index of each block
        self.firsts = [sum(b.num for b in blocks[:i]) for i in range(len(blocks))]
        self.num = sum(b.num for b in blocks)
        self.ids = [g for b in blocks for g in b.ids]

    def parts(self) -> list[tuple[int, nn.Module]]:
        """``(first local index, block)`` of every part this rank holds."""
        return list(zip(self.firsts, self.blocks))

    # -- the seam ----------------------------------------------------------------------------
    def inputs(self, x: torch.Tensor, channels_last: bool = False) -> tuple:
        """Each part's native input: from the shared ``[B, C, H, W]``, or from its slice of ``[B, E, C, H, W]``."""
        if x.dim() == 4:
            return tuple(b.inputs(x, channels_last) for b in self.blocks)
        return tuple(b.inputs(x[:, first:first + b.num], channels_last) for first, b in self.parts())

    def outputs(self, ys: tuple) -> torch.Tensor:
        return torch.cat([b.outputs(y) for b, y in zip(self.blocks, ys)], dim=1)

    def forward(self, xs: tuple, collect_stats: list | None = None) -> tuple:
        """Every part on its input; with ``collect_stats``, one list of statistics per part appended to it."""
        outs = []
        for b, x in zip(self.blocks, xs):
            stats = None if collect_stats is None else []
            outs.append(b(x, collect_stats=stats))
            if collect_stats is not None:
                collect_stats.append(stats)
        return tuple(outs)

    def forward_one(self, j: int, x_BCHW: torch.Tensor, stats: list | None) -> torch.Tensor:
        p, k = locate(self.parts(), j)
        return self.blocks[p].forward_one(k, x_BCHW, stats[p] if stats else None)

    def count_batch(self) -> None:
        for b in self.blocks:
            b.count_batch()

    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        p, k = locate(self.parts(), j)
        return self.blocks[p].expert_state(k)

    def load_expert_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        p, k = locate(self.parts(), j)
        self.blocks[p].load_expert_state(k, state)

    def niches(self) -> list[tuple]:
        """Each expert's part with its niche within the part (that a copy stays within its donor's part is
        ``plan_splits``' ``kinds``, which the trainer passes whether niches are kept or not)."""
        out = []
        for part, b in zip(self.part_ids, self.blocks):
            out.extend((part, n) for n in (b.niches() or [None] * b.num))
        return out

    def to_experts(self) -> list[nn.Module]:
        return [e for b in self.blocks for e in b.to_experts()]


class MixedFamily:
    """``expert.parts``: the families of the parts (``families[p]`` builds part ``p``, numbered from its first id)."""

    name = "mixed"

    def __init__(self, cfg: ExpertConfig, families: list):
        self.part_cfgs = expert_parts(cfg)
        self.starts = [sum(p.num for p in self.part_cfgs[:i]) for i in range(len(self.part_cfgs))]
        self.families = [f.numbered_from(s) for f, s in zip(families, self.starts)]

    def block(self, cfg: ExpertConfig, seed: int, ids: list[int], channels: int, image_size: int) -> MixedBlock:
        blocks, part_ids = [], []
        for p, (fam, pcfg, start) in enumerate(zip(self.families, self.part_cfgs, self.starts)):
            mine = [g for g in ids if start <= g < start + pcfg.num]
            if mine:
                blocks.append(fam.block(pcfg, seed, mine, channels, image_size))
                part_ids.append(p)
        return MixedBlock(blocks, part_ids)

    def couples_batch(self, cfg: ExpertConfig) -> bool:
        """Whether any part couples a batch: then the whole committee takes the dense backward (exact for every
        part; the per-example parts pay for the conv part's BatchNorm)."""
        return any(f.couples_batch(p) for f, p in zip(self.families, self.part_cfgs))
