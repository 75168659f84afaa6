"""The MPI pipeline against the single-process one: real mpiexec (mpich wheel), 1-4 ranks, several splits.

Reference = LocalPipeline in this process (one full Stage). Unpipelined runs must give bit-identical
logits; pipelined prefill (micro-batches, other matmul shapes) identical tokens, logits within 1e-5 of
the logit scale.
"""
from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

from chat.launch import start_cluster
from chat.options import parse_options
from mpi_driver import generate, replay
from mpi_helpers import PROMPT, driver_cmd, idle_cpu_of_ranks, load, model, mpiexec, run

N_GEN = 10


def reference(name: str, n_ctx: int = 512, n_gen: int = N_GEN, keep: int = 0, prompt=PROMPT):
    pipe = start_cluster(parse_options(["-m", model(name), "-c", str(n_ctx)]))
    try:
        return generate(pipe, prompt, n_gen, True, keep)
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def ref_stories():
    return reference("stories260K")


@pytest.fixture(scope="module")
def ref_kquant():
    return reference("fx256-q4_k_m")


CASES = [  # (model, ranks, split)
    ("stories260K", 1, None), ("stories260K", 2, None), ("stories260K", 3, None), ("stories260K", 4, None),
    ("stories260K", 2, "0.5,0.5"), ("stories260K", 2, "0.8,0.2"), ("stories260K", 3, "0.1,0.3,0.6"),
    ("fx256-q4_k_m", 1, None), ("fx256-q4_k_m", 2, "0.5,0.5"), ("fx256-q4_k_m", 2, "0.8,0.2"),
    ("fx256-q4_k_m", 3, None),    # 3 layers: 4 ranks would leave one without a layer (tested in faults)
]


def _ref(name, ref_stories, ref_kquant):
    return ref_stories if name == "stories260K" else ref_kquant


@pytest.mark.parametrize("name, n, split", CASES)
def test_unpipelined_is_bit_identical(tmp_path, name, n, split, ref_stories, ref_kquant):
    out = tmp_path / "r.npz"
    opts = ["-m", model(name)] + (["--mpi-layer-split", split] if split else [])
    r = run(driver_cmd(out, N_GEN, opts, n_ranks=n, extra=["--all-logits"]), env={"LLAMA_MPI_UBATCH": "0"})
    assert r.returncode == 0, r.stderr
    got, (tokens, logits, _) = load(out), _ref(name, ref_stories, ref_kquant)
    assert got["tokens"].tolist() == tokens
    assert np.array_equal(got["logits"], logits)          # every prompt row and every generated step
    assert len(got["ranks"]) == n and sum(got["ranks"]) == {"stories260K": 5}.get(name, 3)


@pytest.mark.parametrize("name, n, split, ubatch", [
    ("stories260K", 2, None, "8"), ("stories260K", 3, "0.1,0.3,0.6", "7"), ("stories260K", 4, None, ""),
    ("fx256-q4_k_m", 2, "0.8,0.2", "16"), ("fx256-q4_k_m", 3, None, "5"),
])
def test_pipelined_prefill_matches(tmp_path, name, n, split, ubatch, ref_stories, ref_kquant):
    out = tmp_path / "p.npz"
    opts = ["-m", model(name)] + (["--mpi-layer-split", split] if split else [])
    r = run(driver_cmd(out, N_GEN, opts, n_ranks=n, extra=["--all-logits"]), env={"LLAMA_MPI_UBATCH": ubatch})
    assert r.returncode == 0, r.stderr
    got, (tokens, logits, _) = load(out), _ref(name, ref_stories, ref_kquant)
    assert got["tokens"].tolist() == tokens
    scale = max(1.0, float(np.abs(logits).max()))
    assert np.abs(got["logits"] - logits).max() <= 1e-5 * scale


def test_spawn_mode_is_bit_identical(tmp_path, ref_stories):
    out = tmp_path / "s.npz"
    r = run(driver_cmd(out, N_GEN, ["-m", model("stories260K"), "--np", "3"], extra=["--all-logits"]),
            env={"LLAMA_MPI_UBATCH": "0"})
    assert r.returncode == 0, r.stderr
    got, (tokens, logits, _) = load(out), ref_stories
    assert got["tokens"].tolist() == tokens and np.array_equal(got["logits"], logits)
    assert got["ranks"].tolist() == [2, 2, 1]


def test_context_shift_mid_generation_same_on_1_and_3_ranks(tmp_path):
    """-c 48 with a 40-token prompt and 40 generated tokens: the cache is shifted mid-generation."""
    ref_tokens, ref_logits, ref_shifts = reference("stories260K", n_ctx=48, n_gen=40, keep=4)
    assert len(ref_shifts) >= 1                                 # the shift really happened
    out = tmp_path / "c.npz"
    r = run(driver_cmd(out, 40, ["-m", model("stories260K"), "-c", "48"], n_ranks=3,
                       extra=["--all-logits", "--keep", "4"]), env={"LLAMA_MPI_UBATCH": "0"})
    assert r.returncode == 0, r.stderr
    got = load(out)
    assert got["shifts"].tolist() == ref_shifts
    assert got["tokens"].tolist() == ref_tokens
    assert np.array_equal(got["logits"], ref_logits)


