"""The paper's two applications: self-distillation with a privileged prompt (teacher.model=self), and
several teachers in one student (teachers.members, routed by a data column or averaged)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import SMOKE, TINY, run_metrics

from oprd import distributed, models
from oprd.alignment import paired_states, positions_with_partner, with_teacher_prompts
from oprd.batch import RolloutBatch, pad_left
from oprd.config import ConfigError, TeacherMember, TeachersConfig, TeacherSpec, load_config, validate
from oprd.data import load_problems, prompt_token_ids
from oprd.models import DTYPES, ModelSpec, load_model, load_tokenizer
from oprd.runs import checkpoint
from oprd.teachers import update_ema
from oprd.testing import tiny_config
from oprd.trainer import cost_metrics, sample, set_up_run, train, update

CPU = torch.device("cpu")


def _self_config(tmp_path: Path, *overrides: str):
    return load_config(SMOKE / "self_distillation.yaml", [f"output_dir={tmp_path}", "save_every=0", *overrides])


def _multi_config(tmp_path: Path, *overrides: str):
    return load_config(SMOKE / "multi_teacher.yaml", [f"output_dir={tmp_path}", "save_every=0", *overrides])


# --------------------------------------------------------------------------- privileged prompts


def test_privileged_prompt_pairs_response_positions_one_to_one_whatever_the_prompt_lengths():
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    student = load_model(ModelSpec(model=TINY, random_init=True), CPU).eval()
    teacher = load_model(ModelSpec(model=TINY, random_init=True, init_seed=1), CPU).eval()
    student_prompts = [tokenizer("Add 2 and 3").input_ids, tokenizer("Is 7 a prime number? Think.").input_ids]
    teacher_prompts = [tokenizer("Add 2 and 3. The answer is 5, check it twice.").input_ids,
                       tokenizer("Prime? yes").input_ids]  # longer for one prompt, shorter for the other
    torch.manual_seed(0)
    responses = [torch.randint(5, len(tokenizer), (n,)).tolist() for n in (7, 3, 5, 6)]
    prompt_ids, prompt_mask = pad_left([student_prompts[i] for i in (0, 0, 1, 1)], tokenizer.pad_token_id)
    width = max(map(len, responses))
    response_ids = torch.full((4, width), tokenizer.pad_token_id)
    response_mask = torch.zeros((4, width), dtype=torch.long)
    for row, ids in enumerate(responses):
        response_ids[row, : len(ids)], response_mask[row, : len(ids)] = torch.tensor(ids), 1
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor([0, 0, 1, 1]),
                         torch.zeros(4, dtype=torch.bool))
    batch = with_teacher_prompts(batch, teacher_prompts, tokenizer.pad_token_id)
    keep = positions_with_partner(batch).bool()
    assert torch.equal(keep, response_mask.bool())
    student_h, teacher_h = paired_states(student, teacher, batch, keep, [2, 4], [2, 4])

    def naive(model, prompt: list[int], ids: list[int], t: int, layer: int) -> torch.Tensor:
        """The state after reading the prompt and response[:t], one unpadded sequence at a time."""
        with torch.no_grad():
            out = model(torch.tensor([prompt + ids[:t]]), output_hidden_states=True)
        return out.hidden_states[layer][0, -1]

    n = 0
    for row, ids in enumerate(responses):
        for t in range(len(ids)):
            prompt = int(batch.prompt_index[row])
            for layer in (2, 4):
                torch.testing.assert_close(student_h[layer][n], naive(student, student_prompts[prompt], ids, t, layer),
                                           rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(teacher_h[layer][n], naive(teacher, teacher_prompts[prompt], ids, t, layer),
                                           rtol=1e-4, atol=1e-5)
            n += 1
    assert n == int(keep.sum())


def test_privileged_template_reads_prompt_answer_and_any_column():
    problem = load_problems(str(SMOKE / "prompts.parquet"), limit=1)[0]
    messages = problem.privileged_messages("{prompt}\n\nAnswer: {answer} ({topic}, {reward_model.style})")
    assert messages[-1]["content"] == (f"{problem.messages[-1]['content']}\n\nAnswer: {problem.answer} "
                                       f"({problem.row['topic']}, {problem.row['reward_model']['style']})")
    with pytest.raises(ValueError, match=r"no column 'solution'; columns found: \[.*'topic'"):
        problem.privileged_messages("{prompt} {solution}")


def test_a_template_naming_a_missing_column_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="no column 'solution'"):
        train(_self_config(tmp_path, "teacher.prompt_template='{prompt} {solution}'"))
    assert not (tmp_path / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- self-distillation


@pytest.mark.parametrize("mode", ["frozen", "ema", "live"])
def test_self_teacher_reading_the_students_own_prompt_gives_zero_oprd_loss_at_step_1(mode, tmp_path):
    run_dir = train(_self_config(tmp_path, "teacher.prompt_template=null", f"teacher.self_mode={mode}",
                                 "max_steps=1"))
    (first,) = run_metrics(run_dir)
    assert abs(first["rep/loss"]) < 1e-6 and first["rep/cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    memory = json.loads((run_dir / "teachers.json").read_text())["self"]
    student_bytes = sum(p.numel() * 4 for p in load_model(ModelSpec(model=TINY, random_init=True), CPU).parameters())
    if mode == "live":
        assert memory["bytes"] == 0  # the student module itself: no second copy
    elif mode == "ema":
        assert memory["bytes"] == student_bytes  # the student's whole structure, in float32
    else:
        assert 0 < memory["bytes"] <= student_bytes  # OPRD alone reads it: the backbone, no LM head of its own


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_frozen_self_teacher_is_held_and_computed_as_the_student_is(precision, tmp_path, monkeypatch):
    """On a GPU `dtype=auto` loads a model in bfloat16, while the student keeps float32 master
    weights (bf16 comes from autocast): a frozen self-teacher loaded by that rule differs from the
    student at step 1. It is the student's copy, so it is held as the student is, in either
    precision. The GPU's rule is put in place here, on the CPU."""
    def gpu_rule(name, device):
        return torch.bfloat16 if name == "auto" else DTYPES[name]

    monkeypatch.setattr(models, "resolve_dtype", gpu_rule)
    monkeypatch.setattr(distributed, "resolve_dtype", gpu_rule)
    run_dir = train(_self_config(tmp_path, "teacher.prompt_template=null", "teacher.self_mode=frozen",
                                 "max_steps=1", f"optim.precision={precision}"))
    (first,) = run_metrics(run_dir)
    assert first["rep/loss"] == 0 and first["rep/cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    memory = json.loads((run_dir / "teachers.json").read_text())["self"]
    assert memory["bytes"] == 4 * memory["parameters"] > 0  # float32, as the student's master weights


@pytest.mark.parametrize("objective", ["sampled", "full"])
def test_self_distillation_works_with_opd_and_the_sum(objective, tmp_path):
    """OPD against the self-teacher: zero at step 1 without the privileged prompt (the same
    distributions), and not with it (the answer changes the teacher's next-token distribution)."""
    common = [f"opd.objective={objective}", "oprd.coef=1.0", "max_steps=1"]
    (plain,) = run_metrics(train(_self_config(tmp_path / "plain", "teacher.prompt_template=null", *common)))
    assert abs(plain["opd/loss"]) < 1e-6 and abs(plain["rep/loss"]) < 1e-6
    (privileged,) = run_metrics(train(_self_config(tmp_path / "privileged", *common)))
    assert privileged["opd/kl_estimate"] != 0 and privileged["rep/loss"] > 0


def test_the_privileged_prompt_moves_the_teacher_away_from_the_student(tmp_path):
    run_dir = train(_self_config(tmp_path, "max_steps=1"))
    assert run_metrics(run_dir)[0]["rep/loss"] > 1e-4


def test_ema_update_is_the_moving_average():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = {name: 0.9 * p.detach().clone() + 0.1 * dict(student.named_parameters())[name].detach()
            for name, p in teacher.named_parameters()}
    update_ema(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), want[name])


