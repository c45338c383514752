"""Structural pruning: surgery vs masking oracle, Taylor saliency vs an autograd gate oracle, FLOP targets,
the pruned checkpoint through load/predict/`trustseg eval`, and user errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from cli_helpers import run_cli, save_tiny_unet
from trustseg.compress.prune import (
    BlockScores,
    magnitude_importance,
    prune_blocks_,
    prune_checkpoint,
    prune_model,
    select_units,
    taylor_importance,
    unit_flops,
)
from trustseg.data.synthetic import SyntheticDataset
from trustseg.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trustseg.engine.inference import Predictor, predictor_from_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops
from trustseg.models.heads import LinearHead
from trustseg.models.segmenter import Segmenter
from trustseg.models.vit import ViT, ViTConfig

SIZE = (32, 48)


def tiny_segmenter(pos="ape", registers=1, cls_token=True, depth=3, seed=0, dtype=torch.float32) -> Segmenter:
    """ViT of width 32, 4 heads of 8 channels, 128 MLP units, patch 8; weights drawn large enough that
    every head and unit matters (the default init leaves attention nearly uniform)."""
    torch.manual_seed(seed)
    cfg = ViTConfig(patch_size=8, embed_dim=32, depth=depth, num_heads=4, pos=pos, pos_grid=4,
                    num_register_tokens=registers, cls_token=cls_token)
    model = Segmenter(ViT(cfg), LinearHead(32, 3)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0))
    return model


def calibration_batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        masks = torch.randint(0, 3, (2, *SIZE), generator=g)
        masks[:, :4] = 255  # some ignored pixels
        batches.append((torch.randn(2, 3, *SIZE, generator=g), masks))
    return batches


def masked_forward(model, x, removed_heads, removed_units):
    """Oracle: the unpruned model with the removed heads' outputs and MLP units zeroed by hooks."""
    handles = []
    for block, heads, units in zip(model.backbone.blocks, removed_heads, removed_units):
        d = block.attn.head_dim

        def zero_heads(module, args, heads=heads, d=d):
            y = args[0].clone()
            for h in heads:
                y[..., h * d:(h + 1) * d] = 0
            return (y,)

        def zero_units(module, args, units=units):
            y = args[0].clone()
            y[..., list(units)] = 0
            return (y,)

        handles += [block.attn.proj.register_forward_pre_hook(zero_heads),
                    block.mlp.fc2.register_forward_pre_hook(zero_units)]
    try:
        return model(x)
    finally:
        for handle in handles:
            handle.remove()


# --- surgery -----------------------------------------------------------------------------------------


def test_keeping_everything_changes_nothing(one_thread):
    model = tiny_segmenter()
    x = torch.randn(2, 3, *SIZE)
    pruned, report = prune_model(model, 1.0, importance="magnitude", image_size=SIZE)
    assert report["heads_removed"] == report["mlp_units_removed"] == 0 and report["flops_ratio"] == 1.0
    assert torch.equal(pruned(x), model(x))
    same = tiny_segmenter()
    prune_blocks_(same.backbone, [range(4)] * 3, [range(128)] * 3)
    assert torch.equal(same(x), model(x))


@pytest.mark.parametrize("pos,registers,cls_token", [("ape", 1, True), ("rope", 2, True), ("none", 0, True),
                                                     ("rope", 0, False)])
def test_surgery_equals_the_unpruned_model_with_units_masked(pos, registers, cls_token, one_thread):
    model = tiny_segmenter(pos, registers, cls_token)
    g = torch.Generator().manual_seed(1)
    keep_heads, keep_units, removed_heads, removed_units = [], [], [], []
    for b in range(3):
        heads = torch.randperm(4, generator=g)
        units = torch.randperm(128, generator=g)
        n_heads = [1, 3, 4][b]  # one block loses three heads, one loses one, one keeps all
        keep_heads.append(heads[:n_heads].tolist())
        removed_heads.append(heads[n_heads:].tolist())
        keep_units.append(units[:40 + 30 * b].tolist())
        removed_units.append(units[40 + 30 * b:].tolist())
    x = torch.randn(2, 3, *SIZE)
    expected = masked_forward(model, x, removed_heads, removed_units)
    pruned = tiny_segmenter(pos, registers, cls_token)
    prune_blocks_(pruned.backbone, keep_heads, keep_units)
    assert pruned.backbone.config.block_heads == (1, 3, 4)
    assert pruned.backbone.config.block_mlp_hidden == (40, 70, 100)
    torch.testing.assert_close(pruned(x), expected, atol=1e-6, rtol=0)
    # the removed units really change the output (the oracle is not vacuous)
    assert (model(x) - expected).abs().max() > 1e-3


