"""What `oprd train` guarantees when things go wrong: it never deletes what is not a run of ours,
never starts on a bad input, never trains on non-finite numbers, never resumes from a damaged
checkpoint or with a config that would make the record false, and says what to do instead."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import SMOKE, run_metrics
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from oprd.cli import app
from oprd.config import ConfigError, load_config, read_run_config
from oprd.files import DiskFullError
from oprd.optim import lr_lambda
from oprd.runs import checkpoint
from oprd.trainer import train


def _cfg(tmp_path, *overrides, recipe="oprd.yaml", name="run"):
    return load_config(SMOKE / recipe, [f"output_dir={tmp_path / name}", *overrides])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step smoke run with checkpoints at steps 1 and 2, copied fresh by `run_copy`."""
    root = tmp_path_factory.mktemp("finished")
    cfg = load_config(SMOKE / "oprd.yaml", [f"output_dir={root / 'run'}", "max_steps=2", "save_every=1",
                                            "keep_checkpoints=3"])
    return train(cfg)


@pytest.fixture()
def run_copy(finished_run, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def _resume(run_dir, *overrides):
    return train(load_config(SMOKE / "oprd.yaml", [f"output_dir={run_dir}", "max_steps=2", "save_every=1",
                                                   "keep_checkpoints=3", "resume=true", *overrides]))


# --------------------------------------------------------------------------- the overwrite guard


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["train", str(SMOKE / "oprd.yaml"), f"output_dir={folder}", "overwrite=true"])
    assert result.exit_code == 2 and "did not write (notes.txt)" in " ".join(result.output.split())
    assert (folder / "notes.txt").read_text() == "mine"


def test_overwrite_happens_only_after_every_check(run_copy):
    before = sorted(p.name for p in run_copy.iterdir())
    with pytest.raises(FileNotFoundError, match="no-such.parquet"):
        train(load_config(SMOKE / "oprd.yaml", [f"output_dir={run_copy}", "overwrite=true",
                                                "data.path=no-such.parquet"]))
    assert sorted(p.name for p in run_copy.iterdir()) == before
    assert len(run_metrics(run_copy)) == 2


def test_overwrite_replaces_an_earlier_run(run_copy):
    train(load_config(SMOKE / "oprd.yaml", [f"output_dir={run_copy}", "overwrite=true", "max_steps=1",
                                            "save_every=0"]))
    assert [r["step"] for r in run_metrics(run_copy)] == [1]
    assert not (run_copy / "checkpoints").exists()


def test_overwrite_never_deletes_the_working_directory(run_copy, monkeypatch):
    monkeypatch.chdir(run_copy)
    with pytest.raises(FileExistsError, match="working directory"):
        train(load_config(SMOKE / "oprd.yaml", ["output_dir=.", "overwrite=true"]))
    assert (run_copy / "config.yaml").exists()


def test_a_run_that_fails_its_checks_leaves_no_folder(tmp_path):
    folder = tmp_path / "run"
    args = ["train", str(SMOKE / "oprd.yaml"), f"output_dir={folder}", "data.path=no-such.parquet"]
    assert CliRunner().invoke(app, args).exit_code == 2
    assert not folder.exists()
    again = CliRunner().invoke(app, args)
    assert "already holds files" not in again.output


def test_data_of_blank_prompts_trains_on_what_is_left_or_stops(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": " ", "answer": "1"}] * 4
    data = tmp_path / "blanks.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["train", str(SMOKE / "oprd.yaml"), f"output_dir={tmp_path / 'run'}", f"data.path={data}", "max_steps=1",
            "eval.every=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 of 8 rows left out, 4 with a blank prompt (rows 1, 3, 5, 7)" in " ".join(result.output.split())
    data.write_text(json.dumps({"prompt": "", "answer": "1"}) + "\n")
    result = CliRunner().invoke(app, [*args[:2], f"output_dir={tmp_path / 'none'}", *args[3:]])
    assert result.exit_code == 2 and f"{data}: no row is usable" in " ".join(result.output.split())
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- checks before anything runs


@pytest.mark.parametrize("overrides, message", [
    (["device=foo"], "device must be auto, cpu, cuda or cuda:N"),
    (["optim.beta1=1.0"], r"optim.beta1 must be in \[0, 1\)"),
    (["optim.beta2=-0.1"], r"optim.beta2 must be in \[0, 1\)"),
    (["optim.lr=inf"], "optim.lr must be a finite number"),
    (["optim.lr=.nan"], "optim.lr must be a finite number"),
    (["oprd.coef=-1"], "oprd.coef \\(mu, the weight of OPRD\\) must be >= 0"),
    (["bridge.path=no-such.safetensors"], "no-such.safetensors: no such file .*oprd bridge fit"),
    (["optim.lr=["], "override 'optim.lr=\\[': the value is not valid YAML"),
    (["resume_changes=[optim.lrr]"], "resume_changes names keys that do not exist"),
])
def test_bad_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE / "oprd.yaml", overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="no GPU is visible"):
        load_config(SMOKE / "oprd.yaml", ["device=cuda"])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("seed: 0\nmax_steps: [3\noptim: {lr: 1e-3}\n")
    with pytest.raises(ConfigError, match=f"{recipe}:3:"):
        load_config(recipe)


