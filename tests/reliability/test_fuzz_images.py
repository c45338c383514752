"""Fuzzing the image and mask readers and the folder dataset built on them.

Inputs: valid PNG/JPEG images and grey/palette/16-bit masks written here, then truncated, bit-flipped or
replaced by random bytes; PNG headers rewritten with any size, bit depth and colour type (with a valid
checksum, so the decoder acts on them); masks saved in every Pillow mode the formats can hold.
Property: an image decodes to uint8 (3, H, W) and a mask to integer (H, W), or the reader raises a
one-line UserError naming the file; a folder dataset of such files yields masks whose values are
class ids or the ignore label, or refuses with a one-line UserError naming the file.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from fuzzing import fuzz_settings, mutated, outcome
from trustseg.data.readers import read_image, read_mask_array
from trustseg.data.spec import load_dataset
from trustseg.errors import UserError

# A tensor over a read-only array (Pillow's bytes) must not reach transforms that write in place.
pytestmark = pytest.mark.filterwarnings("error:The given NumPy array is not writable")

SIZE = (5, 7)  # (H, W) of the valid files
PALETTE = [v for i in range(256) for v in (i, 255 - i, i // 2)]  # 256 distinct colours
_names = itertools.count()


def encode(picture: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **options)
    return buffer.getvalue()


@cache
def valid_files() -> dict[str, tuple[str, bytes]]:
    """kind -> (suffix, bytes of a valid file)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), "RGB")
    labels = rng.integers(0, 3, SIZE, dtype=np.uint8)
    palette = Image.fromarray(labels, "L").convert("P")
    palette.putpalette(PALETTE)
    return {
        "png": (".png", encode(rgb, "PNG")),
        "jpeg": (".jpg", encode(rgb, "JPEG", quality=90)),
        "grey_mask": (".png", encode(Image.fromarray(labels, "L"), "PNG")),
        "palette_mask": (".png", encode(palette, "PNG")),
        "wide_mask": (".png", encode(Image.fromarray(labels.astype(np.uint16) * 300), "PNG")),
    }


def write(folder, suffix: str, data: bytes):
    path = folder / f"f{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


def check_image(result, path) -> None:
    if isinstance(result, UserError):
        return
    assert isinstance(result, torch.Tensor) and result.dtype == torch.uint8, (path, result)
    assert result.dim() == 3 and result.shape[0] == 3 and min(result.shape) >= 1, (path, result.shape)


def check_mask(result, path) -> None:
    if isinstance(result, UserError):
        return
    assert isinstance(result, np.ndarray) and result.dtype.kind in "ui", (path, result.dtype)
    assert result.ndim == 2 and min(result.shape) >= 1, (path, result.shape)


kinds = st.sampled_from(sorted(valid_files()))
png_kinds = st.sampled_from(sorted(kind for kind, (suffix, _) in valid_files().items() if suffix == ".png"))


@fuzz_settings(max_examples=300)
@given(data=st.data(), kind=kinds)
def test_mutated_files_decode_or_refuse(tmp_path, data, kind):
    suffix, valid = valid_files()[kind]
    path = write(tmp_path, suffix, data.draw(mutated(valid)))
    check_image(outcome("read_image", lambda: read_image(path), str(path)), path)
    check_mask(outcome("read_mask_array", lambda: read_mask_array(path), str(path)), path)


def png_with_header(width: int, height: int, depth: int, colour: int, interlace: int, body: bytes) -> bytes:
    """A PNG whose IHDR says the given size and format (valid CRC), followed by the chunks of `body`."""
    fields = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    ihdr = struct.pack(">I", len(fields)) + b"IHDR" + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields))
    return body[:8] + ihdr + body[8 + 25:]  # signature, our IHDR, the rest of the valid file


sizes = st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1))


@fuzz_settings(max_examples=200)
@given(width=sizes, height=sizes, depth=st.sampled_from([1, 2, 4, 8, 16, 3, 32]),
       colour=st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7]), interlace=st.integers(0, 2), kind=png_kinds)
