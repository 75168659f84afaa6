"""Liveness: every rank process gives signs of life of its own over the network MPI uses, so that a rank
that is stopped (SIGSTOP, a frozen node) or cut off (link down) is named after --rank-timeout seconds of
silence instead of hanging the job, while a rank that is only slow (one long prefill step) is not.

Owns the beats. A daemon thread of each worker rank sends the UDP datagram "KEY RANK r" to the head's
host name (as MPI's launcher resolves it) every beat interval; a thread of the head answers each with
"KEY 0 h" (the head's own sign of life) and notes when it last heard each rank. A worker's supervisor
(core/supervisor.py, another process on the rank's host) sends "KEY RANK s": never counted as the rank's
life, it tells a stopped process (its host still answers) from a lost network (nothing answers).
Threads, not the main thread: numpy releases the GIL in its long loops, so a rank busy for minutes on one
step still beats (measured: a thread waking every 100 ms ran at most 118 ms apart while the main thread
ran 512 tokens through 11 TinyLlama-shaped Q4_0 layers, 20 s on one core), and a stopped process stops
all of its threads. A process that was itself stopped blames nobody for that time. Must not import mpi4py
or block the caller.
"""
from __future__ import annotations

import secrets
import socket
import threading
import time

from .procfs import process_state

DEFAULT_RANK_TIMEOUT_S = 10.0   # --rank-timeout; 0 = wait forever
MAX_BEAT_S = 1.0                # beats come at least this often ...
BEATS_PER_TIMEOUT = 5           # ... and at least this many per timeout
DATAGRAM_MAX = 128
RANK, HEAD, HOST = "r", "h", "s"   # kinds of beat: a worker rank, the head's answer, a worker's supervisor


def beat_interval(timeout_s: float) -> float:
    return min(MAX_BEAT_S, max(0.05, timeout_s / BEATS_PER_TIMEOUT))


def _stall_s(interval: float) -> float:
    """A beat thread that wakes this much later than it should was stopped or starved itself."""
    return 2 * interval + 0.5


def _parse(data: bytes, key: str) -> tuple[int, str] | None:
    """b"KEY 3 r" -> (3, "r"); None for anything else (another job's key included)."""
    words = data.decode("ascii", errors="replace").split()
    if len(words) != 3 or words[0] != key or not words[1].isdigit() or words[2] not in (RANK, HEAD, HOST):
        return None
    return int(words[1]), words[2]


def split_address(address: str) -> tuple[str, int, str, float]:
    """"HOST:PORT/KEY/TIMEOUT" -> (host, port, key, timeout_s)."""
    where, key, timeout = address.split("/")
    host, _, port = where.rpartition(":")
    return host, int(port), key, float(timeout)


