"""Fault injection: `oprd train` killed (SIGKILL, SIGTERM) at chosen and at seeded random moments,
including in the middle of writing a checkpoint or final/, and a run whose disk fills up. Every
trial must leave no half-written checkpoint in use, and resuming must rebuild the uninterrupted
run exactly.

Each trial is one short training subprocess with a hard timeout, so a hung run fails the test
instead of stalling CI. New kinds of fault belong here."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMOKE, run_metrics
from safetensors.torch import load_file

from oprd.files import lock_file
from oprd.runs import checkpoint

RECIPE = SMOKE / "oprd_plus_opd.yaml"
OVERRIDES = ["max_steps=4", "save_every=2"]
TRIAL_TIMEOUT_S = 180

# A training run that stops for a while in the middle of writing the folder named argv[2], after
# its files are written and before the rename that publishes it, and says so in argv[3]. With
# STEP_PAUSE_S set, it also waits that long after each step (numbers unchanged), so that a fault
# aimed at "during the run" lands before the run ends; with HOLD_WHILE, also for as long as that
# file exists.
CHILD = """
import os, sys, time
from pathlib import Path
import oprd.runs.checkpoint as checkpoint
import oprd.trainer as trainer
from oprd.config import load_config

pause_in, signal_file = sys.argv[2], Path(sys.argv[3])
write, record = checkpoint.write_dir_atomically, trainer.record

def paused(target, fill):
    def fill_then_wait(tmp):
        fill(tmp)
        if target.name == pause_in:
            signal_file.write_text(str(tmp))
            time.sleep(600)
    return write(target, fill_then_wait)

def slow_record(*args, **kwargs):
    recorded = record(*args, **kwargs)
    time.sleep(float(os.environ.get("STEP_PAUSE_S", "0")))
    while os.environ.get("HOLD_WHILE") and Path(os.environ["HOLD_WHILE"]).exists():
        time.sleep(0.05)
    return recorded

