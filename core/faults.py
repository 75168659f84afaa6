"""Fault injection, for the tests only: LLAMA_MPI_FAULT="RANK:N" makes rank RANK fail in the middle of its
N-th evaluation with RuntimeError("injected fault at evaluation N").

The one seam: core/cluster.py passes every rank's transport and stage through `inject` once they are set
up; unless the variable names that rank they come back untouched, and the engine's own code knows nothing
about faults. The head fails right after it sent the evaluation (the workers are mid-step); a worker right
after computing its second micro-batch of it (or the only one), before passing it on.
"""
from __future__ import annotations

import os
from typing import Any

from .control import Eval, Message

FAULT_ENV = "LLAMA_MPI_FAULT"


def fault_after(spec: str | None, rank: int) -> int | None:
    """"1:3" -> 3 on rank 1, None elsewhere ("1" alone means "1:1")."""
    if not spec:
        return None
    r, _, n = spec.partition(":")
    return int(n or 1) if int(r) == rank else None


def inject(transport: Any, stage: Any) -> tuple[Any, Any]:
    """This rank's transport and stage, wrapped to fail as FAULT_ENV says (untouched when it does not
    name this rank)."""
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

    def __init__(self, inner: Any, fault: _Fault):
        self._inner, self._fault = inner, fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _HeadTransport(_Wrapper):
    def send_ctrl(self, msg: Message, seq: int) -> None:
        self._inner.send_ctrl(msg, seq)
        if self._fault.count(msg):
            self._fault.fail()


class _WorkerTransport(_Wrapper):
    def recv_ctrl(self) -> tuple[Message, int]:
        msg, seq = self._inner.recv_ctrl()
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
