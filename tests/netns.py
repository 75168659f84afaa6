"""Two hosts on one machine joined by a real network link, for tests whose MPI traffic must not take
shared memory: network namespaces A and B (named, like their hosts, after this process), one end of a
veth pair in each with an address that exists only inside them (10.254.0.1/30, 10.254.0.2/30; neither
namespace has any other interface than its loopback, nor a route elsewhere, so nothing leaves them), a
hosts file per namespace naming both, and tests/in_netns.sh, hydra's ssh stand-in, which starts a host's
ranks inside its namespace under its host name. MPI goes over the link with UCX_TLS=tcp and
UCX_NET_DEVICES (the veth ends share one name); hydra's own connections follow the host names, which
resolve only to the link's addresses.

`two_hosts()` makes them and always removes them, with any process left inside; the `netns` fixture
(root only, skipped with the reason elsewhere) gives one pair per test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from core.procfs import process_state

DEVICE = "lmpi0"                       # the veth end's name, the same inside both namespaces
ADDRESS = "10.254.0.{}"                # .1 and .2 of a /30 that exists only inside the namespaces
LAUNCHER = Path(__file__).with_name("in_netns.sh")
NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass(frozen=True)
class TwoHosts:
    head: str                          # the first namespace and its host name: the head runs here
    other: str                         # the second one
    hostfile: Path                     # hydra's hostfile: one slot on each

    @property
    def env(self) -> dict[str, str]:
        """What puts MPI on the link: UCX over TCP, on the veth only (no shared memory, no loopback)."""
        return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": DEVICE}

    def address(self, host: str) -> str:
        return ADDRESS.format(1 if host == self.head else 2)

    def on(self, host: str, argv: list[str]) -> list[str]:
        """argv run inside `host`'s namespace under its host name."""
        return ["ip", "netns", "exec", host, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                host, *argv]

    def mpiexec(self, mpiexec: str, head: list[str], other: list[str], per_host: int = 1) -> list[str]:
        """mpiexec started on the head's host, running `head` there as ranks 0 .. per_host-1 and `other` as
        the next `per_host` ranks on the other host (through the ssh stand-in)."""
        hosts = (["-f", str(self.hostfile)] if per_host == 1
                 else ["-hosts", f"{self.head}:{per_host},{self.other}:{per_host}"])
        return self.on(self.head, [mpiexec, "-launcher", "ssh", "-launcher-exec", str(LAUNCHER), *hosts,
                                   "-n", str(per_host), *head, ":", "-n", str(per_host), *other])

    def link(self, host: str, up: bool) -> None:
        """Take `host`'s end of the link down (or up again), from inside its namespace."""
        _ip("-n", host, "link", "set", DEVICE, "up" if up else "down")

    def pids(self) -> list[int]:
        """Every process inside either namespace."""
        found = []
        for ns in (self.head, self.other):
            out = _ip("netns", "pids", ns, check=False).stdout
            found += [int(p) for p in out.split()]
        return found

    def snapshot(self) -> str:
        """For a failure message: every process inside either namespace (pid, state, command) and each
        namespace's TCP sockets with their states (`ss -tan`), e.g. a connection stuck half-open."""
        lines = []
        for pid in self.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            lines.append(f"{pid} {process_state(pid) or 'gone'} {cmd[:100]}")
        for ns in (self.head, self.other):
            try:
                ss = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tan"], capture_output=True, text=True)
                lines.append(f"{ns} ss -tan:\n{ss.stdout.strip() or ss.stderr.strip()}")
            except OSError as exc:
                lines.append(f"{ns}: no ss ({exc})")
        return "\n".join(lines)

    def tx_bytes(self, host: str) -> int:
        """Bytes `host` has sent over the link so far."""
        info = json.loads(_ip("-n", host, "-s", "-j", "link", "show", DEVICE).stdout)[0]
        return int(info["stats64"]["tx"]["bytes"])


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no '{tool}' command"
    probe = f"lmpi{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@contextmanager
def two_hosts(workdir: Path) -> Iterator[TwoHosts]:
    """Make the two namespaces, their link and hosts files; remove everything on the way out."""
    tag = f"lmpi{os.getpid()}"
    hosts = TwoHosts(f"{tag}a", f"{tag}b", workdir / "hostfile")
    veth = (f"{tag}va"[-15:], f"{tag}vb"[-15:])        # names in the root namespace, before the move
    try:
        for ns in (hosts.head, hosts.other):
            _ip("netns", "add", ns)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for ns, end in zip((hosts.head, hosts.other), veth):
            _ip("link", "set", end, "netns", ns)
            _ip("-n", ns, "link", "set", end, "name", DEVICE)
            _ip("-n", ns, "addr", "add", f"{hosts.address(ns)}/30", "dev", DEVICE)
            _ip("-n", ns, "link", "set", DEVICE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(
                f"127.0.0.1 localhost\n::1 localhost\n{hosts.address(hosts.head)} {hosts.head}\n"
                f"{hosts.address(hosts.other)} {hosts.other}\n")
        hosts.hostfile.write_text(f"{hosts.head}:1\n{hosts.other}:1\n")
        yield hosts
    finally:
        left = _remove(hosts, veth)
        if left:
            raise RuntimeError(f"could not remove: {', '.join(left)}")


def _remove(hosts: TwoHosts, veth: tuple[str, str]) -> list[str]:
    """Kill what still runs inside, delete namespaces, veth and hosts files; what could not be removed."""
    for pid in hosts.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while hosts.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    for ns in (hosts.head, hosts.other):
        _ip("netns", "del", ns, check=False)            # takes its veth end, and so the pair, with it
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    for end in veth:
        _ip("link", "del", end, check=False)            # still in the root namespace if the move failed
    listed = _ip("netns", "list", check=False).stdout.split()
    links = _ip("-o", "link", "show", check=False).stdout
    return ([ns for ns in (hosts.head, hosts.other) if ns in listed or (NETNS_ETC / ns).exists()]
            + [end for end in veth if f" {end}@" in links or f" {end}:" in links])


@pytest.fixture
def netns(tmp_path) -> Iterator[TwoHosts]:
    """Two namespaces joined by a veth pair (see the module's docstring), removed after the test."""
    reason = unavailable()
    if reason:
        pytest.skip(f"no two-namespace network here: {reason}")
    with two_hosts(tmp_path) as hosts:
        yield hosts
