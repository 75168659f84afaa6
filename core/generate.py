"""The generation loop: feed tokens through a Pipeline, sample, shift the context, stop.

Owns how input enters the KV cache (`fit_input`: llama.cpp main's context shift and input cut, the one
home of that arithmetic; chunks of n_batch) and the one token loop (`generate`: prompt, then sample →
feed back until n_predict, an end-of-generation token or a stop string), yielding small event
dataclasses (mlx-lm's `stream_generate` is the model). It prints nothing and reads no input; every
evaluation and KV change goes through the Pipeline, so every rank replays it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from .pipeline import Pipeline
from .sampling import Sampler, SamplingParams

CTX_MARGIN = 4     # llama.cpp main: input longer than n_ctx - 4 tokens is cut (or, as a prompt, refused)


# ---- how input fits in the context ---------------------------------------------------------------

@dataclass(frozen=True)
class InputFit:
    """What to do with `n` input tokens at `n_past` (see fit_input)."""
    too_long: int = 0                    # tokens cut first: the input is longer than n_ctx - 4
    shift: tuple[int, int] | None = None  # kv_shift(n_keep, n_discard) before evaluating
    no_room: int = 0                     # tokens cut after the shift: the rest still does not fit
    full: bool = False                   # the context is full and the caller stops there: feed nothing

    def take(self, n: int) -> int:
        """How many of the n input tokens are evaluated."""
        return 0 if self.full else n - self.too_long - self.no_room


def fit_input(n: int, n_past: int, n_ctx: int, n_keep: int, stop_when_full: bool = False) -> InputFit:
    """llama.cpp main's rule for `n` new tokens at position `n_past`: cut an input longer than
    n_ctx - 4; when it does not fit, either stop (`stop_when_full`, -n -2) or keep position 0 and the
    `n_keep` tokens after it, discard half of the rest (moving later positions down) and cut what still
    does not fit."""
    too_long = max(0, n - (n_ctx - CTX_MARGIN))
    n -= too_long
    if n_past + n <= n_ctx:
        return InputFit(too_long)
    if stop_when_full:
        return InputFit(too_long, full=True)
    n_discard = max(0, (n_past - n_keep - 1) // 2)
    shift = (n_keep + 1, n_discard) if n_discard else None
    room = n_ctx - (n_past - n_discard)
    return InputFit(too_long, shift, max(0, n - room))


def batches(tokens: Sequence[int], n_batch: int) -> Iterator[Sequence[int]]:
    """Consecutive chunks of at most n_batch tokens."""
    for i in range(0, len(tokens), n_batch):
        yield tokens[i:i + n_batch]


# ---- events --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluated:
    n_tokens: int                        # tokens evaluated in one pipeline call
    ms: float                            # wall time of that call
    sampled: bool                        # a generated token fed back (decode), else prompt or user input
    logits: np.ndarray                   # (n_vocab,) of the last position, or (T, n_vocab) if all were asked


@dataclass(frozen=True)
class Shifted:
    n_keep: int                          # positions kept at the start of the cache
    n_discard: int                       # positions dropped after them


@dataclass(frozen=True)
class Skipped:
    n_tokens: int                        # input tokens cut because they could not fit in the context


@dataclass(frozen=True)
class Token:
    id: int                              # the sampled token (fed back into the cache right after)
    ms: float                            # time to sample it


@dataclass(frozen=True)
class Stopped:
    reason: str                          # "eog", "n-predict", "stop-string", "context-full"


Event = Evaluated | Shifted | Skipped | Token | Stopped


class TokenSampler(Protocol):
    def sample(self, logits: np.ndarray) -> int: ...
    def accept(self, token: int) -> None: ...


def greedy_sampler(n_vocab: int) -> Sampler:
    """Argmax with no penalty (lowest id on ties), as the reference continuations were made."""
    return Sampler(SamplingParams(temp=0.0, repeat_penalty=1.0), n_vocab, seed=0)


# ---- feeding and generating ----------------------------------------------------------------------

def feed(pipe: Pipeline, tokens: Sequence[int], *, n_batch: int, n_keep: int = 0, sampled: bool = False,
         stop_when_full: bool = False, all_logits: bool = False) -> Iterator[Event]:
    """Put `tokens` into the cache at pipe.n_past (fit_input, then n_batch chunks); yields Skipped,
    Shifted, Evaluated (one per chunk), or Stopped("context-full") when it stops instead."""
    fit = fit_input(len(tokens), pipe.n_past, pipe.n_ctx, n_keep, stop_when_full)
    if fit.too_long:
        yield Skipped(fit.too_long)
    if fit.full:
        yield Stopped("context-full")
        return
    if fit.shift is not None:
        pipe.kv_shift(*fit.shift)
        yield Shifted(*fit.shift)
    if fit.no_room:
        yield Skipped(fit.no_room)
    for chunk in batches(list(tokens)[:fit.take(len(tokens))], n_batch):
        t0 = time.perf_counter()
        logits = pipe.eval(chunk, all_logits=all_logits)       # (n_vocab,) or (len(chunk), n_vocab)
        yield Evaluated(len(chunk), 1000.0 * (time.perf_counter() - t0), sampled, logits)


@dataclass(frozen=True)
class GenerateSettings:
    n_predict: int = -1                  # tokens to sample; -1: until a stop; -2: until the context is full
    n_batch: int = 512                   # tokens per evaluation while feeding the prompt
    n_keep: int = 0                      # tokens after position 0 that a context shift keeps
    eog: frozenset[int] = frozenset()    # end-of-generation ids: the reply ends after feeding one
    stop: tuple[str, ...] = ()           # stop strings, matched on the generated text (needs `piece`)
    all_logits: bool = False             # the prompt's Evaluated carries every position's logits


def generate(pipe: Pipeline, sampler: TokenSampler, prompt: Sequence[int], settings: GenerateSettings,
             piece: Callable[[int], bytes] | None = None) -> Iterator[Event]:
    """Feed `prompt` (may be empty when the cache already ends with the input), then sample a token,
    yield it, feed it back, until a stop. Every sampled token is fed, the last one included (an EOG
    token too: the cache holds the whole reply). Ends with exactly one Stopped event."""
    s = settings
    if s.n_predict < -2:
        raise ValueError(f"n_predict must be >= -2, got {s.n_predict}")
    logits = None
    for event in feed(pipe, prompt, n_batch=s.n_batch, n_keep=s.n_keep, all_logits=s.all_logits):
        if isinstance(event, Evaluated):
            logits = event.logits[-1] if s.all_logits else event.logits
        yield event
    if logits is None:
        raise ValueError("generate() needs at least one prompt token")
    tail = b""                           # the end of the generated text, for stop strings
    longest = max((len(x.encode()) for x in s.stop), default=0)
    n = 0
    while s.n_predict < 0 or n < s.n_predict:
        t0 = time.perf_counter()
        token = int(sampler.sample(logits))
        sampler.accept(token)
        n += 1
        yield Token(token, 1000.0 * (time.perf_counter() - t0))
        for event in feed(pipe, [token], n_batch=1, n_keep=s.n_keep, sampled=True,
                          stop_when_full=s.n_predict == -2):
            if isinstance(event, Stopped):
                yield event
                return
            if isinstance(event, Evaluated):
                logits = event.logits
            yield event
        if token in s.eog:
            yield Stopped("eog")
            return
        if longest and piece is not None:
            tail = (tail + piece(token))[-(longest + 8):]
            if _ends_with_stop(tail, s.stop):
                yield Stopped("stop-string")
                return
    yield Stopped("n-predict")


def _ends_with_stop(tail: bytes, stops: Iterable[str]) -> bool:
    return any(x and x.encode() in tail for x in stops)
