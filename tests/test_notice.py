"""core/notice.py: a supervisor's death notice reaches the head's board; anything else is ignored."""
from __future__ import annotations

import socket
import time

import pytest

from core.notice import NoticeBoard, notice_host, parse_notice, send_notice
from mpi_helpers import first_within


def poll_until(board: NoticeBoard, timeout: float = 3.0):
    return first_within(board.poll, timeout, step=0.01)


def test_parse_notice():
    assert parse_notice(b"k3y 3 the process is gone (killed by signal 9)\n", "k3y") == (
        3, "the process is gone (killed by signal 9)")
    assert parse_notice(b"k3y 12   spaced\t out \n", "k3y") == (12, "spaced out")
    for bad in (b"", b"\n", b"k3y x gone\n", b"k3y -1 gone\n", b"k3y 3\n", b"k3y 3 \n", b"3 gone\n",
                b"other 3 gone\n", b"GET / HTTP/1.1\r\n"):
        assert parse_notice(bad, "k3y") is None


def test_a_notice_is_delivered_and_polling_never_blocks():
    board = NoticeBoard()
    try:
        t0 = time.monotonic()
        assert board.poll() is None and time.monotonic() - t0 < 0.1      # nothing there: returns at once
        where, _, key = board.address.partition("/")
        port = where.rpartition(":")[2]
        assert notice_host(board.address) == socket.gethostname() and len(key) == 16
        local = f"127.0.0.1:{port}/{key}"
        assert send_notice(local, 2, "the process is gone (exited with status 1)")
        assert poll_until(board) == (2, "the process is gone (exited with status 1)")
        assert send_notice(f"127.0.0.1:{port}/wrongkey", 1, "gone")         # delivered, but not believed
        with socket.create_connection(("127.0.0.1", int(port))) as junk:  # not a notice at all
            junk.sendall(b"hello\n")
        time.sleep(0.1)
        assert board.poll() is None and board.poll() is None
    finally:
        board.close()
    assert board.poll() is None


def test_sending_to_nobody_fails_quietly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                          # bound, not listening
    assert send_notice(f"127.0.0.1:{port}/k", 1, "gone", timeout_s=0.5) is False
    assert send_notice("no-port-here", 1, "gone") is False


def test_a_notice_arrives_over_ipv6_too():
    if not socket.has_dualstack_ipv6():
        pytest.skip("this system has no dual-stack sockets")
    board = NoticeBoard()
    try:
        where, _, key = board.address.partition("/")
        port = where.rpartition(":")[2]
        if not send_notice(f"::1:{port}/{key}", 1, "gone over IPv6"):
            pytest.skip("no IPv6 loopback here")
        assert poll_until(board) == (1, "gone over IPv6")
    finally:
        board.close()
