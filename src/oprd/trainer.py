"""On-policy distillation: the training loop, top to bottom.

Each step: draw prompts -> the student samples n responses each -> the frozen teacher reads the
same tokens (no grad, no LM head, only as deep as the loss needs) -> L = L_OPD + mu * L_OPRD over
micro-batches -> one AdamW step -> metrics, checkpoint.

    train(cfg)
      held_run_dir            the run folder's lock, held until the run ends
      set_up_run              run folder, models, prompts, loss plan, optimizer, resumed state
      check_before_training   the pre-flight alignment check (OPRD) and the step-0 validation
      every step, each phase timed as time/<phase>_s:
        sample                the student's rollouts of the step's prompts (with rollout.max_weight_lag=1:
                              collected, sampled while the last step trained; the next step's sent)
        update                accumulate_gradients (per micro-batch: the teachers score it, the
                              student's loss is backpropagated), optimizer_step, publish_weights
                              (the EMA teacher, the sampler's weight sync)
        validate              every eval.every steps: validation, gates, best/
        record                one line of metrics.jsonl, the step's cost in run.json
        save                  a checkpoint every save_every steps
      finish                  the last step's checkpoint and final/

Where this departs from the textbook algorithm, and why:
- One optimizer step per rollout batch, so the student that is updated is exactly the policy that
  sampled: no importance ratio or clipping is needed (as in the paper's setup). Sampling ahead
  (rollout.max_weight_lag=1) trains on batches one update old: sampled-token OPD, a policy
  gradient, then weighs each token by a truncated importance ratio (objective.LossPlan.at_step).
- Losses are averaged over all response tokens of the step, not per micro-batch, so micro-batch
  size changes memory, never the gradient.
- Losses use temperature-1 distributions; the rollout temperature only shapes sampling.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from oprd import distributed
from oprd.batch import RolloutBatch, split_into
from oprd.bridge.projector import Bridge, load_bridge
from oprd.capture import fed_tokens, packing_problem
from oprd.config import ConfigError, TeacherSource, TrainConfig, require, teacher_sources
from oprd.data import PromptSet, PromptStream, drop_long_prompts, load_problems
from oprd.distributed import World
from oprd.evaluation.validation import make_validation
from oprd.files import open_output_dir, remove_leftovers
from oprd.gates import Gate, parse_gate
from oprd.models import check_spec, first_non_finite, load_model, load_model_config, load_tokenizer
from oprd.objective import LossPlan, Term, combined_loss
from oprd.optim import apply_optimizer_config, make_optimizer
from oprd.preflight import check_context_length, check_model_pairing, preflight_alignment, preflight_warning
from oprd.rollout import HFRollout, PendingBatch, Rollout, Sampler, SamplingParams, done, make_rollout, seeded
from oprd.runs import checkpoint, provenance
from oprd.runs.folder import check_resumed_config, check_run_dir, held_run_dir
from oprd.runs.provenance import data_record, models_record
from oprd.runs.recorder import RunRecorder, read_metrics
from oprd.teachers import Routing, Teacher, ema_model, update_ema


@dataclass(kw_only=True)
class Run:
    """Everything the loop reads, made once by `set_up_run`."""

    cfg: TrainConfig
    world: World
    run_dir: Path
    recorder: RunRecorder
    device: torch.device
    student: torch.nn.Module
    teachers: list[Teacher]  # one, unless teachers.members lists several
    routing: Routing
    tokenizer: PreTrainedTokenizerBase  # the student's
    sampler: Sampler
    sampling: SamplingParams
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: PromptStream
    start_step: int
    validation: Callable[[int], dict[str, float]] | None
    gates: list[Gate] = dataclasses.field(default_factory=list)
    bridges: list[Bridge | None] = dataclasses.field(default_factory=list)  # per teacher, what run.json records
    best: float | None = None  # the best value of keep_best's metric so far
    pending: PendingBatch | None = None  # the next step's batch, sampled while this one trains (max_weight_lag=1)

    @property
    def ema_teacher(self) -> torch.nn.Module | None:
        return ema_model(self.teachers)


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Runs on-policy distillation as configured; returns the run folder (final model in final/)."""
    hf_logging.disable_progress_bar()  # our progress bar is the one that matters
    started = time.perf_counter()  # run.json's cost counts the segment's wall time from here
    with held_run_dir(cfg, console):
        run = set_up_run(cfg, console, started)
        try:
            check_before_training(run)
            run.recorder.add_seconds("setup_seconds", time.perf_counter() - started
                                     - run.recorder.segment_seconds("validate_seconds"))
            with run.recorder.progress(cfg.max_steps, run.start_step) as advance:
                for step in range(run.start_step + 1, cfg.max_steps + 1):
                    timings: dict[str, float] = {}  # each phase's seconds, logged as time/<phase>_s
                    step_started = time.perf_counter()
                    with timed(timings, "sample"):
                        batch = sample(run, step, timings)
                    with timed(timings, "update", run.device):
                        metrics = update(run, batch, step, timings)
                    with timed(timings, "validate"):
                        metrics |= validate(run, step, timings)
                    advance(step, progress_text(record(run, step, batch, metrics, timings, step_started)))
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                        save(run, step)
            folder = finish(run)
        except BaseException as error:  # run.json says how the segment ended, whatever ended it
            run.recorder.end_provenance("interrupted" if isinstance(error, KeyboardInterrupt)
                                        else f"failed: {type(error).__name__}")
            raise
        run.recorder.end_provenance("completed")
    return folder


