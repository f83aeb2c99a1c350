"""oprd.losses against naive references written straight from PAPER.md and issue 3's Public API.

Every expected value here is built with plain Python loops over batch, positions and layers and
with torch.softmax / torch.log; nothing from oprd is used to build an expectation. Inputs are
small, seeded random tensors (float64 where it helps) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from oprd.losses import (
    chunked_head_loss,
    layer_map,
    opd_full_loss,
    opd_sampled_loss,
    opd_topk_loss,
    output_space_terms,
    position_mask,
    representation_loss,
    representation_loss_rows,
    row_weights,
    select_layers,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=F64, requires_grad=False, scale=1.0) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen(seed), dtype=dtype) * scale
    return x.requires_grad_(requires_grad)


def response_mask_from_lengths(lengths: list[int], width: int) -> torch.Tensor:
    """(B, T) long mask, valid tokens contiguous from 0 (right padding)."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return mask


def random_mask(B: int, T: int, seed: int, p: float = 0.6) -> torch.Tensor:
    """(B, T) float mask with arbitrary (non-contiguous) holes; at least one position set."""
    m = (torch.rand(B, T, generator=gen(seed)) < p).to(F64)
    m[0, 0] = 1.0
    return m


# =========================================================================== position_mask


def naive_position_mask(response_mask: torch.Tensor, mode: str, k: int | None = None) -> torch.Tensor:
    B, T = response_mask.shape
    out = torch.zeros(B, T)
    for b in range(B):
        n = int(sum(int(v) for v in response_mask[b].tolist()))  # contiguous from 0
        for t in range(T):
            if t >= n:
                continue
            if mode == "all":
                keep = True
            elif mode == "last":
                keep = t == n - 1
            elif mode == "first_k":
                keep = t < k
            elif mode == "last_k":
                keep = t >= n - k
            else:
                raise AssertionError(mode)
            out[b, t] = 1.0 if keep else 0.0
    return out


POSITION_CASES = [
    ("all", None),
    ("last", None),
    ("first_k", 1),
    ("first_k", 3),
    ("first_k", 100),  # k longer than every response
    ("last_k", 1),
    ("last_k", 3),
    ("last_k", 100),
]


@pytest.mark.parametrize("mode,k", POSITION_CASES)
def test_position_mask_matches_naive(mode, k):
    lengths = [0, 1, 2, 5, 7, 3]  # includes a zero-length and a full-width response
    rm = response_mask_from_lengths(lengths, 7)
    got = position_mask(rm, mode, k)
    assert got.shape == rm.shape
    assert got.dtype.is_floating_point
    torch.testing.assert_close(got, naive_position_mask(rm, mode, k), rtol=0, atol=0, check_dtype=False)


@pytest.mark.parametrize("mode,k", POSITION_CASES)
def test_position_mask_accepts_bool_and_float_masks(mode, k):
    rm = response_mask_from_lengths([4, 0, 2], 5)
    expected = naive_position_mask(rm, mode, k)
    for variant in (rm.bool(), rm.float()):
        torch.testing.assert_close(position_mask(variant, mode, k), expected, rtol=0, atol=0, check_dtype=False)


def test_position_mask_hand_values():
    rm = response_mask_from_lengths([5, 2, 0], 6)
    # last: column n - 1 only; zero-length row selects nothing
    assert position_mask(rm, "last").tolist() == [[0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0] * 6]
    assert position_mask(rm, "first_k", 3).tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6]
    assert position_mask(rm, "last_k", 3).tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0] * 6]
    # k = 1 coincides with "last" for last_k and with the first token for first_k
    assert torch.equal(position_mask(rm, "last_k", 1), position_mask(rm, "last"))
    assert position_mask(rm, "first_k", 1).tolist() == [[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6]


@pytest.mark.parametrize("mode", ["first_k", "last_k"])
def test_position_mask_k_longer_than_response_is_whole_response(mode):
    rm = response_mask_from_lengths([3, 1, 4], 4)
    torch.testing.assert_close(position_mask(rm, mode, 4), rm.float())
    torch.testing.assert_close(position_mask(rm, mode, 50), rm.float())


@pytest.mark.parametrize("mode,k", [("first_k", None), ("last_k", None), ("last_k", 0), ("bogus", None)])
def test_position_mask_rejects_bad_arguments(mode, k):
    with pytest.raises(ValueError):
        position_mask(response_mask_from_lengths([2], 3), mode, k)


# =========================================================================== select_layers


def naive_select_layers(num_layers: int, mode: str) -> list[int]:
    # Reference code's parity is on the 0-based block index i; we return 1-based i + 1.
    out = []
    for i in range(num_layers):
        if mode == "all" or (mode == "last" and i == num_layers - 1):
            out.append(i + 1)
        elif mode == "even" and i % 2 == 0:
            out.append(i + 1)
        elif mode == "odd" and i % 2 == 1:
            out.append(i + 1)
    return out


def test_select_layers_contract_examples():
    assert select_layers(6, "even") == [1, 3, 5]
    assert select_layers(6, "odd") == [2, 4, 6]
    assert select_layers(6, "last") == [6]
    assert select_layers(6, "all") == [1, 2, 3, 4, 5, 6]
    assert select_layers(5, "even") == [1, 3, 5]
    assert select_layers(5, "odd") == [2, 4]
    assert select_layers(1, "odd") == []
    assert select_layers(1, "even") == [1]
    assert select_layers(28, "last") == [28]


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 5, 6, 7, 28, 36])
@pytest.mark.parametrize("mode", ["last", "all", "even", "odd"])
def test_select_layers_matches_naive(num_layers, mode):
    got = select_layers(num_layers, mode)
    assert got == naive_select_layers(num_layers, mode)
    assert 0 not in got and all(1 <= layer <= num_layers for layer in got)


