"""Failures of a cluster run under the real mpiexec: every rank goes away (checked in the process table),
the exit status is non-zero, and the head's error is one line naming rank, host and layers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from core.procfs import parent_pid
from mpi_helpers import (REPO, cmdline, descendants, driver_cmd, environ, model, mpiexec, rank_pid, run,
                         run_watching_ranks, signal_and_collect, still_alive_after, wait_gone)

HOST = socket.gethostname()
WORKER_MARK = "--llama-mpi-worker"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("n_ranks, env, line", [
    # a worker raises at its 3rd evaluation
    (3, {"LLAMA_MPI_FAULT": "1:3"}, "rank 1 ({host}, layers 2-3) failed: RuntimeError: injected fault at evaluation 3"),
    # the head raises in the middle of a step
    (3, {"LLAMA_MPI_FAULT": "0:2"}, "rank 0 ({host}, layers 0-1) failed: RuntimeError: injected fault at evaluation 2"),
    # the last rank raises during pipelined prefill (micro-batches of 8)
    (4, {"LLAMA_MPI_FAULT": "3:1", "LLAMA_MPI_UBATCH": "8"},
     "rank 3 ({host}, layers 4) failed: RuntimeError: injected fault at evaluation 1"),
], ids=["worker", "head-mid-step", "last-rank-pipelined-prefill"])
def test_injected_exception(tmp_path, n_ranks, env, line):
    out = tmp_path / "f.npz"
    r = run(driver_cmd(out, 12, ["-m", model("stories260K")], n_ranks=n_ranks), env=env)
    assert r.returncode != 0
    assert error_lines(r.stderr) == ["error: " + line.format(host=HOST)]
    wait_gone(str(out), 10)


def test_injected_exception_in_spawn_mode(tmp_path):
    out = tmp_path / "f.npz"
    cmd = driver_cmd(out, 12, ["-m", model("stories260K"), "--np", "3"])
    proc, stderr, seen = run_watching_ranks(cmd, dict(os.environ, LLAMA_MPI_FAULT="2:2"))
    assert proc.returncode != 0
    assert error_lines(stderr)[0] == (
        f"error: rank 2 ({HOST}, layers 4) failed: RuntimeError: injected fault at evaluation 2")
    assert not still_alive_after(list(seen), time.monotonic(), 10)


def test_wrong_split_count(tmp_path):
    out = tmp_path / "f.npz"
    r = run(driver_cmd(out, 4, ["-m", model("stories260K"), "--mpi-layer-split", "0.5,0.5"], n_ranks=3))
    assert r.returncode != 0
    assert error_lines(r.stderr) == [
        "error: --mpi-layer-split has 2 weights but the cluster has 3 ranks (give one weight per rank)"]
    wait_gone(str(out), 10)


def test_a_rank_without_layers(tmp_path):
    out = tmp_path / "f.npz"
    r = run(driver_cmd(out, 4, ["-m", model("fx256-q4_k_m")], n_ranks=4))
    assert r.returncode != 0
    assert error_lines(r.stderr)[0].startswith("error: rank 3 would get no layer")
    wait_gone(str(out), 10)


def _mpmd(out, head_opts: list[str], worker_opts: list[str], n_workers: int = 1) -> list[str]:
    """mpiexec with one head and workers reading other options (as if on another node)."""
    head = driver_cmd(out, 4, head_opts)
    worker = driver_cmd(out, 4, worker_opts)
    return [mpiexec(), "-n", "1", *head, ":", "-n", str(n_workers), *worker]


def test_worker_options_file_naming_another_model(tmp_path):
    out = tmp_path / "f.npz"
    (tmp_path / "head.txt").write_text(f"-m {model('stories260K')} -c 64\n")
    (tmp_path / "node.txt").write_text(f"# node-local file\n-m {model('fx256-q4_k_m')} -t 1\n")
    r = run(_mpmd(out, [str(tmp_path / "head.txt")], [str(tmp_path / "node.txt")], 2))
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: rank 1 ({HOST}, layers 2-3): model {model('fx256-q4_k_m')} is not "
                               f"the head's {model('stories260K')} (fingerprint ")
    wait_gone(str(out), 10)


def test_model_file_missing_on_one_rank(tmp_path):
    out = tmp_path / "f.npz"
    missing = tmp_path / "nowhere" / "model.gguf"
    r = run(_mpmd(out, ["-m", model("stories260K")], ["-m", str(missing)]))
    assert r.returncode != 0
    assert error_lines(r.stderr) == [f"error: rank 1 ({HOST}, layers 3-4): {missing}: no such file"]
    wait_gone(str(out), 10)


def test_node_local_model_path_is_used(tmp_path):
    """A worker's own -m naming the same file under another path is fine (fingerprint equal)."""
    out = tmp_path / "ok.npz"
    link = tmp_path / "copy.gguf"
    link.symlink_to(model("stories260K"))
    r = run(_mpmd(out, ["-m", model("stories260K")], ["-m", str(link)]))
    assert r.returncode == 0, r.stderr
    assert out.exists()


