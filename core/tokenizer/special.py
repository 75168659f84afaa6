"""Special-token splitting: cut text into raw fragments and special-token ids before tokenizing.

Owns: llama.cpp's tokenizer_st_partition. Special tokens are the control, user-defined and unknown
tokens, tried longest text first; each one splits every raw fragment left by the previous ones at all
its occurrences. Control and unknown tokens only when `parse_special` (prompts, templates); user-defined
tokens always (as llama.cpp and Hugging Face do). Must not tokenize the raw fragments.
"""
from __future__ import annotations

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
