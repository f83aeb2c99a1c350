"""Grading math answers: the final answer of a response, compared by value with the ground truth.

  extract_answer     the last \\boxed{} (or a final "Answer:" line), cleaned
  is_correct         extract_answer(response) equals the ground truth by value
  answers_match      two answers compared by value

Equivalence is math-verify's (numbers, fractions, LaTeX expressions, tuples, intervals, sets,
percentages, units). It runs in a child process with a hard deadline per comparison: its own
SIGALRM timeouts work only in the main thread and cannot interrupt long C-level work (sympy
expanding `10^{10^{10}}!` grew to 8 GB before finishing), so one pathological answer could hang
or kill a whole evaluation.
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

GRADE_TIMEOUT_S = 5.0  # wall clock per answer comparison; slower ones are graded wrong
_WORKER = Path(__file__).with_name("grading_worker.py")  # the math-verify child process

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
        # The child runs grading_worker.py as a script, by path: importing it as part of the package
        # would pull in torch and transformers, and the child restarts after every overrun. -I keeps
        # the script's folder (this package's modules) off its import path.
        self._pid = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER)],
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
