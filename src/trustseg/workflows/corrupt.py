"""`trustseg corrupt`: write a corrupted copy of a dataset in its own layout (Cityscapes-C style,
``OUT/<corruption>/<severity>/<the original relative paths>``), or a corruption x severity gallery.

The images are corrupted exactly as `trustseg robustness` corrupts them on the fly (same per-image
seeds), so evaluating the written copy gives the same numbers. Masks are copied byte for byte, or, for
geometric corruptions, warped with the image's displacement field in their raw label values. Every
file is written atomically and every finished image recorded, so `resume` continues an interrupted
copy with the images still to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trustseg.data.datasets import FileDataset
from trustseg.data.paths import inside
from trustseg.data.readers import read_image, read_mask_array
from trustseg.data.spec import load_dataset, parse_spec, resolve_split
from trustseg.errors import UserError
from trustseg.engine.progress import track
from trustseg.robustness.corruptions import CORRUPTIONS, DISPLACEMENTS, SEVERITIES, corrupt, frost_source
from trustseg.robustness.dataset import condition_seed
from trustseg.engine.checkpoint import atomic_write
from trustseg.engine.journal import Journal
from trustseg.engine.rundir import RunDir
from trustseg.workflows.evaluation import first_images

# Listing and class files a layout may need next to its images (VOC's ImageSets/*.txt, classes.txt, ...).
_METADATA_SUFFIXES = (".txt", ".json", ".csv", ".yaml", ".yml")
_MAX_METADATA_BYTES = 10 * 2**20


@dataclass(frozen=True)
class CorruptConfig:
    data: str
    out: str
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    split: str | None = None  # None: the spec's split, else "val"
    max_images: int | None = None
    seed: int = 0
    gallery: bool = False  # write gallery.png (one image, every corruption x severity) instead of a dataset
    gallery_index: int = 0
    progress: bool = True
    resume: bool = False  # continue the interrupted copy in `out` (same setup), skipping written images


@dataclass
class CorruptResult:
    run_dir: Path
    written: list[Path]


def run_corrupt(config: CorruptConfig) -> CorruptResult:
    split = resolve_split(config.data, config.split, "val")
    dataset = load_dataset(config.data, split=split)
    run_dir = RunDir(config.out)
    settings = {"command": "corrupt", **vars(config), "frost_source": frost_source()}
    if config.gallery:
        run_dir.write_config(settings)
        return CorruptResult(run_dir.path, [write_gallery(dataset, config, run_dir.file("gallery.png"))])
    if not isinstance(dataset, FileDataset):
        raise UserError(f"{config.data}: only datasets read from files can be copied; use --gallery to look at "
                        f"corruptions of generated data")
    root = Path(parse_spec(config.data).path).expanduser()
    pairs = dataset.pairs[: len(first_images(dataset, config.max_images))]
    journal = Journal(run_dir, "corrupt", {"data": config.data, "split": split, "images": len(pairs),
                                           "seed": config.seed, "frost_source": frost_source()},
                      resume=config.resume)
    run_dir.write_config(settings)  # after the journal: a refused rerun leaves the earlier config in place
    metadata = _metadata_files(root)
    conditions = [(name, severity) for name in config.corruptions for severity in config.severities]
    units = [_unit(name, severity, index) for name, severity in conditions for index in range(len(pairs))]
    todo = set(journal.announce(units, "images"))
    for name, severity in conditions:
        target = run_dir.file(Path(name) / str(severity))
        for path in metadata:
            destination = inside(target, path.relative_to(root), "output")
            atomic_write(destination, lambda handle: handle.write(path.read_bytes()))
        indices = [i for i in range(len(pairs)) if _unit(name, severity, i) in todo]
        for index in track(indices, total=len(indices), description=f"{name}/{severity}", enabled=config.progress):
            image_path, mask_path = pairs[index]
            written = _write_pair(root, target, image_path, mask_path, name, severity,
                                  condition_seed(config.seed, name, severity, index))
            journal.record(_unit(name, severity, index), str(written.relative_to(run_dir.path)))
    return CorruptResult(run_dir.path, [run_dir.path / journal.done[unit] for unit in units])


def _unit(name: str, severity: int, index: int) -> str:
    return f"{name}/{severity}/{index}"


def _metadata_files(root: Path) -> list[Path]:
    """The dataset's listing and class files, found with one walk of its tree (not one per condition)."""
    return [path for path in root.rglob("*") if path.suffix.lower() in _METADATA_SUFFIXES and path.is_file()
            and path.stat().st_size < _MAX_METADATA_BYTES]


