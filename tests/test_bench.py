"""`oprd bench` on the tiny preset: layout, every method runs, and the TRL reference is comparable."""

import importlib.metadata
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from oprd.cli import app
from oprd.config import OPDConfig, OPRDConfig
from oprd.experiments.bench import (
    ALL_METHODS,
    Shape,
    build_models,
    layer_flops_per_token,
    make_batch,
    parameter_count,
    split_batch,
    sweep_fit,
    update_fn,
)
from oprd.objective import LossPlan, distillation_loss
from oprd.shapes import SHAPES, shape_config


@pytest.mark.slow
def test_tiny_bench_writes_every_method(tmp_path):
    out = tmp_path / "bench"
    methods = ["floor", "trl"]  # each in fresh processes per length; every method's update: a test below
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--seq-lens", "16,32", "--repeats", "1",
                                      "--num-layers", "2", "--methods", ",".join(methods), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert {"device", "preset", "num_layers", "seq_len", "batch_size", "methods"} <= report.keys()
    assert (report["device"], report["preset"], report["num_layers"], report["seq_len"]) == ("cpu", "tiny", 2, 16)
    assert set(report["methods"]) == set(methods)
    for row in report["sweep"]:
        for name, measured in row["methods"].items():
            assert measured["step_seconds"] > 0, name
            assert measured["peak_memory_delta_bytes"] >= 0, name
    assert [r["seq_len"] for r in report["sweep"]] == [16, 32]
    assert set(report["sweep_fit"]) == set(methods)
    assert "projection" in report  # 2 of the preset's 4 layers
    assert (out / "bench.png").stat().st_size > 0
    assert "| trl |" in (out / "bench.md").read_text()
    assert report["trl_version"] == importlib.metadata.version("trl")  # the peer's loss path changes between releases


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_runs_one_update_with_gradients(method):
    shape = Shape("tiny", 2, 16, 1, "cpu", "float32")
    student, teacher = build_models(shape)
    update_fn(method, student, teacher, make_batch(shape, student.config.vocab_size), student.config.vocab_size)()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("split", ["size:1", "size:3", "tokens:90", "tokens:200", "packed:90"])
def test_a_split_update_accumulates_the_whole_batchs_gradient(split):
    """The bench's micro-batchings are the trainer's: any split of a mixed-length batch accumulates
    the gradient of the whole batch in one piece."""
    shape = Shape("tiny", 2, 24, 6, "cpu", "float32", min_len=4)
    student, teacher = build_models(shape)
    batch = make_batch(shape, student.config.vocab_size)
    assert sorted(batch.response_lengths.tolist()) == [4, 8, 12, 16, 20, 24]
    gradients = {}
    for name in ("whole", split):
        student.zero_grad(set_to_none=True)
        update_fn("oprd_plus_opd", student, teacher, batch, student.config.vocab_size, name)()
        gradients[name] = [p.grad.clone() for p in student.parameters()]
    assert len(split_batch(batch, split)) > 1
    for whole, part in zip(gradients["whole"], gradients[split], strict=True):
        torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("split", ["halves", "size:0", "tokens:", "tokens:x"])
def test_a_malformed_split_is_refused(split, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--splits", f"whole,{split}", "--out",
                                      str(tmp_path / "b")])
    assert result.exit_code == 2 and "a split is whole, size:N, tokens:N or packed:N" in result.output


@pytest.mark.slow
def test_the_split_bench_measures_every_method_over_every_split(tmp_path):
    out = tmp_path / "splits"
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--num-layers", "1", "--seq-len", "32",
                                      "--min-len", "4", "--batch-size", "4", "--repeats", "1", "--methods", "oprd",
                                      "--splits", "tokens:200,packed:200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "splits.json").read_text())
    assert list(report["splits"]) == ["tokens:200", "packed:200"] and report["min_len"] == 4
    assert report["splits"]["packed:200"]["padding_share"] == 0
    assert report["splits"]["tokens:200"]["padding_share"] > 0
    assert report["splits"]["tokens:200"]["largest_micro_batch_tokens"] <= 200
    for row in report["splits"].values():
        assert row["methods"]["oprd"]["step_seconds"] > 0
    assert "| packed:200 |" in (out / "splits.md").read_text()


def test_an_autocast_shape_runs_the_update_in_bf16_over_float32_weights():
    """--dtype float32 --autocast measures what training with optim.precision=bf16 runs: the
    student's matmuls (its LM head's included, chunk by chunk) in bf16, its gradients in float32."""
    shape = Shape("tiny", 2, 16, 1, "cpu", "float32", autocast=True)
    student, teacher = build_models(shape)
    batch = make_batch(shape, student.config.vocab_size)
    dtypes = []
    student.lm_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    student.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with shape.precision():
        update_fn("opd_full", student, teacher, batch, student.config.vocab_size)()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert {p.grad.dtype for p in student.parameters() if p.grad is not None} == {torch.float32}
    assert not Shape("tiny", 2, 16, 1, "cpu", "float32").autocast


