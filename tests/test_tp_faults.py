"""Failures of a tensor-parallel rank (issue 11) under the real mpiexec, on 2 stages of --tp 2: an injected
exception (core/faults.py) or kill -9 in a TP rank of stage 0 and of stage 1 is named by the head in one line
(rank, host, layers, TP index), every rank is gone within 10 s, and the exit status is not 0."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from mpi_helpers import (REPO, descendants, driver_cmd, model, rank_pid, run, run_watching_ranks, signal_and_collect,
                         still_alive_after, wait_gone)

HOST = socket.gethostname()
TP_OPTS = ["--tp", "2"]
LAYERS = {1: "0-2", 3: "3-4"}          # stories260K's 5 layers over 2 stages; ranks 1 and 3 are TP index 1


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("rank, ubatch", [(1, "0"), (3, "0"), (3, "8")],
                         ids=["stage-0", "stage-1", "stage-1-pipelined-prefill"])
def test_injected_exception_in_a_tp_rank(tmp_path, rank, ubatch):
    out = tmp_path / "f.npz"
    r = run(driver_cmd(out, 12, ["-m", model("stories260K"), *TP_OPTS], n_ranks=4),
            env={"LLAMA_MPI_FAULT": f"{rank}:2", "LLAMA_MPI_UBATCH": ubatch})
    assert r.returncode != 0
    assert error_lines(r.stderr) == [f"error: rank {rank} ({HOST}, layers {LAYERS[rank]}, TP 1/2) failed: "
                                     "RuntimeError: injected fault at evaluation 2"]
    wait_gone(str(out), 10)


def test_injected_exception_in_a_spawned_tp_rank(tmp_path):
    out = tmp_path / "f.npz"
    cmd = driver_cmd(out, 12, ["-m", model("stories260K"), "--np", "2", *TP_OPTS])
    proc, stderr, seen = run_watching_ranks(cmd, dict(os.environ, LLAMA_MPI_FAULT="1:3"))
    assert proc.returncode != 0
    assert error_lines(stderr)[0] == (f"error: rank 1 ({HOST}, layers 0-4, TP 1/2) failed: "
                                      "RuntimeError: injected fault at evaluation 3")
    assert seen and not still_alive_after(list(seen), time.monotonic(), 10)


@pytest.mark.parametrize("rank", [1, 3], ids=["stage-0", "stage-1"])
def test_kill_9_of_a_tp_rank_mid_generation(tmp_path, rank):
    out = tmp_path / "k.npz"
    cmd = driver_cmd(out, 100000, ["-m", model("stories260K"), "-c", "64", *TP_OPTS], n_ranks=4,
                     extra=["--keep", "4"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        pid = rank_pid(str(out), rank)
        time.sleep(1.5)                                     # well into the generation
        tree = descendants(proc.pid)
        stderr, t_kill, _ = signal_and_collect(proc, pid, signal.SIGKILL)
        assert proc.returncode != 0
        assert error_lines(stderr) == [f"error: rank {rank} ({HOST}, layers {LAYERS[rank]}, TP 1/2) failed: "
                                       "the process is gone (killed or crashed)"]
        assert not still_alive_after(tree, t_kill, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
