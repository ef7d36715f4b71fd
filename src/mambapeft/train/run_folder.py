"""A run folder that never loses work: refused when it holds another run, locked while a process writes it.

    with RunFolder(out).open(config, resume=False, overwrite=False):      # after the whole run was validated
        ...                                                               # train, save, score

A fresh run into a folder that holds an earlier run's checkpoints, adapter or results is refused, naming what is there
and the two ways on (--resume, or --overwrite to replace it). A resumed run must be the same run: its config may differ
from the saved run_config.json only in fields that do not define the run (epochs, max_steps, logging, ...). The lock
file `.lock` holds the writer's PID and host; a second process is refused with the first one's PID, and a lock left by
a process that no longer runs (killed) is taken over with a note. run_config.json is written only once all of this
passed, atomically (a temporary file renamed over it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..errors import ConfigError, RunFolderError

LOCK = ".lock"
RUN_CONFIG = "run_config.json"
# what an earlier run leaves (removed by --overwrite); anything else in the folder is left alone
RUN_OUTPUTS = ("checkpoint-*", "adapter", "metrics.jsonl", "results.json", RUN_CONFIG, "runs")


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, so a kill never leaves half a file."""
    from ..outputs import replace_file

    replace_file(path, lambda tmp: tmp.write_text(text))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock file with the holder's PID and host; a dead holder's lock is taken over."""

    def __init__(self, folder: Path, what: str = "run folder"):
        self.path, self.what, self.held = Path(folder) / LOCK, what, False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self, log=print) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:                     # being written this instant, or garbage: look again
                    time.sleep(0.1)
                    if self.holder() is None:
                        self.path.unlink(missing_ok=True)
                    continue
                same_host = other.get("host") == me["host"]
                if same_host and not _alive(int(other.get("pid", -1))):
                    log(f"note: taking over the lock of {self.path.parent}: process {other.get('pid')} that held it "
                        f"since {other.get('since')} is no longer running")
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunFolderError(
                    f"another process is writing the {self.what} {self.path.parent}: PID {other.get('pid')} on "
                    f"{other.get('host')}, since {other.get('since')}. Wait for it to finish, stop it, or use another "
                    f"--output-dir" + ("" if same_host else f" (if that process is gone, delete {self.path})")
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunFolderError(f"cannot take the lock {self.path}; delete it if no process is using the folder")

    def release(self) -> None:
        if self.held:
            if (self.holder() or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def earlier_run(folder: Path) -> list[str]:
    """What an earlier run left in `folder` (empty when nothing)."""
    from .trainer import complete_checkpoints

    found = []
    checkpoints = sorted(folder.glob("checkpoint-*"))
    if checkpoints:
        complete = complete_checkpoints(folder)
        found.append(f"{len(checkpoints)} checkpoint folder(s)" + (f" (last complete: {complete[-1].name})"
                                                                  if complete else ""))
    for name in ("adapter", "results.json", "metrics.jsonl", RUN_CONFIG):
        if (folder / name).exists():
            found.append(name + ("/" if (folder / name).is_dir() else ""))
    return found


class RunFolder:
    """The output folder of one fine-tuning run (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = FolderLock(self.path)

    def open(self, config, *, resume: bool, overwrite: bool, log=print) -> RunFolder:
        """Locks the folder and readies it for `config`; on any refusal nothing in it has changed."""
        if resume and overwrite:
            raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
        self.lock.acquire(log)
        try:
            self._ready(config, resume, overwrite, log)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _ready(self, config, resume: bool, overwrite: bool, log) -> None:
        from .trainer import complete_checkpoints

        out = self.path
        if resume:
            if not complete_checkpoints(out):
                raise ConfigError(f"--resume: no complete checkpoint in {out} to resume from")
            saved_file = out / RUN_CONFIG
            if saved_file.is_file():
                try:
                    saved = json.loads(saved_file.read_text())
                except ValueError:
                    saved = None
                changed = config.differences(saved) if isinstance(saved, dict) else []
                if changed:
                    raise ConfigError(f"--resume continues the run in {out}, but this command describes another run "
                                      f"({'; '.join(changed)}). Resume with the same settings, or start this run in "
                                      f"another --output-dir (or replace that run with --overwrite)")
        else:
            found = earlier_run(out)
            if found and not overwrite:
                raise RunFolderError(
                    f"{out} holds an earlier run ({', '.join(found)}). Continue it with --resume, replace it with "
                    f"--overwrite, or choose another --output-dir")
            if found:
                log(f"--overwrite: removing the earlier run in {out} ({', '.join(found)})")
                for pattern in RUN_OUTPUTS:
                    for old in out.glob(pattern):
                        shutil.rmtree(old) if old.is_dir() else old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / RUN_CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")

    def close(self) -> None:
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
