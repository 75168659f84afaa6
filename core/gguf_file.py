"""Read a GGUF file's header: magic and version, metadata key/values, the tensor-info table, the data offset.

Owns the GGUF layout (little-endian, versions 2 and 3), the project's only parser of it. Every read is
bounds-checked: a truncated or corrupt file is one ModelFileError line naming the file, never a traceback.
Tensor data is zero-copy views of one read-only np.memmap; metadata values take the forms in _Cursor.value.
Must not interpret metadata (core/config.py, core/tokenizer/vocab.py do), decide whether the tensors make
a model (core/loader.py does), or read tensor data.
"""
from __future__ import annotations

import math
import mmap
import struct
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np

from .errors import ModelFileError, UnsupportedModelError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

# The GGUF spec's numbers (gguf.constants has them too, but importing gguf costs ~0.1 s, which reading a
# vocabulary should not pay: gguf is imported only when a tensor table is read).
GGUF_MAGIC = 0x46554747                     # b"GGUF" read as little-endian u32
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_COUNT = 1 << 40        # larger tensor/key/array counts can only come from a corrupt header
_MAX_DEPTH = 8              # arrays of arrays nested deeper than this: corrupt (real files never nest)
_MAX_DIMS = 4               # GGML_MAX_DIMS

class VT:
    """GGUF metadata value types (= gguf.GGUFValueType)."""
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALARS = {VT.UINT8: struct.Struct("<B"), VT.INT8: struct.Struct("<b"), VT.UINT16: struct.Struct("<H"),
            VT.INT16: struct.Struct("<h"), VT.UINT32: _U32, VT.INT32: struct.Struct("<i"),
            VT.FLOAT32: struct.Struct("<f"), VT.BOOL: struct.Struct("<?"), VT.UINT64: _U64,
            VT.INT64: struct.Struct("<q"), VT.FLOAT64: struct.Struct("<d")}
_DTYPES = {VT.UINT8: np.dtype("<u1"), VT.INT8: np.dtype("<i1"), VT.UINT16: np.dtype("<u2"),
           VT.INT16: np.dtype("<i2"), VT.UINT32: np.dtype("<u4"), VT.INT32: np.dtype("<i4"),
           VT.FLOAT32: np.dtype("<f4"), VT.BOOL: np.dtype("<u1"), VT.UINT64: np.dtype("<u8"),
           VT.INT64: np.dtype("<i8"), VT.FLOAT64: np.dtype("<f8")}
# Tensor types (by name) whose data is a plain numpy array; every other type is uint8 rows of blocks.
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class _Truncated(Exception):
    """A read ran past the end of the file."""


class StringArray(Sequence):
    """A metadata array of strings kept as offsets into the mapped file; items are made (bytes) when asked."""

    def __init__(self, buf: Any, offsets: array):
        self._buf, self._offsets = buf, offsets                         # offsets: (count,) of each u64 length

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        at = self._offsets[i]
        return bytes(self._buf[at + 8:at + 8 + _U64.unpack_from(self._buf, at)[0]])

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.tolist())

    def tolist(self) -> list[bytes]:
        buf, unpack = self._buf, _U64.unpack_from
        return [bytes(buf[at + 8:at + 8 + unpack(buf, at)[0]]) for at in self._offsets]


