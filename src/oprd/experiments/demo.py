"""`oprd demo`: the paper's same-architecture experiment (Tables 2 and 3) in miniature, on a CPU.

    oprd demo --out runs/demo            # about 10 minutes on 2 cores, the toy world included
    oprd demo --out /tmp/d --quick       # a reduced run (for tests), under 2 minutes

Top to bottom:
1. The toy world (`toy.build_world`, cached): modular-arithmetic chains, a tokenizer, a teacher and
   its own earlier checkpoint as the student.
2. From that student, with the same steps, rollouts per step and seed, through `oprd.trainer.train`
   (no separate code path; each method's config is built as a typed `TrainConfig`): OPD top-1,
   OPD top-16, OPRD, OPD top-1 + mu * OPRD.
3. Sequence-level KD, the off-policy reference: the teacher samples as many solutions as the
   on-policy runs sample rollouts, and the student is fine-tuned on them (`toy.sft`) for the same
   wall-clock budget as the on-policy runs' median training time.
4. Teacher, student and every distilled student evaluated on the held-out problems with
   `oprd.evaluation.harness.evaluate` (Avg@k, Best@k, Dist-4g, Avg Len).
5. results.json, report.md, plots (accuracy / rep cosine / response length vs step), printed tables.

Peak memory is the process's resident-set high-water mark while a method runs, above the resident
set just before it (`measure.PeakRSS`). It includes loading the method's models and optimizer,
which are the same for every method.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers.utils import logging as hf_logging

from oprd.checkpoint import save_model_dir
from oprd.config import DataConfig, OPDConfig, OPRDConfig, OptimConfig, RolloutConfig, TrainConfig, validate
from oprd.data import load_problems
from oprd.display import console_table, markdown_table, progress_bar
from oprd.evaluation.harness import evaluate
from oprd.experiments import toy
from oprd.experiments.measure import PeakRSS
from oprd.files import prepare_output_dir
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import HFRollout, SamplingParams
from oprd.trainer import train

ON_POLICY = {  # method -> its output-space objective; OPRD (at DemoSettings.oprd_coef) in OPRD_METHODS
    "opd_top1": OPDConfig(objective="sampled"),
    "opd_top16": OPDConfig(objective="topk", k=16),
    "oprd": OPDConfig(objective="none"),
    "opd_top1_plus_oprd": OPDConfig(objective="sampled"),  # L_OPD + mu * L_OPRD, mu = oprd_coef
}
OPRD_METHODS = ("oprd", "opd_top1_plus_oprd")
METHODS = ("teacher", "student", *ON_POLICY, "seq_kd")
DEMO_FILES = ("results.json", "settings.json", "report.md", "*.png", "runs")  # what --overwrite may replace


@dataclass
class DemoSettings:
    out: Path
    seed: int = 0
    quick: bool = False
    steps: int = 150  # optimizer steps per on-policy method
    prompts_per_step: int = 16
    responses_per_prompt: int = 2
    lr: float = 3e-3  # the toy's own SFT learning rate; the same for every method
    oprd_k: int = 64  # last-k response positions (the paper's 2000 of ~7000 tokens; here every response token)
    # The paper's 1/d MSE (its Table 2 numbers), coefficient 1; chosen over the reference code's normalised
    # MSE by a screen on this toy (README).
    oprd_normalize: bool = False
    oprd_coef: float = 1.0  # OPRD-only coefficient, and mu of OPD top-1 + mu * OPRD
    eval_samples: int = 4  # k of Avg@k / Best@k
    eval_temperature: float = 0.7
    eval_problems: int | None = None  # held-out problems in the final evaluation (None: all)
    curve_every: int = 20  # held-out accuracy during training every this many steps
    curve_problems: int = 64
    seq_kd_steps: int | None = None  # None: as many as fit the on-policy wall-clock budget
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")

    @classmethod
    def quick_run(cls, out: Path, **kw) -> DemoSettings:
        return cls(out, quick=True, **{"steps": 4, "prompts_per_step": 4, "eval_samples": 2, "eval_problems": 16,
                                       "curve_every": 2, "curve_problems": 8, **kw})


# --------------------------------------------------------------------------- evaluation


def evaluate_model(path: Path, world: toy.World, s: DemoSettings, progress: Progress, name: str) -> dict:
    """Avg@k, Best@k, Dist-4g, Avg Len of one model on the held-out problems."""
    spec = ModelSpec(model=str(path))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, torch.device("cpu")).eval()
    problems = load_problems(str(world.test_path), limit=s.eval_problems)
    params = SamplingParams(temperature=s.eval_temperature, max_new_tokens=max_response_tokens(world), n=s.eval_samples)
    result = evaluate(HFRollout.for_model(model, tokenizer), tokenizer, problems, params, seed=s.seed,
                      progress=progress, description=f"eval {name}")
    m, k = result.metrics, s.eval_samples
    return {"accuracy": m[f"avg@{k}"], "best_at_k": m[f"best@{k}"], "dist_4g": m["dist-4g"],
            "avg_len": m["avg_len"], "k": k, "format_error_rate": m["format_error_rate"]}


def max_response_tokens(world: toy.World) -> int:
    # the longest chain's solution is about 6 tokens per operation plus the boxed answer
    return 8 * world.settings.max_ops + 16


# --------------------------------------------------------------------------- the methods


def train_config(method: str, world: toy.World, s: DemoSettings, run_dir: Path) -> TrainConfig:
    """The `oprd train` config of an on-policy method: the demo's shared settings and the method's objective."""
    return TrainConfig(
        output_dir=str(run_dir), seed=s.seed, max_steps=s.steps, save_every=0, overwrite=True, device="cpu",
        student=ModelSpec(model=str(world.student)), teacher=ModelSpec(model=str(world.teacher)),
        data=DataConfig(path=str(world.train_path)),
        rollout=RolloutConfig(prompts_per_step=s.prompts_per_step, responses_per_prompt=s.responses_per_prompt,
                              temperature=1.0, max_new_tokens=max_response_tokens(world)),
        optim=OptimConfig(lr=s.lr, warmup_ratio=0.05, schedule="constant",
                          micro_batch_size=s.prompts_per_step * s.responses_per_prompt, weight_decay=0.0),
        opd=replace(ON_POLICY[method]),
        # OPRD: all layers, last-k response positions (paper defaults scaled to the toy's lengths)
        oprd=OPRDConfig(coef=s.oprd_coef if method in OPRD_METHODS else 0.0, normalize=s.oprd_normalize,
                        layers="all", positions="last_k", k=s.oprd_k),
        eval_every=s.curve_every, eval_benchmarks=[str(world.test_path)], eval_limit=s.curve_problems,
        eval_samples=2, eval_temperature=s.eval_temperature, eval_max_new_tokens=max_response_tokens(world),
    )


def run_on_policy(method: str, world: toy.World, s: DemoSettings, console: Console, name: str | None = None,
                  adjust: Callable[[TrainConfig], TrainConfig] = lambda cfg: cfg) -> dict:
    """Trains one method through `oprd.trainer.train` in runs/<name or method>; `adjust` changes its config."""
    run_dir = s.out / "runs" / (name or method)
    cfg = adjust(train_config(method, world, s, run_dir))
    validate(cfg)
    started = time.perf_counter()
    with PeakRSS() as memory:
        train(cfg, console=console)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    return {
        "final": run_dir / "final",
        "train_seconds": sum(r["time/step_s"] for r in steps),  # rollout + teacher + update, evaluations excluded
        "wall_seconds": wall,
        "update_seconds_per_step": statistics.mean(r["time/update_s"] + r["time/teacher_s"] for r in steps),
        "rollout_seconds_per_step": statistics.mean(r["time/rollout_s"] for r in steps),
        "peak_memory_delta_bytes": memory.delta,
        "steps": len(steps),
        "curve": records,
    }


def run_seq_kd(world: toy.World, s: DemoSettings, budget_s: float, progress: Progress) -> dict:
    """Sequence-level KD: SFT on teacher-sampled solutions of the training prompts.

    The teacher samples as many responses (same prompts per step x responses, temperature 1) as an
    on-policy run rolls out; sampling counts against the budget; SFT runs for the rest of it (or
    `seq_kd_steps` steps, which makes the run independent of the machine's speed).
    """
    run_dir = s.out / "runs" / "seq_kd"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(ModelSpec(model=str(world.teacher)))
    teacher = load_model(ModelSpec(model=str(world.teacher)), torch.device("cpu")).eval()
    rollout = HFRollout.for_model(teacher, tokenizer)
    problems = load_problems(str(world.train_path))
    n_prompts = min(len(problems), s.steps * s.prompts_per_step)
    generator = torch.Generator().manual_seed(s.seed)
    chosen = [problems[i] for i in torch.randperm(len(problems), generator=generator)[:n_prompts].tolist()]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_response_tokens(world), n=s.responses_per_prompt)

    started = time.perf_counter()
    with PeakRSS() as memory:
        result = evaluate(rollout, tokenizer, chosen, params, seed=s.seed, progress=progress,
                          description="seq_kd: teacher samples")
        by_index = {p.index: p.messages[0]["content"] for p in chosen}
        pairs = [(by_index[r["index"]], r["response"]) for r in result.samples]
        examples = toy.sft_examples(tokenizer, pairs)
        del teacher, rollout
        student = load_model(ModelSpec(model=str(world.student)), torch.device("cpu"), dtype=torch.float32)
        batch = s.prompts_per_step * s.responses_per_prompt
        limit = s.seq_kd_steps or 10**9
        task = progress.add_task("seq_kd: SFT on teacher samples", total=s.seq_kd_steps)
        taken = toy.sft(student, examples, steps=limit, batch_size=batch, lr=s.lr, pad_id=tokenizer.pad_token_id,
                        seed=s.seed, deadline=None if s.seq_kd_steps else started + budget_s,
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


# --------------------------------------------------------------------------- the demo


def run_demo(s: DemoSettings, console: Console | None = None) -> dict:
    """Runs the whole demo; returns results.json's content."""
    console = console or Console(stderr=True)
    out = prepare_output_dir(Path(s.out), overwrite=s.overwrite, overwrite_flag="--overwrite", ours=DEMO_FILES)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.disable_progress_bar()  # ours are the progress bars that matter
    started = time.perf_counter()
    progress = progress_bar(console)

    with progress:
        world = toy.build_world(toy.QUICK_WORLD if s.quick else toy.WorldSettings(seed=0), progress)
    console.print(f"toy world: {world.root}")
    results: dict[str, dict] = {}
    extras: dict[str, dict] = {}
    for name, path in (("teacher", world.teacher), ("student", world.student)):
        with progress:
            results[name] = evaluate_model(path, world, s, progress, name)
    for method in [m for m in ON_POLICY if m in s.methods]:
        console.rule(f"[bold]{method}")
        run = run_on_policy(method, world, s, console)
        with progress:
            results[method] = evaluate_model(run["final"], world, s, progress, method)
        extras[method] = run
    if "seq_kd" in s.methods:
        console.rule("[bold]seq_kd")
        seconds = [extras[m]["train_seconds"] for m in extras]
        budget = statistics.median(seconds) if seconds else 30.0
        with progress:
            run = run_seq_kd(world, s, budget, progress)
            results["seq_kd"] = evaluate_model(run["final"], world, s, progress, "seq_kd")
        extras["seq_kd"] = run

    gap = results["teacher"]["accuracy"] - results["student"]["accuracy"]
    for method, run in extras.items():
        results[method].update({k: v for k, v in run.items() if k not in ("final", "curve")})
        gained = results[method]["accuracy"] - results["student"]["accuracy"]
        results[method]["gap_closed"] = gained / gap if gap else None
    payload = {"wall_seconds": time.perf_counter() - started, "methods": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "settings.json").write_text(json.dumps({**asdict(s), "out": str(s.out), "world": str(world.root),
                                                   "world_settings": world.info["settings"]}, indent=2, default=str))
    curves = {m: r["curve"] for m, r in extras.items() if "curve" in r}
    plot_curves(curves, results, out)
    (out / "report.md").write_text(report(payload, s, world, extras))
    k = s.eval_samples
    console.print(console_table(f"Held-out toy problems (Table 2 style), k={k}", *accuracy_rows(results, k)))
    console.print(console_table("Cost per method (Table 3 style)", *cost_rows(results)))
    console.print(f"wall clock {payload['wall_seconds']:.0f} s; results in {out}")
    return payload


# --------------------------------------------------------------------------- tables, plots, report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _seconds(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def accuracy_rows(results: dict, k: int) -> tuple[list[str], list[list[str]]]:
    header = ["method", f"Avg@{k}", f"Best@{k}", "Dist-4g", "Avg Len", "gap closed"]
    rows = [[method, _pct(r["accuracy"]), _pct(r["best_at_k"]), _pct(r["dist_4g"]), f"{r['avg_len']:.1f}",
             _pct(r.get("gap_closed"))] for method, r in results.items()]
    return header, rows


def cost_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "update s/step", "rollout s/step", "peak memory delta (MB)", "train s", "steps"]
    rows = [[method, _seconds(r["update_seconds_per_step"]), _seconds(r["rollout_seconds_per_step"]),
             f"{r['peak_memory_delta_bytes'] / 2**20:.1f}", f"{r['train_seconds']:.1f}", str(r["steps"])]
            for method, r in results.items() if "train_seconds" in r]
    return header, rows


