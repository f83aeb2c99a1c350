"""Evaluation with the paper's metrics: grading answers by value, the metrics, the benchmark
harness (`oprd.evaluation.harness`), its reports (`oprd.evaluation.reports`) and the trainer's
validation (`oprd.evaluation.validation`).

This face holds what needs neither torch nor a model: answer extraction (`oprd.answers`) and
grading, and the metric formulas.
"""

from oprd.answers import extract_answer
from oprd.evaluation.grading import (
    GRADE_TIMEOUT_S,
    Grade,
    answers_match,
    grade,
    is_correct,
)
from oprd.evaluation.metrics import (
    GradedSample,
    distinct_ngrams,
    majority_correct,
    pass_at_k,
    pass_ks,
    summarize,
)

__all__ = [
    "GRADE_TIMEOUT_S", "Grade", "GradedSample", "answers_match", "distinct_ngrams", "extract_answer", "grade",
    "is_correct", "majority_correct", "pass_at_k", "pass_ks", "summarize",
]
