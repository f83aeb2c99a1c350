"""Grading math answers and the paper's evaluation metrics.

  extract_answer, is_correct       the last \\boxed{} (or a final "Answer:" line), compared by value
  pass_at_k, distinct_ngrams,      per-benchmark metrics from graded samples
  summarize
  evaluate                         sample through a `Rollout` and grade: the trainer's periodic
                                   validation and `oprd eval`
  run_eval, grade_responses_file   what `oprd eval MODEL...` and `oprd eval grade FILE` do

Equivalence is math-verify's (numbers, fractions, LaTeX expressions, tuples, intervals, sets,
percentages, units). It runs in a child process with a hard deadline per comparison: its own
SIGALRM timeouts work only in the main thread and cannot interrupt long C-level work (sympy
expanding `10^{10^{10}}!` grew to 8 GB before finishing), so one pathological answer could hang
or kill a whole evaluation.
"""

from __future__ import annotations

import atexit
import inspect
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from statistics import mean

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from oprd.data import BENCHMARKS, Problem, load_problems, prompt_token_ids
from oprd.models import ModelSpec, eos_token_ids, load_model, load_tokenizer
from oprd.rollout import HFRollout, Rollout, SamplingParams

GRADE_TIMEOUT_S = 5.0  # wall clock per answer comparison; slower ones are graded wrong

# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_LINE = re.compile(r"\banswer[\s*_]*:[\s*_]*([^\n]*)", re.IGNORECASE)  # DAPO: "Answer: $X"
_PROSE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # two words in a row: a sentence, not an answer
_UNIT = re.compile(  # a trailing unit after a value: "5\text{ cm}^2", "90^\circ"
    r"(?<=[\w}).])\s*(?:\\(?:text|textrm|mbox)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\^\{?[23]\}?)?|\^\s*\{?\\circ\}?|°)\s*$"
)
_TEXT = re.compile(r"\\(?:text|textrm|textbf|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])")


def extract_answer(text: str) -> str | None:
    """The final answer of a response, cleaned for display and voting; None when there is none.

    Looks for the last complete `\\boxed{...}` (nested braces, `\\boxed 5`, `\\fbox{}`), then the last
    "Answer: ..." line (the DAPO prompt format), then accepts a response that is nothing but a short
    answer ("42", "$\\frac{3}{4}$"). Strips `$`, `\\text{}`, units and trailing punctuation:
    `\\boxed{27 \\text{ miles}.}` -> "27".
    """
    raw = _locate_answer(text)
    cleaned = _clean(raw) if raw is not None else ""
    return cleaned or None


def is_correct(response: str, ground_truth: str, *, timeout_s: float = GRADE_TIMEOUT_S) -> bool:
    """Whether the response's final answer equals `ground_truth` by value (142.0 == 142,
    \\frac{3}{4} == 0.75, tuples, intervals, sets, ...). An answer math-verify cannot parse, or one
    whose comparison takes longer than `timeout_s`, is graded wrong rather than raising or hanging."""
    raw = _locate_answer(response)
    return raw is not None and answers_match(raw, ground_truth, timeout_s=timeout_s)


def answers_match(answer: str, ground_truth: str, *, timeout_s: float = GRADE_TIMEOUT_S) -> bool:
    """Value equality of an extracted answer and the reference (math-verify is not symmetric: the
    reference's `x=5` accepts 5, a reference 5 does not accept `5=x`). A boxed reference is unwrapped."""
    answer, ground_truth = answer.strip(), (_last_boxed(ground_truth) or ground_truth).strip()
    if not answer or not ground_truth:
        return False
    if _clean(answer).replace(" ", "") == _clean(ground_truth).replace(" ", ""):
        return True
    # math-verify gets the answers as written: `\text{}` keeps "NO" a word, where the product n*o
    # would equal "ON".
    return _verify(_strip_dollars(answer), _strip_dollars(ground_truth), timeout_s)


