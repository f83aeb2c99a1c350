"""`oprd bench` on the tiny preset: layout, every method runs, and the TRL reference is comparable."""

import json

import pytest
import torch
from typer.testing import CliRunner

from oprd.bench import ALL_METHODS, Shape, build_models, make_batch, update_fn
from oprd.cli import app
from oprd.config import load_config
from oprd.trainer import Objective, distillation_loss


@pytest.mark.slow
def test_tiny_bench_writes_every_method(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--seq-lens", "16,32", "--repeats", "1",
                                      "--num-layers", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert {"device", "preset", "num_layers", "seq_len", "batch_size", "methods"} <= report.keys()
    assert (report["device"], report["preset"], report["num_layers"], report["seq_len"]) == ("cpu", "tiny", 2, 16)
    assert set(report["methods"]) == set(ALL_METHODS)
    for row in report["sweep"]:
        for name, measured in row["methods"].items():
            assert measured["step_seconds"] > 0, name
            assert measured["peak_memory_delta_bytes"] >= 0, name
    assert [r["seq_len"] for r in report["sweep"]] == [16, 32]
    assert "projection" in report  # 2 of the preset's 4 layers
    assert (out / "bench.png").stat().st_size > 0
    assert "| oprd |" in (out / "bench.md").read_text()


def test_existing_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_unknown_preset_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--preset", "gpt-7", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "unknown preset" in result.output


def test_trl_reference_is_the_same_reverse_kl():
    """TRL's loss (generalized JSD at beta=1) on our models and batch equals our full-vocabulary OPD,
    so the `trl` row of the bench measures the same objective."""
    pytest.importorskip("trl")
    shape = Shape("tiny", 2, 24, 2, "cpu", "float32")
    student, teacher = build_models(shape)
    batch = make_batch(shape, student.config.vocab_size)
    cfg = load_config(None, ["student.model=x", "teacher.model=x", "data.path=x", "opd.objective=full"])
    objective = Objective.from_config(cfg, 2, 2, student.config.vocab_size)
    ours, _ = distillation_loss(objective, student, teacher, batch, objective.normalizers(batch))
    ours.backward()
    ours_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    update_fn("trl", student, teacher, batch, student.config.vocab_size)()  # runs TRL's loss + backward
    torch.testing.assert_close(student.lm_head.weight.grad, ours_grad, rtol=1e-4, atol=1e-8)
