"""`oprd demo --quick` and `oprd demo --bridge --quick` end to end: results layout, report and plots
(no timing asserts). Both share one toy-world cache, as a user's runs do."""

import json

import pytest
import torch
from typer.testing import CliRunner

from oprd.bridge import load_bridge
from oprd.cli import app

METHODS = ("teacher", "student", "opd_top1", "opd_top16", "oprd", "opd_top1_plus_oprd", "seq_kd")
DISTILLED = METHODS[2:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--seq-kd-steps", "3"])
    assert result.exit_code == 0, result.output

    payload = json.loads((out / "results.json").read_text())
    assert set(payload) == {"wall_seconds", "methods"}
    assert payload["wall_seconds"] > 0
    assert set(payload["methods"]) == set(METHODS)
    for name, metrics in payload["methods"].items():
        assert 0 <= metrics["accuracy"] <= 1
        assert 0 <= metrics["best_at_k"] <= 1
        assert metrics["best_at_k"] >= metrics["accuracy"]
        assert 0 <= metrics["dist_4g"] <= 1
        assert metrics["avg_len"] > 0
        if name in DISTILLED:
            assert metrics["train_seconds"] > 0
            assert isinstance(metrics["peak_memory_delta_bytes"], int)
    report = (out / "report.md").read_text()
    assert "Avg@" in report and "oprd" in report
    assert f"torch {torch.__version__}" in report  # what produced the numbers
    for png in ("accuracy_vs_step.png", "rep_cosine_vs_step.png", "response_length_vs_step.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "runs" / "oprd" / "metrics.jsonl").exists()

    # a non-empty --out is refused without --overwrite
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 2


BRIDGE_METHOD_KEYS = {"accuracy", "best_at_k", "dist_4g", "avg_len"}


@pytest.mark.slow
def test_bridge_demo_quick_end_to_end(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(cache))
    out = tmp_path / "bridge"
    result = CliRunner().invoke(app, ["demo", "--bridge", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output

    payload = json.loads((out / "bridge_results.json").read_text())
    sweep = payload["rank_sweep"]
    assert [r["rank"] for r in sweep] == [1, 2, 4, 8, 16, 32]  # up to the quick student's width
    raw_sweep = payload["rank_sweep_raw_states"]  # the paper's recipe as written, on the same rows
    assert [r["rank"] for r in raw_sweep] == [r["rank"] for r in sweep]
    for row in sweep + raw_sweep:
        assert -1 <= row["cos_before"] <= 1 and -1 <= row["cos_after"] <= 1
    assert load_bridge(out / "sweep" / "bridge-r4.safetensors").normalize_states
    assert not load_bridge(out / "sweep_raw_states" / "bridge-r4.safetensors").normalize_states
    # Stage 2 at the best-cosine, the paper's (8) and the widest rank; the widest is the one used after
    best_cos = max(sweep, key=lambda r: r["cos_after"])["rank"]
    assert [r["rank"] for r in payload["stage2_rank_sweep"]] == sorted({best_cos, 8, 32})
    assert payload["stage2_rank"] == 32
    by_rank = {r["rank"]: r for r in payload["stage2_rank_sweep"]}
    assert by_rank[32]["accuracy"] == payload["cross_arch"]["oprd_bridge"]["accuracy"]
    raw_stage2 = payload["stage2_raw_states"]  # the same rank on the paper's raw states
    assert raw_stage2["rank"] == 32 and raw_stage2["cos_after"] == raw_sweep[-1]["cos_after"]
    assert 0 <= raw_stage2["accuracy"] <= raw_stage2["best_at_k"] <= 1
    expected = {
        "cross_arch": {"teacher", "student", "oprd_bridge", "opd_top1", "bridge_then_opd"},
        "cross_tokenizer": {"teacher", "student", "oprd_bridge", "matched_position_share"},
        "cross_init": {"teacher", "student", "oprd_vanilla", "oprd_bridge"},
    }
    for pair, keys in expected.items():
        assert set(payload[pair]) == keys
        for name in keys - {"matched_position_share"}:
            metrics = payload[pair][name]
            assert set(metrics) >= BRIDGE_METHOD_KEYS
            assert 0 <= metrics["accuracy"] <= metrics["best_at_k"] <= 1 and metrics["avg_len"] > 0
    assert 0.5 < payload["cross_tokenizer"]["matched_position_share"] <= 1
    assert 0.5 < payload["cross_tokenizer"]["oprd_bridge"]["matched_position_share"] <= 1
    assert payload["cross_init"]["oprd_vanilla"]["preflight_cosine_by_layer"]
    # the two-stage run: OPRD-Bridge for the first half of the steps, OPD top-1 after
    metrics = out / "runs" / "cross_arch_bridge_then_opd" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert "rep/loss" in steps[0] and "opd/loss" not in steps[0] and "opd/loss" in steps[-1]
    bridge_report = (out / "bridge_report.md").read_text()
    assert "Stage 1 rank sweep" in bridge_report and f"torch {torch.__version__}" in bridge_report
    assert (out / "sweep" / "sweep.png").stat().st_size > 1000
