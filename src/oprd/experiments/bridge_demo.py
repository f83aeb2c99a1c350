"""`oprd demo --bridge`: the paper's OPRD-Bridge experiments (Tables 4-6) in miniature, on a CPU.

The student is the toy world's (`oprd.experiments.toy`, 4 x 64, byte-level BPE); three teachers of the same
task are trained beside it to the world's teacher target (`toy.BRIDGE_TEACHERS`):
  cross_arch       6 x 96: deeper and wider. OPD top-1 applies (same tokenizer), OPRD-Vanilla does not.
  cross_tokenizer  a character-level tokenizer: no OPD; positions matched by character offsets.
  cross_init       the student's architecture from another random initialisation: the case where a
                   feasibility trial saw OPRD-Vanilla collapse.
Top to bottom:
1. Stage 1 rows once per pair, from the student's rollouts at the first seed
   (`bridge.stage1.stage1_rows`); on cross_arch the rank sweep of the held-out Stage 1 cosine on
   unit-RMS states (the default, `oprd.bridge.projector` notes) and on raw states (the paper's recipe
   as written). Bridges are fitted per (pair, rank) as the runs need them.
2. Each Stage 2 method's settings, searched with `--tune` with the same budget as `oprd demo`
   (`demo.LEARNING_RATES` x two values of the method's own knob, `bridge_search`; for an
   OPRD-Bridge the knob is its rank: the paper's, or the widest), chosen on the validation split;
   otherwise the shipped `bridge_tuned.json` or `--tuned FILE`.
3. For every seed: every method of every pair through `oprd.trainer.train` (the demo's steps and
   rollouts), and cross_arch's OPRD-Bridge again on raw states; every model measured on the test
   split with the toy's protocol and the seed.
4. bridge_results.json (mean, per-seed accuracy and spread per model), bridge_report.md, the sweeps'
   tables and plots under sweep/ and sweep_raw_states/.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from oprd.bridge import save_bridge
from oprd.bridge.stage1 import PairedRows, Stage1Settings, fit_bridge_at_rank, stage1_rows
from oprd.config import BridgeConfig, TrainConfig
from oprd.display import markdown_table
from oprd.experiments import toy
from oprd.experiments.bridge_sweep import sweep_ranks
from oprd.experiments.demo import (
    LEARNING_RATES,
    SEARCH,
    DemoSettings,
    MethodSettings,
    aggregate,
    chosen_settings,
    knob_text,
    load_tuning,
    measure_model,
    run_on_policy,
    search,
    software_versions,
    start_demo,
)
from oprd.files import holding_out

RANKS = (1, 2, 4, 8, 16, 32, 64)
PAPER_RANK = {"cross_arch": 8, "cross_tokenizer": 4, "cross_init": 8}  # Tables 4-6; cross_init takes r = 8 too
SHIPPED_TUNING = "bridge_tuned.json"  # beside this module
MADE_BY = "oprd demo --bridge --tune"
BRIDGE_DEMO_FILES = ("bridge_results.json", "settings.json", "bridge_report.md", "bridge_tuned.json", "runs",
                     "tuning", "bridges", "sweep", "sweep_raw_states")  # what --overwrite may replace


@dataclass(frozen=True)
class StageTwo:
    """One Stage 2 method of a pair: the demo objective it trains with, through a bridge or not, and
    for Bridge -> OPD the switch to OPD top-1 halfway."""

    pair: str
    name: str
    objective: str  # a key of demo.ON_POLICY
    bridged: bool = False
    then_opd: bool = False
    raw_states: bool = False  # the bridge fitted on raw states (the paper's recipe as written)

    @property
    def key(self) -> str:
        return f"{self.pair}/{self.name}"


METHODS = (
    StageTwo("cross_arch", "opd_top1", "opd_top1"),
    StageTwo("cross_arch", "oprd_bridge", "oprd", bridged=True),
    StageTwo("cross_arch", "bridge_then_opd", "opd_top1_plus_oprd", bridged=True, then_opd=True),
    StageTwo("cross_tokenizer", "oprd_bridge", "oprd", bridged=True),
    StageTwo("cross_init", "oprd_vanilla", "oprd"),
    StageTwo("cross_init", "oprd_bridge", "oprd", bridged=True),
)
# cross_arch's OPRD-Bridge once more per seed, with its tuned settings, on a bridge fitted on raw states
RAW_STATES = StageTwo("cross_arch", "oprd_bridge_raw_states", "oprd", bridged=True, raw_states=True)
TUNED_LIKE = {RAW_STATES.key: "cross_arch/oprd_bridge"}
BY_KEY = {method.key: method for method in METHODS}


def bridge_search(method: StageTwo, widest: int) -> list[MethodSettings]:
    """The same budget as `oprd demo`: every learning rate with two values of the method's knob.
    An OPRD-Bridge's knob is its rank (the paper's, or the widest); the others keep the main demo's."""
    if method.bridged:
        knobs = ({"bridge_rank": PAPER_RANK[method.pair]}, {"bridge_rank": widest})
    else:
        knobs = SEARCH[method.objective]
    # the Bridge loss compares L2-normalised projections (the paper's Stage 2)
    fixed = {"oprd_normalize": True} if method.bridged else {}
    return [MethodSettings(lr=lr, **fixed, **knob) for lr in LEARNING_RATES for knob in knobs]


