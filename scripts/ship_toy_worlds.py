"""Writes the toy worlds oprd ships (src/oprd/experiments/worlds/): the default world and the quick one
the tests use, each with everything the demos build beside it (the bridge demo's teachers, the
applications demo's specialists), so no machine builds them and every machine starts from the same
weights.

    python scripts/ship_toy_worlds.py            # ship the worlds in this machine's cache (built if absent)
    python scripts/ship_toy_worlds.py --rebuild  # build them afresh first (oprd demo --rebuild-world's build)

A new shipped world changes every number the demos report: rerun them and update README in the
same commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from transformers.utils import logging as hf_logging

from oprd.display import progress_bar
from oprd.experiments import applications, bridge_demo, toy
from oprd.experiments.demo import DemoSettings

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "oprd" / "experiments" / toy.SHIPPED_WORLDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="build the worlds afresh instead of reading the cache")
    parser.add_argument("--quick-only", action="store_true", help="only the quick world (the tests')")
    args = parser.parse_args()
    console = Console(stderr=True)
    hf_logging.disable_progress_bar()
    for quick in (True,) if args.quick_only else (True, False):
        s = DemoSettings.quick_run(Path("unused")) if quick else DemoSettings(Path("unused"))
        with progress_bar(console) as progress:
            world = toy.build_world(s.world_settings, progress, rebuild=args.rebuild)
            bridge_demo.build_teachers(world, s, progress)
            applications.build_specialists(world, progress)
        target = SHIPPED / f"toy-{s.world_settings.key()}"
        toy.ship_world(world, target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        console.print(f"shipped {target} ({size / 2**20:.1f} MiB): {toy.world_summary(world)}")


if __name__ == "__main__":
    main()
