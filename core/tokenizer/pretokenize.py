"""Pre-tokenizers of byte-level BPE vocabularies: split text into words before merging, as llama.cpp does.

Owns: the regex list of each supported `tokenizer.ggml.pre` kind and llama.cpp's way of applying a list
(each regex refines the pieces left by the previous one; text between matches stays a piece of its own).
Must not look at the vocabulary.

llama.cpp runs two kinds of regex (unicode.cpp, unicode_regex_split):
* hand-written splitters for the GPT-2 and Llama 3 patterns; their `\\s` is Unicode White_Space, which
  is what the `regex` package's `\\s` matches, so those patterns are used here as written;
* std::regex for the others, on a copy of the text where every non-ASCII whitespace character became
  U+000B (std::regex's `\\s` is ASCII only). `_STL` patterns below are matched against that copy (same
  length, so offsets carry over), with `\\s` spelled as the ASCII class and `$` as `\\Z` (end of the piece,
  not "before a final newline"); `_stl()` does that spelling for patterns copied from llama.cpp.
  llama.cpp picks the hand-written code only for those two exact strings: a list that repeats one of
  them (smollm, smaug-bpe, mellum) gets it too, a near copy (qwen2, seed-coder) goes to std::regex
  (newer llama.cpp also hand-writes qwen2's; both give the same pieces).
Which `tokenizer.ggml.pre` name selects which kind: core/tokenizer/pretypes.py.
"""
from __future__ import annotations

from typing import Callable

import regex

from core.errors import TokenizerError

_WS_NON_ASCII = "\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_TO_VT = {c: "\x0b" for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                              0x3000)}
_ASCII_WS = r"\t\n\x0b\x0c\r "

# The two patterns llama.cpp splits with hand-written code (Unicode White_Space for \s). llama.cpp's GPT-2
# string ends with `\s+(?!\S)`; its hand-written code then takes leftover whitespace as a piece: the `|\s+`.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek LLM's "cased letter" class, from its tokenizer.json (as used by llama.cpp), written as escapes
# so that no editor or tool can fold U+212A KELVIN SIGN into "K" and turn a range into half of Unicode.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
    "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943")
_CJK = "\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff"
_S = f"[{_ASCII_WS}]"

# std::regex patterns as llama.cpp writes them (llm_tokenizer_bpe's constructor); _stl() adapts them.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
# Tekken's tokenizer.json has \p{Lu}.. / \p{Ll}.. classes; llama.cpp's std::regex only knows whole
# categories, so it writes "upper" as "a letter not a-z" and "lower" as "a letter not A-Z": every non-ASCII
# letter counts as both (kept here: "ÉRIC" -> "É", "RIC", where Hugging Face keeps one word).
TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Viking: anything but whitespace, ( | ) and sentence punctuation (… 。 ， 、 Devanagari danda, Arabic . ,)
VIKING = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
DEEPSEEK_V3 = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
               r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_KANA_HAN = "\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff"   # CJK ideographs, hiragana, katakana


def _stl(pattern: str) -> tuple[str, bool]:
    """A pattern llama.cpp runs through std::regex, respelled for the U+000B copy of the text: `\\s` as
    the ASCII whitespace class (inside brackets too), `\\S` as its complement, an unbracketed `$` as `\\Z`."""
    out: list[str] = []
    inside, i = False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            esc = pattern[i:i + 2]
            assert not (inside and esc == r"\S"), f"\\S inside brackets in {pattern!r}"
            out.append({r"\s": _ASCII_WS if inside else _S, r"\S": f"[^{_ASCII_WS}]"}.get(esc, esc))
            i += 2
            continue
        if c == "[" or (c == "]" and inside):
            inside = c == "["
        elif c == "$" and not inside:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out), True


# Each entry: (pattern, matched against the U+000B copy?).
_PATTERNS: dict[str, list[tuple[str, bool]]] = {
    "default": [(r"[\p{P}\$\+<=>\^~\|]+", True), (GPT2, False), (r"\p{N}+", True),
                (r"[0-9][0-9][0-9]", True)],
    "llama3": [(LLAMA3, False)],
    "gpt2": [(GPT2, False)],
    "smollm": [(r"\p{N}", True), (GPT2, False)],
    "qwen2": [_stl(QWEN2)],
    "seed-coder": [_stl(SEED_CODER)],
    "tekken": [_stl(TEKKEN)],
    "viking": [_stl(VIKING), (r"\p{N}", True)],
    "deepseek-v3": [(r"\p{N}{1,3}", True), (f"[{_KANA_HAN}]+", True), _stl(DEEPSEEK_V3)],
    "deepseek-llm": [(r"[\r\n]", True), (f"{_S}?[{_DEEPSEEK_LETTERS}]+", True),
                     (f"{_S}?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", True),
                     (f"{_S}+\\Z", True), (f"[{_CJK}]+", True), (r"\p{N}+", True)],
    "deepseek-coder": [(r"[\r\n]", True), (f"{_S}?\\p{{L}}+", True), (f"{_S}?\\p{{P}}+", True),
                       (f"[{_CJK}]+", True), (r"\p{N}", True)],
}


def make_splitter(pre: str) -> Callable[[str], list[str]]:
    """A function text -> words for the pre-tokenizer kind `pre` (a pretypes.PreType.kind)."""
    if pre not in _PATTERNS:
        raise TokenizerError(f"unknown pre-tokenizer '{pre}' (supported: {', '.join(sorted(_PATTERNS))})")
    compiled = [(regex.compile(p), stl) for p, stl in _PATTERNS[pre]]
    needs_vt = any(stl for _, stl in compiled)

    def split(text: str) -> list[str]:
        if not text:
            return []
        vt_text = text.translate(_TO_VT) if needs_vt else text
        spans = [(0, len(text))]
        for pattern, stl in compiled:
            spans = _refine(pattern, vt_text if stl else text, spans)
        return [text[a:b] for a, b in spans]

    return split


def _refine(pattern: regex.Pattern, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Split every span by the matches of `pattern` inside it (llama.cpp's unicode_regex_split_stl)."""
    out: list[tuple[int, int]] = []
    append = out.append
    for start, end in spans:
        pos = start
        for m in pattern.finditer(text, start, end):
            a, b = m.span()
            if a > pos:
                append((pos, a))
            if b > a:
                append((a, b))
            pos = b
        if pos < end:
            append((pos, end))
    return out
