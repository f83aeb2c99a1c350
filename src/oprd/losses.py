"""Distillation objectives as pure functions over tensors.

Shape letters: B sequences, T response positions, D hidden size, V vocabulary, K support size,
N selected positions flattened over the batch. Teacher inputs are always treated as constants.

Two layers of API:
- The public functions (`representation_loss`, `opd_*_loss`) take padded (B, T, ...) tensors and a
  mask and are the readable definition of each objective.
- The `*_rows` functions take only the selected positions, flattened to (N, ...), with a per-row
  weight that already holds the averaging. The trainer uses them (through `chunked_head_loss` for
  the output-space losses) so it never materialises padding or a (B, T, V) logit tensor; summing
  their results over micro-batches gives exactly the full-batch loss. The public functions are thin
  wrappers over the same code, and the tests compare both against naive references.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F

PositionMode = Literal["all", "last", "first_k", "last_k"]
LayerMode = Literal["last", "all", "even", "odd"]
TopkSupport = Literal["student", "teacher", "intersection", "union"]
Aggregation = Literal["token", "sequence"]
POSITION_MODES, LAYER_MODES = typing.get_args(PositionMode), typing.get_args(LayerMode)
TOPK_SUPPORTS, AGGREGATIONS = typing.get_args(TopkSupport), typing.get_args(Aggregation)


# --------------------------------------------------------------------------- selection


def position_mask(response_mask: torch.Tensor, mode: str, k: int | None = None) -> torch.Tensor:
    """(B, T) float mask of the response positions a representation loss supervises.

    `response_mask` marks valid response tokens, contiguous from index 0. "last" keeps the final
    valid token, "first_k"/"last_k" the first/last k of each response (all of it when shorter).
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"position mode must be one of {POSITION_MODES}, got {mode!r}")
    if mode in ("first_k", "last_k") and (k is None or k < 1):
        raise ValueError(f"position mode {mode!r} needs k >= 1, got {k!r}")
    valid = response_mask.bool()
    lengths = valid.sum(-1, keepdim=True)  # (B, 1)
    t = torch.arange(response_mask.shape[-1], device=response_mask.device).unsqueeze(0)  # (1, T)
    if mode == "all":
        keep = valid
    elif mode == "last":
        keep = t == lengths - 1
    elif mode == "first_k":
        keep = valid & (t < k)
    else:
        keep = valid & (t >= lengths - k)
    return keep.float()


def select_layers(num_layers: int, mode: str) -> list[int]:
    """1-based block indices, as in HF `hidden_states` (0 = embeddings, never selected).

    "even"/"odd" follow the reference code's parity of the 0-based block index:
    `select_layers(6, "even") == [1, 3, 5]`, `select_layers(6, "odd") == [2, 4, 6]`.
    """
    if mode not in LAYER_MODES:
        raise ValueError(f"layer mode must be one of {LAYER_MODES} or an explicit list, got {mode!r}")
    if mode == "last":
        return [num_layers]
    if mode == "all":
        return list(range(1, num_layers + 1))
    parity = 0 if mode == "even" else 1
    return [i + 1 for i in range(num_layers) if i % 2 == parity]


def layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer 1..L_S (paper Eq. 11), ties rounded half to even.

    round((l - 1) / (L_S - 1) * (L_T - 1)) + 1: first maps to first, last to last, the rest
    proportionally. Computed exactly (fractions), so a true .5 tie such as 7 * 45 / 10 = 31.5 is
    never turned into 31.499... by float division. A one-layer student pairs with the teacher's
    last layer.
    """
    if num_student_layers == num_teacher_layers:
        return list(range(1, num_student_layers + 1))
    if num_student_layers == 1:
        return [num_teacher_layers]
    return [
        round(Fraction((layer - 1) * (num_teacher_layers - 1), num_student_layers - 1)) + 1
        for layer in range(1, num_student_layers + 1)
    ]


def row_weights(mask: torch.Tensor, aggregation: str = "token", normalizer: float | torch.Tensor | None = None):
    """(B, T) weights that turn a sum over positions into the loss's average.

    "token": every selected position of the batch counts the same (reference code).
    "sequence": average within each sequence first, then over sequences (paper Eq. 6).
    `normalizer` is the full batch's token (or non-empty sequence) count when `mask` holds one
    micro-batch of it; by default it is taken from `mask`. An all-zero mask gives all-zero
    weights, so every loss is 0 there, never NaN.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = mask.float()
    if aggregation == "token":
        total = mask.sum() if normalizer is None else normalizer
        return mask / torch.as_tensor(total, dtype=mask.dtype).clamp(min=1)
    per_sequence = mask / mask.sum(-1, keepdim=True).clamp(min=1)
    total = (mask.sum(-1) > 0).sum() if normalizer is None else normalizer
    return per_sequence / torch.as_tensor(total, dtype=mask.dtype).clamp(min=1)


