"""Cluster: make one engine of the processes of a run, however they were started (DESIGN §3).

Owns a rank's start-up: the launch mode's rule, a worker's supervisor and signals, the spawned workers'
entry, the handshake (the head's settings sent to every rank; a worker's node-local model path and
threads; the model fingerprint checked on every rank; the split validated before anything loads), the
plan, the two load-report rounds and their verdicts, the head's abort-at-exit guard, and the start of a
worker's serve loop. Settings arrive as a ClusterSettings; it never sees the options and prints nothing
but a spawned worker's usage line (the UI prints the plan). Steps: core/pipeline.py; MPI: core/transport.py.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

from . import faults, transport
from .errors import LlamaMpiError, PipelineError, UsageError, one_line
from .liveness import DEFAULT_RANK_TIMEOUT_S
from .loader import ModelFile, open_model
from .model import Stage
from .partition import format_layers, split_layers
from .pipeline import LocalPipeline, MpiPipeline, Pipeline, serve_worker
from .procfs import proc_bytes
from .shard import TPShard, f32_bytes, share_bytes
from .tp_group import Layout, TPContext, spawn_hostfile, stage_shards
from .supervisor import Supervised, supervise
from .transport import PeerFailed, launcher

UBATCH_ENV = "LLAMA_MPI_UBATCH"      # micro-batch size for pipelined prefill (0 = off; unset = automatic)
WORKER_FLAG = "--llama-mpi-worker"   # in the command line of a spawned worker
TP_NEEDS_RANKS = ("--tp {tp} splits every layer over {tp} MPI ranks: run under mpiexec -n {tp} or with --np {tp} "
                  "(in one process, -t N adds threads)")


@dataclass(frozen=True)
class ClusterSettings:
    """What this process was asked to run. The head's values count for everything shared; a worker
    started by mpiexec keeps its own model path (node-local) and, when set on its node, its threads."""
    model: str                                    # the GGUF file
    n_ctx: int = 0                                # context positions; 0 = the model's training context
    threads: int = 1                              # compute threads per rank
    local_threads: int | None = None              # -t given on this node: a worker keeps it (else the head's)
    layer_split: tuple[float, ...] | None = None  # one weight per rank, head first; None = equal shares
    rope_freq_base: float | None = None           # RoPE overrides (None = the file's)
    rope_freq_scale: float | None = None
    ubatch: int | None = None                     # prefill micro-batch size (0 = off, None = automatic)
    tp: int = 1                                   # ranks per stage (tensor parallelism); 1 = layer split only
    weights: str = "native"                       # "native" or "f32" (dequantized at load; node-local)
    local_weights: str | None = None              # --weights given on this node: a worker keeps it
    rank_timeout: float = DEFAULT_RANK_TIMEOUT_S  # name a rank silent this long (core/liveness.py); 0 = never


@dataclass(frozen=True)
class RankPlan:
    rank: int
    host: str
    layers: range
    weight_bytes: int          # bytes of this rank's weights in memory: its tensors (its TP share) in the
                               # file, or as float32 with weights "f32"
    kv_bytes: int              # f32 K and V for its layers (its TP share's KV heads) at n_ctx
    model: str                 # the path this rank opens
    threads: int
    stage: int = 0             # pipeline stage (= rank without --tp)
    tp_index: int = 0          # index in the stage's TP group
    tp_size: int = 1
    weights: str = "native"
    mem_available: int = 0     # the host's available memory when planned (0: unknown)


@dataclass(frozen=True)
class Plan:
    mode: str                  # "single", "mpiexec" or "spawn"
    model: str
    n_layer: int
    n_ctx: int
    ranks: tuple[RankPlan, ...]

    def __str__(self) -> str:
        tp = max(r.tp_size for r in self.ranks)
        head = f"plan: {self.mode}, {len(self.ranks)} rank{'s' if len(self.ranks) > 1 else ''}, " \
               f"{self.n_layer} layers, n_ctx {self.n_ctx}" + \
               (f", {len(self.ranks) // tp} stage(s) of --tp {tp}" if tp > 1 else "")
        rows = [f"  rank {r.rank}  {r.host:<16} " + (f"stage {r.stage} TP {r.tp_index}/{r.tp_size}  " if tp > 1 else "")
                + f"layers {format_layers(r.layers):<7} weights{' f32' if r.weights == 'f32' else ''} "
                f"{_mib(r.weight_bytes)}  KV {_mib(r.kv_bytes)}  threads {r.threads}" for r in self.ranks]
        return "\n".join([head] + rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def env_ubatch() -> int | None:
    """The micro-batch size LLAMA_MPI_UBATCH asks for (unset or empty: automatic); a UsageError naming it
    unless it is a whole number."""
    value = os.environ.get(UBATCH_ENV)
    if not value:
        return None
    if not value.isdigit():
        raise UsageError(f"{UBATCH_ENV}={value}: expected a number of tokens (0: no pipelined prefill; unset: "
                         f"automatic)")
    return int(value)


def launch_mode(n_ranks: int | None) -> str:
    """"mpiexec" when a launcher started this process, "spawn" for n_ranks > 1 (--np N), else "single"."""
    if launcher().started:
        if n_ranks is not None:
            raise UsageError("--np starts its own workers: under mpiexec give the rank count to mpiexec -n")
        return "mpiexec"
    if n_ranks is not None and n_ranks > 1:
        return "spawn"
    return "single"


class LoadWatcher(Protocol):
    """(head) told how far each rank's load is: layers repacked out of its share, then that all are done."""

    def layers_done(self, rank: int, done: int, total: int) -> None: ...
    def loaded(self) -> None: ...


