"""Launch: turn the options into a running pipeline, whatever way the process was started.

Owns the three launch modes of DESIGN §3 (under mpiexec, spawn with --np N, single process), the
start-up handshake (the head's settings broadcast, node-local model path and threads, model fingerprint
checked on every rank, the split validated before anything loads), the plan shown to the user, the
signals of a cluster rank, and the supervisor process each worker runs under (so that a killed rank
is named by the head instead of being reaped, with everything else, by the launcher). Prints nothing
except a worker's last-resort line; the UI prints the plan (`Plan.__str__`). The engine itself is
core/pipeline.py; MPI is core/transport.py.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.errors import LlamaMpiError, PipelineError, UsageError, one_line
from core.loader import ModelFile, open_model
from core.model import Stage
from core.notice import notice_host, send_notice
from core.partition import format_layers, split_layers
from core.pipeline import LocalPipeline, MpiPipeline, Pipeline, serve_worker

from .options import read_user_file

FAULT_ENV = "LLAMA_MPI_FAULT"        # tests only: "RANK:N" = rank RANK fails at its N-th evaluation
UBATCH_ENV = "LLAMA_MPI_UBATCH"      # micro-batch size for pipelined prefill (0 = off; unset = automatic)
WORKER_FLAG = "--llama-mpi-worker"   # argv of a spawned worker: python -m chat.launch --llama-mpi-worker
SUPERVISE_GRACE_S = 3.0              # a worker's supervisor waits this long for the head to report a death
_NOTICE_FD: int | None = None        # a supervised rank: the pipe on which it tells its supervisor the
                                     # head's notice address (see _supervise)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    host: str
    layers: range
    weight_bytes: int          # bytes of this rank's tensors in the file
    kv_bytes: int              # f32 K and V for its layers at n_ctx
    model: str                 # the path this rank opens
    threads: int


@dataclass(frozen=True)
class Plan:
    mode: str                  # "single", "mpiexec" or "spawn"
    model: str
    n_layer: int
    n_ctx: int
    ranks: tuple[RankPlan, ...]

    def __str__(self) -> str:
        head = f"plan: {self.mode}, {len(self.ranks)} rank{'s' if len(self.ranks) > 1 else ''}, " \
               f"{self.n_layer} layers, n_ctx {self.n_ctx}"
        rows = [f"  rank {r.rank}  {r.host:<16} layers {format_layers(r.layers):<7} "
                f"weights {_mib(r.weight_bytes)}  KV {_mib(r.kv_bytes)}  threads {r.threads}" for r in self.ranks]
        return "\n".join([head] + rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def launch_mode(opts: Any) -> str:
    """"mpiexec" when a process manager started us, "spawn" for --np N > 1, else "single"."""
    from core.transport import under_mpi_launcher
    if under_mpi_launcher():
        if opts.np is not None:
            raise UsageError("--np starts its own workers: under mpiexec give the rank count to mpiexec -n")
        return "mpiexec"
    if opts.np is not None and opts.np > 1:
        return "spawn"
    return "single"


def start_cluster(opts: Any, on_plan: Callable[[Plan], None] | None = None) -> Pipeline | None:
    """Start the pipeline for these options. The head gets a Pipeline (with `.plan`); a worker rank
    serves until the head shuts the cluster down and returns None (the caller exits 0: after a failure
    the head's status is the job's, or the head has aborted the job).

    `on_plan` (optional) is called with the plan once every rank agreed and before anything loads.
    """
    if opts.model is None:
        raise UsageError("no model: give -m FILE")
    mode = launch_mode(opts)
    # Ranks may share a host, so -t threads come from each Stage's own pool, never from BLAS; the same
    # in one process, so that a single-process run and a cluster run compute bit-identical logits.
    _limit_blas_threads(1)
    if mode == "single":
        return _start_single(opts, on_plan)
    from core import transport
    if mode == "mpiexec" and _launcher_rank() not in (None, 0):
        _supervise(_launcher_rank())          # returns in the child, which becomes the MPI rank
    if mode == "spawn":
        if opts.hostfile:
            check_hostfile(opts.hostfile)
        t = transport.spawn_workers(opts.np - 1, _worker_argv(), opts.hostfile)
    else:
        t = transport.world()
    t.exchange_peers()
    if t.rank != 0:
        _tell_supervisor(t.head_notice)
        _worker_signals()
        _worker(t, _local_model(opts), _local_threads(opts))
        return None            # exit 0 even after a failure: the head's status is the job's (hydra
                               # kills the ranks still finalizing when one exits non-zero)
    return _head(t, opts, mode, on_plan)


def check_hostfile(path: str) -> list[str]:
    """Hosts of an MPICH hostfile (`host[:slots]` per line, `#` comments; Open MPI's `host slots=N` is
    read too). Checked before spawning, because hydra's own failure kills the head without a word."""
    text = read_user_file(path, "--hostfile:").decode("utf-8", errors="replace")
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0].split(":", 1)[0])
    if not hosts:
        raise UsageError(f"--hostfile: '{path}' names no host")
    for host in hosts:
        try:
            socket.getaddrinfo(host, None)
        except OSError:
            raise UsageError(f"--hostfile: host '{host}' in '{path}' cannot be resolved") from None
    return hosts


