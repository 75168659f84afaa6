"""Tensor parallelism in one process (issue 11): the sharding plan checked by hand, and N shards of a stage
(core.tp_local: one thread per rank, a barrier all-reduce) against the unsharded Stage: logits within 1e-4,
the same greedy tokens, the same after KV edits, 1/N of the weights per rank, two all-reduces per layer.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.config import ModelConfig
from core.errors import UsageError
from core.generate import Evaluated, GenerateSettings, Token, generate, greedy_sampler
from core.loader import open_model
from core.model import Stage
from core.pipeline import LocalPipeline
from core.shard import balanced, plan_stage, plan_tp, share_bytes, slice_tensor
from core.tools.synth import write_synthetic
from core.tp_local import LocalTP

from conftest import FIXTURES

MODELS = FIXTURES / "models"
PROMPT = [1, 300, 17, 404, 259, 88, 211, 42, 260, 5, 99, 123]
K_FIXTURES = ["fx256-q4_k_m", "fx256-q2_k", "fx256-iq4_xs", "fx256-q4_0"]


def fixture_model(name: str):
    path = MODELS / f"{name}.gguf"
    if not path.is_file():
        pytest.skip(f"fixture model {path} not found")
    return open_model(path)


def full(model, n_ctx: int = 64) -> Stage:
    return Stage(model, range(model.config.n_layer), embed=True, head=True, n_ctx=n_ctx)


def config(**kw) -> ModelConfig:
    base = ModelConfig(arch="llama", n_vocab=1000, n_ctx_train=512, n_embd=256, n_layer=2, n_ff=768, n_head=8,
                       n_head_kv=2, head_dim=32, n_rot=32, rope_freq_base=10000.0, rope_freq_scale=1.0,
                       norm_eps=1e-5, tied_output=False)
    return replace(base, **kw)


def greedy(stage, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """core.generate's loop, argmax, through a LocalPipeline around `stage` (a Stage or a LocalTP): n tokens,
    and every logits row (the prompt's, then each fed token's)."""
    tokens, rows = [], []
    settings = GenerateSettings(n_predict=n, n_batch=len(prompt), all_logits=True)
    for event in generate(LocalPipeline(stage), greedy_sampler(stage.config.n_vocab), prompt, settings):
        if isinstance(event, Token):
            tokens.append(event.id)
        elif isinstance(event, Evaluated):
            rows.append(event.logits if event.logits.ndim == 2 else event.logits[None, :])   # (T, n_vocab)
    return tokens, rows


def check_same(model, size: int, prompt=PROMPT, n_new: int = 6, atol: float = 1e-4) -> LocalTP:
    want_tokens, want = greedy(full(model), prompt, n_new)
    tp = LocalTP(model, range(model.config.n_layer), size, embed=True, head=True, n_ctx=64)
    got_tokens, got = greedy(tp, prompt, n_new)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)
    assert got_tokens == want_tokens
    return tp


# ---- the plan, by hand ---------------------------------------------------------------------------------

def test_balanced_gives_the_first_ranks_the_remainder():
    assert balanced(43, 2) == [range(0, 22), range(22, 43)]
    assert balanced(9, 2) == [range(0, 5), range(5, 9)]
    assert balanced(6, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]


def test_n_ff_1376_in_blocks_of_32_splits_22_and_21():
    a, b = plan_tp(config(n_ff=1376), 2, down_block=32)
    assert (a.ff, b.ff) == (range(0, 22 * 32), range(22 * 32, 1376))
    assert (a.down_cols, b.down_cols) == (a.ff, b.ff) and not a.down_padded


def test_smollm2_heads_on_two_ranks():
    """9 heads / 3 KV heads (3 query heads per KV head), head_dim 64, Q4_1 (blocks of 32): 5 + 4 heads;
    rank 0 reads KV heads 0 (heads 0-2) and 1 (heads 3, 4); rank 1 reads 1 (head 5) and 2 (heads 6-8)."""
    c = config(n_vocab=49152, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, head_dim=64, n_rot=64)
    a, b = plan_tp(c, 2, o_block=32, down_block=32)
    assert (a.heads, a.kv_heads, b.heads, b.kv_heads) == (range(0, 5), range(0, 2), range(5, 9), range(1, 3))
    assert (a.q_rows, b.q_rows) == (range(0, 320), range(320, 576))
    assert (a.kv_rows, b.kv_rows) == (range(0, 128), range(64, 192))
    assert (a.o_cols, b.o_cols) == (range(0, 320), range(320, 576)) and not a.o_padded
    assert a.runs == ((0, 3, 0), (3, 5, 1)) and b.runs == ((0, 1, 0), (1, 4, 1))
    assert (a.ff, b.ff) == (range(0, 768), range(768, 1536))
    assert (a.vocab, b.vocab) == (range(0, 24576), range(24576, 49152))


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("n_head, n_head_kv, size", [(9, 3, 2), (8, 2, 3), (10, 5, 3)])
def test_attend_over_cut_groups_is_the_columns_of_whole_attention(n_head, n_head_kv, size, T):
    """A rank whose KV groups are cut (SmolLM2 on 2 ranks: runs of 3 and 2 heads) gives its heads' columns
    of ops.attention over every head, within float noise (one padded call; summation order may differ)."""
    from core.ops import attention
    hd, pos = 64, 7
    c = config(n_embd=n_head * hd, n_head=n_head, n_head_kv=n_head_kv, head_dim=hd, n_rot=hd)
    rng = np.random.default_rng(n_head * 10 + size)
    q = rng.standard_normal((T, n_head, hd), dtype=np.float32)
    keys, values = rng.standard_normal((2, n_head_kv, pos + T, hd), dtype=np.float32)
    whole = attention(q, keys, values, pos).reshape(T, n_head, hd)
    cut = 0
    for sh in plan_tp(c, size, o_block=32, down_block=32):
        kv = slice(sh.kv_heads.start, sh.kv_heads.stop)
        got = sh.attend(q[:, sh.heads.start:sh.heads.stop], keys[kv], values[kv], pos)
        want = whole[:, sh.heads.start:sh.heads.stop].reshape(T, -1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        cut += len({b - a for a, b, _ in sh.runs}) > 1
    assert cut > 0                                  # the shapes do cut groups


def test_tinyllama_q4_k_heads_cut_on_256_weight_blocks():
    """head_dim 64 and blocks of 256: cuts every 4 heads; 8 units on 3 ranks: 3, 3, 2 (12, 12, 8 heads);
    n_ff 5632 = 22 blocks: 8, 7, 7."""
    c = config(n_vocab=32000, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, head_dim=64, n_rot=64)
    p = plan_tp(c, 3, o_block=256, down_block=256)
    assert [s.heads for s in p] == [range(0, 12), range(12, 24), range(24, 32)]
    assert [s.kv_heads for s in p] == [range(0, 2), range(1, 3), range(3, 4)]
    assert [s.o_cols for s in p] == [range(0, 768), range(768, 1536), range(1536, 2048)]
    assert [len(s.ff) // 256 for s in p] == [8, 7, 7] and not any(s.down_padded for s in p)


def test_head_dim_128_k_quants_cut_on_even_heads():
    p = plan_tp(config(n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, head_dim=128), 3,
                o_block=256, down_block=256)
    assert [len(s.heads) for s in p] == [12, 10, 10]
    assert [s.kv_heads for s in p] == [range(0, 12), range(12, 22), range(22, 32)]   # no GQA: no sharing
    assert [len(s.ff) // 256 for s in p] == [15, 14, 14]                            # 43 blocks


def test_fewer_blocks_than_ranks_pads_the_shared_blocks():
    """fx256 K-quants: attn_output has 256 columns = ONE block (8 heads of 32), n_ff 768 = 3 blocks.
    Heads are balanced and each rank holds the block covering its heads (inputs of the others zero)."""
    p = plan_tp(config(), 2, o_block=256, down_block=256)
    assert [s.heads for s in p] == [range(0, 4), range(4, 8)]
    assert [s.o_cols for s in p] == [range(0, 256)] * 2 and all(s.o_padded for s in p)
    assert [s.ff for s in p] == [range(0, 512), range(512, 768)]                 # 2 + 1 whole blocks
    p = plan_tp(config(), 4, o_block=256, down_block=256)                        # 3 blocks, 4 ranks
    assert [s.ff for s in p] == [range(0, 192), range(192, 384), range(384, 576), range(576, 768)]
    assert [s.down_cols for s in p] == [range(0, 256), range(0, 512), range(256, 768), range(512, 768)]
    assert [s.kv_heads for s in p] == [range(0, 1)] * 2 + [range(1, 2)] * 2


def test_mqa_replicates_the_one_kv_head():
    p = plan_tp(config(n_embd=768, n_ff=1376, n_head=6, n_head_kv=1, head_dim=128), 4, o_block=32,
                down_block=32)
    assert [len(s.heads) for s in p] == [2, 2, 1, 1]
    assert all(s.kv_heads == range(0, 1) for s in p)
    assert [len(s.ff) // 32 for s in p] == [11, 11, 11, 10]


@pytest.mark.parametrize("size, message", [
    (0, "--tp must be at least 1, got 0"),
    (9, "--tp 9 is more ranks than the model's 8 query heads"),
])
def test_impossible_splits_are_one_line_usage_errors(size, message):
    with pytest.raises(UsageError, match=message) as err:
        plan_tp(config(), size)
    assert "\n" not in str(err.value)


def test_plan_stage_reads_block_sizes_from_the_tensor_table():
    m = fixture_model("fx256-q4_k_m")                 # attn_output Q4_K; ffn_down Q4_K and Q6_K: 256
    assert plan_stage(m, range(3), 2) == plan_tp(m.config, 2, o_block=256, down_block=256)
    with pytest.raises(UsageError, match="more ranks than the model's 8 query heads"):
        plan_stage(m, range(3), 16)


def test_slice_tensor_cuts_rows_and_whole_blocks():
    m = fixture_model("fx256-q4_0")
    t = m.tensor("blk.0.ffn_down.weight")                                # (256, 768) Q4_0: 24 blocks a row
    from core.quants import dequantize
    whole = dequantize(np.asarray(t.data), t.tensor_type)                # (256, 768)
    data, shape = slice_tensor(t.tensor_type, t.data, (256, 768), range(8, 24), range(64, 160))
    assert shape == (16, 96)
    np.testing.assert_array_equal(dequantize(np.ascontiguousarray(data), t.tensor_type), whole[8:24, 64:160])
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        slice_tensor(t.tensor_type, t.data, (256, 768), None, range(0, 48))


# ---- sharded stages against the unsharded one ---------------------------------------------------------

@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("name", ["stories260K"] + K_FIXTURES)
def test_sharded_logits_and_greedy_tokens_match(name, size):
    check_same(fixture_model(name), size).close()


@pytest.fixture(scope="module")
def mqa_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mqa")
    return {q: open_model(write_synthetic(d / f"mqa-{q}.gguf", "mqa", q, seed=3)) for q in ("q4_0", "q8_0")}


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_mqa_head_dim_128_matches(mqa_models, qtype, size):
    m = mqa_models[qtype]
    c = m.config
    assert (c.n_head_kv, c.head_dim, c.n_ff % 256 != 0) == (1, 128, True)
    tp = check_same(m, size, prompt=[1, 300, 17, 404, 259, 88, 211, 42])
    assert all(s.shard.kv_heads == range(1) for s in tp.stages)
    tp.close()


def test_smollm2_two_ranks_match(smollm2_model):
    """SmolLM2-135M: 9 heads / 3 KV heads, Q4_1, LM head tied to a Q8_0 token_embd (split by vocab rows)."""
    m = open_model(smollm2_model)
    # 30 layers of float32: with BLAS on one thread, as every rank of the engine runs it, the max logit
    # difference is 1.3e-4 (the unsharded stage's own batch-vs-step difference on this prompt is 8.4e-5)
    tp = check_same(m, 2, prompt=[1, 4093, 314, 253, 1345, 5718], n_new=3, atol=2e-4)
    assert tp.stages[0].output.qtype.name == "Q8_0" and tp.stages[0].output.shape == (24576, 576)
    tp.close()


def test_threads_inside_each_rank():
    m = fixture_model("fx256-q4_0")
    tp = LocalTP(m, range(3), 2, embed=True, head=True, n_ctx=64, threads=2)
    np.testing.assert_allclose(tp.eval(PROMPT, 0, all_logits=True), full(m).eval(PROMPT, 0, all_logits=True),
                               atol=1e-4, rtol=0)
    tp.close()


def test_group_of_one_is_bitwise_the_unsharded_stage():
    m = fixture_model("fx256-q4_k_m")
    tp = LocalTP(m, range(3), 1, embed=True, head=True, n_ctx=64)
    want = full(m).eval(PROMPT, 0, all_logits=True)
    np.testing.assert_array_equal(tp.eval(PROMPT, 0, all_logits=True), want)


def test_embedding_from_the_mapping_equals_the_repacked_table():
    for name in ("fx256-q4_k_m", "stories260K"):
        m = fixture_model(name)
        tp = LocalTP(m, range(0), 2, embed=True, head=False, n_ctx=8)
        np.testing.assert_array_equal(tp.embed(PROMPT), full(m).embed(PROMPT))
        assert tp.stages[0].token_embd.nbytes == 0


def test_two_allreduces_per_layer_and_only_own_kv_heads():
    m = fixture_model("fx256-q4_0")                                       # 3 layers, 2 KV heads
    tp = LocalTP(m, range(3), 2, embed=True, head=True, n_ctx=64)
    tp.eval(PROMPT, 0)
    tp.eval([7], len(PROMPT))
    assert tp.reduce.calls == [2 * 3 * 2] * 2
    c = m.config
    for s in tp.stages:
        assert s.cache.k[0].shape == (1, 64, c.head_dim)
        assert s.kv_bytes == 3 * 2 * 1 * 64 * c.head_dim * 4 == full(m).kv_bytes // 2
    tp.close()


@pytest.mark.parametrize("name, size", [("fx256-q4_k_m", 3), ("stories260K", 2)])
def test_kv_edits_on_every_rank_match_the_unsharded_stage(name, size):
    m = fixture_model(name)
    ref = full(m)
    tp = LocalTP(m, range(m.config.n_layer), size, embed=True, head=True, n_ctx=64)
    for s in (ref, tp):
        s.eval(PROMPT, 0)
        s.kv_truncate(7)
    np.testing.assert_allclose(tp.eval([9, 10], 7, all_logits=True), ref.eval([9, 10], 7, all_logits=True),
                               atol=1e-4, rtol=0)
    for s in (ref, tp):
        s.kv_shift(n_keep=2, n_discard=4)
    assert tp.n_past == ref.n_past == 5
    want = ref.eval([11, 12, 13], 5, all_logits=True)
    np.testing.assert_allclose(tp.eval([11, 12, 13], 5, all_logits=True), want, atol=1e-4, rtol=0)
    for s in (ref, tp):
        s.kv_clear()
    np.testing.assert_allclose(tp.eval(PROMPT[:4], 0), ref.eval(PROMPT[:4], 0), atol=1e-4, rtol=0)
    tp.close()


def norm_bytes(c: ModelConfig, n_layer: int) -> int:
    return (2 * n_layer + 1) * c.n_embd * 4                               # attn/ffn norms + output_norm


@pytest.mark.parametrize("name, size", [("fx256-q4_0", 2), ("fx256-q4_0", 4), ("stories260K", 2),
                                        ("stories260K", 4)])
def test_each_rank_holds_its_share_of_the_weights(name, size):
    """Matrices: 1/N each (K/V heads replicated where a group is cut, row padding to 8); norms replicated."""
    m = fixture_model(name)
    c = m.config
    L = range(c.n_layer)
    whole = Stage(m, L, embed=False, head=True, n_ctx=8).weight_bytes - norm_bytes(c, c.n_layer)
    tp = LocalTP(m, L, size, embed=False, head=True, n_ctx=8)
    mats = [s.weight_bytes - norm_bytes(c, c.n_layer) for s in tp.stages]
    kv_extra = [2 * c.n_layer * (len(s.kv_heads) * size - c.n_head_kv) * c.head_dim * c.n_embd
                for s in tp.plan]                                         # K/V heads beyond 1/N, in weights
    bytes_per_weight = whole / sum(np.prod(m.tensor(n).shape) for n in
                                   ["output.weight"] + [f"blk.{i}.{f}.weight" for i in L for f in
                                                        ("attn_q", "attn_k", "attn_v", "attn_output",
                                                         "ffn_gate", "ffn_up", "ffn_down")])
    for got, extra in zip(mats, kv_extra):
        share = whole / size + extra * bytes_per_weight / size
        assert share * 0.97 <= got <= share * 1.03, (got, share)
    tp.close()


def test_plan_bytes_before_loading():
    """share_bytes: the file bytes a rank's share covers (norms on every rank); kv_bytes as the cache's."""
    m = fixture_model("fx256-q4_0")                                       # aligned, no KV head shared on 2
    c = m.config
    plan = plan_stage(m, range(3), 2)
    names = ["output.weight", "output_norm.weight"] + [n for n in (t.name for t in m.reader.tensors)
                                                       if n.startswith("blk.")]
    whole = sum(int(m.tensor(n).n_bytes) for n in names)
    norms = norm_bytes(c, 3)
    got = [share_bytes(m, range(3), s, head=True) for s in plan]
    assert sum(got) == whole + norms and got[0] == got[1]
    tp = LocalTP(m, range(3), 2, embed=False, head=True, n_ctx=32)
    assert [s.kv_bytes(3, 32) for s in plan] == [st.kv_bytes for st in tp.stages]
    tp.close()


def test_sharded_stage_refuses_eval_and_needs_an_allreduce():
    m = fixture_model("fx256-q4_0")
    a, _ = plan_stage(m, range(3), 2)
    with pytest.raises(ValueError, match="needs an allreduce"):
        Stage(m, range(3), embed=True, head=True, n_ctx=8, shard=a)
    s = Stage(m, range(3), embed=True, head=True, n_ctx=8, shard=a, allreduce=lambda p: p)
    with pytest.raises(ValueError, match="no TP split"):
        s.eval(PROMPT, 0)
    assert s.logits(np.zeros((2, m.config.n_embd), np.float32)).shape == (2, len(a.vocab))