# --------------------------------------------------------------------------- set up


def set_up_run(cfg: TrainConfig, console: Console | None, started: float | None = None) -> Run:
    """Everything the loop reads, in three stages: `check_run` (before any weights load), `load_run`
    (the weights, the bridge, the checkpoint) and `open_run` (only now does the run folder change),
    so that a run failing any check leaves the folder as it was. `started`: when the command began
    (run.json's wall time counts from it; by default, now)."""
    started = time.perf_counter() if started is None else started
    world, device = distributed.init(cfg.device)
    recorder = RunRecorder(Path(cfg.output_dir), console)
    checked = check_run(cfg, world, recorder)
    run = load_run(cfg, checked, world, device, recorder)
    open_run(run, checked, started)
    return run


@dataclass
class CheckedRun:
    """What `check_run` read and found sound: the folder's state, the models' tokenizers and configs, the prompts."""

    replace_folder: bool  # overwrite=true on an earlier run: emptied by open_run
    resume_from: Path | None
    sources: list[TeacherSource]
    student_tok: PreTrainedTokenizerBase
    student_config: PretrainedConfig
    teacher_toks: list[PreTrainedTokenizerBase]
    teacher_configs: list[PretrainedConfig]
    prompts: PromptSet


def check_run(cfg: TrainConfig, world: World, recorder: RunRecorder) -> CheckedRun:
    """The checks before any weights load: the run folder, the model sources, tokenizers, configs
    and their pairing, the prompts against the context, a resumed config against the run's."""
    require(cfg.rollout.prompts_per_step % world.size == 0,
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must split evenly over the {world.size} "
            "processes (each samples its share of the step's prompts)")
    replace_folder, resume_from = check_run_dir(cfg, world)
    sources = teacher_sources(cfg)
    check_spec(cfg.student, "student")
    for source in sources:
        if source.self_mode is None:
            check_spec(source.spec, source.field)
    student_tok, student_config = load_tokenizer(cfg.student), load_model_config(cfg.student)
    teacher_toks = [student_tok if s.self_mode else load_tokenizer(s.spec) for s in sources]
    teacher_configs = [student_config if s.self_mode else load_model_config(s.spec) for s in sources]
    for source, teacher_tok, teacher_config in zip(sources, teacher_toks, teacher_configs):
        for warning in check_teacher_pairing(cfg, source, len(sources), student_config, teacher_config, student_tok,
                                             teacher_tok):
            recorder.warn(warning)
    prompts = training_prompts(cfg, student_tok, teacher_toks[0], recorder)
    for teacher_config in teacher_configs:
        check_context_length(cfg, student_config, teacher_config, prompts)
    if resume_from is not None:
        check_resumed_config(cfg, Path(cfg.output_dir), recorder)
    return CheckedRun(replace_folder, resume_from, sources, student_tok, student_config, teacher_toks,
                      teacher_configs, prompts)


def load_run(cfg: TrainConfig, checked: CheckedRun, world: World, device: torch.device,
             recorder: RunRecorder) -> Run:
    """The bridges and loss plans, both models, the sampler, the optimizer, a checkpoint's state to
    resume from and the validation: the run the loop reads, before the folder changes."""
    c = checked
    torch.manual_seed(cfg.seed + world.rank)  # each process samples its own prompts with its own stream
    bridges = [load_run_bridge(s.bridge, c.student_config, config, c.student_tok, tok)
               for s, config, tok in zip(c.sources, c.teacher_configs, c.teacher_toks)]
    plans = [LossPlan.from_config(cfg.opd, cfg.oprd, c.student_config.num_hidden_layers, config.num_hidden_layers,
                                  len(c.student_tok), bridge.to(device) if bridge is not None else None)
             for config, bridge in zip(c.teacher_configs, bridges)]
    student, teachers = load_models(cfg, device, world, c.resume_from, c.sources, plans)
    check_packing(cfg, student, teachers)
    longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    rollout = make_rollout(cfg.rollout, student, c.student_tok, world=world, workdir=Path(cfg.output_dir),
                           source=cfg.student.model, longest_sequence=longest,
                           compute_dtype=compute_dtype(cfg, student, device))
    optimizer, scheduler = make_optimizer(cfg, student)
    stream, start_step = PromptStream(len(c.prompts), cfg.rollout.prompts_per_step, cfg.seed,
                                      shuffle=cfg.data.shuffle), 0
    if c.resume_from is not None:
        state = checkpoint.load_training_state(c.resume_from, optimizer, scheduler, student, world,
                                               ema_model(teachers))
        if world.distributed:
            _require_finite(student, world, f"checkpoint {c.resume_from}")
        apply_optimizer_config(cfg, optimizer, scheduler)
        start_step = state["step"]
        stream = PromptStream(len(c.prompts), cfg.rollout.prompts_per_step, cfg.seed, **state["data"],
                              shuffle=cfg.data.shuffle)
    # reads the benchmarks: a bad name fails here
    validation = make_validation(cfg, rollout, c.student_tok, world, recorder.warn)
    sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.rollout.responses_per_prompt)
    sampler = Sampler(rollout, c.prompts, c.student_tok, c.teacher_toks[0], device)
    return Run(cfg=cfg, world=world, run_dir=Path(cfg.output_dir), recorder=recorder, device=device, student=student,
               teachers=teachers, routing=Routing.of(c.sources, c.prompts, cfg.teachers.route_by, device),
               tokenizer=c.student_tok, sampler=sampler, sampling=sampling, optimizer=optimizer, scheduler=scheduler,
               stream=stream, start_step=start_step, validation=validation,
               gates=[parse_gate(text) for text in cfg.gates], bridges=bridges,
               pending=sampled_ahead(cfg, c.resume_from, sampler, world))


