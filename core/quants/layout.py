"""The repacked ("k-major") layout shared by every GGML block format, and its bit helpers.

Owns: the `BlockFormat` interface every block type implements, the registry of formats, the row padding
and block-transposition done at load time, and the uint64 bit tricks used to unpack codes.
Must not: know about tiles, threads or matmul (that is qtensor.py), or hold any model state.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

FORMATS: dict[QT, "BlockFormat"] = {}

U64 = np.uint64
NIB = U64(0x0F0F0F0F0F0F0F0F)        # low nibble of every byte of a uint64


class BlockFormat:
    """One GGML block type: how to repack its blocks and unpack codes, scales and mins from a tile.

    The weight model every format maps onto (per sub-block s of `sub` consecutive input columns, row r):

        w[r, s*sub + k] = S[s, r] * (c[s, k, r] + offset) + M[s, r]

    c are small integer codes (unpacked from bits), S the sub-block scale, M an additive term (the "min" of
    Q4_1 / Q5_1 / K-quants, negated), offset a per-format constant (-8 for Q4_0). Computing it in exactly
    this order reproduces gguf.quants.dequantize bit for bit (the reference forms d*(q-8), d*q+m, dl*q-ml).

    Codes need not come out in column order: a format may unpack all low nibbles of a tile, then all high
    ones (why: core/quants/NOTES.md, "layout.py"), and may leave a field in place (a high nibble read as
    16 * code). order() and xfactor() describe that; x is permuted and scaled to match once per call.
    Runs of `run` consecutive tile positions share one scale (run_shape / run_scales).
    """

    qtype: QT
    block: int          # elements per block (32, or 256 for K-quants / IQ4_XS)
    size: int           # bytes per block in the file
    sub: int            # elements sharing one scale
    offset: float = 0.0  # constant added to the codes before scaling
    has_mins = False    # whether M is non-zero
    run: int = 0        # tile positions sharing one scale, in tile order (0: same as sub)
    f16_at: tuple[int, ...] = (0,)   # byte offsets of the block's f16 fields (d, and dmin / m)
    stored = False      # scales() and mins() return views of the repacked arrays (nothing computed per call)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.offset and cls.has_mins:      # QTensor folds the offset into x's sums, which the mins also use
            raise TypeError(f"{cls.__name__}: a format has an offset or mins, not both")
        if hasattr(cls, "qtype"):
            FORMATS[cls.qtype] = cls()

    @property
    def nsub(self) -> int:
        return self.block // self.sub

    def order(self, U: int) -> np.ndarray:
        """Tile position -> input column (within the tile's U units) of the codes written by codes()."""
        return np.arange(U * self.block)

    def xfactor(self, U: int) -> np.ndarray | None:
        """Per tile position, a power of two the codes carry (e.g. high nibbles left in place are
        16 * code): x is multiplied by its inverse, so no shift is needed to unpack them."""
        return None

    def run_shape(self, U: int) -> tuple[int, ...]:
        """The runs of a tile of U units, as an array shape (their order in the tile)."""
        return (U * self.block // (self.run or self.sub),)

    def run_scales(self, S: np.ndarray, U: int) -> np.ndarray:
        """S of n column tiles (n, U*nsub, R) -> a view broadcastable to (n, *run_shape(U), R)."""
        return S

    def take_rows(self, p: dict, idx: np.ndarray) -> dict:
        """The repacked arrays of rows idx (len(idx) a multiple of 8), in the same layout."""
        return {k: np.take(v, idx, axis=-1) for k, v in p.items()}

    def repack(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        """blocks (nb, size, N8) uint8 (already k-major) -> named arrays, rows last."""
        raise NotImplementedError

    def mix_x(self, xt: np.ndarray, U: int) -> None:
        """For products only: turn the tile-ordered, xfactor-scaled x (T, n_in) in place into the
        coefficients of dot_codes() (default: they are the codes themselves, nothing to do)."""

    def dot_codes(self, p: dict, u0: int, u1: int, r0: int, r1: int, out: np.ndarray, tmp: np.ndarray) -> None:
        """For products only: float32 values whose dot with mix_x(x) equals the codes' dot with x
        (default: the codes). Lets a format skip work that only dequantization needs."""
        self.codes(p, u0, u1, r0, r1, out, tmp)

    def codes(self, p: dict, u0: int, u1: int, r0: int, r1: int, out: np.ndarray, tmp: np.ndarray) -> None:
        """Integer codes of units [u0, u1) x rows [r0, r1) -> out (U*block, R) float32, in the tile order
        of order(U); tmp is a uint8 scratch of the same shape."""
        raise NotImplementedError

    def scales(self, p: dict, u0: int, u1: int, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """S of the tile: (U*nsub, R) float32 (a view of p, or written into `out` when computed)."""
        raise NotImplementedError

    def mins(self, p: dict, u0: int, u1: int, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """M of the tile: (U*nsub, R) float32 (into `out` when given), or None when the format has none."""
        return None


def f16_field(kb: np.ndarray, at: int) -> np.ndarray:
    """The little-endian f16 at byte `at` of k-major blocks (nb, size, N8) -> (nb, N8) float32."""
    lo = kb[:, at, :].astype(np.uint16)
    hi = kb[:, at + 1, :].astype(np.uint16)
    return (lo | (hi << 8)).view(np.float16).astype(np.float32)


def kmajor(blocks: np.ndarray) -> np.ndarray:
    """(n_out, nb, size) uint8 block rows -> (nb, size, N8) with rows last, zero-padded to 8 rows.

    Repacked arrays put the ROW index last (rows padded to a multiple of 8): the bytes of a row tile
    (R, nb, size) are stored as (nb, bytes, R) (qtensor.py keeps one such contiguous set per row tile). A
    column tile (units u0..u1) is then one contiguous slice, numpy's loops run long, uint64 views unpack 8
    rows at a time, and the expanded tile (k, R) is directly the right-hand side of x @ tile.
    """
    n_out, nb, size = blocks.shape
    n8 = -(-n_out // 8) * 8
    out = np.zeros((nb, size, n8), dtype=np.uint8)
    out[:, :, :n_out] = blocks.transpose(1, 2, 0)
    return out


def as_u64(a: np.ndarray) -> np.ndarray:
    """View a uint8 array whose last axis is contiguous and a multiple of 8 long as uint64."""
    return a.view(U64)


def split_nibbles(src: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """lo = src & 0xF, hi = src >> 4 for uint8 arrays of the same shape (rows last, R % 8 == 0)."""
    s = as_u64(src)
    h = as_u64(hi)
    np.bitwise_and(s, NIB, out=as_u64(lo))
    np.right_shift(s, U64(4), out=h)
    np.bitwise_and(h, NIB, out=h)


def split_nibbles16(src: np.ndarray, lo: np.ndarray, hi16: np.ndarray) -> None:
    """lo = src & 0x0F, hi16 = src & 0xF0 (= 16 * high nibble): two ops instead of three."""
    s = as_u64(src)
    np.bitwise_and(s, NIB, out=as_u64(lo))
    np.bitwise_and(s, ~NIB, out=as_u64(hi16))


def or_bit(src: np.ndarray, bit: int, dst: np.ndarray, to: int, scratch: np.ndarray) -> None:
    """dst |= ((src >> bit) & 1) << to, bytewise (uint8 arrays, same shape, rows last)."""
    s = as_u64(src)
    t = as_u64(scratch)
    if to >= bit:
        np.left_shift(s, U64(to - bit), out=t)
    else:
        np.right_shift(s, U64(bit - to), out=t)
    np.bitwise_and(t, U64(0x0101010101010101 << to), out=t)
    d = as_u64(dst)
    np.bitwise_or(d, t, out=d)
