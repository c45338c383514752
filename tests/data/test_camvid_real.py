"""The real CamVid copy in shared/ (skipped where it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trustseg.data.spec import load_dataset

CAMVID = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"
if not CAMVID.is_dir():
    CAMVID = Path("/work/shared/data/camvid")

pytestmark = pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason=f"CamVid not present at {CAMVID}")


def test_split_sizes_and_sample_format():
    train = load_dataset(f"camvid:{CAMVID}")
    val = load_dataset(f"camvid:{CAMVID}#split=val")
    assert (len(train), len(val)) == (367, 101)
    assert train.classes.num_classes == 11
    for ds in (train, val):
        sample = ds[len(ds) // 2]
        assert sample["image"].shape == (3, 360, 480) and sample["image"].dtype == torch.uint8
        assert sample["mask"].shape == (360, 480) and sample["mask"].dtype == torch.int64
    assert not {Path(p).name for p, _ in train.pairs} & {Path(p).name for p, _ in val.pairs}


def test_val_labels_are_classes_or_ignore():
    val = load_dataset(f"camvid:{CAMVID}#split=val,cache=true")
    counts = sum(np.bincount(val[i]["mask"].numpy().ravel(), minlength=256) for i in range(len(val)))
    seen = set(np.flatnonzero(counts).tolist())
    assert seen <= set(range(11)) | {255}
    assert 255 in seen and len(seen) == 12  # every class and void occur in val (README histogram)
