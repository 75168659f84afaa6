"""A byte-level tokenizer with hand-computable ids and a driver for ChatState, for the state-machine tests.

Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 + b for each UTF-8 byte b, plus optional multi-byte pieces
(id -> bytes) that only the "model" produces. So the expected token lists of a test are written by hand.
"""
from __future__ import annotations

from chat.options import ChatOptions
from chat.conversation import Generate
from chat.state import Accept, ChatState, Done, Eval, Read, Sample

BOS, EOS = 1, 2


class ByteTokenizer:
    bos_id = BOS
    eos_id = EOS
    eog_ids = frozenset({EOS})
    add_bos = True
    n_vocab = 400

    def __init__(self, extra: dict[int, bytes] | None = None):
        self.extra = dict(extra or {})

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        ids = [BOS] if (self.add_bos if add_bos is None else add_bos) else []
        i = 0
        while i < len(text):
            if parse_special and text.startswith("<s>", i):
                ids.append(BOS)
                i += 3
            elif parse_special and text.startswith("</s>", i):
                ids.append(EOS)
                i += 4
            else:
                ids.extend(3 + b for b in text[i].encode("utf-8"))
                i += 1
        return ids

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        if token == BOS:
            return b"<s>" if special else b""
        if token == EOS:
            return b"</s>" if special else b""
        if token in self.extra:
            return self.extra[token]
        return bytes([token - 3])


def ids(text: str) -> list[int]:
    """Hand-computable ids of text without BOS."""
    return [3 + b for b in text.encode("utf-8")]


def drive(state, samples: list[int], inputs: list[str | None], max_steps: int = 10_000,
          on_request=None, replies: list | None = None) -> list:
    """Run a state machine (ChatState or ConversationState): Sample takes the next of `samples`, Read the
    next of `inputs`, Generate the next of `replies` ((reply ids, reason)).

    Running out of samples or inputs ends the run (returns what happened so far, ending with
    the request that could not be answered)."""
    samples, inputs, replies = list(samples), list(inputs), list(replies or [])
    gen = state.run()
    log = []
    reply = None
    for _ in range(max_steps):
        try:
            req = gen.send(reply)
        except StopIteration:
            return log
        log.append(req)
        reply = None
        if on_request is not None:
            on_request(state, req)
        if isinstance(req, Sample):
            if not samples:
                return log
            reply = samples.pop(0)
        elif isinstance(req, Read):
            if not inputs:
                return log
            reply = inputs.pop(0)
        elif isinstance(req, Generate):
            reply = replies.pop(0)
        elif isinstance(req, Done):
            return log
    raise AssertionError("state machine did not stop")


def evals(log: list) -> list[list[int]]:
    return [list(r.tokens) for r in log if isinstance(r, Eval)]


def kinds(log: list) -> list[str]:
    return [type(r).__name__ for r in log if not isinstance(r, Accept)]


def make(opts: ChatOptions, prompt: str, n_ctx: int = 512, extra=None, **kw) -> ChatState:
    return ChatState(opts.loop_settings(**kw), ByteTokenizer(extra), n_ctx, prompt)
