"""Pipeline: evaluate tokens through a model whose layers may be split across MPI ranks.

Owns the head's view (`Pipeline` protocol: `LocalPipeline` in one process, `MpiPipeline` driving a
cluster), the worker loop (`serve_worker`), the step protocol (micro-batches in flight across stages,
only the needed rows back to the head), KV-cache operations replayed on every rank in the head's order,
per-rank statistics, and turning any rank's failure into one PipelineError naming rank, host and layers.
It must not start ranks (core/cluster.py), parse options, print, or import mpi4py (core/transport.py
moves the bytes).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from .config import ModelConfig
from .control import Abort, Eval, KvClear, KvShift, KvTruncate, Message, Shutdown, Stats
from .errors import ContextOverflowError, PipelineError, one_line
from .kv_cache import check_shift, check_truncate
from .model import Stage, check_token_ids
from .partition import format_layers
from .procfs import proc_bytes
from .tp_group import TPContext, group_logits, single
from .transport import Aborted, PeerFailed

if TYPE_CHECKING:
    from .cluster import Plan

MIN_UBATCH = 16             # auto micro-batching never cuts a prompt into pieces smaller than this
ABORT_GRACE_S = 2.0         # how long the head waits for its Abort frames to leave
WORKER_ABORT_WAIT_S = 5.0   # a failed worker waits this long for the head's Abort, then aborts the job


@dataclass(frozen=True)
class RankStats:
    rank: int
    host: str
    layers: range
    compute_ms: float          # time in this rank's stage (embed, layers, output head)
    wait_ms: float             # time spent waiting for peers inside steps (not for the next control message)
    bytes_per_token: float     # activation bytes this rank sent, per evaluated token
    rss_bytes: int             # resident memory of the process
    n_past: int                # KV-cache fill
    n_ctx: int
    weight_bytes: int
    kv_bytes: int
    tp_index: int = 0          # this rank's index in its stage's tensor-parallel group
    tp_size: int = 1

    @property
    def kv_fill(self) -> float:
        return self.n_past / self.n_ctx if self.n_ctx else 0.0


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    return proc_bytes("/proc/self/status", "VmRSS:")


class Pipeline(Protocol):
    """The head's view of the model, whole or split across ranks."""
    config: ModelConfig
    plan: Plan | None          # how the layers were laid out over the ranks (core/cluster.py); None
                               # for a pipeline built by hand (tests, tools)

    @property
    def size(self) -> int: ...                 # ranks (1: no peer to watch)
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_past(self) -> int: ...
    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray: ...
    def kv_clear(self) -> None: ...
    def kv_truncate(self, n: int) -> None: ...
    def kv_shift(self, n_keep: int, n_discard: int) -> None: ...
    def stats(self) -> list[RankStats]: ...
    def poll_failure(self) -> None: ...        # between steps: raise the PipelineError of a lost rank
    def close(self) -> None: ...


class _Meter:
    """Per-rank counters behind RankStats."""

    def __init__(self) -> None:
        self.compute_s = 0.0
        self.tokens = 0
        self.bytes_sent = 0

    def snapshot(self, rank: int, host: str, stage: Stage, wait_s: float) -> RankStats:
        shard = stage.shard
        return RankStats(rank, host, stage.layers, self.compute_s * 1e3, wait_s * 1e3,
                         self.bytes_sent / self.tokens if self.tokens else 0.0, rss_bytes(),
                         stage.n_past, stage.n_ctx, stage.weight_bytes, stage.kv_bytes,
                         shard.index if shard else 0, shard.size if shard else 1)


def check_tokens(tokens: Sequence[int], n_past: int, n_ctx: int, n_vocab: int) -> np.ndarray:
    """Validate a batch before anything is sent: non-empty, ids in range, fits in the context."""
    ids = check_token_ids(tokens, n_vocab)                            # (T,)
    if n_past + ids.size > n_ctx:
        raise ContextOverflowError(
            f"{ids.size} tokens at position {n_past} do not fit in the context of {n_ctx} (-c)")
    return ids


