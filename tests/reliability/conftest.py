import numpy as np
import pytest
from PIL import Image

from cli_helpers import THREE_CLASSES, folder_tree, save_tiny_unet


@pytest.fixture(autouse=True)
def reliability_tests_on_one_thread(one_thread):
    """Every test here runs on one torch thread: its tensors are tiny, and on a busy 2-core machine the
    second thread's barriers made the checkpoint fuzzers 4-6x slower (measured: 36 s -> 8 s)."""


@pytest.fixture()
def folder_data(tmp_path):
    """A `folder:` dataset of six small images whose colours carry their labels, and a tiny U-Net for it."""
    rng = np.random.default_rng(0)
    root = folder_tree(tmp_path / "data")
    for i in range(6):
        mask = np.zeros((32, 40), np.uint8)
        mask[:, 8 + i:] = 1
        mask[16:, 24:] = 2
        mask[:2] = 255
        palette = np.array(THREE_CLASSES.palette, np.uint8)
        image = palette[np.minimum(mask, 2)] // 2 + rng.integers(0, 100, (*mask.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    checkpoint = tmp_path / "model.pt"
    save_tiny_unet(checkpoint)
    return root, checkpoint


@pytest.fixture()
def robustness_args(folder_data):
    """`trustseg robustness` of the tiny U-Net on `folder_data` into `out`, over the given conditions."""
    root, checkpoint = folder_data

    def args(out, corruptions: str, severities: str, *extra: str) -> list[str]:
        return ["robustness", "--checkpoint", str(checkpoint), "--data", f"folder:{root}", "--out", str(out),
                "--corruptions", corruptions, "--severities", severities, "--no-progress", *extra]

    return args
