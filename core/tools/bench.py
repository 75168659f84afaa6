"""`python -m core.tools.bench`: speed of the numpy quant kernels (and, with --model, of the whole model).

Owns the benchmark of issue 2: per weight type, ms and GB/s (of quantized weight bytes) of a 4096x4096
and an 11008x4096 matrix-vector product, GFLOP/s of a 64-token matrix product, the machine's streaming
read bandwidth measured in the same run and the ratio; with --model, decode and prefill tokens/s of a
TinyLlama-shaped synthetic file of each type (files cached in a temp dir, never in the repository).
Must not: be a test (nothing here asserts), or run long by default. Timings are the best of a few runs.

Usage: python -m core.tools.bench [--types q4_0,q8_0] [--threads N] [--json OUT] [--model [--no-kernels]]
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")    # our tiles call BLAS from each thread themselves

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ..quants import SUPPORTED_TYPES, TilePool, make_qtensor
from ..quants.layout import FORMATS

ORDER = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k",
         "q6_k", "iq4_nl", "iq4_xs"]
SHAPES = [(4096, 4096), (11008, 4096)]
BATCH = 64


def best_time(fn, repeat: int, budget_s: float, clock=time.perf_counter) -> float:
    """Best time of fn() over `repeat` runs (fewer if the budget runs out; at least 2)."""
    best, start = float("inf"), time.perf_counter()
    for i in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


def best_times(fn, repeat: int, budget_s: float) -> tuple[float, float]:
    """Best wall time and best CPU time of this process (all threads) of fn() over the same runs."""
    wall, cpu, start = float("inf"), float("inf"), time.perf_counter()
    for i in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return wall, max(cpu, 1e-9)


def stream_bandwidth(mbytes: int = 256) -> float:
    """Streaming read bandwidth in GB/s: best of a few BLAS dot products over two large arrays."""
    n = mbytes * (1 << 20) // 8
    a = np.ones(n, dtype=np.float32)
    b = np.ones(n, dtype=np.float32)
    return 2 * a.nbytes / best_time(lambda: np.dot(a, b), 6, 3.0) / 1e9


def machine_floors() -> dict:
    """What this machine allows a numpy kernel, measured in the same run as the kernels (DESIGN §4 gives
    these for the machine its targets came from): the uint8 -> float32 conversion of a cache-sized tile
    in ns per element (every quantized weight passes through one), and sgemm GFLOP/s of a 64-row product
    on one such tile (the most a batch product can reach)."""
    codes = np.random.default_rng(1).integers(0, 256, 1 << 19, dtype=np.uint8)       # one 2 MiB f32 tile
    tile = np.empty(codes.size, dtype=np.float32)
    cast = best_time(lambda: np.copyto(tile, codes, casting="unsafe"), 40, 1.0)
    a = np.ones((BATCH, 512), dtype=np.float32)
    b = tile.reshape(512, 1024)                                                       # (k, R) tile
    out = np.empty((BATCH, 1024), dtype=np.float32)
    gemm = best_time(lambda: np.matmul(a, b, out=out), 40, 1.0)
    return {"cast_ns": cast / codes.size * 1e9, "sgemm_GFLOPs": 2 * BATCH * 512 * 1024 / gemm / 1e9}


def random_weight(qt: QT, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """GGUFReader-like data of a random (n_out, n_in) matrix in type qt (valid, finite scales)."""
    if qt in (QT.F32, QT.F16):
        return rng.standard_normal((n_out, n_in), dtype=np.float32).astype(np.float16 if qt == QT.F16 else np.float32)
    if qt == QT.BF16:
        return rng.integers(0x3c00, 0x3f00, (n_out, n_in), dtype=np.uint16).view(np.uint8)
    bs, ts = GGML_QUANT_SIZES[qt]
    blocks = rng.integers(0, 256, (n_out, n_in // bs, ts), dtype=np.uint8)
    for at in FORMATS[qt].f16_at:
        d = (rng.uniform(1e-3, 2e-2, blocks.shape[:2])).astype(np.float16)
        blocks[:, :, at:at + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(n_out, -1)


def bench_type(qt: QT, pool, repeat: int, rng: np.random.Generator) -> dict:
    """Matvec on every SHAPE and a BATCH-token matmul on the first one, for one weight type."""
    row: dict = {"type": qt.name}
    for n_out, n_in in SHAPES:
        data = random_weight(qt, n_out, n_in, rng)
        w = make_qtensor(qt, data, (n_out, n_in))
        x = rng.standard_normal((1, n_in), dtype=np.float32)
        t, cpu = best_times(lambda: w.matmul(x, pool), repeat, 4.0)
        key = f"{n_out}x{n_in}"
        row[key] = {"ms": t * 1e3, "GBps": data.nbytes / t / 1e9, "bytes": int(data.nbytes),
                    "GBps_per_cpu_s": data.nbytes / cpu / 1e9, "mem_ratio": w.nbytes / data.nbytes}
        if (n_out, n_in) == SHAPES[0]:
            xb = rng.standard_normal((BATCH, n_in), dtype=np.float32)
            tb = best_time(lambda: w.matmul(xb, pool), max(2, repeat // 2), 4.0)
            row[f"matmul{BATCH}"] = {"ms": tb * 1e3, "GFLOPs": 2 * BATCH * n_out * n_in / tb / 1e9}
        del w, data
    return row


def print_kernel_table(rows: list[dict], stream: float, floors: dict, threads: int) -> None:
    a, b = (f"{o}x{i}" for o, i in SHAPES)
    print(f"streaming read bandwidth: {stream:.1f} GB/s   threads: {threads}   (best of a few runs; the "
          f"machine is shared, so figures are approximate)")
    print(f"floors of this machine: uint8->f32 conversion {floors['cast_ns']:.3f} ns/element (DESIGN §4's "
          f"machine: ~0.11), sgemm {floors['sgemm_GFLOPs']:.0f} GFLOP/s on a {BATCH}x512 @ 512x1024 tile")
    print("GB/s = quantized weight bytes / best wall time; ratio = that / streaming bandwidth; cpuGB/s = "
          "bytes / best CPU time of the process (less sensitive to other load; all threads summed)")
    print(f"{'type':8} {a + ' ms':>13} {'GB/s':>6} {'cpuGB/s':>7} {b + ' ms':>14} {'GB/s':>6} {'ratio':>6} "
          f"{'mem':>5} {f'{BATCH}-tok ms':>10} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['type']:8} {r[a]['ms']:13.2f} {r[a]['GBps']:6.2f} {r[a]['GBps_per_cpu_s']:7.2f} "
              f"{r[b]['ms']:14.2f} {r[b]['GBps']:6.2f} {r[a]['GBps'] / stream:6.3f} {r[a]['mem_ratio']:5.2f} "
              f"{r[f'matmul{BATCH}']['ms']:10.1f} {r[f'matmul{BATCH}']['GFLOPs']:8.1f}")


def bench_model(type_name: str, threads: int, cache: Path, n_prompt: int, n_decode: int) -> dict:
    """Decode and prefill tokens/s of a TinyLlama-shaped synthetic file of one type."""
    from ..loader import open_model
    from ..generate import Evaluated, GenerateSettings, generate, greedy_sampler
    from ..model import Stage
    from ..pipeline import LocalPipeline
    from .synth import write_synthetic

    path = cache / f"tinyllama-{type_name}.gguf"
    if not path.is_file():
        write_synthetic(path.with_suffix(".part"), preset="tinyllama", qtype=type_name, seed=0)
        path.with_suffix(".part").rename(path)
    model = open_model(path)
    t0 = time.perf_counter()
    pipe = LocalPipeline(Stage(model, range(model.config.n_layer), embed=True, head=True,
                               n_ctx=n_prompt + n_decode + 8, threads=threads))
    load_s = time.perf_counter() - t0
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, model.config.n_vocab, n_prompt)]
    settings = GenerateSettings(n_predict=n_decode, n_batch=n_prompt)
    best_prefill = cpu_prefill = best = cpu = float("inf")
    for _ in range(2):                                      # best of two runs (the first pages weights in)
        pipe.kv_clear()
        events = generate(pipe, greedy_sampler(model.config.n_vocab), tokens, settings)
        while True:                                         # time each evaluation, CPU time included
            t, c = time.perf_counter(), time.process_time()
            event = next(events, None)
            wall, proc = time.perf_counter() - t, time.process_time() - c
            if event is None:
                break
            if isinstance(event, Evaluated) and event.sampled:
                best, cpu = min(best, wall), min(cpu, proc)
            elif isinstance(event, Evaluated):
                best_prefill, cpu_prefill = min(best_prefill, wall), min(cpu_prefill, proc)
    pipe.close()
    return {"type": type_name, "file_bytes": path.stat().st_size, "load_s": load_s,
            "prefill_tok_s": n_prompt / best_prefill, "decode_tok_s": 1.0 / best,
            "prefill_tok_per_cpu_s": n_prompt / max(cpu_prefill, 1e-9), "decode_tok_per_cpu_s": 1.0 / max(cpu, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.tools.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(ORDER), help="comma-separated weight types (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="threads splitting row tiles (default 1)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--repeat", type=int, default=8, help="runs per measurement; the best is kept")
    ap.add_argument("--model", action="store_true", help="also time decode/prefill of TinyLlama-shaped files")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel table (with --model)")
    ap.add_argument("--prompt", type=int, default=64, help="prefill length for --model (default 64)")
    ap.add_argument("--decode", type=int, default=8, help="decode steps for --model (default 8)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "llama-mpi-bench"),
                    help="where synthetic model files are cached (default: a temp dir)")
    args = ap.parse_args(argv)
    names = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    bad = [t for t in names if t.upper() not in QT.__members__ or QT[t.upper()] not in SUPPORTED_TYPES]
    if bad or args.threads < 1:
        print(f"error: unknown type(s) {', '.join(bad)}; choose from {','.join(ORDER)}" if bad
              else "error: --threads must be >= 1", file=sys.stderr)
        return 2
    pool = TilePool(args.threads) if args.threads > 1 else None
    result: dict = {"threads": args.threads, "numpy": np.__version__}
    try:
        if not args.no_kernels:
            stream, floors = stream_bandwidth(), machine_floors()
            rng = np.random.default_rng(0)
            rows = [bench_type(QT[t.upper()], pool, args.repeat, rng) for t in names]
            result |= {"stream_GBps": stream, "floors": floors, "kernels": rows}
            print_kernel_table(rows, stream, floors, args.threads)
        if args.model:
            cache = Path(args.cache)
            cache.mkdir(parents=True, exist_ok=True)
            models = []
            print(f"\n{'type':8} {'file MB':>8} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} "
                  f"{'per CPU-s:':>11} {'prefill':>8} {'decode':>7}   (CPU-s: all threads summed, less "
                  f"sensitive to other load)")
            for t in names:
                m = bench_model(t, args.threads, cache, args.prompt, args.decode)
                models.append(m)
                print(f"{t:8} {m['file_bytes'] / 1e6:8.0f} {m['load_s']:7.1f} {m['prefill_tok_s']:14.1f} "
                      f"{m['decode_tok_s']:13.2f} {'':11} {m['prefill_tok_per_cpu_s']:8.1f} "
                      f"{m['decode_tok_per_cpu_s']:7.2f}", flush=True)
            result["model"] = models
    finally:
        if pool is not None:
            pool.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
