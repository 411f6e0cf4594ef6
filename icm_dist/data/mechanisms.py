"""The registry of named mechanisms (the paper's ten of appendix C), the keyed randomness they draw from,
and the routing of each example to its mechanism. Parameterized built-ins, compositions and users'
functions by import path are resolved in :mod:`icm_dist.data.library`.

Every mechanism is a pure function ``fn(x_BCHW, example_ids_B, seed) -> Tensor``: float images
in [0, 1] in, a new tensor of the same shape, dtype and device out, the input never modified.
The example ids and the seed matter only to mechanisms with randomness (``noise``; a cutout's
position); they are part of every signature so that callers can route any batch through any
mechanism without special cases.

The noise is a function of (seed, example id, image shape) alone, so an example gets the same
noisy image whichever rank, batch or position in a batch it is processed in. That is what makes
the transformed half of the data set a fixed data set (the paper's "fixed per example") rather
than fresh noise every epoch, and it is what lets ranks transform their own shards without
communicating.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from icm_dist.errors import ConfigError

Mechanism = Callable[[Tensor, Tensor, int], Tensor]

MECHANISMS: dict[str, Mechanism] = {}

PAPER_MECHANISMS = (
    "up", "down", "left", "right", "up_left", "up_right", "down_left", "down_right",
    "invert", "noise",
)

SHIFT_PIXELS = 4
NOISE_STD = 0.5  # variance 0.25, appendix C


def register(name: str) -> Callable[[Mechanism], Mechanism]:
    """Add a mechanism to :data:`MECHANISMS` under ``name``; a name can be taken only once."""

    def decorate(fn: Mechanism) -> Mechanism:
        if name in MECHANISMS:
            raise ValueError(f"mechanism {name!r} is already registered")
        MECHANISMS[name] = fn
        return fn

    return decorate


def get_mechanism(name: str) -> Mechanism:
    """The mechanism called ``name``; an unknown name is a config error listing the known ones."""
    try:
        return MECHANISMS[name]
    except KeyError:
        known = ", ".join(MECHANISMS)
        raise ConfigError(f"unknown mechanism {name!r}; known mechanisms: {known}") from None


# ----------------------------------------------------------------------------- translations


def shift(x_BCHW: Tensor, dy: int, dx: int) -> Tensor:
    """Move the content ``dy`` pixels down and ``dx`` pixels right: out[i, j] = in[i - dy, j - dx].

    Pixels that leave the image are lost and the uncovered border is zero: no wrap-around, since
    ``torch.roll`` would carry a digit's stroke to the opposite edge, which is not a translation.
    """
    H, W = x_BCHW.shape[-2], x_BCHW.shape[-1]
    out = torch.zeros_like(x_BCHW)
    if abs(dy) >= H or abs(dx) >= W:
        return out
    dst_rows, src_rows = (slice(dy, H), slice(0, H - dy)) if dy >= 0 else (slice(0, H + dy), slice(-dy, H))
    dst_cols, src_cols = (slice(dx, W), slice(0, W - dx)) if dx >= 0 else (slice(0, W + dx), slice(-dx, W))
    out[..., dst_rows, dst_cols] = x_BCHW[..., src_rows, src_cols]
    return out


def _make_translation(name: str, dy: int, dx: int) -> None:
    def translate(x_BCHW: Tensor, example_ids_B: Tensor, seed: int) -> Tensor:
        return shift(x_BCHW, dy * SHIFT_PIXELS, dx * SHIFT_PIXELS)

    translate.__name__ = translate.__qualname__ = name
    translate.__doc__ = f"Translate the content {SHIFT_PIXELS} pixels {name.replace('_', '-')}, zero fill."
    register(name)(translate)


for _name, (_dy, _dx) in {
    "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1),
    "up_left": (-1, -1), "up_right": (-1, 1), "down_left": (1, -1), "down_right": (1, 1),
}.items():
    _make_translation(_name, _dy, _dx)


@register("invert")
def invert(x_BCHW: Tensor, example_ids_B: Tensor, seed: int) -> Tensor:
    """Contrast inversion, 1 - x."""
    return 1.0 - x_BCHW


# ----------------------------------------------------------------------------- noise

_M32 = 0xFFFFFFFF
_CHUNK_EXAMPLES = 512  # keeps the temporaries (~4 MB for 32x32 images) in cache


def _hash32_(x: Tensor) -> Tensor:
    """Chris Wellons' "lowbias32" integer finalizer, in place on an int64 tensor of values in
    [0, 2**32): a bijection on 32-bit values with near-ideal avalanche (flipping one input bit
    flips each output bit with probability ~1/2). Callers pass a fresh temporary.

    Multiplication stays inside int64: signed overflow is undefined in C++ even where it wraps in
    practice, so the second constant c >= 2**31 is applied as x*(c - 2**31) + (x & 1) * 2**31,
    which equals x*c mod 2**32 with both terms far below 2**63.
    """
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x ^= x >> 15
    odd_31 = (x & 1) << 31
    x.mul_(0x846CA68B - 2**31).add_(odd_31).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def _hash32_int(x: int) -> int:
    """:func:`_hash32_` on a Python int, for the seed-derived keys."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def gaussian_noise(shape_per_example: Sequence[int], example_ids: Tensor, seed: int) -> Tensor:
    """Standard normal noise, float32 ``[B, *shape_per_example]`` on ``example_ids``' device,
    that depends only on (seed, example id, shape): a counter-based generator.

    Construction, with ``H`` the lowbias32 hash (a 32-bit bijection) and all arithmetic mod 2**32:

    * seed keys: the 64-bit seed's halves (s_lo, s_hi) give s0 = H(s_lo ^ C0),
      s1 = H(s_hi ^ s0), s2 = H(s1 ^ C1), s3 = H(s2 ^ C2).
    * example key: k(id) = H(H(H(id_lo ^ s0) ^ id_hi) ^ s1). For a fixed seed and ids below 2**32
      this is a bijection of the id, so two examples never share a key.
    * counter key: b(c) = H(H(c ^ s2) ^ s3) for the counter c = 0 .. 2K-1, with K = ceil(P / 2)
      and P the number of values per example.
    * bits: h(id, c) = H(k(id) ^ b(c)); a uniform in (0, 1) is ((h >> 8) + 0.5) / 2**24, which
      float32 holds exactly.
    * Box-Muller on u1 = uniform(c), u2 = uniform(K + c) for c < K: r = sqrt(-2 ln u1),
      z = [r cos(2 pi u2), r sin(2 pi u2)], the first P values reshaped to the example's shape.

    The per-value work is one hash of two precomputed keys, done in int64 torch ops masked to
    32 bits, so it runs identically on CPU and CUDA and vectorises over the whole batch (in
    chunks of examples, which changes nothing in the values). The smallest uniform, 2**-25,
    caps |z| at about 5.9: immaterial for noise that is clamped to [0, 1] anyway.
    """
    if example_ids.dim() != 1:
        raise ValueError(f"example_ids must be 1-D, got shape {tuple(example_ids.shape)}")
    device = example_ids.device
    shape = tuple(int(s) for s in shape_per_example)
    P = math.prod(shape)
    K = (P + 1) // 2
    seed64 = int(seed) & 0xFFFFFFFFFFFFFFFF
    s0 = _hash32_int((seed64 & _M32) ^ 0x9E3779B9)
    s1 = _hash32_int((seed64 >> 32) ^ s0)
    s2 = _hash32_int(s1 ^ 0x85EBCA6B)
    s3 = _hash32_int(s2 ^ 0xC2B2AE35)

    ids = example_ids.to(torch.int64)
    id_lo, id_hi = ids & _M32, (ids >> 32) & _M32
    k_B = _hash32_(_hash32_(_hash32_(id_lo ^ s0) ^ id_hi) ^ s1)
    c = torch.arange(2 * K, dtype=torch.int64, device=device)
    b_C = _hash32_(_hash32_(c ^ s2) ^ s3)

    out_BP = torch.empty((ids.numel(), 2 * K), dtype=torch.float32, device=device)
    for start in range(0, ids.numel(), _CHUNK_EXAMPLES):
        stop = min(start + _CHUNK_EXAMPLES, ids.numel())
        h = _hash32_(k_B[start:stop, None] ^ b_C[None, :])
        u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)
        r = torch.sqrt(-2.0 * torch.log(u[:, :K]))
        theta = (2.0 * math.pi) * u[:, K:]
        out_BP[start:stop, :K] = r * torch.cos(theta)
        out_BP[start:stop, K:] = r * torch.sin(theta)
    return out_BP[:, :P].reshape((ids.numel(),) + shape)


