"""Quantized weight matrices: GGML block formats, repacked at load time for numpy kernels.

PLACEHOLDER (to be replaced by the real kernels): dequantizes row tiles with gguf-py on every call.
The public API below is the contract the rest of core/ uses.
"""
from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as _gguf_dequantize

from ..errors import UnsupportedModelError

SUPPORTED_TYPES = frozenset({
    QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS,
})


class QTensor:
    """A 2-D weight W of shape (n_out, n_in) in some GGML type; y = x @ W.T without a full f32 copy."""

    def __init__(self, qtype: QT, data: np.ndarray, shape: tuple[int, int]):
        if qtype not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"tensor type {qtype.name} is not supported")
        self.qtype = qtype
        self.shape = shape          # (n_out, n_in), numpy order
        self._data = data           # (n_out, bytes_per_row) uint8, or (n_out, n_in) float array

    @property
    def nbytes(self) -> int:
        """Bytes this object keeps in memory (after repacking)."""
        return int(self._data.nbytes)

    def matmul(self, x: np.ndarray, pool: Executor | None = None) -> np.ndarray:
        """x (T, n_in) float32 -> (T, n_out) float32."""
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        for r in range(0, self.shape[0], 256):
            w = _gguf_dequantize(self._data[r:r + 256], self.qtype).astype(np.float32)
            out[:, r:r + 256] = x @ w.T
        return out

    def get_rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` (embedding lookup): (len(ids),) -> (len(ids), n_in) float32."""
        return _gguf_dequantize(self._data[np.asarray(ids)], self.qtype).astype(np.float32)


def make_qtensor(qtype: QT, data: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """Repack a GGUFReader tensor's `data` (rows of blocks, or floats) of numpy shape (n_out, n_in)."""
    return QTensor(qtype, data, shape)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Rows of GGML blocks -> float32 values (same meaning as gguf.quants.dequantize)."""
    return _gguf_dequantize(data, qtype).astype(np.float32)
