"""Real widths and real vocabularies, at one layer: model folders of Qwen3-0.6B's shape written by
`shapes.write_model_folder` with Qwen3's real tokenizer (151,669 tokens for 151,936 embedding rows,
so 267 rows of padding), and the o200k tokenizer beside it. The folders load as hub folders do;
neither sampling nor any OPD objective ever reaches a padding row; the pre-flight check passes on
the pair; real math text is paired across the two tokenizers where both have read the same text;
and a two-process run killed with SIGKILL resumes to exactly the uninterrupted run.

The tokenizers and the prompt files live outside the repository (`../shared/data`); without them
this module is skipped, not passed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import ROOT, run_metrics
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from oprd import trainer
from oprd.alignment import align_by_offsets, decoded_offsets, matched_share, retokenize
from oprd.batch import RolloutBatch, pad_left
from oprd.capture import model_inputs
from oprd.config import ConfigError, OPDConfig, OPRDConfig, load_config
from oprd.data import PromptSet, load_problems, prompt_token_ids
from oprd.models import ModelSpec, load_model, load_model_config, load_tokenizer
from oprd.objective import LossPlan, distillation_loss
from oprd.preflight import check_context_length, check_model_pairing
from oprd.rollout import HFRollout, Sampler, SamplingParams, seeded
from oprd.shapes import write_model_folder
from oprd.testing import kill_job

DATA = ROOT.parent / "shared" / "data"
TOKENIZERS = DATA / "tokenizers"
QWEN3, O200K = TOKENIZERS / "qwen3", TOKENIZERS / "o200k"
DAPO = DATA / "dapo_math_17k.parquet"
BENCHMARKS = [DATA / "math500.parquet", DATA / "aime24.parquet"]
QWEN3_TOKENS, QWEN3_ROWS, O200K_TOKENS = 151_669, 151_936, 200_000
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not all(p.exists() for p in [QWEN3 / "tokenizer.json", O200K / "tokenizer.json", DAPO, *BENCHMARKS]),
    reason=f"the real tokenizers and prompt files are not in {DATA}",
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two 1-layer folders of Qwen3-0.6B's shape and tokenizer: the student (seed 0), the teacher (seed 1)."""
    tmp = tmp_path_factory.mktemp("real-shapes")
    return SimpleNamespace(
        student=write_model_folder("qwen3-0.6b", tmp / "student", tokenizer=QWEN3, seed=0, num_layers=1),
        teacher=write_model_folder("qwen3-0.6b", tmp / "teacher", tokenizer=QWEN3, seed=1, num_layers=1),
    )


# --------------------------------------------------------------------------- the folders


def test_the_folder_loads_as_a_hub_folder_would(folders):
    model = AutoModelForCausalLM.from_pretrained(folders.student)
    embedding = model.get_input_embeddings().weight
    assert tuple(embedding.shape) == (QWEN3_ROWS, 1024)
    assert model.config.hidden_size == 1024 and model.config.num_hidden_layers == 1
    assert model.get_output_embeddings().weight is embedding  # tied, as Qwen3-0.6B's head is
    with safe_open(folders.student / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in set(weights.keys())  # one copy of the tied matrix on disk
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"  # the published dtype
    teacher = AutoModelForCausalLM.from_pretrained(folders.teacher)
    assert not torch.equal(teacher.get_input_embeddings().weight, embedding)  # the seed draws the weights
    assert model.generation_config.top_k == 20 and model.generation_config.eos_token_id == [151645, 151643]

    tokenizer = AutoTokenizer.from_pretrained(folders.student)
    assert len(tokenizer) == QWEN3_TOKENS
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    header = "<|im_start|>assistant\n"
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.endswith(header + "<think>\n\n</think>\n\n")
    assert on.endswith(header) and "<think>" not in on
    # what training and evaluation read: the same text, through oprd's one prompt renderer
    assert tokenizer.decode(prompt_token_ids(tokenizer, messages, enable_thinking=False)) == off


def test_write_model_folder_refuses_an_existing_folder_and_a_tokenizer_too_large(folders, tmp_path):
    before = (folders.student / "model.safetensors").stat()
    with pytest.raises(FileExistsError, match="exists: give a new folder"):
        write_model_folder("qwen3-0.6b", folders.student, tokenizer=QWEN3, seed=5, num_layers=1)
    after = (folders.student / "model.safetensors").stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)

    out = tmp_path / "o200k-on-qwen3"
    with pytest.raises(ValueError, match=f"{O200K_TOKENS} tokens, more than qwen3-0.6b's {QWEN3_ROWS} embedding "
                                         "rows: give the tokenizer of this model's family"):
        write_model_folder("qwen3-0.6b", out, tokenizer=O200K, num_layers=1)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written, no .partial left


