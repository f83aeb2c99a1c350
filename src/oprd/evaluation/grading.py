"""Grading math answers: the final answer of a response (`oprd.answers`), compared by value with
the ground truth.

  grade              extract and compare, under a hard deadline: (answer, correct, timed_out)
  is_correct         grade(...).correct
  answers_match      two answers compared by value, under the same deadline

Equivalence is math-verify's (numbers, fractions, LaTeX expressions, tuples, intervals, sets,
percentages, units). Grading runs in a child process (`grading_worker`) with a hard deadline per
response: math-verify's own SIGALRM timeouts work only in the main thread and cannot interrupt
long C-level work (sympy expanding `10^{10^{10}}!` grew to 8 GB before finishing), and the whole
response is handled there, extraction included, so no response of any size or shape can hang or
kill an evaluation. A response whose grading overruns is graded wrong and reported as timed out.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from oprd.answers import clean_answer, last_boxed, locate_answer, strip_dollars

GRADE_TIMEOUT_S = 5.0  # wall clock per response; slower ones are graded wrong and reported as timed out
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `oprd`, for the child's import path

class Grade(NamedTuple):
    answer: str | None  # extract_answer(response); None is a format error (or a timeout)
    correct: bool
    timed_out: bool  # grading overran its deadline: graded wrong, answer unknown


def grade(response: str, ground_truth: str, *, timeout_s: float = GRADE_TIMEOUT_S) -> Grade:
    """The response's final answer and whether it equals `ground_truth` by value (142.0 == 142,
    \\frac{3}{4} == 0.75, tuples, intervals, sets, ...), in the grading child under a deadline of
    `timeout_s`. An answer math-verify cannot parse is graded wrong; one whose grading overruns is
    graded wrong with timed_out=True, never raising or hanging."""
    reply = _ask("grade", response, ground_truth, timeout_s)
    return Grade(None, False, True) if reply is None else Grade(reply[0], bool(reply[1]), False)


def is_correct(response: str, ground_truth: str, *, timeout_s: float = GRADE_TIMEOUT_S) -> bool:
    """Whether the response's final answer equals `ground_truth` by value (see `grade`)."""
    return grade(response, ground_truth, timeout_s=timeout_s).correct


def answers_match(answer: str, ground_truth: str, *, timeout_s: float = GRADE_TIMEOUT_S) -> bool:
    """Value equality of an extracted answer and the reference, in the grading child under a
    deadline (false when it overruns)."""
    reply = _ask("match", answer, ground_truth, timeout_s)
    return reply is not None and bool(reply[1])


def grade_here(response: str, ground_truth: str) -> tuple[str | None, bool]:
    """`grade` in this process, with no deadline: what the grading child runs."""
    raw = locate_answer(response)
    cleaned = clean_answer(raw) if raw is not None else ""
    return cleaned or None, raw is not None and match_here(raw, ground_truth)


def match_here(answer: str, ground_truth: str) -> bool:
    """`answers_match` in this process, with no deadline: what the grading child runs. math-verify
    is not symmetric (the reference's `x=5` accepts 5, a reference 5 does not accept `5=x`); a boxed
    reference is unwrapped."""
    from math_verify import parse, verify

    answer, ground_truth = answer.strip(), (last_boxed(ground_truth) or ground_truth).strip()
    if not answer or not ground_truth:
        return False
    if clean_answer(answer).replace(" ", "") == clean_answer(ground_truth).replace(" ", ""):
        return True
    # math-verify gets the answers as written: `\text{}` keeps "NO" a word, where the product n*o
    # would equal "ON". Its timeouts are off: they are SIGALRM-based; the parent enforces the deadline.
    try:
        gold = parse(f"\\boxed{{{strip_dollars(ground_truth)}}}", parsing_timeout=None)
        return bool(verify(gold, parse(f"\\boxed{{{strip_dollars(answer)}}}", parsing_timeout=None),
                           timeout_seconds=None))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Grading in a killable child process
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8192)
def _ask(kind: str, text: str, ground_truth: str, timeout_s: float) -> tuple[str | None, int] | None:
    return _GRADER(kind, text, ground_truth, timeout_s)


class _Grader:
    """The grading child process: one request at a time, with a hard deadline per request.

    The child is started on first use and restarted after a request overruns its deadline; a lock
    makes one instance safe to share between threads (math-verify alone is not usable off the main
    thread), and a forked process (a data-loader worker) starts its own child instead of sharing pipes.
    """

    start_timeout_s = 60.0

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()  # the process that started `_proc`
        self._lock = threading.Lock()
        atexit.register(self.close)

    def __call__(self, kind: str, text: str, ground_truth: str, timeout_s: float) -> tuple[str | None, int] | None:
        """The child's [answer, correct] reply, or None when it overran `timeout_s` (or died)."""
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps([kind, text, ground_truth]) + "\n")
                self._proc.stdin.flush()
            except OSError:  # the child died since the last call
                self.close()
                return None
            reply = self._readline(timeout_s)
            if reply is None:  # overran: kill it so the next request starts from a fresh child
                self.close()
                return None
            answer, correct = json.loads(reply)
            return answer, correct

    def _start(self) -> None:
        # The child imports only this module and math-verify (no torch, no transformers), so a
        # restart after an overrun is quick; -I keeps the user's site and working folder out of it.
        self._pid = os.getpid()
        bootstrap = (f"import sys; sys.path.insert(0, {str(_PACKAGE_ROOT)!r}); "
                     "from oprd.evaluation.grading_worker import main; main()")
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", bootstrap],
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


_GRADER = _Grader()
