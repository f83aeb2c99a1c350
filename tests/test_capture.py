"""oprd.capture.capture_hidden / model_inputs / response_positions against Hugging Face's own outputs.

References are HF's `output_hidden_states=True` and `.logits` (and, for the response alignment, an
unpadded per-row forward pass), on tiny random-initialised Qwen3 and Llama models on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from oprd.batch import RolloutBatch, pad_left
from oprd.capture import FINAL, capture_hidden, model_inputs, packing_problem, response_positions
from oprd.models import ModelSpec, load_model
from oprd.testing import tiny_config

TINY_QWEN3 = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "tiny-qwen3"
PAD = 0


def _qwen3():
    return load_model(ModelSpec(model=str(TINY_QWEN3), random_init=True), torch.device("cpu"))


def _llama():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config(256, model_type="llama", num_layers=4))


_BUILDERS = {"qwen3": _qwen3, "llama": _llama}
_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(params=["qwen3", "llama"])
def model(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = _BUILDERS[request.param]().eval()
    m = _CACHE[request.param]
    m.zero_grad(set_to_none=True)
    return m


def blocks(model):
    return model.model.layers  # both architectures keep their blocks here


def left_padded_inputs(model, B=3, S=9, pads=(0, 2, 5), seed=0):
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    attention = torch.ones(B, S, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p] = PAD
        attention[b, :p] = 0
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": position_ids}


def hf_forward(model, inputs):
    return model(**inputs, output_hidden_states=True, use_cache=False)


# --------------------------------------------------------------------------- values


def test_models_have_four_blocks(model):
    assert len(blocks(model)) == 4 == model.config.num_hidden_layers


@torch.no_grad()
def test_capture_equals_hf_hidden_states_every_layer(model):
    inputs = left_padded_inputs(model)
    out = hf_forward(model, inputs)
    L = len(blocks(model))
    assert len(out.hidden_states) == L + 1
    got = capture_hidden(model, inputs, list(range(1, L + 1)), final=True)
    assert set(got) == set(range(1, L + 1)) | {FINAL}
    valid = inputs["attention_mask"].bool()
    for layer in range(1, L + 1):
        assert got[layer].shape == out.hidden_states[layer].shape
        torch.testing.assert_close(got[layer][valid], out.hidden_states[layer][valid], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[layer], out.hidden_states[layer], rtol=0, atol=1e-6, equal_nan=True)
    # HF's last entry is post-norm: the LM head applied to it gives the logits
    torch.testing.assert_close(got[L], got[FINAL], rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(got[FINAL])[valid], out.logits[valid], rtol=1e-5, atol=1e-5)
    # and differs from the pre-norm output of the last block
    pre_norm = []
    h = blocks(model)[-1].register_forward_hook(lambda m, a, o: pre_norm.append(o[0] if isinstance(o, tuple) else o))
    try:
        hf_forward(model, inputs)
    finally:
        h.remove()
    assert (pre_norm[0][valid] - got[L][valid]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("layers", [[1], [3], [1, 3], [4], [2, 4], [4, 1]])
def test_capture_subset_of_layers(model, layers):
    inputs = left_padded_inputs(model, seed=1)
    ref = hf_forward(model, inputs).hidden_states
    got = capture_hidden(model, inputs, layers)
    assert set(got) == set(layers)
    valid = inputs["attention_mask"].bool()
    for layer in layers:
        torch.testing.assert_close(got[layer][valid], ref[layer][valid], rtol=0, atol=1e-6)


@torch.no_grad()
def test_rows_selection_equals_boolean_indexing(model):
    inputs = left_padded_inputs(model, seed=2)
    g = torch.Generator().manual_seed(3)
    rows = (torch.rand(inputs["input_ids"].shape, generator=g) < 0.4) & inputs["attention_mask"].bool()
    rows[1, -1] = True
    full = capture_hidden(model, inputs, [1, 2, 3, 4], final=True)
    picked = capture_hidden(model, inputs, [1, 2, 3, 4], keep_B_S=rows, final=True)
    D = model.config.hidden_size
    n = int(rows.sum())
    for key in (1, 2, 3, 4, FINAL):
        assert picked[key].shape == (n, D)
        torch.testing.assert_close(picked[key], full[key][rows], rtol=0, atol=1e-6)
    # row-major order, checked element by element
    ref = hf_forward(model, inputs).hidden_states[2]
    order = [(b, s) for b in range(rows.shape[0]) for s in range(rows.shape[1]) if rows[b, s]]
    for i, (b, s) in enumerate(order):
        torch.testing.assert_close(picked[2][i], ref[b, s], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- early stop


def _count_calls(modules):
    counts = [0] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def hook(mod, args, i=i):
            counts[i] += 1
        handles.append(m.register_forward_pre_hook(hook))
    return counts, handles


@torch.no_grad()
def test_early_stop_skips_later_blocks_and_keeps_values(model):
    inputs = left_padded_inputs(model, seed=4)
    ref = hf_forward(model, inputs).hidden_states[2]
    watched = list(blocks(model))
    counts, handles = _count_calls(watched)
    head_positions = []
    handles.append(model.lm_head.register_forward_pre_hook(lambda m, args: head_positions.append(args[0].shape[1])))
    try:
        got = capture_hidden(model, inputs, [2])
        stopped = list(counts)
        counts[:] = [0] * len(counts)
        capture_hidden(model, inputs, [2, 4])
        full = list(counts)
    finally:
        for h in handles:
            h.remove()
    assert set(got) == {2}
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[2][valid], ref[valid], rtol=0, atol=0)
    assert stopped == [1, 1, 0, 0]  # blocks 1, 2 ran once; blocks 3, 4 never
    assert full == [1, 1, 1, 1]  # asking for the last layer runs the whole backbone
    assert head_positions == [1, 1]  # the LM head never sees more than one position per sequence
    assert model.config.num_hidden_layers == 4  # the early stop leaves the config as it was


@torch.no_grad()
def test_capture_leaves_no_hooks_behind(model):
    inputs = left_padded_inputs(model, seed=5)
    before = [len(b._forward_hooks) for b in blocks(model)]
    capture_hidden(model, inputs, [1])
    capture_hidden(model, inputs, [1, 3, 4], final=True)
    assert [len(b._forward_hooks) for b in blocks(model)] == before
    # the model still runs end to end afterwards
    out = hf_forward(model, inputs)
    assert out.logits.shape[-1] == model.config.vocab_size


def test_capture_rejects_out_of_range_layers(model):
    inputs = left_padded_inputs(model)
    for bad in ([0], [5], [-1]):
        with pytest.raises(ValueError):
            capture_hidden(model, inputs, bad)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("layers,key", [([2], 2), ([4], 4), ([1, 3], 3)])
def test_student_capture_keeps_gradients(model, layers, key):
    inputs = left_padded_inputs(model, seed=6)
    rows = inputs["attention_mask"].bool().clone()
    rows[:, :3] = False
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(int(rows.sum()), model.config.hidden_size, generator=g)

    params = [model.model.embed_tokens.weight, blocks(model)[0].mlp.down_proj.weight]
    got = capture_hidden(model, inputs, layers, keep_B_S=rows)
    assert got[key].requires_grad
    got_grads = torch.autograd.grad((got[key] * weights).sum(), params)

    ref = hf_forward(model, inputs).hidden_states[key][rows]
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    for a, b in zip(got_grads, ref_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- response alignment


def hand_batch(vocab: int) -> tuple[RolloutBatch, list[list[int]], list[list[int]]]:
    """Left-padded prompts of lengths 4, 2, 3; right-padded responses of lengths 3, 1, 5.
    Also returns the unpadded prompts and responses, for the references."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 2, 3)]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 1, 5)]
    prompt_ids, prompt_mask = pad_left(prompts, PAD)
    T = max(len(r) for r in responses)
    response_ids = torch.full((3, T), PAD, dtype=torch.long)
    response_mask = torch.zeros(3, T, dtype=torch.long)
    for b, r in enumerate(responses):
        response_ids[b, : len(r)] = torch.tensor(r)
        response_mask[b, : len(r)] = 1
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        prompt_index=torch.arange(3),
        truncated=torch.zeros(3, dtype=torch.bool),
    )
    return batch, prompts, responses