def test_prompts_longer_than_the_context_are_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="context window of 4096 positions"):
        train(_cfg(tmp_path, "rollout.max_new_tokens=4090"))
    assert not (tmp_path / "run").exists()


def test_a_missing_model_path_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", str(SMOKE / "oprd.yaml"), f"output_dir={tmp_path / 'r'}",
                                      f"student.model={tmp_path / 'no-such-model'}"])
    assert result.exit_code == 2
    assert f"student.model={tmp_path / 'no-such-model'}: no such folder" in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) <= 3, result.output  # one message, no traceback


# --------------------------------------------------------------------------- resuming


def test_resume_refuses_a_config_that_changes_what_was_trained(run_copy):
    before = (run_copy / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1; optim.lr: 0.001 -> 0.002.*resume_changes=\[seed,optim.lr\]"):
        _resume(run_copy, "optim.lr=2e-3", "seed=1")
    assert (run_copy / "config.yaml").read_text() == before


def test_resume_with_allowed_changes_keeps_every_segment_and_applies_them(run_copy):
    run = train(load_config(SMOKE / "oprd.yaml", [f"output_dir={run_copy}", "max_steps=3", "save_every=1",
                                                  "resume=true", "optim.lr=2e-3", "resume_changes=[optim.lr,max_steps]",
                                                  "eval.every=0"]))
    segments = sorted((run / "configs").glob("segment-*.yaml"))
    assert [p.name for p in segments] == ["segment-001.yaml", "segment-002.yaml"]
    assert read_run_config(segments[0]).optim.lr == 1e-3 and read_run_config(segments[1]).optim.lr == 2e-3
    assert read_run_config(run / "config.yaml").optim.lr == 2e-3
    assert "from step 3, resumed from" in segments[1].read_text().splitlines()[0]
    rows = run_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # steps 1-2 ran the old schedule (lr 1e-3, cosine over 2 steps), step 3 the new one (2e-3 over 3 steps)
    old, new = load_config(segments[0]), load_config(segments[1])
    assert rows[0]["lr"] == 1e-3 * lr_lambda(old)(0) and rows[2]["lr"] == 2e-3 * lr_lambda(new)(2)


def test_resume_may_change_what_does_not_alter_training(run_copy):
    import shutil

    before = run_metrics(run_copy)
    shutil.rmtree(checkpoint.list_checkpoints(run_copy / "checkpoints")[-1])  # so that step 2 trains again
    _resume(run_copy, "keep_checkpoints=5", "eval.every=0", "optim.micro_batch_size=1")
    segment = sorted((run_copy / "configs").glob("segment-*.yaml"))[-1]
    assert segment.name == "segment-002.yaml" and "from step 2, resumed from" in segment.read_text().splitlines()[0]
    assert read_run_config(segment).optim.micro_batch_size == 1
    after = run_metrics(run_copy)  # micro-batches change memory, never the gradient
    assert [r["step"] for r in after] == [1, 2]
    for key in ("loss", "grad_norm"):
        assert after[1][key] == pytest.approx(before[1][key], rel=1e-5), key


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run_copy):
    import io

    from rich.console import Console

    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.1, "lr"')  # the disk filled during the append
    checkpoint_dir = run_copy / "checkpoints"
    for step in checkpoint.list_checkpoints(checkpoint_dir)[1:]:
        import shutil

        shutil.rmtree(step)  # resume from step 1, so step 2 is recomputed
    log = io.StringIO()
    train(load_config(SMOKE / "oprd.yaml", [f"output_dir={run_copy}", "max_steps=2", "save_every=1",
                                            "keep_checkpoints=3", "resume=true"]), console=Console(file=log))
    assert "dropped its last line" in log.getvalue()
    assert [r["step"] for r in run_metrics(run_copy)] == [1, 2]


