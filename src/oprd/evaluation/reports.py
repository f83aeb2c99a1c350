"""The report of `oprd eval`: summary.json, samples.jsonl (one record per response, appended as
results come) and results.md (the paper's tables: one per headline metric, models as rows and
benchmarks as columns, then every metric per benchmark)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from rich.console import Console

from oprd.display import markdown_table, print_table
from oprd.files import prepare_output_dir

REPORT_FILES = ("summary.json", "samples.jsonl", "results.md")


def prepare_report_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """The report folder, with any old report removed (`overwrite`); files appear as results come,
    so a run that fails before its first result leaves the folder empty and reusable."""
    out = prepare_output_dir(Path(out_dir), overwrite=overwrite, overwrite_flag="--overwrite", ours=None)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    return out


def append_samples(out: Path, model: str, benchmark: str, records: list[dict]) -> None:
    with open(out / "samples.jsonl", "a") as f:
        for record in records:
            f.write(json.dumps({"model": model, "benchmark": benchmark, **record}) + "\n")


def write_report(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(summary))


# Headline tables: (metric key, title); k is the samples per problem.
HEADLINE_METRICS = [
    ("avg@{k}", "Avg@{k} (%)"),
    ("best@{k}", "Best@{k} (%)"),
    ("maj@{k}", "Maj@{k} (%)"),
    ("dist-4g", "Dist-4g (%)"),
    ("avg_len", "Avg Len ({unit})"),
    ("format_error_rate", "Format errors (%)"),
    ("truncation_rate", "Truncated (%)"),
]
COUNTS = ("solve_none", "solve_all", "grading_timeouts", "problems", "samples", "k")


def metric_tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the report: one table per headline metric with models as rows and
    benchmarks (and their average) as columns, like the paper's Tables 2 and 4-5; then one table
    per benchmark with every metric."""
    results, benchmarks = summary["results"], summary["benchmarks"]
    cells = {(model, bench): m for model, by_bench in results.items() for bench, m in by_bench.items()}
    k = next(iter(cells.values()), {}).get("k", "k")
    tables = []
    for key, title in HEADLINE_METRICS:
        rows = []
        for model in results:
            values = [_headline(cells.get((model, b)), key) for b in benchmarks]
            average = None if None in values else mean(values)
            rows.append([model, *(_format(key, v) for v in [*values, average])])
        tables.append((title.format(k=k, unit=summary["length_unit"]), ["model", *benchmarks, "Avg."], rows))
    for bench in benchmarks:
        models = [model for model in results if (model, bench) in cells]
        keys = list(dict.fromkeys(key for model in models for key in cells[model, bench]))
        header = ["model", *(key if key in COUNTS or key == "avg_len" else f"{key} (%)" for key in keys)]
        rows = [[model, *(_format(key, cells[model, bench].get(key)) for key in keys)] for model in models]
        tables.append((f"{bench}: all metrics", header, rows))
    return tables


def _headline(metrics: dict | None, key: str) -> float | None:
    return None if metrics is None else metrics.get(key.format(k=metrics["k"]))


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key in COUNTS:
        return str(int(value))
    if key == "avg_len":
        return f"{value:.0f}"
    return f"{100 * value:.1f}"


def results_markdown(summary: dict) -> str:
    settings = ", ".join(f"{key}: {json.dumps(value)}" for key, value in summary.items() if key != "results")
    lines = ["# Evaluation results", "", settings, ""]
    for title, header, rows in metric_tables(summary):
        lines += [f"## {title}", "", *markdown_table(header, rows), ""]
    return "\n".join(lines)


def print_tables(console: Console, summary: dict, out: Path) -> None:
    """The Avg@k and Best@k tables on the console; the rest is in results.md."""
    for title, header, rows in metric_tables(summary)[:2]:
        print_table(console, title, header, rows)
    console.print(f"full report: {out / 'results.md'}")
