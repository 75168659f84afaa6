"""Slash commands typed at the prompt (/help /reset /stats /save FILE /quit): parsing only, no I/O.

A turn is a command when its first word is one of COMMANDS (a lone unknown `/word` is reported as an
unknown command); anything else, including text that merely starts with a slash, goes to the model.
"""
from __future__ import annotations

from dataclasses import dataclass

COMMANDS = {
    "/help": "show this help",
    "/reset": "clear the context on every rank and start again from the initial prompt",
    "/stats": "per-rank table: layers, TP index, ms/token, bytes/token, RSS, KV fill",
    "/save": "/save FILE: write the transcript so far to FILE (Markdown)",
    "/quit": "leave (also Ctrl-D, or Ctrl-C at the prompt)",
}


@dataclass(frozen=True)
class Command:
    name: str            # "/help", ..., or "unknown"
    arg: str = ""        # the rest of the line (the file for /save; the word for unknown)


def parse_command(turn: str) -> Command | None:
    """A user turn -> Command, or None when the turn is text for the model."""
    text = turn.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    word, _, rest = text.partition(" ")
    if word in COMMANDS:
        return Command(word, rest.strip())
    if "\n" not in text and " " not in text and word[1:].isalpha():
        return Command("unknown", word)
    return None


def help_text() -> str:
    lines = ["commands:"]
    lines += [f"  {name:<8} {what}" for name, what in COMMANDS.items()]
    lines += ["input: Enter submits; a line ending in \\ continues; a line ending in / submits without a "
              "newline; an empty line lets the model go on; Ctrl-C stops generation."]
    return "\n".join(lines)