# --------------------------------------------------------------------------- vocabulary padding


@contextmanager
def padding_rows_favoured(model: torch.nn.Module, scale: float, seed: int):
    """The LM head's rows beyond the tokenizer (the tied embedding's, which no input ever reads)
    drawn at `scale` x a unit normal, about 50 times an initialised row: their logits are of the
    order of a hundred where the tokenizer's rows give about one, so a sampler or a loss that reads
    them is dominated by them. The rows are put back afterwards."""
    weight = model.get_output_embeddings().weight
    saved = weight.data[QWEN3_TOKENS:].clone()
    generator = torch.Generator().manual_seed(seed)
    weight.data[QWEN3_TOKENS:] = scale * torch.randn(saved.shape, generator=generator)
    try:
        yield
    finally:
        weight.data[QWEN3_TOKENS:] = saved


@pytest.fixture(scope="module")
def policy(folders):
    """Both models as the trainer loads them on the CPU (float32), two DAPO prompts, and 2 x 4
    responses of 16 tokens sampled from the student."""
    tokenizer = load_tokenizer(ModelSpec(model=str(folders.student)))
    student = load_model(ModelSpec(model=str(folders.student)), CPU)
    teacher = load_model(ModelSpec(model=str(folders.teacher)), CPU)
    problems = load_problems(str(DAPO), limit=2)
    prompts = [prompt_token_ids(tokenizer, p.messages, enable_thinking=False) for p in problems]
    rollout = HFRollout.for_model(student, tokenizer)
    with seeded(0):
        batch = rollout.generate(prompts, SamplingParams(n=4, max_new_tokens=16))
    return SimpleNamespace(tokenizer=tokenizer, student=student, teacher=teacher, prompts=prompts, rollout=rollout,
                           batch=batch)


def test_sampling_never_draws_a_padding_row(policy):
    rollout, student = policy.rollout, policy.student
    assert rollout.vocab_size == QWEN3_TOKENS < student.get_output_embeddings().weight.shape[0] == QWEN3_ROWS
    batch = policy.batch
    assert batch.response_mask.sum() > 0 and int(batch.response_ids.max()) < QWEN3_TOKENS

    # Pure sampling whatever the folder's generation_config says (Qwen3's: top_k=20, top_p=0.95,
    # temperature 0.6): a random model is near uniform, so at temperature 1 with no top-k cut most
    # sampled tokens rank far below the 20 most likely.
    T = batch.response_ids.shape[1]
    with torch.no_grad():
        logits = student(**model_inputs(batch), logits_to_keep=T).logits[:, :, :QWEN3_TOKENS]
    chosen = logits.gather(-1, batch.response_ids.unsqueeze(-1))
    ranks = (logits > chosen).sum(-1)[batch.response_mask.bool()]
    assert (ranks >= 20).float().mean() > 0.5, ranks

    # The mask is what keeps the padding out: with the padding rows' logits raised far above the
    # rest, the same rollout still never draws one, and a rollout told the head's row count draws
    # nothing else.
    unmasked = HFRollout(student, pad_token_id=policy.tokenizer.pad_token_id, eos_token_ids=rollout.eos_token_ids,
                         vocab_size=QWEN3_ROWS)
    params = SamplingParams(n=4, max_new_tokens=16)
    with padding_rows_favoured(student, 1.0, seed=0), seeded(1):
        masked = rollout.generate(policy.prompts, params)
    with padding_rows_favoured(student, 1.0, seed=0), seeded(1):
        drawn = unmasked.generate(policy.prompts, params)
    assert int(masked.response_ids.max()) < QWEN3_TOKENS
    assert bool((drawn.response_ids[drawn.response_mask.bool()] >= QWEN3_TOKENS).all())
    assert drawn.response_mask.sum() == drawn.response_ids.numel()  # no EOS: every token was a padding row


