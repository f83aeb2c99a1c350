"""`oprd demo --quick` end to end: results.json layout, report and plots (no timing asserts)."""

import json

import pytest
from typer.testing import CliRunner

from oprd.cli import app

METHODS = ("teacher", "student", "opd_top1", "opd_top16", "oprd", "opd_top1_plus_oprd", "seq_kd")
DISTILLED = METHODS[2:]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path / "cache"))
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
    for png in ("accuracy_vs_step.png", "rep_cosine_vs_step.png", "response_length_vs_step.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "runs" / "oprd" / "metrics.jsonl").exists()

    # a non-empty --out is refused without --overwrite
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 2
