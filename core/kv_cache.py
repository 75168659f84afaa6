"""KVCache: the preallocated float32 keys and values of a stage's layers, and the cache edits llama.cpp does.

Owns the per-layer K/V buffers, the count of cached positions, and the edits: append, truncate (drop the
tail), and shift (drop a middle span and re-rotate the later keys, llama.cpp's K-shift). It knows RoPE
only through core.ops; it never sees weights. K is stored already rotated, as llama.cpp stores it.
"""
from __future__ import annotations

import numpy as np

from .errors import ContextOverflowError
from .ops import rope, rope_angles


class KVCache:
    """K and V of `n_layer` layers for up to `n_ctx` positions, each (n_head_kv, n_ctx, head_dim) f32.

    Buffers come from np.zeros, so untouched positions cost no resident memory.
    """

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int):
        if n_ctx <= 0:
            raise ContextOverflowError(f"context size must be positive, got n_ctx={n_ctx}")
        self.n_ctx = n_ctx
        self.n_past = 0                      # positions 0..n_past-1 are cached
        shape = (n_head_kv, n_ctx, head_dim)
        self.k = [np.zeros(shape, dtype=np.float32) for _ in range(n_layer)]
        self.v = [np.zeros(shape, dtype=np.float32) for _ in range(n_layer)]

    @property
    def nbytes(self) -> int:
        """Bytes reserved for K and V (all layers, full context)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def check_room(self, pos: int, n_tokens: int) -> None:
        """Raise unless n_tokens new positions starting at `pos` (== n_past) fit in the context."""
        if pos != self.n_past:
            raise ValueError(f"evaluation at position {pos} but the KV cache holds {self.n_past} positions")
        if pos + n_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"{n_tokens} tokens at position {pos} do not fit in the context of {self.n_ctx} positions")

    def store(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write one layer's new K/V (T, n_head_kv, head_dim) at pos..pos+T-1; return its K, V up to there.

        Returns views (n_head_kv, pos + T, head_dim). Call `advance(T)` once after all layers stored.
        """
        T = k.shape[0]
        self.k[layer][:, pos:pos + T] = k.transpose(1, 0, 2)             # (n_head_kv, T, head_dim)
        self.v[layer][:, pos:pos + T] = v.transpose(1, 0, 2)
        return self.k[layer][:, :pos + T], self.v[layer][:, :pos + T]

    def advance(self, n_tokens: int) -> None:
        """Count n_tokens more cached positions (after every layer has stored them)."""
        self.n_past += n_tokens

    def clear(self) -> None:
        """Forget every position (the buffers are reused, not zeroed)."""
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Keep the first n positions (llama_kv_cache_seq_rm(n, -1))."""
        check_truncate(n, self.n_past)
        self.n_past = n

    def shift(self, n_keep: int, n_discard: int, n_rot: int, freq_base: float, freq_scale: float,
              freq_factors: np.ndarray | None = None) -> None:
        """Drop positions [n_keep, n_keep + n_discard) and move the later ones down by n_discard.

        Like llama.cpp's context shift (seq_rm then seq_add(-n_discard)): the moved keys are re-rotated
        by RoPE at position -n_discard (the K-shift), not recomputed; values move unchanged.
        """
        end = self.n_past
        check_shift(n_keep, n_discard, end)
        if n_discard == 0:
            return
        src = slice(n_keep + n_discard, end)
        dst = slice(n_keep, end - n_discard)
        cos, sin = rope_angles(np.array([-n_discard]), n_rot, freq_base, freq_scale, freq_factors)
        for k, v in zip(self.k, self.v):
            moved = k[:, src].transpose(1, 0, 2)                         # (n_moved, n_head_kv, head_dim)
            n_moved = moved.shape[0]
            rotated = rope(moved, np.repeat(cos, n_moved, 0), np.repeat(sin, n_moved, 0))
            k[:, dst] = rotated.transpose(1, 0, 2)
            v[:, dst] = v[:, src].copy()
        self.n_past = end - n_discard


def check_truncate(n: int, n_past: int) -> None:
    """Raise unless a cache holding n_past positions can be truncated to n."""
    if not 0 <= n <= n_past:
        raise ValueError(f"cannot truncate the KV cache to {n} positions: it holds {n_past}")


def check_shift(n_keep: int, n_discard: int, n_past: int) -> None:
    """Raise unless a cache holding n_past positions can keep n_keep and then discard n_discard."""
    if n_keep < 0 or n_discard < 0 or n_keep + n_discard > n_past:
        raise ValueError(f"cannot shift the KV cache (keep {n_keep}, discard {n_discard}): "
                         f"it holds {n_past} positions")