def test_a_bad_metrics_line_inside_the_file_is_named(run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    (run_copy / "metrics.jsonl").write_text("not json\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1: not a metrics line"):
        _resume(run_copy)


def test_resume_removes_what_a_killed_write_left_behind(run_copy):
    leftover = run_copy / "checkpoints" / ".step_000003.tmp-kill9"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (run_copy / ".final.tmp-kill9").mkdir()
    _resume(run_copy)
    assert not leftover.exists() and not (run_copy / ".final.tmp-kill9").exists()


def _damage(step_dir: Path, how: str) -> str:
    """Damages one file of a checkpoint the way a bad disk or a bad copy would; returns its name."""
    if how == "truncated weights":
        data = (step_dir / "model.safetensors").read_bytes()
        (step_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "the model"
    if how == "nan weights":
        weights = load_file(step_dir / "model.safetensors")
        name = next(iter(weights))
        weights[name] = torch.full_like(weights[name], math.nan)
        save_file(weights, step_dir / "model.safetensors", metadata={"format": "pt"})
        return "not finite numbers"
    if how == "garbage trainer_state":
        (step_dir / "trainer_state.json").write_text("{step: oops")
        return "trainer_state.json is not valid JSON"
    if how == "empty trainer_state":
        (step_dir / "trainer_state.json").write_text("")
        return "trainer_state.json"
    if how == "random rng":
        (step_dir / "rng.pt").write_bytes(os.urandom(512))
        return "rng.pt"
    if how == "truncated optimizer":
        data = (step_dir / "optimizer.pt").read_bytes()
        (step_dir / "optimizer.pt").write_bytes(data[: len(data) // 3])
        return "optimizer.pt"
    if how == "empty folder":
        for path in step_dir.iterdir():
            path.unlink()
        return "no config.json, model.safetensors"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated weights", "nan weights", "garbage trainer_state", "empty trainer_state",
                                 "random rng", "truncated optimizer", "empty folder"])
def test_a_damaged_checkpoint_is_named_with_the_fix(run_copy, how):
    newest = checkpoint.list_checkpoints(run_copy / "checkpoints")[-1]
    what = _damage(newest, how)
    with pytest.raises(checkpoint.CheckpointError) as error:
        _resume(run_copy)
    message = str(error.value)
    assert str(newest) in message and what in message
    assert "resume_from=" in message and f"Remove {newest}" in message
    assert "weights_only=False" not in message


def test_resume_from_chooses_an_older_checkpoint(run_copy):
    older = checkpoint.list_checkpoints(run_copy / "checkpoints")[0]
    _damage(checkpoint.list_checkpoints(run_copy / "checkpoints")[-1], "random rng")
    run = _resume(run_copy, f"resume_from={older}")
    assert [r["step"] for r in run_metrics(run)] == [1, 2]


# --------------------------------------------------------------------------- non-finite numbers, a full disk


def test_an_update_that_overflows_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match="update of step 1 overflowed.*No checkpoint was saved yet"):
        train(_cfg(tmp_path, "max_steps=3", "save_every=1", "optim.lr=1e38", "optim.grad_clip=0"))


def test_an_update_that_makes_weights_non_finite_stops_the_run(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned_at_step_2(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_at_step_2)
    with pytest.raises(FloatingPointError, match="update of step 2 made the student's weights non-finite "
                                                 r"\(model.embed_tokens.weight\).*newest checkpoint, .*step_000001"):
        train(_cfg(tmp_path, "max_steps=3", "save_every=1"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000001"]


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(run_copy, monkeypatch):
    import errno

    import oprd.runs.checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    newest = checkpoint.list_checkpoints(run_copy / "checkpoints")[-1]
    monkeypatch.setattr(oprd.runs.checkpoint.torch, "save", full_disk)
    with pytest.raises(DiskFullError, match="is full"):
        train(load_config(SMOKE / "oprd.yaml", [f"output_dir={run_copy}", "max_steps=3", "save_every=1",
                                                "keep_checkpoints=3", "resume=true",
                                                "resume_changes=[max_steps]"]))
    assert checkpoint.list_checkpoints(run_copy / "checkpoints")[-1] == newest
    assert not [p for p in (run_copy / "checkpoints").iterdir() if p.name.startswith(".")]
