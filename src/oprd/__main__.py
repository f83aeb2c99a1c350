"""`python -m oprd ...` runs the `oprd` command."""

from oprd.cli import app

app(prog_name="oprd")
