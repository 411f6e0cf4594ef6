"""Out-of-domain symbols for the paper's generalization tests (section 5, Figures 7 and 8).

The paper uses Omniglot letters rescaled to 46x46. Omniglot is rarely on a machine without internet,
so icm-dist can also draw its own out-of-domain symbols from what it already depends on: the DejaVu
fonts that matplotlib ships (``matplotlib/mpl-data/fonts/ttf``), rendered with PIL.

Rendered symbols (:func:`symbols`) are letters of several scripts (Greek, Cyrillic, Armenian,
Georgian, Hebrew, Arabic, N'Ko, Tifinagh, Canadian syllabics) and symbols (arrows, mathematical
operators, box drawing), never digits, which MNIST has; a few letters that look like digits
(Cyrillic ``З``, Greek and Cyrillic ``O``, Armenian ``Ձ``, ...; the list is not exhaustive) are left
out too, and so are dots and bare bars. Each is drawn like an MNIST digit: white strokes on black,
intensities in [0, 1], scaled to fit a centred square that leaves a margin of ``SHIFT_PIXELS + 2``
pixels on every side (so a 4-pixel translation keeps the whole symbol in the frame), and redrawn
along its skeleton with a round pen, so that every symbol has MNIST's stroke width whatever the
font's weight (the estimate ``2 * area / perimeter`` of the pixels above 0.5 is ~1.95 on MNIST and
~1.9 on these symbols). The choice is deterministic for a seed: scripts take turns (so a dozen
symbols already span all of them), each script's characters in a seeded order, each character in
the first font (in a seeded order) that has it, and a rendering identical to an earlier one (Greek
``A`` and Cyrillic ``A``) is skipped. About 1,200 distinct symbols can be drawn at 46x46.

:func:`load_symbols` picks the source: Omniglot's background set in torchvision's layout when it is
present under ``root`` (``root/omniglot-py/images_background/<alphabet>/<character>/*.png``),
otherwise the rendered symbols.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from icm_dist.data.mechanisms import SHIFT_PIXELS
from icm_dist.errors import DataError

MARGIN = SHIFT_PIXELS + 2
"""Empty pixels on each side of a rendered symbol: a 4-pixel shift never pushes ink out of frame."""

FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")

# Code point ranges per script; only letters and symbols (Unicode categories L* and S*) are used.
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "greek": ((0x0391, 0x03A9), (0x03B1, 0x03C9)),
    "cyrillic": ((0x0410, 0x044F),),
    "armenian": ((0x0531, 0x0556), (0x0561, 0x0586)),
    "georgian": ((0x10D0, 0x10FA),),
    "hebrew": ((0x05D0, 0x05EA),),
    "arabic": ((0x0621, 0x064A),),
    "nko": ((0x07CA, 0x07EA),),
    "tifinagh": ((0x2D30, 0x2D65),),
    "canadian": ((0x1401, 0x166C),),
    "arrows": ((0x2190, 0x21FF),),
    "math": ((0x2200, 0x22FF),),
    "box": ((0x2500, 0x257F),),
}

# Letters that a reader (or an MNIST classifier) would take for a digit.
DIGIT_LOOKALIKES = frozenset("ЗзОоΟοбЧՕօՁՉՅⵢ")

OMNIGLOT_DIR = ("omniglot-py", "images_background")
SOURCES = ("auto", "omniglot", "fonts")

_RENDER_SIZE = 256  # font size of the high-resolution rendering that is then scaled down


class SymbolSet(NamedTuple):
    images: Tensor  # [n, 1, size, size] float32 in [0, 1], white strokes on black
    source: str  # "fonts" or "omniglot"
    labels: list[str]  # what each image is: "cyrillic U+0416 Ж DejaVuSans" or an Omniglot path


# ----------------------------------------------------------------------------- rendered symbols


def font_dir() -> Path:
    """matplotlib's bundled fonts (found without importing matplotlib, which is slow to import)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise DataError("matplotlib is not installed: its DejaVu fonts are what icm-dist renders symbols from")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=None)
def _font(font: str):
    return ImageFont.truetype(str(font_dir() / font), _RENDER_SIZE)


@lru_cache(maxsize=None)
def _notdef(font: str) -> bytes:
    """The bitmap a font draws for a character it lacks (its .notdef glyph)."""
    return bytes(_font(font).getmask(chr(0x10FFFD)))


@lru_cache(maxsize=None)
def candidates(script: str) -> tuple[int, ...]:
    """The code points of ``script`` that are letters or symbols and no digit lookalikes, in order."""
    out = []
    for lo, hi in SCRIPTS[script]:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if ch not in DIGIT_LOOKALIKES and unicodedata.category(ch)[0] in "LS":
                out.append(cp)
    return tuple(out)


def _stroke_estimate(ink: Tensor) -> float:
    """2 * area / perimeter of a boolean mask (perimeter = pixel edges between ink and background)."""
    f = torch.nn.functional.pad(ink.float(), (1, 1, 1, 1))
    perim = float((f[1:, :] != f[:-1, :]).sum() + (f[:, 1:] != f[:, :-1]).sum())
    return 2.0 * float(f.sum()) / perim if perim else 0.0


