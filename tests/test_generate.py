"""core.generate: the input-fitting rule (hand-computed) and the token loop against llama.cpp's greedy
continuation of stories260K (fixtures/index.json), with its stop conditions and context shift."""
from __future__ import annotations

import numpy as np
import pytest

from core.generate import (Evaluated, GenerateSettings, InputFit, Shifted, Skipped, Stopped, Token,
                           fit_input, generate, greedy_sampler)
from core.loader import open_model
from core.model import Stage
from core.pipeline import LocalPipeline
from core.tokenizer import Tokenizer


# ---- fit_input: llama.cpp main's rule, numbers worked out by hand -----------------------------------

def test_input_that_fits_is_taken_whole():
    assert fit_input(4, n_past=10, n_ctx=16, n_keep=0) == InputFit()
    assert fit_input(6, n_past=10, n_ctx=16, n_keep=0).take(6) == 6            # exactly full


def test_full_context_keeps_position_0_and_n_keep_and_discards_half_the_rest():
    # n_past 16, keep 0: n_left = 16 - 0 - 1 = 15, discard 7, keep positions [0, 1)
    assert fit_input(1, n_past=16, n_ctx=16, n_keep=0) == InputFit(shift=(1, 7))
    # keep 2: n_left = 13, discard 6
    assert fit_input(1, n_past=16, n_ctx=16, n_keep=2) == InputFit(shift=(3, 6))


def test_input_longer_than_n_ctx_minus_4_is_cut_first():
    fit = fit_input(20, n_past=0, n_ctx=16, n_keep=0)
    assert fit == InputFit(too_long=8) and fit.take(20) == 12


def test_what_still_does_not_fit_after_the_shift_is_cut():
    # n_past 15, keep 12: discard (15 - 12 - 1) // 2 = 1, room 16 - 14 = 2 of 10 tokens
    fit = fit_input(10, n_past=15, n_ctx=16, n_keep=12)
    assert fit == InputFit(shift=(13, 1), no_room=8) and fit.take(10) == 2


def test_stop_when_full_feeds_nothing():
    fit = fit_input(1, n_past=16, n_ctx=16, n_keep=0, stop_when_full=True)
    assert fit.full and fit.shift is None and fit.take(1) == 0


# ---- the loop on a real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories(fixtures, fixture_index):
    case = next(c for c in fixture_index["cases"] if c["id"] == "stories260K")
    path = fixtures / "models" / "stories260K.gguf"
    return case, open_model(path), Tokenizer.from_path(path)


def _pipe(model, n_ctx):
    return LocalPipeline(Stage(model, range(model.config.n_layer), embed=True, head=True, n_ctx=n_ctx))


def _run(pipe, prompt, **settings):
    events = list(generate(pipe, greedy_sampler(pipe.config.n_vocab), prompt, GenerateSettings(**settings)))
    return events, [e.id for e in events if isinstance(e, Token)]


def test_greedy_continuation_is_llama_cpps(stories):
    case, model, _ = stories
    want = case["greedy"]["tokens"]
    pipe = _pipe(model, 128)
    events, got = _run(pipe, case["tokens"], n_predict=len(want), n_batch=8)
    assert got == want
    assert events[-1] == Stopped("n-predict") and sum(isinstance(e, Stopped) for e in events) == 1
    prompt_chunks = [e.n_tokens for e in events if isinstance(e, Evaluated) and not e.sampled]
    assert prompt_chunks == [8, 8, 8, 7]                                  # 31 tokens in n_batch chunks
    assert pipe.n_past == len(case["tokens"]) + len(want)                 # the last token was fed too


def test_an_end_of_generation_token_is_fed_and_stops(stories):
    case, model, _ = stories
    first = case["greedy"]["tokens"][0]
    pipe = _pipe(model, 64)
    events, got = _run(pipe, case["tokens"], n_predict=-1, eog=frozenset({first}))
    assert got == [first] and events[-1] == Stopped("eog")
    assert pipe.n_past == len(case["tokens"]) + 1


def test_a_stop_string_ends_the_reply(stories):
    case, model, tok = stories
    want = case["greedy"]["tokens"]
    text = tok.decode(want[:12])
    stop = text[-3:]                                                   # ends inside the 12th piece
    pipe = _pipe(model, 128)
    events = list(generate(pipe, greedy_sampler(model.config.n_vocab), case["tokens"],
                           GenerateSettings(n_predict=-1, stop=(stop,)),
                           piece=lambda t: tok.token_to_piece(t, special=False)))
    got = [e.id for e in events if isinstance(e, Token)]
    assert events[-1] == Stopped("stop-string")
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])
    assert got == want[:len(got)]


def test_a_full_context_is_shifted_and_generation_goes_on(stories):
    case, model, _ = stories
    prompt = case["tokens"][:20]
    pipe = _pipe(model, 24)
    events, got = _run(pipe, prompt, n_predict=10, n_keep=4)
    shifts = [e for e in events if isinstance(e, Shifted)]
    # n_past reaches 24 after 4 tokens; the 5th needs room: n_left = 24 - 4 - 1 = 19, discard 9
    assert shifts == [Shifted(5, 9)]
    assert len(got) == 10 and pipe.n_past == 24 - 9 + 6


def test_n_predict_minus_2_stops_when_the_context_is_full(stories):
    case, model, _ = stories
    pipe = _pipe(model, 24)
    events, got = _run(pipe, case["tokens"][:20], n_predict=-2)
    assert events[-1] == Stopped("context-full") and not any(isinstance(e, Shifted) for e in events)
    assert pipe.n_past == 24 and len(got) == 5                         # the 5th sampled token had no room


def test_a_prompt_too_long_for_the_context_is_cut_with_an_event(stories):
    case, model, _ = stories
    pipe = _pipe(model, 16)
    events, _ = _run(pipe, case["tokens"][:20], n_predict=1)
    assert events[0] == Skipped(8) and pipe.n_past == 13


def test_all_logits_gives_every_prompt_position(stories, fixtures):
    case, model, _ = stories
    ref = np.load(fixtures / "reference" / "stories260K.logits.npy")
    pipe = _pipe(model, 64)
    events, _ = _run(pipe, case["tokens"], n_predict=0, n_batch=64, all_logits=True)
    prompt = next(e for e in events if isinstance(e, Evaluated))
    assert prompt.logits.shape == ref.shape
    assert np.abs(prompt.logits - ref).max() < 1e-4
    assert events[-1] == Stopped("n-predict")
