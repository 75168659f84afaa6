"""Two hosts joined by a real network link (tests/netns.py: two network namespaces, a veth pair, MPI on it
with UCX_TLS=tcp; root only): rank 0 on the first host, rank 1 on the other, every byte between them over
TCP on the veth. These are the tests where MPI runs over a network (tests/test_two_hosts.py gives the
second host a name of its own only, and UCX still takes shared memory there).

Results equal one process's (with --tp 2 also: a TP group across the link, and one group on each host);
a remote rank killed, stopped or cut off (its link taken down mid-generation,
or while the head waits for the user) is named by the head in one line within --rank-timeout + 5 s, the
status is not 0, no process of the job is left, and the fixture leaves no namespace behind.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from chat.launch import start_cluster
from chat.options import parse_options
from mpi_driver import generate
from mpi_helpers import PROMPT, REPO, driver_cmd, load, model, mpiexec, rank_pid
from netns import LAUNCHER, TwoHosts, netns, two_hosts, unavailable  # noqa: F401 - netns is the fixture
from test_cli_support import assert_no_rank_left, kill_job, tagged_env
from test_idle_failure import worker_rank_pid
from test_liveness import wait_beating

T = 3.0                               # --rank-timeout of the failure tests
GONE_S = T + 12                       # a cut-off rank ends itself after T, its supervisor 2-5 s later
KILLED = "failed: the process is gone (killed by signal 9)"
STOPPED = "has not answered for 3 s: the process is stopped or stuck (its host still answers)"
CUT_OFF = "has not answered for 3 s, nor has its host: the network to it or the host is down"


def _job(netns: TwoHosts, tmp_path, head: list[str], other: list[str] | None = None, stdin: bool = False):
    """mpiexec on the first host (rank 0: `head`; rank 1: `other`, else the same) with every process
    tagged; its stderr lines arrive on a queue."""
    env, tag = tagged_env(tmp_path, **netns.env)
    proc = subprocess.Popen(netns.mpiexec(mpiexec(), head, other or head), cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, errors="replace", start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stderr], daemon=True).start()
    return proc, tag, lines


def _lines_until(lines: queue.Queue, needle: str, timeout: float) -> list[str]:
    """Lines seen until one contains `needle` (the last) or `timeout` passed."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
        if needle in seen[-1]:
            break
    return seen


def _rest(lines: queue.Queue) -> list[str]:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return out


def _ended(proc: subprocess.Popen, tag: str, netns: TwoHosts, grace_s: float) -> None:
    """The job is over: status not 0, no tagged process anywhere, nothing left in the namespaces."""
    assert proc.wait(timeout=grace_s) != 0
    assert_no_rank_left(tag, grace_s=grace_s)
    assert netns.pids() == []



@pytest.mark.parametrize("name", ["stories260K", "fx256-q4_k_m"])
def test_greedy_over_the_link_equals_one_process(netns, tmp_path, name):
    """Tokens and every logit bit for bit; the activations went over the veth (its byte counter)."""
    out = tmp_path / "r.npz"
    opts = ["-m", model(name)]
    sent = netns.tx_bytes(netns.other)
    env, _ = tagged_env(tmp_path, **netns.env, LLAMA_MPI_UBATCH="0")
    cmd = netns.mpiexec(mpiexec(), *[driver_cmd(out, 10, opts, extra=["--all-logits"])] * 2)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120, start_new_session=True)
    assert r.returncode == 0, r.stderr
    got = load(out)
    pipe = start_cluster(parse_options(opts))
    try:
        tokens, logits, _ = generate(pipe, PROMPT, 10, True, 0)
    finally:
        pipe.close()
    assert got["hosts"].tolist() == [netns.head, netns.other]
    assert got["tokens"].tolist() == tokens
    assert np.array_equal(got["logits"], logits)
    activations = got["bytes_per_token"][1] * (len(PROMPT) + 9)        # rank 1's hidden rows back to the head
    assert netns.tx_bytes(netns.other) - sent > activations > 0


