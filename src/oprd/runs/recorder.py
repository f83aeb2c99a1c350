"""Everything a run writes besides its checkpoints, and what it shows while it runs.

One `RunRecorder` per run: config.yaml (and every segment's config in configs/), metrics.jsonl
(plus TensorBoard / W&B when asked for), run.json (`provenance`), gates.json (`gates`),
preflight.json, bridge.json, teachers.json, the console and the progress bar. Under several
processes only the main one writes or prints: this is the one place that asks which process it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.console import Console
from rich.text import Text

from oprd.config import TrainConfig, config_yaml, to_dict
from oprd.display import progress_bar
from oprd.files import write_text_atomically
from oprd.gates import Gate, GateLog, GateResult, judge
from oprd.runs.provenance import RunJson

# What a run folder holds; `overwrite=true` replaces a folder only when it holds nothing else.
RUN_FILES = ("config.yaml", "configs", "metrics.jsonl", "checkpoints", "final", "best", "preflight.json", "bridge.json",
             "teachers.json", "run.json", "gates.json", "report.md", "report", "tensorboard", "wandb", ".vllm-weights")
RUN_MARK = "config.yaml"  # every run writes it before anything else


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class RunRecorder:
    """The run folder's files and the user's view of a run; silent on every process but the main one."""

    def __init__(self, run_dir: Path, console: Console | None = None):
        self.run_dir = run_dir
        self.main = is_main_process()
        self.console = console or Console(quiet=not self.main)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run_json = RunJson(run_dir)
        self.gate_log = GateLog(run_dir)
        self._sinks: list[Any] = []

    def start_provenance(self, *, models: Callable[[], dict], data: Callable[[], dict], **segment) -> None:
        """run.json: a fresh run's record, or a resumed run's next segment (`RunJson.start_segment`);
        `models` and `data` describe them (hashing their files) on the main process only."""
        if self.main:
            self.run_json.start_segment(models=models(), data=data(), **segment)

    def add_cost(self, step: int, cost: dict[str, float]) -> None:
        """A step's cost, added to run.json's (written with the next checkpoint, `best/` or the end)."""
        if self.main:
            self.run_json.add_step(step, cost)

    def add_seconds(self, key: str, seconds: float) -> None:
        """A phase's seconds outside the steps (`provenance.PHASE_KEYS`), added to run.json's cost."""
        if self.main:
            self.run_json.add_seconds(key, seconds)

    def segment_seconds(self, key: str) -> float:
        """What this segment has added to one of run.json's cost keys (0 on the other processes)."""
        return self.run_json.segment_cost.get(key, 0.0)

    def write_provenance(self) -> None:
        if self.main:
            self.run_json.write()

    def end_provenance(self, exit_status: str) -> None:
        if self.main:
            self.run_json.end_segment(exit_status)

    def note(self, key: str, value) -> None:
        """A top-level entry of run.json (e.g. `best`)."""
        if self.main:
            self.run_json.set(key, value)

    def start_gates(self, gates: list[Gate], resume_step: int) -> None:
        if self.main and gates:
            self.gate_log.start(gates, resume_step)

    def set_gate_baseline(self, name: str, metrics: dict[str, float]) -> None:
        if self.main:
            self.gate_log.set_baseline(name, metrics)

    def judge_gates(self, gates: list[Gate], step: int, metrics: dict[str, float], final: bool) -> list[GateResult]:
        """Every gate against one validation (gates.json), on the main process; a failing gate is
        reported as a warning."""
        if not gates or not self.main:  # the main process wrote the baselines; the others only train
            return []
        results = judge(gates, metrics, self.gate_log.baselines)
        self.gate_log.record(step, results, final)
        for result in results:
            if not result.passed:
                shown = "not reported" if result.value is None else f"{result.value:.4g}"
                self.warn(f"gate failed at step {step}: {result.gate} ({result.metric} = {shown}, threshold "
                          f"{result.threshold:.4g})")
        return results

    def warn(self, message: str) -> None:
        self.console.print(Text.assemble(("warning: ", "yellow"), message))

    def say(self, message: str) -> None:
        self.console.print(Text(message))

    def start_segment(self, cfg: TrainConfig, first_step: int, resumed_from: Path | None) -> None:
        """Records the config this segment of the run trains with: configs/segment-NNN.yaml (every
        segment's is kept) and config.yaml (the latest). Called once every check has passed, so
        config.yaml never describes a segment that did not start."""
        if not self.main:
            return
        segments = self.run_dir / "configs"
        number = len(list(segments.glob("segment-*.yaml"))) + 1 if segments.is_dir() else 1
        origin = f"resumed from {resumed_from}" if resumed_from is not None else "a fresh start"
        text = f"# segment {number}: from step {first_step + 1}, {origin}\n{config_yaml(cfg)}"
        write_text_atomically(segments / f"segment-{number:03d}.yaml", text)
        write_text_atomically(self.run_dir / "config.yaml", text)

    def write_json(self, name: str, payload: dict) -> None:
        if self.main:
            write_text_atomically(self.run_dir / name, json.dumps(payload, indent=2))

    def open_metrics(self, cfg: TrainConfig, resume_step: int) -> None:
        """Keeps metrics.jsonl up to `resume_step` (later steps are recomputed) and opens the sinks
        named in `cfg.report_to`."""
        if not self.main:
            return
        if self.metrics_path.exists():
            kept = [json.dumps(row) for row in read_metrics(self.metrics_path, warn=self.warn)
                    if row["step"] <= resume_step]
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


def read_metrics(path: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (the disk filled or the process died during
    the append) is dropped with a warning: its step is recomputed on resume. Any other unreadable
    line is an error that names the file and the line."""
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("a line without a step")
        except ValueError as error:
            if number == len(lines):
                if warn is not None:
                    warn(f"{path}: dropped its last line, which is incomplete (written when the run stopped); its "
                         "step is recomputed")
                break
            raise ValueError(f"{path}:{number}: not a metrics line ({error}); fix or remove that line") from None
        rows.append(row)
    return rows
