"""On-policy distillation: the training loop, top to bottom.

Each step: draw prompts -> the student samples n responses each -> the frozen teacher reads the
same tokens (no grad, no LM head, only as deep as the loss needs) -> L = L_OPD + mu * L_OPRD over
micro-batches -> one AdamW step -> metrics, checkpoint.

Where this departs from the textbook algorithm, and why:
- One optimizer step per rollout batch, so the student that is updated is exactly the policy that
  sampled: no importance ratio or clipping is needed (as in the paper's setup).
- Losses are averaged over all response tokens of the step, not per micro-batch, so micro-batch
  size changes memory, never the gradient.
- Output-space losses apply both LM heads chunk by chunk on response positions only
  (`losses.chunked_head_loss`): no (B, T, V) logits of either model are ever held.
- Losses use temperature-1 distributions; the rollout temperature only shapes sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from transformers.utils import logging as hf_logging

from oprd import checkpoint, losses
from oprd.alignment import paired_states, retokenize, teacher_side, usable_rows
from oprd.bridge import Bridge, bridge_loss_rows, load_bridge
from oprd.config import TrainConfig, check_model_pairing, save_config, to_dict
from oprd.data import load_problems, prompt_token_ids
from oprd.evaluation import evaluate
from oprd.models import eos_token_ids, load_model, load_model_config, load_tokenizer
from oprd.rollout import HFRollout, RolloutBatch, SamplingParams
from oprd.teacher import FINAL, capture_hidden, model_inputs, response_rows


# --------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Objective:
    """What one update computes; built once from the config and the two models."""

    opd: str  # none | sampled | topk | full
    topk: int
    topk_support: str
    chunk_size: int
    oprd_coef: float  # mu; 0 = off
    normalize: bool
    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    positions: str
    positions_k: int
    aggregation: str
    vocab_size: int  # logits beyond the shared tokenizer (embedding padding) are cut off
    opd_start_step: int = 0  # OPD from step opd_start_step + 1 on
    oprd_stop_step: int = 0  # OPRD up to this step; 0 = always
    bridge: Bridge | None = field(default=None, compare=False)  # OPRD through frozen projectors

    @classmethod
    def from_config(cls, cfg: TrainConfig, student_layers: int, teacher_layers: int, vocab_size: int,
                    bridge: Bridge | None = None):
        layers: list[int] = []
        if cfg.uses_oprd:
            mode = cfg.oprd.layers
            layers = list(mode) if isinstance(mode, list) else losses.select_layers(student_layers, mode)
        pairing = losses.layer_map(student_layers, teacher_layers)
        if bridge is not None:
            missing = [l for l in layers if l not in bridge.student_layers]
            if missing:
                raise ValueError(f"oprd.layers asks for student layers {missing} that the bridge has no projector for "
                                 f"(it covers {list(bridge.student_layers)})")
            pairing = {s: t for s, t in bridge.pairs}
            pairing = [pairing.get(l, 0) for l in range(1, student_layers + 1)]
        return cls(
            opd=cfg.opd.objective,
            topk=cfg.opd.k,
            topk_support=cfg.opd.support,
            chunk_size=cfg.opd.chunk_size or losses.default_chunk_rows(vocab_size),
            oprd_coef=cfg.oprd.coef,
            normalize=cfg.oprd.normalize,
            student_layers=tuple(layers),
            teacher_layers=tuple(pairing[l - 1] for l in layers),
            positions=cfg.oprd.positions,
            positions_k=cfg.oprd.k,
            aggregation=cfg.oprd.aggregation,
            vocab_size=vocab_size,
            opd_start_step=cfg.opd.start_step,
            oprd_stop_step=cfg.oprd.stop_step,
            bridge=bridge,
        )

    def at_step(self, step: int) -> "Objective":
        """The objective of one step of a staged recipe (e.g. OPRD-Bridge first, then OPD)."""
        opd = self.opd if step > self.opd_start_step else "none"
        oprd_coef = self.oprd_coef if not self.oprd_stop_step or step <= self.oprd_stop_step else 0.0
        return dataclasses.replace(self, opd=opd, oprd_coef=oprd_coef)

    @property
    def uses_opd(self) -> bool:
        return self.opd != "none"

    @property
    def uses_oprd(self) -> bool:
        return self.oprd_coef > 0

    def oprd_mask(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) float: the positions OPRD supervises; across tokenizers, those of them with a partner."""
        k = self.positions_k if self.positions in ("first_k", "last_k") else None
        return losses.position_mask(batch.response_mask, self.positions, k) * usable_rows(batch)

    def normalizers(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Denominators of the step's averages, from the whole step's batch."""
        oprd = self.oprd_mask(batch)
        oprd_total = oprd.sum() if self.aggregation == "token" else (oprd.sum(-1) > 0).sum()
        return {"opd": batch.response_mask.sum().float(), "oprd": oprd_total.float()}


def distillation_loss(
    objective: Objective,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: RolloutBatch,
    normalizers: dict[str, torch.Tensor],
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_OPD + mu * L_OPRD on one micro-batch, as its share of the step's average.

    Returns the loss (backward-ready) and metrics as weighted sums that add up over micro-batches.
    """
    response_mask = batch.response_mask.bool()
    oprd_mask = objective.oprd_mask(batch)
    # The teacher keeps every response position when OPD needs them, else only OPRD's positions.
    keep = response_mask if objective.uses_opd else oprd_mask.bool()
    teacher_inputs, teacher_rows = teacher_side(batch, keep)  # across tokenizers: the teacher's own tokens

    started = time.perf_counter()
    with torch.no_grad():
        teacher_h = capture_hidden(
            teacher, teacher_inputs, list(objective.teacher_layers), teacher_rows, final=objective.uses_opd
        )
    _synchronize(teacher)
    if timings is not None:
        timings["teacher"] = timings.get("teacher", 0.0) + time.perf_counter() - started

    student_h = capture_hidden(
        student, model_inputs(batch), list(objective.student_layers),
        response_rows(keep, batch.prompt_ids.shape[1]), final=objective.uses_opd,
    )
    loss = torch.zeros((), device=batch.response_ids.device)
    metrics: dict[str, torch.Tensor] = {}

    if objective.uses_opd:
        weights = (response_mask.float() / normalizers["opd"].clamp(min=1))[response_mask]  # (N,)
        targets = batch.response_ids[response_mask]  # (N,)
        teacher_final = teacher_h[FINAL]
        student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        V = objective.vocab_size

        def chunk_loss(student_logits: torch.Tensor, chunk: slice) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_final[chunk])[:, :V]
            terms, diagnostics = losses.output_space_terms(
                objective.opd, student_logits[:, :V], teacher_logits, targets[chunk],
                k=objective.topk, support=objective.topk_support,
            )
            for name, values in diagnostics.items():
                metrics[name] = metrics.get(name, 0.0) + (values * weights[chunk]).sum()
            return (terms * weights[chunk]).sum()

        opd_loss = losses.chunked_head_loss(
            student_h[FINAL], student_head.weight, student_head.bias, chunk_loss, objective.chunk_size
        )
        metrics["opd/loss"] = opd_loss.detach()
        loss = loss + opd_loss

    if objective.uses_oprd:
        # Rows were kept for `keep`; of those, OPRD reads the ones its position mask selects.
        selected = oprd_mask.bool()[keep]
        weights = losses.row_weights(oprd_mask, objective.aggregation, normalizers["oprd"])[oprd_mask.bool()]
        student_rows = [student_h[l][selected] for l in objective.student_layers]
        teacher_rows = [teacher_h[l][selected] for l in objective.teacher_layers]
        if objective.bridge is None:
            rep_loss, rep_metrics = losses.representation_loss_rows(
                student_rows, teacher_rows, weights, objective.normalize
            )
        else:
            pairs = list(zip(objective.student_layers, objective.teacher_layers))
            rep_loss, rep_metrics = bridge_loss_rows(
                objective.bridge, dict(zip(pairs, student_rows)), dict(zip(pairs, teacher_rows)), weights
            )
        for name, value in rep_metrics.items():
            metrics[_name_layer(name, objective.student_layers)] = value
        metrics["rep/loss"] = rep_loss.detach()
        loss = loss + objective.oprd_coef * rep_loss
    return loss, metrics


