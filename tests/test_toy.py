"""The toy world: task generator, grading of its solutions, tokenizer, SFT, checkpoint selection,
a build that does not depend on the thread count, cache keys."""

import dataclasses
import hashlib
import json
import os
import random
import shutil
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
from oprd.models import ModelSpec, load_model, load_tokenizer


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
    # a missed target takes the nearest checkpoint: the most accurate teacher, the least accurate student
    assert toy.pick_checkpoints(curve, teacher_target=0.99, student_target=0.25) == (120, 140)
    assert toy.pick_checkpoints(curve, teacher_target=0.3, student_target=0.05) == (20, 40)
    assert toy.pick_checkpoints([(20, 0.4), (40, 0.4)], teacher_target=0.9, student_target=0.1) == (None, 20)
    assert toy.pick_checkpoints(curve, teacher_target=0.05, student_target=0.25) == (None, 20)  # none before it
    assert toy.pick_checkpoints([], teacher_target=0.5, student_target=0.25) == (None, None)


def test_a_missed_target_takes_the_nearest_checkpoint_with_its_own_weights(monkeypatch, tmp_path):
    """Scripted validation accuracies (0.3, 0.5, 0.4 against a target of 0.9), so no CPU's rounding
    decides the outcome: SFT runs to max_steps, the teacher is the step-40 checkpoint with the
    weights it had then (equal to a run stopped at step 40), and the world says what it missed."""
    settings = dataclasses.replace(toy.QUICK_WORLD, train_problems=64, teacher_target=0.9, student_target=0.25)
    recipe = dataclasses.replace(settings.model, max_steps=60)
    problems = toy.make_split(64, seed=0, min_steps=1, max_steps=2)
    tokenizer = testing.train_tokenizer([p.prompt + "\n" + p.solution for p in problems], 120, tmp_path / "tok",
                                        split_digits=True)
    examples = toy.sft_examples(tokenizer, [(p.prompt, p.solution) for p in problems])
    scripted = iter([0.3, 0.5, 0.4])
    monkeypatch.setattr(toy, "measure", lambda *args, **kwargs: {"accuracy": next(scripted)})
    run = toy.train_to_targets(recipe, settings, tokenizer, examples, [], "teacher")
    assert run.curve == [(20, 0.3), (40, 0.5), (60, 0.4)]
    assert (run.student_step, run.teacher_step) == (20, 40)

    stopped = iter([0.3, 0.95])  # the same run, reaching the target at step 40: it stops there
    monkeypatch.setattr(toy, "measure", lambda *args, **kwargs: {"accuracy": next(stopped)})
    at_40 = toy.train_to_targets(recipe, settings, tokenizer, examples, [], "teacher")
    assert at_40.teacher_step == 40 and [step for step, _ in at_40.curve] == [20, 40]
    for name, weight in at_40.teacher.state_dict().items():
        assert torch.equal(run.teacher.state_dict()[name], weight), name
    assert all(torch.equal(run.student_state[k], at_40.student_state[k]) for k in run.student_state)

    info = {"teacher": {"validation_accuracy": 0.5}, "student": {"validation_accuracy": 0.3}}
    assert toy.World(tmp_path, settings, info).missed_targets == ["teacher below teacher_target=0.9",
                                                                  "student above student_target=0.25"]
    assert toy.World(tmp_path, settings, {"teacher": {"validation_accuracy": 0.9},
                                          "student": {"validation_accuracy": 0.25}}).missed_targets == []


def test_splits_are_disjoint():
    settings = toy.QUICK_WORLD
    train = toy.train_split(settings)
    validation, test = toy.held_out_splits(settings, train)
    prompts = [{p.prompt for p in split} for split in (train, validation, test)]
    assert len(validation) == settings.validation_problems and len(test) == settings.test_problems
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])


