"""Progress and tables in a log (output that is not a terminal): each task's line once, no cut names."""

import io

from rich.console import Console

from oprd.display import LogProgress, print_table, progress_bar


def log_console(width: int = 80) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width), buffer


def test_a_log_gets_one_line_per_task_never_repeated_at_later_stages():
    console, buffer = log_console()
    progress = progress_bar(console)
    assert isinstance(progress, LogProgress) and not console.is_terminal
    with progress:  # a task that ends early (an SFT run that met its target before max_steps)
        early = progress.add_task("toy world: SFT teacher", total=100)
        for step in range(1, 41):
            progress.update(early, completed=step)
    with progress:  # a stage that finishes its task
        done = progress.add_task("measure student", total=10, status="acc -")
        for i in range(10):
            progress.update(done, advance=1, status=f"acc {10 * i}%")
    with progress:
        progress.advance(progress.add_task("theorem 1", total=2), 2)
    lines = buffer.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["toy world", "measure student", "theorem 1"]
    assert lines[0].startswith("toy world: SFT teacher: 40/100 in ")
    assert lines[1].startswith("measure student: 10/10 in ") and lines[1].endswith(", acc 90%")


def test_a_long_task_logs_a_line_every_interval():
    console, buffer = log_console()
    progress = LogProgress(console, every=0.0)  # every update is due
    with progress:
        task = progress.add_task("distilling", total=3)
        for step in (1, 2, 3):
            progress.update(task, completed=step)
    assert [line.split(" in ")[0] for line in buffer.getvalue().splitlines()] == [
        "distilling: 1/3", "distilling: 2/3", "distilling: 3/3"]


def test_a_table_wider_than_the_log_keeps_every_cell_whole():
    console, buffer = log_console(width=60)
    header = ["method", "Avg@4 (mean)", "spread (sd; min-max)", "per seed", "Best@4", "Dist-4g", "gap closed"]
    print_table(console, "Test problems", header, [["opd_top1_plus_oprd", "78.0", "1.4; 76.9-79.6",
                                                    "76.9 77.5 79.6", "91.2", "62.0", "93.5"]])
    text = buffer.getvalue()
    assert "…" not in text
    assert "opd_top1_plus_oprd" in text and "spread (sd; min-max)" in text and "76.9 77.5 79.6" in text
    narrow, narrow_buffer = log_console(width=80)
    print_table(narrow, "t", ["a", "b"], [["1", "2"]])  # a table that fits is printed as rich lays it out
    assert max(len(line) for line in narrow_buffer.getvalue().splitlines()) < 80
