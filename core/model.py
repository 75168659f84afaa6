"""Stage: a contiguous slice of a LLaMA model's layers, optionally with the embedding in front and the
output head behind, with its own KV cache. A full-model stage is the whole model in one process.

Owns the forward pass (llama.cpp's LLM_ARCH_LLAMA graph in float32) over weights it loads from a
ModelFile: only the tensors of its layers (plus token_embd / output_norm / output when asked). It must not
know about MPI, tokenizers or sampling; core/pipeline.py chains stages across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from .errors import TokenizerError
from .kv_cache import KVCache
from .loader import ModelFile
from .ops import attention, rmsnorm, rope_angles, rope_apply, rope_tables, swiglu
from .quants import QTensor, TilePool, dequantize, make_qtensor
from .shard import Allreduce, MappedEmbedding, TPShard, slice_tensor


def check_token_ids(tokens, n_vocab: int) -> np.ndarray:
    """Token ids as an int64 array (T,); raise unless there is at least one and each is in [0, n_vocab)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)                 # (T,)
    if ids.size == 0:
        raise ValueError("no token ids: at least one token is needed")
    bad = ids[(ids < 0) | (ids >= n_vocab)]
    if bad.size:
        raise TokenizerError(f"token id {int(bad[0])} is out of range [0, {n_vocab})")
    return ids


WEIGHT_KINDS = ("native", "f32")     # Stage(weights=...): how matrices are held (--weights)
F32_CHUNK_ROWS = 512                  # rows dequantized at a time (bounds the temporaries)


def dequantize_rows(qtype: QT, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A matrix's data (rows of blocks or floats, possibly a strided column slice) -> (n_out, n_in) f32,
    exactly gguf's dequantize, a chunk of rows at a time (no temporary of the whole matrix)."""
    n_out, n_in = shape
    raw = np.asarray(data).view(np.uint8).reshape(n_out, -1)          # (n_out, row bytes)
    out = np.empty((n_out, n_in), dtype=np.float32)
    for a in range(0, n_out, F32_CHUNK_ROWS):
        out[a:a + F32_CHUNK_ROWS] = dequantize(np.ascontiguousarray(raw[a:a + F32_CHUNK_ROWS]), qtype)
    return out


class RowStack:
    """Matrices multiplied by the same input (attn_q, attn_k, attn_v; ffn_gate, ffn_up), held as ONE QTensor
    of their rows stacked when they share a type, so a token pays one product's fixed cost instead of three
    or two (~90 us a product on SmolLM2's small matrices: core/quants/NOTES.md, "Small products"); as one
    QTensor each otherwise (Q4_K_M files keep attn_v in another type). Each output row is its own row's
    dot product either way."""

    def __init__(self, parts: list[QTensor], sizes: list[int]):
        self.parts, self.sizes = parts, sizes                            # one QTensor, or one per matrix
        self.shape = (sum(sizes), parts[0].shape[1])
        ends = np.cumsum(sizes).tolist()
        self.columns = [slice(e - n, e) for n, e in zip(sizes, ends)]   # each matrix's outputs when stacked

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.parts)

    def matmul_joined(self, x: np.ndarray, pool=None) -> np.ndarray:
        """x (T, n_in) -> (T, sum of n_out): the matrices' products side by side, in one array."""
        if len(self.parts) == 1:
            return self.parts[0].matmul(x, pool)
        return np.concatenate([q.matmul(x, pool) for q in self.parts], axis=1)

    def matmul(self, x: np.ndarray, pool=None) -> list[np.ndarray]:
        """x (T, n_in) -> each matrix's (T, n_out_i) product (views of one array when stacked)."""
        if len(self.parts) == 1:
            y = self.parts[0].matmul(x, pool)                            # (T, sum of n_out)
            return [y[:, c] for c in self.columns]
        return [q.matmul(x, pool) for q in self.parts]


@dataclass
class Block:
    """One transformer layer's weights, named after their GGUF tensors (the stacked ones after GGUF's
    names for fused tensors: attn_qkv, ffn_gate_up)."""
    attn_norm: np.ndarray      # (n_embd,) f32
    attn_qkv: RowStack         # attn_q (n_head * head_dim), attn_k, attn_v (n_head_kv * head_dim) x n_embd
    attn_output: QTensor       # (n_embd, n_head * head_dim)
    ffn_norm: np.ndarray       # (n_embd,) f32
    ffn_gate_up: RowStack      # ffn_gate, ffn_up (n_ff each) x n_embd
    ffn_down: QTensor          # (n_embd, n_ff)


