"""--tp's pieces that need no cluster (issue 11): the layout of ranks in groups, spawn mode's group-by-group
hostfile, the plan's rows and byte counts per TP share, the f32 memory check, and the options."""
from __future__ import annotations

import pytest

from chat.options import parse_options
from core import cluster
from core.cluster import Plan, RankPlan, memory_problems, rank_plan
from core.errors import UsageError
from core.loader import open_model
from core.shard import f32_bytes, plan_stage, share_bytes
from core.tp_group import Layout, spawn_hostfile
from mpi_helpers import model


def test_layout_groups_consecutive_ranks_into_stages():
    lay = Layout(6, 2)
    assert lay.n_stages == 3
    assert [lay.stage(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [lay.index(r) for r in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [lay.head(s) for s in range(3)] == [0, 2, 4] and lay.ranks(1) == range(2, 4)
    assert lay.per_rank(["a", "b", "c"]) == ["a", "a", "b", "b", "c", "c"]
    assert lay.per_stage_of([(0, 3), (0, 3), (3, 5), (3, 5), (5, 9), (5, 9)]) == [range(3), range(3, 5), range(5, 9)]
    assert Layout(3).n_stages == 3 and Layout(3).stage(2) == 2


@pytest.mark.parametrize("size, tp, message", [
    (3, 2, "--tp 2: the cluster has 3 ranks, not a multiple of 2 (ranks form groups of 2, one group per "
           "pipeline stage)"),
    (2, 0, "--tp must be at least 1, got 0"),
])
def test_layout_errors(size, tp, message):
    with pytest.raises(UsageError) as err:
        Layout(size, tp)
    assert str(err.value) == message


def test_spawn_hostfile_fills_hosts_group_by_group():
    assert spawn_hostfile("other:2\n", "head", 3, 2) == "head:1\nother:2\n"
    assert spawn_hostfile("# workers\na:4\nb slots=2\n", "head", 7, 2) == "head:1\na:4\nb:2\n"
    assert spawn_hostfile("a\nb\n", "head", 7, 2) == "head:1\na:2\nb:2\na:2\n"      # one group a line, round again
    assert spawn_hostfile("a:8\n", "head", 5, 3) == "head:2\na:3\n"                  # never more than needed
    assert spawn_hostfile("head:4\n", "head", 3, 2) == "head:3\n"


def test_plan_rows_show_stage_tp_index_and_f32():
    rows = tuple(RankPlan(r, "node-a", range(0, 11) if r < 2 else range(11, 22), 100 * 2**20, 2**20, "m.gguf", 1,
                          r // 2, r % 2, 2, "f32" if r >= 2 else "native") for r in range(4))
    text = str(Plan("mpiexec", "m.gguf", 22, 512, rows))
    lines = text.splitlines()
    assert lines[0] == "plan: mpiexec, 4 ranks, 22 layers, n_ctx 512, 2 stage(s) of --tp 2"
    assert lines[2].split()[:9] == ["rank", "1", "node-a", "stage", "0", "TP", "1/2", "layers", "0-10"]
    assert "weights f32" in lines[3] and "weights f32" not in lines[1]


def test_rank_plan_counts_the_tp_share_and_f32_bytes():
    m = open_model(model("fx256-q4_0"))
    shards = plan_stage(m, range(3), 2)
    lay = Layout(2, 2)
    p0, p1 = (rank_plan(m, r, "h", range(3), 64, "p", 1, layout=lay, shard=shards[r]) for r in (0, 1))
    assert p0.weight_bytes == share_bytes(m, range(3), shards[0], head=True) == p1.weight_bytes
    assert p0.kv_bytes == shards[0].kv_bytes(3, 64) and (p1.stage, p1.tp_index, p1.tp_size) == (0, 1, 2)
    whole = rank_plan(m, 0, "h", range(3), 64, "p", 1)
    assert 0.45 * whole.weight_bytes < p0.weight_bytes < 0.55 * whole.weight_bytes   # ~half (norms on both)
    f = rank_plan(m, 1, "h", range(3), 64, "p", 1, layout=lay, shard=shards[1], weights="f32")
    assert f.weights == "f32" and f.weight_bytes == f32_bytes(m, range(3), shards[1], head=True, embed=False)
    assert 6 * p1.weight_bytes < f.weight_bytes < 8 * p1.weight_bytes            # 4.5 bits -> 32 bits a weight


def test_f32_is_refused_where_it_does_not_fit():
    def plan(rank, host, weights, avail):
        return RankPlan(rank, host, range(1), 3 * 2**30, 2**29, "m", 1, weights=weights, mem_available=avail)
    fits = [plan(0, "a", "f32", 8 * 2**30), plan(1, "a", "native", 8 * 2**30)]
    assert memory_problems(fits) == []
    assert memory_problems([plan(0, "a", "native", 2**30)]) == []              # native: never refused
    [(rank, line)] = memory_problems([plan(0, "a", "native", 6 * 2**30), plan(1, "a", "f32", 6 * 2**30),
                                      plan(2, "b", "f32", 8 * 2**30)])
    assert rank == 1 and line == ("--weights f32: ranks 0, 1 on a would hold 7168 MiB of weights and KV cache, "
                                  "more than the 6144 MiB available there (use --weights native on that node)")


def test_single_process_f32_refusal(monkeypatch):
    monkeypatch.setattr(cluster, "mem_available", lambda: 2**20)
    with pytest.raises(UsageError, match=r"--weights f32: rank 0 on .* would hold 1 MiB .* more than the 1 MiB"):
        cluster.start(cluster.ClusterSettings(model("stories260K"), n_ctx=64, weights="f32"), "single")


@pytest.mark.parametrize("argv, message", [
    (["--np", "3", "--tp", "2"], "--tp 2: --np 3 is not a multiple of 2"),
    (["--np", "4", "--tp", "2", "--mpi-layer-split", "1,1,1,1"],
     "--mpi-layer-split has 4 weights but --np 4 with --tp 2 makes 2 stages: give one weight per stage"),
    (["--np", "2", "--tp", "2", "--mpi-layer-split", "1,1"],
     "--mpi-layer-split has 2 weights but --np 2 with --tp 2 makes 1 stage: give one weight per stage"),
    (["--tp", "0"], "--tp 0 is out of range"),
    (["--weights", "f16"], "argument --weights: invalid choice: 'f16'"),
])
def test_options(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_options(["-m", "x.gguf", *argv])
    o = parse_options(["-m", "x.gguf", "--np", "4", "--tp", "2", "--mpi-layer-split", "3,1", "--weights", "f32"])
    assert (o.tp, o.weights, o.mpi_layer_split) == (2, "f32", [3.0, 1.0])
