"""Where user turns come from on rank 0: a prompt_toolkit session on a terminal, a plain line reader on a
pipe (under mpiexec, piped stdin, --simple-io), or a --script file. All three apply chat/lines.py's rules,
so a turn means the same whatever the source.

Owns: line editing, history (a file in the user's data directory), the key bindings for `\\`, `/` and
--multiline-input, and the bottom toolbar. It never talks to the pipeline and leaves Ctrl-C to
chat/interrupts.py (at the prompt it surfaces as KeyboardInterrupt; end of input as None). While it
waits, it calls the session's `peer_watch` hook every WATCH_EVERY_S on the main thread.
"""
from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from core.transport import launcher

from .lines import LineAssembler, ScriptTurn, join_turn, wants_more
from .options import ReaderSettings
from .render import Renderer

if TYPE_CHECKING:
    from .session import ChatSession


WATCH_EVERY_S = 0.25          # how often a waiting reader calls the session's peer_watch hook

PTK_STYLES = {"prompt": "ansiyellow nobold", "output": "nobold noinherit", "error": "bold ansired",
              "user": "bold ansigreen"}


class PlainReader:
    """Lines from a text stream (stdin under mpiexec or from a pipe), with the same line rules.

    Args:
        stream: where lines come from.
        ui: the renderer (user-input colour; echo of turns nobody typed on this screen).
        multiline: --multiline-input.
        echo: print each turn (input piped from a file: the terminal did not show it).
    """

    ctrl_c_ends_line = False      # set by chat/interrupts.py on a terminal: Ctrl-C arrives as "\x03"

    def __init__(self, stream: TextIO, ui: Renderer, multiline: bool, echo: bool):
        self.stream = stream
        self.ui = ui
        self.multiline = multiline
        self.echo = echo
        self._pending = b""          # watched reads: bytes read from the descriptor, not yet a line

    def _line(self, watch: Callable[[], None] | None) -> str:
        fd = _fileno(self.stream)
        if watch is not None and fd is not None:
            return self._watched_line(fd, watch)
        if not self.ctrl_c_ends_line:
            return self.stream.readline()
        # canonical terminal with Ctrl-C as an end-of-line byte: one read() is one line
        return os.read(self.stream.fileno(), 65536).decode("utf-8", errors="replace")

    def _watched_line(self, fd: int, watch: Callable[[], None]) -> str:
        """One line read straight from the descriptor (the stream's own buffer is never used, so no
        line can sit in it unseen while we wait), calling watch() every WATCH_EVERY_S meanwhile."""
        last = time.monotonic()
        while True:
            cut = self._pending.find(b"\n")
            if cut >= 0:
                line, self._pending = self._pending[:cut + 1], self._pending[cut + 1:]
                return line.decode("utf-8", errors="replace")
            if select.select([fd], [], [], WATCH_EVERY_S)[0]:
                data = os.read(fd, 65536)
                if self.ctrl_c_ends_line or not data:      # one read() is one line / end of input
                    line, self._pending = self._pending + data, b""
                    return line.decode("utf-8", errors="replace")
                self._pending += data
            if time.monotonic() - last >= WATCH_EVERY_S:
                try:
                    watch()
                except Exception:
                    if os.isatty(fd):                       # the error starts below what was typed
                        self.ui.stream("\n")
                    raise
                last = time.monotonic()

    def read_turn(self, session: "ChatSession", instruct: bool) -> str | None:
        lines = LineAssembler(self.multiline)
        watch = getattr(session, "peer_watch", None)
        self.ui.begin_user_input()
        try:
            while True:
                raw = self._line(watch)
                if "\x03" in raw:
                    raise KeyboardInterrupt
                if not raw:                          # end of input: what was typed so far, then None
                    turn = lines.finish()
                    break
                if self.echo:
                    self.ui.user_echo(raw if raw.endswith("\n") else raw + "\n")
                turn = lines.feed(raw.rstrip("\n").rstrip("\r"))
                if turn is not None:
                    break
        finally:
            self.ui.end_user_input()
        self.ui.track("\n", "user")         # the terminal echoed the line and its newline
        return turn


