"""Atomic, resumable checkpoints.

    output_dir/checkpoints/step_000050/
        model.safetensors, config.json, tokenizer files   (a plain HF model directory)
        optimizer.pt, scheduler.pt, rng.pt                 (loaded with weights_only=True)
        trainer_state.json                                 (step, data position, Python RNG)

Each checkpoint is written to a hidden temporary folder and renamed into place
(`files.write_dir_atomically`), so a folder named `step_*` is always complete: a crash mid-save
leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from oprd.files import write_dir_atomically

PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it, the file and the fix."""


def damaged(checkpoint: Path, what: str) -> CheckpointError:
    if checkpoint.parent.name == "checkpoints" and checkpoint.name.startswith(PREFIX):
        fix = (f"Remove {checkpoint} to resume from the previous checkpoint, or pass resume_from=CHECKPOINT to "
               "choose one")
    else:
        fix = "Pass resume_from= a checkpoint of a run (RUN/checkpoints/step_N)"
    return CheckpointError(f"checkpoint {checkpoint} cannot be resumed from: {what}. {fix}.")


@contextmanager
def reading(checkpoint: Path, file: str) -> Iterator[None]:
    """Turns any failure to read `file` of `checkpoint` into a CheckpointError that says which
    file is damaged and what to do (never torch's advice to unpickle with weights_only=False)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        if isinstance(error, (FileNotFoundError, KeyError)) or "does not appear to have a file" in str(error):
            reason = "is missing or incomplete"
        elif isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            reason = "is not a file oprd wrote (it does not load safely with weights_only=True)"
        elif isinstance(error, json.JSONDecodeError):
            reason = f"is not valid JSON ({error.msg}, line {error.lineno})"
        else:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
            reason = f"is damaged ({type(error).__name__}: {detail})"
        raise damaged(checkpoint, f"{file} {reason}") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(target: Path, model: torch.nn.Module, tokenizer) -> Path:
    """A plain HF model folder (safetensors weights, config, tokenizer), written atomically:
    `AutoModelForCausalLM.from_pretrained(target)` and vLLM load it."""
    return write_dir_atomically(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"step": step, "python_random": _jsonable(random.getstate()), **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    path = write_dir_atomically(checkpoint_dir / f"{PREFIX}{step:06d}", fill)
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints of a run, oldest first (written atomically, so complete unless damaged later)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def check_complete(path: Path) -> None:
    """Raises CheckpointError when a checkpoint folder lacks a file that resuming needs."""
    needed = ["config.json", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]
    missing = [name for name in needed if not (path / name).is_file()]
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        missing.insert(1, "model.safetensors")
    if missing:
        raise damaged(path, f"it has no {', '.join(missing)} (the folder is incomplete)")


def load_training_state(path: Path, optimizer, scheduler) -> dict[str, Any]:
    """Restores optimizer, scheduler and RNG from a checkpoint; returns its trainer state (step and
    data position). Every file is read before anything is restored, and a file that cannot be read
    is named in a CheckpointError."""
    with reading(path, "trainer_state.json"):
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "data" not in state:
            raise KeyError("step")
        python_random = _tupled(state.pop("python_random"))
    loaded = {}
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        with reading(path, name):
            loaded[name] = torch.load(path / name, weights_only=True)
    with reading(path, "optimizer.pt"):
        optimizer.load_state_dict(loaded["optimizer.pt"])
    with reading(path, "scheduler.pt"):
        scheduler.load_state_dict(loaded["scheduler.pt"])
    with reading(path, "rng.pt"):
        set_rng_state(loaded["rng.pt"])
        random.setstate(python_random)
    return state


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
