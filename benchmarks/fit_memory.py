"""Peak tensor memory of collecting calibration fit data on Cityscapes-sized inputs.

The model is a 1x1 convolution from RGB to 19 class logits, so the logits are Cityscapes-sized
(19 x 1024 x 2048 float32, 152 MiB per image) while the model itself costs nothing. The images and
label maps are random (labels 0..18, 10 % ignore). The count is `trustseg.bench.memory.peak_tensor_bytes`:
every tensor allocated while collecting, alive at the same time (model outputs, the kept sample).

    python benchmarks/fit_memory.py --images 2,4,8

measures the code on PYTHONPATH: this tree (streaming sample: `calibrators.fit_data.collect_fit_data`)
or, for the figures before it, a checkout of commit 80000bb, whose `calibrators.fit.collect_fit_data`
kept every fit image's whole logit map for LTS/IBTS (`--max-maps`, default 64).
"""

from __future__ import annotations

import argparse
import time

import torch

from trustseg.bench.memory import peak_tensor_bytes
from trustseg.data.base import ClassInfo

K, H, W = 19, 1024, 2048
CLASSES = ClassInfo(names=tuple(f"c{k}" for k in range(K)), palette=((0, 0, 0),) * K)


class RandomCityscapes:
    """`num_images` random 1024x2048 images with 19-class label maps, 10 % ignored, seeded per index."""

    classes = CLASSES

    def __init__(self, num_images: int) -> None:
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        mask = torch.randint(0, K, (H, W), generator=generator)
        mask[torch.rand(H, W, generator=generator) < 0.1] = 255
        image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=generator)
        return {"image": image, "mask": mask, "path": f"random/{index:04d}.png"}


def collector(max_pixels: int, max_crops: int, fit_crop: int):
    """The fit-data collection of the code on PYTHONPATH, with the given bounds."""
    try:
        from trustseg.calibrators.fit_data import collect_fit_data
    except ImportError:  # before: whole maps, at most `max_maps` of them
        from trustseg.calibrators.fit import collect_fit_data

        return "whole maps (max_maps)", lambda model, data: collect_fit_data(
            model, data, max_pixels=max_pixels, max_maps=max_crops, progress=False)
    return "streaming sample + crops", lambda model, data: collect_fit_data(
        model, data, max_pixels=max_pixels, max_crops=max_crops, crop_size=fit_crop, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="2,4,8", help="comma-separated numbers of fit images")
    parser.add_argument("--max-pixels", type=int, default=1_000_000)
    parser.add_argument("--max-crops", type=int, default=64, help="crops kept (before: whole maps kept)")
    parser.add_argument("--fit-crop", type=int, default=512)
    args = parser.parse_args()
    model = torch.nn.Conv2d(3, K, 1).eval()
    predictor = lambda images: model(images.float() / 255)  # noqa: E731
    what, collect = collector(args.max_pixels, args.max_crops, args.fit_crop)
    print(f"{what}; max_pixels {args.max_pixels}, max crops/maps {args.max_crops}, crop {args.fit_crop}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| fit images | peak MiB | kept MiB | seconds |")
    print("|---|---|---|---|")
    for count in (int(n) for n in args.images.split(",")):
        kept: list = []
        start = time.perf_counter()
        peak = peak_tensor_bytes(lambda: kept.append(collect(predictor, RandomCityscapes(count))))
        seconds = time.perf_counter() - start
        data = kept[0]
        tensors = [data.logits, data.labels, *(t for m in data.maps for t in m)]
        kept_bytes = sum(t.untyped_storage().nbytes() for t in tensors)
        print(f"| {count} | {peak / 2**20:.0f} | {kept_bytes / 2**20:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
