"""HF sampling draws from the settings oprd names and nothing else, in the training forward's
precision. A checkpoint whose generation_config.json asks for a repetition penalty (Qwen2.5's
instruct models do), a min-p cut or an n-gram ban samples, and trains, exactly as the same
weights without it."""

import shutil

import pytest
import torch
from helpers import SMOKE, run_metrics
from transformers import AutoModelForCausalLM, GenerationConfig

from oprd.config import load_config
from oprd.distributed import ONE_PROCESS
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import HFRollout, SamplingParams, make_rollout, seeded
from oprd.trainer import compute_dtype, train

# What a published generation_config.json may carry that would move a sample away from the
# student's own distribution.
PENALISING = dict(repetition_penalty=5.0, no_repeat_ngram_size=2, min_p=0.2, top_k=3, temperature=0.3)


@pytest.fixture
def folders(tmp_path):
    """The smoke student's weights in two folders, one with a penalising generation config."""
    model = load_model(ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True, init_seed=0), torch.device("cpu"))
    plain, penalised = tmp_path / "plain", tmp_path / "penalised"
    for folder in (plain, penalised):
        model.save_pretrained(folder)
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(SMOKE / "tiny-qwen3" / file, folder / file)
    GenerationConfig(**PENALISING, do_sample=True).save_pretrained(penalised)
    assert AutoModelForCausalLM.from_pretrained(penalised).generation_config.repetition_penalty == 5.0
    return plain, penalised


def _sample(folder, params: SamplingParams) -> torch.Tensor:
    spec = ModelSpec(model=str(folder))
    model, tokenizer = load_model(spec, torch.device("cpu")), load_tokenizer(spec)
    prompts = [tokenizer("2 + 2 =").input_ids, tokenizer("Name a prime.").input_ids]
    with seeded(0):
        return HFRollout.for_model(model, tokenizer).generate(prompts, params).response_ids


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_the_folders_generation_config_never_reaches_the_sampler(folders, temperature):
    plain, penalised = folders
    n = 4 if temperature > 0 else 1  # transformers' greedy search returns one sequence a prompt
    params = SamplingParams(n=n, max_new_tokens=24, temperature=temperature)
    assert torch.equal(_sample(plain, params), _sample(penalised, params))

    # the check can fail: transformers' own generate, left to fill its settings from the folder, samples otherwise
    def hf_default(folder):
        model = AutoModelForCausalLM.from_pretrained(folder)
        with seeded(0):
            return model.generate(torch.tensor([[5, 6, 7, 8]]), do_sample=temperature > 0, max_new_tokens=24,
                                  num_return_sequences=n, pad_token_id=0)
    assert not torch.equal(hf_default(plain), hf_default(penalised))


def test_a_penalising_generation_config_trains_as_the_same_weights_without_it(folders, tmp_path):
    plain, penalised = folders
    lines = {}
    for folder in folders:
        run = train(load_config(SMOKE / "opd_sampled.yaml", [f"student.model={folder}", "student.random_init=false",
                                                             "max_steps=2", "save_every=0",
                                                             f"output_dir={tmp_path / ('run-' + folder.name)}"]))
        lines[folder.name] = run_metrics(run)
    for got, want in zip(lines["penalised"], lines["plain"], strict=True):
        for key in ("loss", "grad_norm", "response_length/mean", "opd/loss"):
            assert got[key] == want[key], key


def test_sampling_computes_in_the_training_forwards_precision(folders, tmp_path):
    """Under bf16 the sampler's forwards run in bf16 over the float32 master weights (so its KV
    cache is bf16), as the training forward does; in float32 they stay float32."""
    plain, _ = folders
    spec = ModelSpec(model=str(plain))
    model, tokenizer = load_model(spec, torch.device("cpu")), load_tokenizer(spec)
    assert next(model.parameters()).dtype == torch.float32
    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for precision, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = load_config(SMOKE / "opd_sampled.yaml", [f"optim.precision={precision}"])
        rollout = make_rollout(cfg.rollout, model, tokenizer, world=ONE_PROCESS, workdir=tmp_path, source=str(plain),
                               longest_sequence=64, compute_dtype=compute_dtype(cfg, model, torch.device("cpu")))
        seen.clear()
        rollout.generate([tokenizer("2 + 2 =").input_ids], SamplingParams(n=2, max_new_tokens=4))
        assert len(seen) >= 4 and set(seen) == {want}, precision