def _draw(ch: str, font: str):
    """The glyph drawn white on black at high resolution, cropped to its ink; None if the font lacks it."""
    fnt = _font(font)
    if bytes(fnt.getmask(ch)) == _notdef(font):
        return None
    x0, y0, x1, y1 = fnt.getbbox(ch)
    if x1 <= x0 or y1 <= y0:
        return None
    img = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4), 0)
    ImageDraw.Draw(img).text((2 - x0, 2 - y0), ch, font=fnt, fill=255)
    box = img.getbbox()
    return img.crop(box) if box else None


def _skeleton(m):
    """Zhang-Suen thinning of a boolean [H, W] numpy mask to one-pixel-wide lines (vectorized)."""
    m = m.copy()
    H, W = m.shape
    while True:
        changed = False
        for step in (0, 1):
            p = np.pad(m, 1)
            # Neighbours P2..P9, clockwise from north.
            nb = [p[0:H, 1:W + 1], p[0:H, 2:W + 2], p[1:H + 1, 2:W + 2], p[2:H + 2, 2:W + 2],
                  p[2:H + 2, 1:W + 1], p[2:H + 2, 0:W], p[1:H + 1, 0:W], p[0:H, 0:W]]
            count = sum(n.astype(np.int8) for n in nb)
            trans = sum((~nb[i] & nb[(i + 1) % 8]).astype(np.int8) for i in range(8))
            P2, P4, P6, P8 = nb[0], nb[2], nb[4], nb[6]
            if step == 0:
                c = ~(P2 & P4 & P6) & ~(P4 & P6 & P8)
            else:
                c = ~(P2 & P4 & P8) & ~(P2 & P6 & P8)
            remove = m & (count >= 2) & (count <= 6) & (trans == 1) & c
            if remove.any():
                m &= ~remove
                changed = True
        if not changed:
            return m


_SUPER = 4  # supersampling of the pen drawing: strokes are drawn at 4x and box-filtered down
_PEN_RADIUS = 4  # in supersampled pixels: a pen 9/4 = 2.25 output pixels wide


