"""Distillation: the loss against torch's KLDivLoss, and a training run with a teacher checkpoint."""

import json

import pytest
import torch
import torch.nn.functional as F

from trustseg.data.synthetic import SyntheticDataset
from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.training import train
from trustseg.training.distill import distillation_loss

VIT = ["model.name=vit_segmenter", "model.options={backbone: vit_ti16, depth: 2}", "steps=2", "optim.lr=0.001",
       "schedule.warmup_steps=0"]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_distillation_loss_is_per_pixel_kl_times_t_squared(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    # oracle: torch's KLDivLoss over rows of pixels (B*H*W, K), "batchmean" = mean over pixels
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 5) / temperature  # noqa: E731
    expected = F.kl_div(F.log_softmax(rows(student), 1), F.log_softmax(rows(teacher), 1), log_target=True,
                        reduction="batchmean") * temperature**2
    torch.testing.assert_close(distillation_loss(student, teacher, temperature), expected)
    assert distillation_loss(teacher, teacher, temperature).abs() < 1e-6


def test_the_teacher_gets_no_gradient():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


@pytest.fixture
def teacher_path(tmp_path):
    """The student's own initial weights (seed 3, as tiny_config) saved as the teacher checkpoint."""
    classes = SyntheticDataset("val", num_images=1, size=32).classes
    torch.manual_seed(3)
    options = {"backbone": "vit_ti16", "depth": 2}
    model = build_model("vit_segmenter", num_classes=classes.num_classes, **options)
    path = tmp_path / "teacher.pt"
    save_checkpoint(Checkpoint({"name": "vit_segmenter", "options": options}, model.state_dict(), classes), path)
    return path


def history(result):
    return [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_training_adds_the_weighted_distillation_term(tiny_config, teacher_path):
    """With the student's own start as teacher the term is 0 at step 1 and has a zero gradient there, so
    both runs take the same first update; at step 2 the loss differs by exactly weight * distill_loss."""
    alone = history(train(tiny_config(*VIT, out="alone"), progress=False))
    taught = history(train(tiny_config(*VIT, f"distill.teacher={teacher_path}", "distill.weight=3.0",
                                       "distill.temperature=2.0", out="taught"), progress=False))
    assert taught[0]["distill_loss"] == pytest.approx(0.0, abs=1e-9)
    assert taught[0]["loss"] == pytest.approx(alone[0]["loss"], rel=1e-6)
    assert taught[1]["distill_loss"] > 1e-7
    assert taught[1]["loss"] == pytest.approx(alone[1]["loss"] + 3.0 * taught[1]["distill_loss"], rel=1e-4)
    assert "distill_loss" not in alone[0]


def test_a_teacher_for_other_classes_or_normalisation_is_refused(tiny_config, tmp_path):
    classes = SyntheticDataset("val", num_images=1, size=32).classes
    model = build_model("unet", num_classes=3, base_width=4, depth=2)
    three = Checkpoint({"name": "unet", "options": {"base_width": 4, "depth": 2}}, model.state_dict(),
                       type(classes)(names=("a", "b", "c"), palette=((0, 0, 0),) * 3))
    save_checkpoint(three, tmp_path / "three.pt")
    with pytest.raises(UserError, match="predicts 3 classes"):
        train(tiny_config(f"distill.teacher={tmp_path / 'three.pt'}"), progress=False)
    model = build_model("unet", num_classes=classes.num_classes, base_width=4, depth=2)
    other = Checkpoint({"name": "unet", "options": {"base_width": 4, "depth": 2}}, model.state_dict(), classes,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(UserError, match="set data.mean and data.std"):
        train(tiny_config(f"distill.teacher={tmp_path / 'other.pt'}"), progress=False)


@pytest.mark.parametrize("setting,message", [("distill.weight=-1", "distill.weight"),
                                             ("distill.temperature=0", "distill.temperature")])
def test_bad_distillation_settings_are_user_errors(tiny_config, setting, message):
    with pytest.raises(UserError, match=message):
        tiny_config(setting)
