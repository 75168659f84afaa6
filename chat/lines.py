r"""How typed lines become one user turn (llama.cpp console::readline), and how a script file splits.

Owns the pure rules shared by every reader (prompt_toolkit, plain pipe, --script): a line ending in `\`
continues the turn, a line ending in `/` submits without a newline, otherwise Enter submits with a
newline; `--multiline-input` swaps Enter and `\`. It reads no file and prints nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import UsageError


def apply_line_rule(line: str, multiline: bool) -> tuple[str, bool]:
    """One typed line (without its end-of-line) -> (text to add to the turn, another line follows).

    Args:
        line: the line as typed.
        multiline: --multiline-input (Enter continues; a final `\\` submits).
    """
    if line.endswith("/"):
        return line[:-1], False            # submit now, no newline
    more = multiline
    if line.endswith("\\"):
        line = line[:-1]
        more = not more                    # `\` flips what Enter means
    return line + "\n", more


def wants_more(text: str, multiline: bool) -> bool:
    """Would pressing Enter after `text` (possibly several lines) continue the turn? (key bindings)"""
    last = text.split("\n")[-1]
    return apply_line_rule(last, multiline)[1]


def join_turn(lines: list[str], multiline: bool) -> str:
    """Lines of one turn as typed -> the buffer main hands to the tokenizer (line rules applied)."""
    return "".join(apply_line_rule(line, multiline)[0] for line in lines)


class LineAssembler:
    """Feed typed lines one at a time; `turn` is set when a line ends the turn."""

    def __init__(self, multiline: bool):
        self.multiline = multiline
        self.buffer = ""
        self.started = False

    def feed(self, line: str) -> str | None:
        """Add a line; returns the whole turn when it is complete, else None."""
        text, more = apply_line_rule(line, self.multiline)
        self.buffer += text
        self.started = True
        if more:
            return None
        turn, self.buffer, self.started = self.buffer, "", False
        return turn

    def finish(self) -> str | None:
        """End of input in the middle of a turn: what was typed so far (None if nothing)."""
        if not self.started:
            return None
        turn, self.buffer, self.started = self.buffer, "", False
        return turn


@dataclass(frozen=True)
class ScriptTurn:
    lineno: int            # first line of the turn in the file (1-based)
    lines: tuple[str, ...]  # the lines as written

    def text(self) -> str:
        """The turn as the same line rules make it: every line of the block belongs to this turn."""
        return "".join(apply_line_rule(line, False)[0] if line.endswith(("\\", "/")) else line + "\n"
                       for line in self.lines)


def decode_script(data: bytes, path: str) -> str:
    """Script bytes -> text; invalid UTF-8 is a one-line error naming the file, line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"script '{path}': invalid UTF-8 at line {line} (byte {exc.start})") from None


def split_script(text: str) -> list[ScriptTurn]:
    """A script: one turn per block of lines, blank lines between turns; a line ending in `\\` carries
    the turn over a following blank line. Lines starting with `#!` are ignored (comments)."""
    turns: list[ScriptTurn] = []
    block: list[str] = []
    start = 0
    for i, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if line.startswith("#!"):
            continue
        continued = bool(block) and block[-1].endswith("\\")
        if not line.strip() and not continued:
            if block:
                turns.append(ScriptTurn(start, tuple(block)))
                block = []
            continue
        if not block:
            start = i
        block.append(line)
    if block:
        turns.append(ScriptTurn(start, tuple(block)))
    return turns
