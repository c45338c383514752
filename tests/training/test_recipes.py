"""The fine-tuning recipes in configs/, end to end through `trustseg train`: fake trees in each dataset's
real layout (mixed image sizes), tiny random transformers models saved with ``save_pretrained`` as the
pretrained weights, sizes and steps overridden with --set.

Oracles, independent of our weight loading: transformers itself, run on the batch of the first step.
Whole SegFormer models: the cross-entropy of their logits (upsampled bilinearly, ignore index 255) is
the loss our run records at step 1. Encoder-only MiT and DINOv2 weights: the encoder features of our
model at step 0 are those of the transformers encoder, and for the ViT the recorded loss is a linear
head (our fresh weights, applied by hand) on the transformers tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from data_trees import ade20k_tree, cityscapes_tree, foodseg103_tree

from cli_helpers import run_cli
from trustseg.data.spec import load_dataset
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.training.history import read_history

CONFIGS = Path(__file__).parents[2] / "configs"
# Every random choice of SegFormer's and DINOv2's transformers configs switched off, as in our runs below.
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0}
TINY_RUN = ["steps=2", "batch_size=2", "log_every=1", "val_every=0", "bf16=false", "data.num_workers=0",
            "data.val_batch_size=1"]
SEGFORMER_RUN = [*TINY_RUN, "data.crop=[64,64]", "data.base_size=[64,96]", "model.options.drop_path_rate=0",
                 "model.options.dropout=0"]


def train_cli(recipe: str, data: str, out: Path, overrides: list[str], monkeypatch) -> dict:
    args = ["train", "--config", str(CONFIGS / recipe), "--data", data, "--out", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert run_cli(args, monkeypatch) == 0
    return json.loads((out / "weights.json").read_text())


def step_one_loss(out: Path) -> float:
    return next(r["loss"] for r in read_history(out) if r["kind"] == "train" and r["step"] == 1)


def oracle_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    upsampled = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, masks, ignore_index=255)


def save_segformer(folder: Path, num_labels: int | None) -> transformers.PreTrainedModel:
    """A random SegFormer-B0 (transformers' default sizes): a whole model for ``num_labels`` classes, or
    with None an ImageNet MiT encoder + classifier, the layout of nvidia/mit-b0."""
    torch.manual_seed(0)
    if num_labels is None:
        model = transformers.SegformerForImageClassification(transformers.SegformerConfig(num_labels=10, **NO_DROPOUT))
    else:
        config = transformers.SegformerConfig(num_labels=num_labels, classifier_dropout_prob=0.0, **NO_DROPOUT)
        model = transformers.SegformerForSemanticSegmentation(config)
    model.save_pretrained(folder)
    return model.train()


def test_foodseg103_segformer_recipe_starts_from_the_transformers_model(tmp_path, monkeypatch, first_step):
    root = foodseg103_tree(tmp_path, {"train": [(64, 80), (90, 64), (70, 120)], "test": [(64, 64), (96, 80)]})
    hf = save_segformer(tmp_path / "weights" / "mit-b0", num_labels=104)  # a FoodSeg103 SegFormer-B0
    out = tmp_path / "run"
    record = train_cli("foodseg103_segformer.yaml", f"foodseg103:{root}", out, [
        *SEGFORMER_RUN, f"model.weights={tmp_path}/weights/mit-{{variant}}", "model.options.variant=b0",
        "data.val_crop=[64,64]", "data.val_stride=[32,32]",
    ], monkeypatch)

    assert record["path"] == str(tmp_path / "weights" / "mit-b0")
    assert record["counts"]["new"] == 0 and record["counts"]["ignored"] == 0
    assert record["counts"]["loaded"] == len(first_step["model"].state_dict())
    with torch.no_grad():
        expected = oracle_loss(hf(pixel_values=first_step["images"]).logits, first_step["masks"])
    assert step_one_loss(out) == pytest.approx(float(expected), rel=1e-5)
    assert len(json.loads((out / "metrics.json").read_text())["per_class"]["IoU"]) == 104


def test_cityscapes_segformer_recipe_validates_by_sliding_windows(tmp_path, monkeypatch, first_step):
    root = cityscapes_tree(tmp_path / "cityscapes", {"train": [(64, 128), (48, 96), (80, 160)],
                                                     "val": [(64, 128), (72, 144)]})
    hf = save_segformer(tmp_path / "segformer-b0-cityscapes", num_labels=19)
    out = tmp_path / "run"
    train_cli("cityscapes_segformer_b0.yaml", f"cityscapes:{root}", out, [
        *SEGFORMER_RUN, f"model.weights={tmp_path}/segformer-b0-cityscapes",
        "data.val_crop=[64,64]", "data.val_stride=[32,48]",
    ], monkeypatch)

    with torch.no_grad():
        expected = oracle_loss(hf(pixel_values=first_step["images"]).logits, first_step["masks"])
    assert step_one_loss(out) == pytest.approx(float(expected), rel=1e-5)
    # the validation of the run is the sliding-window evaluation of its final weights
    metrics = json.loads((out / "metrics.json").read_text())
    slide = InferenceConfig(mode="slide", crop=(64, 64), stride=(32, 48))
    again = evaluate(predictor_from_checkpoint(load_checkpoint(out / "last.pt"), slide),
                     load_dataset(f"cityscapes:{root}#split=val"), [ConfusionMatrix(19)], progress=False)
    assert again["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-12)
    assert again["aAcc"] == pytest.approx(metrics["aAcc"], abs=1e-12)


ADE_SIZES = {"train": [(64, 80), (72, 64), (96, 96)], "val": [(64, 64), (80, 96)]}


def test_ade20k_segformer_recipe_loads_the_mit_encoder(tmp_path, monkeypatch, first_step):
    root = ade20k_tree(tmp_path / "ADEChallengeData2016", ADE_SIZES)
    hf = save_segformer(tmp_path / "mit-b0", num_labels=None)
    out = tmp_path / "run"
    record = train_cli("ade20k_segformer_b0.yaml", f"ade20k:{root}", out,
                       [*SEGFORMER_RUN, f"model.weights={tmp_path}/mit-b0"], monkeypatch)

    model = first_step["model"]
    decoder = [k for k in model.state_dict() if k.startswith("decoder.")]
    assert record["new"] == decoder and sorted(record["ignored"]) == ["classifier.bias", "classifier.weight"]
    assert record["loaded"] == [k for k in model.state_dict() if k.startswith("encoder.")]
    with torch.no_grad():
        theirs = hf.segformer(first_step["images"], output_hidden_states=True).hidden_states
        ours = model.forward_features(first_step["images"])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(json.loads((out / "metrics.json").read_text())["per_class"]["IoU"]) == 150


def test_ade20k_dinov2_recipe_loads_the_backbone(tmp_path, monkeypatch, first_step):
    root = ade20k_tree(tmp_path / "ADEChallengeData2016", ADE_SIZES)
    torch.manual_seed(0)
    # ViT-S/14 widths with one block and a 4 x 4 position grid (56 px) keep it tiny
    config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, image_size=56,
                                       patch_size=14, **NO_DROPOUT)
    hf = transformers.Dinov2Model(config)
    hf.save_pretrained(tmp_path / "dinov2-small")
    out = tmp_path / "run"
    record = train_cli("ade20k_vit_s14_dinov2_linear.yaml", f"ade20k:{root}", out, [
        *TINY_RUN, f"model.weights={tmp_path}/dinov2-small", "data.crop=[56,56]", "data.base_size=[56,84]",
        "data.val_crop=[56,56]", "data.val_stride=[28,28]", "model.options.depth=1", "model.options.pos_grid=4",
        "model.options.drop_path=0",
    ], monkeypatch)

    model = first_step["model"]
    assert record["new"] == ["head.proj.weight", "head.proj.bias"]
    assert record["ignored"] == ["embeddings.mask_token"]
    images, masks = first_step["images"], first_step["masks"]
    with torch.no_grad():
        tokens = hf(pixel_values=images).last_hidden_state[:, 1:]  # (B, 16, 384) patch tokens
        head = model.head.proj
        logits = (tokens @ head.weight.T + head.bias).transpose(1, 2).unflatten(2, (4, 4))
    assert step_one_loss(out) == pytest.approx(float(oracle_loss(logits, masks)), rel=1e-5)