def start(settings: ClusterSettings, mode: str, n_ranks: int = 1, hostfile: str | None = None,
          on_plan: Callable[[Plan], None] | None = None, watcher: LoadWatcher | None = None) -> Pipeline | None:
    """Make this process a rank of the engine. The head gets its Pipeline (with the `plan` every rank
    agreed on); a worker serves until the head shuts the cluster down and returns None (its caller exits
    0: after a failure the head's status is the job's, or the head has aborted the job).

    Args:
        settings: this process's settings.
        mode: "single", "mpiexec" or "spawn" (see launch_mode).
        n_ranks: spawn mode: the ranks to run, the head included.
        hostfile: spawn mode: the hosts of the spawned workers (checked by the caller).
        on_plan: called with the plan once every rank agreed, before anything loads.
        watcher: (head) the load's progress on every rank; `loaded()` comes before start returns or raises.
    """
    # Ranks may share a host, so -t threads come from each Stage's own pool, never from BLAS; the same
    # in one process, so that a single-process run and a cluster run compute bit-identical logits.
    limit_blas_threads(1)
    if mode == "single":
        return _start_single(settings, on_plan, watcher)
    supervised = None
    if mode == "mpiexec" and launcher().is_worker:
        supervised = supervise(launcher().rank)          # returns in the child, which becomes the MPI rank
    if mode == "spawn":
        placed = _spawn_hostfile(hostfile, n_ranks, settings.tp)
        try:
            t = transport.spawn_workers(n_ranks - 1, _worker_argv(), placed)
        finally:
            if placed != hostfile:
                Path(placed).unlink()
                Path(placed).parent.rmdir()
    else:
        t = transport.world()
    t.exchange_peers(settings.rank_timeout)              # the head's timeout counts: it judges
    if t.rank != 0:
        _serve(t, supervised, settings.model, settings.local_threads, settings.local_weights)
        return None            # exit 0 even after a failure: the head's status is the job's (hydra
                               # kills the ranks still finalizing when one exits non-zero)
    return _head(t, settings, mode, on_plan, watcher)


# ---- single process ------------------------------------------------------------------------------

