"""Transport: the only module that imports mpi4py. Moves control frames, float32 activations and small
pickled records between ranks over one communicator whose rank 0 is the head, and tells which launcher
started this process (`launcher`). Every wait is a poll with short sleeps, never a spinning MPI wait, and
watches for trouble (the head's Abort; a worker's failure report, death notice or vanished pid; a rank's
silence, core/liveness.py). It must not know about models or layers: core/pipeline.py decides what to send.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
import signal
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import PipelineError, UsageError
from .control import FRAME_LEN, Abort, Message, Shutdown, decode, encode
from .liveness import HeadBeats, RankBeats
from .notice import NoticeBoard

# Message tags (one per channel, so the channels never match each other's receives).
TAG_CTRL, TAG_DATA, TAG_REPORT, TAG_OBJ_LEN, TAG_OBJ = 11, 12, 13, 14, 15
TAG_PROGRESS = 16             # a worker's load progress: int64 [layers done, layers]
REPORT_BYTES = 4096          # a failure report is one pickled record padded to this size
POLL_MIN_S = 20e-6           # first sleep of a wait; doubles each poll ...
POLL_HOT_S = 100e-6          # ... up to this for the first HOT_S (the next token or micro-batch is coming: a
HOT_S = 0.050                #     2 ms cap woke a TP worker ~1.5 ms late for each SmolLM2 token, measured) ...
POLL_MAX_S = 0.002           # ... up to this while the wait is young (latency ~ this per hop)
POLL_IDLE_S = 0.010          # ... and this once the wait is older than IDLE_AFTER_S (an idle worker)
IDLE_AFTER_S = 1.0
CTRL_SPIN_S = 0.002          # how long a hot worker spins for its next control message (Transport.recv_ctrl)
LIVENESS_EVERY_S = 0.25      # how often a waiting rank checks that its same-host peers still run and all beat
FINISH_TIMEOUT_S = 8.0       # how long a closing rank waits for the others to close too
OUTPUT_DRAIN_S = 0.3         # pause before MPI_Abort so the launcher forwards the last lines printed
ABORT_WAIT_S = 5.0           # how long MPI_Abort may take before the process ends by itself

_MPI = None


def next_poll_delay(delay: float, age: float) -> float:
    """The sleep after `delay` in a wait `age` seconds old: twice as long, capped by the wait's age."""
    cap = POLL_HOT_S if age < HOT_S else POLL_MAX_S if age < IDLE_AFTER_S else POLL_IDLE_S
    return min(2 * delay, cap)


