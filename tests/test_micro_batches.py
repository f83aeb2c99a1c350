"""Micro-batches by token budget (`optim.micro_batch_tokens`): how rows are grouped, and that the
step's loss and gradient are those of fixed micro-batches whatever the split."""

import pytest
import torch
from helpers import SMOKE, keep_gradients, update_run

from oprd.batch import RolloutBatch, split_into
from oprd.config import ConfigError, load_config
from oprd.distributed import ONE_PROCESS
from oprd.models import load_tokenizer
from oprd.trainer import update

PROMPTS = [3, 9, 5, 7, 4, 8, 6, 2]  # prompt and response lengths that differ row by row
RESPONSES = [12, 1, 7, 3, 10, 5, 0, 9]  # an empty response among them


def mixed_batch(vocab: int, seed: int = 0) -> RolloutBatch:
    """A hand-made batch of the lengths above: left-padded prompts, right-padded responses; rows
    0-3 answer prompt 0 and rows 4-7 prompt 1 (the routed recipe sends them to different teachers)."""
    generator = torch.Generator().manual_seed(seed)
    rows, prompt_width, response_width = len(PROMPTS), max(PROMPTS), max(RESPONSES)
    prompt_ids = torch.randint(5, vocab, (rows, prompt_width), generator=generator)
    response_ids = torch.randint(5, vocab, (rows, response_width), generator=generator)
    columns = torch.arange(prompt_width)
    prompt_mask = (columns[None] >= prompt_width - torch.tensor(PROMPTS)[:, None]).long()
    response_mask = (torch.arange(response_width)[None] < torch.tensor(RESPONSES)[:, None]).long()
    return RolloutBatch(prompt_ids=prompt_ids * prompt_mask, prompt_mask=prompt_mask,
                        response_ids=response_ids * response_mask, response_mask=response_mask,
                        prompt_index=torch.arange(rows) // 4, truncated=torch.zeros(rows, dtype=torch.bool))


def slots(batch: RolloutBatch, rows: list[int]) -> int:
    return batch.select(torch.tensor(rows)).attention_mask.numel()


@pytest.mark.parametrize("budget", [1, 13, 24, 40, 64, 200])
def test_token_budget_groups_hold_every_row_once_within_the_budget(budget):
    batch = mixed_batch(50)
    groups = batch.token_budget_groups(budget)
    assert sorted(row for group in groups for row in group) == list(range(len(PROMPTS)))
    for group in groups:  # within the budget, or a single row that is longer than it
        assert slots(batch, group) <= budget or len(group) == 1 and slots(batch, group) > budget
    if budget >= slots(batch, list(range(len(PROMPTS)))):
        assert len(groups) == 1


def test_token_budget_groups_fill_longest_rows_first():
    """First-fit decreasing, written out: rows by length (prompt + response) longest first, each
    into the first group that still fits it."""
    batch = mixed_batch(50)
    # lengths 15, 10, 12, 10, 14, 13, 7 (an empty response still takes a column), 11: rows 0, 4, 5, 2, 7, 1, 3, 6
    assert batch.token_budget_groups(40) == [[0, 4], [2, 5], [1, 7], [3, 6]]  # e.g. [3, 6]: 2 x (7 + 3) = 20
    assert batch.token_budget_groups(13) == [[0], [4], [5], [2], [7], [1], [3], [6]]  # no two rows fit


def test_split_into_halves_the_largest_groups_until_the_count_is_met():
    batch = mixed_batch(50)
    groups = batch.token_budget_groups(64)
    split = split_into(groups, len(groups) + 3)
    assert len(split) == len(groups) + 3
    assert sorted(row for group in split for row in group) == list(range(len(PROMPTS)))
    assert max(slots(batch, group) for group in split) <= max(slots(batch, group) for group in groups)
    with pytest.raises(ValueError, match="8 rows cannot make 9 micro-batches"):
        split_into(groups, 9)


SPLITS = {  # name -> overrides; each against one sequence a micro-batch, fixed
    "whole": ["optim.micro_batch_size=8"],
    "tokens:24": ["optim.micro_batch_tokens=24"],
    "tokens:64": ["optim.micro_batch_tokens=64"],
    "packed whole": ["optim.micro_batch_size=8", "optim.pack_sequences=true"],
    "packed tokens:40": ["optim.micro_batch_tokens=40", "optim.pack_sequences=true"],
}


@pytest.mark.parametrize("recipe, overrides", [
    ("oprd.yaml", ["oprd.positions=all"]),
    ("opd_sampled.yaml", []),
    ("opd_topk.yaml", []),
    ("opd_full.yaml", []),
    ("oprd_plus_opd.yaml", []),
    ("multi_teacher.yaml", []),
    ("self_distillation.yaml", []),
])
def test_a_step_by_token_budget_or_packed_equals_fixed_micro_batches(recipe, overrides, tmp_path):
    """Token budgets to 1e-6 (the same forwards, summed in another order); packed rows to 1e-5 (each
    sequence's attention computed over its own tokens instead of under a padding mask)."""
    tokenizer = load_tokenizer(load_config(SMOKE / recipe).student)
    batch = mixed_batch(len(tokenizer))
    results = {}
    for name, split in {"size:1": ["optim.micro_batch_size=1"], **SPLITS}.items():
        torch.manual_seed(0)
        run = update_run(load_config(SMOKE / recipe, [*overrides, *split]), ONE_PROCESS, tokenizer, tmp_path)
        kept = keep_gradients(run)
        metrics = update(run, batch, 1, {})
        results[name] = metrics, kept["first"]
    reference_metrics, reference_grads = results.pop("size:1")
    for name, (metrics, grads) in results.items():
        tolerance = 1e-5 if name.startswith("packed") else 1e-6
        for key, value in reference_metrics.items():
            if not key.startswith("batch/"):
                assert metrics[key] == pytest.approx(value, rel=tolerance, abs=tolerance / 10), (name, key)
        assert max(float((grads[k] - reference_grads[k]).abs().max()) for k in grads) <= tolerance, name
    micro_batches = {name: metrics["batch/micro_batches"] for name, (metrics, _) in results.items()}
    assert micro_batches == {"whole": 1, "tokens:24": 7, "tokens:64": 3, "packed whole": 1, "packed tokens:40": 3}
    # padding among the tokens fed (the last response column is not): none with one sequence a
    # micro-batch or packed, the most with the whole batch padded as one
    assert reference_metrics["batch/padding_share"] == 0
    shares = {name: metrics["batch/padding_share"] for name, (metrics, _) in results.items()}
    assert shares["packed whole"] == shares["packed tokens:40"] == 0
    assert 0 < shares["tokens:24"] < shares["tokens:64"] < shares["whole"]
    assert shares["whole"] == pytest.approx(1 - (sum(PROMPTS + RESPONSES) - 1) / (8 * (9 + 12 - 1)))


def test_packed_rows_count_real_tokens_against_the_budget():
    batch = mixed_batch(50)  # rows of 15, 10, 12, 10, 14, 13, 7, 11 tokens: 92 in all
    groups = batch.token_budget_groups(40, packed=True)
    assert groups == [[0, 4, 7], [1, 2, 5], [3, 6]]  # e.g. 15 + 14 + 11 = 40
    lengths = [p + max(r, 1) for p, r in zip(PROMPTS, RESPONSES)]
    assert all(sum(lengths[row] for row in group) <= 40 for group in groups)


def test_a_model_that_attends_across_packed_sequences_is_refused(tmp_path, monkeypatch):
    """transformers finds packed rows from position_ids; a model whose attention code does not (here:
    the detection switched off) would let each sequence read the one before it."""
    import transformers.masking_utils

    from oprd.trainer import train

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    cfg = load_config(SMOKE / "oprd.yaml", ["optim.pack_sequences=true", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"optim.pack_sequences=true, but the student \(Qwen3ForCausalLM with sdpa "
                                          r"attention\) does not keep sequences packed in one row apart \(its states "
                                          r"differ by 0\.\d+ of their largest\): set optim.pack_sequences=false"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
