"""Streaming detokenization: text for each new token, never half a character, never a lost one.

Owns: turning ids, one at a time, into printable text whose concatenation (after `flush()`) equals the
one-shot `Tokenizer.decode` of all the ids with the same options. Bytes are held back while they may still
change: an incomplete UTF-8 sequence (decoded by Python's incremental UTF-8 decoder, which gives exactly
the one-shot `errors="replace"` result), a trailing EOS that `remove_special` may drop, and, for
vocabularies with `clean_spaces`, a tail whose last 3 bytes hold a space or an apostrophe (the only
characters those passes remove or look at). Must not print.
"""
from __future__ import annotations

import codecs

from core.tokenizer.detokenize import Detokenizer, clean_spaces


class StreamDecoder:
    """`add(id) -> str` for each generated token, `flush() -> str` at the end."""

    def __init__(self, detok: Detokenizer, remove_special: bool = False, unparse_special: bool = False,
                 strip_leading_space: bool | None = None) -> None:
        v = detok.vocab
        self._detok = detok
        self._unparse = unparse_special
        self._drop_bos = remove_special and v.add_bos
        self._drop_eos = remove_special and v.add_eos
        self._strip = v.add_space_prefix if strip_leading_space is None else strip_leading_space
        self._clean = v.clean_spaces
        self._bos, self._eos = v.bos_id, v.eos_id
        self._first = True               # no token seen yet
        self._held_eos = False           # an EOS waiting to see whether it is the last token
        self._raw = bytearray()          # pieces joined, before clean_spaces, not yet final
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Text made final by this token (may be empty)."""
        token_id = self._detok.check_id(token_id)
        if self._first:
            self._first = False
            if self._drop_bos and token_id == self._bos:
                self._strip = False
                return ""
        if self._held_eos:
            self._held_eos = False
            self._append(self._eos)
        if self._drop_eos and token_id == self._eos:
            self._held_eos = True
            return ""
        self._append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """The rest: held-back bytes and any incomplete character (as U+FFFD, like the one-shot decode)."""
        self._held_eos = False  # a trailing EOS is removed, as in the one-shot decode
        return self._emit(final=True)

    def _append(self, token_id: int) -> None:
        piece = self._detok.piece(token_id, self._unparse)
        if self._strip:
            self._strip = False
            if piece[:1] == b" ":
                piece = piece[1:]
        self._raw += piece

    def _emit(self, final: bool) -> str:
        raw = self._raw
        if self._clean and not final:
            if b" " in raw[-3:] or b"'" in raw[-3:]:
                return ""  # clean_spaces may still change this tail
            out = clean_spaces(bytes(raw))
        else:
            out = clean_spaces(bytes(raw)) if self._clean else bytes(raw)
        self._raw = bytearray()
        return self._utf8.decode(out, final=final)