def spin(done: Callable[[], bool], seconds: float) -> bool:
    """Test done() between sched_yield calls (a peer on the same core gets it) for up to `seconds`: whether it
    came true. For waits that end within a millisecond, where a sleep would oversleep them."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        os.sched_yield()
        if done():
            return True
    return False


def mpi():
    """Import and initialise MPI on first use (single-process runs never load it)."""
    global _MPI
    if _MPI is None:
        # UCX's warnings go to stdout, into the chat: spawned workers over TCP print "object ... was not
        # returned to mpool ucp_requests" at every exit (MPICH's spawn + disconnect, also with nothing
        # else done). Errors still print; UCX_LOG_LEVEL=warn brings the warnings back. Set before MPI_Init
        # (UCX reads it there), and spawned workers inherit it.
        os.environ.setdefault("UCX_LOG_LEVEL", "error")
        import mpi4py
        mpi4py.rc.thread_level = "serialized"   # threads run numpy only; MPI calls come from one thread
        from mpi4py import MPI
        _MPI = MPI
    return _MPI


@dataclass(frozen=True)
class Launcher:
    """The MPI process manager that started this process, and the rank it gave it (read from the
    environment, so it is known before MPI starts). A worker spawned by a singleton head (spawn mode) is
    numbered among the spawned workers only: its rank once merged with the head is one more."""
    name: str | None           # "mpich" (hydra's PMI), "openmpi" or "pmix"; None: no launcher (one
                               # process, or the head of spawn mode)
    rank: int | None           # None without a launcher

    @property
    def started(self) -> bool:
        """This process is a rank of a job that a launcher (mpiexec) started."""
        return self.name is not None

    @property
    def is_worker(self) -> bool:
        """The launcher numbered this process other than 0."""
        return self.rank is not None and self.rank != 0


_LAUNCHER_KEYS = (("mpich", ("PMI_RANK", "PMI_SIZE", "PMI_FD", "MPI_LOCALNRANKS")),
                  ("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")),
                  ("pmix", ("PMIX_RANK",)))
_RANK_KEYS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launcher() -> Launcher:
    """Which launcher started this process, and its rank: the one place that reads the launchers'
    environment variables (hydra sets PMI_*, Open MPI OMPI_COMM_WORLD_*, PMIx PMIX_RANK)."""
    env = os.environ
    name = next((name for name, keys in _LAUNCHER_KEYS if any(k in env for k in keys)), None)
    rank = next((int(env[k]) for k in _RANK_KEYS if env.get(k, "").isdigit()), None)
    return Launcher(name, rank)


class PeerFailed(Exception):
    """A peer reported a failure, vanished or fell silent. `rank` is the rank at fault; `what` says what
    happened; `said` is how a message goes on after naming the rank ("failed: what", or what itself for a
    rank that "has not answered for 10 s: ...")."""

    def __init__(self, rank: int, what: str, silent: bool = False):
        super().__init__(f"rank {rank}: {what}")
        self.rank, self.what = rank, what
        self.said = what if silent else f"failed: {what}"


class Aborted(Exception):
    """(worker side) the head sent Abort: stop now."""

    def __init__(self, rank: int):
        super().__init__(f"aborted by the head (fault at rank {rank})")
        self.rank = rank


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int


class Transport:
    """Point-to-point messaging over one intracommunicator whose rank 0 is the head."""

    def __init__(self, comm: Any, intercomm: Any = None):
        self.comm = comm
        self._inter = intercomm              # spawn mode: the intercommunicator to disconnect at the end
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.host = socket.gethostname()
        self.peers: list[Peer] = [Peer(self.rank, self.host, os.getpid())]
        self.wait_s = 0.0                    # time spent waiting on peers inside steps (for stats)
        self.while_waiting: Callable[[], None] | None = None   # called on each poll of a wait (load progress)
        self._progress: list[tuple[np.ndarray, Any]] = []        # progress sends in flight (worker)
        self._frame = np.zeros(FRAME_LEN, dtype=np.int64)   # worker: the next control frame lands here
        self._ctrl_req = None                # worker: pending control receive
        self._stash: list[tuple[Message, int]] = []         # worker: control frames that arrived early
        self._report_buf = np.zeros(REPORT_BYTES, dtype=np.uint8)
        self._report_req = None              # head: pending failure-report receive (any source)
        self._board: NoticeBoard | None = None   # head: where workers' supervisors report a dead rank
        self.head_notice: str | None = None  # everyone: the head's notice address "HOST:PORT" (core/notice.py)
        self.head_beats: str | None = None   # everyone: where ranks beat (core/liveness.py); None: no timeout
        self._beats: HeadBeats | RankBeats | None = None
        self.lost: set[int] = set()          # ranks found gone or silent (see _mark_lost)
        self._last_liveness = time.monotonic()
        self._closed = False

    # ---- setup -----------------------------------------------------------------------------------
    def exchange_peers(self, rank_timeout: float = 0.0) -> list[Peer]:
        """Everyone learns every rank's host and pid, the head's notice address and, when the head's
        `rank_timeout` is not 0, where to beat (collective; called once, before any model work)."""
        if self.rank == 0:
            try:
                self._board = NoticeBoard()
            except OSError:                  # no socket: same-host liveness checks still work
                self._board = None
            if rank_timeout > 0 and self.size > 1:
                try:
                    self._beats = HeadBeats(rank_timeout)
                except OSError:              # no socket: silent ranks cannot be told from slow ones
                    self._beats = None
        mine = (self.rank, self.host, os.getpid(), self._board.address if self._board else None,
                self._beats.address if self._beats else None)
        table = self.comm.allgather(mine)
        self.peers = [Peer(r, h, p) for r, h, p, *_ in table]
        self.head_notice, self.head_beats = table[0][3], table[0][4]
        if self.rank == 0 and self._beats is not None:
            self._beats.expect([(p.rank, p.host, p.pid) for p in self.peers[1:]], self.host)
        elif self.rank != 0 and self.head_beats is not None:
            self._beats = RankBeats(self.head_beats, self.rank)
        if self.rank == 0:
            self._post_report_recv()
        else:
            self._post_ctrl_recv()
        return self.peers

    # ---- polling ---------------------------------------------------------------------------------
    def wait(self, req: Any) -> None:
        """Poll `req` to completion while watching for failures (raises PeerFailed / Aborted). Polls with
        backing-off sleeps: MPICH's blocking waits busy-poll, stealing a core from the computing rank."""
        if not req.Test():
            self._poll_until(req.Test)

    def _poll_until(self, done: Callable[[], bool], counted: bool = True) -> None:
        """Sleep-poll until done() while watching for failures; counts the time as waiting unless `counted` is
        False (a worker waiting for its next control message is idle, not waiting for a peer)."""
        t0 = time.monotonic()
        delay = POLL_MIN_S
        while True:
            self._watch()
            if self.while_waiting is not None:
                self.while_waiting()
            if done():
                break
            time.sleep(delay)
            delay = next_poll_delay(delay, time.monotonic() - t0)
        if counted:
            self.wait_s += time.monotonic() - t0

    def _watch(self) -> None:
        if self.rank == 0:
            self._check_reports()
        else:
            self._check_ctrl_for_abort()
        now = time.monotonic()
        if now - self._last_liveness >= LIVENESS_EVERY_S:
            self._last_liveness = now
            self._check_liveness()

    def _check_liveness(self) -> None:
        ranks = range(1, self.size) if self.rank == 0 else [0]
        for r in ranks:
            p = self.peers[r] if r < len(self.peers) else None
            if p is None or p.host != self.host or p.pid == os.getpid():
                continue                       # another host: the launcher's job to notice
            try:
                os.kill(p.pid, 0)
            except ProcessLookupError:
                raise self._mark_lost(PeerFailed(r, "the process is gone (killed or crashed)")) from None
            except PermissionError:
                pass
        silent = self._beats.silent() if self._beats is not None else None
        if silent is not None:
            raise self._mark_lost(PeerFailed(*silent, silent=True))

    # ---- control channel (head -> workers) -------------------------------------------------------
    def send_ctrl(self, msg: Message, seq: int) -> None:
        """(head) the same frame to every worker, in order; returns when all sends completed.

        Point to point rather than a broadcast: a posted receive can be tested, cancelled and mixed with
        the Abort channel, where a pending MPI_Ibcast can do none of that (and a blocking Bcast spins).
        """
        frame = encode(msg, seq)
        reqs = [self.comm.Isend([frame, self._mpi_int64()], dest=r, tag=TAG_CTRL) for r in range(1, self.size)]
        for req in reqs:
            self.wait(req)

    def recv_ctrl(self, hot: bool = False) -> tuple[Message, int]:
        """(worker) the next control message and its sequence number (Abort raises Aborted).

        `hot`: the next step is likely due within a millisecond (a tensor-parallel worker between tokens,
        whose head starts computing as soon as it has sent the step): spin for CTRL_SPIN_S first, testing
        and calling sched_yield, as Group.wait does. A sleep-poll woke such a worker ~170 us late for every
        SmolLM2 --tp 2 token, a delay the head then waited for at its first all-reduce."""
        def arrived() -> bool:
            self._check_ctrl_for_abort()
            return bool(self._stash)
        if hot and not self._stash:
            spin(arrived, CTRL_SPIN_S)
        if not self._stash:
            self._poll_until(lambda: bool(self._stash), counted=False)   # idle: the head may wait for the user
        msg, seq = self._stash.pop(0)
        if isinstance(msg, Abort):
            raise Aborted(msg.rank)
        return msg, seq

    def _post_ctrl_recv(self) -> None:
        self._ctrl_req = self.comm.Irecv([self._frame, self._mpi_int64()], source=0, tag=TAG_CTRL)

    def _check_ctrl_for_abort(self) -> None:
        """Move an arrived control frame to the stash; raise Aborted as soon as an Abort is seen."""
        if self._ctrl_req is not None and self._ctrl_req.Test():
            msg, seq = decode(self._frame.copy())
            self._stash.append((msg, seq))
            self._ctrl_req = None
            if not isinstance(msg, Abort):
                self._post_ctrl_recv()       # after an Abort nothing else is coming
        for msg, _ in self._stash:
            if isinstance(msg, Abort):
                raise Aborted(msg.rank)

    # ---- failure reports (worker -> head) --------------------------------------------------------
    def report_failure(self, text: str) -> None:
        """(worker) tell the head, in one line, why this rank cannot go on. Best effort, bounded time."""
        payload = pickle.dumps((self.rank, text[:REPORT_BYTES - 200]))
        buf = np.zeros(REPORT_BYTES, dtype=np.uint8)
        buf[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        req = self.comm.Isend([buf, self._mpi().BYTE], dest=0, tag=TAG_REPORT)
        deadline = time.monotonic() + 5.0
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(0.001)

    def _post_report_recv(self) -> None:
        MPI = self._mpi()
        self._report_req = self.comm.Irecv([self._report_buf, MPI.BYTE], source=MPI.ANY_SOURCE, tag=TAG_REPORT)

    def _check_reports(self) -> None:
        if self._report_req is not None and self._report_req.Test():
            self._report_req = None
            rank, text = pickle.loads(self._report_buf.tobytes())
            raise PeerFailed(rank, text)
        notice = self._board.poll() if self._board is not None else None
        if notice is not None and 0 < notice[0] < self.size:
            raise self._mark_lost(PeerFailed(*notice))

    def _mark_lost(self, exc: PeerFailed) -> PeerFailed:
        """Note a rank that is gone or silent: nothing more is sent to it (over TCP, MPICH's UCX netmod
        crashes the sender of a message to a peer whose connection has closed)."""
        self.lost.add(exc.rank)
        return exc

    def poll_failure(self) -> None:
        """(head) raise PeerFailed if a worker has reported a failure or vanished, else return."""
        self._check_reports()
        self._check_liveness()

    # ---- activations -----------------------------------------------------------------------------
    def isend(self, arr: np.ndarray, dest: int) -> Any:
        """Start sending a contiguous float32 array; keep `arr` alive until the request is waited."""
        return self.comm.Isend([arr, self._mpi().FLOAT], dest=dest, tag=TAG_DATA)

    def irecv_into(self, buf: np.ndarray, source: int) -> Any:
        """Post a receive of a float32 array of exactly buf's shape (buf must be contiguous)."""
        return self.comm.Irecv([buf, self._mpi().FLOAT], source=source, tag=TAG_DATA)

    def cancel(self, reqs: list[Any]) -> None:
        """Cancel receives that will never complete (a step cut short by a failure)."""
        for req in reqs:
            if not req.Test():
                req.Cancel()
                req.Wait()

    # ---- load progress (worker -> head, never waited for by the head) ----------------------------
    def send_progress(self, done: int, total: int) -> None:
        """(worker) tell the head how far its load is; returns at once (finish_progress completes)."""
        msg = np.array([done, total], dtype=np.int64)
        self._progress.append((msg, self.comm.Isend([msg, self._mpi_int64()], dest=0, tag=TAG_PROGRESS)))

    def finish_progress(self) -> None:
        """(worker) complete the progress sends (they are small: already delivered or buffered)."""
        for _, req in self._progress:
            self.wait(req)
        self._progress.clear()

    def poll_progress(self) -> list[tuple[int, int, int]]:
        """(head) the progress messages that have arrived, as (rank, done, total); never blocks."""
        MPI, out = self._mpi(), []
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_PROGRESS, status=status):
            msg = np.empty(2, dtype=np.int64)
            self.comm.Recv([msg, self._mpi_int64()], source=status.Get_source(), tag=TAG_PROGRESS)
            out.append((status.Get_source(), int(msg[0]), int(msg[1])))
        return out

    # ---- small records (setup, stats) ------------------------------------------------------------
    def send_obj(self, obj: Any, dest: int) -> None:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        n = np.array([data.size], dtype=np.int64)
        MPI = self._mpi()
        r1 = self.comm.Isend([n, MPI.INT64_T], dest=dest, tag=TAG_OBJ_LEN)
        r2 = self.comm.Isend([data, MPI.BYTE], dest=dest, tag=TAG_OBJ)
        self.wait(r1)
        self.wait(r2)

    def recv_obj(self, source: int) -> Any:
        MPI = self._mpi()
        n = np.zeros(1, dtype=np.int64)
        self.wait(self.comm.Irecv([n, MPI.INT64_T], source=source, tag=TAG_OBJ_LEN))
        data = np.empty(int(n[0]), dtype=np.uint8)
        self.wait(self.comm.Irecv([data, MPI.BYTE], source=source, tag=TAG_OBJ))
        return pickle.loads(data.tobytes())

    def gather_obj(self, obj: Any) -> list[Any] | None:
        """(polling gather) the head gets [obj of rank 0, obj of rank 1, ...]; workers get None."""
        if self.rank != 0:
            self.send_obj(obj, 0)
            return None
        return [obj] + [self.recv_obj(r) for r in range(1, self.size)]

    def bcast_obj(self, obj: Any = None) -> Any:
        """(polling broadcast) the head's obj, on every rank."""
        if self.rank == 0:
            for r in range(1, self.size):
                self.send_obj(obj, r)
            return obj
        return self.recv_obj(0)

    # ---- shutdown --------------------------------------------------------------------------------
    def send_ctrl_nowait(self, msg: Message, seq: int, grace_s: float) -> None:
        """(head) send a frame to every worker without trusting anyone to answer: gives up after grace_s."""
        frame = encode(msg, seq)
        reqs = [self.comm.Isend([frame, self._mpi_int64()], dest=r, tag=TAG_CTRL) for r in range(1, self.size)
                if r not in self.lost]
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not all(req.Test() for req in reqs):
            time.sleep(0.001)

    def await_abort(self, timeout_s: float, what: str = "failed") -> None:
        """(worker, after reporting a failure) wait for the head's Abort or Shutdown; if neither comes,
        abort the job."""
        deadline = time.monotonic() + timeout_s

        def done() -> bool:
            return time.monotonic() > deadline or any(isinstance(m, Shutdown) for m, _ in self._stash)
        try:
            self._poll_until(done)
        except (Aborted, PeerFailed):
            return
        if not any(isinstance(m, Shutdown) for m, _ in self._stash):
            self.abort_job(1, f"rank {self.rank} ({self.host}) {what}; the head did not answer")

    def abort_job(self, code: int, text: str | None = None) -> None:
        """End the whole job now: MPI_Abort, after which the launcher kills every rank (the only exit
        that is clean and quick with hydra once a step was cut short). `text` is printed first as one
        line; MPICH's own "Abort(...)" line is silenced."""
        if text:
            print(f"llama-mpi: {text}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(OUTPUT_DRAIN_S)             # let the launcher forward what was printed before the kill
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        # MPI_Abort may never return (spawn mode over TCP: it waits on a stopped peer, holding the GIL) or
        # return at once (the launcher out of reach): either way this process ends, and its launcher
        # ends the rest
        _exit_after(ABORT_WAIT_S)
        self.comm.Abort(code)
        os._exit(code)

    def close(self, disconnect: bool = True) -> None:
        """Release pending receives; in spawn mode also disconnect (only when every rank is closing
        cleanly: Disconnect waits for the other side). MPI_Finalize runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        if self._board is not None:
            self._board.close()
        if self._beats is not None:
            self._beats.close()
        for req in (self._report_req, self._ctrl_req):
            if req is not None and not req.Test():
                req.Cancel()
                req.Wait()
        self._report_req = self._ctrl_req = None
        # Leave together: with hydra, a rank that exits while its peers are still busy gets the job
        # killed (the launcher's clean-up), so every rank waits here for the others, bounded.
        req = self.comm.Ibarrier()
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(0.002)
        if self._inter is not None and disconnect:
            self.comm.Free()
            self._inter.Disconnect()

    @staticmethod
    def _mpi() -> Any:
        return mpi()

    def _mpi_int64(self) -> Any:
        return self._mpi().INT64_T


def _exit_after(seconds: float) -> None:
    """End this process after `seconds` even if its main thread is then stuck in C code holding the GIL
    (no Python handler or thread could run): libc's _exit as the C handler of SIGALRM, so the status is
    SIGALRM's number, 14, and no shell prints "Alarm clock"; the signal's default action elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p)
        libc.signal(signal.SIGALRM, ctypes.cast(libc._exit, ctypes.c_void_p))
    except (OSError, AttributeError):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)


