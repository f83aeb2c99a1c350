"""`oprd report RUN` and `oprd compare RUN... --out DIR`: what runs did, as markdown and plots.

  report_series     {plot: {series: [(step, value)]}} of one run: the data every plot draws
  write_report      RUN/report.md and RUN/report/*.png
  write_comparison  DIR/compare.md and DIR/*.png: the config keys that differ, final and best
                    validation, cost, and every run's curves overlaid
  plot_lines        the one plot of series against step they (and the demo's curves) draw

Plots: loss, representation cosine, KL estimate, response length, validation (every val/ metric
reported as a fraction), and the cost: cumulative device-hours and sampled tokens, against step.
"""

from __future__ import annotations

from pathlib import Path

from oprd.config import flat_keys, read_run_config
from oprd.display import markdown_table
from oprd.files import write_text_atomically
from oprd.runs.provenance import RunJson
from oprd.runs.recorder import read_metrics

PLOTS = {  # plot file stem -> (title, the metrics it draws)
    "loss": ("loss", ("loss", "opd/loss", "rep/loss")),
    "rep_cosine": ("representation cosine", ("rep/cosine_similarity",)),
    "kl_estimate": ("KL estimate (sampled tokens)", ("opd/kl_estimate",)),
    "response_length": ("response length (tokens)", ("response_length/mean",)),
}
TITLES = {"validation": "validation", "device_hours": "cost: device-hours", "sampled_tokens": "cost: tokens sampled"}
FRACTIONS = ("avg@", "best@", "dist-4g", "format_error_rate")  # validation metrics on one 0-1 scale


def _rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it an oprd run folder (oprd train output_dir)?")
    return read_metrics(path)


