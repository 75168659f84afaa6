"""Errors raised at llama-mpi's boundaries.

Every error's str() is one line a user can act on: it names the file, rank, value or option at fault.
The CLI prints `error: <str(exc)>` and exits non-zero; nothing here is raised inside an MPI collective.
"""
from __future__ import annotations


class LlamaMpiError(Exception):
    """Base class: a problem the user caused or can fix, shown as one line without a traceback."""


class ModelFileError(LlamaMpiError):
    """The model file is missing, unreadable, not a GGUF, truncated, or internally inconsistent."""


class UnsupportedModelError(LlamaMpiError):
    """A valid GGUF we cannot run: another architecture, an unsupported tensor type, bad shapes."""


class TokenizerError(LlamaMpiError):
    """The vocabulary metadata is unusable, or ids/text cannot be converted."""


class ContextOverflowError(LlamaMpiError):
    """A prompt or turn does not fit in the context window."""


class UsageError(LlamaMpiError):
    """Bad command-line options or option values (names the option and the legal range)."""


class PipelineError(LlamaMpiError):
    """A rank of the MPI pipeline failed, died, or disagrees with the head (names rank, host, layers)."""


def one_line(exc: BaseException) -> str:
    """An exception as one line for a report: a LlamaMpiError's own text, else "TypeName: text"."""
    text = str(exc) if isinstance(exc, LlamaMpiError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


class TemplateError(UsageError):
    """A chat template that does not compile or fails while rendering (one line, with its own message)."""
