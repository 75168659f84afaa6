"""A rank that stops answering is named, never a silent hang (issue 12), on one machine: the beats of
core/liveness.py between processes, then whole jobs under mpiexec and in spawn mode, with and without
--tp, where a rank is stopped with SIGSTOP. Over a real network link: tests/test_netns.py.

Each failure: one line naming rank, host and layers within --rank-timeout + 5 s, a non-zero status, and no
process of the job left. A rank that is only slow (one step longer than the timeout) is not silent.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mpi_driver import generate
from mpi_helpers import PROMPT, REPO, driver_cmd, first_within, load, model, rank_pid
from test_cli_support import StderrLines, assert_no_rank_left, chat_cmd, kill_job, mpiexec_or_skip, tagged_env
from test_idle_failure import worker_rank_pid

from chat.launch import cluster_settings
from chat.options import parse_options
from core.cluster import ClusterSettings, start
from core.errors import UsageError
from core.liveness import DEFAULT_RANK_TIMEOUT_S, HOST, HeadBeats, RankBeats
from core.procfs import process_state

HERE = socket.gethostname()
T = 3.0                          # --rank-timeout of the job tests
STOPPED = "has not answered for 3 s: the process is stopped"


# ---- the option -------------------------------------------------------------------------------------

def test_rank_timeout_option_reaches_the_cluster_settings():
    assert parse_options([]).rank_timeout == DEFAULT_RANK_TIMEOUT_S == 10.0
    assert cluster_settings(parse_options(["-m", "x", "--rank-timeout", "2.5"])).rank_timeout == 2.5
    assert cluster_settings(parse_options(["-m", "x", "--rank_timeout", "0"])).rank_timeout == 0.0
    with pytest.raises(UsageError, match="--rank-timeout -1 is out of range: must be >= 0.0"):
        parse_options(["--rank-timeout", "-1"])


# ---- the beats, between processes ----------------------------------------------------------------

BEATING_RANK = """
import sys, time
sys.path.insert(0, {repo!r})
from core.liveness import RankBeats
beats = RankBeats({address!r}, 1)
print("beating", flush=True)
{work}
"""


def _rank_process(address: str, work: str = "time.sleep(60)") -> subprocess.Popen:
    """A process of its own that beats to `address` as rank 1, then runs `work` on its main thread."""
    code = BEATING_RANK.format(repo=str(REPO), address=address, work=work)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "beating"
    return proc


def _silent_within(beats, seconds: float):
    """What `beats.silent()` says within `seconds` (None if it never names anyone)."""
    return first_within(beats.silent, seconds)


def test_a_stopped_rank_process_is_named_and_heard_again_once_continued():
    head = HeadBeats(0.5)
    proc = _rank_process(head.address)
    try:
        head.expect([(1, HERE, proc.pid)], HERE)
        assert _silent_within(head, 1.5) is None                  # it beats
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert _silent_within(head, 2.0) == (1, "has not answered for 0.5 s: the process is stopped")
        assert 0.3 < time.monotonic() - t0 < 1.0
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
        assert _silent_within(head, 1.0) is None
    finally:
        proc.kill()
        head.close()


def test_a_rank_busy_in_numpy_for_longer_than_the_timeout_still_beats():
    """The rank's main thread multiplies matrices for 3 s (six times the timeout): its beat thread runs."""
    head = HeadBeats(0.5)
    work = ("import numpy as np\na = np.full((512, 512), 1 / 512, dtype=np.float32)\nt = time.monotonic()\n"
            "while time.monotonic() - t < 3: a = a @ a\nprint('done', flush=True)")
    proc = _rank_process(head.address, work)
    try:
        head.expect([(1, HERE, proc.pid)], HERE)
        assert _silent_within(head, 3.0) is None
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        head.close()


def test_the_head_answers_and_a_rank_names_a_silent_head():
    head = HeadBeats(0.5)
    rank = RankBeats(head.address, 1)
    try:
        head.expect([(1, HERE, os.getpid())], HERE)
        assert _silent_within(rank, 1.5) is None
        head.close()                                               # the head stops answering
        assert _silent_within(rank, 2.0) == (
            0, "has not answered for 0.5 s: the process is stopped or its network is down")
    finally:
        rank.close()
        head.close()


def test_a_remote_rank_is_told_from_its_host_by_the_supervisor_beats():
    """Rank 1 on another host: while its supervisor still beats, its host answers (the process is
    stopped); once that stops too, the host or the network is down."""
    head = HeadBeats(0.5)
    rank, host = RankBeats(head.address, 1), RankBeats(head.address, 1, HOST)
    try:
        head.expect([(1, "elsewhere", 1)], HERE)
        assert _silent_within(head, 1.5) is None
        rank.close()
        assert _silent_within(head, 2.0) == (
            1, "has not answered for 0.5 s: the process is stopped or stuck (its host still answers)")
        host.close()
        time.sleep(0.8)
        assert head.silent() == (1, "has not answered for 0.5 s, nor has its host: the network to it or the "
                                    "host is down")
    finally:
        rank.close()
        host.close()
        head.close()


