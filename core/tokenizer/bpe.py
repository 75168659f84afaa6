"""Byte-level BPE (`tokenizer.ggml.model = gpt2`): pre-tokenize, map bytes to GPT-2 characters, merge by rank.

Owns: GPT-2's byte <-> unicode table and llama.cpp's merge loop (llm_tokenizer_bpe_session): always
merge the adjacent pair with the lowest merge rank, the leftmost one on ties; a finished symbol that is
not a token falls back to its single-byte tokens. Must not handle special tokens or BOS/EOS.
"""
from __future__ import annotations

import heapq

from core.tokenizer.pretokenize import make_splitter
from core.tokenizer.vocab import Vocab


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 get U+0100.. in order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_TO_CHAR: list[str] = _gpt2_byte_chars()                  # byte value -> GPT-2 character
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
_LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in enumerate(BYTE_TO_CHAR)})
_GPT2_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in enumerate(BYTE_TO_CHAR)})


def bytes_to_gpt2(data: bytes) -> str:
    """Raw bytes -> the GPT-2 characters BPE tokens are written in (b' ' -> 'Ġ')."""
    return data.decode("latin-1").translate(_LATIN1_TO_GPT2)


def gpt2_to_bytes(text: str) -> bytes | None:
    """GPT-2 characters -> raw bytes, or None if `text` holds a character outside the table."""
    latin = text.translate(_GPT2_TO_LATIN1)
    try:
        return latin.encode("latin-1")
    except UnicodeEncodeError:
        return None


class BpeEncoder:
    """Encodes raw text fragments (no special tokens inside) into ids; caches words it has seen."""

    _CACHE_LIMIT = 200_000

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.split = make_splitter(vocab.pre)
        self.ranks = vocab.merges
        self.token_to_id = vocab.token_to_id
        self.cache: dict[str, list[int]] | None = {}   # None disables caching (benchmarks)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for word in self.split(text):
            ids = cache.get(word) if cache is not None else None
            if ids is None:
                ids = self.encode_word(bytes_to_gpt2(word.encode("utf-8", "surrogatepass")))
                if cache is None:
                    out.extend(ids)
                    continue
                if len(cache) >= self._CACHE_LIMIT:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)
        return out

    def encode_word(self, word: str) -> list[int]:
        """One pre-tokenized word, already in GPT-2 characters -> ids."""
        tid = self.token_to_id.get(word)
        if tid is not None and (self.vocab.ignore_merges or len(word) == 1):
            return [tid]
        return [i for sym in self.merge(word) for i in self._symbol_ids(sym)]

    def merge(self, word: str) -> list[str]:
        """The merged symbols of a word: lowest rank first, leftmost on ties (llama.cpp's heap order)."""
        syms = list(word)
        n = len(syms)
        if n < 2:
            return syms
        ranks = self.ranks
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []
        for i in range(n - 1):
            r = ranks.get(syms[i] + " " + syms[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if not ls or not rs or ls + rs != text:
                continue  # outdated: one side was merged into something else since
            syms[left], syms[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            for a, b in ((prev[left], left), (left, nxt[left])):
                if a >= 0 and b >= 0:
                    r = ranks.get(syms[a] + " " + syms[b])
                    if r is not None:
                        heapq.heappush(heap, (r, a, b, syms[a] + syms[b]))
        return [s for s in syms if s]

    def _symbol_ids(self, sym: str) -> list[int]:
        tid = self.token_to_id.get(sym)
        if tid is not None:
            return [tid]
        # llama.cpp looks up each raw UTF-8 byte of the symbol as a one-byte token and drops misses.
        found = (self.token_to_id.get(bytes([b]).decode("utf-8", "surrogateescape"))
                 for b in sym.encode("utf-8", "surrogateescape"))
        return [i for i in found if i is not None]
