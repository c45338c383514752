"""The policy network of Content-aware Token Sharing (CTS; Lu, de Geus and Dubbelman, CVPR 2023): for
every 2x2 window of ViT patches (a "superpatch"), the logit that all its pixels belong to one class.

Ground truth comes from label maps (``superpatch_targets``): a window is positive when every pixel of
its 2p x 2p area carries the same class. A window holding an ignore pixel gets no target at all
(``valid`` is False, it is left out of the loss): what the unannotated pixels hold is unknown, and CTS
likewise marks superpatches with ignore pixels as ignore. On a grid of odd height or width the windows
tile the even part only; the last patch row/column is never shared.

The network: CTS uses an ImageNet-pretrained EfficientNet-Lite0 at 512 px whose stride-32 features give
one logit pair per 32 px superpatch, trained with cross-entropy. Here, with no pretrained weights to
download, a small convolutional net trained from scratch: the image is resampled so that every window
covers ``WINDOW_PX`` x ``WINDOW_PX`` pixels (half resolution for patch 16), four stride-2 convolutions
bring it to one cell per window, a 3x3 convolution adds the neighbouring windows as context and a 1x1
convolution gives the logit; trained with binary cross-entropy (one logit instead of CTS's two-way
softmax, the same decision). GroupNorm rather than BatchNorm, so that a prediction never depends on
the other images of its batch. About 85 k parameters and 0.1 GFLOPs at 512 x 512.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.data.base import SegmentationDataset
from trustseg.engine.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from trustseg.errors import UserError
from trustseg.models.weights import load_mapped

WINDOW_PX = 16  # pixels per window side at the network's input = its total stride
WIDTHS = (16, 32, 48, 64)  # channels after each stride-2 convolution


def window_grid(size: Sequence[int], patch_size: int) -> tuple[int, int]:
    """(h2, w2): the 2x2 windows of patches in an image of ``size`` (H, W), over the even part of the grid."""
    return size[0] // patch_size // 2, size[1] // patch_size // 2


def superpatch_targets(labels: Tensor, patch_size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """labels (B, H, W) -> (targets float (B, h2, w2): 1 where the window's pixels are all one class,
    valid bool (B, h2, w2): False where the window holds an ignore pixel, whose target is 0 and unused).

    Window (i, j) covers pixel rows ``2p i .. 2p (i+1) - 1`` and the same columns; pixels right of or
    below the last whole window do not count.
    """
    b = labels.shape[0]
    h2, w2 = window_grid(labels.shape[-2:], patch_size)
    side = 2 * patch_size
    windows = labels[:, : h2 * side, : w2 * side].reshape(b, h2, side, w2, side)
    valid = ~(windows == ignore_index).any(dim=4).any(dim=2)
    single = windows.amax(dim=(2, 4)) == windows.amin(dim=(2, 4))
    return (single & valid).float(), valid


class PolicyNet(nn.Module):
    """images (B, 3, H, W), normalised as the ViT's input -> logits (B, h2, w2), one per 2x2 window."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in WIDTHS:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU()]
            channels = width
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.GELU(),
                   nn.Conv2d(channels, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor, patch_size: int) -> Tensor:
        h2, w2 = window_grid(images.shape[-2:], patch_size)
        side = 2 * patch_size
        x = images[..., : h2 * side, : w2 * side]
        if side != WINDOW_PX:
            x = F.interpolate(x, size=(h2 * WINDOW_PX, w2 * WINDOW_PX), mode="area")  # area: mean over each cell
        return self.layers(x)[:, 0]


def policy_from_state(state: dict[str, Tensor], *, source: str) -> PolicyNet:
    """The policy with weights `state` (a checkpoint's ``token_policy``), frozen; UserError on a mismatch."""
    policy = PolicyNet()
    load_mapped(policy, state, source=source)
    return policy.eval().requires_grad_(False)


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _batch(dataset: SegmentationDataset, indices: list[int], side: int, gen: torch.Generator
           ) -> tuple[Tensor, Tensor]:
    """Uint8 images (B, 3, H, W) and masks (B, H, W) randomly cropped to a common multiple of `side`
    (the batch's smallest height and width, rounded down) and flipped left-right with probability 1/2."""
    samples = [dataset[i] for i in indices]
    height = min(s["image"].shape[-2] for s in samples) // side * side
    width = min(s["image"].shape[-1] for s in samples) // side * side
    if height == 0 or width == 0:
        smallest = min((tuple(s["image"].shape[-2:]) for s in samples), key=min)
        raise UserError(f"CTS policy training: an image of {smallest[0]}x{smallest[1]} px is smaller than one "
                        f"superpatch ({side}x{side} px, 2x2 patches)")
    images, masks = [], []
    for sample in samples:
        top = int(torch.randint(sample["image"].shape[-2] - height + 1, (1,), generator=gen))
        left = int(torch.randint(sample["image"].shape[-1] - width + 1, (1,), generator=gen))
        image = sample["image"][:, top: top + height, left: left + width]
        mask = sample["mask"][top: top + height, left: left + width]
        if bool(torch.rand(1, generator=gen) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        images.append(image)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


def train_policy(
    dataset: SegmentationDataset,
    patch_size: int,
    *,
    steps: int = 500,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    ignore_index: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[PolicyNet, dict[str, Any]]:
    """Train a policy for a ViT of `patch_size` on the labelled `dataset`; returns it (frozen, on `device`)
    and a report (steps, loss of the last steps, the share of single-class windows seen).

    AdamW with CTS's weight decay (1e-3); the learning rate is higher than CTS's 5e-5 because the net
    starts from scratch. Each step draws `batch_size` samples with `seed`, crops them to a common size
    and flips half of them (CTS's augmentation); images are normalised with `mean` and `std` (fractions
    of 255), as the model's predictor normalises them. The same seed gives the same policy on CPU.
    """
    if not _is_count(patch_size, 1):
        raise UserError(f"patch_size={patch_size!r}; expected an int >= 1")
    if not (_is_count(steps, 1) and _is_count(batch_size, 1)):
        raise UserError(f"CTS policy training: steps={steps!r} and batch_size={batch_size!r}; expected ints >= 1")
    if len(dataset) == 0:
        raise UserError("CTS policy training needs a labelled dataset with at least one sample")
    ignore = dataset.classes.ignore_index if ignore_index is None else ignore_index
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the global generator alone
        torch.manual_seed(seed)
        policy = PolicyNet()
    policy = policy.to(device).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    losses: list[float] = []
    positives = windows = 0
    for _ in range(steps):
        indices = torch.randint(len(dataset), (batch_size,), generator=gen).tolist()
        images, masks = _batch(dataset, indices, 2 * patch_size, gen)
        targets, valid = superpatch_targets(masks.to(device), patch_size, ignore)
        if not valid.any():
            continue
        logits = policy((images.to(device).float() - shift) / scale, patch_size)
        loss = F.binary_cross_entropy_with_logits(logits[valid], targets[valid])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        positives += int(targets[valid].sum())
        windows += int(valid.sum())
    last = losses[-max(1, len(losses) // 10):]
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "loss_last": sum(last) / len(last) if last else float("nan"),
              "single_class_fraction": positives / windows if windows else float("nan"),
              "windows_seen": windows}
    return policy.eval().requires_grad_(False), report