def stage1_settings(world: toy.World, teacher: Path, s: DemoSettings, normalize_states: bool = True) -> Stage1Settings:
    return Stage1Settings(
        student=str(world.student), teacher=str(teacher), data=str(world.train_path),
        prompts=16 if s.quick else 256, responses_per_prompt=2, max_new_tokens=world.settings.max_response_tokens,
        batch_prompts=16, max_rows=20_000, seed=s.seed, device="cpu", normalize_states=normalize_states,
    )


class Bridges:
    """Stage 1 rows once per pair, and one bridge file per (pair, rank, state form), fitted on first use."""

    def __init__(self, world: toy.World, teachers: dict[str, Path], s: DemoSettings, out: Path):
        self.world, self.teachers, self.s, self.out = world, teachers, s, out
        self.rows: dict[str, tuple[PairedRows, dict]] = {}
        self.fitted: dict[tuple[str, int, bool], dict] = {}

    def rows_of(self, pair: str) -> tuple[PairedRows, dict]:
        if pair not in self.rows:
            self.rows[pair] = stage1_rows(stage1_settings(self.world, self.teachers[pair], self.s))
        return self.rows[pair]

    def widest(self, pair: str) -> int:
        rows, _ = self.rows_of(pair)
        return min(min(a.shape[1], b.shape[1]) for a, b in rows.values())

    def path(self, pair: str, rank: int, raw_states: bool = False) -> Path:
        path = self.out / f"{pair}-r{rank}{'-raw-states' if raw_states else ''}.safetensors"
        if not path.exists():
            rows, info = self.rows_of(pair)
            settings = stage1_settings(self.world, self.teachers[pair], self.s, normalize_states=not raw_states)
            bridge = fit_bridge_at_rank(rows, rank, settings, info)
            save_bridge(bridge, path)
            self.fitted[(pair, rank, raw_states)] = bridge.metadata
        return path

    def metadata(self, pair: str, rank: int, raw_states: bool = False) -> dict:
        self.path(pair, rank, raw_states)
        return self.fitted[(pair, rank, raw_states)]


