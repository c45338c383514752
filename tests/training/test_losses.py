import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from trustseg.data.base import ClassInfo
from trustseg.training.data import compute_class_weights
from trustseg.training.losses import class_statistics, class_weights, ohem_mask, segmentation_loss

IGNORE = 255


class Masks:
    """A dataset of given masks (images are irrelevant to class statistics)."""

    def __init__(self, masks, num_classes):
        self.masks = masks
        self.classes = ClassInfo(names=tuple(map(str, range(num_classes))), palette=((0, 0, 0),) * num_classes)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        mask = self.masks[index]
        return {"image": torch.zeros(3, *mask.shape, dtype=torch.uint8), "mask": mask, "path": str(index)}


MASKS = [
    torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [IGNORE, IGNORE, 0, 0]]),  # 10 labelled: 7 x class 0, 3 x class 1
    torch.tensor([[0, 2, 2, 2], [0, 2, 2, 2]]),  # 8 labelled: 2 x class 0, 6 x class 2
    torch.tensor([[3, 3], [0, 1]]),  # 4 labelled: 1 x 0, 1 x 1, 2 x 3
]


def test_median_frequency_matches_the_hand_computation():
    # freq_k = pixels of k / labelled pixels of the images where k appears (Eigen & Fergus)
    freq = [10 / 22, 4 / 14, 6 / 8, 2 / 4, None]  # class 4 never appears
    median = statistics.median([f for f in freq if f is not None])
    expected = [median / f if f else 0.0 for f in freq]
    weights = compute_class_weights("median_frequency", Masks(MASKS, 5), progress=False)
    assert weights.tolist() == pytest.approx(expected)
    middle = sorted(weights[:4].tolist())[1:3]  # 4 present classes: the median lies between the middle two
    assert middle[0] < 1.0 < middle[1]


def test_sqrt_inverse_matches_the_hand_computation():
    counts = [10, 4, 6, 2]  # 22 labelled pixels in all
    inverse = [1 / math.sqrt(c / 22) for c in counts]
    mean = sum(inverse) / 4
    weights = compute_class_weights("sqrt_inverse", Masks(MASKS, 5), progress=False)
    assert weights.tolist() == pytest.approx([v / mean for v in inverse] + [0.0])


def test_explicit_and_no_weights():
    dataset = Masks(MASKS, 5)
    assert compute_class_weights("none", dataset, progress=False) is None
    assert compute_class_weights((1, 2, 3, 4, 5), dataset, progress=False).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="3 values but the dataset has 5 classes"):
        compute_class_weights((1, 2, 3), dataset, progress=False)


def test_class_statistics_of_one_mask():
    pixels, image_pixels = class_statistics(MASKS[0], 3, IGNORE)
    assert pixels.tolist() == [7, 3, 0] and image_pixels.tolist() == [10, 10, 0]
    with pytest.raises(ValueError, match="no labelled pixels"):
        class_weights("median_frequency", torch.tensor([0, 0]), torch.tensor([0, 0]))


def test_loss_equals_torch_cross_entropy_with_weights_and_ignore():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=generator)
    target = torch.randint(0, 4, (2, 5, 6), generator=generator)
    target[0, :2] = IGNORE
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0])
    ours = segmentation_loss(logits, target, ignore_index=IGNORE, weight=weight)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE).item())
    plain = segmentation_loss(logits, target, ignore_index=IGNORE)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=IGNORE).item())


def test_ohem_keeps_the_pixels_above_the_threshold_or_the_hardest_fraction():
    loss = torch.tensor([[0.1, 0.9, 0.5], [2.0, 0.2, 0.7]])
    valid = torch.tensor([[True, True, True], [False, True, True]])  # the 2.0 pixel is ignored
    above = ohem_mask(loss, valid, threshold=0.6)
    assert above.tolist() == [[False, True, False], [False, False, True]]
    top_half = ohem_mask(loss, valid, min_kept=0.5)  # ceil(0.5 * 5) = 3 hardest valid pixels
    assert top_half.tolist() == [[False, True, True], [False, False, True]]
    # too few pixels above the threshold: topped up to the minimum
    assert ohem_mask(loss, valid, threshold=0.8, min_kept=0.5).tolist() == top_half.tolist()
    # enough above the threshold: the threshold decides
    assert ohem_mask(loss, valid, threshold=0.3, min_kept=0.2).tolist() == [[False, True, True], [False, False, True]]


def test_ohem_loss_averages_only_the_kept_pixels():
    logits = torch.tensor([[[[4.0, 0.0, -1.0]]], [[[0.0, 0.0, 2.0]]]]).permute(1, 0, 2, 3)  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 0, 0]]])
    pixel = F.cross_entropy(logits, target, reduction="none").flatten()  # easy, medium, hard
    kept = segmentation_loss(logits, target, ignore_index=IGNORE, ohem_threshold=float(pixel[1]) - 1e-6)
    assert kept.item() == pytest.approx(((pixel[1] + pixel[2]) / 2).item())
    only_hardest = segmentation_loss(logits, target, ignore_index=IGNORE, ohem_min_kept=0.2)
    assert only_hardest.item() == pytest.approx(pixel[2].item())


def test_all_ignored_batch_gives_zero_loss_with_a_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), IGNORE), ignore_index=IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