def _start_single(settings: ClusterSettings, on_plan: Callable[[Plan], None] | None,
                  watcher: LoadWatcher | None) -> Pipeline:
    if settings.tp > 1:
        raise UsageError(TP_NEEDS_RANKS.format(tp=settings.tp))
    model = open_model(settings.model).with_rope(settings.rope_freq_base, settings.rope_freq_scale)
    n_ctx = settings.n_ctx or model.config.n_ctx_train
    layers = split_layers(model.config.n_layer, 1, settings.layer_split)
    mine = rank_plan(model, 0, os.uname().nodename, layers[0], n_ctx, settings.model, settings.threads,
                     weights=settings.weights)
    for _, problem in memory_problems([mine]):
        raise UsageError(problem)
    plan = Plan("single", settings.model, model.config.n_layer, n_ctx, (mine,))
    if on_plan:
        on_plan(plan)
    try:
        stage = Stage(model, layers[0], embed=True, head=True, n_ctx=n_ctx, threads=settings.threads,
                      progress=None if watcher is None else partial(watcher.layers_done, 0),
                      weights=settings.weights)
    finally:
        if watcher is not None:
            watcher.loaded()
    return LocalPipeline(stage, plan)


# ---- the head ------------------------------------------------------------------------------------

class _AbortAtExit:
    """Armed from the first MPI exchange until the head either owns a pipeline (whose own exit hook
    takes over) or has stopped every worker cleanly: if the head leaves in between (an unexpected
    error, Ctrl-C while loading), the MPI job is aborted so that no worker waits forever."""

    def __init__(self, t: Any):
        self.t, self.armed = t, True
        self.code = 1                    # the job's status; 130 after Ctrl-C
        atexit.register(self._fire)

    def disarm(self) -> None:
        self.armed = False

    def _fire(self) -> None:
        if self.armed:
            self.t.abort_job(self.code)


def _head(t: Any, settings: ClusterSettings, mode: str, on_plan: Callable[[Plan], None] | None,
          watcher: LoadWatcher | None) -> MpiPipeline:
    guard = _AbortAtExit(t)
    try:
        pipe = _head_setup(t, settings, mode, on_plan, guard, watcher)
    except PeerFailed as exc:                             # a worker died or failed during start-up
        peer = t.peers[exc.rank] if exc.rank < len(t.peers) else None
        raise PipelineError(f"rank {exc.rank} ({peer.host if peer else '?'}) failed during start-up: "
                            f"{exc.what}") from None
    except KeyboardInterrupt:                             # Ctrl-C while loading: the job ends with 130
        guard.code = 130
        raise
    guard.disarm()
    atexit.register(_head_at_exit, pipe)
    return pipe


