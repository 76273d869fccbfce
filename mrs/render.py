"""Terminal output with rich: markdown that renders while it streams, download
progress, and the tables of `list`, `search` and `ps`.

Streaming markdown (``MarkdownStream``): the answer is split into top-level markdown
blocks. Every block but the last is finished (nothing later can change how it looks),
so its rendered lines are printed once, for good, into the scrollback. Only the last block, the one
still growing, is redrawn in a small live area, showing its bottom lines when it is
taller than the screen. When the answer ends the live area is cleared and the last
block printed like the others: the screen holds exactly the rendered answer, with no
half-drawn frames, however long the answer is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Self

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.segment import Segment
from rich.spinner import Spinner
from rich.table import Table

CODE_THEME = "monokai"
_PARSER = MarkdownIt().enable("strikethrough").enable("table")  # the parser rich's Markdown uses


def finished_prefix(text: str) -> int:
    """Length of the leading part of ``text`` made of finished top-level markdown blocks."""
    starts = [t.map[0] for t in _PARSER.parse(text) if t.level == 0 and t.map is not None and t.nesting >= 0]
    if len(starts) < 2:
        return 0
    lines = text.splitlines(keepends=True)
    return sum(len(line) for line in lines[:starts[-1]])


class _Lines:
    """Pre-rendered lines (lists of segments), optionally only the last ``height`` of them."""

    def __init__(self, lines: list[list[Segment]], height: int | None = None):
        self.lines = lines[-height:] if height else lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


class MarkdownStream:
    """Feed text pieces with ``push``; call ``close`` (or use ``with``) when the answer ends.

    On a terminal it renders markdown as described above; elsewhere (a pipe, a file) it
    writes the raw text as it comes, which is what a script reading the output wants.
    Rendered lines of finished blocks never change (rich puts the blank line between two
    blocks before the second), so they are printed once and counted in ``printed``.
    """

    def __init__(self, console: Console, code_theme: str = CODE_THEME, fps: float = 15.0,
                 markdown: bool | None = None):
        self.console, self.code_theme = console, code_theme
        self.markdown = console.is_terminal if markdown is None else markdown
        self.text = ""
        self.finished = 0        # characters of self.text in finished blocks
        self.printed = 0         # rendered lines printed for good
        self.interval = 1.0 / fps
        self.last_draw = 0.0
        self.live: Live | None = None

    def __enter__(self) -> Self:
        if self.markdown:
            self.live = Live(Spinner("dots", style="dim"), console=self.console, auto_refresh=True,
                             refresh_per_second=12, transient=True, redirect_stdout=False,
                             redirect_stderr=False)
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lines(self, text: str) -> list[list[Segment]]:
        markdown = Markdown(text, code_theme=self.code_theme)
        return self.console.render_lines(markdown, self.console.options, pad=False)

    def push(self, piece: str) -> None:
        if not piece:
            return
        self.text += piece
        if not self.markdown:
            self.console.file.write(piece)
            self.console.file.flush()
            return
        now = time.monotonic()
        if now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw()

    def _print_upto(self, end: int) -> None:
        lines = self._lines(self.text[:end])
        if len(lines) > self.printed:
            self.console.print(_Lines(lines[self.printed:]))
            self.printed = len(lines)

    def _draw(self) -> None:
        cut = self.finished + finished_prefix(self.text[self.finished:])
        if cut > self.finished:
            self.finished = cut
            self._print_upto(cut)
        rest = self.text[self.finished:]
        if self.live is not None and rest.strip():
            separator = [[]] if self.printed else []   # the blank line before the growing block
            lines = separator + self._lines(rest)
            self.live.update(_Lines(lines, self.console.height - 1), refresh=True)

    def close(self) -> None:
        """Print what is left and stop the live area (safe to call twice)."""
        if not self.markdown:
            if self.text and not self.text.endswith("\n"):
                self.console.file.write("\n")
                self.text += "\n"
            self.console.file.flush()
            return
        if self.live is None:
            return
        live, self.live = self.live, None
        live.update("", refresh=True)
        live.stop()
        self._print_upto(len(self.text))


def render_markdown(console: Console, text: str, code_theme: str = CODE_THEME) -> None:
    """Print a whole markdown text the way MarkdownStream leaves it on the screen."""
    with MarkdownStream(console, code_theme, markdown=True) as stream:
        stream.push(text)


# ---------------------------------------------------------------------------------------
# Download progress (events from mrs.hub.pull).
# ---------------------------------------------------------------------------------------

class PullProgress:
    """Draws mrs.hub.pull's Ollama-style events as one progress bar per file."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(TextColumn("{task.description}", style="cyan"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict) -> None:
        status = str(event.get("status", ""))
        if "total" not in event and "completed" not in event:
            if status != "success":
                self.progress.console.print(f"[dim]{status}[/dim]")
            return
        name = status.removeprefix("pulling ")
        if status not in self.tasks:
            self.tasks[status] = self.progress.add_task(name, total=event.get("total"))
        self.progress.update(self.tasks[status], completed=event.get("completed", 0), total=event.get("total"))


# ---------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"


def ago(epoch: float, now: float | None = None) -> str:
    """An epoch time as '3 minutes ago' / '2 days ago' (Ollama's `list` style)."""
    seconds = max(0.0, (now or time.time()) - epoch)
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def models_table(rows: Iterable[dict]) -> Table:
    """`mrs list`: rows are store.model_info dicts (or {"name", "error"} for a broken folder);
    rows with ``source: ollama`` are Ollama's models, marked so."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "SIZE", "MODIFIED"):
        table.add_column(column, no_wrap=column != "ARCHITECTURE",
                         justify="right" if column in ("PARAMS", "SIZE") else "left")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], f"[red]broken: {row['error']}[/red]", "", "", "", "")
            continue
        name = f"{row['name']} [dim](ollama)[/dim]" if row.get("source") == "ollama" else row["name"]
        table.add_row(name, row["architecture"], row["parameter_size"], row["dtype"],
                      human_bytes(row["size_bytes"]), ago(row["modified"]))
    return table


def search_table(rows: Iterable[dict]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("MODEL", "TASK", "DOWNLOADS", "LIKES", "UPDATED"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("DOWNLOADS", "LIKES") else "left")
    for row in rows:
        table.add_row(row["id"], row.get("task") or "", f"{row.get('downloads', 0):,}", f"{row.get('likes', 0):,}",
                      (row.get("modified") or "")[:10])
    return table


def ps_table(models: Iterable[dict[str, Any]]) -> Table:
    """`mrs ps`: the /api/ps models of a running server."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("SIZE", "CONTEXT") else "left")
    for m in models:
        vram, size = m.get("size_vram") or 0, m.get("size") or 0
        processor = "100% GPU" if size and vram >= size else "100% CPU" if not vram else f"{100 * vram // size}% GPU"
        table.add_row(str(m.get("name", "?")), human_bytes(size), processor, str(m.get("context_length", "")),
                      _until(m.get("expires_at")))
    return table


def _until(expires: str | None) -> str:
    if not expires:
        return ""
    try:
        when = datetime.fromisoformat(expires)
    except ValueError:
        return expires
    seconds = when.timestamp() - time.time()
    if seconds > 10 * 365 * 86400:
        return "Forever"
    if seconds <= 0:
        return "now"
    return f"{int(seconds // 60)} minutes from now" if seconds >= 60 else f"{int(seconds)} seconds from now"
