"""A worker that dies while the head waits for the user's input: the head notices without any input.

Without a typed line nothing would reach the pipeline, and the only voice left would be the dead rank's
supervisor (after core/supervisor.py's SUPERVISE_GRACE_S, in its own words, without the layers). What must
happen instead (issue 4): the head prints its one line naming rank, host and layers within about a
second, every process of the job is gone within 10 s, and the status is not 0. Both input modes: the
prompt_toolkit prompt on a terminal (spawn mode) and plain lines from a pipe nobody writes (mpiexec).

Also here, the other gap before the chat owns the terminal: Ctrl-C while spawn mode starts and loads.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import termios
import threading
import time

import pytest

pexpect = pytest.importorskip("pexpect")

from test_cli_support import (REPO, StderrLines, assert_no_rank_left, chat_cmd, mpiexec_or_skip,  # noqa: E402
                              tagged_env, tagged_pids)
from test_pty import finish, spawn, wait_for_prompt  # noqa: E402
from mpi_helpers import environ  # noqa: E402

from core.procfs import stat_fields  # noqa: E402
from core.supervisor import SUPERVISE_GRACE_S  # noqa: E402

from chat.render import Renderer  # noqa: E402
from chat.repl import WATCH_EVERY_S, PlainReader, TerminalReader  # noqa: E402

HOST = socket.gethostname()
# stories260K has 5 layers; 2 ranks split them equally by largest remainder: rank 0 gets 0-2, rank 1 3-4
LOST_RANK_1 = f"error: rank 1 ({HOST}, layers 3-4) failed: the process is gone (killed or crashed)"
NOTICE_S = SUPERVISE_GRACE_S   # the head polls every 0.25 s; after this the dead rank's supervisor speaks


class PeerGone(Exception):
    pass


class WatchedSession:
    """The hooks a reader calls; peer_watch fails at its `fail_at`-th call (as a cluster's poll would
    once a worker died), and records the thread it ran on (MPI calls must stay on the main thread)."""

    def __init__(self, fail_at: int):
        self.calls, self.fail_at, self.threads = 0, fail_at, set()

    def peer_watch(self) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread())
        if self.calls >= self.fail_at:
            raise PeerGone("rank 1 is gone")

    def refresh_rank_ms(self) -> None:
        pass

    def toolbar(self) -> str:
        return "ctx 0/64"


class Deadline:
    """Fail instead of hanging when a read never returns (SIGALRM; the tests run on the main thread)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        def expired(signum, frame):
            raise TimeoutError(f"still waiting after {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


def test_plain_reader_serves_buffered_lines_first_then_watches_while_it_waits():
    """Two lines in one chunk: the second is served without a wait (no line hides in a buffer while we
    sleep on the descriptor); with nothing to read the watch runs every WATCH_EVERY_S and its error
    ends the wait; a line cut across writes is still one line."""
    r_fd, w_fd = os.pipe()
    with os.fdopen(r_fd, "r") as stream:
        reader = PlainReader(stream, Renderer(color=False, out=io.StringIO(), err=io.StringIO()),
                             multiline=False, echo=False)
        session = WatchedSession(fail_at=3)
        os.write(w_fd, "one\ntwo\\\nthr\u00e9e\n".encode())
        with Deadline(5):
            assert reader.read_turn(session, False) == "one\n"
            assert reader.read_turn(session, False) == "two\nthr\u00e9e\n"
            assert session.calls == 0
            t0 = time.monotonic()
            with pytest.raises(PeerGone):
                reader.read_turn(session, False)
        assert session.calls == 3 and 2 * WATCH_EVERY_S <= time.monotonic() - t0 < 10 * WATCH_EVERY_S
        assert session.threads == {threading.main_thread()}
        os.write(w_fd, b"half ")
        threading.Timer(0.3, lambda: (os.write(w_fd, b"a line\nrest"), os.close(w_fd))).start()
        session = WatchedSession(fail_at=100)
        with Deadline(5):
            assert reader.read_turn(session, False) == "half a line\n"
            assert reader.read_turn(session, False) == "rest\n"           # end of input ends the turn
            assert reader.read_turn(session, False) is None


def test_prompt_toolkit_prompt_is_left_when_the_watch_fails(monkeypatch, tmp_path):
    """Nobody types: the watch (run by the prompt's event loop on the main thread) fails, and
    read_turn raises that error instead of waiting on."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))         # the prompt's history file
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        reader = TerminalReader(Renderer(color=False, out=io.StringIO(), err=io.StringIO()), multiline=False)
        session = WatchedSession(fail_at=2)
        inp.send_text("half typed")
        t0 = time.monotonic()
        with Deadline(5), pytest.raises(PeerGone):
            reader.read_turn(session, False)
        assert session.calls == 2 and time.monotonic() - t0 < 8 * WATCH_EVERY_S
        assert session.threads == {threading.main_thread()}
        session = WatchedSession(fail_at=100)
        inp.send_text("a line\r")                       # the next prompt works as before
        with Deadline(5):
            assert reader.read_turn(session, False) == "a line\n"


def worker_rank_pid(tag: str, timeout: float = 20) -> int:
    """The MPI process of the worker rank (not its supervisor, which is its parent and looks the same:
    the rank is the tagged python process whose parent is a tagged python process of the same rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = {}
        for pid in tagged_pids(tag):
            try:
                fields = stat_fields(pid)
                state, ppid = fields[0], int(fields[1])
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                env = environ(pid)
            except (OSError, ValueError, IndexError):
                continue
            worker = b"--llama-mpi-worker" in cmd or env.get("PMI_RANK", "0") != "0"
            if state != "Z" and b"python" in cmd and worker:
                info[pid] = ppid
        inner = [pid for pid, ppid in info.items() if ppid in info]
        if len(inner) == 1:
            return inner[0]
        time.sleep(0.05)
    pytest.fail("the worker rank never showed up")


def test_spawn_prompt_notices_a_killed_worker_without_input(tmp_path, fixtures):
    """prompt_toolkit is up, nobody types: the killed worker is named by the head, the job ends."""
    model = _stories(fixtures)
    env, tag = tagged_env(tmp_path)
    child = spawn(["-m", model, "--np", "2", "--interactive-first", "-p", "Once", "-c", "64"], env)
    try:
        wait_for_prompt(child, timeout=30)
        victim = worker_rank_pid(tag)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        child.expect_exact(LOST_RANK_1, timeout=NOTICE_S)
        assert time.monotonic() - t_kill < NOTICE_S
        status = finish(child, timeout=10)
        assert status is not None and status != 0
        assert "was killed by signal" not in child.before         # the head spoke, not the supervisor
        assert_no_rank_left(tag, grace_s=10)
    finally:
        _stop_child(child, tag)


def test_mpiexec_plain_reader_notices_a_killed_worker_without_input(tmp_path, fixtures):
    """Under mpiexec the head reads plain lines from hydra's pipe; stdin stays open and silent."""
    model = _stories(fixtures)
    env, tag = tagged_env(tmp_path)
    cmd = [mpiexec_or_skip(), "-n", "2", *chat_cmd("-m", model, "--interactive-first", "-p", "Once", "-c", "64")]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=REPO, text=True, errors="replace", start_new_session=True)
    lines = StderrLines(proc)
    seen = lines.seen

    def read_until(needle: str, timeout: float) -> bool:
        return lines.until(lambda line: needle in line, timeout) is not None

    try:
        assert read_until("Ctrl-D quits", 30), seen           # the preamble: the chat is about to read
        time.sleep(1.0)                                        # the one-token prompt is evaluated by now
        victim = worker_rank_pid(tag)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        assert read_until(LOST_RANK_1, NOTICE_S), seen[-5:]
        assert time.monotonic() - t_kill < NOTICE_S
        assert proc.wait(timeout=10) != 0
        read_until("\0", 0.5)                                  # whatever else was printed
        assert [line for line in seen if line.startswith("error:")] == [LOST_RANK_1]
        assert not any("was killed by signal" in line for line in seen)
        assert_no_rank_left(tag, grace_s=10)
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        for pid in tagged_pids(tag):
            _kill_quietly(pid)


def test_spawn_ctrl_c_while_starting_is_one_line_and_130(tmp_path, fixtures):
    """Ctrl-C typed while spawn mode starts (workers spawning, the model loading) used to reach MPICH's
    process manager, which SIGKILLed every rank without a word. Now the key is read as a byte, held until
    every rank has joined, and the head leaves with one line and status 130, no rank left behind."""
    model = _stories(fixtures)
    env, tag = tagged_env(tmp_path)
    child = spawn(["-m", model, "--np", "2", "--interactive-first", "-p", "Once", "-c", "64"], env)
    try:
        deadline = time.monotonic() + 20
        while termios.tcgetattr(child.child_fd)[3] & termios.ISIG:     # the head took Ctrl-C over
            assert time.monotonic() < deadline and child.isalive(), "the terminal kept sending signals"
            time.sleep(0.01)
        child.send("\x03")
        child.expect_exact("interrupted before the chat started", timeout=20)
        screen = child.before
        assert finish(child, timeout=10) == 130
        assert "plan: spawn, 2 ranks" in screen                        # the cluster was up, then stopped
        assert "Sending Ctrl-C" not in screen + child.before
        assert_no_rank_left(tag, grace_s=10)
    finally:
        _stop_child(child, tag)


def _stories(fixtures) -> str:
    path = fixtures / "models" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip(f"fixture model {path} not found")
    return str(path)


def _stop_child(child, tag: str) -> None:
    """After a pty test: the chat and every rank it started are gone, whatever happened."""
    if child.isalive():
        child.terminate(force=True)
    for pid in tagged_pids(tag):
        _kill_quietly(pid)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
