"""Float weight types F32, F16 and BF16: kept as the file's rows (memory-mapped), widened per row tile.

Owns: viewing a GGUFReader tensor's data as (n_out, n_in) rows of its element type, and widening a tile
of rows to float32 exactly as gguf.quants.dequantize does.
Must not: copy a whole matrix (the mapping stays the only copy; RSS grows only with the pages touched).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})
ITEM_BYTES = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}


def float_rows(qtype: QT, data: np.ndarray, n_out: int, n_in: int) -> np.ndarray:
    """The tensor's elements as (n_out, n_in) float32 / float16 / uint16 (BF16 bit patterns)."""
    dtype = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.uint16}[qtype]
    return np.asarray(data).view(np.uint8).view(dtype).reshape(n_out, n_in)


def f16_fast(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """F16 -> F32 with integer ops (faster than numpy's own f16 cast: core/quants/NOTES.md, "floats.py");
    exact for every finite value (subnormals included), not for inf/nan (never in weights; dequantize()
    uses the cast)."""
    u = out.view(np.uint32)
    np.copyto(u, rows.view(np.uint16), casting="unsafe")
    sign = np.bitwise_and(u, np.uint32(0x8000))
    np.bitwise_xor(u, sign, out=u)
    np.left_shift(u, np.uint32(13), out=u)                  # exponent and mantissa into f32 position
    np.multiply(out, np.float32(2.0 ** 112), out=out)       # rebias the exponent (15 -> 127)
    np.left_shift(sign, np.uint32(16), out=sign)
    np.bitwise_or(u, sign, out=u)
    return out


def widen(qtype: QT, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of float_rows() -> float32 (BF16: the 16 bits become the high half of an f32)."""
    if qtype == QT.F32:
        return rows
    if out is None:
        out = np.empty(rows.shape, dtype=np.float32)
    if qtype == QT.F16:
        np.copyto(out, rows, casting="unsafe")
    else:
        u = out.view(np.uint32)
        np.copyto(u, rows, casting="unsafe")
        np.left_shift(u, np.uint32(16), out=u)
    return out
