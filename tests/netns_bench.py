"""Benchmark (run by hand, root only; not a test): what a real network link costs a 2-rank job, next to
shared memory on one machine.

    sudo .venv/bin/python tests/netns_bench.py [--tokens 32] [--models stories260K,tinyllama] [--rounds 2]

For each model, each split (layer split on 2 ranks, --tp 2) and each path between the ranks (shared
memory: both ranks on this machine, UCX's default transports; veth: rank 1 in a second network namespace
with UCX_TLS=tcp, tests/netns.py), one mpiexec job decodes `--tokens` tokens one at a time after a short
warm-up and the head prints ms per token (median), the engine's activation bytes per token (every rank's
sends, from /stats) and, over the veth, the bytes the link carried per token both ways (MPI's headers, TCP
and the liveness beats included). tinyllama is the TinyLlama-shaped Q4_0 file core.tools.synth writes
(cached as /tmp/llama-mpi-tinyllama-q4_0.gguf). Best of `--rounds` per configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MODELS = {"stories260K": REPO.parent / "shared" / "fixtures" / "models" / "stories260K.gguf",
          "tinyllama": Path("/tmp/llama-mpi-tinyllama-q4_0.gguf")}
SPLITS = {"layer split": [], "--tp 2": ["--tp", "2"]}
LINK = Path("/sys/class/net/lmpi0/statistics")


def _link_bytes() -> int | None:
    """Bytes through this namespace's veth end so far, both ways (None: no link here)."""
    try:
        return sum(int((LINK / f"{way}_bytes").read_text()) for way in ("tx", "rx"))
    except OSError:
        return None


def _job(model: str, tokens: int, tp: int) -> int:
    """(every rank) decode `tokens` tokens one by one; the head prints one RESULT line."""
    import numpy as np

    from core.cluster import ClusterSettings, start
    pipe = start(ClusterSettings(model=model, n_ctx=tokens + 16, tp=tp, ubatch=0), "mpiexec")
    if pipe is None:
        return 0
    try:
        token = 1
        for _ in range(4):                                             # warm-up: pages in, pools up
            token = int(np.argmax(pipe.eval([token])))
        link0, times = _link_bytes(), []
        for _ in range(tokens):
            t0 = time.perf_counter()
            token = int(np.argmax(pipe.eval([token])))
            times.append(time.perf_counter() - t0)
        link1 = _link_bytes()
        stats = pipe.stats()                                           # every eval was one token
        print("RESULT " + json.dumps({
            "ms_per_token": 1e3 * statistics.median(times),
            "engine_bytes_per_token": sum(s.bytes_per_token for s in stats),
            "link_bytes_per_token": None if link0 is None else (link1 - link0) / tokens,
            "hosts": [s.host for s in stats]}), flush=True)
    finally:
        pipe.close()
    return 0


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--models", default="stories260K,tinyllama")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--job", nargs=3, metavar=("MODEL", "TOKENS", "TP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        return _job(args.job[0], int(args.job[1]), int(args.job[2]))

    from netns import two_hosts, unavailable
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    for name in args.models.split(","):
        if name == "tinyllama" and not MODELS[name].exists():
            from core.tools.synth import write_synthetic
            write_synthetic(MODELS[name], preset="tinyllama", qtype="q4_0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, two_hosts(Path(tmp)) as hosts:
        for name in args.models.split(","):
            for split, opts in SPLITS.items():
                tp = 2 if opts else 1
                job = [sys.executable, str(Path(__file__).resolve()), "--job", str(MODELS[name]), str(args.tokens),
                       str(tp)]
                best: dict[str, dict] = {}
                for _ in range(args.rounds):
                    for path in ("shared memory", "veth (TCP)"):
                        if path == "shared memory":
                            cmd, env = [mpiexec, "-n", "2", *job], dict(os.environ)
                        else:
                            cmd, env = hosts.mpiexec(mpiexec, job, job), dict(os.environ, **hosts.env)
                        r = _result(subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                                                   timeout=1800))
                        if path not in best or r["ms_per_token"] < best[path]["ms_per_token"]:
                            best[path] = r
                for path, r in best.items():
                    rows.append((name, split, path, r))
    print(f"{'model':<12} {'split':<12} {'path':<14} {'ms/token':>9} {'engine B/token':>15} {'link B/token':>13}")
    for name, split, path, r in rows:
        link = "-" if r["link_bytes_per_token"] is None else f"{r['link_bytes_per_token']:.0f}"
        print(f"{name:<12} {split:<12} {path:<14} {r['ms_per_token']:>9.2f} {r['engine_bytes_per_token']:>15.0f} "
              f"{link:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
