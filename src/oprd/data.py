"""Problems (a chat prompt and, for evaluation, a ground-truth answer) from files, shipped
benchmarks or the hub, shared by training and evaluation; and the training prompts, tokenised for
each model and drawn in a resumable order.

Two layouts are recognised without configuration:
  verl   `prompt` is a list of chat messages, the answer sits in `reward_model.ground_truth`
  plain  a text column (`problem`, `question`, `prompt`, `instruction`) and an answer column
         (`answer`, `ground_truth`, or `solution`, whose last \\boxed{} is the answer)
`prompt_key` / `answer_key` (dotted for nested fields) override the detection.
"""

from __future__ import annotations

import difflib
import json
import string
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from oprd.answers import extract_answer
from oprd.models import HUB_ID, hub_reachable

BENCHMARKS = ("aime24", "aime25", "aimo", "amc23", "math500")  # shipped in oprd/benchmarks/
FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
TEXT_KEYS = ("problem", "question", "prompt", "instruction")
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "ground_truth", "solution")


@dataclass
class Problem:
    index: int  # row in the source file
    messages: list[dict]  # chat messages [{"role": ..., "content": ...}]
    answer: str | None  # ground truth if the file has one
    source: str | None = None  # the `data_source` column, if any
    row: dict = field(default_factory=dict, repr=False, compare=False)  # every column, for templates and routing

    def column(self, key: str) -> Any:
        """The value of a data column (dotted for nested fields: `reward_model.ground_truth`); a
        column the row lacks is an error that lists the ones it has."""
        value = _get(self.row, key)
        if value is _MISSING:
            raise ValueError(f"data row {self.index} has no column {key!r}; columns found: {_columns(self.row)}")
        return value

    def privileged_messages(self, template: str) -> list[dict]:
        """The chat messages a teacher reads in place of the student's: the last user turn
        rewritten by `template`, where {prompt} is that turn's text, {answer} the row's answer
        column (or the answer the loader found, e.g. in reward_model.ground_truth) and any other
        {name} the data column of that name (dotted for nested fields)."""
        last_user = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        values = {"prompt": self.messages[last_user]["content"]}
        if _get(self.row, "answer") is _MISSING and self.answer is not None:
            values["answer"] = self.answer
        text = "".join(literal + ("" if name is None else
                                  format(values[name] if name in values else self.column(name), spec or ""))
                       for literal, name, spec, _ in string.Formatter().parse(template))
        return [*self.messages[:last_user], {"role": "user", "content": text}, *self.messages[last_user + 1:]]


def load_problems(
    path: str,
    *,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    split: str = "train",
    limit: int | None = None,
    need_answers: bool = False,
    warn: Callable[[str], object] = warnings.warn,
) -> list[Problem]:
    """Problems from a .parquet/.jsonl/.json file, a shipped benchmark name (`aime24`, ...)
    or a hub dataset id (`split` picks the hub split). `limit` keeps the first rows. Rows whose
    prompt is blank (and, with `need_answers`, whose answer is: to grade, or for a privileged
    prompt) are left out with a `warn`ing (`without_blanks`)."""
    rows = _read_rows(path, split)
    if not rows:
        raise ValueError(f"{path} has no rows")
    rows = rows[:limit] if limit is not None else rows
    if not rows:  # limit=0
        return []
    prompt_key = prompt_key or _detect_prompt_key(rows[0], path)
    answer_key = answer_key or next((k for k in ANSWER_KEYS if _get(rows[0], k) is not _MISSING), None)
    for key in (prompt_key, answer_key):
        if key is not None and _get(rows[0], key) is _MISSING:
            raise ValueError(f"{path}: no field {key!r}; columns found: {_columns(rows[0])}")
    problems = [
        Problem(
            index=i,
            messages=_messages(_get(row, prompt_key), f"{path} row {i}"),
            answer=_answer(_get(row, answer_key), from_solution=answer_key == "solution") if answer_key else None,
            source=row.get("data_source"),
            row=row,
        )
        for i, row in enumerate(rows)
    ]
    return without_blanks(problems, path, need_answers=need_answers, warn=warn)