@pytest.mark.parametrize("objective", ["sampled", "topk", "full"])
def test_opd_objectives_never_read_a_padding_row(policy, objective):
    """The loss of the run's plan (vocab_size = the tokenizer's tokens) is the same whatever the
    padding rows' logits are, and none of its gradient reaches them; a plan over every row of the
    head is moved by them, so the check can fail."""
    student, teacher, batch = policy.student, policy.teacher, policy.batch
    plan = LossPlan.from_config(OPDConfig(objective=objective, k=16), OPRDConfig(), 1, 1, len(policy.tokenizer))
    assert plan.vocab_size == QWEN3_TOKENS
    normalizers = plan.normalizers(batch)
    student.zero_grad(set_to_none=True)
    loss, metrics = distillation_loss(plan, student, teacher, batch, normalizers)
    assert math.isfinite(float(loss)) and all(math.isfinite(float(v)) for v in metrics.values())
    loss.backward()
    grad = student.get_input_embeddings().weight.grad  # the tied head's gradient, and the embedding's
    assert bool(grad[QWEN3_TOKENS:].eq(0).all()) and bool(grad[:QWEN3_TOKENS].ne(0).any())
    student.zero_grad(set_to_none=True)

    every_row = dataclasses.replace(plan, vocab_size=QWEN3_ROWS)
    with torch.no_grad(), padding_rows_favoured(student, 1.0, seed=0), padding_rows_favoured(teacher, 0.5, seed=1):
        favoured, _ = distillation_loss(plan, student, teacher, batch, normalizers)
        read_padding, _ = distillation_loss(every_row, student, teacher, batch, normalizers)
    assert float(favoured) == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
    assert abs(float(read_padding) - float(loss)) > 1 or not math.isfinite(float(read_padding))


def _preflight_config(folders, objective: str, **oprd) -> object:
    return load_config(None, [f"student.model={folders.student}", f"teacher.model={folders.teacher}",
                              f"data.path={DAPO}", f"opd.objective={objective}", "opd.k=16",
                              *(f"oprd.{key}={value}" for key, value in oprd.items())])


@pytest.mark.parametrize("objective,oprd", [("sampled", {}), ("topk", {}), ("full", {}),
                                            ("none", {"coef": 1.0, "k": 8})])
def test_preflight_passes_on_the_real_pair(folders, objective, oprd):
    student_spec, teacher_spec = ModelSpec(model=str(folders.student)), ModelSpec(model=str(folders.teacher))
    student_config, teacher_config = load_model_config(student_spec), load_model_config(teacher_spec)
    tokenizer, teacher_tok = load_tokenizer(student_spec), load_tokenizer(teacher_spec)
    cfg = _preflight_config(folders, objective, **oprd)
    assert check_model_pairing(cfg, student_config, teacher_config, tokenizer, teacher_tok) == []
    prompts = PromptSet.render(load_problems(str(DAPO), limit=2), tokenizer, enable_thinking=False)
    check_context_length(cfg, student_config, teacher_config, prompts)

    # the same check refuses a tokenizer with more tokens than the head has rows
    o200k = load_tokenizer(ModelSpec(model=str(O200K)))
    with pytest.raises(ConfigError, match=f"student model has {QWEN3_ROWS} embedding rows, fewer than its "
                                          f"tokenizer's {O200K_TOKENS} tokens"):
        check_model_pairing(cfg, student_config, teacher_config, o200k, o200k)


def _recipe(folder: Path, student: Path, teacher: Path, **sections) -> Path:
    """A recipe for the two folders: 2 DAPO prompts per step x 2 responses x 16 new tokens."""
    recipe = {
        "seed": 0,
        "student": {"model": str(student)},
        "teacher": {"model": str(teacher)},
        "data": {"path": str(DAPO), "limit": 4, "enable_thinking": False},
        "rollout": {"prompts_per_step": 2, "responses_per_prompt": 2, "max_new_tokens": 16},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "micro_batch_size": 2},
        **sections,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sampled", "topk", "full", "oprd"])
