"""`python -m core.tools.tokenize -m FILE "text"`: tokenize text with a GGUF model's vocabulary, like llama.cpp.

Prints each token as `id -> 'piece'` (llama.cpp main's --verbose-prompt), or the id list with --json,
or, with --inp X.inp, one line per test case of a llama.cpp test-vector file in the .out format (no BOS,
no special-token parsing), so that `diff` against X.out checks a whole vocabulary.
Owns the command line only; the tokenizer is core/tokenizer/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import LlamaMpiError, UsageError
from core.tokenizer import Tokenizer

TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


def read_test_cases(path: Path) -> list[str]:
    """The texts of a llama.cpp `.inp` file (split on the separator; the file ends with one)."""
    try:
        data = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"--inp: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--inp: {path} is not UTF-8") from None
    cases = data.split(TEST_SEPARATOR)
    if cases and cases[-1] == "":
        cases.pop()
    return cases


def format_out_line(ids: list[int]) -> str:
    """One line of a llama.cpp `.out` file: every id preceded by a space."""
    return "".join(f" {i}" for i in ids)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m core.tools.tokenize", description=__doc__.splitlines()[0])
    ap.add_argument("text", nargs="?", help="text to tokenize")
    ap.add_argument("-m", "--model", required=True, type=Path, help="GGUF file (model or vocab-only)")
    ap.add_argument("-f", "--file", type=Path, help="read the text from this file (taken as is)")
    ap.add_argument("--inp", type=Path, help="tokenize every case of a llama.cpp .inp test-vector file")
    ap.add_argument("--json", action="store_true", help="print the ids as a JSON list only")
    ap.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS (default: the model's rule)")
    ap.add_argument("--special", action="store_true",
                    help="parse special tokens such as <s> or <|eot_id|> in the text")
    return ap.parse_args(argv)


def _text_from(args: argparse.Namespace) -> str:
    given = [x for x in (args.text is not None, args.file is not None, args.inp is not None) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of: TEXT, --file F, --inp X.inp")
    if args.file is None:
        return args.text
    try:
        return args.file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"--file: cannot read {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--file: {args.file} is not UTF-8") from None


def run(args: argparse.Namespace, out=None) -> None:
    out = sys.stdout if out is None else out
    text = _text_from(args)
    tok = Tokenizer.from_path(args.model)
    if args.inp is not None:
        for case in read_test_cases(args.inp):
            print(format_out_line(tok.encode(case, add_bos=False)), file=out)
        return
    ids = tok.encode(text, add_bos=False if args.no_bos else None, parse_special=args.special)
    if args.json:
        print(json.dumps(ids), file=out)
        return
    print(f"prompt: {text!r}", file=out)
    print(f"number of tokens in prompt = {len(ids)}", file=out)
    for i in ids:
        piece = tok.token_to_piece(i).decode("utf-8", "replace")
        print(f"{i:6d} -> '{piece}'", file=out)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        run(args)
    except LlamaMpiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
