"""`oprd demo --bridge`: the paper's OPRD-Bridge experiments (Tables 4-6) in miniature, on a CPU.

The student is the toy world's (`oprd.toy`, 4 x 64, byte-level BPE); three teachers of the same
task are trained beside it (`toy.BRIDGE_TEACHERS`):
  cross_arch       6 x 96: deeper and wider. OPD top-1 applies (same tokenizer), OPRD-Vanilla does not.
  cross_tokenizer  a character-level tokenizer: no OPD; positions matched by character offsets.
  cross_init       the student's architecture from another random initialisation: the case where a
                   feasibility trial saw OPRD-Vanilla collapse.
Top to bottom: Stage 1 rows once per pair (`bridge_fit.collect_bridge_rows`); on cross_arch the
rank sweep, whose choice of rank (`stage2_rank`) is used for every Stage 2 bridge; Stage 2 runs through
`oprd.trainer.train` with the same steps, rollouts, lr and seed as `oprd demo`; every model
evaluated on the held-out problems (Avg@k, Best@k, Dist-4g, Avg Len). Writes bridge_results.json,
bridge_report.md and the sweep's table and plot under sweep/.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers.utils import logging as hf_logging

from oprd import toy
from oprd.bridge import save_bridge
from oprd.bridge_fit import FitSettings, collect_bridge_rows, fit_from_rows, sweep_ranks
from oprd.demo import DemoSettings, evaluate_model, max_response_tokens, run_on_policy, software_versions

RANKS = (1, 2, 4, 8, 16, 32, 64)
REPORTED = ("accuracy", "best_at_k", "dist_4g", "avg_len")


def stage1_settings(world: toy.World, teacher: Path, s: DemoSettings) -> FitSettings:
    return FitSettings(
        student=str(world.student), teacher=str(teacher), data=str(world.train_path),
        prompts=16 if s.quick else 64, responses_per_prompt=2, max_new_tokens=max_response_tokens(world),
        batch_prompts=16, max_rows=20_000, seed=s.seed, device="cpu",
    )


def stage2_rank(sweep: list[dict], tolerance: float = 0.01) -> int:
    """The largest rank whose held-out cosine is within `tolerance` of the sweep's best: at nearly
    equal fit, more directions carry more of the teacher's state."""
    best = max(r["cos_after"] for r in sweep)
    return max(r["rank"] for r in sweep if r["cos_after"] >= best - tolerance)


def stage2(name: str, method: str, world: toy.World, teacher: Path, s: DemoSettings, console: Console,
           progress: Progress, extra: list[str]) -> dict:
    """One on-policy run against `teacher`, evaluated; its record for bridge_results.json."""
    console.rule(f"[bold]{name}")
    run = run_on_policy(method, world, s, console, [f"teacher.model={teacher}", "eval_every=0", *extra], name=name)
    with progress:
        result = evaluate_model(run["final"], world, s, progress, name)
    records = [r for r in run["curve"] if "loss" in r]
    result["train_seconds"] = run["train_seconds"]
    if records and "align/matched_share" in records[0]:
        result["matched_position_share"] = sum(r["align/matched_share"] for r in records) / len(records)
    preflight = s.out / "runs" / name / "preflight.json"
    if preflight.is_file():
        result["preflight_cosine_by_layer"] = json.loads(preflight.read_text())["cosine_by_layer"]
    return result