STACKS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}


class Stage:
    """Layers [a, b) of a model (possibly none), with optional embedding and output head.

    Args:
        model: the opened file; only the tensors this stage needs are touched.
        layers: range(a, b) with 0 <= a <= b <= n_layer, step 1.
        embed: load token_embd for `embed()`.
        head: load output_norm and output (token_embd when the output is tied) for `logits()`.
        n_ctx: positions the KV cache holds.
        threads: > 1 shares the matrix products among that many threads (this one included).
        shard: this rank's share of a tensor-parallel group (core.shard.plan_stage); None: every weight.
            Then only that slice of each matrix is loaded, the KV cache holds only its KV heads, `logits()`
            gives its vocab rows, and `embed()` reads token_embd rows from the mapping.
        allreduce: with a shard of a group of 2 or more, called exactly twice per layer (after attn_output
            and after ffn_down) with this rank's partial (T, n_embd) f32 (a fresh array it may reduce in
            place); returns the group's sum, bitwise the same on every rank.
        progress: called with (layers repacked, layers) as the load goes (cheap: once per layer).
        weights: "native" keeps each matrix in its file type (repacked); "f32" dequantizes the matrices this
            stage multiplies by (layers, output head) once at load and multiplies with BLAS: about 2x faster
            per token for 4-8x the memory of a quantized file (the embedding stays as it is).
    """

    def __init__(self, model: ModelFile, layers: range, *, embed: bool, head: bool, n_ctx: int,
                 threads: int = 1, shard: TPShard | None = None, allreduce: Allreduce | None = None,
                 progress: Callable[[int, int], None] | None = None, weights: str = "native"):
        cfg = model.config
        if weights not in WEIGHT_KINDS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_KINDS)}, got {weights!r}")
        self.weights = weights
        if layers.step != 1 or not 0 <= layers.start <= layers.stop <= cfg.n_layer:
            raise ValueError(f"layer range {layers} is not a slice of the model's {cfg.n_layer} layers")
        if shard is not None and shard.size > 1 and allreduce is None:
            raise ValueError("a stage sharded over 2 or more ranks needs an allreduce")
        self.model, self.config, self.layers = model, cfg, layers
        self.has_embed, self.has_head = embed, head
        self.shard, self._allreduce = shard, allreduce
        self._pool = TilePool(threads) if threads > 1 else None
        if shard is None:
            tied_head = head and cfg.tied_output
            self.token_embd = (self._matrix("token_embd.weight", product=tied_head) if embed or tied_head
                               else None)
        else:
            self.token_embd = MappedEmbedding(model.tensor("token_embd.weight")) if embed else None
        self.output_norm = self._vector("output_norm.weight") if head else None
        if head and shard is not None:                                   # its vocab rows only
            self.output = self._matrix("token_embd.weight" if cfg.tied_output else "output.weight")
        elif head:
            self.output = self.token_embd if cfg.tied_output else self._matrix("output.weight")
        else:
            self.output = None
        fields = [f for f in Block.__dataclass_fields__ if not f.endswith("norm")]
        items = [(i, f) for i in layers for f in fields]
        repack = self._pool.map if self._pool is not None else map     # repacking releases the GIL often
        matrices = {}
        for k, (item, q) in enumerate(zip(items, repack(self._layer_matrix, items)), start=1):
            matrices[item] = q
            if progress is not None and k % len(fields) == 0:
                progress(k // len(fields), len(layers))                  # layers repacked so far
        self.blocks = [self._block(i, matrices) for i in layers]
        self.freq_factors = (self._vector("rope_freqs.weight")
                             if self.blocks and model.has("rope_freqs.weight") else None)
        n_kv = cfg.n_head_kv if shard is None else len(shard.kv_heads)
        self.cache = KVCache(len(self.blocks), n_ctx, n_kv, cfg.head_dim)

    # ---- loading -------------------------------------------------------------------------------
    def _data(self, name: str) -> tuple[QT, np.ndarray, tuple[int, int]]:
        """A matrix's type, data (its shard's slice) and (n_out, n_in)."""
        t = self.model.tensor(name)
        shape = (int(t.shape[1]), int(t.shape[0]))                      # GGUF dims reversed: (n_out, n_in)
        data = t.data
        if self.shard is not None:                                       # whole rows / whole blocks
            data, shape = slice_tensor(t.tensor_type, data, shape, *self.shard.share(name))
        return t.tensor_type, data, shape

    def _qtensor(self, qtype: QT, data: np.ndarray, shape: tuple[int, int], product: bool = True) -> QTensor:
        """`product`: the matrix is multiplied by (weights "f32" then dequantizes it), not only looked up."""
        if self.weights == "f32" and product and qtype != QT.F32:
            return make_qtensor(QT.F32, dequantize_rows(qtype, data, shape), shape)
        return make_qtensor(qtype, data, shape)

    def _matrix(self, name: str, product: bool = True) -> QTensor:
        """A matrix this stage holds (its shard's slice)."""
        q = self._qtensor(*self._data(name), product=product)
        self.model.release(name)                                         # repacked: drop the mapped pages
        return q

    def _layer_matrix(self, item: tuple[int, str]) -> QTensor | RowStack:
        """Block field `name` of layer i: a matrix, or a RowStack of the matrices STACKS names."""
        i, field = item
        if field not in STACKS:
            return self._matrix(f"blk.{i}.{field}.weight")
        names = [f"blk.{i}.{part}.weight" for part in STACKS[field]]
        parts = [self._data(name) for name in names]
        sizes = [shape[0] for _, _, shape in parts]
        if len({qtype for qtype, _, _ in parts}) > 1:
            qs = [self._qtensor(*part) for part in parts]
        else:                                                            # rows of blocks (or floats) stacked
            rows = np.concatenate([np.asarray(d).view(np.uint8).reshape(n, -1) for _, d, (n, _) in parts])
            qs = [self._qtensor(parts[0][0], rows, (sum(sizes), parts[0][2][1]))]
        for name in names:
            self.model.release(name)                                     # repacked: drop the mapped pages
        return RowStack(qs, sizes)

    def _vector(self, name: str) -> np.ndarray:
        t = self.model.tensor(name)
        if t.tensor_type == QT.F32:
            return np.array(t.data, dtype=np.float32).reshape(-1)        # (n,) private copy
        return dequantize(np.asarray(t.data).reshape(1, -1), t.tensor_type).reshape(-1)

    def _block(self, i: int, matrices: dict[tuple[int, str], QTensor | RowStack]) -> Block:
        return Block(**{name: self._vector(f"blk.{i}.{name}.weight") if name.endswith("norm")
                        else matrices[(i, name)] for name in Block.__dataclass_fields__})

    # ---- state ---------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Positions cached (and the position the next `forward` must start at)."""
        return self.cache.n_past

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this stage holds in memory (after repacking; shared tied matrices once)."""
        mats = {id(m): m for m in (self.token_embd, self.output) if m is not None}
        vecs = [v for v in (self.output_norm, self.freq_factors) if v is not None]
        for b in self.blocks:
            for name in Block.__dataclass_fields__:
                w = getattr(b, name)
                if isinstance(w, np.ndarray):
                    vecs.append(w)
                else:
                    mats[id(w)] = w
        return sum(m.nbytes for m in mats.values()) + sum(v.nbytes for v in vecs)

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def kv_clear(self) -> None:
        self.cache.clear()

    def kv_truncate(self, n: int) -> None:
        """Keep the first n cached positions."""
        self.cache.truncate(n)

    def kv_shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions [n_keep, n_keep + n_discard) and re-rotate the later keys (llama.cpp K-shift)."""
        c = self.config
        self.cache.shift(n_keep, n_discard, c.n_rot, c.rope_freq_base, c.rope_freq_scale, self.freq_factors)

    def close(self) -> None:
        """Stop the thread pool and drop the weights and the cache."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.blocks, self.token_embd, self.output = [], None, None

    # ---- compute -------------------------------------------------------------------------------
    def embed(self, tokens) -> np.ndarray:
        """Token ids (T,) -> embeddings (T, n_embd) f32."""
        if not self.has_embed or self.token_embd is None:
            raise ValueError("this stage was built without the token embedding (embed=False)")
        ids = check_token_ids(tokens, self.config.n_vocab)               # (T,)
        return np.ascontiguousarray(self.token_embd.get_rows(ids), dtype=np.float32)

    def forward(self, h: np.ndarray, pos: int) -> np.ndarray:
        """Run this stage's layers on h (T, n_embd) at positions pos..pos+T-1; cache their K/V.

        Raises:
            ValueError: pos differs from n_past.  ContextOverflowError: the positions exceed n_ctx.
        """
        c = self.config
        h = np.array(h, dtype=np.float32, copy=True).reshape(-1, c.n_embd)   # (T, n_embd)
        T = h.shape[0]
        self.cache.check_room(pos, T)
        rot = rope_tables(*rope_angles(np.arange(pos, pos + T), c.n_rot, c.rope_freq_base, c.rope_freq_scale,
                                       self.freq_factors))               # (T, 1, n_rot/2, 2) each
        for li, b in enumerate(self.blocks):
            h = self._layer(li, b, h, pos, rot)
        self.cache.advance(T)
        return h

    def _layer(self, li: int, b: Block, h: np.ndarray, pos: int, rot: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """One LLaMA block: pre-norm attention with RoPE and GQA, then pre-norm SwiGLU FFN, both residual."""
        c, pool, sh = self.config, self._pool, self.shard
        T, hd = h.shape[0], c.head_dim
        n_q, n_kv = (c.n_head, c.n_head_kv) if sh is None else (len(sh.heads), len(sh.kv_heads))
        x = rmsnorm(h, b.attn_norm, c.norm_eps)                          # (T, n_embd)
        qkv = b.attn_qkv.matmul_joined(x, pool)                          # (T, (n_head + 2 n_head_kv) * head_dim)
        qk = rope_apply(qkv[:, :(n_q + n_kv) * hd].reshape(T, n_q + n_kv, hd), *rot)   # q and k in one
        q, k = qk[:, :n_q], qk[:, n_q:]                                  # (T, n_head, hd), (T, n_head_kv, hd)
        v = qkv[:, (n_q + n_kv) * hd:].reshape(T, n_kv, hd)
        keys, values = self.cache.store(li, pos, k, v)                   # (n_head_kv, pos+T, head_dim) each
        if sh is None:
            a = attention(q, keys, values, pos)                          # (T, n_head * head_dim)
            h = h + b.attn_output.matmul(a, pool)                        # (T, n_embd)
        else:                                                            # own heads; the group's sum
            h = h + self._reduce(b.attn_output.matmul(sh.attend(q, keys, values, pos), pool))
        x = rmsnorm(h, b.ffn_norm, c.norm_eps)                           # (T, n_embd)
        f = swiglu(*b.ffn_gate_up.matmul(x, pool))                       # (T, n_ff)
        if sh is None:
            return h + b.ffn_down.matmul(f, pool)                        # (T, n_embd)
        return h + self._reduce(b.ffn_down.matmul(sh.pad_ff(f), pool))

    def _reduce(self, partial: np.ndarray) -> np.ndarray:
        """The TP group's sum of a (T, n_embd) partial product (the partial itself in a group of one)."""
        return partial if self.shard.size == 1 else self._allreduce(partial)

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Final RMSNorm and LM head: h (T, n_embd) -> (T, n_vocab) f32 (a shard: its vocab rows only,
        (T, len(shard.vocab)); core.shard.assemble_logits joins the group's)."""
        if self.output is None:
            raise ValueError("this stage was built without the output head (head=False)")
        h = np.asarray(h, dtype=np.float32).reshape(-1, self.config.n_embd)
        x = rmsnorm(h, self.output_norm, self.config.norm_eps)          # (T, n_embd)
        return self.output.matmul(x, self._pool)                         # (T, n_vocab)

    def eval(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        """Embed, run every layer, and return the logits: (n_vocab,) for the last token, or (T, n_vocab)."""
        if (not self.has_embed or self.output is None or len(self.layers) != self.config.n_layer
                or self.shard is not None and self.shard.size > 1):
            raise ValueError("eval() needs a full-model stage (all layers, embed=True, head=True, "
                             "no TP split)")
        h = self.forward(self.embed(tokens), pos)                        # (T, n_embd)
        if not all_logits:
            return self.logits(h[-1:])[0]                                # (n_vocab,)
        return self.logits(h)                                            # (T, n_vocab)
