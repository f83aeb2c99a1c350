"""The `oprd` command line: thin wrappers over the library.

    oprd train recipes/smoke/oprd.yaml max_steps=3 output_dir=runs/smoke
    oprd eval runs/smoke/final --benchmarks aime24 --samples 4
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main() -> None:
    """On-policy distillation of language models: OPRD and the OPD baselines."""


# --- train (core engine) ---


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/smoke/oprd.yaml"),
    overrides: list[str] = typer.Argument(None, help="key=value or section.key=value, e.g. optim.lr=2e-5"),
) -> None:
    """On-policy distillation from a YAML recipe plus overrides.

    Example: oprd train recipes/smoke/oprd.yaml output_dir=runs/smoke max_steps=3
    """
    from oprd.config import ConfigError, load_config
    from oprd.trainer import train as run_training

    console = Console(stderr=True, soft_wrap=True)
    try:
        cfg = load_config(recipe, overrides or [])
        run_training(cfg)
    except (ConfigError, FileExistsError, FileNotFoundError, FloatingPointError, ValueError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=2) from error


# --- eval (evaluation harness) ---


if __name__ == "__main__":
    app()
