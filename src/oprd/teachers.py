"""The teachers of a run: one model, the student itself, or several, and which rows each scores.

  Teacher           a loaded teacher: its model (the student module itself when live) and its loss plan
  Routing           which teacher scores each prompt (`teachers.route_by`), or all of them, weighted
  update_ema        self_mode=ema: the teacher's moving average of the student, after each step
  ema_model         the EMA teacher of a run, if any: checkpoints save and restore it

Self-distillation (`teacher.model=self`) takes three forms. `frozen`: the student's weights at step
0, loaded again from `student.*` (so a resumed run still has them). `ema`: a second copy of the
student that follows it by an exponential moving average; it is saved in every checkpoint. `live`:
the student module itself, read under no_grad in eval mode before its own forward: no second copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from oprd import distributed
from oprd.config import SELF, TeacherSource, require
from oprd.data import PromptSet
from oprd.distributed import World
from oprd.objective import LossPlan, TeacherScores, score_with_teacher


@dataclass
class Teacher:
    """A loaded teacher: frozen (its own weights), or the live student."""

    source: TeacherSource
    model: torch.nn.Module
    plan: LossPlan

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def is_live(self) -> bool:
        return self.source.self_mode == "live"

    @property
    def is_ema(self) -> bool:
        return self.source.self_mode == "ema"

    def memory(self) -> dict:
        """What this teacher holds in memory of its own: a live teacher shares the student's weights."""
        held = [] if self.is_live else [distributed.local_part(p) for p in self.model.parameters()]
        return {"source": self.source.spec.model if self.source.self_mode is None else SELF,
                "self_mode": self.source.self_mode, "parameters": sum(p.numel() for p in held),
                "bytes": sum(p.numel() * p.element_size() for p in held)}

    @contextmanager
    def reading(self) -> Iterator[None]:
        """The teacher reads a batch: a live student in eval mode (no dropout), then back as it was."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def release(self) -> None:
        """After the loss that used its scores (OPD applies its LM head there): a sharded teacher's
        gathered weights are freed, as no backward will free them. A live teacher's are the
        student's, which its backward frees."""
        if not self.is_live:
            distributed.reshard(self.model)

    def score(self, plan: LossPlan, batch, rows_B: torch.Tensor | None, world: World) -> TeacherScores | None:
        """Its scores of the rows `rows_B` ((B,) bool; None: every row) of a micro-batch, placed in
        the micro-batch; None when it has no row there. A sharded teacher runs in step on every
        process: a process without rows for it reads one row and drops it while another has rows."""
        if rows_B is None:
            return self._read(plan, batch)
        has_rows = bool(rows_B.any())
        if not (world.any(has_rows) if distributed.is_sharded(self.model) else has_rows):
            return None
        rows = rows_B.nonzero()[:, 0] if has_rows else torch.zeros(1, dtype=torch.long, device=rows_B.device)
        scores = self._read(plan, batch.select(rows))
        return scores.placed(rows, batch.response_ids.shape) if has_rows else None

    def _read(self, plan: LossPlan, batch) -> TeacherScores:
        with self.reading():
            return score_with_teacher(plan, self.model, batch)


@dataclass(frozen=True)
class Routing:
    """Which teacher scores each prompt of the prompt set (`teacher_of_prompt`), or every teacher
    every prompt with its weight (`teacher_of_prompt` None)."""

    teacher_of_prompt: torch.Tensor | None  # (P,) long, on the training device
    weights: tuple[float, ...]

    @classmethod
    def of(cls, sources: list[TeacherSource], prompts: PromptSet, route_by: str | None,
           device: torch.device) -> Routing:
        weights = tuple(source.weight for source in sources)
        if route_by is None:
            return cls(None, weights)
        teacher_of = {value: index for index, source in enumerate(sources) for value in source.routes}
        unrouted = sorted({value for value in prompts.routes if value not in teacher_of})
        shown = ", ".join(map(repr, unrouted[:5])) + (" ..." if len(unrouted) > 5 else "")
        require(not unrouted,
                f"teachers.route_by={route_by}: the data has values no teacher takes ({shown}); "
                "name a teacher after each value, or list the values in "
                f"its teachers.members[i].routes (teachers: {', '.join(s.name for s in sources)})")
        return cls(torch.tensor([teacher_of[value] for value in prompts.routes], device=device), weights)

    @property
    def routed(self) -> bool:
        return self.teacher_of_prompt is not None

    def rows(self, teacher: int, batch) -> torch.Tensor | None:
        """(B,) bool: the rows of `batch` that teacher `teacher` scores (None: every row)."""
        if self.teacher_of_prompt is None:
            return None
        return self.teacher_of_prompt[batch.prompt_index] == teacher

    def normalizers(self, own: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The denominators each teacher's loss is divided by, from its own (the step's positions it
        scores): routed, the step's total, so the teachers' sums add up to the step's average; else
        its own over its weight's share, so the loss is the weighted average of the teachers'."""
        if self.routed:
            total = {key: sum(o[key] for o in own) for key in own[0]}
            return [total for _ in own]
        return [{key: value * (sum(self.weights) / weight) for key, value in o.items()}
                for o, weight in zip(own, self.weights)]


def ema_model(teachers: list[Teacher]) -> torch.nn.Module | None:
    """The teacher that follows the student by a moving average (self_mode=ema): saved and resumed with it."""
    return next((teacher.model for teacher in teachers if teacher.is_ema), None)


@torch.no_grad()
def update_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter (the two are built
    alike, sharded alike under torchrun, so each process updates its own shards)."""
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(f"the EMA teacher has {len(teacher_params)} parameters and the student {len(student_params)}")
    for ema, current in zip(teacher_params, student_params):
        ema.lerp_(current.detach().to(ema.dtype), 1.0 - decay)
