"""Validation during training: the trainer's periodic `oprd eval` of the student, on its own sampler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from oprd.config import VALIDATION_METRICS, TrainConfig
from oprd.data import load_problems
from oprd.distributed import World
from oprd.evaluation.harness import evaluate
from oprd.rollout import Rollout, SamplingParams


def make_validation(cfg: TrainConfig, rollout: Rollout, tokenizer, world: World,
                    warn: Callable[[str], object]) -> Callable[[int], dict[str, float]] | None:
    """A function step -> {"val/<bench>/<metric>": value} over cfg.eval.benchmarks, or None. Each
    process samples its share of the problems and every process gets the whole result.

    Evaluation seeds its own generator (`rollout.seeded`), so it never shifts the training stream,
    and with the same seed at every step: the problems and the sampling noise stay fixed, so the
    curve moves with the model alone, and step 0 is what `oprd eval` says of the starting student
    with the same seed.
    """
    if not cfg.eval.every:
        return None
    benchmarks = {Path(name).stem: load_problems(name, limit=cfg.eval.limit, need_answers=True, warn=warn)
                  for name in cfg.eval.benchmarks}
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                            max_new_tokens=cfg.eval.max_new_tokens, n=cfg.eval.samples)
    reported = [metric.format(k=cfg.eval.samples) for metric in VALIDATION_METRICS]

    def validation(step: int) -> dict[str, float]:
        record = {}
        for name, problems in benchmarks.items():
            result = evaluate(rollout, tokenizer, problems, params, seed=cfg.seed, world=world,
                              use_chat_template=cfg.data.use_chat_template, enable_thinking=cfg.data.enable_thinking)
            record.update({f"val/{name}/{key}": float(result.metrics[key]) for key in reported})
        return record

    return validation
