"""The toy world: task generator, grading of its solutions, tokenizer, SFT, checkpoint selection,
a build that does not depend on the thread count, cache keys."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def test_solution_steps_follow_the_chain_in_either_operand_order():
    swapped = 0
    for seed in range(20):
        problem = toy.make_problem(random.Random(seed), min_steps=5, max_steps=5)
        lines = problem.solution.splitlines()
        assert len(lines) == 6
        value = int(problem.prompt.split()[1][0])
        for line in lines[:-1]:
            left, result = line.split("=")
            a, op, b = int(left[0]), left[1], int(left[2:])
            if a != value:  # a commutative step written the other way round
                assert op in "+*" and b == value
                swapped += 1
            value = toy.OPS[op](a, b)
            assert int(result) == value
        assert lines[-1].endswith(f"\\boxed{{{value}}}") and problem.answer == str(value)
    assert swapped > 10  # both orders occur


def test_checkpoints_are_picked_by_validation_accuracy():
    curve = [(20, 0.1), (40, 0.3), (60, 0.2), (80, 0.5), (100, 0.9), (120, 0.2), (140, 0.95)]
    # the teacher: the first at or above its target; the student: the last at or below its target before it
    assert toy.pick_checkpoints(curve, teacher_target=0.85, student_target=0.25) == (60, 100)
    assert toy.pick_checkpoints(curve, teacher_target=0.5, student_target=0.25) == (60, 80)
    assert toy.pick_checkpoints(curve, teacher_target=0.95, student_target=0.1) == (20, 140)
    assert toy.pick_checkpoints(curve, teacher_target=0.99, student_target=0.25) == (120, None)
    assert toy.pick_checkpoints(curve, teacher_target=0.3, student_target=0.05) == (None, 40)


def test_a_world_that_misses_its_target_names_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path))
    tiny = dataclasses.replace(toy.QUICK_WORLD, train_problems=100, model=dataclasses.replace(
        toy.QUICK_WORLD.model, max_steps=20), teacher_target=0.99)
    with pytest.raises(RuntimeError, match="teacher_target=0.99.*max_steps=20"):
        toy.build_world(tiny)
    assert not list(tmp_path.iterdir())  # nothing half-built is left in the cache


def test_splits_are_disjoint():
    settings = toy.QUICK_WORLD
    train = toy.train_split(settings)
    validation, test = toy.held_out_splits(settings, train)
    prompts = [{p.prompt for p in split} for split in (train, validation, test)]
    assert len(validation) == settings.validation_problems and len(test) == settings.test_problems
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])


@pytest.mark.slow
def test_world_build_does_not_depend_on_the_thread_count(tmp_path):
    """`oprd demo --world-only` from two empty caches, one process on 1 thread, one on 3: the same
    world (SFT curve, chosen checkpoints, accuracies, weights)."""
    worlds = []
    for threads in (1, 3):
        env = {**os.environ, "OPRD_CACHE_DIR": str(tmp_path / f"cache{threads}"), "OMP_NUM_THREADS": str(threads)}
        out = tmp_path / f"world{threads}"
        done = subprocess.run([sys.executable, "-m", "oprd", "demo", "--world-only", "--quick", "--threads",
                               str(threads), "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        worlds.append(json.loads((out / "world.json").read_text()))
    a, b = worlds
    for key in ("sft_curve", "teacher", "student", "teacher_entropy_nats", "build_threads"):
        assert a[key] == b[key], key
    assert a["teacher"]["step"] > a["student"]["step"]
    assert a["teacher"]["validation_accuracy"] >= toy.QUICK_WORLD.teacher_target
    assert a["student"]["validation_accuracy"] <= toy.QUICK_WORLD.student_target
    for name in ("teacher", "student"):
        weights = [load_file(Path(w["cache"]) / name / "model.safetensors") for w in worlds]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


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
    assert toy.WorldSettings(teacher_target=0.8).key() != toy.WorldSettings().key()
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path))
    assert toy.cache_root() == tmp_path
