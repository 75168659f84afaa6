"""--tp across two hosts on one machine (tests/as_another_host.sh gives a rank another host name): spawn mode
fills hosts group by group, so a TP group never straddles two hosts; the text equals one process's."""
from __future__ import annotations

import socket
import sys

import pytest

from mpi_helpers import OTHER_HOST, REPO, model, other_host_or_skip, run

LAUNCHER = REPO / "tests" / "as_another_host.sh"
OTHER = OTHER_HOST
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def other_host_env():
    other_host_or_skip()
    return {"HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(LAUNCHER)}


def test_spawn_mode_places_tp_groups_whole_on_hosts(other_host_env, tmp_path):
    """--np 4 --tp 2 with a hostfile naming only the other host: the head's TP peer stays on the head's host
    (group 0), stage 1's group goes whole to the other host."""
    hosts = tmp_path / "hostsfile"
    hosts.write_text(f"{OTHER}:2\n")
    args = ["-m", model("stories260K"), "-p", "Once upon a time", "-n", "12", "--temp", "0"]
    r = run([sys.executable, "-m", "chat", "--np", "4", "--tp", "2", "--hostfile", str(hosts), *args],
            env=other_host_env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stderr.splitlines() if line.strip().startswith("rank ")]
    assert [(row[1], row[2], row[4], row[6]) for row in rows] == [
        ("0", HOST, "0", "0/2"), ("1", HOST, "0", "1/2"), ("2", OTHER, "1", "0/2"), ("3", OTHER, "1", "1/2")]
    single = run([sys.executable, "-m", "chat", *args])
    assert single.returncode == 0 and r.stdout == single.stdout
