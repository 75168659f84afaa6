"""GGML's 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.

Owns: each format's byte layout (documented beside it), its load-time repacking into the k-major layout
of layout.py, and the unpacking of a tile's codes, scales and mins.
Must not: do any matrix arithmetic (qtensor.py does), or keep a reference to the memory-mapped file.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from .layout import NIB, BlockFormat, as_u64, f16_field, or_bit, split_nibbles, split_nibbles16

# Every block starts with an f16 scale `d`, stored repacked as float32 (an f16->f32 cast per call is slow), so
# scales() and mins() return views of the repacked arrays (`stored`).

# IQ4_NL's non-linear code book (ggml's kvalues_iq4nl), also used by IQ4_XS
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.float32)


def half_order(U: int) -> np.ndarray:
    """Tile order (half, unit, j) of 32-weight blocks split into low and high nibbles -> column."""
    h, u, j = np.meshgrid(np.arange(2), np.arange(U), np.arange(16), indexing="ij")
    return (u * 32 + h * 16 + j).reshape(-1)


class HalvesMixin:
    """Tile order of 32-weight blocks unpacked as (half, unit, j): runs (2, U), both halves of unit u
    scaled by sub-block u."""

    def order(self, U):
        return half_order(U)

    def run_shape(self, U):
        return (2, U)

    def run_scales(self, S, U):
        return S[:, None]


def half_factor(U: int) -> np.ndarray:
    """x factors for half_order tiles whose high halves hold 16 * nibble."""
    f = np.ones((2, U * 16), dtype=np.float32)
    f[1] = 1 / 16
    return f.reshape(-1)


# IQ4 codes are repacked so that one byte holds the nibbles of two adjacent ROWS (low: even row); a
# 256-entry table of float32 pairs then expands a byte into both rows' values with one gather
IQ4_PAIRS = np.stack([IQ4_VALUES[np.arange(256) & 15], IQ4_VALUES[np.arange(256) >> 4]], axis=1)
IQ4_PAIRS = np.ascontiguousarray(IQ4_PAIRS).view(np.float64).reshape(256)


def pair_rows(nib: np.ndarray) -> np.ndarray:
    """Nibble values (nb, n, N8) uint8 -> bytes (nb, n, N8/2): rows 2i (low) and 2i+1 (high)."""
    return np.ascontiguousarray(nib[..., 0::2] | (nib[..., 1::2] << 4))


class PairedMixin:
    """Formats whose "qp" array holds two rows per byte (see pair_rows)."""

    def take_rows(self, p, idx):
        rows = {k: np.take(v, idx, axis=-1) for k, v in p.items() if k != "qp"}
        nib = (np.take(p["qp"], idx // 2, axis=-1) >> (4 * (idx % 2)).astype(np.uint8)) & 0x0F
        rows["qp"] = pair_rows(nib)
        return rows


def iq4_codes(qp: np.ndarray, u0: int, u1: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out (U*block, R) float32 = IQ4_VALUES of the row-paired bytes qp[u0:u1, :, r0/2:r1/2]."""
    src = qp[u0:u1, :, r0 // 2:r1 // 2]
    np.take(IQ4_PAIRS, src, out=out.view(np.float64).reshape(src.shape), mode="clip")


class Q4_0(HalvesMixin, BlockFormat):
    """18 bytes / 32 weights: d f16 | qs[16]. Weight j = d * ((qs[j] & 0xF) - 8), weight 16+j uses
    qs[j] >> 4. Repacked: qs (nb, 16, N8) + d f32 (nb, N8) = 20 bytes/block (1.11x)."""

    qtype, block, size, sub, offset, run = QT.Q4_0, 32, 18, 32, -8.0, 16
    stored = True

    def repack(self, kb):
        return {"d": f16_field(kb, 0), "qs": np.ascontiguousarray(kb[:, 2:18])}

    def xfactor(self, U):
        return half_factor(U)

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        self._nibbles(p, u0, u1, r0, r1, tmp)
        np.copyto(out, tmp, casting="unsafe")

    def mix_x(self, xt, U):
        x = xt.reshape(xt.shape[0], -1, 2, U * 16)             # (T, n_ct, half, U*16)
        x[:, :, 0] -= x[:, :, 1]                              # x_lo - x_hi/16 (see dot_codes)

    def dot_codes(self, p, u0, u1, r0, r1, out, tmp):
        """lo, then the raw bytes b = lo + 16 hi as they are: (x_lo - x_hi/16)*lo + (x_hi/16)*b is
        x_lo*lo + x_hi*hi (no cancellation beyond 1/16), with one mask pass instead of two."""
        U, R = u1 - u0, r1 - r0
        src, o = p["qs"][u0:u1, :, r0:r1], out.reshape(2, U, 16, R)
        t = tmp[:U * 16].reshape(U, 16, R)
        np.bitwise_and(as_u64(src), NIB, out=as_u64(t))
        np.copyto(o[0], t, casting="unsafe")
        np.copyto(o[1], src, casting="unsafe")

    def _nibbles(self, p, u0, u1, r0, r1, tmp):
        t = tmp.reshape(2, u1 - u0, 16, r1 - r0)                  # (half, U, j, R): weight 16*half + j
        split_nibbles16(p["qs"][u0:u1, :, r0:r1], t[0], t[1])    # high half holds 16 * nibble

    def scales(self, p, u0, u1, r0, r1, out=None):
        return p["d"][u0:u1, r0:r1]


class IQ4_NL(PairedMixin, BlockFormat):
    """18 bytes / 32 weights: d f16 | qs[16], nibbles as Q4_0 but each indexes IQ4_VALUES:
    weight = d * IQ4_VALUES[nibble]. Repacked: the 32 nibbles of each row in weight order, two rows per
    byte (see pair_rows) (nb, 32, N8/2) + d f32 = 20 bytes/block (1.11x)."""

    qtype, block, size, sub = QT.IQ4_NL, 32, 18, 32
    stored = True

    def repack(self, kb):
        qs = kb[:, 2:18]
        return {"d": f16_field(kb, 0), "qp": pair_rows(np.concatenate([qs & 0x0F, qs >> 4], axis=1))}

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        iq4_codes(p["qp"], u0, u1, r0, r1, out)

    def scales(self, p, u0, u1, r0, r1, out=None):
        return p["d"][u0:u1, r0:r1]


class Q4_1(Q4_0):
    """20 bytes / 32 weights: d f16 | m f16 | qs[16]. Weight = d * nibble + m (nibbles as Q4_0).
    Repacked: qs + d f32 + m f32 = 24 bytes/block (1.20x): m kept as f32 like d, so a product reads both
    as they are (casting m per call cost ~50 us of a SmolLM2 product: core/quants/NOTES.md)."""

    qtype, size, offset, has_mins, f16_at = QT.Q4_1, 20, 0.0, True, (0, 2)

    def repack(self, kb):
        return {"d": f16_field(kb, 0), "m": f16_field(kb, 2), "qs": np.ascontiguousarray(kb[:, 4:20])}

    def mins(self, p, u0, u1, r0, r1, out=None):
        return p["m"][u0:u1, r0:r1]


class Q5_0(HalvesMixin, BlockFormat):
    """22 bytes / 32 weights: d f16 | qh u32 (bit j = 5th bit of weight j) | qs[16] (nibbles as Q4_0).
    Weight = d * ((nibble | hbit << 4) - 16). Repacked: qs (nb,16,N8) + qh bytes (nb,4,N8) + d f32
    = 24 bytes/block (1.09x)."""

    qtype, block, size, sub, offset, run = QT.Q5_0, 32, 22, 32, -16.0, 16
    stored = True
    _qs_at = 6

    def repack(self, kb):
        a = self._qs_at
        return {"d": f16_field(kb, 0), "qh": np.ascontiguousarray(kb[:, a - 4:a]),
                "qs": np.ascontiguousarray(kb[:, a:a + 16])}

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        U, R = u1 - u0, r1 - r0
        t = tmp.reshape(2, U, 16, R)
        split_nibbles(p["qs"][u0:u1, :, r0:r1], t[0], t[1])
        # qh byte i, bit b -> weight 8i+b = 16*half + 8*(i%2) + b with half = i//2
        qh = p["qh"][u0:u1, :, r0:r1].reshape(U, 2, 2, R).transpose(1, 0, 2, 3)   # (half, U, i%2, R)
        t8 = tmp.reshape(2, U, 2, 8, R)
        scratch = np.empty((2, U, 2, R), dtype=np.uint8)
        for b in range(8):
            or_bit(qh, b, t8[:, :, :, b], 4, scratch)
        np.copyto(out, tmp, casting="unsafe")

    def scales(self, p, u0, u1, r0, r1, out=None):
        return p["d"][u0:u1, r0:r1]


class Q5_1(Q5_0):
    """24 bytes / 32 weights: d f16 | m f16 | qh u32 | qs[16]. Weight = d * (nibble | hbit << 4) + m.
    Repacked: qs + qh + d f32 + m f32 = 28 bytes/block (1.17x; m as in Q4_1)."""

    qtype, size, offset, has_mins, f16_at = QT.Q5_1, 24, 0.0, True, (0, 2)
    _qs_at = 8

    def repack(self, kb):
        p = super().repack(kb)
        p["m"] = f16_field(kb, 2)
        return p

    def mins(self, p, u0, u1, r0, r1, out=None):
        return p["m"][u0:u1, r0:r1]


class Q8_0(BlockFormat):
    """34 bytes / 32 weights: d f16 | qs[32] int8. Weight = d * qs[j].
    Repacked: qs int8 (nb, 32, N8) + d f32 = 36 bytes/block (1.06x)."""

    qtype, block, size, sub = QT.Q8_0, 32, 34, 32
    stored = True

    def repack(self, kb):
        return {"d": f16_field(kb, 0), "qs": np.ascontiguousarray(kb[:, 2:34]).view(np.int8)}

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        np.copyto(out.reshape(u1 - u0, 32, r1 - r0), p["qs"][u0:u1, :, r0:r1], casting="unsafe")

    def scales(self, p, u0, u1, r0, r1, out=None):
        return p["d"][u0:u1, r0:r1]

