"""`oprd demo`: the paper's same-architecture experiment (Tables 2 and 3) in miniature, on a CPU.

    oprd demo --out runs/demo                          # the shipped world and settings, one seed
    oprd demo --out runs/demo --seeds 3 --theorem1     # docs/demo.md's tables: three seeds, Theorem 1
    oprd demo --out runs/tune --tune                   # the equal-budget search that made tuned.json
    oprd demo --world-only --out runs/world            # the toy world alone: world.json
    oprd demo --world-only --rebuild-world --out w     # build the world here, compare with the shipped one
    oprd demo --out /tmp/d --quick                     # a reduced run (for tests)

Top to bottom:
1. The toy world (`toy.build_world`, shipped): modular-arithmetic chains, a teacher and its own
   earlier checkpoint as the student, both chosen by accuracy on the validation split.
2. Each method's settings. `--tune` searches them with the same budget for every method: four
   learning rates times two values of the method's own knob (`SEARCH`), each run once, chosen by
   validation accuracy; the test split is never read. Otherwise the shipped `tuned.json` (made by
   `--tune`) or `--tuned FILE`.
3. For every seed, from the student, with the same steps and rollouts: OPD top-1, OPD top-16,
   OPRD and OPD top-1 + mu * OPRD through `oprd.trainer.train` (no separate code path; each
   method's config is a typed `TrainConfig`), and sequence-level KD, the off-policy reference:
   SFT on as many teacher samples, in as many steps of the same batch size.
4. Every model measured on the test split with the toy's protocol (`toy.measure`, sampled with
   the seed), and the in-training curves on the same problems, k and seed, so a curve starts at
   its seed's student row and ends at its method's row.
5. With --theorem1, Theorem 1 measured on checkpoints of the first seed's OPRD run (`theorem1`).
6. results.json, report.md, plots, printed tables.

Peak memory is the process's resident-set high-water mark while a method runs, above the resident
set just before it (`measure.PeakRSS`). It includes loading the method's models and optimizer,
which are the same for every method.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers.utils import logging as hf_logging

from oprd.config import (
    DataConfig,
    EvalConfig,
    OPDConfig,
    OPRDConfig,
    OptimConfig,
    RolloutConfig,
    TeacherSpec,
    TrainConfig,
    validate,
)
from oprd.data import load_problems
from oprd.display import markdown_table, print_table, progress_bar
from oprd.evaluation.harness import evaluate
from oprd.experiments import theorem1, toy
from oprd.experiments.measure import PeakRSS
from oprd.files import check_output_dir, holding_out, open_output_dir, prepare_output_dir, write_text_atomically
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import HFRollout, SamplingParams
from oprd.runs.checkpoint import checkpoint_step, list_checkpoints, save_model_dir
from oprd.runs.recorder import read_metrics
from oprd.runs.report import plot_lines
from oprd.trainer import train

ON_POLICY = {  # method -> its output-space objective; OPRD (at the method's oprd_coef) in OPRD_METHODS
    "opd_top1": OPDConfig(objective="sampled"),
    "opd_top16": OPDConfig(objective="topk", k=16),
    "oprd": OPDConfig(objective="none"),
    "opd_top1_plus_oprd": OPDConfig(objective="sampled"),  # L_OPD + mu * L_OPRD, mu = oprd_coef
}
OPRD_METHODS = ("oprd", "opd_top1_plus_oprd")
TRAINED = (*ON_POLICY, "seq_kd")
METHODS = ("teacher", "student", *TRAINED)
DEMO_FILES = ("results.json", "settings.json", "report.md", "*.png", "runs", "tuning", "tuned.json",
              "world.json")  # what --overwrite may replace
SHIPPED_TUNING = "tuned.json"  # beside this module: the choice `oprd demo` uses unless --tune or --tuned


@dataclass(frozen=True)
class MethodSettings:
    """The settings a method is tuned over; each method reads its own."""

    lr: float
    grad_clip: float = 1.0  # OPD top-1's knob (0 = none): its sampled-token gradient is the noisy one
    topk_support: str = "student"  # OPD top-16's knob
    oprd_normalize: bool = False  # OPRD's knob, with its coefficient: the normalised MSE needs ~100x (PAPER.md)
    oprd_coef: float = 1.0  # the OPRD coefficient; mu of OPD top-1 + mu * OPRD (that method's knob)
    sample_temperature: float = 1.0  # seq-KD's knob: the temperature the teacher writes its solutions at
    bridge_rank: int | None = None  # an OPRD-Bridge's knob (`oprd demo --bridge`): the rank of its projections


LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
# Every method gets the same budget: each learning rate with each of two values of its own knob.
# (OPD top-1's clipping is on or off: under AdamW a threshold that always binds only rescales every
# step alike, so two thresholds below the gradient norm would train the same model.)
SEARCH: dict[str, tuple[dict, ...]] = {
    "opd_top1": ({"grad_clip": 1.0}, {"grad_clip": 0.0}),
    "opd_top16": ({"topk_support": "student"}, {"topk_support": "union"}),
    "oprd": ({"oprd_normalize": False, "oprd_coef": 1.0}, {"oprd_normalize": True, "oprd_coef": 100.0}),
    "opd_top1_plus_oprd": ({"oprd_coef": 1.0}, {"oprd_coef": 10.0}),
    "seq_kd": ({"sample_temperature": 1.0}, {"sample_temperature": 0.7}),
}


def search_space(method: str) -> list[MethodSettings]:
    return [MethodSettings(lr=lr, **knob) for lr in LEARNING_RATES for knob in SEARCH[method]]


@dataclass
class DemoSettings:
    out: Path
    seed: int = 0  # the first seed; --seeds N runs seed .. seed + N - 1
    seeds: int = 1
    quick: bool = False
    steps: int = 150  # optimizer steps per method (seq-KD included)
    prompts_per_step: int = 16
    responses_per_prompt: int = 2
    oprd_k: int = 64  # last-k response positions (the paper's 2000 of ~7000 tokens; here every response token)
    curve_every: int = 50  # the test-split curve during training every this many steps
    theorem1: bool = False  # measure Theorem 1 along the first seed's OPRD run (about a minute more)
    theorem1_batches: int = 16  # rollout batches per checkpoint in the gradient-variance measurement
    # torch CPU threads while training and measuring (a world is built on its own count). The toy's
    # models are too small to gain from a second thread: on 2 cores, 1 ran the demo 5% faster, with
    # the same numbers (docs/demo.md).
    threads: int = 1
    tune: bool = False
    tuned: Path | None = None  # a tuned.json to use instead of the shipped one
    resume: bool = False  # continue an interrupted --tune in `out`: candidates measured before are read back
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    overwrite: bool = False
    rebuild_world: bool = False  # build the toy world on this machine instead of using the shipped one

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.tune and self.tuned is not None:
            raise ValueError("--tune searches the settings and --tuned reads them from a file: give one of the two")
        if self.resume and not self.tune:
            raise ValueError("--resume continues an interrupted --tune: add --tune")
        if self.resume and self.overwrite:
            raise ValueError("--resume keeps the measured tuning runs in --out and --overwrite deletes them: "
                             "give one of the two")

    @classmethod
    def quick_run(cls, out: Path, **kw) -> DemoSettings:
        return cls(out, quick=True, **{"steps": 4, "prompts_per_step": 4, "curve_every": 2, "theorem1_batches": 3,
                                       **kw})

    @property
    def world_settings(self) -> toy.WorldSettings:
        return toy.QUICK_WORLD if self.quick else toy.WorldSettings()

    @property
    def run_shape(self) -> dict:
        """What a tuning run's result depends on besides its settings and the world."""
        return {k: getattr(self, k) for k in ("seed", "steps", "prompts_per_step", "responses_per_prompt", "oprd_k")}

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    @property
    def trained(self) -> list[str]:
        return [m for m in TRAINED if m in self.methods]