def check_kv_op(msg: Message, n_past: int) -> None:
    """Validate a KV operation against the head's cache before it is replayed anywhere."""
    if isinstance(msg, KvTruncate):
        check_truncate(msg.n, n_past)
    elif isinstance(msg, KvShift):
        check_shift(msg.n_keep, msg.n_discard, n_past)


def apply_kv_op(stage: Stage, msg: Message) -> None:
    if isinstance(msg, KvClear):
        stage.kv_clear()
    elif isinstance(msg, KvTruncate):
        stage.kv_truncate(msg.n)
    elif isinstance(msg, KvShift):
        stage.kv_shift(msg.n_keep, msg.n_discard)
    else:
        raise ValueError(f"not a KV operation: {msg}")


def choose_ubatch(n_tokens: int, n_ranks: int, setting: int | None) -> int:
    """Micro-batch size for a batch: `setting` 0 = no pipelining, N = that size, None = automatic
    (about 2 micro-batches per rank in flight, never below MIN_UBATCH)."""
    if n_ranks == 1 or setting == 0:
        return n_tokens
    if setting is not None:
        return max(1, min(setting, n_tokens))
    if n_tokens < 2 * MIN_UBATCH:
        return n_tokens
    return max(MIN_UBATCH, math.ceil(n_tokens / (2 * n_ranks)))


class _HeadStage:
    """What both pipelines read from the head's stage: the context size and the cached positions (every
    rank's cache holds the same positions, because every KV change is replayed on every rank)."""

    stage: Stage

    @property
    def n_ctx(self) -> int:
        return self.stage.n_ctx

    @property
    def n_past(self) -> int:
        return self.stage.n_past


class LocalPipeline(_HeadStage):
    """The whole model in this process: one full stage, no MPI."""

    size = 1

    def __init__(self, stage: Stage, plan: Plan | None = None, host: str = ""):
        self.stage, self.config, self.plan = stage, stage.config, plan
        self._host = host or os.uname().nodename
        self._meter = _Meter()

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = check_tokens(tokens, self.n_past, self.n_ctx, self.config.n_vocab)
        t0 = time.perf_counter()
        out = self.stage.eval(ids, self.n_past, all_logits)              # (n_vocab,) or (T, n_vocab)
        self._meter.compute_s += time.perf_counter() - t0
        self._meter.tokens += ids.size
        return out

    def kv_clear(self) -> None:
        self.stage.kv_clear()

    def kv_truncate(self, n: int) -> None:
        self.stage.kv_truncate(n)                                     # the cache validates n

    def kv_shift(self, n_keep: int, n_discard: int) -> None:
        self.stage.kv_shift(n_keep, n_discard)

    def stats(self) -> list[RankStats]:
        return [self._meter.snapshot(0, self._host, self.stage, 0.0)]

    def poll_failure(self) -> None:
        """Nothing to watch: there is no other rank."""

    def close(self) -> None:
        self.stage.close()


# ---- one step of the pipeline, as seen by any rank ---------------------------------------------

def run_step(transport: Any, stage: Stage, msg: Eval, meter: _Meter, buf: np.ndarray,
             tokens: np.ndarray | None = None, tp: TPContext | None = None) -> np.ndarray | None:
    """Rank k's part of one evaluation. Stages are groups of `tp.layout.tp` consecutive ranks (one rank
    each without `tp`); a stage's head (TP index 0) takes each micro-batch (embeds it on rank 0, receives
    it from the previous stage's head elsewhere) and sends it to the other ranks of its group; every rank
    of the group runs the stage's layers on it (its shard, all-reduced inside the group); the head passes
    the result on (to the next stage's head, or back to rank 0 from the last stage).

    Returns the hidden rows the output head needs, (T, n_embd) when `msg.all_rows`, else (1, n_embd): on
    rank 0, and on the other ranks of stage 0's group when there is a single stage; None elsewhere. Every
    send is waited before returning, so buffers can be reused.
    """
    posted: list[Any] = []                                           # receives to cancel on failure
    try:
        return _step(transport, stage, msg, meter, buf, tokens, posted,
                     tp if tp is not None else single(transport.size, transport.rank))
    except BaseException:
        transport.cancel(posted)
        raise


