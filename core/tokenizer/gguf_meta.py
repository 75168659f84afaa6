"""The tokenizer's view of a GGUF's metadata: `tokenizer.*` and `general.*` keys as plain values.

Owns only the hand-over from core/gguf_file.py (the one GGUF parser) to core/tokenizer/vocab.py: the keys
kept, string arrays made into list[bytes], and file errors re-raised as TokenizerError (same one line).
Must not parse GGUF bytes itself, nor interpret the values (vocab.py does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from core import gguf_file
from core.errors import ModelFileError, TokenizerError


def read_metadata(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """All metadata keys starting with `prefix` (plus `general.*`) of a GGUF file, without tensor info.

    Values: int | float | bool, bytes, 1-D numpy arrays, list[bytes] for string arrays.

    Raises:
        TokenizerError: missing file, not a GGUF, unsupported version, truncated or corrupt metadata.
    """
    try:
        return _select(gguf_file.read_metadata(path), prefix)
    except ModelFileError as exc:
        raise TokenizerError(str(exc)) from None


def metadata_from_reader(reader: Any, prefix: str = "") -> dict[str, Any]:
    """The same dict from an open file: a core.gguf_file.GGUFFile, or a gguf.GGUFReader (its mapped bytes).

    Raises:
        TokenizerError: the reader's bytes are not a readable GGUF.
    """
    meta = getattr(reader, "metadata", None)
    if meta is None:
        try:
            meta = gguf_file.metadata_from_buffer(reader.data, str(getattr(reader.data, "filename", "<gguf>")))
        except ModelFileError as exc:
            raise TokenizerError(str(exc)) from None
    return _select(meta, prefix)


def _select(meta: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key: value.tolist() if isinstance(value, gguf_file.StringArray) else value
            for key, value in meta.items() if key.startswith(prefix) or key.startswith("general.")}
