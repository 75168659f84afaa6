"""Tokenizer against llama.cpp's own references: the test vectors in fixtures/vocab/ and index.json.

Expected ids, pieces and texts all come from llama.cpp (files written by the fixture generator); nothing
here is compared with our own earlier output.
"""
from __future__ import annotations

import io
import json
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import FIXTURES, fixture_case_ids, fixtures_or_skip
from core.tools.tokenize import TEST_SEPARATOR, read_test_cases, run
from core.tokenizer import Tokenizer

VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf"]
CLEAN_SPACE_PATTERNS = (" ?", " !", " .", " ,", " '")


@pytest.fixture(scope="module")
def vocab_tokenizers() -> dict[str, Tokenizer]:
    root = fixtures_or_skip() / "vocab"
    return {name: Tokenizer.from_path(root / name) for name in VOCABS}


def _cases(name: str) -> list[tuple[str, list[int]]]:
    root = fixtures_or_skip() / "vocab"
    texts = (root / f"{name}.inp").read_bytes().decode("utf-8").split(TEST_SEPARATOR)
    assert texts[-1] == "", "the .inp file ends with a separator"
    lines = (root / f"{name}.out").read_bytes().decode("utf-8").split("\n")
    return [(text, [int(x) for x in lines[i].split()]) for i, text in enumerate(texts[:-1])]


@pytest.mark.parametrize("name", VOCABS)
def test_all_test_vectors_match(vocab_tokenizers, name):
    cases = _cases(name)
    assert len(cases) == 46
    tok = vocab_tokenizers[name]
    wrong = [(text, tok.encode(text, add_bos=False), ids) for text, ids in cases
             if tok.encode(text, add_bos=False) != ids]
    assert not wrong, f"{len(wrong)}/{len(cases)} cases differ, first: {wrong[0]!r}"


@pytest.mark.parametrize("name", VOCABS)
def test_cli_inp_output_equals_out_file(name, fixtures):
    root = fixtures / "vocab"
    out = io.StringIO()
    run(Namespace(model=root / name, text=None, file=None, inp=root / f"{name}.inp", json=False,
                  no_bos=False, special=False), out=out)
    assert out.getvalue() == (root / f"{name}.out").read_bytes().decode("utf-8")


@pytest.mark.parametrize("name", VOCABS)
def test_round_trip_where_llama_cpp_round_trips(vocab_tokenizers, name, fixture_index):
    tok = vocab_tokenizers[name]
    cases = _cases(name)
    expected_count = next(v["detokenize_roundtrip"] for v in fixture_index["vocab_tests"]
                          if v["vocab"].endswith(name))
    holds = [text for text, ids in cases if tok.decode(ids) == text]
    assert len(holds) == expected_count
    # llama.cpp's own failures come from clean_spaces; every text without those patterns round-trips
    for text, ids in cases:
        if not (tok.vocab.clean_spaces and any(p in text for p in CLEAN_SPACE_PATTERNS)):
            assert tok.decode(ids) == text


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize("opts", [{}, {"remove_special": True}, {"unparse_special": True},
                                  {"strip_leading_space": False}])
def test_streaming_equals_one_shot(vocab_tokenizers, name, opts):
    tok = vocab_tokenizers[name]
    for text, ids in _cases(name):
        for seq in (ids, tok.encode(text), tok.encode(text + "<s></s><|eot_id|>", parse_special=True)):
            dec = tok.stream_decoder(**opts)
            chunks = [dec.add(i) for i in seq] + [dec.flush()]
            assert "".join(chunks) == tok.decode(seq, **opts), (text, opts)
            assert all("\ufffd" not in c for c in chunks) or "\ufffd" in tok.decode(seq, **opts)


# ---- index.json: every model's `tokenize` strings, greedy pieces and prompt tokens ----------------

def _case(case_id: str) -> dict:
    index = json.loads((fixtures_or_skip() / "index.json").read_text())
    return next(c for c in index["cases"] if c["id"] == case_id)


@pytest.mark.parametrize("case_id", fixture_case_ids())
def test_index_tokenizations(case_id):
    case = _case(case_id)
    tok = Tokenizer.from_path(FIXTURES / case["model"])
    assert tok.n_vocab == case["n_vocab"]
    assert (tok.bos_id, tok.eos_id) == (case["bos_token_id"], case["eos_token_id"])
    for entry in case["tokenize"]:
        text = entry["text"]
        assert tok.encode(text) == entry["ids"], text
        assert tok.encode(text, parse_special=True) == entry["ids_parse_special"], text
        assert [tok.token_to_piece(i).hex() for i in entry["ids"]] == entry["pieces_hex"], text
        assert tok.decode(entry["ids"], remove_special=True) == entry["detokenized"], text


@pytest.mark.parametrize("case_id", fixture_case_ids())
def test_index_prompt_and_greedy_pieces(case_id):
    case = _case(case_id)
    tok = Tokenizer.from_path(FIXTURES / case["model"])
    assert tok.encode(case["prompt"])[:31] == case["tokens"]
    greedy = case["greedy"]
    assert [tok.token_to_piece(i).hex() for i in greedy["tokens"]] == greedy["pieces_hex"]
    text = b"".join(tok.token_to_piece(i) for i in greedy["tokens"]).decode("utf-8", "replace")
    assert text == greedy["text"]
    # the same pieces through the streaming decoder (special pieces shown, nothing stripped, no BOS)
    dec = tok.stream_decoder(unparse_special=True, strip_leading_space=False)
    assert "".join(dec.add(i) for i in greedy["tokens"]) + dec.flush() == greedy["text"]


def test_read_test_cases_keeps_carriage_returns(tmp_path: Path):
    f = tmp_path / "x.inp"
    f.write_bytes(b"a\r\nb" + TEST_SEPARATOR.encode() + b"\n" + TEST_SEPARATOR.encode())
    assert read_test_cases(f) == ["a\r\nb", "\n"]