def test_train_at_real_width(folders, tmp_path, monkeypatch, objective):
    """`oprd train` on the real-width pair: finite losses, the plan cut at the tokenizer, and no
    padding row in any batch the run sampled."""
    sections = ({"opd": {"objective": "none"}, "oprd": {"coef": 1.0, "k": 8}} if objective == "oprd" else
                {"opd": {"objective": objective, "k": 16}})
    recipe = _recipe(tmp_path, folders.student, folders.teacher, **sections)
    plans, largest = [], []
    from_config, finish = LossPlan.from_config.__func__, Sampler.finish

    def spy_plan(cls, *args, **kwargs):
        plans.append(from_config(cls, *args, **kwargs))
        return plans[-1]

    def spy_sample(self, indices, sampled):
        batch = finish(self, indices, sampled)
        largest.append(int(batch.response_ids.max()))
        return batch

    monkeypatch.setattr(trainer.LossPlan, "from_config", classmethod(spy_plan))
    monkeypatch.setattr(Sampler, "finish", spy_sample)
    run_dir = trainer.train(load_config(recipe, [f"output_dir={tmp_path / 'run'}", "max_steps=1", "save_every=0"]))

    assert [plan.vocab_size for plan in plans] == [QWEN3_TOKENS]
    assert largest and max(largest) < QWEN3_TOKENS
    (row,) = run_metrics(run_dir)
    loss_key = "rep/loss" if objective == "oprd" else "opd/loss"
    assert row["step"] == 1 and row["response_length/mean"] > 0
    for key in ("loss", "grad_norm", loss_key):
        assert math.isfinite(row[key]), (key, row)
    assert row["grad_norm"] > 0
    if objective == "topk":
        assert 0 <= row["opd/topk_overlap"] <= 1
    if objective == "oprd":  # the pre-flight rollout of the run itself
        cosines = json.loads((run_dir / "preflight.json").read_text())["cosine_by_layer"]
        assert set(cosines) == {"1"} and math.isfinite(cosines["1"])
    final = AutoConfig.from_pretrained(run_dir / "final")
    assert final.vocab_size == QWEN3_ROWS and final.tie_word_embeddings and final.num_hidden_layers == 1


# --------------------------------------------------------------------------- across tokenizers


def _problem_statements() -> list[str]:
    """The benchmark problems' text, without the instruction every prompt repeats. No model-written
    solutions exist offline, so the problem statements of MATH-500 and AIME 2024 stand in for real
    math text: LaTeX, numbers, units, the odd non-ASCII character."""
    texts = []
    for path in BENCHMARKS:
        for problem in load_problems(str(path)):
            text = problem.messages[-1]["content"]
            texts.append(text.split(" Please reason step by step")[0])
    return texts


def _clean_ends(tokenizer, ids: list[int], text: str) -> dict[int, int]:
    """{end: index of the last token after which exactly text[:end] has been read}, by decoding
    every prefix (the naive reference of `align_by_offsets`)."""
    ends = {}
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
        if text.startswith(prefix) and prefix:
            ends[len(prefix)] = i
    return ends