def uniform_per_example(example_ids: Tensor, seed: int, salt: str, k: int) -> Tensor:
    """``[B, k]`` uniforms in (0, 1), float32, that depend only on (seed, salt, example id): the random
    choices of a mechanism (a cutout's position) fixed per example. ``salt`` keeps one mechanism's stream
    apart from another's; the construction is :func:`gaussian_noise`'s hashing with a salted seed."""
    salted = int.from_bytes(hashlib.sha256(f"{int(seed)}/{salt}".encode()).digest()[:4], "little")
    s0, s1 = _hash32_int(salted ^ 0x68E31DA4), _hash32_int(salted ^ 0xB5297A4D)
    ids = example_ids.to(torch.int64)
    k_B = _hash32_(_hash32_((ids & _M32) ^ s0) ^ ((ids >> 32) & _M32) ^ s1)
    c = _hash32_(torch.arange(k, dtype=torch.int64, device=ids.device) ^ s1)
    h = _hash32_(k_B[:, None] ^ c[None, :])
    # 23 bits: (k + 0.5) / 2**23 is exact in float32 up to the largest, 1 - 2**-24, so never 1.
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)


@register("noise")
def noise(x_BCHW: Tensor, example_ids_B: Tensor, seed: int) -> Tensor:
    """Add N(0, 0.25) noise fixed per (seed, example id), then clamp to [0, 1] (appendix C)."""
    if example_ids_B.shape != x_BCHW.shape[:1]:
        raise ValueError(
            f"need one example id per image: ids {tuple(example_ids_B.shape)}, "
            f"images {tuple(x_BCHW.shape)}"
        )
    z = gaussian_noise(x_BCHW.shape[1:], example_ids_B.to(x_BCHW.device), seed)
    return (x_BCHW + NOISE_STD * z.to(x_BCHW.dtype)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- routing


def apply_mechanisms(
    x_BCHW: Tensor,
    mech_idx_B: Tensor,
    mechanisms: Sequence[str | Mechanism],
    example_ids_B: Tensor,
    seed: int,
) -> Tensor:
    """Transform example i by mechanism ``mechanisms[mech_idx_B[i]]`` (a registered name or a function).

    Examples are grouped by mechanism and each group goes through its mechanism as one batch, so
    the cost is one call per mechanism, not one per example. A mechanism sees only its group,
    which is safe because every mechanism is per example (noise depends on ids, not positions).
    """
    fns = [m if callable(m) else get_mechanism(m) for m in mechanisms]
    B = x_BCHW.shape[0]
    if mech_idx_B.shape != (B,) or example_ids_B.shape != (B,):
        raise ValueError(
            f"need one mechanism index and one example id per image: images {tuple(x_BCHW.shape)}, "
            f"mech_idx {tuple(mech_idx_B.shape)}, example_ids {tuple(example_ids_B.shape)}"
        )
    mech_idx_B = mech_idx_B.to(x_BCHW.device)
    example_ids_B = example_ids_B.to(x_BCHW.device)
    if B and (int(mech_idx_B.min()) < 0 or int(mech_idx_B.max()) >= len(fns)):
        raise ValueError(
            f"mechanism indices must lie in [0, {len(fns)}), got "
            f"[{int(mech_idx_B.min())}, {int(mech_idx_B.max())}]"
        )
    out = torch.empty_like(x_BCHW)
    for k, fn in enumerate(fns):
        rows = (mech_idx_B == k).nonzero().squeeze(1)
        if rows.numel():
            out.index_put_((rows,), fn(x_BCHW[rows], example_ids_B[rows], seed))
    return out
