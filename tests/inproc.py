"""Helpers for tests that train or build a competition in this process and compare what the runs saved."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from icm_dist.competition import Competition, build_competition
from icm_dist.config import Config, load_config
from icm_dist.dist import Dist


def train_here(config: str | Path, overrides: list[str]):
    """``icm_dist.trainer.train`` on ``config`` with ``overrides``, in this process; the run's ``threads``
    setting is undone afterwards, so that the next test runs with the thread count it had."""
    from icm_dist.trainer import train

    threads = torch.get_num_threads()
    try:
        return train(load_config(str(config), overrides))
    finally:
        torch.set_num_threads(threads)


def one_process_competition(cfg: Config, ids: list[int] | None = None) -> Competition:
    """The experts ``ids`` (default: all), D and D's Adam as a rank of the trainer builds them, one process on
    the CPU."""
    return build_competition(cfg, Dist(0, 1, 0, torch.device("cpu")), ids)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ (bitwise) between two checkpoint directories."""
    diff = []
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys(), f
        diff += [f"{f}:{k}" for k in ta if ta[k].dtype != tb[k].dtype or _bits(ta[k]) != _bits(tb[k])]
    return diff
