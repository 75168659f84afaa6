"""Read the `tokenizer.*` metadata of a GGUF file into plain Python values, fast.

Owns: turning GGUF key/values into a dict (str -> int | float | bool | bytes | np.ndarray | list[bytes]),
either from an existing `gguf.GGUFReader` (its fields' `parts` arrays) or straight from the file
(`read_metadata`), which parses only the key/value section. Building a GGUFReader on the Llama 3 vocab
takes tens of seconds on this machine (it makes one memmap per array element); this parser takes well
under a second. Must not interpret the values: that is core/tokenizer/vocab.py's job.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import TokenizerError

GGUF_MAGIC = b"GGUF"

# GGUF value types (gguf.GGUFValueType numbering) -> numpy dtype for fixed-size scalars.
_NUMPY_TYPES: dict[int, np.dtype] = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
    4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),
    10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8"),
}
_T_BOOL, _T_STRING, _T_ARRAY = 7, 8, 9


class _Cursor:
    """A read position over the file bytes; every read is bounds-checked (truncated file -> error)."""

    def __init__(self, buf: Any, source: str) -> None:
        # `buf` is the mmap (or bytes): slicing gives bytes, and no buffer export outlives a call,
        # so the mmap can always be closed, even while an exception's traceback is alive.
        self.buf, self.pos, self.source = buf, 0, source

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise TokenizerError(f"{self.source}: GGUF metadata truncated at byte {self.pos}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> bytes:
        return self.take(self.u64())


def _read_value(cur: _Cursor, vtype: int) -> Any:
    if vtype == _T_STRING:
        return cur.string()
    if vtype == _T_ARRAY:
        etype, count = cur.u32(), cur.u64()
        if etype == _T_STRING:
            return _read_string_array(cur, count)
        if etype in _NUMPY_TYPES:
            dt = _NUMPY_TYPES[etype]
            arr = np.frombuffer(cur.take(count * dt.itemsize), dtype=dt).copy()
            return arr.astype(bool) if etype == _T_BOOL else arr
        return [_read_value(cur, etype) for _ in range(count)]
    if vtype in _NUMPY_TYPES:
        dt = _NUMPY_TYPES[vtype]
        value = np.frombuffer(cur.take(dt.itemsize), dtype=dt)[0].item()
        return bool(value) if vtype == _T_BOOL else value
    raise TokenizerError(f"{cur.source}: unknown GGUF value type {vtype} at byte {cur.pos}")


def _read_string_array(cur: _Cursor, count: int) -> list[bytes]:
    # Layout: count x (u64 length, bytes). A plain loop: ~0.3 us per string.
    buf, pos, n_buf = cur.buf, cur.pos, len(cur.buf)
    out: list[bytes] = []
    append = out.append
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        if pos + 8 > n_buf:
            raise TokenizerError(f"{cur.source}: GGUF string array truncated at byte {pos}")
        (n,) = unpack(buf, pos)
        pos += 8
        if pos + n > n_buf:
            raise TokenizerError(f"{cur.source}: GGUF string array truncated at byte {pos}")
        append(buf[pos:pos + n])
        pos += n
    cur.pos = pos
    return out


def read_metadata(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """All metadata keys starting with `prefix` (plus `general.*`) of a GGUF file, without tensor info.

    Raises:
        TokenizerError: missing file, not a GGUF, unsupported version, truncated metadata.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, str(path), prefix)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    except (ValueError, OSError) as exc:  # mmap of an empty file, unreadable file
        raise TokenizerError(f"{path}: cannot read as GGUF ({exc})") from None


def _parse(buf: Any, source: str, prefix: str) -> dict[str, Any]:
    cur = _Cursor(buf, source)
    if cur.take(4) != GGUF_MAGIC:
        raise TokenizerError(f"{source}: not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in (2, 3):
        raise TokenizerError(f"{source}: unsupported GGUF version {version}")
    cur.u64()  # tensor count: not needed here
    n_kv = cur.u64()
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string().decode("utf-8", "replace")
        value = _read_value(cur, cur.u32())
        if key.startswith(prefix) or key.startswith("general."):
            meta[key] = value
    return meta


def metadata_from_reader(reader: Any, prefix: str = "") -> dict[str, Any]:
    """The same dict as `read_metadata`, taken from a `gguf.GGUFReader`'s fields (no re-parsing)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(prefix) or key.startswith("general."):
            meta[key] = _field_value(field, reader)
    return meta


def _field_value(field: Any, reader: Any) -> Any:
    types = [int(t) for t in field.types]
    parts, idx = field.parts, field.data
    if types[0] == _T_STRING:
        return parts[idx[0]].tobytes()
    if types[0] != _T_ARRAY:
        value = parts[idx[0]][0].item()
        return bool(value) if types[0] == _T_BOOL else value
    etype = types[1] if len(types) > 1 else None
    if etype == _T_STRING:
        return [parts[i].tobytes() for i in idx]
    if etype in _NUMPY_TYPES:
        return _numeric_array(parts, idx, _NUMPY_TYPES[etype], reader).astype(
            bool if etype == _T_BOOL else _NUMPY_TYPES[etype])
    return [parts[i].tolist() for i in idx]  # nested arrays: rare, not used by tokenizers


def _numeric_array(parts: list, idx: list[int], dt: np.dtype, reader: Any) -> np.ndarray:
    # GGUFReader keeps one 1-element memmap per array element; the elements are contiguous in the file,
    # so one view from the first element's address replaces 128k tiny arrays.
    if not idx:
        return np.zeros(0, dtype=dt)
    if len(idx) == 1:  # one element, or a reader that keeps the whole array in one part
        return np.array(parts[idx[0]], dtype=dt).reshape(-1)
    first = parts[idx[0]]
    base = reader.data
    offset = first.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    arr = np.frombuffer(base, dtype=dt, count=len(idx), offset=offset).copy()
    if arr[-1] != parts[idx[-1]][0]:  # layout assumption broken: fall back to the slow path
        arr = np.array([parts[i][0] for i in idx], dtype=dt)
    return arr