def test_idle_workers_do_not_spin(tmp_path):
    """While the head waits (for user input), each worker polls with sleeps: <= 5% of a core."""
    out = tmp_path / "i.npz"
    cmd = driver_cmd(out, 2, ["-m", model("stories260K")], n_ranks=3, extra=["--idle", "3"])
    used = idle_cpu_of_ranks(cmd, out, (1, 2))
    assert max(used) <= 0.05, used


@pytest.mark.parametrize("opts", [[], ["--tp", "2"]])
def test_a_workers_wait_is_inside_steps_not_while_the_head_idles(tmp_path, opts):
    """/stats' wait ms: the time a rank waits for its peers during steps. A worker waiting for the next control
    message while the head waits for the user (here 2 s) is idle, not waiting: it used to count, so a worker's
    wait per token grew with the user's pauses."""
    out = tmp_path / "w.npz"
    r = run(driver_cmd(out, 4, ["-m", model("stories260K"), *opts], n_ranks=2, extra=["--idle", "2"]))
    assert r.returncode == 0, r.stderr
    wait_ms = load(out)["wait_ms"]
    assert len(wait_ms) == 2 and max(wait_ms) < 1000, wait_ms


def test_a_wait_polls_fast_while_young_then_backs_off():
    """Sleeps double from 20 us, capped at 100 us for the first 50 ms (the next token or micro-batch is
    about to come), 2 ms until 1 s, 10 ms after (an idle worker)."""
    from core.transport import next_poll_delay
    assert next_poll_delay(20e-6, 0.0) == 40e-6
    assert next_poll_delay(80e-6, 0.010) == 100e-6
    assert next_poll_delay(100e-6, 0.049) == 100e-6
    assert next_poll_delay(100e-6, 0.051) == 200e-6
    assert next_poll_delay(0.0016, 0.5) == 0.002
    assert next_poll_delay(0.002, 1.5) == 0.004
    assert next_poll_delay(0.008, 30.0) == 0.010


def test_cli_greedy_text_is_the_same_on_every_launch_mode():
    """The real entry point (python -m chat, i.e. llama-mpi): one process, mpiexec -n 2..4, spawn."""
    base = [sys.executable, "-m", "chat", "-m", model("stories260K"), "-p", "Once upon a time", "-n", "24",
            "--temp", "0"]
    single = run(base)
    assert single.returncode == 0, single.stderr
    assert single.stdout.startswith(" Once upon a time") and len(single.stdout) > 40
    runs = [run([mpiexec(), "-n", str(n)] + base) for n in (2, 3, 4)]
    runs.append(run(base + ["--np", "3", "--mpi-layer-split", "0.1,0.3,0.6"]))
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert r.stdout == single.stdout


def test_kv_truncate_and_clear_are_replayed_on_every_rank(tmp_path, ref_stories):
    """After generating: truncate to the prompt and feed the same tokens again, then clear and run
    everything as one batch. Bit-identical to the same sequence on the single-process pipeline."""
    out = tmp_path / "kv.npz"
    r = run(driver_cmd(out, N_GEN, ["-m", model("stories260K")], n_ranks=3, extra=["--all-logits", "--replay"]),
            env={"LLAMA_MPI_UBATCH": "0"})
    assert r.returncode == 0, r.stderr
    got = load(out)
    tokens, logits, _ = ref_stories
    pipe = start_cluster(parse_options(["-m", model("stories260K"), "-c", "512"]))
    try:
        generate(pipe, PROMPT, N_GEN, True, 0)
        again, whole = replay(pipe, PROMPT, tokens)
    finally:
        pipe.close()
    n_prompt = len(PROMPT)
    assert np.array_equal(again, logits[n_prompt:-1])              # truncation really dropped the steps
    assert np.array_equal(got["again"], again)
    assert np.array_equal(got["whole"], whole)
    assert got["n_past_after"].tolist() == [n_prompt + N_GEN - 1] * 3            # every rank in step


def test_stats_per_rank(tmp_path):
    """bytes sent per token: a full (T, n_embd) f32 hop per token from every rank but the last, which
    sends back one row per evaluation (1 prompt batch + N_GEN steps over len(PROMPT) + N_GEN tokens)."""
    out = tmp_path / "st.npz"
    r = run(driver_cmd(out, N_GEN, ["-m", model("stories260K")], n_ranks=3), env={"LLAMA_MPI_UBATCH": "0"})
    assert r.returncode == 0, r.stderr
    got = load(out)
    n_embd = 64
    n_tokens = len(PROMPT) + N_GEN
    assert got["bytes_per_token"][:2].tolist() == [4.0 * n_embd] * 2
    assert got["bytes_per_token"][2] == pytest.approx(4.0 * n_embd * (1 + N_GEN) / n_tokens)
    assert got["n_past"].tolist() == [n_tokens] * 3
    assert got["ranks"].tolist() == [2, 2, 1] and (got["compute_ms"] > 0).all()
    assert set(got["hosts"].tolist()) == {socket.gethostname()}


def test_cli_context_shift_same_on_1_and_3_ranks():
    base = [sys.executable, "-m", "chat", "-m", model("stories260K"), "-p", "Once upon a time", "-n", "120",
            "-c", "48", "--temp", "0"]
    single = run(base)
    assert single.returncode == 0, single.stderr
    assert len(single.stdout) > 300                      # far past the 48-token context: it shifted
    three = run([mpiexec(), "-n", "3"] + base)
    assert three.returncode == 0, three.stderr
    assert three.stdout == single.stdout
