"""`oprd demo --bridge`: the paper's OPRD-Bridge experiments (Tables 4-6) in miniature, on a CPU.

The student is the toy world's (`oprd.experiments.toy`, 4 x 64, byte-level BPE); three teachers of the same
task are trained beside it (`toy.BRIDGE_TEACHERS`):
  cross_arch       6 x 96: deeper and wider. OPD top-1 applies (same tokenizer), OPRD-Vanilla does not.
  cross_tokenizer  a character-level tokenizer: no OPD; positions matched by character offsets.
  cross_init       the student's architecture from another random initialisation: the case where a
                   feasibility trial saw OPRD-Vanilla collapse.
Top to bottom: Stage 1 rows once per pair (`bridge.stage1.stage1_rows`); on cross_arch the
rank sweep on unit-RMS states (the default, `oprd.bridge.projector` notes) and, for comparison, on
raw states (the paper's recipe as written); Stage 2 on cross_arch at three ranks (`stage2_ranks`),
then every other Stage 2 run with the widest bridge. Stage 2 runs through `oprd.trainer.train` with
the same steps, rollouts, lr and seed as `oprd demo`; every model is evaluated on the held-out
problems (Avg@k, Best@k, Dist-4g, Avg Len). Writes bridge_results.json, bridge_report.md and the
sweeps' tables and plots under sweep/ and sweep_raw_states/.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers.utils import logging as hf_logging

from oprd.bridge import save_bridge
from oprd.bridge.stage1 import Stage1Settings, fit_bridge_at_rank, stage1_rows
from oprd.config import BridgeConfig, TrainConfig
from oprd.display import markdown_table, progress_bar
from oprd.experiments import toy
from oprd.experiments.bridge_sweep import sweep_ranks
from oprd.experiments.demo import DemoSettings, evaluate_model, max_response_tokens, run_on_policy, software_versions
from oprd.files import prepare_output_dir

RANKS = (1, 2, 4, 8, 16, 32, 64)
PAPER_RANK = 8  # the paper's cross-architecture bridge
REPORTED = ("accuracy", "best_at_k", "dist_4g", "avg_len")
BRIDGE_DEMO_FILES = ("bridge_results.json", "settings.json", "bridge_report.md", "runs", "bridges", "sweep",
                     "sweep_raw_states")  # what --overwrite may replace


def stage1_settings(world: toy.World, teacher: Path, s: DemoSettings) -> Stage1Settings:
    return Stage1Settings(
        student=str(world.student), teacher=str(teacher), data=str(world.train_path),
        prompts=16 if s.quick else 256, responses_per_prompt=2, max_new_tokens=max_response_tokens(world),
        batch_prompts=16, max_rows=20_000, seed=s.seed, device="cpu",
    )


def stage2_ranks(sweep: list[dict]) -> list[int]:
    """The ranks cross_arch's Stage 2 runs at: the best held-out Stage 1 cosine, the paper's rank and the
    widest of the sweep. Stage 1 cosine falls with rank while a wider bridge carries more of the
    teacher's state; the Stage 2 runs show which matters for the student."""
    widest = max(r["rank"] for r in sweep)
    return sorted({max(sweep, key=lambda r: r["cos_after"])["rank"], min(PAPER_RANK, widest), widest})


def against(teacher: Path, bridge: Path | None = None, switch_at: int | None = None):
    """The change to a demo config for a run against `teacher`: through `bridge` when given (whose
    loss compares L2-normalised projections), and OPRD up to step `switch_at`, OPD after it."""

    def adjust(cfg: TrainConfig) -> TrainConfig:
        cfg = replace(cfg, eval_every=0, teacher=replace(cfg.teacher, model=str(teacher)))
        if bridge is not None:
            cfg = replace(cfg, bridge=BridgeConfig(path=str(bridge)), oprd=replace(cfg.oprd, normalize=True))
        if switch_at is not None:
            cfg = replace(cfg, oprd=replace(cfg.oprd, stop_step=switch_at), opd=replace(cfg.opd, start_step=switch_at))
        return cfg

    return adjust


