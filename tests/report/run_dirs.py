"""Run directories for the report tests, written by the real commands on tiny data."""

import yaml

from cli_helpers import banded_folder, mixed_size_folder, run_cli, save_tiny_unet

# 32 px is the smallest side the corruptions accept
SIZES = ((32, 40), (36, 32), (32, 40), (40, 36))


def make_runs(root, monkeypatch) -> dict:
    """Two `eval --per-image` runs of different tiny models and a `robustness` run (clean + 2 corruptions
    x 2 severities) of the first, on one folder dataset; returns name -> run directory."""
    data = mixed_size_folder(root / "data", sizes=SIZES)
    runs = {}
    for seed in (0, 1):
        save_tiny_unet(root / f"model{seed}.pt", seed=seed)
        runs[f"eval{seed}"] = root / f"eval{seed}"
        assert run_cli(["eval", "--checkpoint", str(root / f"model{seed}.pt"), "--data", f"folder:{data}", "--out",
                        str(runs[f"eval{seed}"]), "--per-image", "--batch-size", "3", "--no-progress"], monkeypatch) == 0
    runs["robustness"] = root / "robustness"
    assert run_cli(["robustness", "--checkpoint", str(root / "model0.pt"), "--data", f"folder:{data}", "--out",
                    str(runs["robustness"]), "--corruptions", "gaussian_noise,contrast", "--severities", "1,3",
                    "--no-progress"], monkeypatch) == 0
    return runs


def make_command_runs(root, monkeypatch) -> dict:
    """One run directory written by each other command that reports results, on tiny data: train (a
    depth-2 ViT, which compress then reduces), info, predict, calibrate, adapt, compress, augment; returns
    name -> run directory, each holding the report.html its command wrote."""
    data = banded_folder(root / "data", 6, 32, 48)
    spec = f"folder:{data}"
    save_tiny_unet(root / "unet.pt")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 0, "batch_size": 2, "steps": 4, "val_every": 2, "log_every": 1, "device": "cpu",
        "data": {"crop": [32, 48], "val_batch_size": 2},
        "model": {"name": "vit_segmenter", "options": {"backbone": "vit_ti16", "depth": 2}},
        "optim": {"lr": 0.001},
    }))
    runs = {name: root / name for name in ("train", "info", "predict", "calibrate", "adapt", "compress", "augment")}
    commands = {
        "train": ["train", "--config", str(recipe), "--data", f"{spec}#split=train", "--out", str(runs["train"])],
        "info": ["info", "--data", spec, "--out", str(runs["info"])],
        "predict": ["predict", "--checkpoint", str(root / "unet.pt"), "--input", str(data / "images"), "--out",
                    str(runs["predict"]), "--uncertainty", "entropy"],
        "calibrate": ["calibrate", "--checkpoint", str(root / "unet.pt"), "--fit-data", f"{spec}#images=0:3", "--data",
                      f"{spec}#images=3:", "--out", str(runs["calibrate"]), "--epochs", "2", "--corruptions",
                      "gaussian_noise", "--severities", "2"],
        "adapt": ["adapt", "--checkpoint", str(root / "unet.pt"), "--data", spec, "--out", str(runs["adapt"]),
                  "--method", "tent,reliable", "--refine", "--corruptions", "gaussian_noise", "--severities", "2"],
        "compress": ["compress", "--checkpoint", str(runs["train"] / "last.pt"), "--data", spec, "--out",
                     str(runs["compress"]), "--method", "tome:r=2", "--method", "prune:flops=0.6,importance=magnitude",
                     "--corruptions", "gaussian_noise", "--severities", "1", "--latency-runs", "1"],
        "augment": ["augment", "--checkpoint", str(root / "unet.pt"), "--data", spec, "--out", str(runs["augment"]),
                    "--tau", "0.3"],
    }
    for name, args in commands.items():
        assert run_cli([*args, "--no-progress"], monkeypatch) in (0, None), name
    return runs