class _Beater:
    """A daemon thread with one UDP socket; `_ran` is when it last ran (to tell its own stops)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stall = _stall_s(interval)
        self._ran = time.monotonic()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llama-mpi-liveness", daemon=True)

    def _woke(self) -> bool:
        """Note that the thread runs; True when it had not run for longer than it may (this process was
        stopped or starved, so whatever it did not hear meanwhile proves nothing)."""
        now = time.monotonic()
        stalled = now - self._ran > self._stall
        self._ran = now
        return stalled

    def _current(self, now: float) -> bool:
        """The beat thread has run recently enough for its records to be judged."""
        return now - self._ran <= self._stall

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class HeadBeats(_Beater):
    """(head) Hears every worker's beats, answers each, and names a worker silent for longer than the
    timeout. `address` ("HOST:PORT/KEY/TIMEOUT") is what the workers need to beat."""

    def __init__(self, timeout_s: float):
        super().__init__(beat_interval(timeout_s))
        self.timeout_s = timeout_s
        if socket.has_dualstack_ipv6():                   # the head's name may resolve to IPv6 or IPv4
            self._sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("", 0))
        self._sock.settimeout(self.interval)
        self._key = secrets.token_hex(8)
        self.address = f"{socket.gethostname()}:{self._sock.getsockname()[1]}/{self._key}/{timeout_s:g}"
        self._heard: dict[int, float] = {}               # worker rank -> when its last beat came
        self._host_heard: dict[int, float] = {}          # worker rank -> when its supervisor's last came
        self._local: dict[int, int] = {}                 # worker rank on this host -> its pid
        self._thread.start()

    def expect(self, ranks: list[tuple[int, str, int]], host: str) -> None:
        """The job's workers as (rank, host, pid); each is heard from now on (called once every rank knows
        the address)."""
        now = time.monotonic()
        for rank, rank_host, pid in ranks:
            self._heard[rank] = now
            if rank_host == host:
                self._local[rank] = pid

    def silent(self) -> tuple[int, str] | None:
        """The first worker that has not beaten for longer than the timeout, and what is known about it."""
        now = time.monotonic()
        if not self._current(now):
            return None
        for rank, heard in sorted(self._heard.items()):
            if now - heard > self.timeout_s:
                return rank, self._what(rank, now)
        return None

    def _what(self, rank: int, now: float) -> str:
        said = f"has not answered for {self.timeout_s:g} s"
        if rank in self._local:                          # same host: the process table says more
            if process_state(self._local[rank]) in ("T", "t"):
                return f"{said}: the process is stopped"
            return f"{said}: the process is stopped or stuck"
        host = self._host_heard.get(rank)
        # the host answers if its supervisor beat just now: when the link went down, its last beat is
        # at most one interval younger than the rank's, so nearly as old as the timeout
        if host is not None and now - host <= min(self._stall, self.timeout_s / 2):
            return f"{said}: the process is stopped or stuck (its host still answers)"
        if host is not None:
            return f"{said}, nor has its host: the network to it or the host is down"
        return f"{said}: the process is stopped or its network is down"

    def _run(self) -> None:
        answer = f"{self._key} 0 {HEAD}".encode()
        while not self._closed:
            try:
                data, sender = self._sock.recvfrom(DATAGRAM_MAX)
            except socket.timeout:
                data = b""
            except OSError:
                if self._closed:
                    return
                data = b""
                time.sleep(self.interval)
            if self._woke():
                now = time.monotonic()
                for heard in (self._heard, self._host_heard):
                    for rank in heard:
                        heard[rank] = now
            beat = _parse(data, self._key) if data else None
            if beat is None or beat[0] not in self._heard:
                continue
            rank, kind = beat
            if kind == RANK:
                self._heard[rank] = time.monotonic()
                try:
                    self._sock.sendto(answer, sender)
                except OSError:
                    pass
            elif kind == HOST:
                self._host_heard[rank] = time.monotonic()


class RankBeats(_Beater):
    """(a worker rank, kind "r"; or its supervisor, kind "s") Beats to the head at `address`; a rank also
    hears the head's answers and names the head once it has been silent for longer than the timeout."""

    def __init__(self, address: str, rank: int, kind: str = RANK):
        host, port, key, timeout_s = split_address(address)
        super().__init__(beat_interval(timeout_s))
        self.timeout_s, self.kind = timeout_s, kind
        self._head = (host, port)
        self._to: tuple | None = None                     # the head's resolved address
        self._beat = f"{key} {rank} {kind}".encode()
        self._key = key
        self._sock = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
        self._heard = time.monotonic()                   # the head's last answer
        self._thread.start()

    def silent(self) -> tuple[int, str] | None:
        """(0, what) once the head has not answered for longer than the timeout, else None."""
        now = time.monotonic()
        if self.kind != RANK or not self._current(now) or now - self._heard <= self.timeout_s:
            return None
        return 0, f"has not answered for {self.timeout_s:g} s: the process is stopped or its network is down"

    def _send(self) -> None:
        try:
            if self._to is None:                         # resolved here, retried at every beat until it works
                family, _, _, _, sockaddr = socket.getaddrinfo(*self._head, type=socket.SOCK_DGRAM)[0]
                if family != self._sock.family:
                    self._sock.close()
                    self._sock = socket.socket(family, socket.SOCK_DGRAM)
                self._to = sockaddr
            self._sock.sendto(self._beat, self._to)
        except OSError:                                  # no route (link down), no name yet: try again later
            pass

    def _run(self) -> None:
        next_beat = 0.0
        while not self._closed:
            if self._woke():
                self._heard = time.monotonic()
            now = time.monotonic()
            if now >= next_beat:
                self._send()
                next_beat = now + self.interval
            try:
                self._sock.settimeout(max(0.01, next_beat - time.monotonic()))
                data, _ = self._sock.recvfrom(DATAGRAM_MAX)
            except socket.timeout:
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(self.interval)
                continue
            if _parse(data, self._key) == (0, HEAD):
                self._heard = time.monotonic()