# --------------------------------------------------------------------------- OPRD


def representation_loss_rows(
    student_rows: Sequence[torch.Tensor],
    teacher_rows: Sequence[torch.Tensor],
    weights: torch.Tensor,
    normalize: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OPRD on selected positions: lists of (N, D) per layer pair, weights (N,).

    Per layer: sum_n w_n * mean_d (s - t)^2 (both L2-normalised first when `normalize`); then the
    mean over layers. Metrics are weighted sums too, so they add up over micro-batches.
    """
    if len(student_rows) != len(teacher_rows) or not student_rows:
        raise ValueError("representation loss needs the same, non-zero number of student and teacher layers")
    per_layer, metrics = [], {}
    for i, (s, t) in enumerate(zip(student_rows, teacher_rows)):
        s, t = s.float(), t.detach().float()
        if s.shape != t.shape:
            raise ValueError(f"layer pair {i}: student rows {tuple(s.shape)} vs teacher rows {tuple(t.shape)}")
        with torch.no_grad():
            cosine = (F.cosine_similarity(s, t, dim=-1, eps=1e-8) * weights).sum()
        if normalize:
            s, t = F.normalize(s, dim=-1, eps=1e-8), F.normalize(t, dim=-1, eps=1e-8)
        mse = (((s - t) ** 2).mean(-1) * weights).sum()
        per_layer.append(mse)
        metrics[f"rep/mse/pair_{i}"] = mse.detach()
        metrics[f"rep/cosine_similarity/pair_{i}"] = cosine
    loss = torch.stack(per_layer).mean()
    metrics["rep/mse"] = loss.detach()
    pair_cosines = [metrics[f"rep/cosine_similarity/pair_{i}"] for i in range(len(per_layer))]
    metrics["rep/cosine_similarity"] = torch.stack(pair_cosines).mean()
    return loss, metrics


def representation_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor,
    normalize: bool = True,
    aggregation: str = "token",
) -> torch.Tensor:
    """OPRD loss (paper Eq. 6): equal-length sequences of (B, T, D) per layer pair, mask (B, T).

    Per layer, the mean over D of the squared difference (of L2-normalised vectors when
    `normalize`, the reference code's form; un-normalised is the paper's 1/d MSE), averaged over
    masked positions ("token" or "sequence" aggregation), then averaged over layers.
    """
    weights = row_weights(mask, aggregation)
    selected = mask.bool()
    loss, _ = representation_loss_rows(
        [s[selected] for s in student_hidden], [t[selected] for t in teacher_hidden], weights[selected], normalize
    )
    return loss


# --------------------------------------------------------------------------- OPD


def sampled_token_terms(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                        importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token policy-gradient surrogate of sampled-token OPD, any shape.

    The advantage is the per-token reward -(log p - log q) (tinker-cookbook, PAPER.md); the
    surrogate's value is the reverse-KL estimate log p - log q and its gradient with respect to
    log p is that same estimate: -A * grad log p. Tokens sampled by other weights than the student's
    take `importance` (same shape, no gradient), the ratio of the student's probability to theirs,
    as a factor of the gradient; the value stays the estimate.
    """
    estimate = (student_logprobs - teacher_logprobs.detach()).detach()
    weight = estimate if importance is None else estimate * importance.detach()
    return weight * (student_logprobs - student_logprobs.detach()) + estimate


class _KLFromLogprobs(torch.autograd.Function):
    """Row-wise KL(p || q) from (..., V) log-probabilities, keeping no (..., V) buffer of its own
    for backward: on the chunked LM-head path these buffers are what bounds memory."""

    @staticmethod
    def forward(ctx, logp, logq):
        p = logp.exp()
        gap = (logp - logq).masked_fill_(p == 0, 0.0)  # p = 0 contributes 0, never 0 * inf
        ctx.save_for_backward(logp, logq)
        return p.mul_(gap).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logp, logq = ctx.saved_tensors
        p = logp.exp()
        gap = (logp - logq).masked_fill_(p == 0, 0.0)
        # d/d logp_i of p_i (logp_i - logq_i) = p_i (logp_i - logq_i + 1)
        return gap.add_(1.0).mul_(p).mul_(grad_out.unsqueeze(-1)), None


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probabilities -> (...) KL(p || q), with q a constant.

    Entries with p = 0 contribute exactly 0 (and a zero gradient); p > 0 where q = 0 gives +inf,
    which the trainer reports as a non-finite loss rather than hiding it.
    """
    return _KLFromLogprobs.apply(logp, logq.detach())


def full_kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) KL(p || q) over the whole vocabulary."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    return kl_from_logprobs(logp, F.log_softmax(teacher_logits.detach().float(), dim=-1))


def top_indices(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int):
    """(N, k) vocabulary indices of each model's k most likely tokens."""
    with torch.no_grad():
        return student_logits.topk(k, dim=-1).indices, teacher_logits.topk(k, dim=-1).indices


def topk_support(student_top: torch.Tensor, teacher_top: torch.Tensor, support: str):
    """Indices (N, K) into the vocabulary and a (N, K) bool of which are in the support."""
    if support not in TOPK_SUPPORTS:
        raise ValueError(f"top-k support must be one of {TOPK_SUPPORTS}, got {support!r}")
    if support == "student":
        return student_top, torch.ones_like(student_top, dtype=torch.bool)
    if support == "teacher":
        return teacher_top, torch.ones_like(teacher_top, dtype=torch.bool)
    if support == "intersection":
        return student_top, (student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)).any(-1)
    teacher_new = ~(teacher_top.unsqueeze(-1) == student_top.unsqueeze(-2)).any(-1)
    indices = torch.cat([student_top, teacher_top], dim=-1)
    return indices, torch.cat([torch.ones_like(student_top, dtype=torch.bool), teacher_new], dim=-1)


