"""python -m core.tools.tp_products: one layer's matrix products, whole against each TP share.

Prints, for one layer of a model (default: a TinyLlama-shaped Q4_0 synthetic file, written once and cached
under /tmp), the time of its four products (attn_qkv: q, k and v stacked, attn_output, ffn_gate_up: gate
and up stacked, ffn_down; core/model.py's Block) on the whole matrices and on every rank's share of a
--tp N split (one thread, the shares one after another: what one rank per core would run), and the
speed-up of the slowest share over the whole. No all-reduce, no attention: the upper bound TP can reach
on the products. Times are the minimum over --repeats runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..loader import open_model
from ..model import Block, Stage
from ..shard import plan_stage
from .synth import write_synthetic

DEFAULT_MODEL = Path("/tmp/llama-mpi-tinyllama-q4_0.gguf")
PRODUCTS = [f for f in Block.__dataclass_fields__ if not f.endswith("norm")]


def product_times(blocks: dict[str, Block], T: int, repeats: int,
                  rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Seconds (minimum over repeats) of each product of each block on a random (T, n_in) input; the
    blocks take turns within each repeat, so a machine whose load changes slows them alike."""
    xs = {n: rng.standard_normal((T, getattr(next(iter(blocks.values())), n).shape[1])).astype(np.float32)
          for n in PRODUCTS}
    best = {label: dict.fromkeys(PRODUCTS, float("inf")) for label in blocks}
    for _ in range(repeats):
        for label, block in blocks.items():
            for name in PRODUCTS:
                w, x = getattr(block, name), xs[name]
                if w.shape[1] != x.shape[1]:                            # a share's input columns
                    x = x[:, :w.shape[1]]
                t0 = time.perf_counter()
                w.matmul(x)
                best[label][name] = min(best[label][name], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.tools.tp_products", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                   help=f"GGUF file (default {DEFAULT_MODEL}, written from the tinyllama preset if missing)")
    p.add_argument("--tp", type=int, default=2, help="TP group size (default 2)")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--tokens", type=int, nargs="+", default=[1], help="batch sizes T (default 1)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    path = Path(args.model)
    if not path.exists() and path == DEFAULT_MODEL:
        print(f"writing {path} (tinyllama preset, q4_0) ...", flush=True)
        write_synthetic(path, "tinyllama", "q4_0")
    model = open_model(path)
    layers = range(args.layer, args.layer + 1)
    plan = plan_stage(model, layers, args.tp)
    whole = Stage(model, layers, embed=False, head=False, n_ctx=8)
    shards = [Stage(model, layers, embed=False, head=False, n_ctx=8, shard=s, allreduce=lambda a: a)
              for s in plan]
    print(f"{path.name}, layer {args.layer}, --tp {args.tp}: " + "; ".join(s.describe() for s in plan))
    rng = np.random.default_rng(0)
    for T in args.tokens:
        blocks = {"whole": whole.blocks[0]} | {f"rank {i}": s.blocks[0] for i, s in enumerate(shards)}
        rows = product_times(blocks, T, args.repeats, rng)
        print(f"\nT = {T}: ms per product (min of {args.repeats})")
        print(f"{'':>8} " + " ".join(f"{n:>11}" for n in PRODUCTS) + f" {'sum':>8}")
        for label, t in rows.items():
            print(f"{label:>8} " + " ".join(f"{1e3 * t[n]:>11.3f}" for n in PRODUCTS)
                  + f" {1e3 * sum(t.values()):>8.3f}")
        total = sum(rows["whole"].values())
        slowest = max(sum(t.values()) for label, t in rows.items() if label != "whole")
        print(f"whole / slowest share: {total / slowest:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
