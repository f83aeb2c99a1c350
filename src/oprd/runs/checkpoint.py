"""Atomic, resumable checkpoints.

    output_dir/checkpoints/step_000050/       one process
        model.safetensors, config.json, tokenizer files   (a plain HF model directory)
        optimizer.pt, scheduler.pt, rng.pt                 (loaded with weights_only=True)
        trainer_state.json                                 (step, data position, Python RNG)
        ema_teacher.safetensors                            (self-distillation with self_mode=ema)

    output_dir/checkpoints/step_000050/       several processes (torchrun)
        dcp/                                  model, optimizer (and EMA teacher), sharded (torch.distributed.checkpoint)
        scheduler.pt, rng-rank{r}.pt          the schedule, and each rank's RNG
        trainer_state.json                    as above, with the number of processes

Each checkpoint is written to a hidden temporary folder and renamed into place (`files`; under
several processes every rank writes into rank 0's folder, and rank 0 renames it once all have
finished), so a folder named `step_*` is always complete: a crash mid-save leaves the previous
checkpoint as the newest.
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

import safetensors.torch
import torch

from oprd import distributed
from oprd.distributed import ONE_PROCESS, World
from oprd.files import new_temporary_dir, publish_dir, raise_if_disk_full, write_dir_atomically
from oprd.config import TrainConfig
from oprd.models import DTYPES, ModelSpec, empty_model, load_model_config

PREFIX = "step_"
EMA_TEACHER = "ema_teacher.safetensors"


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


def save_model_dir(target: Path, model: torch.nn.Module, tokenizer, card: str | None = None) -> Path:
    """A plain HF model folder (safetensors weights, config, tokenizer, and `card` as its README.md
    model card), written atomically: `AutoModelForCausalLM.from_pretrained(target)` and vLLM load it."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)

    return write_dir_atomically(target, fill)


def export_model_dir(target: Path, model: torch.nn.Module, tokenizer, spec: ModelSpec, world: World,
                     dtype: torch.dtype, card: str | None = None) -> None:
    """`save_model_dir` of the student in `dtype` (final/, best/): a copy of its weights in that
    dtype (the live ones where they already are), gathered to rank 0 first when the student is
    sharded across processes (a sharded model cannot `save_pretrained` itself). Every process calls it."""
    state = distributed.full_model_state(model) if world.distributed else model.state_dict()
    if world.main:
        whole = empty_model(spec, dtype)
        whole.load_state_dict({name: tensor.detach().to(dtype) for name, tensor in state.items()}, assign=True)
        whole.tie_weights()
        whole.generation_config = model.generation_config
        save_model_dir(target, whole, tokenizer, card)
    world.barrier()


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int,
    world: World = ONE_PROCESS,
    ema_teacher: torch.nn.Module | None = None,
    sampled_ahead: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes step `step`'s checkpoint (the layout of the module notes) and keeps the newest `keep`.
    `sampled_ahead`: this process's batch of the next step, already sampled (rollout.max_weight_lag=1)
    by weights the checkpoint no longer holds, kept so a resumed run trains on the same batch."""
    state = {"step": step, "world_size": world.size, "python_random": _jsonable(random.getstate()), **trainer_state}
    target = checkpoint_dir / f"{PREFIX}{step:06d}"

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if ema_teacher is not None:
            safetensors.torch.save_model(ema_teacher, str(tmp / EMA_TEACHER))
        if sampled_ahead is not None:
            safetensors.torch.save_file(sampled_ahead, str(tmp / _sampled_ahead_file(world)))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    if world.distributed:
        _save_sharded(target, model, optimizer, scheduler, state, world, ema_teacher, sampled_ahead)
    else:
        write_dir_atomically(target, fill)
    if world.main:
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old)
    world.barrier()
    return target


def _save_sharded(target: Path, model, optimizer, scheduler, state: dict, world: World,
                  ema_teacher: torch.nn.Module | None, sampled_ahead: dict[str, torch.Tensor] | None) -> None:
    """Every rank writes its shards and its RNG into rank 0's temporary folder; rank 0 renames it
    once all have succeeded. A failure on any rank fails every rank (no rank waits forever)."""
    tmp = world.broadcast(new_temporary_dir(target) if world.main else None)
    failure = None
    try:
        distributed.save_sharded(tmp / "dcp", model, optimizer, ema_teacher)
        torch.save(rng_state(), tmp / f"rng-rank{world.rank}.pt")
        if sampled_ahead is not None:
            safetensors.torch.save_file(sampled_ahead, str(tmp / _sampled_ahead_file(world)))
        if world.main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    except Exception as error:  # reported after every rank has said how it went
        failure = error
    if world.any(failure is not None):
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise_if_disk_full(failure, target)
            raise failure
        raise RuntimeError(f"another process failed while writing checkpoint {target}; its error says why")
    if world.main:
        publish_dir(tmp, target)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints of a run, oldest first (written atomically, so complete unless damaged later)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder (`step_000050`) was written after."""
    return int(checkpoint.name[len(PREFIX):])