def _head_setup(t: Any, settings: ClusterSettings, mode: str, on_plan: Callable[[Plan], None] | None,
                guard: _AbortAtExit, watcher: LoadWatcher | None) -> MpiPipeline:
    try:
        model = open_model(settings.model).with_rope(settings.rope_freq_base, settings.rope_freq_scale)
        n_ctx = settings.n_ctx or model.config.n_ctx_train
        layout = Layout(t.size, settings.tp)              # one line if the ranks are not whole groups
        per_stage = split_layers(model.config.n_layer, layout.n_stages, settings.layer_split,
                                 unit="rank" if layout.tp == 1 else "stage")
        shards = stage_shards(model, per_stage, layout.tp)   # --tp larger than heads, FFN...: one line
        layers = layout.per_rank(per_stage)
    except LlamaMpiError as exc:
        t.bcast_obj({"error": str(exc)})                  # workers stop quietly; the head reports
        t.close()
        guard.disarm()
        raise
    t.bcast_obj({"model": os.path.abspath(settings.model), "fingerprint": model.fingerprint(), "n_ctx": n_ctx,
                 "threads": settings.threads, "layers": [(r.start, r.stop) for r in layers],
                 "rope": (settings.rope_freq_base, settings.rope_freq_scale),   # the head's overrides, for all
                 "tp": layout.tp, "weights": settings.weights})
    mine = rank_plan(model, 0, t.host, layers[0], n_ctx, settings.model, settings.threads, layout=layout,
                     shard=shards[0][0] if shards else None, weights=settings.weights)
    reports = t.gather_obj({"plan": mine, "error": None})
    _check_memory(reports)
    _verdict(t, reports, layers, guard)
    plan = Plan(mode, settings.model, model.config.n_layer, n_ctx, tuple(r["plan"] for r in reports))
    if on_plan:
        on_plan(plan)
    stage, error = None, None
    tp = tp_context(t, layout, shards)                    # (collective: every rank, after the verdict)
    progress = _ProgressRelay(t, watcher)
    try:
        try:
            stage = Stage(model, layers[0], embed=True, head=True, n_ctx=n_ctx, threads=settings.threads,
                          progress=progress.head, weights=settings.weights, **tp.stage_args())
        except Exception as exc:                          # noqa: BLE001 - reported like a worker's
            error = one_line(exc)
        reports = t.gather_obj({"plan": mine, "error": error})   # workers' progress relayed meanwhile
    finally:
        progress.close()
    _verdict(t, reports, layers, guard)
    t, stage = faults.inject(t, stage)
    pipe = MpiPipeline(t, stage, layers, plan, ubatch=settings.ubatch, tp=tp)
    _head_signals()
    return pipe


class _ProgressRelay:
    """(head, while every rank loads) its own progress and the workers' progress messages to the watcher;
    the messages are drained even without a watcher."""

    def __init__(self, t: Any, watcher: LoadWatcher | None):
        self.t, self.watcher = t, watcher
        t.while_waiting = self.drain

    def head(self, done: int, total: int) -> None:
        if self.watcher is not None:
            self.watcher.layers_done(0, done, total)
        self.drain()

    def drain(self) -> None:
        for rank, done, total in self.t.poll_progress():
            if self.watcher is not None:
                self.watcher.layers_done(rank, done, total)

    def close(self) -> None:
        self.t.while_waiting = None
        self.drain()
        if self.watcher is not None:
            self.watcher.loaded()


def _verdict(t: Any, reports: list[dict], layers: list[range], guard: _AbortAtExit) -> None:
    """Every rank said ok: tell them to go on. Otherwise tell them to stop and raise for the first."""
    bad = [(r, rep) for r, rep in enumerate(reports) if rep["error"]]
    t.bcast_obj("abort" if bad else "go")
    if bad:
        t.close()
        guard.disarm()
        r, rep = bad[0]
        p = rep["plan"]
        tp = f", TP {p.tp_index}/{p.tp_size}" if p.tp_size > 1 else ""
        raise PipelineError(f"rank {r} ({p.host}, layers {format_layers(layers[r])}{tp}): {rep['error']}")


def _head_at_exit(pipe: MpiPipeline) -> None:
    """The head is exiting without close() (an unexpected error): never leave workers waiting."""
    pipe.close()


def _head_signals() -> None:
    """SIGTERM on the head: leave through SystemExit so the pipeline stops every worker first.
    (SIGINT belongs to the chat: it stops generation between steps.)"""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


# ---- a worker ------------------------------------------------------------------------------------

def worker_main() -> int:
    """Entry of a spawned worker (spawn mode): join the head's communicator and serve."""
    limit_blas_threads(1)                 # as on every other rank: -t threads come from the Stage's pool
    rank = launcher().rank
    supervised = supervise(None if rank is None else rank + 1)   # merged rank: the head is 0
    t = transport.join_parent()
    if t is None:
        print("error: this entry point is for workers spawned by llama-mpi --np N", file=sys.stderr)
        return 2
    t.exchange_peers()
    _serve(t, supervised, None, None)
    return 0


