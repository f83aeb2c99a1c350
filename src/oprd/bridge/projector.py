"""OPRD-Bridge projectors between models of different width, depth or tokenizer, and their file.

Paper (PAPER.md, "OPRD-Bridge"): per paired layer (student l, teacher `layer_map(L_S, L_T)[l-1]`),
Stage 1 fits a frozen teacher projector P_T (r, D_T) = top-r principal directions of the centred
teacher states, with mean mu_T, and trains a linear student projector P_S (r, D_S) on
|| P_S h_S - P_T (h_T - mu_T) ||^2 with both backbones frozen. Stage 2 is OPRD on the projected,
L2-normalised vectors with both projectors frozen (`Bridge.project`, then
`losses.representation_loss_rows`; see `oprd.objective`).

A layer pair is `(student_layer, teacher_layer)`, 1-based as in HF `hidden_states`. Rows are
hidden states at selected positions, (N, D_S) or (N, D_T).

  fit_teacher_pca         P_T and mu_T from teacher rows (float64 eigendecomposition)
  fit_student_projector   P_S by Adam on the MSE, with a held-out report
  fit_bridge              both, per layer pair -> Bridge
  save_bridge/load_bridge one safetensors file, JSON metadata

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
  its components on norm variation that the Stage 2 loss, a cosine, ignores (docs/bridge.md: `oprd demo
  --bridge` measures both). `normalize_states=False` is the paper's recipe as written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oprd.files import write_file_atomically

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

    def project(self, pairs: Sequence[Pair], student_h_N_D: Sequence[torch.Tensor],
                teacher_h_N_D: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both models' states of each pair projected to (N, r) in float32, as fitted and as the
        pre-flight measures them, whatever autocast the caller runs under: the student's
        differentiably, the teacher's as constants. What Stage 2 feeds to the representation loss."""
        unknown = [tuple(p) for p in pairs if tuple(p) not in self.student_projectors]
        if unknown:
            raise ValueError(f"layer pairs {unknown} are not in the bridge (it has {self.pairs})")
        device_type = student_h_N_D[0].device.type if student_h_N_D else "cpu"
        with torch.autocast(device_type, enabled=False):
            student = [self.project_student(p, h) for p, h in zip(pairs, student_h_N_D)]
            with torch.no_grad():
                teacher = [self.project_teacher(p, h) for p, h in zip(pairs, teacher_h_N_D)]
        return student, teacher

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

    def to(self, device: torch.device | str) -> Bridge:
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
    write_file_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


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