def train_stage2(method: StageTwo, settings: MethodSettings, world: toy.World, s: DemoSettings, seed: int,
                 teacher: Path, bridges: Bridges, run_dir: Path, console: Console) -> dict:
    """One Stage 2 run against `teacher` (through its bridge when the method is bridged; OPRD up to
    the halfway step, OPD after, for Bridge -> OPD)."""
    bridge = bridges.path(method.pair, settings.bridge_rank, method.raw_states) if method.bridged else None
    half = max(s.steps // 2, 1)

    def adjust(cfg: TrainConfig) -> TrainConfig:
        cfg = replace(cfg, teacher=replace(cfg.teacher, model=str(teacher)))
        if bridge is not None:
            cfg = replace(cfg, bridge=BridgeConfig(path=str(bridge)))
        if method.then_opd:
            cfg = replace(cfg, oprd=replace(cfg.oprd, stop_step=half), opd=replace(cfg.opd, start_step=half))
        return cfg

    run = run_on_policy(method.objective, settings, world, s, seed, run_dir, console, curve=False, adjust=adjust)
    records = [r for r in run["curve"] if "loss" in r]
    if records and "align/matched_share" in records[0]:
        run["matched_position_share"] = sum(r["align/matched_share"] for r in records) / len(records)
    preflight = run_dir / "preflight.json"
    if preflight.is_file():
        run["preflight_cosine_by_layer"] = json.loads(preflight.read_text())["cosine_by_layer"]
    return run


def tune(world: toy.World, teachers: dict[str, Path], bridges: Bridges, s: DemoSettings, console: Console,
         progress: Progress) -> dict:
    """The equal-budget search of every Stage 2 method on the validation split; bridge_tuned.json's content."""
    tuned = {}
    for method in METHODS:
        def train_one(settings: MethodSettings, run_dir: Path, method=method) -> dict:
            return train_stage2(method, settings, world, s, s.seed, teachers[method.pair], bridges, run_dir, console)

        candidates = bridge_search(method, bridges.widest(method.pair))
        tuned[method.key] = search(method.key, candidates, train_one,
                                   lambda i, method=method: s.out / "tuning" / method.pair / method.name / str(i),
                                   world, s, console, progress)
    return {"made_by": MADE_BY + (" --quick" if s.quick else ""), "world": world.root.name,
            "world_fingerprint": world.fingerprint,
            "grid": {"lr": list(LEARNING_RATES)}, "software": toy.software(), "methods": tuned}


@holding_out
def run_bridge_demo(s: DemoSettings, console: Console | None = None) -> dict:
    """Runs the three pairs; returns bridge_results.json's content."""
    start = start_demo(s, console, BRIDGE_DEMO_FILES)
    console, out, progress, world, started = start.console, start.out, start.progress, start.world, start.started
    with progress:
        teachers = build_teachers(world, s, progress)
    bridges = Bridges(world, teachers, s, out / "bridges")
    (out / "bridges").mkdir()

    console.rule("[bold]cross_arch: Stage 1 rank sweep")
    rows, info = bridges.rows_of("cross_arch")
    ranks = [r for r in RANKS if r <= bridges.widest("cross_arch")]
    settings = stage1_settings(world, teachers["cross_arch"], s)
    sweep = sweep_ranks(rows, ranks, settings, info, out / "sweep")
    raw_sweep = sweep_ranks(rows, ranks, replace(settings, normalize_states=False), info, out / "sweep_raw_states")

    if s.tune:
        tuning, source = tune(world, teachers, bridges, s, console, progress), "this run's --tune"
        (out / SHIPPED_TUNING).write_text(json.dumps(tuning, indent=2))
    else:
        tuning, source = load_tuning(s.tuned, SHIPPED_TUNING, MADE_BY, world)
    console.print(f"settings: {source}")
    runs = [*METHODS, RAW_STATES]
    settings_of = {method.key: chosen_settings(tuning, TUNED_LIKE.get(method.key, method.key), MADE_BY)
                   for method in runs}

    per_seed: dict[str, dict[int, dict]] = {pair: {} for pair in PAPER_RANK}
    extras: dict[str, dict[int, dict]] = {pair: {} for pair in PAPER_RANK}
    for seed in s.seed_list:
        for pair in PAPER_RANK:
            per_seed[pair][seed], extras[pair][seed] = {}, {}
            for name, path in (("teacher", teachers[pair]), ("student", world.student)):
                with progress:
                    per_seed[pair][seed][name] = measure_model(path, world.test_path, world, seed, progress,
                                                               f"{pair} {name} seed {seed}")
        for method in runs:
            console.rule(f"[bold]{method.key}, seed {seed}")
            run = train_stage2(method, settings_of[method.key], world, s, seed, teachers[method.pair], bridges,
                               s.out / "runs" / method.pair / f"{method.name}-seed{seed}", console)
            with progress:
                per_seed[method.pair][seed][method.name] = measure_model(
                    run["final"], world.test_path, world, seed, progress, f"{method.key} seed {seed}")
            extras[method.pair][seed][method.name] = run

    results = {}
    for pair in PAPER_RANK:
        names = ["teacher", "student", *(m.name for m in runs if m.pair == pair)]
        results[pair] = aggregate(per_seed[pair], extras[pair], names)
        for method in (m for m in runs if m.pair == pair):
            row, first = results[pair][method.name], extras[pair][s.seed_list[0]][method.name]
            row["settings"] = asdict(settings_of[method.key])
            for key in ("matched_position_share", "preflight_cosine_by_layer"):
                if key in first:
                    row[key] = first[key]
            if method.bridged:
                rank = settings_of[method.key].bridge_rank
                row["stage1_cosine"] = bridges.metadata(method.pair, rank, method.raw_states)["cos_after"]
    results["cross_tokenizer"]["matched_position_share"] = bridges.rows_of("cross_tokenizer")[1][
        "matched_position_share"]
    payload = {
        "seeds": s.seed_list,
        "rank_sweep": [{k: r[k] for k in ("rank", "cos_before", "cos_after")} for r in sweep],
        "rank_sweep_raw_states": [{k: r[k] for k in ("rank", "cos_before", "cos_after")} for r in raw_sweep],
        **results,
        "teachers": {pair: json.loads((path / "teacher.json").read_text()) for pair, path in teachers.items()},
        "tuning": tuning["methods"],
        "tuning_source": source,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "bridge_results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "settings.json").write_text(json.dumps(
        {**asdict(s), "out": str(s.out), "world": str(world.root), "teachers": {k: str(v) for k, v in teachers.items()},
         "teacher_recipes": {k: [asdict(r), kind] for k, (r, kind) in toy.BRIDGE_TEACHERS.items()}},
        indent=2, default=str))
    (out / "bridge_report.md").write_text(bridge_report(payload, s, world))
    console.print(bridge_report(payload, s, world))
    return payload