@pytest.mark.slow
def test_ema_teacher_follows_the_student_and_resumes_exactly(tmp_path, monkeypatch):
    overrides = ("teacher.self_mode=ema", "teacher.ema_decay=0.5", "max_steps=3", "save_every=2")
    cfg = load_config(SMOKE / "self_distillation.yaml", [f"output_dir={tmp_path / 'a'}", *overrides])
    run = set_up_run(cfg, None)
    (teacher,) = run.teachers
    expected = {name: p.detach().clone() for name, p in teacher.model.named_parameters()}
    for step in (1, 2):
        update(run, sample(run, step, {}), step, {})
        for name, p in run.student.named_parameters():
            expected[name] = 0.5 * expected[name] + 0.5 * p.detach()
    for name, p in teacher.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name])
    run.recorder.close()

    straight = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")))
    real_save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash right after the step-2 checkpoint")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    crashed = dataclasses.replace(cfg, output_dir=str(tmp_path / "c"))
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert (tmp_path / "c" / "checkpoints" / "step_000002" / checkpoint.EMA_TEACHER).is_file()
    train(dataclasses.replace(crashed, resume=True))
    for want, got in zip(run_metrics(straight), run_metrics(tmp_path / "c"), strict=True):
        assert got["rep/loss"] == pytest.approx(want["rep/loss"], rel=1e-6, abs=1e-9), want["step"]