def test_real_math_text_pairs_across_o200k_and_qwen3():
    qwen3, o200k = AutoTokenizer.from_pretrained(QWEN3), AutoTokenizer.from_pretrained(O200K)
    texts = _problem_statements()
    assert len(texts) == 530
    matched = qwen3_tokens = o200k_tokens = 0
    shares = []
    for text in texts:
        q_ids = qwen3(text, add_special_tokens=False).input_ids
        o_ids = o200k(text, add_special_tokens=False).input_ids
        q_text, q_spans = decoded_offsets(qwen3, q_ids)
        o_text, o_spans = decoded_offsets(o200k, o_ids)
        assert q_text == o_text == text
        pairs = align_by_offsets(q_spans, o_spans)
        for i, j in pairs:  # both have read the same text, and it is a prefix of the whole
            assert qwen3.decode(q_ids[: i + 1]) == o200k.decode(o_ids[: j + 1]) == text[: q_spans[i][1]]
        # and no pair is missed: every end both tokenizations reach, found by decoding every prefix
        q_ends, o_ends = _clean_ends(qwen3, q_ids, text), _clean_ends(o200k, o_ids, text)
        assert pairs == [(q_ends[end], o_ends[end]) for end in sorted(q_ends.keys() & o_ends.keys())]
        shares.append(matched_share(pairs, q_spans))
        matched += len(pairs)
        qwen3_tokens += sum(end > start for start, end in q_spans)
        o200k_tokens += sum(end > start for start, end in o_spans)
    share = matched / qwen3_tokens
    print(f"o200k <-> Qwen3 on {len(texts)} MATH-500 + AIME24 problem statements: {matched} pairs, "
          f"{share:.3f} of Qwen3's {qwen3_tokens} tokens, {matched / o200k_tokens:.3f} of o200k's {o200k_tokens}; "
          f"lowest per text {min(shares):.3f}")
    # Measured on these files: 0.957 of Qwen3's tokens (0.955 of o200k's), 0.70 for the worst text.
    # Both are byte-level BPEs with GPT-4-style pre-tokenisers, so words and LaTeX commands end in
    # the same places; the unmatched tokens are almost all inside numbers (Qwen3 splits every
    # digit, o200k groups up to three). An aligner that lost its place after the first number or
    # the first non-ASCII character would fall far below these floors.
    assert share > 0.9
    assert min(shares) > 0.5


def test_retokenize_pairs_same_text_on_real_tokenizers():
    """The trainer's path across tokenizers: Qwen3 ids (as a student would sample them) re-read by
    o200k, whose prompt is its own rendering (it has no chat template)."""
    qwen3 = load_tokenizer(ModelSpec(model=str(QWEN3)))
    o200k = load_tokenizer(ModelSpec(model=str(O200K)))
    texts = _problem_statements()[-30:]  # AIME 2024
    messages = [[{"role": "user", "content": f"Problem {i}"}] for i in range(len(texts))]
    prompts, prompt_mask = pad_left([prompt_token_ids(qwen3, m, enable_thinking=False) for m in messages],
                                    qwen3.pad_token_id)
    ended = [i % 2 == 0 for i in range(len(texts))]
    encoded = [qwen3(t, add_special_tokens=False).input_ids + ([qwen3.eos_token_id] if e else [])
               for t, e in zip(texts, ended)]
    width = max(len(e) for e in encoded)
    response_ids = torch.full((len(texts), width), qwen3.pad_token_id)
    response_mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        response_ids[row, : len(ids)], response_mask[row, : len(ids)] = torch.tensor(ids), 1
    sampled = RolloutBatch(prompts, prompt_mask, response_ids, response_mask,
                           torch.arange(len(texts)), torch.tensor([not e for e in ended]))
    teacher_prompts = [prompt_token_ids(o200k, m, use_chat_template=False) for m in messages]
    view = retokenize(sampled, qwen3, o200k, teacher_prompts).teacher_view
    for row, response in enumerate(sampled.responses()):
        teacher_response = view.batch.responses()[row]
        assert (teacher_response[-1] == o200k.eos_token_id) == ended[row]
        assert o200k.decode(teacher_response[:-1] if ended[row] else teacher_response) == texts[row]
        partners = view.partner_B_T[row, : len(response)].tolist()
        assert partners[0] == 0
        for t, j in enumerate(partners):
            if j >= 0:  # student position t has read response[:t], teacher position j teacher_response[:j]
                assert qwen3.decode(response[:t]) == o200k.decode(teacher_response[:j])
    share = view.matched_share(sampled.response_mask)
    print(f"retokenize, AIME 2024 statements read by Qwen3 then o200k: {share:.3f} of response positions paired")
    assert share > 0.9


# --------------------------------------------------------------------------- two processes, killed


LAUNCH_TIMEOUT_S = 420
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPRD_COLLECTIVE_TIMEOUT_S": "120"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _launch(command: list[str]) -> None:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])