# --------------------------------------------------------------------------- generate calls sized by KV cache


def test_kv_cache_bytes_per_token_counts_keys_and_values_of_each_kv_head():
    from oprd.rollout import kv_cache_bytes_per_token
    from oprd.shapes import shape_config

    config = shape_config("qwen3-1.7b")  # 28 layers, 8 KV heads of 128
    assert kv_cache_bytes_per_token(config, torch.bfloat16) == 2 * 28 * 8 * 128 * 2 == 114_688
    assert kv_cache_bytes_per_token(config, torch.float32) == 2 * 114_688


def test_the_papers_evaluation_plans_its_generate_calls_within_the_budget():
    """Qwen3-1.7B, prompts of up to 512 tokens and 16,384 new ones (the paper's settings): 64
    sequences a call would hold about 115 GiB of bf16 cache. An 80 GB card's default budget
    (a quarter) holds 10 of them a call; every call stays within it."""
    from oprd.rollout import KV_CACHE_SHARE, kv_cache_bytes_per_token, sequences_per_call
    from oprd.shapes import shape_config

    per_token = kv_cache_bytes_per_token(shape_config("qwen3-1.7b"), torch.bfloat16)
    positions = 512 + 16_384
    assert 64 * per_token * positions / 2**30 > 100
    budget = int(KV_CACHE_SHARE * 80 * 10**9)
    sequences = sequences_per_call(per_token, positions, budget, most=64)
    assert sequences == 10 and sequences * per_token * positions <= budget < (sequences + 1) * per_token * positions
    assert sequences_per_call(per_token, positions, 1, most=64) == 1  # never zero
    assert sequences_per_call(per_token, 10, budget, most=64) == 64  # short sequences: the sequence cap
    # docs/evaluation.md's figure: R1-Distill-1.5B with the authors' 31,744 new tokens
    r1 = kv_cache_bytes_per_token(shape_config("r1-distill-1.5b"), torch.bfloat16)
    assert sequences_per_call(r1, 512 + 31_744, budget, most=64) == 21
    assert round(r1 * (512 + 31_744) / 2**30, 1) == 0.9  # GiB a sequence


def test_generate_calls_hold_what_the_kv_budget_allows(monkeypatch):
    """A budget for 3 sequences of (longest prompt + new tokens) splits 4 prompts x 2 samples into
    calls of one prompt (2 sequences), and samples exactly as a cap of 2 sequences a call does."""
    from oprd.rollout import kv_cache_bytes_per_token

    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True)
    model, tokenizer = load_model(spec, torch.device("cpu")), load_tokenizer(spec)
    prompts = [tokenizer(text).input_ids for text in ("2 + 2 =", "Name a prime.", "Is 9 odd?", "Say hi")]
    params = SamplingParams(n=2, max_new_tokens=8)
    positions = max(map(len, prompts)) + params.max_new_tokens
    budget = 3 * kv_cache_bytes_per_token(model.config, torch.float32) * positions
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw))
    with seeded(0):
        by_budget = HFRollout.for_model(model, tokenizer, kv_cache_bytes=budget).generate(prompts, params)
    assert calls == [1, 1, 1, 1]
    with seeded(0):
        by_count = HFRollout.for_model(model, tokenizer, max_batch_sequences=2,
                                       kv_cache_bytes=100 * budget).generate(prompts, params)
    assert calls[4:] == [1, 1, 1, 1]
    assert torch.equal(by_budget.response_ids, by_count.response_ids)
