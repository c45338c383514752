import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from trustseg.data.base import ClassInfo
from trustseg.data.synthetic import (
    BEACON,
    CLASS_NAMES,
    DEFAULT_NUM_IMAGES,
    SceneConfig,
    SyntheticDataset,
    render_scene,
    scene_rng,
)
from trustseg.errors import UserError

K = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def train_split():
    """The first 320 scenes of the default train split: images (N, H, W, 3) uint8, masks (N, H, W) int64."""
    ds = SyntheticDataset("train")
    samples = [ds[i] for i in range(320)]
    images = torch.stack([s["image"] for s in samples]).permute(0, 2, 3, 1).numpy()
    masks = torch.stack([s["mask"] for s in samples]).numpy()
    return images, masks


def _digest(sample) -> str:
    return hashlib.sha256(sample["image"].numpy().tobytes() + sample["mask"].numpy().tobytes()).hexdigest()


def test_sample_types_shapes_and_path():
    ds = SyntheticDataset("val", num_images=3, size=(48, 64))
    assert len(ds) == 3
    s = ds[2]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 48, 64)
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == (48, 64)
    assert 0 <= int(s["mask"].min()) and int(s["mask"].max()) < K
    assert s["path"] == "synthetic/val/000002"
    assert isinstance(ds.classes, ClassInfo) and ds.classes.names == CLASS_NAMES
    assert len(set(ds.classes.palette)) == K, "palette colours must be distinct"
    assert ds[-1]["path"] == s["path"]
    with pytest.raises(IndexError):
        ds[3]


def test_default_lengths_and_size():
    for split, n in DEFAULT_NUM_IMAGES.items():
        ds = SyntheticDataset(split)
        assert len(ds) == n
    assert SyntheticDataset("test")[0]["image"].shape == (3, 128, 128)


def test_spec_string_values_are_accepted():
    ds = SyntheticDataset("val", num_images="4", size="40x56", seed="3", rare_prob="0.5", cache="true")
    assert len(ds) == 4 and ds[0]["mask"].shape == (40, 56)
    typed = SyntheticDataset("val", num_images=4, size=(40, 56), seed=3, rare_prob=0.5, cache=True)
    assert _digest(ds[1]) == _digest(typed[1])


def test_same_arguments_give_identical_samples_in_any_order():
    a = SyntheticDataset("train", num_images=6, size=64, seed=7)
    b = SyntheticDataset("train", num_images=50, size=64, seed=7)
    forward = [_digest(a[i]) for i in range(6)]
    backward = [_digest(b[i]) for i in reversed(range(6))][::-1]
    assert forward == backward
    assert len(set(forward)) == 6, "different indices must give different scenes"


def test_split_seed_and_index_change_the_scene():
    base = SyntheticDataset("train", num_images=4, size=64)[1]
    others = [
        SyntheticDataset("val", num_images=4, size=64)[1],
        SyntheticDataset("test", num_images=4, size=64)[1],
        SyntheticDataset("train", num_images=4, size=64, seed=1)[1],
        SyntheticDataset("train", num_images=4, size=64)[2],
    ]
    for other in others:
        assert not torch.equal(base["image"], other["image"])
        assert not torch.equal(base["mask"], other["mask"])


