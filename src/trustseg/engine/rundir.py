"""Run directories (`--out DIR`): config.yaml, metrics.json, command JSON, plots, reports.

JSON is strict: NaN/inf (absent classes) are written as null, and files are replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path, PurePath
from typing import Any

import yaml

from trustseg.data.paths import inside
from trustseg.engine.checkpoint import atomic_write
from trustseg.errors import UserError


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


class RunDir:
    """The output folder of one command; created on construction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str | PurePath) -> Path:
        """The path of output `name` (relative, may hold subfolders); a name leaving the folder is refused."""
        return inside(self.path, name, "output")

    def write_json(self, name: str, data: Any) -> Path:
        path, text = self.file(name), json.dumps(to_plain(data), indent=2, allow_nan=False) + "\n"
        atomic_write(path, lambda handle: handle.write(text.encode()))
        return path

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def write_config(self, config: Any) -> Path:
        path, text = self.file("config.yaml"), yaml.safe_dump(to_plain(config), sort_keys=False)
        atomic_write(path, lambda handle: handle.write(text.encode()))
        return path

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return self.write_json("metrics.json", metrics)