def sampled_ahead(cfg: TrainConfig, resume_from: Path | None, sampler: Sampler, world: World) -> PendingBatch | None:
    """The next step's batch a checkpoint holds, sampled ahead by rollout.max_weight_lag=1 with
    weights one update older than its own, so a resumed run trains on exactly that batch."""
    ahead = None if resume_from is None else checkpoint.load_sampled_ahead(resume_from, world)
    if ahead is None:
        return None
    require(cfg.rollout.max_weight_lag == 1,
            f"checkpoint {resume_from} holds the next step's batch, sampled ahead with rollout.max_weight_lag=1 by "
            "weights it no longer has: resume with rollout.max_weight_lag=1")
    indices = ahead.pop("indices").tolist()
    return PendingBatch(sampler, indices, done(RolloutBatch.from_tensors(ahead)))


def check_packing(cfg: TrainConfig, student: torch.nn.Module, teachers: list[Teacher]) -> None:
    """With optim.pack_sequences, every model a packed micro-batch is fed to must keep its sequences
    apart (`capture.packing_problem`): whether it does is up to its attention code."""
    if not cfg.optim.pack_sequences:
        return
    fed = [("student", student)] + [(t.source.field, t.model) for t in teachers if t.model is not student]
    for name, model in fed:
        problem = packing_problem(model)
        require(problem is None,
                f"optim.pack_sequences=true, but the {name} ({type(model).__name__} with "
                f"{model.config._attn_implementation} attention) does not keep sequences packed in one row apart "
                f"({problem}): set optim.pack_sequences=false, or {name}.attn_implementation=sdpa (or "
                "flash_attention_2)")


def open_run(run: Run, checked: CheckedRun, started: float) -> None:
    """Every check has passed: the run folder is prepared (by the main process alone: another one
    clearing "leftovers" would delete the temporary file of a write the main one has under way), the
    segment's config, provenance, gates and metrics file opened, and the sampler given the weights."""
    cfg, recorder, world = run.cfg, run.recorder, run.world
    if world.main:
        open_output_dir(run.run_dir, replace=checked.replace_folder)
        for folder in (run.run_dir, run.run_dir / "checkpoints"):
            for leftover in remove_leftovers(folder):
                recorder.say(f"removed {leftover}, left behind by an interrupted write")
    world.barrier()
    recorder.start_segment(cfg, run.start_step, checked.resume_from)
    recorder.start_provenance(seed=cfg.seed, device=run.device, world_size=world.size, first_step=run.start_step,
                              started=started,
                              models=lambda: models_record(cfg, checked.sources, checked.student_tok,
                                                           checked.teacher_toks),
                              data=lambda: data_record(cfg.data.path, len(checked.prompts)))
    recorder.start_gates(run.gates, run.start_step)
    if checked.resume_from is not None:
        run.best = (recorder.run_json.read().get("best") or {}).get("value")
    record_teachers(recorder, run.teachers, run.bridges)
    recorder.open_metrics(cfg, run.start_step)
    if checked.resume_from is not None:
        recorder.say(f"resuming from {checked.resume_from} (step {run.start_step})")
    elif cfg.resume:
        recorder.warn(f"resume=true but {run.run_dir} has no checkpoint yet: starting from step 0")
    first_sync(run.sampler.rollout, run.student, run.tokenizer, run.start_step)


def check_teacher_pairing(cfg: TrainConfig, source: TeacherSource, count: int, student_config, teacher_config,
                          student_tok, teacher_tok) -> list[str]:
    """`check_model_pairing` for one teacher; of several, each must share the student's tokenizer,
    and every message names the teacher."""
    try:
        if count > 1:
            require(student_tok.get_vocab() == teacher_tok.get_vocab(),
                    "its tokenizer differs from the student's: several teachers must share the student's tokenizer "
                    "(a teacher with another tokenizer can be the run's single teacher, with a bridge)")
        warnings = check_model_pairing(cfg, student_config, teacher_config, student_tok, teacher_tok, source.bridge,
                                       bridge_field=f"{source.field}.bridge" if count > 1 else "bridge.path")
    except ConfigError as error:
        if count == 1:
            raise
        raise ConfigError(f"{source.field} ({source.name}): {error}") from None
    return warnings if count == 1 else [f"teacher {source.name}: {warning}" for warning in warnings]


def record_teachers(recorder: RunRecorder, teachers: list[Teacher], bridges: list[Bridge | None]) -> None:
    """teachers.json: each teacher's source and the memory its own weights take (a live
    self-teacher takes none); bridge.json: which bridge each used (models, data, rank, Stage 1)."""
    memory = {teacher.name: teacher.memory() for teacher in teachers}
    recorder.write_json("teachers.json", memory)
    for held in memory.values():
        if held["self_mode"] is not None:
            recorder.say(f"teacher: the student itself ({held['self_mode']}), "
                         f"{held['bytes'] / 2**20:.1f} MiB of weights of its own in this process")
    described = {teacher.name: {"path": str(Path(teacher.source.bridge).resolve()), "rank": bridge.rank,
                                "pairs": bridge.pairs, "normalize_states": bridge.normalize_states,
                                "metadata": bridge.metadata}
                 for teacher, bridge in zip(teachers, bridges) if bridge is not None}
    if len(teachers) == 1 and described:
        recorder.write_json("bridge.json", described[teachers[0].name])
    elif described:
        recorder.write_json("bridge.json", {"teachers": described})


