"""llama.cpp `main`'s interactive state machine (late 2023) as a pure generator of requests.

Owns: the rules of DESIGN.md §5 — prompt and instruct wrapping, reverse prompts on the last 32 tokens,
end of text, input prefix/suffix/BOS, empty lines, n_remain accounting, context shift, n_batch chunks,
history resets. It does no I/O and holds no model: `ChatState.run()` yields small request objects
(`Eval`, `Sample`, `Read`, `Show`, ...) and the driver (chat/session.py) answers them, so the same rules
run for a terminal, a pipe, a script and the tests. Only `Sample` and `Read` expect a value back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Protocol

from core.errors import ContextOverflowError
from core.generate import CTX_MARGIN, batches, fit_input

from .options import LoopSettings, process_escapes

# Alpaca instruct template (llama.cpp main, -ins): the prefix is tokenized with BOS.
INSTRUCT_PREFIX = "\n\n### Instruction:\n\n"
INSTRUCT_SUFFIX = "\n\n### Response:\n\n"
INSTRUCT_REVERSE_PROMPT = "### Instruction:\n\n"
INSTRUCT_INPUT_MARK = "\n> "
N_PREV = 32  # tokens of history searched for a reverse prompt (llama.cpp main's n_prev)


class TokenizerLike(Protocol):
    bos_id: int | None
    add_bos: bool
    eog_ids: frozenset[int]

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]: ...

    def token_to_piece(self, token: int, special: bool = True) -> bytes: ...


# ---------------------------------------------------------------------------------------------------
# Requests the state machine yields (the driver answers Sample with a token id, Read with text | None)

@dataclass(frozen=True)
class Eval:
    tokens: tuple[int, ...]          # evaluate at position n_past, then n_past += len(tokens)
    sampled: bool = False            # a generated token fed back (else prompt/user input): for timings


@dataclass(frozen=True)
class Shift:
    n_keep: int                      # positions kept at the start of the cache
    n_discard: int                   # positions dropped after them; later ones move down


@dataclass(frozen=True)
class Sample:
    pass                             # -> token id sampled from the last Eval's logits


@dataclass(frozen=True)
class Accept:
    tokens: tuple[int, ...]          # append to the sampler's repetition history


@dataclass(frozen=True)
class ResetHistory:
    pass                             # sampler.reset(): after every user turn


@dataclass(frozen=True)
class Show:
    tokens: tuple[int, ...]          # echo these tokens' pieces
    style: str                       # "prompt" (initial prompt, injected text) or "output" (generation)


@dataclass(frozen=True)
class Print:
    text: str                        # literal text for the conversation stream
    style: str = "output"            # "output", "prompt", "error"


@dataclass(frozen=True)
class Read:
    instruct: bool = False           # the "\n> " mark was just printed
    # -> the user's buffer (lines joined by chat/lines.py rules, "\n" included) or None at end of input


@dataclass(frozen=True)
class UserTurn:
    text: str                        # what the user's buffer became (after -e), for transcripts
    tokens: tuple[int, ...]          # every token the turn queued (prefix, BOS, wrapping included)
    echo: bool = False               # nobody typed it on this screen (-cnv's -p): show it as typed


@dataclass(frozen=True)
class Done:
    reason: str                      # "eof", "end-of-text", "n-predict", "reverse-prompt", "context-full"


Request = Eval | Shift | Sample | Accept | ResetHistory | Show | Print | Read | UserTurn | Done


@dataclass
class Counters:
    """Where the conversation stands; the driver reads these for the toolbar and /stats."""
    n_past: int = 0                  # positions in the KV cache (equals pipeline.n_past)
    n_remain: int = -1               # generation budget left (-n)
    n_consumed: int = 0              # tokens of embd_inp already queued for evaluation
    n_prompt: int = 0                # tokens of the initial prompt
    n_keep: int = 0                  # prompt tokens kept by a context shift (after BOS)
    n_shifts: int = 0                # context shifts so far
    n_generated: int = 0             # sampled tokens so far


class ChatState:
    """One conversation of llama.cpp `main`: build with the settings, then drive `run()`.

    Args:
        settings: the loop's settings (-r, --in-prefix, --in-suffix with --prompt-var filled).
        tokenizer: encode/token_to_piece/bos_id/add_bos, plus `eog_ids` (end-of-generation ids).
        n_ctx: the context size the pipeline was built with.
        prompt: the initial prompt text (-p, or the -f file's text), placeholders filled.

    Raises:
        ContextOverflowError: the prompt is longer than n_ctx - 4 tokens.
    """

    def __init__(self, settings: LoopSettings, tokenizer: TokenizerLike, n_ctx: int, prompt: str):
        self.settings = settings
        self.tok = tokenizer
        self.n_ctx = n_ctx
        self.instruct = settings.instruct
        self.interactive = settings.interactive
        self.input_prefix = settings.input_prefix
        self.input_suffix = settings.input_suffix
        self.eog = frozenset(tokenizer.eog_ids)
        self.reverse_prompts = list(settings.reverse_prompts)
        if self.instruct:
            self.reverse_prompts.append(INSTRUCT_REVERSE_PROMPT)
        # the prompt: tokenized with the model's BOS rule and special tokens; never empty
        self.embd_inp: list[int] = list(tokenizer.encode(prompt, add_bos=None, parse_special=True))
        if not self.embd_inp and tokenizer.bos_id is not None:
            self.embd_inp = [tokenizer.bos_id]
        if len(self.embd_inp) > n_ctx - CTX_MARGIN:
            raise ContextOverflowError(f"prompt is too long ({len(self.embd_inp)} tokens, "
                                       f"max {n_ctx - CTX_MARGIN} for -c {n_ctx})")
        self.c = Counters(n_remain=settings.n_predict, n_prompt=len(self.embd_inp))
        keep = settings.n_keep
        if keep < 0 or keep > len(self.embd_inp) or self.instruct:
            keep = len(self.embd_inp)
        self.c.n_keep = keep
        self.inp_pfx = tokenizer.encode(INSTRUCT_PREFIX, add_bos=None, parse_special=True)
        self.inp_sfx = tokenizer.encode(INSTRUCT_SUFFIX, add_bos=False, parse_special=True)
        self.is_interacting = settings.interactive_first or self.instruct
        self.is_antiprompt = False
        self.history: list[int] = []   # mirrors the sampler's history (since its last reset)

    # -- the driver's entry points besides run() ----------------------------------------------------

    def interrupt(self) -> None:
        """Ctrl-C while generating (interactive): stop at the next token and give the prompt back."""
        self.is_interacting = True

    def history_text(self, n: int = N_PREV) -> bytes:
        """The last n tokens of history as bytes (llama_sampling_prev_str)."""
        return b"".join(self.tok.token_to_piece(t, special=False) for t in self.history[-n:])

    def found_reverse_prompt(self) -> bool:
        """A reverse prompt ends the last 32 tokens' text (2 bytes of slack when not interactive)."""
        text = self.history_text()
        slack = 0 if self.interactive else 2
        for rp in self.reverse_prompts:
            needle = rp.encode("utf-8")
            start = max(0, len(text) - (len(needle) + slack))
            if text.find(needle, start) >= 0:
                return True
        return False

    def _accept(self, tokens: list[int]) -> Accept:
        self.history.extend(tokens)
        return Accept(tuple(tokens))

    # -- the loop of llama.cpp main, request by request ----------------------------------------------

    def run(self) -> Generator[Request, object, None]:
        o, c = self.settings, self.c
        embd: list[int] = []
        sampled = False            # embd holds a generated token (not queued input)
        input_echo = True
        style = "prompt"           # the initial prompt is shown in the prompt colour
        while (c.n_remain != 0 and not self.is_antiprompt) or self.interactive:
            if embd:
                embd = yield from self._evaluate(embd, sampled)
                if embd is None:
                    yield Done("context-full")
                    return
            embd = []
            if len(self.embd_inp) <= c.n_consumed and not self.is_interacting:
                token = yield Sample()
                yield self._accept([int(token)])
                embd.append(int(token))
                sampled = True
                input_echo = True
                c.n_remain -= 1
                c.n_generated += 1
            else:
                sampled = False
                while len(self.embd_inp) > c.n_consumed:      # queued prompt/user tokens, n_batch at most
                    embd.append(self.embd_inp[c.n_consumed])
                    c.n_consumed += 1
                    if len(embd) >= o.n_batch:
                        break
                if embd:
                    yield self._accept(list(embd))
            if input_echo and embd:
                yield Show(tuple(embd), style)
            if input_echo and len(self.embd_inp) == c.n_consumed:
                style = "output"
            if len(self.embd_inp) <= c.n_consumed:
                if self.reverse_prompts:
                    self.is_antiprompt = self.found_reverse_prompt()
                    if self.is_antiprompt and self.interactive:
                        self.is_interacting = True
                if self.history and self.history[-1] in self.eog:
                    if self.interactive:
                        if self.reverse_prompts:   # inject the first reverse prompt; shown, unlike main
                            first = self.tok.encode(self.reverse_prompts[0], add_bos=False, parse_special=True)
                            self.embd_inp.extend(first)
                            self.is_antiprompt = True
                            yield Print("\n")
                            yield Show(tuple(first), "prompt")
                        else:
                            yield Print("\n")
                        self.is_interacting = True
                if c.n_past > 0 and self.is_interacting:
                    done = yield from self._user_turn()
                    if done:
                        yield Done("eof")
                        return
                    input_echo = False
                if c.n_past > 0:
                    if self.is_interacting:
                        self.history.clear()
                        yield ResetHistory()
                    self.is_interacting = False
            if embd and embd[-1] in self.eog and not self.interactive:
                yield Print(" [end of text]\n")
                yield Done("end-of-text")
                return
            if self.interactive and c.n_remain <= 0 and o.n_predict >= 0:
                c.n_remain = o.n_predict
                self.is_interacting = True
        yield Done("reverse-prompt" if self.is_antiprompt else "n-predict")

    def _evaluate(self, embd: list[int], sampled: bool):
        """Cut an over-long input, shift the context when full, evaluate in n_batch chunks (the rule is
        core.generate.fit_input). Returns the evaluated tokens, or None when the context is full and
        -n is -2."""
        c = self.c
        fit = fit_input(len(embd), c.n_past, self.n_ctx, c.n_keep, stop_when_full=self.settings.n_predict == -2)
        if fit.too_long:
            yield Print(_skipped_text(fit.too_long), "error")
        if fit.full:
            yield Print("\n\ncontext full and n_predict == -2 => stopping\n", "error")
            return None
        if fit.shift is not None:            # on every rank: the driver sends it through the pipeline
            yield Shift(*fit.shift)
            c.n_past -= fit.shift[1]
            c.n_shifts += 1
        if fit.no_room:                      # the kept prompt leaves too little room (main would fail)
            yield Print(_skipped_text(fit.no_room), "error")
        embd = embd[:fit.take(len(embd))]
        for chunk in batches(embd, self.settings.n_batch):
            yield Eval(tuple(chunk), sampled)
            c.n_past += len(chunk)
        return embd

    def _user_turn(self):
        """Read the user's buffer and queue its tokens; returns True at end of input."""
        o, c = self.settings, self.c
        if self.instruct:
            yield Print(INSTRUCT_INPUT_MARK)
        queued_from = len(self.embd_inp)
        if o.input_prefix_bos and self.tok.bos_id is not None:
            self.embd_inp.append(self.tok.bos_id)
        if self.input_prefix:
            yield Print(self.input_prefix)
        buffer = yield Read(instruct=self.instruct)
        if buffer is None:
            return True
        buffer = str(buffer)
        if len(buffer) > 1:       # an empty line ("\n") hands control back without adding tokens
            if self.input_suffix:
                yield Print(self.input_suffix)
            if self.instruct and not self.is_antiprompt:
                c.n_consumed = len(self.embd_inp)
                self.embd_inp.extend(self.inp_pfx)
            if o.escape:
                buffer = process_escapes(buffer)
            line_pfx = self.tok.encode(self.input_prefix, add_bos=False, parse_special=True)
            line_inp = self.tok.encode(buffer, add_bos=False, parse_special=False)
            line_sfx = self.tok.encode(self.input_suffix, add_bos=False, parse_special=True)
            self.embd_inp.extend(line_pfx + line_inp + line_sfx)
            if self.instruct:
                self.embd_inp.extend(self.inp_sfx)
            c.n_remain -= len(line_inp)
            yield UserTurn(buffer, tuple(self.embd_inp[queued_from:]))
        return False


def _skipped_text(n: int) -> str:
    return f"<<input too long: skipped {n} token{'s' if n != 1 else ''}>>"
