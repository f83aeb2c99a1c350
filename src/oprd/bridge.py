"""OPRD-Bridge, the library layer: projectors between models of different width, depth or tokenizer.

Paper (PAPER.md, "OPRD-Bridge"): per paired layer (student l, teacher `layer_map(L_S, L_T)[l-1]`),
Stage 1 fits a frozen teacher projector P_T (r, D_T) = top-r principal directions of the centred
teacher states, with mean mu_T, and trains a linear student projector P_S (r, D_S) on
|| P_S h_S - P_T (h_T - mu_T) ||^2 with both backbones frozen. Stage 2 is OPRD on the projected,
L2-normalised vectors with both projectors frozen (`bridge_loss_rows`).

Shape letters: N rows (selected positions, flattened), D_S / D_T student / teacher hidden size,
r the bridge rank. A layer pair is `(student_layer, teacher_layer)`, 1-based as in HF
`hidden_states`.

  fit_teacher_pca         P_T and mu_T from teacher rows (float64 eigendecomposition)
  align_by_offsets        cross-tokenizer position matching by character offsets (oprd.alignment)
  RowReservoir            bounded, paired sample of rows per layer pair (uniform over all rows seen)
  collect_layer_rows      Stage 1 rows from rollout batches, across tokenizers too
  fit_student_projector   P_S by Adam on the MSE, with held-out report
  fit_bridge              both, per layer pair -> Bridge
  save_bridge/load_bridge one safetensors file, JSON metadata
  bridge_loss_rows        the Stage 2 loss on projected rows

Where this departs from the paper, and why:
- Held-out rows are kept out of the teacher PCA too (not only out of the P_S fit), so the
  reported held-out cosine never saw those rows in any fit.
- P_S is trained on inputs scaled per feature (and targets by one scalar), folded back into the
  returned weight: the map stays exactly linear without bias, but Adam's progress no longer depends
  on the raw scale of a layer's hidden states (which differ by orders of magnitude across layers).
- Positions across tokenizers are matched by character offsets (`align_by_offsets`); the paper
  leaves this unspecified.
- By default both models' states are scaled to unit RMS per position before anything is fitted or
  projected (`normalize_states`, `unit_rms`), as every block of a pre-norm transformer reads its
  input through RMSNorm: what the next block reads is the state's direction, not its norm. Raw
  intermediate states vary in norm across positions, so the paper's PCA on raw rows spends part of
  its components on norm variation that the Stage 2 loss, a cosine, ignores. On the toy cross-architecture pair this
  raises the best held-out Stage 1 cosine from about 0.82 to about 0.91 (README, `oprd demo
  --bridge`, which measures both). `normalize_states=False` is the paper's recipe as written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oprd.alignment import align_by_offsets, matched_share, paired_states, usable_rows  # noqa: F401  (public here)
from oprd.losses import layer_map, representation_loss_rows
from oprd.rollout import RolloutBatch

Pair = tuple[int, int]  # (student_layer, teacher_layer), 1-based
FORMAT = "oprd-bridge"
FORMAT_VERSION = 2  # 2: normalize_states (files of version 1 are read as normalize_states=False)


# --------------------------------------------------------------------------- teacher projector


def unit_rms(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., D) -> (..., D) in float32, each vector divided by its root mean square (RMSNorm without
    a gain): the direction a pre-norm block reads."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def fit_teacher_pca(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` principal directions of `rows` (N, D): components (rank, D) and mean (D,).

    The covariance of the centred rows is eigendecomposed in float64 (`torch.linalg.eigh`);
    components are orthonormal rows sorted by decreasing eigenvalue, each signed so that its
    largest-magnitude entry is positive (PCA fixes directions only up to sign). Both results are
    float32 on the rows' device. Eigenvectors of repeated eigenvalues (including the null space
    when rank > N - 1) are any orthonormal basis of their eigenspace.
    """
    if rows.ndim != 2:
        raise ValueError(f"teacher rows must be (N, D), got shape {tuple(rows.shape)}")
    N, D = rows.shape
    if not 1 <= rank <= D:
        raise ValueError(f"rank must be in 1..{D} (the hidden size), got {rank}")
    if N < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {N}")
    x = rows.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise ValueError(f"teacher rows contain non-finite values ({bad} of {N} rows)")
    mean = x.mean(0)  # (D,)
    centred = x - mean
    covariance = centred.T @ centred / (N - 1)  # (D, D)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues, vectors in columns
    components = vectors[:, -rank:].flip(-1).T.contiguous()  # (rank, D), decreasing eigenvalue
    peak = components.abs().argmax(-1, keepdim=True)
    components = components * components.gather(-1, peak).sign()
    return components.float(), mean.float()