# ---- the three ways to get a communicator -------------------------------------------------------

def world() -> Transport:
    """Mode 1 (under mpiexec) and mode 3 (singleton): COMM_WORLD, head = rank 0."""
    return Transport(mpi().COMM_WORLD)


def spawn_workers(n_workers: int, args: list[str], hostfile: str | None = None) -> Transport:
    """Mode 2: this process (a singleton) spawns `python args...` n_workers times and merges: head = 0."""
    _put_launcher_on_path()
    MPI = mpi()
    info = MPI.Info.Create()
    if hostfile:
        info.Set("hostfile", hostfile)
    try:
        inter = MPI.COMM_SELF.Spawn(sys.executable, args=args, maxprocs=n_workers, info=info)
    except MPI.Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"spawn mode could not start {n_workers} worker(s): {first}") from None
    finally:
        info.Free()
    return Transport(inter.Merge(high=False), intercomm=inter)


def _put_launcher_on_path() -> None:
    """A singleton's Spawn makes MPICH exec `mpiexec` found on PATH. The mpich wheel puts its hydra
    `mpiexec` in the environment's scripts folder, which is not on PATH when a venv is used without
    being activated (`.venv/bin/llama-mpi --np 2`): put that folder first, so the launcher matches the
    MPI library mpi4py loaded. Without any mpiexec, say so instead of letting MPICH fail obscurely."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if os.path.isfile(os.path.join(folder, "mpiexec")):
            path = os.environ.get("PATH", "")
            if path.split(os.pathsep)[0] != folder:
                os.environ["PATH"] = folder + os.pathsep + path
            return
    if shutil.which("mpiexec") is None:
        raise PipelineError("spawn mode needs MPICH's mpiexec on PATH (pip install mpich), or run under "
                            "mpiexec -n N")


def join_parent() -> Transport | None:
    """A spawned worker joins its head's merged communicator; None when not spawned."""
    MPI = mpi()
    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        return None
    return Transport(parent.Merge(high=True), intercomm=parent)


