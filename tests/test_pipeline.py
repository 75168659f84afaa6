"""core.control frames, the pipeline's pure helpers and LocalPipeline (in-process; MPI runs are in
test_mpi.py / test_faults.py)."""
from __future__ import annotations

import numpy as np
import pytest

from core.control import (FRAME_LEN, Abort, Eval, KvClear, KvShift, KvTruncate, Op, Shutdown, Stats,
                          decode, encode)
from core.errors import ContextOverflowError, TokenizerError
from core.loader import open_model
from core.model import Stage
from core.pipeline import LocalPipeline, check_kv_op, check_tokens, choose_ubatch, rss_bytes
from mpi_helpers import model


@pytest.mark.parametrize("msg", [
    Eval(256, 17, 32, True), Eval(1, 0, 1, False), KvClear(), KvTruncate(9), KvShift(5, 100), Stats(),
    Shutdown(), Abort(3), Abort(),
])
def test_frames_round_trip(msg):
    frame = encode(msg, seq=41)
    assert frame.dtype == np.int64 and frame.shape == (FRAME_LEN,)
    assert frame[0] == int(msg.op) and frame[1] == 41
    assert decode(frame) == (msg, 41)


def test_frame_layout_is_fixed():
    # [op, seq, args...]: the wire format workers of the same version agree on.
    assert encode(KvShift(5, 100), 7).tolist() == [int(Op.KV_SHIFT), 7, 5, 100, 0, 0, 0, 0]
    assert encode(Eval(10, 3, 4, True), 1).tolist() == [int(Op.EVAL), 1, 10, 3, 4, 1, 0, 0]


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="unknown control op 99"):
        decode(np.array([99, 1, 0, 0, 0, 0, 0, 0], dtype=np.int64))


def test_micro_batches_cover_the_batch_in_order():
    assert Eval(10, 0, 4, False).micro_batches() == [(0, 4), (4, 4), (8, 2)]
    assert Eval(3, 5, 8, False).micro_batches() == [(0, 3)]


@pytest.mark.parametrize("n_tokens, n_ranks, setting, expected", [
    (256, 1, None, 256),     # one rank: nothing to overlap
    (256, 2, 0, 256),        # 0 = pipelining off
    (256, 2, None, 64),      # automatic: 2 micro-batches per rank
    (256, 4, None, 32),
    (20, 2, None, 20),       # too short to cut
    (40, 4, None, 16),       # never below MIN_UBATCH
    (10, 2, 32, 10),         # an explicit size larger than the batch
    (100, 3, 7, 7),
])
def test_choose_ubatch(n_tokens, n_ranks, setting, expected):
    assert choose_ubatch(n_tokens, n_ranks, setting) == expected


def test_check_tokens():
    assert check_tokens([1, 2, 3], 0, 8, 10).tolist() == [1, 2, 3]
    with pytest.raises(ContextOverflowError, match="3 tokens at position 6 do not fit in the context of 8"):
        check_tokens([1, 2, 3], 6, 8, 10)
    with pytest.raises(TokenizerError, match="token id 10 is out of range"):
        check_tokens([1, 10], 0, 8, 10)
    with pytest.raises(ValueError, match="at least one token"):
        check_tokens([], 0, 8, 10)


def test_check_kv_op():
    check_kv_op(KvTruncate(4), 4)
    check_kv_op(KvShift(1, 3), 4)
    with pytest.raises(ValueError, match="truncate the KV cache to 5 positions: it holds 4"):
        check_kv_op(KvTruncate(5), 4)
    with pytest.raises(ValueError, match=r"shift the KV cache \(keep 2, discard 3\): it holds 4"):
        check_kv_op(KvShift(2, 3), 4)


@pytest.fixture
def stories():
    return open_model(model("stories260K"))


def test_local_pipeline_is_the_full_stage(stories):
    ids = [1, 403, 407, 261, 378, 300]
    ref = Stage(stories, range(stories.config.n_layer), embed=True, head=True, n_ctx=64)
    want_rows = ref.eval(ids, 0, all_logits=True)                      # (6, n_vocab)
    want_next = ref.eval([42], 6)                                      # (n_vocab,)
    pipe = LocalPipeline(Stage(stories, range(stories.config.n_layer), embed=True, head=True, n_ctx=64))
    assert pipe.n_ctx == 64 and pipe.n_past == 0
    assert np.array_equal(pipe.eval(ids, all_logits=True), want_rows)
    assert pipe.n_past == 6
    assert np.array_equal(pipe.eval([42]), want_next)
    assert pipe.n_past == 7
    pipe.kv_truncate(6)
    assert np.array_equal(pipe.eval([42]), want_next)                  # truncation really dropped position 6
    [s] = pipe.stats()
    assert s.rank == 0 and s.layers == range(5) and s.n_past == 7 and s.n_ctx == 64
    assert s.compute_ms > 0 and s.wait_ms == 0 and s.rss_bytes > 0 and 0 < s.kv_fill < 1
    pipe.kv_clear()
    assert pipe.n_past == 0
    with pytest.raises(ContextOverflowError):
        pipe.eval(list(range(1, 66)))
    pipe.close()


def test_local_pipeline_shift_matches_the_stage(stories):
    ids = list(range(3, 23))
    a = Stage(stories, range(5), embed=True, head=True, n_ctx=32)
    a.eval(ids, 0)
    a.kv_shift(4, 8)
    want = a.eval([7], a.n_past)
    pipe = LocalPipeline(Stage(stories, range(5), embed=True, head=True, n_ctx=32))
    pipe.eval(ids)
    pipe.kv_shift(4, 8)
    assert pipe.n_past == 12
    assert np.array_equal(pipe.eval([7]), want)
    with pytest.raises(ValueError, match="shift"):
        pipe.kv_shift(10, 10)


def test_rss_is_read():
    big = np.ones(64 * 2**20 // 8)                                     # touch 64 MiB
    assert rss_bytes() > 64 * 2**20
    del big
