from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CAMVID_VAL = Path(__file__).parents[2].parent / "shared/data/camvid/val"


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real street scene, uint8 (H, W, 3): the first CamVid val image (360 x 480) when ../shared is there,
    else a synthetic scene of 240 x 320."""
    files = sorted(CAMVID_VAL.glob("*.png")) if CAMVID_VAL.is_dir() else []
    if files:
        return np.array(Image.open(files[0]).convert("RGB"))
    from trustseg.data.synthetic import SyntheticDataset

    return SyntheticDataset("val", num_images=1, size=(240, 320))[0]["image"].permute(1, 2, 0).numpy()
