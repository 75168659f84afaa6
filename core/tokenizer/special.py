"""Special-token splitting: cut text into raw fragments and special-token ids before tokenizing.

Owns: llama.cpp's tokenizer_st_partition. Special tokens are the control, user-defined and unknown
tokens, tried longest text first; each one splits every raw fragment left by the previous ones at all
its occurrences. Control and unknown tokens only when `parse_special` (prompts, templates); user-defined
tokens always (as llama.cpp and Hugging Face do). Also the same split over parts of a text of which only
some may hold control tokens (template text vs what a user typed). Must not tokenize the raw fragments.
"""
from __future__ import annotations

from itertools import groupby
from typing import Sequence

from core.tokenizer.vocab import ATTR_CONTROL, ATTR_UNKNOWN, ATTR_USER_DEFINED, Vocab


class SpecialSplitter:
    def __init__(self, vocab: Vocab) -> None:
        special = [i for i in range(vocab.n_vocab) if vocab.attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED
                                                                      | ATTR_UNKNOWN)]
        special.sort(key=lambda i: (-len(vocab.tokens[i].encode("utf-8", "surrogateescape")), i))
        self.all = [(vocab.tokens[i], i) for i in special]
        self.always = [(t, i) for t, i in self.all if vocab.attrs[i] & ATTR_USER_DEFINED]

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """Text -> list of raw fragments (non-empty str) and special token ids, in order."""
        if not text:
            return []
        parts: list[str | int] = [text]
        for token_text, tid in (self.all if parse_special else self.always):
            if not any(isinstance(p, str) and token_text in p for p in parts):
                continue
            new: list[str | int] = []
            for p in parts:
                if isinstance(p, int) or token_text not in p:
                    new.append(p)
                    continue
                pieces = p.split(token_text)
                for k, piece in enumerate(pieces):
                    if k:
                        new.append(tid)
                    if piece:
                        new.append(piece)
            parts = new
        return parts

    def split_parts(self, parts: Sequence[tuple[str, bool]]) -> list[str | int]:
        """Parts (text, parse_special) -> the fragments of their concatenation, special tokens taken only
        inside parts whose flag is True. Raw text on both sides of a part boundary stays one fragment.

        Neighbouring parts with the same flag are split as one text (a token may straddle them); a token
        straddling a True/False boundary is not one. So [(t, True)] splits like split(t, True), [(t, False)]
        like split(t, False), and any mix like split(joined, True) when no control-token text lies in or
        across a False part.
        """
        out: list[str | int] = []
        for parse_special, group in groupby(parts, key=lambda part: part[1]):
            for frag in self.split("".join(text for text, _ in group), parse_special):
                if isinstance(frag, str) and out and isinstance(out[-1], str):
                    out[-1] += frag
                else:
                    out.append(frag)
        return out
