"""Helpers for the end-to-end tests: how to start llama-mpi (1 process, spawn, mpiexec), tag every
process it starts, and check afterwards that none of them is left behind."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from core.procfs import process_state
from mpi_helpers import cmdline

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "fixtures" / "models" / "stories260K.gguf"
PROMPTS = REPO / "prompts"
TAG_VAR = "LLAMA_MPI_TEST_TAG"


def stories_or_skip() -> str:
    if not STORIES.is_file():
        pytest.skip(f"stories260K fixture not found at {STORIES}")
    return str(STORIES)


def mpiexec_or_skip() -> str:
    exe = Path(sys.executable).parent / "mpiexec"
    found = str(exe) if exe.is_file() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec")
    return found


def tagged_env(tmp_path: Path, **extra: str) -> tuple[dict, str]:
    """An environment whose processes carry a unique tag (and a private history/cache folder)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_VAR: tag}, XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), TERM="xterm", COLUMNS="120", LINES="40")
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env, tag


def tagged_pids(tag: str) -> list[int]:
    """Processes (other than us) whose environment carries the tag."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


class StderrLines:
    """A running job's stderr lines as they come (a thread reads them), and every line seen so far."""

    def __init__(self, proc: subprocess.Popen):
        self.seen: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line.rstrip("\n")) for line in proc.stderr],
                         daemon=True).start()

    def until(self, found: Callable[[str], bool], timeout: float) -> str | None:
        """The first line for which found() is true within `timeout` s (None if none came)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if found(line):
                return line
        return None


def kill_job(proc, tag: str) -> None:
    """Clean-up after a job test: the job's process group and every tagged process, by SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def assert_no_rank_left(tag: str, grace_s: float = 8.0) -> None:
    deadline = time.monotonic() + grace_s
    while True:
        left = [p for p in tagged_pids(tag) if process_state(p) not in ("Z", "")]   # "": gone
        if not left:
            return
        if time.monotonic() > deadline:
            cmdlines = [cmdline(p) for p in left]
            for p in left:                          # do not leave them running for the next test
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
            raise AssertionError(f"processes left behind: {cmdlines}")
        time.sleep(0.2)



def chat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "chat", *args]


def run_chat(args: list[str], env: dict, mpiexec_n: int | None = None, timeout: float = 120,
             stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run llama-mpi to completion with pipes (no terminal)."""
    cmd = chat_cmd(*args)
    if mpiexec_n is not None:
        cmd = [mpiexec_or_skip(), "-n", str(mpiexec_n), *cmd]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          input=stdin if stdin is not None else "", errors="replace")


def conversation_part(markdown: str) -> str:
    """A transcript up to its `## Run` section (what must not depend on the rank count)."""
    return markdown.split("\n## Run\n")[0]
