"""What a user sees while a command runs and in its reports: one progress bar and one table style
for every command."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


class _StatusColumn(ProgressColumn):
    """A task's `status` field (the live loss, a running accuracy); blank when it has none."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("status", "")))


def progress_bar(console: Console | None = None, *, disable: bool = False) -> Progress:
    """Tasks as `description [bar] done/total elapsed remaining status`; update a task's text with
    `progress.update(task, status=...)`."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), _StatusColumn(), console=console or Console(stderr=True), disable=disable,
    )


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table; cells are written with str()."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def console_table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    """The same table for the terminal: first column left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table