def report_series(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every plot's series of a run, from metrics.jsonl; plots without data are left out."""
    rows = _rows(run_dir)
    plots: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for stem, (_, names) in PLOTS.items():
        series = {name: [(r["step"], r[name]) for r in rows if name in r] for name in names}
        if any(series.values()):
            plots[stem] = {name: points for name, points in series.items() if points}
    validation = sorted({k for r in rows for k in r if k.startswith("val/") and any(f in k for f in FRACTIONS)})
    if validation:
        plots["validation"] = {name: [(r["step"], r[name]) for r in rows if name in r] for name in validation}
    for stem, name in (("device_hours", "cost/device_hours"), ("sampled_tokens", "cost/sampled_tokens")):
        total, points = 0.0, []
        for r in rows:
            if name in r:
                total += r[name]
                points.append((r["step"], total))
        if points:
            plots[stem] = {f"{name} (cumulative)": points}
    return plots


def _title(stem: str) -> str:
    return PLOTS[stem][0] if stem in PLOTS else TITLES[stem]


def plot_lines(path: Path, title: str, lines: dict[str, list[tuple[int, float]]], ylabel: str | None = None,
               references: dict[str, float] | None = None) -> None:
    """One plot against step: a line per series, and a dashed horizontal line per reference value
    (e.g. the teacher's accuracy). Every run plot of oprd is drawn here (report, compare, the demo)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in lines.items():
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
    for i, (name, value) in enumerate((references or {}).items()):
        axis.axhline(value, linestyle=("--", ":", "-.")[i % 3], color="k", label=name)
    axis.set(xlabel="step", ylabel=ylabel or "", title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def final_and_best(series: dict[str, dict[str, list[tuple[int, float]]]]) -> dict[str, dict[str, float]]:
    """{val metric: {final, best, best_step}} of a run's `report_series`: each metric's last value
    and its best (the highest; the lowest for format errors)."""
    out = {}
    for name, points in series.get("validation", {}).items():
        lower = "format_error_rate" in name
        best_step, best = (min if lower else max)(points, key=lambda p: p[1])
        out[name] = {"final": points[-1][1], "best": best, "best_step": best_step}
    return out


def write_report(run_dir: Path) -> Path:
    """RUN/report.md and RUN/report/<plot>.png; returns report.md's path."""
    run_dir = Path(run_dir)
    plots = report_series(run_dir)
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    for stem, lines in plots.items():
        plot_lines(folder / f"{stem}.png", _title(stem), lines)
    record = RunJson(run_dir).read()
    last_step = max((step for lines in plots.values() for points in lines.values() for step, _ in points), default=0)
    lines = [f"# Run {run_dir.name}", ""]
    if record:
        segments = record.get("segments", [])
        lines += [f"oprd {record.get('oprd_version')} (commit {record.get('git_commit')}"
                  f"{', dirty tree' if record.get('git_dirty') else ''}); {len(segments)} segment(s): "
                  + "; ".join(f"steps {s['first_step']}-{s['last_step']} {s['exit_status']}" for s in segments), ""]
    lines += [f"{last_step} steps logged.", ""]
    validation = final_and_best(plots)
    if validation:
        lines += ["## Validation", "", *markdown_table(
            ["metric", "final", "best", "best at step"],
            [[name, f"{v['final']:.4g}", f"{v['best']:.4g}", v["best_step"]] for name, v in validation.items()]), ""]
    if record.get("cost"):
        lines += ["## Cost", "", *markdown_table(list(record["cost"]), [[f"{v:.4g}" for v in record["cost"].values()]]),
                  ""]
    if record.get("best"):
        best = record["best"]
        lines += [f"best/ holds step {best['step']} ({best['metric']} = {best['value']:.4g}).", ""]
    lines += ["## Plots", "", *(f"![{_title(stem)}](report/{stem}.png)" for stem in plots), ""]
    write_text_atomically(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"


def config_differences(run_dirs: list[Path]) -> dict[str, list]:
    """{config key: [each run's value]} for the keys whose values differ between the runs."""
    flats = [flat_keys(read_run_config(Path(run) / "config.yaml")) for run in run_dirs]
    keys = sorted(set().union(*flats))
    return {key: [flat.get(key) for flat in flats] for key in keys
            if key != "output_dir" and len({repr(flat.get(key)) for flat in flats}) > 1}


def write_comparison(run_dirs: list[Path], out: Path) -> Path:
    """DIR/compare.md and DIR/<plot>.png with every run's curve on each plot; returns compare.md's path."""
    run_dirs = [Path(run) for run in run_dirs]
    if len(run_dirs) < 2:
        raise ValueError("oprd compare needs at least two run folders")
    names = [run.name if [r.name for r in run_dirs].count(run.name) == 1 else str(run) for run in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series = [report_series(run) for run in run_dirs]
    overlaid = _overlay(series, names)
    for stem, lines in overlaid.items():
        plot_lines(out / f"{stem}.png", _title(stem), lines)
    lines = ["# Runs compared", "", *(f"- {name}: {run}" for name, run in zip(names, run_dirs)), ""]
    differences = config_differences(run_dirs)
    lines += ["## Config keys that differ", ""]
    lines += [*markdown_table(["key", *names], [[key, *map(str, values)] for key, values in differences.items()]), ""] \
        if differences else ["none", ""]
    validation = [final_and_best(plots) for plots in series]
    metrics = sorted(set().union(*validation))
    if metrics:
        lines += ["## Validation (final / best)", "", *markdown_table(
            ["metric", *names],
            [[m, *(f"{v[m]['final']:.4g} / {v[m]['best']:.4g}" if m in v else "-" for v in validation)]
             for m in metrics]), ""]
    costs = [RunJson(run).read().get("cost") or {} for run in run_dirs]
    keys = sorted(set().union(*costs))
    if keys:
        lines += ["## Cost", "", *markdown_table(["cost", *names],
                                                 [[k, *(f"{c[k]:.4g}" if k in c else "-" for c in costs)]
                                                  for k in keys]), ""]
    lines += ["## Curves", "", *(f"![{_title(stem)}]({stem}.png)" for stem in overlaid), ""]
    write_text_atomically(out / "compare.md", "\n".join(lines))
    return out / "compare.md"


def comparison_series(run_dirs: list[Path], names: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{plot: {"RUN: series": points}}: every run's series of each plot, labelled by run."""
    return _overlay([report_series(run) for run in run_dirs], names)


def _overlay(series: list[dict], names: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    overlaid: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, plots in zip(names, series):
        for stem, lines in plots.items():
            for series, points in lines.items():
                overlaid.setdefault(stem, {})[f"{name}: {series}"] = points
    return overlaid