def _start_long_run(out, n_ranks=3, extra_env=None, spawn=False):
    opts = ["-m", model("stories260K"), "-c", "64"] + (["--np", str(n_ranks)] if spawn else [])
    cmd = driver_cmd(out, 100000, opts, n_ranks=None if spawn else n_ranks, extra=["--keep", "4"])
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)


@pytest.mark.parametrize("spawn", [False, True])
def test_kill_9_of_a_worker_mid_generation(tmp_path, spawn):
    """The launcher does not get to SIGKILL the job first (each worker runs under a supervisor): the
    head notices the lost rank, names it in one line and aborts the job."""
    out = tmp_path / "k.npz"
    proc = _start_long_run(out, spawn=spawn)
    try:
        if spawn:
            deadline = time.monotonic() + 30                    # both spawned ranks up (slower under load)
            while True:
                tree = descendants(proc.pid)
                ranks = [p for p in tree if WORKER_MARK in cmdline(p) and WORKER_MARK in cmdline(parent_pid(p))]
                if len(ranks) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert len(ranks) == 2
            time.sleep(1.0)                                     # well into the generation
            pid, victim = sorted(ranks, key=lambda p: int(environ(p).get("PMI_RANK", "9")))[1], 2
        else:
            pid, victim = rank_pid(str(out), 1), 1
            time.sleep(1.5)                                     # well into the generation
            tree = descendants(proc.pid)
        stderr, t_kill, _ = signal_and_collect(proc, pid, signal.SIGKILL)
        assert proc.returncode != 0
        layers = "4" if spawn else "2-3"
        assert error_lines(stderr) == [
            f"error: rank {victim} ({HOST}, layers {layers}) failed: the process is gone (killed or crashed)"]
        assert not still_alive_after(tree, t_kill, 10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_the_head_stops_every_rank(tmp_path):
    out = tmp_path / "t.npz"
    proc = _start_long_run(out, n_ranks=2)
    try:
        pid = rank_pid(str(out), 0)
        time.sleep(1.5)
        os.kill(pid, signal.SIGTERM)
        proc.communicate(timeout=10)
        assert proc.returncode != 0
        wait_gone(str(out), 10)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("spawn", [False, True])
def test_clean_exit_within_2_s(tmp_path, spawn):
    out = tmp_path / "c.npz"
    opts = ["-m", model("stories260K")] + (["--np", "3"] if spawn else [])
    cmd = driver_cmd(out, 8, opts, n_ranks=None if spawn else 3)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    line = proc.stdout.readline()                               # the head's last act before close()
    t_done = time.monotonic()
    tree = descendants(proc.pid)                                # every rank (and hydra) of this run
    assert line.startswith("tokens "), proc.stderr.read()
    assert len([p for p in tree if "mpi_driver" in cmdline(p) or WORKER_MARK in cmdline(p)]) >= 2
    proc.wait(timeout=10)
    assert proc.returncode == 0
    left = still_alive_after(tree, t_done, 2.0, step=0.02)
    assert not left, [(p, cmdline(p)) for p in left]
    assert time.monotonic() - t_done < 2.0, time.monotonic() - t_done




@pytest.mark.parametrize("spawn", [False, True])
def test_kill_9_of_the_head_while_idle_takes_every_worker_down(tmp_path, spawn):
    out = tmp_path / "h.npz"
    opts = ["-m", model("stories260K")] + (["--np", "3"] if spawn else [])
    cmd = driver_cmd(out, 4, opts, n_ranks=None if spawn else 3, extra=["--idle", "30"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "idle"             # set up, waiting "for input"
        head = proc.pid if spawn else rank_pid(str(out), 0)
        tree = [p for p in descendants(proc.pid) if p != head]       # workers (and hydra)
        assert tree
        os.kill(head, signal.SIGKILL)
        t0 = time.monotonic()
        assert not still_alive_after(tree, t0, 10)
        proc.wait(timeout=10)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_a_worker_mid_generation(tmp_path):
    out = tmp_path / "w.npz"
    proc = _start_long_run(out)
    try:
        pid = rank_pid(str(out), 2)
        time.sleep(1.5)
        tree = descendants(proc.pid)
        stderr, t0, _ = signal_and_collect(proc, pid, signal.SIGTERM)
        assert proc.returncode != 0
        assert error_lines(stderr) == [f"error: rank 2 ({HOST}, layers 4) failed: stopped by signal (exit 143)"]
        assert not still_alive_after(tree, t0, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
