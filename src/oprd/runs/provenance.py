"""run.json: which code, models and data made a run, what it cost, and how each segment ended.

    {"oprd_version", "git_commit", "git_dirty", "command", "seed", "versions", "devices",
     "segments": [{start, end, exit_status, first_step, last_step}],
     "models": {role: {source, revision, weights_sha256, tokenizer_sha256, chat_template_sha256}},
     "data": {path, sha256, rows}, "cost": {sampled_tokens, teacher_tokens, wall_seconds, device_hours},
     "best": {metric, mode, step, value} (keep_best)}

A resumed run appends a segment and adds to the cost; the models and data are re-hashed and a
change is kept as the segment's own record (`segments[i].models`), so history is never rewritten.
Hashes: the bytes of every weight file (sorted by name), the tokenizer's vocabulary (token -> id)
and its chat template; a model built from its config (`random_init`) has no weight file to hash
and records its init seed instead.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from oprd.config import TeacherSource, TrainConfig, config_yaml
from oprd.files import JsonFile

RUN_JSON = "run.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SCHEMA_KEYS = ("oprd_version", "git_commit", "command", "seed", "versions", "devices", "segments", "models", "data",
               "cost")  # the documented top-level keys (docs/ci.md)
SEGMENT_KEYS = ("start", "end", "exit_status", "first_step", "last_step")
MODEL_KEYS = ("source", "revision", "weights_sha256", "tokenizer_sha256", "chat_template_sha256")
COST_KEYS = ("sampled_tokens", "teacher_tokens", "wall_seconds", "device_hours")
# The run's wall seconds by phase, which together make up wall_seconds: loading and checking before
# step 1; each step's sampling, teacher, weight sync, update and validation; writing its metrics;
# the checkpoints; final/ and best/.
PHASE_KEYS = ("setup_seconds", "sample_seconds", "teacher_seconds", "weight_sync_seconds", "update_seconds",
              "validate_seconds", "record_seconds", "checkpoint_seconds", "export_seconds")
STEP_KEYS = ("sampled_tokens", "teacher_tokens", "sample_seconds", "teacher_seconds", "weight_sync_seconds",
             "update_seconds", "validate_seconds")  # what `add_step` sums


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def sha256_of_files(paths: list[Path]) -> str:
    """One digest of the files' names and bytes, in name order (a changed, added or renamed file changes it)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_of_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def model_folder(source: str, revision: str | None) -> tuple[Path | None, str | None]:
    """The local folder of a model (a path, or the hub cache's snapshot) and its resolved revision
    (the snapshot's commit for a hub model; None for a local folder)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser(), None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # not in the cache: the model was loaded some other way (e.g. a custom loader)
        return None, revision
    return folder, folder.name


def model_record(spec, tokenizer) -> dict:
    """{source, revision, weights_sha256, tokenizer_sha256, chat_template_sha256} of a model spec
    (models.ModelSpec) and its loaded tokenizer."""
    folder, revision = model_folder(spec.model, spec.revision)
    weights = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder is not None else []
    record = {
        "source": spec.model,
        "revision": revision,
        "weights_sha256": sha256_of_files(weights) if weights and not spec.random_init else None,
        "tokenizer_sha256": sha256_of_text(json.dumps(sorted(tokenizer.get_vocab().items()))),
        "chat_template_sha256": sha256_of_text(getattr(tokenizer, "chat_template", None)),
    }
    if spec.random_init:
        record["random_init_seed"] = spec.init_seed
    return record


def data_record(path: str, rows: int) -> dict:
    """{path, sha256, rows}: the file's digest (None for a hub dataset or a shipped benchmark name)."""
    local = Path(path)
    return {"path": path, "sha256": sha256_of_files([local]) if local.is_file() else None, "rows": rows}


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout oprd runs from; (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def command_line() -> list[str]:
    """The command as the user typed it: `oprd ...` for the console script or `python -m oprd`."""
    program = Path(sys.argv[0]).name
    return ["oprd" if program in ("oprd", "__main__.py") else sys.argv[0], *sys.argv[1:]]


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("oprd", "transformers", "vllm", "safetensors"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def devices(device: torch.device, world_size: int) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"type": device.type, "name": name, "count": world_size}


class RunJson:
    """run.json of one run folder, written atomically by the main process: at the start and end of
    a segment and whenever a checkpoint or `best/` is written. The cost of each step is added to
    this process's copy and reaches the file with the next write (metrics.jsonl has it at once)."""

    def __init__(self, run_dir: Path):
        self.file = JsonFile(Path(run_dir) / RUN_JSON, dict)
        self.segment_cost: dict[str, float] = {}  # what this segment added to each cost key
        self._clock: tuple[float, dict[str, float], int] | None = None  # the segment's start, the earlier ones' cost

    def read(self) -> dict:
        return self.file.read()

    def write(self) -> None:
        """The record as it stands, wall_seconds and device_hours up to now."""
        if self._clock is not None:
            started, before, world_size = self._clock
            wall = time.perf_counter() - started
            self.read()["cost"].update(wall_seconds=before["wall_seconds"] + wall,
                                       device_hours=before["device_hours"] + wall * world_size / 3600)
        self.file.write()

    def start_segment(self, *, seed: int, device: torch.device, world_size: int, first_step: int,
                      models: dict[str, dict], data: dict, started: float) -> None:
        """A fresh run's record, or a resumed run's next segment (its models and data recorded with
        it), whose wall time counts from `started` (time.perf_counter(), when the command began)."""
        record = self.read()
        commit, dirty = git_state()
        segment = {"start": now(), "end": None, "exit_status": "running", "first_step": first_step + 1,
                   "last_step": first_step, "command": command_line(), "git_commit": commit, "git_dirty": dirty}
        if not record:
            record = {"oprd_version": versions()["oprd"], "git_commit": commit, "git_dirty": dirty,
                      "command": " ".join(command_line()), "seed": seed, "versions": versions(),
                      "devices": devices(device, world_size), "segments": [], "models": models, "data": data,
                      "cost": dict.fromkeys((*COST_KEYS, *PHASE_KEYS), 0) | {"peak_memory_gb": 0.0}}
        elif models != record["models"] or data != record["data"]:
            segment.update(models=models, data=data)  # what this segment read, where it differs from the start
        record["segments"].append(segment)
        self._clock = (started, {key: record["cost"].get(key, 0) for key in ("wall_seconds", "device_hours")},
                       world_size)
        self.file.write(record)

    def add_step(self, step: int, cost: dict[str, float]) -> None:
        """One step's cost (STEP_KEYS, summed; peak_memory_gb, the maximum) added to the run's, and
        the segment's last step; written with the next `write`."""
        record = self.read()
        for key in STEP_KEYS:
            self.add_seconds(key, cost[key])
        record["cost"]["peak_memory_gb"] = max(record["cost"]["peak_memory_gb"], cost["peak_memory_gb"])
        record["segments"][-1]["last_step"] = step

    def add_seconds(self, key: str, seconds: float) -> None:
        """Adds to one cost key (a phase's seconds, or tokens), written with the next `write`."""
        cost = self.read()["cost"]
        cost[key] = cost.get(key, 0) + seconds  # .get: a run begun before the key existed
        self.segment_cost[key] = self.segment_cost.get(key, 0) + seconds

    def end_segment(self, exit_status: str) -> None:
        record = self.read()
        if record:
            record["segments"][-1].update(end=now(), exit_status=exit_status)
            self.write()

    def set(self, key: str, value) -> None:
        self.read()[key] = value
        self.write()


def model_card(cfg: TrainConfig, record: dict, teachers: dict[str, str], metrics: list[dict],
               weights_dtype: str) -> str:
    """A short model card (the README.md of an HF model folder): the student it started from, its
    teachers, data and objective, the last value of every loss and validation metric, the cost and
    the recipe. `record`: the run's run.json; `metrics`: metrics.jsonl's rows; `weights_dtype`: the
    folder's weights' dtype."""
    last = {key: value for row in metrics for key, value in row.items()
            if key.startswith("val/") or key in ("loss", "rep/cosine_similarity", "opd/kl_estimate")}
    cost = record.get("cost") or {}
    data = record.get("data") or {}
    lines = [
        "---", "library_name: transformers", "tags: [oprd, distillation, on-policy-distillation]", "---", "",
        f"# Distilled from {', '.join(teachers.values())}", "",
        f"Trained by oprd {record.get('oprd_version') or ''} (commit {record.get('git_commit') or 'unknown'}) "
        f"from `{cfg.student.model}` by on-policy distillation.", "",
        *(f"- teacher {name}: `{source}`" for name, source in teachers.items()),
        f"- data: `{cfg.data.path}`, {data.get('rows', '?')} prompts (sha256 {data.get('sha256') or 'n/a'})",
        f"- objective: opd.objective={cfg.opd.objective}, oprd.coef={cfg.oprd.coef}; {cfg.max_steps} steps",
        f"- weights: {weights_dtype} (export_dtype={cfg.export_dtype}; training kept float32 master weights "
        "unless student.dtype said otherwise)",
        f"- cost: {cost.get('sampled_tokens', 0):,.0f} tokens sampled, {cost.get('teacher_tokens', 0):,.0f} read "
        f"by the teachers, {cost.get('wall_seconds', 0):,.0f} s, {cost.get('device_hours', 0):.3f} device-hours",
        "", "## Last metrics", "", *(f"- `{key}`: {value:.4g}" for key, value in sorted(last.items())), "",
        "## Recipe", "", "```yaml", config_yaml(cfg).rstrip(), "```", "",
    ]
    return "\n".join(lines)


def models_record(cfg: TrainConfig, sources: list[TeacherSource], student_tok, teacher_toks) -> dict[str, dict]:
    """run.json's `models`: the student, each teacher (a self-teacher: the student's files) and each bridge file."""
    models = {"student": model_record(cfg.student, student_tok)}
    for source, teacher_tok in zip(sources, teacher_toks):
        suffix = "" if len(sources) == 1 else f":{source.name}"
        models[f"teacher{suffix}"] = model_record(source.spec, teacher_tok)
        if source.self_mode is not None:
            models[f"teacher{suffix}"].update(source="self", self_mode=source.self_mode)
        if source.bridge is not None:
            models[f"bridge{suffix}"] = {"source": source.bridge, "revision": None,
                                         "weights_sha256": sha256_of_files([Path(source.bridge)]),
                                         "tokenizer_sha256": None, "chat_template_sha256": None}
    return models