class _Cursor:
    """A read position over the file's bytes; reading past `end` raises _Truncated.

    `buf` slices must be bytes (an mmap or bytes) unless `lazy`; a lazy cursor keeps string arrays as
    StringArray, an eager one makes list[bytes] (costs: core/quants/NOTES.md, "gguf_file.py").
    """

    def __init__(self, buf: Any, end: int, lazy: bool):
        self.buf, self.end, self.pos, self.lazy = buf, end, 0, lazy

    def read(self, fmt: struct.Struct) -> Any:
        if self.pos + fmt.size > self.end:
            raise _Truncated
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise _Truncated
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def string(self) -> bytes:
        return self.take(self.read(_U64))

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        """One metadata value of type `vtype`, as:

          scalar -> int | float | bool;  string -> bytes (the key's meaning decides the decoding);
          array of numbers -> one 1-D numpy array (bool arrays as bool);  array of strings -> list[bytes]
          from read_metadata, a StringArray from open_gguf (offsets only: a Llama 3 vocab plus its merges
          is 400k strings that a model's ranks never read);  array of arrays -> list of the above.
        `contents()` turns any of them into what gguf's ReaderField.contents() gives.
        """
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == VT.STRING:
            return self.string()
        if vtype != VT.ARRAY:
            raise ValueError(f"metadata key '{key}' has unknown value type {vtype}")
        itype, count = self.read(_U32), self.read(_U64)
        if itype not in _SCALARS and itype not in (VT.STRING, VT.ARRAY):
            raise ValueError(f"metadata array '{key}' has unknown item type {itype}")
        if count > _MAX_COUNT:
            raise ValueError(f"metadata array '{key}' claims {count} items")
        if itype in _DTYPES:
            arr = np.frombuffer(self.take(count * _DTYPES[itype].itemsize), _DTYPES[itype])   # (count,)
            return arr != 0 if itype == VT.BOOL else arr.copy()
        if itype == VT.STRING:
            return self.strings(count)
        if depth >= _MAX_DEPTH:
            raise ValueError(f"metadata array '{key}' is nested more than {_MAX_DEPTH} deep")
        return [self.value(itype, key, depth + 1) for _ in range(count)]

    def strings(self, count: int) -> StringArray | list[bytes]:
        """`count` x (u64 length, bytes): plain loops, the hot spot of a Llama 3 vocab (400k strings)."""
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        if self.lazy:
            offsets = array("q")                                         # (count,) where each length is
            for _ in range(count):
                if pos + 8 > end:
                    raise _Truncated
                offsets.append(pos)
                pos += 8 + unpack(buf, pos)[0]
                if pos > end:
                    raise _Truncated
            self.pos = pos
            return StringArray(buf, offsets)
        out: list[bytes] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise _Truncated
            append(buf[pos:pos + n])
            pos += n
        self.pos = pos
        return out


class _Layout(NamedTuple):
    version: int
    metadata: dict[str, Any]
    infos: list[tuple[str, list[int], int, int]]   # per tensor: name, dims (GGUF order), type id, offset
    alignment: int
    data_start: int                                 # first byte of tensor data (header end, padded)