def _draw_with_pen(skel):
    """Every skeleton pixel stamped with a round pen of radius _PEN_RADIUS; the mask grows by r each side."""
    r = _PEN_RADIUS
    H, W = skel.shape
    out = np.zeros((H + 2 * r, W + 2 * r), dtype=bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= r * r + r:
                out[r + dy:r + dy + H, r + dx:r + dx + W] |= skel
    return out


def render(cp: int, font: str, size: int = 46) -> Tensor | None:
    """One symbol, [size, size] in [0, 1]; None for a glyph the font lacks or that is unusable (a dot,
    a bare line, or one too small to fill the frame).

    The glyph is scaled into the centred ``size - 2 * MARGIN`` square at 4x resolution, thinned to its
    skeleton and redrawn with a round pen about as wide as an MNIST stroke, then box-filtered down:
    every symbol gets the same stroke width whatever the font's weight, like a pen-drawn letter.
    """
    glyph = _draw(chr(cp), font)
    if glyph is None or max(glyph.size) < 0.3 * _RENDER_SIZE or min(glyph.size) < 0.2 * max(glyph.size):
        return None  # a dot, or a bare line (Hebrew vav, Arabic alef, box-drawing bars)
    S, r = _SUPER, _PEN_RADIUS
    inner = (size - 2 * MARGIN) * S - 2 * r  # the pen adds r around the skeleton
    w, h = glyph.size
    s = inner / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    mask = np.asarray(glyph.resize((nw, nh), Image.LANCZOS)) > 127
    if not mask.any():
        return None
    skel = _skeleton(mask)
    if skel.sum() < 1.4 * max(nh, nw):
        return None  # one straight stroke: a bar, not a symbol
    ys, xs = np.nonzero(skel)
    skel = skel[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # thinning pulls stroke ends in: re-centre
    nh, nw = skel.shape
    drawn = _draw_with_pen(skel)
    canvas = np.zeros((size * S, size * S), dtype=np.float32)
    y0 = MARGIN * S + (inner - nh) // 2
    x0 = MARGIN * S + (inner - nw) // 2
    canvas[y0:y0 + nh + 2 * r, x0:x0 + nw + 2 * r] = drawn
    x = torch.from_numpy(canvas.reshape(size, S, size, S).mean(axis=(1, 3)))
    if (x > 0.5).sum() < 0.02 * (size - 2 * MARGIN) ** 2:
        return None
    return x


def _seeded_order(k: int, seed: int, salt: str) -> list[int]:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{salt}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(key)
    return torch.randperm(k, generator=g).tolist()


def render_symbols(n: int, size: int = 46, seed: int = 0) -> SymbolSet:
    """:func:`symbols` with a label per image."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 2 * MARGIN + 8:
        raise ValueError(f"size must be at least {2 * MARGIN + 8} (a {MARGIN}-pixel margin each side), got {size}")
    fonts = [f for f in FONTS if (font_dir() / f).is_file()]
    queues = {}
    for name in SCRIPTS:
        cands = candidates(name)
        queues[name] = [cands[i] for i in _seeded_order(len(cands), seed, name)]
    scripts = [s for s in SCRIPTS if queues[s]]
    if n and not fonts:
        raise DataError(f"no DejaVu font found under '{font_dir()}' to render symbols from")
    scripts = [scripts[i] for i in _seeded_order(len(scripts), seed, "scripts")]
    images, labels, seen = [], [], set()
    pos = {s: 0 for s in scripts}
    while len(images) < n:
        progressed = False
        for s in scripts:
            if len(images) >= n:
                break
            q = queues[s]
            while pos[s] < len(q):
                cp = q[pos[s]]
                pos[s] += 1
                # One font per character, the first in a seeded order that has it and draws it well.
                order = [fonts[i] for i in _seeded_order(len(fonts), seed, f"font/{cp}")]
                x = font = None
                for font in order:
                    x = render(cp, font, size)
                    if x is not None:
                        break
                if x is None:
                    continue
                digest = hashlib.sha1(np.rint(x.numpy() * 255).astype(np.uint8).tobytes()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                images.append(x)
                labels.append(f"{s} U+{cp:04X} {chr(cp)} {font.removesuffix('.ttf')}")
                progressed = True
                break
        if not progressed:
            raise DataError(f"only {len(images)} distinct symbols can be rendered at size {size}, asked for {n}")
    out = torch.stack(images).unsqueeze(1) if images else torch.zeros(0, 1, size, size)
    return SymbolSet(out, "fonts", labels)


def symbols(n: int, size: int = 46, seed: int = 0) -> Tensor:
    """``n`` distinct out-of-domain symbols, ``[n, 1, size, size]`` float32 in [0, 1], white on black,
    the same for the same (n, size, seed) and the first ``k`` of them the same for any ``n >= k``."""
    return render_symbols(n, size, seed).images


# ----------------------------------------------------------------------------- Omniglot


def _omniglot_dir(root: str | os.PathLike) -> Path | None:
    """The images_background directory under ``root`` (or ``root`` itself), None when absent."""
    r = Path(root)
    for cand in (r / OMNIGLOT_DIR[0] / OMNIGLOT_DIR[1], r / OMNIGLOT_DIR[1], r):
        if cand.is_dir() and cand.name == OMNIGLOT_DIR[1] and any(cand.glob("*/*/*.png")):
            return cand
    return None


def load_omniglot(root: str | os.PathLike, n: int, size: int = 46, seed: int = 0) -> SymbolSet:
    """``n`` letters of Omniglot's background set (torchvision's files), resized to ``size`` (the whole
    105x105 image, as the paper rescales it) and inverted to white strokes on black, in [0, 1]."""
    where = _omniglot_dir(root)
    if where is None:
        hint = ""
        if (Path(root) / OMNIGLOT_DIR[0] / (OMNIGLOT_DIR[1] + ".zip")).is_file():
            hint = f" (found {OMNIGLOT_DIR[1]}.zip: extract it next to itself)"
        raise DataError(
            f"no Omniglot background set under '{root}'{hint}: expected "
            f"{Path(root) / OMNIGLOT_DIR[0] / OMNIGLOT_DIR[1]}/<alphabet>/<character>/*.png, as "
            f"torchvision.datasets.Omniglot(root, background=True, download=True) writes it on a machine with "
            f"internet; or use source='fonts' (symbols rendered from matplotlib's DejaVu fonts)")
    files = sorted(where.glob("*/*/*.png"))
    if n > len(files):
        raise DataError(f"asked for {n} Omniglot letters but '{where}' holds {len(files)}")
    pick = [files[i] for i in _seeded_order(len(files), seed, "omniglot")[:n]]
    images = []
    for p in pick:
        try:
            with Image.open(p) as im:
                g = im.convert("L").resize((size, size), Image.BOX)
        except OSError as e:
            raise DataError(f"cannot read Omniglot image '{p}' ({e})") from None
        t = torch.frombuffer(bytearray(g.tobytes()), dtype=torch.uint8).reshape(size, size)
        images.append(1.0 - t.float() / 255.0)
    out = torch.stack(images).unsqueeze(1) if images else torch.zeros(0, 1, size, size)
    return SymbolSet(out, "omniglot", [str(p.relative_to(where)) for p in pick])


def load_symbols(root: str | os.PathLike | None = None, n: int = 200, source: str = "auto", size: int = 46,
                 seed: int = 0) -> SymbolSet:
    """Out-of-domain symbols: ``source="omniglot"`` needs Omniglot under ``root`` (a DataError saying
    where and how to get it otherwise), ``"fonts"`` renders them, ``"auto"`` takes Omniglot when it is
    there and falls back to rendering."""
    if source not in SOURCES:
        raise DataError(f"unknown symbol source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "omniglot" or (source == "auto" and root is not None and _omniglot_dir(root) is not None):
        if root is None:
            raise DataError("Omniglot symbols (source='omniglot') need a root: the directory that holds "
                            "omniglot-py/images_background in torchvision's layout (icm-dist generalize "
                            "--symbols-root DIR); or use source='fonts'")
        return load_omniglot(root, n, size, seed)
    return render_symbols(n, size, seed)
