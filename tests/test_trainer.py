"""The training loop end to end: smoke runs, exact resume, errors, OPRD-Bridge runs, staged recipes,
the pre-flight check."""

import json
import math

import pytest
import torch
from helpers import SMOKE, TINY, run_metrics
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from oprd import trainer
from oprd.batch import RolloutBatch, pad_left
from oprd.bridge import load_bridge
from oprd.cli import app
from oprd.config import ConfigError, load_config
from oprd.data import load_problems, prompt_token_ids
from oprd.distributed import ONE_PROCESS
from oprd.evaluation.validation import make_validation
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.optim import lr_lambda
from oprd.rollout import Sampler, SamplingParams
from oprd.runs import checkpoint
from oprd.trainer import train, training_prompts

# --------------------------------------------------------------------------- runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["opd_sampled", "opd_topk", "opd_full", "oprd", "oprd_plus_opd"])
def test_smoke_recipe_leaves_a_usable_run_dir(recipe, tmp_path):
    run_dir = tmp_path / recipe
    result = CliRunner().invoke(app, ["train", str(SMOKE / f"{recipe}.yaml"), f"output_dir={run_dir}"])
    assert result.exit_code == 0, result.output
    rows = run_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    needed = {"step", "loss", "lr", "grad_norm", "response_length/mean", "time/sample_s", "time/teacher_s",
              "time/weight_sync_s", "time/update_s"}
    cfg = load_config(run_dir / "config.yaml")
    if cfg.uses_opd:
        needed |= {"opd/kl_estimate", "opd/student_entropy", "opd/teacher_entropy"}
    if cfg.opd.objective == "topk":
        needed.add("opd/topk_overlap")
    if cfg.uses_oprd:
        needed |= {"rep/cosine_similarity", "rep/mse", "rep/cosine_similarity/layer_1", "rep/mse/layer_4"}
    for row in rows:
        assert needed <= row.keys(), needed - row.keys()
        assert all(isinstance(v, (int, float)) and v == v for v in row.values())
    assert rows[0]["loss"] != rows[-1]["loss"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.num_hidden_layers == 4
    trained = dict(model.named_parameters())
    initial = dict(load_model(ModelSpec(model=TINY, random_init=True), torch.device("cpu")).named_parameters())
    assert any(not torch.equal(trained[n], initial[n]) for n in initial), "final/ holds untrained weights"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["step_000002", "step_000003"]
    assert not list((run_dir / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"
    cost = json.loads((run_dir / "run.json").read_text())["cost"]  # every phase timed, the writing included
    assert cost["checkpoint_seconds"] > 0 and cost["export_seconds"] > 0
    assert cost["update_seconds"] == pytest.approx(sum(row["time/update_s"] for row in rows))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["oprd_plus_opd", "opd_topk"])
def test_resume_after_crash_reproduces_uninterrupted_run(recipe, tmp_path, monkeypatch):
    overrides = ["max_steps=4", "save_every=2"]
    straight = train(load_config(SMOKE / f"{recipe}.yaml", [*overrides, f"output_dir={tmp_path / 'a'}"]))
    expected = run_metrics(straight)

    real_save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash right after the step-2 checkpoint")

    crashed_dir = tmp_path / "b"
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(SMOKE / f"{recipe}.yaml", [*overrides, f"output_dir={crashed_dir}"]))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert [r["step"] for r in run_metrics(crashed_dir)] == [1, 2]
    assert not (crashed_dir / "final").exists()

    train(load_config(SMOKE / f"{recipe}.yaml", [*overrides, f"output_dir={crashed_dir}", "resume=true"]))
    resumed = run_metrics(crashed_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for want, got in zip(expected, resumed):
        for key in ("loss", "grad_norm", "lr", "response_length/mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (want["step"], key)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(crashed_dir / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_data_in_file_order_is_drawn_in_order_and_resumed_where_it_stopped(tmp_path, monkeypatch):
    drawn = []
    real_submit = Sampler.submit

    def recording(self, indices, params):
        drawn.append(list(indices))
        return real_submit(self, indices, params)

    monkeypatch.setattr(Sampler, "submit", recording)
    run = ["data.shuffle=false", "oprd.preflight_prompts=0", f"output_dir={tmp_path / 'run'}"]
    train(load_config(SMOKE / "oprd.yaml", [*run, "max_steps=2"]))
    train(load_config(SMOKE / "oprd.yaml", [*run, "max_steps=4", "resume=true", "resume_changes=[max_steps]"]))
    assert drawn == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.slow
def test_grad_clip_0_turns_clipping_off_and_the_norm_before_clipping_is_logged(tmp_path):
    def first_step(grad_clip: str):
        overrides = ["max_steps=1", f"optim.grad_clip={grad_clip}", f"output_dir={tmp_path / grad_clip}"]
        run_dir = train(load_config(SMOKE / "oprd.yaml", overrides))
        [row] = run_metrics(run_dir)
        return row["grad_norm"], AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()

    off_norm, off = first_step("0")
    loose_norm, loose = first_step("1e9")  # far above any norm: never clips
    tight_norm, tight = first_step("1e-9")  # always clips
    assert off_norm == loose_norm == tight_norm > 0
    assert all(torch.equal(off[name], loose[name]) for name in off)
    assert any(not torch.equal(off[name], tight[name]) for name in off)


def test_existing_run_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["train", str(SMOKE / "oprd.yaml"), f"output_dir={run_dir}", "max_steps=1"])
    assert result.exit_code != 0
    output = " ".join(result.output.split())
    assert "already holds files" in output and "resume=true" in output
    assert (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key optim.lrr"),
        (["opd.objective=topk", "opd.k=100000"], "opd.k=100000 is larger than the vocabulary"),
        (["data.path=does/not/exist.parquet"], "does/not/exist.parquet"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_the_field(overrides, message, tmp_path):
    result = CliRunner().invoke(app, ["train", str(SMOKE / "oprd.yaml"), f"output_dir={tmp_path / 'r'}", *overrides])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    import oprd.trainer as trainer_module

    real = trainer_module.combined_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trainer_module, "combined_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        train(load_config(SMOKE / "oprd.yaml", [f"output_dir={tmp_path / 'r'}", "max_steps=1"]))


# --------------------------------------------------------------------------- how prompts are rendered and sampled


def thinking_tokenizer():
    """The smoke tokenizer with a template that, as Qwen3's, opens an empty think block on enable_thinking=false."""
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "assistant\n", "assistant\n{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    return tokenizer


class RecordingRollout:
    """A Rollout that answers every prompt with EOS and keeps what it was asked to sample."""

    weight_version = 0

    def __init__(self, tokenizer):
        self.pad, self.eos, self.calls = tokenizer.pad_token_id, tokenizer.eos_token_id, []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        self.calls.append((prompts, params))
        rows = len(prompts) * params.n
        prompt_ids, prompt_mask = pad_left([p for p in prompts for _ in range(params.n)], self.pad)
        return RolloutBatch(prompt_ids, prompt_mask, torch.full((rows, 1), self.eos), torch.ones(rows, 1).long(),
                            torch.arange(len(prompts)).repeat_interleave(params.n), torch.zeros(rows, dtype=torch.bool))

    def sync_weights(self, model, version: int) -> None:
        pass


def test_training_and_validation_prompts_are_rendered_alike_and_validation_samples_as_configured():
    tokenizer = thinking_tokenizer()
    cfg = load_config(SMOKE / "oprd.yaml", ["data.enable_thinking=false", "eval.every=1", "eval.benchmarks=aime24",
                                            "eval.limit=2", "eval.samples=2", "eval.top_p=0.95",
                                            "eval.max_new_tokens=15360"])
    warnings = []
    training = training_prompts(cfg, tokenizer, tokenizer, recorder=type("Recorder", (), {"warn": warnings.append}))
    problems = load_problems(cfg.data.path)
    assert training.student == [prompt_token_ids(tokenizer, p.messages, enable_thinking=False) for p in problems]
    assert not warnings

    rollout = RecordingRollout(tokenizer)
    make_validation(cfg, rollout, tokenizer, ONE_PROCESS, print)(0)
    [(prompts, params)] = rollout.calls
    benchmark = load_problems("aime24", limit=2)
    assert prompts == [prompt_token_ids(tokenizer, p.messages, enable_thinking=False) for p in benchmark]
    assert params == SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=15360, n=2)


# --------------------------------------------------------------------------- the learning-rate schedule


def test_schedule_steps_spread_warm_up_and_decay_over_their_horizon():
    paper = ["max_steps=500", "optim.warmup_ratio=0.03", "optim.schedule=cosine"]
    default = lr_lambda(load_config(SMOKE / "oprd.yaml", paper))
    explicit = lr_lambda(load_config(SMOKE / "oprd.yaml", [*paper, "optim.schedule_steps=500"]))
    assert [default(step) for step in range(500)] == [explicit(step) for step in range(500)]
    assert default(0) == pytest.approx(1 / 15) and default(14) == 1.0 and default(499) < 0.001

    # the reference's horizon, one epoch of DAPO-Math-17K: warm-up over ceil(3% of 2,239) = 68 steps
    epoch = lr_lambda(load_config(SMOKE / "oprd.yaml", [*paper, "optim.schedule_steps=2239"]))
    assert epoch(0) == pytest.approx(1 / 68) and epoch(66) < 1.0 == epoch(67) == epoch(68)
    # step 500 trains at factor(499): 431 of the 2,171 decay steps down the cosine, about 0.91 of the peak
    assert epoch(499) == pytest.approx(0.5 * (1 + math.cos(math.pi * 431 / 2171)))
    assert 0.90 < epoch(499) < 0.91


# --------------------------------------------------------------------------- OPRD-Bridge (Stage 2)


@pytest.mark.slow
def test_bridge_run_distils_a_wider_deeper_teacher(wider_teacher_with_bridge, tmp_path):
    folder, bridge_path = wider_teacher_with_bridge
    common = [f"teacher.model={folder}", "teacher.random_init=true", "teacher.init_seed=1", "max_steps=2"]
    with pytest.raises(ConfigError, match="hidden size is 64 and the teacher's 96"):
        train(load_config(SMOKE / "oprd.yaml", [*common, f"output_dir={tmp_path / 'no-bridge'}"]))
    run_dir = train(load_config(SMOKE / "oprd.yaml", [*common, f"bridge.path={bridge_path}",
                                                      f"output_dir={tmp_path / 'bridge'}"]))
    rows = run_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0 <= row["rep/mse"] <= 4.0  # normalised projections: squared distance of unit vectors / r
        assert {"rep/cosine_similarity/layer_1", "rep/cosine_similarity/layer_4"} <= row.keys()
    used = json.loads((run_dir / "bridge.json").read_text())
    assert used["rank"] == 4 and used["normalize_states"] is True and used["path"] == str(bridge_path.resolve())


def test_bridge_path_needs_oprd():
    with pytest.raises(ConfigError, match="bridge.path is set but OPRD is off"):
        load_config(SMOKE / "opd_sampled.yaml", ["bridge.path=b.safetensors"])


def test_save_every_zero_writes_only_the_final_model(tmp_path):
    run_dir = train(load_config(SMOKE / "oprd.yaml", [f"output_dir={tmp_path / 'r'}", "max_steps=1", "save_every=0"]))
    assert checkpoint.list_checkpoints(run_dir / "checkpoints") == []
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_final_is_gathered_after_the_optimizer_state_is_freed(tmp_path, monkeypatch):
    """AdamW's two moments (8 bytes a parameter) are in the last checkpoint by then: final/ is
    written without them held beside it."""
    held = []
    write_model = trainer.write_model

    def spy(run, target, card=None):
        held.append(len(run.optimizer.state))
        return write_model(run, target, card)

    monkeypatch.setattr(trainer, "write_model", spy)
    run_dir = train(load_config(SMOKE / "oprd.yaml", [f"output_dir={tmp_path / 'r'}", "max_steps=1", "save_every=1"]))
    assert held == [0]
    saved = torch.load(run_dir / "checkpoints" / "step_000001" / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) > 0  # what resume=true needs was kept


@pytest.fixture(scope="module")
def bf16_student(tmp_path_factory):
    """The smoke student's weights saved as a published checkpoint is: bfloat16."""
    folder = tmp_path_factory.mktemp("bf16-student")
    model = load_model(ModelSpec(model=TINY, random_init=True), torch.device("cpu"))
    model.to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(ModelSpec(model=TINY)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides,dtype", [([], torch.bfloat16), (["export_dtype=float32"], torch.float32)])
def test_final_is_written_in_the_published_dtype_unless_asked(bf16_student, overrides, dtype, tmp_path):
    """final/ of a bf16 checkpoint is bf16 (not the float32 master weights, twice its size), and
    holds the trained weights rounded to it; export_dtype=float32 keeps them whole."""
    run_dir = train(load_config(SMOKE / "oprd.yaml", [f"student.model={bf16_student}", "student.random_init=false",
                                                      f"output_dir={tmp_path / 'r'}", "max_steps=1", "save_every=0",
                                                      *overrides]))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert final.dtype == dtype and final.config.dtype == dtype
    assert f"- weights: {str(dtype).removeprefix('torch.')} " in (run_dir / "final" / "README.md").read_text()
    start = load_model(ModelSpec(model=str(bf16_student)), torch.device("cpu")).state_dict()
    trained = final.state_dict()
    assert any(not torch.equal(trained[name].float(), start[name].float()) for name in start)


def test_a_bf16_student_exports_bf16(tmp_path):
    run_dir = train(load_config(SMOKE / "oprd.yaml", ["student.dtype=bfloat16", f"output_dir={tmp_path / 'r'}",
                                                      "max_steps=1", "save_every=0"]))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert final.dtype == torch.bfloat16


# --------------------------------------------------------------------------- across tokenizers, stages, pre-flight


@pytest.fixture(scope="module")
def char_teacher(tmp_path_factory):
    """Saved weights of the smoke student, and a 3 x 48 teacher with a character-level tokenizer."""
    from oprd.data import load_problems
    from oprd.testing import tiny_config, train_char_tokenizer

    student_dir, teacher_dir = tmp_path_factory.mktemp("student"), tmp_path_factory.mktemp("char-teacher")
    load_model(ModelSpec(model=TINY, random_init=True), torch.device("cpu")).save_pretrained(student_dir)
    load_tokenizer(ModelSpec(model=TINY)).save_pretrained(student_dir)
    texts = [p.messages[-1]["content"] for p in load_problems(str(SMOKE / "prompts.parquet"))]
    tokenizer = train_char_tokenizer(texts, teacher_dir)
    config = tiny_config(len(tokenizer), hidden_size=48, num_layers=3, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    return student_dir, teacher_dir


@pytest.mark.slow
def test_cross_tokenizer_bridge_fit_then_train(char_teacher, tmp_path):
    student_dir, teacher_dir = char_teacher
    stage1 = ["--student", str(student_dir), "--teacher", str(teacher_dir), "--data", str(SMOKE / "prompts.parquet"),
              "--prompts", "4", "--max-new-tokens", "12", "--epochs", "3"]
    sweep = CliRunner().invoke(app, ["bridge", "sweep", *stage1, "--ranks", "1,4", "--out", str(tmp_path / "sweep")])
    assert sweep.exit_code == 0, sweep.output
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["rank"] for r in table["ranks"]] == [1, 4] and 0 < table["matched_position_share"] <= 1
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    bridge = tmp_path / "bridge.safetensors"
    fitted = CliRunner().invoke(app, ["bridge", "fit", *stage1, "--rank", "4", "--out", str(bridge)])
    assert fitted.exit_code == 0, fitted.output
    again = CliRunner().invoke(app, ["bridge", "fit", *stage1, "--rank", "4", "--out", str(bridge)])
    assert again.exit_code == 2 and "exists" in again.output  # never overwrites without asking
    assert load_bridge(bridge).normalize_states  # the default
    raw = CliRunner().invoke(app, ["bridge", "fit", *stage1, "--rank", "4", "--raw-states",
                                   "--out", str(tmp_path / "raw.safetensors")])
    assert raw.exit_code == 0, raw.output
    assert not load_bridge(tmp_path / "raw.safetensors").normalize_states

    common = [f"student.model={student_dir}", "student.random_init=false", f"teacher.model={teacher_dir}",
              "teacher.random_init=false", "max_steps=2", "oprd.positions=all"]
    with pytest.raises(ConfigError, match="tokenizers differ.*OPRD-Bridge"):
        train(load_config(SMOKE / "oprd_plus_opd.yaml", [*common, f"output_dir={tmp_path / 'opd'}"]))
    run_dir = train(load_config(SMOKE / "oprd.yaml",
                                [*common, f"bridge.path={bridge}", f"output_dir={tmp_path / 'r'}"]))
    rows = run_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.3 < row["align/matched_share"] <= 1.0
        assert torch.isfinite(torch.tensor(row["rep/loss"])) and row["rep/loss"] > 0
    assert json.loads((run_dir / "preflight.json").read_text())["cosine_by_layer"]
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    start = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


def test_staged_recipe_switches_objective(tmp_path):
    cfg = load_config(SMOKE / "oprd_plus_opd.yaml", [f"output_dir={tmp_path / 'r'}", "max_steps=2", "save_every=0",
                                                      "oprd.stop_step=1", "opd.start_step=1"])
    rows = run_metrics(train(cfg))
    assert "rep/loss" in rows[0] and "opd/loss" not in rows[0]
    assert "opd/loss" in rows[1] and "rep/loss" not in rows[1]


def test_preflight_warns_when_hidden_states_disagree(tmp_path):
    """The smoke teacher is another random initialisation: its states share nothing with the student's."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    run_dir = train(load_config(SMOKE / "oprd.yaml", [f"output_dir={tmp_path / 'r'}", "max_steps=1", "save_every=0"]),
                    console=Console(file=buffer, width=400))
    cosines = json.loads((run_dir / "preflight.json").read_text())["cosine_by_layer"]
    assert set(cosines) == {"1", "2", "3", "4"} and all(abs(c) < 0.5 for c in cosines.values())
    assert "OPRD-Vanilla matches states position by position" in buffer.getvalue()
    assert "oprd bridge fit" in buffer.getvalue()
    quiet = io.StringIO()
    train(load_config(SMOKE / "oprd.yaml", [f"output_dir={tmp_path / 's'}", "max_steps=1", "save_every=0",
                                            "oprd.preflight_min_cos=-1"]), console=Console(file=quiet, width=400))
    assert "OPRD-Vanilla matches" not in quiet.getvalue()
