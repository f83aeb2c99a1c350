"""The paper's evaluation metrics, and sampling and grading whole benchmarks.

  pass_at_k, distinct_ngrams,      per-benchmark metrics from graded samples
  summarize
  evaluate                         sample through a `Rollout` and grade: the trainer's periodic
                                   validation and `oprd eval`
  run_eval, grade_responses_file   what `oprd eval MODEL...` and `oprd eval grade FILE` do

Answers are graded by `oprd.grading` (math-verify in a child process with a hard deadline);
its functions are re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from oprd.data import BENCHMARKS, Problem, load_problems, prompt_token_ids
from oprd.grading import GRADE_TIMEOUT_S, answers_match, extract_answer, is_correct  # noqa: F401  (re-exported)
from oprd.models import ModelSpec, eos_token_ids, load_model, load_tokenizer
from oprd.rollout import HFRollout, Rollout, SamplingParams


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_ngrams(texts: list[str], n: int = 4) -> float:
    """Unique / total n-grams of whitespace tokens, pooled over `texts` (n-grams never span two
    texts); 0.0 when no text has n tokens."""
    grams = [tuple(tokens[i : i + n]) for tokens in (t.split() for t in texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class GradedSample:
    response: str
    answer: str | None  # extract_answer(response); None is a format error
    correct: bool
    length: int  # response tokens
    truncated: bool  # stopped by the token limit, not by EOS


def pass_ks(n: int) -> list[int]:
    """The k of the pass@k columns: 1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks + [n] if ks[-1] != n else ks


def summarize(problems: list[list[GradedSample]]) -> dict[str, float]:
    """Per-benchmark metrics from each problem's graded samples.

    k is the number of samples per problem (the smallest, should they differ). Rates are fractions
    in [0, 1]: avg@k is the mean accuracy (per problem, then over problems), best@k the share of
    problems with a correct sample, pass@k the unbiased estimator, maj@k the share whose most common
    answer is correct. dist-4g is the mean over problems of distinct_ngrams over that problem's
    samples; avg_len is in tokens.
    """
    if not problems or not all(problems):
        raise ValueError("summarize needs at least one problem and one sample per problem")
    k = min(len(p) for p in problems)
    correct = [[s.correct for s in p] for p in problems]
    samples = [s for p in problems for s in p]
    return {
        f"avg@{k}": mean(mean(c) for c in correct),
        f"best@{k}": mean(any(c) for c in correct),
        f"maj@{k}": mean(majority_correct(p) for p in problems),
        **{f"pass@{j}": mean(pass_at_k(len(c), sum(c), j) for c in correct) for j in pass_ks(k)},
        "dist-4g": mean(distinct_ngrams([s.response for s in p], 4) for p in problems),
        "avg_len": mean(s.length for s in samples),
        "format_error_rate": mean(s.answer is None for s in samples),
        "truncation_rate": mean(s.truncated for s in samples),
        "solve_none": sum(not any(c) for c in correct),
        "solve_all": sum(all(c) for c in correct),
        "problems": len(problems),
        "samples": len(samples),
        "k": k,
    }


def majority_correct(samples: list[GradedSample]) -> bool:
    """Whether the most common answer among the samples is correct (ties: the one seen first).

    Correct answers all equal the ground truth by value, so they are one vote; wrong answers are
    grouped by their normalised text (`extract_answer`'s cleaning, spaces dropped): comparing them
    pairwise by value costs seconds per problem when answers are symbolic.
    """
    votes: dict[object, int] = {}  # insertion order is first appearance
    for sample in samples:
        if sample.answer is not None:
            key = True if sample.correct else sample.answer.replace(" ", "")
            votes[key] = votes.get(key, 0) + 1
    return bool(votes) and max(votes, key=votes.get) is True


# ---------------------------------------------------------------------------------------------
# Sampling and grading a benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: dict[str, float]  # summarize()
    samples: list[dict]  # one record per response, grouped by problem: see `sample_records`


