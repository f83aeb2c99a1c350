"""Writing files so that a crash never leaves a half-written one, and claiming output folders
without ever deleting what is not ours.

  write_dir_atomically    fill a hidden temporary folder, then rename it into place (or, when
                          several processes fill it: new_temporary_dir, then publish_dir)
  write_file_atomically   write a hidden temporary file beside the target, then rename it
  remove_leftovers        the temporary folders and files a killed process left behind
  check_output_dir        may a command use this folder? (checks only, changes nothing)
  prepare_output_dir      check, then empty it (when it is ours and may be replaced) and create it
  refuse_existing_file    the same rule for a single output file
  held_folder             one writer per output folder: a lock beside it for as long as a command runs
  JsonFile                a JSON record written atomically, and this process's copy of it

Written files and folders get the permissions the user's umask gives new files (mkstemp,
mkdtemp and some writers would make them private), and are flushed to disk (fsync), with the folder that holds
them, before the rename that publishes them: after a power cut the renamed file is complete.
A full disk is reported as such (`DiskFullError`), with the folder and the space left.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import functools
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

TEMPORARY = (".*.tmp-*", ".*.old-*", ".*.tmp")  # names our atomic writes use before the rename


class DiskFullError(OSError):
    """The disk filled up while writing; nothing already written was touched."""


def write_dir_atomically(target: Path, fill: Callable[[Path], object]) -> Path:
    """Calls `fill(tmp_dir)`, flushes what it wrote, then renames tmp_dir to `target` (replacing
    an older one)."""
    tmp = new_temporary_dir(target)
    try:
        fill(tmp)
        publish_dir(tmp, target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(error, target)
        raise
    return target


def new_temporary_dir(target: Path) -> Path:
    """A hidden, empty folder beside `target` to fill before `publish_dir` (with the umask's permissions)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(tmp: Path, target: Path) -> Path:
    """Flushes everything in `tmp` to disk and renames it to `target`, replacing an older one."""
    target = Path(target)
    try:
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException as error:
        raise_if_disk_full(error, target)
        raise
    return target


def write_file_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """Calls `write(tmp_file)` on a hidden file beside `target`, flushes it, then renames it to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(error, target)
        raise
    return target


def write_text_atomically(target: Path, text: str) -> Path:
    return write_file_atomically(target, lambda tmp: tmp.write_text(text))


class JsonFile:
    """A JSON object in a file, written atomically (run.json, gates.json). `read` loads it once and
    then returns this process's copy, which the caller may change in place and `write` back."""

    def __init__(self, path: Path, empty: Callable[[], dict]):
        self.path, self._empty, self._record = Path(path), empty, None

    def read(self) -> dict:
        if self._record is None:
            try:
                self._record = json.loads(self.path.read_text()) if self.path.is_file() else self._empty()
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path} is not valid JSON ({error.msg}, line {error.lineno}): fix or remove "
                                 "it") from None
        return self._record

    def write(self, record: dict | None = None) -> None:
        """Writes `record` (by default this process's copy, as changed) to the file."""
        self._record = self.read() if record is None else record
        write_text_atomically(self.path, json.dumps(self._record, indent=2))


def remove_leftovers(folder: Path) -> list[Path]:
    """Removes the hidden temporary folders and files that an interrupted atomic write left in
    `folder` (never anything else); returns what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if any(fnmatch.fnmatch(entry.name, pattern) for pattern in TEMPORARY):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def check_output_dir(path: Path, *, overwrite: bool, overwrite_flag: str, ours: Sequence[str] | None,
                     mark: str | None = None, other_options: str = "") -> bool:
    """Whether a command may use `path`; changes nothing. Returns True when the folder holds files
    that must be removed before use.

    An empty or missing folder is always fine. A folder that holds files is refused unless
    `overwrite`. With `ours=None` the command then writes its files into the folder beside the
    rest. Otherwise the folder is to be replaced, which is allowed only when every entry in it
    matches a pattern of `ours` (the files the command itself writes), it holds `mark` (a file the
    command always writes first) and it is neither the working directory nor a folder above it: a
    folder with anything else in it is never deleted.
    """
    path = Path(path)
    if not (path.is_dir() and any(path.iterdir())):
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file, not a folder: choose another folder")
        return False
    if not overwrite:
        raise FileExistsError(f"{path} already holds files. {other_options}Pass {overwrite_flag} to replace them, "
                              "or choose another folder.")
    if ours is None:
        return False
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise FileExistsError(f"{overwrite_flag} would delete {path}, which is the working directory or holds it: "
                              "choose another folder")
    foreign = sorted(entry.name for entry in path.iterdir()
                     if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in (*ours, *TEMPORARY)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds files this command did not write ({shown}), so {overwrite_flag} will "
                              "not delete it: move them, or choose another folder")
    if mark is not None and not (path / mark).exists():
        raise FileExistsError(f"{path} does not hold a finished start of this command (no {mark}), so "
                              f"{overwrite_flag} will not delete it: empty it yourself, or choose another folder")
    return True


def open_output_dir(path: Path, *, replace: bool) -> Path:
    """Creates the folder, first deleting it when `replace` (which `check_output_dir` allowed)."""
    if replace:
        shutil.rmtree(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def prepare_output_dir(path: Path, *, overwrite: bool, overwrite_flag: str, ours: Sequence[str] | None,
                       mark: str | None = None) -> Path:
    """`check_output_dir`, then `open_output_dir`: for commands with no checks of their own to run
    in between."""
    replace = check_output_dir(path, overwrite=overwrite, overwrite_flag=overwrite_flag, ours=ours, mark=mark)
    return open_output_dir(path, replace=replace)


def refuse_existing_file(path: Path, *, overwrite: bool, overwrite_flag: str) -> None:
    """Raises FileExistsError when `path` exists and `overwrite` was not given."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass {overwrite_flag} to replace it, or choose another path.")


