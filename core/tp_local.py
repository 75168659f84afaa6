"""LocalTP: the N ranks of one tensor-parallel stage in one process, one thread each (tests, benchmarks).

Owns a barrier all-reduce that sums the partials in rank order (every run gives the same bits, every rank
the same sum), and a driver that runs each step and each KV edit on all shards at once. It stands in for
the MPI group so the sharded Stage can be checked against the unsharded one; it is not a way to go faster
(the GIL serialises the numpy glue between products).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from .loader import ModelFile
from .model import Stage
from .shard import Allreduce, assemble_logits, plan_stage


class ThreadAllreduce:
    """An all-reduce (sum) among `size` threads: each rank's function blocks until all have called it."""

    def __init__(self, size: int, timeout: float = 120.0):
        self.size = size
        self.calls = [0] * size                     # all-reduces each rank has done (tests count them)
        self._parts: list[np.ndarray | None] = [None] * size
        self._sum: np.ndarray | None = None
        self._barrier = threading.Barrier(size, timeout=timeout)

    def rank(self, i: int) -> Allreduce:
        """The all-reduce of rank i: (T, n_embd) partial -> the group's sum (one array shared read-only)."""
        def allreduce(partial: np.ndarray) -> np.ndarray:
            self.calls[i] += 1
            self._parts[i] = partial
            self._barrier.wait()                    # every partial is in
            if i == 0:                              # ((p0 + p1) + p2) + ...: a fixed order
                total = self._parts[0].copy()
                for p in self._parts[1:]:
                    total += p
                self._sum = total
            self._barrier.wait()                    # the sum is out; rank 0 writes the next one only after
            return self._sum                        # every rank has come back to the first wait
        return allreduce

    def abort(self) -> None:
        """Release every waiting rank with BrokenBarrierError (one rank failed)."""
        self._barrier.abort()


class LocalTP:
    """Stage(model, layers, ...) split over `size` shards (core.shard.plan_stage), driven together.

    Same methods as a Stage where the group acts as one: forward, logits (assembled), eval, embed, and the
    KV edits (replayed on every rank, as the MPI side must).
    """

    def __init__(self, model: ModelFile, layers: range, size: int, *, embed: bool, head: bool, n_ctx: int,
                 threads: int = 1):
        self.plan = plan_stage(model, layers, size)
        self.reduce = ThreadAllreduce(size)
        self.stages = [Stage(model, layers, embed=embed, head=head, n_ctx=n_ctx, threads=threads, shard=s,
                             allreduce=self.reduce.rank(s.index)) for s in self.plan]
        self.config = model.config
        self._pool = ThreadPoolExecutor(max_workers=size) if size > 1 else None

    def _all(self, fn: Callable[[Stage], object]) -> list:
        """fn(stage) on every rank at once (each in its own thread), results in rank order."""
        if self._pool is None:
            return [fn(self.stages[0])]

        def run(stage: Stage):
            try:
                return fn(stage)
            except BaseException:
                self.reduce.abort()                 # do not leave the others waiting at the barrier
                raise
        futures = [self._pool.submit(run, s) for s in self.stages]
        return [f.result() for f in futures]

    @property
    def n_past(self) -> int:
        return self.stages[0].n_past

    @property
    def n_ctx(self) -> int:
        return self.stages[0].n_ctx

    def forward(self, h: np.ndarray, pos: int) -> np.ndarray:
        """Every rank runs the layers on the same h; their outputs are bitwise equal (checked)."""
        outs = self._all(lambda s: s.forward(h, pos))
        for i, o in enumerate(outs[1:], 1):
            assert np.array_equal(o, outs[0]), f"TP rank {i} ended the step with another hidden state"
        return outs[0]

    def embed(self, tokens) -> np.ndarray:
        return self.stages[0].embed(tokens)

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Each rank's vocab rows, joined in rank order: (T, n_vocab)."""
        return assemble_logits(self._all(lambda s: s.logits(h)))

    def eval(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        """As Stage.eval for a full-model group."""
        lg = self.logits(self.forward(self.embed(tokens), pos))          # (T, n_vocab)
        return lg if all_logits else lg[-1]

    def kv_clear(self) -> None:
        self._all(lambda s: s.kv_clear())

    def kv_truncate(self, n: int) -> None:
        self._all(lambda s: s.kv_truncate(n))

    def kv_shift(self, n_keep: int, n_discard: int) -> None:
        self._all(lambda s: s.kv_shift(n_keep, n_discard))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for s in self.stages:
            s.close()