# ---- tensor-parallel groups -----------------------------------------------------------------------

TAG_GROUP_DATA, TAG_GROUP_SUM = 21, 22   # on a group's own communicator
GROUP_SPIN_S = float(os.environ.get("LLAMA_MPI_GROUP_SPIN_S", "0.001"))   # see Group.wait
ALLREDUCE_ENV = "LLAMA_MPI_ALLREDUCE"     # "shm" (default), "mpi", "p2p" or "mpi-blocking": Group.allreduce_sum's way
ALLREDUCE_METHODS = ("shm", "p2p", "mpi", "mpi-blocking")
SHM_FLOATS = 1 << 18                      # floats a rank's slot of the shared window holds (1 MiB)


def allreduce_method() -> str:
    """The way LLAMA_MPI_ALLREDUCE asks for (unset: "shm"); a UsageError naming it otherwise."""
    method = os.environ.get(ALLREDUCE_ENV) or "shm"
    if method not in ALLREDUCE_METHODS:
        raise UsageError(f"{ALLREDUCE_ENV}={method}: expected one of {', '.join(ALLREDUCE_METHODS)}")
    return method


def split_group(t: Transport, color: int) -> Group:
    """(collective over t's communicator, every rank at the same point of start-up) the ranks of one
    colour, in world order, as a Group: one pipeline stage's tensor-parallel ranks."""
    comm = t.comm.Split(color, t.rank)
    method = allreduce_method()
    shm = SharedSum.create(comm, t.host) if method == "shm" else None       # collective over the group
    return Group(comm, t, "mpi" if method == "shm" and shm is None else method, shm)


