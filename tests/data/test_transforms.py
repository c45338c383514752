"""Joint transforms: shapes, image/mask agreement, label preservation, seeding, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trustseg.data.base import ClassInfo
from trustseg.data.transforms import (
    ColorJitter,
    Compose,
    Normalize,
    PadTo,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizeScale,
    Resize,
    TransformedDataset,
    collate,
    eval_transform,
    resize_image,
    resize_mask,
    sample_seed,
    target_size,
    train_transform,
)
from trustseg.errors import UserError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_pair(seed: int = 0, size=(20, 30), labels=(0, 1, 2, 255)):
    g = gen(seed)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)
    values = torch.tensor(labels)
    mask = values[torch.randint(0, len(labels), size, generator=g)]
    return image, mask


def encoded_pair(size=(20, 30)):
    """An image that spells out its pixel position, and a mask that holds the same position."""
    position = torch.arange(size[0] * size[1]).reshape(size)
    image = torch.stack([position % 256, position // 256, torch.zeros_like(position)]).to(torch.uint8)
    return image, position


class ListDataset:
    classes = ClassInfo(names=("a", "b", "c"), palette=((0, 0, 0), (1, 1, 1), (2, 2, 2)))

    def __init__(self, n: int = 6, size=(20, 30)):
        self.samples = [random_pair(i, size) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image, mask = self.samples[i]
        return {"image": image, "mask": mask, "path": f"sample{i}.png"}


# --- resizing ------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 17), w=st.integers(1, 17), out_h=st.integers(1, 40), out_w=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_resize_mask_is_nearest_exact_and_adds_no_labels(h, w, out_h, out_w, seed):
    mask = torch.randint(0, 5, (h, w), generator=gen(seed)) * 50  # labels 0, 50, ..., 200
    out = resize_mask(mask, (out_h, out_w))
    oracle = F.interpolate(mask[None, None].double(), size=(out_h, out_w), mode="nearest-exact")[0, 0].long()
    # torch computes source positions in float32, so where an output centre falls exactly on a source
    # pixel edge it may take either neighbour; we take the exact floor. Compare everywhere else.
    row_edge = (2 * torch.arange(out_h) + 1) * h % (2 * out_h) == 0
    col_edge = (2 * torch.arange(out_w) + 1) * w % (2 * out_w) == 0
    exact = ~(row_edge[:, None] | col_edge[None, :])
    assert out.dtype == torch.int64 and torch.equal(out[exact], oracle[exact])
    assert set(out.unique().tolist()) <= set(mask.unique().tolist())


def test_resize_mask_takes_the_exact_floor_when_a_centre_lies_on_a_pixel_edge():
    # output centre 18.5 of 37 maps to 18.5 * 6 / 37 = 3 exactly: source column 3, not 2
    out = resize_mask(torch.arange(6)[None], (1, 37))
    assert out[0, 18] == 3 and out[0, 17] == 2


def test_resize_image_keeps_dtype_and_constant_images():
    image = torch.full((3, 9, 13), 77, dtype=torch.uint8)
    out = resize_image(image, (20, 7))
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 7) and (out == 77).all()
    ramp = torch.linspace(0, 1, 16).repeat(3, 8, 1)
    assert resize_image(ramp, (8, 32)).dtype == torch.float32


@pytest.mark.parametrize("size, keep_ratio, expected", [
    (180, True, (180, 240)),              # short side
    ((720, 960), False, (720, 960)),      # exact (h, w)
    ((2048, 512), True, (512, 683)),      # (long, short) bounds, either order
    ((512, 2048), True, (512, 683)),
    ((1000, 100), True, (100, 133)),
])
def test_target_size(size, keep_ratio, expected):
    assert target_size(360, 480, size, keep_ratio) == expected
    if isinstance(size, tuple) and keep_ratio:  # orientation-free: a portrait image is the mirror case
        assert target_size(480, 360, size, keep_ratio) == expected[::-1]


def test_resize_and_random_resize_scale():
    image, mask = random_pair(size=(30, 40))
    out_image, out_mask = Resize(15)(image, mask)
    assert out_image.shape == (3, 15, 20) and out_mask.shape == (15, 20)
    assert Resize((7, 9))(image, None)[0].shape == (3, 7, 9)
    sizes = set()
    transform = RandomResizeScale(30, scale_range=(0.5, 2.0))
    for seed in range(30):
        out_image, out_mask = transform(image, mask, gen(seed))
        assert out_image.shape[1:] == out_mask.shape
        short = min(out_mask.shape)
        assert 15 <= short <= 60 and abs(out_mask.shape[1] / out_mask.shape[0] - 4 / 3) < 0.1
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 255}
        sizes.add(short)
    assert len(sizes) > 10
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        transform(image, mask)


# --- cropping, padding, flipping -----------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(h=st.integers(4, 30), w=st.integers(4, 30), crop=st.integers(2, 24), seed=st.integers(0, 1000))
def test_crop_and_flip_move_image_and_mask_together(h, w, crop, seed):
    image, position = encoded_pair((h, w))
    transform = Compose([RandomCrop(crop, cat_max_ratio=1.0, ignore_index=-1), RandomHorizontalFlip()])
    out_image, out_mask = transform(image, position, gen(seed))
    assert out_image.shape == (3, crop, crop) and out_mask.shape == (crop, crop)
    inside = out_mask != -1  # the rest is padding
    decoded = out_image[0].long() + 256 * out_image[1].long()
    assert torch.equal(decoded[inside], out_mask[inside])
    assert (out_image[:, ~inside] == 0).all()
    assert inside.sum() == min(h, crop) * min(w, crop)


def test_crop_pads_small_images_with_zero_and_ignore():
    image, mask = random_pair(size=(5, 6), labels=(1,))
    out_image, out_mask = RandomCrop((8, 10))(image, mask, gen())
    assert torch.equal(out_image[:, :5, :6], image)
    assert (out_image[:, 5:] == 0).all() and (out_image[:, :, 6:] == 0).all()
    assert torch.equal(out_mask[:5, :6], mask) and (out_mask[5:] == 255).all() and (out_mask[:, 6:] == 255).all()


def _dominant_share(mask: torch.Tensor) -> float:
    counts = torch.bincount(mask[mask != 255].flatten())
    return float(counts.max()) / float(counts.sum())


def test_cat_max_ratio_rejects_crops_dominated_by_one_class():
    # 48 columns of class 0, then 16 of class 1: only 7 of the 49 possible 16-wide crops keep
    # class 0 below 75 % while showing both classes
    mask = torch.zeros(8, 64, dtype=torch.int64)
    mask[:, 48:] = 1
    image = torch.zeros(3, 8, 64, dtype=torch.uint8)

    def balanced_fraction(ratio: float) -> float:
        crop = RandomCrop((8, 16), cat_max_ratio=ratio)
        results = [crop(image, mask, gen(seed))[1] for seed in range(60)]
        return sum(len(r.unique()) > 1 and _dominant_share(r) < 0.75 for r in results) / len(results)

    unchecked, checked = balanced_fraction(1.0), balanced_fraction(0.75)
    assert unchecked < 0.3  # ~ 7 / 49
    assert checked > 0.65  # ~ 1 - (42 / 49) ** 11 = 0.82


def test_cat_max_ratio_gives_up_on_single_class_masks():
    image, mask = random_pair(size=(10, 10), labels=(3,))
    out_image, out_mask = RandomCrop(4)(image, mask, gen())
    assert out_image.shape == (3, 4, 4) and (out_mask == 3).all()


def test_flip_always_and_never():
    image, mask = random_pair()
    flipped = RandomHorizontalFlip(p=1.0)(image, mask, gen())
    assert torch.equal(flipped[0], image.flip(-1)) and torch.equal(flipped[1], mask.flip(-1))
    kept = RandomHorizontalFlip(p=0.0)(image, mask, gen())
    assert kept[0] is image and kept[1] is mask


def test_pad_to_multiple_and_size():
    image, mask = random_pair(size=(17, 30))
    out_image, out_mask = PadTo(multiple=16)(image, mask)
    assert out_image.shape == (3, 32, 32) and torch.equal(out_image[:, :17, :30], image)
    assert (out_mask[17:] == 255).all() and torch.equal(out_mask[:17, :30], mask)
    assert PadTo(size=(20, 40))(image, None)[0].shape == (3, 20, 40)
    with pytest.raises(UserError, match="larger than the pad size"):
        PadTo(size=(10, 40))(image, mask)
    with pytest.raises(UserError, match="exactly one"):
        PadTo()


# --- photometric -----------------------------------------------------------------------------------

def test_color_jitter_invariants():
    image, mask = random_pair()
    for seed in range(5):
        out, out_mask = ColorJitter(0.4, 0.4, 0.4)(image, mask, gen(seed))
        assert out.dtype == torch.uint8 and out.shape == image.shape and out_mask is mask
    grey = torch.randint(0, 256, (1, 20, 30), dtype=torch.uint8, generator=gen(1)).repeat(3, 1, 1)
    assert torch.equal(ColorJitter(saturation=0.9)(grey, None, gen(2))[0], grey)  # no colour to scale
    flat = torch.full((3, 20, 30), 90, dtype=torch.uint8)
    assert torch.equal(ColorJitter(contrast=0.9)(flat, None, gen(3))[0], flat)  # no contrast to scale
    black = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert torch.equal(ColorJitter(brightness=0.9)(black, None, gen(4))[0], black)
    assert torch.equal(ColorJitter()(image, None, gen(5))[0], image)
    brighter = ColorJitter(brightness=0.5)(flat, None, gen(6))[0]
    assert (brighter == brighter[0, 0, 0]).all() and 45 <= int(brighter[0, 0, 0]) <= 135


def test_normalize():
    image, mask = random_pair()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out, out_mask = Normalize(mean, std)(image, mask)
    assert out.dtype == torch.float32 and out_mask is mask
    for c in range(3):
        expected = (image[c].double() / 255 - mean[c]) / std[c]
        assert torch.allclose(out[c].double(), expected, atol=1e-5)


# --- seeding, wrapper, batching --------------------------------------------------------------------

def test_pipelines_are_deterministic_per_seed():
    image, mask = random_pair(size=(40, 50))
    pipeline = train_transform(24, base_size=40, color_jitter=0.3)
    a, b, c = (pipeline(image, mask, gen(s)) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 24, 24) and a[0].dtype == torch.float32 and a[1].shape == (24, 24)
    evaluated = eval_transform(size=30, pad_multiple=16)(image, mask)
    assert evaluated[0].shape == (3, 32, 48) and evaluated[1].shape == (32, 48)


def test_sample_seed_separates_seed_epoch_and_index():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50 and all(0 <= s < 2**63 for s in seeds)


def test_transformed_dataset_is_reproducible_and_changes_with_epoch():
    data = TransformedDataset(ListDataset(), train_transform(12), seed=3)
    assert data.classes.num_classes == 3 and len(data) == 6
    first = data[2]
    assert torch.equal(first["image"], data[2]["image"]) and first["path"] == "sample2.png"
    data.set_epoch(1)
    assert data.epoch == 1 and not torch.equal(first["image"], data[2]["image"])
    other_seed = TransformedDataset(ListDataset(), train_transform(12), seed=4)
    assert not torch.equal(first["image"], other_seed[2]["image"])


def _batches(dataset, workers: int, epochs: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate,
                                         persistent_workers=workers > 0)
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        out += [batch["image"] for batch in loader]
    return out


def test_results_do_not_depend_on_the_number_of_workers():
    data = TransformedDataset(ListDataset(n=4), train_transform(12, color_jitter=0.2), seed=11)
    serial = _batches(data, workers=0, epochs=2)
    parallel = _batches(data, workers=2, epochs=2)  # persistent workers must see set_epoch too
    assert len(serial) == len(parallel) == 4
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    assert not torch.equal(serial[0], serial[2])  # epoch 1 differs from epoch 0


def test_collate_stacks_and_names_mismatched_samples():
    data = ListDataset(n=3)
    batch = collate([data[0], data[1]])
    assert batch["image"].shape == (2, 3, 20, 30) and batch["mask"].shape == (2, 20, 30)
    assert batch["path"] == ["sample0.png", "sample1.png"]
    odd = {"image": torch.zeros(3, 21, 30, dtype=torch.uint8), "mask": torch.zeros(21, 30, dtype=torch.int64),
           "path": "odd.png"}
    with pytest.raises(UserError, match=r"sample0\.png \(30x20\) with odd\.png \(30x21\).*Resize/RandomCrop/PadTo"):
        collate([data[0], odd])
    no_masks = collate([{**data[0], "mask": None}, {**data[1], "mask": None}])
    assert no_masks["mask"] is None


def test_an_index_past_the_end_is_the_same_sample_augmented_anew():
    # weighted sampling draws a sample again within an epoch as index + r * len
    def noise(image, mask, generator):
        return torch.rand(3, generator=generator), mask

    dataset = TransformedDataset(ListDataset(3), noise, seed=1)
    first, again = dataset[1], dataset[1 + 2 * len(dataset)]
    assert again["path"] == first["path"] and torch.equal(again["mask"], first["mask"])
    assert not torch.equal(again["image"], first["image"])
    assert torch.equal(dataset[1]["image"], first["image"])
