"""Writing files so that a crash never leaves a half-written one, and claiming output folders.

  write_dir_atomically    fill a hidden temporary folder, then rename it into place
  write_file_atomically   write a hidden temporary file beside the target, then rename it
  prepare_output_dir      a command's output folder: created, or refused when it already holds files
  refuse_existing_file    the same rule for a single output file
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_dir_atomically(target: Path, fill: Callable[[Path], object]) -> Path:
    """Calls `fill(tmp_dir)` and then renames tmp_dir to `target` (replacing an older one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_file_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """Calls `write(tmp_file)` on a hidden file beside `target`, then renames it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomically(target: Path, text: str) -> Path:
    return write_file_atomically(target, lambda tmp: tmp.write_text(text))


def prepare_output_dir(path: Path, *, overwrite: bool, overwrite_flag: str, replace: bool,
                       other_options: str = "") -> Path:
    """The folder a command writes to, created when missing.

    A folder that already holds files is never reused silently: without `overwrite` it is refused
    with a message naming `overwrite_flag` (and `other_options`, e.g. how to resume); with it, the
    folder is emptied first when `replace`, else the command writes its files into it.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} already holds files. {other_options}Pass {overwrite_flag} to replace them, "
                                  "or choose another folder.")
        if replace:
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def refuse_existing_file(path: Path, *, overwrite: bool, overwrite_flag: str) -> None:
    """Raises FileExistsError when `path` exists and `overwrite` was not given."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass {overwrite_flag} to replace it, or choose another path.")
