"""Pre-tokenizer kinds beyond default/llama3/deepseek: hand-checked splits, and the flags each name sets.

Every expected split below was worked out by hand from llama.cpp's regex list for the kind
(llama-vocab.cpp, llm_tokenizer_bpe's constructor) and how unicode.cpp applies it (each regex refines the
pieces of the previous one; the GPT-2 / Llama 3 strings go through hand-written code, the others through
std::regex with non-ASCII whitespace turned into U+000B). The flags are read off llama_vocab::load's
`tokenizer_pre == ...` chain. None of the values was copied from our own output.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from core.errors import TokenizerError
from core.tokenizer import Tokenizer
from core.tokenizer.bpe import BYTE_TO_CHAR
from core.tokenizer.pretokenize import make_splitter
from core.tokenizer.pretypes import PRE_TYPES


def split(kind: str, text: str) -> list[str]:
    return make_splitter(kind)(text)


# ---- smollm (SmolLM, SmolLM2; also minerva-7b): \p{N}, then the hand-written GPT-2 splitter --------

def test_smollm_digits_one_by_one_even_after_a_space():
    assert split("smollm", "Hi 2024!") == ["Hi", " ", "2", "0", "2", "4", "!"]
    assert split("smollm", "x\u0661\u0662") == ["x", "\u0661", "\u0662"]     # Arabic-Indic digits are \p{N}


def test_smollm_contractions_are_lower_case_only():
    assert split("smollm", "it's IT'S") == ["it", "'s", " IT", "'", "S"]


def test_smollm_whitespace_keeps_one_space_for_the_next_word():
    # \s+(?!\S) stops one short of the word; GPT-2 has no [\r\n] rule, so the newlines stay with the spaces
    assert split("smollm", "a\n\n  b") == ["a", "\n\n ", " b"]
    assert split("smollm", "a\u00a0\u00a0b") == ["a", "\u00a0", "\u00a0", "b"]   # NBSP is not " " for ` ?`


# ---- gpt2 (mellum, trillion, granite-docling): the GPT-2 splitter alone ----------------------------

def test_gpt2_keeps_whole_numbers():
    assert split("gpt2", "Hello world's 2024  x") == ["Hello", " world", "'s", " 2024", " ", " x"]
    assert split("gpt2", "$3.50!") == ["$", "3", ".", "50", "!"]


def test_gpt2_splits_newlines_one_by_one():
    assert split("gpt2", "a\n\nb") == ["a", "\n", "\n", "b"]


# ---- qwen2 (megrez): Llama 3's pattern with single digits, through std::regex ----------------------

def test_qwen2_single_digits_and_case_insensitive_contractions():
    assert split("qwen2", "I'M 2024\n\n x") == ["I", "'M", " ", "2", "0", "2", "4", "\n\n", " x"]


def test_qwen2_one_punctuation_character_joins_the_next_word():
    assert split("qwen2", "\u4f60\u597d,\u4e16\u754c") == ["\u4f60\u597d", ",\u4e16\u754c"]
    assert split("qwen2", "ab.\n\ncd") == ["ab", ".\n\n", "cd"]


def test_qwen2_non_ascii_whitespace_is_whitespace():
    # U+3000 becomes U+000B for std::regex; read as punctuation it would give ["a", "\u3000\u3000", "b"]
    assert split("qwen2", "a\u3000\u3000b") == ["a", "\u3000", "\u3000b"]


# ---- seed-coder: like qwen2, but punctuation never takes the newlines after it ---------------------

def test_seed_coder_punctuation_leaves_newlines_alone():
    assert split("seed-coder", "Hi!\n\n123") == ["Hi", "!", "\n\n", "1", "2", "3"]
    assert split("seed-coder", "DON'T") == ["DON", "'T"]


# ---- tekken (Mistral Nemo): case-aware words, single digits, `/` after punctuation -------------------

def test_tekken_splits_words_at_upper_case():
    assert split("tekken", "HelloWorld McDonald") == ["Hello", "World", " Mc", "Donald"]
    assert split("tekken", "abcDEF ABCdef") == ["abc", "DEF", " ABCdef"]


def test_tekken_non_ascii_letters_count_as_upper_and_lower():
    # llama.cpp's "not a-z" / "not A-Z" classes: É can end an upper-case run or start a lower-case one
    assert split("tekken", "\u00c9RIC \u00e9t\u00e9") == ["\u00c9", "RIC", " \u00e9t\u00e9"]


def test_tekken_digits_and_punctuation_runs():
    assert split("tekken", "x://y 2024") == ["x", "://", "y", " ", "2", "0", "2", "4"]
    assert split("tekken", "a.\n\nb") == ["a", ".\n\n", "b"]


# ---- viking: everything but whitespace and ( | ) . , ! ? and CJK/Indic/Arabic stops; then \p{N} -------

def test_viking_words_and_separators():
    assert split("viking", "Hello, world! 123") == ["Hello", ",", " world", "!", " ", "1", "2", "3"]
    assert split("viking", "f(x)|y") == ["f", "(", "x", ")|", "y"]       # unmatched neighbours stay together
    assert split("viking", "abc123def") == ["abc", "1", "2", "3", "def"]


def test_viking_spaces_and_other_scripts():
    assert split("viking", "a  b\u3000c") == ["a", " ", " b", "\u3000", "c"]
    # a Devanagari word keeps its vowel signs; the danda U+0964 is a separator
    assert split("viking", "\u0928\u092e\u0938\u094d\u0924\u0947\u0964 \u0920\u0940\u0915") == [
        "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0964", " \u0920\u0940\u0915"]


# ---- deepseek-v3: \p{N}{1,3}, then han/kana runs, then the main pattern -----------------------------

def test_deepseek_v3_digit_groups_and_cjk():
    assert split("deepseek-v3", "1234567") == ["123", "456", "7"]
    assert split("deepseek-v3", "\u6211\u60f3\u5728apple\u5de5\u4f5c") == [
        "\u6211\u60f3\u5728", "apple", "\u5de5\u4f5c"]
    assert split("deepseek-v3", "\u3053\u3093\u306b\u3061\u306f\u3001\u4e16\u754c") == [
        "\u3053\u3093\u306b\u3061\u306f", "\u3001", "\u4e16\u754c"]        # the comma U+3001 is not kana


def test_deepseek_v3_main_pattern():
    assert split("deepseek-v3", "Hello, world.\n") == ["Hello", ",", " world", ".\n"]
    assert split("deepseek-v3", "it's x.com") == ["it", "'s", " x", ".com"]  # one ASCII mark + letters
    assert split("deepseek-v3", "e\u0301t\u00e9") == ["e\u0301t\u00e9"]           # marks stay in the word


# ---- names -> kind and flags ------------------------------------------------------------------------

def _vocab_file(path: Path, pre: str) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(BYTE_TO_CHAR))
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


# (name, kind, add_bos, ignore_merges, clean_spaces), from llama_vocab::load
NAMES = [
    ("llama-bpe", "llama3", True, True, True), ("llama3", "llama3", True, True, True),
    ("llama-v3", "llama3", True, True, True), ("falcon3", "llama3", True, True, True),
    ("falcon-h1", "llama3", True, True, True), ("pixtral", "llama3", True, True, True),
    ("midm-2.0", "llama3", True, True, True),
    ("smaug-bpe", "llama3", False, False, True),
    ("tekken", "tekken", True, True, False),
    ("smollm", "smollm", False, False, False), ("minerva-7b", "smollm", False, False, True),
    ("viking", "viking", False, False, False),
    ("megrez", "qwen2", False, False, True),
    ("seed-coder", "seed-coder", False, False, False),
    ("deepseek-v3", "deepseek-v3", False, False, False),
    ("mellum", "gpt2", False, False, True), ("trillion", "gpt2", False, False, False),
    ("granite-docling", "gpt2", False, False, False),
]


@pytest.mark.parametrize("name, kind, add_bos, ignore_merges, clean_spaces", NAMES)
def test_name_selects_kind_and_flags(tmp_path, name, kind, add_bos, ignore_merges, clean_spaces):
    v = Tokenizer.from_path(_vocab_file(tmp_path / "v.gguf", name)).vocab
    assert (v.pre, v.add_bos, v.ignore_merges, v.clean_spaces) == (kind, add_bos, ignore_merges, clean_spaces)


def test_every_name_has_a_splitter():
    for name, rule in PRE_TYPES.items():
        assert make_splitter(rule.kind)("Hi 12"), name


def test_unknown_name_is_one_line_listing_the_supported_ones(tmp_path):
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_path(_vocab_file(tmp_path / "v.gguf", "qwen2"))
    msg = str(err.value)
    assert "unknown pre-tokenizer 'qwen2'" in msg and "\n" not in msg
    assert all(name in msg for name in ("smollm", "tekken", "llama-bpe", "default"))