def test_layers_shrink_physically(one_thread):
    model = tiny_segmenter()
    prune_blocks_(model.backbone, [[0], [1, 2], [0, 1, 2, 3]], [[5], [6, 7], list(range(128))])
    attn, mlp = model.backbone.blocks[1].attn, model.backbone.blocks[1].mlp
    assert attn.qkv.weight.shape == (3 * 2 * 8, 32) and attn.proj.weight.shape == (32, 16)
    assert mlp.fc1.weight.shape == (2, 32) and mlp.fc2.weight.shape == (32, 2)


# --- importance ----------------------------------------------------------------------------------------


def gated_loss_gradient(model, images, masks, block, kind, index):
    """dL/dalpha at alpha = 1, alpha scaling every weight of one unit (= sum of w * dL/dw over them)."""
    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
    prefix = f"backbone.blocks.{block}."
    params = dict(model.named_parameters())
    scaled = {}
    if kind == "head":
        d, inner = 8, 32
        rows = torch.zeros(3 * inner, dtype=torch.float64)
        for j in range(3):
            rows[j * inner + index * d: j * inner + (index + 1) * d] = 1
        gate = 1 + (alpha - 1) * rows
        scaled[prefix + "attn.qkv.weight"] = params[prefix + "attn.qkv.weight"] * gate[:, None]
        scaled[prefix + "attn.qkv.bias"] = params[prefix + "attn.qkv.bias"] * gate
        cols = 1 + (alpha - 1) * rows[:inner]
        scaled[prefix + "attn.proj.weight"] = params[prefix + "attn.proj.weight"] * cols[None, :]
    else:
        unit = torch.zeros(128, dtype=torch.float64)
        unit[index] = 1
        gate = 1 + (alpha - 1) * unit
        scaled[prefix + "mlp.fc1.weight"] = params[prefix + "mlp.fc1.weight"] * gate[:, None]
        scaled[prefix + "mlp.fc1.bias"] = params[prefix + "mlp.fc1.bias"] * gate
        scaled[prefix + "mlp.fc2.weight"] = params[prefix + "mlp.fc2.weight"] * gate[None, :]
    logits = functional_call(model, scaled, (images.double(),), strict=False)
    labelled = (masks != 255).sum()
    loss = F.cross_entropy(logits, masks, ignore_index=255, reduction="sum") / labelled
    return torch.autograd.grad(loss, alpha)[0]


def test_taylor_saliency_equals_the_mean_squared_gate_derivative(one_thread):
    model = tiny_segmenter(dtype=torch.float64)
    batches = [(x.double(), y) for x, y in calibration_batches()]
    scores = taylor_importance(model, batches, ignore_index=255)
    for block, kind, index in [(0, "head", 0), (1, "head", 3), (2, "head", 1), (0, "mlp", 7), (2, "mlp", 127)]:
        expected = torch.stack([gated_loss_gradient(model, x, y, block, kind, index) ** 2
                                for x, y in batches]).mean()
        got = (scores[block].heads if kind == "head" else scores[block].mlp)[index]
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-14)
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_magnitude_is_the_relative_l2_norm_of_each_unit():
    model = tiny_segmenter()
    scores = magnitude_importance(model)
    head_norms, unit_norms = [], []
    for block in model.backbone.blocks:
        qkv_w, qkv_b, proj = block.attn.qkv.weight, block.attn.qkv.bias, block.attn.proj.weight
        for h in range(4):
            parts = [proj[:, h * 8:(h + 1) * 8]]
            for j in range(3):
                parts += [qkv_w[j * 32 + h * 8: j * 32 + (h + 1) * 8], qkv_b[j * 32 + h * 8: j * 32 + (h + 1) * 8]]
            head_norms.append(torch.cat([p.flatten() for p in parts]).double().norm())
        fc1, b1, fc2 = block.mlp.fc1.weight, block.mlp.fc1.bias, block.mlp.fc2.weight
        for u in range(128):
            unit_norms.append(torch.cat([fc1[u], b1[u:u + 1], fc2[:, u]]).double().norm())
    head_norms, unit_norms = torch.stack(head_norms), torch.stack(unit_norms)
    torch.testing.assert_close(torch.cat([s.heads for s in scores]), head_norms / head_norms.mean())
    torch.testing.assert_close(torch.cat([s.mlp for s in scores]), unit_norms / unit_norms.mean())


