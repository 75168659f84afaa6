"""Death notices: a worker's supervisor (core/supervisor.py) tells the head, over one short TCP connection,
that its rank died, so that a rank lost on another host (whose pid the head cannot watch) is named at once.

Owns the head's listening socket (NoticeBoard, polled without blocking) and the wire form of a notice, one
UTF-8 line "KEY RANK TEXT\\n" sent to "HOST:PORT/KEY" (the head's host name as MPI's launcher uses it; a
random key only the job's ranks learn). Must not import mpi4py, know about layers or models, or block.
"""
from __future__ import annotations

import secrets
import socket

NOTICE_MAX = 512               # bytes of one notice (a rank number and a short text)
READ_TIMEOUT_S = 1.0           # a connected supervisor has this long to deliver its line


class NoticeBoard:
    """(head) A listening TCP socket on every interface (IPv6 and IPv4 where the system can), port
    chosen by the system."""

    def __init__(self) -> None:
        if socket.has_dualstack_ipv6():                   # the head's name may resolve to IPv6 or IPv4
            self._sock = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=16)
        else:
            self._sock = socket.create_server(("", 0), family=socket.AF_INET, backlog=16)
        self._sock.setblocking(False)
        self._key = secrets.token_hex(8)
        self.address = f"{socket.gethostname()}:{self._sock.getsockname()[1]}/{self._key}"

    def poll(self) -> tuple[int, str] | None:
        """A notice that has arrived, as (rank, text), or None at once. Malformed connections are dropped."""
        if self._sock is None:
            return None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        with conn:
            conn.settimeout(READ_TIMEOUT_S)
            data = b""
            try:
                while b"\n" not in data and len(data) < NOTICE_MAX:
                    chunk = conn.recv(NOTICE_MAX - len(data))
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                return None
        return parse_notice(data, self._key)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse_notice(data: bytes, key: str) -> tuple[int, str] | None:
    """b"KEY 3 text\\n" -> (3, "text"); None for anything else (another key included)."""
    words = data.decode("utf-8", errors="replace").partition("\n")[0].split()
    if len(words) < 3 or words[0] != key or not words[1].isdigit():
        return None
    return int(words[1]), " ".join(words[2:])


def notice_host(address: str) -> str:
    """The head's host name in a notice address "HOST:PORT/KEY"."""
    return address.partition("/")[0].rpartition(":")[0]


def send_notice(address: str, rank: int, text: str, timeout_s: float = 2.0) -> bool:
    """(supervisor) Deliver one notice to the board at "HOST:PORT/KEY"; False if it could not be delivered."""
    where, _, key = address.partition("/")
    host, _, port = where.rpartition(":")
    line = f"{key} {rank} {' '.join(text.split())}\n".encode()[:NOTICE_MAX]
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            conn.sendall(line)
        return True
    except (OSError, ValueError):
        return False
