"""Datasets stored as image and mask files: one :class:`FileDataset`, one small finder per layout.

A layout function (``camvid``, ``cityscapes``, ``ade20k``, ``voc``, ``foodseg103``, ``folder``)
checks the folder structure, finds the (image, mask) pairs of one split and picks the class table
and label map; :class:`FileDataset` decodes, validates and maps the files. Every problem with the
files on disk is a :class:`~trustseg.errors.UserError` whose message names the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from trustseg.data import classes as tables
from trustseg.data.base import IGNORE_INDEX, MAX_CLASSES, WIDE_IGNORE_INDEX, ClassInfo, Sample, mask_dtype
from trustseg.data.classes import LabelMap
from trustseg.data.paths import inside
from trustseg.data.readers import IMAGE_EXTENSIONS, read_image, read_mask_array
from trustseg.errors import UserError

log = logging.getLogger(__name__)


class FileDataset:
    """Map-style dataset over (image file, mask file) pairs.

    Masks are mapped to class ids ``0..K-1`` / the ignore label by ``label_map`` when read. With
    ``cache=True`` every sample is decoded once, up front (which also validates every file), and kept
    in memory as uint8 (masks as uint16 above 255 classes); CamVid train takes about 250 MB that way.
    """

    def __init__(self, pairs: Sequence[tuple[Path | str, Path | str]], classes: ClassInfo,
                 label_map: LabelMap, *, name: str = "dataset", cache: bool = False) -> None:
        if label_map.num_classes != classes.num_classes:
            raise ValueError(f"label map has {label_map.num_classes} classes, class table {classes.num_classes}")
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        if not self.pairs:
            raise UserError(f"{name}: dataset is empty (no image/mask pairs found)")
        self.classes = classes
        self.label_map = label_map
        self.name = name
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if cache:
            workers = min(4, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes without the GIL
                decoded = list(pool.map(self._decode, range(len(self.pairs))))
            # class ids and the ignore label fit the mask dtype of the class count (8 or 16 bits)
            dtype = mask_dtype(classes.num_classes)
            self._cache = [(image.numpy(), mask.numpy().astype(dtype)) for image, mask in decoded]
            megabytes = sum(i.nbytes + m.nbytes for i, m in self._cache) / 2**20
            log.info("%s: cached %d samples in memory (%.0f MB)", name, len(self._cache), megabytes)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        if self._cache is not None:
            # copies (made by numpy: cheaper than torch's thread pool for one sample), so that a
            # transform writing in place cannot corrupt the cache
            image, mask = self._cache[index]
            image, mask = torch.from_numpy(image.copy()), torch.from_numpy(mask.astype(np.int64))
        else:
            image, mask = self._decode(index)
        return {"image": image, "mask": mask, "path": str(self.pairs[index][0])}

    def __repr__(self) -> str:
        return f"FileDataset({self.name}, {len(self)} samples, {self.classes.num_classes} classes)"

    def _decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_mask_array(mask_path)
        if tuple(image.shape[1:]) != tuple(raw.shape):
            raise UserError(
                f"{image_path} is {_size(image.shape[1:])} but its mask {mask_path} is "
                f"{_size(raw.shape)} (W x H); image and mask must have the same size"
            )
        return image, self.label_map(raw, mask_path)


def _size(shape: Sequence[int]) -> str:
    return f"{shape[-1]}x{shape[-2]}"


# --- helpers shared by the layouts ---------------------------------------------------------------

def _root(path: Path | str, layout: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        kind = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"{root}: {layout} data folder {kind}")
    return root


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder}: missing {what} folder")
    return folder


def _split_name(split: object) -> str:
    if not isinstance(split, str) or not split:
        raise UserError(f"split must be a non-empty name such as 'train' or 'val', got {split!r}")
    return split


def _list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UserError(f"{folder}: no images found (expected {', '.join(IMAGE_EXTENSIONS)} files)")
    return images


def _match(images: Iterable[Path], mask_for: Callable[[Path], Path]) -> list[tuple[Path, Path]]:
    pairs = []
    for image in images:
        mask = mask_for(image)
        if not mask.is_file():
            raise UserError(f"{image}: no mask for this image (expected {mask})")
        pairs.append((image, mask))
    return pairs


def _dataset_name(layout: str, root: Path, split: str) -> str:
    return f"{layout}:{root}#split={split}"


# --- layouts --------------------------------------------------------------------------------------

def camvid(root: Path | str, split: str = "train", *, cache: bool = False) -> FileDataset:
    """CamVid, SegNet layout: ``{split}/*.png`` with same-named labels in ``{split}annot/``; 11 = void."""
    root = _root(root, "CamVid")
    split = _split_name(split)
    image_dir, mask_dir = root / split, root / f"{split}annot"
    if not (image_dir.is_dir() and mask_dir.is_dir()):
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and (root / f"{d.name}annot").is_dir())
        raise UserError(
            f"{root}: no CamVid split '{split}' (needs {split}/ and {split}annot/; splits here: "
            f"{', '.join(found) or 'none'}; expected the SegNet layout train/ trainannot/ val/ valannot/ ...)"
        )
    pairs = _match(_list_images(image_dir), lambda image: mask_dir / image.name)
    label_map = LabelMap.identity(tables.CAMVID.num_classes, ignore=(tables.CAMVID_VOID, IGNORE_INDEX))
    return FileDataset(pairs, tables.CAMVID, label_map, name=_dataset_name("camvid", root, split), cache=cache)


_CITYSCAPES_LABELS = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}


def cityscapes(root: Path | str, split: str = "train", *, cache: bool = False,
               label_type: str = "labelIds") -> FileDataset:
    """Cityscapes fine annotations: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
    ``gtFine/{split}/{city}/*_gtFine_labelIds.png``; the 34 label ids map to the 19 train ids, the
    rest to ignore. ``label_type="labelTrainIds"`` reads already converted ``*_gtFine_labelTrainIds.png``.
    """
    root = _root(root, "Cityscapes")
    split = _split_name(split)
    if label_type not in _CITYSCAPES_LABELS:
        raise UserError(f"cityscapes: unknown label_type {label_type!r}; expected one of "
                        f"{', '.join(_CITYSCAPES_LABELS)}")
    image_dir = _require_dir(root / "leftImg8bit" / split, f"Cityscapes image split ('{split}')")
    mask_dir = _require_dir(root / "gtFine" / split, f"Cityscapes annotation split ('{split}')")
    suffix = "_leftImg8bit.png"
    images = sorted(image_dir.glob(f"*/*{suffix}"))
    if not images:
        raise UserError(f"{image_dir}: no images found (expected {{city}}/*{suffix})")
    mask_suffix = _CITYSCAPES_LABELS[label_type]
    pairs = _match(images, lambda image: mask_dir / image.parent.name / (image.name[: -len(suffix)] + mask_suffix))
    num_classes = tables.CITYSCAPES.num_classes
    if label_type == "labelIds":
        label_map = LabelMap.from_table(tables.CITYSCAPES_TRAIN_IDS, num_classes)
    else:
        label_map = LabelMap.identity(num_classes)
    return FileDataset(pairs, tables.CITYSCAPES, label_map, name=_dataset_name("cityscapes", root, split),
                       cache=cache)


_ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def ade20k(root: Path | str, split: str = "train", *, cache: bool = False) -> FileDataset:
    """ADE20K SceneParsing (ADEChallengeData2016): ``images/{training,validation}/*.jpg`` and
    ``annotations/.../*.png``; raw 0 ("other") is ignored, 1..150 become classes 0..149.
    ``root`` may be the ADEChallengeData2016 folder or its parent.
    """
    root = _root(root, "ADE20K")
    split = _split_name(split)
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    if split not in _ADE20K_SPLITS:
        raise UserError(f"ade20k: unknown split {split!r}; expected train or val")
    folder = _ADE20K_SPLITS[split]
    image_dir = _require_dir(root / "images" / folder, "ADE20K images/" + folder)
    mask_dir = _require_dir(root / "annotations" / folder, "ADE20K annotations/" + folder)
    pairs = _match(_list_images(image_dir), lambda image: mask_dir / f"{image.stem}.png")
    label_map = LabelMap.reduce_zero(tables.ADE20K.num_classes)
    return FileDataset(pairs, tables.ADE20K, label_map, name=_dataset_name("ade20k", root, split), cache=cache)


def voc(root: Path | str, split: str = "train", *, cache: bool = False,
        mask_dir: str = "SegmentationClass") -> FileDataset:
    """PASCAL VOC 2012: ids from ``ImageSets/Segmentation/{split}.txt``, ``JPEGImages/{id}.jpg`` and
    palette PNGs ``SegmentationClass/{id}.png`` read as palette indices (255 = border, ignored).
    ``root`` may be VOC2012, VOCdevkit or the folder holding VOCdevkit; ``mask_dir`` selects e.g.
    ``SegmentationClassAug`` (the SBD-augmented labels).
    """
    given = _root(root, "PASCAL VOC")
    split = _split_name(split)
    for candidate in (given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            root = candidate
            break
    else:
        raise UserError(f"{given}: not a PASCAL VOC 2012 folder (expected JPEGImages/, {mask_dir}/ and "
                        f"ImageSets/Segmentation/ here or in VOC2012/ or VOCdevkit/VOC2012/)")
    list_dir = _require_dir(root / "ImageSets" / "Segmentation", "VOC split lists (ImageSets/Segmentation)")
    list_file = list_dir / f"{split}.txt"
    if not list_file.is_file():
        found = sorted(p.stem for p in list_dir.glob("*.txt"))
        raise UserError(f"{list_file}: VOC split list not found (lists here: {', '.join(found) or 'none'})")
    labels = _require_dir(root / mask_dir, "VOC annotation")
    images = []
    for sample_id in (line.strip() for line in list_file.read_text().splitlines()):
        if not sample_id:
            continue
        image = inside(root / "JPEGImages", f"{sample_id}.jpg", f"{list_file}: sample id")
        if not image.is_file():
            raise UserError(f"{list_file}: lists '{sample_id}' but {image} does not exist")
        images.append(image)
    if not images:
        raise UserError(f"{list_file}: split list is empty")
    pairs = _match(images, lambda image: inside(labels, image.relative_to(root / "JPEGImages").with_suffix(".png"),
                                                f"{list_file}: sample id"))
    label_map = LabelMap.identity(tables.VOC.num_classes)
    return FileDataset(pairs, tables.VOC, label_map, name=_dataset_name("voc", root, split), cache=cache)


# FoodSeg103 has no validation split; its test split is the one everybody evaluates on
_FOODSEG103_SPLITS = {"train": "train", "test": "test", "val": "test"}


def foodseg103(root: Path | str, split: str = "train", *, cache: bool = False) -> FileDataset:
    """FoodSeg103: ``Images/img_dir/{train,test}/*.jpg`` and ``Images/ann_dir/.../*.png``, labels
    0 (background) .. 103. ``root`` may be the ``Images`` folder, its parent, or the folder holding
    ``FoodSeg103/``; split ``val`` is the test split.
    """
    given = _root(root, "FoodSeg103")
    split = _split_name(split)
    for candidate in (given, given / "Images", given / "FoodSeg103" / "Images"):
        if (candidate / "img_dir").is_dir():
            base = candidate
            break
    else:
        raise UserError(f"{given}: not a FoodSeg103 folder (expected Images/img_dir/ and Images/ann_dir/)")
    if split not in _FOODSEG103_SPLITS:
        raise UserError(f"foodseg103: unknown split {split!r}; expected train or test (val = test)")
    folder = _FOODSEG103_SPLITS[split]
    image_dir = _require_dir(base / "img_dir" / folder, f"FoodSeg103 img_dir/{folder}")
    mask_dir = _require_dir(base / "ann_dir" / folder, f"FoodSeg103 ann_dir/{folder}")
    pairs = _match(_list_images(image_dir), lambda image: mask_dir / f"{image.stem}.png")
    label_map = LabelMap.identity(tables.FOODSEG103.num_classes)
    return FileDataset(pairs, tables.FOODSEG103, label_map, name=_dataset_name("foodseg103", base, split),
                       cache=cache)


def folder(root: Path | str, split: str = "train", *, cache: bool = False, num_classes: int | None = None,
           reduce_zero_label: bool = False) -> FileDataset:
    """Your own data: ``images/`` and ``masks/`` (PNG, same stem), optionally split into
    ``images/{split}/`` + ``masks/{split}/`` (without split folders every split is the whole folder).

    Class names come from ``classes.txt`` (one per line) next to ``images/``; without it the number
    of classes is ``num_classes`` or, failing that, inferred once from the largest label value over
    all masks (logged as a warning). ``reduce_zero_label=True`` reads labels 1..K with 0 = ignore.
    Up to 255 classes masks are 8-bit with 255 = ignore; above, 16-bit PNGs with 65535 = ignore.
    """
    root = _root(root, "folder")
    split = _split_name(split)
    image_root = _require_dir(root / "images", "images/")
    mask_root = _require_dir(root / "masks", "masks/")
    splits = sorted(d.name for d in image_root.iterdir() if d.is_dir())
    flat = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in image_root.iterdir())
    if splits and not flat:
        if split not in splits:
            raise UserError(f"{root}: no split folder images/{split}/ (splits here: {', '.join(splits)})")
        image_dir = image_root / split
        mask_dir = _require_dir(mask_root / split, f"masks/{split}/")
    else:
        image_dir, mask_dir = image_root, mask_root
    images = _list_images(image_dir)
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise UserError(f"{image}: two images share the stem '{image.stem}' ({stems[image.stem].name}); "
                            f"masks are matched by stem")
        stems[image.stem] = image
    pairs = _match(images, lambda image: mask_dir / f"{image.stem}.png")
    class_info = _folder_classes(root, mask_root, num_classes, reduce_zero_label)
    k = class_info.num_classes
    label_map = LabelMap.reduce_zero(k) if reduce_zero_label else LabelMap.identity(k, suggest_reduce_zero=True)
    return FileDataset(pairs, class_info, label_map, name=_dataset_name("folder", root, split), cache=cache)


