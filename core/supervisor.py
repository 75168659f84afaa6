"""Supervisor: the parent process each worker rank runs under, so that a rank that dies is named by the head
instead of being reaped, with everything else, by the launcher.

Owns the fork into supervisor and rank, the pipe on which the rank tells its supervisor the head's notice
address, and what the supervisor does when its rank dies (a notice to the head when the rank ran on
another host, core/notice.py; else the head sees the pid go by itself). Must not import mpi4py: it forks
before MPI starts.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time

from .notice import notice_host, send_notice

SUPERVISE_GRACE_S = 3.0      # a worker's supervisor waits this long for the head to report a death


class Supervised:
    """(the rank) the pipe to its supervisor: `tell` passes the head's notice address, once."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def tell(self, head_notice: str | None) -> None:
        if self._fd is None:
            return
        try:
            if head_notice:
                os.write(self._fd, head_notice.encode() + b"\n")
        finally:
            os.close(self._fd)
            self._fd = None


def supervise(rank: int | None) -> Supervised:
    """Split a worker into a supervisor (the process the launcher started) and the MPI rank (its child,
    which returns from here). With hydra, a rank that dies makes the launcher SIGKILL the whole job at
    once, before the head can say which rank it was. Here the launcher's process stays alive and the head
    names the lost rank in one line and aborts the job (which ends this supervisor too). If nothing
    happens within SUPERVISE_GRACE_S (the head is gone or unreachable), the supervisor names the rank
    itself and dies by SIGKILL: the launcher ends the whole job when a rank dies by a signal, while a
    plain non-zero exit would leave the head waiting for that rank forever."""
    read_fd, write_fd = os.pipe()                          # the rank tells us where the head listens
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _die_with_parent()
        return Supervised(write_fd)
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


def _die_with_parent() -> None:
    """Linux: the MPI rank gets SIGKILL if its supervisor goes (no orphan ever outlives it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)                     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