def _spawn_hostfile(hostfile: str | None, n_ranks: int, tp: int) -> str | None:
    """The hostfile Spawn gets: the user's, or with --tp one that places the workers group by group
    (core.tp_group.spawn_hostfile) in a temporary folder of its own (removed once they started)."""
    if hostfile is None or tp == 1:
        return hostfile
    import socket
    import tempfile
    text = spawn_hostfile(Path(hostfile).read_text(), socket.gethostname(), n_ranks - 1, tp)
    path = Path(tempfile.mkdtemp(prefix="llama-mpi-")) / "hostfile"
    path.write_text(text)
    return str(path)


def _worker_argv() -> list[str]:
    """`python <argv>` of a spawned worker: import this package from where the head found it."""
    root = str(Path(__file__).resolve().parents[1])
    code = (f"import sys; sys.path.insert(0, {root!r}); from core.cluster import worker_main; "
            f"sys.exit(worker_main())")
    return ["-c", code, WORKER_FLAG]


def _serve(t: Any, supervised: Supervised | None, local_model: str | None, local_threads: int | None,
           local_weights: str | None = None) -> int:
    """A worker rank once MPI is up: tell its supervisor where the head listens, take its signals,
    then the start-up handshake and the serve loop. Returns the exit status."""
    if supervised is not None:
        supervised.tell(t.head_notice, t.head_beats)
    # SIGINT is ignored (mpiexec forwards Ctrl-C to every rank; the head decides); SIGTERM becomes a
    # failure reported to the head
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)
    return _worker(t, local_model, local_threads, local_weights)


def _worker(t: Any, local_model: str | None, local_threads: int | None, local_weights: str | None = None) -> int:
    """A worker's start-up handshake, then serve. Returns the exit status."""
    shared = t.bcast_obj()
    if "error" in shared:
        t.close()
        return 1
    rank = t.rank
    layers = range(*shared["layers"][rank])
    path = local_model or shared["model"]
    threads = local_threads or shared["threads"]
    weights = local_weights or shared["weights"]
    n_ctx = shared["n_ctx"]
    layout = Layout(t.size, shared["tp"])
    model: ModelFile | None = None
    shards = None
    error = None
    try:
        model = open_model(path).with_rope(*shared["rope"])
        if model.fingerprint() != shared["fingerprint"]:
            error = (f"model {path} is not the head's {shared['model']} "
                     f"(fingerprint {model.fingerprint()} vs {shared['fingerprint']})")
        else:
            shards = stage_shards(model, layout.per_stage_of(shared["layers"]), layout.tp)
    except LlamaMpiError as exc:
        error = str(exc)
    shard = shards[layout.stage(rank)][layout.index(rank)] if shards else None
    mine = (rank_plan(model, rank, t.host, layers, n_ctx, path, threads, layout=layout, shard=shard,
                      weights=weights) if model is not None and error is None
            else RankPlan(rank, t.host, layers, 0, 0, path, threads, layout.stage(rank), layout.index(rank),
                          layout.tp, weights))
    t.gather_obj({"plan": mine, "error": error})
    if t.bcast_obj() != "go":
        t.close()
        return 1
    stage, error = None, None
    tp = tp_context(t, layout, shards)                    # (collective: every rank, after the verdict)
    try:
        stage = Stage(model, layers, embed=False, head=tp.shards is not None and tp.stage == 0, n_ctx=n_ctx,
                      threads=threads, progress=t.send_progress, weights=weights, **tp.stage_args())
    except Exception as exc:                              # noqa: BLE001 - reported to the head
        error = one_line(exc)
    t.finish_progress()
    t.gather_obj({"plan": mine, "error": error})
    if t.bcast_obj() != "go":
        t.close()
        return 1
    status = serve_worker(*faults.inject(t, stage), tp=tp)
    t.close(disconnect=status == 0)
    stage.close()
    return status


