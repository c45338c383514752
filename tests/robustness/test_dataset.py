"""The two ways a robustness condition corrupts data agree image for image: per sample in the DataLoader
(`CorruptedDataset`, the CPU path) and per batch where the batch lies (`corrupt_batch`, the GPU path),
through the one evaluation loop, whatever the batch size."""

import pytest
import torch

from trustseg.data.base import ClassInfo
from trustseg.engine.evaluate import evaluate
from trustseg.robustness.dataset import CorruptedDataset, corrupt_batch

CLASSES = ClassInfo(names=("a", "b", "c"), palette=((0, 0, 0), (1, 1, 1), (2, 2, 2)))


class Scenes:
    """Five 40x48 images with masks."""

    classes = CLASSES

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (5, 3, 40, 48), generator=g, dtype=torch.uint8)
        self.masks = torch.randint(0, 3, (5, 40, 48), generator=g)

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int):
        return {"image": self.images[index], "mask": self.masks[index], "path": f"im{index}"}


class Recorder:
    """A stand-in predictor and accumulator: keeps every (index, image, mask) it is shown."""

    def __init__(self) -> None:
        self.seen = {}

    def transform(self, batch):
        for index, image, mask in zip(batch["index"], batch["image"], batch["mask"]):
            self.seen[index] = (image.clone(), mask.clone())
        return batch


@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "elastic_transform", "jpeg_compression"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_corruption_equals_the_per_sample_dataset(name, batch_size):
    scenes = Scenes()
    per_sample = CorruptedDataset(scenes, name, 3, seed=7)
    transform = corrupt_batch(name, 3, seed=7)
    recorder = Recorder()
    evaluate(lambda images: torch.zeros(images.shape[0], 3, *images.shape[-2:]), scenes, [],
             batch_size=batch_size, batch_transform=lambda batch: recorder.transform(transform(batch)),
             progress=False)
    assert sorted(recorder.seen) == list(range(5))
    changed = 0
    for index, (image, mask) in recorder.seen.items():
        expected = per_sample[index]
        assert torch.equal(image, expected["image"]), (name, index)
        assert torch.equal(mask, expected["mask"]), (name, index)
        changed += int(not torch.equal(image, scenes.images[index]))
    assert changed == 5