def without_blanks(problems: list[Problem], path: str, *, need_answers: bool,
                   warn: Callable[[str], object]) -> list[Problem]:
    """`problems` less those with nothing to train on or grade: a prompt whose every message is
    empty or whitespace, and (with `need_answers`) an answer that is missing or blank. A warning
    counts them and names the first rows; a file with none left is an error."""
    def blank(text) -> bool:
        return text is None or not str(text).strip()

    reasons = {"blank prompt": [p.index for p in problems if all(blank(m["content"]) for m in p.messages)]}
    if need_answers:
        reasons["blank answer"] = [p.index for p in problems if blank(p.answer)]
    dropped = {index for rows in reasons.values() for index in rows}
    if not dropped:
        return problems
    kept = [p for p in problems if p.index not in dropped]
    found = "; ".join(f"{len(rows)} with a {reason} (row{'s' if len(rows) > 1 else ''} "
                      f"{', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
                      for reason, rows in reasons.items() if rows)
    if not kept:
        raise ValueError(f"{path}: no row is usable: {found}. Fix the file, or name the columns that hold the "
                         "prompts and answers (data.prompt_key / data.answer_key, or --prompt-key / --answer-key)")
    warn(f"{path}: {len(dropped)} of {len(problems)} rows left out, {found} (rows count from 0)")
    return kept


def benchmark_path(name: str) -> Path:
    """The packaged copy of a shipped benchmark."""
    return Path(str(resources.files("oprd") / "benchmarks" / f"{name}.parquet"))


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    use_chat_template: bool = True,
    enable_thinking: bool | None = None,
) -> list[int]:
    """Token ids of the prompt the model answers: the chat template with the assistant turn opened,
    or (use_chat_template=False, for base models) the user turns joined by blank lines.

    Every prompt oprd samples from (training, validation, `oprd eval`, bridge Stage 1) is made here.
    `enable_thinking`, when set, is handed to the chat template as a variable: Qwen3's template
    reads it (false opens the answer with an empty think block), a template that does not read it
    renders the same text. Unset, the template's own default applies.
    """
    if not use_chat_template:
        if enable_thinking is not None:
            raise ValueError("enable_thinking is a chat-template variable, but the chat template is off "
                             "(use_chat_template=False): drop one of them")
        text = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        return tokenizer(text, add_special_tokens=True).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: set "
            "data.use_chat_template=false (eval: --no-chat-template) or use a tokenizer that has one"
        )
    # Render then tokenize: the template already holds the special tokens it needs, and in
    # transformers 5 apply_chat_template(tokenize=True) returns a BatchEncoding, not ids.
    variables = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **variables)
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclass(frozen=True)
class PromptSet:
    """Token ids of each prompt as the student reads it and, when the teacher reads another
    prompt (its own tokenizer and chat template, or a privileged prompt), as the teacher reads it;
    else `teacher` is None. `retokenize`: the teacher has another tokenizer, so it re-reads each
    response too. `routes`: each prompt's value of the column that routes it to a teacher."""

    student: list[list[int]]
    teacher: list[list[int]] | None = None
    retokenize: bool = False
    routes: list[str] | None = None

    @classmethod
    def render(
        cls,
        problems: list[Problem],
        student_tokenizer,
        teacher_tokenizer=None,
        *,
        use_chat_template: bool = True,
        enable_thinking: bool | None = None,
        teacher_template: str | None = None,
        route_by: str | None = None,
    ) -> PromptSet:
        """The prompts of `problems`; the teacher's too when `teacher_tokenizer` (another
        tokenizer) or `teacher_template` (a privileged prompt, `Problem.privileged_messages`) is given."""
        def render(tokenizer, template: str | None = None) -> list[list[int]]:
            return [prompt_token_ids(tokenizer, p.privileged_messages(template) if template else p.messages,
                                     use_chat_template=use_chat_template, enable_thinking=enable_thinking)
                    for p in problems]

        teacher = None
        if teacher_tokenizer is not None or teacher_template is not None:
            teacher = render(teacher_tokenizer or student_tokenizer, teacher_template)
        routes = [str(p.column(route_by)) for p in problems] if route_by else None
        return cls(render(student_tokenizer), teacher, retokenize=teacher_tokenizer is not None, routes=routes)

    def __len__(self) -> int:
        return len(self.student)

    def subset(self, indices: list[int]) -> PromptSet:
        pick = lambda ids: [ids[i] for i in indices] if ids is not None else None  # noqa: E731
        return PromptSet(pick(self.student), pick(self.teacher), self.retokenize, pick(self.routes))