# --------------------------------------------------------------------------- several teachers


def _route_of(run, batch) -> list[str]:
    return [run.sampler.prompts.routes[int(i)] for i in batch.prompt_index]


@pytest.mark.slow
def test_routing_sends_each_sample_to_the_named_teacher_only(tmp_path):
    cfg = _multi_config(tmp_path, "rollout.prompts_per_step=4", "optim.micro_batch_size=2")
    run = set_up_run(cfg, None)
    read: dict[str, list[list[int]]] = {teacher.name: [] for teacher in run.teachers}
    forwards = {teacher.name: 0 for teacher in run.teachers}
    for teacher in run.teachers:
        def hook(module, args, kwargs, _name=teacher.name):
            forwards[_name] += 1
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            read[_name].extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
        teacher.model.register_forward_pre_hook(hook, with_kwargs=True)
    for step in (1, 2, 3):
        batch = sample(run, step, {})
        routes = _route_of(run, batch)
        for name in read:
            read[name].clear()
        forwards_before = dict(forwards)
        record = update(run, batch, step, {})
        micro_routes = [routes[i:i + 2] for i in range(0, len(routes), 2)]
        for name in read:
            mine = [row for row, route in enumerate(routes) if route == name]
            sequences = [torch.cat([batch.prompt_ids[r][batch.prompt_mask[r].bool()],
                                    batch.response_ids[r][batch.response_mask[r].bool()]]).tolist() for r in mine]
            # its rows and no other (a model reads all but a row's last token when that row is the longest)
            unmatched = list(sequences)
            for seen in read[name]:
                match = next(want for want in unmatched if want[: len(seen)] == seen and len(seen) >= len(want) - 1)
                unmatched.remove(match)
            assert not unmatched, (step, name)
            assert forwards[name] - forwards_before[name] == sum(name in m for m in micro_routes)
            assert record[f"teachers/{name}/share"] == len(mine) / len(routes)
    run.recorder.close()


@pytest.mark.slow
@pytest.mark.parametrize("route_by", ["topic", None])
def test_per_teacher_metrics_add_up_to_the_steps(route_by, tmp_path):
    cfg = _multi_config(tmp_path, f"teachers.route_by={route_by or 'null'}", "rollout.prompts_per_step=4")
    run = set_up_run(cfg, None)
    batch = sample(run, 1, {})
    record = update(run, batch, 1, {})
    names = [teacher.name for teacher in run.teachers]
    shares = [record[f"teachers/{name}/share"] for name in names]
    if route_by is None:
        assert shares == [1.0, 1.0]
        weights = [0.5, 0.5]  # equal weights: the plain average of the two teachers'
        opd_weights = weights
    else:
        assert sum(shares) == pytest.approx(1.0)
        routes = _route_of(run, batch)
        rows = [torch.tensor([r == name for r in routes]) for name in names]
        plan = run.teachers[0].plan
        counts = [float(plan.oprd_mask(batch.with_rows_only(r)).sum()) for r in rows]
        tokens = [float(batch.with_rows_only(r).response_mask.sum()) for r in rows]
        weights, opd_weights = [c / sum(counts) for c in counts], [t / sum(tokens) for t in tokens]
    # the step's cost: every routed sample read by one teacher, every averaged one by both
    tokens = float(batch.attention_mask.sum())
    assert cost_metrics(run, batch, 1.0)["cost/teacher_tokens"] == tokens * (1 if route_by else 2)
    for metric, w in (("rep/loss", weights), ("rep/cosine_similarity", weights), ("opd/loss", opd_weights)):
        per_teacher = [record[f"{metric}/teacher_{name}"] for name in names]
        assert record[metric] == pytest.approx(sum(a * b for a, b in zip(w, per_teacher)), rel=1e-5), metric
    run.recorder.close()


