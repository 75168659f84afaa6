"""The float32 math of one LLaMA block, as small pure numpy kernels (no state, no I/O, no weights).

Each kernel follows what llama.cpp's CPU backend computes (ggml-cpu ops.cpp), in float32 with the few
float64 accumulations ggml itself uses (RMSNorm's sum of squares, softmax's sum). Weight matrices and
the KV cache live elsewhere (core/quants, core/kv_cache); this module must not import them.
"""
from __future__ import annotations

import numpy as np

ATTN_CHUNK = 64    # queries per score block in attention(): bounds the (T, L) scores, and skips most of the
                   # masked upper triangle (256-token prompt: 34 -> 16 ms per layer, measured)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight.

    Like ggml_compute_forward_rms_norm_f32: the sum of squares of float32 products is accumulated in
    float64, the mean is rounded to float32, and the scale 1/sqrt(mean + eps) is a float32 value.
    """
    x = np.asarray(x, dtype=np.float32)                                  # (T, n)
    sq = (x * x).astype(np.float64)                                      # (T, n) f32 products, f64 sum
    mean = (sq.sum(axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)   # (T, 1)
    scale = (np.float32(1.0) / np.sqrt(mean + np.float32(eps))).astype(np.float32)
    return (x * scale) * weight                                          # (T, n)


def rope_angles(positions: np.ndarray, n_rot: int, freq_base: float, freq_scale: float = 1.0,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of RoPE's angles for each position and each rotated pair: two (P, n_rot // 2) f32.

    ggml's rope cache: theta_0 = pos, theta_{i+1} = theta_i * base^(-2/n_rot) (a float32 running
    product), then theta * freq_scale (linear scaling) and / freq_factors[i] when the model has them.
    """
    theta_scale = np.float32(np.power(np.float32(freq_base), np.float32(-2.0) / np.float32(n_rot)))
    steps = np.empty((np.size(positions), n_rot // 2), dtype=np.float32)   # (P, n_rot // 2)
    steps[:, 0] = np.asarray(positions, dtype=np.float32).reshape(-1)
    steps[:, 1:] = theta_scale
    angles = np.multiply.accumulate(steps, axis=-1, dtype=np.float32)    # the running product, one step at a
                                                                         # time (one call: 52 -> 7 us a token)
    if freq_factors is not None:
        angles = (angles / np.asarray(freq_factors, dtype=np.float32)).astype(np.float32)
    angles = (np.float32(freq_scale) * angles).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_tables(cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rope_angles' cos and sin (T, n_rot // 2) as the two factors rope_apply multiplies by, each
    (T, 1, n_rot // 2, 2) f32: C = (c_i, c_i) and S = (-s_i, s_i) for pair i."""
    s = np.asarray(sin, dtype=np.float32)
    C = np.repeat(np.asarray(cos, dtype=np.float32)[:, None, :, None], 2, axis=-1)
    return C, np.stack([-s, s], axis=-1)[:, None]


def rope_apply(x: np.ndarray, C: np.ndarray, S: np.ndarray) -> np.ndarray:
    """rope() with rope_tables' factors: x (T, n_heads, head_dim) -> a new (T, n_heads, head_dim) array.

    Pair (x0, x1) becomes (x0*c + x1*(-s), x1*c + x0*s): the same float32 roundings as ggml's
    (x0*c - x1*s, x0*s + x1*c), since x1*(-s) = -(x1*s), a + (-b) = a - b and addition commutes; three
    numpy calls for any number of heads (q and k of a layer at once), where rotating each half took ten."""
    T, H, D = x.shape
    n_rot = 2 * C.shape[-2]
    x4 = x[..., :n_rot].reshape(T, H, n_rot // 2, 2)                    # (T, H, pairs, 2)
    out = np.empty((T, H, D), dtype=np.float32)
    o4 = out[..., :n_rot].reshape(T, H, n_rot // 2, 2)                  # a view of out (pairs split off)
    np.multiply(x4, C, out=o4)
    o4 += x4[..., ::-1] * S                                              # (x1, x0) * (-s, s)
    if n_rot < D:
        out[..., n_rot:] = x[..., n_rot:]                                # dims past n_rot pass through
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first n_rot dims of every head (GGUF "normal" RoPE).

    Args:
        x: (T, n_heads, head_dim) float32.
        cos, sin: (T, n_rot // 2) float32 from rope_angles; dims past n_rot pass through unchanged.
    Returns:
        (T, n_heads, head_dim) float32, a new array.
    """
    return rope_apply(np.asarray(x, dtype=np.float32), *rope_tables(cos, sin))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32; the normalising sum is accumulated in float64 (as ggml)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))                      # f32; exp(-inf) = 0 for masks
    total = e.sum(axis=axis, keepdims=True, dtype=np.float64)
    return e * (1.0 / total).astype(np.float32)


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x)) in float32, into `out` (a new array when None)."""
    x = np.asarray(x, dtype=np.float32)
    out = np.negative(x, out=out)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += np.float32(1.0)
    return np.divide(x, out, out=out)


SWIGLU_ROWS = 16   # rows per block in swiglu(): 16 x n_ff floats stay in cache through its four passes


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU's hidden activation: silu(gate) * up, both (T, n_ff) float32.

    The same operations as silu(gate) * up, in place in one output array, block of rows by block
    (timings: core/quants/NOTES.md, "ops.py")."""
    gate = np.asarray(gate, dtype=np.float32)
    out = np.empty_like(gate)                                            # (T, n_ff)
    for i in range(0, gate.shape[0], SWIGLU_ROWS):
        o = silu(gate[i:i + SWIGLU_ROWS], out=out[i:i + SWIGLU_ROWS])
        o *= up[i:i + SWIGLU_ROWS]
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int) -> np.ndarray:
    """Causal grouped-query attention of T new queries over L = pos + T cached positions.

    Args:
        q: (T, n_head, head_dim) float32, already rotated; query t sits at position pos + t.
        k: (n_head_kv, L, head_dim) float32, the cache's keys for positions 0..L-1 (rotated).
        v: (n_head_kv, L, head_dim) float32.
        pos: position of the first query.
    Returns:
        (T, n_head * head_dim) float32; query head h reads KV head h // (n_head // n_head_kv), as ggml's
        broadcasting mul_mat does. Scores are scaled by 1/sqrt(head_dim) and masked to keys <= position;
        long batches run in blocks of ATTN_CHUNK queries (each row's math is the same).
    """
    T, n_head, head_dim = q.shape
    if T > ATTN_CHUNK:                                                   # bound the (.., T, L) score tensor
        return np.concatenate([attention(q[t:t + ATTN_CHUNK], k[:, :pos + t + ATTN_CHUNK],
                                         v[:, :pos + t + ATTN_CHUNK], pos + t)
                               for t in range(0, T, ATTN_CHUNK)])
    n_head_kv, L, _ = k.shape
    n_gqa = n_head // n_head_kv
    # (n_head_kv, n_gqa * T, head_dim): the query heads sharing one KV head, stacked head-major.
    qg = q.reshape(T, n_head_kv, n_gqa, head_dim).transpose(1, 2, 0, 3).reshape(n_head_kv, n_gqa * T, head_dim)
    scores = np.matmul(qg, k.transpose(0, 2, 1))                         # (n_head_kv, n_gqa*T, L)
    scores *= np.float32(1.0 / np.sqrt(head_dim))
    if T > 1:                                                            # one query sees every cached key
        q_pos = np.tile(np.arange(pos, pos + T), n_gqa)                  # (n_gqa*T,) row -> position
        future = np.arange(L)[None, :] > q_pos[:, None]                  # (n_gqa*T, L)
        scores += np.where(future, np.float32(-np.inf), np.float32(0))   # additive causal mask
    probs = softmax(scores, axis=-1)                                     # (n_head_kv, n_gqa*T, L)
    out = np.matmul(probs, v)                                            # (n_head_kv, n_gqa*T, head_dim)
    out = out.reshape(n_head_kv, n_gqa, T, head_dim).transpose(2, 0, 1, 3)   # (T, n_head_kv, n_gqa, D)
    return np.ascontiguousarray(out.reshape(T, n_head * head_dim), dtype=np.float32)
