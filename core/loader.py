"""open_model: validate a GGUF file and expose it, memory-mapped, as a ModelFile.

Owns everything about the file: a bounds-checked walk of the header (so a truncated or corrupt file is a
one-line error naming the file, not a traceback from gguf's reader), the config built from metadata, the
tensor-by-name lookup with shape and type checks, and dropping mapped pages a stage no longer needs.
It must not compute anything or copy tensor data: callers touch only the tensors they ask for.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGMLQuantizationType as QT
from gguf.constants import GGUF_MAGIC, GGUFValueType
from gguf.gguf_reader import ReaderField

from .config import ModelConfig
from .errors import ModelFileError, UnsupportedModelError
from .quants import SUPPORTED_TYPES

# Byte size of each scalar GGUF value type (strings and arrays are walked separately).
_SCALAR_SIZE = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_MAX_COUNT = 1 << 40       # larger tensor/kv/array counts can only come from a corrupt header
_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


class _Truncated(Exception):
    """The header walk ran past the end of the file."""


class _HeaderWalk:
    """Bounds-checked reader of the GGUF header (little-endian, versions 2 and 3)."""

    def __init__(self, buf: mmap.mmap, size: int):
        self.buf, self.size, self.offs = buf, size, 0

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.offs + n > self.size:
            raise _Truncated
        value = struct.unpack_from(fmt, self.buf, self.offs)
        self.offs += n
        return value[0] if len(value) == 1 else value

    def skip(self, n: int) -> None:
        if n < 0 or self.offs + n > self.size:
            raise _Truncated
        self.offs += n

    def string(self) -> bytes:
        n = self.take("<Q")
        self.skip(n)
        return bytes(self.buf[self.offs - n:self.offs])

    def value(self, vtype: int, key: str) -> Any:
        """Skip one value; return it when it is a scalar (the alignment key needs it)."""
        if vtype == GGUFValueType.STRING:
            n = self.take("<Q")
            self.skip(n)
            return None
        if vtype == GGUFValueType.ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if count > _MAX_COUNT:
                raise ValueError(f"metadata array '{key}' claims {count} items")
            if count * _SCALAR_SIZE.get(itype, 8) > self.size - self.offs:     # strings need >= 8 bytes
                raise _Truncated
            if itype in _SCALAR_SIZE:
                self.skip(count * _SCALAR_SIZE[GGUFValueType(itype)])
            else:
                for _ in range(count):
                    self.value(itype, key)
            return None
        if vtype not in _SCALAR_SIZE:
            raise ValueError(f"metadata key '{key}' has unknown value type {vtype}")
        size = _SCALAR_SIZE[GGUFValueType(vtype)]
        return self.take({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size])


def _check_layout(path: Path, size: int) -> int:
    """Walk the header and check every tensor's data lies inside the file; return the header's end.

    Raises:
        ModelFileError: not a GGUF, unsupported version, truncated header, tensor data past EOF.
        UnsupportedModelError: a tensor type id gguf does not know.
    """
    if size < 24:
        raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        walk = _HeaderWalk(buf, size)
        if walk.take("<I") != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version = walk.take("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        try:
            n_tensors, n_kv = walk.take("<Q"), walk.take("<Q")
            if n_tensors * 24 + n_kv * 12 > size:                       # smallest tensor info / key-value
                raise _Truncated
            if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
                raise ValueError(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
            alignment = 32
            for _ in range(n_kv):
                key = walk.string().decode("utf-8", "replace")
                value = walk.value(walk.take("<I"), key)
                if key == "general.alignment" and value is not None:
                    alignment = int(value)
            infos = []
            for _ in range(n_tensors):
                name = walk.string().decode("utf-8", "replace")
                n_dims = walk.take("<I")
                if n_dims > 4:
                    raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
                dims = [walk.take("<Q") for _ in range(n_dims)]
                infos.append((name, dims, walk.take("<I"), walk.take("<Q")))
        except _Truncated:
            raise ModelFileError(f"{path}: truncated file: the header ends past the end of the file "
                                 f"({size} bytes)") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ModelFileError(f"{path}: corrupt GGUF header: {exc}") from None
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelFileError(f"{path}: corrupt GGUF header: alignment {alignment} is not a power of two")
        data_start = -(-walk.offs // alignment) * alignment
    for name, dims, type_id, offset in infos:
        try:
            qtype = QT(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise UnsupportedModelError(f"{path}: tensor '{name}' has unknown type id {type_id}") from None
        n_elems = math.prod(dims)                                        # exact: no uint64 wrap-around
        if dims and dims[0] % block:
            raise ModelFileError(f"{path}: tensor '{name}' row of {dims[0]} values is not a whole number "
                                 f"of {qtype.name} blocks of {block}")
        end = data_start + offset + n_elems // block * type_size
        if end > size:
            raise ModelFileError(f"{path}: truncated file: tensor '{name}' data ends at byte {end}, past the "
                                 f"end of the file ({size} bytes)")
    return data_start


class _StringArrayParts(Sequence):
    """`ReaderField.parts` of a string array, with the per-string arrays made on demand.

    gguf's reader builds two small memmaps per element (a Llama 3 vocab: ~800k objects, 40 s, 600 MB);
    here the layout is the same (head parts, then length and bytes of each string) but nothing is built
    until indexed, so `contents()` and code walking `parts[i] for i in data` see what gguf would give.
    """

    def __init__(self, head: list, raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.head, self.raw, self.starts, self.lengths = head, raw, starts, lengths

    def __len__(self) -> int:
        return len(self.head) + 2 * len(self.starts)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = j + len(self) if j < 0 else j
        if j < len(self.head):
            return self.head[j]
        k, is_bytes = divmod(j - len(self.head), 2)
        if not 0 <= k < len(self.starts):
            raise IndexError(j)
        start = int(self.starts[k])
        if is_bytes:
            return self.raw[start:start + int(self.lengths[k])]
        return self.raw[start - 8:start].view(np.uint64)


class _Reader(GGUFReader):
    """gguf's GGUFReader, but metadata arrays are parsed without one numpy object per element.

    Arrays of numbers become one part holding the whole array (gguf's `contents()` handles that); arrays
    of strings get lazy parts. Everything else (scalars, tensors, the memory map) is gguf's own code.
    """

    def _build_fields(self, offs: int, count: int) -> int:
        raw = self.data.view(np.ndarray)
        for _ in range(count):
            orig = offs
            klen, kdata = self._get_str(offs)
            offs += int(klen.nbytes + kdata.nbytes)
            vtype = self._get(offs, np.uint32)
            offs += 4
            head = [klen, kdata, vtype]
            itype = int(self._get(offs, np.uint32)[0]) if vtype[0] == GGUFValueType.ARRAY else -1
            if itype == GGUFValueType.STRING or itype in _SCALAR_SIZE:
                head += [self._get(offs, np.uint32), self._get(offs + 4, np.uint64)]
                n, pos = int(head[-1][0]), offs + 12
                if itype == GGUFValueType.STRING:
                    starts, lengths = np.empty(n, np.int64), np.empty(n, np.int64)
                    for k in range(n):
                        lengths[k] = struct.unpack_from("<Q", raw, pos)[0]
                        starts[k] = pos + 8
                        pos += 8 + int(lengths[k])
                    parts: Sequence = _StringArrayParts(head, raw, starts, lengths)
                    data: Sequence[int] = range(len(head) + 1, len(head) + 2 * n, 2)
                else:
                    values = self._get(pos, self.gguf_scalar_to_np[GGUFValueType(itype)], n)
                    pos += int(values.nbytes)
                    parts, data = head + [values], [len(head)]
                types = [GGUFValueType.ARRAY, GGUFValueType(itype)]
                offs = pos
            else:                                                        # gguf's own path
                size, fparts, fidxs, types = self._get_field_parts(offs, vtype[0])
                parts, data = head + fparts, [i + len(head) for i in fidxs]
                offs += size
            self._push_field(ReaderField(orig, str(bytes(kdata), encoding="utf-8"), parts, data, types),
                             skip_sum=True)
        return offs


class ModelFile:
    """A validated, memory-mapped GGUF LLaMA model. Tensor data is only read when a caller touches it."""

    def __init__(self, path: Path, reader: GGUFReader, header_bytes: int):
        self.path = path
        self.reader = reader
        self._header_bytes = header_bytes
        self._tensors = {t.name: t for t in reader.tensors}
        has_output = "output.weight" in self._tensors
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFileError(f"{path}: tensor 'token_embd.weight' is missing")
        try:
            self.config = ModelConfig.from_fields(self.get, has_output, int(embd.shape[-1]), str(path))
        except (TypeError, ValueError) as exc:                          # e.g. a list where a number belongs
            raise ModelFileError(f"{path}: unusable hyper-parameter metadata: {exc}") from None
        self._check_tensors()

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value of `key` (str, number, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str):
        """The gguf ReaderTensor `name` (its `.data` is a view into the file mapping)."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor '{name}' is missing")
        return t

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Numpy shape (n_out, n_in) of every tensor the llama graph uses, from the config."""
        c = self.config
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, c.n_embd),
                                              "output_norm.weight": (c.n_embd,)}
        if not c.tied_output:
            shapes["output.weight"] = (c.n_vocab, c.n_embd)
        per_layer = {"attn_norm": (c.n_embd,), "attn_q": (q_dim, c.n_embd), "attn_k": (kv_dim, c.n_embd),
                     "attn_v": (kv_dim, c.n_embd), "attn_output": (c.n_embd, q_dim), "ffn_norm": (c.n_embd,),
                     "ffn_gate": (c.n_ff, c.n_embd), "ffn_up": (c.n_ff, c.n_embd), "ffn_down": (c.n_embd, c.n_ff)}
        for i in range(c.n_layer):
            for short, shape in per_layer.items():
                shapes[f"blk.{i}.{short}.weight"] = shape
        return shapes

    def _check_tensors(self) -> None:
        """Every needed tensor present, of a supported type, with the shape the config implies."""
        for name, shape in self.expected_shapes().items():
            t = self.tensor(name)
            if t.tensor_type not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor '{name}' has type {t.tensor_type.name}, which is not supported")
            got = tuple(int(d) for d in reversed(t.shape.tolist()))
            if got != shape:
                raise UnsupportedModelError(
                    f"{self.path}: tensor '{name}' has shape {got}, but the config implies {shape}")
        rf = self._tensors.get("rope_freqs.weight")
        if rf is not None and (rf.tensor_type != QT.F32 or int(rf.n_elements) != self.config.n_rot // 2):
            raise UnsupportedModelError(f"{self.path}: tensor 'rope_freqs.weight' is not F32 of "
                                        f"{self.config.n_rot // 2} values")

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor `name` from this process (they re-fault if touched again).

        Used after a tensor was repacked into private memory, so the mapping does not count twice.
        """
        t = self._tensors.get(name)
        mm = getattr(self.reader.data, "_mmap", None)
        if t is None or mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-int(t.data_offset) // page) * page                   # whole pages inside the tensor
        end = (int(t.data_offset) + int(t.n_bytes)) // page * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def fingerprint(self) -> str:
        """`<file size>-<sha256 of header and metadata, 16 hex>`: equal files give equal fingerprints."""
        size = self.path.stat().st_size
        digest = hashlib.sha256(memoryview(self.reader.data[:self._header_bytes])).hexdigest()
        return f"{size}-{digest[:16]}"


def open_model(path: str | Path) -> ModelFile:
    """Open and validate a GGUF LLaMA model, memory-mapped (no tensor data is read).

    Raises:
        ModelFileError: missing/unreadable file, not a GGUF, truncated, data past EOF, missing tensor.
        UnsupportedModelError: other architecture, unsupported tensor type, shapes that contradict the config.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        header_bytes = _check_layout(path, size)
        reader = _Reader(path, "r")
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, IndexError) as exc:                  # anything the walk did not foresee
        raise ModelFileError(f"{path}: corrupt GGUF: {exc}") from None
    return ModelFile(path, reader, header_bytes)
