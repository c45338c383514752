"""Per-block head counts and MLP hidden sizes of the ViT (the shapes of a structurally pruned model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.vit import Attention, ViT, ViTConfig

BASE = dict(patch_size=4, embed_dim=32, depth=3, num_heads=4, pos_grid=3, num_register_tokens=1)


def test_default_sizes_build_the_same_model_as_explicit_full_sizes(one_thread):
    torch.manual_seed(0)
    default = ViT(ViTConfig(**BASE)).eval()
    torch.manual_seed(0)
    explicit = ViT(ViTConfig(**BASE, block_heads=(4, 4, 4), block_mlp_hidden=(128, 128, 128))).eval()
    shapes = {k: v.shape for k, v in default.state_dict().items()}
    assert shapes == {k: v.shape for k, v in explicit.state_dict().items()}
    x = torch.randn(2, 3, 12, 16)
    assert torch.equal(default(x), explicit(x))


@pytest.mark.parametrize("pos", ["ape", "rope", "none"])
def test_per_block_sizes_give_the_layer_shapes_and_a_forward(pos, one_thread):
    cfg = ViTConfig(**BASE, pos=pos, block_heads=(1, 4, 2), block_mlp_hidden=(5, 128, 1))
    model = ViT(cfg).eval()
    d = cfg.head_dim
    for block, heads, hidden in zip(model.blocks, (1, 4, 2), (5, 128, 1)):
        assert block.attn.qkv.weight.shape == (3 * heads * d, 32)
        assert block.attn.proj.weight.shape == (32, heads * d)
        assert block.mlp.fc1.weight.shape == (hidden, 32) and block.mlp.fc2.weight.shape == (32, hidden)
    tokens, grid, layers = model.forward_tokens(torch.randn(2, 3, 12, 8), return_layers=(0, 1))
    assert tokens.shape == (2, 2 + 6, 32) and grid == (3, 2) and len(layers) == 2


def test_attention_with_fewer_heads_is_naive_attention_scaled_by_the_full_head_dim(one_thread):
    """Oracle: softmax(q k^T / sqrt(d)) v written out, with d the unpruned head size (8), not inferred."""
    torch.manual_seed(0)
    cfg = ViTConfig(**BASE)
    attn = Attention(cfg, heads=3).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out, _ = attn(x)
    d = cfg.head_dim
    q, k, v = attn.qkv(x).split(3 * d, dim=-1)
    heads = []
    for h in range(3):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh)
    expected = F.linear(torch.cat(heads, dim=-1), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("sizes", [(1, 2), (1, 2, 3, 4), (1, 0, 2), (1, -1, 2), (1, True, 2), (1, 2.0, 2)])
@pytest.mark.parametrize("field", ["block_heads", "block_mlp_hidden"])
def test_bad_block_sizes_are_user_errors(field, sizes):
    with pytest.raises(UserError, match=field):
        ViTConfig(**BASE, **{field: sizes})


def test_segmenter_options_take_lists_and_check_them():
    model = build_model("vit_segmenter", num_classes=3, depth=2, block_heads=[1, 3], block_mlp_hidden=[7, 9])
    assert model.backbone.config.block_heads == (1, 3) and model.backbone.config.block_mlp_hidden == (7, 9)
    with pytest.raises(UserError, match="block_heads.*a list, each an int"):
        build_model("vit_segmenter", num_classes=3, depth=2, block_heads=[1, "3"])
    with pytest.raises(UserError, match="block_mlp_hidden must hold one int >= 1 per block"):
        build_model("vit_segmenter", num_classes=3, depth=2, block_mlp_hidden=[7])