def check_complete(path: Path, world: World = ONE_PROCESS) -> None:
    """Raises CheckpointError when a checkpoint folder lacks a file that resuming needs, or was
    written by another number of processes than this run has."""
    sharded = (path / "dcp").is_dir()
    if sharded != world.distributed:
        written = "several processes (torchrun)" if sharded else "one process"
        raise damaged(path, f"it was written by {written} and this run has {world.size}: resume it with the number "
                            "of processes that wrote it")
    if sharded:
        needed = ["dcp/.metadata", "scheduler.pt", "trainer_state.json",
                  *(f"rng-rank{rank}.pt" for rank in range(world.size))]
    else:
        needed = ["config.json", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]
    missing = [name for name in needed if not (path / name).is_file()]
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not sharded and not any((path / name).is_file() for name in weights):
        missing.insert(1, "model.safetensors")
    if missing:
        raise damaged(path, f"it has no {', '.join(missing)} (the folder is incomplete, or was written by another "
                            "number of processes)")
    with reading(path, "trainer_state.json"):
        written_by = json.loads((path / "trainer_state.json").read_text()).get("world_size", 1)
    if written_by != world.size:
        raise damaged(path, f"it was written by {written_by} processes and this run has {world.size}: resume it with "
                            f"{written_by} (each process's share of the prompts and its sampling stream are part of "
                            "the run)")


def load_training_state(path: Path, optimizer, scheduler, model: torch.nn.Module | None = None,
                        world: World = ONE_PROCESS, ema_teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restores optimizer, scheduler, RNG (and the EMA teacher) from a checkpoint (under several
    processes also the sharded model); returns its trainer state (step and data position). Every
    file is read before anything is restored, and a file that cannot be read is named in a
    CheckpointError."""
    with reading(path, "trainer_state.json"):
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "data" not in state:
            raise KeyError("step")
        python_random = _tupled(state.pop("python_random"))
    if world.distributed:
        with reading(path, "dcp/ (the sharded model and optimizer)"):
            distributed.load_sharded(path / "dcp", model, optimizer, ema_teacher)
        rng = f"rng-rank{world.rank}.pt"
        with reading(path, "scheduler.pt"):
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        with reading(path, rng):
            set_rng_state(torch.load(path / rng, weights_only=True))
            random.setstate(python_random)
        return state
    loaded = {}
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        with reading(path, name):
            loaded[name] = torch.load(path / name, weights_only=True)
    if ema_teacher is not None:  # restored first: a damaged file leaves the rest untouched too
        with reading(path, EMA_TEACHER):
            safetensors.torch.load_model(ema_teacher, str(path / EMA_TEACHER), device=str(_device_of(ema_teacher)))
    with reading(path, "optimizer.pt"):
        optimizer.load_state_dict(loaded["optimizer.pt"])
    with reading(path, "scheduler.pt"):
        scheduler.load_state_dict(loaded["scheduler.pt"])
    with reading(path, "rng.pt"):
        set_rng_state(loaded["rng.pt"])
        random.setstate(python_random)
    return state


def _sampled_ahead_file(world: World) -> str:
    return f"sampled_ahead-rank{world.rank}.safetensors" if world.distributed else "sampled_ahead.safetensors"


def load_sampled_ahead(path: Path, world: World = ONE_PROCESS) -> dict[str, torch.Tensor] | None:
    """This process's batch of the step after the checkpoint, where it was sampled ahead (else None)."""
    file = path / _sampled_ahead_file(world)
    if not file.is_file():
        return None
    with reading(path, file.name):
        return safetensors.torch.load_file(str(file))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def export_dtype(cfg: TrainConfig) -> torch.dtype:
    """What final/ and best/ hold: `export_dtype`; auto: `student.dtype` where set, else the dtype
    the student checkpoint was published in (its config.json; the master weights are float32 only
    for training's sake), float32 where it names none."""
    if cfg.export_dtype != "auto":
        return DTYPES[cfg.export_dtype]
    if cfg.student.dtype != "auto":
        return DTYPES[cfg.student.dtype]
    published = getattr(load_model_config(cfg.student), "dtype", None)
    published = DTYPES.get(published) if isinstance(published, str) else published
    return published if published in DTYPES.values() else torch.float32
