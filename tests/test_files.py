"""oprd.files: the output-folder guard never deletes what is not ours, atomic writes leave nothing
half-written, get the umask's permissions and report a full disk as such."""

import errno
import os
import stat

import pytest

from oprd.files import (
    DiskFullError,
    check_output_dir,
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
