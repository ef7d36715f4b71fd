"""Outputs written whole or not at all, and output paths checked before anything is written.

    check_output_folder(path, overwrite, "--output")      # before any work: refusals change nothing on disk
    with atomic_folder(path, overwrite=True) as tmp:        # write everything into tmp ...
        model.save_pretrained(tmp)                          # ... which becomes `path` only once complete

`atomic_folder` writes into a hidden sibling (`.NAME.partial-PID`) that holds the marker file `.incomplete` until the
last file is written; the marker is then removed and the sibling renamed to NAME. With --overwrite the old folder is
moved aside only then, and deleted once the new one is in place. A kill at any point leaves either the old output or
the new one, whole (or, killed between the two renames, the new one still under its partial name and the old one
under `.NAME.old-PID`: both complete, nothing lost). Every reader (`PeftModel.from_pretrained`, model loading,
`eval`, `merge`) refuses a folder that holds the marker, naming it (`check_complete`).

Fault injection for the tests: MAMBAPEFT_KILL_AT=STEP kills the process (SIGKILL) when it reaches that write step
(`write_step`): "started", "written" (every file in the partial folder, marker still there), "moved-aside" (the old
output renamed away, the new one not yet in place); `MAMBAPEFT_KILL_AT=list` prints each step as it passes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
from pathlib import Path

from .errors import CheckpointError, ConfigError, RunFolderError

INCOMPLETE = ".incomplete"
KILL_ENV = "MAMBAPEFT_KILL_AT"
STEPS = ("started", "written", "moved-aside")


def write_step(name: str) -> None:
    """A point between two writes where the tests may kill the process (see the module docstring)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    if wanted == "list":
        print(f"write step: {name}", file=sys.stderr, flush=True)
    elif wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_complete(folder, what: str = "folder") -> None:
    """CheckpointError when `folder` is an output whose writing was stopped before it finished."""
    folder = Path(folder)
    if (folder / INCOMPLETE).exists():
        raise CheckpointError(
            f"the {what} {folder} is incomplete: the process writing it was stopped before it finished (it still "
            f"holds the marker {INCOMPLETE}). Write it again (the command that made it), and delete this folder")


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(path, option: str, *, folder: bool) -> Path:
    """ConfigError unless `path` (a folder when `folder`, else a file) can be created or replaced: not a file where a
    folder goes (or the reverse), its nearest existing parent a folder this process may write."""
    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a folder; choose a folder path")
        if not folder and path.is_dir():
            raise ConfigError(f"{option} {path} is a folder; give the path of a file to write")
    parent = nearest_existing(path if not path.exists() else path.parent)
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, so nothing can be created below it")
    for place in [parent] + ([path] if path.is_dir() else []):
        if not _can_create_in(place):
            raise ConfigError(f"{option} {path}: this process cannot write in {place} (no permission, or a read-only "
                              f"file system); choose a writable place")
    return path


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`: tried (permission bits say nothing to root, or on /proc)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mambapeft-probe-"):
            return True
    except OSError:
        return False


def check_output_folder(path, overwrite: bool, option: str = "--output") -> Path:
    """An output folder checked before any work: writable, and empty unless `overwrite` (nothing is deleted here)."""
    path = check_writable(path, option, folder=True)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunFolderError(f"{path} exists and is not empty; choose another {option} or pass --overwrite (the old "
                             f"folder is replaced only once the new one is complete)")
    return path


def _partial(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_folder(path, *, overwrite: bool = False, option: str = "--output"):
    """Yields a partial folder to write into; on success it replaces `path` (see the module docstring). On an error
    the partial folder is removed and `path` is left as it was."""
    path = check_output_folder(path, overwrite, option)
    tmp = _partial(path, "partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (tmp / INCOMPLETE).write_text("written by mambapeft; removed when the folder is complete\n")
        write_step("started")
        yield tmp
        write_step("written")
        (tmp / INCOMPLETE).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = _partial(path, "old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
        write_step("moved-aside")
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replace_file(path, write) -> None:
    """`write(tmp_path)` then a rename over `path`: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


def disk_error_message(err: OSError) -> str | None:
    """A one-paragraph message for an OSError of the disk (full, quota, read-only, permission), else None."""
    why = DISK_ERRORS.get(err.errno)
    if why is None:
        return None
    where = f" writing {err.filename}" if err.filename else ""
    return (f"{why}{where}. Nothing incomplete was left in place: outputs are written to a temporary sibling and "
            f"renamed only when complete, checkpoints are saved whole or skipped by --resume. Free space (or fix the "
            f"permissions) and run the command again (`train --resume` continues from the last complete checkpoint)")
