"""What many test modules read: where the repository and its smoke recipes are, a run's metrics, and
a `trainer.Run` that `trainer.update` can step on batches a test hands it."""

import functools
from pathlib import Path

import torch

from oprd import distributed
from oprd.config import teacher_sources
from oprd.data import PromptSet, PromptStream
from oprd.objective import LossPlan
from oprd.optim import make_optimizer
from oprd.rollout import HFRollout, Sampler, SamplingParams
from oprd.runs.recorder import RunRecorder, read_metrics
from oprd.teachers import Routing
from oprd.trainer import Run, load_models

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke"
TINY = str(SMOKE / "tiny-qwen3")


def run_metrics(run_dir: Path) -> list[dict]:
    """Every line of a run folder's metrics.jsonl (step 0's validation included)."""
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def trained_models(cfg, world, tokenizer) -> tuple[torch.nn.Module, list]:
    """The student and teachers as the trainer loads them (sharded under several processes, an
    OPRD-only teacher cut short), for the 4-layer smoke models."""
    plan = LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, len(tokenizer))
    sources = teacher_sources(cfg)
    return load_models(cfg, torch.device("cpu"), world, None, sources, [plan for _ in sources])


def update_run(cfg, world, tokenizer, out: Path) -> Run:
    """`trained_models` with the trainer's optimizer, a sampler of the student, and prompt i routed
    to teacher i when the run routes."""
    student, teachers = trained_models(cfg, world, tokenizer)
    optimizer, scheduler = make_optimizer(cfg, student)
    sampler = Sampler(HFRollout.for_model(student, tokenizer), PromptSet([[1]]), tokenizer, tokenizer,
                      torch.device("cpu"))
    weights = tuple(teacher.source.weight for teacher in teachers)
    routing = Routing(torch.tensor([0, 1]) if cfg.teachers.route_by else None, weights)
    return Run(cfg=cfg, world=world, run_dir=out, recorder=RunRecorder(out), device=torch.device("cpu"),
               student=student, teachers=teachers, routing=routing, tokenizer=tokenizer, sampler=sampler,
               sampling=SamplingParams(), optimizer=optimizer, scheduler=scheduler, stream=PromptStream(1, 1, 0),
               start_step=0, validation=None)


def keep_gradients(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    """{"first": {name: gradient}} once `run`'s first optimizer step is taken: the step's whole
    gradients (gathered from every process's shards) before AdamW uses them."""
    kept: dict[str, dict[str, torch.Tensor]] = {}
    step = run.optimizer.step

    @functools.wraps(step)  # as the scheduler's own wrapper, so it does not warn of an overridden step
    def step_and_keep(*args, **kwargs):
        if not kept:
            kept["first"] = {name: distributed.full_value(p.grad).clone()
                             for name, p in run.student.named_parameters() if p.grad is not None}
        return step(*args, **kwargs)

    run.optimizer.step = step_and_keep
    return kept
