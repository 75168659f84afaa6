"""QTensor: a weight matrix kept repacked in its GGML type, multiplied tile by tile.

Owns: load-time repacking (via the formats of legacy.py / kquants.py), y = x @ W.T for one token
(matvec) and for batches, embedding-row lookup, exact dequantization from the repacked arrays, and the
split of row tiles over an optional thread pool.
Must not: materialise the whole matrix in float32 (only one tile of at most TILE_ELEMS floats per thread
exists at a time), keep a reference to the memory-mapped file after repacking a block type, or raise
anything but core.errors at its boundary (bad type / bad byte count).

Kernel (per tile of R rows x K input columns, rows last so numpy runs long contiguous loops):
  codes -> float32 tile F (K, R) [integer codes, unscaled]        # the unavoidable widening pass
  T <= SMALL_T: partial dot products per sub-block, one batched BLAS call:
      P (n_sub, T, R) = x_sub (n_sub, T, sub) @ F (n_sub, sub, R); y += sum_s S[s] * (P[s] + offset * xs[s])
  T >  SMALL_T: scale the tile in place (F *= S), one sgemm: y += x[:, K] @ F, + xs @ (offset*S)
  and in both: y += xs @ M (the mins), xs = per-sub-block sums of x.
"""
from __future__ import annotations

import threading
from concurrent.futures import Executor

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import ModelFileError, UnsupportedModelError
from . import kquants, legacy  # noqa: F401  (importing registers the formats)
from .floats import FLOAT_TYPES, float_rows, widen
from .layout import FORMATS, BlockFormat, kmajor

SUPPORTED_TYPES = frozenset(FORMATS) | FLOAT_TYPES

ROW_TILE = 512           # rows per tile (a multiple of 8)
TILE_ELEMS = 1 << 17     # float32 elements of one expanded tile (512 KiB)
SMALL_T = 4              # batches up to this size use per-sub-block partial dot products

