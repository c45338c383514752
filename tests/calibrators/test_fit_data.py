"""The fit-data sample: uniform over labelled pixels, bounded, the same however the data is batched or
sharded, and crops that are windows of the model's outputs."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trustseg.bench.memory import peak_tensor_bytes
from trustseg.calibrators.fit_data import FitDataCollector, collect_fit_data, sample_seed
from trustseg.data.base import subset
from trustseg.engine.evaluate import evaluate
from trustseg.errors import UserError

from cli_helpers import THREE_CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


class Images:
    """Labelled images of the given (H, W) sizes: labels 0..2 with a block of ignore, seeded per index."""

    classes = THREE_CLASSES

    def __init__(self, sizes, ignore=True):
        self.sizes, self.ignore = list(sizes), ignore

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        H, W = self.sizes[i]
        g = torch.Generator().manual_seed(100 + i)
        mask = torch.randint(0, K, (H, W), generator=g)
        if self.ignore:
            mask[: H // 3, : W // 2] = 255
        image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        return {"image": image, "mask": mask, "path": f"im{i}.png"}


def model(images):
    """Logits that are a fixed function of the image, so a test can recompute them."""
    x = images.float() / 255
    return torch.stack((x[:, 0] - x[:, 1], 2 * x[:, 1], x[:, 2] * x[:, 0]), 1)


def collect(dataset, batch_size=1, **options):
    collector = FitDataCollector(K, **options)
    evaluate(model, dataset, [collector], batch_size=batch_size, batch_transform=collector.observe, progress=False)
    return collector


def test_the_sample_is_the_globally_largest_keys_of_the_labelled_pixels():
    # oracle: every labelled pixel of every image with its key, sorted once; the stream must keep its top n
    dataset = Images([(7, 9), (12, 5), (3, 4), (10, 10), (6, 6)])
    keys, rows, labels = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        g = torch.Generator().manual_seed(sample_seed(0, sample["path"]))
        key = torch.rand(sample["mask"].numel(), generator=g, dtype=torch.float64)
        valid = sample["mask"].flatten() != 255
        keys.append(key[valid])
        rows.append(model(sample["image"][None])[0].flatten(1).T[valid])
        labels.append(sample["mask"].flatten()[valid])
    order = torch.cat(keys).argsort(descending=True)[:40]
    data = collect(dataset, max_pixels=40).fit_data()
    assert torch.equal(data.labels, torch.cat(labels)[order])
    assert torch.equal(data.logits, torch.cat(rows)[order])
    assert data.images == 5 and data.labelled_pixels == sum(int(k.numel()) for k in keys)


def test_every_labelled_pixel_is_equally_likely_whatever_the_image_size():
    # a 40x40 image has 16x the pixels of a 10x10 one: it must get ~16/17 of the sample (the old
    # per-image quota gave each image half)
    dataset = Images([(10, 10), (40, 40)] * 3, ignore=False)
    data = collect(dataset, max_pixels=850, seed=3).fit_data()
    small = {tuple(row.tolist()) for i in (0, 2, 4) for row in model(dataset[i]["image"][None])[0].flatten(1).T}
    n_small = sum(tuple(row.tolist()) in small for row in data.logits)
    p = 300 / 5100
    assert abs(n_small - 850 * p) < 4 * (850 * p * (1 - p)) ** 0.5


def test_batch_size_order_and_shards_do_not_change_the_sample():
    dataset = Images([(8, 8)] * 6)
    options = {"max_pixels": 50, "max_crops": 3, "crop_size": 5, "crops_per_image": 2}
    whole = collect(dataset, **options).fit_data()
    batched = collect(dataset, batch_size=4, **options).fit_data()
    reversed_ = collect(subset(dataset, range(5, -1, -1)), **options).fit_data()
    shards = collect(subset(dataset, [0, 2, 4]), **options).merge(collect(subset(dataset, [1, 3, 5]), **options))
    for other in (batched, reversed_, shards.fit_data()):
        assert torch.equal(other.logits, whole.logits) and torch.equal(other.labels, whole.labels)
        assert len(other.maps) == len(whole.maps) == 3
        for a, b in zip(other.maps, whole.maps):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert (other.images, other.labelled_pixels) == (whole.images, whole.labelled_pixels)


def test_crops_are_windows_of_the_outputs_and_small_images_stay_whole():
    dataset = Images([(12, 16), (4, 5), (12, 16)])
    data = collect(dataset, max_pixels=10, max_crops=6, crop_size=6, crops_per_image=4).fit_data()
    assert len(data.maps) == 6
    whole_small = 0
    for logits, image, mask in data.maps:
        h, w = mask.shape
        matches = []
        for i in range(len(dataset)):
            sample = dataset[i]
            H, W = sample["mask"].shape
            full = model(sample["image"][None])[0]
            matches += [(i, y, x) for y in range(H - h + 1) for x in range(W - w + 1)
                        if torch.equal(full[:, y:y + h, x:x + w], logits)
                        and torch.equal(sample["image"][:, y:y + h, x:x + w], image)
                        and torch.equal(sample["mask"][y:y + h, x:x + w], mask)]
        assert matches, "a crop is not a window of one image's logits, image and mask"
        assert (h, w) == ((6, 6) if matches[0][0] != 1 else (4, 5))
        whole_small += matches[0][0] == 1
        assert (mask != 255).any()
    assert whole_small <= 1  # an image no larger than the crop is one candidate, not four copies


def test_an_image_offers_no_more_crops_than_would_tile_it():
    # 12x16 in 6x6 crops: ceil(192 / 36) = 6 candidates, however many crops per image are allowed
    data = collect(Images([(12, 16)] * 2, ignore=False), max_pixels=1, max_crops=100, crop_size=6,
                   crops_per_image=10).fit_data()
    assert len(data.maps) == 12


def test_memory_does_not_grow_with_the_number_of_images():
    def peak(count):
        return peak_tensor_bytes(lambda: collect_fit_data(model, Images([(48, 64)] * count), max_pixels=500,
                                                          max_crops=4, crop_size=16, progress=False))

    few, many = peak(4), peak(24)
    sample_bytes = 500 * (K * 4 + 8 + 8) + 4 * 16 * 16 * (K * 4 + 3 + 8)
    assert many <= few + sample_bytes // 4
    assert many < 24 * 48 * 64 * K * 4  # far below keeping every logit map


def test_bad_fit_data_names_the_image():
    class Unlabelled(Images):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "mask": None}

    class BadLabel(Images):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            sample["mask"][0, 0] = 7
            return sample

    with pytest.raises(UserError, match="fit image im0.png has no label map"):
        collect_fit_data(model, Unlabelled([(4, 4)]), progress=False)
    with pytest.raises(UserError, match=r"fit image im0.png has labels outside \[0, 3\)"):
        collect_fit_data(model, BadLabel([(4, 4)]), progress=False)


def test_a_merged_collector_takes_no_more_batches_and_no_second_merge():
    collector = collect(Images([(9, 11)] * 2), max_pixels=20)
    with pytest.raises(UserError, match="already summed"):
        collector.all_reduce()
    with pytest.raises(UserError, match="already summed"):
        evaluate(model, Images([(9, 11)]), [collector], batch_transform=collector.observe, progress=False)


def test_collectors_with_other_settings_are_not_merged():
    with pytest.raises(UserError, match="cannot merge"):
        FitDataCollector(K, max_pixels=5).merge(FitDataCollector(K, max_pixels=6))


WORLD_SIZE = 2
SHARDED = {"max_pixels": 60, "max_crops": 4, "crop_size": 6, "crops_per_image": 2}


def worker(rank, port, expected):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        collector = collect(Images([(9, 11)] * 5), **SHARDED)  # evaluate() shards and all_reduces
        with pytest.raises(UserError, match="already summed"):  # a second merge would double the sample
            collector.all_reduce()
        data = collector.fit_data()
        torch.testing.assert_close(data.logits, expected.logits, rtol=0, atol=0)
        assert torch.equal(data.labels, expected.labels)
        assert (data.images, data.labelled_pixels) == (expected.images, expected.labelled_pixels)
        for a, b in zip(data.maps, expected.maps, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        dist.destroy_process_group()


def test_two_processes_merge_their_shards_into_the_one_process_sample():
    expected = collect(Images([(9, 11)] * 5), **SHARDED).fit_data()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, expected), nprocs=WORLD_SIZE, join=True)
