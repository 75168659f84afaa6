"""Ctrl-C on rank 0, from start-up to exit: the one owner of keyboard interrupts in chat/.

Owns: reading Ctrl-C as a byte on a terminal (while the model generates, and in spawn mode while the
cluster starts: MPICH's process manager shares the terminal's process group and would kill every rank on
a SIGINT), the SIGINT handler of the chat, and what a press means (while generating: the first stops at
the next token, a second quits; at the prompt: quit; a third while a step runs: exit at once). It never
talks to the pipeline; the session asks `check()` between steps and reads turns inside `reading()`.
Other keys read meanwhile are kept, not dropped: they go to the reader's TypeAhead (chat/repl.py) for the
next prompt, as a terminal would have kept them in its input queue; a Ctrl-C empties it, as a terminal
flushes its queue on an interrupt.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from core.transport import launcher

from .options import ReaderSettings
from .repl import PlainReader, TerminalReader, TypeAhead

EXIT_INTERRUPTED = 130


class CtrlCWatcher:
    """While the model generates on a terminal: Ctrl-C arrives as a byte, not as SIGINT.

    Why: in spawn mode MPICH's process manager shares the terminal's process group, and a SIGINT from
    the terminal makes it abort every rank. Turning off ISIG while generating keeps Ctrl-C ours; we
    poll stdin between tokens. (At the prompt prompt_toolkit has the terminal in raw mode anyway.) Every
    other key read goes to `typed` (a TypeAhead), which a Ctrl-C empties.
    """

    def __init__(self, fd: int, typed: TypeAhead):
        import termios
        self.fd = fd
        self.typed = typed
        self._saved = termios.tcgetattr(fd)
        # what the terminal holds: "user" (the user's attributes), "generating" (ours: keys read here),
        # "left-raw" (generation's attributes left for a raw-mode reader) or "line" (a line reader's: the
        # user's, less signals)
        self.mode = "user"
        self._held = 0              # Ctrl-C presses read by resume(), for the next poll()

    @property
    def active(self) -> bool:
        """Keys are read here (the model generates)."""
        return self.mode == "generating"

    def _user_attrs(self) -> list:
        """A copy of the attributes the user had (its control characters a list of their own)."""
        return [list(a) if isinstance(a, list) else a for a in self._saved]

    def resume(self) -> None:
        """Generation starts: no signals, no echo, no line buffering."""
        import termios
        if self.mode == "generating":
            return
        if self.mode == "user":                 # (otherwise the terminal holds our attributes, not the
            self._saved = termios.tcgetattr(self.fd)   # user's: those saved before stay the user's)
        attrs = self._user_attrs()
        attrs[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 0, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        if self.mode == "line":
            # what the line reader's canonical mode took in after its turn (a Ctrl-D typed or pasted right
            # after Enter; the kernel may also take in keys a while after they were typed): Linux keeps an
            # end of file there as a NUL byte, which leaving canonical mode hands over as it is (`typed`
            # would drop it, and the chat sat at its next prompt)
            self._held += self._take_queued(lambda data: data.replace(b"\0", b"\x04"))
        self.mode = "generating"

    def _take_queued(self, keys) -> int:
        """Right after a mode switch: the bytes the terminal queued before it, as `keys(bytes)` says they were
        typed, into `typed`; their Ctrl-C presses."""
        if not select.select([self.fd], [], [], 0)[0]:
            return 0
        return self.typed.feed(keys(os.read(self.fd, 65536)))   # (all of them in one read)

    def pause(self, line_reader: bool = False, raw_reader: bool = False) -> int:
        """Back to the terminal as it was (before reading a turn, and at exit); returns the Ctrl-C presses
        among keys typed just before the switch (line_reader only, else 0).

        line_reader: a plain line reader follows; keep signals off but let Ctrl-C end the line (VEOL),
            so that it still never reaches the process manager.
        raw_reader: a reader that puts the terminal in raw mode itself follows (prompt_toolkit): stop
            reading keys but leave the terminal as it is until that reader takes it, so keys typed in
            between stay in the input queue as typed. Back in canonical mode for those milliseconds, the
            terminal would echo them under the prompt and turn a Ctrl-D on an empty line into an end of
            file that a raw-mode reader never sees (the chat then sat at its prompt).
        A line reader gets the keys that reached the terminal between the last poll() and the switch in
        `typed`: Linux hands bytes queued in non-canonical mode to the next read() as they are, so a Ctrl-D
        typed then arrived as a literal "\x04", not as an end of file, and the chat sat at its prompt.
        """
        import termios
        if raw_reader:
            if self.mode == "generating":
                self.mode = "left-raw"
            return 0
        target = "line" if line_reader else "user"
        if self.mode in ("user", target):
            return 0
        attrs = self._user_attrs()
        if line_reader:
            attrs[3] &= ~termios.ISIG
            attrs[6][termios.VEOL] = b"\x03"
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self.mode = target
        if not line_reader:
            return 0
        return self._take_queued(lambda data: data or b"\x04")   # (b"": a Ctrl-D typed after the switch)

    def poll(self) -> int:
        """Ctrl-C presses typed since the last poll; the other keys go to `typed`."""
        if not self.active:
            return 0
        presses, self._held = self._held, 0
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 1024)
            if not data:
                break
            presses += self.typed.feed(data)
        return presses


class LoadingCtrlC:
    """Spawn mode on a terminal, from start-up until the chat's own Ctrl-C handling takes over.

    Why: the process manager MPICH forks for the workers shares our foreground process group, so a
    Ctrl-C that the terminal turns into SIGINT reaches it too, and it kills every rank at once (the head
    with SIGKILL, without a word). So the terminal sends no signals (as while generating) and a thread
    reads Ctrl-C as a byte; other keys typed meanwhile are kept in `keys.typed` until `hand_over()` gives
    them to the chat's reader. A press is held until `arm()` (every rank has joined, so aborting the job
    reaches them all), then raised in the main thread as KeyboardInterrupt, wherever the start-up is.
    """

    def __init__(self, fd: int):
        self.keys = CtrlCWatcher(fd, TypeAhead())
        self.keys.resume()
        self.pressed = False
        self._armed = self._sent = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._read, name="ctrl-c-while-loading", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self.keys.fd], [], [], 0.05)[0]:
                with self._lock:                    # (hand_over() may swap keys.typed meanwhile)
                    pressed = self.keys.poll() > 0
                    self.pressed = self.pressed or pressed
                if pressed:
                    self._deliver()

    def hand_over(self, typed: TypeAhead) -> None:
        """From now on keys typed go to `typed` (the chat reader's), with what was typed so far."""
        with self._lock:
            typed.absorb(self.keys.typed)
            self.keys.typed = typed

    def arm(self) -> None:
        """From now on a press interrupts the main thread (one held since start-up does so at once)."""
        with self._lock:
            self._armed = True
        self._deliver()

    def _deliver(self) -> None:
        with self._lock:
            if self._armed and self.pressed and not self._sent and not self._stop.is_set():
                self._sent = True
                signal.pthread_kill(self._main, signal.SIGINT)

    def stop(self) -> None:
        """The chat takes over (or the process leaves): the thread ends, the terminal is as it was."""
        with self._lock:                            # no interrupt is delivered after this
            self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.keys.pause()


def make_loading_ctrl_c(settings: ReaderSettings) -> LoadingCtrlC | None:
    """A LoadingCtrlC in spawn mode with a terminal on stdin, else None (elsewhere SIGINT is ours)."""
    if launcher().started or not settings.spawn or not sys.stdin.isatty():
        return None
    try:
        return LoadingCtrlC(sys.stdin.fileno())
    except (OSError, ValueError, ImportError):
        return None


def make_chat_ctrl_c(reader=None, loading: LoadingCtrlC | None = None) -> ChatCtrlC:
    """The chat's Ctrl-C; with a terminal watcher when rank 0 reads a real terminal outside mpiexec (under
    mpiexec, hydra owns Ctrl-C and forwards it as SIGINT).

    The watcher keeps other keys in the reader's `typed` (a prompt_toolkit or plain reader; with a script
    or without a reader they are dropped). `loading` (spawn mode's start-up reader, not stopped yet)
    hands over what was typed during the start-up, and what is typed until it stops, to the same buffer.
    """
    typed = reader.typed if isinstance(reader, (PlainReader, TerminalReader)) else TypeAhead()
    if loading is not None:
        loading.hand_over(typed)
    if launcher().started or not sys.stdin.isatty():
        return ChatCtrlC(None)
    try:
        watcher = CtrlCWatcher(sys.stdin.fileno(), typed)
    except (OSError, ValueError, ImportError):
        return ChatCtrlC(None)
    line_reader = isinstance(reader, PlainReader)
    if line_reader:
        reader.ctrl_c_ends_line = True
    return ChatCtrlC(watcher, line_reader, raw_reader=isinstance(reader, TerminalReader))


class ChatCtrlC:
    """The chat's Ctrl-C: presses counted from SIGINT (no terminal of ours, e.g. under mpiexec) and from
    the terminal watcher (`keys`, a CtrlCWatcher, or None).

    Use `with ctrl_c:` around the chat (installs the handler, terminal in generation mode), `check()`
    after each step, `with ctrl_c.reading():` around reading a turn, `pause()` before the last output.
    """

    def __init__(self, keys: CtrlCWatcher | None, line_reader: bool = False, raw_reader: bool = False):
        self.keys = keys
        self.line_reader = line_reader           # a plain line reader: Ctrl-C ends its line (VEOL)
        self.raw_reader = raw_reader             # prompt_toolkit: it sets the terminal's modes itself
        self.presses = 0
        self.at_prompt = False
        self._previous = None

    def __enter__(self) -> ChatCtrlC:
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        if self.keys is not None:
            self.keys.resume()
        return self

    def __exit__(self, *exc) -> None:
        self.pause()
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum=None, frame=None) -> None:
        """At the prompt: raise (the reader ends the chat); else count, and a third press exits at once."""
        if self.at_prompt:
            raise KeyboardInterrupt
        self.presses += 1
        if self.presses >= 3:
            os._exit(EXIT_INTERRUPTED)

    def check(self, interactive: bool) -> str | None:
        """Between steps: None (no press), "stop" (give the prompt back) or "quit" (a second press, or
        any press when nobody can be given the prompt)."""
        if self.keys is not None:
            self.presses += self.keys.poll()
        if not self.presses:
            return None
        if self.presses >= 2 or not interactive:
            return "quit"
        self.presses = 0
        return "stop"

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Reading a turn: the terminal as the user left it; a press raises KeyboardInterrupt.

        Keys typed since the last check() are read first (into the reader's TypeAhead: left in the
        terminal, a line reader would get them as a line of their own); a Ctrl-C among them is a press at
        the prompt, as it would have been had it stayed in the terminal.
        """
        self.presses = 0
        if self.keys is not None and (self.keys.poll() or
                                      self.keys.pause(line_reader=self.line_reader, raw_reader=self.raw_reader)):
            raise KeyboardInterrupt
        self.at_prompt = True
        try:
            yield
        finally:
            self.at_prompt = False
            if self.keys is not None:
                self.keys.resume()

    def pause(self) -> None:
        """The terminal back as it was (before timings and errors are printed, and at exit)."""
        if self.keys is not None:
            self.keys.pause()
