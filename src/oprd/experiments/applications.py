"""`oprd demo --applications`: the paper's two applications of OPRD in miniature, on the toy world.

(a) Self-distillation with privileged context. The world's student teaches itself: the teacher is
    the student (`teacher.model=self`) reading each of its responses after a prompt that also gives
    the answer (`PRIVILEGED`), which the student never sees. Two forms: frozen (the student at step
    0) and live (the current student, no second copy of the weights). Against the untouched student
    and plain SFT on the reference solutions with the same budget (steps x samples per step).
(b) Several teachers in one student. Two teachers fine-tuned from the world's student, each only on
    chains of its half of the task's operations (`HALVES`: + and -, or *), until it solves the world's
    teacher target of its own half's validation chains. The student learns from both on chains of
    both halves: each sample routed to the teacher of its half (`teachers.route_by=data_source`), or
    every sample scored by both, losses averaged. Against each teacher alone on the whole test set.

Every on-policy run uses the OPRD settings `oprd demo` chose (the shipped tuned.json, or --tuned):
they were tuned for distilling the world's teacher, not again for these applications. Plain SFT
uses seq-KD's tuned learning rate (the demo's SFT baseline). Same steps, rollouts, seeds and
accuracy protocol as `oprd demo`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import PreTrainedTokenizerFast

from oprd.config import DataConfig, TeacherMember, TeachersConfig, TeacherSpec, TrainConfig
from oprd.data import load_problems
from oprd.display import markdown_table, print_table
from oprd.experiments import toy
from oprd.experiments.demo import (
    SHIPPED_TUNING,
    DemoSettings,
    chosen_settings,
    last_evaluation,
    load_for_measure,
    load_tuning,
    measure_model,
    run_on_policy,
    software_versions,
    start_demo,
)
from oprd.files import holding_out, write_dir_atomically
from oprd.models import ModelSpec, load_model
from oprd.runs.checkpoint import save_model_dir

PRIVILEGED = "{prompt} The answer is {answer}."  # what the self-teacher reads and the student does not
SELF_MODES = ("frozen", "live")
HALVES = {"add_sub": "+-", "mul": "*"}  # a teacher per half of the task's operations; the name is the data_source
APPLICATIONS_VERSION = 1  # part of the cache key of the halves' data and teachers
APPLICATION_FILES = ("applications_results.json", "applications_report.md", "applications.png", "settings.json",
                     "runs")  # what --overwrite may replace


# --------------------------------------------------------------------------- (b)'s data and teachers


def halves_data(world: toy.World) -> Path:
    """Chains of each half's operations (data_source = the half's name), none of them a prompt of the
    world, half as many per half as the world has per split: train.parquet (both halves, alternating),
    and validation_HALF / test_HALF.parquet; built once, cached beside the world."""
    root = world.root / f"halves-v{APPLICATIONS_VERSION}"
    if (root / "train.parquet").is_file():
        return root
    seen = {p.messages[0]["content"] for split in (world.train_path, world.validation_path, world.test_path)
            for p in load_problems(str(split))}
    w = world.settings
    shape = {"min_steps": w.min_ops, "max_steps": w.max_ops}
    per_half = {"train": w.train_problems // 2, "validation": w.validation_problems // 2, "test": w.test_problems // 2}

    def fill(tmp: Path) -> None:
        train = []
        for offset, (half, operations) in enumerate(HALVES.items()):
            splits = {}
            for index, (split, count) in enumerate(per_half.items()):
                splits[split] = toy.make_split(count, 1000 + 10 * offset + index, exclude=seen, operations=operations,
                                               **shape)
                seen.update(p.prompt for p in splits[split])
            for split in ("validation", "test"):
                toy.write_problems(splits[split], tmp / f"{split}_{half}.parquet", source=half)
            train.append((splits["train"], half))
        alternating = [pair for pairs in zip(*([(p, half) for p in ps] for ps, half in train)) for pair in pairs]
        toy.write_problems([p for p, _ in alternating], tmp / "train.parquet", source=[h for _, h in alternating])

    return write_dir_atomically(root, fill)


def reference_examples(tokenizer, problems: list) -> list[tuple[list[int], int]]:
    """SFT examples of toy problems read back from their files: each prompt with its reference
    solution (`toy.write_problems` keeps it in extra_info.solution)."""
    return toy.sft_examples(tokenizer, [(p.messages[0]["content"], p.row["extra_info"]["solution"]) for p in problems])


def build_specialist(world: toy.World, data: Path, half: str, progress: Progress | None = None) -> Path:
    """The world's student fine-tuned (SFT, the world's settings) only on `half`'s training chains
    until it reaches the world's teacher target on `half`'s validation chains (at most the world
    recipe's max_steps); shipped with the world, or built once and cached beside it."""
    recipe = world.settings.model
    key = hashlib.sha256(json.dumps([APPLICATIONS_VERSION, half, asdict(recipe)]).encode()).hexdigest()[:8]
    root = world.root / f"specialist-{half}-{key}"
    if (root / "config.json").is_file():
        return root
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(world.tokenizer))
    train = [p for p in load_problems(str(data / "train.parquet")) if p.source == half]
    examples = reference_examples(tokenizer, train)
    student = load_model(ModelSpec(model=str(world.student)), torch.device("cpu"), dtype=torch.float32)

    def fill(tmp: Path) -> None:
        run = toy.train_to_targets(recipe, world.settings, tokenizer, examples,
                                   load_problems(str(data / f"validation_{half}.parquet")), f"{half} teacher",
                                   progress, start=student)
        save_model_dir(tmp, run.teacher, tokenizer)
        (tmp / "specialist.json").write_text(json.dumps(
            {"half": half, "operations": HALVES[half], "step": run.teacher_step,
             "sft_curve": toy.curve_records(run.curve)}, indent=2))

    with toy.reproducible_build():
        return write_dir_atomically(root, fill)


