"""Fixtures shared by several test modules."""

import pytest
import torch
from helpers import TINY

from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import HFRollout, SamplingParams


@pytest.fixture(scope="session")
def wider_teacher_with_bridge(tmp_path_factory):
    """A 6-layer, 96-wide teacher sharing the smoke tokenizer, and a rank-4 bridge fitted to it."""
    from oprd.bridge import fit_bridge, layer_pairs, paired_rows_from_batches, save_bridge
    from oprd.testing import tiny_config

    folder = tmp_path_factory.mktemp("wide-teacher")
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    tokenizer.save_pretrained(folder)
    tiny_config(len(tokenizer), hidden_size=96, num_layers=6, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    student = load_model(ModelSpec(model=TINY, random_init=True), torch.device("cpu"))
    teacher = load_model(ModelSpec(model=str(folder), random_init=True, init_seed=1), torch.device("cpu"))
    rollout = HFRollout.for_model(student, tokenizer)
    torch.manual_seed(0)
    batch = rollout.generate([tokenizer("Add 2 and 3").input_ids, tokenizer("Is 7 prime?").input_ids],
                             SamplingParams(n=4, max_new_tokens=16))
    pairs = layer_pairs(4, 6)
    rows = paired_rows_from_batches(student, teacher, [batch], [s for s, _ in pairs], [t for _, t in pairs],
                                    max_rows=256)
    bridge = fit_bridge({p: r[0] for p, r in rows.items()}, {p: r[1] for p, r in rows.items()}, rank=4, epochs=5)
    path = folder / "bridge.safetensors"
    save_bridge(bridge, path)
    return folder, path