class SharedSum:
    """The sum of a group's partials through one MPI shared-memory window, for a group whose ranks all run on
    one host: each rank copies its partial into its slot and raises its flag (the call's sequence number);
    once every flag has reached it, each rank adds the slots in group rank order (the same additions on
    every rank: bitwise the same sum). Two sets of slots, used in turn: a rank writes set s % 2 only after
    seeing every flag at s - 1, i.e. after every peer has finished reading set s % 2 in call s - 2.

    Window layout (bytes): one 64-byte line per rank holding its flag (int64), then slots [2][ranks][SHM_FLOATS]
    float32. MPI_Win_sync (a memory barrier) orders the slot writes before the flag, and the flag read before
    the slot reads. The window is never freed (freeing is collective; MPI_Finalize or the job's end does it).
    """

    LINE = 8                                     # int64 per flag: one cache line each

    def __init__(self, comm: Any, win: Any, mem: np.ndarray):
        self.win = win
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        n_flag = self.size * self.LINE
        self.flags = mem[:n_flag * 8].view(np.int64)                  # (size * LINE,)
        self.slots = mem[n_flag * 8:].view(np.float32).reshape(2, self.size, SHM_FLOATS)
        self.seq = 0
        self._others = [r * self.LINE for r in range(self.size) if r != self.rank]   # peers' flags
        self._views: dict[tuple[int, int], tuple] = {}                # (set, n) -> (own slot, all slots)

    @classmethod
    def create(cls, comm: Any, host: str) -> SharedSum | None:
        """(collective over comm) the window, or None on every rank unless all of them share one host."""
        MPI = mpi()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, comm.Get_rank())
        together = node.Get_size() == comm.Get_size() and len(set(comm.allgather(host))) == 1
        node.Free()
        if not comm.allreduce(int(together), op=MPI.MIN):
            return None
        size = comm.Get_size()
        n_bytes = size * cls.LINE * 8 + 2 * size * SHM_FLOATS * 4
        # MPICH fails on every rank of a group that mixes the head's world and its spawned workers' (spawn
        # mode's stage 0: "processes are not in the same shared memory domain"): that group uses MPI
        try:
            win = MPI.Win.Allocate_shared(n_bytes if comm.Get_rank() == 0 else 0, 1, comm=comm)
        except MPI.Exception:
            win = None
        if not comm.allreduce(int(win is not None), op=MPI.MIN):
            return None                         # (a window some rank did get is left to the job's end)
        buf, _ = win.Shared_query(0)
        mem = np.frombuffer(buf, dtype=np.uint8, count=n_bytes)
        win.Lock_all(MPI.MODE_NOCHECK)                                 # passive target: Sync is allowed
        if comm.Get_rank() == 0:
            mem[:size * cls.LINE * 8] = 0
        win.Sync()
        comm.Barrier()
        win.Sync()
        return cls(comm, win, mem)

    def fits(self, n: int) -> bool:
        return n <= SHM_FLOATS

    def post(self, x: np.ndarray) -> int:
        """Put this rank's partial (contiguous float32, fits) in its slot and raise its flag; the call's number."""
        self.seq += 1
        self._set(self.seq, x.size)[0][...] = x.reshape(-1)
        self.win.Sync()
        self.flags[self.rank * self.LINE] = self.seq
        return self.seq

    def _set(self, seq: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's slot and every rank's slot, (n,) and (size, n), in the set call `seq` uses."""
        key = (seq & 1, n)
        views = self._views.get(key)
        if views is None:
            parts = self.slots[seq & 1, :, :n]
            views = self._views[key] = (parts[self.rank], parts)
        return views

    def arrived(self, seq: int) -> bool:
        flags = self.flags
        for i in self._others:
            if flags[i] < seq:
                return False
        return True

    def total(self, seq: int, shape: tuple[int, ...]) -> np.ndarray:
        """(after arrived(seq)) every rank's slot added in rank order."""
        self.win.Sync()
        parts = self._set(seq, math.prod(shape))[1]
        total = parts[0] + parts[1]
        for r in range(2, self.size):
            total += parts[r]
        return total.reshape(shape)


class Group:
    """The ranks of one tensor-parallel group (one pipeline stage) on their own communicator: point to point
    messages, a sum of every rank's partial, and waits that watch for failures through the owning Transport.

    A wait first spins for GROUP_SPIN_S, testing and calling sched_yield in between (a peer on the same core
    gets it, so 4 ranks on 2 cores still progress), then sleep-polls as every other wait does: inside a step
    the peers arrive within micro- to milliseconds and a sleep would cost ~60 us per all-reduce (two per
    layer); a rank that waits longer (idle, or a slow stage before it) sleeps.
    """

    def __init__(self, comm: Any, owner: Transport, method: str = "mpi", shm: SharedSum | None = None):
        if method not in ALLREDUCE_METHODS or (method == "shm") != (shm is not None):
            raise ValueError(f"all-reduce method {method!r} with{'out' if shm is None else ''} a shared window")
        self.comm, self.owner, self.shm, self.method = comm, owner, shm, method
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.bytes_sent = 0                  # by allreduce_sum, for per-rank stats
        self._parts: np.ndarray | None = None

    def wait(self, req: Any) -> None:
        if not req.Test():
            self._spin_until(req.Test)

    def _spin_until(self, done: Callable[[], bool]) -> None:
        t0 = time.monotonic()
        arrived = spin(done, GROUP_SPIN_S)
        self.owner.wait_s += time.monotonic() - t0
        if not arrived:
            self.owner._poll_until(done)

    def isend(self, arr: np.ndarray, dest: int, tag: int = TAG_GROUP_DATA) -> Any:
        """Start sending a contiguous float32 array to group rank `dest` (keep it alive until waited)."""
        return self.comm.Isend([arr, mpi().FLOAT], dest=dest, tag=tag)

    def irecv_into(self, buf: np.ndarray, source: int, tag: int = TAG_GROUP_DATA) -> Any:
        """Post a receive of a float32 array of exactly buf's shape from group rank `source`."""
        return self.comm.Irecv([buf, mpi().FLOAT], source=source, tag=tag)

    def allreduce_sum(self, partial: np.ndarray) -> np.ndarray:
        """The group's sum of every rank's (T, n) float32 partial, bitwise the same on every rank.

        "shm" (the default when the group's ranks share one host and MPICH gives them a window): through its
        shared window (SharedSum: the partials added in group rank order), or MPI_Iallreduce for a partial larger
        than a slot; "mpi" (the default otherwise): MPI_Iallreduce in place (MPICH's result is the same on
        every rank, its order is MPICH's); "p2p": every rank sends its partial to every other one and adds
        them up in group rank order. All waited as `wait` does; `partial` may be overwritten.
        In a SmolLM2 --tp 2 decode on 2 cores, from the later rank's arrival to both leaving: 8-16 us through
        the window against 13-40 us for MPI_Iallreduce (the p10-p90 of 2 runs each, taken in turn); a
        back-to-back loop of them (core.tools.tp_bench) takes ~8 us a call either way.
        "mpi-blocking" (MPI_Allreduce: it busy-polls and watches for no failure) is there to be measured
        against (core.tools.tp_bench), not to be run."""
        x = np.ascontiguousarray(partial, dtype=np.float32)
        if self.size == 1:
            return x
        self.bytes_sent += x.nbytes * (self.size - 1)
        if self.method == "shm" and self.shm.fits(x.size):
            seq = self.shm.post(x)
            if not self.shm.arrived(seq):
                self._spin_until(lambda: self.shm.arrived(seq))
            return self.shm.total(seq, x.shape)
        if self.method != "p2p":
            MPI = mpi()
            if self.method == "mpi-blocking":
                self.comm.Allreduce(MPI.IN_PLACE, [x, MPI.FLOAT], op=MPI.SUM)
            else:
                self.wait(self.comm.Iallreduce(MPI.IN_PLACE, [x, MPI.FLOAT], op=MPI.SUM))
            return x
        if self._parts is None or self._parts.shape[1:] != x.shape:
            self._parts = np.empty((self.size, *x.shape), dtype=np.float32)
        others = [r for r in range(self.size) if r != self.rank]
        reqs = [self.irecv_into(self._parts[r], r, TAG_GROUP_SUM) for r in others]
        reqs += [self.isend(x, r, TAG_GROUP_SUM) for r in others]
        try:
            for req in reqs:
                self.wait(req)
        except BaseException:
            self.owner.cancel(reqs[:len(others)])
            raise
        terms = [x if r == self.rank else self._parts[r] for r in range(self.size)]
        total = terms[0] + terms[1]
        for term in terms[2:]:
            total += term
        return total