def test_png_headers_of_any_size_and_format(tmp_path, width, height, depth, colour, interlace, kind):
    valid = valid_files()[kind][1]
    path = write(tmp_path, ".png", png_with_header(width, height, depth, colour, interlace, valid))
    check_image(outcome("read_image", lambda: read_image(path), str(path)), path)
    check_mask(outcome("read_mask_array", lambda: read_mask_array(path), str(path)), path)


MODES = ["1", "L", "P", "I", "I;16", "F", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"]
PNG_MODES = ["1", "L", "P", "I;16", "LA", "RGB", "RGBA"]
FORMATS = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp", "JPEG": ".jpg"}


@st.composite
def pictures(draw: st.DrawFn, modes: list[str] = MODES) -> Image.Image:
    """A small image of one of `modes` with random pixel values."""
    mode = draw(st.sampled_from(modes))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bands = len(Image.new(mode, (1, 1)).getbands())
    if mode == "F":
        values = np.array(draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=height * width,
                                        max_size=height * width)), dtype=np.float32).reshape(height, width)
        return Image.fromarray(values)  # mode F
    if mode in ("I", "I;16"):
        low, high = (-2**31, 2**31 - 1) if mode == "I" else (0, 2**16 - 1)
        values = draw(st.lists(st.integers(low, high), min_size=height * width, max_size=height * width))
        dtype = np.int32 if mode == "I" else np.uint16
        return Image.fromarray(np.array(values, dtype=dtype).reshape(height, width))  # mode I or I;16
    raw = draw(st.binary(min_size=height * width * bands, max_size=height * width * bands))
    picture = Image.frombytes(mode, (width, height), raw)
    if mode in ("P", "PA"):  # a full palette of distinct colours: writers keep the indices as they are
        picture.putpalette(PALETTE)
    return picture


def saved(folder, picture: Image.Image, format: str):
    """`picture` written as `format`, or None when Pillow cannot store that mode in it."""
    try:
        data = encode(picture, format)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return write(folder, FORMATS[format], data)


@fuzz_settings(max_examples=200)
@given(picture=pictures(), format=st.sampled_from(sorted(FORMATS)))
def test_masks_of_any_mode_and_depth(tmp_path, picture, format):
    path = saved(tmp_path, picture, format)
    assume(path is not None)
    mask = outcome("read_mask_array", lambda: read_mask_array(path), str(path))
    check_mask(mask, path)
    if not isinstance(mask, UserError):
        assert mask.shape == (picture.height, picture.width)
        if picture.mode in ("L", "P", "I;16") and format in ("PNG", "TIFF"):  # lossless: the stored values
            assert np.array_equal(mask, np.asarray(picture)), path
    check_image(outcome("read_image", lambda: read_image(path), str(path)), path)


@st.composite
def fuzzed_files(draw: st.DrawFn) -> bytes:
    """A file of the folder dataset: a valid one, a mutated one, or a PNG picture of any mode it holds."""
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "mode"]))
    if kind == "mode":
        return encode(draw(pictures(PNG_MODES)), "PNG")
    name = draw(kinds)
    valid = valid_files()[name][1]
    return valid if kind == "valid" else draw(mutated(valid))


@fuzz_settings(max_examples=120)
@given(data=st.data(), named=st.booleans(), num_images=st.integers(1, 3))
def test_folder_dataset_of_fuzzed_files(tmp_path, data, named, num_images):
    root = tmp_path / f"d{next(_names)}"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if named:
        (root / "classes.txt").write_text("zero\none\ntwo\n")
    for i in range(num_images):
        image, mask = data.draw(fuzzed_files()), data.draw(fuzzed_files())
        (root / "images" / f"s{i}.png").write_bytes(image)
        (root / "masks" / f"s{i}.png").write_bytes(mask)

    def read_all():
        dataset = load_dataset(f"folder:{root}")
        return dataset, [dataset[i] for i in range(len(dataset))]

    result = outcome("load_dataset", read_all, str(root))
    if isinstance(result, UserError):
        return
    dataset, samples = result
    classes = dataset.classes
    assert len(samples) == num_images
    for sample in samples:
        image, mask = sample["image"], sample["mask"]
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
        valid = (mask >= 0) & (mask < classes.num_classes) | (mask == classes.ignore_index)
        assert bool(valid.all()), (sample["path"], mask.unique())
