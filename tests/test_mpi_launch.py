"""Start-up pieces that need no cluster (chat/launch.py, core/cluster.py): mode choice, hostfile checks, the
plan's byte counts, the fault hook, node-local threads."""
from __future__ import annotations

import socket

import pytest

from chat import launch
from chat.options import parse_options
from core import cluster, faults
from core.errors import UsageError
from core.loader import open_model
from mpi_helpers import model

LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)


def test_launch_mode(no_launcher, monkeypatch):
    assert cluster.launch_mode(parse_options(["-m", "x.gguf"]).np) == "single"
    assert cluster.launch_mode(parse_options(["-m", "x.gguf", "--np", "1"]).np) == "single"
    assert cluster.launch_mode(parse_options(["-m", "x.gguf", "--np", "3"]).np) == "spawn"
    monkeypatch.setenv("PMI_RANK", "0")
    assert cluster.launch_mode(parse_options(["-m", "x.gguf"]).np) == "mpiexec"
    with pytest.raises(UsageError, match="--np starts its own workers"):
        cluster.launch_mode(parse_options(["-m", "x.gguf", "--np", "3"]).np)


def test_single_process_plan_and_split_check(no_launcher):
    pipe = launch.start_cluster(parse_options(["-m", model("stories260K"), "-c", "64"]))
    try:
        [rank] = pipe.plan.ranks
        assert pipe.plan.mode == "single" and rank.layers == range(5) and rank.kv_bytes == 2 * 5 * 64 * 4 * 8 * 4
        assert "layers 0-4" in str(pipe.plan)
    finally:
        pipe.close()
    with pytest.raises(UsageError, match="2 weights but the cluster has 1 rank"):
        launch.start_cluster(parse_options(["-m", model("stories260K"), "--mpi-layer-split", "1,1"]))


def test_rank_plan_counts_the_slices_tensors():
    m = open_model(model("stories260K"))
    sizes = {t.name: int(t.n_bytes) for t in m.reader.tensors}
    head = cluster.rank_plan(m, 0, "h", range(0, 2), 32, "p", 1)
    tail = cluster.rank_plan(m, 1, "h", range(2, 5), 32, "p", 1)
    blocks = lambda layers: sum(v for k, v in sizes.items() if k.split(".")[:2] in [["blk", str(i)] for i in layers])
    head_only = sum(sizes[k] for k in ("token_embd.weight", "output_norm.weight", "output.weight") if k in sizes)
    assert head.weight_bytes == blocks(range(2)) + head_only
    assert tail.weight_bytes == blocks(range(2, 5))
    assert head.weight_bytes + tail.weight_bytes == sum(sizes.values()) - sizes.get("rope_freqs.weight", 0)


def test_hostfile_checks(tmp_path):
    good = tmp_path / "hosts"
    good.write_text(f"# head first\n{socket.gethostname()}:2\nlocalhost slots=2\n\n")
    assert launch.check_hostfile(str(good)) == [socket.gethostname(), "localhost"]
    with pytest.raises(UsageError, match="not found"):
        launch.check_hostfile(str(tmp_path / "none"))
    bad = tmp_path / "bad"
    bad.write_text("localhost:1\nno-such-host.invalid:1\n")
    with pytest.raises(UsageError, match="host 'no-such-host.invalid' .* cannot be resolved"):
        launch.check_hostfile(str(bad))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(UsageError, match="names no host"):
        launch.check_hostfile(str(empty))


def test_fault_hook_and_local_threads(monkeypatch):
    assert faults.fault_after(None, 1) is None
    assert faults.fault_after("1:3", 1) == 3 and faults.fault_after("1:3", 2) is None
    monkeypatch.setattr("sys.argv", ["llama-mpi", "opts.txt"])
    assert launch._local_threads(parse_options(["-m", "x.gguf"])) is None          # the head's applies
    monkeypatch.setattr("sys.argv", ["llama-mpi", "-t", "3"])
    assert launch._local_threads(parse_options(["-m", "x.gguf", "-t", "3"])) == 3


def test_blas_threads_can_be_capped():
    assert cluster.limit_blas_threads(1) is True