@pytest.mark.parametrize("num_layers", [4, 5, 28])
def test_select_layers_even_odd_partition_all(num_layers):
    both = sorted(select_layers(num_layers, "even") + select_layers(num_layers, "odd"))
    assert both == select_layers(num_layers, "all")


def test_select_layers_rejects_unknown_mode():
    with pytest.raises(ValueError):
        select_layers(4, "middle")


# =========================================================================== layer_map


def exact_layer_map(ls: int, lt: int) -> list[int]:
    """Eq. 11 in exact rational arithmetic; Python's round() on a Fraction is half-to-even,
    like torch.round. One-layer student: Eq. 11 is 0/0, the documented choice is the last layer."""
    if ls == 1:
        return [lt]
    return [round(Fraction((layer - 1) * (lt - 1), ls - 1)) + 1 for layer in range(1, ls + 1)]


@pytest.mark.parametrize(
    "ls,lt,expected",
    [
        (4, 6, [1, 3, 4, 6]),  # 0, 5/3, 10/3, 5 -> 0, 2, 3, 5
        (3, 4, [1, 3, 4]),  # 1.5 is a tie -> 2 (even), not 2 -> 4 (half up)
        (3, 6, [1, 3, 6]),  # 2.5 is a tie -> 2 (even), half-up would give 4
        (5, 4, [1, 2, 3, 3, 4]),  # 0, .75, 1.5 (tie -> 2), 2.25, 3
        (3, 8, [1, 5, 8]),  # 3.5 tie -> 4 (even)
        (6, 4, [1, 2, 2, 3, 3, 4]),  # 0, .6, 1.2, 1.8, 2.4, 3
        (4, 4, [1, 2, 3, 4]),
        (1, 5, [5]),
    ],
)
def test_layer_map_hand_values(ls, lt, expected):
    assert layer_map(ls, lt) == expected
    if ls > 1:
        assert exact_layer_map(ls, lt) == expected  # the hand values agree with the exact reference


@pytest.mark.parametrize("ls,lt", [(28, 36), (28, 32), (4, 6), (6, 4), (36, 28), (2, 7), (7, 2), (3, 5), (5, 9)])
def test_layer_map_matches_exact_eq11(ls, lt):
    got = layer_map(ls, lt)
    assert got == exact_layer_map(ls, lt)
    assert len(got) == ls and got[0] == 1 and got[-1] == lt
    assert all(a <= b for a, b in zip(got, got[1:]))  # monotone


def test_layer_map_paper_pairs():
    # Qwen3-1.7B student (28) -> Qwen3-4B teacher (36), by hand: round((layer-1)*35/27)+1
    expected = [round((layer - 1) * 35 / 27) + 1 for layer in range(1, 29)]
    assert layer_map(28, 36) == expected
    assert layer_map(28, 36)[:4] == [1, 2, 4, 5]
    assert layer_map(28, 32)[-3:] == [30, 31, 32]


@pytest.mark.parametrize("n", [1, 2, 4, 28, 36])
def test_layer_map_identity_when_equal(n):
    assert layer_map(n, n) == list(range(1, n + 1))


@pytest.mark.parametrize("ls,lt", [(11, 46), (23, 12), (39, 20)])
def test_layer_map_exact_ties_not_lost_to_float_error(ls, lt):
    # (11, 46) student layer 8: 7 * 45 / 10 = 31.5 exactly -> half-to-even 32 -> teacher 33.
    # (39, 20) student layer 22: 21 * 19 / 38 = 10.5 -> 10 -> teacher 11.
    assert layer_map(ls, lt) == exact_layer_map(ls, lt)


def reference_code_layer_map(ls: int, lt: int, dtype: torch.dtype) -> list[int]:
    """The authors' code: torch.linspace(0, L_T - 1, L_S).round() (0-based, float32 by default), shifted to 1-based."""
    if ls == lt:
        return list(range(1, ls + 1))
    if ls == 1:
        return [lt]
    return (torch.linspace(0, lt - 1, steps=ls, dtype=dtype).round().long() + 1).tolist()


@pytest.mark.parametrize("dtype, differing_pairs", [(torch.float32, 28), (torch.float64, 30)])
def test_layer_map_departs_from_the_float_linspace_only_at_exact_ties(dtype, differing_pairs):
    """Over every (L_S, L_T) in 1..64 x 1..64, the float form picks another teacher layer in a few
    pairs, one student layer each, and only where Eq. 11 is an exact .5 tie that float error moved
    off the tie; the paper's own pairs are never among them. docs/paper.md quotes these counts."""
    differing = []
    for ls in range(1, 65):
        for lt in range(1, 65):
            ours, theirs = layer_map(ls, lt), reference_code_layer_map(ls, lt, dtype)
            moved = [layer for layer in range(1, ls + 1) if ours[layer - 1] != theirs[layer - 1]]
            if moved:
                differing.append((ls, lt))
                [layer] = moved
                assert Fraction((layer - 1) * (lt - 1), ls - 1).denominator == 2, (ls, lt, layer)
    assert len(differing) == differing_pairs
    assert not {(28, 28), (28, 36), (28, 32)} & set(differing)  # same-arch, Qwen3-4B and Phi-4-mini teachers


# =========================================================================== representation_loss


