"""oprd.bridge: teacher PCA against an independent SVD, offset alignment on two real tokenizers,
projector fitting on a planted linear map, the bridge file, the Stage 2 loss against a naive
reference, and Stage 1 row collection on two tiny Qwen3 models of different width and depth."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from oprd.batch import RolloutBatch, pad_left
from oprd.bridge import (
    Bridge,
    RowReservoir,
    align_by_offsets,
    bridge_metadata,
    fit_bridge,
    fit_student_projector,
    fit_teacher_pca,
    layer_pairs,
    load_bridge,
    matched_share,
    paired_rows_from_batches,
    save_bridge,
    split_rows,
    unit_rms,
)
from oprd.capture import model_inputs, response_positions
from oprd.cli import app
from oprd.losses import layer_map, representation_loss_rows
from oprd.testing import tiny_config, train_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a shared CPU, intra-op threads cost far more than they give
    (the projector fits take 0.1 s on one thread, seconds on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _anisotropic_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) rows with a well-separated spectrum, rotated and shifted away from the origin."""
    g = torch.Generator().manual_seed(seed)
    scales = 2.0 ** -torch.arange(d, dtype=torch.float64) * 10  # 10, 5, 2.5, ...
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 3
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ rotation.T + mean).float()


# --------------------------------------------------------------------------- PCA


def test_pca_subspace_equals_svd_of_centred_rows():
    rows = _anisotropic_rows(300, 12, seed=0)
    centred = rows.double() - rows.double().mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # independent reference
    for rank in (1, 3, 5):
        components, mean = fit_teacher_pca(rows, rank)
        assert components.shape == (rank, 12) and mean.shape == (12,)
        assert components.dtype == mean.dtype == torch.float32
        torch.testing.assert_close(mean.double(), rows.double().mean(0), atol=1e-5, rtol=0)
        c = components.double()
        torch.testing.assert_close(c @ c.T, torch.eye(rank, dtype=torch.float64), atol=1e-6, rtol=0)
        reference = vh[:rank].T @ vh[:rank]  # projection matrix on the top-rank subspace
        torch.testing.assert_close(c.T @ c, reference, atol=1e-5, rtol=0)
        # variances of the projections: decreasing, and the top eigenvalues of the covariance
        variance = (centred @ c.T).var(0)
        assert (variance[:-1] > variance[1:]).all()
        torch.testing.assert_close(variance, singular[:rank] ** 2 / (len(rows) - 1), rtol=1e-4, atol=0)
        # sign convention: the largest-magnitude entry of each component is positive
        peak = components.abs().argmax(-1, keepdim=True)
        assert (components.gather(-1, peak) > 0).all()


def test_pca_full_rank_is_identity_projection_and_deterministic():
    rows = _anisotropic_rows(50, 6, seed=1)
    components, _ = fit_teacher_pca(rows, 6)
    torch.testing.assert_close(components.T @ components, torch.eye(6), atol=1e-5, rtol=0)
    again, _ = fit_teacher_pca(rows[torch.randperm(50, generator=torch.Generator().manual_seed(0))], 6)
    torch.testing.assert_close(again, components, atol=1e-5, rtol=0)  # row order and sign do not matter


