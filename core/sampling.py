"""Token sampling: llama.cpp `main`'s late-2023 chain (common/sampling.cpp `llama_sampling_sample`).

Owns `SamplingParams` (validated, llama.cpp defaults), the pure `apply_*` filters over candidate
(ids, logits) arrays, mirostat v1/v2 and the stateful `Sampler` (repetition history, mirostat mu, RNG).
It never prints, never reads model files and never touches MPI; rank 0 alone samples.
The chain's order is in `Sampler.sample`; deliberate differences from llama.cpp in `Sampler`.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Iterable

import numpy as np

from .errors import UsageError

MIROSTAT_M = 100  # tokens mirostat v1 uses to estimate the Zipf exponent (llama.cpp's mirostat_m)
N_PREV = 64       # llama.cpp's sampling history length (n_prev) when repeat_last_n is smaller

# CLI flag of each field, so that errors name what the user typed (llama.cpp main's spelling).
FLAGS = {
    "temp": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "tfs_z": "--tfs", "typical_p": "--typical", "repeat_last_n": "--repeat-last-n",
    "repeat_penalty": "--repeat-penalty", "frequency_penalty": "--frequency-penalty",
    "presence_penalty": "--presence-penalty", "mirostat": "--mirostat",
    "mirostat_tau": "--mirostat-ent", "mirostat_eta": "--mirostat-lr",
    "penalize_nl": "--no-penalize-nl", "logit_bias": "--logit-bias",
}


def _bad(name: str, legal: str, value: object) -> UsageError:
    return UsageError(f"{FLAGS[name]} ({name}) must be {legal}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Parameters

@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp `main`'s sampling options with their late-2023 defaults (1.0 / 0 = filter disabled).

    `--ignore-eos` is the caller's job, as in llama.cpp: `params.with_logit_bias(eos_id, -inf)`.
    Raises UsageError (naming the flag, its legal range and the bad value) when built with a bad value.
    """
    temp: float = 0.80              # <= 0: greedy argmax (lowest id on ties); applied after the filters
    top_k: int = 40                 # <= 0: the whole vocabulary
    top_p: float = 0.95             # nucleus mass kept, in [0, 1]; 1 = off
    min_p: float = 0.05             # keep p >= min_p * p_max, in [0, 1]; 0 = off
    tfs_z: float = 1.00             # tail-free z in [0, 1]; 1 = off
    typical_p: float = 1.00         # locally typical mass in [0, 1]; 1 = off
    repeat_last_n: int = 64         # history window for the penalties; 0 = off, -1 = context size
    repeat_penalty: float = 1.10    # > 0; logit > 0 divided, logit <= 0 multiplied; 1 = off
    frequency_penalty: float = 0.00  # subtracted count times
    presence_penalty: float = 0.00   # subtracted once if present
    mirostat: int = 0               # 0 off, 1 mirostat, 2 mirostat 2.0 (replaces top-k..min-p)
    mirostat_tau: float = 5.00      # target surprise (bits), >= 0
    mirostat_eta: float = 0.10      # learning rate, >= 0
    penalize_nl: bool = True        # llama.cpp late 2023 penalised newline (`--no-penalize-nl` turns off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit); a later id entry wins

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "logit_bias":
                object.__setattr__(self, f.name, _check_bias(value))
            elif f.name == "penalize_nl":
                if not isinstance(value, bool):
                    raise _bad(f.name, "true or false", value)
            elif f.type == "int":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise _bad(f.name, "an integer", value)
                object.__setattr__(self, f.name, int(value))
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                    raise _bad(f.name, "a number", value)
                if not math.isfinite(value):
                    raise _bad(f.name, "a finite number", value)
                object.__setattr__(self, f.name, float(value))
        for name in ("top_p", "min_p", "tfs_z", "typical_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise _bad(name, "in [0.0, 1.0]", getattr(self, name))
        if self.repeat_last_n < -1:
            raise _bad("repeat_last_n", ">= -1 (-1 = context size, 0 = off)", self.repeat_last_n)
        if self.repeat_penalty <= 0.0:
            raise _bad("repeat_penalty", "> 0.0 (1.0 = off)", self.repeat_penalty)
        if self.mirostat not in (0, 1, 2):
            raise _bad("mirostat", "0, 1 or 2", self.mirostat)
        for name in ("mirostat_tau", "mirostat_eta"):
            if getattr(self, name) < 0.0:
                raise _bad(name, ">= 0.0", getattr(self, name))

    @classmethod
    def from_namespace(cls, options: object) -> SamplingParams:
        """Build from any object with attributes of the same names (e.g. chat's ChatOptions);
        absent attributes keep their defaults. `--ignore-eos` and `--seed` stay with the caller."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)})

    def with_logit_bias(self, token: int, bias: float) -> SamplingParams:
        """A copy with `bias` on `token`, replacing any earlier bias on it (llama.cpp's map assign).

        `--ignore-eos` is `params.with_logit_bias(eos_id, float("-inf"))`.
        """
        return replace(self, logit_bias=self.logit_bias + ((token, bias),))

    def describe(self) -> str:
        """The settings block llama.cpp `main` printed at start-up (llama_sampling_print)."""
        return (f"\trepeat_last_n = {self.repeat_last_n}, repeat_penalty = {self.repeat_penalty:.3f}, "
                f"frequency_penalty = {self.frequency_penalty:.3f}, "
                f"presence_penalty = {self.presence_penalty:.3f}\n"
                f"\ttop_k = {self.top_k}, tfs_z = {self.tfs_z:.3f}, top_p = {self.top_p:.3f}, "
                f"min_p = {self.min_p:.3f}, typical_p = {self.typical_p:.3f}, temp = {self.temp:.3f}\n"
                f"\tmirostat = {self.mirostat}, mirostat_lr = {self.mirostat_eta:.3f}, "
                f"mirostat_ent = {self.mirostat_tau:.3f}")


def _check_bias(entries: Iterable) -> tuple[tuple[int, float], ...]:
    """Normalise logit_bias to ((id, bias), ...); ids >= 0 ints, biases finite or -inf (a ban)."""
    out = []
    for entry in entries:
        try:
            token, bias = entry
        except (TypeError, ValueError):
            raise _bad("logit_bias", "(token id, bias) pairs", entry) from None
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise _bad("logit_bias", "a token id >= 0 with its bias", entry)
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating, np.integer)) \
                or math.isnan(bias) or bias == math.inf:
            raise _bad("logit_bias", "a finite bias or -inf (ban)", entry)
        out.append((int(token), float(bias)))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Pure kernels over candidates: ids (n,) int64 and logits (n,) float64, returned as new arrays.
# Filters that need probabilities sort by logit, descending, ties by lower id (llama.cpp's std::sort
# leaves tie order unspecified; we pin it), then take the softmax over the current candidates.

def sort_desc(ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -logits))  # primary key: -logit; then id
    return ids[order], logits[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    # (n,) -> (n,) probabilities of the current candidates (llama_sample_softmax, without the sort)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    # (n_vocab,) -> (n_vocab,); a later entry for the same id replaces an earlier one (map semantics)
    out = logits.copy()
    for token, value in dict(bias).items():
        out[token] += value
    return out


def apply_penalties(logits: np.ndarray, last_tokens: np.ndarray, repeat: float, frequency: float,
                    presence: float) -> np.ndarray:
    """llama_sample_repetition_penalties on logits in token id order (a new array): each token seen c > 0
    times in `last_tokens` gets logit / repeat (logit > 0) or logit * repeat (logit <= 0), then
    - c * frequency - presence. Only the seen tokens are touched (a chat token over SmolLM2's 49152 ids:
    2.2 ms when every id was, measured), and nothing when the penalties are neutral, as in llama.cpp."""
    return penalise(logits.copy(), last_tokens, repeat, frequency, presence)


def penalise(logits: np.ndarray, last_tokens: np.ndarray, repeat: float, frequency: float,
             presence: float) -> np.ndarray:
    """apply_penalties in place (returns `logits`)."""
    if len(last_tokens) == 0 or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return logits
    seen, counts = np.unique(last_tokens, return_counts=True)        # (u,), (u,)
    val = logits[seen]                                                # (u,)
    logits[seen] = np.where(val <= 0, val * repeat, val / repeat) - counts * frequency - presence
    return logits


TOP_K_STRIDE = 64  # apply_top_k's sample: every 64th logit (SmolLM2's 49152: 768 of them)


def apply_top_k(ids: np.ndarray, logits: np.ndarray, k: int, min_keep: int = 1):
    """Keep the k largest logits, sorted (llama_sample_top_k); k <= 0 keeps all (common's rule).

    Preselection in O(n): the k-th largest of a strided sample is at most the k-th largest of all, so the
    logits at or above it hold every survivor; the exact k-th largest of those, then everything tied
    with it, then an exact sort: the same survivors as partitioning all n logits, which took 0.46 ms of
    the 0.91 ms a SmolLM2 chat token's sampling took (2-core AMD EPYC; 0.12 ms with `_penalised`'s buffer)."""
    n = len(ids)
    k = n if k <= 0 else min(max(k, min_keep), n)
    if k < n:
        sample = logits[::TOP_K_STRIDE]
        if k < len(sample):                                          # a floor under the k-th largest
            floor = np.partition(sample, len(sample) - k)[len(sample) - k]
            pre = np.flatnonzero(logits >= floor)
            ids, logits = ids[pre], logits[pre]
        if k < len(ids):
            kth = np.partition(logits, len(ids) - k)[len(ids) - k]
            pre = np.flatnonzero(logits >= kth)                      # the k largest and their ties
            ids, logits = ids[pre], logits[pre]
    ids, logits = sort_desc(ids, logits)
    return ids[:k], logits[:k]


def apply_tail_free(ids: np.ndarray, logits: np.ndarray, z: float, min_keep: int = 1):
    """Tail-free sampling (llama_sample_tail_free): cut where the normalised |second derivative| of
    the sorted probabilities has accumulated more than z; off when z >= 1 or <= 2 candidates."""
    if z >= 1.0 or len(ids) <= 2:
        return ids, logits
    ids, logits = sort_desc(ids, logits)
    p = softmax(logits)
    d2 = np.abs(np.diff(p, n=2))                    # (n-2,) |(p_i - p_i+1) - (p_i+1 - p_i+2)|
    total = d2.sum()
    d2 = d2 / total if total > 1e-6 else np.full_like(d2, 1.0 / len(d2))
    cum = np.cumsum(d2)
    past = np.flatnonzero((cum > z) & (np.arange(len(d2)) >= min_keep))
    last = int(past[0]) if len(past) else len(ids)  # keep tokens [0, i) for the first such i
    return ids[:last], logits[:last]


def apply_typical(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Locally typical sampling (llama_sample_typical): order by |-ln p_i - H|, keep the smallest
    prefix whose mass exceeds p. Output is in typicality order (later filters re-sort by logit)."""
    if p >= 1.0:
        return ids, logits
    ids, logits = sort_desc(ids, logits)
    probs = softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(probs)
        entropy = -np.nansum(probs * logp)
        score = np.abs(-logp - entropy)             # (n,) distance from the entropy
    order = np.argsort(score, kind="stable")
    cum = np.cumsum(probs[order])
    done = np.flatnonzero((cum > p) & (np.arange(len(ids)) >= min_keep - 1))
    last = int(done[0]) + 1 if len(done) else len(ids)
    return ids[order[:last]], logits[order[:last]]


def apply_top_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Nucleus (llama_sample_top_p): the shortest sorted prefix with mass >= p (at least min_keep)."""
    if p >= 1.0:
        return ids, logits
    ids, logits = sort_desc(ids, logits)
    cum = np.cumsum(softmax(logits))
    done = np.flatnonzero((cum >= p) & (np.arange(1, len(ids) + 1) >= min_keep))
    last = int(done[0]) + 1 if len(done) else len(ids)
    return ids[:last], logits[:last]


def apply_min_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Min-p (llama_sample_min_p): keep the sorted prefix with prob >= p * max prob."""
    if p <= 0.0 or len(ids) == 0:
        return ids, logits
    ids, logits = sort_desc(ids, logits)
    probs = softmax(logits)
    small = np.flatnonzero((probs < p * probs[0]) & (np.arange(len(ids)) >= max(min_keep, 1)))
    last = int(small[0]) if len(small) else len(ids)
    return ids[:last], logits[:last]


def apply_temperature(ids: np.ndarray, logits: np.ndarray, temp: float):
    """llama_sample_temp: divide the logits (temp > 0)."""
    return ids, logits / temp


def apply_chain(ids: np.ndarray, logits: np.ndarray, params: SamplingParams, min_keep: int = 1):
    """The non-mirostat chain of llama.cpp late 2023: top-k, tail-free, typical, top-p, min-p, temp.

    Returns the surviving (ids, logits); `softmax` of those logits is the drawing distribution.
    """
    ids, logits = apply_top_k(ids, logits, params.top_k, min_keep)
    ids, logits = apply_tail_free(ids, logits, params.tfs_z, min_keep)
    ids, logits = apply_typical(ids, logits, params.typical_p, min_keep)
    ids, logits = apply_top_p(ids, logits, params.top_p, min_keep)
    ids, logits = apply_min_p(ids, logits, params.min_p, min_keep)
    return apply_temperature(ids, logits, params.temp)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    # index into (n,) probs by inverse CDF with one uniform draw (std::discrete_distribution's role)
    cdf = np.cumsum(probs)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(idx, len(probs) - 1)


def greedy(logits: np.ndarray) -> int:
    # llama_sample_token_greedy over id-ordered candidates: first (= lowest id) maximum
    return int(np.argmax(logits))


# ----------------------------------------------------------------------------------------------
# Mirostat (https://arxiv.org/abs/2007.14966); temperature is applied by the caller first.

def mirostat_v1(ids: np.ndarray, logits: np.ndarray, tau: float, eta: float, mu: float,
                n_vocab: int, rng: np.random.Generator, m: int = MIROSTAT_M) -> tuple[int, float]:
    """llama_sample_token_mirostat: estimate the Zipf exponent s from the top m tokens, pick
    k = (eps * 2^mu / (1 - N^-eps))^(1/s) with eps = s - 1, draw from top-k, then
    mu -= eta * (surprise - tau). Returns (token, new mu)."""
    ids, logits = sort_desc(ids, logits)
    p = softmax(logits)
    n = min(m - 1, len(p) - 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = np.log(np.arange(2, n + 2) / np.arange(1, n + 1))   # (n,) log((i+2)/(i+1))
        b = np.log(p[:n] / p[1:n + 1])                           # (n,) log(p_i / p_i+1)
        # numpy scalars so that 0/0, x/0 and overflow give nan/inf instead of raising
        s_hat = np.sum(t * b) / np.sum(t * t)                    # inf if a p_i+1 is 0 (a banned token)
        eps = s_hat - 1.0
        k = float(np.power(eps * np.exp2(np.float64(mu)) / (1.0 - np.float64(n_vocab) ** -eps),
                           1.0 / s_hat))
    # C++ int(k) of NaN (or of -inf) is INT_MIN on x86, clamped to 1 by top-k; a huge k keeps all.
    k_int = 1 if math.isnan(k) or k < 1.0 else int(min(k, len(ids)))
    ids, logits = apply_top_k(ids, logits, k_int, 1)
    probs = softmax(logits)
    i = draw(probs, rng)
    surprise = -math.log2(probs[i])
    return int(ids[i]), mu - eta * (surprise - tau)


def mirostat_v2(ids: np.ndarray, logits: np.ndarray, tau: float, eta: float, mu: float,
                rng: np.random.Generator) -> tuple[int, float]:
    """llama_sample_token_mirostat_v2: keep the sorted prefix with surprise -log2 p <= mu (at least
    one), renormalise, draw, then mu -= eta * (surprise - tau). Returns (token, new mu)."""
    ids, logits = sort_desc(ids, logits)
    with np.errstate(divide="ignore"):
        surprise = -np.log2(softmax(logits))
    over = np.flatnonzero(surprise > mu)
    last = max(int(over[0]) if len(over) else len(ids), 1)
    ids, logits = ids[:last], logits[:last]
    probs = softmax(logits)
    i = draw(probs, rng)
    return int(ids[i]), mu - eta * (-math.log2(probs[i]) - tau)


# ----------------------------------------------------------------------------------------------
# The stateful sampler

class Sampler:
    """llama.cpp's llama_sampling_context for one conversation: history, mirostat mu and the RNG.

    Args:
        params: the validated options.
        n_vocab: logits length; logit_bias ids must be below it.
        seed: RNG seed (>= 0); the same seed and the same calls give the same tokens.
        nl_id: the newline token, exempted from the penalties when params.penalize_nl is False
            (None: the vocabulary has none).
        n_ctx: what repeat_last_n = -1 means (None: the whole history since the last reset).

    Deliberate differences from llama.cpp late 2023 (all invisible with its defaults except the
    first, which only mattered for token id 0):
      - the history starts empty; llama.cpp zero-filled its 64 slots, so token 0 was "repeated";
      - mirostat mu starts (and resets) at 2 * tau, as the paper and pre-refactor `main` did;
        common/sampling.cpp left it at 0 and never reset it;
      - typical's output is re-sorted by the next filter (llama.cpp's fix #4261, Dec 2023);
      - ties are broken by the lower token id everywhere (std::sort left them unspecified);
      - repeat_last_n = -1 means n_ctx as documented (the code of that era used n_prev = 64);
      - probabilities are float64 and the RNG is numpy's PCG64, so runs do not match llama.cpp's
        mt19937 token for token.
    """

    def __init__(self, params: SamplingParams, n_vocab: int, seed: int, *,
                 nl_id: int | None = None, n_ctx: int | None = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"--seed must be an integer >= 0 (resolve -1 to a time seed first), "
                             f"got {seed!r}")
        for token, _ in params.logit_bias:
            if token >= n_vocab:
                raise _bad("logit_bias", f"a token id in [0, {n_vocab})", token)
        self.params = params
        self.n_vocab = int(n_vocab)
        self.seed = int(seed)
        self.nl_id = nl_id
        last_n = params.repeat_last_n if params.repeat_last_n >= 0 else n_ctx
        self.penalty_last_n: int | None = last_n   # None: unbounded (since reset)
        self._history: deque[int] = deque(maxlen=None if last_n is None else max(last_n, N_PREV))
        self._ids = np.arange(self.n_vocab, dtype=np.int64)
        self._buf = np.empty(self.n_vocab, dtype=np.float64)           # see _penalised
        self._rng = np.random.default_rng(self.seed)
        self.mu = 2.0 * params.mirostat_tau

    def accept(self, token: int) -> None:
        """Append a token to the history (prompt, user and generated tokens, like llama.cpp main)."""
        self._history.append(int(token))

    def reset(self) -> None:
        """Clear the repetition history and the mirostat state (llama_sampling_reset); the RNG runs on."""
        self._history.clear()
        self.mu = 2.0 * self.params.mirostat_tau

    def last_tokens(self, n: int) -> list[int]:
        """The last n accepted tokens (fewer if fewer were accepted since the last reset)."""
        return list(self._history)[-n:] if n > 0 else []

    def penalised_logits(self, logits: np.ndarray) -> np.ndarray:
        """Logit bias then the penalties, over the whole vocabulary (id order), as float64 (a new array)."""
        return self._penalised(logits).copy()

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        """penalised_logits in this sampler's own buffer, valid until the next call. A fresh (n_vocab,) f64
        array per token cost ~0.1 ms each in page faults over SmolLM2's 49152 ids (measured)."""
        p = self.params
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"sampler expects logits of shape ({self.n_vocab},), got {logits.shape}")
        out = self._buf
        np.copyto(out, logits)                                           # (n_vocab,) f64
        if p.logit_bias:
            out[:] = apply_logit_bias(out, p.logit_bias)
        last_n = len(self._history) if self.penalty_last_n is None else self.penalty_last_n
        window = np.fromiter(self.last_tokens(last_n), dtype=np.int64)
        keep_nl = not p.penalize_nl and self.nl_id is not None and len(window)
        nl = out[self.nl_id] if keep_nl else None
        penalise(out, window, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        if keep_nl:
            out[self.nl_id] = nl                   # restore the (biased) newline logit
        return out

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from (n_vocab,) logits; does not accept it (call accept()).

        Order, as llama.cpp ran it: logit bias -> repetition/frequency/presence penalties over the last
        `repeat_last_n` tokens -> (temp <= 0: greedy) | mirostat 1/2 (temperature first) |
        top-k -> tail-free -> typical -> top-p -> min-p -> temperature -> draw.
        """
        p = self.params
        cur = self._penalised(logits)                                     # (n_vocab,), our buffer
        if p.temp <= 0.0:
            return greedy(cur)
        if p.mirostat == 1:
            token, self.mu = mirostat_v1(self._ids, cur / p.temp, p.mirostat_tau, p.mirostat_eta,
                                         self.mu, self.n_vocab, self._rng)
            return token
        if p.mirostat == 2:
            token, self.mu = mirostat_v2(self._ids, cur / p.temp, p.mirostat_tau, p.mirostat_eta,
                                         self.mu, self._rng)
            return token
        ids, out = apply_chain(self._ids, cur, p)
        return int(ids[draw(softmax(out), self._rng)])