def naive_unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def naive_representation_loss(student, teacher, mask, normalize, aggregation):
    """Eq. 6 by loops: per layer, per position (1/D) ||s - sg(t)||^2, masked average, mean over layers."""
    B, T = mask.shape

    def term(s, q):  # (1/D) ||s - sg(q)||^2, on unit vectors when normalising
        q = q.detach()
        if normalize:
            s, q = naive_unit(s), naive_unit(q)
        return ((s - q) ** 2).sum() / s.shape[-1]

    layer_values = []
    for s_l, t_l in zip(student, teacher):
        if aggregation == "token":
            total, count = 0.0, 0.0
            for b in range(B):
                for t in range(T):
                    if float(mask[b, t]) == 0:
                        continue
                    total = total + term(s_l[b, t], t_l[b, t])
                    count += 1
            layer_values.append(total / count if count else s_l.sum() * 0)
        else:
            per_sequence = []
            for b in range(B):
                total, count = 0.0, 0
                for t in range(T):
                    if float(mask[b, t]) == 0:
                        continue
                    total = total + term(s_l[b, t], t_l[b, t])
                    count += 1
                if count:
                    per_sequence.append(total / count)
            layer_values.append(sum(per_sequence) / len(per_sequence) if per_sequence else s_l.sum() * 0)
    return sum(layer_values) / len(layer_values)


def rep_inputs(B=3, T=5, D=8, layers=2, seed=0, lengths=(5, 0, 3)):
    student = [randn(B, T, D, seed=seed + i, requires_grad=True) for i in range(layers)]
    teacher = [randn(B, T, D, seed=seed + 100 + i, requires_grad=True) for i in range(layers)]
    mask = response_mask_from_lengths(list(lengths), T).to(F64)
    return student, teacher, mask


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("layers", [1, 3])
def test_representation_loss_value_and_grad_match_naive(normalize, aggregation, layers):
    student, teacher, mask = rep_inputs(layers=layers, lengths=(5, 0, 2))
    # an unequal, non-contiguous position mask so "token" and "sequence" differ
    mask[0, 1] = 0
    loss = representation_loss(student, teacher, mask, normalize=normalize, aggregation=aggregation)
    expected = naive_representation_loss(student, teacher, mask, normalize, aggregation)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    got_grads = torch.autograd.grad(loss, student)
    exp_grads = torch.autograd.grad(expected, student)
    for g, e in zip(got_grads, exp_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-7)
        assert g.abs().sum() > 0


def test_representation_loss_token_vs_sequence_differ_by_hand():
    # D = 1, un-normalised: per-position value is (s - t)^2. Row 0 has 3 tokens with error 1,
    # row 1 has 1 token with error 4 (s-t = 2). token: (1+1+1+4)/4 = 1.75; sequence: (1 + 4)/2 = 2.5
    s = torch.tensor([[[1.0], [1.0], [1.0]], [[2.0], [0.0], [0.0]]])
    t = torch.zeros(2, 3, 1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert representation_loss([s], [t], mask, normalize=False, aggregation="token").item() == pytest.approx(1.75)
    assert representation_loss([s], [t], mask, normalize=False, aggregation="sequence").item() == pytest.approx(2.5)
    # 1/d: D = 4 with the same error in every coordinate gives the same number
    s4, t4 = s.expand(2, 3, 4).clone(), torch.zeros(2, 3, 4)
    assert representation_loss([s4], [t4], mask, normalize=False).item() == pytest.approx(1.75)


def test_representation_loss_normalized_is_scale_invariant_and_bounded():
    student, teacher, mask = rep_inputs(lengths=(5, 4, 3))
    base = representation_loss(student, teacher, mask, normalize=True)
    scaled = representation_loss([s * 7.0 for s in student], [t * 0.01 for t in teacher], mask, normalize=True)
    torch.testing.assert_close(base, scaled, rtol=1e-5, atol=1e-7)
    # ||u - v||^2 / D <= 4 / D for unit vectors
    assert 0 < base.item() <= 4 / student[0].shape[-1]
    # opposite directions hit the bound exactly: ||u - (-u)||^2 / D = 4 / D
    anti = representation_loss(student, [-s.detach() for s in student], mask, normalize=True)
    assert anti.item() == pytest.approx(4 / student[0].shape[-1], rel=1e-5)


def test_representation_loss_layers_are_averaged():
    student, teacher, mask = rep_inputs(layers=3, lengths=(5, 2, 3))
    per_layer = [representation_loss([s], [t], mask, normalize=False) for s, t in zip(student, teacher)]
    torch.testing.assert_close(
        representation_loss(student, teacher, mask, normalize=False), sum(per_layer) / 3, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_representation_loss_teacher_is_stop_gradient(normalize, aggregation):
    student, teacher, mask = rep_inputs(lengths=(5, 1, 3))
    loss = representation_loss(student, teacher, mask, normalize=normalize, aggregation=aggregation)
    loss.backward()
    for t in teacher:
        assert t.grad is None
    for s in student:
        assert s.grad is not None and s.grad.abs().sum() > 0
    # and autograd confirms there is no path at all
    student2, teacher2, _ = rep_inputs(lengths=(5, 1, 3), seed=7)
    loss2 = representation_loss(student2, teacher2, mask, normalize=normalize, aggregation=aggregation)
    assert all(g is None for g in torch.autograd.grad(loss2, teacher2, allow_unused=True))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_representation_loss_identical_inputs_give_zero(normalize, aggregation):
    student, _, mask = rep_inputs(lengths=(5, 0, 3))
    teacher = [s.detach().clone() for s in student]
    loss = representation_loss(student, teacher, mask, normalize=normalize, aggregation=aggregation)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    (g,) = torch.autograd.grad(loss, student[0])
    assert g.abs().max().item() < 1e-7


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_representation_loss_all_masked_is_zero_not_nan(normalize, aggregation):
    student, teacher, _ = rep_inputs()
    mask = torch.zeros(3, 5, dtype=F64)
    loss = representation_loss(student, teacher, mask, normalize=normalize, aggregation=aggregation)
    assert torch.isfinite(loss) and loss.item() == 0.0
    grads = torch.autograd.grad(loss, student, allow_unused=True)
    for g in grads:
        assert g is None or (torch.isfinite(g).all() and g.abs().max() == 0)


def test_representation_loss_ignores_unmasked_positions():
    student, teacher, mask = rep_inputs(lengths=(3, 2, 4))
    base = representation_loss(student, teacher, mask, normalize=False)
    garbage_s = [(s.detach() + 1e3 * (1 - mask).unsqueeze(-1)).requires_grad_() for s in student]
    garbage_t = [t + -5e2 * (1 - mask).unsqueeze(-1) for t in teacher]
    loss = representation_loss(garbage_s, garbage_t, mask, normalize=False)
    torch.testing.assert_close(loss, base, rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(loss, garbage_s[0])
    assert g[(1 - mask).bool()].abs().max() == 0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_representation_rows_micro_batches_sum_to_full_batch(normalize, aggregation):
    B, T, D = 5, 6, 4
    lengths = [6, 0, 2, 4, 0]  # one empty sequence inside a micro-batch, one empty micro-batch
    student = [randn(B, T, D, seed=20 + i, requires_grad=True) for i in range(2)]
    teacher = [randn(B, T, D, seed=40 + i) for i in range(2)]
    mask = response_mask_from_lengths(lengths, T).to(F64)
    mask[0, 0] = 0  # non-contiguous supervision inside a row
    expected = naive_representation_loss(student, teacher, mask, normalize, aggregation)

    # the step normaliser, counted by hand on the full batch
    if aggregation == "token":
        normalizer = float(sum(float(v) for v in mask.flatten()))
    else:
        normalizer = float(sum(1 for b in range(B) if mask[b].sum() > 0))

    total = 0.0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 5)):
        m = mask[rows]
        w = row_weights(m, aggregation, normalizer=normalizer)
        sel = m.bool()
        part, _ = representation_loss_rows(
            [s[rows][sel] for s in student], [t[rows][sel] for t in teacher], w[sel], normalize
        )
        total = total + part
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-7)
    got = torch.autograd.grad(total, student)
    exp = torch.autograd.grad(expected, student)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-7)


