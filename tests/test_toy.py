"""The toy world: task generator, grading of its solutions, tokenizer, SFT, cache keys."""

import random

import torch

from oprd import testing
from oprd.data import load_problems
from oprd.evaluation import extract_answer, is_correct
from oprd.experiments import toy


def test_problems_are_deterministic_and_distinct():
    a, b = toy.make_split(50, seed=3), toy.make_split(50, seed=3)
    assert a == b
    assert toy.make_split(50, seed=4) != a
    assert len({p.prompt for p in a}) == 50
    held_out = toy.make_split(20, seed=5, exclude={p.prompt for p in a})
    assert not {p.prompt for p in held_out} & {p.prompt for p in a}


def test_solutions_grade_correct_and_wrong_answers_do_not():
    for problem in toy.make_split(40, seed=0):
        assert extract_answer(problem.solution) == problem.answer
        assert is_correct(problem.solution, problem.answer)
        wrong = str((int(problem.answer) + 1) % 10)
        assert not is_correct(problem.solution, wrong)


def test_solution_steps_follow_the_chain():
    problem = toy.make_problem(random.Random(0), min_steps=5, max_steps=5)
    lines = problem.solution.splitlines()
    assert len(lines) == 6
    value = None
    for line in lines[:-1]:
        left, result = line.split("=")
        a, op, b = int(left[0]), left[1], int(left[2:])
        assert value is None or a == value  # each step starts from the previous result
        value = toy.OPS[op](a, b)
        assert int(result) == value
    assert lines[-1].endswith(f"\\boxed{{{value}}}") and problem.answer == str(value)


def test_written_problems_load_in_the_verl_layout(tmp_path):
    problems = toy.make_split(5, seed=0)
    toy.write_problems(problems, tmp_path / "p.parquet")
    loaded = load_problems(str(tmp_path / "p.parquet"))
    assert [p.answer for p in loaded] == [p.answer for p in problems]
    assert loaded[0].messages == [{"role": "user", "content": problems[0].prompt}]


def test_tokenizer_round_trip_and_single_digits(tmp_path):
    texts = [p.prompt + "\n" + p.solution for p in toy.make_split(200, seed=0)]
    tokenizer = testing.train_tokenizer(texts, 300, tmp_path / "tok", split_digits=True)
    for text in texts[:20] + ["Compute 123+45 left to right, mod 10.\n\\boxed{7}"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokenizer.tokenize("9876543210") if t.strip("Ġ").isdigit())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"


def test_sft_lowers_the_loss_and_is_deterministic(tmp_path):
    problems = toy.make_split(64, seed=0)
    tokenizer = testing.train_tokenizer([p.prompt + "\n" + p.solution for p in problems], 290, tmp_path / "tok",
                                    split_digits=True)
    examples = toy.sft_examples(tokenizer, [(p.prompt, p.solution) for p in problems])
    config = testing.tiny_config(len(tokenizer), hidden_size=32, num_layers=1, intermediate_size=64,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    from transformers import AutoModelForCausalLM

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        losses = []
        toy.sft(model, examples, steps=15, batch_size=8, lr=3e-3, pad_id=tokenizer.pad_token_id, seed=0,
                callback=lambda step, loss, losses=losses: losses.append(loss))
        runs.append(losses)
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0]


def test_world_cache_key_tracks_settings(monkeypatch, tmp_path):
    assert toy.WorldSettings().key() == toy.WorldSettings().key()
    assert toy.WorldSettings(seed=1).key() != toy.WorldSettings().key()
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path))
    assert toy.cache_root() == tmp_path
