"""Expert families (``expert.arch``): one file each, one line each in :data:`FAMILIES`.

The seam every family provides is described in :mod:`icm_dist.families.base`. ``conv`` is the paper's
expert as a grouped-convolution bank; every other family is an ``nn.Module`` factory whose copies are
batched by :class:`~icm_dist.families.base.StackedExperts`. A user's factory by import path
(``my_package.module:make``) is one too: it is checked on a probe batch before anything trains. A committee of
several families (``expert.parts``) is :class:`~icm_dist.families.mixed.MixedFamily`, one family per part.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
import torch.nn as nn

from ..config import ExpertConfig, expert_parts
from ..errors import ConfigError, on_this_rank
from ..rng import seeded
from .base import StackedExperts, couples_examples
from .conv import ConvFamily
from .mixed import MixedBlock, MixedFamily
from .stn import STNExpert
from .unet import UNetExpert


class ModuleFamily:
    """A family made of one ``nn.Module`` factory ``make(**arch_args)``, plus ``channels=C`` when it takes it and
    ``expert_id=i`` when it takes it (the expert's number in the family: its global id, less the part's first id
    in a committee of several families; for an initialization that differs by expert)."""

    def __init__(self, name: str, make: Callable[..., nn.Module], first: int = 0):
        self.name, self._make = name, make
        self.first = first  # the global id of the family's expert 0 (a part of a mixed committee starts later)

    def numbered_from(self, first: int) -> "ModuleFamily":
        """The family as a part whose first expert has global id ``first``: ``expert_id`` counts from there."""
        return ModuleFamily(self.name, self._make, first)

    def _factory(self, cfg: ExpertConfig, channels: int) -> Callable[[int], nn.Module]:
        """``make(i)``: the family's expert number ``i`` (global id ``first + i``)."""
        kwargs = dict(cfg.arch_args)
        try:
            takes = inspect.signature(self._make).parameters
        except (TypeError, ValueError):
            takes = {}
        if "channels" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values()):
            kwargs.setdefault("channels", channels)
        if "expert_id" in takes:
            return lambda i: self._make(**kwargs, expert_id=i)
        return lambda i: self._make(**kwargs)

    def expert(self, cfg: ExpertConfig, channels: int) -> nn.Module:
        """One standalone expert (the skeleton a saved state loads into: expert 0's initialization)."""
        return self._factory(cfg, channels)(0)

    def describe(self, cfg: ExpertConfig) -> str:
        where = f"icm_dist/families/{self.name}.py" if self.name in FAMILIES else f"the factory {self.name}"
        return (f"expert.arch {self.name} with arch_args {dict(cfg.arch_args)} ({where}); input and output "
                "[B, C, H, W] in [0, 1], C the metadata's 'channels'; loading this file builds the module again, "
                "so the family must be importable where it is loaded")

    def block(self, cfg: ExpertConfig, seed: int, ids: list[int], channels: int, image_size: int) -> StackedExperts:
        make = self._factory(cfg, channels)
        check_expert(self.name, make, channels, image_size)
        return StackedExperts(lambda gid: make(gid - self.first), seed, ids, channels, image_size)

    def couples_batch(self, cfg: ExpertConfig) -> bool:
        return couples_examples(self.expert(cfg, 1))


FAMILIES = {
    "conv": ConvFamily(),
    "stn": ModuleFamily("stn", STNExpert),
    "unet": ModuleFamily("unet", UNetExpert),
}


def _import(path: str) -> Callable[..., nn.Module]:
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception as e:  # a user's module may fail to import in any way: name it and the reason
        raise on_this_rank(ConfigError(
            f"expert.arch '{path}' cannot be imported ({type(e).__name__}: {' '.join(str(e).split())}); an expert "
            "of this family needs it importable on every rank and wherever its checkpoint or exported file is "
            "loaded")) from None
    if not callable(obj):
        raise ConfigError(f"expert.arch '{path}' is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def get_family(cfg: ExpertConfig):
    """The family ``cfg.arch`` names: a registered one, or a user's factory by import path; with
    ``cfg.parts``, the committee of their families."""
    if cfg.parts:
        return MixedFamily(cfg, [get_family(p) for p in expert_parts(cfg)])
    if cfg.arch in FAMILIES:
        return FAMILIES[cfg.arch]
    if ":" not in cfg.arch:
        raise ConfigError(f"expert.arch '{cfg.arch}' is not a family ({', '.join(FAMILIES)}) nor an import path "
                          "'my_package.module:make'")
    return ModuleFamily(cfg.arch, _import(cfg.arch))


def size_multiple(expert: nn.Module) -> int:
    """The number an expert's image sides must be multiples of (its ``size_multiple``; 1 if it says nothing)."""
    return int(getattr(expert, "size_multiple", 1))


def check_expert(name: str, make: Callable[[int], nn.Module], channels: int, image_size: int) -> None:
    """Expert 0 from ``make`` on a probe batch ``[2, C, S, S]`` in [0, 1]: it must be an nn.Module whose
    output has the input's shape and dtype, finite, in [0, 1]; else one line naming the family."""
    where = f"expert.arch '{name}'"
    try:
        with seeded(0, "expert-probe"):  # the global RNG is left as it was: training draws stay the same
            module = make(0)
    except Exception as e:
        raise ConfigError(f"{where} raised {type(e).__name__} when built: {' '.join(str(e).split())}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where} returned a {type(module).__name__}, not an nn.Module")
    probe = torch.rand(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = module.train()(probe)
    except Exception as e:
        raise ConfigError(f"{where} raised {type(e).__name__} on a probe batch {tuple(probe.shape)}: "
                          f"{' '.join(str(e).split())}") from None
    if not isinstance(y, torch.Tensor) or y.shape != probe.shape or y.dtype != probe.dtype:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"{where} maps a probe batch {tuple(probe.shape)} float32 to {got}; an expert must "
                          "return its input's shape and dtype")
    if not bool(torch.isfinite(y).all()):
        raise ConfigError(f"{where} returned NaN or infinite values on a probe batch")
    if float(y.min()) < 0 or float(y.max()) > 1:
        raise ConfigError(f"{where} returned values in [{float(y.min()):.3g}, {float(y.max()):.3g}] on a probe "
                          "batch; an expert's output must lie in [0, 1] (end with a sigmoid or a clamp)")


__all__ = ["FAMILIES", "MixedBlock", "MixedFamily", "ModuleFamily", "StackedExperts", "check_expert", "get_family",
           "size_multiple"]