@pytest.mark.slow
def test_a_list_of_one_teacher_and_two_identical_averaged_teachers_train_as_the_single_teacher(tmp_path):
    single = load_config(SMOKE / "oprd_plus_opd.yaml", [f"output_dir={tmp_path / 'single'}", "save_every=0",
                                                        "max_steps=2"])
    same = dict(model=single.teacher.model, random_init=True, init_seed=1)
    runs = {"single": single}
    for name, members in (("one", [TeacherMember(name="solo", **same)]),
                          ("two", [TeacherMember(name="a", **same), TeacherMember(name="b", weight=3.0, **same)])):
        cfg = dataclasses.replace(single, output_dir=str(tmp_path / name), teacher=TeacherSpec(),
                                  teachers=TeachersConfig(members=members))
        validate(cfg)
        runs[name] = cfg
    rows = {name: run_metrics(train(cfg)) for name, cfg in runs.items()}
    for name in ("one", "two"):
        for want, got in zip(rows["single"], rows[name], strict=True):
            for key in ("loss", "grad_norm", "rep/loss", "opd/loss", "rep/cosine_similarity"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (name, want["step"], key)
    assert "teachers/solo/share" not in rows["one"][0]  # one teacher: metrics as today
    assert rows["two"][0]["teachers/a/share"] == rows["two"][0]["teachers/b/share"] == 1.0


@pytest.mark.slow
def test_each_teacher_keeps_its_own_layer_map_and_bridge(wider_teacher_with_bridge, tmp_path):
    folder, bridge = wider_teacher_with_bridge
    members = ('[{name: narrow, model: ' + TINY + ', random_init: true, init_seed: 1}, {name: wide, model: '
               + str(folder) + f', random_init: true, init_seed: 1, bridge: {bridge}}}]')
    cfg = load_config(SMOKE / "oprd.yaml", [f"output_dir={tmp_path}", "teacher.model=''", "save_every=0",
                                            "max_steps=1", f"teachers.members={members}"])
    run = set_up_run(cfg, None)
    narrow, wide = run.teachers
    assert narrow.plan.teacher_layers == (1, 2, 3, 4) and wide.plan.bridge is not None
    assert wide.plan.teacher_layers != narrow.plan.teacher_layers
    record = update(run, sample(run, 1, {}), 1, {})
    assert {"rep/cosine_similarity/teacher_narrow", "rep/cosine_similarity/teacher_wide"} <= record.keys()
    run.recorder.close()


# --------------------------------------------------------------------------- errors


def test_values_no_teacher_takes_are_refused_with_the_values(tmp_path):
    members = f"[{{name: a, model: {TINY}, random_init: true}}, {{name: b, model: {TINY}, random_init: true}}]"
    with pytest.raises(ConfigError, match=r"teachers.route_by=topic: the data has values no teacher takes "
                                          r"\('geometry', 'other'\)"):
        train(_multi_config(tmp_path, f"teachers.members={members}"))


def test_a_teacher_of_another_width_without_a_bridge_is_refused_by_name(tmp_path):
    folder = tmp_path / "wide"
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    tokenizer.save_pretrained(folder)
    tiny_config(len(tokenizer), hidden_size=96, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    members = (f"[{{name: geometry, model: {TINY}, random_init: true}}, "
               f"{{name: other, model: {folder}, random_init: true}}]")
    with pytest.raises(ConfigError, match=r"teachers.members\[1\] \(other\): OPRD-Vanilla compares hidden states.*"
                                          r"hidden size is 64 and the teacher's 96.*teachers.members\[1\].bridge=FILE"):
        train(_multi_config(tmp_path / "run", f"teachers.members={members}"))


@pytest.mark.parametrize("overrides, message", [
    (["teacher.model=x", "teachers.members=[{name: a, model: y}]"], "teacher.model=x and teachers.members are both"),
    (["teacher.model=''", "teachers.members=[{name: a, model: y}, {name: a, model: z}]"], r"name='a' names two"),
    (["teacher.model=''", "teachers.members=[{name: 'a b', model: y}]"], r"teachers.members\[0\].name must be"),
    (["teacher.model=''", "teachers.members=[{name: a, model: y, modle: z}]"],
     r"unknown config key teachers.members\[0\].modle; did you mean teachers.members\[0\].model"),
    (["teacher.model=''", "teachers.members=[{name: a, model: y, weight: 2}]", "teachers.route_by=topic"],
     r"weight=2.0: weights apply to the weighted average"),
    (["teachers.route_by=topic"], "teachers.route_by is set but teachers.members is empty"),
    (["teacher.self_mode=ema"], "teacher.self_mode and teacher.ema_decay apply to teacher.model=self"),
    (["teacher.model=self"], "teacher.model=self is the student itself: drop .*teacher.random_init"),
    (["teacher.model=self", "teacher.random_init=false", "teacher.self_mode=warm"],
     "teacher.self_mode must be one of frozen, ema, live"),
    (["teacher.model=self", "teacher.random_init=false", "teacher.prompt_template='{prompt'"],
     "teacher.prompt_template=.* is not a valid"),
    (["teacher.model=self", "teacher.random_init=false", "teacher.prompt_template='no fields'"], "names no field"),
])
def test_bad_teacher_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE / "oprd.yaml", overrides)


def test_routes_of_the_smoke_prompts_cover_both_teachers():
    problems = load_problems(str(SMOKE / "prompts.parquet"))
    assert {p.column("topic") for p in problems} == {"geometry", "other"}
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    assert prompt_token_ids(tokenizer, problems[0].messages)  # the column changes nothing the student reads