def _write_pair(root: Path, target: Path, image_path: Path, mask_path: Path, name: str, severity: int,
                seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    geometric = name in DISPLACEMENTS
    raw_mask = torch.from_numpy(read_mask_array(mask_path).astype(np.int64)) if geometric else None
    image, moved = corrupt(read_image(image_path)[None], name, severity, generator,
                           None if raw_mask is None else raw_mask[None])
    image_out = inside(target, image_path.relative_to(root), "output")
    mask_out = inside(target, mask_path.relative_to(root), "output")
    _save(Image.fromarray(image[0].permute(1, 2, 0).numpy()), image_out)
    if moved is None:
        atomic_write(mask_out, lambda handle: handle.write(mask_path.read_bytes()))
    else:
        original = Image.open(mask_path)
        warped = Image.fromarray(moved[0].numpy().astype(np.asarray(original).dtype))
        if original.mode == "P":  # VOC masks stay palette images
            warped.putpalette(original.getpalette())
        _save(warped, mask_out)
    return image_out


def _save(picture: Image.Image, path: Path) -> None:
    """Write `picture` atomically in the format of `path`'s extension; lossy originals stay lossy (the
    layout expects the extension), at a quality that adds little."""
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    lossy = {"quality": 95, "subsampling": 0} if image_format in ("JPEG", "WEBP") else {}
    atomic_write(path, lambda handle: picture.save(handle, format=image_format, **lossy))


def write_gallery(dataset, config: CorruptConfig, path: Path) -> Path:
    """One image under every selected corruption (rows) and severity (columns), corrupted at native size."""
    import matplotlib.pyplot as plt

    from trustseg.report.plots import save_figure  # lazy: matplotlib takes ~0.5 s to import

    if not 0 <= config.gallery_index < len(dataset):
        raise UserError(f"--gallery-index {config.gallery_index} is outside the dataset's {len(dataset)} images")
    image = dataset[config.gallery_index]["image"]
    height, width = image.shape[-2:]
    columns = ["clean", *[f"severity {s}" for s in config.severities]]
    cell = 2.4
    figure_height = cell * height / width * len(config.corruptions) + 0.6
    figure, axes = plt.subplots(len(config.corruptions), len(columns), squeeze=False, dpi=100,
                                figsize=(cell * len(columns), figure_height))
    for row, name in enumerate(track(config.corruptions, total=len(config.corruptions), description="gallery",
                                     enabled=config.progress)):
        panels = [image]
        for severity in config.severities:
            generator = torch.Generator().manual_seed(condition_seed(config.seed, name, severity, config.gallery_index))
            panels.append(corrupt(image[None], name, severity, generator)[0][0])
        for col, panel in enumerate(panels):
            axis = axes[row][col]
            axis.imshow(panel.permute(1, 2, 0).numpy(), interpolation="antialiased")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[col], fontsize=9)
            if col == 0:
                axis.set_ylabel(name, fontsize=8)
    figure.suptitle(f"{dataset[config.gallery_index]['path']} ({width}x{height}), frost: {frost_source()}", fontsize=9,
                    y=1 - 0.08 / figure_height, va="top")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure_height))  # leave the top strip to the title
    return save_figure(figure, path)