# ---- sizes and threads ---------------------------------------------------------------------------

def rank_plan(model: ModelFile, rank: int, host: str, layers: range, n_ctx: int, path: str,
              threads: int, *, layout: Layout | None = None, shard: TPShard | None = None,
              weights: str = "native") -> RankPlan:
    """Bytes this rank will hold: its tensors in the file (its TP share; as float32 with weights "f32"), and
    an f32 KV cache for its layers (its share's KV heads)."""
    cfg = model.config
    layout = layout or Layout(rank + 1)
    stage, head = layout.stage(rank), layout.stage(rank) == 0 and (rank == 0 or shard is not None)
    if weights == "f32":
        weight = f32_bytes(model, layers, shard, head=head, embed=rank == 0)
    elif shard is not None:
        weight = share_bytes(model, layers, shard, head=head)
    else:
        names = {f"blk.{i}." for i in layers}
        head_names = {"token_embd.weight", "output_norm.weight", "output.weight"} if rank == 0 else set()
        weight = sum(int(t.n_bytes) for t in model.reader.tensors
                     if t.name in head_names or t.name[:t.name.find(".", 4) + 1] in names)
    kv = (shard.kv_bytes(len(layers), n_ctx) if shard is not None
          else 2 * len(layers) * n_ctx * cfg.n_head_kv * cfg.head_dim * 4)
    return RankPlan(rank, host, layers, weight, kv, path, threads, stage, layout.index(rank), layout.tp, weights,
                    mem_available())


def mem_available() -> int:
    """This host's available memory in bytes (/proc/meminfo MemAvailable; 0 where unknown)."""
    return proc_bytes("/proc/meminfo", "MemAvailable:")


def memory_problems(plans: list[RankPlan]) -> list[tuple[int, str]]:
    """--weights f32 is refused on a host where its ranks' weights and KV would not fit in the memory
    available when planned: (the host's first f32 rank, one line) per such host (empty: all fits, or no
    rank asked for f32)."""
    hosts: dict[str, list[RankPlan]] = {}
    for p in plans:
        hosts.setdefault(p.host, []).append(p)
    problems = []
    for host, ranks in hosts.items():
        avail = max(p.mem_available for p in ranks)
        need = sum(p.weight_bytes + p.kv_bytes for p in ranks)
        if any(p.weights == "f32" for p in ranks) and avail and need > avail:
            who = ", ".join(str(p.rank) for p in ranks)
            first = next(p.rank for p in ranks if p.weights == "f32")
            problems.append((first, f"--weights f32: rank{'s' if len(ranks) > 1 else ''} {who} on {host} would hold "
                            f"{need / 2**20:.0f} MiB of weights and KV cache, more than the {avail / 2**20:.0f} MiB "
                            f"available there (use --weights native on that node)"))
    return problems


def _check_memory(reports: list[dict]) -> None:
    """(head) mark the first f32 rank of a host that cannot hold its ranks' share (see memory_problems)."""
    for rank, problem in memory_problems([r["plan"] for r in reports]):
        reports[rank]["error"] = reports[rank]["error"] or problem


def tp_context(t: Any, layout: Layout, shards: list[tuple[TPShard, ...]] | None) -> TPContext:
    """This rank's TPContext; with --tp > 1 its stage's group is split off t's communicator (a collective:
    every rank calls it at the same point of start-up)."""
    if layout.tp == 1 or shards is None:
        return TPContext(layout, t.rank)
    stage = layout.stage(t.rank)
    return TPContext(layout, t.rank, transport.split_group(t, stage), shards[stage])


def limit_blas_threads(n: int) -> bool:
    """Cap OpenBLAS's own threads in this process (numpy's wheel starts one per core, and they spin:
    two ranks on two cores then fight over four busy threads, measured 3-4x slower). True if capped."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return False
    names = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
             "scipy_openblas_set_num_threads")
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                return True
    return False
