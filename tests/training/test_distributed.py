import json
import os
import subprocess
import sys

import pytest
import torch

from trustseg.engine.checkpoint import load_checkpoint
from trustseg.data.spec import load_dataset
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import predictor_from_checkpoint
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.training.history import read_history

# Each process also saves the weights it validates with (and ASG's position head, which trains beside
# them), to check that they are the same everywhere.
SCRIPT = """
import itertools, json, sys
import torch
import trustseg.training.loop as loop
from trustseg.engine.distributed import rank
from trustseg.training import config_from_dict, train

calls = itertools.count()
real_validate = loop._Run._validate

def validate_and_record(run, *args, **kwargs):
    metrics = real_validate(run, *args, **kwargs)
    head = {} if run.guided is None else run.guided.position_head.state_dict(prefix="position_head.")
    torch.save({**run.model.state_dict(), **head}, f"{sys.argv[2]}/rank{rank()}_val{next(calls)}.pt")
    return metrics

loop._Run._validate = validate_and_record
train(config_from_dict(json.loads(sys.argv[1])), progress=False)
"""
GUIDED_VIT = {"model": {"name": "vit_segmenter", "options": {"backbone": "vit_ti16", "depth": 2, "pos": "none"}},
              "asg": {"enabled": True, "warmup_steps": 2}, "optim": {"lr": 0.001}}


@pytest.mark.parametrize("variant", [{}, GUIDED_VIT], ids=["unet", "vit-asg"])
def test_two_process_ddp_run_validates_like_a_single_process(tmp_path, tiny_values, variant):
    # An odd-sized val set gives the processes shards of different lengths (4 and 3 images).
    values = {**tiny_values, **variant, "steps": 4, "val_every": 2, "out": str(tmp_path / "ddp"),
              "data": {**tiny_values["data"], "val": "synthetic#split=val,size=32,num_images=7", "val_batch_size": 2}}
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), json.dumps(values), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "ddp"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]  # rank 0 only
    assert [r["step"] for r in read_history(out) if r["kind"] == "val"] == [2, 4]

    # Both processes validated with identical weights and BatchNorm statistics, at both validations.
    for call in range(2):
        weights = [torch.load(tmp_path / f"rank{r}_val{call}.pt") for r in range(2)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert any(k.startswith("position_head.") for k in weights[0]) == bool(variant)

    # The sharded, all-reduced validation equals one process evaluating the saved weights on all images.
    checkpoint = load_checkpoint(out / "last.pt")
    val = load_dataset("synthetic#split=val,size=32,num_images=7")
    single = evaluate(predictor_from_checkpoint(checkpoint), val, [ConfusionMatrix(7)], batch_size=2, progress=False)
    for key in ("mIoU", "aAcc", "mAcc", "mDice", "fwIoU"):
        assert single[key] == metrics[key], key
    iou = [None if v != v else v for v in single["per_class"]["IoU"]]  # metrics.json writes NaN as null
    assert iou == metrics["per_class"]["IoU"]
    # both processes took every step: the optimizer state counts 4 updates
    state = checkpoint.training_state["optimizer"]["state"]
    assert all(int(s["step"]) == 4 for s in state.values())