def stage2(name: str, method: str, world: toy.World, s: DemoSettings, console: Console, progress: Progress,
           adjust) -> dict:
    """One on-policy run (its config changed by `adjust`, see `against`), evaluated; its record for
    bridge_results.json."""
    console.rule(f"[bold]{name}")
    run = run_on_policy(method, world, s, console, name=name, adjust=adjust)
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
    out = prepare_output_dir(Path(s.out), overwrite=s.overwrite, overwrite_flag="--overwrite", ours=BRIDGE_DEMO_FILES)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    progress = progress_bar(console)
    with progress:
        world = toy.build_world(toy.QUICK_WORLD if s.quick else toy.WorldSettings(seed=s.seed), progress)
        teachers = {name: toy.build_teacher(world, name, *_quick_recipe(name, s), progress=progress)
                    for name in toy.BRIDGE_TEACHERS}
        student = evaluate_model(world.student, world, s, progress, "student")
    bridges = out / "bridges"
    bridges.mkdir()

    # cross-architecture: the rank sweep, then Stage 2 at a few ranks
    console.rule("[bold]cross_arch: Stage 1 rank sweep")
    arch = teachers["cross_arch"]
    settings = stage1_settings(world, arch, s)
    rows, info = stage1_rows(settings)
    widest = min(min(a.shape[1], b.shape[1]) for a, b in rows.values())
    ranks = [r for r in RANKS if r <= widest]
    sweep = sweep_ranks(rows, ranks, settings, info, out / "sweep")
    raw_sweep = sweep_ranks(rows, ranks, replace(settings, normalize_states=False), info, out / "sweep_raw_states")
    # Stage 2 at a few ranks; every other Stage 2 run uses the widest bridge (README: accuracy rises with rank)
    by_rank = {r: stage2(f"cross_arch_oprd_bridge_r{r}", "oprd", world, s, console, progress,
                         against(arch, out / "sweep" / f"bridge-r{r}.safetensors"))
               for r in stage2_ranks(sweep)}
    used = max(by_rank)  # the widest
    raw_stage2 = stage2(f"cross_arch_oprd_bridge_raw_states_r{used}", "oprd", world, s, console, progress,
                        against(arch, out / "sweep_raw_states" / f"bridge-r{used}.safetensors"))
    arch_bridge = out / "sweep" / f"bridge-r{used}.safetensors"
    half = max(s.steps // 2, 1)
    with progress:
        arch_teacher = evaluate_model(arch, world, s, progress, "cross_arch teacher")
    cross_arch = {
        "teacher": arch_teacher, "student": student,
        "oprd_bridge": by_rank[used],
        "opd_top1": stage2("cross_arch_opd_top1", "opd_top1", world, s, console, progress, against(arch)),
        "bridge_then_opd": stage2("cross_arch_bridge_then_opd", "opd_top1_plus_oprd", world, s, console, progress,
                                  against(arch, arch_bridge, switch_at=half)),
    }

    # cross-tokenizer and cross-initialisation: one bridge each, at the same rank
    fitted = {}
    for name in ("cross_tokenizer", "cross_init"):
        console.rule(f"[bold]{name}: Stage 1 (rank {used})")
        settings = stage1_settings(world, teachers[name], s)
        rows, info = stage1_rows(settings)
        bridge = fit_bridge_at_rank(rows, used, settings, info)
        save_bridge(bridge, bridges / f"{name}-r{used}.safetensors")
        fitted[name] = bridge.metadata
    with progress:
        token_teacher = evaluate_model(teachers["cross_tokenizer"], world, s, progress, "cross_tokenizer teacher")
        init_teacher = evaluate_model(teachers["cross_init"], world, s, progress, "cross_init teacher")
    cross_tokenizer = {
        "teacher": token_teacher, "student": student,
        "oprd_bridge": stage2("cross_tokenizer_oprd_bridge", "oprd", world, s, console, progress,
                              against(teachers["cross_tokenizer"], bridges / f"cross_tokenizer-r{used}.safetensors")),
        "matched_position_share": fitted["cross_tokenizer"]["matched_position_share"],
    }
    cross_init = {
        "teacher": init_teacher, "student": student,
        "oprd_vanilla": stage2("cross_init_oprd_vanilla", "oprd", world, s, console, progress,
                               against(teachers["cross_init"])),
        "oprd_bridge": stage2("cross_init_oprd_bridge", "oprd", world, s, console, progress,
                              against(teachers["cross_init"], bridges / f"cross_init-r{used}.safetensors")),
    }
    cosine, raw_cosine = ({r["rank"]: r["cos_after"] for r in table} for table in (sweep, raw_sweep))
    payload = {
        "rank_sweep": [{k: r[k] for k in ("rank", "cos_before", "cos_after")} for r in sweep],
        "rank_sweep_raw_states": [{k: r[k] for k in ("rank", "cos_before", "cos_after")} for r in raw_sweep],
        "stage2_rank": used,
        "stage2_rank_sweep": [{"rank": r, "cos_after": cosine[r],
                               **{k: m[k] for k in REPORTED}} for r, m in by_rank.items()],
        "stage2_raw_states": {"rank": used, "cos_after": raw_cosine[used],
                              **{k: raw_stage2[k] for k in REPORTED}},
        "cross_arch": cross_arch,
        "cross_tokenizer": cross_tokenizer,
        "cross_init": cross_init,
        "stage1_cosine": {"cross_arch": cosine[used],
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
    return replace(recipe, hidden_size=recipe.hidden_size // 2, intermediate_size=64,
                   num_layers=max(2, recipe.num_layers - 3), steps=30), kind


def _cells(m: dict) -> list[str]:
    return [f"{100 * m['accuracy']:.1f}", f"{100 * m['best_at_k']:.1f}", f"{m['dist_4g']:.3f}", f"{m['avg_len']:.1f}"]


def bridge_report(payload: dict, s: DemoSettings) -> str:
    k = s.eval_samples
    lines = ["# OPRD-Bridge on the toy world", "",
             f"`oprd demo --bridge{' --quick' if s.quick else ''}`: {s.steps} steps x {s.prompts_per_step} prompts x "
             f"{s.responses_per_prompt} responses, lr {s.lr}, seed {s.seed}; wall clock "
             f"{payload['wall_seconds']:.0f} s. Software: {software_versions()}.", "",
             "## Stage 1 rank sweep (cross_arch: 4x64 student, 6x96 teacher)", "",
             "Held-out cosine of the projected states, mean over the 4 layer pairs. Unit-RMS states are the default;",
             "raw states are the paper's recipe as written (`--raw-states`).", "",
             *markdown_table(["rank", "before (random P_S)", "after", "after, raw states"],
                             ([r["rank"], f"{r['cos_before']:.3f}", f"{r['cos_after']:.3f}", f"{raw['cos_after']:.3f}"]
                              for r, raw in zip(payload["rank_sweep"], payload["rank_sweep_raw_states"])))]
    runs = [(str(r["rank"]), r) for r in payload["stage2_rank_sweep"]]
    runs.append((f"{payload['stage2_raw_states']['rank']}, raw states", payload["stage2_raw_states"]))
    lines += ["", "## Stage 2 by rank (cross_arch, OPRD-Bridge)", "",
              *markdown_table(["rank", "Stage 1 held-out cos", f"Avg@{k}", f"Best@{k}", "Dist-4g", "Avg Len"],
                              ([label, f"{r['cos_after']:.3f}", *_cells(r)] for label, r in runs))]
    lines += ["", f"Every other Stage 2 run uses rank {payload['stage2_rank']}, the widest of the sweep."]
    for pair in ("cross_arch", "cross_tokenizer", "cross_init"):
        result = payload[pair]
        lines += ["", f"## {pair}", "",
                  *markdown_table(["model", f"Avg@{k}", f"Best@{k}", "Dist-4g", "Avg Len"],
                                  ([name, *_cells(m)] for name, m in result.items() if isinstance(m, dict)))]
        if "matched_position_share" in result:
            lines += ["", f"Matched position share (Stage 1 rollouts): {result['matched_position_share']:.3f}."]
    return "\n".join(lines) + "\n"
