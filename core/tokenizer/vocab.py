"""The vocabulary as llama.cpp's llama_vocab::load sees it: tokens, scores, attributes, flags, special ids.

Owns: validating `tokenizer.ggml.*` metadata (a dict from core/tokenizer/gguf_meta.py) and applying
llama.cpp's defaults (special ids per model type, add_bos/add_eos, add_space_prefix, clean_spaces,
ignore_merges per pre-tokenizer, fill-in-the-middle ids, the end-of-generation set). Must not tokenize or
detokenize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from core.errors import TokenizerError
from core.tokenizer.pretypes import pre_type

# Token attributes (llama_token_attr bits), mapped from GGUF token types 0..6.
ATTR_UNDEFINED, ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL = 1 << 0, 1 << 1, 1 << 2, 1 << 3
ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1 << 4, 1 << 5, 1 << 6
_TYPE_TO_ATTR = np.array([ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                          ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE], dtype=np.int32)

# Texts that llama.cpp recognises as end-of-turn / end-of-generation tokens (llama-vocab.cpp, load()).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOG_TEXTS = frozenset(("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
                        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
                        "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
                        "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["))

# Fill-in-the-middle tokens llama.cpp finds by text when the GGUF gives no id (same place); those of
# kind pad, rep and sep end generation too. "\u2581" is SPM's space, "\uff5c" DeepSeek's fullwidth bar.
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_FIM_OLD_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}  # deprecated, read last
_FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")

KEY = "tokenizer.ggml."


@dataclass(frozen=True)
class Vocab:
    """Everything the tokenizer needs, already validated. Ids are ints; -1 means "none"."""

    source: str                 # file name, for error messages
    model: str                  # "llama" (SPM) or "gpt2" (byte-level BPE)
    pre: str                    # splitter kind (pretypes.PreType.kind); "default" for SPM
    tokens: list[str]           # token texts (UTF-8 decoded, invalid bytes kept as surrogates)
    scores: np.ndarray          # (n_vocab,) f32 piece scores (SPM); zeros for BPE
    attrs: np.ndarray           # (n_vocab,) i32 ATTR_* bits
    token_to_id: dict[str, int]
    merges: dict[str, int]      # "left right" -> rank (BPE only)
    bos_id: int
    eos_id: int
    eot_id: int
    eom_id: int
    unk_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    ignore_merges: bool
    eog_ids: frozenset[int]

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def is_special(self, token_id: int) -> bool:
        return bool(self.attrs[token_id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))


def _text(value: Any, key: str, source: str) -> str:
    if not isinstance(value, bytes):
        raise TokenizerError(f"{source}: metadata {key} must be a string, got {type(value).__name__}")
    return value.decode("utf-8", "replace")


def _array(meta: Mapping[str, Any], key: str, source: str, n: int) -> np.ndarray | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise TokenizerError(f"{source}: metadata {key} must be a numeric array")
    if len(value) < n:
        raise TokenizerError(f"{source}: metadata {key} has {len(value)} entries for {n} tokens")
    return value[:n]


def _special_id(meta: Mapping[str, Any], name: str, default: int, n: int) -> int:
    # llama.cpp: a default outside the vocab is disabled; a metadata id outside the vocab is ignored.
    value = default if 0 <= default < n else -1
    given = meta.get(KEY + name + "_token_id")
    if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < n:
        value = given
    return value


def load_vocab(meta: Mapping[str, Any], source: str) -> Vocab:
    """Build a Vocab from tokenizer metadata, with llama.cpp's defaults for absent keys.

    Raises:
        TokenizerError: missing tokens/scores/merges, unknown model or pre-tokenizer, bad arrays.
    """
    if KEY + "model" not in meta:
        raise TokenizerError(f"{source}: no tokenizer.ggml.model key (file has no vocabulary)")
    model = _text(meta[KEY + "model"], KEY + "model", source)
    if model not in ("llama", "gpt2"):
        raise TokenizerError(f"{source}: unsupported tokenizer model '{model}' (supported: llama, gpt2)")
    raw_tokens = meta.get(KEY + "tokens")
    if not isinstance(raw_tokens, list) or not raw_tokens:
        raise TokenizerError(f"{source}: missing or empty tokenizer.ggml.tokens")
    n = len(raw_tokens)
    tokens = [t.decode("utf-8", "surrogateescape") if t else f"[EMPTY_{i}]" for i, t in enumerate(raw_tokens)]
    token_to_id = {t: i for i, t in enumerate(tokens)}
    if len(token_to_id) != n:
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise TokenizerError(f"{source}: duplicate token {dup!r} in the vocabulary")

    scores = _array(meta, KEY + "scores", source, n)
    types = _array(meta, KEY + "token_type", source, n)
    attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
    if types is not None:
        t = types.astype(np.int64)
        attrs = np.where((t >= 0) & (t < len(_TYPE_TO_ATTR)), _TYPE_TO_ATTR[np.clip(t, 0, 6)], ATTR_UNDEFINED)
        attrs = attrs.astype(np.int32)

    pre_name = _text(meta.get(KEY + "pre", b"default"), KEY + "pre", source)
    merges: dict[str, int] = {}
    if model == "llama":
        if scores is None:
            raise TokenizerError(f"{source}: SPM vocabulary without tokenizer.ggml.scores")
        pre, bos, eos, unk = "default", 1, 2, 0
        add_bos, add_eos, add_space_prefix, clean_spaces, ignore_merges = True, False, True, False, False
    else:
        raw_merges = meta.get(KEY + "merges")
        if not isinstance(raw_merges, list) or not raw_merges:
            raise TokenizerError(f"{source}: BPE vocabulary without tokenizer.ggml.merges")
        merges = _merge_ranks(raw_merges)
        rule = pre_type(pre_name, source)
        pre, bos, eos, unk = rule.kind, 11, 11, -1
        add_bos, add_eos, add_space_prefix = rule.add_bos, False, False
        clean_spaces, ignore_merges = rule.clean_spaces, rule.ignore_merges
        scores = np.zeros(n, dtype=np.float32) if scores is None else scores
    add_space_prefix = bool(meta.get(KEY + "add_space_prefix", add_space_prefix))

    bos, eos, unk = (_special_id(meta, k, d, n) for k, d in (("bos", bos), ("eos", eos), ("unknown", unk)))
    eot, eom = _special_id(meta, "eot", -1, n), _special_id(meta, "eom", -1, n)
    add_bos = bool(meta.get(KEY + "add_bos_token", add_bos))
    add_eos = bool(meta.get(KEY + "add_eos_token", add_eos))
    if add_bos and bos < 0:
        raise TokenizerError(f"{source}: add_bos_token is true but there is no valid bos_token_id")
    if add_eos and eos < 0:
        raise TokenizerError(f"{source}: add_eos_token is true but there is no valid eos_token_id")

    fim = _fill_in_the_middle(meta, token_to_id, attrs)
    eot, eom, eog = _end_of_generation(token_to_id, attrs, eos, eot, eom, [fim[k] for k in _FIM_EOG])
    return Vocab(source=source, model=model, pre=pre, tokens=tokens,
                 scores=np.asarray(scores, dtype=np.float32), attrs=attrs, token_to_id=token_to_id,
                 merges=merges, bos_id=bos, eos_id=eos, eot_id=eot, eom_id=eom, unk_id=unk,
                 add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                 clean_spaces=clean_spaces, ignore_merges=ignore_merges, eog_ids=eog)


def _merge_ranks(raw_merges: list[bytes]) -> dict[str, int]:
    # Keyed by the merge line itself ("left right"): BPE symbols never contain a raw space, so the
    # lookup key left + " " + right is unambiguous. Reversed so that a duplicate keeps its first rank.
    lines = [m.decode("utf-8", "surrogateescape") for m in raw_merges]
    n = len(lines)
    return dict(zip(reversed(lines), range(n - 1, -1, -1)))


def _fill_in_the_middle(meta: Mapping[str, Any], token_to_id: dict[str, int],
                        attrs: np.ndarray) -> dict[str, int]:
    """llama.cpp's fill-in-the-middle ids by kind (-1: none): the metadata id, else the token found by text.

    A token found by its text is marked control, as llama.cpp does. When several texts of one kind are in
    the vocabulary, llama.cpp takes whichever its hash map lists first; here the first of _FIM_TEXTS.
    """
    n = len(attrs)
    ids: dict[str, int] = {}
    for kind, texts in _FIM_TEXTS.items():
        tid = _special_id(meta, kind, -1, n)
        tid = _special_id(meta, _FIM_OLD_KEYS.get(kind, kind), tid, n)
        if tid < 0:
            tid = next((token_to_id[t] for t in texts if t in token_to_id), -1)
            if tid >= 0:
                attrs[tid] |= ATTR_CONTROL
        ids[kind] = tid
    return ids


def _end_of_generation(token_to_id: dict[str, int], attrs: np.ndarray, eos: int, eot: int,
                       eom: int, fim: list[int]) -> tuple[int, int, frozenset[int]]:
    """llama.cpp's EOT/EOM auto-detection by text and its end-of-generation set.

    Tokens found by their text are marked control, as llama.cpp does; eos/eot/eom and the given
    fill-in-the-middle ids (pad, repo, file separator) always join the set.
    """
    by_text: set[int] = {token_to_id[t] for t in _EOG_TEXTS if t in token_to_id}
    if eot < 0:
        eot = next((token_to_id[t] for t in _EOT_TEXTS if t in token_to_id), -1)
        by_text.add(eot)
    if eom < 0:
        eom = token_to_id.get("<|eom_id|>", -1)
        by_text.add(eom)
    by_text.discard(-1)
    for i in by_text:
        attrs[i] |= ATTR_CONTROL
    eog = {token_to_id[t] for t in _EOG_TEXTS if t in token_to_id}
    eog.update(i for i in (eos, eot, eom, *fim) if i >= 0)
    return eot, eom, frozenset(eog)