def test_identical_in_another_process():
    ds = SyntheticDataset("test", num_images=5, size=64, seed=11)
    expected = [_digest(ds[i]) for i in (4, 0)]
    code = (
        "import hashlib; from trustseg.data.synthetic import SyntheticDataset as D\n"
        "ds = D('test', num_images=5, size=64, seed=11)\n"
        "for i in (4, 0):\n"
        "    s = ds[i]\n"
        "    print(hashlib.sha256(s['image'].numpy().tobytes() + s['mask'].numpy().tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == expected


def test_cache_returns_equal_samples_that_in_place_edits_do_not_reach():
    cached = SyntheticDataset("val", num_images=2, size=48, cache=True)
    plain = SyntheticDataset("val", num_images=2, size=48)
    first = cached[0]
    assert _digest(first) == _digest(plain[0])
    first["image"].zero_()
    first["mask"].fill_(1)
    assert _digest(cached[0]) == _digest(plain[0])


def test_every_class_appears_and_beacon_is_rare(train_split):
    _, masks = train_split
    pixel_share = np.bincount(masks.ravel(), minlength=K) / masks.size
    assert (pixel_share > 0).all(), f"classes missing from the train split: {pixel_share}"
    present = (masks == BEACON).any(axis=(1, 2))
    # rare_prob = 0.2 per image; +-0.07 is about 3 binomial standard deviations at n = 320.
    assert 0.13 <= present.mean() <= 0.27
    assert pixel_share[BEACON] < 0.02
    assert pixel_share[BEACON] == pixel_share.min(), "the beacon must be the rarest class"


def test_beacons_are_smaller_than_every_other_object():
    areas: dict[int, list[int]] = {}
    for index in range(40):
        for cls, footprint in render_scene(scene_rng(0, "train", index), SceneConfig()).layers:
            areas.setdefault(cls, []).append(int(footprint.sum()))
    beacon_mean = np.mean(areas.pop(BEACON))
    assert beacon_mean < min(np.mean(a) for a in areas.values())
    assert beacon_mean < 0.04 * 128 * 128


def test_mask_is_the_depth_ordered_composition_of_the_layers():
    occluded_scenes = 0
    for index in range(20):
        scene = render_scene(scene_rng(0, "train", index), SceneConfig())
        composed = np.zeros_like(scene.mask)
        for cls, footprint in scene.layers:
            composed[footprint] = cls
        np.testing.assert_array_equal(composed, scene.mask)
        # An object is occluded when a later layer covers part, but not all, of its footprint.
        for depth, (_, footprint) in enumerate(scene.layers):
            covered = np.zeros_like(footprint)
            for _, later in scene.layers[depth + 1 :]:
                covered |= later
            hidden = (footprint & covered).sum()
            if 0 < hidden < footprint.sum():
                occluded_scenes += 1
                break
    assert occluded_scenes >= 5, f"only {occluded_scenes} of 20 scenes show partial occlusion"


def _colour_lookup_miou(train_images, train_masks, val_images, val_masks, *, levels=16, uniform_prior=False):
    """mIoU of the Bayes classifier on quantised RGB (a pixel's colour is all it sees), fitted on train."""

    def codes(images):
        q = images.astype(np.int64) * levels // 256
        return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]

    joint = codes(train_images).ravel() * K + train_masks.ravel()
    counts = np.bincount(joint, minlength=levels**3 * K).reshape(levels**3, K).astype(np.float64)
    if uniform_prior:  # p(colour | class): removes the advantage of always answering "background"
        counts = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1.0)
    pred = counts.argmax(axis=1)[codes(val_images)]
    cm = np.bincount(val_masks.ravel() * K + pred.ravel(), minlength=K * K).reshape(K, K)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    return float((np.diag(cm)[present] / union[present]).mean())


def test_class_is_not_readable_from_pixel_colour(train_split):
    images, masks = train_split
    val = SyntheticDataset("val", num_images=32)
    val_images = np.stack([val[i]["image"].permute(1, 2, 0).numpy() for i in range(len(val))])
    val_masks = np.stack([val[i]["mask"].numpy() for i in range(len(val))])
    for prior in (False, True):
        miou = _colour_lookup_miou(images[:96], masks[:96], val_images, val_masks, uniform_prior=prior)
        assert miou < 0.3, f"colour lookup reaches mIoU {miou:.3f} (uniform_prior={prior})"


def test_colour_lookup_detects_colour_coded_classes(train_split):
    # Control for the test above: where colour does encode the class, the same classifier is near perfect.
    masks = train_split[1][:64]
    palette = np.array(SyntheticDataset("val", num_images=1).classes.palette, np.uint8)
    rng = np.random.default_rng(0)
    noisy = [np.clip(palette[m] + rng.normal(0, 4, m.shape + (3,)), 0, 255).astype(np.uint8) for m in masks]
    images = np.stack(noisy)
    assert _colour_lookup_miou(images[:48], masks[:48], images[48:], masks[48:]) > 0.95


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 31}, "size"),
        ({"size": (64, 16)}, "size"),
        ({"size": "64x40960"}, "size"),  # a typo that would take tens of GB to render
        ({"size": "big"}, "size"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": "many"}, "num_images"),
        ({"split": "dev"}, "split"),
        ({"seed": -1}, "seed"),
        ({"min_objects": 5, "max_objects": 2}, "max_objects"),
        ({"rare_prob": 1.5}, "rare_prob"),
        ({"cache": "maybe"}, "cache"),
    ],
)
def test_bad_arguments_raise_user_error_naming_them(kwargs, name):
    with pytest.raises(UserError, match=rf"^{name}="):
        SyntheticDataset(**kwargs)
