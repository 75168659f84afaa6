"""Everything rank 0 shows: the conversation stream on stdout, notes and errors on stderr, via rich.

Owns the colours of DESIGN.md §5 (`--color`: initial prompt yellow, user input bold green, generation
default, errors bold red; NO_COLOR wins), the streaming of token pieces (never half a UTF-8 character),
the per-rank stats table and the timings block. It reads no input and knows nothing of the model.
A pipe or a narrow terminal never breaks output: the stream is written soft-wrapped, unpadded.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from core.cluster import Plan
from core.partition import format_layers
from core.pipeline import RankStats

STYLES = {
    "prompt": "yellow",
    "user": "bold green",
    "output": "",
    "error": "bold red",
    "info": "dim",
}


class Renderer:
    """The one place that writes to the user.

    Args:
        color: --color and not NO_COLOR.
        out: the conversation stream (stdout).
        err: notes, timings and errors (stderr), like llama.cpp's LOG_TEE.
    """

    def __init__(self, color: bool, out: TextIO | None = None, err: TextIO | None = None):
        self.color = color
        out = out or sys.stdout
        err = err or sys.stderr
        common = dict(highlight=False, markup=False, emoji=False, soft_wrap=True,
                      color_system="standard" if color else None, no_color=not color)
        # force_terminal when colour is asked for: under mpiexec stdout is a pipe but the user sees it
        self.out = Console(file=out, force_terminal=True if color else None, **common)
        self.err = Console(file=err, stderr=True, force_terminal=True if color else None, **common)
        self.tail: list[tuple[str, str]] = []   # (text, style) after the last newline shown

    # -- the conversation stream ----------------------------------------------------------------

    def stream(self, text: str, style: str = "output") -> None:
        """Append text to the conversation (no newline added); flushed at once."""
        if not text:
            return
        self.out.print(Text(text, style=STYLES.get(style, "")), end="")
        self.out.file.flush()
        self.track(text, style)

    def track(self, text: str, style: str) -> None:
        """Remember what the cursor's line holds (text shown by us or echoed by the terminal)."""
        if "\n" in text:
            last = text.rsplit("\n", 1)[1]
            self.tail = [(last, style)] if last else []
        elif text:
            self.tail.append((text, style))

    @property
    def at_line_start(self) -> bool:
        return not self.tail

    def take_last_row(self, columns: int) -> list[tuple[str, str]]:
        """The (text, style) pieces on the terminal row the cursor is on, for a line editor to redraw
        as its prompt after a carriage return. Wide characters count double (rich's cell widths)."""
        if not self.tail or columns <= 0:
            return []
        row: list[tuple[str, str]] = []
        col = 0
        for text, style in self.tail:          # replay the terminal's wrapping, character by character
            for ch in text:
                width = cell_len(ch)
                if col + width > columns:
                    row, col = [], 0
                if row and row[-1][1] == style:
                    row[-1] = (row[-1][0] + ch, style)
                else:
                    row.append((ch, style))
                col += width
        if col >= columns:                      # the row is full: the editor starts on a fresh row
            self.stream("\n")
            return []
        return row

    def begin_user_input(self) -> None:
        """Plain line mode: colour what the terminal echoes (llama.cpp's console::user_input)."""
        if self.color:
            self.out.file.write("\x1b[1;32m")
            self.out.file.flush()

    def end_user_input(self) -> None:
        if self.color:
            self.out.file.write("\x1b[0m")
            self.out.file.flush()

    def user_echo(self, text: str) -> None:
        """Show a turn that came from a script or a pipe (nobody typed it on this screen)."""
        self.stream(text, "user")

    # -- side channel (stderr) ------------------------------------------------------------------

    def info(self, text: str) -> None:
        self.err.print(Text(text, style=STYLES["info"]))

    def note(self, text: str) -> None:
        self.err.print(Text(text))

    def error(self, text: str) -> None:
        """One line: `error: ...` in bold red."""
        self.err.print(Text(f"error: {text}", style=STYLES["error"]))

    def table(self, table: Table, to_err: bool = False) -> None:
        (self.err if to_err else self.out).print(table)

    def newline_if_needed(self) -> None:
        if not self.at_line_start:
            self.stream("\n")


