"""Pipeline benchmark: pipelined vs unpipelined prefill, an idle worker's CPU, and per-rank RSS.

    python -m core.tools.pipeline_bench [--model FILE] [--ranks 2] [--tokens 256] [--threads 1] [--idle 5]

Without --model it writes a TinyLlama-shaped synthetic Q4_0 file (core.tools.synth) to a temporary
folder. It re-runs itself under the mpich wheel's mpiexec (`--job`), where core.cluster starts the ranks
as for a chat; the head prints one table. Owns nothing the engine uses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..procfs import cpu_seconds


def _job(args: argparse.Namespace) -> int:
    """One rank of the benchmark job (run under mpiexec)."""
    from ..cluster import ClusterSettings, start

    settings = ClusterSettings(model=str(args.model), n_ctx=args.tokens + 8, threads=args.threads, ubatch=0)
    pipe = start(settings, "mpiexec")
    if pipe is None:                                              # a worker: served until the head closed
        return 0
    t, layers = pipe.t, pipe.layers
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, pipe.config.n_vocab, size=args.tokens).tolist()
    pipe.eval(prompt[:8])                                         # warm-up: pages in, pools up
    pipe.kv_clear()
    result: dict = {"model": str(args.model), "ranks": t.size, "tokens": args.tokens, "threads": args.threads,
                    "layers": [[r.start, r.stop] for r in layers]}
    logits, best, compute = {}, {}, {}
    for _ in range(args.repeat):                                  # interleaved: fair under varying load
        for name, ub in (("unpipelined", 0), ("pipelined", args.ubatch)):
            pipe.ubatch = ub
            pipe.kv_clear()
            before = [s.compute_ms for s in pipe.stats()]
            cpu0 = [cpu_seconds(p.pid) for p in t.peers]
            t0 = time.perf_counter()
            logits[name] = pipe.eval(prompt)                      # (n_vocab,)
            wall = time.perf_counter() - t0
            cpu = [cpu_seconds(p.pid) - c for p, c in zip(t.peers, cpu0)]
            if wall < best.get(name, float("inf")):
                best[name] = wall
                compute[name] = [(s.compute_ms - b) / 1e3 for s, b in zip(pipe.stats(), before)]
                result[f"{name}_cpu_s"] = cpu                     # CPU the ranks got (same host)
    for name in best:
        result[f"{name}_s"] = best[name]
        result[f"{name}_compute_s"] = compute[name]               # per rank, in the best run
    from ..pipeline import choose_ubatch
    result["ubatch"] = choose_ubatch(args.tokens, t.size, args.ubatch)
    result["speedup"] = result["unpipelined_s"] / result["pipelined_s"]
    result["max_abs_logit_diff"] = float(np.abs(logits["pipelined"] - logits["unpipelined"]).max())
    result["same_argmax"] = bool(np.argmax(logits["pipelined"]) == np.argmax(logits["unpipelined"]))
    stats = pipe.stats()
    result["rss_mib"] = [s.rss_bytes / 2**20 for s in stats]
    result["weight_mib"] = [s.weight_bytes / 2**20 for s in stats]
    result["kv_mib"] = [s.kv_bytes / 2**20 for s in stats]
    # an idle worker: the head makes no MPI call for `idle` seconds, as when it waits for user input
    workers = [p for p in t.peers[1:] if p.host == t.host]
    before = {p.rank: cpu_seconds(p.pid) for p in workers}
    time.sleep(args.idle)
    result["idle_cpu_percent"] = {p.rank: 100.0 * (cpu_seconds(p.pid) - before[p.rank]) / args.idle
                                  for p in workers}
    pipe.close()
    print(json.dumps(result), flush=True)
    return 0


def _report(r: dict) -> str:
    lines = [f"model {r['model']}: {r['ranks']} ranks x {r['threads']} thread(s), layers {r['layers']}",
             f"prefill of {r['tokens']} tokens: unpipelined {r['unpipelined_s']:.3f} s, pipelined "
             f"(micro-batches of {r['ubatch']}) {r['pipelined_s']:.3f} s -> speed-up {r['speedup']:.2f}x "
             f"(max |logit diff| {r['max_abs_logit_diff']:.2e}, same argmax: {r['same_argmax']})"]
    for name in ("unpipelined", "pipelined"):
        busy = r[f"{name}_compute_s"]
        cpu = r[f"{name}_cpu_s"]
        lines.append(f"  {name}: compute per rank {', '.join(f'{c:.3f} s' for c in busy)} (CPU time "
                     f"{', '.join(f'{c:.3f} s' for c in cpu)}); ranks busy "
                     f"{100 * sum(busy) / (len(busy) * r[f'{name}_s']):.0f}% of the wall time")
    m, n = -(-r["tokens"] // r["ubatch"]), r["ranks"]
    grew = sum(r["pipelined_compute_s"]) / sum(r["unpipelined_compute_s"])
    lines.append(f"  bounds: {m} micro-batches through {n} stages cannot beat {n * m / (n + m - 1):.2f}x (fill and drain); "
                 f"the ranks' compute grew {100 * (grew - 1):.0f}% when micro-batched (smaller products, "
                 f"busy cores side by side), which leaves {n * m / (n + m - 1) / grew:.2f}x")
    for rank, (rss, w, kv) in enumerate(zip(r["rss_mib"], r["weight_mib"], r["kv_mib"])):
        share = w + kv
        lines.append(f"rank {rank}: RSS {rss:7.1f} MiB; share (weights {w:.1f} + KV {kv:.1f}) {share:7.1f} MiB; "
                     f"budget share*1.2+150 = {share * 1.2 + 150:7.1f} MiB")
    for rank, pct in r["idle_cpu_percent"].items():
        lines.append(f"rank {rank} idle CPU over {r['idle_s']:.0f} s: {pct:.2f}% of a core")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.tools.pipeline_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="GGUF file (default: synthetic TinyLlama-shaped Q4_0)")
    p.add_argument("--n-layer", type=int, default=None, help="layers of the synthetic file (default 22)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ubatch", type=int, default=None, help="micro-batch size (default: automatic)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle worker CPU measurement")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        return _job(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from .synth import write_synthetic
            args.model = write_synthetic(Path(tmp) / "tinyllama-q4_0.gguf", preset="tinyllama", qtype="q4_0",
                                         n_layer=args.n_layer)
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec), "-n", str(args.ranks), sys.executable, "-m", "core.tools.pipeline_bench", "--job",
               "--model", str(args.model), "--tokens", str(args.tokens), "--threads", str(args.threads),
               "--repeat", str(args.repeat), "--idle", str(args.idle)]
        if args.ubatch is not None:
            cmd += ["--ubatch", str(args.ubatch)]
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["idle_s"] = args.idle
        print(json.dumps(result) if args.json else _report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
