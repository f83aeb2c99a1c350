"""What a user sees while a command runs and in its reports: one progress bar and one table style
for every command, in a terminal and in a log file alike."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.measure import Measurement
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

# In a log (output that is not a terminal), a running task's line is repeated at most this often.
LOG_EVERY_SECONDS = 60.0


class _StatusColumn(ProgressColumn):
    """A task's `status` field (the live loss, a running accuracy); blank when it has none."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("status", "")))


class LogProgress(Progress):
    """A progress bar for output that is not a terminal (a file, a pipe, CI, a scheduler's log): no
    live display, whose final frame rich would print at every stop, finished tasks included. Instead
    one plain line per task when it finishes, when a stop finds it moved since its last line (a
    run that ended early), and every `every` seconds while it runs."""

    def __init__(self, console: Console, every: float = LOG_EVERY_SECONDS) -> None:
        super().__init__(console=console, disable=True)
        self.every = every
        self._logged: dict[int, tuple[float, float]] = {}  # task -> (completed, time) of its last line

    def update(self, task_id, **changes) -> None:
        super().update(task_id, **changes)
        self._log_if_due(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_if_due(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            if self._logged.get(task.id, (0.0, 0.0))[0] != task.completed:
                self._log(task)
        super().stop()

    def _log_if_due(self, task_id) -> None:
        task = self._tasks[task_id]
        completed, at = self._logged.get(task_id, (None, task.start_time or 0.0))
        if completed == task.completed:
            return
        if task.finished or time.monotonic() - at >= self.every:
            self._log(task)

    def _log(self, task) -> None:
        total = f"/{task.total:.0f}" if task.total is not None else ""
        status = task.fields.get("status", "")
        line = f"{task.description}: {task.completed:.0f}{total} in {task.elapsed or 0.0:.0f} s"
        self.console.print(line + (f", {status}" if status else ""), markup=False, highlight=False, soft_wrap=True)
        self._logged[task.id] = (task.completed, time.monotonic())


def progress_bar(console: Console | None = None, *, disable: bool = False) -> Progress:
    """Tasks as `description [bar] done/total elapsed remaining status`; update a task's text with
    `progress.update(task, status=...)`. Where the console is not a terminal, plain lines instead
    (`LogProgress`)."""
    console = console or Console(stderr=True)
    if not console.is_terminal and not disable:
        return LogProgress(console)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), _StatusColumn(), console=console, disable=disable,
    )


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table; cells are written with str()."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def print_table(console: Console, title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """The same table for the console: first column left-aligned, numbers right-aligned, printed at
    its natural width even where the console is narrower (a log file is 80 columns to rich), so no
    name is ever cut to "opd_to…"; a narrow terminal wraps the lines instead."""
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if width > console.width:  # rich lays a table out within the console's width: a wider one, on the same file
        console = Console(file=console.file, width=width, force_terminal=console.is_terminal,
                          color_system=console.color_system, no_color=console.no_color)
    console.print(table)
