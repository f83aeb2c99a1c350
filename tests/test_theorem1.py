"""Theorem 1's measurement: the gradient-moment estimator and the whole per-checkpoint statistic
against a direct computation (stacked gradients from the public loss functions on full HF outputs)."""


import pytest
import torch
from helpers import SMOKE, TINY

from oprd import losses
from oprd.data import load_problems
from oprd.experiments import theorem1
from oprd.models import ModelSpec, load_model, load_tokenizer


def test_gradient_moments_match_the_stacked_computation():
    torch.manual_seed(0)
    grads = torch.randn(7, 50) * torch.linspace(0.1, 3, 50) + torch.linspace(-1, 1, 50)
    moments = theorem1.GradientMoments()
    for g in grads:
        moments.add(g)
    mean = grads.double().mean(0)
    variance = grads.double().var(0, unbiased=True).sum()
    summary = moments.summary()
    assert summary["mean_norm_sq"] == pytest.approx(float(mean.square().sum()), rel=1e-12)
    assert summary["variance"] == pytest.approx(float(variance), rel=1e-12)
    assert summary["snr"] == pytest.approx(float(mean.square().sum() / variance), rel=1e-12)
    scalars = theorem1.ScalarMoments([1.0, 2.0, 4.0]).summary()
    assert scalars["mean"] == pytest.approx(7 / 3) and scalars["variance"] == pytest.approx(torch.tensor(
        [1.0, 2.0, 4.0]).var().item())


def _direct(student, teacher, batches, parameters):
    """Per batch, on full outputs: the sampled-token OPD gradient (public loss), the OPRD gradient
    (1/d MSE over every layer and response position, written out), the sampled-token KL estimate and
    the exact KL."""
    stacked = {"opd_top1": [], "oprd": []}
    estimate, exact = [], []
    for batch in batches:
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        window = slice(P - 1, P + T - 1)
        mask = batch.response_mask.float()
        s_out = student(**inputs, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        logp = torch.log_softmax(s_out.logits[:, window].float(), -1)
        logq = torch.log_softmax(t_out.logits[:, window].float(), -1)
        target = batch.response_ids.unsqueeze(-1)
        s_lp, t_lp = logp.gather(-1, target).squeeze(-1), logq.gather(-1, target).squeeze(-1)
        opd = losses.opd_sampled_loss(s_lp, t_lp, mask)
        layers = range(1, student.config.num_hidden_layers + 1)
        rep = sum(((s_out.hidden_states[layer][:, window] - t_out.hidden_states[layer][:, window]) ** 2).mean(-1)
                  .mul(mask).sum() / mask.sum() for layer in layers) / len(layers)
        for name, loss in (("opd_top1", opd), ("oprd", rep)):
            grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            stacked[name].append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                            for g, p in zip(grads, parameters)]))
        estimate.append(float(((s_lp - t_lp) * mask).sum().detach() / mask.sum()))
        exact.append(float(((logp.exp() * (logp - logq)).sum(-1) * mask).sum().detach() / mask.sum()))
    return stacked, estimate, exact


def test_gradient_statistics_match_a_direct_computation():
    tokenizer = load_tokenizer(ModelSpec(model=TINY))
    student = load_model(ModelSpec(model=TINY, random_init=True, init_seed=0), torch.device("cpu"))
    teacher = load_model(ModelSpec(model=TINY, random_init=True, init_seed=1), torch.device("cpu"))
    teacher.requires_grad_(False)
    problems = load_problems(str(SMOKE / "prompts.parquet"))
    batches = theorem1.draw_batches(student, tokenizer, problems, batches=4, prompts_per_batch=2,
                                    responses_per_prompt=2, max_new_tokens=10, seed=0)
    assert len({tuple(b.response_ids.flatten().tolist()) for b in batches}) == 4  # independent draws
    measured = theorem1.gradient_statistics(student, teacher, batches, len(tokenizer))

    parameters = [p for p in student.parameters() if p.requires_grad]
    stacked, estimate, exact = _direct(student, teacher, batches, parameters)
    for name, grads in stacked.items():
        grads = torch.stack(grads).double()
        mean, variance = grads.mean(0), grads.var(0).sum()
        got = measured["gradients"][name]
        assert got["variance"] == pytest.approx(float(variance), rel=1e-4), name
        assert got["mean_norm_sq"] == pytest.approx(float(mean.square().sum()), rel=1e-4), name
    estimate, exact = torch.tensor(estimate, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)
    assert measured["kl_estimate"]["sampled_token"]["mean"] == pytest.approx(float(estimate.mean()), rel=1e-4)
    assert measured["kl_estimate"]["sampled_token"]["variance"] == pytest.approx(float(estimate.var()), rel=1e-3)
    assert measured["kl_estimate"]["exact"]["mean"] == pytest.approx(float(exact.mean()), rel=1e-4)
    assert measured["kl_per_token"] == pytest.approx(float(exact.mean()), rel=1e-4)
    assert set(measured["gradients"]) == set(theorem1.OBJECTIVES)
    assert all(g["variance"] > 0 for g in measured["gradients"].values())
