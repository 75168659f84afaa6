"""Tokenizer speed benchmark: `python -m core.tools.tokenizer_bench [VOCAB.gguf ...] [--kb 100] [--repeat 3]`.

Owns: generating ~100 KB of English-like prose (seeded, written here: a small word list and sentence
patterns, no copied text) and timing load, encode and decode for each vocabulary on one core.
Prints one line per vocabulary. Must not be imported by the engine.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from core.tokenizer.tokenizer import Tokenizer

_FIXTURE_VOCABS = [Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "vocab" / name
                   for name in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf")]

_NOUNS = ("river morning village teacher garden engine window market letter mountain harbour lantern "
          "question answer kitchen library student weather bridge forest island painter doctor station "
          "number journey evening machine picture friend winter summer orchard ribbon compass castle "
          "notebook bicycle shadow meadow ocean pencil tower valley whistle factory").split()
_VERBS = ("carried noticed opened painted followed answered crossed repaired described remembered "
          "discovered borrowed measured visited watched counted gathered explained travelled finished "
          "imagined ordered changed wrote built found").split()
_ADJS = ("quiet old bright narrow careful early patient crowded gentle heavy silver golden broken "
         "curious distant simple northern wooden yellow tired clever hidden famous sudden").split()
_ADVS = "slowly quickly carefully almost rarely suddenly quietly happily nearly again".split()
_NAMES = "Anna Tomas Lucia Peter Mirela Jonas Clara Oskar Elena Samuel".split()
_LINKS = ("because although while after before when since unless until whereas").split()


def _sentence(rng: random.Random) -> str:
    n1, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
    pick = rng.randrange(6)
    if pick == 0:
        s = f"The {rng.choice(_ADJS)} {n1} {rng.choice(_VERBS)} the {n2} {rng.choice(_ADVS)}"
    elif pick == 1:
        s = (f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} a {rng.choice(_ADJS)} {n1} "
             f"{rng.choice(_LINKS)} the {n2} was {rng.choice(_ADJS)}")
    elif pick == 2:
        s = f"In {rng.randint(1700, 2024)}, {rng.randint(2, 999)} {n1}s {rng.choice(_VERBS)} the old {n2}"
    elif pick == 3:
        s = (f"\"I don't know,\" said {rng.choice(_NAMES)}, \"but the {n1}'s {n2} isn't "
             f"{rng.choice(_ADJS)} anymore\"")
    elif pick == 4:
        s = f"Why had the {n1} {rng.choice(_VERBS)} every {n2} in the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}?"
        return s
    else:
        s = (f"{rng.choice(_NAMES)} and {rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.randint(3, 60)} "
             f"{n1}s; it cost {rng.randint(1, 90)}.{rng.randint(10, 99)} dollars")
    return s[0].upper() + s[1:] + rng.choice(".....!")


def make_prose(n_bytes: int = 100_000, seed: int = 0) -> str:
    """Deterministic English-like prose of at least `n_bytes` UTF-8 bytes, in paragraphs."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_bytes:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
        paragraphs.append(para)
        size += len(para) + 2
    return "\n\n".join(paragraphs)[:n_bytes]


def bench_one(path: Path, text: str, repeat: int) -> dict[str, float]:
    t0 = time.perf_counter()
    tok = Tokenizer.from_path(path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tok.encode(text, add_bos=False)                 # cold: empty word cache
    cold_s = time.perf_counter() - t0
    warm_s = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        tok.encode(text, add_bos=False)
        warm_s = min(warm_s, time.perf_counter() - t0)
    encoder = tok._encoder
    encoder.cache = None                                  # every word merged from scratch
    t0 = time.perf_counter()
    nocache_ids = encoder.encode((" " + text).replace(" ", "\u2581") if tok.model == "llama" else text)
    nocache_s = time.perf_counter() - t0
    if nocache_ids != ids:
        raise AssertionError(f"{path.name}: uncached encoding differs from cached encoding")
    t0 = time.perf_counter()
    back = tok.decode(ids)
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "tokens": len(ids), "cold_s": cold_s, "warm_s": warm_s,
            "decode_s": decode_s, "nocache_s": nocache_s, "roundtrip": float(back == text)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.tools.tokenizer_bench", description=__doc__.splitlines()[0])
    ap.add_argument("vocabs", nargs="*", type=Path, help="GGUF files (default: the two fixture vocabs)")
    ap.add_argument("--kb", type=float, default=100.0, help="prose size in KB (1000 bytes), default 100")
    ap.add_argument("--repeat", type=int, default=3, help="warm repetitions (best is reported)")
    args = ap.parse_args(argv)
    text = make_prose(int(args.kb * 1000))
    n_bytes = len(text.encode("utf-8"))
    print(f"prose: {n_bytes} bytes, {len(text.split())} words (generated, seed 0); one core, wall clock")
    for path in args.vocabs or _FIXTURE_VOCABS:
        r = bench_one(path, text, args.repeat)
        print(f"{path.name}: load {r['load_s']:.3f} s | {r['tokens']} tokens | "
              f"encode cold {r['cold_s']:.3f} s ({r['tokens'] / r['cold_s']:,.0f} tok/s, "
              f"{r['cold_s'] * 1e5 / n_bytes:.3f} s/100KB) | warm {r['warm_s']:.3f} s "
              f"({r['tokens'] / r['warm_s']:,.0f} tok/s) | no word cache {r['nocache_s']:.3f} s "
              f"({r['tokens'] / r['nocache_s']:,.0f} tok/s) | decode {r['decode_s']:.3f} s | "
              f"round trip {'ok' if r['roundtrip'] else 'differs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