@pytest.mark.slow
def test_one_shape_is_drawn_as_bars_per_method(tmp_path, monkeypatch):
    """One sequence length: a bar per method (time and memory), the floor marked as a line."""
    import matplotlib.axes

    drawn = {}
    real_bar, real_line = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, height, *a, **k: (
        drawn.setdefault("bars", []).append((list(x), list(height))), real_bar(self, x, height, *a, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, *a, **k: (
        drawn.setdefault("floor", []).append(y), real_line(self, y, *a, **k))[1])
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--seq-lens", "16", "--repeats", "1",
                                      "--num-layers", "2", "--methods", "floor,oprd,opd_full", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    (times, memory) = drawn["bars"]
    assert times == (["floor", "oprd", "opd_full"], [report["methods"][m]["step_seconds"] for m in times[0]])
    assert memory[1] == [report["methods"][m]["peak_memory_delta_bytes"] / 2**20 for m in memory[0]]
    assert drawn["floor"] == [report["methods"]["floor"]["step_seconds"],
                              report["methods"]["floor"]["peak_memory_delta_bytes"] / 2**20]
    assert "trl_version" not in report  # trl was not measured


def test_sweep_fit_separates_the_loss_from_the_backbones():
    def point(seq_len, floor_mib, oprd_mib, seconds):
        return {"seq_len": seq_len, "methods": {
            "floor": {"peak_memory_delta_bytes": floor_mib * 2**20, "step_seconds": seconds},
            "oprd": {"peak_memory_delta_bytes": oprd_mib * 2**20, "step_seconds": 2 * seconds}}}

    # floor: flat at 1000 MiB (gradients) until activations take over past 2048 tokens;
    # oprd: the same plus 1 MiB per 64 tokens; given out of order
    sweep = [point(4096, 3000, 3064, 8.0), point(512, 1000, 1008, 1.0), point(2048, 1000, 1032, 4.0),
             point(1024, 1000, 1016, 2.0)]
    fit = sweep_fit(sweep)
    assert fit["floor"]["memory_bytes_per_token_at_longest"] == pytest.approx(2000 * 2**20 / 2048)
    assert "memory_over_floor_bytes_per_token" not in fit["floor"]
    assert fit["oprd"]["memory_over_floor_bytes_per_token"] == pytest.approx(2**20 / 64)
    assert fit["oprd"]["memory_over_floor_intercept_bytes"] == pytest.approx(0, abs=1)
    assert fit["oprd"]["memory_over_floor_max_residual_bytes"] == pytest.approx(0, abs=1)
    assert fit["floor"]["seconds_per_token"] == pytest.approx(1 / 512)
    assert fit["oprd"]["seconds_per_token"] == pytest.approx(2 / 512)

    bent = sweep_fit([point(1, 0, 0, 1), point(2, 0, 10, 1), point(3, 0, 0, 1)])  # best line 10/3, residual 20/3
    assert bent["oprd"]["memory_over_floor_bytes_per_token"] == pytest.approx(0, abs=1e-6)
    assert bent["oprd"]["memory_over_floor_max_residual_bytes"] == pytest.approx(20 / 3 * 2**20)


def test_existing_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_unknown_preset_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--preset", "gpt-7", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "unknown preset" in result.output


def test_a_shape_larger_than_memory_is_refused_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr("oprd.experiments.bench.available_memory_bytes", lambda device: 2**30)
    result = CliRunner().invoke(app, ["bench", "--preset", "qwen3-1.7b", "--num-layers", "28",
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    weights_grads_teacher = 3 * parameter_count(Shape("qwen3-1.7b", 28, 1024, 1, "cpu", "float32")) * 4
    assert f"needs at least {weights_grads_teacher / 2**30:.1f} GiB" in result.output
    assert "1.0 GiB is free" in result.output and "--num-layers" in result.output
    assert not (tmp_path / "b" / "bench.json").exists()


@pytest.mark.parametrize("lengths", ["512,512", "0,512"])
def test_bad_sequence_lengths_are_refused(tmp_path, lengths):
    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--seq-lens", lengths, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "distinct positive" in result.output


def test_parameter_count_matches_the_built_model():
    shape = Shape("tiny", 2, 16, 1, "cpu", "float32")
    student, _ = build_models(shape)
    assert parameter_count(shape) == sum(p.numel() for p in student.parameters())


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_flop_model_counts_each_shapes_own_projections(name):
    """A block's weights in the FLOP model are the built block's, for every shape of the table
    (Qwen2's and Phi-3's configs carry no head_dim: it is derived)."""
    config = shape_config(name, num_layers=1)
    with torch.device("meta"):
        block = AutoModelForCausalLM.from_config(config).model.layers[0]
    weights = sum(p.numel() for n, p in block.named_parameters() if p.dim() == 2)
    assert layer_flops_per_token(config, context=0) == 2 * weights


def test_trl_reference_is_the_same_reverse_kl():
    """TRL's loss (generalized JSD at beta=1) on our models and batch equals our full-vocabulary OPD,
    so the `trl` row of the bench measures the same objective."""
    pytest.importorskip("trl")
    shape = Shape("tiny", 2, 24, 2, "cpu", "float32")
    student, teacher = build_models(shape)
    batch = make_batch(shape, student.config.vocab_size)
    plan = LossPlan.from_config(OPDConfig(objective="full"), OPRDConfig(), 2, 2, student.config.vocab_size)
    ours, _ = distillation_loss(plan, student, teacher, batch, plan.normalizers(batch))
    ours.backward()
    ours_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    update_fn("trl", student, teacher, batch, student.config.vocab_size)()  # runs TRL's loss + backward
    torch.testing.assert_close(student.lm_head.weight.grad, ours_grad, rtol=1e-4, atol=1e-8)