# --------------------------------------------------------------------------- one method, one seed


def load_for_measure(path: Path) -> tuple[torch.nn.Module, object]:
    spec = ModelSpec(model=str(path))
    return load_model(spec, torch.device("cpu")).eval(), load_tokenizer(spec)


def measure_model(path: Path, problems_path: Path, world: toy.World, seed: int, progress: Progress,
                  name: str) -> dict:
    """The toy's protocol (Avg@k, Best@k, Dist-4g, Avg Len) for the model folder at `path`."""
    model, tokenizer = load_for_measure(path)
    return toy.measure(model, tokenizer, load_problems(str(problems_path)), world.settings, seed=seed,
                       progress=progress, description=f"measure {name}")


def last_evaluation(run: dict, k: int, benchmark: str = "test") -> dict:
    """`measure_model`'s numbers for an on-policy run's final model on `benchmark` (a problem file's
    stem), read from the trainer's evaluation at the last step: the toy's protocol and the run's
    seed, as `measure_model` does (the demo's test checks the two agree)."""
    key = f"val/{benchmark}/avg@{k}"
    last = [r for r in run["curve"] if key in r][-1]
    if last["step"] != run["steps"]:
        raise RuntimeError(f"the run's last evaluation is at step {last['step']}, not at its last step {run['steps']}")
    return toy.protocol_numbers(last, k, prefix=f"val/{benchmark}/")


