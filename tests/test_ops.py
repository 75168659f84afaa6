"""core.ops kernels and core.kv_cache edits against hand-computed values and naive float64 loops."""
from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import ContextOverflowError
from core.kv_cache import KVCache
from core.ops import attention, rmsnorm, rope, rope_angles, silu, softmax, swiglu


def test_rmsnorm_hand_values():
    x = np.array([[3.0, 4.0]], np.float32)                               # mean square 12.5
    w = np.array([1.0, 2.0], np.float32)
    y = rmsnorm(x, w, eps=0.0)
    r = math.sqrt(12.5)
    np.testing.assert_allclose(y, [[3 / r, 8 / r]], rtol=1e-6)
    assert y.dtype == np.float32
    np.testing.assert_allclose(rmsnorm(np.zeros((1, 4), np.float32), np.ones(4, np.float32), 1e-5), 0)


def test_rope_rotates_adjacent_pairs_by_hand_angles():
    x = np.zeros((1, 1, 6), np.float32)
    x[0, 0, [0, 2, 4]] = 1.0                                             # pairs (1,0), (1,0), and a tail
    x[0, 0, 5] = 7.0
    cos, sin = rope_angles(np.array([1]), n_rot=4, freq_base=10000.0)    # angles 1 and 10000^(-1/2)
    y = rope(x, cos, sin)[0, 0]
    a1 = 10000.0 ** -0.5
    np.testing.assert_allclose(y[:4], [math.cos(1), math.sin(1), math.cos(a1), math.sin(a1)], rtol=1e-6)
    np.testing.assert_array_equal(y[4:], [1.0, 7.0])                     # dims past n_rot untouched


def test_rope_angles_are_ggml_running_product_bit_for_bit():
    """ggml's rope cache (ggml-cpu ops.cpp rope_cache_init): theta = p, then theta *= theta_scale once per
    pair, each product rounded to float32; freq factors divide and freq_scale multiplies after."""
    rng = np.random.default_rng(2)
    for n_rot, base in ((4, 10000.0), (64, 100000.0), (128, 500000.0)):
        theta_scale = np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot)))
        factors = rng.uniform(0.5, 8.0, n_rot // 2).astype(np.float32)
        for positions in (np.array([0]), np.array([77]), np.array([-9]), np.arange(1000, 1064), np.arange(4096)):
            want = np.empty((positions.size, n_rot // 2), np.float32)
            for row, p in enumerate(positions):
                theta = np.float32(p)
                for i in range(n_rot // 2):
                    want[row, i] = theta
                    theta = np.float32(theta * theta_scale)
            for ff, scale in ((None, 1.0), (factors, 0.25)):
                angles = want if ff is None else (want / ff).astype(np.float32)
                angles = (np.float32(scale) * angles).astype(np.float32)
                cos, sin = rope_angles(positions, n_rot, base, scale, ff)
                np.testing.assert_array_equal(cos, np.cos(angles))
                np.testing.assert_array_equal(sin, np.sin(angles))


def test_rope_position_zero_is_identity_and_scale_is_linear():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    c0, s0 = rope_angles(np.zeros(3), 8, 10000.0)
    np.testing.assert_array_equal(rope(x, c0, s0), x)
    # linear scaling by 1/4: position 8 scaled == position 2 unscaled
    c1, s1 = rope_angles(np.full(3, 8), 8, 10000.0, freq_scale=0.25)
    c2, s2 = rope_angles(np.full(3, 2), 8, 10000.0)
    np.testing.assert_allclose(rope(x, c1, s1), rope(x, c2, s2), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 16)).astype(np.float32)
    def score(m, n):
        cm, sm = rope_angles(np.array([m]), 16, 10000.0)
        cn, sn = rope_angles(np.array([n]), 16, 10000.0)
        return float((rope(q, cm, sm) * rope(k, cn, sn)).sum())
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)


def test_softmax_values_and_masking():
    p = softmax(np.array([[0.0, math.log(2.0), -np.inf]], np.float32))
    np.testing.assert_allclose(p, [[1 / 3, 2 / 3, 0.0]], rtol=1e-6)
    big = softmax(np.array([1000.0, 1000.0], np.float32))              # stable for large inputs
    np.testing.assert_allclose(big, [0.5, 0.5])


def test_swiglu_in_row_blocks_is_bitwise_silu_times_up():
    rng = np.random.default_rng(5)
    gate = (rng.standard_normal((37, 300)) * 30).astype(np.float32)     # 37 rows: a partial last block
    up = rng.standard_normal((37, 300)).astype(np.float32)
    assert np.array_equal(swiglu(gate, up), silu(gate) * up)


def test_silu_and_swiglu_hand_values():
    np.testing.assert_allclose(silu(np.array([0.0, 1.0, -1.0], np.float32)),
                               [0.0, 1 / (1 + math.exp(-1)), -1 / (1 + math.exp(1))], rtol=1e-6)
    np.testing.assert_allclose(swiglu(np.array([1.0], np.float32), np.array([3.0], np.float32)),
                               [3 / (1 + math.exp(-1))], rtol=1e-6)
    assert np.isfinite(silu(np.array([-1000.0, 1000.0], np.float32))).all()


def naive_attention(q, k, v, pos):
    """Per query, per head, in float64: softmax(q.k / sqrt(d)) over keys 0..pos+t, weights . v."""
    T, H, D = q.shape
    Hkv = k.shape[0]
    out = np.zeros((T, H, D))
    for t in range(T):
        for h in range(H):
            kv = h // (H // Hkv)
            s = np.array([q[t, h] @ k[kv, j] for j in range(pos + t + 1)], np.float64) / math.sqrt(D)
            w = np.exp(s - s.max())
            w /= w.sum()
            out[t, h] = w @ v[kv, :pos + t + 1]
    return out.reshape(T, H * D)


@pytest.mark.parametrize("pos,T", [(0, 1), (0, 5), (3, 1), (3, 4)])
def test_attention_matches_naive_gqa_loop(pos, T):
    rng = np.random.default_rng(pos * 10 + T)
    H, Hkv, D = 6, 2, 8
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((Hkv, pos + T, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, pos + T, D)).astype(np.float32)
    np.testing.assert_allclose(attention(q, k, v, pos), naive_attention(q, k, v, pos), atol=2e-6)


def test_long_batches_are_chunked_without_changing_results(monkeypatch):
    import core.ops
    rng = np.random.default_rng(5)
    q = rng.standard_normal((7, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 8)).astype(np.float32)
    v = rng.standard_normal((2, 9, 8)).astype(np.float32)
    whole = attention(q, k, v, 2)
    monkeypatch.setattr(core.ops, "ATTN_CHUNK", 3)
    np.testing.assert_allclose(attention(q, k, v, 2), whole, atol=1e-6)
    np.testing.assert_allclose(attention(q, k, v, 2), naive_attention(q, k, v, 2), atol=2e-6)


def test_first_position_attends_only_to_itself():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 4, 4)).astype(np.float32)
    k = rng.standard_normal((2, 3, 4)).astype(np.float32)
    v = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out = attention(q, k, v, 0).reshape(3, 4, 4)
    np.testing.assert_allclose(out[0, :2], np.broadcast_to(v[0, 0], (2, 4)), rtol=1e-6)
    np.testing.assert_allclose(out[0, 2:], np.broadcast_to(v[1, 0], (2, 4)), rtol=1e-6)


