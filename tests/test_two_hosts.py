"""Two host names on one machine: hydra's mpiexec starts rank 1 through tests/as_another_host.sh (an ssh
stand-in that gives the rank its own host name, 127.0.0.2), so MPICH places it on another node and
llama-mpi cannot watch its process. MPI's bytes do not cross a network here: UCX still sees one machine
and uses shared memory (a 32-byte Allreduce: 10 us; 50 us with UCX_TLS=tcp). The tests over TCP are
tests/test_netns.py (two network namespaces joined by a veth pair). Checked here: the plan names both
hosts, results equal the single-process run, node-local options apply, and a killed rank on the other
host is named by the head in one line (its supervisor's notice, core/notice.py) with every process gone."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from chat.launch import start_cluster
from chat.options import parse_options
from core.procfs import parent_pid
from mpi_driver import generate
from mpi_helpers import (OTHER_HOST, PROMPT, REPO, cmdline, descendants, driver_cmd, load, model, mpiexec,
                         other_host_or_skip, rank_pid, run, signal_and_collect, still_alive_after)

WORKER_MARK = "--llama-mpi-worker"     # in a spawned worker's command line

LAUNCHER = REPO / "tests" / "as_another_host.sh"
OTHER = OTHER_HOST
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def launcher():
    other_host_or_skip()
    return [mpiexec(), "-launcher", "ssh", "-launcher-exec", str(LAUNCHER)]


def two_hosts(launcher, tmp_path, *ranks: list[str]) -> list[str]:
    """mpiexec argv running ranks[0] on this host and ranks[1] on OTHER (MPMD; one slot per host)."""
    hosts = tmp_path / "hostsfile"
    hosts.write_text(f"{HOST}:1\n{OTHER}:1\n")
    return [*launcher, "-f", str(hosts), "-n", "1", *ranks[0], ":", "-n", "1", *ranks[1]]


def test_a_rank_on_another_host_gives_the_single_process_logits(launcher, tmp_path):
    out = tmp_path / "r.npz"
    opts = ["-m", model("stories260K")]
    r = run(two_hosts(launcher, tmp_path, *[driver_cmd(out, 10, opts, extra=["--all-logits"])] * 2),
            env={"LLAMA_MPI_UBATCH": "0"})
    assert r.returncode == 0, r.stderr
    pipe = start_cluster(parse_options(opts))
    try:
        tokens, logits, _ = generate(pipe, PROMPT, 10, True, 0)
    finally:
        pipe.close()
    got = load(out)
    assert got["hosts"].tolist() == [HOST, OTHER]
    assert got["tokens"].tolist() == tokens
    assert np.array_equal(got["logits"], logits)


def test_plan_names_the_other_host_and_its_node_local_options(launcher, tmp_path):
    link = tmp_path / "node-copy.gguf"                   # the node's own path to the same file
    link.symlink_to(model("stories260K"))
    (tmp_path / "head.txt").write_text(f"-m {model('stories260K')} -p 'Once upon a time' -n 12 --temp 0\n")
    (tmp_path / "node.txt").write_text(f"# this node's file\n-m {link} -t 2\n")
    cli = [sys.executable, "-m", "chat"]
    r = run(two_hosts(launcher, tmp_path, [*cli, str(tmp_path / "head.txt")], [*cli, str(tmp_path / "node.txt")]))
    assert r.returncode == 0, r.stderr
    rank1 = [line.split() for line in r.stderr.splitlines() if line.strip().startswith("rank 1")]
    assert rank1 and rank1[0][2] == OTHER and rank1[0][-1] == "2"     # host, and the node's -t 2
    single = run([*cli, "-m", model("stories260K"), "-p", "Once upon a time", "-n", "12", "--temp", "0"])
    assert single.returncode == 0 and r.stdout == single.stdout


def test_another_model_on_the_other_host_is_named(launcher, tmp_path):
    r = run(two_hosts(launcher, tmp_path, driver_cmd(tmp_path / "x.npz", 4, ["-m", model("stories260K")]),
                      driver_cmd(tmp_path / "x.npz", 4, ["-m", model("fx256-q4_k_m")])))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: rank 1 ({OTHER}, layers 3-4): model ")


def test_kill_9_on_the_other_host_is_named_by_the_head(launcher, tmp_path):
    """The head cannot see the process; the rank's supervisor sends a notice, the head names the rank in
    one line and aborts the job: nothing waits for the dead rank, no process is left."""
    out = tmp_path / "k.npz"
    opts = ["-m", model("stories260K"), "-c", "64"]
    cmd = two_hosts(launcher, tmp_path, *[driver_cmd(out, 100000, opts)] * 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        victim = rank_pid(str(out), 1)
        time.sleep(1.5)                                   # well into the generation
        tree = descendants(proc.pid)
        stderr, t_kill, noticed = signal_and_collect(proc, victim, signal.SIGKILL)
        assert proc.returncode != 0
        assert [line for line in stderr.splitlines() if line.strip()] == [
            f"error: rank 1 ({OTHER}, layers 3-4) failed: the process is gone (killed by signal 9)"]
        assert noticed < 3.0                              # the head spoke, before the supervisor's grace
        assert not still_alive_after(tree, t_kill, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_head_waiting_for_input_names_a_rank_killed_on_the_other_host(launcher, tmp_path):
    """The chat waits for a line that never comes (stdin an open, silent pipe); rank 1 on the other host
    is killed: the head, polling its notice board while it waits, names it in one line and exits."""
    opts = tmp_path / "chat.txt"                          # also the marker that finds the ranks
    opts.write_text(f"-m {model('stories260K')} --interactive-first -p Once -c 64\n")
    cli = [sys.executable, "-m", "chat", str(opts)]
    proc = subprocess.Popen(two_hosts(launcher, tmp_path, cli, cli), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        victim = rank_pid(str(opts), 1)
        deadline = time.monotonic() + 30                  # the preamble ends: the chat reads input now
        while not any("Ctrl-D quits" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        tree = descendants(proc.pid)
        n_before = len(lines)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(timeout=10)                             # stdin stays open: only the failure ends it
        reader.join(timeout=5)
        assert time.monotonic() - t_kill < 3.0
        assert proc.returncode != 0
        assert [line.rstrip("\n") for line in lines[n_before:] if line.strip()] == [
            f"error: rank 1 ({OTHER}, layers 3-4) failed: the process is gone (killed by signal 9)"]
        assert not still_alive_after(tree, t_kill, 10)
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_spawn_mode_places_workers_from_the_hostfile_on_the_other_host(launcher, tmp_path):
    """`llama-mpi --np 2 --hostfile F`: MPICH's Spawn starts its own hydra, which takes the launcher
    from HYDRA_LAUNCHER / HYDRA_LAUNCHER_EXEC; the worker lands on the other host, output unchanged."""
    hosts = tmp_path / "hostsfile"
    hosts.write_text(f"{OTHER}:2\n")
    args = ["-m", model("stories260K"), "-p", "Once upon a time", "-n", "12", "--temp", "0"]
    env = {"HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(LAUNCHER)}
    r = run([sys.executable, "-m", "chat", "--np", "2", "--hostfile", str(hosts), *args], env=env)
    assert r.returncode == 0, r.stderr
    rank1 = [line.split() for line in r.stderr.splitlines() if line.strip().startswith("rank 1")]
    assert rank1 and rank1[0][2] == OTHER
    single = run([sys.executable, "-m", "chat", *args])
    assert single.returncode == 0 and r.stdout == single.stdout


def test_spawn_mode_names_a_worker_killed_on_the_other_host(launcher, tmp_path):
    hosts = tmp_path / "hostsfile"
    hosts.write_text(f"{OTHER}:2\n")
    env = dict(os.environ, HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=str(LAUNCHER))
    cmd = [sys.executable, "-m", "chat", "--np", "2", "--hostfile", str(hosts), "-m", model("stories260K"),
           "-p", "Once upon a time", "-n", "-1", "--ignore-eos", "-c", "64", "--temp", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    try:
        victim, deadline = None, time.monotonic() + 20
        while victim is None and time.monotonic() < deadline:     # the rank: a worker under its supervisor
            workers = [p for p in descendants(proc.pid) if WORKER_MARK in cmdline(p)]
            inner = [p for p in workers if parent_pid(p) in workers]
            victim = inner[0] if inner else None
            time.sleep(0.1)
        assert victim is not None
        time.sleep(1.5)                                           # well into the generation
        tree = descendants(proc.pid)
        stderr, t_kill, noticed = signal_and_collect(proc, victim, signal.SIGKILL)
        assert noticed < 3.0
        assert proc.returncode != 0
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
            f"error: rank 1 ({OTHER}, layers 3-4) failed: the process is gone (killed by signal 9)"]
        assert not still_alive_after(tree, t_kill, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_spawn_mode_places_tp_groups_whole_on_hosts(launcher, tmp_path):
    """--np 4 --tp 2 with a hostfile naming only the other host: the head's TP peer stays on the head's host
    (group 0), stage 1's group goes whole to the other host."""
    hosts = tmp_path / "hostsfile"
    hosts.write_text(f"{OTHER}:2\n")
    args = ["-m", model("stories260K"), "-p", "Once upon a time", "-n", "12", "--temp", "0"]
    r = run([sys.executable, "-m", "chat", "--np", "4", "--tp", "2", "--hostfile", str(hosts), *args],
            env={"HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(LAUNCHER)}, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stderr.splitlines() if line.strip().startswith("rank ")]
    assert [(row[1], row[2], row[4], row[6]) for row in rows] == [
        ("0", HOST, "0", "0/2"), ("1", HOST, "0", "1/2"), ("2", OTHER, "1", "0/2"), ("3", OTHER, "1", "1/2")]
    single = run([sys.executable, "-m", "chat", *args])
    assert single.returncode == 0 and r.stdout == single.stdout
