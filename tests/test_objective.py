"""oprd.objective: the trainer's fast path (chunked LM heads, truncated forwards, micro-batches)
against the public loss functions on full Hugging Face outputs, values and gradients."""


import pytest
import torch
from helpers import SMOKE, TINY
from transformers import AutoModelForCausalLM

from oprd import losses
from oprd.config import load_config
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.objective import LossPlan, distillation_loss
from oprd.rollout import HFRollout, SamplingParams


def _plan(recipe: str, vocab: int) -> LossPlan:
    cfg = load_config(SMOKE / recipe)
    return LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, vocab)


@pytest.fixture(scope="module")
def pair_and_batch():
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    student = load_model(ModelSpec(model=TINY, random_init=True, init_seed=0), torch.device("cpu"))
    teacher = load_model(ModelSpec(model=TINY, random_init=True, init_seed=1), torch.device("cpu"))
    teacher.requires_grad_(False)
    rollout = HFRollout.for_model(student, tokenizer)
    prompts = [tokenizer("What is 1 + 2?").input_ids, tokenizer("Name a prime number larger than ten please").input_ids]
    torch.manual_seed(0)
    batch = rollout.generate(prompts, SamplingParams(n=2, max_new_tokens=12))
    # Unequal response lengths, so padding and masks are exercised.
    batch.response_mask[0, 5:] = 0
    batch.response_mask[3, 9:] = 0
    return student, teacher, batch, len(tokenizer)


def _reference_loss(plan: LossPlan, student, teacher, batch):
    """The public loss functions on full HF outputs (logits and hidden_states)."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    s_out = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    window = slice(P - 1, P + T - 1)  # outputs that predict response tokens
    mask = batch.response_mask.float()
    loss = torch.zeros(())
    if plan.opd != "none":
        s_logits, t_logits = s_out.logits[:, window], t_out.logits[:, window]
        if plan.opd == "sampled":
            target = batch.response_ids.unsqueeze(-1)
            s_lp = torch.log_softmax(s_logits, -1).gather(-1, target).squeeze(-1)
            t_lp = torch.log_softmax(t_logits, -1).gather(-1, target).squeeze(-1)
            loss = loss + losses.opd_sampled_loss(s_lp, t_lp, mask)
        elif plan.opd == "topk":
            loss = loss + losses.opd_topk_loss(s_logits, t_logits, mask, plan.topk, plan.topk_support)
        else:
            loss = loss + losses.opd_full_loss(s_logits, t_logits, mask)
    if plan.oprd_coef > 0:
        pos = plan.oprd_mask(batch)
        rep = losses.representation_loss(
            [s_out.hidden_states[layer][:, window] for layer in plan.student_layers],
            [t_out.hidden_states[layer][:, window] for layer in plan.teacher_layers],
            pos, plan.normalize, plan.aggregation,
        )
        loss = loss + plan.oprd_coef * rep
    return loss


@pytest.mark.parametrize(
    "overrides",
    [
        ["opd.objective=sampled"],
        ["opd.objective=topk", "opd.k=8", "opd.support=union"],
        ["opd.objective=topk", "opd.k=8", "opd.support=intersection"],
        ["opd.objective=full"],
        ["oprd.coef=1", "oprd.layers=all", "oprd.positions=last_k", "oprd.k=4"],
        ["oprd.coef=1", "oprd.layers=even", "oprd.positions=first_k", "oprd.k=3", "oprd.aggregation=sequence",
         "oprd.normalize=false"],
        ["oprd.coef=1", "oprd.layers=[2]", "oprd.positions=last"],
        ["opd.objective=sampled", "oprd.coef=10", "oprd.layers=odd", "oprd.positions=all"],
        ["opd.objective=full", "oprd.coef=10", "oprd.layers=all", "oprd.positions=last_k", "oprd.k=3"],
    ],
    ids=lambda o: " ".join(o),
)
def test_fast_path_matches_public_losses(pair_and_batch, overrides):
    """Micro-batched, chunked, truncated forward == public functions on full outputs (value and grads)."""
    student, teacher, batch, vocab = pair_and_batch
    cfg = load_config(SMOKE / "oprd.yaml", ["oprd.coef=0", "opd.chunk_size=5", *overrides])
    plan = LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, vocab)
    normalizers = plan.normalizers(batch)

    student.zero_grad()
    fast_total = 0.0
    for first in range(0, 4, 1):
        loss, _ = distillation_loss(plan, student, teacher, batch.select(slice(first, first + 1)), normalizers)
        loss.backward()
        fast_total += loss.item()
    fast_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    student.zero_grad()
    reference = _reference_loss(plan, student, teacher, batch)
    reference.backward()
    assert fast_total == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert fast_grads, "no gradient reached the student"
    for name, param in student.named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        got = fast_grads.get(name, torch.zeros_like(param))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7, msg=name)


def test_a_micro_batch_drops_the_prompt_padding_its_rows_share(pair_and_batch):
    """Left padding of the whole step stays out of a micro-batch: each one-row micro-batch is its
    own prompt and nothing else (the fast path's equality above holds with it)."""
    _, _, batch, _ = pair_and_batch
    lengths = batch.prompt_mask.sum(1)
    assert lengths.min() < lengths.max() == batch.prompt_ids.shape[1]  # the step's prompts differ in length
    for row, length in enumerate(lengths.tolist()):
        micro = batch.select(slice(row, row + 1))
        assert micro.prompt_ids.shape[1] == length and bool(micro.prompt_mask.all())
        assert torch.equal(micro.prompt_ids, batch.prompt_ids[row : row + 1, -length:])
    assert batch.select(slice(0, 4)).prompt_ids.shape == batch.prompt_ids.shape  # the longest prompt keeps them all


def test_opd_plus_oprd_keeps_the_layers_states_only_in_oprds_window(pair_and_batch, monkeypatch):
    """OPD reads the LM head's input at every response position, OPRD the blocks' states only at
    its own (the last 3 here; 2,000 of 16K in the paper): neither model keeps more than that."""
    from oprd import objective
    from oprd.capture import FINAL, capture_hidden

    student, teacher, batch, vocab = pair_and_batch
    cfg = load_config(SMOKE / "oprd_plus_opd.yaml", ["oprd.positions=last_k", "oprd.k=3"])
    plan = LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, vocab)
    captured = []
    monkeypatch.setattr(objective, "capture_hidden", lambda *a, **kw: captured.append(capture_hidden(*a, **kw))
                        or captured[-1])
    distillation_loss(plan, student, teacher, batch, plan.normalizers(batch))
    window, responses = int(plan.oprd_mask(batch).sum()), int(batch.response_mask.sum())
    assert window < responses
    for model, layers in zip(("teacher", "student"), (plan.teacher_layers, plan.student_layers)):
        rows = {key: h.shape[0] for key, h in captured.pop(0).items()}
        assert rows == {FINAL: responses, **dict.fromkeys(layers, window)}, model


