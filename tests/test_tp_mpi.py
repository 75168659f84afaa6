"""Tensor parallelism over MPI (issue 11): `--tp N` runs under the real mpiexec (mpich wheel) and in spawn mode
against one process. Greedy tokens identical and logits within 1e-4 (each rank sums its share: the order of
the additions differs from one process); stages of TP groups (2-D), pipelined prefill, KV edits and context
shifts replayed on every rank, per-rank stats, f32 weights, threads inside a rank, and the one-line errors.
Failures of a TP rank are in test_faults.py.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from chat.launch import start_cluster
from chat.options import parse_options
from core.tools.synth import write_synthetic
from mpi_driver import generate, replay
from mpi_helpers import PROMPT, REPO, driver_cmd, idle_cpu_of_ranks, load, model, mpiexec, run

N_GEN = 8
ATOL = 1e-4


def reference(path: str, n_ctx: int = 512, n_gen: int = N_GEN, keep: int = 0, prompt=PROMPT):
    pipe = start_cluster(parse_options(["-m", path, "-c", str(n_ctx)]))
    try:
        return generate(pipe, prompt, n_gen, True, keep)
    finally:
        pipe.close()


_REFS: dict = {}


def ref(path: str, **kw):
    key = (path, tuple(sorted(kw.items())))
    if key not in _REFS:
        _REFS[key] = reference(path, **kw)
    return _REFS[key]


def check(got: dict, want, atol: float = ATOL) -> None:
    tokens, logits, _ = want
    assert got["tokens"].tolist() == tokens
    assert got["logits"].shape == logits.shape
    np.testing.assert_allclose(got["logits"], logits, atol=atol, rtol=0)


def tp_run(tmp_path, path: str, n: int | None, tp: int, *, n_gen: int = N_GEN, opts=(), extra=(), env=None,
           prompt=PROMPT, timeout: float = 120) -> dict:
    out = tmp_path / f"tp-{n}-{tp}.npz"
    cmd = driver_cmd(out, n_gen, ["-m", path, "--tp", str(tp), *opts], n_ranks=n, prompt=prompt,
                     extra=["--all-logits", *extra])
    r = run(cmd, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return load(out)


CASES = [  # (model, ranks, tp): ranks // tp stages
    ("stories260K", 2, 2), ("stories260K", 3, 3), ("stories260K", 4, 4), ("stories260K", 4, 2),
    ("fx256-q4_k_m", 2, 2), ("fx256-q4_k_m", 3, 3), ("fx256-q4_k_m", 4, 4), ("fx256-q4_k_m", 4, 2),
    ("fx256-q2_k", 2, 2), ("fx256-iq4_xs", 3, 3), ("fx256-q6_k", 4, 2),
]


@pytest.mark.parametrize("name, n, tp", CASES)
def test_tp_matches_one_process(tmp_path, name, n, tp):
    got = tp_run(tmp_path, model(name), n, tp)
    check(got, ref(model(name)))
    assert got["tp"].tolist() == [r % tp for r in range(n)]
    n_layer = {"stories260K": 5}.get(name, 3)
    assert sum(got["ranks"][::tp]) == n_layer                              # each stage's layers, once
    assert all(len(set(got["ranks"][s:s + tp])) == 1 for s in range(0, n, tp))   # the same in a group
    assert got["n_past"].tolist() == [len(PROMPT) + N_GEN] * n             # every rank's cache in step


@pytest.mark.parametrize("n, tp, method", [(3, 3, "p2p"), (4, 2, "p2p"), (3, 3, "mpi"), (4, 2, "mpi")])
def test_other_allreduce_methods(tmp_path, n, tp, method):
    """The point-to-point exchange and MPI_Iallreduce (LLAMA_MPI_ALLREDUCE; a shared window is the default)
    give the same."""
    got = tp_run(tmp_path, model("fx256-q4_k_m"), n, tp, env={"LLAMA_MPI_ALLREDUCE": method})
    check(got, ref(model("fx256-q4_k_m")))


def test_2d_pipelined_prefill_and_stats(tmp_path):
    """2 stages of --tp 2 with micro-batches of 8: stage 1's group works on micro-batch i while stage 0's
    works on i+1. Per-rank stats: the TP index, each rank about half of its stage's weights and KV."""
    got = tp_run(tmp_path, model("stories260K"), 4, 2, env={"LLAMA_MPI_UBATCH": "8"})
    check(got, ref(model("stories260K")))
    assert got["tp"].tolist() == [0, 1, 0, 1] and got["ranks"].tolist() == [3, 3, 2, 2]
    assert (got["compute_ms"] > 0).all()
    assert got["kv_bytes"].tolist() == [2 * 3 * 512 * 2 * 8 * 4] * 2 + [2 * 2 * 512 * 2 * 8 * 4] * 2   # 2 of 4 KV heads


