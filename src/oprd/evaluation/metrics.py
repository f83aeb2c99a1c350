"""The paper's evaluation metrics, from graded samples: Avg@k, Best@k, unbiased pass@k, maj@k,
Dist-4g, average length, format-error and truncation rates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean


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
    timed_out: bool = False  # grading overran its deadline: graded wrong, answer unknown


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
        "format_error_rate": mean(s.answer is None and not s.timed_out for s in samples),
        "truncation_rate": mean(s.truncated for s in samples),
        "solve_none": sum(not any(c) for c in correct),
        "solve_all": sum(all(c) for c in correct),
        "grading_timeouts": sum(s.timed_out for s in samples),
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