def test_pca_errors():
    rows = torch.randn(10, 4)
    with pytest.raises(ValueError, match="rank must be in 1..4"):
        fit_teacher_pca(rows, 5)
    with pytest.raises(ValueError, match="rank must be in 1..4"):
        fit_teacher_pca(rows, 0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_teacher_pca(rows[:1], 1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_teacher_pca(rows[0], 1)
    bad = rows.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*1 of 10"):
        fit_teacher_pca(bad, 2)


# --------------------------------------------------------------------------- offsets

TEXTS = [
    "Compute 3*7+2 mod 10.\n3*7=1\n1+2=3\n\\boxed{3}",
    "héllo wörld, naïve café: 日本語 😀 done",
    "  a  b\n\n c\t d   ",
    "<|im_start|>user\nthe quick brown fox<|im_end|>",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world héllo wörld café 日本語 😀",
              "Compute 3*7+2 mod 10.\n3*7=1\n\\boxed{3}"] * 10
    return train_tokenizer(corpus, 320, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def chars():
    """A character-level tokenizer: every character its own token (WordLevel over characters)."""
    alphabet = sorted(set("".join(TEXTS)))
    core = Tokenizer(models.WordLevel({"[UNK]": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def _encode(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return enc["input_ids"], enc["offset_mapping"]


def _reference_pairs(bpe, ids, text):
    """Independent of offsets: decode every prefix of the BPE ids; a position has read a whole
    prefix of the text when its decoding is one (byte pieces of a character decode to U+FFFD).
    The character tokenizer reads text[:k] at index k - 1. Last BPE position per prefix wins."""
    last = {}
    for i in range(len(ids)):
        decoded = bpe.decode(ids[: i + 1])
        if decoded and text.startswith(decoded):
            last[len(decoded)] = i
    return [(i, k - 1) for k, i in sorted(last.items())]


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_of_byte_bpe_and_characters(bpe, chars, text):
    s_ids, s_off = _encode(bpe, text)
    t_ids, t_off = _encode(chars, text)
    assert s_ids != t_ids and len(t_ids) == len(text)  # really two different tokenizers
    pairs = align_by_offsets(s_off, t_off)
    assert pairs == _reference_pairs(bpe, s_ids, text)
    for (i, j), (i2, j2) in zip(pairs, pairs[1:]):
        assert i < i2 and j < j2
    for i, j in pairs:
        end = s_off[i][1]
        assert end == t_off[j][1]
        assert bpe.decode(s_ids[: i + 1]) == chars.decode(t_ids[: j + 1]) == text[:end]
    assert matched_share(pairs, s_off) == pytest.approx(len(pairs) / len(s_ids))
    if text.isascii():  # every BPE token ends on a character: all student positions match
        assert matched_share(pairs, s_off) == 1.0
    else:
        assert 0.5 < matched_share(pairs, s_off) < 1.0
    # the other way round: every BPE end is a character boundary, so the characters match where BPE does
    reverse = align_by_offsets(t_off, s_off)
    assert reverse == [(j, i) for i, j in pairs]
    assert matched_share(reverse, t_off) == pytest.approx(len(pairs) / len(text))


def test_alignment_identical_tokenizers_is_identity(bpe):
    _, offsets = _encode(bpe, TEXTS[0])
    assert align_by_offsets(offsets, offsets) == [(i, i) for i in range(len(offsets))]
    _, offsets = _encode(bpe, TEXTS[1])  # with byte pieces: identity on the positions that match
    pairs = align_by_offsets(offsets, offsets)
    assert all(i == j for i, j in pairs) and len(pairs) < len(offsets)


def test_alignment_byte_level_whitespace_offsets(bpe):
    """Byte-level BPE counts a leading space in the next word's span ('Ġw' is (5, 7)): ends still
    fall on the right character, so whitespace runs and newlines align like any other text."""
    text = "hello world\n\n  x"
    _, offsets = _encode(bpe, text)
    assert offsets[-1][1] == len(text)
    words = [(0, 5), (5, 11), (11, 12), (12, 13), (13, 14), (14, 15), (15, 16)]  # a word-ish tokenizer
    pairs = align_by_offsets(offsets, words)
    ends = {offsets[i][1] for i, _ in pairs}
    assert {5, 11, len(text)} <= ends


def test_alignment_edge_cases():
    # special tokens outside the text (0, 0) never match; pieces ending at the same character: the last
    assert align_by_offsets([(0, 0), (0, 3), (3, 5), (0, 0)], [(0, 3), (3, 4), (4, 5)]) == [(1, 0), (2, 2)]
    pieces = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    assert align_by_offsets(pieces, [(0, 1), (1, 2), (2, 3)]) == [(0, 0), (3, 1), (4, 2)]
    # a byte piece that stops inside a character: HF gives it the whole character ('hÃ' (0, 2) in "héllo")
    assert align_by_offsets([(0, 2), (1, 5)], [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]) == [(1, 4)]
    assert align_by_offsets([], [(0, 1)]) == [] and matched_share([], []) == 0.0
    with pytest.raises(ValueError, match="student offsets are not in text order"):
        align_by_offsets([(0, 3), (0, 1)], [(0, 1)])
    with pytest.raises(ValueError, match="teacher token 0 has a reversed span"):
        align_by_offsets([(0, 1)], [(2, 1)])


# --------------------------------------------------------------------------- projectors


def test_projector_recovers_planted_map():
    g = torch.Generator().manual_seed(0)
    N, r, D_S = 2000, 4, 32
    targets = torch.randn(N, r, generator=g) * torch.tensor([4.0, 2.0, 1.0, 0.5])  # teacher-projected rows
    mixing = torch.randn(D_S, r, generator=g)
    offset = torch.randn(D_S, generator=g) * 5  # hidden states are not centred; P_S has no bias
    student = targets @ mixing.T + offset + 0.01 * torch.randn(N, D_S, generator=g)
    weight, report = fit_student_projector(student, targets, epochs=20, lr=1e-2, batch_size=128, holdout=0.1, seed=0)
    assert weight.shape == (r, D_S) and weight.dtype == torch.float32
    assert report["rows_heldout"] == 200 and report["rows_train"] == 1800
    assert report["heldout_cos_after"] > 0.99
    assert abs(report["heldout_cos_before"]) < 0.5
    assert report["heldout_mse_after"] < 0.01 * report["heldout_mse_before"]
    assert report["heldout_cos_lstsq"] > 0.999
    # the report's after-numbers are those of the returned weight on the raw rows
    g2 = torch.Generator().manual_seed(0)
    held = torch.randperm(N, generator=g2)[:200].sort().values
    cos = F.cosine_similarity(student[held] @ weight.T, targets[held], dim=-1).mean()
    assert float(cos) == pytest.approx(report["heldout_cos_after"], abs=1e-5)


def test_fit_bridge_on_a_linear_student(tmp_path):
    """Student rows are a linear image of the teacher rows: a trained bridge aligns them."""
    g = torch.Generator().manual_seed(1)
    pairs = [(1, 1), (2, 3)]
    teacher = {p: _anisotropic_rows(1000, 16, seed=i) for i, p in enumerate(pairs)}
    student = {p: teacher[p] @ torch.randn(16, 24, generator=g) for p in pairs}
    bridge = fit_bridge(student, teacher, rank=3, epochs=20, lr=1e-2, batch_size=100, normalize_states=False,
                        metadata={"data": "planted"})
    assert bridge.pairs == pairs and bridge.rank == 3 and not bridge.normalize_states
    assert bridge.teacher_components[(2, 3)].shape == (3, 16) and bridge.student_projectors[(2, 3)].shape == (3, 24)
    meta = bridge.metadata
    assert meta["data"] == "planted" and meta["rank"] == 3 and len(meta["layers"]) == 2
    for report in meta["layers"]:
        assert report["cos_after"] > 0.99 and abs(report["cos_before"]) < 0.6
        assert report["teacher_explained_variance"] > 0.95  # spectrum 10, 5, 2.5, ...
    assert meta["cos_after"] > 0.99
    # the teacher projection centres on the mean of the rows P_T was fitted on (the training split)
    train, held = split_rows(1000, 0.1, 0)
    assert len(held) == 100 and meta["layers"][0]["rows_heldout"] == 100
    mean_row = teacher[(1, 1)][train].mean(0, keepdim=True)
    assert bridge.project_teacher((1, 1), mean_row).abs().max() < 1e-2


def test_unit_rms_states_equal_a_fit_on_rescaled_rows_and_ignore_row_norms():
    """normalize_states=True is the raw fit on rows divided by their RMS (naive reference); it makes the
    bridge blind to per-position norms, which the raw fit is not."""
    g = torch.Generator().manual_seed(3)
    pair = (1, 1)
    direction = _anisotropic_rows(2000, 16, seed=4) + 3.0  # states with a common mean direction
    norms_t, norms_s = (torch.empty(2000, 1).uniform_(0, 2.3, generator=g).exp() for _ in range(2))  # 1x..10x
    teacher = {pair: direction * norms_t}
    student = {pair: direction @ torch.randn(16, 24, generator=g) * norms_s}
    fit = dict(rank=3, epochs=20, lr=1e-2, batch_size=100, seed=0)
    normalised = fit_bridge(student, teacher, **fit)
    assert normalised.normalize_states and normalised.metadata["normalize_states"] is True

    def rms(h):
        return h / h.pow(2).mean(-1, keepdim=True).sqrt()

    reference = fit_bridge({pair: rms(student[pair])}, {pair: rms(teacher[pair])}, normalize_states=False, **fit)
    for name in ("teacher_components", "teacher_means", "student_projectors"):
        torch.testing.assert_close(getattr(normalised, name)[pair], getattr(reference, name)[pair],
                                   atol=1e-4, rtol=1e-4)
    assert normalised.metadata["cos_after"] == pytest.approx(reference.metadata["cos_after"], abs=1e-4)
    # projections read the state's direction only, on both sides
    torch.testing.assert_close(unit_rms(7.0 * teacher[pair][:5]), rms(teacher[pair][:5]))
    for project, rows in ((normalised.project_student, student[pair]), (normalised.project_teacher, teacher[pair])):
        torch.testing.assert_close(project(pair, 5.0 * rows[:10]), project(pair, rows[:10]), atol=1e-4, rtol=1e-4)
    raw = fit_bridge(student, teacher, normalize_states=False, **fit)
    assert normalised.metadata["cos_after"] > 0.99 > raw.metadata["cos_after"] + 0.05


# --------------------------------------------------------------------------- file and fit checks


def _bridge(D_S=64, D_T=96, L_S=4, L_T=6, rank=3, seed=0) -> Bridge:
    g = torch.Generator().manual_seed(seed)
    pairs = layer_pairs(L_S, L_T)
    meta = bridge_metadata(student_config=tiny_config(64, hidden_size=D_S, num_layers=L_S),
                           teacher_config=tiny_config(64, hidden_size=D_T, num_layers=L_T),
                           student="tiny-s", teacher="tiny-t", data={"path": "x.jsonl", "prompts": 8})
    return Bridge(
        student_layers=[p[0] for p in pairs],
        teacher_layers=[p[1] for p in pairs],
        rank=rank,
        teacher_components={p: torch.linalg.qr(torch.randn(D_T, rank, generator=g))[0].T.contiguous() for p in pairs},
        teacher_means={p: torch.randn(D_T, generator=g) for p in pairs},
        student_projectors={p: torch.randn(rank, D_S, generator=g) for p in pairs},
        metadata={**meta, "layers": [{"cos_after": 0.5}] * len(pairs)},
    )



def test_projections_run_in_float32_under_the_trainers_autocast():
    """The bridge is fitted and pre-flighted in float32; under the trainer's bf16 autocast its
    projections stay there (they ran as bf16 matmuls before)."""
    bridge = _bridge()
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(5, 64, generator=g) for _ in bridge.pairs]
    teacher = [torch.randn(5, 96, generator=g) for _ in bridge.pairs]
    expected = bridge.project(bridge.pairs, student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = bridge.project(bridge.pairs, student, teacher)
    for side_expected, side in zip(expected, under_autocast):
        for a, b in zip(side_expected, side):
            assert b.dtype == torch.float32 and torch.equal(a, b)

def test_save_load_round_trip(tmp_path):
    bridge = _bridge()
    path = tmp_path / "sub" / "bridge.safetensors"
    save_bridge(bridge, path)
    assert [p.name for p in path.parent.iterdir()] == ["bridge.safetensors"]  # no temporary left behind
    loaded = load_bridge(path)
    assert loaded.pairs == bridge.pairs == [(1, 1), (2, 3), (3, 4), (4, 6)]
    assert loaded.rank == 3 and loaded.metadata == bridge.metadata and not loaded.normalize_states
    for name in ("teacher_components", "teacher_means", "student_projectors"):
        for p in bridge.pairs:
            assert torch.equal(getattr(loaded, name)[p], getattr(bridge, name)[p])
    assert len(load_file(str(path))) == 3 * 4  # a plain safetensors file
    save_bridge(_bridge(seed=1), path)  # overwriting replaces the file
    assert not torch.equal(load_bridge(path).student_projectors[(1, 1)], bridge.student_projectors[(1, 1)])
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an oprd bridge file"):
        load_bridge(other)
    save_bridge(replace(bridge, normalize_states=True), path)
    assert load_bridge(path).normalize_states


def test_version_1_bridge_files_load_as_raw_states(tmp_path):
    """Files written before normalize_states existed projected raw states; they still do."""
    bridge = _bridge()
    path = tmp_path / "v1.safetensors"
    save_bridge(bridge, path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    info = json.loads(header["bridge"])
    del info["normalize_states"]
    save_file(tensors, str(path), metadata={**header, "format_version": "1", "bridge": json.dumps(info)})
    loaded = load_bridge(path)
    assert not loaded.normalize_states and loaded.pairs == bridge.pairs
    save_file(tensors, str(path), metadata={**header, "format_version": "3"})
    with pytest.raises(ValueError, match="newer than this oprd"):
        load_bridge(path)


def test_check_fits_names_the_mismatch(bpe, chars):
    bridge = _bridge()
    meta = bridge.metadata
    sizes = ("student_hidden_size", "teacher_hidden_size", "student_num_layers", "teacher_num_layers")
    assert tuple(meta[key] for key in sizes) == (64, 96, 4, 6)
    json.dumps(meta)
    bridge.check_fits(tiny_config(64, hidden_size=64, num_layers=4), tiny_config(64, hidden_size=96, num_layers=6))
    with pytest.raises(ValueError, match="student: its hidden size is 32.*expect \\[64\\]"):
        bridge.check_fits(tiny_config(64, hidden_size=32, num_layers=4), tiny_config(64, hidden_size=96, num_layers=6))
    with pytest.raises(ValueError, match="teacher: its hidden size is 64.*expect \\[96\\]"):
        bridge.check_fits(tiny_config(64, hidden_size=64, num_layers=4), tiny_config(64, hidden_size=64, num_layers=6))
    with pytest.raises(ValueError, match="teacher: it has 8 layers, the bridge was fitted on 6"):
        bridge.check_fits(tiny_config(64, hidden_size=64, num_layers=4), tiny_config(64, hidden_size=96, num_layers=8))
    with pytest.raises(ValueError, match="student: it has 2 layers, the bridge was fitted on 4"):
        bridge.check_fits(tiny_config(64, hidden_size=64, num_layers=2), tiny_config(64, hidden_size=96, num_layers=6))
    bridge.metadata.update(bridge_metadata(student_config=tiny_config(64, num_layers=4),
                                           teacher_config=tiny_config(64, hidden_size=96, num_layers=6),
                                           student_tokenizer=bpe, teacher_tokenizer=chars))
    bridge.check_tokenizers(bpe, chars)
    with pytest.raises(ValueError, match="teacher tokenizer's vocabulary differs"):
        bridge.check_tokenizers(bpe, bpe)


# --------------------------------------------------------------------------- Stage 2 loss


def _stage2_loss(bridge, student: dict, teacher: dict, weights):
    """Stage 2 as `oprd.objective` runs it: project the pairs given, then the representation loss."""
    pairs = list(student)
    projected_student, projected_teacher = bridge.project(pairs, [student[p] for p in pairs],
                                                          [teacher[p] for p in pairs])
    return representation_loss_rows(projected_student, projected_teacher, weights, normalize=True)


def test_bridge_loss_equals_naive_and_is_zero_when_aligned():
    bridge = _bridge()
    g = torch.Generator().manual_seed(2)
    N = 10
    student = {p: torch.randn(N, 64, generator=g).requires_grad_() for p in bridge.pairs}
    teacher = {p: torch.randn(N, 96, generator=g) for p in bridge.pairs}
    weights = torch.rand(N, generator=g)
    loss, metrics = _stage2_loss(bridge, student, teacher, weights)
    naive = []
    for p in bridge.pairs:
        s = F.normalize(student[p] @ bridge.student_projectors[p].T, dim=-1)
        t = F.normalize((teacher[p] - bridge.teacher_means[p]) @ bridge.teacher_components[p].T, dim=-1)
        naive.append((((s - t) ** 2).mean(-1) * weights).sum())
    torch.testing.assert_close(loss, torch.stack(naive).mean())
    assert "rep/cosine_similarity/pair_3" in metrics and "rep/cosine_similarity/pair_4" not in metrics
    loss.backward()
    assert all(student[p].grad is not None and student[p].grad.abs().sum() > 0 for p in bridge.pairs)
    assert all(not t.requires_grad for t in bridge.student_projectors.values())
    # a subset of the bridge's pairs
    sub = [(3, 4), (1, 1)]
    loss_sub, _ = _stage2_loss(bridge, {p: student[p] for p in sub}, {p: teacher[p] for p in sub}, weights)
    torch.testing.assert_close(loss_sub, (naive[0] + naive[2]) / 2)
    with pytest.raises(ValueError, match=r"layer pairs \[\(2, 2\)\] are not in the bridge"):
        _stage2_loss(bridge, {(2, 2): student[(1, 1)]}, {(2, 2): teacher[(1, 1)]}, weights)
    # with unit-RMS states the teacher is centred after rescaling, so the loss differs from the raw one
    normalised = replace(bridge, normalize_states=True)
    loss_n, _ = _stage2_loss(normalised, student, teacher, weights)
    naive_n = []
    for p in bridge.pairs:
        s = F.normalize(student[p] @ bridge.student_projectors[p].T, dim=-1)
        t_rms = teacher[p] / teacher[p].pow(2).mean(-1, keepdim=True).sqrt()
        t = F.normalize((t_rms - bridge.teacher_means[p]) @ bridge.teacher_components[p].T, dim=-1)
        naive_n.append((((s - t) ** 2).mean(-1) * weights).sum())
    torch.testing.assert_close(loss_n, torch.stack(naive_n).mean())
    assert not torch.allclose(loss_n, loss)


def test_bridge_loss_zero_for_aligned_projections():
    bridge = _bridge(D_S=96, D_T=96)
    pair = (2, 3)
    bridge.student_projectors[pair] = bridge.teacher_components[pair].clone()
    teacher = torch.randn(7, 96)
    centred = teacher - bridge.teacher_means[pair]
    loss, metrics = _stage2_loss(bridge, {pair: 3.0 * centred}, {pair: teacher}, torch.full((7,), 1 / 7))
    assert float(loss) < 1e-12 and float(metrics["rep/cosine_similarity"]) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- Stage 1 rows


def _tiny(hidden: int, layers: int, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(64, hidden_size=hidden, num_layers=layers)).eval()


@pytest.fixture(scope="module")
def pair_of_models():
    return _tiny(64, 4, seed=0), _tiny(96, 6, seed=1)


def _batch(seed: int, lengths=(5, 3, 4)) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (4, 2, 3)]
    prompt_ids, prompt_mask = pad_left(prompts, 0)
    T = max(lengths)
    response_mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(-1)).long()
    response_ids = torch.randint(1, 64, (3, T), generator=g) * response_mask
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.arange(3),
                        torch.zeros(3, dtype=torch.bool))


@torch.no_grad()
def _all_rows(model, batch, layer):
    hidden = model(**model_inputs(batch), output_hidden_states=True).hidden_states[layer]
    return hidden[response_positions(batch, batch.response_mask)]


def test_paired_rows_from_batches_pairs_layers_and_bounds_rows(pair_of_models):
    student, teacher = pair_of_models
    pairs = layer_pairs(4, 6)
    assert pairs == list(zip(range(1, 5), layer_map(4, 6))) == [(1, 1), (2, 3), (3, 4), (4, 6)]
    s_layers, t_layers = [p[0] for p in pairs], [p[1] for p in pairs]
    batches = [_batch(0), _batch(1)]  # 12 response positions each
    everything = paired_rows_from_batches(student, teacher, batches, s_layers, t_layers, max_rows=100)
    for s, t in pairs:
        S_ref = torch.cat([_all_rows(student, b, s) for b in batches])
        T_ref = torch.cat([_all_rows(teacher, b, t) for b in batches])
        assert S_ref.shape == (24, 64) and T_ref.shape == (24, 96)
        torch.testing.assert_close(everything[(s, t)][0], S_ref, atol=1e-5, rtol=1e-5)  # all rows, in order
        torch.testing.assert_close(everything[(s, t)][1], T_ref, atol=1e-5, rtol=1e-5)

    sample = paired_rows_from_batches(student, teacher, iter(batches), s_layers, t_layers, max_rows=7, seed=3)
    assert list(sample) == pairs
    kept = None
    for s, t in pairs:
        S_rows, T_rows = sample[(s, t)]
        assert S_rows.shape == (7, 64) and T_rows.shape == (7, 96)
        # each kept student row is a row of the full set, and its teacher row is the same position's
        index = torch.cdist(S_rows, everything[(s, t)][0]).argmin(-1)
        torch.testing.assert_close(S_rows, everything[(s, t)][0][index])
        torch.testing.assert_close(T_rows, everything[(s, t)][1][index])
        assert kept is None or torch.equal(index, kept)  # the same positions for every layer pair
        kept = index
    assert len(set(kept.tolist())) == 7 and (kept[1:] > kept[:-1]).all()  # distinct, in arrival order
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        paired_rows_from_batches(student, teacher, batches, [1, 2], [1], max_rows=4)


def test_stage1_renders_its_prompts_with_enable_thinking(monkeypatch, tmp_path):
    from oprd.bridge import stage1

    class RenderedPrompts(Exception):
        """Stops Stage 1 once its prompts are rendered, before any model loads."""

    def render(problems, student_tokenizer, teacher_tokenizer=None, **options):
        raise RenderedPrompts(options)

    monkeypatch.setattr(stage1.PromptSet, "render", staticmethod(render))
    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "tiny-qwen3")
    args = ["bridge", "fit", "--student", tiny, "--teacher", tiny, "--data", "aime24", "--prompts", "2"]
    result = CliRunner().invoke(app, [*args, "--disable-thinking", "--out", str(tmp_path / "b.safetensors")])
    assert isinstance(result.exception, RenderedPrompts)
    assert result.exception.args == ({"enable_thinking": False},)


def test_reservoir_is_uniform_over_all_rows():
    """Every position is kept with probability max_rows / rows_seen, early or late."""
    hits = torch.zeros(40)
    for seed in range(300):
        reservoir = RowReservoir(max_rows=10, seed=seed)
        for start in range(0, 40, 8):
            ids = torch.arange(start, start + 8, dtype=torch.float32).unsqueeze(-1)
            reservoir.add({(1, 1): ids}, {(1, 1): ids * 2})
        s, t = reservoir.rows()[(1, 1)]
        assert torch.equal(t, 2 * s) and reservoir.rows_seen == 40
        hits[s.squeeze(-1).long()] += 1
    share = hits / 300
    assert (share - 0.25).abs().max() < 0.12  # 0.25 expected; binomial sd about 0.025
    assert share[:8].mean() == pytest.approx(0.25, abs=0.05) and share[-8:].mean() == pytest.approx(0.25, abs=0.05)
