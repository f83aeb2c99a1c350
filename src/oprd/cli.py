"""The `oprd` command line: thin wrappers over the library.

    oprd train recipes/smoke/oprd.yaml max_steps=3 output_dir=runs/smoke
    oprd eval runs/smoke/final --benchmarks aime24 --samples 4
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


# --- train (core engine) ---


# --- eval (evaluation harness) ---
