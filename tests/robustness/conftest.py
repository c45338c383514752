from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

CAMVID_VAL = Path(__file__).parents[2].parent / "shared/data/camvid/val"


def _camvid_photos() -> list[Path]:
    return sorted(CAMVID_VAL.glob("*.png")) if CAMVID_VAL.is_dir() else []


@pytest.fixture(scope="session")
def photo_is_camvid() -> bool:
    """Whether `photo` is the real CamVid image (tolerances measured on it hold) or the synthetic fallback."""
    return bool(_camvid_photos())


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real street scene, uint8 (H, W, 3): the first CamVid val image (360 x 480) when ../shared is there,
    else a synthetic scene of 240 x 320 given camera-like blur and noise."""
    files = _camvid_photos()
    if files:
        return np.array(Image.open(files[0]).convert("RGB"))
    from trustseg.data.synthetic import SyntheticDataset

    scene = SyntheticDataset("val", num_images=1, size=(240, 320))[0]["image"].permute(1, 2, 0).numpy()
    # Camera-like: soft optics and sensor noise, so values rarely sit on exact grey levels after filtering
    # (a flat synthetic texture turns float32-vs-float64 rounding ties into systematic one-level flips).
    soft = cv2.GaussianBlur(scene.astype(np.float32), (0, 0), 1.0)
    noise = np.random.default_rng(0).normal(0, 1, soft.shape)
    return np.clip(soft + noise, 0, 255).round().astype(np.uint8)