def train_config(method: str, settings: MethodSettings, world: toy.World, s: DemoSettings, seed: int,
                 run_dir: Path, curve: bool) -> TrainConfig:
    """The `oprd train` config of an on-policy method: the demo's shared settings, the method's
    objective and its tuned settings; with `curve`, the test-split curve under the toy's protocol."""
    w = world.settings
    return TrainConfig(
        output_dir=str(run_dir), seed=seed, max_steps=s.steps, save_every=0, overwrite=True, device="cpu",
        student=ModelSpec(model=str(world.student)), teacher=TeacherSpec(model=str(world.teacher)),
        data=DataConfig(path=str(world.train_path)),
        rollout=RolloutConfig(prompts_per_step=s.prompts_per_step, responses_per_prompt=s.responses_per_prompt,
                              temperature=1.0, max_new_tokens=w.max_response_tokens),
        optim=OptimConfig(lr=settings.lr, warmup_ratio=0.05, schedule="constant", grad_clip=settings.grad_clip,
                          micro_batch_size=s.prompts_per_step * s.responses_per_prompt, weight_decay=0.0),
        opd=replace(ON_POLICY[method], support=settings.topk_support),
        # OPRD: all layers, last-k response positions (paper defaults scaled to the toy's lengths)
        oprd=OPRDConfig(coef=settings.oprd_coef if method in OPRD_METHODS else 0.0,
                        normalize=settings.oprd_normalize, layers="all", positions="last_k", k=s.oprd_k),
        eval=EvalConfig(every=s.curve_every if curve else 0, benchmarks=[str(world.test_path)] if curve else [],
                        samples=w.eval_samples, temperature=w.eval_temperature, max_new_tokens=w.max_response_tokens),
    )


def identity(cfg: TrainConfig) -> TrainConfig:
    return cfg


def run_on_policy(method: str, settings: MethodSettings, world: toy.World, s: DemoSettings, seed: int, run_dir: Path,
                  console: Console, curve: bool = True,
                  adjust: Callable[[TrainConfig], TrainConfig] = identity) -> dict:
    """Trains one method through `oprd.trainer.train` in `run_dir`; `adjust` changes its config."""
    cfg = adjust(train_config(method, settings, world, s, seed, run_dir, curve))
    validate(cfg)
    started = time.perf_counter()
    with PeakRSS() as memory:
        train(cfg, console=console)
    wall = time.perf_counter() - started
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    return {
        "final": run_dir / "final",
        # rollout + teacher + update: a step's time less its evaluation
        "train_seconds": sum(r["time/step_s"] - r["time/validate_s"] for r in steps),
        "wall_seconds": wall,
        "update_seconds_per_step": statistics.mean(r["time/update_s"] + r["time/teacher_s"] for r in steps),
        "rollout_seconds_per_step": statistics.mean(r["time/sample_s"] for r in steps),
        "peak_memory_delta_bytes": memory.delta,
        "steps": len(steps),
        "curve": records,
    }


