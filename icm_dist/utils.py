"""Small helpers shared by several modules (file digests, atomic writes, nested-dict flattening)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import OutputError


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a<sep>b": 1}``; lists stay values."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out


def strip_prefix(d: dict, prefix: str) -> dict:
    """The entries of ``d`` whose keys start with ``prefix``, the prefix removed."""
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, fsync, os.replace: readers (other ranks, other
    runs) see the old file or the complete new one, never a half-written one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable_folder(folder: Path, name: str) -> None:
    """``folder``, or the nearest folder above it that exists, can be written in (``name``: what the user called
    the path, for the one-line OutputError); nothing is created."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{name} cannot be created: '{probe}' is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OutputError(f"{name} cannot be written ('{probe}': {e.strerror})") from None
