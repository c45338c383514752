"""Regeneration backends: fill the pixels a mask marks with new content, one image at a time.

Every backend is a callable ``backend(image, regenerate, *, seed, index) -> image``: image uint8
(3, H, W), regenerate bool (H, W) (True = make new), `seed` the image's seed, `index` its place in the
dataset; the result is uint8 (3, H, W) at the input size. What a backend does with the preserved pixels
does not matter: `trustseg.augment.compose` pastes the originals back.

- ``opencv``: classical inpainting (`cv2.inpaint`), Telea's fast marching method (Telea 2004) or the
  Navier-Stokes method (Bertalmio et al. 2001). No model; fast; smooth, texture-less fills.
- ``texture``: the regenerated pixels come from another training image of the same dataset (the
  donor), so the context is real-looking content that is new to the preserved objects. The donor of
  image ``i`` of ``n`` is ``(i + 1 + r) mod n`` with ``r`` uniform in ``0..n-2`` (never ``i`` itself
  when n > 1), resized to the image's size (area interpolation when shrinking, bilinear when growing)
  and mirrored left-right with probability 1/2; ``r`` and the mirroring are drawn from a generator
  seeded with the image's seed. A one-image dataset is its own donor, always mirrored.
- ``diffusers``: SDXL / FLUX inpainting pipelines from a local folder (`trustseg.augment.diffusion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch import Tensor

from trustseg.errors import UserError

BACKEND_NAMES = ("opencv", "texture", "diffusers")
OPENCV_METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

Backend = Callable[..., Tensor]


@dataclass(frozen=True)
class BackendConfig:
    """How the complement is regenerated. `model`, `prompt`, `negative_prompt`, `steps`, `guidance`,
    `strength` and `resolution` only concern ``diffusers`` (defaults: Röhrich et al. 2026; the prompts
    default to the dataset's, `trustseg.augment.diffusion.dataset_prompts`)."""

    name: str = "opencv"
    opencv_method: str = "telea"
    inpaint_radius: int = 3
    model: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int = 40
    guidance: float = 7.0
    strength: float = 0.9999
    resolution: int = 1024  # side of the square bucket; the other buckets keep its area

    def __post_init__(self) -> None:
        if self.name not in BACKEND_NAMES:
            raise UserError(f"--backend {self.name!r}: expected one of {', '.join(BACKEND_NAMES)}")
        if self.opencv_method not in OPENCV_METHODS:
            raise UserError(f"--opencv-method {self.opencv_method!r}: expected one of {', '.join(OPENCV_METHODS)}")
        if self.inpaint_radius < 1 or self.steps < 1 or self.resolution < 64:
            raise UserError(f"backend settings: inpaint radius {self.inpaint_radius} and steps {self.steps} must be "
                            f">= 1, resolution {self.resolution} >= 64")
        if not 0 < self.strength <= 1:
            raise UserError(f"--strength {self.strength}: expected a number in (0, 1]")


def opencv_backend(method: str = "telea", radius: int = 3) -> Backend:
    """Inpainting with `cv2.inpaint` (`OPENCV_METHODS`) in a `radius`-pixel neighbourhood."""
    flag = OPENCV_METHODS[method]

    def regenerate(image: Tensor, mask: Tensor, *, seed: int, index: int) -> Tensor:
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
        holes = mask.cpu().numpy().astype(np.uint8) * 255
        return torch.from_numpy(cv2.inpaint(pixels, holes, radius, flag)).permute(2, 0, 1).contiguous()

    return regenerate


def donor_of(index: int, count: int, seed: int) -> tuple[int, bool]:
    """(donor index, mirrored) of image `index` of `count` for the texture backend (module doc)."""
    generator = torch.Generator().manual_seed(seed)
    if count == 1:
        return index, True
    offset = 1 + int(torch.randint(count - 1, (1,), generator=generator))
    return (index + offset) % count, bool(torch.randint(2, (1,), generator=generator))


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """uint8 (3, h, w) -> (3, height, width): area interpolation when shrinking, bilinear when growing."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    shrink = height * width < image.shape[-2] * image.shape[-1]
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    resized = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return torch.from_numpy(resized.reshape(height, width, -1)).permute(2, 0, 1).contiguous()


def texture_backend(dataset) -> Backend:
    """Fill the regenerated pixels with a donor image of `dataset` (module doc); images are told apart by
    the `index` keyword (their place in `dataset`)."""

    def regenerate(image: Tensor, mask: Tensor, *, seed: int, index: int) -> Tensor:
        donor_index, mirrored = donor_of(index, len(dataset), seed)
        donor = resize_image(dataset[donor_index]["image"], *image.shape[-2:])
        if mirrored:
            donor = donor.flip(-1)
        return torch.where(mask.to(image.device)[None], donor.to(image.device), image)

    return regenerate


def check_backend(config: BackendConfig) -> None:
    """Refuse a backend that cannot run here (diffusers missing, no model folder) before any work."""
    if config.name != "diffusers":
        return
    from trustseg.augment.diffusion import check_diffusers

    check_diffusers(config.model)


def build_backend(config: BackendConfig, dataset, layout: str, device: torch.device) -> Backend:
    """The backend `config` names, on `device`; `dataset` is the data being augmented (the texture
    backend's donors) and `layout` its spec name ("cityscapes", ...: the diffusers default prompts)."""
    if config.name == "opencv":
        return opencv_backend(config.opencv_method, config.inpaint_radius)
    if config.name == "texture":
        return texture_backend(dataset)
    from trustseg.augment.diffusion import diffusers_backend

    return diffusers_backend(config, layout, device)


def model_folder(path: str | None) -> Path:
    """The local diffusers pipeline folder `path`, if it exists and holds a model_index.json."""
    if not path:
        raise UserError("--backend diffusers needs --model, a local diffusers inpainting pipeline folder "
                        "(e.g. one saved by save_pretrained); nothing is downloaded")
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        what = "does not exist" if not folder.exists() else "holds no model_index.json (not a diffusers pipeline)"
        raise UserError(f"--model {folder}: the local diffusers model folder {what}")
    return folder