def run_seq_kd(settings: MethodSettings, world: toy.World, s: DemoSettings, seed: int, run_dir: Path,
               progress: Progress) -> dict:
    """Sequence-level KD: SFT on teacher-sampled solutions of the training prompts, with the
    on-policy methods' budget: as many samples (steps x prompts x responses, prompts drawn with the
    seed) and as many steps of the same batch size, at the same warm-up."""
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_for_measure(world.teacher)
    problems = load_problems(str(world.train_path))
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randint(len(problems), (s.steps * s.prompts_per_step,), generator=generator).tolist()
    chosen = [problems[i] for i in picked]
    params = SamplingParams(temperature=settings.sample_temperature, max_new_tokens=world.settings.max_response_tokens,
                            n=s.responses_per_prompt)
    started = time.perf_counter()
    with PeakRSS() as memory:
        result = evaluate(HFRollout.for_model(teacher, tokenizer), tokenizer, chosen, params, seed=seed,
                          progress=progress, description="seq_kd: teacher samples")
        prompt_of = {p.index: p.messages[0]["content"] for p in problems}  # samples name their problem's row
        pairs = [(prompt_of[r["index"]], r["response"]) for r in result.samples]
        examples = toy.sft_examples(tokenizer, pairs)
        del teacher
        student = load_model(ModelSpec(model=str(world.student)), torch.device("cpu"), dtype=torch.float32)
        task = progress.add_task("seq_kd: SFT on teacher samples", total=s.steps)
        taken = toy.sft(student, examples, steps=s.steps, batch_size=s.prompts_per_step * s.responses_per_prompt,
                        lr=settings.lr, pad_id=tokenizer.pad_token_id, seed=seed, warmup=max(1, s.steps // 20),
                        callback=lambda step, loss: progress.update(task, completed=step))
    seconds = time.perf_counter() - started
    save_model_dir(run_dir / "final", student, tokenizer)
    return {
        "final": run_dir / "final",
        "train_seconds": seconds,
        "wall_seconds": seconds,
        "update_seconds_per_step": None,
        "rollout_seconds_per_step": None,
        "peak_memory_delta_bytes": memory.delta,
        "steps": taken,
        "teacher_samples": len(examples),
        "teacher_sample_accuracy": result.metrics[f"avg@{s.responses_per_prompt}"],
    }


def train_method(method: str, settings: MethodSettings, world: toy.World, s: DemoSettings, seed: int, run_dir: Path,
                 console: Console, progress: Progress, curve: bool,
                 adjust: Callable[[TrainConfig], TrainConfig] = identity) -> dict:
    if method == "seq_kd":
        with progress:
            return run_seq_kd(settings, world, s, seed, run_dir, progress)
    return run_on_policy(method, settings, world, s, seed, run_dir, console, curve=curve, adjust=adjust)


# --------------------------------------------------------------------------- tuning


def pick_best(tried: list[dict]) -> int:
    """The index of the setting with the highest validation accuracy; the earliest in the grid on ties."""
    return max(range(len(tried)), key=lambda i: (tried[i]["validation_accuracy"], -i))


def search(label: str, candidates: list[MethodSettings], train_one: Callable[[MethodSettings, Path], dict],
           run_dir_of: Callable[[int], Path], world: toy.World, s: DemoSettings, console: Console,
           progress: Progress) -> dict:
    """Trains every candidate (`train_one(settings, run_dir)` returns the run, its model in "final")
    in `run_dir_of(i)` and measures it on the validation split; {"tried": [settings,
    validation_accuracy], "chosen": settings}. Each measurement is kept beside its run (`i.json`),
    so with `s.resume` a candidate measured before, on the same world and run shape, is read back."""
    tried = []
    for i, settings in enumerate(candidates):
        run_dir = run_dir_of(i)
        record = {"settings": asdict(settings), "world": world.root.name, "run_shape": s.run_shape}
        measured_before = run_dir.with_suffix(".json")
        if s.resume and measured_before.is_file():
            before = json.loads(measured_before.read_text())
            if {k: before.get(k) for k in record} == record:
                console.print(f"tuning {label} {i + 1}/{len(candidates)}: measured before, validation "
                              f"{100 * before['validation_accuracy']:.1f}")
                tried.append({"settings": record["settings"], "validation_accuracy": before["validation_accuracy"]})
                continue
        console.rule(f"[bold]tuning {label} {i + 1}/{len(candidates)}: {settings}")
        if run_dir.exists():  # an interrupted run of this candidate (the folder is the demo's own)
            shutil.rmtree(run_dir)
        run = train_one(settings, run_dir)
        with progress:
            measured = measure_model(run["final"], world.validation_path, world, world.settings.eval_seed, progress,
                                     f"{label} #{i} on validation")
        write_text_atomically(measured_before, json.dumps({**record, "validation_accuracy": measured["accuracy"]}))
        tried.append({"settings": record["settings"], "validation_accuracy": measured["accuracy"]})
    return {"tried": tried, "chosen": tried[pick_best(tried)]["settings"]}


def tune(world: toy.World, s: DemoSettings, console: Console, progress: Progress) -> dict:
    """The equal-budget search (`SEARCH` x `LEARNING_RATES`, first seed, validation split only);
    returns tuned.json's content."""
    methods = {}
    for method in s.trained:
        def train_one(settings: MethodSettings, run_dir: Path, method=method) -> dict:
            return train_method(method, settings, world, s, s.seed, run_dir, console, progress, curve=False)

        methods[method] = search(method, search_space(method), train_one,
                                 lambda i, method=method: s.out / "tuning" / method / str(i), world, s, console,
                                 progress)
    return {
        "made_by": "oprd demo --tune" + (" --quick" if s.quick else ""),
        "world": world.root.name,
        "world_fingerprint": world.fingerprint,
        "demo": s.run_shape,
        "grid": {"lr": list(LEARNING_RATES), "knobs": SEARCH},
        "software": toy.software(),
        "methods": methods,
    }


def open_demo_output(s: DemoSettings, ours: tuple[str, ...]) -> Path:
    """The demo's --out: a new folder, or one --overwrite may replace (`ours`: what the demo writes);
    with --resume the folder of an interrupted --tune, whose measured tuning runs are kept while
    everything else is redone."""
    out = Path(s.out)
    if not s.resume:
        replace = check_output_dir(out, overwrite=s.overwrite, overwrite_flag="--overwrite", ours=ours,
                                   other_options="To continue an interrupted --tune there, pass --resume. "
                                   if s.tune else "")
        return open_output_dir(out, replace=replace)
    if not (out / "tuning").is_dir():
        raise FileNotFoundError(f"--resume: {out} holds no tuning/ folder of an interrupted --tune; "
                                "drop --resume to start one")
    check_output_dir(out, overwrite=True, overwrite_flag="--resume", ours=ours)  # refuses files it did not write
    for entry in out.iterdir():
        if entry.name != "tuning":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return out


def load_tuning(tuned: Path | None, shipped: str, made_by: str, world: toy.World) -> tuple[dict, str]:
    """(a tuning file's content, where it came from): `tuned` when given, else the shipped file
    `shipped` beside this module. The source says so when the file was tuned on another toy world
    (e.g. the shipped choice under --quick)."""
    if tuned is not None:
        if not Path(tuned).is_file():
            raise FileNotFoundError(f"--tuned {tuned}: no such file (a {shipped} written by `{made_by}`)")
        tuning, source = json.loads(Path(tuned).read_text()), str(tuned)
    else:
        shipped_file = resources.files("oprd.experiments") / shipped
        tuning, source = json.loads(shipped_file.read_text()), f"the shipped oprd/experiments/{shipped}"
    if tuning.get("world") != world.root.name:
        source += f" (tuned on toy world {tuning.get('world')}, not this one, {world.root.name})"
    elif tuning.get("world_fingerprint") != world.fingerprint:  # the same settings, other weights
        source += (f" (tuned on another build of toy world {world.root.name}: weights "
                   f"{tuning.get('world_fingerprint', 'not recorded')}, not this one's {world.fingerprint})")
    return tuning, source


def chosen_settings(tuning: dict, method: str, made_by: str) -> MethodSettings:
    try:
        return MethodSettings(**tuning["methods"][method]["chosen"])
    except KeyError as missing:
        raise ValueError(f"the tuning file has no chosen settings for {method} ({missing}): run `{made_by}`") from None


# --------------------------------------------------------------------------- the demo


@holding_out
def run_world_only(s: DemoSettings, console: Console | None = None) -> dict:
    """`oprd demo --world-only`: builds (or loads) the toy world; writes out/world.json."""
    console = console or Console(stderr=True)
    out = prepare_output_dir(Path(s.out), overwrite=s.overwrite, overwrite_flag="--overwrite", ours=DEMO_FILES)
    torch.set_num_threads(s.threads)
    hf_logging.disable_progress_bar()
    world = load_world(s, console, progress_bar(console))
    info = {**world.info, "cache": str(world.root)}
    (out / "world.json").write_text(json.dumps(info, indent=2))
    return info


def load_world(s: DemoSettings, console: Console, progress: Progress) -> toy.World:
    """The demo's toy world: shipped (installed in the cache on first use) or, with
    --rebuild-world, built on this machine and set beside the shipped one in a table."""
    with progress:
        world = toy.build_world(s.world_settings, progress, rebuild=s.rebuild_world)
    console.print(f"toy world: {toy.world_summary(world)}")
    shipped = toy.shipped_world(s.world_settings)
    if s.rebuild_world and shipped is not None:
        print_table(console, "the rebuilt toy world against the shipped one", ["model", "", "shipped", "rebuilt"],
                    toy.compare_worlds(json.loads((shipped / "world.json").read_text()), world.info))
    return world


@dataclass
class DemoStart:
    """What every demo has once it has started: its console, output folder, progress bar and world."""

    console: Console
    out: Path
    progress: Progress
    world: toy.World
    started: float  # time.perf_counter() at the start
    world_seconds: float  # to load (or build) the toy world


def start_demo(s: DemoSettings, console: Console | None, files: tuple[str, ...]) -> DemoStart:
    """Opens --out (`files`: what --overwrite may replace), sets the torch threads and builds or
    loads the toy world: the first steps of every demo."""
    console = console or Console(stderr=True)
    out = open_demo_output(s, files)
    torch.set_num_threads(s.threads)
    hf_logging.disable_progress_bar()  # ours are the progress bars that matter
    started = time.perf_counter()
    progress = progress_bar(console)
    world = load_world(s, console, progress)
    return DemoStart(console, out, progress, world, started, time.perf_counter() - started)


@holding_out
def run_demo(s: DemoSettings, console: Console | None = None) -> dict:
    """Runs the whole demo; returns results.json's content."""
    start = start_demo(s, console, DEMO_FILES)
    console, out, progress, world, started = start.console, start.out, start.progress, start.world, start.started
    if s.tune:
        tuning, tuning_source = tune(world, s, console, progress), "this run's --tune"
        (out / "tuned.json").write_text(json.dumps(tuning, indent=2))
    else:
        tuning, tuning_source = load_tuning(s.tuned, SHIPPED_TUNING, "oprd demo --tune", world)
    console.print(f"settings: {tuning_source}")
    settings = {method: chosen_settings(tuning, method, "oprd demo --tune") for method in s.trained}

    per_seed: dict[int, dict[str, dict]] = {}
    extras: dict[int, dict[str, dict]] = {}
    phases = {"toy world": start.world_seconds}  # where the wall clock went
    for seed in s.seed_list:
        per_seed[seed], extras[seed] = {}, {}
        for name, path in (("teacher", world.teacher), ("student", world.student)):
            with progress, timed(phases, "teacher and student"):
                per_seed[seed][name] = measure_model(path, world.test_path, world, seed, progress,
                                                     f"{name} seed {seed}")
        for method in s.trained:
            console.rule(f"[bold]{method}, seed {seed}")
            # the first seed's OPRD run keeps checkpoints along the way for Theorem 1
            keep = s.theorem1 and method == "oprd" and seed == s.seed
            with timed(phases, method):
                run = train_method(method, settings[method], world, s, seed, s.out / "runs" / f"{method}-seed{seed}",
                                   console, progress, curve=True, adjust=theorem1_checkpoints(s) if keep else identity)
                if method in ON_POLICY:  # the trainer's last evaluation measured the final model already
                    per_seed[seed][method] = last_evaluation(run, world.settings.eval_samples)
                else:
                    with progress:
                        per_seed[seed][method] = measure_model(run["final"], world.test_path, world, seed, progress,
                                                               f"{method} seed {seed}")
            extras[seed][method] = run

    variance = None
    if s.theorem1 and "oprd" in s.trained:
        console.rule("[bold]Theorem 1: gradient variance along the OPRD run")
        with timed(phases, "theorem 1"):
            variance = measure_theorem1(world, s, s.out / "runs" / f"oprd-seed{s.seed}", progress)

    methods = aggregate(per_seed, extras, [m for m in METHODS if m in s.methods])
    payload = {
        "wall_seconds": time.perf_counter() - started,
        "phase_seconds": phases,
        "seeds": s.seed_list,
        "world": {k: world.info[k] for k in ("teacher", "student", "sft_curve", "teacher_entropy_nats",
                                             "build_threads", "software")} | {"cache": str(world.root),
                                                                              "origin": world.origin},
        "methods": methods,
        "tuning": {m: tuning["methods"][m] for m in s.trained},
        "tuning_source": tuning_source,
        "theorem1": variance,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "settings.json").write_text(json.dumps(
        {**asdict(s), "out": str(s.out), "world": str(world.root), "world_settings": world.info["settings"],
         "method_settings": {m: asdict(v) for m, v in settings.items()}}, indent=2, default=str))
    plot_curves(curve_means(extras), methods, world.settings.eval_samples, out)
    if variance:
        theorem1.plot(variance["checkpoints"], out / "theorem1.png")
    (out / "report.md").write_text(report(payload, s, world, tuning_source))
    k = world.settings.eval_samples
    print_table(console, f"Test problems (Table 2 style), Avg@{k}, {len(s.seed_list)} seed(s)",
                *accuracy_rows(methods, k))
    print_table(console, "Cost per method (Table 3 style)", *cost_rows(methods))
    console.print(f"wall clock {payload['wall_seconds']:.0f} s ({phase_text(phases)}); results in {out}")
    return payload


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall-clock seconds of the block to `phases[name]`."""
    began = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - began


def phase_text(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())


def theorem1_checkpoints(s: DemoSettings) -> Callable[[TrainConfig], TrainConfig]:
    """A run's config changed to keep three checkpoints along the way."""
    every = max(1, s.steps // 3)
    return lambda cfg: replace(cfg, save_every=every, keep_checkpoints=s.steps // every)


def measure_theorem1(world: toy.World, s: DemoSettings, run_dir: Path, progress: Progress) -> dict:
    """Every objective's gradient variance (`theorem1`) at the student and at each checkpoint the
    OPRD run in `run_dir` kept."""
    along_the_run = {checkpoint_step(path): path for path in list_checkpoints(run_dir / "checkpoints")}
    checkpoints = {0: world.student, **along_the_run}
    problems = load_problems(str(world.train_path))
    with progress:
        measured = theorem1.measure_run(
            checkpoints, world.teacher, problems, batches=s.theorem1_batches, prompts_per_batch=s.prompts_per_step,
            responses_per_prompt=s.responses_per_prompt, max_new_tokens=world.settings.max_response_tokens,
            seed=s.seed, progress=progress)
    return {"run": f"oprd, seed {s.seed}", "batches": s.theorem1_batches,
            "rollouts_per_batch": s.prompts_per_step * s.responses_per_prompt, "checkpoints": measured}


# --------------------------------------------------------------------------- aggregating seeds

REPORTED = ("accuracy", "best_at_k", "dist_4g", "avg_len", "format_error_rate")
COSTS = ("train_seconds", "update_seconds_per_step", "rollout_seconds_per_step", "peak_memory_delta_bytes", "steps")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def aggregate(per_seed: dict[int, dict[str, dict]], extras: dict[int, dict[str, dict]], methods: list[str]) -> dict:
    """results.json's `methods`: per method the mean over seeds of every reported metric, the
    accuracy of each seed and its spread, the share of the teacher-student gap closed (per seed,
    then averaged) and the mean costs."""
    seeds = sorted(per_seed)
    out = {}
    for method in methods:
        accuracies = [per_seed[seed][method]["accuracy"] for seed in seeds]
        row = {key: _mean([per_seed[seed][method][key] for seed in seeds]) for key in REPORTED}
        row.update({
            "k": per_seed[seeds[0]][method]["k"],
            "accuracy_per_seed": accuracies,
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
        })
        if method in extras[seeds[0]]:
            gaps = []
            for seed in seeds:
                teacher, student = per_seed[seed]["teacher"]["accuracy"], per_seed[seed]["student"]["accuracy"]
                gaps.append((per_seed[seed][method]["accuracy"] - student) / (teacher - student)
                            if teacher != student else None)
            row["gap_closed_per_seed"] = gaps
            row["gap_closed"] = _mean(gaps)
            for key in COSTS:
                row[key] = _mean([extras[seed][method][key] for seed in seeds])
            for key in ("teacher_samples", "teacher_sample_accuracy"):
                if key in extras[seeds[0]][method]:
                    row[key] = _mean([extras[seed][method][key] for seed in seeds])
        out[method] = row
    return out


def curve_means(extras: dict[int, dict[str, dict]]) -> dict[str, list[dict]]:
    """method -> [{step, key: mean over seeds}] of the curve records every seed has."""
    seeds = sorted(extras)
    means = {}
    for method in extras[seeds[0]]:
        if "curve" not in extras[seeds[0]][method]:
            continue
        by_step = [{r["step"]: r for r in extras[seed][method]["curve"]} for seed in seeds]
        steps = sorted(set.intersection(*(set(d) for d in by_step)))
        means[method] = []
        for step in steps:
            keys = set.intersection(*(set(d[step]) for d in by_step)) - {"step"}
            means[method].append({"step": step, **{key: statistics.mean(d[step][key] for d in by_step)
                                                   for key in keys if isinstance(by_step[0][step][key], int | float)}})
    return means


# --------------------------------------------------------------------------- tables, plots, report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _seconds(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def accuracy_rows(results: dict, k: int) -> tuple[list[str], list[list[str]]]:
    header = ["method", f"Avg@{k} (mean)", "spread (sd; min-max)", "per seed", f"Best@{k}", "Dist-4g", "Avg Len",
              "gap closed"]
    rows = [[method, _pct(r["accuracy"]),
             f"{_pct(r['accuracy_std'])}; {_pct(r['accuracy_min'])}-{_pct(r['accuracy_max'])}",
             " ".join(_pct(a) for a in r["accuracy_per_seed"]), _pct(r["best_at_k"]), _pct(r["dist_4g"]),
             f"{r['avg_len']:.1f}", _pct(r.get("gap_closed"))] for method, r in results.items()]
    return header, rows


def cost_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "update s/step", "rollout s/step", "peak memory delta (MB)", "train s", "steps"]
    rows = [[method, _seconds(r["update_seconds_per_step"]), _seconds(r["rollout_seconds_per_step"]),
             f"{r['peak_memory_delta_bytes'] / 2**20:.1f}", f"{r['train_seconds']:.1f}", f"{r['steps']:.0f}"]
            for method, r in results.items() if "train_seconds" in r]
    return header, rows


def knob_text(knobs: tuple[dict, ...], settings: dict) -> str:
    """The values `settings` gives the knob that `knobs` (the values searched) varies."""
    names = sorted({key for knob in knobs for key in knob})
    return ", ".join(f"{name}={settings[name]}" for name in names)


def tuning_rows(tuning: dict, methods: list[str]) -> tuple[list[str], list[list[str]]]:
    """Validation Avg@k of every setting tried: a row per method and knob value, a column per
    learning rate; the chosen one in bold."""
    header = ["method", "knob", *(f"lr {lr:g}" for lr in LEARNING_RATES)]
    rows = []
    for method in methods:
        entry = tuning[method]
        for knob in SEARCH[method]:
            cells = []
            for lr in LEARNING_RATES:
                tried = next((t for t in entry["tried"] if t["settings"]["lr"] == lr
                              and all(t["settings"][name] == value for name, value in knob.items())), None)
                cell = "-" if tried is None else _pct(tried["validation_accuracy"])
                cells.append(f"**{cell}**" if tried is not None and tried["settings"] == entry["chosen"] else cell)
            rows.append([method, ", ".join(f"{name}={value}" for name, value in knob.items()), *cells])
    return header, rows


def theorem1_rows(variance: dict) -> tuple[list[str], list[list[str]]]:
    header = ["step", "KL/token", "OPRD MSE", *(f"SNR {name}" for name in theorem1.OBJECTIVES),
              "KL estimate SNR (sampled / exact)"]
    rows = [[str(m["step"]), f"{m['kl_per_token']:.4f}", f"{m['rep_mse']:.4f}",
             *(f"{m['gradients'][name]['snr']:.3f}" for name in theorem1.OBJECTIVES),
             f"{m['kl_estimate']['sampled_token']['snr']:.2f} / {m['kl_estimate']['exact']['snr']:.2f}"]
            for m in variance["checkpoints"]]
    return header, rows


def plot_curves(curves: dict[str, list[dict]], results: dict, k: int, out: Path) -> None:
    """accuracy, representation cosine and response length against step, a line per method (means
    over seeds), drawn by `run_report.plot_lines`; the accuracy plot marks the teacher, the student
    and seq-KD."""
    panels = [
        ("accuracy_vs_step.png", f"val/test/avg@{k}", f"test Avg@{k} (mean over seeds)"),
        ("rep_cosine_vs_step.png", "rep/cosine_similarity", "rep cosine similarity (OPRD positions)"),
        ("response_length_vs_step.png", "response_length/mean", "rollout response length (tokens)"),
    ]
    for filename, key, label in panels:
        lines = {method: [(r["step"], r[key]) for r in records if key in r] for method, records in curves.items()}
        references = ({ref: results[ref]["accuracy"] for ref in ("teacher", "student", "seq_kd") if ref in results}
                      if key.startswith("val/") else None)
        plot_lines(out / filename, label, {m: points for m, points in lines.items() if points}, label, references)


def software_versions() -> str:
    """What produced a demo's numbers: library versions and the CPU threads used."""
    versions = toy.software()
    return (f"torch {versions['torch']}, transformers {versions['transformers']}, Python {versions['python']}, "
            f"{torch.get_num_threads()} CPU threads (the world: {toy.BUILD_THREADS})")


def report(payload: dict, s: DemoSettings, world: toy.World, tuning_source: str) -> str:
    results, k, w = payload["methods"], world.settings.eval_samples, world.settings
    info = world.info
    lines = [
        "# oprd demo",
        "",
        f"Seeds {', '.join(map(str, s.seed_list))}; per method and seed {s.steps} steps x {s.prompts_per_step} prompts "
        f"x {s.responses_per_prompt} responses; OPRD on all layers, last {s.oprd_k} positions"
        f"{' (--quick)' if s.quick else ''}. Total wall clock {payload['wall_seconds']:.0f} s "
        f"({phase_text(payload['phase_seconds'])}).",
        "",
        f"Software: {software_versions()}. Training and measuring are deterministic for one install and thread "
        "count; other torch versions or CPUs round differently.",
        "",
        "## The toy world",
        "",
        f"Chains of {w.min_ops}-{w.max_ops} modular (mod 10) operations, solved one line per operation; "
        f"{w.train_problems} training, {w.validation_problems} validation and {w.test_problems} test problems. "
        f"One SFT run of a {w.model.num_layers}-layer, {w.model.hidden_size}-wide Qwen3, measured on the validation "
        f"split every {w.checkpoint_every} steps; teacher = the first checkpoint at or above "
        f"{100 * w.teacher_target:.0f}% (step {info['teacher']['step']}), student = the last at or below "
        f"{100 * w.student_target:.0f}% before it (step {info['student']['step']}). Built on "
        f"{info['build_threads']} thread(s). Teacher entropy on its own "
        f"samples: {info['teacher_entropy_nats']:.3f} nats per token. Example:",
        "",
        "```",
        info["example"]["prompt"],
        info["example"]["solution"],
        "```",
        "",
        f"## Accuracy (test split, Avg@{k} at temperature {w.eval_temperature}, sampled with each run's seed)",
        "",
        *markdown_table(*accuracy_rows(results, k)),
        "",
        f"## Tuning (validation split; settings from {tuning_source})",
        "",
        f"Every method: learning rates {', '.join(f'{lr:g}' for lr in LEARNING_RATES)} x two values of its own knob, "
        "one run each at the first seed; the best validation Avg@k (in bold) is chosen, the earliest on ties.",
        "",
        *markdown_table(*tuning_rows(payload["tuning"], s.trained)),
        "",
        "## Cost",
        "",
        *markdown_table(*cost_rows(results)),
        "",
        "Update time = teacher forward + student forward/backward + optimizer step (trainer's time/teacher_s + "
        "time/update_s). Train seconds exclude the evaluations during training. Peak memory: this process's "
        "resident-set high-water mark during the method, minus the resident set at its start (after gc and "
        "malloc_trim); it includes loading the method's models and optimizer, the same for all methods, so on "
        "models this small the differences between methods are mostly allocator noise.",
        "",
    ]
    if "seq_kd" in results:
        r = results["seq_kd"]
        lines += [f"seq_kd: {r['teacher_samples']:.0f} teacher samples (teacher accuracy on them "
                  f"{_pct(r['teacher_sample_accuracy'])}%), then {r['steps']:.0f} SFT steps of "
                  f"{s.prompts_per_step * s.responses_per_prompt}: the on-policy methods' samples and steps.", ""]
    if payload["theorem1"]:
        variance = payload["theorem1"]
        lines += ["## Theorem 1: gradient noise as the student nears the teacher", "",
                  f"Checkpoints of the {variance['run']} run; at each, {variance['batches']} rollout batches of "
                  f"{variance['rollouts_per_batch']} and every objective's gradient on each "
                  f"(`oprd.experiments.theorem1`). SNR = ||mean g||^2 / E||g - mean g||^2; pure noise gives "
                  f"about {1 / variance['batches']:.3f}.",
                  "", *markdown_table(*theorem1_rows(variance)), "", "Plot: theorem1.png.", ""]
    lines += ["Plots: accuracy_vs_step.png, rep_cosine_vs_step.png, response_length_vs_step.png.", ""]
    return "\n".join(lines)