def test_beats_of_another_job_do_not_count():
    head = HeadBeats(0.5)
    stranger = RankBeats(head.address.replace(head.address.split("/")[1], "0" * 16), 1)
    try:
        head.expect([(1, HERE, os.getpid())], HERE)
        assert _silent_within(head, 2.0)[0] == 1
    finally:
        stranger.close()
        head.close()


HEAD_PROCESS = """
import sys, time
sys.path.insert(0, {repo!r})
from core.liveness import HeadBeats
head = HeadBeats(0.5)
print(head.address, flush=True)
pid = int(sys.stdin.readline())
head.expect([(1, "elsewhere", pid)], "here")
t = time.monotonic()
while time.monotonic() - t < 4:
    if head.silent():
        print("named", head.silent(), flush=True)
        break
    time.sleep(0.01)
print("end", flush=True)
"""


def test_a_head_that_was_stopped_itself_blames_nobody():
    """The head process is stopped for 2 s (four timeouts) while rank 1 beats on; once continued, it
    names nobody: it heard nothing because it was not running."""
    head = subprocess.Popen([sys.executable, "-c", HEAD_PROCESS.format(repo=str(REPO))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    rank = None
    try:
        rank = _rank_process(head.stdout.readline().strip())
        head.stdin.write(f"{rank.pid}\n")
        head.stdin.flush()
        time.sleep(0.5)
        os.kill(head.pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(head.pid, signal.SIGCONT)
        assert head.stdout.readline().strip() == "end"
    finally:
        head.kill()
        if rank is not None:
            rank.kill()


def test_process_state_reads_a_stopped_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert process_state(proc.pid) in ("T", "t")
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.2)
        assert process_state(proc.pid) == "S"
    finally:
        proc.kill()
        proc.wait()
    assert process_state(proc.pid) == ""


# ---- whole jobs on one machine ----------------------------------------------------------------------

def _collect(proc: subprocess.Popen) -> StderrLines:
    return StderrLines(proc)


def _await_line(lines: StderrLines, start: str, timeout: float) -> tuple[str | None, list[str]]:
    """The first line starting with `start` within `timeout` s, and every line seen so far."""
    return lines.until(lambda line: line.startswith(start), timeout), lines.seen


def _long_run(tmp_path, *, n_ranks: int, spawn: bool = False, opts: tuple[str, ...] = (), env: dict | None = None):
    """A generation that does not end by itself (stories260K, context shifts), tagged; and its stderr."""
    tagged, tag = tagged_env(tmp_path, **(env or {}))
    args = ["-m", model("stories260K"), "-c", "64", "--rank-timeout", f"{T:g}", *opts]
    if spawn:
        args += ["--np", str(n_ranks)]
    cmd = driver_cmd(tmp_path / "o.npz", 100000, args, n_ranks=None if spawn else n_ranks, extra=["--keep", "4"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=tagged, start_new_session=True)
    return proc, tag, _collect(proc)


def wait_beating(pid: int, timeout: float = 30, said=None) -> None:
    """Wait until process `pid` holds a UDP socket: its liveness beats run (the job is past MPI's own
    start-up, which no beat covers). `said`: called on failure for what the job printed meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            table = "".join(open(f"/proc/{pid}/net/{name}").read() for name in ("udp", "udp6"))
        except OSError:
            fds, table = set(), ""
        inodes = {line.split()[9] for line in table.splitlines()[1:] if len(line.split()) > 9}
        if any(f"socket:[{inode}]" in fds for inode in inodes):
            return
        time.sleep(0.05)
    state = process_state(pid) or "gone"                                # R, S, T (stopped), Z, or gone
    pytest.fail(f"process {pid} never started beating (state {state})"
                + (f"; the job said: {said()!r}" if said else ""))



def _stop_mid_generation(pid: int, proc: subprocess.Popen, tag: str, lines: StderrLines,
                         start: str) -> tuple[str | None, list[str]]:
    """SIGSTOP `pid` well into the generation: the first line starting with `start` (within the timeout
    + 5 s) and the lines seen; the job then ends with a non-zero status and no process left."""
    wait_beating(pid)
    time.sleep(1.5)                                             # well into the generation
    os.kill(pid, signal.SIGSTOP)
    t_stop = time.monotonic()
    line, seen = _await_line(lines, start, T + 5)
    assert time.monotonic() - t_stop < T + 5, seen
    assert proc.wait(timeout=10) != 0
    assert_no_rank_left(tag, grace_s=10)
    return line, seen


@pytest.mark.parametrize("n_ranks, spawn, opts, victim, named", [
    (3, False, (), 2, f"error: rank 2 ({HERE}, layers 4) {STOPPED}"),
    (2, True, (), 1, f"error: rank 1 ({HERE}, layers 3-4) {STOPPED}"),
    (2, False, ("--tp", "2"), 1, f"error: rank 1 ({HERE}, layers 0-4, TP 1/2) {STOPPED}"),
], ids=["mpiexec-n3", "spawn-np2", "mpiexec-tp2"])
def test_a_stopped_worker_is_named_within_the_timeout(tmp_path, n_ranks, spawn, opts, victim, named):
    proc, tag, lines = _long_run(tmp_path, n_ranks=n_ranks, spawn=spawn, opts=opts)
    try:
        pid = worker_rank_pid(tag) if spawn else rank_pid(str(tmp_path / "o.npz"), victim)
        line, seen = _stop_mid_generation(pid, proc, tag, lines, "error:")
        assert line == named, seen
    finally:
        kill_job(proc, tag)


def test_a_stopped_head_makes_the_workers_end_the_job(tmp_path):
    """The head is stopped mid-generation: a worker hears no answer for the timeout, says so and aborts
    the job (the launcher ends every rank, the stopped head included)."""
    proc, tag, lines = _long_run(tmp_path, n_ranks=3)
    try:
        head = rank_pid(str(tmp_path / "o.npz"), 0)
        line, seen = _stop_mid_generation(head, proc, tag, lines, "llama-mpi: rank")
        assert line is not None and line.endswith(
            "rank 0 has not answered for 3 s: the process is stopped or its network is down"), seen
    finally:
        kill_job(proc, tag)


def test_a_worker_stopped_while_the_head_waits_for_input_is_named(tmp_path):
    """The chat under mpiexec waits for a line that never comes; rank 1 is stopped: the head names it
    within the timeout, without any input."""
    env, tag = tagged_env(tmp_path)
    cmd = [mpiexec_or_skip(), "-n", "2", *chat_cmd("-m", model("stories260K"), "--interactive-first", "-p", "Once",
                                                   "-c", "64", "--rank-timeout", f"{T:g}")]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=REPO, text=True, errors="replace", start_new_session=True)
    lines = _collect(proc)
    try:
        assert _wait_for(lines, "Ctrl-D quits", 60)
        time.sleep(1.0)
        victim = worker_rank_pid(tag)
        os.kill(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        line, seen = _await_line(lines, "error:", T + 5)
        assert line == f"error: rank 1 ({HERE}, layers 3-4) {STOPPED}", seen
        assert time.monotonic() - t_stop < T + 5
        assert proc.wait(timeout=10) != 0
        assert_no_rank_left(tag, grace_s=10)
    finally:
        proc.stdin.close()
        kill_job(proc, tag)


def _wait_for(lines: StderrLines, needle: str, timeout: float) -> bool:
    return lines.until(lambda line: needle in line, timeout) is not None


def test_rank_timeout_0_waits_for_a_stopped_worker(tmp_path):
    """--rank-timeout 0: a worker stopped for twice the usual timeout and continued, and the run ends well."""
    tagged, tag = tagged_env(tmp_path)
    out = tmp_path / "z.npz"
    n_gen = 8000                                # ~10 s of decode at ~1.3 ms/token: still running at the stop
    cmd = driver_cmd(out, n_gen, ["-m", model("stories260K"), "-c", "64", "--rank-timeout", "0"], n_ranks=2,
                     extra=["--keep", "4"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=tagged,
                            start_new_session=True)
    try:
        pid = rank_pid(str(out), 1)
        time.sleep(3.0)                         # into the generation (no beats to wait for: 0 turns them off)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2 * T)
        os.kill(pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert len(load(out)["tokens"]) == n_gen
    finally:
        kill_job(proc, tag)


@pytest.mark.parametrize("slow_rank", [1, 0], ids=["worker", "head"])
def test_a_step_longer_than_the_timeout_is_not_silence(tmp_path, slow_rank):
    """Slow is not dead: every prompt step of one rank takes 4 s more, busy in numpy, with --rank-timeout
    1.5; the run ends normally with the single-process tokens."""
    out = tmp_path / "slow.npz"
    opts = ["-m", model("stories260K"), "--rank-timeout", "1.5"]
    env = dict(os.environ, LLAMA_MPI_SLOW=f"{slow_rank}:4", LLAMA_MPI_UBATCH="0")
    t0 = time.monotonic()
    r = subprocess.run(driver_cmd(out, 8, opts, n_ranks=2), capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=120, start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 > 4
    pipe = start(ClusterSettings(model=model("stories260K"), n_ctx=512), "single")
    try:
        tokens, _, _ = generate(pipe, PROMPT, 8, False, 0)
    finally:
        pipe.close()
    assert load(out)["tokens"].tolist() == tokens
    assert not np.isnan(load(out)["logits"]).any()
