import pytest
from torch import nn

from trustseg.errors import UserError
from trustseg.models.segmenter import vit_segmenter
from trustseg.models.unet import unet
from trustseg.training.config import OptimConfig
from trustseg.training.optim import build_optimizer, parameter_groups, set_lr


def scales_by_name(model, config):
    return {name: (group["lr_scale"], group["weight_decay"]) for group in parameter_groups(model, config)
            for name in group["names"]}


def test_layer_decay_follows_backbone_depth_and_spares_the_head():
    model = vit_segmenter(num_classes=3, head="mask", depth=3, decoder_depth=1)
    scales = scales_by_name(model, OptimConfig(layer_decay=0.5, weight_decay=0.05))
    # 3 blocks: embeddings depth 0 -> 0.5**4, block i -> 0.5**(3 - i), after the blocks -> 1
    assert scales["backbone.pos_embed"] == (0.5**4, 0.0)
    assert scales["backbone.patch_embed.weight"] == (0.5**4, 0.05)
    assert scales["backbone.blocks.0.attn.qkv.weight"] == (0.5**3, 0.05)
    assert scales["backbone.blocks.2.mlp.fc1.weight"] == (0.5, 0.05)
    assert scales["backbone.blocks.2.mlp.fc1.bias"] == (0.5, 0.0)
    assert scales["backbone.norm.weight"] == (1.0, 0.0)
    # the mask head has its own "blocks.N": they are not backbone depth
    assert scales["head.blocks.0.attn.qkv.weight"] == (1.0, 0.05)
    assert scales["head.cls_emb"] == (1.0, 0.0)
    assert len(scales) == len(list(model.parameters()))


def test_without_layer_decay_only_weight_decay_splits_groups():
    model = unet(num_classes=2, base_width=4, depth=2)
    groups = parameter_groups(model, OptimConfig(weight_decay=0.1))
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    decayed = next(g for g in groups if g["weight_decay"])
    assert all(p.ndim > 1 for p in decayed["params"])  # conv kernels only; no norms or biases


def test_set_lr_applies_each_group_scale():
    optimizer = build_optimizer(vit_segmenter(num_classes=2, depth=2), OptimConfig(layer_decay=0.1))
    set_lr(optimizer, 2.0)
    assert sorted({round(g["lr"], 6) for g in optimizer.param_groups}) == [0.002, 0.02, 0.2, 2.0]


def test_layer_decay_needs_a_vit_backbone():
    with pytest.raises(UserError, match="optim.layer_decay < 1 needs a model with one ViT backbone"):
        parameter_groups(unet(num_classes=2, base_width=4, depth=2), OptimConfig(layer_decay=0.9))
    with pytest.raises(UserError, match="layer_decay"):
        parameter_groups(nn.Sequential(nn.Linear(2, 2)), OptimConfig(layer_decay=0.9))


def test_lr_mult_scales_a_module_path_on_top_of_layer_decay():
    model = vit_segmenter(num_classes=3, depth=2)
    config = OptimConfig(layer_decay=0.5, lr_mult={"head": 10.0, "backbone.blocks.1": 3.0})
    scales = {name: scale for name, (scale, _) in scales_by_name(model, config).items()}
    assert scales["head.proj.weight"] == 10.0
    assert scales["backbone.blocks.1.attn.qkv.weight"] == 3.0 * 0.5
    assert scales["backbone.blocks.0.attn.qkv.weight"] == 0.5**2  # not under "backbone.blocks.1"
    assert scales["backbone.norm.weight"] == 1.0


def test_lr_mult_takes_the_longest_matching_path_and_refuses_unknown_ones():
    model = unet(num_classes=2, base_width=4, depth=2)
    names = [name for name, _ in model.named_parameters()]
    top = names[0].split(".")[0]
    scales = scales_by_name(model, OptimConfig(lr_mult={top: 2.0, names[0]: 5.0}))
    assert scales[names[0]][0] == 5.0
    assert all(scales[n][0] == (2.0 if n.startswith(top + ".") else 1.0) for n in names[1:])
    with pytest.raises(UserError, match=r"optim.lr_mult.decodr: no parameter .* under 'decodr'"):
        parameter_groups(model, OptimConfig(lr_mult={"decodr": 10.0}))
    with pytest.raises(UserError, match=r"optim.lr_mult.head=-1"):
        OptimConfig(lr_mult={"head": -1})