def run_bridge_demo(s: DemoSettings, console: Console | None = None) -> dict:
    """Runs the three pairs; returns bridge_results.json's content."""
    console = console or Console(stderr=True)
    out = Path(s.out)
    if out.exists() and any(out.iterdir()) and not s.overwrite:
        raise FileExistsError(f"{out} is not empty: pass --overwrite to replace it or choose another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    with progress:
        world = toy.build_world(toy.QUICK_WORLD if s.quick else toy.WorldSettings(seed=s.seed), progress)
        teachers = {name: toy.build_teacher(world, name, *_quick_recipe(name, s), progress=progress)
                    for name in toy.BRIDGE_TEACHERS}
        student = evaluate_model(world.student, world, s, progress, "student")
    bridges = out / "bridges"
    bridges.mkdir()
    oprd = ["oprd.normalize=true"]  # the bridge loss compares L2-normalised projections

    # cross-architecture: the rank sweep, then Stage 2 at its best held-out rank
    console.rule("[bold]cross_arch: Stage 1 rank sweep")
    settings = stage1_settings(world, teachers["cross_arch"], s)
    rows, info = collect_bridge_rows(settings)
    widest = min(min(a.shape[1], b.shape[1]) for a, b in rows.values())
    sweep = sweep_ranks(rows, [r for r in RANKS if r <= widest], settings, info, out / "sweep")
    best = stage2_rank(sweep)
    arch_bridge = out / "sweep" / f"bridge-r{best}.safetensors"
    half = max(s.steps // 2, 1)
    with progress:
        arch_teacher = evaluate_model(teachers["cross_arch"], world, s, progress, "cross_arch teacher")
    cross_arch = {
        "teacher": arch_teacher, "student": student,
        "oprd_bridge": stage2("cross_arch_oprd_bridge", "oprd", world, teachers["cross_arch"], s, console, progress,
                              oprd + [f"bridge.path={arch_bridge}"]),
        "opd_top1": stage2("cross_arch_opd_top1", "opd_top1", world, teachers["cross_arch"], s, console, progress, []),
        "bridge_then_opd": stage2(
            "cross_arch_bridge_then_opd", "opd_top1_plus_oprd", world, teachers["cross_arch"], s, console, progress,
            oprd + [f"bridge.path={arch_bridge}", f"oprd.stop_step={half}", f"opd.start_step={half}"]),
    }

    # cross-tokenizer and cross-initialisation: one bridge each, at the same rank
    fitted = {}
    for name in ("cross_tokenizer", "cross_init"):
        console.rule(f"[bold]{name}: Stage 1 (rank {best})")
        settings = stage1_settings(world, teachers[name], s)
        rows, info = collect_bridge_rows(settings)
        bridge = fit_from_rows(rows, best, settings, info)
        save_bridge(bridge, bridges / f"{name}-r{best}.safetensors")
        fitted[name] = bridge.metadata
    with progress:
        token_teacher = evaluate_model(teachers["cross_tokenizer"], world, s, progress, "cross_tokenizer teacher")
        init_teacher = evaluate_model(teachers["cross_init"], world, s, progress, "cross_init teacher")
    cross_tokenizer = {
        "teacher": token_teacher, "student": student,
        "oprd_bridge": stage2("cross_tokenizer_oprd_bridge", "oprd", world, teachers["cross_tokenizer"], s, console,
                              progress, oprd + [f"bridge.path={bridges / f'cross_tokenizer-r{best}.safetensors'}"]),
        "matched_position_share": fitted["cross_tokenizer"]["matched_position_share"],
    }
    cross_init = {
        "teacher": init_teacher, "student": student,
        "oprd_vanilla": stage2("cross_init_oprd_vanilla", "oprd", world, teachers["cross_init"], s, console, progress,
                               []),
        "oprd_bridge": stage2("cross_init_oprd_bridge", "oprd", world, teachers["cross_init"], s, console, progress,
                              oprd + [f"bridge.path={bridges / f'cross_init-r{best}.safetensors'}"]),
    }
    payload = {
        "rank_sweep": [{k: r[k] for k in ("rank", "cos_before", "cos_after")} for r in sweep],
        "stage2_rank": best,
        "cross_arch": cross_arch,
        "cross_tokenizer": cross_tokenizer,
        "cross_init": cross_init,
        "stage1_cosine": {"cross_arch": next(r for r in sweep if r["rank"] == best)["cos_after"],
                          **{name: meta["cos_after"] for name, meta in fitted.items()}},
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "bridge_results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "settings.json").write_text(json.dumps(
        {**asdict(s), "out": str(s.out), "world": str(world.root), "teachers": {k: str(v) for k, v in teachers.items()},
         "teacher_recipes": {k: [asdict(r), kind] for k, (r, kind) in toy.BRIDGE_TEACHERS.items()}},
        indent=2, default=str))
    (out / "bridge_report.md").write_text(bridge_report(payload, s))
    console.print(bridge_report(payload, s))
    return payload


def _quick_recipe(name: str, s: DemoSettings):
    """The full recipe, or for --quick a few SFT steps of a smaller teacher (a smoke test of the pipeline)."""
    recipe, kind = toy.BRIDGE_TEACHERS[name]
    if not s.quick:
        return recipe, kind
    from dataclasses import replace

    return replace(recipe, hidden_size=recipe.hidden_size // 2, intermediate_size=64,
                   num_layers=max(2, recipe.num_layers - 3), steps=30), kind


def _row(label: str, m: dict) -> str:
    return (f"| {label} | {100 * m['accuracy']:.1f} | {100 * m['best_at_k']:.1f} | {m['dist_4g']:.3f} | "
            f"{m['avg_len']:.1f} |")


def bridge_report(payload: dict, s: DemoSettings) -> str:
    k = s.eval_samples
    lines = ["# OPRD-Bridge on the toy world", "",
             f"`oprd demo --bridge{' --quick' if s.quick else ''}`: {s.steps} steps x {s.prompts_per_step} prompts x "
             f"{s.responses_per_prompt} responses, lr {s.lr}, seed {s.seed}; wall clock "
             f"{payload['wall_seconds']:.0f} s. Software: {software_versions()}.", "",
             "## Stage 1 rank sweep (cross_arch: 4x64 student, 6x96 teacher)", "",
             "| rank | held-out cos before | after |", "|---|---|---|"]
    lines += [f"| {r['rank']} | {r['cos_before']:.3f} | {r['cos_after']:.3f} |" for r in payload["rank_sweep"]]
    lines += ["", f"Stage 2 uses rank {payload['stage2_rank']}: the largest within 0.01 of the best held-out cosine."]
    for pair in ("cross_arch", "cross_tokenizer", "cross_init"):
        result = payload[pair]
        lines += ["", f"## {pair}", "", f"| model | Avg@{k} | Best@{k} | Dist-4g | Avg Len |", "|---|---|---|---|---|"]
        lines += [_row(name, m) for name, m in result.items() if isinstance(m, dict)]
        if "matched_position_share" in result:
            lines += ["", f"Matched position share (Stage 1 rollouts): {result['matched_position_share']:.3f}."]
    return "\n".join(lines) + "\n"
