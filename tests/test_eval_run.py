"""evaluate() through the Rollout interface, `oprd eval MODEL...` end to end on a tiny random model,
and `oprd eval grade FILE` on responses with known grades."""

import io
import json
import os
from math import comb
from pathlib import Path
from statistics import mean

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from oprd.batch import RolloutBatch, pad_left
from oprd.cli import app
from oprd.data import load_problems, prompt_token_ids
from oprd.display import progress_bar
from oprd.evaluation.harness import evaluate
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import SamplingParams

TINY = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "tiny-qwen3"
RECORD_FIELDS = {"model", "benchmark", "index", "sample", "response", "extracted_answer", "ground_truth"}
RECORD_FIELDS |= {"correct", "grading_timed_out", "length", "truncated"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(model=str(TINY)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 saved like a hub checkpoint, so `from_pretrained` loads it."""
    spec = ModelSpec(model=str(TINY), random_init=True)
    out = tmp_path_factory.mktemp("tiny-model")
    load_model(spec, torch.device("cpu")).save_pretrained(out)
    load_tokenizer(spec).save_pretrained(out)
    return out


class ScriptedRollout:
    """A Rollout answering each prompt with (text, stops_with_eos) options drawn by torch.randint,
    so its draws follow torch's seeded global generator like real sampling does."""

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[tuple[str, bool]]]):
        self.tokenizer, self.scripts, self.calls = tokenizer, scripts, 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        self.calls += 1
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        responses, index, truncated = [], [], []
        for i, prompt in enumerate(prompts):
            options = self.scripts[tuple(prompt)]
            for _ in range(params.n):
                text, stops = options[int(torch.randint(len(options), ()))]
                responses.append(self.tokenizer(text, add_special_tokens=False).input_ids + [eos] * stops)
                index.append(i)
                truncated.append(not stops)
        prompt_ids, prompt_mask = pad_left([prompts[i] for i in index], pad)
        response_ids = torch.full((len(responses), max(map(len, responses))), pad)
        response_mask = torch.zeros_like(response_ids)
        for row, ids in enumerate(responses):
            response_ids[row, : len(ids)] = torch.tensor(ids)
            response_mask[row, : len(ids)] = 1
        prompt_index, truncated = torch.tensor(index), torch.tensor(truncated)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, truncated)

    def sync_weights(self, model) -> None:
        pass


SCRIPTS = [  # aime24 rows 0-2, ground truths 204, 025, 809
    [(r"so \boxed{204}", True)],  # always right
    [(r"\boxed{25}", True), ("Answer: 24", True)],  # a coin flip
    [("no idea at all", False)],  # a format error, cut by the token limit
]


@pytest.fixture()
def scripted(tokenizer):
    problems = load_problems("aime24", limit=3)
    prompts = [tuple(prompt_token_ids(tokenizer, p.messages)) for p in problems]
    return problems, ScriptedRollout(tokenizer, dict(zip(prompts, SCRIPTS)))


def test_evaluate_grades_and_summarises_every_sample(tokenizer, scripted):
    problems, rollout = scripted
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=4)
    result = evaluate(rollout, tokenizer, problems, params, seed=0, batch_size=4)
    assert rollout.calls == 3  # batch_size 4 / n 4: one problem per generate call
    records = result.samples
    assert [(r["index"], r["sample"]) for r in records] == [(i, j) for i in range(3) for j in range(4)]
    first, last = records[0], records[-1]
    assert first["correct"] and first["extracted_answer"] == "204" and first["ground_truth"] == "204"
    assert first["length"] == len(tokenizer(r"so \boxed{204}", add_special_tokens=False).input_ids) + 1  # EOS
    assert not first["truncated"]
    assert last["extracted_answer"] is None and last["truncated"] and not last["correct"]
    metrics = result.metrics
    correct = [[r["correct"] for r in records[i : i + 4]] for i in (0, 4, 8)]  # problem 1 is random
    assert metrics["avg@4"] == pytest.approx(mean(r["correct"] for r in records))
    assert metrics["best@4"] == pytest.approx(mean(any(c) for c in correct))
    assert metrics["format_error_rate"] == pytest.approx(4 / 12)
    assert metrics["truncation_rate"] == pytest.approx(4 / 12)
    assert metrics["avg_len"] == pytest.approx(mean(r["length"] for r in records))
    assert metrics["solve_none"] == sum(not any(c) for c in correct)
    assert (metrics["solve_all"], metrics["problems"], metrics["samples"]) == (1 + all(correct[1]), 3, 12)
    assert {"maj@4", "pass@1", "pass@2", "pass@4", "dist-4g"} <= set(metrics)