class LoadBars:
    """The load's progress (core.cluster.LoadWatcher): one rich progress bar per rank on a terminal, gone
    once every rank has loaded; elsewhere a line per rank at most every 10% and every LINE_EVERY_S (so
    a quick load prints none)."""

    LINE_EVERY_S = 1.0

    def __init__(self, ui: Renderer):
        self.ui = ui
        self.plan: Plan | None = None             # set when every rank agreed on it (labels the bars)
        self._progress: Progress | None = None
        self._tasks: dict[int, TaskID] = {}
        self._decile: dict[int, int] = {}
        self._last_line: dict[int, float] = {}     # when each rank's last line was printed (or the load began)
        self._t0: float | None = None

    def _label(self, rank: int) -> str:
        r = self.plan.ranks[rank] if self.plan is not None and rank < len(self.plan.ranks) else None
        return f"rank {rank}" + (f" ({r.host}, layers {format_layers(r.layers)})" if r is not None else "")

    def layers_done(self, rank: int, done: int, total: int) -> None:
        if not self.ui.err.is_terminal:
            now = time.monotonic()
            self._t0 = now if self._t0 is None else self._t0
            decile = 10 * done // max(total, 1)
            quiet_for = now - self._last_line.get(rank, self._t0)
            if decile > self._decile.get(rank, 0) and quiet_for >= self.LINE_EVERY_S:
                self._decile[rank], self._last_line[rank] = decile, now
                self.ui.info(f"loading: {self._label(rank)} {10 * decile}% ({done}/{total} layers)")
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(),
                                      console=self.ui.err, transient=True)
            self._progress.start()
        if rank not in self._tasks:
            self._tasks[rank] = self._progress.add_task(f"loading {self._label(rank)}", total=total)
        self._progress.update(self._tasks[rank], completed=done)

    def loaded(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def stats_table(stats: list[RankStats], n_tokens: int, title: str = "per-rank stats") -> Table:
    """A table of `pipeline.stats()` rows: layers (and TP index with --tp), ms/token, bytes/token, RSS, KV fill.

    n_tokens: positions evaluated so far (prompt + fed-back tokens), to turn totals into per-token ms.
    """
    table = Table(title=title, show_edge=False, header_style="bold")
    hosts = [s.host for s in stats]
    tp = any(s.tp_size > 1 for s in stats)
    for col in ("rank", "host", "layers", *(("TP",) if tp else ()), "compute ms/tok", "wait ms/tok",
                "bytes sent/tok", "RSS MiB", "KV fill"):
        # never cut a value short (an 80-column pipe under mpiexec): fold it; host names stay whole
        table.add_column(col, justify="left" if col in ("host", "layers") else "right", overflow="fold",
                         min_width=max(map(len, hosts), default=4) if col == "host" else None)
    per = max(n_tokens, 1)
    for s in stats:
        table.add_row(str(s.rank), s.host, format_layers(s.layers) if len(s.layers) else "-",
                      *((f"{s.tp_index}/{s.tp_size}",) if tp else ()), f"{s.compute_ms / per:.2f}",
                      f"{s.wait_ms / per:.2f}", f"{int(s.bytes_per_token):,}",
                      f"{s.rss_bytes / 2**20:.1f}", f"{s.n_past}/{s.n_ctx} ({100.0 * s.kv_fill:.0f}%)")
    return table


def timings_text(t: dict) -> str:
    """llama_print_timings' block from the session's counters (milliseconds)."""
    def line(name: str, ms: float, n: int | None = None, unit: str = "tokens") -> str:
        if n is None:
            return f"llama-mpi timings: {name:>16} = {ms:10.2f} ms"
        per = ms / n if n else 0.0
        tps = 1000.0 * n / ms if ms > 0 else 0.0
        return (f"llama-mpi timings: {name:>16} = {ms:10.2f} ms / {n:5d} {unit:6} "
                f"({per:8.2f} ms per token, {tps:8.2f} tokens per second)")
    return "\n".join([
        line("load time", t["load_ms"]),
        line("sample time", t["sample_ms"], t["n_sample"], "runs"),
        line("prompt eval time", t["prompt_ms"], t["n_prompt_eval"], "tokens"),
        line("eval time", t["eval_ms"], t["n_eval"], "runs"),
        line("total time", t["total_ms"]),
    ])


def toolbar_text(n_past: int, n_ctx: int, tok_per_s: float | None, rank_ms: list[float]) -> str:
    """The prompt_toolkit bottom toolbar: context fill, last turn's speed, per-rank ms/token."""
    parts = [f"ctx {n_past}/{n_ctx} ({100.0 * n_past / max(n_ctx, 1):.0f}%)"]
    if tok_per_s:
        parts.append(f"{tok_per_s:.1f} tok/s")
    if rank_ms:
        parts.append("ranks ms/tok " + " ".join(f"{i}:{ms:.1f}" for i, ms in enumerate(rank_ms)))
    parts.append("/help  Ctrl-C stop  Ctrl-D quit")
    return "  |  ".join(parts)