def make_progress(console: Console | None = None) -> Progress:
    """A rich progress display whose tasks show the running accuracy (`evaluate(progress=...)`)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )


def evaluate(
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    params: SamplingParams,
    *,
    seed: int = 0,
    use_chat_template: bool = True,
    batch_size: int = 64,
    timeout_s: float = GRADE_TIMEOUT_S,
    progress: Progress | None = None,
    description: str = "eval",
) -> EvalResult:
    """Samples `params.n` responses per problem, grades them and summarises.

    Generation runs in chunks of about `batch_size` sequences so `progress` can show the running
    accuracy. Sampling is seeded with `seed` inside `torch.random.fork_rng`: the caller's RNG stream
    (which a trainer checkpoints for exact resume) is left as it was.
    """
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if any(p.answer is None for p in problems):
        raise ValueError("every problem needs a ground-truth answer to be evaluated (see --answer-key)")
    prompts = [prompt_token_ids(tokenizer, p.messages, use_chat_template=use_chat_template) for p in problems]
    per_chunk = max(1, batch_size // params.n)
    task = progress.add_task(description, total=len(problems), acc="-") if progress else None
    graded: list[list[GradedSample]] = []
    # Only the current GPU: fork_rng would otherwise initialise every visible device.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        for start in range(0, len(problems), per_chunk):
            chunk = problems[start : start + per_chunk]
            batch = rollout.generate(prompts[start : start + per_chunk], params)
            texts = tokenizer.batch_decode(batch.responses(), skip_special_tokens=True)
            rows = [[] for _ in chunk]
            for text, i, length, truncated in zip(
                texts, batch.prompt_index.tolist(), batch.response_lengths.tolist(), batch.truncated.tolist()
            ):
                rows[i].append(grade(text, chunk[i].answer, length=length, truncated=truncated, timeout_s=timeout_s))
            graded += rows
            if progress:
                accuracy = mean(s.correct for p in graded for s in p)
                progress.update(task, advance=len(chunk), acc=f"{100 * accuracy:.1f}%")
    return EvalResult(summarize(graded), sample_records(problems, graded))


def grade(
    response: str, ground_truth: str, *, length: int, truncated: bool = False, timeout_s: float = GRADE_TIMEOUT_S
) -> GradedSample:
    """One response, extracted and graded."""
    return GradedSample(
        response=response,
        answer=extract_answer(response),
        correct=is_correct(response, ground_truth, timeout_s=timeout_s),
        length=length,
        truncated=truncated,
    )


def sample_records(problems: list[Problem], graded: list[list[GradedSample]]) -> list[dict]:
    """samples.jsonl rows: index (row of the benchmark), sample, response, extracted_answer,
    ground_truth, correct, length, truncated."""
    return [
        {
            "index": problem.index,
            "sample": j,
            "response": s.response,
            "extracted_answer": s.answer,
            "ground_truth": problem.answer,
            "correct": s.correct,
            "length": s.length,
            "truncated": s.truncated,
        }
        for problem, samples in zip(problems, graded)
        for j, s in enumerate(samples)
    ]


# ---------------------------------------------------------------------------------------------
# `oprd eval`: models x benchmarks, or responses made elsewhere; summary.json, samples.jsonl, results.md
# ---------------------------------------------------------------------------------------------


def run_eval(
    models: list[str],
    benchmarks: list[str],
    out_dir: str | Path,
    *,
    params: SamplingParams,
    seed: int = 0,
    batch_size: int = 64,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    use_chat_template: bool = True,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> dict:
    """Evaluates every model (hub id or local dir) on every benchmark (shipped name or file) and
    writes the report to `out_dir`; returns the summary (also summary.json)."""
    out = prepare_out_dir(out_dir, overwrite)
    data = {
        benchmark_label(b): load_problems(b, prompt_key=prompt_key, answer_key=answer_key, limit=limit)
        for b in benchmarks
    }
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    summary = {
        "models": list(models),
        "benchmarks": list(data),
        "sampling": asdict(params),
        "seed": seed,
        "length_unit": "tokens",
        "results": {},
    }
    with make_progress() as progress:
        for name in models:
            spec = ModelSpec(model=name, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(spec)
            model = load_model(spec, device)
            rollout = HFRollout(
                model,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_ids=eos_token_ids(model, tokenizer),
                vocab_size=len(tokenizer),
                max_batch_sequences=batch_size,
            )
            for bench, problems in data.items():
                result = evaluate(
                    rollout,
                    tokenizer,
                    problems,
                    params,
                    seed=seed,
                    use_chat_template=use_chat_template,
                    batch_size=batch_size,
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


def grade_responses_file(
    responses_path: str | Path,
    data: str,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    overwrite: bool = False,
    timeout_s: float = GRADE_TIMEOUT_S,
    console: Console | None = None,
) -> dict:
    """Grades responses sampled elsewhere (e.g. by vLLM) against the benchmark `data` and writes the
    same report as `run_eval`. Lengths are tokens of `tokenizer` when given, else whitespace tokens."""
    out = prepare_out_dir(out_dir, overwrite)
    problems = load_problems(data, prompt_key=prompt_key, answer_key=answer_key)
    responses = read_responses(responses_path)
    unknown = [i for i in responses if not 0 <= i < len(problems)]
    if unknown:
        raise ValueError(f"{responses_path}: indices {unknown[:10]} are not rows of {data} ({len(problems)} rows)")
    if tokenizer:
        tok = load_tokenizer(ModelSpec(model=tokenizer))
        count_tokens, length_unit = (lambda t: len(tok(t, add_special_tokens=False).input_ids)), f"tokens ({tokenizer})"
    else:
        count_tokens, length_unit = (lambda t: len(t.split())), "whitespace tokens"
    graded_problems = [problems[i] for i in sorted(responses)]
    graded = []
    with make_progress() as progress:
        task = progress.add_task(f"grading {Path(responses_path).name}", total=len(graded_problems), acc="-")
        for problem in graded_problems:
            graded.append(
                [
                    grade(text, problem.answer, length=count_tokens(text), truncated=cut, timeout_s=timeout_s)
                    for text, cut in responses[problem.index]
                ]
            )
            accuracy = mean(s.correct for p in graded for s in p)
            progress.update(task, advance=1, acc=f"{100 * accuracy:.1f}%")
    label, bench = Path(responses_path).stem, benchmark_label(data)
    summary = {
        "models": [label],
        "benchmarks": [bench],
        "responses": str(responses_path),
        "data": data,
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
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("index"), int) or not ("responses" in row or "response" in row):
                expected = '{"index": int, "responses": [str, ...]} or {"index": int, "response": str}'
                raise ValueError(f"{path}:{number}: expected {expected}")
            texts = row["responses"] if "responses" in row else [row["response"]]
            truncated = row.get("truncated", False)
            flags = truncated if isinstance(truncated, list) else [truncated] * len(texts)
            grouped.setdefault(row["index"], []).extend(zip(texts, map(bool, flags), strict=True))
    if not grouped:
        raise ValueError(f"{path} has no responses")
    return grouped


def benchmark_label(path: str) -> str:
    return path if path in BENCHMARKS else Path(path).stem


REPORT_FILES = ("summary.json", "samples.jsonl", "results.md")


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """An empty (or, with `overwrite`, cleared of old reports) output dir; files appear as results
    come, so a run that fails before its first result leaves the dir empty and reusable."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    return out


