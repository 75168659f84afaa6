"""open_model: validate a GGUF LLaMA model and expose it, memory-mapped, as a ModelFile.

Owns what makes a GGUF a model we can run: the config built from metadata, the tensor-by-name lookup with
presence, type and shape checks, the file fingerprint, and dropping mapped pages a stage no longer needs.
Reading the file's layout (header, metadata, tensor table, bounds checks) is core/gguf_file.py's job.
It must not compute anything or copy tensor data: callers touch only the tensors they ask for.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as QT

from .config import ModelConfig
from .errors import ModelFileError, UnsupportedModelError
from .gguf_file import GGUFFile, Tensor, open_gguf
from .quants import SUPPORTED_TYPES


class ModelFile:
    """A validated, memory-mapped GGUF LLaMA model. Tensor data is only read when a caller touches it."""

    def __init__(self, path: Path, reader: GGUFFile):
        self.path = path
        self.reader = reader                                             # the parsed file and its mapping
        self._tensors = {t.name: t for t in reader.tensors}
        has_output = "output.weight" in self._tensors
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFileError(f"{path}: tensor 'token_embd.weight' is missing")
        try:
            n_rows = int(embd.shape[-1]) if embd.shape else 0             # GGUF order: rows last
            self.config = ModelConfig.from_fields(self.get, has_output, n_rows, str(path))
        except (TypeError, ValueError) as exc:                          # e.g. a list where a number belongs
            raise ModelFileError(f"{path}: unusable hyper-parameter metadata: {exc}") from None
        self._check_tensors()

    def with_rope(self, freq_base: float | None = None, freq_scale: float | None = None) -> "ModelFile":
        """Replace the file's RoPE frequency base and/or linear scale (llama.cpp main's --rope-freq-base and
        --rope-freq-scale, e.g. for an old CodeLlama file written without its 1e6 base); None keeps the
        file's value. Every rank must apply the same values before building a Stage."""
        changes = {name: float(v) for name, v in (("rope_freq_base", freq_base), ("rope_freq_scale", freq_scale))
                   if v is not None}
        if changes:
            self.config = replace(self.config, **changes)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value of `key` (str, number, bool or list), or `default` when absent."""
        return self.reader.get(key, default)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> Tensor:
        """The tensor `name` (its `.data` is a view into the file mapping)."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor '{name}' is missing")
        return t

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Numpy shape (n_out, n_in) of every tensor the llama graph uses, from the config."""
        c = self.config
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, c.n_embd),
                                              "output_norm.weight": (c.n_embd,)}
        if not c.tied_output:
            shapes["output.weight"] = (c.n_vocab, c.n_embd)
        per_layer = {"attn_norm": (c.n_embd,), "attn_q": (q_dim, c.n_embd), "attn_k": (kv_dim, c.n_embd),
                     "attn_v": (kv_dim, c.n_embd), "attn_output": (c.n_embd, q_dim), "ffn_norm": (c.n_embd,),
                     "ffn_gate": (c.n_ff, c.n_embd), "ffn_up": (c.n_ff, c.n_embd), "ffn_down": (c.n_embd, c.n_ff)}
        for i in range(c.n_layer):
            for short, shape in per_layer.items():
                shapes[f"blk.{i}.{short}.weight"] = shape
        return shapes

    def _check_tensors(self) -> None:
        """Every needed tensor present, of a supported type, with the shape the config implies."""
        for name, shape in self.expected_shapes().items():
            t = self.tensor(name)
            if t.tensor_type not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor '{name}' has type {t.tensor_type.name}, which is not supported")
            got = tuple(reversed(t.shape))
            if got != shape:
                raise UnsupportedModelError(
                    f"{self.path}: tensor '{name}' has shape {got}, but the config implies {shape}")
        rf = self._tensors.get("rope_freqs.weight")
        if rf is not None and (rf.tensor_type != QT.F32 or int(rf.n_elements) != self.config.n_rot // 2):
            raise UnsupportedModelError(f"{self.path}: tensor 'rope_freqs.weight' is not F32 of "
                                        f"{self.config.n_rot // 2} values")

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor `name` from this process (they re-fault if touched again).

        Used after a tensor was repacked into private memory, so the mapping does not count twice.
        """
        t = self._tensors.get(name)
        if t is not None:
            self.reader.release(t)

    def fingerprint(self) -> str:
        """`<file size>-<sha256 of header and metadata, 16 hex>`: equal files give equal fingerprints."""
        size = self.path.stat().st_size
        digest = hashlib.sha256(self.reader.header()).hexdigest()
        return f"{size}-{digest[:16]}"


def open_model(path: str | Path) -> ModelFile:
    """Open and validate a GGUF LLaMA model, memory-mapped (no tensor data is read).

    Raises:
        ModelFileError: missing/unreadable file, not a GGUF, truncated, data past EOF, missing tensor.
        UnsupportedModelError: other architecture, unsupported tensor type, shapes that contradict the config.
    """
    return ModelFile(Path(path), open_gguf(path))