def _locate_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [m.group(1) for m in _ANSWER_LINE.finditer(text)]
    if lines:
        return lines[-1].strip() or None
    return _bare_answer(text)


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty \\boxed; an unclosed one (a truncated response) is skipped."""
    for match in reversed(list(_BOXED.finditer(text))):
        content = _boxed_content(text, match.end())
        if content:
            return content
    return None


def _boxed_content(text: str, start: int) -> str | None:
    """What follows `\\boxed` at `start`: a balanced {...} group, or a bare token (`\\boxed 5`)."""
    rest = text[start:].lstrip()
    if not rest.startswith("{"):
        token = re.match(r"[^\s${}]+", rest)
        return token.group(0) if token else None
    depth, i = 0, 0
    while i < len(rest):
        char = rest[i]
        if char == "\\":  # \{ and \} are set braces, not grouping
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i].strip()
        i += 1
    return None


def _bare_answer(text: str) -> str | None:
    """A response that is only an answer: one short line that is not prose."""
    text = text.strip()
    if "\n" in text or len(text) > 100 or _BOXED.search(text) or _PROSE.search(re.sub(r"\\[a-zA-Z]+", " ", text)):
        return None
    return text or None


def _strip_dollars(answer: str) -> str:
    return re.sub(r"(?<!\\)\$", "", answer).strip()  # keeps \$ (currency), which math-verify reads


def _clean(answer: str) -> str:
    """Light normalisation for display, voting and the exact-match shortcut (not for math-verify)."""
    s = _strip_dollars(answer).replace("\\$", "")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()  # \( \) \[ \] delimiters
    s = _UNIT.sub("", s.rstrip(" .,;:"))
    s = _TEXT.sub(r"\1", s)
    s = _SPACING.sub("", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return " ".join(s.split()).rstrip(" .,;:")


# ---------------------------------------------------------------------------------------------
# Equivalence in a killable child process
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=200_000)
def _verify(answer: str, ground_truth: str, timeout_s: float) -> bool:
    return _VERIFIER(answer, ground_truth, timeout_s)


class _Verifier:
    """math-verify in a child process, one comparison at a time, with a hard deadline per comparison.

    The child is started on first use and restarted after a comparison overruns its deadline; a lock
    makes one instance safe to share between threads (math-verify alone is not usable off the main
    thread), and a forked process (a data-loader worker) starts its own child instead of sharing pipes.
    """

    start_timeout_s = 60.0

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()  # the process that started `_proc`
        self._lock = threading.Lock()
        atexit.register(self.close)

    def __call__(self, answer: str, ground_truth: str, timeout_s: float) -> bool:
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps([answer, ground_truth]) + "\n")
                self._proc.stdin.flush()
            except OSError:  # the child died since the last call
                self.close()
                return False
            reply = self._readline(timeout_s)
            if reply is None:  # overran: kill it so the next comparison starts from a fresh child
                self.close()
                return False
            return reply == "1"

    def _start(self) -> None:
        # The child runs the source of `_verify_worker` alone: importing this module would pull in
        # torch and transformers, and the child restarts after every overrun.
        source = inspect.getsource(_verify_worker) + "\n_verify_worker()\n"
        self._pid = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if self._readline(self.start_timeout_s) != "ready":
            self.close()
            command = f"{sys.executable} -c 'import math_verify'"
            raise RuntimeError(f"the grading process did not start; does `{command}` work?")

    def _readline(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        line = self._proc.stdout.readline() if ready else ""
        return line.strip() if line else None

    def close(self) -> None:
        if self._proc is not None and self._pid == os.getpid():
            self._proc.kill()
            self._proc.wait()
        self._proc = None


_VERIFIER = _Verifier()


def _verify_worker() -> None:
    """The child of `_Verifier`: reads JSON [answer, ground_truth] lines, answers "1" or "0" per line.
    Self-contained (its source runs alone in the child)."""
    import json
    import os
    import sys

    from math_verify import parse, verify

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from sympy must not reach the reply pipe
    print("ready", file=replies)
    for line in sys.stdin:
        answer, ground_truth = json.loads(line)
        try:
            # Timeouts off: math-verify's are SIGALRM-based; the parent enforces the deadline.
            gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=None)
            ok = verify(gold, parse(f"\\boxed{{{answer}}}", parsing_timeout=None), timeout_seconds=None)
        except Exception:
            ok = False
        print(int(bool(ok)), file=replies)


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
