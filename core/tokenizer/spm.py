"""SentencePiece-style BPE (`tokenizer.ggml.model = llama`): merge the best-scoring pair, byte fallback.

Owns: llama.cpp's llm_tokenizer_spm_session: start from single characters, repeatedly merge the adjacent
pair whose concatenation is a token with the highest score (the leftmost on ties), then emit each symbol
as its token or, failing that, as `<0xNN>` byte tokens. The caller has already replaced spaces by '▁' and
added the leading space. Must not handle special tokens or BOS/EOS.

Speed: llama.cpp merges over the whole fragment at once. Here the fragment is cut before a '▁' wherever no
token contains the two characters around the cut: no merge can cross such a cut, and merges on either
side keep their relative order, so the result is the same; the pieces (mostly words) are then cached.
"""
from __future__ import annotations

import heapq

from core.errors import TokenizerError
from core.tokenizer.vocab import Vocab

SPACE = "\u2581"  # '▁', SentencePiece's escaped space


class SpmEncoder:
    _CACHE_LIMIT = 200_000

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.token_to_id = vocab.token_to_id
        self.scores = vocab.scores.tolist()
        self.cache: dict[str, list[int]] | None = {}   # None disables caching (benchmarks)
        self._joins: frozenset[str] | None = None   # 2-char strings ending in '▁' found inside tokens
        self._byte_ids: list[int | None] = [self._byte_token(b) for b in range(256)]

    def _byte_token(self, b: int) -> int | None:
        tid = self.token_to_id.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:
            tid = self.token_to_id.get(chr(b))
        return tid

    def byte_id(self, b: int) -> int:
        tid = self._byte_ids[b]
        if tid is None:
            raise TokenizerError(f"{self.vocab.source}: no byte token <0x{b:02X}> for byte fallback")
        return tid

    def encode(self, text: str) -> list[int]:
        """`text` is already escaped ('▁' for spaces, leading space added)."""
        out: list[int] = []
        cache = self.cache
        for piece in self._pieces(text):
            ids = cache.get(piece) if cache is not None else None
            if ids is None:
                ids = self.encode_piece(piece)
                if cache is None:
                    out.extend(ids)
                    continue
                if len(cache) >= self._CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def _pieces(self, text: str) -> list[str]:
        if self._joins is None:
            self._joins = frozenset(t[i - 1:i + 1] for t in self.vocab.tokens
                                    for i in range(1, len(t)) if t[i] == SPACE)
        joins = self._joins
        pieces, start = [], 0
        pos = text.find(SPACE, 1)
        while pos > 0:
            if text[pos - 1:pos + 1] not in joins:
                pieces.append(text[start:pos])
                start = pos
            pos = text.find(SPACE, pos + 1)
        pieces.append(text[start:])
        return pieces

    def encode_piece(self, text: str) -> list[int]:
        syms = list(text)
        n = len(syms)
        if n == 0:
            return []
        tok, scores = self.token_to_id, self.scores
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        for i in range(n - 1):
            tid = tok.get(syms[i] + syms[i + 1])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue  # outdated entry: a side changed since it was queued
            syms[left], syms[right] = ls + rs, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            for a, b in ((prev[left], left), (left, nxt[left])):
                if a >= 0 and b >= 0:
                    joined = syms[a] + syms[b]
                    tid = tok.get(joined)
                    if tid is not None:
                        heapq.heappush(heap, (-scores[tid], a, b, len(joined)))
        out: list[int] = []
        for sym in syms:
            if not sym:
                continue
            tid = tok.get(sym)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self.byte_id(b) for b in sym.encode("utf-8", "surrogatepass"))
        return out
