"""Tensor-parallel groups over MPI (issue 11): how `--tp N` lays ranks out, and the group's part of a step.

Owns the layout (ranks form consecutive groups of N, one group per pipeline stage; a stage's head is its TP
index 0), its validation (a one-line error before anything loads), each rank's shard of its stage, and the
two things a group does around a step that core/pipeline.py's step protocol does not: handing the final
hidden rows to stage 0's group and gathering its vocab-split logits on rank 0. It must not import mpi4py
(core/transport.py's Group moves the bytes) nor decide the order of a step (core/pipeline.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UsageError
from .shard import TPShard, assemble_logits, plan_stage


@dataclass(frozen=True)
class Layout:
    """`size` ranks in consecutive groups of `tp`: group s is pipeline stage s, ranks s*tp .. s*tp+tp-1."""
    size: int
    tp: int = 1

    def __post_init__(self) -> None:
        check_tp(self.size, self.tp)

    @property
    def n_stages(self) -> int:
        return self.size // self.tp

    def stage(self, rank: int) -> int:
        return rank // self.tp

    def index(self, rank: int) -> int:
        """The rank's TP index in its group (0: the stage's head)."""
        return rank % self.tp

    def head(self, stage: int) -> int:
        """The rank that talks to the previous and the next stage."""
        return stage * self.tp

    def ranks(self, stage: int) -> range:
        return range(stage * self.tp, (stage + 1) * self.tp)

    def per_rank(self, per_stage: list) -> list:
        """A per-stage list (layer ranges, shards' plans...) repeated for every rank of each stage."""
        return [per_stage[self.stage(r)] for r in range(self.size)]

    def per_stage_of(self, per_rank: list) -> list[range]:
        """Every stage's layers from the per-rank list of (start, stop) pairs (or ranges)."""
        return [range(*_bounds(per_rank[self.head(s)])) for s in range(self.n_stages)]


def _bounds(r) -> tuple[int, int]:
    return (r.start, r.stop) if isinstance(r, range) else tuple(r)


def check_tp(size: int, tp: int) -> None:
    """Raise a one-line UsageError unless `size` ranks form whole groups of `tp`."""
    if tp < 1:
        raise UsageError(f"--tp must be at least 1, got {tp}")
    if size % tp:
        raise UsageError(f"--tp {tp}: the cluster has {size} rank{'s' if size != 1 else ''}, not a multiple of {tp} "
                         f"(ranks form groups of {tp}, one group per pipeline stage)")


def stage_shards(model: Any, layers: list[range], tp: int) -> list[tuple[TPShard, ...]] | None:
    """Every stage's TP shares (core.shard.plan_stage), or None for --tp 1; checked before loading."""
    if tp == 1:
        return None
    return [plan_stage(model, stage_layers, tp) for stage_layers in layers]


@dataclass
class TPContext:
    """One rank's place in the layout, its group (core.transport.Group; None when tp == 1) and the shares
    of every rank of its stage (core.shard.plan_stage; None when tp == 1)."""
    layout: Layout
    rank: int
    group: Any = None
    shards: tuple[TPShard, ...] | None = None

    @property
    def stage(self) -> int:
        return self.layout.stage(self.rank)

    @property
    def index(self) -> int:
        return self.layout.index(self.rank)

    @property
    def leads(self) -> bool:
        """This rank is its stage's head: it receives the stage input and passes the output on."""
        return self.index == 0

    @property
    def shard(self) -> TPShard | None:
        return self.shards[self.index] if self.shards is not None else None

    def stage_args(self) -> dict:
        """Stage(...)'s shard and allreduce for this rank ({} without a group)."""
        if self.group is None:
            return {}
        return {"shard": self.shard, "allreduce": self.group.allreduce_sum}

    @property
    def computes_logits(self) -> bool:
        """A rank of stage 0's group other than the head: it computes its vocab rows for rank 0."""
        return self.group is not None and self.stage == 0 and not self.leads


def single(size: int, rank: int) -> TPContext:
    """The context of today's layer split (groups of one)."""
    return TPContext(Layout(size, 1), rank)


def group_logits(tp: TPContext, stage: Any, rows: np.ndarray | None, n_rows: int, meter: Any) -> np.ndarray | None:
    """Stage 0's group computes the logits of the final hidden rows, each rank its vocab rows.

    On rank 0 (the head), `rows` (n_rows, n_embd) are the hidden rows the output head needs: when the
    stages are more than one they came back from the last stage, and are sent to the group's other ranks
    first (in a single stage every rank computed them itself). Returns the (n_rows, n_vocab) logits on rank
    0; None on the other ranks, which send theirs. `meter` counts compute time and bytes sent.
    """
    g = tp.group
    n_embd = stage.config.n_embd
    if tp.leads:
        sends = []
        if rows is not None and tp.layout.n_stages > 1:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            sends = [g.isend(rows, r) for r in range(1, g.size)]
            meter.bytes_sent += rows.nbytes * (g.size - 1)
        parts = [np.empty((n_rows, len(tp.shards[r].vocab)), dtype=np.float32) for r in range(1, g.size)]
        recvs = [g.irecv_into(p, r) for r, p in enumerate(parts, start=1)]
        try:
            t0 = time.perf_counter()
            mine = stage.logits(rows)                                   # (n_rows, len(own vocab))
            meter.compute_s += time.perf_counter() - t0
            for req in sends + recvs:
                g.wait(req)
        except BaseException:
            g.owner.cancel(recvs)
            raise
        return assemble_logits([mine, *parts])                        # (n_rows, n_vocab)
    if rows is None:                                                    # more than one stage: from rank 0
        rows = np.empty((n_rows, n_embd), dtype=np.float32)
        g.wait(g.irecv_into(rows, 0))
    t0 = time.perf_counter()
    part = np.ascontiguousarray(stage.logits(rows), dtype=np.float32)  # (n_rows, len(own vocab))
    meter.compute_s += time.perf_counter() - t0
    g.wait(g.isend(part, 0))
    meter.bytes_sent += part.nbytes
    return None


def hostfile_entries(text: str) -> list[tuple[str, int | None]]:
    """(host, slots or None) of each line of a hostfile: MPICH's `host[:slots]` or Open MPI's
    `host slots=N`, `#` comments and blank lines skipped."""
    entries = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name, _, slots = words[0].partition(":")
        for w in words[1:]:
            if w.startswith("slots="):
                slots = w[6:]
        entries.append((name, int(slots) if slots.isdigit() else None))
    return entries


def spawn_hostfile(text: str, head_host: str, n_workers: int, tp: int) -> str:
    """Spawn mode's hostfile for --tp: the workers placed group by group. The head's N-1 group peers run on
    the head's host; each later group runs whole on one host of the user's hostfile (hostfile_entries),
    hosts in order, a host taking slots // N groups (at least one), round again if the groups outnumber
    them. The result lists `host:count` in launch order, which MPICH's Spawn fills one host after the other."""
    hosts = [(name, 1 if slots is None else max(1, slots // tp)) for name, slots in hostfile_entries(text)]
    counts: list[list] = [[head_host, tp - 1]] if tp > 1 else []
    left, i = n_workers - (tp - 1), 0
    while left > 0 and hosts:
        name, groups = hosts[i % len(hosts)]
        n = min(left, groups * tp)
        if counts and counts[-1][0] == name:
            counts[-1][1] += n
        else:
            counts.append([name, n])
        left -= n
        i += 1
    return "".join(f"{name}:{n}\n" for name, n in counts if n > 0)
