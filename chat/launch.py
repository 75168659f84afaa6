"""Launch: the `llama-mpi` command's side of starting the engine.

Owns turning the options into the cluster's settings (a worker's node-local -m and -t included) and the
checks that need the user's files (spawn mode's hostfile). The processes, the handshake, the plan and
the signals of a rank are core/cluster.py's; this module must not touch MPI or load the model.
"""
from __future__ import annotations

import socket
import sys
from typing import Callable

from core.cluster import ClusterSettings, LoadWatcher, Plan, env_ubatch, launch_mode, start
from core.errors import UsageError
from core.pipeline import Pipeline
from core.tp_group import hostfile_entries

from .options import ChatOptions, read_user_file


def start_cluster(opts: ChatOptions, on_plan: Callable[[Plan], None] | None = None,
                  watcher: LoadWatcher | None = None) -> Pipeline | None:
    """Start the engine for these options: the head gets a Pipeline, a worker rank serves until the
    head shuts the cluster down and gets None (see core.cluster.start).

    `on_plan` (optional) is called with the plan once every rank agreed and before anything loads;
    `watcher` (optional) follows the load on every rank.
    """
    if opts.model is None:
        raise UsageError("no model: give -m FILE")
    mode = launch_mode(opts.np)
    if mode == "spawn" and opts.hostfile:
        check_hostfile(opts.hostfile)
    return start(cluster_settings(opts), mode, opts.np or 1, opts.hostfile, on_plan, watcher)


def cluster_settings(opts: ChatOptions) -> ClusterSettings:
    """The settings core/cluster.py needs, from the options (LLAMA_MPI_UBATCH for the micro-batch size)."""
    split = opts.mpi_layer_split
    return ClusterSettings(model=opts.model, n_ctx=opts.n_ctx, threads=opts.threads,
                           local_threads=_local_threads(opts),
                           layer_split=None if split is None else tuple(split),
                           rope_freq_base=opts.rope_freq_base, rope_freq_scale=opts.rope_freq_scale,
                           ubatch=env_ubatch(), tp=opts.tp, weights=opts.weights,
                           local_weights=opts.weights if _explicit(opts, "--weights") else None,
                           rank_timeout=opts.rank_timeout)


def check_hostfile(path: str) -> list[str]:
    """Hosts of an MPICH hostfile (`host[:slots]` per line, `#` comments; Open MPI's `host slots=N` is
    read too). Checked before spawning, because hydra's own failure kills the head without a word."""
    text = read_user_file(path, "--hostfile:").decode("utf-8", errors="replace")
    hosts = [name for name, _ in hostfile_entries(text)]
    if not hosts:
        raise UsageError(f"--hostfile: '{path}' names no host")
    for host in hosts:
        try:
            socket.getaddrinfo(host, None)
        except OSError:
            raise UsageError(f"--hostfile: host '{host}' in '{path}' cannot be resolved") from None
    return hosts


def _local_threads(opts: ChatOptions) -> int | None:
    """A worker's own -t, only when its options set it explicitly (else the head's applies)."""
    return opts.threads if _explicit(opts, "-t", "--threads") else None


def _explicit(opts: ChatOptions, *flags: str) -> bool:
    """One of `flags` was typed on this node (its options file or command line)."""
    argv = list(opts.file_argv) + sys.argv[1:]
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)
