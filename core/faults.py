"""Fault injection, for the tests only: LLAMA_MPI_FAULT="RANK:N" makes rank RANK fail in the middle of its
N-th evaluation with RuntimeError("injected fault at evaluation N"); LLAMA_MPI_SLOW="RANK:SECONDS" makes
each of rank RANK's forward passes over more than one row (a prompt's micro-batches) SECONDS longer, busy
in numpy as a slow node is, so that one step outlasts --rank-timeout.

The one seam: core/cluster.py passes every rank's transport and stage through `inject` once they are set
up; unless a variable names that rank they come back untouched, and the engine's own code knows nothing
about faults. The head fails right after it sent the evaluation (the workers are mid-step); a worker right
after computing its second micro-batch of it (or the only one), before passing it on.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from .control import Eval, Message

FAULT_ENV = "LLAMA_MPI_FAULT"
SLOW_ENV = "LLAMA_MPI_SLOW"


def _for_rank(spec: str | None, rank: int) -> str | None:
    """"RANK:VALUE" -> VALUE ("" without a colon) on rank RANK, None elsewhere or without a spec."""
    if not spec:
        return None
    r, _, value = spec.partition(":")
    return value if int(r) == rank else None


def fault_after(spec: str | None, rank: int) -> int | None:
    """"1:3" -> 3 on rank 1, None elsewhere ("1" alone means "1:1")."""
    value = _for_rank(spec, rank)
    return None if value is None else int(value or 1)


def slow_by(spec: str | None, rank: int) -> float | None:
    """"1:5" -> 5.0 seconds on rank 1, None elsewhere."""
    value = _for_rank(spec, rank)
    return None if value is None else float(value)


def inject(transport: Any, stage: Any) -> tuple[Any, Any]:
    """This rank's transport and stage, wrapped to fail or be slow as FAULT_ENV and SLOW_ENV say
    (untouched when they do not name this rank)."""
    slow = slow_by(os.environ.get(SLOW_ENV), transport.rank)
    if slow is not None:
        stage = _SlowStage(stage, slow)
    after = fault_after(os.environ.get(FAULT_ENV), transport.rank)
    if after is None:
        return transport, stage
    fault = _Fault(after)
    if transport.rank == 0:
        return _HeadTransport(transport, fault), stage
    return _WorkerTransport(transport, fault), _WorkerStage(stage, fault)


class _Fault:
    def __init__(self, after: int):
        self.after = after
        self.evals = 0
        self.forwards_left: int | None = None    # (worker) forwards of the failing evaluation still to run

    def count(self, msg: Message) -> bool:
        """Count an evaluation; True when this is the one to fail."""
        if not isinstance(msg, Eval):
            return False
        self.evals += 1
        return self.evals >= self.after

    def fail(self) -> None:
        raise RuntimeError(f"injected fault at evaluation {self.evals}")


class _Wrapper:
    """Everything not overridden goes to the wrapped object."""

    def __init__(self, inner: Any, fault: _Fault | None = None):
        self._inner, self._fault = inner, fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _HeadTransport(_Wrapper):
    def send_ctrl(self, msg: Message, seq: int) -> None:
        self._inner.send_ctrl(msg, seq)
        if self._fault.count(msg):
            self._fault.fail()


class _WorkerTransport(_Wrapper):
    def recv_ctrl(self, hot: bool = False) -> tuple[Message, int]:
        msg, seq = self._inner.recv_ctrl(hot)
        if self._fault.count(msg):
            self._fault.forwards_left = min(1, len(msg.micro_batches()) - 1) + 1
        return msg, seq


class _WorkerStage(_Wrapper):
    def forward(self, h: Any, pos: int) -> Any:
        out = self._inner.forward(h, pos)
        if self._fault.forwards_left is not None:
            self._fault.forwards_left -= 1
            if self._fault.forwards_left == 0:
                self._fault.fail()
        return out


class _SlowStage(_Wrapper):
    """A stage whose prompt steps take `seconds` longer, computing (numpy matrix products release the GIL
    as the engine's kernels do, so the rank's other threads run meanwhile)."""

    def __init__(self, inner: Any, seconds: float):
        super().__init__(inner)
        self._seconds = seconds

    def forward(self, h: Any, pos: int) -> Any:
        out = self._inner.forward(h, pos)
        if h.shape[0] > 1:
            a = np.full((256, 256), 1.0 / 256, dtype=np.float32)       # (256, 256): a @ a stays finite
            deadline = time.monotonic() + self._seconds
            while time.monotonic() < deadline:
                a = a @ a
        return out
