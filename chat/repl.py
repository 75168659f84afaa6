"""Where user turns come from on rank 0: a prompt_toolkit session on a terminal, a plain line reader on a
pipe (under mpiexec, piped stdin, --simple-io), or a --script file. All three apply chat/lines.py's rules,
so a turn means the same whatever the source.

Owns: line editing, history (a file in the user's data directory), the key bindings for `\\`, `/` and
--multiline-input, and the bottom toolbar. It never talks to the pipeline and leaves Ctrl-C to
chat/interrupts.py (at the prompt it surfaces as KeyboardInterrupt; end of input as None). While it
waits, it calls the session's `peer_watch` hook every WATCH_EVERY_S on the main thread. Keys typed while
no prompt was up reach it as a TypeAhead (filled by chat/interrupts.py's terminal watcher) and show at
the next prompt as if typed there.
"""
from __future__ import annotations

import codecs
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol, TextIO

from core.transport import launcher

from .lines import LineAssembler, ScriptTurn, apply_line_rule, join_turn, wants_more
from .options import ReaderSettings
from .render import Renderer

WATCH_EVERY_S = 0.25          # how often a waiting reader calls the session's peer_watch hook

class TurnHooks(Protocol):
    """What a reader calls on the chat session (chat/session.py) while it waits for a turn."""
    peer_watch: Callable[[], None] | None       # raises when a rank failed; None: nothing to watch

    def refresh_rank_ms(self) -> None: ...

    def toolbar(self) -> str: ...


class NoHooks:
    """TurnHooks of a reader used without a chat session: nothing to watch, an empty toolbar."""
    peer_watch = None

    def refresh_rank_ms(self) -> None:
        pass

    def toolbar(self) -> str:
        return ""


PTK_STYLES = {"prompt": "ansiyellow nobold", "output": "nobold noinherit", "error": "bold ansired",
              "user": "bold ansigreen"}


