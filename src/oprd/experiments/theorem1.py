"""Theorem 1, measured: how noisy each objective's gradient is as the student nears the teacher.

The paper's argument for OPRD: the sampled-token OPD gradient is a single-sample estimate whose
variance is driven by Var(log p - log q) over token sampling, so its signal-to-noise ratio
collapses as p -> q, while the OPRD loss is a deterministic function of the rollout.

What is measured, at each of a run's checkpoints (the student, then checkpoints along a run):
draw `batches` independent rollout batches from that student (the prompts of a training step,
temperature 1, as training does), and on each compute the gradient of every objective with the
engine's own loss (`objective.distillation_loss`, the same averaging as an update). Over the
batches, for each objective:

  variance   E||g - E g||^2, the trace of the gradient's covariance (unbiased, `GradientMoments`)
  snr        ||mean g||^2 / variance: the share of an update that is signal; pure noise gives
             about 1/batches, so values near that floor mean "no measurable signal"

and for the KL itself: the sampled-token estimate mean_t (log p - log q) of each batch against the
exact per-token KL of the same batch (its mean, variance across batches and SNR mean^2/variance).
The student-teacher distance of a checkpoint is the exact per-token reverse KL on its own
rollouts, and the OPRD loss (1/d MSE over every layer and response position).

The variance here is over rollout batches, i.e. what an optimizer step actually sees; it includes
the rollout noise that every on-policy objective shares, which is why the full-vocabulary KL is
measured beside the sampled-token one: the gap between the two is the token-sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from oprd.batch import RolloutBatch
from oprd.config import OPDConfig, OPRDConfig
from oprd.data import Problem, prompt_token_ids
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.objective import LossPlan, distillation_loss
from oprd.rollout import HFRollout, SamplingParams, seeded

# objective -> its sections; the same definitions the demo trains with (OPRD: the paper's 1/d MSE
# on every layer and response position, coefficient 1)
OBJECTIVES = {
    "opd_top1": (OPDConfig(objective="sampled"), OPRDConfig(coef=0.0)),
    "opd_top16": (OPDConfig(objective="topk", k=16), OPRDConfig(coef=0.0)),
    "opd_full": (OPDConfig(objective="full"), OPRDConfig(coef=0.0)),
    "oprd": (OPDConfig(objective="none"), OPRDConfig(coef=1.0, normalize=False, positions="all")),
}


@dataclass
class GradientMoments:
    """Running mean and total variance of gradient vectors (P,), one per rollout batch (Welford's
    update, in float64)."""

    count: int = 0
    mean: torch.Tensor | None = None  # (P,)
    squared_deviations: float = 0.0  # sum over samples of ||g - running mean|| terms (Welford's M2, traced)

    def add(self, gradient_P: torch.Tensor) -> None:
        gradient_P = gradient_P.double()
        self.count += 1
        if self.mean is None:
            self.mean = torch.zeros_like(gradient_P)
        delta = gradient_P - self.mean
        self.mean += delta / self.count
        self.squared_deviations += float((delta * (gradient_P - self.mean)).sum())

    @property
    def variance(self) -> float:
        """E||g - E g||^2 (the trace of the covariance), unbiased."""
        return self.squared_deviations / (self.count - 1)

    def summary(self) -> dict[str, float]:
        signal = float(self.mean.square().sum())
        return {"mean_norm_sq": signal, "variance": self.variance, "snr": signal / self.variance if self.variance
                else float("inf")}


@dataclass
class ScalarMoments:
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        values = torch.tensor(self.values, dtype=torch.float64)
        mean, variance = float(values.mean()), float(values.var())
        return {"mean": mean, "variance": variance, "snr": mean**2 / variance if variance else float("inf")}


def flat_gradient(loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """(P,) the gradient of `loss` over `parameters`; zeros where the loss does not reach."""
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, parameters)])


def draw_batches(student: torch.nn.Module, tokenizer, problems: list[Problem], *, batches: int,
                 prompts_per_batch: int, responses_per_prompt: int, max_new_tokens: int,
                 seed: int) -> list[RolloutBatch]:
    """`batches` independent rollout batches of `student` at temperature 1, as training samples them
    (prompts drawn from `problems` with `seed`)."""
    rollout = HFRollout.for_model(student.eval(), tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=responses_per_prompt)
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for b in range(batches):
        picked = torch.randint(len(problems), (prompts_per_batch,), generator=generator).tolist()
        with seeded(seed * 100_003 + b):
            drawn.append(rollout.generate([prompt_token_ids(tokenizer, problems[i].messages) for i in picked], params))
    return drawn


def gradient_statistics(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[RolloutBatch],
                        vocab_size: int) -> dict:
    """Over `batches`: every objective's gradient moments (`GradientMoments.summary`), the sampled-token
    and the exact KL per token (`ScalarMoments.summary`), and the distances to the teacher."""
    plans = {name: LossPlan.from_config(opd, oprd, student.config.num_hidden_layers,
                                        teacher.config.num_hidden_layers, vocab_size)
             for name, (opd, oprd) in OBJECTIVES.items()}
    parameters = [p for p in student.parameters() if p.requires_grad]
    moments = {name: GradientMoments() for name in plans}
    kl_estimate, kl_exact, rep_mse = ScalarMoments(), ScalarMoments(), ScalarMoments()
    for batch in batches:
        for name, plan in plans.items():
            loss, metrics = distillation_loss(plan, student, teacher, batch, plan.normalizers(batch))
            moments[name].add(flat_gradient(loss, parameters))
            if name == "opd_full":  # its loss is the exact KL; its diagnostics carry the sampled-token estimate
                kl_exact.values.append(float(loss.detach()))
                kl_estimate.values.append(float(metrics["opd/kl_estimate"]))
            if name == "oprd":
                rep_mse.values.append(float(loss.detach()))
    return {
        "batches": len(batches),
        "kl_per_token": kl_exact.summary()["mean"],
        "rep_mse": rep_mse.summary()["mean"],
        "gradients": {name: m.summary() for name, m in moments.items()},
        "kl_estimate": {"sampled_token": kl_estimate.summary(), "exact": kl_exact.summary()},
    }


def measure_run(checkpoints: dict[int, Path], teacher_path: Path, problems: list[Problem], *, batches: int,
                prompts_per_batch: int, responses_per_prompt: int, max_new_tokens: int, seed: int,
                progress=None) -> list[dict]:
    """`gradient_statistics` at each of a run's checkpoints (step -> model folder), in step order, on
    `batches` rollout batches drawn from that checkpoint (`draw_batches`)."""
    device = torch.device("cpu")
    teacher = load_model(ModelSpec(model=str(teacher_path)), device).eval()
    tokenizer = load_tokenizer(ModelSpec(model=str(teacher_path)))
    task = progress.add_task("theorem 1: gradient variance", total=len(checkpoints)) if progress else None
    measured = []
    for step, path in sorted(checkpoints.items()):
        student = load_model(ModelSpec(model=str(path)), device, dtype=torch.float32)
        drawn = draw_batches(student, tokenizer, problems, batches=batches, prompts_per_batch=prompts_per_batch,
                             responses_per_prompt=responses_per_prompt, max_new_tokens=max_new_tokens, seed=seed)
        measured.append({"step": step, **gradient_statistics(student, teacher, drawn, len(tokenizer))})
        if progress:
            progress.advance(task)
    return measured


def plot(measured: list[dict], path: Path) -> None:
    """SNR of every objective's gradient, and of the KL estimate, against the distance to the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    distance = [m["kl_per_token"] for m in measured]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in OBJECTIVES:
        left.plot(distance, [m["gradients"][name]["snr"] for m in measured], "o-", label=name)
    left.axhline(1 / measured[0]["batches"], color="gray", linestyle=":", label="pure noise (1 / batches)")
    left.set_title("gradient SNR: ||mean g||^2 / E||g - mean g||^2", fontsize=9)
    for name, key in (("sampled-token estimate", "sampled_token"), ("exact", "exact")):
        right.plot(distance, [m["kl_estimate"][key]["snr"] for m in measured], "o-", label=name)
    right.set_title("KL per token across batches: mean^2 / variance", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("student-teacher KL per token (exact, on the student's rollouts)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()  # training moves right: towards the teacher
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels run into each other
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