def filled_cache(n: int, rng) -> tuple[KVCache, np.ndarray, np.ndarray]:
    """A 2-layer cache holding n positions of raw (unrotated) k, v, with k rotated at its position."""
    cache = KVCache(n_layer=2, n_ctx=16, n_head_kv=2, head_dim=8)
    raw_k = rng.standard_normal((n, 2, 8)).astype(np.float32)
    v = rng.standard_normal((n, 2, 8)).astype(np.float32)
    cos, sin = rope_angles(np.arange(n), 8, 10000.0)
    for layer in range(2):
        cache.store(layer, 0, rope(raw_k, cos, sin), v)
    cache.advance(n)
    return cache, raw_k, v


def test_kv_truncate_clear_and_overflow():
    cache, _, _ = filled_cache(6, np.random.default_rng(0))
    assert cache.n_past == 6
    cache.truncate(4)
    assert cache.n_past == 4
    with pytest.raises(ValueError):
        cache.truncate(5)
    with pytest.raises(ValueError):
        cache.check_room(3, 1)                                           # must continue at n_past
    with pytest.raises(ContextOverflowError):
        cache.check_room(4, 13)
    cache.clear()
    assert cache.n_past == 0


def test_kv_shift_rerotates_moved_keys_like_fresh_positions():
    """After dropping [2, 5), key j moved to j-3 equals the raw key rotated at position j-3."""
    cache, raw_k, v = filled_cache(9, np.random.default_rng(1))
    cache.shift(n_keep=2, n_discard=3, n_rot=8, freq_base=10000.0, freq_scale=1.0)
    assert cache.n_past == 6
    keep = [0, 1, 5, 6, 7, 8]
    cos, sin = rope_angles(np.arange(6), 8, 10000.0)
    want_k = rope(raw_k[keep], cos, sin).transpose(1, 0, 2)              # (n_head_kv, 6, head_dim)
    for layer in range(2):
        np.testing.assert_allclose(cache.k[layer][:, :6], want_k, atol=1e-5)
        np.testing.assert_array_equal(cache.v[layer][:, :6], v[keep].transpose(1, 0, 2))
    with pytest.raises(ValueError):
        cache.shift(4, 3, 8, 10000.0, 1.0)


def test_rope_apply_rounds_as_ggml_pair_by_pair():
    """rope_apply's three calls (x * C + swapped x * S) give ggml's (x0*c - x1*s, x0*s + x1*c) bit for bit,
    signed zeros included, for q and k rotated together and with dims past n_rot passed through."""
    from core.ops import rope_apply, rope_tables
    rng = np.random.default_rng(7)
    for n_rot, head_dim in ((64, 64), (32, 64), (128, 128)):
        x = (rng.standard_normal((3, 7, head_dim)) * 20).astype(np.float32)
        x[0, :, ::3] = -0.0
        cos, sin = rope_angles(np.array([0, 5, 4097]), n_rot, 10000.0)   # position 0: sin is +0
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        c, s = cos[:, None, :], sin[:, None, :]
        want = x.copy()
        want[..., 0:n_rot:2] = x0 * c - x1 * s                             # each product and sum in f32
        want[..., 1:n_rot:2] = x0 * s + x1 * c
        got = rope_apply(x, *rope_tables(cos, sin))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(rope(x, cos, sin).view(np.uint32), want.view(np.uint32))
