"""`python -m core.tools.eval`: evaluate token ids on a GGUF model in one process, then continue greedily.

Owns this command line only: the token list is evaluated as one batch (every position's logits, which
`--out` saves as float32 (T, n_vocab)), then `--greedy N` steps of argmax (lowest id on ties) fed back one
token at a time. Prints the continuation's ids (space separated) or, with `--json`, one JSON object with
greedy, top1, load_s, prefill_tok_s, decode_tok_s. Errors are one line `error: ...`, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..errors import LlamaMpiError, UsageError
from ..loader import open_model
from ..generate import Evaluated, GenerateSettings, Token, generate, greedy_sampler
from ..model import Stage
from ..pipeline import LocalPipeline


def parse_tokens(text: str) -> list[int]:
    """'1,15043,3186' -> [1, 15043, 3186]."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise UsageError(f"--tokens must be comma-separated integers, got '{text}'") from None
    if not ids:
        raise UsageError("--tokens is empty")
    return ids


def run(model_path: str, tokens: list[int], greedy: int, threads: int) -> dict:
    """Load, prefill `tokens`, decode `greedy` tokens; return logits, ids and timings."""
    if greedy < 0:
        raise UsageError(f"--greedy must be >= 0, got {greedy}")
    if threads < 1:
        raise UsageError(f"-t/--threads must be >= 1, got {threads}")
    t0 = time.perf_counter()
    model = open_model(model_path)
    n_vocab = model.config.n_vocab
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise UsageError(f"--tokens: id {bad[0]} is out of range [0, {n_vocab}) for {model_path}")
    pipe = LocalPipeline(Stage(model, range(model.config.n_layer), embed=True, head=True,
                               n_ctx=len(tokens) + max(greedy, 1), threads=threads))
    t1 = time.perf_counter()
    settings = GenerateSettings(n_predict=greedy, n_batch=len(tokens), all_logits=True)
    logits, out, t2 = None, [], None
    for event in generate(pipe, greedy_sampler(n_vocab), tokens, settings):
        if isinstance(event, Evaluated) and not event.sampled:
            logits, t2 = event.logits, time.perf_counter()            # (T, n_vocab)
        elif isinstance(event, Token):
            out.append(event.id)                                       # argmax, first index on ties
    t3 = time.perf_counter()
    pipe.close()
    return {
        "logits": logits,
        "greedy": out,
        "top1": [int(i) for i in logits.argmax(axis=1)],
        "load_s": round(t1 - t0, 4),
        "prefill_tok_s": round(len(tokens) / max(t2 - t1, 1e-9), 3),
        "decode_tok_s": round(greedy / max(t3 - t2, 1e-9), 3) if greedy else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.tools.eval",
                                description="Evaluate token ids with a GGUF LLaMA model and continue greedily.")
    p.add_argument("-m", "--model", required=True, help="GGUF model file")
    p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,15043,3186")
    p.add_argument("--greedy", type=int, default=0, metavar="N", help="greedy continuation length")
    p.add_argument("--out", default=None, help="save every input position's logits (.npy, (T, n_vocab) f32)")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the ids")
    args = p.parse_args(argv)
    try:
        result = run(args.model, parse_tokens(args.tokens), args.greedy, args.threads)
        if args.out:
            try:
                np.save(args.out, result["logits"].astype(np.float32))
            except OSError as exc:
                raise UsageError(f"--out {args.out}: {exc.strerror or exc}") from None
    except LlamaMpiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "logits"}))
    else:
        print(" ".join(str(t) for t in result["greedy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
