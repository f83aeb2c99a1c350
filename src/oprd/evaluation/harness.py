"""Sampling and grading whole benchmarks.

  evaluate               sample through a `Rollout`, grade, summarise: the trainer's periodic
                         validation and `oprd eval`
  run_eval               `oprd eval MODEL...` (EvalSettings): models x benchmarks, with a report
  grade_responses_file   `oprd eval grade FILE` (GradeSettings): responses sampled elsewhere

Answers are graded by `grading` (math-verify in a child process with a hard deadline), the metrics
come from `metrics`, the report files from `reports`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import PreTrainedTokenizerBase

from oprd.data import BENCHMARKS, Problem, load_problems, prompt_token_ids, read_jsonl
from oprd.display import progress_bar
from oprd.distributed import ONE_PROCESS, World
from oprd.evaluation.grading import GRADE_TIMEOUT_S, grade
from oprd.evaluation.metrics import GradedSample, summarize
from oprd.evaluation.reports import append_samples, prepare_report_dir, print_tables, write_report
from oprd.files import holding_out
from oprd.models import ModelSpec, check_source, load_model, load_tokenizer, resolve_device
from oprd.rollout import HFRollout, Rollout, SamplingParams, kv_cache_budget, seeded


@dataclass
class EvalResult:
    metrics: dict[str, float]  # summarize()
    samples: list[dict]  # one record per response, grouped by problem: see `sample_records`


def evaluate(
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    params: SamplingParams,
    *,
    seed: int = 0,
    use_chat_template: bool = True,
    enable_thinking: bool | None = None,
    batch_size: int = 64,
    timeout_s: float = GRADE_TIMEOUT_S,
    progress: Progress | None = None,
    description: str = "eval",
    world: World = ONE_PROCESS,
) -> EvalResult:
    """Samples `params.n` responses per problem, grades them and summarises.

    Generation runs in chunks of about `batch_size` sequences so `progress` (`display.progress_bar`)
    can show the running accuracy. Sampling is seeded with `seed` (`rollout.seeded`): the caller's
    RNG stream (which a trainer checkpoints for exact resume) is left as it was. Prompts are made by
    `data.prompt_token_ids` (`use_chat_template`, `enable_thinking`). Under several processes each
    samples and grades its share of the problems (`share`), and every process returns the whole
    result; with sampling noise (temperature > 0) the samples then depend on the number of processes.
    """
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if any(p.answer is None for p in problems):
        raise ValueError("every problem needs a ground-truth answer to be evaluated (see --answer-key)")
    prompts = [prompt_token_ids(tokenizer, p.messages, use_chat_template=use_chat_template,
                                enable_thinking=enable_thinking) for p in problems]
    per_chunk = max(1, batch_size // params.n)
    mine, padded = share(len(problems), world)
    task = progress.add_task(description, total=len(padded), status="acc -") if progress else None
    graded: list[list[GradedSample]] = []
    with seeded(seed):
        for start in range(0, len(padded), per_chunk):
            chunk = [problems[i] for i in padded[start : start + per_chunk]]
            batch = rollout.generate([prompts[i] for i in padded[start : start + per_chunk]], params)
            texts = tokenizer.batch_decode(batch.responses(), skip_special_tokens=True)
            rows = [[] for _ in chunk]
            for text, i, length, truncated in zip(
                texts, batch.prompt_index.tolist(), batch.response_lengths.tolist(), batch.truncated.tolist()
            ):
                rows[i].append(grade_sample(text, chunk[i].answer, length=length, truncated=truncated,
                                            timeout_s=timeout_s))
            graded += rows
            if progress:
                accuracy = mean(s.correct for p in graded for s in p)
                progress.update(task, advance=len(chunk), status=f"acc {100 * accuracy:.1f}%")
    if world.distributed:
        parts = world.gather(graded[: len(mine)])  # part r holds problems r, r + size, ...
        graded = [parts[i % world.size][i // world.size] for i in range(len(problems))]
    return EvalResult(summarize(graded), sample_records(problems, graded))


def share(count: int, world: World) -> tuple[list[int], list[int]]:
    """The problems this process samples (every `size`-th from its rank) and the same padded with
    repeats to as many as any process has: a sharded student generates in step, so every process
    makes as many generate calls as the others; the repeats' results are dropped."""
    mine = list(range(world.rank, count, world.size))
    rounds = -(-count // world.size)
    return mine, mine + [mine[0] if mine else 0] * (rounds - len(mine))


def grade_sample(
    response: str, ground_truth: str, *, length: int, truncated: bool = False, timeout_s: float = GRADE_TIMEOUT_S
) -> GradedSample:
    """One response, extracted and graded under the grader's deadline."""
    answer, correct, timed_out = grade(response, ground_truth, timeout_s=timeout_s)
    return GradedSample(response=response, answer=answer, correct=correct, length=length, truncated=truncated,
                        timed_out=timed_out)


def sample_records(problems: list[Problem], graded: list[list[GradedSample]]) -> list[dict]:
    """samples.jsonl rows: index (row of the benchmark), sample, response, extracted_answer,
    ground_truth, correct, grading_timed_out, length, truncated."""
    return [
        {
            "index": problem.index,
            "sample": j,
            "response": s.response,
            "extracted_answer": s.answer,
            "ground_truth": problem.answer,
            "correct": s.correct,
            "grading_timed_out": s.timed_out,
            "length": s.length,
            "truncated": s.truncated,
        }
        for problem, samples in zip(problems, graded)
        for j, s in enumerate(samples)
    ]


@dataclass(frozen=True)
class EvalSettings:
    """`oprd eval MODEL...`: every model (hub id or local dir) on every benchmark (shipped name or
    file), sampled with `sampling`, reported in `out`."""

    models: list[str]
    benchmarks: list[str]
    out: Path
    sampling: SamplingParams
    seed: int = 0
    batch_size: int = 64  # sequences per generate() call at most
    kv_cache_gib: float = 0.0  # KV cache one generate() call may hold; 0 = a quarter of the device's memory
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    use_chat_template: bool = True
    enable_thinking: bool | None = None  # handed to the chat template when set (`data.prompt_token_ids`)
    prompt_key: str | None = None
    answer_key: str | None = None
    limit: int | None = None  # the first N problems of each benchmark
    overwrite: bool = False
    vllm_url: str | None = None  # sample through this vLLM server, which loads each model's weights in turn

    def __post_init__(self) -> None:
        if self.vllm_url and not all(Path(model).is_dir() for model in self.models):
            raise ValueError("--backend vllm reloads each model's weights into the server from its folder: give "
                             "local model folders (of the architecture the server runs)")
        if self.enable_thinking is not None and not self.use_chat_template:
            raise ValueError("--enable-thinking/--disable-thinking set a chat-template variable, but "
                             "--no-chat-template turns the template off: drop one of them")


@holding_out
def run_eval(settings: EvalSettings, console: Console | None = None) -> dict:
    """Evaluates every model on every benchmark and writes the report; returns the summary (also
    summary.json)."""
    s = settings
    for model in s.models:
        check_source(model, "model")
    out = prepare_report_dir(s.out, s.overwrite)
    data = {
        benchmark_label(b): load_problems(b, prompt_key=s.prompt_key, answer_key=s.answer_key, limit=s.limit,
                                          need_answers=True, warn=(console or Console(stderr=True)).print)
        for b in s.benchmarks
    }
    device = resolve_device(s.device)
    summary = {
        "models": list(s.models),
        "benchmarks": list(data),
        "sampling": asdict(s.sampling),
        "enable_thinking": s.enable_thinking,
        "backend": f"vllm ({s.vllm_url})" if s.vllm_url else "transformers generate",
        "seed": s.seed,
        "length_unit": "tokens",
        "results": {},
    }
    with progress_bar() as progress:
        for name in s.models:
            spec = ModelSpec(model=name, dtype=s.dtype, trust_remote_code=s.trust_remote_code)
            tokenizer = load_tokenizer(spec)
            model = rollout = None
            if s.vllm_url:
                from oprd.vllm_backend import Sampling, ServerRollout

                rollout = ServerRollout(s.vllm_url, Sampling.of_folder(name, tokenizer),
                                        weights_dir=out / ".vllm-weights")  # a tied head named apart
                rollout.load_folder(Path(name))
            else:
                model = load_model(spec, device)
                budget = kv_cache_budget(device, s.kv_cache_gib)
                summary["kv_cache_gib"] = budget / 2**30
                rollout = HFRollout.for_model(model, tokenizer, s.batch_size, kv_cache_bytes=budget)
            for bench, problems in data.items():
                result = evaluate(
                    rollout,
                    tokenizer,
                    problems,
                    s.sampling,
                    seed=s.seed,
                    use_chat_template=s.use_chat_template,
                    enable_thinking=s.enable_thinking,
                    batch_size=s.batch_size,
                    progress=progress,
                    description=f"{name} | {bench}",
                )
                summary["results"].setdefault(name, {})[bench] = result.metrics
                append_samples(out, name, bench, result.samples)
                write_report(out, summary)  # after every benchmark, so a crash keeps what finished
            del model, rollout
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_tables(console or Console(), summary, out)
    return summary


@dataclass(frozen=True)
class GradeSettings:
    """`oprd eval grade FILE`: responses sampled elsewhere, the benchmark their indices refer to."""

    responses: Path
    data: str
    out: Path
    tokenizer: str | None = None  # count lengths in this tokenizer's tokens (default: whitespace tokens)
    prompt_key: str | None = None
    answer_key: str | None = None
    overwrite: bool = False
    timeout_s: float = GRADE_TIMEOUT_S


@holding_out
def grade_responses_file(settings: GradeSettings, console: Console | None = None) -> dict:
    """Grades responses sampled elsewhere (e.g. by vLLM) against the benchmark and writes the same
    report as `run_eval`."""
    s = settings
    out = prepare_report_dir(s.out, s.overwrite)
    problems = load_problems(s.data, prompt_key=s.prompt_key, answer_key=s.answer_key, need_answers=True,
                             warn=(console or Console(stderr=True)).print)
    responses = read_responses(s.responses)
    unknown = [i for i in responses if not 0 <= i < len(problems)]
    if unknown:
        raise ValueError(f"{s.responses}: indices {unknown[:10]} are not rows of {s.data} ({len(problems)} rows)")
    if s.tokenizer:
        tok = load_tokenizer(ModelSpec(model=s.tokenizer))
        count_tokens = lambda t: len(tok(t, add_special_tokens=False).input_ids)
        length_unit = f"tokens ({s.tokenizer})"
    else:
        count_tokens, length_unit = (lambda t: len(t.split())), "whitespace tokens"
    graded_problems = [problems[i] for i in sorted(responses)]
    graded = []
    with progress_bar() as progress:
        task = progress.add_task(f"grading {s.responses.name}", total=len(graded_problems), status="acc -")
        for problem in graded_problems:
            graded.append(
                [
                    grade_sample(text, problem.answer, length=count_tokens(text), truncated=cut, timeout_s=s.timeout_s)
                    for text, cut in responses[problem.index]
                ]
            )
            accuracy = mean(sample.correct for p in graded for sample in p)
            progress.update(task, advance=1, status=f"acc {100 * accuracy:.1f}%")
    label, bench = s.responses.stem, benchmark_label(s.data)
    summary = {
        "models": [label],
        "benchmarks": [bench],
        "responses": str(s.responses),
        "data": s.data,
        "length_unit": length_unit,
        "problems_without_responses": len(problems) - len(graded_problems),
        "results": {label: {bench: summarize(graded)}},
    }
    append_samples(out, label, bench, sample_records(graded_problems, graded))
    write_report(out, summary)
    print_tables(console or Console(), summary, out)
    return summary


def read_responses(path: str | Path) -> dict[int, list[tuple[str, bool]]]:
    """{index: [(response, truncated), ...]} from JSONL lines `{"index": i, "responses": [...]}` or
    `{"index": i, "response": "..."}` (grouped by index); an optional `truncated` field (a bool, or a
    list beside `responses`) marks responses cut by a token limit."""
    grouped: dict[int, list[tuple[str, bool]]] = {}
    expected = '{"index": int, "responses": [str, ...]} or {"index": int, "response": str}'
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict) or not isinstance(row.get("index"), int) or not (
                "responses" in row or "response" in row):
            raise ValueError(f"{where}: expected {expected}")
        texts = row["responses"] if "responses" in row else [row["response"]]
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"{where}: responses must be strings; expected {expected}")
        truncated = row.get("truncated", False)
        flags = truncated if isinstance(truncated, list) else [truncated] * len(texts)
        if len(flags) != len(texts) or not all(isinstance(flag, bool) for flag in flags):
            raise ValueError(f"{where}: `truncated` must be a bool or a list of one bool per response "
                             f"({len(texts)} responses, got {truncated!r})")
        grouped.setdefault(row["index"], []).extend(zip(texts, flags))
    if not grouped:
        raise ValueError(f"{path} has no responses")
    return grouped


def benchmark_label(path: str) -> str:
    return path if path in BENCHMARKS else Path(path).stem