def test_the_least_salient_units_go_first():
    scores = [BlockScores(torch.tensor([5.0, 1.0, 9.0]), torch.tensor([3.0, 0.5, 4.0, 0.1])),
              BlockScores(torch.tensor([0.2, 8.0, 7.0]), torch.tensor([6.0, 2.0, 0.3, 1.0]))]
    # head cost 10, unit cost 1: per FLOP, head 1 of block 1 (0.02) and head 1 of block 0 (0.1) are cheapest
    assert select_units(scores, 10, 1, total_flops=100, target_flops=80) == ([[0, 2], [1, 2]], [[0, 1, 2, 3]] * 2)
    # then the MLP units of score 0.1 and 0.3 (ties keep block order: head 1 of block 0 before unit 3)
    assert select_units(scores, 10, 1, total_flops=100, target_flops=78) == ([[0, 2], [1, 2]], [[0, 1, 2], [0, 1, 3]])
    # heads that would undershoot are skipped, MLP units later in the order are still taken (one stays per block)
    assert select_units(scores, 10, 1, total_flops=100, target_flops=72) == ([[0, 2], [1, 2]], [[2], [0]])
    assert select_units(scores, 10, 1, total_flops=100, target_flops=68) == ([[2], [1, 2]], [[0, 1, 2], [0, 1, 3]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 6)), min_size=1, max_size=4),
       st.integers(2, 20), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_selection_meets_the_target_from_above_and_keeps_every_block_alive(shape, head_cost, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [BlockScores(torch.rand(h, generator=g), torch.rand(m, generator=g)) for h, m in shape]
    fixed = 7
    total = fixed + sum(h * head_cost + m for h, m in shape)
    least = fixed + len(shape) * (head_cost + 1)
    target = least + fraction * (total - least)
    keep_heads, keep_mlp = select_units(scores, head_cost, 1, total_flops=total, target_flops=target)
    kept = fixed + sum(len(h) * head_cost + len(m) for h, m in zip(keep_heads, keep_mlp))
    assert all(len(h) >= 1 and len(m) >= 1 for h, m in zip(keep_heads, keep_mlp))
    assert target <= kept < target + 1 or all(len(m) == 1 for m in keep_mlp)


# --- FLOP targets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_counted_flop_ratio_meets_the_target(ratio, importance, one_thread):
    model = tiny_segmenter()
    data = calibration_batches(1) if importance == "taylor" else None
    pruned, report = prune_model(model, ratio, importance=importance, data=data, image_size=SIZE)
    counted = count_flops(pruned, (1, 3, *SIZE)) / count_flops(model, (1, 3, *SIZE))
    assert report["flops_ratio"] == counted
    assert abs(counted - ratio) <= 0.05 * ratio
    assert report["params_pruned"] < report["params_original"]
    # the counter sees exactly the FLOPs the unit costs predict: removed heads and units, nothing else
    head, unit = unit_flops(model.backbone.config, SIZE)
    predicted = report["flops_original"] - head * report["heads_removed"] - unit * report["mlp_units_removed"]
    assert report["flops_pruned"] == predicted
    x = torch.randn(1, 3, *SIZE)
    assert pruned(x).shape == model(x).shape


def test_a_target_below_what_the_model_can_reach_is_a_user_error():
    with pytest.raises(UserError, match="the least this model keeps"):
        prune_model(tiny_segmenter(), 0.01, importance="magnitude", image_size=SIZE)


# --- checkpoint, predictor, CLI --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    """A depth-2 ViT-Ti/16 segmenter checkpoint for the synthetic dataset's 7 classes."""
    classes = SyntheticDataset("val", num_images=2, size=32).classes
    torch.manual_seed(0)
    options = {"backbone": "vit_ti16", "depth": 2, "pos": "rope"}
    model = build_model("vit_segmenter", num_classes=classes.num_classes, **options)
    path = tmp_path_factory.mktemp("prune") / "vit.pt"
    save_checkpoint(Checkpoint({"name": "vit_segmenter", "options": options}, model.state_dict(), classes), path)
    return path


def test_a_pruned_checkpoint_loads_predicts_and_evaluates(vit_checkpoint, tmp_path, monkeypatch, one_thread):
    dataset = SyntheticDataset("train", num_images=4, size=32)
    checkpoint = load_checkpoint(vit_checkpoint)
    pruned, report = prune_checkpoint(checkpoint, 0.5, importance="taylor", dataset=dataset, num_samples=2,
                                      image_size=(32, 32))
    assert pruned.model["options"]["block_heads"] == report["block_heads"]
    assert abs(report["flops_ratio"] - 0.5) <= 0.025
    path = tmp_path / "pruned.pt"
    save_checkpoint(pruned, path)
    predictor = predictor_from_checkpoint(load_checkpoint(path))
    assert list(predictor.model.backbone.config.block_mlp_hidden) == report["block_mlp_hidden"]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # the same weights as the surgery produced, through the same normalisation
    rebuilt = build_model("vit_segmenter", num_classes=7, **pruned.model["options"])
    rebuilt.load_state_dict(pruned.state_dict)
    expected = Predictor(rebuilt.eval(), checkpoint.mean, checkpoint.std)(images)
    with torch.no_grad():
        assert torch.equal(predictor(images), expected)
    out = tmp_path / "eval"
    code = run_cli(["eval", "--checkpoint", str(path), "--data", "synthetic#split=val,num_images=2,size=32",
                    "--out", str(out), "--no-progress", "--no-boundary-iou", "--uncertainty", "none"], monkeypatch)
    assert code == 0
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["mIoU"] <= 1.0


# --- user errors -----------------------------------------------------------------------------------------


def test_cnn_models_are_refused(tmp_path):
    unet = build_model("unet", num_classes=3, base_width=4, depth=2)
    with pytest.raises(UserError, match="structural pruning needs a ViT backbone"):
        prune_model(unet, 0.5, importance="magnitude", image_size=(32, 32))
    save_tiny_unet(tmp_path / "unet.pt")
    with pytest.raises(UserError, match="structural pruning needs a ViT backbone"):
        prune_checkpoint(load_checkpoint(tmp_path / "unet.pt"), 0.5, importance="magnitude")


@pytest.mark.parametrize("kwargs,message", [
    ({"flops_ratio": 0.0}, "flops_ratio"),
    ({"flops_ratio": 1.5}, "flops_ratio"),
    ({"flops_ratio": -0.2}, "flops_ratio"),
    ({"flops_ratio": True}, "flops_ratio"),
    ({"flops_ratio": "0.5"}, "flops_ratio"),
    ({"importance": "random"}, "importance"),
    ({"importance": "taylor"}, "needs calibration data"),
    ({"importance": "taylor", "data": []}, "at least one"),
    ({"image_size": (30, 48)}, "image_size"),
    ({"image_size": 32}, "image_size"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    arguments = {"flops_ratio": 0.5, "importance": "magnitude", "image_size": SIZE, **kwargs}
    with pytest.raises(UserError, match=message):
        prune_model(tiny_segmenter(), arguments.pop("flops_ratio"), **arguments)


@pytest.mark.parametrize("keep_heads", [[[]] * 3, [[0, 0]] * 3, [[4]] * 3, [[0]] * 2])
def test_bad_surgery_plans_are_user_errors(keep_heads):
    with pytest.raises(UserError, match="prune_blocks_"):
        prune_blocks_(tiny_segmenter().backbone, keep_heads, [[0]] * 3)


def test_taylor_on_a_checkpoint_needs_a_dataset(vit_checkpoint):
    with pytest.raises(UserError, match="calibration dataset"):
        prune_checkpoint(load_checkpoint(vit_checkpoint), 0.5, importance="taylor")


@pytest.mark.parametrize("head,ratio", [("mask", 0.6), ("fpn", 0.93)])  # at 32 px the FPN head is most FLOPs
def test_only_the_backbone_is_pruned_under_any_decode_head(head, ratio, one_thread):
    torch.manual_seed(0)
    model = build_model("vit_segmenter", num_classes=3, depth=4, head=head).eval()
    decoder = {k: v.clone() for k, v in model.head.state_dict().items()}
    pruned, report = prune_model(model, ratio, importance="magnitude", image_size=(32, 32))
    assert abs(report["flops_ratio"] - ratio) <= 0.05 * ratio
    assert all(torch.equal(v, decoder[k]) for k, v in pruned.head.state_dict().items())
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