def _parse(buf: Any, size: int, source: str, with_tensors: bool, lazy: bool) -> _Layout:
    """Walk the header (the tensor-info table too when `with_tensors`); one-line errors on bad layout."""
    if size < 24:
        raise ModelFileError(f"{source}: not a GGUF file (only {size} bytes)")
    cur = _Cursor(buf, size, lazy)
    if cur.read(_U32) != GGUF_MAGIC:
        raise ModelFileError(f"{source}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    version = cur.read(_U32)
    if version not in VERSIONS:
        raise ModelFileError(f"{source}: GGUF version {version} is not supported (need 2 or 3)")
    try:
        n_tensors, n_kv = cur.read(_U64), cur.read(_U64)
        if n_tensors * 24 + n_kv * 12 > size:                           # smallest tensor info / key-value
            raise _Truncated
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise ValueError(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8")
            if key in meta:
                raise ValueError(f"metadata key '{key}' appears twice")
            meta[key] = cur.value(cur.read(_U32), key)
        infos = [_tensor_info(cur) for _ in range(n_tensors if with_tensors else 0)]
    except _Truncated:
        raise ModelFileError(f"{source}: truncated file: the header ends past the end of the file "
                             f"({size} bytes)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{source}: corrupt GGUF header: {exc}") from None
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT) if with_tensors else DEFAULT_ALIGNMENT
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{source}: corrupt GGUF header: alignment {alignment} is not a power of two")
    return _Layout(version, meta, infos, alignment, -(-cur.pos // alignment) * alignment)


def _tensor_info(cur: _Cursor) -> tuple[str, list[int], int, int]:
    name = cur.string().decode("utf-8")
    n_dims = cur.read(_U32)
    if n_dims > _MAX_DIMS:
        raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
    dims = [cur.read(_U64) for _ in range(n_dims)]
    return name, dims, cur.read(_U32), cur.read(_U64)


class Tensor(NamedTuple):
    """One tensor of the file (the fields of gguf's ReaderTensor that we use)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]      # GGUF order: shape[0] is the row length (numpy's shape reversed)
    n_elements: int
    n_bytes: int
    data_offset: int            # absolute byte offset in the file
    data: np.ndarray            # read-only view: numpy shape for float/int types, uint8 rows of blocks otherwise


def _tensors(infos: list, data: np.ndarray, data_start: int, source: str) -> list[Tensor]:
    """Check each tensor's type and extent against the file and make its view of the mapping."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT      # here: see GGUF_MAGIC above

    size, out, seen = len(data), [], set()
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise ModelFileError(f"{source}: corrupt GGUF header: tensor '{name}' appears twice")
        seen.add(name)
        try:
            qtype = QT(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise UnsupportedModelError(f"{source}: tensor '{name}' has unknown type id {type_id}") from None
        n_elems = math.prod(dims)                                        # exact: no uint64 wrap-around
        row = dims[0] if dims else 1
        if row % block:
            raise ModelFileError(f"{source}: tensor '{name}' row of {row} values is not a whole number "
                                 f"of {qtype.name} blocks of {block}")
        n_bytes = n_elems // block * type_size
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelFileError(f"{source}: truncated file: tensor '{name}' data ends at byte "
                                 f"{start + n_bytes}, past the end of the file ({size} bytes)")
        np_shape = tuple(reversed(dims))
        if qtype.name in _PLAIN:
            view = data[start:start + n_bytes].view(_PLAIN[qtype.name]).reshape(np_shape)
        else:                                                            # (..., rows, row bytes) uint8
            view = data[start:start + n_bytes].reshape(*np_shape[:-1], row // block * type_size)
        out.append(Tensor(name, qtype, tuple(dims), n_elems, n_bytes, start, view))
    return out


class GGUFFile:
    """An open GGUF: metadata, tensors (views into one read-only memory map), alignment and data start."""

    def __init__(self, path: Path, data: np.memmap, version: int, metadata: dict[str, Any],
                 tensors: list[Tensor], alignment: int, data_start: int):
        self.path, self.data, self.version = path, data, version
        self.metadata, self.tensors = metadata, tensors
        self.alignment, self.data_start = alignment, data_start

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value of `key` as gguf's `ReaderField.contents()` gives it, or `default` when absent."""
        value = self.metadata.get(key)
        return default if value is None else contents(value)

    def header(self) -> memoryview:
        """The bytes before the tensor data: header, metadata, tensor infos and padding."""
        return memoryview(self.data[:self.data_start])

    def release(self, tensor: Tensor) -> None:
        """Drop the resident pages wholly inside `tensor`'s data (they re-fault if touched again)."""
        mm = getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-tensor.data_offset // page) * page
        end = (tensor.data_offset + tensor.n_bytes) // page * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def contents(value: Any) -> Any:
    """A parsed metadata value as gguf's ReaderField.contents(): str, number, bool, or a list of them.

    Arrays of arrays stay nested (gguf flattens them); invalid UTF-8 becomes U+FFFD (gguf raises).
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, StringArray):
        return [s.decode("utf-8", "replace") for s in value.tolist()]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [contents(v) for v in value]
    return value


def _size(path: Path) -> int:
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size < 24:                                                        # mmap cannot map an empty file
        raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
    return size


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file and map it read-only (no tensor data is read).

    Raises:
        ModelFileError: missing/unreadable file, not a GGUF, other version, truncated or corrupt header,
            tensor data past the end of the file.
        UnsupportedModelError: a tensor type id gguf does not know.
    """
    path = Path(path)
    try:
        size = _size(path)
        data = np.memmap(path, dtype=np.uint8, mode="r")                # (size,) the whole file
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    mm = getattr(data, "_mmap", None)                                    # numpy's mmap: fastest to slice
    layout = _parse(memoryview(data) if mm is None else mm, size, str(path), with_tensors=True, lazy=True)
    tensors = _tensors(layout.infos, data, layout.data_start, str(path))
    return GGUFFile(path, data, layout.version, layout.metadata, tensors, layout.alignment, layout.data_start)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the metadata key/values of a GGUF file (the tensor-info table is not read).

    Raises:
        ModelFileError: missing/unreadable file, not a GGUF, other version, truncated or corrupt metadata.
    """
    path = Path(path)
    try:
        size = _size(path)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # eager: every value is a copy (bytes, arrays) and no buffer export outlives a read, so the
            # map closes here even while an error's traceback is alive
            return _parse(mm, size, str(path), with_tensors=False, lazy=False).metadata
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def metadata_from_buffer(data: Any, source: str) -> dict[str, Any]:
    """The metadata of a GGUF already in memory (e.g. the `data` memmap of a gguf.GGUFReader).

    Raises:
        ModelFileError: not a GGUF, other version, truncated or corrupt metadata (`source` names it).
    """
    buf = memoryview(data).cast("B")
    return _parse(buf, len(buf), source, with_tensors=False, lazy=True).metadata
