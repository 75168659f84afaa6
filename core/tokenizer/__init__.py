"""Tokenizers identical to llama.cpp's, read from GGUF metadata (`tokenizer.ggml.*`).

`Tokenizer.from_reader(reader)` / `Tokenizer.from_path(path)`; see core/tokenizer/tokenizer.py.
"""
from __future__ import annotations

from core.tokenizer.stream import StreamDecoder
from core.tokenizer.tokenizer import Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
