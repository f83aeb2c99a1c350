"""What many test modules read: where the repository and its smoke recipes are, and a run's metrics."""

from pathlib import Path

from oprd.runs.recorder import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke"
TINY = str(SMOKE / "tiny-qwen3")


def run_metrics(run_dir: Path) -> list[dict]:
    """Every line of a run folder's metrics.jsonl (step 0's validation included)."""
    return read_metrics(Path(run_dir) / "metrics.jsonl")