def first_sync(rollout: Rollout, student: torch.nn.Module, tokenizer, version: int) -> None:
    """The sampler gets the student's weights before the first rollout, so a vLLM server started
    from any checkpoint of the student's architecture samples from this run's student; a server
    whose model or tokenizer is another is refused (`ServerRollout.check_serves`)."""
    rollout.sync_weights(student, version)
    if hasattr(rollout, "check_serves"):
        rollout.check_serves(student, tokenizer)
        distributed.return_freed_memory()  # the probe gathered the whole student on every process


def training_prompts(cfg: TrainConfig, student_tok, teacher_tok, recorder: RunRecorder) -> PromptSet:
    """The training prompts as the student reads them, and as the teacher reads them when its
    tokenizer differs (its own chat template) or it reads a privileged prompt (teacher.prompt_template);
    with the route of each (teachers.route_by); prompts over data.max_prompt_tokens are left out."""
    privileged = cfg.teacher.prompt_template or ""
    problems = load_problems(cfg.data.path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                             split=cfg.data.split, limit=cfg.data.limit, need_answers="{answer" in privileged,
                             warn=recorder.warn)
    cross_tokenizer = student_tok.get_vocab() != teacher_tok.get_vocab()  # allowed with a bridge only
    prompts = PromptSet.render(problems, student_tok, teacher_tok if cross_tokenizer else None,
                               use_chat_template=cfg.data.use_chat_template, enable_thinking=cfg.data.enable_thinking,
                               teacher_template=cfg.teacher.prompt_template, route_by=cfg.teachers.route_by)
    return drop_long_prompts(prompts, cfg.data.max_prompt_tokens, cfg.data.path, recorder.warn)


def load_models(cfg: TrainConfig, device: torch.device, world: World, resume_from: Path | None,
                sources: list[TeacherSource], plans: list[LossPlan]) -> tuple[torch.nn.Module, list[Teacher]]:
    """The student (from the checkpoint when one process resumes; several processes restore theirs
    with the optimizer) in training mode, and the teachers frozen; all checked for weights that are
    not finite numbers. Under torchrun they are sharded (FSDP2; a teacher unless its shard=false).
    A teacher that OPRD alone reads is loaded only up to its deepest layer in use: no later blocks,
    no LM head. A self-teacher is the student as loaded from student.* (frozen), a copy that follows
    it (ema, whose state a resumed run restores from the checkpoint), or the student module (live)."""
    # The optimizer keeps float32 master weights (bf16 comes from autocast) unless student.dtype says otherwise.
    student_dtype = torch.float32 if cfg.student.dtype == "auto" else None
    if resume_from is None or world.distributed:
        student = distributed.load_model(cfg.student, device, world, dtype=student_dtype,
                                         mp_policy=_mixed_precision(cfg, device))
        _require_finite(student, world, f"student.model={cfg.student.model}")
    else:
        spec = dataclasses.replace(cfg.student, model=str(resume_from), revision=None, random_init=False)
        with checkpoint.reading(resume_from, "the model (config.json, model.safetensors)"):
            student = load_model(spec, device, dtype=student_dtype)
        if (bad := first_non_finite(student)) is not None:
            raise checkpoint.damaged(resume_from, f"its weights hold values that are not finite numbers ({bad})")
    teachers = []
    for source, plan in zip(sources, plans):
        if source.self_mode == "live":
            teachers.append(Teacher(source, student, plan))
            continue
        if source.self_mode is not None:  # a copy of the student, held and computed as the student is
            up_to_layer = None if plan.uses_opd or source.self_mode == "ema" else max(plan.teacher_layers)
            model = distributed.load_model(cfg.student, device, world, dtype=student_dtype, up_to_layer=up_to_layer,
                                           shard_it=source.shard, mp_policy=_mixed_precision(cfg, device))
        else:  # held in teacher.dtype (auto: bfloat16 on a GPU, float32 on a CPU), computed under the run's autocast
            up_to_layer = None if plan.uses_opd else max(plan.teacher_layers)
            model = distributed.load_model(source.spec, device, world, up_to_layer=up_to_layer, shard_it=source.shard)
        model.eval().requires_grad_(False)
        _require_finite(model, world, f"{source.field}.model={source.spec.model}")
        teachers.append(Teacher(source, model, plan))
    if cfg.optim.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student.train(), teachers


def _require_finite(model: torch.nn.Module, world: World, source: str) -> None:
    if (bad := _non_finite_weight(model, world)) is not None:
        raise ValueError(f"{source} holds weights that are not finite numbers ({bad}): it cannot be trained or "
                         "sampled from; check where it came from")


def _non_finite_weight(model: torch.nn.Module, world: World) -> str | None:
    """A parameter holding NaN or infinity on any process (its name where this process holds it)."""
    bad = first_non_finite(model)
    if world.any(bad is not None):
        return bad or "a parameter shard of another process"
    return bad


