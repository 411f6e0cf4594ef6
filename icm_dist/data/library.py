"""What an entry of ``data.mechanisms`` means: a registered name, a parameterized built-in, a composition,
or a user's function by import path; and the checks every mechanism passes: on a probe batch before anything
is transformed (twice: a mechanism must be deterministic given the example ids and the seed), then on every
example as the transformed split is built.

An entry is one of

* a registered name (``"up"``, ``"noise"``, ...: :data:`mechanisms.MECHANISMS`, the paper's ten);
* a mapping ``{name: <built-in>, <parameters>..., label: <optional>}`` naming one of :data:`BUILTINS`,
  e.g. ``{name: rotate, degrees: 30}``; ``{name: compose, of: [<entries>]}`` applies several in order;
* ``"my_package.module:function"``, a function with the registry's signature ``fn(x, example_ids, seed)``;
  as a mapping ``{name: "my_package.module:function", <keyword arguments>...}`` it is called with them.

Each resolves to a :class:`Resolved` (a label for logs and figures, and the function). The built-ins are
computed by ``torchvision.transforms.v2.functional`` where it has the operation, on whole batches
``[B, C, H, W]``; what each does at the border and how it interpolates is in its docstring, and
tests/test_library.py pins it down on hand-computed cases. Randomness (noise, cutout positions) is a
function of (seed, example id) alone, so a transformed example is fixed, whichever rank or batch
computes it.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from icm_dist.data.mechanisms import MECHANISMS, Mechanism, gaussian_noise, shift, uniform_per_example
from icm_dist.errors import ConfigError, DataError, on_this_rank


class Resolved(NamedTuple):
    label: str  # the name in logs, metrics keys, figures and summary.json
    fn: Mechanism


# ----------------------------------------------------------------------------- the built-ins

_INTERPOLATION = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR}


def _interp(name: str) -> InterpolationMode:
    if name not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATION)}, got {name!r}")
    return _INTERPOLATION[name]


def _shift(dx: int = 0, dy: int = 0) -> Mechanism:
    """Move the content ``dx`` pixels right and ``dy`` down (negative: left, up); zero fill, no wrap-around."""
    dx, dy = int(dx), int(dy)
    return lambda x, ids, seed: shift(x, dy, dx)


def _rotate(degrees: float, interpolation: str = "bilinear") -> Mechanism:
    """Rotate counter-clockwise by ``degrees`` about the image centre; bilinear (default) or nearest
    interpolation; multiples of 90 degrees are exact. Corners whose source lies more than a pixel outside the
    image are zero; nearer ones keep a bilinear share of the edge (torchvision blends a mask of the frame)."""
    mode, angle = _interp(interpolation), float(degrees)
    return lambda x, ids, seed: TF.rotate(x, angle, interpolation=mode, fill=0.0)


def _scale(factor: float, interpolation: str = "bilinear") -> Mechanism:
    """Scale the content by ``factor`` about the image centre (below 1 shrinks, the border filled with
    zeros; above 1 enlarges, the content beyond the frame lost); bilinear (default) or nearest."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    mode, f = _interp(interpolation), float(factor)
    return lambda x, ids, seed: TF.affine(x, angle=0.0, translate=[0, 0], scale=f, shear=[0.0, 0.0],
                                          interpolation=mode, fill=0.0)