def _name_layer(metric: str, student_layers: tuple[int, ...]) -> str:
    head, sep, pair = metric.rpartition("/pair_")
    return f"{head}/layer_{student_layers[int(pair)]}" if sep else metric


def _synchronize(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data


class PromptStream:
    """Shuffled passes over the prompts; its (epoch, position) state makes it resumable."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = epoch, position

    def next_batch(self) -> list[int]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            taken = order[self.position : self.position + self.batch_size - len(picked)]
            picked += taken
            self.position += len(taken)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def load_prompts(
    cfg: TrainConfig, tokenizer, console: Console, teacher_tokenizer=None
) -> tuple[list[list[int]], list[list[int]] | None]:
    """The training prompts, tokenised for the student, and for a teacher with another tokenizer
    (rendered with its own chat template) when one is given; else None for the teacher."""
    problems = load_problems(
        cfg.data.path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
        split=cfg.data.split, limit=cfg.data.limit,
    )
    render = lambda tok, p: prompt_token_ids(tok, p.messages, use_chat_template=cfg.data.use_chat_template)  # noqa: E731
    prompts = [render(tokenizer, p) for p in problems]
    fits = [len(p) <= cfg.data.max_prompt_tokens for p in prompts]
    dropped = fits.count(False)
    if dropped:
        longest = max(len(p) for p in prompts)
        console.print(
            f"[yellow]{dropped} of {len(prompts)} prompts are longer than data.max_prompt_tokens="
            f"{cfg.data.max_prompt_tokens} (longest {longest} tokens) and are left out, not cut."
        )
    if not any(fits):
        raise ValueError(f"no prompt of {cfg.data.path} fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    teacher_prompts = None
    if teacher_tokenizer is not None:
        teacher_prompts = [render(teacher_tokenizer, p) for p, fit in zip(problems, fits) if fit]
    return [p for p, fit in zip(prompts, fits) if fit], teacher_prompts


def make_validation(cfg: TrainConfig, rollout: HFRollout, tokenizer):
    """A function step -> {"val/<bench>/<metric>": value} over cfg.eval_benchmarks, or None.

    Evaluation seeds its own generator inside fork_rng, so it never shifts the training stream.
    """
    if not cfg.eval_every:
        return None
    benchmarks = {Path(name).stem: load_problems(name, limit=cfg.eval_limit) for name in cfg.eval_benchmarks}
    params = SamplingParams(
        temperature=cfg.eval_temperature, max_new_tokens=cfg.eval_max_new_tokens, n=cfg.eval_samples
    )
    reported = (f"avg@{cfg.eval_samples}", f"best@{cfg.eval_samples}", "dist-4g", "avg_len", "format_error_rate")

    def validate(step: int) -> dict[str, float]:
        record = {}
        for name, problems in benchmarks.items():
            result = evaluate(rollout, tokenizer, problems, params, seed=cfg.seed + step,
                              use_chat_template=cfg.data.use_chat_template)
            record.update({f"val/{name}/{key}": float(result.metrics[key]) for key in reported})
        return record

    return validate


def preflight_alignment(
    objective: Objective, student: torch.nn.Module, teacher: torch.nn.Module, batch: RolloutBatch
) -> dict[int, float]:
    """{student layer: mean cosine similarity} of the two models' states at OPRD's positions, before
    training; through the bridge's projectors when there is one (what Stage 2 will compare)."""
    keep = objective.oprd_mask(batch).bool()
    if not keep.any():
        return {}
    student_h, teacher_h = paired_states(
        student, teacher, batch, keep, objective.student_layers, objective.teacher_layers
    )
    cosines = {}
    for s, t in zip(objective.student_layers, objective.teacher_layers):
        a, b = student_h[s].float(), teacher_h[t].float()
        if objective.bridge is not None:
            a, b = objective.bridge.project_student((s, t), a), objective.bridge.project_teacher((s, t), b)
        cosines[s] = float(torch.nn.functional.cosine_similarity(a, b.to(a.device), dim=-1).mean())
    return cosines


def preflight_warning(cosines: dict[int, float], min_cos: float, bridged: bool) -> str | None:
    if not cosines:
        return None
    mean = sum(cosines.values()) / len(cosines)
    if mean >= min_cos:
        return None
    per_layer = ", ".join(f"layer {l}: {c:.2f}" for l, c in cosines.items())
    if bridged:
        return (f"through the bridge, student and teacher states have mean cosine similarity {mean:.2f} before "
                f"training (below oprd.preflight_min_cos={min_cos}; {per_layer}). The bridge fits these models "
                "poorly: refit it on more rollouts or at another rank (`oprd bridge sweep`).")
    return (f"student and teacher hidden states have mean cosine similarity {mean:.2f} before training (below "
            f"oprd.preflight_min_cos={min_cos}; {per_layer}). OPRD-Vanilla matches states position by position and "
            "can collapse when the two models do not share a representation (e.g. a teacher trained from another "
            "initialisation). Fit an OPRD-Bridge (`oprd bridge fit`) and pass bridge.path=FILE, or use an OPD "
            "objective.")


# --------------------------------------------------------------------------- run bookkeeping


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Creates or reopens the run folder; returns it and the checkpoint to resume from, if any.

    A folder that already holds a run is never silently reused: resume=true continues it,
    overwrite=true replaces it, anything else is an error.
    """
    run_dir = Path(cfg.output_dir)
    holds_run = run_dir.is_dir() and any(run_dir.iterdir())
    if holds_run and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(
                f"output_dir {run_dir} already holds files. Pass resume=true to continue that run, "
                "overwrite=true to replace it, or choose another output_dir."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoint.list_checkpoints(run_dir / "checkpoints") if cfg.resume else []
    return run_dir, (found[-1] if found else None)


def lr_lambda(cfg: TrainConfig):
    warmup = math.ceil(cfg.optim.warmup_ratio * cfg.max_steps)
    floor = cfg.optim.min_lr_ratio

    def factor(step: int) -> float:  # `step` = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.optim.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.optim.schedule == "linear":
            return floor + (1 - floor) * max(0.0, 1 - progress)
        return 1.0

    return factor


class MetricsLogger:
    """metrics.jsonl (one object per step) plus optional TensorBoard / W&B; main process only."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = is_main_process()
        self.sinks: list[Any] = []
        if not self.enabled:
            return
        if self.path.exists():  # steps after the checkpoint are recomputed, so drop them
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            tmp.replace(self.path)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install oprd[tensorboard]`

            self.sinks.append(SummaryWriter(str(run_dir / "tensorboard")))
        if "wandb" in cfg.report_to:
            import wandb  # needs `pip install oprd[wandb]`

            self.sinks.append(wandb.init(config=to_dict(cfg), dir=str(run_dir), resume="allow"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for sink in self.sinks:
            if hasattr(sink, "add_scalar"):
                for name, value in metrics.items():
                    sink.add_scalar(name, value, step)
            else:
                sink.log(metrics, step=step)

    def close(self) -> None:
        for sink in self.sinks:
            (sink.close if hasattr(sink, "close") else sink.finish)()


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Runs on-policy distillation as configured; returns the run folder (final model in final/)."""
    console = console or Console(quiet=not is_main_process())
    hf_logging.disable_progress_bar()  # our progress bar is the one that matters
    run_dir, resume_from = prepare_output_dir(cfg)
    device = pick_device(cfg.device)

    # Pre-flight: configs and tokenizers only, so a bad pairing fails before any weights load.
    student_tok, teacher_tok = load_tokenizer(cfg.student), load_tokenizer(cfg.teacher)
    student_config, teacher_config = load_model_config(cfg.student), load_model_config(cfg.teacher)
    for warning in check_model_pairing(cfg, student_config, teacher_config, student_tok, teacher_tok):
        console.print(f"[yellow]warning: {warning}")
    cross_tokenizer = student_tok.get_vocab() != teacher_tok.get_vocab()  # allowed with a bridge only
    prompts, teacher_prompts = load_prompts(cfg, student_tok, console, teacher_tok if cross_tokenizer else None)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)

    student_spec = cfg.student
    if resume_from is not None:
        student_spec = dataclasses.replace(cfg.student, model=str(resume_from), revision=None, random_init=False)
    # The optimizer keeps float32 master weights (bf16 comes from autocast) unless student.dtype says otherwise.
    student = load_model(student_spec, device, dtype=torch.float32 if cfg.student.dtype == "auto" else None)
    teacher = load_model(cfg.teacher, device).eval().requires_grad_(False)
    if cfg.optim.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    bridge = None
    if cfg.bridge.path:
        bridge = load_bridge(cfg.bridge.path)
        bridge.check_fits(student_config, teacher_config)
        bridge.check_tokenizers(student_tok, teacher_tok)
        bridge = bridge.to(device)
        if is_main_process():  # which bridge this run used: models, data, rank, date, Stage 1 report
            (run_dir / "bridge.json").write_text(json.dumps(
                {"path": str(Path(cfg.bridge.path).resolve()), "rank": bridge.rank, "pairs": bridge.pairs,
                 "normalize_states": bridge.normalize_states,
                 "metadata": bridge.metadata}, indent=2))
    objective = Objective.from_config(
        cfg, student_config.num_hidden_layers, teacher_config.num_hidden_layers, len(student_tok), bridge
    )
    rollout = HFRollout(
        student, pad_token_id=student_tok.pad_token_id, eos_token_ids=eos_token_ids(student, student_tok),
        vocab_size=len(student_tok), max_batch_sequences=cfg.rollout.max_batch_sequences,
    )
    sampling = SamplingParams(
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.rollout.responses_per_prompt,
    )
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    stream = PromptStream(len(prompts), cfg.rollout.prompts_per_step, cfg.seed)
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load_training_state(resume_from, optimizer, scheduler)
        start_step = state["step"]
        stream = PromptStream(len(prompts), cfg.rollout.prompts_per_step, cfg.seed, **state["data"])
        console.print(f"resuming from {resume_from} (step {start_step})")
    elif cfg.resume:
        console.print(f"[yellow]resume=true but {run_dir} has no checkpoint yet: starting from step 0")

    def sample(prompt_indices: list[int], params: SamplingParams) -> RolloutBatch:
        batch = rollout.generate([prompts[i] for i in prompt_indices], params).to(device)
        if teacher_prompts is not None:
            batch.teacher_view = retokenize(batch, student_tok, teacher_tok, [teacher_prompts[i] for i in prompt_indices])
        return batch

    if objective.uses_oprd and cfg.oprd.preflight_prompts and start_step == 0:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            probe = sample(list(range(min(cfg.oprd.preflight_prompts, len(prompts)))), dataclasses.replace(sampling, n=1))
            cosines = preflight_alignment(objective, student, teacher, probe)
        if is_main_process():
            (run_dir / "preflight.json").write_text(json.dumps({"cosine_by_layer": cosines}, indent=2))
        warning = preflight_warning(cosines, cfg.oprd.preflight_min_cos, bridge is not None)
        if warning:
            console.print(f"[yellow]warning: {warning}")
    autocast = _autocast(cfg, device)
    logger = MetricsLogger(run_dir, cfg, start_step)
    validate = make_validation(cfg, rollout, student_tok)
    if validate and start_step == 0:
        logger.log(0, validate(0))

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[live]}"), console=console, disable=not is_main_process(),
    )
    with progress:
        task = progress.add_task("distilling", total=cfg.max_steps, completed=start_step, live="")
        for step in range(start_step + 1, cfg.max_steps + 1):
            step_started = time.perf_counter()
            batch = sample(stream.next_batch(), sampling)
            rollout_seconds = time.perf_counter() - step_started

            update_started = time.perf_counter()
            timings: dict[str, float] = {}
            step_objective = objective.at_step(step)
            normalizers = step_objective.normalizers(batch)
            totals: dict[str, torch.Tensor] = {}
            total_loss = 0.0
            for first in range(0, batch.response_ids.shape[0], cfg.optim.micro_batch_size):
                micro = batch.select(slice(first, first + cfg.optim.micro_batch_size))
                with autocast:
                    loss, metrics = distillation_loss(step_objective, student, teacher, micro, normalizers, timings)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss at step {step} ({_describe(metrics)}). The last checkpoint is intact. "
                        "Lower optim.lr, use optim.precision=fp32, or check the teacher's outputs."
                    )
                loss.backward()
                total_loss += loss.item()
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + value
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip or float("inf"))
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm at step {step}; lower optim.lr or use fp32")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rollout.sync_weights(student)
            _synchronize(student)
            update_seconds = time.perf_counter() - update_started

            lengths = batch.response_lengths.float()
            record = {
                "loss": total_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "response_length/mean": float(lengths.mean()),
                "response_length/max": float(lengths.max()),
                "response_length/truncated_fraction": float(batch.truncated.float().mean()),
                **({"align/matched_share": batch.teacher_view.matched_share(batch.response_mask)}
                   if batch.teacher_view is not None else {}),
                **{name: float(value) for name, value in totals.items()},
                "time/rollout_s": rollout_seconds,
                "time/teacher_s": timings.get("teacher", 0.0),
                "time/update_s": update_seconds - timings.get("teacher", 0.0),
                "time/step_s": time.perf_counter() - step_started,
            }
            if device.type == "cuda":
                record["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if validate and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record.update(validate(step))
            logger.log(step, record)
            progress.update(task, completed=step, live=_live(record))

            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint.save_checkpoint(
                    run_dir / "checkpoints", step, student, student_tok, optimizer, scheduler,
                    {"data": stream.state()}, keep=cfg.keep_checkpoints,
                )
    if cfg.save_every:  # the last step's full state, so a run can later be extended with resume=true
        checkpoint.save_checkpoint(
            run_dir / "checkpoints", cfg.max_steps, student, student_tok, optimizer, scheduler,
            {"data": stream.state()}, keep=cfg.keep_checkpoints,
        )
    checkpoint.write_atomically(
        run_dir / "final", lambda tmp: (student.save_pretrained(tmp), student_tok.save_pretrained(tmp))
    )
    logger.close()
    console.print(f"final model: {run_dir / 'final'}")
    return run_dir


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _describe(metrics: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if "/layer_" not in k)


def _live(record: dict[str, float]) -> str:
    shown = [f"loss {record['loss']:.4f}"]
    if "rep/cosine_similarity" in record:
        shown.append(f"cos {record['rep/cosine_similarity']:.3f}")
    if "opd/kl_estimate" in record:
        shown.append(f"kl {record['opd/kl_estimate']:.3f}")
    shown.append(f"len {record['response_length/mean']:.0f}")
    return "  ".join(shown)