def test_model_inputs_and_response_positions_shapes():
    batch, _, responses = hand_batch(100)
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    assert (P, T) == (4, 5)
    inputs = model_inputs(batch)
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert inputs[name].shape == (3, P + T - 1)
    torch.testing.assert_close(inputs["input_ids"], batch.input_ids[:, :-1])
    rows = response_positions(batch, batch.response_mask)
    assert rows.shape == (3, P + T - 1) and rows.dtype == torch.bool
    assert int(rows.sum()) == int(batch.response_mask.sum()) == 9
    # response token t of row b is predicted at column P - 1 + t
    expected = torch.zeros(3, P + T - 1, dtype=torch.bool)
    for b, r in enumerate(responses):
        for t in range(len(r)):
            expected[b, P - 1 + t] = True
    assert torch.equal(rows, expected)


def test_packed_inputs_are_the_rows_real_tokens_one_after_another():
    batch, prompts, responses = hand_batch(100)
    packed = batch.packed_rows()
    inputs = model_inputs(packed)
    assert set(inputs) == {"input_ids", "position_ids"}  # no mask: transformers reads the rows from the positions
    fed = [prompt + response[:-1] if len(response) == 5 else prompt + response  # the last column is never fed
           for prompt, response in zip(prompts, responses)]
    assert inputs["input_ids"].tolist() == [sum(fed, [])]
    assert inputs["position_ids"].tolist() == [[i for tokens in fed for i in range(len(tokens))]]
    keep = response_positions(packed, batch.response_mask)
    assert keep.shape == inputs["input_ids"].shape and int(keep.sum()) == 9
    starts = [sum(map(len, fed[:b])) for b in range(3)]  # token t is predicted by the output before it
    assert keep.nonzero()[:, 1].tolist() == [starts[b] + len(prompts[b]) - 1 + t
                                             for b in range(3) for t in range(len(responses[b]))]


