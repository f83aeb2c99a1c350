"""The final answer of a math response: the last \\boxed{} (or a final "Answer:" line), cleaned.
Linear in the text. Used to read ground truths from a data file's solutions (`oprd.data`) and to
grade responses (`oprd.evaluation.grading`, which compares answers by value).

  extract_answer   the final answer, cleaned for display and voting; None when there is none
  locate_answer    the raw text of the final answer
  last_boxed       the content of the last complete \\boxed
  clean_answer     light normalisation (dollars, \\text{}, units, spacing, trailing punctuation)
"""

from __future__ import annotations

import re

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
    raw = locate_answer(text)
    cleaned = clean_answer(raw) if raw is not None else ""
    return cleaned or None


def locate_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [m.group(1) for m in _ANSWER_LINE.finditer(text)]
    if lines:
        return lines[-1].strip() or None
    return _bare_answer(text)


_SPACES = re.compile(r"\s*")
_BARE_TOKEN = re.compile(r"[^\s${}]+")


def last_boxed(text: str) -> str | None:
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


def strip_dollars(answer: str) -> str:
    return re.sub(r"(?<!\\)\$", "", answer).strip()  # keeps \$ (currency), which math-verify reads


def clean_answer(answer: str) -> str:
    """Light normalisation for display, voting and the exact-match shortcut (not for math-verify)."""
    s = strip_dollars(answer).replace("\\$", "")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()  # \( \) \[ \] delimiters
    s = _UNIT.sub("", s.rstrip(" .,;:"))
    s = _TEXT.sub(r"\1", s)
    s = _SPACING.sub("", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return " ".join(s.split()).rstrip(" .,;:")