def test_row_weights_default_normalizer_and_all_zero():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(row_weights(mask, "token"), mask / 3)
    expected_seq = torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(row_weights(mask, "sequence"), expected_seq)
    for agg in ("token", "sequence"):
        w = row_weights(torch.zeros(2, 3), agg)
        assert torch.isfinite(w).all() and w.abs().sum() == 0


def test_representation_loss_rejects_mismatched_layers():
    student, teacher, mask = rep_inputs(layers=2)
    with pytest.raises(ValueError):
        representation_loss(student, teacher[:1], mask)
    with pytest.raises(ValueError):
        representation_loss([student[0]], [teacher[0][..., :4]], mask)


# =========================================================================== opd_sampled_loss


def sampled_inputs(B=3, T=6, seed=0):
    s = (-randn(B, T, seed=seed).abs()).requires_grad_()
    t = (-randn(B, T, seed=seed + 1).abs()).requires_grad_()
    mask = random_mask(B, T, seed=seed + 2)
    return s, t, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opd_sampled_gradient_is_contract(seed):
    s, t, mask = sampled_inputs(seed=seed)
    loss = opd_sampled_loss(s, t, mask)
    (g,) = torch.autograd.grad(loss, s)
    n = float(sum(float(v) for v in mask.flatten()))
    expected = torch.zeros_like(s)
    for b in range(s.shape[0]):
        for j in range(s.shape[1]):
            if mask[b, j] != 0:
                expected[b, j] = (s[b, j] - t[b, j]).detach() / n
    # rtol 1e-6: the implementation's weights are float32 (row_weights casts the mask to float)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-12)
    assert (g[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_opd_sampled_value_is_mean_log_ratio(seed):
    s, t, mask = sampled_inputs(seed=seed)
    loss = opd_sampled_loss(s, t, mask)
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for j in range(s.shape[1]):
            if mask[b, j] != 0:
                total += float((s[b, j] - t[b, j]).detach())
                n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-6, abs=1e-12)


def test_the_truncated_importance_ratio_weights_each_sampled_tokens_gradient():
    """Tokens sampled by older weights: the gradient of row n with respect to the student's logit
    of its token is that of the on-policy estimator times min(p / p_sampler, cap), written out
    token by token; the value stays the KL estimate, and the diagnostics report the ratio."""
    student = randn(6, 11, seed=3, requires_grad=True)
    teacher = randn(6, 11, seed=4)
    targets = torch.tensor([0, 3, 5, 7, 10, 2])
    own = F.log_softmax(student.detach().float(), -1).gather(-1, targets[:, None])[:, 0]  # as the terms compute it
    sampler = own + torch.tensor([0.0, 1.5, -1.5, 0.3, -0.1, -2.0])  # ratios 1, e^-1.5, e^1.5, ...
    terms, diagnostics = output_space_terms("sampled", student, teacher, targets, sampler_logprobs=sampler,
                                            ratio_cap=2.0)
    (grad,) = torch.autograd.grad(terms.sum(), student)
    on_policy, _ = output_space_terms("sampled", student, teacher, targets)
    (on_policy_grad,) = torch.autograd.grad(on_policy.sum(), student)
    for n in range(6):
        ratio = math.exp(float(own[n] - sampler[n]))
        torch.testing.assert_close(grad[n], on_policy_grad[n] * min(ratio, 2.0), rtol=1e-6, atol=1e-9)
        assert float(diagnostics["opd/is_ratio_mean"][n]) == pytest.approx(ratio, rel=1e-6)
        assert float(diagnostics["opd/is_clipped_share"][n]) == float(ratio > 2.0)
    torch.testing.assert_close(terms, on_policy.detach())
    assert diagnostics["opd/is_clipped_share"].sum() == 2  # e^1.5 and e^2 exceed the cap


def test_a_ratio_of_one_is_the_on_policy_gradient():
    """The sampler's own log-probs (no lag): the weighted estimator is the on-policy one, exactly."""
    student = randn(5, 9, seed=5, requires_grad=True)
    teacher, targets = randn(5, 9, seed=6), torch.tensor([1, 2, 3, 4, 8])
    own = F.log_softmax(student.detach().float(), -1).gather(-1, targets[:, None])[:, 0]
    weighted, _ = output_space_terms("sampled", student, teacher, targets, sampler_logprobs=own)
    plain, _ = output_space_terms("sampled", student, teacher, targets)
    assert torch.equal(torch.autograd.grad(weighted.sum(), student)[0], torch.autograd.grad(plain.sum(), student)[0])
    with pytest.raises(ValueError, match="applies to the sampled-token estimator, not to topk"):
        output_space_terms("topk", student, teacher, targets, sampler_logprobs=own)


def test_opd_sampled_teacher_gets_no_grad_and_scales_with_grad_output():
    s, t, mask = sampled_inputs()
    loss = opd_sampled_loss(s, t, mask)
    (3.7 * loss + (s**2).sum()).backward()
    assert t.grad is None
    n = mask.sum()
    expected = 3.7 * (s - t).detach() * mask / n + 2 * s.detach()
    torch.testing.assert_close(s.grad, expected, rtol=1e-6, atol=1e-12)


def test_opd_sampled_ignores_finite_garbage_outside_mask():
    s, t, mask = sampled_inputs(seed=3)
    base = opd_sampled_loss(s, t, mask)
    off = (mask == 0).to(F64)
    s2 = (s.detach() + 1e4 * off).requires_grad_()
    loss = opd_sampled_loss(s2, t - 7e3 * off, mask)
    torch.testing.assert_close(loss, base, rtol=1e-6, atol=1e-12)
    (g,) = torch.autograd.grad(loss, s2)
    assert (g[mask == 0] == 0).all()


def test_opd_sampled_non_finite_outside_mask_stays_out():
    s, t, mask = sampled_inputs(seed=3)
    base = opd_sampled_loss(s, t, mask)
    t_bad = t.detach().masked_fill(mask == 0, float("-inf"))
    loss = opd_sampled_loss(s, t_bad, mask)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()


def test_opd_sampled_identical_and_all_masked():
    s, _, mask = sampled_inputs()
    loss = opd_sampled_loss(s, s.detach().clone(), mask)
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, s)[0].abs().max() == 0
    loss = opd_sampled_loss(s, s.detach() - 1.0, torch.zeros_like(mask))
    assert torch.isfinite(loss) and loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all() and g.abs().max() == 0


