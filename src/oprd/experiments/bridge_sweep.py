"""The paper's rank study: one OPRD-Bridge per rank on the same Stage 1 rows (`oprd bridge sweep`,
and the bridge demo's sweep), with held-out cosine before and after training each student
projector: sweep.json, sweep.md, sweep.png and every bridge file."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from oprd.bridge import save_bridge
from oprd.bridge.stage1 import PairedRows, Stage1Settings, fit_bridge_at_rank
from oprd.display import markdown_table


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def sweep_ranks(rows: PairedRows, ranks: list[int], settings: Stage1Settings, info: dict, out: Path) -> list[dict]:
    """One bridge per rank on the same rows: bridge-r{rank}.safetensors, sweep.json, sweep.md, sweep.png."""
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for rank in ranks:
        bridge = fit_bridge_at_rank(rows, rank, settings, info)
        save_bridge(bridge, out / f"bridge-r{rank}.safetensors")
        meta = bridge.metadata
        table.append({
            "rank": rank, "cos_before": meta["cos_before"], "cos_after": meta["cos_after"],
            "teacher_explained_variance": _mean(layer["teacher_explained_variance"] for layer in meta["layers"]),
            "heldout_cos_lstsq": _mean(layer.get("heldout_cos_lstsq", math.nan) for layer in meta["layers"]),
            "layers": [{k: layer[k] for k in ("student_layer", "teacher_layer", "cos_before", "cos_after")}
                       for layer in meta["layers"]],
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
        *markdown_table(
            ["rank", "cos before (random P_S)", "cos after", "least-squares ceiling", "teacher variance kept"],
            ([r["rank"], *(f"{r[key]:.3f}" for key in ("cos_before", "cos_after", "heldout_cos_lstsq",
                                                        "teacher_explained_variance"))] for r in table),
        ),
    ]
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
