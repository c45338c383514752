"""The finished units of a long command (a condition, an image, a fitted calibrator), recorded durably
so that an interrupted run continues where it stopped (`--resume`) and ends with the results of an
uninterrupted one.

OUT/progress.jsonl holds a header line (the command and the setup its results depend on), then one
line per finished unit, each appended, flushed and synced to disk before the command moves on. A kill
can tear only the last line: resuming drops it and does that unit again. Each line carries the CRC-32
of its content, so a line damaged on disk is refused rather than trusted. A unit's value is kept as it
reads back from JSON, in the run that records it too, so a resumed run computes from exactly the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from trustseg.engine.checkpoint import atomic_write
from trustseg.engine.distributed import broadcast_from_main, is_main_process
from trustseg.engine.rundir import RunDir, to_plain
from trustseg.errors import UserError

JOURNAL = "progress.jsonl"


def file_sha256(path: str | Path) -> str:
    """The content hash of a file (a checkpoint): a resumed run must use the very same weights."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def as_read_back(value: Any) -> Any:
    """`value` as JSON gives it back (tuples as lists, NaN as None)."""
    return json.loads(json.dumps(to_plain(value), allow_nan=False))


class Journal:
    """The finished units of one command in `run_dir`: `done` maps each unit's name to its value.

    A fresh run refuses a folder that already holds units (nothing finished is overwritten), and
    `resume=True` refuses one whose setup differs. Only the main process reads and writes the file;
    the others receive the finished units from it.
    """

    def __init__(self, run_dir: RunDir, command: str, setup: dict[str, Any], *, resume: bool) -> None:
        self.run_dir, self.command, self.setup = run_dir, command, as_read_back(setup)
        self.path = run_dir.file(JOURNAL)
        outcome = self._open(resume) if is_main_process() else None
        outcome = broadcast_from_main(outcome)
        if isinstance(outcome, str):
            raise UserError(outcome)
        self.done: dict[str, Any] = outcome
        self.resumed = bool(self.done)

    def _open(self, resume: bool) -> dict[str, Any] | str:
        """The finished units (a fresh journal when there is none, or none finished in it), or why this
        run may not go on."""
        if self.path.exists():
            try:
                lines = self._complete_lines()
                header, units = _record(lines[0]), [_record(line) for line in lines[1:]]
                done = {str(unit["unit"]): unit["value"] for unit in units}
                if not {"command", "setup"} <= header.keys():
                    raise KeyError("header")
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
                return f"{self.path} is damaged; use another --out (its finished results cannot be trusted)"
            if done:
                return self._check(header, done, resume)
        header = _line({"command": self.command, "setup": self.setup})  # nothing finished: nothing to keep
        atomic_write(self.path, lambda handle: handle.write(header.encode()))
        return {}

    def _check(self, header: dict[str, Any], done: dict[str, Any], resume: bool) -> dict[str, Any] | str:
        """`done`, if this run may continue the one that finished them; else why not."""
        if header.get("command") != self.command:
            return (f"--out {self.run_dir.path} holds a trustseg {header.get('command')} run; use another --out "
                    f"for {self.command}")
        if not resume:
            return (f"--out {self.run_dir.path} already holds a {self.command} run ({len(done)} finished units in "
                    f"{JOURNAL}); pass --resume to continue it, or use another --out")
        if header.get("setup") != self.setup:
            return (f"--resume: the setup differs from the interrupted run's in {self.run_dir.path} "
                    f"({_differences(header.get('setup') or {}, self.setup)}); resume with the same settings or "
                    "use another --out")
        return done

    def _complete_lines(self) -> list[str]:
        """The file's lines; a torn last line (no newline: the run was killed while writing it) is cut off."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
        return data[:end].decode().splitlines()

    def announce(self, units: list[str], noun: str) -> list[str]:
        """The `units` still to do, after one line on what a resumed run skips and what remains."""
        todo = [unit for unit in units if unit not in self.done]
        if self.resumed and is_main_process():
            Console(stderr=True).print(f"resuming {self.run_dir.path}: {len(units) - len(todo)} of {len(units)} "
                                       f"{noun} already done and skipped, {len(todo)} to go", highlight=False, soft_wrap=True)
        return todo

    def record(self, unit: str, value: Any) -> Any:
        """Append finished `unit` durably (main process) and return its value as read back from JSON."""
        value = as_read_back(value)
        if is_main_process():
            line = _line({"unit": unit, "value": value})
            try:
                with open(self.path, "ab") as handle:
                    handle.write(line.encode())
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as error:
                raise UserError(f"cannot record {unit} in {self.path}: {error.strerror or error}; the units finished "
                                "before it are kept (continue with --resume)") from None
        self.done[unit] = value
        return value


def _line(record: dict[str, Any]) -> str:
    """One journal line: the record and the CRC-32 of its canonical JSON, so a damaged line is noticed."""
    return json.dumps({**record, "crc": _crc(record)}, allow_nan=False) + "\n"


def _record(line: str) -> dict[str, Any]:
    """A journal line read back; ValueError (or a TypeError of a foreign shape) when damaged."""
    record = json.loads(line)
    if record.pop("crc") != _crc(record):
        raise ValueError("CRC mismatch")
    return record


def _crc(record: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(record, sort_keys=True, allow_nan=False).encode())


class _Absent:
    """A key one setup has and the other lacks."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def _differences(before: dict[str, Any], now: dict[str, Any], shown: int = 3) -> str:
    found = list(_differing_leaves(before, now, ""))
    parts = [f"{path}: {_short(old)} -> {_short(new)}" for path, old, new in found[:shown]]
    return "; ".join(parts) + (f"; and {len(found) - shown} more" if len(found) > shown else "")


def _differing_leaves(before: Any, now: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, before, now) where two setups differ, as deep as both are dicts or lists of one length, so
    a message names e.g. `adaptations[0].lr` rather than the whole list."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in dict.fromkeys([*before, *now]):
            yield from _differing_leaves(before.get(key, ABSENT), now.get(key, ABSENT),
                                         f"{path}.{key}" if path else key)
    elif isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        for index, (old, new) in enumerate(zip(before, now)):
            yield from _differing_leaves(old, new, f"{path}[{index}]")
    elif before != now:
        yield path, before, now


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
