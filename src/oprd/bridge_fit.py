"""OPRD-Bridge Stage 1 from two models: `oprd bridge fit` and `oprd bridge sweep`.

    rows, info = collect_bridge_rows(FitSettings(student="S", teacher="T", data="prompts.parquet"))
    bridge = fit_bridge(*split_pairs(rows), rank=8, metadata=info)

The student samples responses to a sample of prompts; both models read them (each with its own
tokenizer when they differ, positions matched by character offsets, `oprd.alignment`), and a
bounded, uniform sample of hidden-state rows is kept per layer pair (`bridge.RowReservoir`). Rows
are collected once; a rank sweep fits one bridge per rank on the same rows, as the paper's rank
study does, and reports held-out cosine similarity before and after training the student
projector.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from oprd.alignment import retokenize
from oprd.bridge import Bridge, Pair, bridge_metadata, collect_layer_rows, fit_bridge, layer_pairs
from oprd.data import load_problems, prompt_token_ids
from oprd.models import ModelSpec, eos_token_ids, load_model, load_model_config, load_tokenizer
from oprd.rollout import HFRollout, RolloutBatch, SamplingParams


@dataclass
class FitSettings:
    """Everything Stage 1 reads; saved into the bridge's metadata."""

    student: str
    teacher: str
    data: str
    prompts: int = 64  # prompts sampled from `data` (the first N)
    responses_per_prompt: int = 2
    max_new_tokens: int = 512
    temperature: float = 1.0
    batch_prompts: int = 16  # prompts per generate() call
    max_rows: int = 16_384  # rows kept per layer pair (the paper's)
    layers: str = "all"  # all, or comma-separated 1-based student layers
    epochs: int = 20
    lr: float = 1e-2
    holdout: float = 0.1
    normalize_states: bool = True  # fit and project unit-RMS states (oprd.bridge notes); False: the paper's raw states
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        for name in ("prompts", "responses_per_prompt", "max_new_tokens", "batch_prompts", "max_rows", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")


def _spec(model: str, settings: FitSettings) -> ModelSpec:
    return ModelSpec(model=model, trust_remote_code=settings.trust_remote_code)


def _student_layers(layers: str) -> list[int] | None:
    if layers == "all":
        return None
    try:
        return [int(v) for v in layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated layer numbers, got {layers!r}") from None


def collect_bridge_rows(settings: FitSettings, console=None) -> tuple[dict[Pair, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Stage 1 rows {(s, t): (S_rows, T_rows)} and the metadata a bridge fitted on them records."""
    settings.validate()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device)
    student_spec, teacher_spec = _spec(settings.student, settings), _spec(settings.teacher, settings)
    student_tok, teacher_tok = load_tokenizer(student_spec), load_tokenizer(teacher_spec)
    student_config, teacher_config = load_model_config(student_spec), load_model_config(teacher_spec)
    cross_tokenizer = student_tok.get_vocab() != teacher_tok.get_vocab()
    pairs = layer_pairs(student_config.num_hidden_layers, teacher_config.num_hidden_layers,
                        _student_layers(settings.layers))

    problems = load_problems(settings.data, limit=settings.prompts)
    if not problems:
        raise ValueError(f"{settings.data} has no prompts")
    student_prompts = [prompt_token_ids(student_tok, p.messages) for p in problems]
    teacher_prompts = [prompt_token_ids(teacher_tok, p.messages) for p in problems] if cross_tokenizer else None

    student = load_model(student_spec, device).eval()
    teacher = load_model(teacher_spec, device).eval()
    rollout = HFRollout(student, pad_token_id=student_tok.pad_token_id,
                        eos_token_ids=eos_token_ids(student, student_tok), vocab_size=len(student_tok))
    params = SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                            n=settings.responses_per_prompt)
    matched = {"rows": 0, "of": 0}

    def batches() -> Iterator[RolloutBatch]:
        for first in range(0, len(student_prompts), settings.batch_prompts):
            chosen = range(first, min(first + settings.batch_prompts, len(student_prompts)))
            batch = rollout.generate([student_prompts[i] for i in chosen], params).to(device)
            if teacher_prompts is not None:
                batch.teacher_view = retokenize(batch, student_tok, teacher_tok, [teacher_prompts[i] for i in chosen])
                matched["rows"] += int((batch.teacher_view.partner >= 0).sum())
            matched["of"] += int(batch.response_mask.sum())
            if console is not None:
                console.print(f"stage 1: rollouts {chosen.stop}/{len(student_prompts)} prompts")
            yield batch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        rows = collect_layer_rows(student, teacher, batches(), [p[0] for p in pairs], [p[1] for p in pairs],
                                  settings.max_rows, seed=settings.seed)
    info = bridge_metadata(
        student_config=student_config, teacher_config=teacher_config, student=settings.student,
        teacher=settings.teacher, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
        data={"path": settings.data, "prompts": len(problems), "responses_per_prompt": settings.responses_per_prompt},
    )
    info["stage1"] = asdict(settings)
    info["response_tokens"] = matched["of"]
    info["matched_position_share"] = matched["rows"] / matched["of"] if cross_tokenizer and matched["of"] else 1.0
    info["rows_per_pair"] = next(iter(rows.values()))[0].shape[0]
    return rows, info


def fit_from_rows(rows: dict[Pair, tuple[torch.Tensor, torch.Tensor]], rank: int, settings: FitSettings,
                  info: dict) -> Bridge:
    """One bridge of `rank` on collected rows (the rank must not exceed either hidden size)."""
    widths = {min(s.shape[1], t.shape[1]) for s, t in rows.values()}
    if rank < 1 or rank > min(widths):
        raise ValueError(f"rank must be in 1..{min(widths)} (the smaller hidden size), got {rank}")
    return fit_bridge({p: s for p, (s, _) in rows.items()}, {p: t for p, (_, t) in rows.items()}, rank,
                      epochs=settings.epochs, lr=settings.lr, holdout=settings.holdout, seed=settings.seed,
                      normalize_states=settings.normalize_states, metadata=info)


def sweep_ranks(rows, ranks: list[int], settings: FitSettings, info: dict, out: Path) -> list[dict]:
    """One bridge per rank on the same rows: bridge-r{rank}.safetensors, sweep.json, sweep.md, sweep.png."""
    from oprd.bridge import save_bridge

    out.mkdir(parents=True, exist_ok=True)
    table = []
    for rank in ranks:
        bridge = fit_from_rows(rows, rank, settings, info)
        save_bridge(bridge, out / f"bridge-r{rank}.safetensors")
        meta = bridge.metadata
        table.append({
            "rank": rank, "cos_before": meta["cos_before"], "cos_after": meta["cos_after"],
            "teacher_explained_variance": sum(l["teacher_explained_variance"] for l in meta["layers"]) / len(meta["layers"]),
            "heldout_cos_lstsq": sum(l.get("heldout_cos_lstsq", math.nan) for l in meta["layers"]) / len(meta["layers"]),
            "layers": [{k: l[k] for k in ("student_layer", "teacher_layer", "cos_before", "cos_after")}
                       for l in meta["layers"]],
        })
    summary = {**{k: info[k] for k in ("student", "teacher", "matched_position_share", "rows_per_pair")},
               "normalize_states": settings.normalize_states}
    (out / "sweep.json").write_text(json.dumps({**summary, "ranks": table}, indent=2))
    (out / "sweep.md").write_text(sweep_markdown(table, summary))
    plot_sweep(table, out / "sweep.png")
    return table


def sweep_markdown(table: list[dict], summary: dict) -> str:
    lines = [
        f"# OPRD-Bridge rank sweep: {summary['student']} <- {summary['teacher']}", "",
        f"Held-out cosine similarity of projected states, mean over layer pairs; {summary['rows_per_pair']} rows per "
        f"pair, matched position share {summary['matched_position_share']:.3f}; "
        f"{'unit-RMS' if summary['normalize_states'] else 'raw'} states.", "",
        "| rank | cos before (random P_S) | cos after | least-squares ceiling | teacher variance kept |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['rank']} | {r['cos_before']:.3f} | {r['cos_after']:.3f} | {r['heldout_cos_lstsq']:.3f} | "
                     f"{r['teacher_explained_variance']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["rank"] for r in table]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ranks, [r["cos_before"] for r in table], "o--", label="before (random P_S)")
    ax.plot(ranks, [r["cos_after"] for r in table], "o-", label="after Stage 1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("bridge rank r")
    ax.set_ylabel("held-out cosine similarity")
    ax.set_ylim(min(0.0, min(r["cos_before"] for r in table)), 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