def test_kv_edits_and_context_shift_replayed_on_every_rank(tmp_path):
    """Truncate to the prompt and feed the same tokens again, then clear and evaluate all in one batch; and
    a -c 48 run whose cache shifts mid-generation: the same as one process on 2 stages of --tp 2."""
    path = model("stories260K")
    got = tp_run(tmp_path, path, 4, 2, extra=["--replay"])
    tokens, logits, _ = ref(path)
    pipe = start_cluster(parse_options(["-m", path, "-c", "512"]))
    try:
        generate(pipe, PROMPT, N_GEN, True, 0)
        again, whole = replay(pipe, PROMPT, tokens)
    finally:
        pipe.close()
    np.testing.assert_allclose(got["again"], again, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got["whole"], whole, atol=ATOL, rtol=0)
    assert got["n_past_after"].tolist() == [len(PROMPT) + N_GEN - 1] * 4

    want = reference(path, n_ctx=48, n_gen=40, keep=4)
    assert len(want[2]) >= 1                                             # the shift really happened
    got = tp_run(tmp_path, path, 4, 2, n_gen=40, opts=["-c", "48"], extra=["--keep", "4"])
    assert got["shifts"].tolist() == want[2]
    check(got, want)


def test_spawn_mode(tmp_path):
    got = tp_run(tmp_path, model("fx256-q4_k_m"), None, 2, opts=["--np", "2"])
    check(got, ref(model("fx256-q4_k_m")))
    assert got["tp"].tolist() == [0, 1]


@pytest.fixture(scope="module")
def mqa_model(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("mqa") / "mqa-q4_0.gguf", "mqa", "q4_0", seed=3))


@pytest.mark.parametrize("n, tp", [(2, 2), (3, 3)])
def test_mqa_one_kv_head(tmp_path, mqa_model, n, tp):
    """1 KV head (replicated on every rank), head_dim 128, n_ff 1376 = 43 blocks of 32 (22 + 21 on 2)."""
    got = tp_run(tmp_path, mqa_model, n, tp)
    check(got, ref(mqa_model))
    assert got["kv_bytes"].tolist() == [2 * 2 * 512 * 1 * 128 * 4] * n


def test_smollm2(tmp_path, smollm2_model):
    """9 heads / 3 KV heads on 2 ranks (5 + 4 heads; KV head 1 on both), tied Q8_0 LM head split by vocab.
    2e-4: over its 30 layers the sums differ by up to 1.3e-4 (measured, as in test_tp.py)."""
    prompt = [1, 4093, 314, 253, 1345, 5718]
    path = str(smollm2_model)
    got = tp_run(tmp_path, path, 2, 2, n_gen=4, prompt=prompt, timeout=240)
    check(got, reference(path, n_gen=4, prompt=prompt), atol=2e-4)


def test_f32_weights_and_threads_inside_each_rank(tmp_path):
    """--weights f32 (dequantized at load, BLAS products) with -t 2 threads per rank on a 2 x 2 layout."""
    path = model("fx256-q4_k_m")
    got = tp_run(tmp_path, path, 4, 2, opts=["--weights", "f32", "-t", "2"])
    check(got, ref(path))
    f32 = tp_run(tmp_path, path, 2, 2, opts=["--weights", "f32"])
    native = tp_run(tmp_path, path, 2, 2)
    assert (f32["weight_bytes"] > 4 * native["weight_bytes"]).all()        # Q4_K -> f32: 4.5 bits -> 32


@pytest.mark.parametrize("n, opts, line", [
    (3, ["--tp", "2"], "error: --tp 2: the cluster has 3 ranks, not a multiple of 2 (ranks form groups of 2, "
                       "one group per pipeline stage)"),
    (4, ["--tp", "2", "--mpi-layer-split", "1,1,1,1"],
     "error: --mpi-layer-split has 4 weights but the cluster has 2 stages (give one weight per stage)"),
    (4, ["--tp", "2", "-c", "64", "--mpi-layer-split", "1,0"],
     "error: stage 1 would get no layer: --mpi-layer-split 1,0 of 5 layers over 2 stages (use fewer stages "
     "or give stage 1 a larger weight)"),
])
def test_layout_errors_are_one_line_before_loading(tmp_path, n, opts, line):
    out = tmp_path / "e.npz"
    r = run(driver_cmd(out, 2, ["-m", model("stories260K"), *opts], n_ranks=n))
    assert r.returncode != 0
    assert [x for x in r.stderr.splitlines() if x.strip()] == [line]


@pytest.mark.parametrize("var, value, line", [
    ("LLAMA_MPI_ALLREDUCE", "bogus", "error: LLAMA_MPI_ALLREDUCE=bogus: expected one of shm, p2p, mpi, mpi-blocking"),
    ("LLAMA_MPI_UBATCH", "x", "error: LLAMA_MPI_UBATCH=x: expected a number of tokens (0: no pipelined prefill; "
                              "unset: automatic)"),
])
@pytest.mark.parametrize("launch", ["mpiexec", "spawn"])
def test_bad_environment_is_one_line_from_rank_0(var, value, line, launch):
    """An engine setting from the environment is checked with the options: one line, status 2, before
    anything starts (a bad LLAMA_MPI_ALLREDUCE printed a traceback from every rank, then status 1, or 137 in
    spawn mode)."""
    cli = [sys.executable, "-m", "chat", "-m", model("stories260K"), "-p", "Hi", "-n", "2", "--tp", "2"]
    cmd = [mpiexec(), "-n", "2", *cli] if launch == "mpiexec" else [*cli, "--np", "2"]
    r = run(cmd, env={var: value}, timeout=60)
    assert r.returncode == 2
    assert [x for x in r.stderr.splitlines() if x.strip()] == [line]


