"""GGML's 256-element super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS.

Owns: each format's byte layout (documented beside it), its load-time repacking into the k-major layout
of layout.py (6-bit / 4-bit sub-block scales unpacked to one byte each, f16 fields to float32), and the
unpacking of a tile's codes, scales and mins.
Must not: do any matrix arithmetic (qtensor.py does), or keep a reference to the memory-mapped file.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from .layout import U64, BlockFormat, as_u64, f16_field, or_bit, split_nibbles, split_nibbles16
from .legacy import PairedMixin, iq4_codes, pair_rows

# A super-block holds 256 weights in sub-blocks of 16 or 32 weights, each with its own small integer scale
# (and min) multiplied by the super-block's f16 `d` (and `dmin`). The effective scale S = d * sc is formed
# per tile in float32 exactly as gguf-py does (_d_times), so dequantization stays bit-exact.


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K scales (nb, 12, N) -> 6-bit (sc, m), each (nb, 8, N) uint8.
    Bytes 0-3: sc[0..3] low 6 bits (top 2 bits: sc[4..7] high bits); 4-7: m[0..3] likewise for m[4..7];
    8-11: sc[4..7] low nibble | m[4..7] high nibble."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def crumbs_in_place(src: np.ndarray, out: np.ndarray, top: int = 3) -> None:
    """out[j] = src & (3 << 2j) (= 4^j * field j) for j < top; out[j] = (src >> 2) & 0x30 (16 * field 3)
    for j >= top. One op per field (two for the last when top == 3)."""
    s = as_u64(src)
    for j in range(4):
        o = as_u64(out[j])
        if j < top:
            np.bitwise_and(s, U64(0x0303030303030303 << (2 * j)), out=o)
        else:
            np.right_shift(s, U64(2), out=o)
            np.bitwise_and(o, U64(0x3030303030303030), out=o)


def crumb_factor(U: int, scales: tuple[float, ...]) -> np.ndarray:
    """x factors of crumb_order tiles whose field j carries the power of two scales[j]."""
    f = np.empty((4, U * 64), dtype=np.float32)
    f[:] = 1 / np.array(scales, dtype=np.float32)[:, None]
    return f.reshape(-1)


def crumb_order(U: int) -> np.ndarray:
    """Tile order (j, unit, n, l) of 2-bit fields (Q2_K / Q3_K) -> column 256u + 128n + 32j + l."""
    j, u, n, l = np.meshgrid(np.arange(4), np.arange(U), np.arange(2), np.arange(32), indexing="ij")
    return (u * 256 + n * 128 + j * 32 + l).reshape(-1)


def _d_times(p: dict, key: str, small: np.ndarray, u0: int, u1: int, r0: int, r1: int,
             out: np.ndarray | None = None, neg: bool = False) -> np.ndarray:
    """p[key][u, r] * small[u, s, r] in float32 -> (U*nsub, R): the effective sub-block scales (negated
    when neg). Written into `out` when given (one fused pass, no temporaries)."""
    d = p[key][u0:u1, None, r0:r1]                              # (U, 1, R)
    if out is None:
        out = np.empty((small.shape[0] * small.shape[1], r1 - r0), dtype=np.float32)
    o3 = out.reshape(small.shape)
    np.multiply(d, small, out=o3)                               # the f32 loop (small is cast exactly)
    if neg:
        np.negative(o3, out=o3)
    return out


class _CrumbFormat(BlockFormat):
    """Q2_K and Q3_K: 2-bit fields ("crumbs") j of byte 32n+l hold weight 128n+32j+l, 16 sub-blocks of 16."""

    def order(self, U):
        return crumb_order(U)

    def run_shape(self, U):
        return (4, U, 2, 2)                                     # (j, U, n, l // 16)

    def run_scales(self, S, U):                                 # sub-block 8n + 2j + l//16
        n, R = S.shape[0], S.shape[-1]
        return S.reshape(n, U, 2, 4, 2, R).transpose(0, 3, 1, 2, 4, 5)


class Q2_K(_CrumbFormat):
    """84 bytes / 256: scales[16] (low nibble sc, high nibble m, per 16 weights) | qs[64] (2 bits) |
    d f16 | dmin f16. Weight 128n+32j+l = d*sc[s] * ((qs[32n+l] >> 2j) & 3) - dmin*m[s], s = index/16.
    Repacked: qs (nb,64,N8) + scales (nb,16,N8) + d, dmin f32 = 88 bytes (1.05x)."""

    qtype, block, size, sub, has_mins, f16_at = QT.Q2_K, 256, 84, 16, True, (80, 82)

    def repack(self, kb):
        return {"sc": np.ascontiguousarray(kb[:, 0:16]), "qs": np.ascontiguousarray(kb[:, 16:80]),
                "d": f16_field(kb, 80), "dmin": f16_field(kb, 82)}

    def xfactor(self, U):
        return crumb_factor(U, (1, 4, 16, 64))

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        U, R = u1 - u0, r1 - r0
        crumbs_in_place(p["qs"][u0:u1, :, r0:r1].reshape(U, 2, 32, R), tmp.reshape(4, U, 2, 32, R), top=4)
        np.copyto(out, tmp, casting="unsafe")

    def scales(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "d", p["sc"][u0:u1, :, r0:r1] & 0x0F, u0, u1, r0, r1, out)

    def mins(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "dmin", p["sc"][u0:u1, :, r0:r1] >> 4, u0, u1, r0, r1, out, neg=True)


_Q3_SHIFTS = np.array([[2, 3, 4, 3], [2, 1, 0, 1]], dtype=U64)[:, :, None, None, None]
_Q3_MASKS = np.array([0x04, 0x10, 0x40, 0x40], dtype=U64)[:, None, None, None] * U64(0x0101010101010101)


class Q3_K(_CrumbFormat):
    """110 bytes / 256: hmask[32] | qs[64] (low 2 bits) | scales[12] (16 x 6 bits) | d f16.
    Weight 128n+32j+l = d*(sc[s]-32) * (low2 - (0 if hmask[l] bit (4n+j) else 4)).
    scales: sc[i] = ((b[i%8] >> 4*(i//8)) & 0xF) | (((b[8+i%4] >> 2*(i//4)) & 3) << 4).
    Codes here are low2 | hbit<<2 with offset -4. Repacked: hmask + qs + sc int8 (nb,16,N8) + d f32
    = 116 bytes (1.05x)."""

    qtype, block, size, sub, offset, f16_at = QT.Q3_K, 256, 110, 16, -4.0, (108,)

    def repack(self, kb):
        s = kb[:, 96:108]
        i = np.arange(16)
        low = (s[:, i % 8] >> (4 * (i // 8))[None, :, None]) & 0x0F
        high = (s[:, 8 + i % 4] >> (2 * (i // 4))[None, :, None]) & 0x03
        sc = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)
        return {"hm": np.ascontiguousarray(kb[:, 0:32]), "qs": np.ascontiguousarray(kb[:, 32:96]),
                "sc": sc, "d": f16_field(kb, 108)}

    def xfactor(self, U):
        return crumb_factor(U, (1, 4, 16, 16))

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        U, R = u1 - u0, r1 - r0
        t = tmp.reshape(4, U, 2, 32, R)                         # (j, U, n, l, R): weight 128n+32j+l
        crumbs_in_place(p["qs"][u0:u1, :, r0:r1].reshape(U, 2, 32, R), t)   # field j times 1, 4, 16, 16
        # hmask bit 4n+j of byte l -> bit (2, 4, 6, 6)[j] (4 x the field's scale) of t[j, :, n, l]:
        # a left shift by (2, 3, 4, 3)[j] for n = 0, a right shift by (2, 1, 0, 1)[j] for n = 1
        hm = as_u64(p["hm"][u0:u1, :, r0:r1])[None]              # (1, U, 32, R/8)
        h = np.empty((4, U, 32, R // 8), dtype=U64)
        for n, shift in ((0, np.left_shift), (1, np.right_shift)):
            shift(hm, _Q3_SHIFTS[n], out=h)
            np.bitwise_and(h, _Q3_MASKS, out=h)
            d = as_u64(t[:, :, n])                              # (4, U, 32, R/8)
            np.bitwise_or(d, h, out=d)
        np.copyto(out, tmp, casting="unsafe")

    def scales(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "d", p["sc"][u0:u1, :, r0:r1], u0, u1, r0, r1, out)


class Q4_K(BlockFormat):
    """144 bytes / 256: d f16 | dmin f16 | scales[12] (8 x 6-bit sc and m, see _scale_min_k4) | qs[128].
    Weight 64j+l = d*sc[2j] * (qs[32j+l] & 0xF) - dmin*m[2j]; weight 64j+32+l uses qs[32j+l] >> 4 and
    sub-block 2j+1. Repacked: qs (nb,128,N8) + sc, m bytes (nb,8,N8) + d, dmin f32 = 152 bytes (1.06x)."""

    qtype, block, size, sub, has_mins, f16_at = QT.Q4_K, 256, 144, 32, True, (0, 2)
    _qs_at = 16

    def repack(self, kb):
        sc, mn = _scale_min_k4(kb[:, 4:16])
        a = self._qs_at
        return {"d": f16_field(kb, 0), "dmin": f16_field(kb, 2), "sc": sc, "m": mn,
                "qs": np.ascontiguousarray(kb[:, a:a + 128])}

    def order(self, U):
        h, u, g, l = np.meshgrid(np.arange(2), np.arange(U), np.arange(4), np.arange(32), indexing="ij")
        return (u * 256 + g * 64 + h * 32 + l).reshape(-1)

    def run_shape(self, U):
        return (2, U, 4)                                        # (h, U, g): sub-block 2g + h

    def run_scales(self, S, U):
        n, R = S.shape[0], S.shape[-1]
        return S.reshape(n, U, 4, 2, R).transpose(0, 3, 1, 2, 4)

    def xfactor(self, U):
        f = np.ones((2, U * 128), dtype=np.float32)
        f[1] = 1 / 16                                           # high nibbles stay in place (16 * code)
        return f.reshape(-1)

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        U, R = u1 - u0, r1 - r0
        t = tmp.reshape(2, U, 4, 32, R)                         # (h, U, g, l, R): weight 64g+32h+l
        split_nibbles16(p["qs"][u0:u1, :, r0:r1].reshape(U, 4, 32, R), t[0], t[1])
        np.copyto(out, tmp, casting="unsafe")

    def scales(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "d", p["sc"][u0:u1, :, r0:r1], u0, u1, r0, r1, out)

    def mins(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "dmin", p["m"][u0:u1, :, r0:r1], u0, u1, r0, r1, out, neg=True)


class Q5_K(Q4_K):
    """176 bytes / 256: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]. As Q4_K, plus the 5th bit of
    weight 32s+l is (qh[l] >> s) & 1. Repacked: Q4_K's arrays + qh (nb,32,N8) = 184 bytes (1.05x)."""

    qtype, size = QT.Q5_K, 176
    _qs_at = 48

    def repack(self, kb):
        p = super().repack(kb)
        p["qh"] = np.ascontiguousarray(kb[:, 16:48])
        return p

    def xfactor(self, U):
        return None

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        U, R = u1 - u0, r1 - r0
        t = tmp.reshape(2, U, 4, 32, R)
        split_nibbles(p["qs"][u0:u1, :, r0:r1].reshape(U, 4, 32, R), t[0], t[1])
        qh = p["qh"][u0:u1, :, r0:r1]                           # bit s of qh[l]: weight 32s+l, s = 2g+h
        scratch = np.empty((U, 32, R), dtype=np.uint8)
        for g in range(4):
            for h in range(2):
                or_bit(qh, 2 * g + h, t[h, :, g], 4, scratch)
        np.copyto(out, tmp, casting="unsafe")


class Q6_K(BlockFormat):
    """210 bytes / 256: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] int8 | d f16.
    Weight 128n+64h+c: low = (ql[64n+c] >> 4h) & 0xF; weight 128n+32j+l: high = (qh[32n+l] >> 2j) & 3;
    value = d*sc[index/16] * ((low | high << 4) - 32). Repacked at load to int8 codes (q - 32, natural
    order) + sc int8 + d f32 = 276 bytes (1.31x, within the 1.35x allowed), so a tile is one cast."""

    qtype, block, size, sub, f16_at = QT.Q6_K, 256, 210, 16, (208,)

    def repack(self, kb):
        nb, _, n = kb.shape
        ql = kb[:, 0:128].reshape(nb, 2, 64, n)
        qh = kb[:, 128:192].reshape(nb, 2, 32, n)
        q = np.empty((nb, 2, 4, 32, n), dtype=np.uint8)         # (nb, half, j, l, N)
        q.reshape(nb, 2, 2, 64, n)[:] = (ql[:, :, None] >> np.array([0, 4], np.uint8)[:, None, None]) & 0x0F
        q |= ((qh[:, :, None] >> (2 * np.arange(4, dtype=np.uint8))[:, None, None]) & 0x03) << 4
        codes = (q.astype(np.int16) - 32).astype(np.int8).reshape(nb, 256, n)
        return {"q": codes, "sc": np.ascontiguousarray(kb[:, 192:208]).view(np.int8), "d": f16_field(kb, 208)}

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        np.copyto(out.reshape(u1 - u0, 256, r1 - r0), p["q"][u0:u1, :, r0:r1], casting="unsafe")

    def scales(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "d", p["sc"][u0:u1, :, r0:r1], u0, u1, r0, r1, out)


class IQ4_XS(PairedMixin, BlockFormat):
    """136 bytes / 256: d f16 | scales_h u16 | scales_l[4] | qs[128]. Sub-block s (32 weights) has
    ls = (((scales_l[s/2] >> 4*(s%2)) & 0xF) | (((scales_h >> 2s) & 3) << 4)) - 32; weight 32s+j =
    d*ls * IQ4_VALUES[qs[16s+j] & 0xF], weight 32s+16+j uses qs[16s+j] >> 4.
    Repacked: nibbles in weight order, two rows per byte (nb,256,N8/2) + ls int8 (nb,8,N8) + d f32
    = 140 bytes (1.03x)."""

    qtype, block, size, sub = QT.IQ4_XS, 256, 136, 32

    def repack(self, kb):
        nb, _, n = kb.shape
        sh = kb[:, 2].astype(np.uint16) | (kb[:, 3].astype(np.uint16) << 8)     # (nb, N)
        s = np.arange(8)
        low = (kb[:, 4 + s // 2] >> (4 * (s % 2)).astype(np.uint8)[None, :, None]) & 0x0F
        high = ((sh[:, None, :] >> (2 * s).astype(np.uint16)[None, :, None]) & 0x03).astype(np.uint8)
        ls = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)
        qs = kb[:, 8:136].reshape(nb, 8, 16, n)
        nib = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 256, n)          # weight order
        return {"d": f16_field(kb, 0), "sc": ls, "qp": pair_rows(nib)}

    def codes(self, p, u0, u1, r0, r1, out, tmp):
        iq4_codes(p["qp"], u0, u1, r0, r1, out)

    def scales(self, p, u0, u1, r0, r1, out=None):
        return _d_times(p, "d", p["sc"][u0:u1, :, r0:r1], u0, u1, r0, r1, out)