def _step(transport: Any, stage: Stage, msg: Eval, meter: _Meter, buf: np.ndarray,
          tokens: np.ndarray | None, posted: list[Any], tp: TPContext) -> np.ndarray | None:
    rank, lay, group = transport.rank, tp.layout, tp.group
    s, n_stages = tp.stage, lay.n_stages
    last = lay.head(n_stages - 1)                                     # the last stage's head
    mbs = msg.micro_batches()                                         # [(row, n), ...]
    sends, keep, outs = [], [], []                                    # keep: arrays being sent
    recvs = []
    if tp.leads and rank > 0:                                         # post every receive at once
        recvs = [transport.irecv_into(buf[i0:i0 + n], lay.head(s - 1)) for i0, n in mbs]
    elif not tp.leads:                                                # the stage input, from its head
        recvs = [group.irecv_into(buf[i0:i0 + n], 0) for i0, n in mbs]
    posted += recvs
    out = None
    if rank == 0 and n_stages > 1:                                    # results from the last stage
        rows = msg.n_tokens if msg.all_rows else 1
        out = np.empty((rows, stage.config.n_embd), dtype=np.float32)   # (rows, n_embd)
        back = ([transport.irecv_into(out[i0:i0 + n], last) for i0, n in mbs] if msg.all_rows
                else [transport.irecv_into(out, last)])
        posted += back
    reduced = group.bytes_sent if group is not None else 0
    for j, (i0, n) in enumerate(mbs):
        t0 = time.perf_counter()
        if rank == 0:
            h_in = stage.embed(tokens[i0:i0 + n])                     # (n, n_embd)
        else:
            (transport if tp.leads else group).wait(recvs[j])
            t0 = time.perf_counter()
            h_in = buf[i0:i0 + n]
        if tp.leads and group is not None:                           # the same input for the whole group
            keep.append(h_in)
            sends += [(group, group.isend(h_in, r)) for r in range(1, group.size)]
            meter.bytes_sent += h_in.nbytes * (group.size - 1)
        waited = transport.wait_s
        h = stage.forward(h_in, msg.pos + i0)                         # (n, n_embd)
        meter.compute_s += time.perf_counter() - t0 - (transport.wait_s - waited)   # not the all-reduces' waits
        if n_stages == 1:
            outs.append(h)
            continue
        if not tp.leads:
            continue
        if s < n_stages - 1:
            dest, h_out = lay.head(s + 1), h
        elif msg.all_rows:
            dest, h_out = 0, h
        elif j == len(mbs) - 1:
            dest, h_out = 0, np.ascontiguousarray(h[-1:])             # (1, n_embd): only what the head needs
        else:
            continue
        keep.append(h_out)
        sends.append((transport, transport.isend(h_out, dest)))
        meter.bytes_sent += h_out.nbytes
    meter.tokens += msg.n_tokens
    if group is not None:
        meter.bytes_sent += group.bytes_sent - reduced
    for channel, req in sends:
        channel.wait(req)
    if n_stages == 1:
        h = np.concatenate(outs) if len(outs) > 1 else outs[0]        # (T, n_embd)
        return h if msg.all_rows else h[-1:]
    if rank != 0:
        return None
    for req in back:
        transport.wait(req)
    return out


