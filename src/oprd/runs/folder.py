"""The run folder: one run holds it at a time, and it is reused only when the config says how.

  held_run_dir          output_dir's lock (`files.held_folder`), held by the main process for the whole job
  check_run_dir         whether the folder must be emptied (overwrite) and which checkpoint resumes it; changes nothing
  check_resumed_config  a resumed config may change what the run trained only where `resume_changes` names it
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from rich.console import Console

from oprd import distributed
from oprd.config import TrainConfig, read_run_config, require, trained_differences
from oprd.distributed import World
from oprd.files import FolderInUse, check_output_dir, held_folder
from oprd.runs import checkpoint
from oprd.runs.recorder import RUN_FILES, RUN_MARK, RunRecorder


@contextmanager
def held_run_dir(cfg: TrainConfig, console: Console | None) -> Iterator[None]:
    """One run per folder: the main process holds output_dir's lock (`files.held_folder`) for the
    whole job, from before the folder is checked until the run ends; refused, every process stops
    before touching anything."""
    world, _ = distributed.init(cfg.device)
    run_dir = Path(cfg.output_dir)
    with ExitStack() as held:
        refusal = None
        if world.main:
            try:
                held.enter_context(held_folder(run_dir, warn=RunRecorder(run_dir, console).warn))
            except FolderInUse as error:
                refusal = str(error)
        refusal = world.broadcast(refusal)
        if refusal:
            raise FolderInUse(refusal)
        yield


def check_run_dir(cfg: TrainConfig, world: World) -> tuple[bool, Path | None]:
    """Whether the run folder must be emptied before use (overwrite=true on an earlier run), and
    the checkpoint to resume from, if any; changes nothing. A folder that already holds files is
    never silently reused: resume=true continues the run in it, overwrite=true replaces it when it
    holds an oprd run and nothing else."""
    run_dir = Path(cfg.output_dir)
    if not (cfg.resume or cfg.resume_from):
        replace = check_output_dir(run_dir, overwrite=cfg.overwrite, overwrite_flag="overwrite=true", ours=RUN_FILES,
                                   mark=RUN_MARK, other_options="Pass resume=true to continue the run there. ")
        return replace, None
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_MARK).is_file():
        raise FileExistsError(f"resume=true, but {run_dir} holds no oprd run (no {RUN_MARK}): check output_dir")
    found = [Path(cfg.resume_from)] if cfg.resume_from else checkpoint.list_checkpoints(run_dir / "checkpoints")
    if found:
        checkpoint.check_complete(found[-1], world)
    return False, (found[-1] if found else None)


def check_resumed_config(cfg: TrainConfig, run_dir: Path, recorder: RunRecorder) -> None:
    """Refuses to resume with a config that changes what the run trained (objective, models, data,
    seed, schedule...) unless every such key is named in resume_changes; the run's config.yaml would
    otherwise describe a run that never happened."""
    recorded = run_dir / "config.yaml"
    if not recorded.is_file():
        return
    changed = trained_differences(read_run_config(recorded), cfg)
    unapproved = [key for key in changed if key not in cfg.resume_changes]
    listed = "; ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in unapproved)
    require(not unapproved,
            f"resume=true, but this config changes what the run in {run_dir} trained ({listed}). Pass "
            f"resume_changes=[{','.join(unapproved)}] to continue with the change (configs/ keeps every segment's "
            "config), or resume with the run's own values.")
    for key, (old, new) in changed.items():
        recorder.warn(f"resuming with {key} changed from {old!r} to {new!r} (resume_changes)")
