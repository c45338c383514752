"""Run directories (`--out DIR`): config.yaml, metrics.json, command JSON, plots, reports.

JSON is strict: NaN/inf (absent classes) are written as null, and files are replaced atomically.
One process writes a run directory at a time: the main process holds an exclusive lock on it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import socket
import sys
import time
import weakref
from pathlib import Path, PurePath
from typing import Any

import yaml

from trustseg.data.paths import inside
from trustseg.engine.checkpoint import atomic_write
from trustseg.engine.distributed import is_main_process
from trustseg.errors import UserError

LOCK = ".trustseg.lock"
log = logging.getLogger(__name__)
# directories this process holds: resolved path -> [lock file descriptor, number of RunDirs on it]
_held: dict[Path, list[int]] = {}


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples, paths, tensors and NaN -> JSON/YAML-safe builtins (NaN -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors and numpy values
        return to_plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}, since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def lock_directory(directory: Path) -> None:
    """Take the exclusive lock on `directory` for this process (re-entrant within it).

    An flock on DIR/.trustseg.lock: the kernel releases it when the holder exits or is killed, so a
    crashed run never blocks the next one; the holder's PID and command are written in the file so a
    refused command can name it. A file still naming a holder that is gone (it was killed before it
    could clear the file) is taken over with a warning.
    """
    key = directory.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    try:
        fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UserError(f"--out {directory}: cannot create its lock file ({error.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        os.close(fd)
        raise UserError(f"--out {directory} is in use by {holder}; wait for it to finish or use another "
                        "--out") from None
    left = os.pread(fd, 4096, 0).decode(errors="replace")
    if left.strip():
        log.warning("--out %s: taking over the lock left by %s, which is no longer running",
                    directory, _describe_holder(left))
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    _held[key] = [fd, 1]


def unlock_directory(key: Path) -> None:
    """Drop one hold on a locked directory; the last one clears the file and releases the lock."""
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held[key]
        os.ftruncate(held[0], 0)  # an empty lock file: released cleanly, nobody to warn about
        os.close(held[0])


class RunDir:
    """The output folder of one command; created on construction. On the main process it is locked
    for as long as this object lives (a second command on the same folder exits with an error)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {self.path}: cannot create it ({error.strerror})") from None
        if is_main_process():
            lock_directory(self.path)
            weakref.finalize(self, unlock_directory, self.path.resolve())

    def file(self, name: str | PurePath) -> Path:
        """The path of output `name` (relative, may hold subfolders); a name leaving the folder is refused."""
        return inside(self.path, name, "output")

    def write_text(self, name: str, text: str) -> Path:
        path = self.file(name)
        atomic_write(path, lambda handle: handle.write(text.encode()))
        return path

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(to_plain(data), indent=2, allow_nan=False) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def write_config(self, config: Any) -> Path:
        return self.write_text("config.yaml", yaml.safe_dump(to_plain(config), sort_keys=False))

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return self.write_json("metrics.json", metrics)
