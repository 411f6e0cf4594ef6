"""Read a wandb run file (``run-<id>.wandb``) back, for tests. wandb 0.31 ships no Python reader.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1 little-endian, version 0),
then 32 KiB blocks. Each block holds chunks with a 7-byte header (checksum uint32 LE, length
uint16 LE, type uint8) and ``length`` bytes of data; a block tail shorter than a header is zero
padding. A record that does not fit the rest of a block is split into FIRST, MIDDLE..., LAST
chunks; one that fits is a single FULL chunk. Each record is a serialized
``wandb.proto.wandb_internal_pb2.Record``.

Checksum: wandb writes the IEEE CRC-32 (zlib.crc32) of the type byte followed by the data, not
LevelDB's masked CRC-32C (checked here as well, so either writer is accepted; anything else is
reported as corruption).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

HEADER = struct.Struct("<4sHB")
HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION = b":W&B", 0xBEE1, 0
CHUNK = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    pass


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), pure Python; only used when the IEEE check fails."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _leveldb_mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _checksum_ok(stored: int, ctype: int, data: bytes) -> bool:
    payload = bytes([ctype]) + data
    if zlib.crc32(payload) & 0xFFFFFFFF == stored:
        return True
    return _leveldb_mask(crc32c(payload)) == stored


def read_chunks(raw: bytes, verify: bool = True):
    """Yield the raw bytes of each complete record in a wandb log file's contents."""
    if len(raw) < HEADER.size:
        raise WandbFileError("file shorter than its header")
    ident, magic, version = HEADER.unpack_from(raw, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise WandbFileError(f"not a wandb run file (header {ident!r}, {magic:#x}, {version})")
    pos, pending = HEADER.size, None
    while pos < len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # zero padding at the end of a block
            pos += left_in_block
            continue
        if pos + CHUNK.size > len(raw):
            break  # a writer stopped mid-header: the records before are still good
        crc, length, ctype = CHUNK.unpack_from(raw, pos)
        if crc == 0 and length == 0 and ctype == 0:  # preallocated / zero tail
            pos += left_in_block
            continue
        start = pos + CHUNK.size
        if length > left_in_block - CHUNK.size:
            raise WandbFileError(f"chunk at {pos} of {length} bytes crosses its block")
        if start + length > len(raw):
            break  # truncated final chunk
        data = raw[start:start + length]
        if verify and not _checksum_ok(crc, ctype, data):
            raise WandbFileError(f"checksum mismatch in chunk at offset {pos}")
        pos = start + length
        if ctype == FULL:
            if pending is not None:
                raise WandbFileError(f"FULL chunk at {pos} inside a split record")
            yield data
        elif ctype == FIRST:
            if pending is not None:
                raise WandbFileError(f"FIRST chunk at {pos} inside a split record")
            pending = [data]
        elif ctype == MIDDLE:
            if pending is None:
                raise WandbFileError(f"MIDDLE chunk at {pos} without FIRST")
            pending.append(data)
        elif ctype == LAST:
            if pending is None:
                raise WandbFileError(f"LAST chunk at {pos} without FIRST")
            pending.append(data)
            yield b"".join(pending)
            pending = None
        else:
            raise WandbFileError(f"unknown chunk type {ctype} at {pos}")


def read_records(path: str | Path, verify: bool = True) -> list:
    """All records of a ``.wandb`` file as ``wandb_internal_pb2.Record`` messages, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for data in read_chunks(Path(path).read_bytes(), verify=verify):
        rec = pb.Record()
        rec.ParseFromString(data)
        out.append(rec)
    return out


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _set_item(d: dict, item) -> None:
    """Store an item; a ``nested_key`` (how wandb-core writes the fields of media, tables and other
    dict values) becomes nested dicts: ``["figures/samples", "_type"]`` -> d["figures/samples"]["_type"]."""
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = json.loads(item.value_json)


class RunFile:
    """The parts of a run file tests look at: the run record, config, history rows, summary."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.records = read_records(path, verify=verify)
        self.run = None
        self.config: dict = {}
        self.history: list[dict] = []
        self.summary: dict = {}
        self.metrics: list = []
        self.kinds: dict[str, int] = {}
        for r in self.records:
            kind = r.WhichOneof("record_type")
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if kind == "run":
                self.run = r.run
                self._update_config(r.run.config.update)
            elif kind == "config":
                self._update_config(r.config.update)
            elif kind == "history":
                row: dict = {}
                for i in r.history.item:
                    _set_item(row, i)
                self.history.append(row)
            elif kind == "summary":
                for i in r.summary.update:
                    _set_item(self.summary, i)
                for i in r.summary.remove:
                    keys, d = list(i.nested_key) or [i.key], self.summary
                    for k in keys[:-1]:
                        d = d.get(k, {})
                    d.pop(keys[-1], None)
            elif kind == "metric":
                self.metrics.append(r.metric)

    def _update_config(self, items) -> None:
        for i in items:
            _set_item(self.config, i)

    def series(self, key: str, x: str = "iteration") -> list[tuple]:
        """(x, value) for every history row that has ``key``."""
        return [(row.get(x), row[key]) for row in self.history if key in row]
