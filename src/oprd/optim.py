"""The optimizer and its schedule: AdamW over the student, a learning-rate factor per step, and a
resumed run's optimizer brought back to its config."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from oprd.config import TrainConfig


def make_optimizer(cfg: TrainConfig, student: torch.nn.Module):
    """AdamW over the student's parameters and its learning-rate schedule (`lr_lambda`)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor after `step` optimizer steps: linear warm-up over warmup_ratio of the
    horizon, then the schedule's decay over the rest of it. The horizon is optim.schedule_steps, by
    default max_steps; a longer one stops the run part-way down the decay, as a run cut short of its
    planned length would."""
    horizon = cfg.optim.schedule_steps or cfg.max_steps
    warmup = math.ceil(cfg.optim.warmup_ratio * horizon)
    floor = cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, horizon - warmup)
        if cfg.optim.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.optim.schedule == "linear":
            return floor + (1 - floor) * max(0.0, 1 - progress)
        return 1.0

    return factor


def apply_optimizer_config(cfg: TrainConfig, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """After a checkpoint's optimizer and scheduler state are restored, their hyperparameters are
    the config's again (a checkpoint stores the old ones): the lr schedule of this config at the
    restored step, and its betas, eps and weight decay. Unchanged values give the same numbers."""
    scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(lr=cfg.optim.lr * factor, initial_lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                     eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