def explained_variance_ratio(rows: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> float:
    """Share of the total variance of `rows` (N, D) captured by `components` (r, D)."""
    centred = rows.double() - mean.double()
    total = centred.pow(2).sum()
    kept = (centred @ components.double().T).pow(2).sum()
    return float(kept / total) if total > 0 else 0.0


# --------------------------------------------------------------------------- Stage 1: rows


def layer_pairs(
    num_student_layers: int, num_teacher_layers: int, student_layers: Sequence[int] | None = None
) -> list[Pair]:
    """(student, teacher) layer pairs by the paper's proportional map, for all or some student layers."""
    teacher_of = layer_map(num_student_layers, num_teacher_layers)
    chosen = list(student_layers) if student_layers is not None else list(range(1, num_student_layers + 1))
    if any(not 1 <= l <= num_student_layers for l in chosen):
        raise ValueError(f"student layers {chosen} outside 1..{num_student_layers}")
    return [(l, teacher_of[l - 1]) for l in chosen]


class RowReservoir:
    """A uniform sample of at most `max_rows` rows per layer pair, over every row ever added.

    Student and teacher rows of one position stay paired: all layer pairs share one set of kept
    positions. Each row draws a uniform key and the `max_rows` smallest keys are kept (bottom-k
    sampling, equivalent to reservoir sampling without replacement), so memory stays at
    `max_rows` rows per layer and the sample does not favour the first rollouts, whose positions
    are strongly correlated. Kept rows are returned in arrival order: with `max_rows` at least the
    number of rows seen, the result is every row, in order. Rows are stored as float32 on CPU.
    """

    def __init__(self, max_rows: int, seed: int = 0):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.rows_seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._keys = torch.empty(0)  # (K,)
        self._order = torch.empty(0, dtype=torch.long)  # (K,) arrival index of each kept row
        self._student: dict[Pair, torch.Tensor] = {}  # pair -> (K, D_S)
        self._teacher: dict[Pair, torch.Tensor] = {}  # pair -> (K, D_T)

    def add(self, student_rows: dict[Pair, torch.Tensor], teacher_rows: dict[Pair, torch.Tensor]) -> None:
        """Adds one batch: {pair: (n, D_S)} and {pair: (n, D_T)}, the same n positions for all pairs."""
        if set(student_rows) != set(teacher_rows) or not student_rows:
            raise ValueError("student and teacher rows must cover the same, non-empty set of layer pairs")
        if self._student and set(student_rows) != set(self._student):
            raise ValueError(f"layer pairs changed: {sorted(student_rows)} vs {sorted(self._student)}")
        counts = {t.shape[0] for t in [*student_rows.values(), *teacher_rows.values()]}
        if len(counts) != 1:
            raise ValueError(f"every layer pair needs the same number of rows per batch, got {sorted(counts)}")
        n = counts.pop()
        keys = torch.cat([self._keys, torch.rand(n, generator=self._generator)])
        order = torch.cat([self._order, torch.arange(self.rows_seen, self.rows_seen + n)])
        keep = keys.topk(min(self.max_rows, keys.numel()), largest=False).indices
        keep = keep[order[keep].argsort()]  # arrival order
        self._keys, self._order = keys[keep], order[keep]
        for pair in student_rows:
            for store, new in ((self._student, student_rows[pair]), (self._teacher, teacher_rows[pair])):
                new = new.detach().float().cpu()
                old = store.get(pair, new.new_empty((0, new.shape[-1])))
                store[pair] = torch.cat([old, new])[keep]
        self.rows_seen += n

    def rows(self) -> dict[Pair, tuple[torch.Tensor, torch.Tensor]]:
        """{pair: (student rows (K, D_S), teacher rows (K, D_T))}, K = min(max_rows, rows_seen)."""
        return {pair: (self._student[pair], self._teacher[pair]) for pair in self._student}


@torch.no_grad()
def collect_layer_rows(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[RolloutBatch],
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    max_rows: int,
    *,
    seed: int = 0,
) -> dict[Pair, tuple[torch.Tensor, torch.Tensor]]:
    """Stage 1 rows: {(s, t): (S_rows (N, D_S), T_rows (N, D_T))}.

    For each rollout batch, both models read the sampled tokens (no grad) and the hidden states at
    the response positions (the outputs that predict response tokens, as the trainer's losses read
    them) are captured after student layer s and teacher layer t, for each pair
    zip(student_layers, teacher_layers). Across tokenizers (batches carrying a `TeacherView`, see
    `oprd.alignment.retokenize`) the teacher reads its own tokens of the same text and only
    positions with a partner are kept. Batches are streamed through a `RowReservoir`, so N is at
    most `max_rows` per layer pair, sampled uniformly over all positions seen; the caller bounds
    the compute by the number of batches it yields.
    """
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(
            f"need one teacher layer per student layer, got {list(student_layers)} and {list(teacher_layers)}"
        )
    pairs = list(zip(student_layers, teacher_layers))
    reservoir = RowReservoir(max_rows, seed)
    for batch in batches:
        keep = usable_rows(batch).bool()  # (B, T)
        if not keep.any():
            continue
        s, t = paired_states(student, teacher, batch, keep, student_layers, teacher_layers)
        reservoir.add({p: s[p[0]] for p in pairs}, {p: t[p[1]] for p in pairs})
    if reservoir.rows_seen == 0:
        raise ValueError("no response positions in the given batches")
    return reservoir.rows()


# --------------------------------------------------------------------------- Stage 1: projectors


def split_rows(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train indices, held-out indices) of n rows; at least one of each when holdout > 0."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(max(math.ceil(holdout * n), 1), n - 1) if holdout > 0 else 0
    return permutation[held:].sort().values, permutation[:held].sort().values


def _fit_metrics(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """MSE, unexplained variance share and mean cosine of x @ weight.T against targets y."""
    with torch.no_grad():
        prediction = x @ weight.T
        mse = (prediction - y).pow(2).mean()
        variance = (y - y.mean(0)).pow(2).mean()
        return {
            "mse": float(mse),
            "relative_mse": float(mse / variance) if variance > 0 else float("nan"),
            "cos": float(F.cosine_similarity(prediction, y, dim=-1, eps=1e-8).mean()),
        }


def fit_student_projector(
    student_rows: torch.Tensor,
    teacher_targets: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    holdout: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Linear P_S (r, D_S), no bias, fitted by Adam on mean((h_S @ P_S.T - target)^2).

    Adam with lr decayed to 0 on a cosine over `epochs` passes of minibatches of `batch_size`.

    student_rows (N, D_S), teacher_targets (N, r) = P_T (h_T - mu_T); both are constants (frozen
    backbones). A `split_rows(N, holdout, seed)` share of the rows is held out. Training runs in
    normalised units (inputs divided by their per-feature RMS, targets by their overall RMS), folded
    back into the returned float32 weight, so the map is exactly linear and bias-free.

    "Before" is the untrained projector training starts from: a seeded Gaussian with std
    1/sqrt(D_S) in normalised units, i.e. a random projection, as P_S is before Stage 1. The report
    gives train and held-out MSE (also relative to the target variance) and mean cosine similarity
    before and after, and the held-out cosine of the least-squares solution on the training rows
    (the best any linear P_S can do there), which shows how close Adam got.
    """
    if student_rows.ndim != 2 or teacher_targets.ndim != 2 or student_rows.shape[0] != teacher_targets.shape[0]:
        raise ValueError(
            f"need rows (N, D_S) and targets (N, r), got {tuple(student_rows.shape)} and {tuple(teacher_targets.shape)}"
        )
    N, D_S = student_rows.shape
    if N < 2:
        raise ValueError(f"need at least 2 rows, got {N}")
    x, y = student_rows.detach().float(), teacher_targets.detach().float()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("student rows or teacher targets contain non-finite values")
    train, held = split_rows(N, holdout, seed)
    generator = torch.Generator().manual_seed(seed)

    feature_scale = x[train].pow(2).mean(0).sqrt().clamp(min=1e-8)  # (D_S,)
    target_scale = y[train].pow(2).mean().sqrt().clamp(min=1e-8)  # ()
    x_train, y_train = x[train] / feature_scale, y[train] / target_scale

    def unscaled(w: torch.Tensor) -> torch.Tensor:  # weight in normalised units -> on raw rows
        return (w * target_scale / feature_scale).detach().clone()

    w = (torch.randn(y.shape[1], D_S, generator=generator) / math.sqrt(D_S)).requires_grad_()
    initial = unscaled(w)
    optimizer = torch.optim.Adam([w], lr=lr)
    total_steps, step = epochs * math.ceil(len(train) / batch_size), 0
    with torch.enable_grad():
        for _ in range(epochs):
            for chunk in torch.randperm(len(train), generator=generator).split(batch_size):
                # cosine decay to 0: the same lr then ends at the least-squares optimum whether the
                # fit runs 100 steps or 2,000 (a constant lr stays noisy in the latter)
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                step += 1
                loss = (x_train[chunk] @ w.T - y_train[chunk]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    weight = unscaled(w)

    report: dict = {
        "rows_train": len(train), "rows_heldout": len(held), "epochs": epochs, "lr": lr, "batch_size": batch_size
    }
    for split, index in (("train", train), ("heldout", held)):
        if len(index) == 0:
            continue
        for when, matrix in (("before", initial), ("after", weight)):
            for name, value in _fit_metrics(matrix, x[index], y[index]).items():
                report[f"{split}_{name}_{when}"] = value
    if len(held):
        solution = torch.linalg.lstsq(x[train].double(), y[train].double()).solution.T  # (r, D_S)
        report["heldout_cos_lstsq"] = _fit_metrics(solution.float(), x[held], y[held])["cos"]
    return weight, report


# --------------------------------------------------------------------------- the bridge


@dataclass
class Bridge:
    """Frozen projectors of every layer pair, and where they came from.

    teacher_components {pair: (r, D_T)}, teacher_means {pair: (D_T,)}, student_projectors
    {pair: (r, D_S)}, all float32. With `normalize_states`, both projections read `unit_rms(h)`
    instead of h, as at fit time. `metadata` is JSON-serialisable (see `bridge_metadata`; fit_bridge
    adds rank, date and a per-layer report under "layers").
    """

    student_layers: list[int]
    teacher_layers: list[int]
    rank: int
    teacher_components: dict[Pair, torch.Tensor]
    teacher_means: dict[Pair, torch.Tensor]
    student_projectors: dict[Pair, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    normalize_states: bool = False

    def _read(self, h: torch.Tensor) -> torch.Tensor:
        return unit_rms(h) if self.normalize_states else h.float()

    @property
    def pairs(self) -> list[Pair]:
        return list(zip(self.student_layers, self.teacher_layers))

    def project_student(self, pair: Pair, h: torch.Tensor) -> torch.Tensor:
        """(..., D_S) -> (..., r) in float32; differentiable in h, the projector stays constant."""
        weight = self.student_projectors[tuple(pair)]
        return self._read(h) @ weight.to(h.device).T

    def project_teacher(self, pair: Pair, h: torch.Tensor) -> torch.Tensor:
        """(..., D_T) -> (..., r) in float32: centred by mu_T, then projected on the components."""
        pair = tuple(pair)
        mean, components = self.teacher_means[pair].to(h.device), self.teacher_components[pair].to(h.device)
        return (self._read(h) - mean) @ components.T

    def check_fits(self, student_config, teacher_config) -> None:
        """Raises ValueError naming the mismatch when the models are not the ones the bridge was fitted for."""
        for role, config, projectors in (
            ("student", student_config, self.student_projectors),
            ("teacher", teacher_config, self.teacher_components),
        ):
            hidden, layers = _hidden_size(config), config.num_hidden_layers
            widths = {int(p.shape[-1]) for p in projectors.values()}
            if widths != {hidden}:
                raise ValueError(
                    f"bridge does not fit the {role}: its hidden size is {hidden}, "
                    f"the bridge's {role} projectors expect {sorted(widths)}"
                )
            recorded = self.metadata.get(f"{role}_num_layers")
            if recorded is not None and recorded != layers:
                raise ValueError(
                    f"bridge does not fit the {role}: it has {layers} layers, the bridge was fitted on {recorded}"
                )
            used = self.student_layers if role == "student" else self.teacher_layers
            if max(used) > layers:
                raise ValueError(f"bridge does not fit the {role}: it uses layer {max(used)} of a {layers}-layer model")

    def check_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        """Raises ValueError when a tokenizer's vocabulary differs from the one recorded at fit time."""
        for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            recorded = self.metadata.get(f"{role}_tokenizer_vocab_sha256")
            if recorded is not None and recorded != vocab_hash(tokenizer):
                raise ValueError(f"the {role} tokenizer's vocabulary differs from the one the bridge was fitted with "
                                 f"({self.metadata.get(f'{role}_tokenizer')!r})")

    def to(self, device: torch.device | str) -> "Bridge":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(self, teacher_components=move(self.teacher_components), teacher_means=move(self.teacher_means),
                       student_projectors=move(self.student_projectors))


def _hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id map (order-independent), to recognise it later."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def bridge_metadata(
    *,
    student_config,
    teacher_config,
    student: str = "",
    teacher: str = "",
    student_tokenizer=None,
    teacher_tokenizer=None,
    data: str | dict = "",
) -> dict:
    """What a run records about the bridge it used: models, sizes, tokenizers, data."""
    meta = {
        "student": student,
        "teacher": teacher,
        "student_hidden_size": _hidden_size(student_config),
        "teacher_hidden_size": _hidden_size(teacher_config),
        "student_num_layers": int(student_config.num_hidden_layers),
        "teacher_num_layers": int(teacher_config.num_hidden_layers),
        "data": data,
    }
    for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if tokenizer is not None:
            meta[f"{role}_tokenizer"] = getattr(tokenizer, "name_or_path", "") or ""
            meta[f"{role}_tokenizer_vocab_sha256"] = vocab_hash(tokenizer)
    return meta


def fit_bridge(
    student_rows_by_pair: dict[Pair, torch.Tensor],
    teacher_rows_by_pair: dict[Pair, torch.Tensor],
    rank: int,
    *,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    holdout: float = 0.1,
    seed: int = 0,
    normalize_states: bool = True,
    metadata: dict | None = None,
) -> Bridge:
    """Stage 1 on collected rows: {pair: (N, D_S)} and {pair: (N, D_T)} -> Bridge of rank r.

    With `normalize_states` (the default; see the module notes) every row is first scaled to unit
    RMS (`unit_rms`), and the bridge projects states the same way. Per pair: P_T, mu_T =
    `fit_teacher_pca` on the training rows only, then P_S =
    `fit_student_projector` onto P_T (h_T - mu_T) with the same held-out split. metadata["layers"]
    holds one report per pair: held-out cosine before (random P_S) and after training, MSEs, the
    least-squares ceiling and the teacher variance the rank keeps. For a rank sweep, collect rows
    once and call this per rank.
    """
    if set(student_rows_by_pair) != set(teacher_rows_by_pair) or not student_rows_by_pair:
        raise ValueError("student and teacher rows must cover the same, non-empty set of layer pairs")
    pairs = sorted(student_rows_by_pair)
    components, means, projectors, reports = {}, {}, {}, []
    for pair in pairs:
        s, t = student_rows_by_pair[pair], teacher_rows_by_pair[pair]
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"layer pair {pair}: {s.shape[0]} student rows vs {t.shape[0]} teacher rows")
        if normalize_states:
            s, t = unit_rms(s), unit_rms(t)
        train, _ = split_rows(s.shape[0], holdout, seed)
        components[pair], means[pair] = fit_teacher_pca(t[train], rank)
        targets = (t.float() - means[pair]) @ components[pair].T  # (N, r)
        projectors[pair], report = fit_student_projector(
            s, targets, epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout, seed=seed
        )
        report = {
            "student_layer": pair[0],
            "teacher_layer": pair[1],
            "teacher_explained_variance": explained_variance_ratio(t[train], components[pair], means[pair]),
            **report,
        }
        # headline numbers: held-out when there is a held-out split, else on the training rows
        split = "heldout" if report["rows_heldout"] else "train"
        report["cos_before"], report["cos_after"] = report[f"{split}_cos_before"], report[f"{split}_cos_after"]
        reports.append(report)
    meta = dict(metadata or {})
    meta.update(
        rank=rank,
        normalize_states=normalize_states,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        layers=reports,
        cos_before=sum(r["cos_before"] for r in reports) / len(reports),
        cos_after=sum(r["cos_after"] for r in reports) / len(reports),
    )
    return Bridge(
        student_layers=[p[0] for p in pairs],
        teacher_layers=[p[1] for p in pairs],
        rank=rank,
        teacher_components=components,
        teacher_means=means,
        student_projectors=projectors,
        metadata=meta,
        normalize_states=normalize_states,
    )


# --------------------------------------------------------------------------- the file


def save_bridge(bridge: Bridge, path: str | Path) -> None:
    """One safetensors file: tensors `pair{i}.{teacher_components,teacher_mean,student_projector}`
    and JSON header metadata; written to a temporary file beside `path`, then renamed (atomic)."""
    path = Path(path)
    tensors = {}
    for i, pair in enumerate(bridge.pairs):
        tensors[f"pair{i}.teacher_components"] = bridge.teacher_components[pair]
        tensors[f"pair{i}.teacher_mean"] = bridge.teacher_means[pair]
        tensors[f"pair{i}.student_projector"] = bridge.student_projectors[pair]
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "bridge": json.dumps(
            {"student_layers": bridge.student_layers, "teacher_layers": bridge.teacher_layers, "rank": bridge.rank,
             "normalize_states": bridge.normalize_states, "metadata": bridge.metadata}
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_bridge(path: str | Path) -> Bridge:
    """Reads a file written by `save_bridge` (safetensors only: no pickle is ever loaded)."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an oprd bridge file (format {header.get('format')!r})")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has bridge format version {header['format_version']}, newer than this oprd ({FORMAT_VERSION})"
        )
    info = json.loads(header["bridge"])
    tensors = load_file(str(path))
    pairs = list(zip(info["student_layers"], info["teacher_layers"]))
    return Bridge(
        student_layers=list(info["student_layers"]),
        teacher_layers=list(info["teacher_layers"]),
        rank=int(info["rank"]),
        teacher_components={p: tensors[f"pair{i}.teacher_components"] for i, p in enumerate(pairs)},
        teacher_means={p: tensors[f"pair{i}.teacher_mean"] for i, p in enumerate(pairs)},
        student_projectors={p: tensors[f"pair{i}.student_projector"] for i, p in enumerate(pairs)},
        metadata=info["metadata"],
        normalize_states=bool(info.get("normalize_states", False)),
    )


# --------------------------------------------------------------------------- Stage 2


def bridge_loss_rows(
    bridge: Bridge,
    student_rows_by_pair: dict[Pair, torch.Tensor],
    teacher_rows_by_pair: dict[Pair, torch.Tensor],
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OPRD-Bridge loss on selected positions: {pair: (N, D_S)}, {pair: (N, D_T)}, weights (N,).

    Both sides are projected to (N, r) with the frozen projectors, then
    `losses.representation_loss_rows(normalize=True)`: per pair sum_n w_n mean_r (s - t)^2 of
    L2-normalised projections, averaged over the pairs given (any subset of the bridge's, taken in
    the bridge's order). Gradients reach the student rows only. Metrics as there ("rep/...",
    pair_i indexing the pairs given); like them, they add up over micro-batches.
    """
    if set(student_rows_by_pair) != set(teacher_rows_by_pair) or not student_rows_by_pair:
        raise ValueError("student and teacher rows must cover the same, non-empty set of layer pairs")
    unknown = set(student_rows_by_pair) - set(bridge.pairs)
    if unknown:
        raise ValueError(f"layer pairs {sorted(unknown)} are not in the bridge (it has {bridge.pairs})")
    pairs = [p for p in bridge.pairs if p in student_rows_by_pair]
    student = [bridge.project_student(p, student_rows_by_pair[p]) for p in pairs]
    with torch.no_grad():
        teacher = [bridge.project_teacher(p, teacher_rows_by_pair[p]) for p in pairs]
    loss, metrics = representation_loss_rows(student, teacher, weights, normalize=True)
    return loss, metrics