def plot_curves(curves: dict[str, list[dict]], results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(records, key):
        points = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [
        ("accuracy_vs_step.png", None, "held-out accuracy (Avg@2)"),
        ("rep_cosine_vs_step.png", "rep/cosine_similarity", "rep cosine similarity (OPRD positions)"),
        ("response_length_vs_step.png", "response_length/mean", "rollout response length (tokens)"),
    ]
    for filename, key, label in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, records in curves.items():
            metric = key or next((k for r in records for k in r if k.startswith("val/") and k.endswith("/avg@2")), None)
            if metric is None:
                continue
            xs, ys = series(records, metric)
            if xs:
                ax.plot(xs, ys, marker="o" if key is None else None, label=method)
        if key is None:
            for ref, style in (("teacher", "k--"), ("student", "k:"), ("seq_kd", "m-.")):
                if ref in results:
                    ax.axhline(results[ref]["accuracy"], linestyle=style[1:], color=style[0],
                               label=f"{ref} (final eval, Avg@{results[ref]['k']})")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)


def software_versions() -> str:
    """What produced a demo's numbers: library versions and the CPU threads used."""
    import platform

    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
            f"{torch.get_num_threads()} CPU threads")


def report(payload: dict, s: DemoSettings, world: toy.World, extras: dict) -> str:
    results, k = payload["methods"], s.eval_samples
    example = world.info["example"]
    lines = [
        "# oprd demo",
        "",
        f"Command settings: seed {s.seed}, {s.steps} steps x {s.prompts_per_step} prompts x {s.responses_per_prompt} "
        f"responses per method, lr {s.lr}, OPRD all layers, last {s.oprd_k} positions, "
        f"normalize={s.oprd_normalize}, coef (mu) {s.oprd_coef}{' (--quick)' if s.quick else ''}. "
        f"Total wall clock {payload['wall_seconds']:.0f} s.",
        "",
        f"Software: {software_versions()}. The toy's SFT and on-policy runs are deterministic for one install, but "
        "other torch versions or CPUs round differently, and the teacher's sudden rise in accuracy amplifies that.",
        "",
        "## The toy world",
        "",
        f"Chains of {world.settings.min_ops}-{world.settings.max_ops} modular (mod 10) operations, solved one line per "
        f"operation; {world.settings.train_problems} training and {world.settings.test_problems} held-out problems. "
        f"Teacher: a {world.settings.model.num_layers}-layer, {world.settings.model.hidden_size}-wide Qwen3 trained "
        f"by SFT for {world.settings.model.steps} steps; student: the same run's checkpoint at step "
        f"{world.settings.student_steps}. "
        "Example:",
        "",
        "```",
        example["prompt"],
        example["solution"],
        "```",
        "",
        f"## Accuracy (held-out, Avg@{k} at temperature {s.eval_temperature})",
        "",
        *markdown_table(*accuracy_rows(results, k)),
        "",
        "## Cost",
        "",
        *markdown_table(*cost_rows(results)),
    ]
    lines += [
        "",
        "Update time = teacher forward + student forward/backward + optimizer step (trainer's time/teacher_s + "
        "time/update_s). Train seconds exclude the held-out evaluations during training. Peak memory: this "
        "process's resident-set high-water mark during the method, minus the resident set at its start (after gc "
        "and malloc_trim); it includes loading the method's models and optimizer, which is the same for all "
        "methods, so on models this small the differences between methods are mostly allocator noise.",
        "",
    ]
    if "seq_kd" in extras:
        r = extras["seq_kd"]
        lines += [f"seq_kd: {r['teacher_samples']} teacher samples (teacher accuracy on them "
                  f"{_pct(r['teacher_sample_accuracy'])}%), then {r['steps']} SFT steps; "
                  + ("a fixed step count." if s.seq_kd_steps else
                     "sampling plus SFT fill the on-policy runs' median training time, so its step count depends on "
                     "the machine's speed (the only part of the demo that does)."), ""]
    lines += ["Plots: accuracy_vs_step.png, rep_cosine_vs_step.png, response_length_vs_step.png.", ""]
    return "\n".join(lines)
