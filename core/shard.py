"""Tensor parallelism (issue 11): the share of one stage's matrices that each rank of its TP group holds.

Owns the sharding plan, a pure function of the config and the block sizes of the stage's matrices (which
query heads, KV heads, rows and block columns rank i of N holds; cuts on whole quant blocks and head
boundaries), the slicing of a tensor's raw bytes to a share, a rank's attention over its own heads, and the
assembly of vocab-split logits. Must not: repack or multiply weights (core/model.py and core/quants do),
or know how the group communicates (the caller hands the stage an all-reduce).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from .config import ModelConfig
from .errors import UsageError
from .ops import attention
from .quants import dequantize

Allreduce = Callable[[np.ndarray], np.ndarray]   # partial (T, n_embd) f32 -> the group's sum

ROWS = {"attn_q": "q_rows", "attn_k": "kv_rows", "attn_v": "kv_rows", "ffn_gate": "ff", "ffn_up": "ff",
        "output": "vocab", "token_embd": "vocab"}           # split by output rows (whole rows)
COLS = {"attn_output": "o_cols", "ffn_down": "down_cols"}    # split by input columns (whole blocks)
HEAD = {"output", "token_embd"}
NORMS = ("attn_norm", "ffn_norm")                            # replicated
FALLBACK_GRAIN = 8                                          # FFN units per step when blocks are too few


@dataclass(frozen=True)
class TPShard:
    """Rank `index` of a TP group of `size`: its share of every matrix of a stage (the same in every layer).

    Rows: attn_q `q_rows`, attn_k / attn_v `kv_rows`, ffn_gate / ffn_up `ff`, output (or tied token_embd)
    `vocab`. Columns, always whole quant blocks: attn_output `o_cols`, ffn_down `down_cols`. These equal
    the columns of the rank's own heads / FFN units when the cuts can fall on block boundaries; when the
    blocks are too few for that (a 256-weight K-quant block holding 8 heads of 32), they are the blocks
    covering them, and the inputs of the other columns are zero ("padded"), so the product is still this
    rank's part of the sum (those blocks are held by two ranks).
    """
    index: int
    size: int
    head_dim: int
    n_gqa: int          # query heads per KV head in the model
    heads: range        # query heads
    kv_heads: range     # KV heads those read (a neighbour holds the same one when a group is cut)
    ff: range           # FFN hidden units: rows of ffn_gate and ffn_up
    o_cols: range       # attn_output input columns held
    down_cols: range    # ffn_down input columns held
    vocab: range        # output rows: the logits this rank computes

    @property
    def q_rows(self) -> range:
        return range(self.heads.start * self.head_dim, self.heads.stop * self.head_dim)

    @property
    def kv_rows(self) -> range:
        return range(self.kv_heads.start * self.head_dim, self.kv_heads.stop * self.head_dim)

    @property
    def o_padded(self) -> bool:
        return self.o_cols != self.q_rows

    @property
    def down_padded(self) -> bool:
        return self.down_cols != self.ff

    @cached_property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """(first, end) local query heads reading local KV head kv, for each KV head held."""
        h0, h1, g = self.heads.start, self.heads.stop, self.n_gqa
        return tuple((max(h0, kv * g) - h0, min(h1, (kv + 1) * g) - h0, kv - self.kv_heads.start)
                     for kv in self.kv_heads)

    @cached_property
    def _uniform(self) -> bool:
        """Every KV head held serves as many local query heads: one attention() call does them all."""
        return len({b - a for a, b, _ in self.runs}) == 1

    @cached_property
    def _slots(self) -> tuple[int, np.ndarray]:
        """(g, slot of each local query head) when the KV heads held serve unequal numbers of them (a group
        cut by a rank boundary): every KV head's queries padded to g, the largest run, make one uniform
        attention() call of len(kv_heads) * g heads, the padding ones zero and dropped after."""
        g = max(b - a for a, b, _ in self.runs)
        return g, np.concatenate([kv * g + np.arange(b - a) for a, b, kv in self.runs])

    def share(self, name: str) -> tuple[range | None, range | None]:
        """(rows, columns) of tensor `name` (e.g. "blk.3.attn_q.weight") this rank holds; None: all."""
        short = name.split(".")[-2]
        if short in ROWS:
            return getattr(self, ROWS[short]), None
        if short in COLS:
            return None, getattr(self, COLS[short])
        raise ValueError(f"tensor '{name}' is not a matrix a TP shard splits")

    def attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int) -> np.ndarray:
        """This rank's heads' attention, laid out as attn_output's held columns.

        Args:
            q: (T, len(heads), head_dim), rotated.  keys, values: (len(kv_heads), pos + T, head_dim).
        Returns:
            (T, len(o_cols)) f32: zero outside the own heads' columns when padded.
        """
        T, hd = q.shape[0], self.head_dim
        if self._uniform and not self.o_padded:
            return attention(q, keys, values, pos)                       # (T, n_heads * hd)
        out = (np.zeros if self.o_padded else np.empty)((T, len(self.o_cols)), dtype=np.float32)
        off = self.heads.start * hd - self.o_cols.start
        if self._uniform:
            out[:, off:off + q.shape[1] * hd] = attention(q, keys, values, pos)
            return out
        # a group cut by a rank boundary: one call over padded groups costs less than one call per group
        # (SmolLM2 --tp 2, 5 heads in runs of 3 and 2: ~1 ms a token of per-call overhead over 30 layers)
        g, slots = self._slots
        padded = np.zeros((T, len(self.kv_heads) * g, hd), dtype=np.float32)
        padded[:, slots] = q
        a = attention(padded, keys, values, pos).reshape(T, -1, hd)[:, slots]   # (T, len(heads), hd)
        out[:, off:off + q.shape[1] * hd] = a.reshape(T, -1)
        return out

    def pad_ff(self, f: np.ndarray) -> np.ndarray:
        """The FFN activation (T, len(ff)) as ffn_down's held columns (itself unless padded)."""
        if not self.down_padded:
            return f
        out = np.zeros((f.shape[0], len(self.down_cols)), dtype=np.float32)
        off = self.ff.start - self.down_cols.start
        out[:, off:off + f.shape[1]] = f
        return out

    def kv_bytes(self, n_layer: int, n_ctx: int) -> int:
        """Bytes of this rank's f32 K and V for n_layer layers at n_ctx (Stage.kv_bytes, before loading)."""
        return 2 * n_layer * n_ctx * len(self.kv_heads) * self.head_dim * 4

    def describe(self) -> str:
        """One line for a plan printout."""
        pad = [n for n, p in (("attn_output", self.o_padded), ("ffn_down", self.down_padded)) if p]
        return (f"TP {self.index}/{self.size}: heads {_span(self.heads)} (KV {_span(self.kv_heads)}), "
                f"FFN {_span(self.ff)}, vocab {_span(self.vocab)}"
                + (f"; padded blocks in {', '.join(pad)}" if pad else ""))


