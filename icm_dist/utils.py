"""Small helpers shared by several modules (file digests, nested-dict flattening)."""

from __future__ import annotations

import hashlib
import os


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
