import json
import math

import numpy as np
import pytest
import torch
import yaml

from trustseg.data.base import ClassInfo
from trustseg.errors import UserError
from trustseg.engine.rundir import RunDir
from trustseg.report.visualize import colorize, overlay


def test_json_is_strict_with_nan_as_null(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_metrics({"mIoU": 0.5, "per_class": {"IoU": [0.5, math.nan]}, "t": torch.tensor([1, 2])})
    text = run.file("metrics.json").read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"mIoU": 0.5, "per_class": {"IoU": [0.5, None]}, "t": [1, 2]}


def test_config_yaml_round_trips(tmp_path):
    run = RunDir(tmp_path)
    run.write_config({"command": "eval", "crop": (512, 512)})
    assert yaml.safe_load(run.file("config.yaml").read_text()) == {"command": "eval", "crop": [512, 512]}


def test_out_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        RunDir(tmp_path / "file")


def test_colorize_and_overlay():
    classes = ClassInfo(names=("a", "b"), palette=((10, 20, 30), (200, 100, 0)))
    mask = torch.tensor([[0, 1], [255, 7]])
    colours = colorize(mask, classes)
    assert colours.tolist() == [[[10, 20, 30], [200, 100, 0]], [[0, 0, 0], [0, 0, 0]]]
    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    blended = overlay(image, colours, alpha=0.5)
    assert blended.dtype == np.uint8 and blended[0, 1].tolist() == [150, 100, 50]
