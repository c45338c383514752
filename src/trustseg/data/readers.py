"""Decode image and mask files into tensors; every decoding problem becomes a one-line UserError.

Images come back as uint8 (3, H, W) RGB. Masks come back as the raw stored indices, int64 (H, W):
palette ("P") PNGs are read as palette indices, never as colours, and a colour mask is refused
unless its three channels are identical (a grey mask saved as RGB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trustseg.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_INDEX_MODES = {"L", "P", "I", "I;16", "I;16L", "I;16B", "1"}


def _open(path: Path | str, what: str) -> Image.Image:
    """Open and fully decode ``path``: a truncated file fails here, not later in a DataLoader worker."""
    try:
        picture = Image.open(path)
        picture.load()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{path}: cannot decode {what} ({reason}); expected a complete image file "
                        f"(PNG, JPEG, ...)") from None
    return picture


def read_image(path: Path | str) -> torch.Tensor:
    """Decode an image file to uint8 RGB (3, H, W); grey, palette and RGBA images are converted."""
    array = np.asarray(_open(path, "image").convert("RGB"), dtype=np.uint8)
    # a copy, always: np.asarray views Pillow's read-only bytes, and ascontiguousarray would return that
    # view for a 1x1 image (already "contiguous"), which transforms then write into
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def read_mask_array(path: Path | str) -> np.ndarray:
    """Decode a label file to its raw integer values (H, W), keeping the stored dtype (uint8 for L/P)."""
    picture = _open(path, "mask")
    mode = picture.mode
    if mode in _INDEX_MODES:
        array = np.asarray(picture)
    elif mode in ("LA", "PA"):
        array = np.asarray(picture)[..., 0]
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(picture)[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise UserError(f"{path}: mask is a colour ({mode}) image; expected single-channel class "
                            f"indices (8-bit grey 'L' or palette 'P' PNG)")
        array = rgb[..., 0]
    else:
        raise UserError(f"{path}: mask has unsupported image mode {mode!r}; expected single-channel "
                        f"class indices (8-bit grey 'L' or palette 'P' PNG)")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def read_mask(path: Path | str) -> torch.Tensor:
    """Decode a label file to its raw integer values, int64 (H, W)."""
    return torch.from_numpy(read_mask_array(path).astype(np.int64))
