"""write_synthetic: LLaMA GGUF files with random but valid weights, for tests and benchmarks.

Owns the presets (tiny, TinyLlama-1.1B shapes, LLaMA-7B shapes, an MQA shape), a deterministic
SentencePiece-style vocabulary, and random weight bytes in every supported type. Quantized tensors are
random valid GGML blocks (random quant bits, block scales chosen so the weights have mean ~0 and std
~1/sqrt(n_in)), made vectorised and written tensor by tensor, so a TinyLlama-sized file takes seconds.
Not a real model: nothing here is trained, and no computation of the engine is used to make the files.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import (GGML_QUANT_SIZES, GGUFWriter, GGMLQuantizationType as QT, LlamaFileType, RopeScalingType,
                  TokenType)
from gguf.quants import dequantize as gguf_dequantize

from ..errors import LlamaMpiError, UsageError


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int


PRESETS = {
    "tiny": Shape(n_embd=256, n_ff=768, n_layer=2, n_head=8, n_head_kv=2, n_vocab=512, n_ctx=512),
    "tinyllama": Shape(n_embd=2048, n_ff=5632, n_layer=22, n_head=32, n_head_kv=4, n_vocab=32000, n_ctx=2048),
    "llama7b": Shape(n_embd=4096, n_ff=11008, n_layer=32, n_head=32, n_head_kv=32, n_vocab=32000, n_ctx=4096),
    # multi-query attention (1 KV head), head_dim 128, n_ff 43 blocks of 32 (not a multiple of 256):
    # legacy types only; the awkward shape for tensor-parallel cuts (issue 11)
    "mqa": Shape(n_embd=768, n_ff=1376, n_layer=2, n_head=6, n_head_kv=1, n_vocab=512, n_ctx=512),
}

TYPES = {  # CLI name -> (GGML type, general.file_type)
    "f32": (QT.F32, LlamaFileType.ALL_F32), "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16), "q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QT.Q4_1, LlamaFileType.MOSTLY_Q4_1), "q5_0": (QT.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (QT.Q5_1, LlamaFileType.MOSTLY_Q5_1), "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q2_k": (QT.Q2_K, LlamaFileType.MOSTLY_Q2_K), "q3_k": (QT.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q4_k": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_M), "q5_k": (QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (QT.Q6_K, LlamaFileType.MOSTLY_Q6_K), "iq4_nl": (QT.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    "iq4_xs": (QT.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
}

# Byte offsets of the float16 block scale `d` and of the float16 block minimum (None: no minimum) in
# each block, from ggml-common.h's block structs (e.g. block_q2_K = scales[16], qs[64], d, dmin).
_SCALE_FIELDS = {
    QT.Q4_0: (0, None), QT.Q4_1: (0, 2), QT.Q5_0: (0, None), QT.Q5_1: (0, 2), QT.Q8_0: (0, None),
    QT.Q2_K: (80, 82), QT.Q3_K: (108, None), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208, None),
    QT.IQ4_NL: (0, None), QT.IQ4_XS: (0, None),
}
_CALIBRATION_BLOCKS = 512


def spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A deterministic SentencePiece-style vocab: <unk> <s> </s>, 256 byte tokens, then pieces.

    Pieces are single characters, '▁'+character, then lowercase bigrams and trigrams (each also with
    '▁'), so every piece is the merge of two shorter ones; score = -rank.
    """
    if n_vocab < 3 + 256 + 1:
        raise UsageError(f"--n-vocab must be at least 260 for an SPM vocab with byte tokens, got {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    lower = "abcdefghijklmnopqrstuvwxyz"
    chars = lower + lower.upper() + "0123456789.,;:!?'\"-()"

    def pieces():
        yield "▁"
        yield from chars
        yield from ("▁" + c for c in chars)
        for n in (2, 3):
            grams = [""]
            for _ in range(n):
                grams = [g + c for g in grams for c in lower]
            for g in grams:
                yield g
                yield "▁" + g

    gen = pieces()
    while len(tokens) < n_vocab:
        tokens.append(next(gen))
        types.append(TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(n_vocab - 259)]
    return tokens, scores, [int(t) for t in types]


def _float_tensor(rng: np.random.Generator, shape: tuple[int, ...], std: float, qtype: QT) -> np.ndarray:
    """Uniform weights of the given std (n_out, n_in) in F32, F16, or BF16 (raw uint16, round to nearest
    even). Uniform rather than Gaussian: numpy draws it ~4x faster, which matters for 1-7B shapes."""
    w = rng.random(shape, dtype=np.float32)
    w -= np.float32(0.5)
    w *= np.float32(std * 12 ** 0.5)                                     # U(-a, a) has std a / sqrt(3)
    if qtype == QT.F16:
        return w.astype(np.float16)
    if qtype == QT.BF16:
        bits = w.view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return w


def _set_f16(blocks: np.ndarray, offset: int, values: np.ndarray) -> None:
    blocks[:, offset:offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _quant_tensor(rng: np.random.Generator, shape: tuple[int, int], std: float, qtype: QT) -> np.ndarray:
    """Random valid blocks (n_out, bytes_per_row) whose dequantized values have mean ~0 and std ~`std`.

    The quant bits are random bytes. The f16 scale and minimum are s*u*a and s*u*a*c for a per-block
    u in [0.5, 1.5) and a random sign s (so types without a minimum, whose codes are not centred, still
    average to zero): the dequantized value is linear in (scale, min), so c (zero mean) and a (target
    std) are read off gguf's dequantization of a sample with (u, 0) and (0, u).
    """
    n_out, n_in = shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = n_out * n_in // block
    blocks = np.frombuffer(rng.bytes(n_blocks * type_size), dtype=np.uint8).reshape(n_blocks, type_size).copy()
    u = rng.uniform(0.5, 1.5, size=n_blocks).astype(np.float32)
    d_off, m_off = _SCALE_FIELDS[qtype]
    sample = blocks[:_CALIBRATION_BLOCKS].copy()
    _set_f16(sample, d_off, u[:len(sample)])
    if m_off is not None:
        _set_f16(sample, m_off, np.zeros(len(sample), np.float32))
    v_scale = gguf_dequantize(sample, qtype).astype(np.float64)
    c = 0.0
    if m_off is not None:
        _set_f16(sample, d_off, np.zeros(len(sample), np.float32))
        _set_f16(sample, m_off, u[:len(sample)])
        v_min = gguf_dequantize(sample, qtype).astype(np.float64)
        c = -v_scale.mean() / v_min.mean()
        v_scale = v_scale + c * v_min
    a = std / max(float(v_scale.std()), 1e-30)
    signed = u * rng.choice(np.array([-1.0, 1.0], np.float32), size=n_blocks)
    _set_f16(blocks, d_off, signed * np.float32(a))
    if m_off is not None:
        _set_f16(blocks, m_off, signed * np.float32(a * c))
    return blocks.reshape(n_out, n_in // block * type_size)


def _tensor_plan(s: Shape, qtype: QT) -> list[tuple[str, tuple[int, ...], QT, float]]:
    """(name, numpy shape, type, std) of every tensor, in file order. Norm weights are F32 near 1."""
    head_dim = s.n_embd // s.n_head
    q_dim, kv_dim = s.n_head * head_dim, s.n_head_kv * head_dim
    plan = [("token_embd.weight", (s.n_vocab, s.n_embd), qtype, 1.0),
            ("output_norm.weight", (s.n_embd,), QT.F32, 0.05),
            ("output.weight", (s.n_vocab, s.n_embd), qtype, s.n_embd ** -0.5)]
    for i in range(s.n_layer):
        for name, shape in (("attn_norm", (s.n_embd,)), ("attn_q", (q_dim, s.n_embd)),
                            ("attn_k", (kv_dim, s.n_embd)), ("attn_v", (kv_dim, s.n_embd)),
                            ("attn_output", (s.n_embd, q_dim)), ("ffn_norm", (s.n_embd,)),
                            ("ffn_gate", (s.n_ff, s.n_embd)), ("ffn_up", (s.n_ff, s.n_embd)),
                            ("ffn_down", (s.n_embd, s.n_ff))):
            if len(shape) == 1:
                plan.append((f"blk.{i}.{name}.weight", shape, QT.F32, 0.05))
            else:
                plan.append((f"blk.{i}.{name}.weight", shape, qtype, shape[1] ** -0.5))
    return plan


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def write_synthetic(path: str | Path, preset: str = "tiny", qtype: str = "f32", n_layer: int | None = None,
                    seed: int = 0, *, tied_output: bool = False, rope_freq_base: float = 10000.0,
                    rope_scaling_factor: float | None = None, **overrides: int) -> Path:
    """Write a random LLaMA GGUF and return its path.

    Args:
        path: output file (overwritten).
        preset: "tiny", "tinyllama", "llama7b" or "mqa" (shapes in PRESETS).
        qtype: weight type of every matrix (a key of TYPES); 1-D norms are always F32.
        n_layer: override the preset's layer count.
        seed: the same arguments and seed give byte-identical files.
        tied_output: leave out output.weight (the LM head is token_embd, as in Llama 3.2 1B).
        rope_freq_base: rope theta (1e6 like CodeLlama, 500000 like Llama 3).
        rope_scaling_factor: write linear RoPE scaling with this factor (positions / factor).
        overrides: any other Shape field (n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx).
    Raises:
        UsageError: unknown preset or type, or shapes the type cannot encode.
    """
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    if qtype not in TYPES:
        raise UsageError(f"unknown type '{qtype}' (choose from {', '.join(TYPES)})")
    shape = replace(PRESETS[preset], **({"n_layer": n_layer} if n_layer is not None else {}), **overrides)
    ggml_type, file_type = TYPES[qtype]
    block = GGML_QUANT_SIZES[ggml_type][0]
    if shape.n_embd % block or shape.n_ff % block:
        raise UsageError(f"type {qtype} needs n_embd and n_ff divisible by {block} "
                         f"(got {shape.n_embd}, {shape.n_ff})")
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv or shape.n_layer < 1:
        raise UsageError(f"bad shape {shape}: n_head must divide n_embd and be a multiple of n_head_kv")
    path = Path(path)
    rng = np.random.default_rng(seed)
    plan = [t for t in _tensor_plan(shape, ggml_type) if not (tied_output and t[0] == "output.weight")]
    w = GGUFWriter(path, "llama")
    _add_metadata(w, shape, f"synthetic-{preset}-{qtype}", file_type, rope_freq_base)
    if rope_scaling_factor is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling_factor)
    for name, tshape, t, _ in plan:
        w.add_tensor_info(name, tshape, np.dtype(np.float32), _nbytes(tshape, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, tshape, t, std in plan:                                   # one tensor in memory at a time
        if t == QT.F32 and len(tshape) == 1:
            data = (1.0 + std * rng.standard_normal(tshape)).astype(np.float32)
        elif t in (QT.F32, QT.F16, QT.BF16):
            data = _float_tensor(rng, tshape, std, t)
        else:
            data = _quant_tensor(rng, tshape, std, t)
        w.write_tensor_data(data)
    w.close()
    return path


def _add_metadata(w: GGUFWriter, s: Shape, name: str, file_type: int, rope_freq_base: float) -> None:
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(2)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.n_vocab)
    tokens, scores, types = spm_vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.tools.synth",
                                description="Write a LLaMA GGUF with random weights (for tests and benchmarks).")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--type", dest="qtype", default="f32", choices=list(TYPES))
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    for field in ("n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "n_ctx"):
        p.add_argument("--" + field.replace("_", "-"), dest=field, type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    overrides = {f: getattr(args, f) for f in ("n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "n_ctx")
                 if getattr(args, f) is not None}
    t0 = time.perf_counter()
    try:
        out = write_synthetic(args.out, args.preset, args.qtype, args.n_layer, args.seed, **overrides)
    except LlamaMpiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
