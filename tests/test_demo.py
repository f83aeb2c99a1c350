"""`oprd demo --quick` and `oprd demo --bridge --quick` end to end: results layout, seeds, curves that
agree with the table, the tuning's contract, report and plots (no timing asserts). They share one
toy-world cache, as a user's runs do."""

import json
import statistics

import pytest
import torch
from helpers import run_metrics
from rich.console import Console
from typer.testing import CliRunner

from oprd.bridge import load_bridge
from oprd.cli import app
from oprd.data import load_problems
from oprd.display import progress_bar
from oprd.experiments import demo, toy

METHODS = ("teacher", "student", "opd_top1", "opd_top16", "oprd", "opd_top1_plus_oprd", "seq_kd")
DISTILLED = METHODS[2:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--seeds", "2", "--theorem1"])
    assert result.exit_code == 0, result.output
    # not a terminal: finished progress lines are not repeated at later stages, and no method name is cut
    assert result.output.count("toy world:") == 1 and "…" not in result.output
    assert result.output.count("measure student seed 1:") == 1
    table = result.output[result.output.index("Test problems (Table 2 style)"):]
    for method in METHODS:
        assert f" {method} " in table, method

    payload = json.loads((out / "results.json").read_text())
    assert set(payload) == {"wall_seconds", "phase_seconds", "seeds", "world", "methods", "tuning", "tuning_source",
                            "theorem1"}
    assert set(payload["phase_seconds"]) == {"toy world", "teacher and student", *DISTILLED, "theorem 1"}
    assert payload["wall_seconds"] > 0 and payload["seeds"] == [0, 1]
    assert set(payload["methods"]) == set(METHODS)
    for name, metrics in payload["methods"].items():
        per_seed = metrics["accuracy_per_seed"]
        assert len(per_seed) == 2 and metrics["accuracy"] == pytest.approx(sum(per_seed) / 2)
        assert 0 <= metrics["accuracy"] <= metrics["best_at_k"] <= 1
        assert 0 <= metrics["dist_4g"] <= 1
        assert metrics["avg_len"] > 0
        if name in DISTILLED:
            assert metrics["train_seconds"] > 0
            assert metrics["steps"] == 4  # every method: the same steps (seq-KD too)
    # the curves run on the same problems, k and seed as the table: step 0 is the seed's student row,
    # the last step the method's row, which is what measuring the final model gives
    world = toy.build_world(toy.QUICK_WORLD)
    for method in ("oprd", "seq_kd"):
        again = demo.measure_model(out / "runs" / f"{method}-seed1" / "final", world.test_path, world, 1,
                                   progress_bar(Console(stderr=True)), "again")
        assert again["accuracy"] == payload["methods"][method]["accuracy_per_seed"][1], method
    student = payload["methods"]["student"]["accuracy_per_seed"]
    for method in DISTILLED[:-1]:
        for i, seed in enumerate(payload["seeds"]):
            records = run_metrics(out / "runs" / f"{method}-seed{seed}")
            curve = [r for r in records if "val/test/avg@2" in r]
            assert curve[0]["step"] == 0 and curve[0]["val/test/avg@2"] == student[i]
            assert curve[-1]["step"] == 4
            assert curve[-1]["val/test/avg@2"] == payload["methods"][method]["accuracy_per_seed"][i]
    # every trained method was searched with the same budget, and the chosen setting is one it tried
    tuning = payload["tuning"]
    assert "shipped" in payload["tuning_source"] and set(tuning) == set(DISTILLED)
    assert "not this one" in payload["tuning_source"]  # the shipped choice was tuned on the full world
    for method in DISTILLED:
        tried = tuning[method]["tried"]
        assert len(tried) == 2 * len(demo.LEARNING_RATES)
        assert tuning[method]["chosen"] in [t["settings"] for t in tried]
    theorem1 = payload["theorem1"]
    assert [c["step"] for c in theorem1["checkpoints"]] == [0, 1, 2, 3, 4]
    for checkpoint in theorem1["checkpoints"]:
        assert checkpoint["kl_per_token"] > 0
        assert set(checkpoint["gradients"]) == {"opd_top1", "opd_top16", "opd_full", "oprd"}
        assert all(g["variance"] > 0 and g["snr"] > 0 for g in checkpoint["gradients"].values())
    world = payload["world"]
    assert world["origin"] == "shipped" and world["teacher"]["step"] > world["student"]["step"]
    report = (out / "report.md").read_text()
    assert "Avg@" in report and "Tuning" in report and "Theorem 1" in report
    assert f"torch {torch.__version__}" in report  # what produced the numbers
    for png in ("accuracy_vs_step.png", "rep_cosine_vs_step.png", "response_length_vs_step.png", "theorem1.png"):
        assert (out / png).stat().st_size > 1000

    # a non-empty --out is refused without --overwrite
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 2


@pytest.mark.slow
def test_world_only_writes_the_chosen_checkpoints(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    result = CliRunner().invoke(app, ["demo", "--world-only", "--quick", "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    for name in ("teacher", "student"):
        assert {"step", "validation_accuracy", "test_accuracy"} <= set(world[name])
    assert world["teacher"]["validation_accuracy"] >= world["settings"]["teacher_target"]
    assert world["student"]["validation_accuracy"] <= world["settings"]["student_target"]
    assert [r["step"] for r in world["sft_curve"]][-1] == world["teacher"]["step"]


@pytest.mark.slow
def test_tuning_picks_by_validation_and_never_reads_the_test_split(tmp_path, monkeypatch, cache):
    """The search on a copy of the quick world without its test split: it still runs, and chooses
    the setting with the best validation score."""
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    world = toy.build_world(toy.QUICK_WORLD)
    copy = tmp_path / "world"
    copy.mkdir()
    for item in world.root.iterdir():
        if item.name != "test.parquet":
            (copy / item.name).symlink_to(item)
    monkeypatch.setattr(demo, "LEARNING_RATES", (3e-3,))
    s = demo.DemoSettings.quick_run(tmp_path / "out", methods=["oprd", "seq_kd"])
    (tmp_path / "out").mkdir()
    progress = progress_bar(Console(stderr=True))
    tuned = demo.tune(toy.World(copy, world.settings, world.info), s, Console(stderr=True), progress)
    for method in ("oprd", "seq_kd"):
        tried = tuned["methods"][method]["tried"]
        assert len(tried) == 2
        best = max(tried, key=lambda t: t["validation_accuracy"])
        assert tuned["methods"][method]["chosen"] == best["settings"]


def test_pick_best_takes_the_highest_validation_score_and_the_earliest_on_ties():
    tried = [{"validation_accuracy": a} for a in (0.2, 0.5, 0.1, 0.5)]
    assert demo.pick_best(tried) == 1
    assert demo.pick_best([{"validation_accuracy": 0.3}]) == 0


def test_seeds_aggregate_into_mean_spread_and_gap_closed():
    def m(accuracy):
        return {"accuracy": accuracy, "best_at_k": accuracy, "dist_4g": 0.5, "avg_len": 10.0,
                "format_error_rate": 0.0, "k": 4}

    per_seed = {
        0: {"teacher": m(0.9), "student": m(0.1), "oprd": m(0.5)},
        1: {"teacher": m(0.8), "student": m(0.2), "oprd": m(0.8)},
    }
    costs = {"train_seconds": 2.0, "update_seconds_per_step": 0.1, "rollout_seconds_per_step": 0.2,
             "peak_memory_delta_bytes": 10, "steps": 4}
    extras = {0: {"oprd": costs}, 1: {"oprd": {**costs, "train_seconds": 4.0}}}
    out = demo.aggregate(per_seed, extras, ["teacher", "student", "oprd"])
    assert out["oprd"]["accuracy"] == pytest.approx(0.65)
    assert out["oprd"]["accuracy_per_seed"] == [0.5, 0.8]
    assert out["oprd"]["accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.8]))
    assert (out["oprd"]["accuracy_min"], out["oprd"]["accuracy_max"]) == (0.5, 0.8)
    assert out["oprd"]["gap_closed_per_seed"] == pytest.approx([0.5, 1.0])  # each seed against its own rows
    assert out["oprd"]["gap_closed"] == pytest.approx(0.75)
    assert out["oprd"]["train_seconds"] == pytest.approx(3.0)
    assert out["teacher"]["accuracy"] == pytest.approx(0.85) and "gap_closed" not in out["teacher"]


@pytest.mark.slow
def test_bridge_demo_quick_end_to_end(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    out = tmp_path / "bridge"
    result = CliRunner().invoke(app, ["demo", "--bridge", "--quick", "--out", str(out), "--seeds", "2"])
    assert result.exit_code == 0, result.output

    payload = json.loads((out / "bridge_results.json").read_text())
    assert payload["seeds"] == [0, 1]
    sweep = payload["rank_sweep"]
    assert [r["rank"] for r in sweep] == [1, 2, 4, 8, 16, 32, 64]  # up to the quick student's width
    raw_sweep = payload["rank_sweep_raw_states"]  # the paper's recipe as written, on the same rows
    assert [r["rank"] for r in raw_sweep] == [r["rank"] for r in sweep]
    for row in sweep + raw_sweep:
        assert -1 <= row["cos_before"] <= 1 and -1 <= row["cos_after"] <= 1
    assert load_bridge(out / "sweep" / "bridge-r4.safetensors").normalize_states
    assert not load_bridge(out / "sweep_raw_states" / "bridge-r4.safetensors").normalize_states
    expected = {
        "cross_arch": {"teacher", "student", "opd_top1", "oprd_bridge", "bridge_then_opd", "oprd_bridge_raw_states"},
        "cross_tokenizer": {"teacher", "student", "oprd_bridge"},
        "cross_init": {"teacher", "student", "oprd_vanilla", "oprd_bridge"},
    }
    for pair, names in expected.items():
        assert set(payload[pair]) - {"matched_position_share"} == names
        for name in names:
            metrics = payload[pair][name]
            assert len(metrics["accuracy_per_seed"]) == 2
            assert metrics["accuracy"] == pytest.approx(sum(metrics["accuracy_per_seed"]) / 2)
            assert 0 <= metrics["accuracy"] <= metrics["best_at_k"] <= 1 and metrics["avg_len"] > 0
        for name in names - {"teacher", "student"}:  # every Stage 2 run used its tuned settings
            tuned_as = "cross_arch/oprd_bridge" if name == "oprd_bridge_raw_states" else f"{pair}/{name}"
            assert payload[pair][name]["settings"] == payload["tuning"][tuned_as]["chosen"]
            assert len(payload["tuning"][tuned_as]["tried"]) == 2 * len(demo.LEARNING_RATES)
    # the raw-states run uses a bridge of the same rank fitted on raw states
    raw = payload["cross_arch"]["oprd_bridge_raw_states"]
    rank = raw["settings"]["bridge_rank"]
    assert not load_bridge(out / "bridges" / f"cross_arch-r{rank}-raw-states.safetensors").normalize_states
    assert raw["stage1_cosine"] == next(r["cos_after"] for r in raw_sweep if r["rank"] == rank)
    assert 0.5 < payload["cross_tokenizer"]["matched_position_share"] <= 1
    assert 0.5 < payload["cross_tokenizer"]["oprd_bridge"]["matched_position_share"] <= 1
    assert payload["cross_init"]["oprd_vanilla"]["preflight_cosine_by_layer"]
    for pair, teacher in payload["teachers"].items():
        assert teacher["validation_accuracy"] >= toy.QUICK_WORLD.teacher_target, pair
    # the two-stage run: OPRD-Bridge for the first half of the steps, OPD top-1 after
    steps = run_metrics(out / "runs" / "cross_arch" / "bridge_then_opd-seed0")
    assert "rep/loss" in steps[0] and "opd/loss" not in steps[0] and "opd/loss" in steps[-1]
    bridge_report = (out / "bridge_report.md").read_text()
    assert "Stage 1 rank sweep" in bridge_report and f"torch {torch.__version__}" in bridge_report
    assert (out / "sweep" / "sweep.png").stat().st_size > 1000


def test_resume_reads_back_measured_candidates_and_retrains_the_rest(tmp_path, monkeypatch):
    """An interrupted --tune continued with --resume: candidates measured before (same settings,
    world and run shape) are read back, not retrained; a changed run shape retrains them all."""
    world = toy.World(tmp_path / "toy-abc", toy.QUICK_WORLD, {})
    scores = {1e-4: 0.3, 3e-4: 0.6, 1e-3: 0.5}
    monkeypatch.setattr(demo, "measure_model", lambda path, *args: {"accuracy": scores[json.loads(path.read_text())]})
    trained = []

    def train_one(settings, run_dir):
        trained.append(settings.lr)
        run_dir.mkdir(parents=True)
        (run_dir / "final").write_text(json.dumps(settings.lr))
        return {"final": run_dir / "final"}

    candidates = [demo.MethodSettings(lr=lr) for lr in scores]
    console, progress = Console(stderr=True), progress_bar(Console(stderr=True))

    def run(s, n=None):
        return demo.search("oprd", candidates[:n], train_one, lambda i: s.out / "tuning" / str(i), world, s, console,
                           progress)

    s = demo.DemoSettings(tmp_path / "out", tune=True)
    interrupted = run(s, n=2)  # as if stopped after two candidates
    resumed = run(demo.DemoSettings(tmp_path / "out", tune=True, resume=True))
    assert trained == [1e-4, 3e-4, 1e-3]  # only the third was trained on resume
    assert resumed["tried"][:2] == interrupted["tried"]
    assert resumed["chosen"]["lr"] == 3e-4
    run(demo.DemoSettings(tmp_path / "out", tune=True, resume=True, steps=10))  # another run shape: all retrained
    assert trained[3:] == [1e-4, 3e-4, 1e-3]


def test_resume_keeps_the_tuning_runs_and_clears_the_rest(tmp_path):
    out = tmp_path / "out"
    s = demo.DemoSettings(out, tune=True, resume=True)
    with pytest.raises(FileNotFoundError, match="no tuning/ folder"):
        demo.open_demo_output(s, demo.DEMO_FILES)
    (out / "tuning" / "oprd").mkdir(parents=True)
    (out / "tuning" / "oprd" / "0.json").write_text("{}")
    (out / "runs").mkdir()
    (out / "results.json").write_text("{}")
    demo.open_demo_output(s, demo.DEMO_FILES)
    assert sorted(p.name for p in out.iterdir()) == ["tuning"] and (out / "tuning" / "oprd" / "0.json").is_file()
    (out / "notes.txt").write_text("mine")  # a file the demo did not write: never deleted
    with pytest.raises(FileExistsError, match="notes.txt"):
        demo.open_demo_output(s, demo.DEMO_FILES)
    with pytest.raises(FileExistsError, match="--resume"):  # without --resume, the error names it
        demo.open_demo_output(demo.DemoSettings(out, tune=True), demo.DEMO_FILES)
    with pytest.raises(ValueError, match="add --tune"):
        demo.DemoSettings(out, resume=True)


@pytest.mark.slow
def test_applications_demo_quick_end_to_end(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    out = tmp_path / "applications"
    result = CliRunner().invoke(app, ["demo", "--quick", "--applications", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "applications_results.json").read_text())
    methods = payload["self_distillation"]["methods"]
    assert set(methods) == {"student", "plain_sft", "self_frozen", "self_live"}
    assert methods["self_live"]["teacher_bytes"] == 0 < methods["self_frozen"]["teacher_bytes"]
    models = payload["multi_teacher"]["models"]
    assert set(models) == {"student", "teacher_add_sub", "teacher_mul", "merged_routed", "merged_averaged"}
    for row in models.values():
        assert row["whole"]["mean"] == pytest.approx((row["add_sub"]["mean"] + row["mul"]["mean"]) / 2)
    # every routed sample went to the teacher of its half, and both halves were drawn
    records = run_metrics(out / "runs" / "merged_routed-seed0")
    steps = [r for r in records if "loss" in r]
    for r in steps:
        assert r["teachers/add_sub/share"] + r["teachers/mul/share"] == pytest.approx(1.0)
    assert 0 < statistics.mean(r["teachers/add_sub/share"] for r in steps) < 1
    averaged = run_metrics(out / "runs" / "merged_averaged-seed0")
    assert all(r["teachers/mul/share"] == 1.0 for r in averaged if "loss" in r)
    # each specialist was trained on its own half only: its data says so
    data = toy.build_world(toy.QUICK_WORLD).root
    halves = list(data.glob("halves-v*"))
    assert len(halves) == 1
    for half, operations in (("add_sub", "+-"), ("mul", "*")):
        for problem in load_problems(str(halves[0] / f"test_{half}.parquet")):
            chain = problem.messages[0]["content"].split()[1]
            assert {c for c in chain if c in "+-*"} <= set(operations), chain
    assert (out / "applications.png").stat().st_size > 0 and "(b) Two teachers" in (
        out / "applications_report.md").read_text()
