"""Ids -> bytes, as llama.cpp's llama_token_to_piece and llama_detokenize do it.

Owns: the piece of each token (byte tokens, '▁' -> space for SPM, GPT-2 characters -> bytes for BPE,
control/unknown tokens shown only when asked), the removal of the leading space and of BOS/EOS, and the
Llama 3 vocabulary's `clean_spaces` pass. Must not tokenize; must not decode bytes to text (callers do,
with errors="replace", so that one-shot and streaming decoding agree).
"""
from __future__ import annotations

import re
from typing import Sequence

from core.errors import TokenizerError
from core.tokenizer.bpe import CHAR_TO_BYTE, gpt2_to_bytes
from core.tokenizer.spm import SPACE
from core.tokenizer.vocab import ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED, Vocab

# clean_spaces: three left-to-right passes over the bytes (llama_vocab::impl::detokenize). Each pass
# only looks at original neighbours of the character it keeps or drops, so each is one regex substitution:
_CLEAN_PUNCT = re.compile(rb" (?=[?!.,])")        # " ?" " !" " ." " ," -> drop the space
_CLEAN_QUOTE = re.compile(rb" ' ")                 # " ' " -> "'" (both spaces go)
_CLEAN_CONTRACTION = re.compile(rb" '(?=[sm]|re|ve)")  # " 's" " 'm" " 're" " 've" -> drop the space


def clean_spaces(text: bytes) -> bytes:
    text = _CLEAN_PUNCT.sub(b"", text)
    if b"'" in text:
        text = _CLEAN_QUOTE.sub(b"'", text)
        text = _CLEAN_CONTRACTION.sub(b"'", text)
    return text


class Detokenizer:
    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._pieces: dict[bool, list[bytes | None]] = {True: [None] * vocab.n_vocab,
                                                       False: [None] * vocab.n_vocab}

    def check_id(self, token_id: int) -> int:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            try:
                token_id = int(token_id)  # numpy integers
            except (TypeError, ValueError):
                raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= token_id < self.vocab.n_vocab:
            raise TokenizerError(f"token id {token_id} out of range [0, {self.vocab.n_vocab}) "
                                 f"for {self.vocab.source}")
        return token_id

    def piece(self, token_id: int, special: bool = True) -> bytes:
        """llama_token_to_piece(token, lstrip=0, special)."""
        token_id = self.check_id(token_id)
        cache = self._pieces[special]
        piece = cache[token_id]
        if piece is None:
            piece = cache[token_id] = self._make_piece(token_id, special)
        return piece

    def _make_piece(self, token_id: int, special: bool) -> bytes:
        v = self.vocab
        attr = int(v.attrs[token_id])
        text = v.tokens[token_id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL):
            return text.encode("utf-8", "surrogateescape") if special else b""
        if attr & ATTR_USER_DEFINED:
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if v.model == "llama":
                return text.replace(SPACE, " ").encode("utf-8", "surrogateescape")
            return _decode_gpt2(text)
        if attr & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                raise TokenizerError(f"{v.source}: byte token {token_id} has text {text!r}") from None
        return b""  # unused / undefined tokens print nothing

    def detokenize(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = False,
                   strip_leading_space: bool | None = None) -> bytes:
        """llama_detokenize: the pieces joined, minus the SPM leading space, BOS/EOS, then clean_spaces.

        `strip_leading_space=None` follows llama.cpp (SPM vocabularies strip one leading space of the
        first piece unless a BOS was removed); False keeps it (text that continues earlier text).
        """
        v = self.vocab
        ids = [self.check_id(i) for i in ids]
        remove_space = v.add_space_prefix if strip_leading_space is None else strip_leading_space
        if remove_special and v.add_bos and ids and ids[0] == v.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and v.add_eos and ids and ids[-1] == v.eos_id:
            ids = ids[:-1]
        pieces = [self.piece(i, unparse_special) for i in ids]
        if remove_space and pieces and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        text = b"".join(pieces)
        return clean_spaces(text) if v.clean_spaces else text


def _decode_gpt2(text: str) -> bytes:
    raw = gpt2_to_bytes(text)
    if raw is not None:
        return raw
    # llama.cpp's llama_decode_text marks characters outside the byte table like this (sic: it appends
    # the whole token text inside each marker).
    out = bytearray()
    for ch in text:
        if ch in CHAR_TO_BYTE:
            out.append(CHAR_TO_BYTE[ch])
        else:
            utf8 = ch.encode("utf-8", "surrogateescape")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode() + text.encode("utf-8", "surrogateescape") + b"]"
    return bytes(out)
