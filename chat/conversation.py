"""llama-cli's conversation mode (-cnv): the model's chat template decides what enters the cache.

Owns: the message list, what each turn feeds (the template's rendering of what is new, with special
tokens parsed in the template's text only, never in what the user typed), how a reply is closed (an
end-of-generation token is already in the cache; a reply cut by Ctrl-C or -n gets the end-of-turn token),
and the part of the cache a context shift must keep (everything before the first user message: the
system prompt is never cut). Like chat/state.py it does no I/O and holds no model: `run()` yields requests
that chat/session.py answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Protocol, Sequence

from core.chat_template import ChatTemplate, Part, drop_leading
from core.generate import CTX_MARGIN

from .options import ConversationSettings
from .state import Accept, Counters, Done, Eval, Print, Read, ResetHistory, UserTurn

INPUT_MARK = "\n> "             # llama-cli's prompt before each user turn


class ConversationTokenizer(Protocol):
    add_bos: bool
    bos_id: int
    eos_id: int
    eot_id: int
    eog_ids: frozenset[int]

    def encode_parts(self, parts: Sequence[Part], add_bos: bool | None = None) -> list[int]: ...
    def token_to_piece(self, token: int, special: bool = True) -> bytes: ...
    def decode(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = False,
               strip_leading_space: bool | None = None) -> str: ...


@dataclass(frozen=True)
class ClearCache:
    pass                               # the driver clears the KV cache on every rank


@dataclass(frozen=True)
class Generate:
    """Feed `tokens`, then generate one reply (core.generate.generate). The driver answers with
    (reply token ids, the reason it ended: "eog", "n-predict", "stop-string", "context-full" or
    "interrupted")."""
    tokens: tuple[int, ...]
    n_predict: int
    n_keep: int                        # positions after position 0 a context shift keeps
    stop: tuple[str, ...] = ()


class ConversationState:
    """One conversation: build with the settings, then drive `run()` (the same driver as ChatState).

    Raises (from run):
        TemplateError: the template fails to render (a one-line message naming the problem).
    """

    interactive = True                 # a Ctrl-C while generating gives the prompt back

    def __init__(self, settings: ConversationSettings, template: ChatTemplate,
                 tokenizer: ConversationTokenizer, n_ctx: int):
        self.settings = settings
        self.template = template
        self.tok = tokenizer
        self.n_ctx = n_ctx
        self.messages: list[dict[str, str]] = []
        if settings.system is not None:
            self.messages.append({"role": "system", "content": settings.system})
        self.c = Counters()            # n_generated, n_shifts (the driver counts shifts) for /save and timings
        self.n_keep = 0                # cache positions (after position 0) a shift keeps: the system part
        self.closed_by: int | None = None   # the token that ended the last reply (None: nothing cached)

    def interrupt(self) -> None:
        """Ctrl-C while generating: the driver stops the reply itself; nothing to do here."""

    # -- the turn loop -----------------------------------------------------------------------------
    def run(self) -> Generator[object, object, None]:
        first = self.settings.first_user
        while True:
            if first:
                text, first = first, ""
                yield Print(INPUT_MARK)
                yield UserTurn(text + "\n", (), echo=True)
            else:
                yield Print(INPUT_MARK)
                line = yield Read()
                if line is None:
                    yield Done("eof")
                    return
                text = str(line)
                if text.endswith("\n"):
                    text = text[:-1]
                if not text.strip():
                    continue
                yield UserTurn(text + "\n", ())
            tokens, rebuilt = self._turn_tokens(text)
            if tokens is None:
                yield Print(f"your message is too long for the context ({self.n_ctx} tokens, -c): "
                            "not sent\n", "error")
                continue
            self.messages.append({"role": "user", "content": text})
            if rebuilt:
                yield ClearCache()
            yield ResetHistory()
            yield Accept(tuple(tokens))
            reply = yield Generate(tuple(tokens), self.settings.n_predict, self.n_keep, self.settings.stop)
            ids, reason = reply
            ids = list(ids)
            self.c.n_generated += len(ids)
            eog = bool(ids) and ids[-1] in self.tok.eog_ids
            text_ids = ids[:-1] if eog else ids
            self.messages.append({"role": "assistant", "content": self.tok.decode(text_ids, remove_special=True)})
            yield Print("\n")
            if reason == "context-full":
                yield Print("context full and n_predict == -2 => stopping\n", "error")
                yield Done("context-full")
                return
            if eog:
                self.closed_by = ids[-1]
            else:                      # cut by Ctrl-C, -n or a stop string: close the turn as llama-cli
                self.closed_by = self._end_of_turn()
                yield Eval((self.closed_by,), False)

    # -- what a turn feeds -------------------------------------------------------------------------
    def _turn_tokens(self, text: str) -> tuple[list[int] | None, bool]:
        """Token ids the new user message adds to the cache (None: it cannot fit in the context), and
        whether they are the whole conversation again (the cache must be cleared first)."""
        conversation = [*self.messages, {"role": "user", "content": text}]
        parts = self.template.delta(self.messages, conversation[-1])
        rebuilt = parts is None and self.closed_by is not None    # the template rewrites earlier turns
        if parts is None or self.closed_by is None:                # nothing cached yet, or start over
            parts = self.template.render_parts(conversation) if parts is None else parts
            bos = self._bos_text()
            if bos:                                    # the vocabulary adds BOS itself (llama.cpp strips it)
                parts = drop_leading(parts, bos)
            tokens = self.tok.encode_parts(parts, add_bos=None)
            if self.closed_by is None:                 # the first turn: its system part is kept for good
                system = self.tok.encode_parts(_before_last_content(parts), add_bos=None)
                self.n_keep = max(0, len(system) - 1)
            room = self.n_ctx - CTX_MARGIN
        else:
            closed = self.tok.token_to_piece(self.closed_by, special=True).decode("utf-8", "replace")
            tokens = self.tok.encode_parts(drop_leading(parts, closed), add_bos=False)
            room = self.n_ctx - CTX_MARGIN - (self.n_keep + 1)
        return (tokens if len(tokens) <= room else None), rebuilt

    def _bos_text(self) -> str:
        if not self.tok.add_bos or self.tok.bos_id < 0:
            return ""
        return self.tok.token_to_piece(self.tok.bos_id, special=True).decode("utf-8", "replace")

    def _end_of_turn(self) -> int:
        """The token that closes a reply the model did not end: end-of-turn, else end-of-sequence."""
        return self.tok.eot_id if self.tok.eot_id >= 0 else self.tok.eos_id


def _before_last_content(parts: Sequence[Part]) -> list[Part]:
    """The parts before the last message content (the first turn's user message): the system part."""
    last = max((i for i, (_, template) in enumerate(parts) if not template), default=len(parts))
    return list(parts[:last])