def topk_kl_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    support: str = "student",
    top: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N, V) logits -> (N,) KL(p_bar || q_bar), both renormalised on the support.

    `top` passes `top_indices(...)` when the caller already has them. Positions whose support is
    empty (an empty intersection) contribute 0.
    """
    indices, valid = topk_support(*(top or top_indices(student_logits, teacher_logits, k)), support)
    neg_inf = torch.finfo(torch.float32).min
    s = student_logits.float().gather(-1, indices).masked_fill(~valid, neg_inf)
    t = teacher_logits.detach().float().gather(-1, indices).masked_fill(~valid, neg_inf)
    logp, logq = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    return kl_from_logprobs(logp.masked_fill(~valid, -float("inf")), logq)


def _masked_mean(terms_N: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-position terms already selected with `mask.bool()` (padding never enters)."""
    return (terms_N * row_weights(mask)[mask.bool()]).sum()


def opd_sampled_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor):
    """Sampled-token OPD over (B, T) log-probs of the sampled tokens; its gradient with respect to
    student_logprobs[b, t] is (student - teacher)[b, t] / mask.sum() on masked positions."""
    flat = mask.bool()
    return _masked_mean(sampled_token_terms(student_logprobs[flat], teacher_logprobs[flat]), mask)


def opd_topk_loss(student_logits, teacher_logits, mask, k: int, support: str = "student") -> torch.Tensor:
    """Mean over masked positions of KL(p_bar || q_bar) on a top-k support; logits (B, T, V)."""
    flat = mask.bool()
    return _masked_mean(topk_kl_terms(student_logits[flat], teacher_logits[flat], k, support), mask)


def opd_full_loss(student_logits, teacher_logits, mask) -> torch.Tensor:
    """Mean over masked positions of the exact KL(p || q); logits (B, T, V)."""
    flat = mask.bool()
    return _masked_mean(full_kl_terms(student_logits[flat], teacher_logits[flat]), mask)


# --------------------------------------------------------------------------- fused LM head


