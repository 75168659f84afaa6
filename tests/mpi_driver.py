"""Test driver for the MPI pipeline (not a test module): greedy generation from token ids, run by the
tests under mpiexec, in spawn mode or in one process. Saves tokens and logits on the head.

usage: python tests/mpi_driver.py OUT.npz PROMPT_IDS N_GEN [--all-logits] [--keep K] [--idle S] [--replay] -- <options>
PROMPT_IDS is "1,2,3". When the context is full it shifts like llama.cpp main: keep K tokens after
position 0, discard half of the rest. <options> are the few llama-mpi options the tests give (see
cluster_args); the cluster starts through core.cluster, never through chat/.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cluster import ClusterSettings, env_ubatch, launch_mode, start   # noqa: E402
from core.errors import LlamaMpiError           # noqa: E402
from core.liveness import DEFAULT_RANK_TIMEOUT_S  # noqa: E402
from core.partition import parse_split          # noqa: E402


def cluster_args(argv: list[str]) -> tuple[ClusterSettings, str, int]:
    """llama-mpi's -m, -c (default 512), -t, --np, --tp, --weights, --rank-timeout and --mpi-layer-split,
    after an options file given first (as on a node): this process's settings, the launch mode and the rank
    count of spawn mode."""
    if argv and not argv[0].startswith("-"):
        argv = shlex.split(Path(argv[0]).read_text(), comments=True) + argv[1:]
    p = argparse.ArgumentParser(prog="mpi_driver.py")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=512)
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("--np", type=int)
    p.add_argument("--mpi-layer-split", type=parse_split)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--weights", choices=("native", "f32"))
    p.add_argument("--rank-timeout", type=float, default=DEFAULT_RANK_TIMEOUT_S)
    a = p.parse_args(argv)
    split = None if a.mpi_layer_split is None else tuple(a.mpi_layer_split)
    settings = ClusterSettings(model=a.model, n_ctx=a.n_ctx, threads=a.threads or 1, local_threads=a.threads,
                               layer_split=split, ubatch=env_ubatch(), tp=a.tp, weights=a.weights or "native",
                               local_weights=a.weights, rank_timeout=a.rank_timeout)
    return settings, launch_mode(a.np), a.np or 1
from core.generate import Evaluated, GenerateSettings, Shifted, Token, greedy_sampler  # noqa: E402
from core.generate import generate as stream                    # noqa: E402


def generate(pipe, prompt: list[int], n_gen: int, all_logits: bool, n_keep: int):
    """core.generate's loop with argmax: the tokens, the logits of the prompt (every position with
    --all-logits, else the last) and of each fed token, and n_past after each context shift."""
    tokens, logits_out, shifts = [], [], []
    settings = GenerateSettings(n_predict=n_gen, n_batch=len(prompt), n_keep=n_keep, all_logits=all_logits)
    for event in stream(pipe, greedy_sampler(pipe.config.n_vocab), prompt, settings):
        if isinstance(event, Token):
            tokens.append(event.id)
        elif isinstance(event, Shifted):
            shifts.append(pipe.n_past)
        elif isinstance(event, Evaluated):
            logits_out.append(event.logits if event.logits.ndim == 2 else event.logits[None, :])
    return tokens, np.concatenate(logits_out), shifts


def replay(pipe, prompt: list[int], tokens: list[int]):
    """KV operations after a generation: truncate back to the prompt and feed the same tokens again,
    then clear and evaluate everything in one batch. Returns both sets of logits."""
    pipe.kv_truncate(len(prompt))
    again = np.stack([pipe.eval([t]) for t in tokens[:-1]])          # (n_gen - 1, n_vocab)
    pipe.kv_clear()
    whole = pipe.eval(prompt + tokens[:-1], all_logits=True)         # (len(prompt) + n_gen - 1, n_vocab)
    return again, whole


def main() -> int:
    argv = sys.argv[1:]
    sep = argv.index("--")
    mine, rest = argv[:sep], argv[sep + 1:]
    out, prompt, n_gen = mine[0], [int(x) for x in mine[1].split(",")], int(mine[2])
    all_logits = "--all-logits" in mine
    n_keep = int(mine[mine.index("--keep") + 1]) if "--keep" in mine else 0
    idle = float(mine[mine.index("--idle") + 1]) if "--idle" in mine else 0.0
    try:
        settings, mode, n_ranks = cluster_args(rest)
        pipe = start(settings, mode, n_ranks)
    except LlamaMpiError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    if pipe is None:
        return 0
    try:
        if idle:                                   # the head waits (as for user input): no MPI calls
            print("idle", flush=True)
            time.sleep(idle)
        tokens, logits, shifts = generate(pipe, prompt, n_gen, all_logits, n_keep)
        stats = pipe.stats()
        extra = {}
        if "--replay" in mine:
            extra["again"], extra["whole"] = replay(pipe, prompt, tokens)
            extra["n_past_after"] = np.array([s.n_past for s in pipe.stats()])
        np.savez(out, tokens=np.array(tokens), logits=logits, shifts=np.array(shifts),
                 ranks=np.array([len(s.layers) for s in stats]), rss=np.array([s.rss_bytes for s in stats]),
                 bytes_per_token=np.array([s.bytes_per_token for s in stats]),
                 n_past=np.array([s.n_past for s in stats]), hosts=np.array([s.host for s in stats]),
                 compute_ms=np.array([s.compute_ms for s in stats]),
                 wait_ms=np.array([s.wait_ms for s in stats]), tp=np.array([s.tp_index for s in stats]),
                 weight_bytes=np.array([s.weight_bytes for s in stats]), kv_bytes=np.array([s.kv_bytes for s in stats]),
                 **extra)
        print("tokens", " ".join(map(str, tokens)), flush=True)
        return 0
    except LlamaMpiError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        pipe.close()


if __name__ == "__main__":
    sys.exit(main())
