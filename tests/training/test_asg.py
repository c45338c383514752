"""Active Spatial Guidance: the loss on hand-made grids, the warm-up, which tokens the head reads, every
head, and a trained model that is exactly a plain pos=none model (parameters, FLOPs, outputs)."""

import math

import pytest
import torch


from trustseg.engine.checkpoint import load_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops
from trustseg.training import ASGConfig, train
from trustseg.models.positions import grid_positions, position_error
from trustseg.training.asg import GuidedSegmenter, guidance_weight, position_loss
from trustseg.training.history import read_history

VIT = {"backbone": "vit_ti16", "depth": 2, "pos": "none"}


def test_targets_of_a_hand_made_grid_and_of_one_patch_high_or_wide():
    assert grid_positions((2, 3)).tolist() == [[0, 0], [0, 0.5], [0, 1], [1, 0], [1, 0.5], [1, 1]]
    assert grid_positions((1, 3)).tolist() == [[0, 0], [0, 0.5], [0, 1]]
    assert grid_positions((2, 1)).tolist() == [[0, 0], [1, 0]]
    assert grid_positions((1, 1)).tolist() == [[0, 0]]


@pytest.mark.parametrize("kind, expected", [
    # all-zero predictions on the 2x3 grid: row errors 0,0,0,1,1,1; column errors 0,.5,1,0,.5,1
    ("smooth_l1", (0.5 * 3 / 6 + 0.5 * (2 * 0.25 + 2 * 1) / 6) / 2),  # 0.5 e^2 below beta = 1
    ("l1", (3 / 6 + 3 / 6) / 2),
    ("mse", (3 / 6 + 2.5 / 6) / 2),
])
def test_loss_on_a_hand_made_grid(kind, expected):
    zeros = torch.zeros(2, 6, 2)
    assert float(position_loss(zeros, (2, 3), kind)) == pytest.approx(expected)
    exact = grid_positions((2, 3)).expand(2, 6, 2)
    assert float(position_loss(exact, (2, 3), kind)) == 0.0
    # the beta = 1 regime change: an error of 3 costs 3 - 0.5 in SmoothL1
    far = exact + torch.tensor([3.0, 0.0])
    assert float(position_loss(far, (2, 3), "smooth_l1")) == pytest.approx(2.5 / 2)


def test_position_error_is_in_patches():
    exact = grid_positions((4, 5))[None]
    assert float(position_error(exact, (4, 5))) == 0.0
    one_row_down = exact + torch.tensor([1 / 3, 0.0])
    three_four = exact + torch.tensor([1.0, 1.0])  # 3 rows and 4 columns off: 5 patches
    assert float(position_error(one_row_down, (4, 5))) == pytest.approx(1.0)
    assert float(position_error(three_four, (4, 5))) == pytest.approx(5.0)


def test_weight_warms_up_linearly_over_the_first_steps():
    config = ASGConfig(enabled=True)  # the paper's segmentation values: 10 -> 30 over 60 steps
    assert guidance_weight(config, 0) == pytest.approx(10 + 20 / 60)
    assert guidance_weight(config, 29) == pytest.approx(20.0)
    assert guidance_weight(config, 59) == guidance_weight(config, 1000) == 30.0
    assert guidance_weight(ASGConfig(warmup_steps=0), 0) == 30.0