# ---- single process ------------------------------------------------------------------------------

def _start_single(opts: Any, on_plan: Callable[[Plan], None] | None) -> Pipeline:
    model = open_model(opts.model).with_rope(opts.rope_freq_base, opts.rope_freq_scale)
    n_ctx = opts.n_ctx or model.config.n_ctx_train
    layers = split_layers(model.config.n_layer, 1, opts.mpi_layer_split)
    plan = Plan("single", str(opts.model), model.config.n_layer, n_ctx,
                (_rank_plan(model, 0, os.uname().nodename, layers[0], n_ctx, str(opts.model), opts.threads),))
    if on_plan:
        on_plan(plan)
    pipe = LocalPipeline(Stage(model, layers[0], embed=True, head=True, n_ctx=n_ctx, threads=opts.threads))
    pipe.plan = plan
    return pipe


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


def _head(t: Any, opts: Any, mode: str, on_plan: Callable[[Plan], None] | None) -> MpiPipeline:
    from core.transport import PeerFailed
    guard = _AbortAtExit(t)
    try:
        pipe = _head_setup(t, opts, mode, on_plan, guard)
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


def _head_setup(t: Any, opts: Any, mode: str, on_plan: Callable[[Plan], None] | None,
                guard: _AbortAtExit) -> MpiPipeline:
    try:
        model = open_model(opts.model).with_rope(opts.rope_freq_base, opts.rope_freq_scale)
        n_ctx = opts.n_ctx or model.config.n_ctx_train
        layers = split_layers(model.config.n_layer, t.size, opts.mpi_layer_split)
    except LlamaMpiError as exc:
        t.bcast_obj({"error": str(exc)})                  # workers stop quietly; the head reports
        t.close()
        guard.disarm()
        raise
    settings = {"model": os.path.abspath(opts.model), "fingerprint": model.fingerprint(), "n_ctx": n_ctx,
                "threads": opts.threads, "layers": [(r.start, r.stop) for r in layers],
                "rope": (opts.rope_freq_base, opts.rope_freq_scale),      # the head's overrides, for all
                "fault": os.environ.get(FAULT_ENV)}
    t.bcast_obj(settings)
    mine = _rank_plan(model, 0, t.host, layers[0], n_ctx, str(opts.model), opts.threads)
    reports = t.gather_obj({"plan": mine, "error": None})
    _verdict(t, reports, layers, guard)
    plan = Plan(mode, str(opts.model), model.config.n_layer, n_ctx, tuple(r["plan"] for r in reports))
    if on_plan:
        on_plan(plan)
    stage, error = None, None
    try:
        stage = Stage(model, layers[0], embed=True, head=True, n_ctx=n_ctx, threads=opts.threads)
    except Exception as exc:                              # noqa: BLE001 - reported like a worker's
        error = one_line(exc)
    reports = t.gather_obj({"plan": mine, "error": error})
    _verdict(t, reports, layers, guard)
    ubatch = os.environ.get(UBATCH_ENV)
    pipe = MpiPipeline(t, stage, layers, ubatch=int(ubatch) if ubatch else None,
                       fault_after=_fault_after(settings["fault"], 0))
    pipe.plan = plan
    _head_signals()
    return pipe


