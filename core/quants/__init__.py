"""Quantized weight matrices: GGML block formats, repacked at load time for numpy kernels.

Owns the public API the rest of core/ codes against: make_qtensor, dequantize (bit-exact with
gguf.quants.dequantize), QTensor (matmul, get_rows, nbytes, qtype, shape), TilePool, SUPPORTED_TYPES.
Modules: layout.py (repacked layout, bit helpers), legacy.py (32-weight blocks), kquants.py (K-quants,
IQ4_XS), floats.py (F32/F16/BF16), qtensor.py (tiles, products, threads); measurements: NOTES.md.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from .floats import float_rows, widen
from .layout import FORMATS
from .qtensor import SUPPORTED_TYPES, QTensor, TilePool, check_type, reconstruct, repack_blocks

__all__ = ["SUPPORTED_TYPES", "QTensor", "TilePool", "make_qtensor", "dequantize"]


def make_qtensor(qtype: QT, data: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """Repack a GGUFReader tensor's `data` (rows of blocks, or floats) of numpy shape (n_out, n_in)."""
    return QTensor(qtype, data, shape)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Rows of GGML blocks (..., row_bytes) or floats -> float32 (..., n) (as gguf.quants.dequantize)."""
    qtype = check_type(qtype)
    raw = np.asarray(data)
    if qtype in (QT.F32, QT.F16):
        dtype = np.float32 if qtype == QT.F32 else np.float16
        return np.array(raw.view(dtype), dtype=np.float32)
    raw = raw.view(np.uint8)
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    rows = raw.reshape(-1, row_bytes)
    if qtype == QT.BF16:
        n_in = row_bytes // 2
        return widen(qtype, float_rows(qtype, rows, rows.shape[0], n_in)).reshape(*lead, n_in)
    fmt = FORMATS[qtype]
    n_in = row_bytes // fmt.size * fmt.block
    p = repack_blocks(fmt, rows, rows.shape[0], n_in)
    return reconstruct(fmt, p, n_in, rows.shape[0]).reshape(*lead, n_in)