def _folder_classes(root: Path, mask_root: Path, num_classes: object, reduce_zero_label: bool) -> ClassInfo:
    limit = MAX_CLASSES - 1 if reduce_zero_label else MAX_CLASSES
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= limit):
        raise UserError(f"folder: num_classes must be an integer in 1..{limit}, got {num_classes!r}")
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if not 1 <= len(names) <= limit:
            raise UserError(f"{names_file}: expected 1..{limit} class names (one per line), found {len(names)}")
        if num_classes is not None and num_classes != len(names):
            raise UserError(f"{names_file}: lists {len(names)} classes but num_classes={num_classes} was given")
        return tables.generic_classes(names)
    if num_classes is None:
        num_classes = _infer_num_classes(mask_root, reduce_zero_label)
    return tables.generic_classes(f"class_{i}" for i in range(num_classes))


def _infer_num_classes(mask_root: Path, reduce_zero_label: bool) -> int:
    masks = sorted(mask_root.rglob("*.png"))
    seen: set[int] = set()
    for mask in masks:
        values = np.unique(read_mask_array(mask)).tolist()
        if values[0] < 0 or values[-1] > WIDE_IGNORE_INDEX:
            raise UserError(f"{mask}: label values outside 0..{WIDE_IGNORE_INDEX}; expected 8- or 16-bit "
                            f"class indices")
        seen.update(values)
    seen.discard(WIDE_IGNORE_INDEX)
    # 255 is the ignore label unless the labels go beyond it (then it is a class, and 65535 ignores)
    if max(seen, default=0) <= IGNORE_INDEX:
        seen.discard(IGNORE_INDEX)
    if reduce_zero_label:
        seen.discard(0)
    present = sorted(seen)
    if not present:
        raise UserError(f"{mask_root}: masks contain no class labels (only ignore); cannot infer num_classes")
    num_classes = present[-1] if reduce_zero_label else present[-1] + 1
    log.warning(
        "%s: no classes.txt; inferred num_classes=%d from label values %s in %d masks "
        "(add classes.txt or #num_classes=K to make this explicit)",
        mask_root.parent, num_classes, tables.format_values(present), len(masks),
    )
    return num_classes


LAYOUTS: dict[str, Callable[..., FileDataset]] = {
    "camvid": camvid,
    "cityscapes": cityscapes,
    "ade20k": ade20k,
    "voc": voc,
    "foodseg103": foodseg103,
    "folder": folder,
}