def test_evaluate_is_seeded_and_leaves_the_callers_rng_alone(tokenizer, scripted):
    problems, rollout = scripted
    params = SamplingParams(n=8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = evaluate(rollout, tokenizer, problems, params, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert evaluate(rollout, tokenizer, problems, params, seed=7).samples == first.samples
    runs = [evaluate(rollout, tokenizer, problems, params, seed=seed).samples for seed in range(4)]
    assert len({tuple(r["response"] for r in run) for run in runs}) > 1


def test_evaluate_reports_running_accuracy(tokenizer, scripted):
    problems, rollout = scripted
    progress = progress_bar(Console(file=io.StringIO()))
    evaluate(rollout, tokenizer, problems, SamplingParams(n=2), progress=progress, description="aime24")
    [task] = progress.tasks
    assert task.completed == task.total == 3
    assert task.fields["status"].startswith("acc ") and task.fields["status"].endswith("%")


def test_evaluate_needs_ground_truths(tokenizer, scripted):
    problems, rollout = scripted
    problems[1].answer = None
    with pytest.raises(ValueError, match="ground-truth"):
        evaluate(rollout, tokenizer, problems, SamplingParams(n=1))


def test_evaluate_renders_prompts_with_enable_thinking(tokenizer):
    thinking = load_tokenizer(ModelSpec(model=str(TINY)))
    thinking.chat_template = tokenizer.chat_template.replace(
        "assistant\n", "assistant\n{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    problems = load_problems("aime24", limit=1)
    without_thinking = tuple(prompt_token_ids(thinking, problems[0].messages, enable_thinking=False))
    assert without_thinking != tuple(prompt_token_ids(thinking, problems[0].messages))
    rollout = ScriptedRollout(thinking, {without_thinking: [(r"\boxed{204}", True)]})  # answers that prompt only
    result = evaluate(rollout, thinking, problems, SamplingParams(n=2), enable_thinking=False)
    assert result.metrics["avg@2"] == 1.0


def test_oprd_eval_refuses_enable_thinking_without_the_chat_template(tmp_path):
    args = ["eval", str(TINY), "--benchmarks", "aime24", "--no-chat-template", "--disable-thinking"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2
    assert "--no-chat-template turns the template off" in " ".join(result.output.split())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_oprd_eval_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    mini = tmp_path / "mini.jsonl"
    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(3)]
    mini.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval"
    model = str(tiny_model_dir)
    args = ["eval", model, "--benchmarks", f"aime24,{mini}", "--samples", "2", "--max-new-tokens", "8"]
    args += ["--limit", "2", "--batch-size", "4", "--out", str(out)]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Avg@2" in result.output and "Best@2" in result.output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"] == ["aime24", "mini"]
    assert summary["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 8, "n": 2}
    assert summary["enable_thinking"] is None
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 2 * 2 * 2
    for record in records:
        assert set(record) == RECORD_FIELDS and record["model"] == model
        assert 1 <= record["length"] <= 8
    for bench in ("aime24", "mini"):
        rows = [r for r in records if r["benchmark"] == bench]
        metrics = summary["results"][model][bench]
        assert metrics["avg@2"] == pytest.approx(mean(r["correct"] for r in rows))
        assert metrics["format_error_rate"] == pytest.approx(mean(r["extracted_answer"] is None for r in rows))
        assert metrics["truncation_rate"] == pytest.approx(mean(r["truncated"] for r in rows))
        assert metrics["avg_len"] == pytest.approx(mean(r["length"] for r in rows))
        assert (metrics["problems"], metrics["samples"]) == (2, 4)
    report = (out / "results.md").read_text()
    assert "## Avg@2 (%)" in report and "| model | aime24 | mini | Avg. |" in report and f"| {model} |" in report

    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    rerun = runner.invoke(app, args + ["--overwrite"])
    assert rerun.exit_code == 0, rerun.output
    assert read_jsonl(out / "samples.jsonl") == records  # seeded


def write_responses(path: Path) -> Path:
    lines = [
        {"index": 0, "responses": [r"so \boxed{204}", "Answer: 204.0", r"\boxed{205}", "I give up, sorry."]},
        {"index": 1, "response": r"\boxed{25}"},  # single responses, grouped by index
        {"index": 1, "response": r"\boxed{25}", "truncated": True},
        {"index": 1, "response": r"\boxed{025}"},
        {"index": 1, "response": r"\boxed{0.25}"},
        {
            "index": 2,
            "responses": [r"\boxed{1}", r"\boxed{1.0}", r"\boxed{2}", "hmm, not sure"],
            "truncated": [False, False, False, True],
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_oprd_eval_grade_gives_the_expected_numbers(tmp_path):
    responses = write_responses(tmp_path / "vllm-run.jsonl")
    out = tmp_path / "graded"
    result = CliRunner().invoke(app, ["eval", "grade", str(responses), "--data", "aime24", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["length_unit"] == "whitespace tokens"
    assert summary["problems_without_responses"] == 27
    # correct: [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]; the two prose answers are format errors
    assert summary["results"]["vllm-run"]["aime24"] == pytest.approx(
        {
            "avg@4": (2 / 4 + 3 / 4 + 0) / 3,
            "best@4": 2 / 3,
            "maj@4": 2 / 3,  # problem 2's most common answer is the wrong 1 (= 1.0)
            "pass@1": (2 / 4 + 3 / 4 + 0) / 3,
            "pass@2": ((1 - comb(2, 2) / comb(4, 2)) + 1 + 0) / 3,
            "pass@4": 2 / 3,
            "dist-4g": (1 + 0 + 0) / 3,  # only "I give up, sorry." has a 4-gram
            "avg_len": (2 + 2 + 1 + 4 + 4 * 1 + 3 * 1 + 3) / 12,
            "format_error_rate": 2 / 12,
            "truncation_rate": 2 / 12,
            "solve_none": 1,
            "solve_all": 0,
            "grading_timeouts": 0,
            "problems": 3,
            "samples": 12,
            "k": 4,
        }
    )
    records = read_jsonl(out / "samples.jsonl")
    assert [r["correct"] for r in records] == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert all(set(r) == RECORD_FIELDS and r["model"] == "vllm-run" for r in records)
    assert "vllm-run" in (out / "results.md").read_text()


def test_oprd_eval_grade_counts_tokenizer_tokens(tmp_path, tokenizer):
    responses = write_responses(tmp_path / "run.jsonl")
    out = tmp_path / "graded"
    args = ["eval", "grade", str(responses), "--data", "aime24", "--out", str(out), "--tokenizer", str(TINY)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["length_unit"] == f"tokens ({TINY})"
    records = read_jsonl(out / "samples.jsonl")
    lengths = [len(tokenizer(r["response"], add_special_tokens=False).input_ids) for r in records]
    assert summary["results"]["run"]["aime24"]["avg_len"] == pytest.approx(mean(lengths))


def test_user_errors_exit_with_a_message_and_leave_the_out_dir_reusable(tmp_path):
    responses = tmp_path / "bad.jsonl"
    responses.write_text(json.dumps({"index": 30, "response": "1"}) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "grade", str(responses), "--data", "aime24", "--out", str(out)])
    assert result.exit_code == 2 and "not rows of aime24" in result.output
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "no-such-model"), "--limit", "1", "--out", str(out)])
    assert result.exit_code == 2 and "error" in result.output
    result = CliRunner().invoke(app, ["eval", "grade", str(responses), "--data", "nope.parquet", "--out", str(out)])
    assert result.exit_code == 2 and "nope.parquet" in result.output
    assert list(out.iterdir()) == []


def test_a_grading_timeout_is_recorded_in_samples_jsonl(tmp_path):
    from oprd.evaluation.harness import GradeSettings, grade_responses_file

    responses = tmp_path / "slow.jsonl"
    responses.write_text(json.dumps({"index": 0, "responses": [r"\boxed{10^{10^{10}}!}", r"\boxed{204}"]}) + "\n")
    summary = grade_responses_file(GradeSettings(responses=responses, data="aime24", out=tmp_path / "out",
                                                 timeout_s=1.0), console=Console(file=io.StringIO()))
    metrics = summary["results"]["slow"]["aime24"]
    assert metrics["grading_timeouts"] == 1 and metrics["format_error_rate"] == 0
    records = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert [(r["grading_timed_out"], r["correct"]) for r in records] == [(True, False), (False, True)]


@pytest.mark.parametrize("content, message", [
    ('{"index": 0, "response": "1"}\n{"index": 1, "response": \n', "bad.jsonl:2: not valid JSON"),
    (b'{"index": 0, "response": "\xff"}\n', "bad.jsonl:1: not UTF-8 text"),
    ('{"index": 0, "responses": ["1", "2"], "truncated": [true]}\n', "bad.jsonl:1: `truncated` must be"),
    ('{"index": 0, "responses": [1, 2]}\n', "bad.jsonl:1: responses must be strings"),
    ('{"index": "0", "response": "1"}\n', 'expected {"index": int, "responses": [str, ...]}'),
])
def test_malformed_responses_are_located_and_explained(tmp_path, content, message):
    responses = tmp_path / "bad.jsonl"
    responses.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = CliRunner().invoke(app, ["eval", "grade", str(responses), "--data", "aime24", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_a_mistyped_benchmark_lists_the_shipped_ones(tmp_path):
    result = CliRunner().invoke(app, ["eval", "grade", str(write_responses(tmp_path / "r.jsonl")), "--data", "aime2",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "shipped benchmark (aime24, aime25, aimo, amc23, math500)" in output and "did you mean aime25?" in output


def test_an_out_folder_in_use_is_refused_before_anything_is_written(tmp_path):
    """`oprd eval`, `oprd bench` and `oprd bridge sweep` hold their --out as `oprd train` holds its
    output_dir: another command holding it stops them in one line naming the holder."""
    from oprd.files import held_folder

    out = tmp_path / "out"
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"index": 0, "response": "\\boxed{1}"}) + "\n")
    commands = [["eval", "grade", str(responses), "--data", "aime24", "--out", str(out)],
                ["bench", "--preset", "tiny", "--methods", "floor", "--out", str(out)],
                ["bridge", "sweep", "--student", "s", "--teacher", "t", "--data", "aime24", "--out", str(out)]]
    with held_folder(out):
        for command in commands:
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2, (command, result.output)
            assert f"{out} is in use by pid {os.getpid()}" in " ".join(result.output.split()), command
    assert not out.exists()
