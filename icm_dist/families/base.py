"""The expert-family seam: what a family provides so that the step, identity initialization, the masked
Adam, checkpoints, resharding, the routed competition and the commands work for it unchanged.

A **family** (``expert.arch``) has these methods:

* ``expert(cfg, channels) -> nn.Module``: one standalone expert, ``[B, C, H, W]`` in [0, 1] to the same
  shape. Its state dict is what a checkpoint's expert file and an exported expert hold (``model.*``).
* ``block(cfg, seed, ids, channels, image_size) -> Block``: a rank's experts with global ids ``ids``,
  expert ``gid`` initialized from the stream keyed by (seed, gid) so that it is the same on any rank.
* ``couples_batch(cfg) -> bool``: whether one example's output depends on the others' (BatchNorm's
  batch statistics). Then the exact gradient of Algorithm 1 needs the dense backward
  (``train.expert_backward=auto`` picks it).
* ``describe(cfg) -> str``: the expert's network in words, for an exported file's metadata.
* ``numbered_from(first) -> family``: the family as a part of a committee of several (``expert.parts``)
  whose first expert has global id ``first``, for what an expert's number decides (a spread ``stn``'s base).

A **block** is an ``nn.Module`` over a rank's ``num`` experts:

* ``channels_last``: whether ``train.channels_last`` applies to the block's weights and inputs.
* ``inputs(x, channels_last)`` turns one batch for every expert ``[B, C, H, W]``, or one batch per expert
  ``[B, E, C, H, W]``, into the block's own layout; ``forward(native)`` runs every expert on it (the call
  the trainer may compile); ``outputs(y)`` gives ``[B, E, C, H, W]``.
* ``forward_one(j, x_BCHW, stats)``: local expert ``j`` alone, with its graph (the winners' backward
  and the routed competition). ``stats`` are batch statistics collected by ``forward(native,
  collect_stats=[])`` for a family that couples the batch; None otherwise.
* ``count_batch()``: after ``forward_one`` passes, advance batch counters once per step, as one
  ``forward`` would.
* ``expert_params()``: ``(name, parameter)`` pairs, the names in the standalone expert's layout;
  ``expert_tensors()``: every parameter and buffer by that name, viewed as ``[E, *expert_shape]``;
  ``expert_state(j)`` / ``load_expert_state(j, state)``; ``to_experts()``.
* ``parts()``: ``[(first local index, block)]`` of the blocks whose per-expert views (``expert_params``,
  ``expert_tensors``) cover its experts: ``[(0, self)]`` for a one-family block, one entry per part for a
  committee of several families (:mod:`icm_dist.families.mixed`), which has no views of its own.
* ``niches()``: what each expert is fixed to that training never changes (a spread ``stn``'s base
  rotation, its kind with ``paint``), one hashable per local expert, or None for a family without such a
  thing. The splits never copy over the last expert of a niche (``train.split_keeps_niches``): it could
  not come back.

The one layout rule the masked Adam and the loser's buffer restore rely on: every parameter and buffer
of a part's block has a leading dimension that splits as ``[E, ...]`` (``E`` the part's experts), expert
``j`` owning slice ``j``.

This module keeps the seam's second implementation beside the conv bank: :class:`StackedExperts`, ``E``
copies of any ``nn.Module`` with their own parameters, run as one batched call with ``torch.func``
(``stack_module_state``, ``functional_call``, ``vmap``) where vmap takes the module, and as a plain loop
over ``functional_call`` where it does not.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap

from ..rng import seeded


def check_state_fits(state: dict[str, torch.Tensor], shapes: dict) -> None:
    """``state`` has exactly the names of ``shapes`` (one expert's tensors), each of that shape; else a
    ValueError naming the first misfit, before anything is copied."""
    if set(state) != set(shapes):
        missing, extra = set(shapes) - set(state), set(state) - set(shapes)
        raise ValueError(f"expert state does not fit: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(shapes[k]):
            raise ValueError(f"expert tensor '{k}' has shape {tuple(v.shape)}, the config needs {tuple(shapes[k])}")


def locate(parts: list[tuple[int, nn.Module]], j: int) -> tuple[int, int]:
    """(index into ``parts``, the expert's index within that part's block) of local expert ``j``, ``parts`` a
    block's ``parts()``."""
    for p, (first, b) in enumerate(parts):
        if j < first + b.num:
            return p, j - first
    raise IndexError(f"local expert {j} is beyond the block's {sum(b.num for _, b in parts)}")


def couples_examples(module: nn.Module) -> bool:
    """True when ``module`` normalizes over the batch (BatchNorm in training mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class StackedExperts(nn.Module):
    """``E`` copies of one module with their own parameters and buffers, stacked ``[E, ...]``.

    The copies are built by ``make(gid)`` under the stream keyed by (seed, global id). The parameters are
    registered here under mangled names (a module's names hold dots) and keep the copy's own names in
    :meth:`expert_params` and :meth:`expert_tensors`, so that one expert's state dict is what ``make(gid)``'s
    module loads. ``vmap=None`` tries the batched call once on a probe and falls back to the loop if
    vmap refuses the module (an in-place op vmap has no rule for, data-dependent control flow).
    """

    channels_last = False  # stacked weights gain a leading dimension: 5-D, which channels_last does not cover

    def __init__(self, make: Callable[[int], nn.Module], seed: int, ids: list[int], channels: int,
                 image_size: int, use_vmap: bool | None = None):
        super().__init__()
        self.ids, self.num, self.channels = list(ids), len(ids), channels
        self._make = make
        copies = []
        for gid in self.ids:
            with seeded(seed, "expert-init", gid):
                copies.append(make(gid))
        params, buffers = stack_module_state(copies)
        # The skeleton functional_call runs: its own tensors are never read, so it lives on the meta device.
        self._skeleton = (copy.deepcopy(copies[0]).to("meta"),)
        self._param_names, self._buffer_names = list(params), list(buffers)
        for n in self._param_names:
            self.register_parameter(self._mangle(n), nn.Parameter(params[n].detach().clone()))
        for n in self._buffer_names:
            self.register_buffer(self._mangle(n), buffers[n].clone())
        self.use_vmap = use_vmap
        if use_vmap is None:
            probe = torch.rand(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
            self.use_vmap = self._vmap_works(probe)

    @staticmethod
    def _mangle(name: str) -> str:
        return "e__" + name.replace(".", "__")

    def _tensors(self) -> tuple[dict, dict]:
        return ({n: getattr(self, self._mangle(n)) for n in self._param_names},
                {n: getattr(self, self._mangle(n)) for n in self._buffer_names})

    def _vmap_works(self, probe_BCHW: torch.Tensor) -> bool:
        saved = [b.clone() for b in self._tensors()[1].values()]
        try:
            with torch.no_grad():
                self._batched(probe_BCHW, shared=True)
            return True
        except Exception:  # vmap has no rule for something in the module: the loop computes the same
            return False
        finally:
            with torch.no_grad():
                for b, s in zip(self._tensors()[1].values(), saved):
                    b.copy_(s)

    def _call(self, params: dict, buffers: dict, x_BCHW: torch.Tensor) -> torch.Tensor:
        return functional_call(self._skeleton[0], (params, buffers), (x_BCHW,))

    def _batched(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        params, buffers = self._tensors()
        return vmap(self._call, in_dims=(0, 0, None if shared else 0), randomness="different")(params, buffers, x)

    # -- the seam ----------------------------------------------------------------------------
    def inputs(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """``[B, C, H, W]`` (shared) stays as it is; ``[B, E, C, H, W]`` becomes ``[E, B, C, H, W]``."""
        return x if x.dim() == 4 else x.movedim(1, 0)

    def outputs(self, y_EBCHW: torch.Tensor) -> torch.Tensor:
        return y_EBCHW.movedim(0, 1)

    def forward(self, x: torch.Tensor, collect_stats: list | None = None) -> torch.Tensor:
        """Every expert: on the shared batch ``[B, C, H, W]`` or each on its own ``[E, B, C, H, W]``."""
        shared = x.dim() == 4
        if self.use_vmap:
            return self._batched(x, shared)
        return torch.stack([self.forward_one(j, x if shared else x[j], None) for j in range(self.num)])

    def forward_one(self, j: int, x_BCHW: torch.Tensor, stats: list | None) -> torch.Tensor:
        if stats:
            raise ValueError("a stacked family keeps no batch statistics: its winners' backward needs no norm "
                             "over the batch (train.expert_backward=dense for a module with BatchNorm)")
        params, buffers = self._tensors()
        return self._call({n: p[j] for n, p in params.items()}, {n: b[j] for n, b in buffers.items()}, x_BCHW)

    def count_batch(self) -> None:
        """Nothing to do: each functional call advances the copy's own batch counters."""

    def expert_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self._param_names, self._tensors()[0].values()))

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        params, buffers = self._tensors()
        return {**params, **buffers}

    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        return {k: v[j].detach().clone() for k, v in self.expert_tensors().items()}

    def load_expert_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        views = self.expert_tensors()
        check_state_fits(state, {k: v.shape[1:] for k, v in views.items()})
        with torch.no_grad():
            for k, v in state.items():
                views[k][j].copy_(v)

    def parts(self) -> list[tuple[int, nn.Module]]:
        """One part: the block itself (the per-expert views below cover all its experts)."""
        return [(0, self)]

    def niches(self) -> list[tuple] | None:
        """The buffers the module names in ``niche_buffer`` (a name or a tuple of names, if it names any), per
        expert, as one tuple of their values."""
        names = getattr(self._skeleton[0], "niche_buffer", None)
        if not names:
            return None
        buffers = self._tensors()[1]
        names = (names,) if isinstance(names, str) else tuple(names)
        return [tuple(x for n in names for x in buffers[n][j].flatten().tolist()) for j in range(self.num)]

    def to_experts(self) -> list[nn.Module]:
        device = next(self.parameters()).device
        out = []
        for j, gid in enumerate(self.ids):
            e = self._make(gid).to(device)
            e.load_state_dict(self.expert_state(j))
            out.append(e)
        return out
