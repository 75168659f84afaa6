"""QTensor: a weight matrix kept repacked in its GGML type, multiplied tile by tile.

Owns: load-time repacking (formats of legacy.py / kquants.py), y = x @ W.T for one token and for batches,
embedding-row lookup, exact dequantization, and the split of row tiles over an optional thread pool.
Must not: materialise the whole matrix in float32 (at most one TILE_ELEMS tile per thread), keep the
memory-mapped file after repacking a block type, or raise anything but core.errors at its boundary.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import ModelFileError, UnsupportedModelError
from . import kquants, legacy  # noqa: F401  (importing registers the formats)
from .floats import FLOAT_TYPES, f16_fast, float_rows, widen
from .layout import FORMATS, BlockFormat, kmajor

SUPPORTED_TYPES = frozenset(FORMATS) | FLOAT_TYPES

ROW_TILE = 1024          # rows per tile (a multiple of 8)
TILE_ELEMS = 1 << 19     # float32 elements of one expanded tile (2 MiB; fewer numpy calls beat L2 fit)
HUGE_MIN = 1 << 22       # numpy asks for transparent huge pages for buffers of at least this size
SMALL_T = 4              # batches up to this size use per-sub-block partial dot products

_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread reusable buffer (tiles are expanded into it; no allocation per tile).

    Scales, mins and partial sums go here too (fresh multi-MiB temporaries cost page faults on every
    call); buffers of >= 4 MiB get transparent huge pages.
    """
    bufs = _local.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.size < n or buf.dtype != dtype:
        size = max(n, 1)
        if size * np.dtype(dtype).itemsize >= HUGE_MIN // 4:          # big tiles: >= 4 MiB, so numpy
            size = max(size, HUGE_MIN // np.dtype(dtype).itemsize)    # backs them with huge pages
        buf = np.empty(size, dtype=dtype)
        bufs[name] = buf
        _local.gen = object()                                           # views found before are stale
    return buf[:n].reshape(shape)


class TilePool(ThreadPoolExecutor):
    """The threads of one stage: a product's row tiles are dealt into `threads` shares, the calling thread
    runs the first share itself and the pool the others (why: core/quants/NOTES.md, "qtensor.py").
    Also a plain executor for load-time repacking."""

    def __init__(self, threads: int):
        super().__init__(max_workers=threads)
        self.threads = threads


def run_shares(pool: Executor | None, work, items: list[tuple]) -> None:
    """work(*item) for every item: on this thread alone, or dealt round-robin into the pool's shares."""
    n = 1 if pool is None else min(len(items), getattr(pool, "threads", 2))
    if n == 1:
        for item in items:
            work(*item)
        return
    shares = [items[i::n] for i in range(n)]
    futures = [pool.submit(run_shares, None, work, share) for share in shares[1:]]
    try:
        run_shares(None, work, shares[0])
    finally:
        for f in futures:
            f.result()


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


def pack_tiles(fmt: BlockFormat, rows: np.ndarray, n_in: int, rt: int) -> list[dict[str, np.ndarray]]:
    """Repack (n_out, row_bytes) block rows tile by tile (rt rows each) into views of ONE buffer: numpy
    backs buffers of >= 4 MiB with transparent huge pages (gain: core/quants/NOTES.md, "qtensor.py").
    Only one tile exists twice at a time."""
    n_out = rows.shape[0]
    spans = [(a, min(a + rt, n_out)) for a in range(0, n_out, rt)]
    first = repack_blocks(fmt, rows[:spans[0][1]], spans[0][1], n_in)
    r0 = next(iter(first.values())).shape[-1]                   # padded rows of tile 0
    sizes = [{k: v.nbytes // r0 * (-(-(b - a) // 8) * 8) for k, v in first.items()} for a, b in spans]
    buf = np.empty(sum(-(-n // 64) * 64 for sz in sizes for n in sz.values()), dtype=np.uint8)
    tiles, off = [], 0
    for i, (a, b) in enumerate(spans):
        p = first if i == 0 else repack_blocks(fmt, rows[a:b], b - a, n_in)
        for k, v in p.items():
            n = sizes[i][k]
            dst = buf[off:off + n].view(v.dtype).reshape(v.shape)
            dst[...] = v
            p[k] = dst
            off += -(-n // 64) * 64
        tiles.append(p)
    return tiles


def reconstruct(fmt: BlockFormat, p: dict, n_in: int, n_rows: int) -> np.ndarray:
    """All weights of the (padded) rows in p -> (n_rows, n_in) float32, bit-exact with gguf-py."""
    r8 = next(iter(p.values())).shape[-1]
    nu = n_in // fmt.block
    order = fmt.order(nu)                                   # tile position -> column
    run = fmt.run or fmt.sub
    run_sub = order[::run] // fmt.sub                       # sub-block of each run of positions
    w = np.empty((n_in, r8), dtype=np.float32)
    fmt.codes(p, 0, nu, 0, r8, w, np.empty((n_in, r8), dtype=np.uint8))
    xf = fmt.xfactor(nu)
    if xf is not None:
        w *= xf[:, None]                                   # powers of two: exact
    w3 = w.reshape(-1, run, r8)
    if fmt.offset:
        w3 += np.float32(fmt.offset)                       # integers: exact
    w3 *= fmt.scales(p, 0, nu, 0, r8)[run_sub][:, None, :]
    mins = fmt.mins(p, 0, nu, 0, r8)
    if mins is not None:
        w3 += mins[run_sub][:, None, :]
    natural = np.empty_like(w)
    natural[order] = w
    return np.ascontiguousarray(natural[:, :n_rows].T)


class QTensor:
    """A 2-D weight W of shape (n_out, n_in) in some GGML type; y = x @ W.T without a full f32 copy."""

    def __init__(self, qtype, data: np.ndarray, shape: tuple[int, int]):
        self.qtype = check_type(qtype)
        n_out, n_in = int(shape[0]), int(shape[1])
        self.shape = (n_out, n_in)                        # numpy order
        if self.qtype in FLOAT_TYPES:
            self._fmt = None
            self._rows = float_rows(self.qtype, data, n_out, n_in)   # the mapping itself, no copy
            self._tiles = []
        else:
            self._fmt = FORMATS[self.qtype]
            rows = np.asarray(data).view(np.uint8).reshape(n_out, -1)
            rt = self._row_tile = ROW_TILE
            self._tiles = pack_tiles(self._fmt, rows, n_in, rt)              # each tile contiguous, rows last
            self._rows = None
            self._plan_columns()
        self._n8 = -(-n_out // 8) * 8

    def _plan_columns(self) -> None:
        """Column tiles (units [u0, u1)) and the tile-order permutation of the input columns."""
        fmt, n_in = self._fmt, self.shape[1]
        n_units = n_in // fmt.block
        target = max(1, TILE_ELEMS // (min(self._row_tile, -(-self.shape[0] // 8) * 8) * fmt.block))
        per = max(d for d in range(1, target + 1) if n_units % d == 0)  # equal column tiles
        self._per = per
        self._cols = [(u0, min(u0 + per, n_units)) for u0 in range(0, n_units, per)]
        perm = np.concatenate([u0 * fmt.block + fmt.order(u1 - u0) for u0, u1 in self._cols])
        self._run = fmt.run or fmt.sub
        self._identity = bool(np.array_equal(perm, np.arange(n_in)))
        self._perm = None if self._identity else perm
        xf = [fmt.xfactor(u1 - u0) for u0, u1 in self._cols]
        self._xfac = None if xf[0] is None else np.concatenate(xf)     # (n_in,) in tile order
        self._mixes = type(fmt).mix_x is not BlockFormat.mix_x
        self._xs_w = np.full(fmt.sub, fmt.offset or 1.0, dtype=np.float32)   # xs = offset * sums (or sums)
        self._plans: dict[tuple, tuple] = {}                            # see _small_plan

    @property
    def nbytes(self) -> int:
        """Bytes this object keeps in memory (after repacking; the mapped rows for float types)."""
        if self._rows is not None:
            return int(self._rows.nbytes)
        return int(sum(a.nbytes for p in self._tiles for a in p.values()))

    # ---- products ---------------------------------------------------------------------------------
    def matmul(self, x: np.ndarray, pool: Executor | None = None) -> np.ndarray:
        """x (T, n_in) float32 -> (T, n_out) float32; row tiles shared with `pool` (a TilePool) if given."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"matmul: x has shape {x.shape}, expected (T, {self.shape[1]})")
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        if x.shape[0] == 0:
            return out
        n_out = self.shape[0]
        if self._fmt is None:
            if self.qtype == QT.F32:                   # already float32: one BLAS call per thread
                tile = n_out if pool is None else max(8, -(-n_out // 4))
            else:                                      # widened tile by tile
                tile = max(8, TILE_ELEMS // self.shape[1] // 8 * 8)
            work, ctx = self._float_rows, x
            bounds = [(a, min(a + tile, n_out)) for a in range(0, n_out, tile)]
        else:
            work, ctx = self._quant_rows, self._prepare(x)
            bounds = [(i, i * self._row_tile) for i in range(len(self._tiles))]
        run_shares(pool, work, [(ctx, out, a, b) for a, b in bounds])
        return out

    def _prepare(self, x: np.ndarray) -> tuple:
        """Per-call forms of x: tile-ordered (and scaled) columns xt, sums per sub-block xs (T, n_sub)
        times the format's offset when it has one (offsets are powers of two: exact), and for small T
        the runs xv (n_runs, T, run)."""
        T, n_in = x.shape
        xs = (x.reshape(-1, self._fmt.sub) @ self._xs_w).reshape(T, -1)   # (BLAS: 6x sum())
        xp = x if self._identity else np.take(x, self._perm, axis=1)  # (4-7x faster than x[:, perm])
        xt = xp if self._xfac is None else xp * self._xfac
        if self._mixes:
            xt = xt if xt is not xp or xp is not x else xt.copy()
            self._fmt.mix_x(xt, self._per)
        xv = None
        if T == 1:
            xv = xt.reshape(-1, 1, self._run)                            # a view: already in run order
        elif T <= SMALL_T:
            xv = np.ascontiguousarray(xt.reshape(T, -1, self._run).transpose(1, 0, 2))
        return xt, xs, xv

    def _small_plan(self, i: int, T: int) -> tuple:
        """The views a product of row tile i at a small T (<= SMALL_T) works in, in this thread's scratch:
        per column tile (units u0, u1, expanded codes f (k, R), its uint8 scratch, f as runs, the runs of
        xv and the slice of the per-run products it fills), then all per-run products as the einsum reads
        them, the scales, the scales by run and the mins (when `stored`, else None: computed per call),
        the accumulator and the einsum's subscripts. Built once per (thread, tile, T), again after a
        scratch buffer grew: a decode product is ~10 numpy calls, and finding these views each time cost
        about as much again (times: core/quants/NOTES.md, "Small products")."""
        key = (threading.get_ident(), i, T)
        plan = self._plans.get(key)
        if plan is not None and plan[0] is _local.__dict__.get("gen"):
            return plan[1]
        fmt, p, run = self._fmt, self._tiles[i], self._run
        n_in = self.shape[1]
        R, blk = p["d"].shape[-1], fmt.block
        U, n_ct = self._per, len(self._cols)
        rs = fmt.run_shape(U)
        fbuf = _scratch("f", (U * blk, R), np.float32)
        tbuf = _scratch("t", (U * blk, R), np.uint8)
        part = _scratch("part", (n_in // run, T, R), np.float32)
        acc = _scratch("acc", (T, R), np.float32)
        cols = []
        for u0, u1 in self._cols:
            k, r0, r1 = (u1 - u0) * blk, u0 * blk // run, u1 * blk // run
            cols.append((u0, u1, fbuf[:k], tbuf[:k], fbuf[:k].reshape(-1, run, R), slice(r0, r1), part[r0:r1]))
        S, Sr, M = self._tile_scales(p, scratch=False) if fmt.stored else (None, None, None)   # views
        lead = "abcdefg"[:1 + len(rs)]                                  # (n_ct, *rs); size-1 dims of Sr broadcast
        plan = (cols, part.reshape(n_ct, *rs, T, R), S, Sr, M, acc, f"{lead}tr,{lead}r->tr")
        self._plans[key] = (_local.__dict__.get("gen"), plan)
        return plan

    def _tile_scales(self, p: dict, scratch: bool) -> tuple:
        """A row tile's scales S (n_sub, R), S by run (broadcasting to (n_ct, *run_shape, R)) and mins M
        (n_sub, R) or None: computed into this thread's scratch, or (`stored` formats, scratch False)
        views of the repacked arrays."""
        fmt, n_in = self._fmt, self.shape[1]
        R, n_units, n_sub = p["d"].shape[-1], n_in // fmt.block, n_in // fmt.sub
        S = fmt.scales(p, 0, n_units, 0, R, out=_scratch("S", (n_sub, R), np.float32) if scratch else None)
        M = fmt.mins(p, 0, n_units, 0, R, out=_scratch("M", (n_sub, R), np.float32) if scratch else None)
        return S, fmt.run_scales(S.reshape(len(self._cols), -1, R), self._per), M

    def _quant_rows(self, ctx: tuple, out: np.ndarray, i: int, a: int) -> None:
        """out[:, a:a+R] for row tile i (rows a.., R of them padded to 8) of a block-quantized matrix.

        Kernel (per tile of R rows x K input columns, rows last so numpy runs long contiguous loops; x is
        permuted/scaled once per call to the formats' tile order, see layout.py):
          codes -> float32 tile F (K, R) [integer codes, unscaled]        # the unavoidable widening pass
          T <= SMALL_T: partial dot products per run of positions sharing a scale, one batched BLAS call:
              P (n_runs, T, R) = x_runs (n_runs, T, run) @ F (n_runs, run, R); y = sum_runs S * P (one einsum)
          T >  SMALL_T: scale the tile in place (F *= S), one sgemm: y += x[:, K] @ F
          and in both: y += xs @ S (offset) or xs @ M (mins), xs = offset * per-sub-block sums of x.
        A format may expand something cheaper than its codes for products (dot_codes, with x mixed to match:
        Q4_0 casts its raw bytes). Scales, mins and partial sums go to per-thread scratch buffers (_scratch);
        small T works in views found once (_small_plan). Costs and what was tried: core/quants/NOTES.md,
        "qtensor.py".
        """
        xt, xs, xv = ctx
        fmt, p = self._fmt, self._tiles[i]
        T, R, U = xt.shape[0], p["d"].shape[-1], self._per
        if xv is not None:
            cols, parts, S, Sr, M, acc, subs = self._small_plan(i, T)
            if S is None:
                S, Sr, M = self._tile_scales(p, scratch=True)
            for u0, u1, f, t, f3, runs, part in cols:
                fmt.dot_codes(p, u0, u1, 0, R, f, t)                    # (k, R) integer codes, tile order
                np.matmul(xv[runs], f3, out=part)                       # (k/run, T, run) @ (k/run, run, R)
            np.einsum(subs, parts, Sr, out=acc)                         # acc = sum_runs S * part
        else:
            blk, run = fmt.block, self._run
            fbuf = _scratch("f", (U * blk, R), np.float32)
            tbuf = _scratch("t", (U * blk, R), np.uint8)
            S, Sr, M = self._tile_scales(p, scratch=True)
            rs = fmt.run_shape(U)
            acc = _scratch("acc", (T, R), np.float32)
            acc[...] = 0
            prod = _scratch("prod", (T, R), np.float32)
            for u0, u1 in self._cols:
                c0, c1 = u0 * blk, u1 * blk
                f = fbuf[:c1 - c0]
                fmt.dot_codes(p, u0, u1, 0, R, f, tbuf[:c1 - c0])      # (k, R) integer codes, tile order
                f4 = f.reshape(*rs, run, R)
                np.multiply(f4, Sr[u0 // U][..., None, :], out=f4)
                np.matmul(xt[:, c0:c1], f, out=prod)                   # (T, k) @ (k, R)
                acc += prod
        if fmt.offset:                                                  # offset and mins act on the
            acc += xs @ S                                               # sums of x
        if M is not None:                                               # per sub-block: (T, n_sub) @ (n_sub, R)
            acc += xs @ M
        n = min(R, self.shape[0] - a)
        out[:, a:a + n] = acc[:, :n]

    def _float_rows(self, x: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
        """out[:, a:b] for one row tile of an F32/F16/BF16 matrix."""
        b = min(b, self.shape[0])
        rows = self._rows[a:b]
        if self.qtype == QT.F32:
            w = rows
        elif self.qtype == QT.F16:
            w = f16_fast(rows, _scratch("w", rows.shape, np.float32))
        else:
            w = widen(self.qtype, rows, _scratch("w", rows.shape, np.float32))
        np.matmul(x, w.T, out=out[:, a:b])

    # ---- lookups ----------------------------------------------------------------------------------
    def get_rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` (embedding lookup): (len(ids),) -> (len(ids), n_in) float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise ValueError(f"get_rows: ids outside [0, {self.shape[0]})")
        if self._fmt is None:
            return np.array(widen(self.qtype, self._rows[ids]), dtype=np.float32)
        out = np.empty((ids.size, self.shape[1]), dtype=np.float32)
        rt = self._row_tile
        for i in np.unique(ids // rt):
            sel = np.nonzero(ids // rt == i)[0]
            local = ids[sel] - i * rt
            idx = np.concatenate([local, np.zeros(-(-sel.size // 8) * 8 - sel.size, dtype=np.int64)])
            p = self._fmt.take_rows(self._tiles[i], idx)
            out[sel] = reconstruct(self._fmt, p, self.shape[1], sel.size)
        return out

    def dequantize(self) -> np.ndarray:
        """The whole matrix in float32 (for tests and small tensors only)."""
        return self.get_rows(np.arange(self.shape[0]))