# =========================================================================== opd_topk_loss


def naive_topk_indices(row: torch.Tensor, k: int) -> set[int]:
    values = row.tolist()
    return set(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def naive_topk_loss(student_logits, teacher_logits, mask, k, support):
    B, T, V = student_logits.shape
    total, count = student_logits.sum() * 0, 0
    for b in range(B):
        for j in range(T):
            if float(mask[b, j]) == 0:
                continue
            count += 1
            zs, zt = student_logits[b, j], teacher_logits[b, j].detach()
            s_top, t_top = naive_topk_indices(zs, k), naive_topk_indices(zt, k)
            chosen = {"student": s_top, "teacher": t_top, "intersection": s_top & t_top, "union": s_top | t_top}[
                support
            ]
            if not chosen:
                continue  # empty support contributes 0 (but still counts as a position)
            idx = torch.tensor(sorted(chosen))
            p_bar = torch.softmax(zs[idx], dim=-1)
            q_bar = torch.softmax(zt[idx], dim=-1)
            total = total + (p_bar * (torch.log(p_bar) - torch.log(q_bar))).sum()
    return total / count if count else total


def naive_full_kl(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    p, q = torch.softmax(zs, -1), torch.softmax(zt.detach(), -1)
    return (p * (torch.log(p) - torch.log(q))).sum()


def logits_inputs(B=2, T=4, V=12, seed=0, scale=2.0, dtype=F64):
    s = randn(B, T, V, seed=seed, scale=scale, dtype=dtype, requires_grad=True)
    t = randn(B, T, V, seed=seed + 1, scale=scale, dtype=dtype, requires_grad=True)
    mask = random_mask(B, T, seed=seed + 2)
    return s, t, mask


@pytest.mark.parametrize("support", ["student", "teacher", "intersection", "union"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_opd_topk_matches_naive(support, k):
    s, t, mask = logits_inputs(seed=10 + k)
    loss = opd_topk_loss(s, t, mask, k, support=support)
    expected = naive_topk_loss(s, t, mask, k, support)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    g = torch.autograd.grad(loss, s)[0]
    if expected.requires_grad:
        e = torch.autograd.grad(expected, s)[0]
    else:
        e = torch.zeros_like(s)
    torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-7)
    assert (g[mask == 0] == 0).all()


@pytest.mark.parametrize("support", ["student", "teacher", "intersection", "union"])
def test_opd_topk_with_k_equal_vocab_is_full_kl(support):
    s, t, mask = logits_inputs(V=9, seed=3)
    loss = opd_topk_loss(s, t, mask, 9, support=support)
    terms = [naive_full_kl(s[b, j], t[b, j]) for b in range(2) for j in range(4) if mask[b, j] != 0]
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        torch.autograd.grad(loss, s)[0].double(), torch.autograd.grad(expected, s)[0], rtol=1e-4, atol=1e-7
    )


def test_opd_topk_empty_intersection_contributes_zero_without_nan():
    V, k = 8, 2
    s = torch.zeros(1, 3, V, dtype=F64)
    t = torch.zeros(1, 3, V, dtype=F64)
    # position 0: disjoint top-2 sets {0,1} vs {6,7}; positions 1, 2: random overlapping logits
    s[0, 0, :2], t[0, 0, 6:] = 5.0, 5.0
    s[0, 1:] = randn(2, V, seed=5)
    t[0, 1:] = s[0, 1:] + 0.3 * randn(2, V, seed=6)
    s.requires_grad_()
    mask = torch.ones(1, 3, dtype=F64)
    loss = opd_topk_loss(s, t, mask, k, support="intersection")
    expected = naive_topk_loss(s, t, mask, k, "intersection")
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all()
    assert g[0, 0].abs().max() == 0
    # only the empty position: exactly 0, finite zero gradient
    only = opd_topk_loss(s[:, :1], t[:, :1], mask[:, :1], k, support="intersection")
    assert only.item() == 0.0
    (g0,) = torch.autograd.grad(only, s)
    assert torch.isfinite(g0).all() and g0.abs().max() == 0


@pytest.mark.parametrize("support", ["student", "teacher", "intersection", "union"])
def test_opd_topk_identical_all_masked_and_teacher_stop_gradient(support):
    s, t, mask = logits_inputs(seed=4)
    same = opd_topk_loss(s, s.detach().clone(), mask, 6, support=support)
    assert abs(same.item()) < 1e-6
    assert torch.autograd.grad(same, s)[0].abs().max() < 1e-6
    zero = opd_topk_loss(s, t, torch.zeros_like(mask), 6, support=support)
    assert torch.isfinite(zero) and zero.item() == 0.0
    loss = opd_topk_loss(s, t, mask, 6, support=support)  # k = 6 of 12: intersections of >= 2 tokens
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# =========================================================================== opd_full_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opd_full_matches_kl_div_and_explicit_sum(seed):
    s, t, mask = logits_inputs(B=3, T=4, V=10, seed=seed)
    loss = opd_full_loss(s, t, mask)

    # reference 1: F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(t.detach(), -1)
    per_pos = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    ref1 = (per_pos * mask).sum() / mask.sum()

    # reference 2: explicit loops
    terms = [naive_full_kl(s[b, j], t[b, j]) for b in range(3) for j in range(4) if mask[b, j] != 0]
    ref2 = sum(terms) / len(terms)

    torch.testing.assert_close(ref1, ref2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.double(), ref2, rtol=1e-5, atol=1e-7)
    g = torch.autograd.grad(loss, s)[0]
    torch.testing.assert_close(g.double(), torch.autograd.grad(ref2, s)[0], rtol=1e-4, atol=1e-7)
    assert (g[mask == 0] == 0).all()


def test_opd_full_identical_all_masked_teacher_stop_gradient():
    s, t, mask = logits_inputs(seed=8)
    same = opd_full_loss(s, s.detach().clone(), mask)
    assert abs(same.item()) < 1e-6
    assert torch.autograd.grad(same, s)[0].abs().max() < 1e-6
    # shift invariance of softmax: logits + c give the same distribution -> 0
    shifted = opd_full_loss(s, s.detach() + 3.0, mask)
    assert abs(shifted.item()) < 1e-6
    zero = opd_full_loss(s, t, torch.zeros_like(mask))
    assert torch.isfinite(zero) and zero.item() == 0.0
    (gz,) = torch.autograd.grad(zero, s)
    assert torch.isfinite(gz).all() and gz.abs().max() == 0
    loss = opd_full_loss(s, t, mask)
    loss.backward()
    assert t.grad is None and loss.item() > 0


def test_opd_full_hand_value():
    # V = 2: p = (0.5, 0.5), q = (0.2, 0.8): KL = 0.5 ln(0.5/0.2) + 0.5 ln(0.5/0.8)
    s = torch.zeros(1, 1, 2)
    t = torch.log(torch.tensor([[[0.2, 0.8]]]))
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert opd_full_loss(s, t, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-6)


# =========================================================================== fused LM head


OBJECTIVES = [("sampled", {}), ("topk", {"k": 3, "support": "student"}), ("topk", {"k": 3, "support": "union"}),
              ("topk", {"k": 3, "support": "intersection"}), ("full", {})]


def head_setup(bias: bool, N=7, D=5, V=11, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=bias, dtype=F64)
    hidden = randn(N, D, seed=seed + 1, requires_grad=True, scale=2.0)
    teacher_logits = randn(N, V, seed=seed + 2, scale=2.0)
    targets = torch.randint(0, V, (N,), generator=gen(seed + 3))
    w = torch.rand(N, generator=gen(seed + 4), dtype=F64)
    w = w / w.sum()
    return head, hidden, teacher_logits, targets, w


def make_chunk_loss(teacher_logits, targets, w, objective, kw):
    """chunk_loss(student_logits_chunk, rows) as the trainer builds it."""
    def chunk_loss(logits, rows):
        terms, _ = output_space_terms(objective, logits, teacher_logits[rows], targets[rows], **kw)
        return (terms * w[rows]).sum()

    return chunk_loss


def grads_of(total, inputs):
    return [g if g is not None else torch.zeros_like(x) for g, x in
            zip(torch.autograd.grad(total, inputs, allow_unused=True), inputs)]


@pytest.mark.parametrize("objective,kw", OBJECTIVES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_chunked_head_loss_equals_plain(objective, kw, bias, chunk):
    head, hidden, tl, targets, w = head_setup(bias)
    chunk_loss = make_chunk_loss(tl, targets, w, objective, kw)
    params = list(head.parameters())
    inputs = [hidden] + params

    plain = chunk_loss(head(hidden), slice(None))
    chunked = chunked_head_loss(hidden, head.weight, head.bias, chunk_loss, chunk_size=chunk)
    torch.testing.assert_close(chunked.double(), plain.double(), rtol=1e-6, atol=1e-7)

    # grad_output != 1 and another term sharing the same leaves
    extra = lambda: 0.3 * (hidden**2).sum() + 0.05 * head.weight.sin().sum()  # noqa: E731
    g_plain = grads_of(3.7 * plain + extra(), inputs)
    g_chunk = grads_of(3.7 * chunked + extra(), inputs)
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert g_chunk[1].abs().sum() > 0


@pytest.mark.parametrize("objective,kw", [("sampled", {}), ("topk", {"k": 4, "support": "teacher"}), ("full", {})])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_head_loss_tied_weights(objective, kw, chunk):
    """The head weight is also the embedding: both uses must contribute to its gradient."""
    V, D, N = 11, 5, 6
    torch.manual_seed(1)
    emb = torch.nn.Embedding(V, D, dtype=F64)
    mix = torch.nn.Linear(D, D, dtype=F64)
    ids = torch.randint(0, V, (N,), generator=gen(9))
    tl = randn(N, V, seed=10)
    targets = torch.randint(0, V, (N,), generator=gen(11))
    w = torch.full((N,), 1.0 / N, dtype=F64)
    chunk_loss = make_chunk_loss(tl, targets, w, objective, kw)
    inputs = [emb.weight, mix.weight, mix.bias]

    def total(chunked: bool):
        hidden = torch.tanh(mix(emb(ids)))  # (N, D), depends on the tied weight too
        if chunked:
            loss = chunked_head_loss(hidden, emb.weight, None, chunk_loss, chunk_size=chunk)
        else:
            loss = chunk_loss(hidden @ emb.weight.T, slice(None))
        return 2.5 * loss + 0.1 * emb.weight.pow(2).sum(), loss

    t_plain, l_plain = total(False)
    t_chunk, l_chunk = total(True)
    torch.testing.assert_close(l_chunk.double(), l_plain.double(), rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_of(t_chunk, inputs), grads_of(t_plain, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_head_loss_frozen_hidden_and_frozen_bias():
    head, hidden, tl, targets, w = head_setup(True, seed=3)
    head.bias.requires_grad_(False)
    hidden = hidden.detach()
    chunk_loss = make_chunk_loss(tl, targets, w, "full", {})
    plain = chunk_loss(head(hidden), slice(None))
    chunked = chunked_head_loss(hidden, head.weight, head.bias, chunk_loss, chunk_size=2)
    torch.testing.assert_close(chunked.double(), plain.double(), rtol=1e-6, atol=1e-7)
    (gp,) = torch.autograd.grad(plain, [head.weight])
    (gc,) = torch.autograd.grad(chunked, [head.weight])
    torch.testing.assert_close(gc, gp, rtol=1e-5, atol=1e-7)


def test_chunked_head_loss_no_rows_is_zero():
    head, hidden, tl, targets, w = head_setup(False)
    empty = hidden[:0]
    chunk_loss = make_chunk_loss(tl[:0], targets[:0], w[:0], "full", {})
    loss = chunked_head_loss(empty, head.weight, head.bias, chunk_loss, chunk_size=4)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert head.weight.grad is None or head.weight.grad.abs().max() == 0



class _MatmulLog(TorchDispatchMode):
    """Records each matmul's input dtypes and every copy of a tensor shaped like `watched`."""

    def __init__(self, watched: torch.Size):
        super().__init__()
        self.watched, self.matmul_dtypes, self.weight_copies = watched, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.matmul_dtypes.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        if func == torch.ops.aten._to_copy.default and args[0].shape == self.watched:
            self.weight_copies += 1
        return func(*args, **kwargs)


def _bf16_head_setup():
    N, D, V = 24, 16, 40
    head = torch.nn.Linear(D, V, bias=False)
    torch.nn.init.normal_(head.weight, generator=gen(60))
    hidden = torch.randn(N, D, generator=gen(61)).requires_grad_()
    teacher_logits = torch.randn(N, V, generator=gen(62))
    targets = torch.randint(0, V, (N,), generator=gen(63))
    w = torch.full((N,), 1.0 / N)
    return head, hidden, make_chunk_loss(teacher_logits, targets, w, "full", {})


@pytest.mark.parametrize("chunk", [1, 5])
def test_chunked_head_under_bf16_autocast_keeps_its_matmuls_in_bf16_and_copies_the_weight_once(chunk):
    """The GPU's fast path: float32 master weights under bf16 autocast. The three matmuls run in
    bf16 on one bf16 copy of the head made before the loop, whatever the number of chunks (a copy
    per chunk is 0.9-1.2 GB at real shapes); the value and gradients are the plain path's under the
    same autocast, to bf16's rounding."""
    head, hidden, chunk_loss = _bf16_head_setup()
    log = _MatmulLog(head.weight.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        chunked = chunked_head_loss(hidden, head.weight, None, chunk_loss, chunk_size=chunk)
    assert log.matmul_dtypes and all(dtypes == {torch.bfloat16} for dtypes in log.matmul_dtypes), log.matmul_dtypes
    assert log.weight_copies == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = chunk_loss(head(hidden), slice(None))
    torch.testing.assert_close(chunked, plain.float(), rtol=2e-2, atol=1e-3)
    for a, b in zip(grads_of(chunked, [hidden, head.weight]), grads_of(plain, [hidden, head.weight])):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)


def test_a_teachers_head_inside_the_chunk_computes_as_the_students():
    """Under bf16 autocast a head applied inside `chunk_loss` (the teacher's, in the trainer) runs
    in bf16 like the student's: a model against itself has a KL of exactly zero (it was not while
    the student's logits came from a bf16 matmul and the teacher's from a float32 one)."""
    head, hidden, _ = _bf16_head_setup()

    def against_itself(float32_teacher: bool):
        def chunk_loss(logits, rows):
            with torch.no_grad(), torch.autocast("cpu", enabled=not float32_teacher):
                teacher_logits = head(hidden[rows].detach())
            targets = torch.zeros(logits.shape[0], dtype=torch.long)
            return output_space_terms("full", logits, teacher_logits, targets)[0].sum()

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_head_loss(hidden, head.weight, None, chunk_loss, chunk_size=4).item()

    assert abs(against_itself(float32_teacher=False)) <= 1e-6
    assert against_itself(float32_teacher=True) > 1e-4  # the asymmetry the test would see


def test_default_chunk_rows_by_device():
    from oprd.losses import default_chunk_rows

    assert default_chunk_rows(151_936, "cpu") == 27
    assert default_chunk_rows(151_936, "cuda") == 441
    assert default_chunk_rows(10**9, "cuda") == 1


@pytest.mark.parametrize("objective,kw", OBJECTIVES)
@pytest.mark.parametrize("chunk", [2, 100])
def test_chunked_head_matches_public_losses_on_padded_logits(objective, kw, chunk):
    """Rows path (selected positions only, chunked head) == public opd_*_loss on (B, T, V) + mask."""
    B, T, D, V = 3, 5, 4, 9
    torch.manual_seed(2)
    head = torch.nn.Linear(D, V, bias=True, dtype=F64)
    hidden_bt = randn(B, T, D, seed=30, requires_grad=True, scale=2.0)
    teacher_bt = randn(B, T, V, seed=31, scale=2.0)
    targets_bt = torch.randint(0, V, (B, T), generator=gen(32))
    mask = response_mask_from_lengths([5, 2, 3], T).to(F64)
    params = list(head.parameters())
    inputs = [hidden_bt] + params

    student_bt = head(hidden_bt)
    if objective == "sampled":
        slp = torch.log_softmax(student_bt, -1).gather(-1, targets_bt.unsqueeze(-1)).squeeze(-1)
        tlp = torch.log_softmax(teacher_bt, -1).gather(-1, targets_bt.unsqueeze(-1)).squeeze(-1)
        public = opd_sampled_loss(slp, tlp, mask)
    elif objective == "topk":
        public = opd_topk_loss(student_bt, teacher_bt, mask, kw["k"], support=kw["support"])
    else:
        public = opd_full_loss(student_bt, teacher_bt, mask)

    sel = mask.bool()
    n = float(mask.sum())
    w = torch.full((int(n),), 1.0 / n, dtype=F64)  # mean over masked positions
    chunk_loss = make_chunk_loss(teacher_bt[sel], targets_bt[sel], w, objective, kw)
    rows_loss = chunked_head_loss(hidden_bt[sel], head.weight, head.bias, chunk_loss, chunk_size=chunk)

    torch.testing.assert_close(rows_loss.double(), public.double(), rtol=1e-5, atol=1e-7)
    # Both paths compute in float32 inside; the rows path re-normalises top-k supports from
    # log-probabilities rather than logits, which moves the last float32 bits of small gradients.
    for a, b in zip(grads_of(1.9 * rows_loss, inputs), grads_of(1.9 * public, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_output_space_terms_diagnostics_match_naive():
    N, V, k = 6, 10, 3
    sl, tl = randn(N, V, seed=50, scale=2.0), randn(N, V, seed=51, scale=2.0)
    targets = torch.randint(0, V, (N,), generator=gen(52))
    terms, diag = output_space_terms("topk", sl, tl, targets, k=k, support="student")
    for i in range(N):
        p, q = torch.softmax(sl[i], -1), torch.softmax(tl[i], -1)
        y = int(targets[i])
        assert diag["opd/kl_estimate"][i].item() == pytest.approx(math.log(p[y]) - math.log(q[y]), abs=1e-5)
        assert diag["opd/student_entropy"][i].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
        assert diag["opd/teacher_entropy"][i].item() == pytest.approx(-(q * q.log()).sum().item(), abs=1e-5)
        overlap = len(naive_topk_indices(sl[i], k) & naive_topk_indices(tl[i], k)) / k
        assert diag["opd/topk_overlap"][i].item() == pytest.approx(overlap)
        idx = torch.tensor(sorted(naive_topk_indices(sl[i], k)))
        pb, qb = torch.softmax(sl[i][idx], -1), torch.softmax(tl[i][idx], -1)
        assert terms[i].item() == pytest.approx((pb * (pb.log() - qb.log())).sum().item(), abs=1e-6)
    with pytest.raises(ValueError):
        output_space_terms("nope", sl, tl, targets)