@torch.no_grad()
def test_packed_rows_give_the_padded_rows_states(model):
    batch, _, _ = hand_batch(model.config.vocab_size)
    padded = capture_hidden(model, model_inputs(batch), [1, 3], response_positions(batch, batch.response_mask),
                            final=True)
    packed_batch = batch.packed_rows()
    packed = capture_hidden(model, model_inputs(packed_batch), [1, 3],
                            response_positions(packed_batch, packed_batch.response_mask), final=True)
    for key in (1, 3, FINAL):
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-5)
    assert packing_problem(model) is None


@torch.no_grad()
def test_response_positions_through_lm_head_equal_hf_logits(model):
    batch, prompts, responses = hand_batch(model.config.vocab_size)
    P = batch.prompt_ids.shape[1]
    rows = response_positions(batch, batch.response_mask)
    got = capture_hidden(model, model_inputs(batch), [], keep_B_S=rows, final=True)
    logits = model.lm_head(got[FINAL])  # (N, V)

    # reference 1: HF on the full padded (B, P + T) batch, logits[:, P - 1 + t] predicts token t
    full = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    # reference 2: each row alone, with no padding at all
    expected_padded, expected_alone, targets = [], [], []
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        alone = model(input_ids=torch.tensor([prompt + response])).logits[0]
        for t in range(len(response)):
            expected_padded.append(full[b, P - 1 + t])
            expected_alone.append(alone[len(prompt) - 1 + t])
            targets.append(response[t])
    assert logits.shape == (len(targets), model.config.vocab_size)
    torch.testing.assert_close(logits, torch.stack(expected_padded), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, torch.stack(expected_alone), rtol=1e-4, atol=1e-4)
    # the targets of those rows are the response tokens in row-major order
    assert batch.response_ids[batch.response_mask.bool()].tolist() == targets


@torch.no_grad()
def test_response_positions_hidden_layers_match_unpadded_rows(model):
    batch, prompts, responses = hand_batch(model.config.vocab_size)
    rows = response_positions(batch, batch.response_mask)
    got = capture_hidden(model, model_inputs(batch), [1, 3], keep_B_S=rows)
    for layer in (1, 3):
        expected = []
        for prompt, response in zip(prompts, responses):
            hs = model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True).hidden_states[layer][0]
            expected.extend(hs[len(prompt) - 1 + t] for t in range(len(response)))
        torch.testing.assert_close(got[layer], torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_leaves_the_captured_gradients_as_they_are():
    """test_vllm.py runs the same check under vLLM's transformers 5.19, where a block's hooks run
    inside the checkpointed region (an op in a hook once made torch refuse the recompute)."""
    from checkpointing_worker import largest_gradient_difference

    assert largest_gradient_difference() <= 1e-6
