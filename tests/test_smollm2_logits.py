"""SmolLM2-135M-Instruct (the demo model, from PyPI): logits of the fixture's two chats against the exact
float32 reference (≤ 2e-3) and llama.cpp's (rms ≤ 0.6, same top-1 on ≥ 90% of positions), and the exact
float32 greedy continuation through core.generate (fixtures/smollm2/README.md explains the two references)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.generate import GenerateSettings, Token, generate, greedy_sampler
from core.loader import open_model
from core.model import Stage
from core.pipeline import LocalPipeline


@pytest.fixture(scope="module")
def chats(smollm2_fixtures):
    return json.loads((smollm2_fixtures / "index.json").read_text())["chats"]


@pytest.fixture(scope="module")
def model(smollm2_model):
    return open_model(smollm2_model)


def _pipe(model, n_ctx=256):
    return LocalPipeline(Stage(model, range(model.config.n_layer), embed=True, head=True, n_ctx=n_ctx))


@pytest.mark.parametrize("i", [0, 1])
def test_chat_logits_are_exact_float32_and_close_to_llama_cpp(model, chats, smollm2_fixtures, i):
    chat = chats[i]
    exact = np.load(smollm2_fixtures / chat["float32"]["logits_file"])
    llama = np.load(smollm2_fixtures / chat["logits_file"])
    pipe = _pipe(model)
    ours = pipe.eval(chat["tokens"], all_logits=True)                   # (T, 49152)
    assert ours.shape == exact.shape == llama.shape
    assert np.abs(ours - exact).max() <= 2e-3
    assert np.sqrt(np.mean((ours - llama) ** 2)) <= 0.6
    assert np.mean(ours.argmax(axis=1) == llama.argmax(axis=1)) >= 0.90


@pytest.mark.parametrize("i", [0, 1])
def test_greedy_reply_is_the_exact_float32_one(model, chats, i):
    chat = chats[i]
    want = chat["float32"]["greedy_tokens"]
    pipe = _pipe(model)
    events = generate(pipe, greedy_sampler(model.config.n_vocab), chat["tokens"],
                      GenerateSettings(n_predict=len(want), n_batch=64, eog=frozenset({0, 2, 4})))
    assert [e.id for e in events if isinstance(e, Token)] == want
