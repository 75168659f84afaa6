"""core/sampling.py against hand-computed distributions (the arithmetic is in the comments).

Candidates are built from probabilities via logits = ln p, so the softmax inside each filter gives p
back (to ~1e-16); thresholds are chosen away from ties unless a tie is the point of the test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import UsageError
from core.sampling import (
    FLAGS, SamplingParams, Sampler, apply_chain, apply_min_p, apply_penalties, apply_tail_free,
    apply_temperature, apply_top_k, apply_top_p, apply_typical, softmax,
)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, tfs_z=1.0, typical_p=1.0, temp=1.0)  # every filter off


def cands(probs, ids=None):
    """Candidates (ids, logits = ln p) in the given id order."""
    probs = np.asarray(probs, dtype=np.float64)
    ids = np.arange(len(probs)) if ids is None else np.asarray(ids)
    return ids.astype(np.int64), np.log(probs)


def survivors(result):
    return result[0].tolist()


# ---------------------------------------------------------------- parameters and validation

def test_defaults_are_llama_cpp_main_late_2023():
    p = SamplingParams()
    assert (p.temp, p.top_k, p.top_p, p.min_p, p.tfs_z, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0, 1.0)
    assert (p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty) == (64, 1.1, 0.0, 0.0)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta) == (0, 5.0, 0.1)
    assert p.penalize_nl is True and p.logit_bias == ()


def test_describe_is_llama_sampling_print():
    assert SamplingParams().describe() == (
        "\trepeat_last_n = 64, repeat_penalty = 1.100, frequency_penalty = 0.000, presence_penalty = 0.000\n"
        "\ttop_k = 40, tfs_z = 1.000, top_p = 0.950, min_p = 0.050, typical_p = 1.000, temp = 0.800\n"
        "\tmirostat = 0, mirostat_lr = 0.100, mirostat_ent = 5.000")


@pytest.mark.parametrize("name, value, legal", [
    ("top_p", 1.5, "[0.0, 1.0]"), ("min_p", -0.1, "[0.0, 1.0]"), ("tfs_z", 2.0, "[0.0, 1.0]"),
    ("typical_p", -1.0, "[0.0, 1.0]"), ("repeat_last_n", -2, ">= -1"), ("repeat_penalty", 0.0, "> 0.0"),
    ("mirostat", 3, "0, 1 or 2"), ("mirostat_tau", -1.0, ">= 0.0"), ("mirostat_eta", -0.5, ">= 0.0"),
    ("temp", math.nan, "finite"), ("frequency_penalty", math.inf, "finite"), ("top_k", 2.5, "integer"),
    ("penalize_nl", 1, "true or false"), ("temp", "hot", "a number"),
])
def test_bad_value_names_flag_range_and_value(name, value, legal):
    with pytest.raises(UsageError) as err:
        SamplingParams(**{name: value})
    msg = str(err.value)
    assert FLAGS[name] in msg and legal in msg and repr(value) in msg and "\n" not in msg


@pytest.mark.parametrize("bias", [((5, math.nan),), ((-1, 1.0),), ((5, math.inf),), ((5,),), ((True, 1.0),)])
def test_bad_logit_bias(bias):
    with pytest.raises(UsageError, match="--logit-bias"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_id_checked_against_vocab_and_seed_checked():
    with pytest.raises(UsageError, match=r"--logit-bias .*\[0, 10\).*12"):
        Sampler(SamplingParams(logit_bias=((12, 1.0),)), n_vocab=10, seed=0)
    with pytest.raises(UsageError, match="--seed.*-1"):
        Sampler(SamplingParams(), n_vocab=10, seed=-1)


def test_from_namespace_reads_same_named_attributes():
    class Options:  # stands for chat's ChatOptions: extra attributes are ignored, absent ones default
        temp, top_k, logit_bias, model = 0.0, 5, ((1, -1.0),), "m.gguf"
    p = SamplingParams.from_namespace(Options())
    assert (p.temp, p.top_k, p.logit_bias, p.top_p) == (0.0, 5, ((1, -1.0),), 0.95)


def test_limits_are_legal_and_params_are_frozen():
    SamplingParams(top_p=0.0, min_p=1.0, tfs_z=0.0, typical_p=0.0, repeat_last_n=-1, temp=-1.0,
                   top_k=-5, frequency_penalty=-2.0, logit_bias=[[3, -math.inf]])
    with pytest.raises(AttributeError):
        SamplingParams().temp = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- logit bias and penalties

def test_logit_bias_last_entry_wins_and_ignore_eos_bans():
    logits = np.array([0.0, 1.0, 0.5, 0.2], dtype=np.float32)
    # token 2: +2.0 replaced by -1.0 (map assignment) -> 2 is not picked; token 1 banned -> 0.5... gone
    p = SamplingParams(temp=0.0, logit_bias=((2, 2.0), (2, -1.0))).with_logit_bias(1, -math.inf)
    assert Sampler(p, 4, seed=0).sample(logits) == 3   # 0.0, -inf, -0.5, 0.2 -> token 3
    assert SamplingParams(temp=0.0, logit_bias=((2, 2.0),)).with_logit_bias(2, -1.0).logit_bias[-1] == (2, -1.0)


def test_penalties_divide_positive_multiply_non_positive_then_subtract():
    logits = np.array([2.0, -1.0, 0.5, 0.0, 3.0])
    history = np.array([0, 1, 1, 3])  # counts: t0 1, t1 2, t3 1
    out = apply_penalties(logits, history, repeat=2.0, frequency=0.5, presence=0.25)
    # t0:  2.0 / 2 = 1.0;  - 1*0.5 - 0.25 = 0.25
    # t1: -1.0 * 2 = -2.0; - 2*0.5 - 0.25 = -3.25
    # t2: not seen -> 0.5;  t3: 0.0 * 2 = 0.0; - 0.5 - 0.25 = -0.75;  t4: not seen -> 3.0
    assert out.tolist() == [0.25, -3.25, 0.5, -0.75, 3.0]
    # the llama.cpp rule for negative logits: -1.0 with penalty 1.1 becomes -1.1 (not -1/1.1 = -0.909)
    assert apply_penalties(np.array([-1.0]), np.array([0]), 1.1, 0.0, 0.0)[0] == pytest.approx(-1.1)
    # neutral penalties change nothing (and return a copy, as the penalising path does)
    same = apply_penalties(logits, history, repeat=1.0, frequency=0.0, presence=0.0)
    assert same.tolist() == logits.tolist() and same is not logits


def test_penalty_window_is_the_last_repeat_last_n_tokens():
    logits = np.array([1.0, 1.05, 0.0, 0.0], dtype=np.float32)
    # history [1, 2]. window 1 = [2]: token 1 keeps 1.05 > 1.0 -> 1.
    # window 2 = [1, 2]: token 1 -> 1.05 / 1.1 = 0.9545 < 1.0 -> 0.
    for last_n, expected in ((1, 1), (2, 0), (0, 1)):
        s = Sampler(SamplingParams(temp=0.0, repeat_last_n=last_n), 4, seed=0)
        s.accept(1), s.accept(2)
        assert s.sample(logits) == expected, last_n


def test_repeat_last_n_minus_one_means_context_size():
    logits = np.array([1.0, 1.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    for n_ctx, expected in ((3, 1), (None, 0)):  # n_ctx 3: window [5, 6, 7] misses token 1
        s = Sampler(SamplingParams(temp=0.0, repeat_last_n=-1), 8, seed=0, n_ctx=n_ctx)
        for t in (1, 5, 6, 7):
            s.accept(t)
        assert s.sample(logits) == expected


def test_no_penalize_nl_restores_the_biased_newline_logit():
    logits = np.array([1.0, 1.05, 0.0], dtype=np.float32)  # token 1 is the newline
    for penalize_nl, expected in ((True, 0), (False, 1)):  # penalised: 1.05 / 1.1 = 0.9545 < 1.0
        s = Sampler(SamplingParams(temp=0.0, penalize_nl=penalize_nl), 3, seed=0, nl_id=1)
        s.accept(1)
        assert s.sample(logits) == expected
    # the restored value is the logit after the bias: 1.05 - 0.1 = 0.95 < 1.0 -> 0
    s = Sampler(SamplingParams(temp=0.0, penalize_nl=False, logit_bias=((1, -0.1),)), 3, seed=0, nl_id=1)
    s.accept(1)
    assert s.penalised_logits(logits)[1] == pytest.approx(0.95) and s.sample(logits) == 0


def test_order_bias_before_penalty_changes_the_pick():
    # token 0: logit 1.0, bias -2.0, seen once, repeat 1.1.
    #   bias first (llama.cpp): 1.0 - 2.0 = -1.0 -> * 1.1 = -1.1  < token 1's -1.095 -> pick 1
    #   penalty first would be: 1.0 / 1.1 - 2.0 = -1.0909 > -1.095 -> pick 0
    logits = np.array([1.0, -1.095], dtype=np.float32)
    s = Sampler(SamplingParams(temp=0.0, logit_bias=((0, -2.0),)), 2, seed=0)
    s.accept(0)
    assert s.penalised_logits(logits)[0] == pytest.approx(-1.1)
    assert s.sample(logits) == 1


# ---------------------------------------------------------------- greedy

def test_greedy_ties_take_the_lowest_id_and_negative_temp_is_greedy():
    logits = np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32)
    for temp in (0.0, -1.0):
        s = Sampler(SamplingParams(temp=temp, repeat_penalty=1.0), 4, seed=0)
        assert [s.sample(logits) for _ in range(3)] == [1, 1, 1]


# ---------------------------------------------------------------- each filter

def test_top_k_sorted_with_ties_by_lowest_id():
    ids, logits = np.arange(5), np.array([1.0, 3.0, 3.0, 2.0, 0.0])
    assert survivors(apply_top_k(ids, logits, 2)) == [1, 2]
    assert survivors(apply_top_k(ids, logits, 1)) == [1]            # 1 and 2 tie: lower id
    assert survivors(apply_top_k(ids, logits, 3)) == [1, 2, 3]
    assert survivors(apply_top_k(ids, logits, 0)) == [1, 2, 3, 0, 4]  # <= 0: all, sorted
    assert survivors(apply_top_k(ids, logits, 9)) == [1, 2, 3, 0, 4]
    assert survivors(apply_top_k(ids, logits, 1, min_keep=2)) == [1, 2]



@pytest.mark.parametrize("n", [49152, 1000, 64 * 40 + 3])
def test_top_k_over_a_vocabulary_equals_a_full_sort(n):
    """The strided-sample preselection keeps exactly what sorting every logit keeps: a full lexsort
    (logit descending, then id) and its first k, with ties at the cut, -inf bans and k near n."""
    rng = np.random.default_rng(n)
    for trial in range(30):
        logits = rng.integers(-20, 20, size=n).astype(np.float64)        # many ties
        if trial % 3 == 1:
            logits = rng.standard_normal(n) * 4
        if trial % 5 == 2:
            logits[rng.choice(n, size=n // 2, replace=False)] = -np.inf
        if trial % 7 == 3:
            logits[::64] = -50.0                                          # the sample sees only the worst
        ids = np.arange(n)
        for k in (1, 40, 64, n // 64 + 1, n - 1, n):
            order = np.lexsort((ids, -logits))[:k]
            got_ids, got_logits = apply_top_k(ids, logits, k)
            assert got_ids.tolist() == order.tolist(), (trial, k)
            assert np.array_equal(got_logits, logits[order])


def test_tail_free_by_second_derivative():
    # p = [.35, .30, .20, .10, .05] (given to ids 4,2,0,3,1 to check the sort)
    # d1 = [.05, .10, .10, .05]; d2 = [-.05, 0, .05] -> |d2| / sum = [.5, 0, .5]; cum = [.5, .5, 1]
    # first i >= 1 with cum > z: z=.4 -> i=1 -> keep 1;  z=.6 -> i=2 -> keep 2
    ids, logits = cands([0.20, 0.05, 0.30, 0.10, 0.35], ids=[0, 1, 2, 3, 4])
    assert survivors(apply_tail_free(ids, logits, 0.4)) == [4]
    assert survivors(apply_tail_free(ids, logits, 0.6)) == [4, 2]
    assert survivors(apply_tail_free(ids, logits, 1.0)) == [0, 1, 2, 3, 4]  # off: untouched
    two = cands([0.9, 0.1])
    assert survivors(apply_tail_free(*two, 0.1)) == [0, 1]                # <= 2 candidates: untouched


def test_tail_free_flat_second_derivative_is_uniform():
    # p = [.4, .3, .2, .1]: d1 = [.1, .1, .1], d2 = [0, 0] (sum < 1e-6) -> uniform [.5, .5]
    # z = .3: i=0 excluded (min_keep), i=1 cum 1.0 > .3 -> keep 1
    assert survivors(apply_tail_free(*cands([0.4, 0.3, 0.2, 0.1]), 0.3)) == [0]


def test_typical_can_drop_the_most_likely_token():
    # p = [.40, .35, .25]; H = .4*0.916291 + .35*1.049822 + .25*1.386294 = 1.080528 nats
    # |-ln p - H| = [.164237, .030706, .305766] -> typicality order t1, t0, t2
    # mass in that order: .35, .75, 1.0.  p=.3: .35 > .3 at i=0 -> [t1];  p=.7: .75 > .7 -> [t1, t0]
    c = cands([0.40, 0.35, 0.25])
    assert survivors(apply_typical(*c, 0.3)) == [1]
    assert survivors(apply_typical(*c, 0.7)) == [1, 0]
    assert survivors(apply_typical(*c, 1.0)) == [0, 1, 2]


def test_top_p_prefix_with_mass_at_least_p():
    # 4 equal logits: p = .25 exactly, cum = .25, .5 -> top_p .5 stops at 2 (>=, inclusive), lowest ids
    assert survivors(apply_top_p(np.arange(4), np.zeros(4), 0.5)) == [0, 1]
    c = cands([0.1, 0.4, 0.2, 0.3])               # sorted: t1 .4, t3 .3, t2 .2, t0 .1
    assert survivors(apply_top_p(*c, 0.65)) == [1, 3]      # cum .4, .7 >= .65
    assert survivors(apply_top_p(*c, 0.75)) == [1, 3, 2]   # cum .9 >= .75
    assert survivors(apply_top_p(*c, 0.0)) == [1]          # min_keep 1
    assert survivors(apply_top_p(*c, 0.0, min_keep=3)) == [1, 3, 2]
    assert survivors(apply_top_p(*c, 1.0)) == [0, 1, 2, 3]  # off: untouched


def test_min_p_relative_to_the_top_probability():
    c = cands([0.05, 0.5, 0.15, 0.3])             # sorted: t1 .5, t3 .3, t2 .15, t0 .05
    assert survivors(apply_min_p(*c, 0.25)) == [1, 3, 2]   # threshold .125: .05 out
    assert survivors(apply_min_p(*c, 0.35)) == [1, 3]      # threshold .175: .15 out
    assert survivors(apply_min_p(*c, 1.0)) == [1]
    assert survivors(apply_min_p(*c, 0.9, min_keep=3)) == [1, 3, 2]
    assert survivors(apply_min_p(*c, 0.0)) == [0, 1, 2, 3]  # off: untouched


def test_temperature_divides_logits():
    ids, logits = apply_temperature(np.arange(3), np.array([2.0, -1.0, 0.5]), 0.5)
    assert logits.tolist() == [4.0, -2.0, 1.0] and ids.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- the chain: defaults and order

def test_default_chain_by_hand():
    # 45 tokens, weights (= e^logit) t0 100, t1 10, t2 6, t3..t44 1 each; no history.
    # top-k 40: t0, t1, t2 + 37 of the weight-1 tokens (t3..t39), total 153.
    # top-p .95: cum (116 + j) / 153 >= .95 first at j = 30 (146/153 = .954; 145/153 = .948) -> 33 kept
    # min-p .05 (of 100/146): weight-1 tokens 1/146 < 5/146 out, t2 6/146 stays -> t0, t1, t2
    # temp .8: p ~ w^(1/.8) = w^1.25
    logits = np.log(np.array([100.0, 10.0, 6.0] + [1.0] * 42))
    ids, out = apply_chain(np.arange(45), logits, SamplingParams())
    assert ids.tolist() == [0, 1, 2]
    w = np.array([100.0, 10.0, 6.0]) ** 1.25
    np.testing.assert_allclose(softmax(out), w / w.sum(), rtol=1e-12)   # ~ [.92087, .05178, .02735]


def test_order_temperature_comes_after_min_p():
    # p = [.5, .3, .15, .05], min_p .25, temp .5.
    # llama.cpp order: min-p on the untempered p: threshold .125 -> t0, t1, t2 survive,
    #   then temp .5 squares the weights: [.25, .09, .0225] / .3625 = [.689655, .248276, .062069].
    # (temperature first would give p^2 normalised = [.685, .247, .062, .007], threshold .171: only 2.)
    params = SamplingParams(**{**OFF, "min_p": 0.25, "temp": 0.5})
    ids, out = apply_chain(*cands([0.5, 0.3, 0.15, 0.05]), params)
    assert ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(softmax(out), np.array([0.25, 0.09, 0.0225]) / 0.3625, rtol=1e-12)


def test_order_filters_after_typical_resort_by_logit():
    # typical .7 on [.40, .35, .25] keeps [t1, t0] in typicality order (see above);
    # top-p .1 then re-sorts by logit (llama.cpp fix #4261) and keeps the most likely: t0.
    params = SamplingParams(**{**OFF, "typical_p": 0.7, "top_p": 0.1})
    assert apply_chain(*cands([0.40, 0.35, 0.25]), params)[0].tolist() == [0]


def test_order_top_k_before_top_p():
    # p = [.4, .3, .2, .1]; top-k 2 renormalises to [.571, .429]; top-p .5 then keeps t0 alone.
    # (top-p .5 first would keep t0, t1 = cum .7, and top-k 2 would keep both.)
    params = SamplingParams(**{**OFF, "top_k": 2, "top_p": 0.5})
    assert apply_chain(*cands([0.4, 0.3, 0.2, 0.1]), params)[0].tolist() == [0]


def test_draw_follows_the_chain_probabilities():
    # the min-p/temperature case above: expected [.689655, .248276, .062069, 0]
    s = Sampler(SamplingParams(**{**OFF, "min_p": 0.25, "temp": 0.5}), 4, seed=1234)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    freq = np.bincount([s.sample(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.689655, 0.248276, 0.062069, 0.0], atol=0.03)
    assert freq[3] == 0.0


def test_ignore_eos_ban_holds_under_default_sampling():
    # token 2 is the most likely (p .6) but banned with -inf, as `--ignore-eos` does to EOS
    logits = np.log(np.array([0.2, 0.2, 0.6], dtype=np.float32))
    s = Sampler(SamplingParams().with_logit_bias(2, -math.inf), 3, seed=3)
    picks = {s.sample(logits) for _ in range(200)}
    assert picks == {0, 1}


# ---------------------------------------------------------------- mirostat

def test_mirostat_v2_truncates_by_surprise_and_updates_mu():
    logits = np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32))   # surprise 1, 2, 2 bits
    # tau .75 -> mu 1.5: surprise 2 > 1.5 cuts t1, t2; t0 alone has p 1, surprise 0
    #   mu = 1.5 - .1 * (0 - .75) = 1.575, then 1.575 + .075 = 1.65
    s = Sampler(SamplingParams(temp=1.0, mirostat=2, mirostat_tau=0.75), 3, seed=0)
    assert s.mu == 1.5
    assert s.sample(logits) == 0 and s.mu == pytest.approx(1.575)
    assert s.sample(logits) == 0 and s.mu == pytest.approx(1.65)
    # tau 1.5 -> mu 3: all kept; mu = 3 - .1 * (s - 1.5) = 3.05 after t0 (1 bit), 2.95 after t1/t2 (2 bits)
    for seed in range(6):
        s = Sampler(SamplingParams(temp=1.0, mirostat=2, mirostat_tau=1.5), 3, seed=seed)
        token = s.sample(logits)
        assert s.mu == pytest.approx(3.05 if token == 0 else 2.95)


def test_mirostat_v1_top_k_from_zipf_estimate():
    # Zipf p ~ 1/r^2 over N=4: ln(p_i/p_i+1) = 2 ln((i+2)/(i+1)) so s_hat = 2, eps = 1,
    # k = (2^mu / (1 - 4^-1))^(1/2) = sqrt(2^mu * 4/3).
    logits = np.log(1.0 / np.array([1.0, 4.0, 9.0, 16.0], dtype=np.float32))
    # tau .25 -> mu .5: k = sqrt(1.4142 * 1.3333) = 1.373 -> top-1 -> t0, p 1, surprise 0
    #   mu = .5 - .1 * (0 - .25) = .525
    s = Sampler(SamplingParams(temp=1.0, mirostat=1, mirostat_tau=0.25), 4, seed=0)
    assert s.sample(logits) == 0 and s.mu == pytest.approx(0.525)
    # tau 1 -> mu 2: k = sqrt(16/3) = 2.309 -> top-2 renormalised [1, 1/4] / 1.25 = [.8, .2]
    #   t0: mu = 2 - .1 * (-log2 .8 - 1) = 2.0678072;  t1: mu = 2 - .1 * (-log2 .2 - 1) = 1.8678072
    seen = set()
    for seed in range(12):
        s = Sampler(SamplingParams(temp=1.0, mirostat=1, mirostat_tau=1.0), 4, seed=seed)
        token = s.sample(logits)
        seen.add(token)
        assert s.mu == pytest.approx(2.0678072 if token == 0 else 1.8678072, abs=1e-6)
    assert seen == {0, 1}


@pytest.mark.parametrize("mirostat", [1, 2])
def test_mirostat_survives_banned_and_degenerate_candidates(mirostat):
    # a banned token (p 0) among the top m makes ln(p_i / p_i+1) infinite: s_hat = inf, k = 1 -> greedy
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = Sampler(SamplingParams(temp=1.0, mirostat=mirostat, logit_bias=((0, -math.inf),)), 3, seed=0)
    assert s.sample(logits) in (1, 2) and math.isfinite(s.mu)
    # a one-token vocabulary (0/0 estimate) and a flat distribution (s_hat = 0) still return a token
    assert Sampler(SamplingParams(mirostat=mirostat), 1, seed=0).sample(np.zeros(1, np.float32)) == 0
    assert 0 <= Sampler(SamplingParams(mirostat=mirostat), 5, seed=0).sample(np.zeros(5, np.float32)) < 5


def test_mirostat_applies_temperature_first():
    # temp .5 squares p = [.5, .25, .25] -> [4, 1, 1] / 6: surprise log2 1.5 = .585, log2 6 = 2.585
    # tau .75 -> mu 1.5 keeps t0 alone; mu = 1.5 - .1 * (0 - .75) = 1.575 (as without temperature),
    # but tau 1.25 -> mu 2.5: still t0 alone (2.585 > 2.5), where temp 1 would keep all three.
    logits = np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32))
    for seed in range(5):
        s = Sampler(SamplingParams(temp=0.5, mirostat=2, mirostat_tau=1.25), 3, seed=seed)
        assert s.sample(logits) == 0 and s.mu == pytest.approx(2.5 + 0.125)
    picks = {Sampler(SamplingParams(temp=1.0, mirostat=2, mirostat_tau=1.25), 3, seed=seed).sample(logits)
             for seed in range(12)}
    assert picks == {0, 1, 2}


# ---------------------------------------------------------------- state: seed, history, reset

def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.random.default_rng(7).standard_normal(200).astype(np.float32)
    params = SamplingParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed):
        s = Sampler(params, 200, seed=seed)
        out = []
        for _ in range(30):
            out.append(s.sample(logits))
            s.accept(out[-1])
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_history_last_tokens_and_reset():
    s = Sampler(SamplingParams(mirostat=2, mirostat_tau=3.0), 100, seed=0)
    for t in range(70):
        s.accept(t)
    assert s.last_tokens(3) == [67, 68, 69]
    assert len(s.last_tokens(100)) == 64      # history keeps max(repeat_last_n, 64)
    s.mu = 1.0
    s.reset()
    assert s.last_tokens(32) == [] and s.mu == 6.0


def test_logits_shape_checked():
    with pytest.raises(ValueError, match=r"\(10,\)"):
        Sampler(SamplingParams(), 10, seed=0).sample(np.zeros(11, dtype=np.float32))