def test_single_process_refuses_tp():
    r = run([sys.executable, "-m", "chat", "-m", model("stories260K"), "-p", "Hi", "-n", "2", "--tp", "2"])
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --tp 2 splits every layer over 2 MPI ranks: run under mpiexec -n 2 or "
                                "with --np 2 (in one process, -t N adds threads)")


def test_cli_text_the_same_in_every_launch_mode(tmp_path):
    """llama-mpi itself: one process without --tp; mpiexec -n 2 with --tp 2 in an options file; spawn mode
    --np 4 --tp 2 (2 stages). The plan names stage and TP index of every rank."""
    base = ["-m", model("stories260K"), "-p", "Once upon a time", "-n", "16", "--temp", "0"]
    cli = [sys.executable, "-m", "chat"]
    single = run(cli + base)
    assert single.returncode == 0, single.stderr
    opts = tmp_path / "opts.txt"
    opts.write_text(" ".join(f"'{a}'" for a in base) + " --tp 2\n")
    under = run([mpiexec(), "-n", "2", *cli, str(opts)])
    spawn = run(cli + base + ["--np", "4", "--tp", "2"])
    for r in (under, spawn):
        assert r.returncode == 0, r.stderr
        assert r.stdout == single.stdout
    rows = [line.split() for line in spawn.stderr.splitlines() if line.strip().startswith("rank ")]
    assert [row[3:7] for row in rows] == [["stage", "0", "TP", "0/2"], ["stage", "0", "TP", "1/2"],
                                          ["stage", "1", "TP", "0/2"], ["stage", "1", "TP", "1/2"]]


def test_idle_tp_ranks_do_not_spin(tmp_path):
    """While the head waits (for user input), every other rank of a 2 x 2 layout sleeps: <= 5% of a core."""
    out = tmp_path / "i.npz"
    cmd = driver_cmd(out, 2, ["-m", model("stories260K"), "--tp", "2"], n_ranks=4, extra=["--idle", "3"])
    used = idle_cpu_of_ranks(cmd, out, (1, 2, 3))
    assert max(used) <= 0.05, used


def tinyllama_q4_0() -> str:
    """The TinyLlama-shaped Q4_0 synthetic file the tools cache under /tmp (written once, atomically)."""
    from core.tools.tp_bench import DEFAULT_MODEL
    if not DEFAULT_MODEL.exists():
        tmp = DEFAULT_MODEL.with_name(f"{DEFAULT_MODEL.name}.{os.getpid()}")
        write_synthetic(tmp, "tinyllama", "q4_0")
        os.replace(tmp, DEFAULT_MODEL)
    return str(DEFAULT_MODEL)


def test_rss_per_rank_under_tp2_tinyllama_shaped(tmp_path):
    """Each of 2 ranks holds about half of the one stage: RSS <= half the stage's weights x 1.2 + its KV
    + 150 MB (the interpreter, numpy and scratch), measured after a prefill and two decoded tokens."""
    from core.loader import open_model
    path = tinyllama_q4_0()
    stage_bytes = sum(int(t.n_bytes) for t in open_model(path).reader.tensors)
    got = tp_run(tmp_path, path, 2, 2, n_gen=2, prompt=PROMPT[:16], opts=["-c", "256"])
    for rss, kv in zip(got["rss"], got["kv_bytes"]):
        assert rss <= stage_bytes / 2 * 1.2 + kv + 150 * 2**20, (rss / 2**20, stage_bytes / 2**21, kv / 2**20)


@pytest.mark.parametrize("n, method, used", [(2, None, "shm"), (3, None, "shm"), (4, None, "shm"), (2, "mpi", "mpi"),
                                              (3, "p2p", "p2p")])
def test_group_sum_is_the_rank_order_sum_on_every_rank(n, method, used):
    """A group on one host sums through a shared window by default (LLAMA_MPI_ALLREDUCE=shm): every rank gets
    the same bits, the partials added in rank order, call after call (both sets of slots), and a partial too
    big for a slot goes through MPI_Iallreduce."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    if method:
        env["LLAMA_MPI_ALLREDUCE"] = method
    r = run([mpiexec(), "-n", str(n), sys.executable, str(REPO / "tests" / "group_sum_job.py")], env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["method"] == used
    assert all(c["same_on_all"] and c["shape_ok"] for c in out["checks"]) and len(out["checks"]) == 10
    exact = [c["rank_order_sum"] for c in out["checks"]]
    if used == "shm":
        assert all(exact[:7] + exact[8:])                                  # MPI's order is its own (index 7)
    elif used == "p2p":
        assert all(exact)
