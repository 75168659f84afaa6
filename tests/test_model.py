"""Stage: prefill vs single steps, chained stages vs one stage, KV edits, threads, tied output, errors.

Uses small synthetic files (core.tools.synth) and a float64 re-computation of the head from gguf's own
dequantization where a value is checked.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from core.errors import ContextOverflowError, TokenizerError
from core.loader import open_model
from core.model import Stage
from core.tools.synth import write_synthetic

TOKENS = [1, 300, 17, 404, 259, 88, 511, 42, 260, 5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_model(write_synthetic(tmp_path_factory.mktemp("m") / "tiny-q8.gguf", "tiny", "q8_0",
                                      n_layer=3, seed=1))


def full(model, n_ctx=64, threads=1) -> Stage:
    return Stage(model, range(model.config.n_layer), embed=True, head=True, n_ctx=n_ctx, threads=threads)


def test_prefill_equals_single_token_steps(tiny):
    s = full(tiny)
    batch = s.eval(TOKENS, 0, all_logits=True)                           # (T, n_vocab)
    assert batch.shape == (len(TOKENS), tiny.config.n_vocab) and batch.dtype == np.float32
    s.kv_clear()
    steps = np.stack([s.eval([t], i) for i, t in enumerate(TOKENS)])
    np.testing.assert_allclose(steps, batch, atol=1e-4, rtol=0)
    s.kv_clear()
    half = len(TOKENS) // 2                                              # two uneven chunks
    s.eval(TOKENS[:half], 0)
    np.testing.assert_allclose(s.eval(TOKENS[half:], half, all_logits=True), batch[half:], atol=1e-4)
    assert s.n_past == len(TOKENS)


def test_chained_stages_equal_one_stage(tiny):
    whole = full(tiny).eval(TOKENS, 0, all_logits=True)
    first = Stage(tiny, range(0, 1), embed=True, head=False, n_ctx=64)
    middle = Stage(tiny, range(1, 1), embed=False, head=False, n_ctx=64)   # zero layers: pass-through
    last = Stage(tiny, range(1, 3), embed=False, head=True, n_ctx=64)
    h = last.forward(middle.forward(first.forward(first.embed(TOKENS), 0), 0), 0)
    np.testing.assert_allclose(last.logits(h), whole, atol=1e-6, rtol=0)
    assert first.n_past == middle.n_past == last.n_past == len(TOKENS)
    assert first.weight_bytes < full(tiny).weight_bytes and first.output is None and last.token_embd is None


def test_threads_give_the_same_logits(tiny):
    one = full(tiny).eval(TOKENS, 0, all_logits=True)
    two = full(tiny, threads=2)
    np.testing.assert_allclose(two.eval(TOKENS, 0, all_logits=True), one, atol=1e-5)
    two.close()


def test_truncate_then_continue_equals_fresh_run(tiny):
    s = full(tiny)
    s.eval(TOKENS, 0)
    s.kv_truncate(4)
    got = s.eval([7, 8], 4, all_logits=True)
    fresh = full(tiny).eval(TOKENS[:4] + [7, 8], 0, all_logits=True)[4:]
    np.testing.assert_allclose(got, fresh, atol=1e-4)


def test_shift_on_one_layer_model_equals_fresh_run_of_kept_tokens(tmp_path):
    """With one layer the cache holds rope(f(token), pos) only, so a K-shift must equal a fresh prefill."""
    model = open_model(write_synthetic(tmp_path / "one.gguf", "tiny", "f32", n_layer=1, seed=2))
    s = full(model)
    s.eval(TOKENS, 0)
    s.kv_shift(n_keep=2, n_discard=5)
    assert s.n_past == len(TOKENS) - 5
    kept = TOKENS[:2] + TOKENS[7:]
    got = s.eval([9], s.n_past)
    want = full(model).eval(kept + [9], 0)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_tied_output_uses_token_embd_and_matches_float64_head(tmp_path):
    model = open_model(write_synthetic(tmp_path / "tied.gguf", "tiny", "q4_0", n_layer=1, tied_output=True))
    assert model.config.tied_output and not model.has("output.weight")
    s = full(model)
    assert s.output is s.token_embd
    h = np.random.default_rng(0).standard_normal((2, model.config.n_embd)).astype(np.float32)
    t = model.tensor("token_embd.weight")
    w = gguf_dequantize(t.data, t.tensor_type).astype(np.float64)       # (n_vocab, n_embd)
    norm = np.asarray(model.tensor("output_norm.weight").data, np.float64)
    x = h / np.sqrt((h.astype(np.float64) ** 2).mean(1, keepdims=True) + model.config.norm_eps) * norm
    np.testing.assert_allclose(s.logits(h), x @ w.T, atol=2e-3, rtol=1e-3)
    head_only = Stage(model, range(1, 1), embed=False, head=True, n_ctx=8)   # a last rank's head
    np.testing.assert_allclose(head_only.logits(h), s.logits(h), atol=1e-6)
    with pytest.raises(ValueError):
        head_only.embed([1])


def test_linear_rope_scaling_changes_positions_not_position_zero(tmp_path):
    plain = open_model(write_synthetic(tmp_path / "a.gguf", "tiny", "f32", n_layer=1, seed=3))
    scaled = open_model(write_synthetic(tmp_path / "b.gguf", "tiny", "f32", n_layer=1, seed=3,
                                        rope_scaling_factor=4.0))
    assert scaled.config.rope_freq_scale == 0.25
    a = full(plain).eval(TOKENS[:5], 0, all_logits=True)
    b = full(scaled).eval(TOKENS[:5], 0, all_logits=True)
    np.testing.assert_array_equal(a[0], b[0])                            # one token: RoPE cancels out
    assert np.abs(a[1:] - b[1:]).max() > 1e-4



def test_rope_overrides_equal_a_file_written_with_those_values(tmp_path):
    """--rope-freq-base / --rope-freq-scale (ModelFile.with_rope) give exactly the logits of the same
    weights in a file whose metadata says so."""
    base = write_synthetic(tmp_path / "a.gguf", "tiny", "q8_0", n_layer=2, seed=4)
    theta = open_model(write_synthetic(tmp_path / "b.gguf", "tiny", "q8_0", n_layer=2, seed=4, rope_freq_base=1e6))
    scaled = open_model(write_synthetic(tmp_path / "c.gguf", "tiny", "q8_0", n_layer=2, seed=4,
                                        rope_scaling_factor=4.0))
    plain = full(open_model(base)).eval(TOKENS, 0, all_logits=True)
    for file, override in ((theta, {"freq_base": 1e6}), (scaled, {"freq_scale": 0.25})):
        want = full(file).eval(TOKENS, 0, all_logits=True)
        got = full(open_model(base).with_rope(**override)).eval(TOKENS, 0, all_logits=True)
        np.testing.assert_array_equal(got, want)
        assert np.abs(want - plain).max() > 1e-3                          # the override mattered
    assert open_model(base).with_rope(None, None).config == open_model(base).config

def test_errors(tiny):
    s = full(tiny, n_ctx=8)
    with pytest.raises(ContextOverflowError):
        s.eval(list(range(9)), 0)
    s.eval([1, 2], 0)
    with pytest.raises(ValueError):
        s.eval([3], 5)                                                   # must continue at n_past = 2
    with pytest.raises(TokenizerError):
        s.embed([tiny.config.n_vocab])
    with pytest.raises(ValueError):
        s.eval([], 2)
    body = Stage(tiny, range(1, 2), embed=False, head=False, n_ctx=8)
    with pytest.raises(ValueError):
        body.embed([1])
    with pytest.raises(ValueError):
        body.logits(np.zeros((1, tiny.config.n_embd), np.float32))
    with pytest.raises(ValueError):
        Stage(tiny, range(2, 5), embed=False, head=False, n_ctx=8)


def test_sizes(tiny):
    s = full(tiny, n_ctx=32)
    c = tiny.config
    assert s.kv_bytes == 2 * c.n_layer * 32 * c.n_embd_kv * 4
    quant_bytes = sum(int(t.n_bytes) for t in tiny.reader.tensors)
    assert 0.9 * quant_bytes < s.weight_bytes < 1.5 * quant_bytes