def test_oprd_only_never_computes_logits_beyond_one_position(pair_and_batch):
    student, teacher, batch, vocab = pair_and_batch
    student.zero_grad(set_to_none=True)
    positions = []
    handles = [m.get_output_embeddings().register_forward_pre_hook(lambda m, a: positions.append(a[0].shape[1]))
               for m in (student, teacher)]
    try:
        plan = _plan("oprd.yaml", vocab)
        loss, _ = distillation_loss(plan, student, teacher, batch, plan.normalizers(batch))
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert positions == [1, 1]  # each model's forward asks its head for the last position only
    assert student.lm_head.weight.grad is None  # and nothing of the loss flows through it


def test_padded_teacher_vocabulary_is_sliced(pair_and_batch, tmp_path):
    """A teacher with extra embedding rows (same tokenizer) gives the same loss as without them."""
    student, teacher, batch, vocab = pair_and_batch
    config = teacher.config.__class__(**{**teacher.config.to_dict(), "vocab_size": vocab + 64})
    padded = AutoModelForCausalLM.from_config(config)
    state = teacher.state_dict()
    for name, value in padded.state_dict().items():
        value[: state[name].shape[0]] = state[name]  # copy; extra rows keep random values
    padded.requires_grad_(False)
    plan = _plan("opd_full.yaml", vocab)
    norms = plan.normalizers(batch)
    with torch.no_grad():
        a, _ = distillation_loss(plan, student, teacher, batch, norms)
        b, _ = distillation_loss(plan, student, padded, batch, norms)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_the_teachers_head_cast_once_computes_as_autocast_would():
    """Under autocast the teacher's frozen head is cast to bf16 once a micro-batch, not once a chunk
    (autocast re-casts a weight that does not train on every call): the same logits either way."""
    from oprd.objective import _cast_once

    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(64, 300, bias=True).requires_grad_(False), torch.randn(5, 64)
    assert _cast_once(head, "cpu") is head  # no autocast: the module itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once, every_call = _cast_once(head, "cpu")(hidden), head(hidden)
    assert once.dtype == every_call.dtype == torch.bfloat16 and torch.equal(once, every_call)


def test_the_head_gradient_adds_up_in_float32_from_bf16_chunks():
    from oprd.losses import _add_product

    torch.manual_seed(0)
    a, b = torch.randn(300, 27).bfloat16(), torch.randn(27, 64).bfloat16()
    out = torch.ones(300, 64)
    _add_product(out, a, b)
    assert out.dtype == torch.float32
    assert torch.allclose(out, 1 + a.float() @ b.float(), atol=1e-5)
