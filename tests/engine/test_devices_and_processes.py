"""--device: resolution (auto, cpu, cuda[:N], torchrun's LOCAL_RANK), autocast by device type, clear
errors when CUDA is absent, and sharded evaluation under torchrun with rank 0 writing alone."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import THREE_CLASSES, folder_tree, run_cli, save_tiny_unet
from trustseg.engine.devices import autocast, loader_options, resolve_device, to_device
from trustseg.engine.distributed import backend_for
from trustseg.errors import UserError
from trustseg.training.config import config_from_dict

CUDA = torch.cuda.is_available()


@pytest.fixture()
def fake_cuda(monkeypatch):
    """Pretend two GPUs exist, to check how names resolve (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def single_process(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_auto_is_the_cpu_without_cuda(no_cuda, single_process):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "auto"])
def test_cuda_names_resolve_to_an_indexed_device(fake_cuda, single_process, name):
    assert resolve_device(name) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_under_torchrun_each_process_takes_its_local_rank(fake_cuda, monkeypatch, name):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(name) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="cuda:LOCAL_RANK"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("name, message", [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
                                           ("gpu", "expected auto, cpu, cuda or cuda:N"),
                                           ("cuda:x", "expected auto, cpu, cuda or cuda:N")])
def test_bad_devices_are_user_errors(no_cuda, single_process, name, message):
    with pytest.raises(UserError, match=message):
        resolve_device(name)


def test_a_missing_gpu_index_names_the_ones_there(fake_cuda, single_process):
    with pytest.raises(UserError, match=r"2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_autocast_follows_the_device_type():
    layer = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), bf16=True):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu")):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(UserError, match="fp16 autocast needs a CUDA device"):
        autocast(torch.device("cpu"), fp16=True)
    with pytest.raises(UserError, match="exclusive"):
        autocast(torch.device("cpu"), bf16=True, fp16=True)


def test_backend_and_loader_follow_the_device():
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert loader_options(torch.device("cpu")) == {"pin_memory": False}
    assert loader_options(torch.device("cuda", 0)) == {"pin_memory": True}
    batch = {"image": torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "mask": None, "path": ["a"]}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["image"].device.type == "cpu" and moved["mask"] is None and moved["path"] == ["a"]


def test_training_config_refuses_two_autocast_dtypes_and_fp16_on_the_cpu(tmp_path, single_process, no_cuda):
    from trustseg.training.loop import train

    with pytest.raises(UserError, match="one autocast dtype"):
        config_from_dict({"steps": 1, "bf16": True, "fp16": True})
    config = config_from_dict({"steps": 1, "fp16": True, "device": "cpu", "out": str(tmp_path / "run"),
                               "data": {"train": "synthetic#num_images=4,size=32", "crop": [32, 32]}})
    with pytest.raises(UserError, match="fp16 autocast needs a CUDA device"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.fixture()
def tiny_folder(tmp_path):
    root = folder_tree(tmp_path / "data")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    checkpoint = tmp_path / "tiny.pt"
    save_tiny_unet(checkpoint, THREE_CLASSES)
    return root, checkpoint


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "predict", "robustness", "calibrate", "train"])
def test_cli_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, tiny_folder, monkeypatch, capsys, command):
    root, checkpoint = tiny_folder
    args = {"eval": ["eval", "--checkpoint", str(checkpoint), "--data", f"folder:{root}"],
            "calibrate": ["calibrate", "--checkpoint", str(checkpoint), "--fit-data", f"folder:{root}#images=0:3",
                          "--data", f"folder:{root}#images=3:", "--method", "ts"],
            "predict": ["predict", "--checkpoint", str(checkpoint), "--input", str(root / "images")],
            "robustness": ["robustness", "--checkpoint", str(checkpoint), "--data", f"folder:{root}",
                           "--corruptions", "fog", "--severities", "1"],
            "train": ["train", "--data", f"folder:{root}", "--set", "steps=1", "--set", "data.crop=[32,32]"]}[command]
    status = run_cli([*args, "--out", str(tmp_path / "out"), "--device", "cuda", "--no-progress"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 2 and "CUDA is not available" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_eval_under_torchrun_shards_and_rank_0_writes_the_one_process_metrics(tmp_path, tiny_folder):
    root, checkpoint = tiny_folder
    metrics = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m"]
        done = subprocess.run([*launcher, "trustseg.cli", "eval", "--checkpoint", str(checkpoint), "--data",
                               f"folder:{root}", "--out", str(out), "--device", "cpu", "--no-progress"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("run directory") == 1  # rank 0 alone prints and writes
        metrics[procs] = json.loads((out / "metrics.json").read_text())
    one, two = metrics[1], metrics[2]
    assert one["num_images"] == two["num_images"] == 5
    for key in ("mIoU", "aAcc", "mIoU_img", "mBIoU", "ECE", "NLL", "AUROC_msp"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    assert two["per_class"]["IoU"] == pytest.approx(one["per_class"]["IoU"], abs=1e-12, nan_ok=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_eval_on_cuda_matches_the_cpu(tmp_path, tiny_folder, monkeypatch):
    root, checkpoint = tiny_folder
    metrics = {}
    for device in ("cpu", "cuda"):
        run_cli(["eval", "--checkpoint", str(checkpoint), "--data", f"folder:{root}", "--out", str(tmp_path / device),
                 "--device", device, "--no-progress"], monkeypatch)
        metrics[device] = json.loads((tmp_path / device / "metrics.json").read_text())
    assert metrics["cuda"]["mIoU"] == pytest.approx(metrics["cpu"]["mIoU"], abs=1e-3)
    assert metrics["cuda"]["ECE"] == pytest.approx(metrics["cpu"]["ECE"], abs=1e-3)
