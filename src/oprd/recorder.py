"""Everything a run writes besides its checkpoints, and what it shows while it runs.

One `RunRecorder` per run: config.yaml, metrics.jsonl (plus TensorBoard / W&B when asked for),
preflight.json, bridge.json, the console and the progress bar. Under several processes only the
main one writes or prints: this is the one place that asks which process it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.console import Console

from oprd.config import TrainConfig, save_config, to_dict
from oprd.display import progress_bar
from oprd.files import write_text_atomically


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class RunRecorder:
    """The run folder's files and the user's view of a run; silent on every process but the main one."""

    def __init__(self, run_dir: Path, console: Console | None = None):
        self.run_dir = run_dir
        self.main = is_main_process()
        self.console = console or Console(quiet=not self.main)
        self.metrics_path = run_dir / "metrics.jsonl"
        self._sinks: list[Any] = []

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning: {message}")

    def say(self, message: str) -> None:
        self.console.print(message)

    def write_config(self, cfg: TrainConfig) -> None:
        if self.main:
            save_config(cfg, self.run_dir / "config.yaml")

    def write_json(self, name: str, payload: dict) -> None:
        if self.main:
            (self.run_dir / name).write_text(json.dumps(payload, indent=2))

    def open_metrics(self, cfg: TrainConfig, resume_step: int) -> None:
        """Keeps metrics.jsonl up to `resume_step` (later steps are recomputed) and opens the sinks
        named in `cfg.report_to`."""
        if not self.main:
            return
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            write_text_atomically(self.metrics_path, "".join(line + "\n" for line in kept))
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install oprd[tensorboard]`

            self._sinks.append(SummaryWriter(str(self.run_dir / "tensorboard")))
        if "wandb" in cfg.report_to:
            import wandb  # needs `pip install oprd[wandb]`

            self._sinks.append(wandb.init(config=to_dict(cfg), dir=str(self.run_dir), resume="allow"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for sink in self._sinks:
            if hasattr(sink, "add_scalar"):
                for name, value in metrics.items():
                    sink.add_scalar(name, value, step)
            else:
                sink.log(metrics, step=step)

    @contextmanager
    def progress(self, total: int, completed: int) -> Iterator[Callable[[int, str], None]]:
        """A progress bar over steps; yields `advance(step, status)`."""
        bar = progress_bar(self.console, disable=not self.main)
        with bar:
            task = bar.add_task("distilling", total=total, completed=completed, status="")
            yield lambda step, status: bar.update(task, completed=step, status=status)

    def close(self) -> None:
        for sink in self._sinks:
            (sink.close if hasattr(sink, "close") else sink.finish)()
