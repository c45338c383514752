"""Folder datasets on tiny trees in the real layouts: shapes, label mapping, splits, bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_trees import (CITYSCAPES_FILES, H, SIZES, VOC_IDS, VOC_LABELS, W, label_grid, size_of, write_image,
                        write_mask, write_mask16)
from PIL import Image

from trustseg.data import datasets
from trustseg.data.base import IGNORE_INDEX
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import Predictor
from trustseg.errors import UserError
from trustseg.metrics import BoundaryIoU, ConfusionMatrix
from trustseg.models.factory import build_model


def check_sample(sample: dict, size: tuple[int, int] = (H, W)) -> None:
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, *size)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == size
    assert Path(sample["path"]).is_file()


def expected_mask(values: list[int], mapping: dict[int, int]) -> torch.Tensor:
    return torch.from_numpy(label_grid(values).astype(np.int64)).apply_(lambda v: mapping[v])


# --- each layout -----------------------------------------------------------------------------------

def test_camvid_maps_void_to_ignore_and_reads_both_splits(camvid_root):
    train = datasets.camvid(camvid_root, "train")
    val = datasets.camvid(camvid_root, split="val")
    assert (len(train), len(val)) == (3, 2)
    assert train.classes.num_classes == 11 and train.classes.names[0] == "Sky"
    sample = train[0]
    check_sample(sample)
    mapping = {v: v for v in range(11)} | {11: IGNORE_INDEX}
    assert torch.equal(sample["mask"], expected_mask(list(range(12)), mapping))
    image = np.array(Image.open(sample["path"]).convert("RGB"))
    assert torch.equal(sample["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert Path(val[1]["path"]).parent.name == "val"


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes_root):
    train = datasets.cityscapes(cityscapes_root, "train")
    assert len(train) == len(CITYSCAPES_FILES["train"]) and train.classes.num_classes == 19
    check_sample(train[0])
    mask = train[0]["mask"]
    raw = torch.from_numpy(label_grid(list(range(34))).astype(np.int64))
    # a few entries of the official labels.py table, checked by hand
    known = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18, 0: 255, 1: 255, 6: 255, 9: 255, 29: 255, 30: 255}
    for label_id, train_id in known.items():
        assert (mask[raw == label_id] == train_id).all(), label_id
    assert set(mask.unique().tolist()) == set(range(19)) | {255}
    assert len(datasets.cityscapes(cityscapes_root, "val")) == 1


def test_cityscapes_can_read_converted_train_ids(cityscapes_root):
    for path in (cityscapes_root / "gtFine").rglob("*_labelIds.png"):
        write_mask(path.with_name(path.name.replace("labelIds", "labelTrainIds")), label_grid([0, 18, 255]))
    ds = datasets.cityscapes(cityscapes_root, "train", label_type="labelTrainIds")
    assert set(ds[0]["mask"].unique().tolist()) == {0, 18, 255}
    with pytest.raises(UserError, match="label_type"):
        datasets.cityscapes(cityscapes_root, "train", label_type="colour")


def test_ade20k_reduces_zero_label(ade20k_root):
    for root in (ade20k_root, ade20k_root.parent):  # the folder itself or its parent
        train = datasets.ade20k(root, "train")
        assert len(train) == 3
    assert train.classes.num_classes == 150 and train.classes.names[:3] == ("wall", "building", "sky")
    assert len(set(train.classes.names)) == 150
    sample = train[0]
    check_sample(sample)
    mapping = {0: IGNORE_INDEX} | {v: v - 1 for v in range(1, 151)}
    assert torch.equal(sample["mask"], expected_mask(list(range(151)), mapping))
    assert len(datasets.ade20k(ade20k_root, "val")) == 2
    assert len(datasets.ade20k(ade20k_root, "validation")) == 2


def test_voc_reads_palette_indices_and_keeps_border(voc_root):
    for root in (voc_root, voc_root.parent, voc_root.parent.parent):
        train = datasets.voc(root, "train")
        assert len(train) == len(VOC_IDS["train"])
    sample = train[0]
    check_sample(sample)
    assert Image.open(train.pairs[0][1]).mode == "P"
    identity = {v: v for v in VOC_LABELS}
    assert torch.equal(sample["mask"], expected_mask(VOC_LABELS, identity))
    assert train.classes.num_classes == 21 and train.classes.names[15] == "person"
    assert train.classes.palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert train.classes.palette[15] == (192, 128, 128)
    assert len(datasets.voc(voc_root, "val")) == 1


def test_voc_optional_augmented_masks(voc_root):
    shutil.copytree(voc_root / "SegmentationClass", voc_root / "SegmentationClassAug")
    ds = datasets.voc(voc_root, "train", mask_dir="SegmentationClassAug")
    assert "SegmentationClassAug" in str(ds.pairs[0][1])


def test_foodseg103_accepts_images_folder_or_parents(foodseg_root):
    for root in (foodseg_root, foodseg_root / "Images", foodseg_root.parent):
        train = datasets.foodseg103(root, "train")
        assert len(train) == 3
    assert train.classes.num_classes == 104
    assert train.classes.names[0] == "background" and train.classes.names[58] == "bread"
    assert len(set(train.classes.names)) == 104
    sample = train[0]
    check_sample(sample)
    assert set(sample["mask"].unique().tolist()) == {0, 1, 58, 103}
    assert len(datasets.foodseg103(foodseg_root, "test")) == 2
    assert len(datasets.foodseg103(foodseg_root, "val")) == 2  # no val split: val is test


def test_folder_with_classes_file_and_mixed_extensions(folder_root):
    (folder_root / "classes.txt").write_text("background\nroad\n\ncar\n")
    ds = datasets.folder(folder_root)
    assert len(ds) == 3 and ds.classes.names == ("background", "road", "car")
    for i in range(3):
        check_sample(ds[i], size_of(i))
    assert set(ds[2]["mask"].unique().tolist()) == {0, 1, 2, 255}


def test_folder_infers_num_classes_and_logs_it(folder_root, caplog):
    with caplog.at_level(logging.WARNING, logger="trustseg.data.datasets"):
        ds = datasets.folder(folder_root)
    assert ds.classes.num_classes == 3
    assert "inferred num_classes=3" in caplog.text and "classes.txt" in caplog.text
    assert datasets.folder(folder_root, num_classes=5).classes.num_classes == 5


@pytest.mark.parametrize("cache", [False, True])
def test_folder_reads_16_bit_masks_above_255_classes(tmp_path, cache):
    root = tmp_path / "wide"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(300)))
    raw = label_grid([0, 255, 256, 299, 65535, 7], dtype=np.uint16)
    write_image(root / "images" / "a.png", seed=0)
    write_mask16(root / "masks" / "a.png", raw)
    ds = datasets.folder(root, cache=cache)
    assert ds.classes.num_classes == 300 and ds.classes.ignore_index == 65535
    # 255 is a class here; 65535 is the ignore label, kept as it is
    assert torch.equal(ds[0]["mask"], torch.from_numpy(raw.astype(np.int64)))
    write_mask16(root / "masks" / "a.png", label_grid([0, 300], dtype=np.uint16))
    with pytest.raises(UserError, match=r"a\.png: label values \{300\} out of range for 300 classes"):
        datasets.folder(root)[0]


def test_folder_infers_more_than_255_classes_from_16_bit_masks(tmp_path):
    root = tmp_path / "wide"
    write_image(root / "images" / "a.png", seed=0)
    write_mask16(root / "masks" / "a.png", label_grid([0, 255, 411, 65535], dtype=np.uint16))
    ds = datasets.folder(root)
    assert ds.classes.num_classes == 412 and ds.classes.ignore_index == 65535
    assert set(ds[0]["mask"].unique().tolist()) == {0, 255, 411, 65535}


@pytest.mark.parametrize("layout", ["camvid", "ade20k", "foodseg103", "folder"])
def test_fake_trees_hold_several_sizes_and_evaluate_alike_at_any_batch_size(request, layout, one_thread):
    root = request.getfixturevalue({"foodseg103": "foodseg_root"}.get(layout, f"{layout}_root"))
    dataset = getattr(datasets, layout)(root, "train")
    assert [tuple(dataset[i]["image"].shape[1:]) for i in range(len(dataset))] == list(SIZES)
    torch.manual_seed(0)
    model = build_model("unet", num_classes=dataset.classes.num_classes, base_width=4, depth=2)
    predictor = Predictor(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()

    def run(batch_size):
        metrics = [ConfusionMatrix(dataset.classes.num_classes), BoundaryIoU(dataset.classes.num_classes)]
        return evaluate(predictor, dataset, metrics, batch_size=batch_size, progress=False)

    single, batched = run(1), run(3)
    assert (batched["mIoU"], batched["aAcc"], batched["mBIoU"]) == (single["mIoU"], single["aAcc"], single["mBIoU"])


def test_folder_split_subfolders(tmp_path):
    root = tmp_path / "split_data"
    for split, count in (("train", 2), ("val", 1)):
        for i in range(count):
            write_image(root / "images" / split / f"{split}{i}.png", seed=i)
            write_mask(root / "masks" / split / f"{split}{i}.png", label_grid([0, 1]))
    assert len(datasets.folder(root, "train", num_classes=2)) == 2
    assert len(datasets.folder(root, "val", num_classes=2)) == 1
    with pytest.raises(UserError, match=r"images/test/.*train, val"):
        datasets.folder(root, "test", num_classes=2)


def test_folder_reduce_zero_label(folder_root):
    ds = datasets.folder(folder_root, num_classes=2, reduce_zero_label=True)
    assert set(ds[2]["mask"].unique().tolist()) == {0, 1, 255}  # raw 0 -> ignore, 1 -> 0, 2 -> 1


def test_cache_gives_the_same_samples(camvid_root):
    plain, cached = datasets.camvid(camvid_root), datasets.camvid(camvid_root, cache=True)
    assert cached.cached and not plain.cached
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["path"] == b["path"]
        assert b["mask"].dtype == torch.int64
    cached[0]["image"].zero_()  # in-place edits of a sample must not reach the cache
    assert torch.equal(cached[0]["image"], plain[0]["image"])


# --- bad input -------------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        datasets.camvid(tmp_path / "nowhere")


def test_missing_split_lists_found_splits(camvid_root):
    with pytest.raises(UserError, match=r"'test'.*splits here: train, val"):
        datasets.camvid(camvid_root, "test")
    shutil.rmtree(camvid_root / "valannot")
    with pytest.raises(UserError, match="valannot"):
        datasets.camvid(camvid_root, "val")


@pytest.mark.parametrize("layout, missing", [
    ("cityscapes", "gtFine/val"), ("ade20k", "annotations/validation"), ("foodseg103", "ann_dir/test"),
])
def test_missing_split_folder(layout, missing, request):
    root = request.getfixturevalue({"cityscapes": "cityscapes_root", "ade20k": "ade20k_root",
                                    "foodseg103": "foodseg_root"}[layout])
    target = next(p for p in root.rglob("*") if p.is_dir() and str(p).endswith(missing))
    shutil.rmtree(target)
    with pytest.raises(UserError, match=missing):
        datasets.LAYOUTS[layout](root, "val")


def test_voc_missing_split_list_and_missing_image(voc_root):
    with pytest.raises(UserError, match=r"trainval\.txt.*lists here: train, val"):
        datasets.voc(voc_root, "trainval")
    (voc_root / "JPEGImages" / "2007_000033.jpg").unlink()
    with pytest.raises(UserError, match="2007_000033"):
        datasets.voc(voc_root, "val")


def test_image_without_mask_names_the_image(camvid_root, ade20k_root, folder_root):
    (camvid_root / "trainannot" / "0001TP_006720.png").unlink()
    with pytest.raises(UserError, match=r"train/0001TP_006720\.png: no mask"):
        datasets.camvid(camvid_root)
    (ade20k_root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(UserError, match=r"ADE_train_00000002\.jpg: no mask"):
        datasets.ade20k(ade20k_root)
    (folder_root / "masks" / "img1.png").unlink()
    with pytest.raises(UserError, match=r"img1\.jpg: no mask"):
        datasets.folder(folder_root, num_classes=3)


def test_size_mismatch_names_both_files(camvid_root):
    write_mask(camvid_root / "trainannot" / "0001TP_006720.png", label_grid([0], size=(H, W + 2)))
    ds = datasets.camvid(camvid_root)
    with pytest.raises(UserError) as err:
        ds[1]
    message = str(err.value)
    assert "train/0001TP_006720.png is 11x17" in message and "trainannot/0001TP_006720.png is 18x12" in message
    with pytest.raises(UserError, match="trainannot/0001TP_006720.png"):
        datasets.camvid(camvid_root, cache=True)  # caching decodes, and so checks, every file


def test_out_of_range_label_names_file_values_and_classes(camvid_root, voc_root):
    write_mask(camvid_root / "trainannot" / "0001TP_006690.png", label_grid([0, 3, 12, 40]))
    with pytest.raises(UserError, match=r"0001TP_006690\.png: label values \{12, 40\} out of range for 11 classes"):
        datasets.camvid(camvid_root)[0]
    write_mask(voc_root / "SegmentationClass" / "2007_000033.png", label_grid([0, 21]))
    with pytest.raises(UserError, match=r"2007_000033\.png: label values \{21\}.* 21 classes"):
        datasets.voc(voc_root, "val")[0]


def test_ade_like_labels_suggest_reduce_zero_label(folder_root):
    write_mask(folder_root / "masks" / "img0.png", label_grid([0, 1, 2, 3]))
    ds = datasets.folder(folder_root, num_classes=3)
    with pytest.raises(UserError, match=r"img0\.png: label values \{3\}.*reduce_zero_label"):
        ds[0]


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_undecodable_files_are_named(camvid_root, damage):
    victim = camvid_root / "train" / "0001TP_006720.png"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-60])
    else:
        victim.write_text("version https://git-lfs.github.com/spec/v1\n")
    ds = datasets.camvid(camvid_root)
    with pytest.raises(UserError, match=r"0001TP_006720\.png: cannot decode image"):
        ds[1]


def test_colour_mask_is_refused(folder_root):
    mask = folder_root / "masks" / "img0.png"
    Image.fromarray(np.full((H, W, 3), (128, 64, 128), np.uint8), "RGB").save(mask)
    with pytest.raises(UserError, match=r"img0\.png: mask is a colour"):
        datasets.folder(folder_root, num_classes=3)[0]


def test_grey_mask_saved_as_rgb_is_accepted(folder_root):
    mask = folder_root / "masks" / "img0.png"
    Image.fromarray(np.repeat(label_grid([0, 2])[..., None], 3, axis=2), "RGB").save(mask)
    assert set(datasets.folder(folder_root, num_classes=3)[0]["mask"].unique().tolist()) == {0, 2}


def test_empty_datasets(tmp_path, voc_root):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "trainannot").mkdir()
    with pytest.raises(UserError, match=r"empty/train: no images found"):
        datasets.camvid(tmp_path / "empty")
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(UserError, match=r"val\.txt: split list is empty"):
        datasets.voc(voc_root, "val")
    with pytest.raises(UserError, match="empty"):
        datasets.FileDataset([], datasets.tables.CAMVID, datasets.LabelMap.identity(11), name="nothing")


def test_folder_bad_layouts(tmp_path, folder_root):
    with pytest.raises(UserError, match="masks/"):
        (tmp_path / "only_images" / "images").mkdir(parents=True)
        datasets.folder(tmp_path / "only_images")
    write_image(folder_root / "images" / "img0.jpg", seed=9)
    with pytest.raises(UserError, match="share the stem 'img0'"):
        datasets.folder(folder_root, num_classes=3)
    (folder_root / "classes.txt").write_text("a\nb\n")
    (folder_root / "images" / "img0.jpg").unlink()
    with pytest.raises(UserError, match=r"classes\.txt: lists 2 classes but num_classes=3"):
        datasets.folder(folder_root, num_classes=3)
    with pytest.raises(UserError, match="num_classes must be an integer"):
        datasets.folder(folder_root, num_classes="many")