def build_specialists(world: toy.World, progress: Progress | None = None) -> tuple[Path, dict[str, Path]]:
    """(the halves' data folder, half -> its specialist's folder), cached beside `world` (or shipped with it)."""
    data = halves_data(world)
    return data, {half: build_specialist(world, data, half, progress) for half in HALVES}


# --------------------------------------------------------------------------- the runs


def self_distillation_config(mode: str):
    """A demo run's config changed to self-distillation: the student reads the privileged prompt."""
    def adjust(cfg: TrainConfig) -> TrainConfig:
        return replace(cfg, teacher=TeacherSpec(model="self", self_mode=mode, prompt_template=PRIVILEGED))
    return adjust


def merged_config(specialists: dict[str, Path], data: Path, routed: bool):
    """A demo run's config changed to learn from both specialists on both halves' chains, measured
    on each half's test chains."""
    def adjust(cfg: TrainConfig) -> TrainConfig:
        members = [TeacherMember(name=half, model=str(path)) for half, path in specialists.items()]
        return replace(cfg, teacher=TeacherSpec(), data=DataConfig(path=str(data / "train.parquet")),
                       teachers=TeachersConfig(route_by="data_source" if routed else None, members=members),
                       eval=replace(cfg.eval, benchmarks=[str(data / f"test_{half}.parquet") for half in HALVES]))
    return adjust


