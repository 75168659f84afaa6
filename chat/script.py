"""--script replay files and --transcript / /save transcripts (Markdown, or JSON messages for .json).

Owns reading a script (bytes -> turns, invalid UTF-8 a one-line error) and recording a conversation
(settings, the verbatim stream, user turns with the model's replies, run facts and timings) to Markdown.
Everything above the `## Run` heading depends only on the settings and the tokens, never on the rank
count or the clock, so two runs that generated the same tokens write the same text there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UsageError

from .lines import ScriptTurn, decode_script, split_script
from .options import read_user_file

RUN_HEADING = "## Run"


def load_script(path: str) -> list[ScriptTurn]:
    """The turns of a --script file.

    Raises:
        UsageError: missing/unreadable file or invalid UTF-8 (names the file and line).
    """
    return split_script(decode_script(read_user_file(path, "--script: file"), path))


@dataclass
class Transcript:
    """Everything shown in the conversation stream, plus the user turns, for a Markdown file."""
    settings: list[tuple[str, str]] = field(default_factory=list)
    stream: list[str] = field(default_factory=list)        # the conversation as shown, verbatim
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, model reply so far)
    run: list[tuple[str, str]] = field(default_factory=list)
    timings: str = ""
    messages: list[dict[str, str]] | None = None  # -cnv: the conversation as the chat template saw it

    def add(self, text: str) -> None:
        self.stream.append(text)
        if self.turns:
            user, reply = self.turns[-1]
            self.turns[-1] = (user, reply + text)

    def user(self, text: str) -> None:
        self.stream.append(text)
        self.turns.append((text, ""))

    def markdown(self) -> str:
        conversation = "".join(self.stream)
        fence = _fence(conversation)
        out = ["# llama-mpi transcript", "", "## Settings", ""]
        out += [f"- {k}: {_inline(v)}" for k, v in self.settings]
        out += ["", "## Conversation", "", fence + "text", conversation.rstrip("\n"), fence, ""]
        if self.turns:
            out += ["## Turns", ""]
            for i, (user, reply) in enumerate(self.turns, start=1):
                f = _fence(user + reply)
                out += [f"### Turn {i}", "", "User:", "", f + "text", user.rstrip("\n"), f, "",
                        "Model:", "", f + "text", reply.strip("\n"), f, ""]
        out += [RUN_HEADING, ""]
        out += [f"- {k}: {_inline(v)}" for k, v in self.run]
        if self.timings:
            out += ["", "```text", self.timings, "```"]
        return "\n".join(out) + "\n"

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as role/content messages (-cnv's own list; else the user turns and replies)."""
        if self.messages is not None:
            return list(self.messages)
        out = []
        for user, reply in self.turns:
            out += [{"role": "user", "content": user.rstrip("\n")}, {"role": "assistant", "content": reply.strip("\n")}]
        return out

    def save(self, path: str) -> None:
        """Markdown, or the messages as JSON when the file name ends in .json."""
        text = (json.dumps(self.chat_messages(), ensure_ascii=False, indent=1) + "\n"
                if path.lower().endswith(".json") else self.markdown())
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write transcript '{path}': {exc.strerror}") from None


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks inside the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _inline(value: str) -> str:
    return value.replace("\n", "\\n")