def _verdict(t: Any, reports: list[dict], layers: list[range], guard: _AbortAtExit) -> None:
    """Every rank said ok: tell them to go on. Otherwise tell them to stop and raise for the first."""
    bad = [(r, rep) for r, rep in enumerate(reports) if rep["error"]]
    t.bcast_obj("abort" if bad else "go")
    if bad:
        t.close()
        guard.disarm()
        r, rep = bad[0]
        raise PipelineError(f"rank {r} ({rep['plan'].host}, layers {format_layers(layers[r])}): {rep['error']}")


def _head_at_exit(pipe: MpiPipeline) -> None:
    """The head is exiting without close() (an unexpected error): never leave workers waiting."""
    pipe.close()


def _head_signals() -> None:
    """SIGTERM on the head: leave through SystemExit so the pipeline stops every worker first.
    (SIGINT belongs to the REPL: it stops generation between steps.)"""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


# ---- a worker ------------------------------------------------------------------------------------

def _worker_signals() -> None:
    """Workers ignore SIGINT (mpiexec forwards Ctrl-C to every rank; the head decides) and turn
    SIGTERM into a reported failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)


def _worker(t: Any, local_model: str | None, local_threads: int | None) -> int:
    """A worker's start-up handshake, then serve. Returns the exit status."""
    settings = t.bcast_obj()
    if "error" in settings:
        t.close()
        return 1
    rank = t.rank
    layers = range(*settings["layers"][rank])
    path = local_model or settings["model"]
    threads = local_threads or settings["threads"]
    n_ctx = settings["n_ctx"]
    model: ModelFile | None = None
    error = None
    try:
        model = open_model(path).with_rope(*settings["rope"])
        if model.fingerprint() != settings["fingerprint"]:
            error = (f"model {path} is not the head's {settings['model']} "
                     f"(fingerprint {model.fingerprint()} vs {settings['fingerprint']})")
    except LlamaMpiError as exc:
        error = str(exc)
    mine = (_rank_plan(model, rank, t.host, layers, n_ctx, path, threads) if model is not None
            else RankPlan(rank, t.host, layers, 0, 0, path, threads))
    t.gather_obj({"plan": mine, "error": error})
    if t.bcast_obj() != "go":
        t.close()
        return 1
    stage, error = None, None
    try:
        stage = Stage(model, layers, embed=False, head=False, n_ctx=n_ctx, threads=threads)
    except Exception as exc:                              # noqa: BLE001 - reported to the head
        error = one_line(exc)
    t.gather_obj({"plan": mine, "error": error})
    if t.bcast_obj() != "go":
        t.close()
        return 1
    status = serve_worker(t, stage, _fault_after(settings["fault"], rank))
    t.close(disconnect=status == 0)
    stage.close()
    return status