@pytest.mark.parametrize("per_host", [1, 2])
def test_tp_over_the_link_equals_one_process(netns, tmp_path, per_host):
    """--tp 2 with the link inside a TP group (rank 0 on one host, rank 1 on the other: the group sums with
    MPI_Iallreduce over TCP, no shared window), and the 2-D layout of the README (-n 4 --tp 2, each host one
    stage's group: the window inside each host, the layer split over the link). Greedy tokens as one
    process's, logits within 1e-4 (each rank sums its share); the ranks' own traffic went over the veth."""
    out = tmp_path / "t.npz"
    opts = ["-m", model("stories260K"), "--tp", "2"]
    sent = netns.tx_bytes(netns.other)
    env, _ = tagged_env(tmp_path, **netns.env)
    cmd = netns.mpiexec(mpiexec(), *[driver_cmd(out, 8, opts, extra=["--all-logits"])] * 2, per_host=per_host)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120, start_new_session=True)
    assert r.returncode == 0, r.stderr
    got = load(out)
    pipe = start_cluster(parse_options(["-m", model("stories260K")]))
    try:
        tokens, logits, _ = generate(pipe, PROMPT, 8, True, 0)
    finally:
        pipe.close()
    assert got["hosts"].tolist() == [netns.head] * per_host + [netns.other] * per_host
    assert got["tp"].tolist() == [0, 1] * per_host
    assert got["tokens"].tolist() == tokens
    np.testing.assert_allclose(got["logits"], logits, atol=1e-4, rtol=0)
    n_tokens = len(PROMPT) + 7
    if per_host == 1:                                  # all that rank 1 sends: its all-reduces and its logits
        least = got["bytes_per_token"][1] * n_tokens
    else:                                              # stage 1's hidden rows back to the head (--all-logits)
        least = n_tokens * pipe.config.n_embd * 4
    assert netns.tx_bytes(netns.other) - sent > least > 0


def _long_run(netns: TwoHosts, tmp_path, opts=()):
    out = tmp_path / "k.npz"
    cmd = driver_cmd(out, 100000, ["-m", model("stories260K"), "-c", "64", "--rank-timeout", f"{T:g}", *opts],
                     extra=["--keep", "4"])
    proc, tag, lines = _job(netns, tmp_path, cmd)
    victim = rank_pid(str(out), 1)
    wait_beating(victim)
    time.sleep(1.5)                                                     # well into the generation
    return proc, tag, lines, victim


def test_kill_9_of_the_remote_rank_is_named_through_the_notice(netns, tmp_path):
    """The head cannot see the process; its supervisor's notice crosses the link: named at once."""
    proc, tag, lines, victim = _long_run(netns, tmp_path)
    try:
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        seen = _lines_until(lines, "error:", 5)
        assert time.monotonic() - t0 < 3.0
        _ended(proc, tag, netns, 10)
        assert [line for line in seen + _rest(lines) if line.strip()] == [
            f"error: rank 1 ({netns.other}, layers 3-4) {KILLED}"]
    finally:
        kill_job(proc, tag)


def test_sigstop_of_the_remote_rank_is_named_within_the_timeout(netns, tmp_path):
    proc, tag, lines, victim = _long_run(netns, tmp_path)
    try:
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        seen = _lines_until(lines, "error:", T + 5)
        assert time.monotonic() - t0 < T + 5
        _ended(proc, tag, netns, 10)
        assert [line for line in seen + _rest(lines) if line.strip()] == [
            f"error: rank 1 ({netns.other}, layers 3-4) {STOPPED}"]
    finally:
        kill_job(proc, tag)


@pytest.mark.parametrize("end", ["head", "other"])
def test_link_down_mid_generation_is_named_and_every_process_ends(netns, tmp_path, end):
    """The veth goes down (at the head's end or the other's): the head names rank 1 and aborts; rank 1,
    cut off from the launcher too, hears the head no more and ends itself, and its host's processes
    with it."""
    proc, tag, lines, _ = _long_run(netns, tmp_path)
    try:
        netns.link(netns.head if end == "head" else netns.other, up=False)
        t0 = time.monotonic()
        seen = _lines_until(lines, "error:", T + 5)
        assert time.monotonic() - t0 < T + 5
        _ended(proc, tag, netns, GONE_S)
        assert [line for line in seen + _rest(lines) if line.strip()] == [
            f"error: rank 1 ({netns.other}, layers 3-4) {CUT_OFF}"]
    finally:
        kill_job(proc, tag)


@pytest.mark.parametrize("how", ["link", "sigstop"])
def test_a_tp_peer_cut_off_or_stopped_mid_generation_is_named(netns, tmp_path, how):
    """--tp 2 across the link: the head waits for rank 1 inside every all-reduce. Its link goes down, or it
    is stopped: the head names it (rank, host, layers, TP index) within the timeout, and every process ends."""
    proc, tag, lines, victim = _long_run(netns, tmp_path, ["--tp", "2"])
    try:
        if how == "link":
            netns.link(netns.other, up=False)
        else:
            os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        seen = _lines_until(lines, "error:", T + 5)
        assert time.monotonic() - t0 < T + 5
        _ended(proc, tag, netns, GONE_S)
        said = CUT_OFF if how == "link" else STOPPED
        assert [line for line in seen + _rest(lines) if line.strip()] == [
            f"error: rank 1 ({netns.other}, layers 0-4, TP 1/2) {said}"]
    finally:
        kill_job(proc, tag)


