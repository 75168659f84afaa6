"""`python -m core.tools.paired_bench`: the decode speed of two configurations, measured in turns.

Both jobs load and prefill side by side, then take turns: one decodes a burst of tokens while the other waits
(blocked on a pipe, its workers sleep-polling), then hands over. The first token of every burst is left out of
the figures (its workers may have slept up to 2 ms; core/transport.py's POLL_MAX_S). Each pair of bursts
runs within about a second, so the pair's ratio compares the two configurations at the same speed of the
machine: on a shared host whose speed moves by tens of percent over seconds (core.tools.tp_bench runs one
configuration after the other and sees that as noise), the median of the pair ratios is the steady figure.
Owns nothing the engine uses; asserts nothing.
Every run so far, with its machine: core/tools/TP_NOTES.md.
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

from .tp_bench import (CONFIGS, MIB, _cpu, _mpiexec, add_model_option, ensure_model, job_env, job_settings,
                       others_running, print_machine, split_job_options)

HANDOVER = b"."


# ---- one job (one process, or every rank of an mpiexec job: the head takes the turns) -----------------------

def _job(args: argparse.Namespace) -> int:
    """Load, prefill `--prompt` tokens, then decode `--bursts` bursts of `--burst` tokens, each after reading a
    byte from `--turn-in` and followed by writing one to `--turn-out`; the head prints one JSON line."""
    from ..cluster import launch_mode, start
    from ..generate import Evaluated, GenerateSettings, generate, greedy_sampler

    n_decode = args.bursts * args.burst
    pipe = start(job_settings(args.model, args.prompt + n_decode + 32, args.opts), launch_mode(None))
    if pipe is None:                                                    # a worker: served until shutdown
        return 0
    turn_in = os.open(args.turn_in, os.O_RDWR)                         # RDWR: opening never blocks
    turn_out = os.open(args.turn_out, os.O_RDWR)
    try:
        import numpy as np
        prompt = np.random.default_rng(0).integers(3, pipe.config.n_vocab, size=args.prompt).tolist()
        bursts: list[list[float]] = []
        events = generate(pipe, greedy_sampler(pipe.config.n_vocab), prompt,
                          GenerateSettings(n_predict=n_decode + 8, n_batch=args.prompt))   # ends by break
        for event in events:
            if not isinstance(event, Evaluated):
                continue
            if bursts:                                                 # a decoded token (not the prompt)
                bursts[-1].append(event.ms)
                if len(bursts[-1]) < args.burst:
                    continue
                os.write(turn_out, HANDOVER)                           # burst done: the other job's turn
                if len(bursts) == args.bursts:
                    break
            else:
                print("READY", flush=True)                             # loaded and prefilled
            os.read(turn_in, 1)                                        # our turn
            bursts.append([])
        else:
            raise RuntimeError(f"the generation ended after {sum(map(len, bursts))} tokens")
        print("RESULT " + json.dumps({"bursts": bursts, "ranks": pipe.size}), flush=True)
    finally:
        os.close(turn_in)
        os.close(turn_out)
        pipe.close()
    return 0


# ---- the driver ---------------------------------------------------------------------------------------------

def _cmd(name: str, args: argparse.Namespace, turn_in: Path, turn_out: Path) -> list[str]:
    n, opts = CONFIGS[name]
    cmd = [sys.executable, "-m", "core.tools.paired_bench", "--job", "--model", str(args.model),
           "--prompt", str(args.prompt), "--bursts", str(args.bursts), "--burst", str(args.burst),
           "--turn-in", str(turn_in), "--turn-out", str(turn_out), "--", *opts]
    return [_mpiexec(), "-n", str(n), *cmd] if n > 1 else cmd


def pair_figures(base: list[list[float]], other: list[list[float]]) -> dict:
    """Figures of two jobs' bursts taken in turn (ms per decoded token, each burst's first token dropped):
    each configuration's tok/s over all its bursts, the ratio of those, and every pair's ratio of mean times
    (base / other: > 1 when `other` decodes faster) with their median."""
    a = [b[1:] for b in base]
    o = [b[1:] for b in other]
    pairs = [statistics.fmean(x) / statistics.fmean(y) for x, y in zip(a, o) if x and y]
    tok_s = [1000.0 * sum(map(len, bs)) / sum(map(sum, bs)) for bs in (a, o)]
    return {"tok_s": tok_s, "ratio": tok_s[1] / tok_s[0], "pairs": pairs,
            "median_pair": statistics.median(pairs) if pairs else float("nan")}


def _failed(jobs: list[subprocess.Popen], errs: list) -> None:
    """Stop both jobs and raise with the failed one's last error output."""
    for j in jobs:
        if j.poll() is None:
            j.kill()
        j.wait()
    bad = next((i for i, j in enumerate(jobs) if j.returncode != 0), 0)
    errs[bad].seek(0)
    raise RuntimeError(f"a job failed (exit {jobs[bad].returncode}): {errs[bad].read().strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_job_options(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="python -m core.tools.paired_bench", description=__doc__.splitlines()[0])
    add_model_option(p)
    p.add_argument("--base", default="1 process x 1 thread", help="the configuration to compare against")
    p.add_argument("--other", default="--tp 2", help="the configuration compared (one of: " + ", ".join(CONFIGS) + ")")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before the decode (default 64)")
    p.add_argument("--bursts", type=int, default=30, help="bursts each job decodes (default 30)")
    p.add_argument("--burst", type=int, default=9, help="tokens per burst, the first left out (default 9)")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--turn-in", help=argparse.SUPPRESS)
    p.add_argument("--turn-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.opts = extra
    if args.job:
        return _job(args)
    for name in (args.base, args.other):
        if name not in CONFIGS:
            p.error(f"unknown configuration {name!r}")
    if args.burst < 2 or args.bursts < 1:
        p.error("--burst must be at least 2 (its first token is left out) and --bursts at least 1")
    ensure_model(args.model)
    print_machine(sys.stderr if args.json else sys.stdout, "before")
    env = job_env()
    with tempfile.TemporaryDirectory(prefix="paired-bench-") as tmp:
        fifo = [Path(tmp) / "turn-0", Path(tmp) / "turn-1"]
        for f in fifo:
            os.mkfifo(f)
        errs = [open(Path(tmp) / f"stderr-{i}", "w+") for i in range(2)]
        jobs = [subprocess.Popen(_cmd(name, args, fifo[i], fifo[1 - i]), stdout=subprocess.PIPE,
                                 stderr=errs[i], text=True, env=env)
                for i, name in enumerate((args.base, args.other))]
        try:
            for j in jobs:                                              # both loaded and prefilled
                if not j.stdout.readline().startswith("READY"):
                    _failed(jobs, errs)
            busy = others_running(0.5)
            t0 = time.monotonic()
            kick = os.open(fifo[0], os.O_RDWR)
            os.write(kick, HANDOVER)                                     # the base job starts
            os.close(kick)
            while any(j.poll() is None for j in jobs):                   # a job that fails leaves the
                if any(j.poll() not in (None, 0) for j in jobs):         # other waiting for its turn
                    _failed(jobs, errs)
                time.sleep(0.2)
            wall = time.monotonic() - t0
            results = []
            for j in jobs:
                lines = [line for line in j.stdout.read().splitlines() if line.startswith("RESULT ")]
                if j.returncode != 0 or not lines:
                    _failed(jobs, errs)
                results.append(json.loads(lines[-1][len("RESULT "):]))
        finally:
            for j in jobs:
                if j.poll() is None:
                    j.kill()
                    j.wait()
            for e in errs:
                e.close()
    fig = pair_figures(results[0]["bursts"], results[1]["bursts"])
    fig.update({"cpu": _cpu(), "base": args.base, "other": args.other, "model": str(args.model),
                "others_before": busy, "wall_s": wall, "burst": args.burst, "bursts": args.bursts,
                "ranks": [r["ranks"] for r in results], "ms": [r["bursts"] for r in results]})
    if args.json:
        print(json.dumps(fig))
        return 0
    pairs = fig["pairs"]
    q = ([min(pairs), *statistics.quantiles(pairs, n=4), max(pairs)] if len(pairs) > 1 else pairs * 5)
    print(f"model: {args.model} ({args.model.stat().st_size / MIB:.0f} MiB); {args.bursts} bursts of {args.burst} "
          f"tokens each, in turn, over {wall:.0f} s (other processes running before: {busy:.2f})")
    print(f"  {args.base:<22} decode {fig['tok_s'][0]:7.2f} tok/s")
    print(f"  {args.other:<22} decode {fig['tok_s'][1]:7.2f} tok/s  ({fig['ratio']:.2f}x over all bursts)")
    print(f"  ratio of each pair of bursts: median {fig['median_pair']:.2f}x; min, quartiles, max "
          + ", ".join(f"{v:.2f}" for v in q))
    print("(each burst's first token left out; a pair is one burst of each, run one after the other)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