@pytest.mark.parametrize("registers", [0, 3])
@pytest.mark.parametrize("size", [(32, 48), (16, 64), (48, 16)])
def test_head_reads_every_patch_token_of_the_last_block_before_the_norm(registers, size):
    torch.manual_seed(0)
    model = build_model("vit_segmenter", num_classes=3, num_register_tokens=registers, **VIT)
    guided = GuidedSegmenter(model, ASGConfig(enabled=True))
    images = torch.randn(2, 3, *size)
    seen = []
    guided.position_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    logits, loss, error = guided(images)
    tokens, grid, (last,) = model.backbone.forward_tokens(images, return_layers=[-1])
    assert grid == (size[0] // 16, size[1] // 16)
    assert torch.equal(seen[0], last[:, 1 + registers:])  # CLS and registers left out, no final norm
    assert torch.equal(logits, model(images))
    assert loss.ndim == 0 and math.isfinite(float(loss.detach())) and float(error) >= 0


@pytest.mark.parametrize("head", ["linear", "mask", "fpn"])
def test_every_head_trains_with_guidance(head):
    torch.manual_seed(0)
    guided = GuidedSegmenter(build_model("vit_segmenter", num_classes=3, head=head, **VIT), ASGConfig(enabled=True))
    logits, loss, _ = guided(torch.randn(2, 3, 32, 32))
    (logits.mean() + loss).backward()
    assert guided.position_head.row[0].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in guided.segmenter.backbone.blocks[-1].parameters())


def test_guidance_needs_a_vit_without_positional_embedding():
    with pytest.raises(UserError, match="pos=ape"):
        GuidedSegmenter(build_model("vit_segmenter", num_classes=3, **{**VIT, "pos": "ape"}), ASGConfig(enabled=True))
    with pytest.raises(UserError, match="ViT segmenter"):
        GuidedSegmenter(build_model("unet", num_classes=3, base_width=4, depth=2), ASGConfig(enabled=True))


def test_trained_model_is_exactly_a_plain_pos_none_model(tiny_config):
    overrides = ("model.name=vit_segmenter", "model.options={backbone: vit_ti16, depth: 2, pos: none}",
                 "asg.enabled=true", "asg.warmup_steps=4", "steps=6", "optim.lr=0.001")
    result = train(tiny_config(*overrides), progress=False)
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    plain = build_model("vit_segmenter", num_classes=checkpoint.classes.num_classes, **VIT)
    assert plain.load_state_dict(checkpoint.state_dict, strict=True)  # no extra or missing parameter
    assert not any("position" in name for name in checkpoint.state_dict)
    assert sum(p.numel() for p in plain.parameters()) == sum(t.numel() for t in checkpoint.state_dict.values())
    guided = GuidedSegmenter(build_model("vit_segmenter", num_classes=checkpoint.classes.num_classes, **VIT),
                             ASGConfig(enabled=True))
    guided.segmenter.load_state_dict(checkpoint.state_dict)
    plain.eval(), guided.eval()
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(plain(images), guided(images)[0])
    assert count_flops(plain, (1, 3, 64, 64)) == count_flops(guided.segmenter, (1, 3, 64, 64))

    history = [r for r in read_history(result.run_dir) if r["kind"] == "train"]
    assert [r["asg_lambda"] for r in history[:4]] == pytest.approx([15, 20, 25, 30])  # 10 -> 30 over 4 steps
    assert all(r["asg_loss"] > 0 and r["asg_error_patches"] > 0 for r in history)
    assert (result.run_dir / "asg.png").exists()
    head = checkpoint.training_state["asg_head"]
    assert set(head) == {"row.0.weight", "row.0.bias", "row.2.weight", "row.2.bias",
                         "col.0.weight", "col.0.bias", "col.2.weight", "col.2.bias"}
    groups = checkpoint.training_state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups if any(n.startswith("position_head") for n in g["names"])] == [0.0]


def test_a_guided_run_resumes_bit_identically(tiny_config, train_until_killed):
    overrides = ("model.name=vit_segmenter", "model.options={backbone: vit_ti16, depth: 2, pos: none}",
                 "asg.enabled=true", "asg.warmup_steps=4", "steps=6", "checkpoint_every=2", "optim.lr=0.001")
    whole = load_checkpoint(train(tiny_config(*overrides, out="whole"), progress=False).run_dir / "last.pt")
    config = tiny_config(*overrides, out="resumed")
    train_until_killed(config, step=4)
    resumed = load_checkpoint(train(config, resume=True, progress=False).run_dir / "last.pt")
    for name, tensor in whole.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name
    for name, tensor in whole.training_state["asg_head"].items():
        assert torch.equal(tensor, resumed.training_state["asg_head"][name]), name