checkpoint.write_dir_atomically, trainer.record = paused, slow_record
trainer.train(load_config(sys.argv[1], sys.argv[4:]))
"""
STEP_PAUSE_S = "1.0"  # 4 steps: a run that trains for at least 4 s


def _start(run_dir: Path, pause_in: str = "nothing", *extra: str, step_pause_s: str = "0",
           log: Path | None = None, hold_while: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """A training subprocess (CHILD); its stdout goes to `log` where given."""
    signal_file = run_dir.parent / f"{run_dir.name}.paused"
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(RECIPE), pause_in, str(signal_file), *OVERRIDES,
                                f"output_dir={run_dir}", *extra], stderr=subprocess.PIPE,
                               stdout=log.open("w") if log else subprocess.DEVNULL,
                               env={**os.environ, "STEP_PAUSE_S": step_pause_s, "HOLD_WHILE": str(hold_while or "")})
    return process, signal_file


def _wait_for(condition, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the fault: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run did not reach the moment of the fault in time")
        time.sleep(0.05)


def _stop(process: subprocess.Popen, how: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(how)
    process.wait(timeout=TRIAL_TIMEOUT_S)


def _train_in_a_fresh_process(run_dir: Path, *extra: str, log: Path | None = None) -> Path:
    """Every run of these tests trains in a process of its own, as the interrupted ones do: a
    process that has changed torch's thread settings (the demo's tests do) rounds differently."""
    process, _ = _start(run_dir, "nothing", *extra, log=log)
    _, stderr = process.communicate(timeout=TRIAL_TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return run_dir


def _resume(run_dir: Path, log: Path | None = None) -> Path:
    return _train_in_a_fresh_process(run_dir, "resume=true", log=log)


def _assert_same_run(got: Path, want: Path) -> None:
    rows, expected = run_metrics(got), run_metrics(want)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, reference in zip(rows, expected):
        for key in ("loss", "grad_norm", "lr", "response_length/mean", "rep/loss", "opd/loss"):
            assert row[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-6), (row["step"], key)
    a, b = load_file(got / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
    leftovers = [p for folder in (got, got / "checkpoints") for p in folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _train_in_a_fresh_process(tmp_path_factory.mktemp("straight") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["step_000002", "final"])
def test_kill_9_while_writing_a_folder(folder, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process, paused = _start(run_dir, pause_in=folder)
    _wait_for(paused.exists, process)
    _stop(process, signal.SIGKILL)
    half_written = Path(paused.read_text())
    assert half_written.is_dir() and half_written.name.startswith(f".{folder}.tmp-")
    target = run_dir / "checkpoints" / folder if folder.startswith("step_") else run_dir / folder
    assert not target.exists()  # never published half-written
    _assert_same_run(_resume(run_dir), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("how, seed", [(signal.SIGTERM, 0), (signal.SIGKILL, 1)])
def test_a_signal_at_a_random_moment(how, seed, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process, _ = _start(run_dir, step_pause_s=STEP_PAUSE_S)
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), process)  # training has begun
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    assert process.poll() is None  # still training: the signal lands mid-run
    _stop(process, how)
    assert process.returncode == -how  # the signal ended it, not the end of the run
    assert not (run_dir / "final").exists() and len(run_metrics(run_dir)) < 4
    for found in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        checkpoint.check_complete(found)  # whatever was published is whole
    assert lock_file(run_dir).is_file()  # killed holding the folder: the next run takes its lock over
    log = tmp_path / "resume.log"
    _assert_same_run(_resume(run_dir, log=log), uninterrupted)
    assert f"its holder, pid {process.pid} on" in " ".join(log.read_text().split())
    assert not lock_file(run_dir).exists()


def _refusal(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`oprd train` on a folder another run holds."""
    return subprocess.Popen([sys.executable, "-m", "oprd", "train", str(RECIPE), *OVERRIDES, f"output_dir={run_dir}",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_stops_before_touching_it(tmp_path, uninterrupted):
    """While a run trains, a new run, a resume and an overwrite of its folder each stop with one
    line naming the holder, and the run ends as a run made alone."""
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()  # the run waits after its first step until the refusals are in, however slowly they start
    holder, _ = _start(run_dir, hold_while=hold)
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), holder)
    others = [_refusal(run_dir, *mode) for mode in ([], ["resume=true"], ["overwrite=true"])]
    for other in others:
        _, stderr = other.communicate(timeout=TRIAL_TIMEOUT_S)
        message = " ".join(stderr.split())
        assert other.returncode == 2 and f"{run_dir} is in use by pid {holder.pid} on" in message, message
        assert "Traceback" not in message
    assert holder.poll() is None  # the refusals came while it trained
    hold.unlink()
    _, stderr = holder.communicate(timeout=TRIAL_TIMEOUT_S)
    assert holder.returncode == 0, stderr.decode()[-3000:]
    _assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_folder(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    pair = [_start(run_dir, step_pause_s=STEP_PAUSE_S)[0] for _ in range(2)]
    outcomes = [(process, process.communicate(timeout=TRIAL_TIMEOUT_S)[1].decode()) for process in pair]
    trained = [process for process, _ in outcomes if process.returncode == 0]
    refused = [(process, stderr) for process, stderr in outcomes if process.returncode != 0]
    assert len(trained) == 1 and len(refused) == 1, [stderr[-2000:] for _, stderr in outcomes]
    assert f"is in use by pid {trained[0].pid} on" in " ".join(refused[0][1].split())
    _assert_same_run(run_dir, uninterrupted)


@pytest.fixture()
def small_disk(tmp_path):
    """A 6 MiB tmpfs: room for one checkpoint of the smoke models (3.4 MB), not for two."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'mount failed'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint(small_disk, tmp_path, uninterrupted):
    run_dir = small_disk / "run"
    result = subprocess.run([sys.executable, "-m", "oprd", "train", str(RECIPE), *OVERRIDES, f"output_dir={run_dir}"],
                            capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert f"the disk holding {run_dir / 'checkpoints'} is full" in message and "Traceback" not in message
    found = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in found] == ["step_000002"]
    checkpoint.check_complete(found[0])
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    # with space again (here: the run moved to a bigger disk), resuming finishes the same run
    moved = shutil.copytree(run_dir, tmp_path / "moved")
    _assert_same_run(_resume(moved), uninterrupted)
    assert os.path.ismount(small_disk)
