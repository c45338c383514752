"""Data spec strings: parsing, option conversion, dispatch and user errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from trustseg.data import datasets
from trustseg.data.combined import CombinedDataset, Mixture
from trustseg.data.spec import (DATASET_NAMES, DataSpec, describe_spec, load_dataset, parse_spec, resolve_split,
                                split_parts)
from trustseg.errors import UserError


def test_names_cover_every_layout():
    assert set(DATASET_NAMES) == {"synthetic", "camvid", "cityscapes", "ade20k", "voc", "foodseg103", "folder"}


@pytest.mark.parametrize("spec, expected", [
    ("synthetic", DataSpec("synthetic")),
    ("camvid:/data/camvid", DataSpec("camvid", "/data/camvid")),
    ("CamVid:/data/camvid#split=val", DataSpec("camvid", "/data/camvid", {"split": "val"})),
    ("synthetic#split=val,num_images=32,noise=0.5,flag=true",
     DataSpec("synthetic", None, {"split": "val", "num_images": 32, "noise": 0.5, "flag": True})),
    ("folder:C:/x#cache=no", DataSpec("folder", "C:/x", {"cache": False})),
    ("voc:/a#b/VOC#mask_dir=SegmentationClassAug", DataSpec("voc", "/a#b/VOC", {"mask_dir": "SegmentationClassAug"})),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("", "empty data spec"),
    ("kitti:/data", r"unknown dataset 'kitti'; expected one of synthetic, camvid, cityscapes, ade20k, voc, "
                    r"foodseg103, folder"),
    ("camvid", "camvid needs a data folder"),
    ("camvid:", "camvid needs a data folder"),
    ("synthetic:/tmp", "synthetic takes no path"),
    ("camvid:/x#split", "bad option 'split'"),
    ("camvid:/x#split=val,split=test", "given twice"),
    ("camvid:/x#1x=2", "bad option"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_spec(spec)


def test_load_dataset_split_precedence(camvid_root):
    assert len(load_dataset(f"camvid:{camvid_root}")) == 3  # default split: train
    assert len(load_dataset(f"camvid:{camvid_root}#split=val")) == 2
    assert len(load_dataset(f"camvid:{camvid_root}", split="val")) == 2
    assert len(load_dataset(f"camvid:{camvid_root}#split=val", split="train")) == 3  # keyword wins
    assert len(load_dataset(f"camvid:{camvid_root}#split=val", split=None)) == 2


def test_load_dataset_options_reach_the_layout(folder_root):
    ds = load_dataset(f"folder:{folder_root}#num_classes=4,cache=true")
    assert isinstance(ds, datasets.FileDataset) and ds.classes.num_classes == 4 and ds.cached
    assert load_dataset(f"folder:{folder_root}#num_classes=4", num_classes=6).classes.num_classes == 6


def test_unknown_option_lists_valid_ones(camvid_root):
    with pytest.raises(UserError, match=r"unknown option\(s\) colour; valid: cache, images, split"):
        load_dataset(f"camvid:{camvid_root}#colour=red")


def test_images_option_slices_the_sorted_samples(camvid_root):
    whole = load_dataset(f"camvid:{camvid_root}")
    first, rest = load_dataset(f"camvid:{camvid_root}#images=0:1"), load_dataset(f"camvid:{camvid_root}#images=1:")
    assert [s["path"] for s in (*first, *rest)] == [s["path"] for s in whole]
    assert first.classes == whole.classes and len(rest) == len(whole) - 1
    assert len(load_dataset(f"camvid:{camvid_root}#images=:-1")) == len(whole) - 1
    odd = load_dataset(f"camvid:{camvid_root}#images=1::2")
    assert [s["path"] for s in odd] == [s["path"] for s in whole][1::2]


@pytest.mark.parametrize("value, message", [("5", "expected START:STOP"), ("a:b", "expected START:STOP"), ("1:2:3:4", "expected START:STOP"),
                                            ("7:", "selects none of the 3 images")])
def test_bad_images_option(camvid_root, value, message):
    with pytest.raises(UserError, match=message):
        load_dataset(f"camvid:{camvid_root}#images={value}")


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"ade20k:{tmp_path / 'ADE'}")


def test_synthetic_dispatch_passes_split_and_converted_options(monkeypatch):
    calls = []

    class FakeSynthetic:
        def __init__(self, split="train", *, num_images=8, noise=0.1):
            calls.append({"split": split, "num_images": num_images, "noise": noise})

    module = types.ModuleType("trustseg.data.synthetic")
    module.SyntheticDataset = FakeSynthetic
    monkeypatch.setitem(sys.modules, "trustseg.data.synthetic", module)
    load_dataset("synthetic#split=val,num_images=32,noise=0.25")
    load_dataset("synthetic", num_images=4)
    assert calls == [{"split": "val", "num_images": 32, "noise": 0.25},
                     {"split": "train", "num_images": 4, "noise": 0.1}]
    with pytest.raises(UserError, match=r"unknown option\(s\) size; valid: images, noise, num_images, split"):
        load_dataset("synthetic#size=3")


def test_describe_spec():
    assert describe_spec("camvid:/d#split=val") == "camvid at /d (split='val')"
    assert describe_spec("synthetic") == "synthetic"


# --- combined specs: SPEC+SPEC ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, parts", [
    ("synthetic", ["synthetic"]),
    ("folder:/data/a+b", ["folder:/data/a+b"]),  # a '+' inside a path
    ("folder:/x/c++/data#split=val+synthetic", ["folder:/x/c++/data#split=val", "synthetic"]),
    ("synthetic+synthetic#split=val+camvid:/d+folder:/e+f#ratio=1:2:3:4",
     ["synthetic", "synthetic#split=val", "camvid:/d", "folder:/e+f#ratio=1:2:3:4"]),
    ("folder:/a+synthetics/b", ["folder:/a+synthetics/b"]),  # 'synthetic' must end the name
    ("folder:/a + VOC:/b", ["folder:/a", "VOC:/b"]),
])
def test_split_parts_splits_only_before_a_dataset_name(spec, parts):
    assert split_parts(spec) == parts


def test_combined_dataset_concatenates_parts_in_order(camvid_root, tmp_path):
    spec = f"camvid:{camvid_root}#images=1:+camvid:{camvid_root}#split=val"
    combined = load_dataset(spec)
    train, val = load_dataset(f"camvid:{camvid_root}"), load_dataset(f"camvid:{camvid_root}#split=val")
    assert isinstance(combined, CombinedDataset) and combined.lengths == (2, 2) and len(combined) == 4
    assert [s["path"] for s in combined] == [train[1]["path"], train[2]["path"], val[0]["path"], val[1]["path"]]
    assert combined.classes == train.classes and combined.mixture is None
    assert torch.equal(combined[3]["mask"], val[1]["mask"])
    with pytest.raises(IndexError):
        combined[4]
    # a split argument reaches every part
    assert len(load_dataset(f"camvid:{camvid_root}+camvid:{camvid_root}", split="val")) == 4
    assert "camvid at" in describe_spec(spec) and " + " in describe_spec(spec)


def test_ratio_is_a_trailing_option_of_the_combination(camvid_root):
    combined = load_dataset(f"camvid:{camvid_root}+camvid:{camvid_root}#split=val,ratio=3:1")
    assert combined.mixture == Mixture((3, 2), (3.0, 1.0))
    assert len(combined) == 5  # the ratio changes sampling, not the samples


@pytest.mark.parametrize("suffix, message", [
    ("#ratio=1:1:1", r"ratio=1:1:1; expected 2 positive weights separated by ':'"),
    ("#ratio=1:0", "expected 2 positive weights"),
    ("#ratio=a:b", "expected 2 positive weights"),
])
def test_bad_ratios(camvid_root, suffix, message):
    with pytest.raises(UserError, match=message):
        load_dataset(f"camvid:{camvid_root}+camvid:{camvid_root}{suffix}")


def test_ratio_needs_parts_and_goes_last(camvid_root):
    with pytest.raises(UserError, match="needs several parts"):
        load_dataset(f"camvid:{camvid_root}#ratio=1")
    with pytest.raises(UserError, match="goes once, on the last part"):
        load_dataset(f"camvid:{camvid_root}#ratio=1:1+camvid:{camvid_root}")


def test_parts_with_other_classes_are_refused_naming_both(camvid_root, folder_root, ade20k_root):
    with pytest.raises(UserError, match=rf"'camvid:{camvid_root}' has 11 classes but 'ade20k:{ade20k_root}' has 150"):
        load_dataset(f"camvid:{camvid_root}+ade20k:{ade20k_root}")
    (folder_root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(11)))
    with pytest.raises(UserError, match=rf"class 0 named 'Sky' but 'folder:{folder_root}' names it 'c0'"):
        load_dataset(f"camvid:{camvid_root}+folder:{folder_root}")


def test_resolve_split_of_combined_specs():
    assert resolve_split("synthetic+synthetic", None, "val") == "val"
    assert resolve_split("synthetic#split=train+synthetic#split=train", None, "val") == "train"
    assert resolve_split("synthetic#split=train+synthetic#split=val", None, "val") is None  # each its own
    assert resolve_split("synthetic#split=train+synthetic", "test", "val") == "test"
    with pytest.raises(UserError, match="some parts set #split= and some do not"):
        resolve_split("synthetic#split=train+synthetic", None, "val")
    with pytest.raises(UserError, match="combines several datasets"):
        parse_spec("synthetic+synthetic")