_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread reusable buffer (tiles are expanded into it; no allocation per tile)."""
    bufs = _local.__dict__.setdefault("bufs", {})
    n = int(np.prod(shape))
    buf = bufs.get(name)
    if buf is None or buf.size < n or buf.dtype != dtype:
        buf = np.empty(max(n, 1), dtype=dtype)
        bufs[name] = buf
    return buf[:n].reshape(shape)


def check_type(qtype) -> QT:
    """The GGML type as a QT member; UnsupportedModelError naming it if we have no kernel for it."""
    try:
        qt = QT(int(qtype))
    except ValueError:
        raise UnsupportedModelError(f"tensor type {qtype} is not a known GGML type") from None
    if qt not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"tensor type {qt.name} is not supported "
                                    f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    return qt


def repack_blocks(fmt: BlockFormat, data: np.ndarray, n_out: int, n_in: int) -> dict[str, np.ndarray]:
    """A tensor's raw block bytes (n_out rows of n_in weights) -> the format's k-major arrays."""
    if n_in % fmt.block:
        raise UnsupportedModelError(f"{fmt.qtype.name} rows of {n_in} weights are not a multiple of "
                                    f"its block size {fmt.block}")
    raw = np.asarray(data).view(np.uint8)
    nb = n_in // fmt.block
    if raw.size != n_out * nb * fmt.size:
        raise ModelFileError(f"{fmt.qtype.name} tensor ({n_out}, {n_in}) has {raw.size} bytes, "
                             f"expected {n_out * nb * fmt.size}")
    return fmt.repack(kmajor(raw.reshape(n_out, nb, fmt.size)))


def reconstruct(fmt: BlockFormat, p: dict, n_in: int, n_rows: int) -> np.ndarray:
    """All weights of the (padded) rows in p -> (n_rows, n_in) float32, bit-exact with gguf-py."""
    r8 = next(iter(p.values())).shape[-1]
    nu, ns = n_in // fmt.block, n_in // fmt.sub
    w = np.empty((n_in, r8), dtype=np.float32)
    fmt.codes(p, 0, nu, 0, r8, w, np.empty((n_in, r8), dtype=np.uint8))
    w3 = w.reshape(ns, fmt.sub, r8)
    if fmt.offset:
        w3 += np.float32(fmt.offset)                       # integers: exact
    w3 *= fmt.scales(p, 0, nu, 0, r8)[:, None, :]
    mins = fmt.mins(p, 0, nu, 0, r8)
    if mins is not None:
        w3 += mins[:, None, :]
    return np.ascontiguousarray(w[:, :n_rows].T)


class QTensor:
    """A 2-D weight W of shape (n_out, n_in) in some GGML type; y = x @ W.T without a full f32 copy."""

    def __init__(self, qtype, data: np.ndarray, shape: tuple[int, int]):
        self.qtype = check_type(qtype)
        n_out, n_in = int(shape[0]), int(shape[1])
        self.shape = (n_out, n_in)                        # numpy order
        if self.qtype in FLOAT_TYPES:
            self._fmt = None
            self._rows = float_rows(self.qtype, data, n_out, n_in)   # the mapping itself, no copy
            self._p = {}
        else:
            self._fmt = FORMATS[self.qtype]
            self._p = repack_blocks(self._fmt, data, n_out, n_in)
            self._rows = None
        self._n8 = -(-n_out // 8) * 8

    @property
    def nbytes(self) -> int:
        """Bytes this object keeps in memory (after repacking; the mapped rows for float types)."""
        if self._rows is not None:
            return int(self._rows.nbytes)
        return int(sum(a.nbytes for a in self._p.values()))

    # ---- products ---------------------------------------------------------------------------------
    def matmul(self, x: np.ndarray, pool: Executor | None = None) -> np.ndarray:
        """x (T, n_in) float32 -> (T, n_out) float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"matmul: x has shape {x.shape}, expected (T, {self.shape[1]})")
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        if self._fmt is None:
            tile = max(8, TILE_ELEMS // self.shape[1] // 8 * 8)
            work, ctx = self._float_rows, x
        else:
            tile = ROW_TILE
            work, ctx = self._quant_rows, self._prepare(x)
        bounds = [(a, min(a + tile, self._n8)) for a in range(0, self._n8, tile)]
        if pool is None or len(bounds) == 1:
            for a, b in bounds:
                work(ctx, out, a, b)
        else:
            for _ in pool.map(lambda ab: work(ctx, out, *ab), bounds):
                pass
        return out

    def _prepare(self, x: np.ndarray) -> tuple:
        """Per-call views of x: x, per-sub-block sums xs (T, n_sub) and x split by sub-block."""
        sub = self._fmt.sub
        T, n_in = x.shape
        xr = x.reshape(T, n_in // sub, sub)
        xs = xr.sum(axis=2, dtype=np.float32)                # (T, n_sub)
        xv = np.ascontiguousarray(xr.transpose(1, 0, 2)) if T <= SMALL_T else None   # (n_sub, T, sub)
        return x, xs, xv

    def _quant_rows(self, ctx: tuple, out: np.ndarray, a: int, b: int) -> None:
        """out[:, a:b] for one row tile of a block-quantized matrix."""
        x, xs, xv = ctx
        fmt, p = self._fmt, self._p
        T, n_in = x.shape
        R, blk, ns, sub = b - a, fmt.block, fmt.nsub, fmt.sub
        n_units = n_in // blk
        per = max(1, TILE_ELEMS // (R * blk))              # units per column tile
        fbuf = _scratch("f", (per * blk, R), np.float32)
        tbuf = _scratch("t", (per * blk, R), np.uint8)
        acc = np.zeros((T, R), dtype=np.float32)
        off = np.float32(fmt.offset)
        for u0 in range(0, n_units, per):
            u1 = min(u0 + per, n_units)
            k = (u1 - u0) * blk
            s0, s1 = u0 * ns, u1 * ns
            f = fbuf[:k]
            fmt.codes(p, u0, u1, a, b, f, tbuf[:k])                   # (k, R) integer codes
            S = fmt.scales(p, u0, u1, a, b)                             # (k/sub, R)
            f3 = f.reshape(-1, sub, R)
            if xv is not None:
                part = np.matmul(xv[s0:s1], f3)                         # (k/sub, T, R)
                if off:
                    part += off * xs[:, s0:s1].T[:, :, None]
                part *= S[:, None, :]
                acc += part.sum(axis=0)
            else:
                f3 *= S[:, None, :]
                acc += x[:, u0 * blk:u1 * blk] @ f                      # (T, k) @ (k, R)
                if off:
                    acc += xs[:, s0:s1] @ (off * S)
            mins = fmt.mins(p, u0, u1, a, b)
            if mins is not None:
                acc += xs[:, s0:s1] @ mins                              # (T, k/sub) @ (k/sub, R)
        n = min(b, self.shape[0]) - a
        out[:, a:a + n] = acc[:, :n]

    def _float_rows(self, x: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
        """out[:, a:b] for one row tile of an F32/F16/BF16 matrix."""
        b = min(b, self.shape[0])
        rows = self._rows[a:b]
        w = rows if self.qtype == QT.F32 else widen(self.qtype, rows, _scratch("w", rows.shape, np.float32))
        np.matmul(x, w.T, out=out[:, a:b])

    # ---- lookups ----------------------------------------------------------------------------------
    def get_rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` (embedding lookup): (len(ids),) -> (len(ids), n_in) float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise ValueError(f"get_rows: ids outside [0, {self.shape[0]})")
        if self._fmt is None:
            return np.array(widen(self.qtype, self._rows[ids]), dtype=np.float32)
        pad = np.zeros(-(-ids.size // 8) * 8 - ids.size, dtype=np.int64)
        idx = np.concatenate([ids, pad])
        return reconstruct(self._fmt, {k: np.take(v, idx, axis=-1) for k, v in self._p.items()}, self.shape[1], ids.size)

    def dequantize(self) -> np.ndarray:
        """The whole matrix in float32 (for tests and small tensors only)."""
        return self.get_rows(np.arange(self.shape[0]))
