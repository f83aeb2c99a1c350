"""Fault injection: `oprd train` killed (SIGKILL, SIGTERM) at chosen and at seeded random moments,
including in the middle of writing a checkpoint or final/, and a run whose disk fills up. Every
trial must leave no half-written checkpoint in use, and resuming must rebuild the uninterrupted
run exactly.

Each trial is one short training subprocess with a hard timeout, so a hung run fails the test
instead of stalling CI. New kinds of fault belong here."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from oprd import checkpoint

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke"
RECIPE = SMOKE / "oprd_plus_opd.yaml"
OVERRIDES = ["max_steps=4", "save_every=2"]
TRIAL_TIMEOUT_S = 180

# A training run that stops for a while in the middle of writing the folder named argv[2], after
# its files are written and before the rename that publishes it, and says so in argv[3].
CHILD = """
import sys, time
from pathlib import Path
import oprd.checkpoint as checkpoint
from oprd.config import load_config
from oprd.trainer import train

pause_in, signal_file = sys.argv[2], Path(sys.argv[3])
write = checkpoint.write_dir_atomically

def paused(target, fill):
    def fill_then_wait(tmp):
        fill(tmp)
        if target.name == pause_in:
            signal_file.write_text(str(tmp))
            time.sleep(600)
    return write(target, fill_then_wait)

checkpoint.write_dir_atomically = paused
train(load_config(sys.argv[1], sys.argv[4:]))
"""


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _start(run_dir: Path, pause_in: str = "nothing", *extra: str) -> tuple[subprocess.Popen, Path]:
    signal_file = run_dir.parent / f"{run_dir.name}.paused"
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(RECIPE), pause_in, str(signal_file), *OVERRIDES,
                                f"output_dir={run_dir}", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


def _train_in_a_fresh_process(run_dir: Path, *extra: str) -> Path:
    """Every run of these tests trains in a process of its own, as the interrupted ones do: a
    process that has changed torch's thread settings (the demo's tests do) rounds differently."""
    process, _ = _start(run_dir, "nothing", *extra)
    _, stderr = process.communicate(timeout=TRIAL_TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return run_dir


def _resume(run_dir: Path) -> Path:
    return _train_in_a_fresh_process(run_dir, "resume=true")


def _assert_same_run(got: Path, want: Path) -> None:
    rows, expected = _metrics(got), _metrics(want)
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
    process, _ = _start(run_dir)
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), process)  # training has begun
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    _stop(process, how)
    for found in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        checkpoint.check_complete(found)  # whatever was published is whole
    _assert_same_run(_resume(run_dir), uninterrupted)


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