def append_samples(out: Path, model: str, benchmark: str, records: list[dict]) -> None:
    with open(out / "samples.jsonl", "a") as f:
        for record in records:
            f.write(json.dumps({"model": model, "benchmark": benchmark, **record}) + "\n")


def write_report(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(summary))


# Headline tables: (metric key, title); k is the samples per problem.
HEADLINE_METRICS = [
    ("avg@{k}", "Avg@{k} (%)"),
    ("best@{k}", "Best@{k} (%)"),
    ("maj@{k}", "Maj@{k} (%)"),
    ("dist-4g", "Dist-4g (%)"),
    ("avg_len", "Avg Len ({unit})"),
    ("format_error_rate", "Format errors (%)"),
    ("truncation_rate", "Truncated (%)"),
]
COUNTS = ("solve_none", "solve_all", "problems", "samples", "k")


def metric_tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the report: one table per headline metric with models as rows and
    benchmarks (and their average) as columns, like the paper's Tables 2 and 4-5; then one table
    per benchmark with every metric."""
    results, benchmarks = summary["results"], summary["benchmarks"]
    cells = {(model, bench): m for model, by_bench in results.items() for bench, m in by_bench.items()}
    k = next(iter(cells.values()), {}).get("k", "k")
    tables = []
    for key, title in HEADLINE_METRICS:
        rows = []
        for model in results:
            values = [_headline(cells.get((model, b)), key) for b in benchmarks]
            average = None if None in values else mean(values)
            rows.append([model, *(_format(key, v) for v in [*values, average])])
        tables.append((title.format(k=k, unit=summary["length_unit"]), ["model", *benchmarks, "Avg."], rows))
    for bench in benchmarks:
        models = [model for model in results if (model, bench) in cells]
        keys = list(dict.fromkeys(key for model in models for key in cells[model, bench]))
        header = ["model", *(key if key in COUNTS or key == "avg_len" else f"{key} (%)" for key in keys)]
        rows = [[model, *(_format(key, cells[model, bench].get(key)) for key in keys)] for model in models]
        tables.append((f"{bench}: all metrics", header, rows))
    return tables


def _headline(metrics: dict | None, key: str) -> float | None:
    return None if metrics is None else metrics.get(key.format(k=metrics["k"]))


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key in COUNTS:
        return str(int(value))
    if key == "avg_len":
        return f"{value:.0f}"
    return f"{100 * value:.1f}"


def results_markdown(summary: dict) -> str:
    settings = ", ".join(f"{key}: {json.dumps(value)}" for key, value in summary.items() if key != "results")
    lines = ["# Evaluation results", "", settings, ""]
    for title, header, rows in metric_tables(summary):
        lines += [f"## {title}", "", _md_row(header), _md_row(["---"] * len(header)), *map(_md_row, rows), ""]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def print_tables(console: Console, summary: dict, out: Path) -> None:
    """The Avg@k and Best@k tables on the console; the rest is in results.md."""
    for title, header, rows in metric_tables(summary)[:2]:
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"full report: {out / 'results.md'}")
