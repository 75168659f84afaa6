"""Procfs: the few facts this project reads from Linux's /proc, each parsed in one place.

Owns reading a process's stat line (its fields after the command name, which may itself hold spaces and
parentheses) and the `KEY: N kB` lines of /proc files. Where /proc is missing or the process is gone,
each reader says so with an empty value instead of raising. Must not import anything of this project.
"""
from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...] (utime, stime at 11, 12); [] once the
    process is gone or where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_state(pid: int) -> str:
    """A process's state letter ("R" running, "S" sleeping, "T" stopped, "Z" zombie); "" where unknown."""
    fields = stat_fields(pid)
    return fields[0] if fields else ""


def parent_pid(pid: int) -> int:
    """A process's parent pid (0 once it is gone)."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0


def cpu_seconds(pid: int) -> float:
    """CPU time a live process has used (user + system), in seconds."""
    fields = stat_fields(pid)
    if not fields:
        raise ProcessLookupError(f"no process {pid} in /proc")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_bytes(path: str, key: str) -> int:
    """The `KEY: N kB` line of a /proc file, in bytes (0 where unavailable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
