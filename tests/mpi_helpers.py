"""Helpers for the MPI tests: find the mpich wheel's mpiexec, run the test driver, watch the process table."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.procfs import cpu_seconds, parent_pid, process_state

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "mpi_driver.py"
FIXTURE_MODELS = REPO.parent / "shared" / "fixtures" / "models"
PROMPT = [1] + [(i * 37) % 500 + 3 for i in range(39)]          # BOS + 39 ids valid in both vocabularies


def mpiexec() -> str:
    """The mpiexec beside this interpreter (the mpich wheel's hydra); skip when there is none."""
    exe = Path(sys.executable).parent / "mpiexec"
    if not exe.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    return str(exe)


def model(name: str) -> str:
    path = FIXTURE_MODELS / f"{name}.gguf"
    if not path.exists():
        pytest.skip(f"fixture model {path} not found")
    return str(path)


def driver_cmd(out: Path, n_gen: int, opts: list[str], *, n_ranks: int | None = None,
               prompt: list[int] = PROMPT, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, str(DRIVER), str(out), ",".join(map(str, prompt)), str(n_gen), *extra, "--", *opts]
    return ([mpiexec(), "-n", str(n_ranks)] + cmd) if n_ranks else cmd


def run(cmd: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
                          start_new_session=True)   # hydra clean-up kills the whole process group


def load(out: Path) -> dict:
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def processes_matching(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (read from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(d.name))
    return pids


def wait_gone(marker: str, timeout: float) -> float:
    """Seconds until no process mentions `marker`; fails the test after `timeout`."""
    t0 = time.monotonic()
    while processes_matching(marker):
        if time.monotonic() - t0 > timeout:
            left = processes_matching(marker)
            for pid in left:                                   # do not leave them behind
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            pytest.fail(f"processes still running after {timeout} s: {left}")
        time.sleep(0.05)
    return time.monotonic() - t0


def rank_pid(marker: str, rank: int, timeout: float = 20) -> int:
    """Pid of the MPI process of rank `rank` (by PMI_RANK in its environment; a worker's supervisor
    has the same environment, so the deepest matching process is the rank itself)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = []
        for pid in processes_matching(marker):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = parent_pid(pid)
            if not ppid:
                continue
            if f"PMI_RANK={rank}".encode() in env and b"python" in cmd:
                found.append((pid, ppid))
        pids = {p for p, _ in found}
        inner = [p for p, pp in found if pp in pids]
        if inner or (found and rank == 0):
            return (inner or [found[0][0]])[0]
        time.sleep(0.05)
    pytest.fail(f"rank {rank} of {marker} never showed up")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        ppid = parent_pid(int(d.name))
        if not ppid:
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pids: list[int]) -> list[int]:
    """The pids that still exist and are not zombies."""
    left = []
    for pid in pids:
        if process_state(pid) not in ("Z", ""):
            left.append(pid)
    return left


def still_alive_after(pids: list[int], since: float, limit: float, step: float = 0.05) -> list[int]:
    """Wait until none of `pids` is alive or `limit` seconds have passed since `since` (a monotonic
    time); return the ones still alive (empty: all gone in time)."""
    while alive(pids) and time.monotonic() - since < limit:
        time.sleep(step)
    return alive(pids)


def first_within(poll, seconds: float, step: float = 0.02):
    """The first value other than None that poll() gives within `seconds` (None if it never does)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = poll()
        if found is not None:
            return found
        time.sleep(step)
    return None


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    """A process's environment ({} once it is gone)."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def signal_and_collect(proc: subprocess.Popen, pid: int, sig: int, timeout: float = 10) -> tuple[str, float, float]:
    """Send `sig` to `pid` (a process of proc's job) and wait for the job to end: its stderr, the
    monotonic time of the signal, and the seconds until the job ended (fails after `timeout`)."""
    assert proc.poll() is None, "the job ended before the signal"
    os.kill(pid, sig)
    t_sig = time.monotonic()
    _, stderr = proc.communicate(timeout=timeout)
    return stderr, t_sig, time.monotonic() - t_sig


def idle_cpu_of_ranks(cmd: list[str], out: Path, ranks: tuple[int, ...]) -> list[float]:
    """Run a driver job started with --idle: while the head sleeps, the share of a core each of `ranks`
    used over 2 s; the job must then end with 0."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "idle", proc.stderr.read()
        pids = [rank_pid(str(out), r) for r in ranks]
        time.sleep(0.3)                                    # the waits are past their young phase
        before = [cpu_seconds(p) for p in pids]
        time.sleep(2.0)
        used = [(cpu_seconds(p) - b) / 2.0 for p, b in zip(pids, before)]
        proc.communicate(timeout=30)
        assert proc.returncode == 0
        return used
    finally:
        if proc.poll() is None:
            proc.kill()


def run_watching_ranks(cmd: list[str], env: dict) -> tuple[subprocess.Popen, str, set[int]]:
    """Run a job to its end, collecting the pids of its process tree while it runs: (proc, stderr, pids)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    seen: set[int] = set()
    while proc.poll() is None:                             # collect the spawned ranks while they run
        seen.update(descendants(proc.pid))
        time.sleep(0.02)
    _, stderr = proc.communicate()
    return proc, stderr, seen


OTHER_HOST = "127.0.0.2"       # the other host's name (an address, so nothing needs to resolve it)


def other_host_or_skip() -> None:
    """Skip (with the reason) unless a process can be given another host name here (unshare --uts)."""
    probe = subprocess.run(["unshare", "--uts", "sh", "-c", f"hostname {OTHER_HOST} && hostname"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != OTHER_HOST:
        pytest.skip(f"cannot give a process another host name here (unshare --uts: {probe.stderr.strip()})")