def _launcher_rank() -> int | None:
    """This process's rank as the process manager numbered it (before MPI is initialised)."""
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def _supervise(rank: int | None) -> None:
    """Split a worker into a supervisor (the process the launcher started) and the MPI rank (its
    child, which returns from here). With hydra, a rank that dies makes the launcher SIGKILL the
    whole job at once, before the head can say which rank it was. Here the launcher's process stays
    alive and the head names the lost rank in one line and aborts the job (which ends this supervisor
    too): the head sees a same-host rank vanish itself, and this supervisor sends it a notice
    (core/notice.py) when the rank ran on another host. If nothing happens within SUPERVISE_GRACE_S
    (the head is gone or unreachable), the supervisor names the rank itself and dies by SIGKILL: the
    launcher ends the whole job when a rank dies by a signal, while a plain non-zero exit would leave
    the head waiting for that rank forever."""
    global _NOTICE_FD
    read_fd, write_fd = os.pipe()                          # the rank tells us where the head listens
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _NOTICE_FD = write_fd
        _die_with_parent()
        return
    os.close(write_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(pid, signal.SIGTERM))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
        os.set_blocking(read_fd, False)
        try:
            head = os.read(read_fd, 1024).decode(errors="replace").strip()
        except BlockingIOError:                            # the rank never said (died before)
            head = ""
        host = socket.gethostname()
        if os.WIFSIGNALED(status):
            how = f"killed by signal {os.WTERMSIG(status)}"
            said = f"was {how}"
        else:
            how = said = f"exited with status {os.WEXITSTATUS(status)}"
        if head and rank is not None and notice_host(head) != host:   # same host: the head sees
            send_notice(head, rank, f"the process is gone ({how})")          # the pid go by itself
        time.sleep(SUPERVISE_GRACE_S)
        print(f"llama-mpi: rank {rank} ({host}) {said}; stopping the MPI job", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


def _tell_supervisor(head_notice: str | None) -> None:
    """(the MPI rank of a supervised worker) pass the head's notice address to the supervisor."""
    global _NOTICE_FD
    if _NOTICE_FD is None:
        return
    try:
        if head_notice:
            os.write(_NOTICE_FD, head_notice.encode() + b"\n")
    finally:
        os.close(_NOTICE_FD)
        _NOTICE_FD = None


def _die_with_parent() -> None:
    """Linux: the MPI rank gets SIGKILL if its supervisor goes (no orphan ever outlives it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)                     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fault_after(spec: str | None, rank: int) -> int | None:
    """"1:3" -> 3 on rank 1, None elsewhere (the test hook of FAULT_ENV)."""
    if not spec:
        return None
    r, _, n = spec.partition(":")
    return int(n or 1) if int(r) == rank else None


def _local_model(opts: Any) -> str | None:
    """A worker's own -m (from its node's options file or command line), if it has one."""
    return opts.model


def _local_threads(opts: Any) -> int | None:
    """A worker's own -t, only when its options set it explicitly (else the head's applies)."""
    argv = list(getattr(opts, "file_argv", ())) + sys.argv[1:]
    explicit = any(a in ("-t", "--threads") or a.startswith("--threads=") for a in argv)
    return opts.threads if explicit else None


def _rank_plan(model: ModelFile, rank: int, host: str, layers: range, n_ctx: int, path: str,
               threads: int) -> RankPlan:
    """Bytes this rank will hold: its tensors in the file, and an f32 KV cache for its layers."""
    cfg = model.config
    names = {f"blk.{i}." for i in layers}
    head = {"token_embd.weight", "output_norm.weight", "output.weight"} if rank == 0 else set()
    weight = sum(int(t.n_bytes) for t in model.reader.tensors
                 if t.name in head or t.name[:t.name.find(".", 4) + 1] in names)
    kv = 2 * len(layers) * n_ctx * cfg.n_head_kv * cfg.head_dim * 4
    return RankPlan(rank, host, layers, weight, kv, path, threads)


def _limit_blas_threads(n: int) -> bool:
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


def _worker_argv() -> list[str]:
    """`python <argv>` of a spawned worker: import this package from where the head found it."""
    root = str(Path(__file__).resolve().parents[1])
    code = (f"import sys; sys.path.insert(0, {root!r}); from chat.launch import worker_main; "
            f"sys.exit(worker_main())")
    return ["-c", code, WORKER_FLAG]


def worker_main() -> int:
    """Entry of a spawned worker (mode 2): join the head's communicator and serve."""
    from core import transport
    rank = _launcher_rank()
    _supervise(None if rank is None else rank + 1)       # merged rank: the head is 0
    t = transport.join_parent()
    if t is None:
        print("error: this entry point is for workers spawned by llama-mpi --np N", file=sys.stderr)
        return 2
    t.exchange_peers()
    _tell_supervisor(t.head_notice)
    _worker_signals()
    _worker(t, None, None)
    return 0


if __name__ == "__main__" and WORKER_FLAG in sys.argv[1:]:
    sys.exit(worker_main())
