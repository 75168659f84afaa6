"""`tokenizer.ggml.pre` names: which splitter each selects and the tokenizer flags llama.cpp sets with it.

Owns: the names llama.cpp's llama_vocab::load accepts for the BPE vocabularies of llama-architecture
models, each mapped to a splitter kind (core/tokenizer/pretokenize.py) and to the flags load() changes from
its BPE defaults (add_bos, ignore_merges, clean_spaces). Names of vocabularies that only other
architectures use (qwen2, gpt-2, starcoder, command-r, ...) are left out on purpose.
Must not split text or read metadata.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import TokenizerError


@dataclass(frozen=True)
class PreType:
    """What one `tokenizer.ggml.pre` name selects (llama-vocab.cpp, load(): the `tokenizer_pre == ...` chain)."""

    kind: str                    # splitter kind: a key of pretokenize's pattern table
    add_bos: bool = False        # BPE default: no BOS unless the GGUF says add_bos_token
    ignore_merges: bool = False  # a word that is already a token is taken whole, without merging
    clean_spaces: bool = True    # detokenizer drops the space before "?", "!", ".", ",", "'s", ...


_LLAMA3 = PreType("llama3", add_bos=True, ignore_merges=True)

# name -> PreType; a comment gives llama.cpp's LLAMA_VOCAB_PRE_TYPE_* where it is not the kind's name.
PRE_TYPES: dict[str, PreType] = {
    "default": PreType("default"),
    # Llama 3 and the vocabularies llama.cpp treats as Llama 3 (Falcon 3, Pixtral / Mistral Small, Mi:dm 2.0, ...)
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), _LLAMA3),
    "smaug-bpe": PreType("llama3"),                              # SMAUG: Llama 3's regex, BPE flags
    "deepseek-llm": PreType("deepseek-llm", clean_spaces=False),
    "deepseek-coder": PreType("deepseek-coder", clean_spaces=False),
    "deepseek-v3": PreType("deepseek-v3", clean_spaces=False),   # DEEPSEEK3_LLM
    "tekken": PreType("tekken", add_bos=True, ignore_merges=True, clean_spaces=False),  # Mistral Nemo
    "smollm": PreType("smollm", clean_spaces=False),             # SmolLM, SmolLM2
    "minerva-7b": PreType("smollm"),                             # MINERVA: SmolLM's regexes, clean_spaces kept
    "viking": PreType("viking", clean_spaces=False),             # LumiOpen Viking
    "megrez": PreType("qwen2"),                                  # QWEN2's regex; clean_spaces kept for this name
    "seed-coder": PreType("seed-coder", clean_spaces=False),     # ByteDance Seed-Coder
    "mellum": PreType("gpt2"),                                   # GPT2 (JetBrains Mellum)
    "trillion": PreType("gpt2", clean_spaces=False),             # TRILLION: the GPT-2 regex
    "granite-docling": PreType("gpt2", clean_spaces=False),      # GRANITE_DOCLING: the GPT-2 regex
}


def pre_type(name: str, source: str) -> PreType:
    """The PreType of a `tokenizer.ggml.pre` value.

    Raises:
        TokenizerError: a name we do not support, with the list of those we do.
    """
    try:
        return PRE_TYPES[name]
    except KeyError:
        raise TokenizerError(f"{source}: unknown pre-tokenizer '{name}' "
                             f"(supported: {', '.join(sorted(PRE_TYPES))})") from None