def _span(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def balanced(n_units: int, n: int) -> list[range]:
    """n consecutive ranges covering [0, n_units); the first n_units % n get one unit more."""
    q, r = divmod(n_units, n)
    starts = [i * q + min(i, r) for i in range(n + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(n)]


def _scaled(r: range, k: int) -> range:
    return range(r.start * k, r.stop * k)


def _covering(r: range, block: int) -> range:
    """The whole blocks of `block` columns that cover the columns r."""
    return range(r.start // block * block, -(-r.stop // block) * block)


def plan_tp(config: ModelConfig, size: int, *, o_block: int = 1, down_block: int = 1) -> tuple[TPShard, ...]:
    """The shares of every rank of a TP group of `size` (pure: no file is touched).

    Query heads go to ranks in contiguous, balanced ranges, cut where attn_output's column blocks
    (`o_block` weights) allow; each rank holds the KV heads its heads read (replicated where a group is
    cut, so any size <= n_head works: MQA, 9 heads / 3 KV heads). FFN units are balanced in whole blocks
    of ffn_down (`down_block`); vocab rows balanced. When there are fewer blocks than ranks, the cuts fall
    inside blocks and both neighbours hold the shared blocks with padded inputs (TPShard).

    Raises:
        UsageError: size < 1, more ranks than query heads, FFN units or vocab rows.
    """
    c = config
    if size < 1:
        raise UsageError(f"--tp must be at least 1, got {size}")
    for what, count in (("query heads", c.n_head), ("FFN units", c.n_ff), ("vocab rows", c.n_vocab)):
        if size > count:
            raise UsageError(f"--tp {size} is more ranks than the model's {count} {what} "
                             f"(each rank of a TP group needs a share of every layer)")
    hd = c.head_dim
    per = o_block // math.gcd(o_block, hd)                             # heads per whole number of blocks
    if c.n_head // per >= size:
        heads = [_scaled(r, per) for r in balanced(c.n_head // per, size)]
    else:
        heads = balanced(c.n_head, size)
    o_cols = [_covering(_scaled(h, hd), o_block) for h in heads]
    if c.n_ff // down_block >= size:
        ff = [_scaled(r, down_block) for r in balanced(c.n_ff // down_block, size)]
    else:
        grain = FALLBACK_GRAIN if c.n_ff % FALLBACK_GRAIN == 0 and c.n_ff // FALLBACK_GRAIN >= size else 1
        ff = [_scaled(r, grain) for r in balanced(c.n_ff // grain, size)]
    down = [_covering(f, down_block) for f in ff]
    vocab = balanced(c.n_vocab, size)
    g = c.n_gqa
    return tuple(TPShard(index=i, size=size, head_dim=hd, n_gqa=g, heads=heads[i],
                         kv_heads=range(heads[i].start // g, (heads[i].stop - 1) // g + 1), ff=ff[i],
                         o_cols=o_cols[i], down_cols=down[i], vocab=vocab[i]) for i in range(size))


def block_size(qtype: QT) -> int:
    """Weights per block of a GGML type (1 for F32 / F16 / BF16)."""
    return GGML_QUANT_SIZES[QT(int(qtype))][0]


def plan_stage(model, layers: range, size: int) -> tuple[TPShard, ...]:
    """plan_tp for the stage of `model` (a ModelFile) holding `layers`: the block sizes come from the types
    of its attn_output and ffn_down tensors (read from the tensor table only: call it before loading)."""
    o_block = down_block = 1
    for i in layers:
        o_block = math.lcm(o_block, block_size(model.tensor(f"blk.{i}.attn_output.weight").tensor_type))
        down_block = math.lcm(down_block, block_size(model.tensor(f"blk.{i}.ffn_down.weight").tensor_type))
    return plan_tp(model.config, size, o_block=o_block, down_block=down_block)


def _held(model, layers: range, shard: TPShard | None, *, head: bool):
    """(tensor, weights held) for every tensor a stage of `layers` holds (before loading): its layers'
    matrices and norms, and with `head` output_norm and the output matrix. Weights held: a matrix's share
    (rows, columns) of its (n_out, n_in) (all of it without a shard), None for a norm (always whole)."""
    names = [f"blk.{i}.{f}.weight" for i in layers for f in (*NORMS, *ROWS.keys() - HEAD, *COLS)]
    if head:
        names += ["output_norm.weight", "token_embd.weight" if model.config.tied_output else "output.weight"]
    for name in names:
        t = model.tensor(name)
        if name.split(".")[-2] in NORMS + ("output_norm",):
            yield t, None
            continue
        rows, cols = shard.share(name) if shard is not None else (None, None)
        n_in, n_out = (int(d) for d in t.shape)                          # GGUF order
        yield t, (len(rows) if rows else n_out, len(cols) if cols else n_in)


def share_bytes(model, layers: range, shard: TPShard, *, head: bool) -> int:
    """Bytes of the file's tensors that this rank's share covers: its layers' matrix slices and norms, and
    its vocab rows of the output head (before loading; embed() reads rows from the mapping, not counted)."""
    total = 0
    for t, held in _held(model, layers, shard, head=head):
        if held is None:
            total += int(t.n_bytes)
            continue
        n_in, n_out = (int(d) for d in t.shape)                          # GGUF order
        total += int(t.n_bytes) * held[0] // n_out * held[1] // n_in
    return total


def f32_bytes(model, layers: range, shard: TPShard | None, *, head: bool, embed: bool) -> int:
    """Bytes a stage holds with --weights f32 (before loading): every matrix it multiplies by (its share with
    a shard) at 4 bytes a weight, norms as in the file, and an unsharded stage's token_embd as in the file
    when it is only looked up (a shard looks embeddings up in the mapping)."""
    total = sum(int(t.n_bytes) if held is None else 4 * held[0] * held[1]
                for t, held in _held(model, layers, shard, head=head))
    if embed and shard is None and not (head and model.config.tied_output):
        total += int(model.tensor("token_embd.weight").n_bytes)
    return total


def slice_tensor(qtype: QT, data: np.ndarray, shape: tuple[int, int], rows: range | None,
                 cols: range | None) -> tuple[np.ndarray, tuple[int, int]]:
    """A tensor's data (rows of blocks, or floats) cut to `rows` and whole-block `cols`, and its new shape.

    Rows stay a view of the mapping (contiguous); quantized columns are a strided view of whole blocks of
    every row (make_qtensor repacks it tile by tile); float columns become a private copy of the share.
    """
    n_out, n_in = shape
    block, type_size = GGML_QUANT_SIZES[QT(int(qtype))]
    raw = np.asarray(data).view(np.uint8).reshape(n_out, -1)          # (n_out, row bytes)
    if rows is not None:
        raw, n_out = raw[rows.start:rows.stop], len(rows)
    if cols is not None:
        if cols.start % block or cols.stop % block:
            raise ValueError(f"columns {cols.start}-{cols.stop} are not whole blocks of {block}")
        raw = raw[:, cols.start // block * type_size:cols.stop // block * type_size]
        n_in = len(cols)
        if block == 1:
            raw = np.ascontiguousarray(raw)
    return raw, (n_out, n_in)


class MappedEmbedding:
    """token_embd for a sharded stage's embed(): rows read from the file mapping when looked up (one row a
    token), so no rank holds the whole table; bit-exact with QTensor.get_rows (both are gguf's dequantize)."""

    nbytes = 0                                  # nothing private: pages of looked-up rows only

    def __init__(self, tensor):
        self.qtype = tensor.tensor_type
        self.shape = (int(tensor.shape[1]), int(tensor.shape[0]))
        self._rows = np.asarray(tensor.data).view(np.uint8).reshape(self.shape[0], -1)  # (n_vocab, row bytes)

    def get_rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) -> (len(ids), n_embd) float32."""
        return dequantize(self._rows[np.asarray(ids, dtype=np.int64)], self.qtype)


def assemble_logits(parts: list[np.ndarray]) -> np.ndarray:
    """The group's vocab-split logits, rank order, each (T, len(vocab)) or (len(vocab),) -> (T, n_vocab)
    or (n_vocab,). (For one token, a Gatherv with displacements vocab.start assembles in place instead.)"""
    return np.concatenate(parts, axis=-1)