LOCK_SUFFIX = ".oprd-lock"


class FolderInUse(FileExistsError):
    """Another oprd command holds the output folder (or may: a lock left on another host)."""


def lock_file(folder: Path) -> Path:
    """Where the lock of `folder` lives: beside it, so that neither replacing the folder nor
    checking what it holds ever meets the lock."""
    folder = Path(folder).absolute()
    return folder.parent / f"{folder.name}{LOCK_SUFFIX}"


@contextmanager
def held_folder(folder: Path, warn: Callable[[str], object] = print) -> Iterator[None]:
    """Holds `folder` for this process until the block ends, or raises FolderInUse before anything
    is touched. The lock is a file beside the folder naming the host, pid, start time and command,
    held with flock, which the kernel releases when the process dies however it dies: a lock
    whose holder is gone is taken over (with a `warn`ing naming it), unless it was written on
    another host, whose processes this one cannot see (the message says how to remove it)."""
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _take_lock(path, Path(folder), warn)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: nobody can take a lock that is on its way out
        os.close(descriptor)


def holding_out(command: Callable) -> Callable:
    """`command(settings, ...)` run holding `settings.out` (`held_folder`) from its first check to its
    end: for the commands that write a folder of results (eval, bench, the demos)."""

    @functools.wraps(command)
    def held(settings, *args, **kwargs):
        with held_folder(Path(settings.out)):
            return command(settings, *args, **kwargs)

    return held


def _take_lock(path: Path, folder: Path, warn: Callable[[str], object]) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise FolderInUse(f"{folder} is in use by {holder} (lock {path}): wait for that run to end, or choose "
                              "another folder") from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(descriptor)  # its holder ended and removed it between our open and our flock: open it again
    previous = _lock_record(descriptor)
    if previous:
        if previous.get("host") != socket.gethostname():
            os.close(descriptor)
            raise FolderInUse(f"{folder} was claimed by {_describe(previous)}, a host this one cannot check (lock "
                              f"{path}). Once that run is known to have ended, delete {path} and start again.")
        if previous.get("pid") != os.getpid() and _alive(previous.get("pid")):
            os.close(descriptor)  # alive but not holding the flock: a filesystem without working locks
            raise FolderInUse(f"{folder} is in use by {_describe(previous)} (lock {path}): wait for that run to "
                              "end, or choose another folder")
        warn(f"took over {path}: its holder, {_describe(previous)}, is no longer running")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": shlex.join(sys.argv)}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)
    os.fsync(descriptor)
    return descriptor


def _lock_record(descriptor: int) -> dict:
    try:
        return json.loads(os.pread(descriptor, 1 << 16, 0) or b"{}")
    except json.JSONDecodeError:
        return {"host": socket.gethostname(), "pid": None}  # torn by a holder killed mid-write: this host's


def _lock_holder(descriptor: int) -> str:
    record = _lock_record(descriptor)
    return _describe(record) if record else "another process (starting: its lock is not written yet)"


def _describe(record: dict) -> str:
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started', 'at an unknown time')}"
            f" ({record.get('command', 'command unknown')})")


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, however the writer reported it: torch.save's zip writer says only "unexpected pos"
    when a write comes up short, and safetensors wraps the OS error in its own."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "unexpected pos" in text or "Disk quota exceeded" in text


def raise_if_disk_full(error: BaseException, target: Path) -> None:
    """Raises DiskFullError (naming the folder and the space left) when `error` says the disk is full."""
    if not isinstance(error, Exception) or isinstance(error, DiskFullError) or not is_disk_full(error):
        return
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    raise DiskFullError(errno.ENOSPC, f"the disk holding {target.parent} is full ({free}) while writing "
                                      f"{target.name}; nothing already written was touched. Free some space "
                                      "and run the same command again") from error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flushes every file and folder under `folder`, giving each the umask's permissions (some
    writers, safetensors among them, create private files)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~mask)
            _fsync(Path(root) / name)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        _fsync(Path(root))