def _blur(sigma: float, kernel_size: int | None = None) -> Mechanism:
    """Gaussian blur of standard deviation ``sigma`` pixels, a ``kernel_size`` square kernel (default the
    odd size covering 3 sigma on each side); torchvision's border: the image reflected."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    k = int(kernel_size) if kernel_size is not None else 2 * math.ceil(3 * float(sigma)) + 1
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {k}")
    s = float(sigma)
    # The float kernel sums to 1 up to rounding: clamp, or a saturated patch comes out a hair above 1.
    return lambda x, ids, seed: TF.gaussian_blur(x, [k, k], [s, s]).clamp(0.0, 1.0)


def _noise(std: float = 0.5) -> Mechanism:
    """Add Gaussian noise of standard deviation ``std``, fixed per (seed, example id), clamped to [0, 1]
    (``std: 0.5`` is the paper's ``noise``, bit for bit)."""
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    s = float(std)

    def fn(x, ids, seed):
        z = gaussian_noise(x.shape[1:], ids.to(x.device), seed)
        return (x + s * z.to(x.dtype)).clamp(0.0, 1.0)
    return fn


def _contrast(gamma: float) -> Mechanism:
    """Gamma curve ``x ** gamma`` (above 1 darkens the mid-tones, below 1 brightens them; 0 and 1 stay)."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    g = float(gamma)
    return lambda x, ids, seed: TF.adjust_gamma(x, g)


def _cutout(size: int) -> Mechanism:
    """Zero a ``size`` x ``size`` square at a position drawn per (seed, example id), uniformly among the
    positions where it lies wholly inside the image."""
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")

    def fn(x, ids, seed):
        B, _, H, W = x.shape
        if size > H or size > W:
            raise ValueError(f"cutout of size {size} does not fit {H}x{W} images")
        u = uniform_per_example(ids.to(x.device), seed, "cutout", 2)
        top = (u[:, 0] * (H - size + 1)).long().clamp(max=H - size)
        left = (u[:, 1] * (W - size + 1)).long().clamp(max=W - size)
        r = torch.arange(H, device=x.device)
        c = torch.arange(W, device=x.device)
        inside_r = (r[None] >= top[:, None]) & (r[None] < top[:, None] + size)  # [B, H]
        inside_c = (c[None] >= left[:, None]) & (c[None] < left[:, None] + size)  # [B, W]
        hole = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]  # [B, 1, H, W]
        return x.masked_fill(hole, 0.0)
    return fn


def _flip(axis: str) -> Mechanism:
    """Mirror the image: ``axis: h`` left to right, ``axis: v`` top to bottom."""
    if axis not in ("h", "v"):
        raise ValueError(f"axis must be h or v, got {axis!r}")
    op = TF.horizontal_flip if axis == "h" else TF.vertical_flip
    return lambda x, ids, seed: op(x)


def _permute_channels(order: Sequence[int]) -> Mechanism:
    """Reorder the colour channels: output channel i is input channel ``order[i]`` (colour images)."""
    order = [int(i) for i in order]
    if sorted(order) != list(range(len(order))):
        raise ValueError(f"order must be a permutation of 0..{len(order) - 1}, got {order}")

    def fn(x, ids, seed):
        if x.shape[1] != len(order):
            raise ValueError(f"order {order} permutes {len(order)} channels but the images have {x.shape[1]}")
        return TF.permute_channels(x, order)
    return fn


def _hue(shift: float) -> Mechanism:
    """Rotate every pixel's hue by ``shift`` turns (in [-0.5, 0.5]), saturation and value kept (RGB)."""
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"shift must be in [-0.5, 0.5], got {shift}")
    s = float(shift)

    def fn(x, ids, seed):
        if x.shape[1] != 3:
            raise ValueError(f"hue needs RGB images (3 channels), got {x.shape[1]}")
        return TF.adjust_hue(x, s)
    return fn


BUILTINS: dict[str, Callable[..., Mechanism]] = {
    "shift": _shift, "rotate": _rotate, "scale": _scale, "blur": _blur, "noise": _noise, "contrast": _contrast,
    "cutout": _cutout, "flip": _flip, "permute_channels": _permute_channels, "hue": _hue,
}
"""Parameterized built-ins by name: each takes its parameters and returns a mechanism."""


# ----------------------------------------------------------------------------- resolution


def _default_label(name: str, params: dict) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"


def _import(path: str) -> Callable:
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError, TypeError) as e:  # ":fn" and ".rel:fn" raise the latter
        raise on_this_rank(ConfigError(f"mechanism '{path}': cannot import it ({type(e).__name__}: {e})")) from None
    if not callable(fn):
        raise ConfigError(f"mechanism '{path}' is not callable")
    return fn


def _compose(parts: list[Resolved]) -> Mechanism:
    def fn(x, ids, seed):
        for p in parts:
            x = p.fn(x, ids, seed)
        return x
    return fn


def _not_imported(path: str) -> Mechanism:
    def fn(x, ids, seed):
        raise RuntimeError(f"mechanism '{path}' was resolved without importing it")
    return fn


def resolve_mechanism(entry: Any, import_functions: bool = True) -> Resolved:
    """The label and function of one ``data.mechanisms`` entry; a ConfigError naming the entry otherwise.
    ``import_functions=False`` checks an import path's form and leaves the import (and its function) for later."""
    load = _import if import_functions else _not_imported
    if isinstance(entry, str):
        if ":" in entry:
            module, _, attr = entry.partition(":")
            if not module or not attr:
                raise ConfigError(f"mechanism '{entry}': expected 'package.module:function'")
            return Resolved(entry, load(entry))
        if entry in MECHANISMS:
            return Resolved(entry, MECHANISMS[entry])
        hint = f"; {entry} takes parameters: {{name: {entry}, ...}}" if entry in BUILTINS else ""
        raise ConfigError(f"unknown mechanism {entry!r}{hint} (registered: {', '.join(MECHANISMS)}; "
                          f"parameterized: {', '.join(BUILTINS)}, compose; or 'package.module:function')")
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"mechanism {entry!r}: expected a name, 'package.module:function' or a mapping with "
                          "a 'name'")
    params = {k: v for k, v in entry.items() if k not in ("name", "label")}
    name, label = entry["name"], entry.get("label")
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"mechanism {entry!r}: label must be a string")
    if name == "compose":
        of = params.pop("of", None)
        if params or not isinstance(of, list) or not of:
            raise ConfigError(f"mechanism {entry!r}: compose takes one parameter, 'of', a non-empty list")
        parts = [resolve_mechanism(p, import_functions) for p in of]
        return Resolved(label or "+".join(p.label for p in parts), _compose(parts))
    if ":" in name:
        fn = load(name)
        return Resolved(label or _default_label(name, params), lambda x, ids, seed: fn(x, ids, seed, **params))
    if name in BUILTINS:
        try:
            fn = BUILTINS[name](**params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"mechanism {entry!r}: {e}") from None
        return Resolved(label or _default_label(name, params), fn)
    if name in MECHANISMS and not params:
        return Resolved(label or name, MECHANISMS[name])
    raise ConfigError(f"mechanism {entry!r}: unknown name {name!r} (parameterized: {', '.join(BUILTINS)}, "
                      f"compose; registered, without parameters: {', '.join(MECHANISMS)})")