def drop_long_prompts(prompts: PromptSet, max_tokens: int, source: str, warn: Callable[[str], None]) -> PromptSet:
    """The prompts the student reads in at most `max_tokens` tokens; longer ones are reported
    through `warn` and left out, never cut (a cut prompt asks another question)."""
    fits = [i for i, ids in enumerate(prompts.student) if len(ids) <= max_tokens]
    if not fits:
        raise ValueError(f"no prompt of {source} fits data.max_prompt_tokens={max_tokens}")
    if len(fits) < len(prompts):
        longest = max(len(ids) for ids in prompts.student)
        warn(f"{len(prompts) - len(fits)} of {len(prompts)} prompts are longer than data.max_prompt_tokens="
             f"{max_tokens} (longest {longest} tokens) and are left out, not cut.")
    return prompts.subset(fits)


class PromptStream:
    """Passes (epochs) over `size` prompts, each in its own seeded shuffle or, with shuffle=False,
    in file order; its (epoch, position) state makes it resumable in both. A batch that reaches the
    end of a pass is completed from the start of the next, so no prompt is dropped or seen twice
    within a pass."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0, *,
                 shuffle: bool = True):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch, self.position = epoch, position

    def next_batch(self) -> list[int]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            order = self._order()
            taken = order[self.position : self.position + self.batch_size - len(picked)]
            picked += taken
            self.position += len(taken)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def _order(self) -> list[int]:
        """The prompts of the current pass, in the order they are drawn."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file; a line that is not UTF-8 or
    not JSON is an error that names the file and the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None


def _read_rows(path: str, split: str) -> list[dict]:
    local = Path(path)
    if local.suffix in FILE_SUFFIXES:
        if not local.is_file():
            raise FileNotFoundError(f"no such data file: {path}")
    elif path in BENCHMARKS:
        local = benchmark_path(path)
    elif local.is_dir() or HUB_ID.match(path):  # a local dataset folder or a hub id: `datasets` reads both
        return _read_hub(path, split)
    else:
        close = difflib.get_close_matches(path, BENCHMARKS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise FileNotFoundError(f"{path!r} is not a data file (.parquet, .jsonl, .json), a shipped benchmark "
                                f"({', '.join(BENCHMARKS)}) or a hub dataset id (owner/name){hint}")
    if local.suffix == ".parquet":
        return pq.read_table(local).to_pylist()
    if local.suffix == ".jsonl":
        rows = []
        for number, row in read_jsonl(local):
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object (one row), got {type(row).__name__}")
            rows.append(row)
        return rows
    try:
        rows = json.loads(local.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start + 1})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: expected a JSON list of rows (objects)")
    return rows


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets  # optional: only hub datasets need it
    except ImportError as e:
        raise ImportError(
            f"{name!r} is not a .parquet/.jsonl/.json file or a shipped benchmark ({', '.join(BENCHMARKS)}); "
            "loading it from the hub needs `pip install datasets` (or `pip install oprd[hub]`)"
        ) from e
    if not Path(name).is_dir() and not hub_reachable():
        raise FileNotFoundError(f"{name!r}: no such file or folder, and the hub cannot be reached to download the "
                                "dataset: give a local .parquet/.jsonl file")
    return list(datasets.load_dataset(name, split=split))


_MISSING = object()


def _get(row: dict, key: str) -> Any:
    """row["a"]["b"] for key "a.b"; _MISSING when any part is missing."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _columns(row: dict, prefix: str = "") -> list[str]:
    """Column names, nested struct fields dotted (`reward_model.ground_truth`)."""
    names = []
    for key, value in row.items():
        names.append(prefix + key)
        if isinstance(value, dict):
            names += _columns(value, prefix + key + ".")
    return names


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def _detect_prompt_key(row: dict, path: str) -> str:
    if _is_chat(row.get("prompt")):
        return "prompt"
    for key in TEXT_KEYS:
        if isinstance(row.get(key), str):
            return key
    raise ValueError(
        f"{path}: cannot find the prompt; columns found: {_columns(row)}. Expected a chat-message "
        f"list in `prompt` (verl layout) or a text column among {list(TEXT_KEYS)}; set the prompt "
        "column with data.prompt_key=... (eval: --prompt-key) and the answer with data.answer_key=... "
        "(eval: --answer-key)"
    )


def _messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if _is_chat(value):
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in value]
    raise ValueError(f"{where}: the prompt is neither text nor a list of chat messages: {value!r:.200}")


def _answer(value: Any, *, from_solution: bool) -> str | None:
    if value is None or value is _MISSING:
        return None
    if from_solution:
        return extract_answer(str(value))
    return str(value)