class ScriptReader:
    """--script: one turn per block, echoed in the user colour as if typed."""

    def __init__(self, turns: list[ScriptTurn], ui: Renderer):
        self.turns = list(turns)
        self.ui = ui

    def read_turn(self, session: "ChatSession", instruct: bool) -> str | None:
        if not self.turns:
            return None
        turn = self.turns.pop(0).text()
        self.ui.user_echo(turn)
        if not turn.endswith("\n"):
            self.ui.stream("\n")            # a turn ending in `/` has no newline; keep the screen tidy
        return turn


def history_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "llama-mpi" / "history"


class TerminalReader:
    """prompt_toolkit on a real terminal: editing, history, multiline rules, toolbar."""

    def __init__(self, ui: Renderer, multiline: bool):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.styles import Style

        self.ui = ui
        self.multiline = multiline
        kb = KeyBindings()

        @kb.add("enter")
        def _(event):
            buf = event.current_buffer
            if wants_more(buf.document.text_before_cursor, multiline):
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        def _(event):
            event.current_buffer.validate_and_handle()

        try:
            path = history_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        style = {"": "bold ansigreen"} if ui.color else {}
        style.update({"bottom-toolbar": "noreverse bg:ansiblack ansigray" if ui.color else "noreverse"})
        self.prompt_session = PromptSession(history=history, key_bindings=kb, multiline=True,
                                            style=Style.from_dict(style), include_default_pygments_style=False,
                                            color_depth=None if ui.color else _mono_depth())

    def read_turn(self, session: "ChatSession", instruct: bool) -> str | None:
        session.refresh_rank_ms()
        # prompt_toolkit draws from column 0: hand it the cursor's row (e.g. "User:") as its message
        row = self.ui.take_last_row(self.prompt_session.output.get_size().columns)
        if row:
            self.ui.out.file.write("\r")
            self.ui.out.file.flush()
        message = [(PTK_STYLES.get(style, "") if self.ui.color else "", text) for text, style in row]
        watch = getattr(session, "peer_watch", None)
        app = self.prompt_session.app
        try:
            text = self.prompt_session.prompt(
                message, bottom_toolbar=session.toolbar, prompt_continuation=lambda width, line, soft: "",
                pre_run=(lambda: app.create_background_task(_watch_while_prompting(app, watch))) if watch else None)
        except EOFError:
            return None
        except Exception:
            self.ui.track("\n", "user")    # prompt_toolkit left the cursor on a fresh row
            raise
        self.ui.track("\n", "user")
        return join_turn(text.split("\n"), self.multiline)


async def _watch_while_prompting(app, watch: Callable[[], None]) -> None:
    """A task of the prompt's event loop (the main thread): watch() every WATCH_EVERY_S; an error it
    raises leaves the prompt and is raised by prompt() (prompt_toolkit cancels this task at the end)."""
    import asyncio
    while True:
        await asyncio.sleep(WATCH_EVERY_S)
        try:
            watch()
        except Exception as exc:                 # noqa: BLE001 - handed to the caller of prompt()
            if app.future is not None and not app.future.done():
                app.exit(exception=exc)
            return


def _fileno(stream) -> int | None:
    """The stream's descriptor, or None (an in-memory stream)."""
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def _mono_depth():
    from prompt_toolkit.output import ColorDepth
    return ColorDepth.MONOCHROME


def make_reader(settings: ReaderSettings, ui: Renderer, script_turns: list[ScriptTurn] | None):
    """The reader for this run: --script, else prompt_toolkit on a terminal, else plain lines."""
    if script_turns is not None:
        return ScriptReader(script_turns, ui)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if tty and not settings.simple_io and not launcher().started:
        return TerminalReader(ui, settings.multiline_input)
    return PlainReader(sys.stdin, ui, settings.multiline_input, echo=not sys.stdin.isatty() and not launcher().started)