def build_teachers(world: toy.World, s: DemoSettings, progress: Progress | None = None) -> dict[str, Path]:
    """The bridge demo's teachers of `world` (cached beside it, or shipped with it): name -> folder."""
    return {name: toy.build_teacher(world, name, *_quick_recipe(name, s), progress=progress)
            for name in toy.BRIDGE_TEACHERS}


def _quick_recipe(name: str, s: DemoSettings):
    """The full recipe, or for --quick teachers for the quick world: cross_arch deeper and wider than
    its student, the other two the student's own shape (a smoke test of the pipeline)."""
    recipe, kind = toy.BRIDGE_TEACHERS[name]
    if not s.quick:
        return recipe, kind
    student = toy.QUICK_WORLD.model
    if name == "cross_arch":
        return replace(student, hidden_size=96, intermediate_size=192, num_layers=3,
                       max_steps=2 * student.max_steps), kind
    return replace(student, init_seed=recipe.init_seed, max_steps=2 * student.max_steps), kind


def _cells(m: dict) -> list[str]:
    spread = f"{100 * m['accuracy_std']:.1f}; {100 * m['accuracy_min']:.1f}-{100 * m['accuracy_max']:.1f}"
    return [f"{100 * m['accuracy']:.1f}", spread, f"{100 * m['best_at_k']:.1f}", f"{m['dist_4g']:.3f}",
            f"{m['avg_len']:.1f}"]


def bridge_report(payload: dict, s: DemoSettings, world: toy.World) -> str:
    k = world.settings.eval_samples
    lines = ["# OPRD-Bridge on the toy world", "",
             f"`oprd demo --bridge{' --quick' if s.quick else ''}`: seeds {', '.join(map(str, payload['seeds']))}; "
             f"{s.steps} steps x {s.prompts_per_step} prompts x {s.responses_per_prompt} responses per run; settings "
             f"from {payload['tuning_source']}; wall clock {payload['wall_seconds']:.0f} s. "
             f"Software: {software_versions()}.", "",
             "## Stage 1 rank sweep (cross_arch: 4x64 student, 6x96 teacher)", "",
             "Held-out cosine of the projected states, mean over the 4 layer pairs. Unit-RMS states are the default;",
             "raw states are the paper's recipe as written (`--raw-states`).", "",
             *markdown_table(["rank", "before (random P_S)", "after", "after, raw states"],
                             ([r["rank"], f"{r['cos_before']:.3f}", f"{r['cos_after']:.3f}", f"{raw['cos_after']:.3f}"]
                              for r, raw in zip(payload["rank_sweep"], payload["rank_sweep_raw_states"])))]
    header = ["model", f"Avg@{k} (mean)", "spread (sd; min-max)", f"Best@{k}", "Dist-4g", "Avg Len", "settings"]
    for pair in PAPER_RANK:
        result = payload[pair]
        teacher = payload["teachers"][pair]
        lines += ["", f"## {pair}", "",
                  f"Teacher: SFT step {teacher['step']}, validation {100 * teacher['validation_accuracy']:.1f}.", "",
                  *markdown_table(header, ([name, *_cells(m), _settings(f"{pair}/{name}", m.get("settings"))]
                                           for name, m in result.items() if isinstance(m, dict) and "accuracy" in m))]
        if "matched_position_share" in result:
            lines += ["", f"Matched position share (Stage 1 rollouts): {result['matched_position_share']:.3f}."]
    lines += ["", "## Tuning (validation split)", "",
              f"Every Stage 2 method: learning rates {', '.join(f'{lr:g}' for lr in LEARNING_RATES)} x two values of "
              "its knob (an OPRD-Bridge's rank; OPD top-1's clipping; OPRD-Vanilla's loss form), one run each at the "
              "first seed.", "",
              *markdown_table(["method", "setting", "validation Avg@k", "chosen"],
                              ([key, _settings(key, t["settings"]), f"{100 * t['validation_accuracy']:.1f}",
                                "yes" if t["settings"] == entry["chosen"] else ""]
                               for key, entry in payload["tuning"].items() for t in entry["tried"]))]
    return "\n".join(lines) + "\n"


def _settings(key: str, settings: dict | None) -> str:
    """lr and the method's knob, as tuned."""
    if not settings:
        return ""
    method = BY_KEY[TUNED_LIKE.get(key, key)]
    knobs = ({"bridge_rank": None},) if method.bridged else SEARCH[method.objective]
    return f"lr {settings['lr']:g}; {knob_text(knobs, settings)}"
