"""The forward pass against llama.cpp: logits, argmax and greedy continuation of every fixture case.

References are llama.cpp's own outputs (fixtures/reference/*.logits.npy and index.json, produced with an
F32 KV cache and no flash attention). Tolerances are the fixtures README's suggested checks, chosen by the
weight types a file holds; they are not fitted to these files.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_case_ids
from core.loader import open_model
from core.model import Stage

QUANT_MAX, QUANT_RMS = 0.3, 0.05
FLOAT_TOL = {"F32": 1e-4, "F16": 1e-2, "BF16": 5e-2}


def tolerance(case: dict) -> tuple[float, float]:
    """(max abs, rms) allowed by the README for this case's weight types."""
    if case["id"] == "llama-2-tiny-random":                             # the README's precision case
        return 1e-3, 1e-3
    types = set(case["tensor_type_histogram"])
    if types <= set(FLOAT_TOL):
        tol = max(FLOAT_TOL[t] for t in types)
        return tol, tol
    return QUANT_MAX, QUANT_RMS


_stages: dict[str, Stage] = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_stages():
    yield
    for stage in _stages.values():
        stage.close()
    _stages.clear()


def stage_for(fixtures, case: dict) -> Stage:
    """One full-model stage per case, shared by the tests of that case (cache cleared by each test)."""
    if case["id"] not in _stages:
        model = open_model(fixtures / case["model"])
        _stages[case["id"]] = Stage(model, range(model.config.n_layer), embed=True, head=True, n_ctx=128)
    stage = _stages[case["id"]]
    stage.kv_clear()
    return stage


@pytest.fixture
def case(request, fixture_index) -> dict:
    return next(c for c in fixture_index["cases"] if c["id"] == request.param)


def check_logits(ours: np.ndarray, ref: np.ndarray, case: dict, how: str) -> None:
    max_tol, rms_tol = tolerance(case)
    err = np.abs(ours.astype(np.float64) - ref)
    assert ours.shape == ref.shape
    assert err.max() <= max_tol, f"{case['id']} {how}: max abs error {err.max():.3g} > {max_tol}"
    rms = float(np.sqrt((err ** 2).mean()))
    assert rms <= rms_tol, f"{case['id']} {how}: rms error {rms:.3g} > {rms_tol}"
    # README: argmax must agree wherever llama.cpp's top1-top2 margin exceeds twice the tolerance.
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * max_tol
    assert np.array_equal(ours.argmax(1)[clear], ref.argmax(1)[clear]), f"{case['id']} {how}: argmax differs"


@pytest.mark.parametrize("case", fixture_case_ids(), indirect=True)
def test_batch_logits(fixtures, case):
    stage = stage_for(fixtures, case)
    ref = np.load(fixtures / case["logits"]["file"])                     # (31, n_vocab)
    ours = stage.eval(case["tokens"], 0, all_logits=True)
    check_logits(ours, ref, case, "one batch")


@pytest.mark.parametrize("case", fixture_case_ids(), indirect=True)
def test_token_by_token_logits(fixtures, case):
    stage = stage_for(fixtures, case)
    ref = np.load(fixtures / case["logits"]["file"])
    ours = np.stack([stage.eval([t], i) for i, t in enumerate(case["tokens"])])
    check_logits(ours, ref, case, "token by token")


@pytest.mark.parametrize("case", fixture_case_ids(), indirect=True)
def test_greedy_continuation(fixtures, case):
    stage = stage_for(fixtures, case)
    greedy = case["greedy"]
    max_tol, _ = tolerance(case)
    logits = stage.eval(case["tokens"], 0)
    got = []
    for step in range(greedy["n_new"]):
        # llama.cpp's top-5 logits of this step check the decode path's values, not just the argmax.
        top5 = logits[np.array(greedy["top5_ids"][step])]
        np.testing.assert_allclose(top5, greedy["top5_logits"][step], rtol=0, atol=max_tol + 1e-5)
        got.append(int(np.argmax(logits)))
        logits = stage.eval([got[-1]], stage.n_past)
    assert got == greedy["tokens"]
