"""ModelConfig: the hyper-parameters of a LLaMA-family GGUF, built in one place from its metadata.

Keys are read through `gguf.Keys` templates; absent optional keys get llama.cpp's defaults. The raw
field dict never leaves this module and core/loader.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gguf import Keys

from .errors import ModelFileError, UnsupportedModelError

# Architectures that share llama.cpp's LLM_ARCH_LLAMA graph (LLaMA 1/2/3, CodeLlama, Mistral, TinyLlama).
SUPPORTED_ARCHS = ("llama",)
DEFAULT_ROPE_FREQ_BASE = 10000.0  # llama.cpp's default when `rope.freq_base` is absent (stories260K)
DEFAULT_RMS_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    arch: str               # general.architecture ("llama")
    n_vocab: int            # tokens in the vocabulary (rows of token_embd)
    n_ctx_train: int        # context length the model was trained with
    n_embd: int             # residual stream width
    n_layer: int            # number of transformer blocks
    n_ff: int               # SwiGLU hidden width
    n_head: int             # query heads
    n_head_kv: int          # key/value heads (GQA: n_head is a multiple of it)
    head_dim: int           # per-head width of q and k (= n_embd // n_head unless key_length says otherwise)
    n_rot: int              # leading dims of each head that RoPE rotates (rope.dimension_count)
    rope_freq_base: float   # theta (10000 LLaMA 1/2, 1e6 CodeLlama, 500000 Llama 3)
    rope_freq_scale: float  # linear RoPE scaling: positions are multiplied by this (1 / scaling.factor)
    norm_eps: float         # RMSNorm epsilon
    tied_output: bool       # no output.weight in the file: the LM head reuses token_embd

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    @property
    def n_embd_kv(self) -> int:
        """Width of one position's K (or V) for one layer."""
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_fields(cls, get: Callable[[str, Any], Any], has_output: bool, n_vocab_rows: int,
                    path: str = "model") -> "ModelConfig":
        """Build from a metadata getter `get(key, default)`; `n_vocab_rows` is token_embd's row count.

        Raises:
            UnsupportedModelError: not a llama-family architecture, or inconsistent head counts.
            ModelFileError: a required key is missing.
        """
        arch = get(Keys.General.ARCHITECTURE, None)
        if arch is None:
            raise ModelFileError(f"{path}: no general.architecture key; not a model GGUF")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{path}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

        def need(template: str) -> Any:
            key = template.format(arch=arch)
            value = get(key, None)
            if value is None:
                raise ModelFileError(f"{path}: required metadata key '{key}' is missing")
            return value

        def opt(template: str, default: Any) -> Any:
            value = get(template.format(arch=arch), None)
            return default if value is None else value

        n_embd = int(need(Keys.LLM.EMBEDDING_LENGTH))
        n_head = int(need(Keys.Attention.HEAD_COUNT))
        n_head_kv = int(opt(Keys.Attention.HEAD_COUNT_KV, n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or n_embd % n_head:
            raise UnsupportedModelError(
                f"{path}: head counts do not fit: n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv}")
        head_dim = int(opt(Keys.Attention.KEY_LENGTH, n_embd // n_head))
        value_dim = int(opt(Keys.Attention.VALUE_LENGTH, head_dim))
        if value_dim != head_dim:
            raise UnsupportedModelError(
                f"{path}: key length {head_dim} differs from value length {value_dim}; not a llama graph")
        n_rot = int(opt(Keys.Rope.DIMENSION_COUNT, head_dim))
        if n_rot <= 0 or n_rot % 2 or n_rot > head_dim:
            raise UnsupportedModelError(f"{path}: rope dimension count {n_rot} does not fit head size {head_dim}")
        scaling = opt(Keys.Rope.SCALING_TYPE, "none")
        factor = float(opt(Keys.Rope.SCALING_FACTOR, 0.0))
        if scaling not in ("none", "linear"):
            raise UnsupportedModelError(f"{path}: rope scaling '{scaling}' is not supported (only linear)")
        # llama.cpp: freq_scale = 1/factor when a factor is given (also for the old rope.scale_linear key).
        factor = factor or float(get(f"{arch}.rope.scale_linear", 0.0) or 0.0)
        return cls(
            arch=arch,
            n_vocab=int(opt(Keys.LLM.VOCAB_SIZE, n_vocab_rows)),
            n_ctx_train=int(opt(Keys.LLM.CONTEXT_LENGTH, 2048)),
            n_embd=n_embd,
            n_layer=int(need(Keys.LLM.BLOCK_COUNT)),
            n_ff=int(need(Keys.LLM.FEED_FORWARD_LENGTH)),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=n_rot,
            rope_freq_base=float(opt(Keys.Rope.FREQ_BASE, DEFAULT_ROPE_FREQ_BASE)),
            rope_freq_scale=1.0 / factor if factor > 0 else 1.0,
            norm_eps=float(opt(Keys.Attention.LAYERNORM_RMS_EPS, DEFAULT_RMS_EPS)),
            tied_output=not has_output,
        )