@pytest.mark.slow
def test_world_build_does_not_depend_on_the_thread_count(tmp_path):
    """`oprd demo --world-only --rebuild-world` from two empty caches, one process on 1 thread, one
    on 3: the same world (SFT curve, chosen checkpoints, accuracies, weights). Which checkpoints
    are chosen is this machine's rounding, so it is not asserted."""
    worlds = []
    for threads in (1, 3):
        env = {**os.environ, "OPRD_CACHE_DIR": str(tmp_path / f"cache{threads}"), "OMP_NUM_THREADS": str(threads)}
        out = tmp_path / f"world{threads}"
        done = subprocess.run([sys.executable, "-m", "oprd", "demo", "--world-only", "--rebuild-world", "--quick",
                               "--threads", str(threads), "--out", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "the rebuilt toy world against the shipped one" in done.stderr
        worlds.append(json.loads((out / "world.json").read_text()))
    a, b = worlds
    assert a["origin"] == "built" and a["cache"].endswith("-rebuilt")
    for key in ("sft_curve", "teacher", "student", "teacher_entropy_nats", "build_threads"):
        assert a[key] == b[key], key
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


def _no_training(*args, **kwargs):
    raise AssertionError("a shipped world is installed, never trained")


@pytest.mark.parametrize("settings", [toy.QUICK_WORLD, toy.WorldSettings()], ids=["quick", "default"])
def test_the_shipped_world_installs_as_hashed_and_measures_as_recorded(settings, monkeypatch, tmp_path):
    """Every file as its manifest says, the problem files made again from the seed, and the teacher
    and student at the validation accuracy recorded beside them (sampling on another CPU may flip a
    few of the samples, hence 2 points)."""
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(toy, "train_to_targets", _no_training)
    shipped = toy.shipped_world(settings)
    assert shipped is not None, f"no shipped world for {settings}: python scripts/ship_toy_worlds.py"
    world = toy.build_world(settings)
    assert world.origin == "shipped" and world.root == tmp_path / f"toy-{settings.key()}"
    assert world.missed_targets == []
    files = json.loads((shipped / toy.MANIFEST).read_text())["files"]
    assert {"teacher/model.safetensors", "student/model.safetensors", "tokenizer/tokenizer.json"} <= set(files)
    assert any(name.startswith("teacher-cross_arch-") for name in files)  # the bridge demo's teachers
    assert any(name.startswith("specialist-mul-") for name in files)  # the applications demo's specialists
    for name, digest in files.items():
        if name != "world.json":  # the installed one also says where it came from
            assert hashlib.sha256((world.root / name).read_bytes()).hexdigest() == digest, name
    for split, problems in toy.splits(settings).items():
        assert toy.problems_sha256(problems) == world.info["problems_sha256"][split]
        assert [p.answer for p in load_problems(str(world.root / f"{split}.parquet"))] == [p.answer for p in problems]
    assert toy.build_world(settings).info == world.info  # the second time from the cache
    validation = load_problems(str(world.validation_path))
    for name in ("teacher", "student"):
        spec = ModelSpec(model=str(world.root / name))
        model = load_model(spec, torch.device("cpu"))
        measured = toy.measure(model, load_tokenizer(spec), validation, settings)["accuracy"]
        assert measured == pytest.approx(world.info[name]["validation_accuracy"], abs=0.02), name


def test_a_changed_shipped_file_is_refused_and_a_stale_cache_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(toy, "train_to_targets", _no_training)
    settings = toy.QUICK_WORLD
    key = f"toy-{settings.key()}"
    # a world this machine built before worlds were shipped: replaced by the shipped one
    stale = tmp_path / "cache" / key
    stale.mkdir(parents=True)
    (stale / "world.json").write_text(json.dumps({"teacher": {"step": 1}}))
    assert toy.build_world(settings).origin == "shipped"
    # a shipped file that no longer matches its manifest
    copy = tmp_path / "shipped" / key
    shutil.copytree(toy.shipped_world(settings), copy)
    weights = copy / "teacher" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != json.loads(
        (copy / toy.MANIFEST).read_text())["files"]["teacher/model.safetensors"]  # the fault landed
    monkeypatch.setenv("OPRD_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setattr(toy, "shipped_world", lambda s: copy)
    with pytest.raises(RuntimeError, match="model.safetensors is changed.*--rebuild-world"):
        toy.build_world(settings)
    assert not list((tmp_path / "cache2").iterdir())  # nothing half-installed is left
