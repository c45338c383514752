"""Contracts every corruption keeps, checked over the whole registry: shapes, seeding, batch independence."""

import pytest
import torch
from torch.utils.data import DataLoader

from trustseg.data.synthetic import SyntheticDataset
from trustseg.data.transforms import collate
from trustseg.errors import UserError
from trustseg.robustness.corruptions import (COMMON, CORRUPTIONS, DISPLACEMENTS, FAMILIES, corrupt, parse_corruptions,
                                             parse_severities)
from trustseg.robustness.dataset import CorruptedDataset


@pytest.fixture(scope="module")
def images():
    data = SyntheticDataset("val", num_images=2, size=(48, 64))
    return torch.stack([data[i]["image"] for i in range(2)]), torch.stack([data[i]["mask"] for i in range(2)])


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_registry_has_the_19_corruptions_in_hendrycks_order_and_families_cover_them():
    assert len(CORRUPTIONS) == 19 and len(COMMON) == 15
    assert list(CORRUPTIONS)[:3] == ["gaussian_noise", "shot_noise", "impulse_noise"]
    assert sorted(n for names in FAMILIES.values() for n in names) == sorted(CORRUPTIONS)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_is_seeded_batch_independent_and_keeps_photometric_masks(images, name):
    x, masks = images
    for severity in (1, 5):
        a, moved = corrupt(x, name, severity, seeded(1, 2), masks)
        b, _ = corrupt(x, name, severity, seeded(1, 2), masks)
        assert a.dtype == torch.uint8 and a.shape == x.shape
        assert torch.equal(a, b), "same seeds must give the same images"
        alone, _ = corrupt(x[1:], name, severity, seeded(2))
        assert torch.equal(a[1:], alone), "an image's corruption must not depend on the rest of its batch"
        shared, _ = corrupt(x, name, severity, torch.Generator().manual_seed(1))
        assert torch.equal(shared[0], a[0]), "one generator serves the images in turn"
        if name not in DISPLACEMENTS:
            assert moved is masks
        else:
            assert moved.shape == masks.shape and moved.dtype == masks.dtype
    assert not torch.equal(corrupt(x, name, 5, seeded(1, 2))[0], x), "severity 5 must change the image"


def test_small_images_and_bad_names_are_user_errors(images):
    x, _ = images
    with pytest.raises(UserError, match="at least 32"):
        corrupt(x[..., :20, :], "fog", 1, seeded(0, 1))
    with pytest.raises(UserError, match="unknown corruption"):
        corrupt(x, "rain", 1, seeded(0, 1))
    with pytest.raises(UserError, match="outside 1-5"):
        corrupt(x, "fog", 6, seeded(0, 1))


def test_parsing_corruption_and_severity_lists():
    assert parse_corruptions("all") == tuple(CORRUPTIONS)
    assert parse_corruptions("noise,fog,gaussian_noise") == ("gaussian_noise", "shot_noise", "impulse_noise", "fog")
    assert parse_corruptions("common") == COMMON
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("5,1,3") == (1, 3, 5)
    for bad in ("", "0", "2-7", "x"):
        with pytest.raises(UserError):
            parse_severities(bad)


def test_corrupted_dataset_is_the_same_for_any_batch_size_and_worker_count():
    base = SyntheticDataset("val", num_images=4, size=(48, 64))
    data = CorruptedDataset(base, "elastic_transform", 4, seed=3)
    one = [data[i] for i in range(4)]
    for batch_size, workers in ((1, 0), (3, 2)):
        loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        batches = list(loader)
        assert torch.equal(torch.cat([b["image"] for b in batches]), torch.stack([s["image"] for s in one]))
        assert torch.equal(torch.cat([b["mask"] for b in batches]), torch.stack([s["mask"] for s in one]))
    assert not torch.equal(one[0]["image"], CorruptedDataset(base, "elastic_transform", 4, seed=4)[0]["image"])