class MpiPipeline(_HeadStage):
    """The head's side of a cluster (rank 0 of `transport`): drives every step with a control message.

    Args:
        transport: a core.transport.Transport whose peers table is filled (rank 0 = this process).
        stage: the head's stage (embed=True, head=True, the first layer slice).
        layers: every rank's layer range, in rank order (for error messages and stats).
        plan: what every rank agreed on at start-up (core/cluster.py), or None.
        ubatch: micro-batch size for prefill (0 = never pipeline, None = automatic).
        tp: this rank's place in the tensor-parallel layout (core/tp_group.py); None: one rank per stage.
    """

    def __init__(self, transport: Any, stage: Stage, layers: list[range], plan: Plan | None = None,
                 ubatch: int | None = None, tp: TPContext | None = None):
        self.t, self.stage, self.config = transport, stage, stage.config
        self.layers, self.plan, self.ubatch = layers, plan, ubatch
        self.tp = tp if tp is not None else single(transport.size, 0)
        self._seq = 0
        self._meter = _Meter()
        self._no_buf = np.empty((0, self.config.n_embd), dtype=np.float32)   # the head receives no input
        self._broken: str | None = None      # the error that stopped the cluster
        self._exit_code = 1                  # the job's status when it has to be aborted
        self._closed = False

    @property
    def size(self) -> int:
        return self.t.size

    def describe(self, rank: int) -> str:
        """"rank 2 (node-b, layers 11-21)" for messages; with --tp, "rank 3 (node-b, layers 11-21, TP 1/2)"."""
        host = self.t.peers[rank].host if rank < len(self.t.peers) else "?"
        lay = self.tp.layout
        tp = f", TP {lay.index(rank)}/{lay.tp}" if lay.tp > 1 and 0 <= rank < lay.size else ""
        return f"rank {rank} ({host}, layers {format_layers(self.layers[rank])}{tp})"

    # ---- the Pipeline API ------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self._usable()
        ids = check_tokens(tokens, self.n_past, self.n_ctx, self.config.n_vocab)
        msg = Eval(ids.size, self.n_past, choose_ubatch(ids.size, self.tp.layout.n_stages, self.ubatch), all_logits)
        return self._guarded(self._eval, msg, ids)

    def kv_clear(self) -> None:
        self._kv(KvClear())

    def kv_truncate(self, n: int) -> None:
        self._kv(KvTruncate(n))

    def kv_shift(self, n_keep: int, n_discard: int) -> None:
        self._kv(KvShift(n_keep, n_discard))

    def stats(self) -> list[RankStats]:
        self._usable()
        return self._guarded(self._stats)

    def poll_failure(self) -> None:
        """Between steps (the head waits for the user): raise the one PipelineError of a worker that has
        failed or vanished meanwhile, and stop the cluster; return at once when all is well (nothing is
        sent). Call it from the thread that makes every other MPI call."""
        self._usable()
        self._guarded(self.t.poll_failure)

    def close(self) -> None:
        """Shut every rank down: a clean handshake when all is well; after a failure (the error has been
        reported by then) the MPI job is aborted, which ends every rank at once with status 1."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None:
            try:
                self._send(Shutdown())
            except BaseException:                                     # noqa: BLE001 - going down anyway
                self._broken = "shutdown failed"
        if self._broken is not None:
            self._abort_workers(-1)
            self.t.abort_job(self._exit_code)
        self.t.close()
        self.stage.close()

    # ---- internals -------------------------------------------------------------------------------
    def _usable(self) -> None:
        if self._broken is not None:
            raise PipelineError(self._broken)
        if self._closed:
            raise PipelineError("the pipeline is closed")

    def _send(self, msg: Message) -> None:
        self._seq += 1
        self.t.send_ctrl(msg, self._seq)

    def _kv(self, msg: Message) -> None:
        self._usable()
        check_kv_op(msg, self.n_past)
        self._guarded(self._kv_step, msg)

    def _kv_step(self, msg: Message) -> None:
        self._send(msg)
        apply_kv_op(self.stage, msg)

    def _eval(self, msg: Eval, ids: np.ndarray) -> np.ndarray:
        self.t.poll_failure()                                         # a worker that died while we idled
        self._send(msg)
        h = run_step(self.t, self.stage, msg, self._meter, self._no_buf, ids, self.tp)   # (rows, n_embd)
        if self.tp.group is not None:                                 # stage 0's group: vocab rows each
            logits = group_logits(self.tp, self.stage, h, h.shape[0], self._meter)
        else:
            t0 = time.perf_counter()
            logits = self.stage.logits(h)                             # (rows, n_vocab)
            self._meter.compute_s += time.perf_counter() - t0
        return logits if msg.all_rows else logits[0]

    def _stats(self) -> list[RankStats]:
        self._send(Stats())
        mine = self._meter.snapshot(0, self.t.host, self.stage, self.t.wait_s)
        return [mine] + [self.t.recv_obj(r) for r in range(1, self.size)]

    def _guarded(self, fn, *args):
        """Run one step; any failure stops the whole cluster and becomes one PipelineError."""
        try:
            return fn(*args)
        except PeerFailed as exc:
            self._broken = f"{self.describe(exc.rank)} {exc.said}"
            self._abort_workers(exc.rank)
            raise PipelineError(self._broken) from None
        except (KeyboardInterrupt, SystemExit) as exc:
            self._broken = "interrupted in the middle of a step"
            code = exc.code if isinstance(exc, SystemExit) else 130
            self._exit_code = code if isinstance(code, int) and code else 1
            self._abort_workers(-1)
            raise
        except Exception as exc:                                      # the head's own step failed
            self._broken = f"{self.describe(0)} failed: {one_line(exc)}"
            self._abort_workers(0)
            raise PipelineError(self._broken) from exc

    def _abort_workers(self, rank: int) -> None:
        """Best effort, bounded: every worker gets Abort (a dead one cannot; the launcher reaps it)."""
        self._seq += 1
        self.t.send_ctrl_nowait(Abort(rank), self._seq, ABORT_GRACE_S)


# ---- the worker side ---------------------------------------------------------------------------

def serve_worker(transport: Any, stage: Stage, tp: TPContext | None = None) -> int:
    """A worker's life after setup: apply the head's control messages in order until Shutdown (`tp`: its
    place in a tensor-parallel layout; None: one rank per stage).

    Returns the exit status: 0 after Shutdown, 1 after an Abort or a failure of this rank (which is
    reported to the head in one line first).
    """
    meter, buf = _Meter(), np.empty((stage.n_ctx, stage.config.n_embd), dtype=np.float32)
    expected, hot = 1, False
    in_group = tp is not None and tp.group is not None               # its head starts each token at once
    try:
        while True:
            msg, seq = transport.recv_ctrl(hot)
            hot = False
            if seq != expected:
                raise RuntimeError(f"control message {seq} arrived when {expected} was due")
            expected += 1
            if isinstance(msg, Eval):
                if msg.pos != stage.n_past:
                    raise RuntimeError(f"evaluation at position {msg.pos} but this rank holds {stage.n_past}")
                rows = run_step(transport, stage, msg, meter, buf, tp=tp)
                hot = in_group
                if tp is not None and tp.computes_logits:
                    group_logits(tp, stage, rows, msg.n_tokens if msg.all_rows else 1, meter)
            elif isinstance(msg, Stats):
                transport.send_obj(meter.snapshot(transport.rank, transport.host, stage, transport.wait_s), 0)
            elif isinstance(msg, Shutdown):
                return 0
            else:
                apply_kv_op(stage, msg)
    except Aborted:
        return 1
    except PeerFailed as exc:                                        # the head is gone or silent: nobody to tell
        transport.abort_job(1, f"rank {transport.rank} ({transport.host}): rank {exc.rank} {exc.said}")
        return 1
    except BaseException as exc:                                     # noqa: BLE001 - report, then stop
        what = f"stopped by signal (exit {exc.code})" if isinstance(exc, SystemExit) else one_line(exc)
        transport.report_failure(what)
        transport.await_abort(WORKER_ABORT_WAIT_S, f"failed: {what}")
        return 1