def output_space_terms(
    objective: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    k: int = 16,
    support: str = "student",
    sampler_logprobs: torch.Tensor | None = None,
    ratio_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row OPD loss terms (N,) for `objective` in {sampled, topk, full}, plus per-row
    diagnostics (N,): sampled-token KL estimate, entropies and, for top-k, support overlap.

    `sampler_logprobs` (N,): the sampling weights' log-probs of `targets`, for sampled-token OPD on
    tokens those weights sampled and not the student's: each gradient is weighted by the truncated
    ratio min(p / p_sampler, ratio_cap), reported as `opd/is_ratio_mean` (before truncation) and
    `opd/is_clipped_share`."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(teacher_logits.float(), dim=-1)
    del teacher_logits  # the caller's logits chunk can be freed now: logq carries everything needed
    student_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    teacher_lp = logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ratio = None if sampler_logprobs is None else (student_lp.detach() - sampler_logprobs.float()).exp()
    if ratio is not None and objective != "sampled":
        raise ValueError(f"an importance ratio applies to the sampled-token estimator, not to {objective} OPD")
    if objective == "sampled":
        terms = sampled_token_terms(student_lp, teacher_lp, None if ratio is None else ratio.clamp(max=ratio_cap))
    elif objective == "topk":
        top = top_indices(logp, logq, k)  # log-softmax keeps the order of the logits
        terms = topk_kl_terms(logp, logq, k, support, top)
    elif objective == "full":
        terms = kl_from_logprobs(logp, logq)
    else:
        raise ValueError(f"unknown OPD objective {objective!r}")
    with torch.no_grad():
        diagnostics = {
            "opd/kl_estimate": student_lp.detach() - teacher_lp,
            "opd/student_entropy": _entropy(logp.detach()),
            "opd/teacher_entropy": _entropy(logq),
        }
        if ratio is not None:
            diagnostics["opd/is_ratio_mean"] = ratio
            diagnostics["opd/is_clipped_share"] = (ratio > ratio_cap).float()
        if objective == "topk":
            student_top, teacher_top = top
            shared = (student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)).any(-1).sum(-1)
            diagnostics["opd/topk_overlap"] = shared.float() / k
    return terms, diagnostics


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probabilities -> (...) entropy, with one temporary (..., V) buffer."""
    return -logp.exp().mul_(logp).nan_to_num_(0.0).sum(-1)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over row chunks of loss(hidden[chunk] @ W.T + b), with all gradients taken chunk by
    chunk inside forward, so no more than one chunk of (rows, V) logits is ever alive.

    The fused-linear-loss idea (Liger, torchtune's chunked losses), written around any
    autograd-traceable loss of the logits: the trainer's fast path runs the very same term functions
    as the readable reference. Per chunk it costs what the plain path costs (one forward and two
    backward matmuls); the head's gradient is accumulated in place, never re-allocated per chunk.

    Precision is the plain path's under the caller's autocast: the three matmuls run in the compute
    dtype (bf16 under autocast, else the weight's), on one copy of the weight made before the loop,
    and `chunk_loss` runs under the same autocast (so a teacher's head applied there computes as the
    student's does; the losses take their softmax in float32). The head's gradient adds up over
    chunks in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, chunk_size):
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        accumulate_dtype = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights: fp32 gradients
        with torch.autocast(device_type, enabled=False):
            w = weight.to(matmul_dtype)
            b = bias.to(matmul_dtype) if bias is not None else None
            grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
            grad_weight = torch.zeros_like(weight, dtype=accumulate_dtype) if weight.requires_grad else None
            grad_bias = (
                torch.zeros_like(bias, dtype=accumulate_dtype) if bias is not None and bias.requires_grad else None
            )
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(matmul_dtype)
                logits = h @ w.T
                if b is not None:
                    logits = logits + b
                logits = logits.detach().requires_grad_()
                with torch.enable_grad(), torch.autocast(device_type, dtype=matmul_dtype, enabled=autocast):
                    loss = chunk_loss(logits, rows)
                total += loss.detach().float()
                if not loss.requires_grad:
                    continue
                (grad_logits,) = torch.autograd.grad(loss, [logits])
                grad_logits = grad_logits.to(matmul_dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    _add_product(grad_weight, grad_logits.T, h)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0, dtype=accumulate_dtype)
        # Kept on ctx, not save_for_backward: backward can then drop its own reference, so autograd
        # adopts each gradient as `.grad` instead of copying a vocabulary-sized tensor.
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # Scaled in place: a second vocabulary-sized copy of the head's gradient would double the
        # largest buffer of the update. The graph is therefore single-use (no retain_graph).
        grads, ctx.grads = ctx.grads, None
        grad_hidden, grad_weight, grad_bias = (g.mul_(grad_output) if g is not None else None for g in grads)
        del grads
        return grad_hidden, grad_weight, grad_bias, None, None


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, `out` float32: fused when all three share a dtype. On a GPU the product is a
    bf16 GEMM added to `out`; on a CPU the inputs are upcast and the GEMM fused into `out` instead:
    adding a whole (V, D) bf16 product to float32 once per chunk of 27 rows took 58% of a top-16
    OPD update at r1-distill-1.5b's shape (profiled: 30 s of 52), more than the float32 GEMM costs."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    elif out.is_cuda:
        out += a @ b
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


LOGITS_PER_CHUNK = {"cpu": 2**22, "cuda": 2**26}  # per (rows, V) buffer: 16 MiB / 256 MiB in float32


def default_chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    """Positions per LM-head chunk: a few (rows, V) buffers, not the sequence length, bound the
    output-space losses' memory. On a CPU about 2^22 logits a buffer (measured at the
    r1-distill-1.5b shape: halving the chunk from 55 to 27 rows saves about 140 MiB and costs about
    10% more time); on a GPU 2^26 (441 rows at 151,936), so each chunk is a matmul wide enough to
    keep the tensor cores busy, not hundreds of skinny launches a sequence."""
    return max(1, LOGITS_PER_CHUNK.get(device_type, LOGITS_PER_CHUNK["cuda"]) // vocab_size)


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_loss: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk_size: int = 128,
) -> torch.Tensor:
    """Scalar loss = sum over row chunks of `chunk_loss(hidden[rows] @ weight.T + bias, rows)`.

    hidden: (N, D) final hidden states (the LM head's input); weight (V, D) and bias (V,) the
    student's LM head. Equal in value and gradient to `chunk_loss(hidden @ weight.T + bias, :)`.
    """
    return _ChunkedHeadLoss.apply(hidden, weight, bias, chunk_loss, chunk_size)
