"""Problem loading: shipped benchmarks, verl and plain layouts, overrides, errors; prompt tokenisation."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oprd.data import (
    BENCHMARKS,
    Problem,
    PromptSet,
    PromptStream,
    benchmark_path,
    load_problems,
    prompt_token_ids,
)
from oprd.models import ModelSpec, load_tokenizer

TINY = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "tiny-qwen3"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(model=str(TINY)))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name, rows", [("aime24", 30), ("aime25", 30), ("aimo", 83), ("amc23", 40), ("math500", 500)])
def test_shipped_benchmarks_load_offline(name, rows):
    assert benchmark_path(name).is_file()
    problems = load_problems(name)
    assert len(problems) == rows
    assert [p.index for p in problems] == list(range(rows))
    for p in problems:
        assert p.messages[0]["role"] == "user" and p.messages[0]["content"]
        assert isinstance(p.answer, str) and p.answer
    assert set(BENCHMARKS) == {"aime24", "aime25", "aimo", "amc23", "math500"}


def test_verl_layout_reads_messages_answer_and_source(tmp_path):
    first = load_problems("math500")[0]
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.source == "MATH-500"
    assert "polar coordinates" in first.messages[0]["content"]
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
            "reward_model": {"ground_truth": "2", "style": "rule"},
            "data_source": "toy",
        }
    ]
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_problems(str(path)) == [
        Problem(index=0, messages=rows[0]["prompt"], answer="2", source="toy"),
    ]


@pytest.mark.parametrize(
    "row, answer",
    [
        ({"problem": "What is 6*7?", "answer": "42"}, "42"),
        ({"question": "What is 6*7?", "answer": 42}, "42"),  # numbers become strings
        ({"prompt": "What is 6*7?", "ground_truth": "42"}, "42"),
        ({"instruction": "What is 6*7?", "solution": r"6*7 = \boxed{42}."}, "42"),  # the last \boxed of a solution
        ({"problem": "What is 6*7?", "solution": r"It is \boxed{40}, no: \boxed{\frac{84}{2}}"}, r"\frac{84}{2}"),
        ({"problem": "What is 6*7?"}, None),  # training prompts need no answer
    ],
)
def test_plain_layouts_are_detected(tmp_path, row, answer):
    problems = load_problems(write_jsonl(tmp_path / "plain.jsonl", [row, row]))
    assert len(problems) == 2
    assert problems[1] == Problem(index=1, messages=[{"role": "user", "content": "What is 6*7?"}], answer=answer)


def test_keys_override_detection_and_reach_nested_fields(tmp_path):
    rows = [{"problem": "ignored", "query": "Q0", "meta": {"gold": "7"}, "answer": "ignored"}]
    path = write_jsonl(tmp_path / "nested.jsonl", rows)
    [problem] = load_problems(path, prompt_key="query", answer_key="meta.gold")
    assert problem.messages == [{"role": "user", "content": "Q0"}]
    assert problem.answer == "7"
    with pytest.raises(ValueError, match="meta.missing"):
        load_problems(path, answer_key="meta.missing")


def test_json_file_and_limit(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"question": f"q{i}", "answer": str(i)} for i in range(5)]))
    problems = load_problems(str(path), limit=2)
    assert [(p.index, p.messages[0]["content"], p.answer) for p in problems] == [(0, "q0", "0"), (1, "q1", "1")]
    assert len(load_problems("aime24", limit=3)) == 3
    assert load_problems("aime24", limit=0) == []


def test_unrecognised_layout_lists_columns_and_flags(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hi", "meta": {"label": "1"}}])
    with pytest.raises(ValueError) as error:
        load_problems(path)
    message = str(error.value)
    for expected in ("text", "meta.label", "prompt_key", "answer_key"):
        assert expected in message


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        load_problems(str(empty))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_problems(str(tmp_path / "nope.parquet"))


def test_hub_ids_need_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_problems("someone/some-dataset")


def test_prompt_token_ids_applies_the_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What is 6*7?"}]
    ids = prompt_token_ids(tokenizer, messages)
    text = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_prompt_token_ids_without_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "part one"},
        {"role": "user", "content": "part two"},
    ]
    ids = prompt_token_ids(tokenizer, messages, use_chat_template=False)
    assert ids == tokenizer("part one\n\npart two", add_special_tokens=True).input_ids
    bare = load_tokenizer(ModelSpec(model=str(TINY)))
    bare.chat_template = None
    with pytest.raises(ValueError, match="use_chat_template"):
        prompt_token_ids(bare, messages)


# The smoke template plus a line that shows whether the template was handed `enable_thinking`, and
# Qwen3's use of it: false opens the answer with an empty think block.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined %}[{{ enable_thinking }}]"
    "{% if not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}{% endif %}"
)


@pytest.fixture()
def thinking_tokenizer():
    tokenizer = load_tokenizer(ModelSpec(model=str(TINY)))
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("enable_thinking, opening", [
    (None, ""),  # not handed to the template at all: its own default
    (True, "[True]"),
    (False, "[False]<think>\n\n</think>\n\n"),
])
def test_enable_thinking_reaches_the_chat_template_only_when_set(thinking_tokenizer, enable_thinking, opening):
    messages = [{"role": "user", "content": "What is 6*7?"}]
    text = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n" + opening
    ids = prompt_token_ids(thinking_tokenizer, messages, enable_thinking=enable_thinking)
    assert thinking_tokenizer.decode(ids) == text
    assert ids == thinking_tokenizer(text, add_special_tokens=False).input_ids
    problem = Problem(index=0, messages=messages, answer=None)
    rendered = PromptSet.render([problem], thinking_tokenizer, thinking_tokenizer, enable_thinking=enable_thinking)
    assert rendered.student == rendered.teacher == [ids]


def test_enable_thinking_needs_the_chat_template(tokenizer):
    with pytest.raises(ValueError, match="enable_thinking is a chat-template variable"):
        prompt_token_ids(tokenizer, [{"role": "user", "content": "x"}], use_chat_template=False, enable_thinking=False)


def test_prompt_stream_resumes_exactly():
    full = PromptStream(7, 3, seed=5)
    expected = [full.next_batch() for _ in range(5)]
    head = PromptStream(7, 3, seed=5)
    got = [head.next_batch() for _ in range(2)]
    tail = PromptStream(7, 3, seed=5, **head.state())
    got += [tail.next_batch() for _ in range(3)]
    assert got == expected
    assert sorted(sum(expected, [])[:7]) == list(range(7)), "each pass visits every prompt once"


def test_prompt_stream_in_file_order_wraps_and_resumes_exactly():
    full = PromptStream(7, 3, seed=5, shuffle=False)
    expected = [full.next_batch() for _ in range(5)]
    assert expected == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4], [5, 6, 0]]  # pass 2 starts inside batch 3
    head = PromptStream(7, 3, seed=5, shuffle=False)
    got = [head.next_batch() for _ in range(2)]
    tail = PromptStream(7, 3, seed=5, **head.state(), shuffle=False)
    got += [tail.next_batch() for _ in range(3)]
    assert got == expected
    assert [PromptStream(7, 3, seed=seed, shuffle=False).next_batch() for seed in (0, 1)] == [[0, 1, 2]] * 2


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', "d.jsonl:2: not valid JSON"),
    (b'{"prompt": "a"}\n\n{"prompt": "\xff"}\n', "d.jsonl:3: not UTF-8 text"),
    (b'{"prompt": "a"}\n[1, 2]\n', "d.jsonl:2: expected a JSON object"),
])
def test_data_file_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_problems(str(path))


def test_a_name_that_is_neither_file_nor_benchmark_nor_hub_id_fails_at_once():
    with pytest.raises(FileNotFoundError, match="did you mean math500"):
        load_problems("math50")


def test_blank_prompts_are_left_out_counted_and_named(tmp_path):
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "", "answer": "3"},
            {"prompt": "  \n\t", "answer": "4"}, {"prompt": [{"role": "user", "content": " "}], "answer": "5"},
            {"prompt": "Name a prime.", "answer": " "}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    said = []
    problems = load_problems(path, warn=said.append)
    assert [p.index for p in problems] == [0, 4]  # an answer is not needed to train
    assert said == [f"{path}: 3 of 5 rows left out, 3 with a blank prompt (rows 1, 2, 3) (rows count from 0)"]
    said.clear()
    graded = load_problems(path, need_answers=True, warn=said.append)  # to grade, or for a privileged prompt
    assert [p.index for p in graded] == [0]
    assert "4 of 5 rows left out" in said[0] and "1 with a blank answer (row 4)" in said[0]


def test_a_file_of_blank_prompts_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": " ", "answer": "1"}] * 7)
    with pytest.raises(ValueError, match=r"blank.jsonl: no row is usable: 7 with a blank prompt \(rows 0, 1, 2, 3, 4, "
                                         r"\.\.\.\)"):
        load_problems(path, warn=print)
