"""The evaluation loop on images of mixed sizes: any batch size gives the metrics of batch size 1."""

import pytest
import torch
from cli_helpers import MIXED_SIZES, mixed_size_folder, save_tiny_unet

from trustseg.data.spec import load_dataset
from trustseg.data.transforms import collate, collate_by_size
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, Predictor
from trustseg.errors import UserError
from trustseg.metrics import BoundaryIoU, CalibrationHistogram, ConfusionMatrix, PerImageIoU


def _sample(height, width, tag):
    return {"image": torch.full((3, height, width), tag, dtype=torch.uint8),
            "mask": torch.full((height, width), tag), "path": f"{tag}.png"}


def test_collate_by_size_groups_without_losing_or_reordering_samples():
    samples = [_sample(4, 5, 0), _sample(6, 5, 1), _sample(4, 5, 2), _sample(3, 3, 3), _sample(6, 5, 4)]
    batches = collate_by_size(samples)
    assert [b["path"] for b in batches] == [["0.png", "2.png"], ["1.png", "4.png"], ["3.png"]]
    for batch in batches:
        tags = [int(p.split(".")[0]) for p in batch["path"]]
        assert batch["image"][:, 0, 0, 0].tolist() == tags and batch["mask"][:, 0, 0].tolist() == tags
    with pytest.raises(UserError, match="must have one size"):
        collate(samples)


@pytest.mark.parametrize("inference", [
    InferenceConfig(),
    InferenceConfig(short_side=10),
    InferenceConfig(mode="slide", crop=(8, 8), stride=(5, 6)),
], ids=["whole", "short-side", "slide"])
def test_metrics_of_batch_4_equal_batch_1_on_mixed_sizes(tmp_path, one_thread, inference):
    model = save_tiny_unet(tmp_path / "model.pt")
    data = load_dataset(f"folder:{mixed_size_folder(tmp_path / 'data')}")
    assert len({tuple(data[i]["image"].shape) for i in range(len(data))}) == len(set(MIXED_SIZES))
    predictor = Predictor(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), inference).eval()

    def run(batch_size):
        metrics = [ConfusionMatrix(3), PerImageIoU(3), BoundaryIoU(3), CalibrationHistogram(3)]
        return evaluate(predictor, data, metrics, batch_size=batch_size, progress=False)

    single, batched = run(1), run(4)
    assert single.keys() == batched.keys()
    # counts (confusion, boundary) are integers: equal exactly; the rest are float sums in a new order
    for key in ("mIoU", "mAcc", "aAcc", "mDice", "fwIoU", "mBIoU"):
        assert batched[key] == single[key], key
    for key in ("mIoU_img", "ECE", "NLL", "Brier"):
        assert batched[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    torch.testing.assert_close(torch.tensor(batched["per_class"]["IoU"]), torch.tensor(single["per_class"]["IoU"]),
                               rtol=0, atol=0, equal_nan=True)