def resolve_mechanisms(entries: Sequence[Any], import_functions: bool = True) -> list[Resolved]:
    """Every entry resolved; two entries with one label are a ConfigError (labels key metrics and figures)."""
    out = [resolve_mechanism(e, import_functions) for e in entries]
    labels = [r.label for r in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"data.mechanisms: label {dup[0]!r} is used twice; give one entry a 'label'")
    return out


# An image holds nothing when its pixels span less than one grey level.
BLANK_RANGE = 1 / 255


def _blank_B(x_BCHW: Tensor) -> Tensor:
    flat = x_BCHW.flatten(1)
    return (flat.amax(1) - flat.amin(1)) < BLANK_RANGE


def _call_checked(m: Resolved, x_BCHW: Tensor, ids_B: Tensor, seed: int, where: str) -> Tensor:
    """``m.fn`` on a batch, its output checked example by example: the first problem stops with one line
    naming the mechanism (``where``) and the example (its global id)."""
    had_B = ~_blank_B(x_BCHW) if x_BCHW.numel() else None
    try:
        y = m.fn(x_BCHW.clone(), ids_B, seed)
    except Exception as e:  # a user's function may raise anything: report it as the mechanism's fault
        raise DataError(f"{where} raised {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(y, Tensor):
        raise DataError(f"{where} returned {type(y).__name__}, not a tensor")
    if y.shape != x_BCHW.shape or y.dtype != x_BCHW.dtype:
        raise DataError(f"{where} returned {tuple(y.shape)} {y.dtype}, expected {tuple(x_BCHW.shape)} {x_BCHW.dtype}")
    if not y.numel():
        return y
    flat = y.flatten(1)
    bad_B = ~torch.isfinite(flat).all(1)
    if bool(bad_B.any()):
        raise DataError(f"{where} returned NaN or infinite values (first on example {_first(ids_B, bad_B)})")
    lo_B, hi_B = flat.amin(1), flat.amax(1)
    bad_B = (lo_B < 0) | (hi_B > 1)
    if bool(bad_B.any()):
        k = int(bad_B.nonzero()[0])
        raise DataError(f"{where} returned values in [{float(lo_B[k]):.3g}, {float(hi_B[k]):.3g}] on example "
                        f"{int(ids_B[k])}, outside [0, 1] (clamp them)")
    # A mechanism that leaves nothing of most images (a shift by more than the image, a cutout as large as
    # it) gives the committee nothing to invert, yet every expert "captures" it: refuse it here.
    blanked_B = _blank_B(y) & had_B
    had = int(had_B.sum())
    if had and int(blanked_B.sum()) * 2 > had:
        raise DataError(f"{where} leaves nothing of {int(blanked_B.sum())} of {had} images (a constant image, "
                        f"first example {_first(ids_B, blanked_B)}): its parameters move or cut the whole image away")
    return y


def _first(ids_B: Tensor, mask_B: Tensor) -> int:
    return int(ids_B[mask_B.nonzero()[0]])


def checked(m: Resolved, part: str) -> Mechanism:
    """``m`` with every output checked as the probe's is: the transformed split is built through it once, so
    each of its examples is checked once, and the first bad one is named with the mechanism."""

    def fn(x_BCHW: Tensor, ids_B: Tensor, seed: int) -> Tensor:
        return _call_checked(m, x_BCHW, ids_B, seed, f"mechanism '{m.label}' on the {part} split")

    return fn


def check_mechanisms(mechanisms: Sequence[Resolved], probe_BCHW: Tensor, ids_B: Tensor, seed: int) -> None:
    """Run each mechanism on a probe batch, twice; the first that fails (raises, returns something that is not
    a finite float tensor of the probe's shape and dtype in [0, 1], blanks the images, or returns other
    images the second time) stops with one line naming it."""
    for m in mechanisms:
        where = f"mechanism '{m.label}' on a probe batch {tuple(probe_BCHW.shape)}"
        first = _call_checked(m, probe_BCHW, ids_B, seed, where)
        if not torch.equal(first, _call_checked(m, probe_BCHW, ids_B, seed, where)):
            raise DataError(f"{where} is not deterministic: two calls on the same examples and seed returned "
                            "different images; draw its randomness from the example ids and the seed (as "
                            "icm_dist.data.mechanisms.uniform_per_example does), so that every rank and every "
                            "resume sees the same transformed data")