def test_link_down_while_the_head_waits_at_the_prompt(netns, tmp_path):
    """The chat waits for a line that never comes; the link goes down: the head names rank 1 within
    the timeout, without any input (README: while the head waits for you, within --rank-timeout)."""
    cli = [sys.executable, "-m", "chat", "-m", model("stories260K"), "--interactive-first", "-p", "Once",
           "-c", "64", "--rank-timeout", f"{T:g}"]
    proc, tag, lines = _job(netns, tmp_path, cli, stdin=True)
    try:
        assert any("Ctrl-D quits" in line for line in _lines_until(lines, "Ctrl-D quits", 60))
        time.sleep(1.0)
        netns.link(netns.other, up=False)
        t0 = time.monotonic()
        seen = _lines_until(lines, "error:", T + 5)
        assert time.monotonic() - t0 < T + 5
        assert seen[-1] == f"error: rank 1 ({netns.other}, layers 3-4) {CUT_OFF}"
        proc.stdin.close()
        _ended(proc, tag, netns, GONE_S)
        assert [line for line in _rest(lines) if line.startswith("error:")] == []
    finally:
        kill_job(proc, tag)


def test_spawn_mode_over_the_link_names_a_stopped_worker(netns, tmp_path):
    """`llama-mpi --np 2 --hostfile F` on the first host: MPICH's Spawn places the worker on the other one
    (hydra takes the ssh stand-in from HYDRA_LAUNCHER_EXEC). The worker is stopped: named within the
    timeout, and the head ends even though MPI_Abort waits forever on a stopped peer over TCP."""
    hostfile = tmp_path / "spawn-hosts"
    hostfile.write_text(f"{netns.other}:2\n")
    env, tag = tagged_env(tmp_path, **netns.env, HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=str(LAUNCHER))
    cli = [sys.executable, "-m", "chat", "--np", "2", "--hostfile", str(hostfile), "-m", model("stories260K"),
           "-p", "Once upon a time", "-n", "-1", "--ignore-eos", "-c", "64", "--temp", "0", "--rank-timeout", f"{T:g}"]
    proc = subprocess.Popen(netns.on(netns.head, cli), cwd=REPO, env=env, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, errors="replace", start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stderr], daemon=True).start()
    try:
        victim = worker_rank_pid(tag, timeout=60)
        wait_beating(victim, said=lambda: "\n".join(_rest(lines)) + "\n" + netns.snapshot())
        time.sleep(1.5)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        seen = _lines_until(lines, "error:", T + 5)
        assert time.monotonic() - t0 < T + 5
        assert seen[-1] == f"error: rank 1 ({netns.other}, layers 3-4) {STOPPED}"
        _ended(proc, tag, netns, 15)
        assert [line for line in _rest(lines) if line.strip()] == []
    finally:
        kill_job(proc, tag)


def test_spawn_mode_tp_groups_over_the_link_give_one_process_text(netns, tmp_path):
    """`llama-mpi --np 4 --tp 2 --hostfile F` (F names the other host only): the head's TP peer is spawned on
    the head's host, stage 1's group whole on the other host; greedy text as one process's."""
    hostfile = tmp_path / "spawn-hosts"
    hostfile.write_text(f"{netns.other}:2\n")
    env, _ = tagged_env(tmp_path, **netns.env, HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=str(LAUNCHER))
    args = ["-m", model("stories260K"), "-p", "Once upon a time", "-n", "24", "--temp", "0"]
    r = subprocess.run(netns.on(netns.head, [sys.executable, "-m", "chat", "--np", "4", "--tp", "2", "--hostfile",
                                             str(hostfile), *args]),
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120, start_new_session=True)
    assert r.returncode == 0, r.stderr
    single = subprocess.run([sys.executable, "-m", "chat", *args], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert single.returncode == 0, single.stderr
    assert r.stdout == single.stdout and len(r.stdout) > 40
    plan = {int(line.split()[1]): line.split()[2] for line in r.stderr.splitlines()
            if line.startswith("  rank ") and " TP " in line}
    assert plan == {0: netns.head, 1: netns.head, 2: netns.other, 3: netns.other}


def test_the_namespaces_are_removed_whatever_happens(tmp_path):
    """A failure inside, with a stopped process left in the other namespace: namespaces, veth, hosts files
    and the process are all gone afterwards."""
    reason = unavailable()
    if reason:
        pytest.skip(f"no two-namespace network here: {reason}")
    with pytest.raises(RuntimeError, match="inside"):
        with two_hosts(tmp_path) as hosts:
            proc = subprocess.Popen(hosts.on(hosts.other, ["sleep", "60"]))
            deadline = time.monotonic() + 5
            while not hosts.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGSTOP)
            raise RuntimeError("a failure inside")
    proc.wait(timeout=5)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert hosts.head not in listed and hosts.other not in listed
    assert not os.path.exists(f"/etc/netns/{hosts.head}") and not os.path.exists(f"/etc/netns/{hosts.other}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert hosts.head[:-1] not in links                                # nor the veth pair (named alike)