class TypeAhead:
    """Keys typed while no prompt was up (the model generating, the cluster starting), kept for the next
    prompt as a terminal keeps its input queue (llama.cpp's `main` leaves them there).

    `feed()` takes the bytes as read from the terminal (non-canonical, no echo): UTF-8 is decoded
    incrementally (a character split between two reads stays whole; invalid bytes become U+FFFD, as the
    readers decode); escape sequences (arrow and function keys, Alt+key, a terminal's replies such as a
    cursor-position report) are dropped, as llama.cpp's console drops them at its prompt; Backspace, Ctrl-U
    and Ctrl-W edit the line being typed, as the terminal's line editing would; Enter (CR or LF) ends a
    line; Ctrl-C empties everything typed so far (a terminal flushes its input queue on an interrupt) and
    is counted; Ctrl-D on an empty line ends the input once what came before it is used (a canonical
    terminal's read() returns 0 there, so llama.cpp's `main` exits; keys after it are dropped), elsewhere
    in a line it is dropped; other control keys are dropped. `take_turn()` gives a reader what to show at
    its prompt. Thread-safe: in spawn mode the start-up reader feeds it from its thread.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""             # decoded, edited text: lines ended by "\n", then the line being typed
        self._esc = ""              # inside an escape sequence: "esc", "csi", "ss3" or "str" (OSC, DCS...)
        self._after_cr = False      # a CR just ended a line: a following LF is the same Enter
        self._eof = False           # Ctrl-D on an empty line: the input ends after self._text

    @property
    def text(self) -> str:
        """What is kept so far (lines end in "\\n")."""
        with self._lock:
            return self._text

    def feed(self, data: bytes) -> int:
        """Bytes read from the terminal -> how many Ctrl-C presses they held (each one empties the
        buffer: only what follows the last press is kept)."""
        with self._lock:
            presses = 0
            for ch in self._decoder.decode(data):
                if ch == "\x03":                  # a half-read character after it stays in the decoder
                    presses += 1
                    self._forget()
                else:
                    self._key(ch)
            return presses

    def discard(self) -> None:
        """Forget everything typed ahead (and any half-read character or escape sequence)."""
        with self._lock:
            self._clear()

    def absorb(self, other: TypeAhead) -> None:
        """Take over what `other` holds (appended to ours, its half-read state included); `other` ends empty."""
        if other is self:
            return
        with self._lock, other._lock:
            self._text += other._text
            self._decoder, other._decoder = other._decoder, self._decoder
            self._esc, self._after_cr = other._esc, other._after_cr
            self._eof = self._eof or other._eof
            other._clear()

    def take_turn(self, multiline: bool) -> tuple[str | None, bool]:
        """What the next prompt starts with -> (text, complete); (None, False): the input has ended (Ctrl-D
        on an empty line, and everything typed before it taken).

        Whole lines are handed over one turn at a time, by chat/lines.py's rules: if a typed line ends a
        turn (Enter; `\\` and --multiline-input continue, `/` ends), that turn's lines are returned
        joined by "\\n" as an editor holds them, with complete=True (the reader submits them at once), and
        the rest stays for the following prompts. Otherwise everything kept is returned (the line being
        typed last, after any continued lines) with complete=False: the prompt starts with it and the
        user goes on typing. ("", False) when nothing was typed ahead.
        """
        with self._lock:
            if self._eof and not self._text:
                return None, False
            lines = self._text.split("\n")         # the last item: the line being typed (maybe "")
            for i, line in enumerate(lines[:-1]):
                if not apply_line_rule(line, multiline)[1]:
                    self._text = "\n".join(lines[i + 1:])
                    return "\n".join(lines[:i + 1]), True
            self._text = ""
            return "\n".join(lines), False

    def _forget(self) -> None:
        """Everything typed so far, but not a half-read character (a Ctrl-C keeps that in the decoder)."""
        self._text, self._esc, self._after_cr, self._eof = "", "", False, False

    def _clear(self) -> None:
        self._forget()
        self._decoder.reset()

    def _key(self, ch: str) -> None:
        if self._eof:                               # the input has ended: nothing after it counts
            return
        after_cr, self._after_cr = self._after_cr, False
        if self._esc or ch == "\x1b":
            self._escape(ch)
            return
        line_start = self._text.rfind("\n") + 1
        if ch in "\r\n":
            if ch == "\n" and after_cr:
                return
            self._text += "\n"
            self._after_cr = ch == "\r"
        elif ch in "\x7f\x08":                     # Backspace: within the line being typed
            if len(self._text) > line_start:
                self._text = self._text[:-1]
        elif ch == "\x15":                          # Ctrl-U: the line being typed
            self._text = self._text[:line_start]
        elif ch == "\x17":                          # Ctrl-W: the word before the cursor
            line = self._text[line_start:]
            kept = line.rstrip(" ")
            kept = kept[:len(kept) - len(kept.split(" ")[-1])]
            self._text = self._text[:line_start] + kept
        elif ch == "\x04":                          # Ctrl-D: end of input on an empty line
            self._eof = len(self._text) == line_start
        elif ch == "\t" or ch >= " " and not "\x80" <= ch <= "\x9f":
            self._text += ch
        # other control keys are dropped

    def _escape(self, ch: str) -> None:
        """One character of an escape sequence (dropped): ESC [ ... final, ESC O x, ESC ] ... BEL/ST, or
        ESC + one key (Alt+key)."""
        state = self._esc
        if state == "":                              # ch is ESC
            self._esc = "esc"
        elif state == "esc":
            self._esc = {"[": "csi", "O": "ss3", "]": "str", "P": "str", "_": "str", "^": "str",
                         "\x1b": "esc"}.get(ch, "")
        elif state == "csi":
            if "\x40" <= ch <= "\x7e":                # the final byte
                self._esc = ""
        elif state == "ss3":
            self._esc = ""
        elif state == "str":                         # ends with BEL or ST (ESC \\)
            if ch == "\x07":
                self._esc = ""
            elif ch == "\x1b":
                self._esc = "str-esc"
        elif state == "str-esc":
            self._esc = "" if ch == "\\" else "str"


class PlainReader:
    """Lines from a text stream (stdin under mpiexec or from a pipe), with the same line rules.

    Args:
        stream: where lines come from.
        ui: the renderer (user-input colour; echo of turns nobody typed on this screen).
        multiline: --multiline-input.
        echo: print each turn (input piped from a file: the terminal did not show it).
        typed: keys typed ahead (chat/interrupts.py's terminal watcher fills it while the model
            generates); a new, empty TypeAhead if None.
    """

    ctrl_c_ends_line = False      # set by chat/interrupts.py on a terminal: Ctrl-C arrives as "\x03"

    def __init__(self, stream: TextIO, ui: Renderer, multiline: bool, echo: bool, typed: TypeAhead | None = None):
        self.stream = stream
        self.ui = ui
        self.multiline = multiline
        self.echo = echo
        self.typed = typed if typed is not None else TypeAhead()
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

    def read_turn(self, session: TurnHooks, instruct: bool) -> str | None:
        lines = LineAssembler(self.multiline)
        watch = session.peer_watch
        ahead, complete = self.typed.take_turn(self.multiline)
        if ahead is None:                            # Ctrl-D typed ahead on an empty line
            return None
        self.ui.begin_user_input()
        try:
            turn, head = None, ""                    # head: the line typed ahead, not yet ended
            if ahead or complete:                    # shown as the terminal would have echoed it
                self.ui.user_echo(ahead + "\n" if complete else ahead)
                self.ui.begin_user_input()           # (user_echo reset the colour)
                typed_lines = ahead.split("\n")
                if not complete:
                    head = typed_lines.pop()
                for line in typed_lines:
                    turn = lines.feed(line)          # the last one ends the turn when complete
            while turn is None:
                raw = self._line(watch)
                if "\x03" in raw:
                    raise KeyboardInterrupt
                if not raw and not head:             # end of input: what was typed so far, then None
                    turn = lines.finish()
                    break
                if self.echo and raw:
                    self.ui.user_echo(raw if raw.endswith("\n") else raw + "\n")
                raw, head = head + raw, ""           # (end of input after a head: the head is the line)
                turn = lines.feed(raw.rstrip("\n").rstrip("\r"))
        finally:
            self.ui.end_user_input()
        self.ui.track("\n", "user")         # the terminal echoed the line and its newline
        return turn


class ScriptReader:
    """--script: one turn per block, echoed in the user colour as if typed."""

    def __init__(self, turns: list[ScriptTurn], ui: Renderer):
        self.turns = list(turns)
        self.ui = ui

    def read_turn(self, session: TurnHooks, instruct: bool) -> str | None:
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
    """prompt_toolkit on a real terminal: editing, history, multiline rules, toolbar.

    Keys typed ahead (`typed`, a TypeAhead; a new, empty one if None) start the next prompt: an unfinished
    turn is pre-filled in the editor (cursor at its end), a finished one is shown and submitted at once.
    """

    def __init__(self, ui: Renderer, multiline: bool, typed: TypeAhead | None = None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.styles import Style

        self.ui = ui
        self.multiline = multiline
        self.typed = typed if typed is not None else TypeAhead()
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

    def read_turn(self, session: TurnHooks, instruct: bool) -> str | None:
        session.refresh_rank_ms()
        # prompt_toolkit draws from column 0: hand it the cursor's row (e.g. "User:") as its message
        row = self.ui.take_last_row(self.prompt_session.output.get_size().columns)
        if row:
            self.ui.out.file.write("\r")
            self.ui.out.file.flush()
        message = [(PTK_STYLES.get(style, "") if self.ui.color else "", text) for text, style in row]
        watch = session.peer_watch
        app = self.prompt_session.app
        ahead, complete = self.typed.take_turn(self.multiline)
        if ahead is None:                  # Ctrl-D typed ahead on an empty line: as Ctrl-D at the prompt
            return None
        try:
            text = self.prompt_session.prompt(
                message, default=ahead, accept_default=complete,
                bottom_toolbar=session.toolbar, prompt_continuation=lambda width, line, soft: "",
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