def _mixed_precision(cfg: TrainConfig, device: torch.device):
    """FSDP2's mixed precision under bf16: compute in bf16, float32 master weights, float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not _uses_bf16(cfg, device):
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def load_run_bridge(path: str | None, student_config, teacher_config, student_tok, teacher_tok) -> Bridge | None:
    """The OPRD-Bridge file at `path` (bridge.path, or a member's bridge), checked against both models."""
    if not path:
        return None
    bridge = load_bridge(path)
    bridge.check_fits(student_config, teacher_config)
    bridge.check_tokenizers(student_tok, teacher_tok)
    return bridge


def check_before_training(run: Run) -> None:
    """Before step 1 of a fresh run: the pre-flight alignment check of OPRD, for each teacher
    (preflight.json, and a warning when student and teacher share little), and the step-0 validation."""
    cfg = run.cfg
    if run.start_step:
        return
    checked = [teacher for teacher in run.teachers if teacher.plan.uses_oprd]
    if checked and cfg.oprd.preflight_prompts:
        with seeded(cfg.seed + 1, run.device):
            probe = run.sampler.sample(list(range(min(cfg.oprd.preflight_prompts, len(run.sampler.prompts)))),
                                       dataclasses.replace(run.sampling, n=1))
            cosines = {}
            for teacher in checked:
                with teacher.reading():
                    cosines[teacher.name] = preflight_alignment(teacher.plan, run.student, teacher.model, probe)
                teacher.release()
        single = len(run.teachers) == 1
        run.recorder.write_json("preflight.json", {"cosine_by_layer": cosines[checked[0].name]} if single else
                                {"teachers": {name: {"cosine_by_layer": c} for name, c in cosines.items()}})
        for teacher in checked:
            bridged = teacher.plan.bridge is not None
            warning = preflight_warning(cosines[teacher.name], cfg.oprd.preflight_min_cos, bridged)
            if warning:
                run.recorder.warn(warning if single else f"teacher {teacher.name}: {warning}")
    if run.validation:
        started = time.perf_counter()
        start = run.validation(0)
        run.recorder.log(0, start)
        if run.gates:
            run.recorder.set_gate_baseline("start", start)
            if any(gate.base == "teacher" for gate in run.gates):
                run.recorder.set_gate_baseline("teacher", teacher_validation(run))
            run.recorder.judge_gates(run.gates, 0, start, final=False)
        run.recorder.add_seconds("validate_seconds", time.perf_counter() - started)


def teacher_validation(run: Run) -> dict[str, float]:
    """The teacher's validation on the student's benchmarks and settings, for gates relative to it:
    the whole teacher (with its LM head) is loaded for it and freed after."""
    source = run.teachers[0].source
    teacher = distributed.load_model(source.spec, run.device, run.world, shard_it=source.shard).eval()
    tokenizer = load_tokenizer(source.spec)
    run.recorder.say(f"measuring the teacher ({source.spec.model}) on the validation benchmarks, for the gates")
    measured = make_validation(run.cfg, HFRollout.for_model(teacher, tokenizer), tokenizer, run.world,
                               run.recorder.warn)(0)
    del teacher
    return measured


# --------------------------------------------------------------------------- the step


def sample(run: Run, step: int, timings: dict[str, float]) -> RolloutBatch:
    """The student's responses to the step's prompts (and the teacher's view of them across
    tokenizers). With rollout.max_weight_lag=1 the batch was sent to the server while the last step
    trained, and the next step's prompts are sent before this one trains (`publish_weights` waits
    for them before the server's weights change). `time/sample_wait_s`: the time spent blocked on
    samples; `time/sample_hidden_s`: the sampling of this batch that ran while the trainer worked."""
    try:
        pending = run.pending or submit_next(run)
        timings["sample_wait"] = timings.get("sample_wait", 0.0) + pending.wait()
        batch = pending.result()
        timings["sample_hidden"] = pending.hidden_seconds
        run.pending = submit_next(run) if run.cfg.rollout.max_weight_lag and step < run.cfg.max_steps else None
        return batch
    except RuntimeError as error:
        if "probability tensor contains" not in str(error):
            raise
        raise FloatingPointError(f"sampling at step {step} met next-token probabilities that are not finite "
                                 "numbers: the student's weights have grown out of range (optim.lr too large?). "
                                 f"{_newest_checkpoint(run)}") from None


def submit_next(run: Run) -> PendingBatch:
    """The next step's prompts (this process's share), sent to the sampler."""
    return run.sampler.submit(run.stream.next_batch()[run.world.rank :: run.world.size], run.sampling)


def update(run: Run, batch: RolloutBatch, step: int, timings: dict[str, float]) -> dict[str, float]:
    """One optimizer step on the batch, then its weights published to whoever reads them next."""
    lag = (step - 1) - batch.weight_version  # the weights that sampled the batch are this many updates old
    if not 0 <= lag <= run.cfg.rollout.max_weight_lag:
        raise RuntimeError(f"step {step} would train on rollouts sampled by weights {lag} steps old (rollout."
                           f"max_weight_lag={run.cfg.rollout.max_weight_lag}): the sampler's weights were not synced "
                           "after an update")
    metrics = accumulate_gradients(run, batch, step, timings)
    metrics |= optimizer_step(run, step)
    with timed(timings, "weight_sync", run.device):
        publish_weights(run, step, timings)
    return metrics | {"rollout/weight_version_lag": lag}


def accumulate_gradients(run: Run, batch: RolloutBatch, step: int, timings: dict[str, float]) -> dict[str, float]:
    """Per micro-batch: each teacher scores it (timed as `teacher`) and the student's loss is
    backpropagated. Returns the step's loss and the summed terms of each objective."""
    plans = [teacher.plan.at_step(step, weight_lag=(step - 1) - batch.weight_version) for teacher in run.teachers]
    # every process's losses are its share of the whole step's average (see oprd.distributed), and
    # each teacher's its share of the step's (routed) or its weight's share of the average (weighted)
    own = [{name: run.world.sum(total) for name, total in plan.normalizers(_rows_only(batch, rows)).items()}
           for plan, rows in zip(plans, (run.routing.rows(i, batch) for i in range(len(plans))))]
    normalizers = run.routing.normalizers(own)
    totals: list[dict[str, torch.Tensor]] = [{} for _ in run.teachers]
    total_loss = 0.0
    micro_batches = split_micro_batches(run, batch)
    for micro in micro_batches:
        with _autocast(run.cfg, run.device):
            terms, scored_by = [], []
            with timed(timings, "teacher", run.device):
                for index, (teacher, plan) in enumerate(zip(run.teachers, plans)):
                    rows = run.routing.rows(index, micro)
                    scores = teacher.score(plan, micro, rows, run.world)
                    if scores is not None:
                        terms.append(Term(plan, scores, normalizers[index], rows))
                        scored_by.append(index)
            loss, term_metrics = combined_loss(run.student, micro, terms)
        for teacher in run.teachers:
            teacher.release()
        if not run.world.distributed:  # several processes: checked once, on the sum of all of theirs
            _require_finite_loss(run, step, loss.item(), _summed(term_metrics))
        loss.backward()
        total_loss += loss.item()
        for index, metrics in zip(scored_by, term_metrics):
            for name, value in metrics.items():
                totals[index][name] = totals[index].get(name, 0.0) + value
    total_loss = float(run.world.sum(torch.tensor(total_loss, dtype=torch.float64, device=run.device)))
    names = sorted({name for metrics in totals for name in metrics})
    totals = [{name: run.world.sum(torch.as_tensor(metrics.get(name, 0.0), device=run.device)) for name in names}
              for metrics in totals]
    summed = _summed(totals)
    _require_finite_loss(run, step, total_loss, summed)
    values = {"loss": total_loss, **{name: float(value) for name, value in summed.items()},
              **padding_metrics(micro_batches, run.world, run.device)}
    if len(run.teachers) > 1:
        values.update(teacher_metrics(run, batch, own, normalizers, totals))
    return values


def split_micro_batches(run: Run, batch: RolloutBatch) -> list[RolloutBatch]:
    """This process's micro-batches: `optim.micro_batch_size` rows each, or as many rows as fit in
    `optim.micro_batch_tokens` token slots; fed without padding with `optim.pack_sequences`. Under
    several processes each runs as many as the process that needs most (`batch.split_into`): a
    sharded model's forward is a collective. The loss and the gradient are the step's whatever the
    split: every term is divided by the step's totals."""
    optim = run.cfg.optim
    if optim.micro_batch_tokens is None:
        return batch.micro_batches(optim.micro_batch_size, optim.pack_sequences)
    groups = batch.token_budget_groups(optim.micro_batch_tokens, packed=optim.pack_sequences)
    count = int(run.world.max(torch.tensor(len(groups), device=run.device)))
    return batch.grouped(split_into(groups, count), optim.pack_sequences)


def padding_metrics(micro_batches: list[RolloutBatch], world: World, device: torch.device) -> dict[str, float]:
    """`batch/padding_share`: the share of the token slots the step's student forwards read that
    are padding (packed: none); `batch/micro_batches`: the forwards each process ran."""
    real, slots = (float(world.sum(torch.tensor(float(sum(counts)), dtype=torch.float64, device=device)))
                   for counts in zip(*map(fed_tokens, micro_batches)))
    return {"batch/padding_share": 1 - real / slots, "batch/micro_batches": len(micro_batches)}


def optimizer_step(run: Run, step: int) -> dict[str, float]:
    """Clips the gradients and steps AdamW and the schedule; a non-finite gradient norm, an
    overflowing update or weights made non-finite stop the run before they are used."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), run.cfg.optim.grad_clip or float("inf"))
    grad_norm = distributed.full_value(grad_norm)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm at step {step}; lower optim.lr or use "
                                 f"optim.precision=fp32. {_newest_checkpoint(run)}")
    lr = run.optimizer.param_groups[0]["lr"]
    try:
        run.optimizer.step()
    except RuntimeError as error:  # torch's Adam: "value cannot be converted to type float without overflow"
        if "overflow" not in str(error):
            raise
        raise FloatingPointError(f"the AdamW update of step {step} overflowed float32 (lr {lr:g}): lower "
                                 f"optim.lr. {_newest_checkpoint(run)}") from None
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if (bad := _non_finite_weight(run.student, run.world)) is not None:
        raise FloatingPointError(f"the AdamW update of step {step} made the student's weights non-finite ({bad}), "
                                 f"so the run stops before sampling from them: lower optim.lr. "
                                 f"{_newest_checkpoint(run)}")
    return {"lr": lr, "grad_norm": float(grad_norm)}


def publish_weights(run: Run, step: int, timings: dict[str, float]) -> None:
    """The updated student to its readers: the EMA teacher follows it, and the sampler gets it as
    weight version `step`, once the batch it is sampling ahead (if any) is done."""
    if run.ema_teacher is not None:
        update_ema(run.ema_teacher, run.student, run.cfg.teacher.ema_decay)
    if run.pending is not None:
        timings["sample_wait"] = timings.get("sample_wait", 0.0) + run.pending.wait()
    run.sampler.rollout.sync_weights(run.student, version=step)


def _require_finite_loss(run: Run, step: int, loss: float, metrics: dict) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step} ({_describe(metrics)}). Lower optim.lr, use "
                                 f"optim.precision=fp32, or check the teacher's outputs. {_newest_checkpoint(run)}")


def teacher_metrics(run: Run, batch: RolloutBatch, own: list[dict], used: list[dict],
                    totals: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per teacher: `teachers/NAME/share`, the share of the step's samples it scored, and its own
    mean of each loss metric (`rep/cosine_similarity/teacher_NAME`, ...): its weighted sum over the
    step's denominators (`used`) rescaled to the positions it scored (`own`)."""
    values = {}
    samples = run.world.sum(torch.tensor(float(batch.response_ids.shape[0]), device=run.device))
    for index, teacher in enumerate(run.teachers):
        rows = run.routing.rows(index, batch)
        scored = samples if rows is None else run.world.sum(rows.sum().float())
        values[f"teachers/{teacher.name}/share"] = float(scored / samples)
        for name, value in totals[index].items():
            kind = "opd" if name.startswith("opd/") else "oprd"
            if "/layer_" not in name and float(own[index][kind]) > 0:
                values[f"{name}/teacher_{teacher.name}"] = float(value * used[index][kind] / own[index][kind])
    return values


def _rows_only(batch: RolloutBatch, rows: torch.Tensor | None) -> RolloutBatch:
    return batch if rows is None else batch.with_rows_only(rows)


def _summed(per_teacher: list[dict]) -> dict:
    """Metrics summed over teachers: each is already its share of the step's value."""
    summed: dict = {}
    for metrics in per_teacher:
        for name, value in metrics.items():
            summed[name] = summed.get(name, 0.0) + value
    return summed


def validate(run: Run, step: int, timings: dict[str, float]) -> dict[str, float]:
    """Every eval.every steps and at the last: the validation metrics, the gates judged on them, and
    best/ rewritten when keep_best's metric improved (timed as `best`: run.json counts it as export)."""
    if not run.validation or not (step % run.cfg.eval.every == 0 or step == run.cfg.max_steps):
        return {}
    measured = run.validation(step)
    run.recorder.judge_gates(run.gates, step, measured, final=step == run.cfg.max_steps)
    if run.cfg.keep_best:
        with timed(timings, "best"):
            keep_best(run, step, measured[run.cfg.keep_best])
    return measured


def record(run: Run, step: int, batch: RolloutBatch, metrics: dict[str, float], timings: dict[str, float],
           started: float) -> dict[str, float]:
    """The step's line of metrics.jsonl: the update's and the validation's metrics, the rollouts',
    and the phases' times, the step's whole wall time among them; its cost added to run.json's."""
    recording = time.perf_counter()
    line = {**metrics, **rollout_metrics(batch, run.world, run.device), **time_metrics(timings, started, run.device)}
    line.update(cost_metrics(run, batch, line["time/step_s"]))
    run.recorder.add_cost(step, {"sampled_tokens": line["cost/sampled_tokens"],
                                 "teacher_tokens": line["cost/teacher_tokens"],
                                 **{f"{phase}_seconds": line[f"time/{phase}_s"] for phase in STEP_PHASES},
                                 "peak_memory_gb": line["memory/peak_gb"]})
    run.recorder.log(step, line)
    run.recorder.add_seconds("export_seconds", timings.get("best", 0.0))
    run.recorder.add_seconds("record_seconds", time.perf_counter() - recording)
    return line


STEP_PHASES = ("sample", "teacher", "weight_sync", "update", "validate")  # each a time/<phase>_s metric


def cost_metrics(run: Run, batch: RolloutBatch, step_seconds: float) -> dict[str, float]:
    """What the step cost: tokens sampled and tokens the teachers read (every process's), wall
    seconds, device-hours (wall x processes) and the peak memory so far (the GPU's allocator, or
    this process's resident set on a CPU)."""
    read_B = (batch.teacher_view.batch if batch.teacher_view is not None else batch).attention_mask.sum(-1)
    rows = [run.routing.rows(index, batch) for index in range(len(run.teachers))]
    read = sum(read_B.sum() if scored is None else read_B[scored].sum() for scored in rows)  # what each teacher read
    sampled, teacher_tokens = run.world.sum(torch.stack([batch.response_lengths.sum(), read]).double()
                                            .to(run.device)).tolist()
    if run.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(run.device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"cost/sampled_tokens": sampled, "cost/teacher_tokens": teacher_tokens, "cost/wall_seconds": step_seconds,
            "cost/device_hours": step_seconds * run.world.size / 3600, "memory/peak_gb": peak}


def keep_best(run: Run, step: int, value: float) -> None:
    """best/: the student at its best validation value of keep_best so far (a plain HF model,
    written atomically, only on improvement); run.json's `best` says which step it is."""
    better = run.best is None or (value > run.best if run.cfg.keep_best_mode == "max" else value < run.best)
    if not better:
        return
    run.best = value
    write_model(run, run.run_dir / "best")
    run.recorder.note("best", {"metric": run.cfg.keep_best, "mode": run.cfg.keep_best_mode, "step": step,
                               "value": value})
    run.recorder.say(f"best/ is now step {step} ({run.cfg.keep_best} = {value:.4g})")


def rollout_metrics(batch: RolloutBatch, world: World, device: torch.device) -> dict[str, float]:
    """Response lengths and, across tokenizers, the share of positions with a partner, over every
    process's rollouts."""
    lengths = batch.response_lengths.float()
    sums = torch.stack([lengths.sum(), torch.tensor(float(len(lengths))), batch.truncated.float().sum()]).to(device)
    total, count, truncated = world.sum(sums).tolist()
    values = {
        "response_length/mean": total / count,
        "response_length/max": float(world.max(lengths.max().to(device))),
        "response_length/truncated_fraction": truncated / count,
    }
    if batch.teacher_view is not None:
        partnered = (batch.teacher_view.partner_B_T >= 0).sum().float()
        matched, positions = world.sum(torch.stack([partnered, batch.response_mask.sum().float()]).to(device))
        values["align/matched_share"] = float(matched) / max(float(positions), 1.0)
    return values


def time_metrics(timings: dict[str, float], step_started: float, device: torch.device) -> dict[str, float]:
    values = {  # the phases apart: update less the teacher and the weight sync, validate less best/'s writing
        "time/sample_s": timings["sample"],
        "time/teacher_s": timings.get("teacher", 0.0),
        "time/weight_sync_s": timings.get("weight_sync", 0.0),
        "time/update_s": timings["update"] - timings.get("teacher", 0.0) - timings.get("weight_sync", 0.0),
        "time/validate_s": timings["validate"] - timings.get("best", 0.0),
        "time/step_s": time.perf_counter() - step_started,
        "time/sample_wait_s": timings.get("sample_wait", 0.0),
        "time/sample_hidden_s": timings.get("sample_hidden", 0.0),
    }
    values["time/overlap_share"] = values["time/sample_hidden_s"] / values["time/step_s"]
    if device.type == "cuda":
        values["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return values


def save(run: Run, step: int) -> None:
    """A resumable checkpoint: weights, optimizer, scheduler, RNG, the prompt stream's position (and
    the EMA teacher, and the next step's batch where it was sampled ahead)."""
    started = time.perf_counter()
    try:
        ahead = None if run.pending is None else {**run.pending.raw().tensors(),
                                                  "indices": torch.tensor(run.pending.indices)}
        checkpoint.save_checkpoint(run.run_dir / "checkpoints", step, run.student, run.tokenizer, run.optimizer,
                                   run.scheduler, {"data": run.stream.state()}, keep=run.cfg.keep_checkpoints,
                                   world=run.world, ema_teacher=run.ema_teacher, sampled_ahead=ahead)
    finally:  # spent even when the write fails
        run.recorder.add_seconds("checkpoint_seconds", time.perf_counter() - started)
    run.recorder.write_provenance()  # run.json's cost up to the checkpoint a resume continues from


def finish(run: Run) -> Path:
    """The last step's full state (so the run can be extended with resume=true) and final/."""
    if run.cfg.save_every:
        save(run, run.cfg.max_steps)
    # AdamW's moments (8 bytes a parameter over the processes) are in the last checkpoint or no longer
    # needed: freed before final/ is gathered, so the whole model is never held beside them.
    run.optimizer.state.clear()
    started = time.perf_counter()
    write_model(run, run.run_dir / "final", model_card(run))
    run.recorder.add_seconds("export_seconds", time.perf_counter() - started)
    run.recorder.close()
    run.recorder.say(f"final model: {run.run_dir / 'final'}")
    return run.run_dir


def write_model(run: Run, target: Path, card: str | None = None) -> None:
    """The student as a plain HF model folder at `target`, in `export_dtype` (gathered from every
    process when sharded)."""
    checkpoint.export_model_dir(target, run.student, run.tokenizer, run.cfg.student, run.world,
                                checkpoint.export_dtype(run.cfg), card)


def model_card(run: Run) -> str:
    """final/README.md (`provenance.model_card`) from run.json and the last metrics."""
    rows = read_metrics(run.recorder.metrics_path) if run.recorder.metrics_path.is_file() else []
    teachers = {t.name: f"the student itself ({t.source.self_mode})" if t.source.self_mode else t.source.spec.model
                for t in run.teachers}
    return provenance.model_card(run.cfg, run.recorder.run_json.read(), teachers, rows,
                                 str(checkpoint.export_dtype(run.cfg)).removeprefix("torch."))


# --------------------------------------------------------------------------- helpers


@contextmanager
def timed(timings: dict[str, float], name: str, device: torch.device | None = None) -> Iterator[None]:
    """Adds the block's wall-clock seconds to timings[name], after the GPU's queued work when `device` is one."""
    started = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - started


def _newest_checkpoint(run: Run) -> str:
    """Where to go back to. Every update is checked for non-finite weights before a checkpoint can
    be saved, so every checkpoint holds finite weights."""
    found = checkpoint.list_checkpoints(run.run_dir / "checkpoints")
    if not found:
        return "No checkpoint was saved yet."
    return f"The newest checkpoint, {found[-1]}, holds finite weights (resume=true continues from it)."


def _uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and device.type == "cuda")


def compute_dtype(cfg: TrainConfig, student: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the student's forward computes in: bf16 under the run's autocast, else its weights'."""
    return torch.bfloat16 if _uses_bf16(cfg, device) else next(student.parameters()).dtype


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if _uses_bf16(cfg, device) else nullcontext()


def _describe(metrics: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if "/layer_" not in k)


def progress_text(line: dict[str, float]) -> str:
    """What the progress bar shows beside the step."""
    shown = [f"loss {line['loss']:.4f}"]
    if "rep/cosine_similarity" in line:
        shown.append(f"cos {line['rep/cosine_similarity']:.3f}")
    if "opd/kl_estimate" in line:
        shown.append(f"kl {line['opd/kl_estimate']:.3f}")
    shown.append(f"len {line['response_length/mean']:.0f}")
    return "  ".join(shown)