def plain_sft(world: toy.World, s: DemoSettings, lr: float, seed: int, run_dir: Path, progress: Progress) -> dict:
    """The world's student fine-tuned on reference solutions of the training chains: the on-policy
    runs' steps and samples per step, the seq-KD baseline's learning rate and warm-up."""
    model, tokenizer = load_for_measure(world.student)
    examples = reference_examples(tokenizer, load_problems(str(world.train_path)))
    task = progress.add_task("plain SFT on reference solutions", total=s.steps)
    started = time.perf_counter()
    toy.sft(model, examples, steps=s.steps, batch_size=s.prompts_per_step * s.responses_per_prompt, lr=lr,
            pad_id=tokenizer.pad_token_id, seed=seed, warmup=max(1, s.steps // 20),
            callback=lambda step, loss: progress.update(task, completed=step))
    seconds = time.perf_counter() - started
    save_model_dir(run_dir / "final", model, tokenizer)
    return {"final": run_dir / "final", "train_seconds": seconds}


def _mean_costs(runs: list[dict]) -> dict:
    """{key: mean over seeds} of the runs' costs (None where a run has none)."""
    if not runs:
        return {}
    return {key: None if runs[0][key] is None else statistics.mean(r[key] for r in runs) for key in runs[0]}


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "per_seed": values,
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


@holding_out
def run_applications(s: DemoSettings, console: Console | None = None) -> dict:
    """Runs (a) and (b) for every seed; returns applications_results.json's content."""
    start = start_demo(s, console, APPLICATION_FILES)
    console, out, progress, world, started = start.console, start.out, start.progress, start.world, start.started
    with progress:
        data, specialists = build_specialists(world, progress)
    tuning, tuning_source = load_tuning(s.tuned, SHIPPED_TUNING, "oprd demo --tune", world)
    oprd = chosen_settings(tuning, "oprd", "oprd demo --tune")
    sft_lr = chosen_settings(tuning, "seq_kd", "oprd demo --tune").lr
    console.print(f"settings: OPRD {asdict(oprd)}, plain SFT lr {sft_lr:g}, from {tuning_source}")
    k = world.settings.eval_samples

    self_rows: dict[str, list[float]] = {}
    self_costs: dict[str, list[dict]] = {}
    merged_rows: dict[str, dict[str, list[float]]] = {}
    for seed in s.seed_list:
        def add(rows: dict, name: str, value) -> None:
            rows.setdefault(name, []).append(value)

        with progress:
            add(self_rows, "student", measure_model(world.student, world.test_path, world, seed, progress,
                                                    f"student seed {seed}")["accuracy"])
            sft = plain_sft(world, s, sft_lr, seed, s.out / "runs" / f"plain_sft-seed{seed}", progress)
            add(self_rows, "plain_sft", measure_model(sft["final"], world.test_path, world, seed, progress,
                                                      f"plain SFT seed {seed}")["accuracy"])
            add(self_costs, "plain_sft", {"train_seconds": sft["train_seconds"], "teacher_bytes": None})
        for mode in SELF_MODES:
            name = f"self_{mode}"
            console.rule(f"[bold](a) self-distillation, {mode} teacher, seed {seed}")
            run_dir = s.out / "runs" / f"{name}-seed{seed}"
            run = run_on_policy("oprd", oprd, world, s, seed, run_dir, console, adjust=self_distillation_config(mode))
            add(self_rows, name, last_evaluation(run, k)["accuracy"])
            memory = json.loads((run_dir / "teachers.json").read_text())["self"]
            add(self_costs, name, {"train_seconds": run["train_seconds"], "teacher_bytes": memory["bytes"]})

        by_half: dict[str, dict[str, float]] = {}
        with progress:
            for name, path in (("student", world.student), *((f"teacher_{h}", p) for h, p in specialists.items())):
                by_half[name] = {half: measure_model(path, data / f"test_{half}.parquet", world, seed, progress,
                                                     f"{name} on {half}, seed {seed}")["accuracy"] for half in HALVES}
        for routed in (True, False):
            name = "merged_routed" if routed else "merged_averaged"
            console.rule(f"[bold](b) {name}, seed {seed}")
            run = run_on_policy("oprd", oprd, world, s, seed, s.out / "runs" / f"{name}-seed{seed}", console,
                                adjust=merged_config(specialists, data, routed))
            by_half[name] = {half: last_evaluation(run, k, f"test_{half}")["accuracy"] for half in HALVES}
        for name, accuracies in by_half.items():
            row = merged_rows.setdefault(name, {})
            for half, accuracy in accuracies.items():
                row.setdefault(half, []).append(accuracy)
            row.setdefault("whole", []).append(statistics.mean(accuracies.values()))  # the halves are equal in size

    payload = {
        "wall_seconds": time.perf_counter() - started,
        "seeds": s.seed_list,
        "k": k,
        "world": {"cache": str(world.root), "teacher": world.info["teacher"], "student": world.info["student"]},
        "settings_source": tuning_source,
        "oprd_settings": asdict(oprd),
        "plain_sft_lr": sft_lr,
        "self_distillation": {
            "privileged_prompt": PRIVILEGED,
            "methods": {name: {**_summary(values), **_mean_costs(self_costs.get(name, []))}
                        for name, values in self_rows.items()},
        },
        "multi_teacher": {
            "halves": HALVES,
            "specialists": {half: json.loads((path / "specialist.json").read_text()) | {"path": str(path)}
                            for half, path in specialists.items()},
            "models": {name: {part: _summary(values) for part, values in row.items()}
                       for name, row in merged_rows.items()},
        },
    }
    (out / "applications_results.json").write_text(json.dumps(payload, indent=2))
    (out / "settings.json").write_text(json.dumps({**asdict(s), "out": str(s.out)}, indent=2, default=str))
    plot(payload, out / "applications.png")
    (out / "applications_report.md").write_text(report(payload))
    print_table(console, "(a) self-distillation, test Avg@k", *self_rows_table(payload))
    print_table(console, "(b) two teachers in one student, test Avg@k", *merged_rows_table(payload))
    console.print(f"wall clock {payload['wall_seconds']:.0f} s; results in {out}")
    return payload


# --------------------------------------------------------------------------- tables, plot, report


def _cell(summary: dict) -> str:
    spread = f" ± {100 * summary['sd']:.1f}" if len(summary["per_seed"]) > 1 else ""
    return f"{100 * summary['mean']:.1f}{spread}"


def self_rows_table(payload: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[name, _cell(m), "-" if m.get("train_seconds") is None else f"{m['train_seconds']:.0f}",
             "-" if m.get("teacher_bytes") is None else f"{m['teacher_bytes'] / 2**20:.2f}"]
            for name, m in payload["self_distillation"]["methods"].items()]
    return ["model", f"Avg@{payload['k']}", "train s", "teacher MiB of its own"], rows


def merged_rows_table(payload: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[name, _cell(m["whole"]), *(_cell(m[half]) for half in HALVES)]
            for name, m in payload["multi_teacher"]["models"].items()]
    return ["model", "whole test set", *(f"{half} chains" for half in HALVES)], rows


def plot(payload: dict, path: Path) -> None:
    """Bars of the mean accuracy over seeds (error bars: sd), for (a) and (b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    methods = payload["self_distillation"]["methods"]
    left.bar(list(methods), [100 * m["mean"] for m in methods.values()],
             yerr=[100 * m["sd"] for m in methods.values()], color="tab:blue")
    left.set_title("(a) self-distillation (privileged: the answer)")
    models = payload["multi_teacher"]["models"]
    width = 0.27
    for i, part in enumerate(("whole", *HALVES)):
        right.bar([x + (i - 1) * width for x in range(len(models))], [100 * m[part]["mean"] for m in models.values()],
                  width, yerr=[100 * m[part]["sd"] for m in models.values()], label=part)
    right.set_xticks(range(len(models)), list(models), rotation=20)
    right.set_title("(b) two teachers in one student")
    right.legend()
    for axis in (left, right):
        axis.set_ylabel(f"test Avg@{payload['k']} (%)")
        axis.set_ylim(0, 100)
    left.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(payload: dict) -> str:
    seeds = ", ".join(map(str, payload["seeds"]))
    lines = [
        "# oprd demo --applications",
        "",
        f"Toy world {payload['world']['cache']}; seeds {seeds}; test Avg@{payload['k']} under the toy's protocol "
        "(mean ± sd over seeds). OPRD settings "
        f"{payload['oprd_settings']} from {payload['settings_source']} (tuned for the world's teacher, not again "
        f"here); plain SFT at lr {payload['plain_sft_lr']:g}.",
        "",
        f"## (a) Self-distillation: the teacher reads `{payload['self_distillation']['privileged_prompt']}`",
        "",
        *markdown_table(*self_rows_table(payload)),
        "",
        "## (b) Two teachers, each fine-tuned from the student on one half of the operations, in one student",
        "",
        *markdown_table(*merged_rows_table(payload)),
        "",
        "Specialists (SFT steps to the teacher target on their own half): "
        + ", ".join(f"{half} ({s['operations']}) step {s['step']}"
                    for half, s in payload["multi_teacher"]["specialists"].items()) + ".",
        "",
        software_versions(),
        "",
    ]
    return "\n".join(lines)
