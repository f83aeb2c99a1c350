"""Grading math answers: the final answer of a response, compared by value with the ground truth.

  extract_answer     the last \\boxed{} (or a final "Answer:" line), cleaned; linear in the text
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
import re
import select
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

GRADE_TIMEOUT_S = 5.0  # wall clock per response; slower ones are graded wrong and reported as timed out
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `oprd`, for the child's import path

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
    raw = _locate_answer(response)
    cleaned = _clean(raw) if raw is not None else ""
    return cleaned or None, raw is not None and match_here(raw, ground_truth)


def match_here(answer: str, ground_truth: str) -> bool:
    """`answers_match` in this process, with no deadline: what the grading child runs. math-verify
    is not symmetric (the reference's `x=5` accepts 5, a reference 5 does not accept `5=x`); a boxed
    reference is unwrapped."""
    from math_verify import parse, verify

    answer, ground_truth = answer.strip(), (_last_boxed(ground_truth) or ground_truth).strip()
    if not answer or not ground_truth:
        return False
    if _clean(answer).replace(" ", "") == _clean(ground_truth).replace(" ", ""):
        return True
    # math-verify gets the answers as written: `\text{}` keeps "NO" a word, where the product n*o
    # would equal "ON". Its timeouts are off: they are SIGALRM-based; the parent enforces the deadline.
    try:
        gold = parse(f"\\boxed{{{_strip_dollars(ground_truth)}}}", parsing_timeout=None)
        return bool(verify(gold, parse(f"\\boxed{{{_strip_dollars(answer)}}}", parsing_timeout=None),
                           timeout_seconds=None))
    except Exception:
        return False


def _locate_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [m.group(1) for m in _ANSWER_LINE.finditer(text)]
    if lines:
        return lines[-1].strip() or None
    return _bare_answer(text)


_SPACES = re.compile(r"\s*")
_BARE_TOKEN = re.compile(r"[^\s${}]+")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty \\boxed: a balanced {...} group or a bare token
    (`\\boxed 5`); an unclosed one (a truncated response) is skipped.

    One pass over the text pairs every grouping brace with its partner (`\\{` and `\\}` are set
    braces, not grouping), so the cost is linear however many boxes are left open.
    """
    closing = _brace_partners(text)
    for match in reversed(list(_BOXED.finditer(text))):
        start = _SPACES.match(text, match.end()).end()
        if text.startswith("{", start):
            end = closing.get(start)
            content = text[start + 1 : end].strip() if end is not None else None
        else:
            token = _BARE_TOKEN.match(text, start)
            content = token.group(0) if token else None
        if content:
            return content
    return None


def _brace_partners(text: str) -> dict[int, int]:
    """{position of "{": position of its "}"} for every grouping brace that is closed."""
    partners, open_at, i = {}, [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            open_at.append(i)
        elif char == "}" and open_at:
            partners[open_at.pop()] = i
        i += 1
    return partners


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
