"""oprd.files: the output-folder guard never deletes what is not ours, one writer holds a folder
at a time, atomic writes leave nothing half-written, get the umask's permissions and report a full
disk as such."""

import errno
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from oprd.files import (
    DiskFullError,
    FolderInUse,
    check_output_dir,
    held_folder,
    lock_file,
    prepare_output_dir,
    remove_leftovers,
    write_dir_atomically,
    write_file_atomically,
)

OURS = ("config.yaml", "metrics.jsonl", "checkpoints")


def _run_folder(path):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("seed: 0\n")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "checkpoints").mkdir()
    return path


def test_an_empty_or_missing_folder_is_always_fine(tmp_path):
    assert not check_output_dir(tmp_path / "new", overwrite=False, overwrite_flag="--overwrite", ours=OURS)
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty", overwrite=False, overwrite_flag="--overwrite", ours=OURS).is_dir()


def test_a_folder_with_files_is_refused_without_overwrite(tmp_path):
    run = _run_folder(tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds files.*--overwrite"):
        prepare_output_dir(run, overwrite=False, overwrite_flag="--overwrite", ours=OURS, mark="config.yaml")
    assert (run / "metrics.jsonl").exists()


def test_overwrite_replaces_a_folder_of_our_own_files(tmp_path):
    run = _run_folder(tmp_path / "run")
    prepare_output_dir(run, overwrite=True, overwrite_flag="--overwrite", ours=OURS, mark="config.yaml")
    assert run.is_dir() and list(run.iterdir()) == []


def test_overwrite_never_deletes_files_it_did_not_write(tmp_path):
    run = _run_folder(tmp_path / "run")
    (run / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write \\(thesis.tex\\)"):
        prepare_output_dir(run, overwrite=True, overwrite_flag="--overwrite", ours=OURS, mark="config.yaml")
    assert (run / "thesis.tex").read_text() == "mine" and (run / "config.yaml").exists()


def test_overwrite_needs_the_mark_of_a_finished_start(tmp_path):
    folder = tmp_path / "looks-like-a-run"
    (folder / "checkpoints").mkdir(parents=True)  # ours by name, but no config.yaml: not a run we wrote
    with pytest.raises(FileExistsError, match="no config.yaml"):
        prepare_output_dir(folder, overwrite=True, overwrite_flag="--overwrite", ours=OURS, mark="config.yaml")
    assert (folder / "checkpoints").is_dir()


@pytest.mark.parametrize("where", [".", ".."])
def test_overwrite_never_deletes_the_working_directory_or_a_parent(tmp_path, monkeypatch, where):
    inner = _run_folder(tmp_path / "outer" / "run")
    monkeypatch.chdir(inner)
    with pytest.raises(FileExistsError, match="working directory"):
        prepare_output_dir(inner / where, overwrite=True, overwrite_flag="--overwrite", ours=(*OURS, "run"),
                           mark="config.yaml" if where == "." else None)
    assert (inner / "config.yaml").exists()


def test_without_ours_overwrite_writes_beside_the_rest(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    prepare_output_dir(tmp_path, overwrite=True, overwrite_flag="--overwrite", ours=None)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_atomic_writes_follow_the_umask_and_leave_nothing_behind(tmp_path):
    old = os.umask(0o022)
    try:
        def fill(tmp):
            (tmp / "w.bin").write_bytes(b"x")
            (tmp / "w.bin").chmod(0o600)  # as safetensors leaves its files

        folder = write_dir_atomically(tmp_path / "final", fill)
        single = write_file_atomically(tmp_path / "bridge.safetensors", lambda tmp: tmp.write_bytes(b"y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "w.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE(single.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.safetensors", "final"]


def test_a_failed_write_keeps_the_previous_version(tmp_path):
    write_dir_atomically(tmp_path / "step_1", lambda tmp: (tmp / "w").write_text("old"))

    def fail(tmp):
        (tmp / "w").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_dir_atomically(tmp_path / "step_1", fail)
    assert (tmp_path / "step_1" / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128")])
def test_a_full_disk_is_named(tmp_path, error):
    def fill(tmp):
        raise error

    with pytest.raises(DiskFullError, match=f"disk holding {tmp_path} is full .*nothing already written"):
        write_dir_atomically(tmp_path / "step_2", fill)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    for name in (".step_000002.tmp-abc", ".final.tmp-x1", ".step_000004.old-123"):
        (tmp_path / name).mkdir()
    (tmp_path / ".bridge.safetensors.k2.tmp").write_text("")
    (tmp_path / "step_000002").mkdir()
    (tmp_path / ".hidden-but-mine").write_text("keep")
    removed = remove_leftovers(tmp_path)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-mine", "step_000002"]


# --------------------------------------------------------------------------- one writer per folder


def test_a_held_folder_refuses_a_second_holder_naming_the_first(tmp_path):
    folder = tmp_path / "run"
    with held_folder(folder):
        record = json.loads(lock_file(folder).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["command"]
        assert not folder.exists()  # the lock lives beside the folder, which it never creates
        with pytest.raises(FolderInUse, match=rf"{folder} is in use by pid {os.getpid()} on "), held_folder(folder):
            pass
        assert json.loads(lock_file(folder).read_text()) == record  # the refused one changed nothing
    assert not lock_file(folder).exists()  # released on the way out
    with held_folder(folder):  # and free again
        pass


def test_a_lock_held_by_another_process_is_refused_until_it_ends(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from oprd.files import held_folder\n"
                               f"with held_folder({str(folder)!r}):\n print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refusal = rf"in use by pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(FolderInUse, match=refusal), held_folder(folder):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert holder.returncode == -9 and lock_file(folder).is_file()  # killed holding it: the lock is left
    taken = []
    with held_folder(folder, warn=taken.append):  # the kernel let go of it with the process
        assert json.loads(lock_file(folder).read_text())["pid"] == os.getpid()
    assert len(taken) == 1 and f"pid {holder.pid}" in taken[0] and "no longer running" in taken[0]


def test_a_lock_left_on_another_host_is_never_taken_over(tmp_path):
    folder = tmp_path / "run"
    written = {"host": "node-7", "pid": 4242, "started": "2026-12-07T10:00:00+0000", "command": "oprd train r.yaml"}
    lock_file(folder).write_text(json.dumps(written))
    refusal = rf"pid 4242 on node-7.*delete {lock_file(folder)} and start again"
    with pytest.raises(FolderInUse, match=refusal), held_folder(folder):
        pass
    assert json.loads(lock_file(folder).read_text()) == written


def test_a_lock_naming_a_live_process_is_not_taken_over_without_its_flock(tmp_path):
    """A filesystem where flock does not reach other processes: the record still names a live
    process of this host, which is refused."""
    folder = tmp_path / "run"
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        lock_file(folder).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(FolderInUse, match=f"in use by pid {sleeper.pid}"), held_folder(folder):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
