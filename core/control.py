"""Typed control messages: what the head tells every worker to do next, and how it fits on the wire.

Every message is a small frozen dataclass. On the wire it is one fixed frame of 8 int64 (`encode`,
`decode`): [op, seq, a, b, c, d, 0, 0], where `seq` numbers the head's messages 1, 2, 3, ... so a
worker can prove it applies evaluations and KV-cache changes in exactly the head's order. This module
owns the format only; core/transport.py moves the frames and core/pipeline.py acts on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

FRAME_LEN = 8  # int64 words per control frame


class Op(IntEnum):
    EVAL = 1          # evaluate n_tokens at pos (in micro-batches of ubatch), return n_out rows
    KV_CLEAR = 2
    KV_TRUNCATE = 3   # keep the first n positions
    KV_SHIFT = 4      # drop [n_keep, n_keep + n_discard), move the rest down
    STATS = 5         # send RankStats to the head
    SHUTDOWN = 6      # clean exit (status 0)
    ABORT = 7         # the head gave up: exit now (status 1)


@dataclass(frozen=True)
class Eval:
    """Evaluate `n_tokens` at positions pos.. (rank 0 sends the embeddings through the pipe).

    `ubatch` < n_tokens cuts the batch into micro-batches that are in flight across stages at once;
    `all_rows` asks the last rank to return every row's hidden state instead of only the last one.
    """
    n_tokens: int
    pos: int
    ubatch: int
    all_rows: bool
    op = Op.EVAL

    def args(self) -> tuple[int, ...]:
        return (self.n_tokens, self.pos, self.ubatch, int(self.all_rows))

    def micro_batches(self) -> list[tuple[int, int]]:
        """[(first row, row count), ...] in order."""
        return [(i, min(self.ubatch, self.n_tokens - i)) for i in range(0, self.n_tokens, self.ubatch)]


@dataclass(frozen=True)
class KvClear:
    op = Op.KV_CLEAR

    def args(self) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class KvTruncate:
    n: int
    op = Op.KV_TRUNCATE

    def args(self) -> tuple[int, ...]:
        return (self.n,)


@dataclass(frozen=True)
class KvShift:
    n_keep: int
    n_discard: int
    op = Op.KV_SHIFT

    def args(self) -> tuple[int, ...]:
        return (self.n_keep, self.n_discard)


@dataclass(frozen=True)
class Stats:
    op = Op.STATS

    def args(self) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class Shutdown:
    op = Op.SHUTDOWN

    def args(self) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class Abort:
    """The head stops the cluster; `rank` is the rank at fault (-1: the head itself or a signal)."""
    rank: int = -1
    op = Op.ABORT

    def args(self) -> tuple[int, ...]:
        return (self.rank,)


Message = Eval | KvClear | KvTruncate | KvShift | Stats | Shutdown | Abort

_DECODERS = {
    Op.EVAL: lambda a: Eval(int(a[0]), int(a[1]), int(a[2]), bool(a[3])),
    Op.KV_CLEAR: lambda a: KvClear(),
    Op.KV_TRUNCATE: lambda a: KvTruncate(int(a[0])),
    Op.KV_SHIFT: lambda a: KvShift(int(a[0]), int(a[1])),
    Op.STATS: lambda a: Stats(),
    Op.SHUTDOWN: lambda a: Shutdown(),
    Op.ABORT: lambda a: Abort(int(a[0])),
}


def encode(msg: Message, seq: int) -> np.ndarray:
    """A message and its sequence number -> one (FRAME_LEN,) int64 frame."""
    frame = np.zeros(FRAME_LEN, dtype=np.int64)
    args = msg.args()
    frame[0], frame[1] = int(msg.op), seq
    frame[2:2 + len(args)] = args
    return frame


def decode(frame: np.ndarray) -> tuple[Message, int]:
    """One frame -> (message, seq). Raises ValueError on an unknown op (a corrupt or foreign frame)."""
    try:
        op = Op(int(frame[0]))
    except ValueError:
        raise ValueError(f"unknown control op {int(frame[0])}") from None
    return _DECODERS[op](frame[2:]), int(frame[1])