@pytest.fixture(scope="module")
def sharded_recipe(folders, tmp_path_factory):
    """OPD (sampled) + 10 x OPRD, as the smoke recipe oprd_plus_opd, on the real-width pair."""
    return _recipe(tmp_path_factory.mktemp("sharded"), folders.student, folders.teacher,
                   opd={"objective": "sampled"}, oprd={"coef": 10.0, "k": 8, "preflight_prompts": 0})


@pytest.mark.slow
def test_killed_at_real_width_and_resumed_equals_uninterrupted(folders, sharded_recipe, tmp_path):
    base = [*TORCHRUN, "-m", "oprd", "train", str(sharded_recipe), "max_steps=2"]
    # the uninterrupted run never checkpoints: resuming must give what never stopping gives
    uninterrupted = tmp_path / "uninterrupted"
    _launch([*base, "save_every=0", f"output_dir={uninterrupted}"])

    run_dir = tmp_path / "killed"
    command = [*base, "save_every=1", f"output_dir={run_dir}"]
    launch = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not (run_dir / "checkpoints" / "step_000001").exists():
            assert launch.poll() is None, "the run ended before its step-1 checkpoint"
            assert time.monotonic() < deadline, "no step-1 checkpoint in time"
            time.sleep(0.1)
    finally:
        assert len(kill_job(launch.pid)) >= 3  # the launcher and both workers
        launch.wait(timeout=60)
    assert launch.returncode == -signal.SIGKILL  # the kill landed: the launcher did not exit on its own
    assert not (run_dir / "final").exists()

    _launch([*command, "resume=true"])
    got, want = run_metrics(run_dir), run_metrics(uninterrupted)
    assert [r["step"] for r in want] == [1, 2]
    assert [r["step"] for r in got] == [1, 2]  # step 2 after the resume: AdamW's restored state at work
    for row, reference in zip(got, want):
        for key in ("loss", "grad_norm", "lr", "response_length/mean", "rep/loss", "opd/loss"):
            assert math.isfinite(row[key])
            assert row[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-6), (row["step"], key)
    a, b = load_file(run_dir / "final" / "model.safetensors"), load_file(uninterrupted / "final" / "model.safetensors")
    assert set(a) == set(b) and a["model.embed_tokens.weight"].shape == (QWEN3_ROWS, 1024)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    initial = load_file(folders.student / "model.safetensors")
    assert any(not torch.equal(a[k].float(), initial[k].float()) for k in a), "final/ holds untrained weights"


def test_the_rehearsals_report_renders_and_its_measurements_come_first(tmp_path):
    """report.md from a result of the rehearsal's shape (a rendering error once lost a whole
    rehearsal's measurements: report.json is now written before report.md is rendered)."""
    from oprd.experiments.rehearsal import RehearsalSettings, predicted_memory, write_report

    s = RehearsalSettings(out=tmp_path, layers=2)
    phases = {"sampling": 47.0, "step": 177.9}
    stage = {"seconds": 706.0, "peak_rss": {"oprd: rank 0": 2**30}, "peak_total_rss": 2**30}
    result = {"date": "2026-12-07", "machine": "2 CPU cores", "versions": {"trainer": "a", "vllm": "b"},
              "command": "bash scripts/rehearsal.sh", "parameters": 4e8,
              "phases": {"oprd": phases, "colocate": phases}, "stages": {"oprd": stage},
              "memory_predicted": predicted_memory(s), "memory_measured": {"training rank": "7.55"},
              "checkpoint_gib": {"oprd": 4.5},
              "resume": {"kill": {"checkpoints": ["step_000002"], "returncode": -9},
                         "comparison": {"equal": True, "max_relative_difference": {"loss": 0.0},
                                        "max_weight_difference": 0.0}},
              "final": {"class": "Qwen3ForCausalLM"}, "eval": {"results": {}}}
    text = write_report(s, result)
    assert (tmp_path / "report.md").read_text() == text
    assert "| phase | oprd | colocate |" in text and "| sampling | 47.0 | 47.0 |" in text
    assert "| oprd | 706 | oprd: rank 0 1.0 | 1.0 |" in text and "oprd 4.50 GiB" in text
