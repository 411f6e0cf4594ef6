"""Where a command writes what the user names with ``--out``: never over a file icm-dist did not write.

A command first *claims* its output: a path that is a folder where a file is due (or a file where a
folder is due), or a place this process cannot write, stops it with one line before any work; an
existing file is replaced only if icm-dist wrote it (it carries icm-dist's mark: the ``format`` of a
safetensors file's metadata, the ``Software`` text of a PNG, or the shape of the command's own JSON)
or the user passed ``--force``. Then it writes through a temporary file beside the target, renamed into
place, so that a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open

from ..errors import OutputError
from ..utils import check_writable_folder

MARK = "icm-dist"
PNG_METADATA = {"Software": MARK}  # for matplotlib's savefig(metadata=...)


def safetensors_is_ours(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return str((f.metadata() or {}).get("format", "")).startswith(MARK)
    except Exception:  # not a safetensors file at all, whatever safetensors raises for it
        return False


def image_is_ours(path: Path) -> bool:
    """A PNG whose ``Software`` text, or a JPEG whose comment, is icm-dist's mark."""
    try:
        with Image.open(path) as im:
            mark = im.info.get("Software") if im.format == "PNG" else im.info.get("comment")
    except Exception:  # not an image PIL can read, whatever PIL raises for it
        return False
    return (mark.decode(errors="replace") if isinstance(mark, bytes) else str(mark)) == MARK


def save_marked_image(im: Image.Image, path: Path, suffix: str) -> None:
    """``im`` as the format ``suffix`` names (``path`` may end otherwise: a temporary file), with the mark."""
    fmt = Image.registered_extensions()[suffix.lower()]
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("Software", MARK)
        im.save(path, format=fmt, pnginfo=info)
    else:
        im.save(path, format=fmt, comment=MARK.encode())


def json_is(predicate: Callable[[object], bool]) -> Callable[[Path], bool]:
    """A test for JSON files whose content ``predicate`` recognises as a command's own output."""
    def ours(path: Path) -> bool:
        try:
            return bool(predicate(json.loads(Path(path).read_text())))
        except (OSError, ValueError):
            return False
    return ours


def _refuse(path: Path, flag: str, what: str) -> OutputError:
    return OutputError(f"{flag} '{path}' {what}, which icm-dist did not write: refusing to replace it (pass "
                       "--force to replace it, or choose another path)")


def claim_file(path: str | Path, ours: Callable[[Path], bool], force: bool = False, flag: str = "--out") -> Path:
    """``path`` may receive a file: one line if it is a folder, cannot be written, or is a file that ``ours``
    does not recognise (unless ``force``)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} '{path}' is a folder; this command writes a file: name the file")
    check_writable_folder(path.parent, f"{flag} '{path}'")
    if path.exists() and not force and not ours(path):
        raise _refuse(path, flag, "exists")
    return path


def claim_folder(path: str | Path, names: list[str], ours: Callable[[Path], bool], force: bool = False,
                 flag: str = "--out") -> Path:
    """Folder ``path`` may receive files ``names``: one line if it is a file, cannot be written, or holds one of
    those names that ``ours`` does not recognise (unless ``force``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} '{path}' is a file; this command writes a folder of images: name a folder")
    check_writable_folder(path, f"{flag} '{path}'")
    if not force:
        foreign = [n for n in names if (path / n).exists() and not ours(path / n)]
        if foreign:
            raise _refuse(path, flag, f"holds {len(foreign)} file(s) of the same names (first: {foreign[0]})")
    return path


def write_file(path: Path, write: Callable[[Path], None], flag: str = "--out") -> Path:
    """``write(tmp)`` to a temporary path beside ``path``, then renamed into place; an OSError (a full disk, a
    folder made read-only meanwhile) becomes one line, and the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{flag} '{path}' could not be written ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: Path, text: str, flag: str = "--out") -> Path:
    """:func:`write_file` for text."""
    return write_file(path, lambda tmp: tmp.write_text(text), flag)
