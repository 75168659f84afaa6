"""Supervisor: the parent process each worker rank runs under, so that a rank that dies is named by the head
instead of being reaped, with everything else, by the launcher.

Owns the fork into supervisor and rank, the socket on which the rank tells its supervisor the head's
notice and beat addresses and hands it its TCP connections, and what the supervisor does: beat to the head
as the rank's host (core/liveness.py: never the rank's own sign of life, it tells a stopped rank from a
lost network); hold the rank's connections open, so that a rank killed on another host looks to its peers'
MPI like a silent one, not a closed connection (MPICH's UCX netmod crashes a process that sends to a peer
whose TCP connection has closed: the head would die before it could name the rank); and when its rank
dies, send a notice to the head if the rank ran on another host (core/notice.py; else the head sees the
pid go by itself). Must not import mpi4py: it forks before MPI starts.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from .liveness import HOST, RankBeats
from .notice import notice_host, send_notice

SUPERVISE_GRACE_S = 3.0      # a worker's supervisor waits this long for the head to report a death


class Supervised:
    """(the rank) the socket to its supervisor. `tell`, once MPI is up: the head's notice and beat
    addresses, and this process's TCP connections (MPI's, all made by then) for the supervisor to hold."""

    def __init__(self, sock: socket.socket):
        self._sock = sock                                 # open for the rank's life: its end is the rank's death

    def tell(self, head_notice: str | None, head_beats: str | None = None) -> None:
        try:
            lines = f"{head_notice or ''}\n{head_beats or ''}\n".encode()
            fds = tcp_connections()
            if fds:
                socket.send_fds(self._sock, [lines], fds)
            else:
                self._sock.sendall(lines)
        except OSError:                                   # the supervisor is gone: PR_SET_PDEATHSIG ends us
            pass


def tcp_connections() -> list[int]:
    """This process's established TCP connections, as descriptors (Linux /proc; [] elsewhere)."""
    established = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{table}") as f:
                rows = [line.split() for line in f.read().splitlines()[1:]]
        except OSError:
            continue
        established |= {row[9] for row in rows if len(row) > 9 and row[3] == "01"}   # 01: ESTABLISHED
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in established:
            fds.append(int(name))
    return fds


class _Told:
    """(the supervisor) reads what the rank tells, in a thread: beats to the head as soon as it knows
    where, and keeps the rank's connections open until this process ends."""

    def __init__(self, sock: socket.socket, rank: int | None):
        self.notice = ""
        self._sock, self._rank = sock, rank
        self._held: list[int] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        data = b""
        while data.count(b"\n") < 2:
            try:
                chunk, fds, _, _ = socket.recv_fds(self._sock, 4096, 1024)
            except OSError:
                break
            self._held += fds
            if not chunk:                                  # the rank died before it said
                break
            data += chunk
        lines = data.decode(errors="replace").split("\n")
        self.notice = lines[0].strip()
        beats = lines[1].strip() if len(lines) > 1 else ""
        if beats and self._rank is not None:
            RankBeats(beats, self._rank, HOST)            # runs until this process ends

    def head(self) -> str:
        """The head's notice address ("" if the rank died before it said)."""
        self._thread.join(timeout=1.0)
        return self.notice


def supervise(rank: int | None) -> Supervised:
    """Split a worker into a supervisor (the process the launcher started) and the MPI rank (its child,
    which returns from here). With hydra, a rank that dies makes the launcher SIGKILL the whole job at
    once, before the head can say which rank it was. Here the launcher's process stays alive and the head
    names the lost rank in one line and aborts the job (which ends this supervisor too). If nothing
    happens within SUPERVISE_GRACE_S (the head is gone or unreachable), the supervisor names the rank
    itself and dies by SIGKILL: the launcher ends the whole job when a rank dies by a signal, while a
    plain non-zero exit would leave the head waiting for that rank forever."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)   # the rank tells us (Supervised)
    pid = os.fork()
    if pid == 0:
        ours.close()
        _die_with_parent()
        return Supervised(theirs)
    theirs.close()
    told = _Told(ours, rank)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(pid, signal.SIGTERM))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
        head = told.head()
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


def _die_with_parent() -> None:
    """Linux: the MPI rank gets SIGKILL if its supervisor goes (no orphan ever outlives it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)                     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
