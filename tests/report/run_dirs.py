"""Run directories for the report tests, written by the real commands on tiny data."""

from cli_helpers import mixed_size_folder, run_cli, save_tiny_unet

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
