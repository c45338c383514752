"""FLOP counts against hand formulas (torch's convention: 2 FLOPs per multiply-add; bias adds,
norms, activations and softmax are free)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trustseg.models.flops import count_flops, register_cpu_sdpa_flops
from trustseg.models.heads import LinearHead
from trustseg.models.segmenter import Segmenter
from trustseg.models.vit import ViT, ViTConfig

B, H, W = 2, 32, 48
P, C, DEPTH, MLP = 8, 32, 2, 4


def tiny(**kw) -> ViT:
    return ViT(ViTConfig(patch_size=P, embed_dim=C, depth=DEPTH, num_heads=2, pos_grid=4, **kw))


def hand_forward(prefix: int) -> dict[str, int]:
    n = (H // P) * (W // P)  # patch tokens
    t = n + prefix  # tokens through the blocks
    return {
        "patch_embed": 2 * B * n * C * 3 * P * P,
        # qkv (3C^2) + proj (C^2) + fc1, fc2 (2 * MLP * C^2), per token
        "linear": DEPTH * 2 * B * t * (4 * C * C + 2 * MLP * C * C),
        # q k^T and attn @ v: 2 * B * t^2 * C each
        "attention": DEPTH * 4 * B * t * t * C,
    }


@pytest.mark.parametrize("prefix_options", [dict(), dict(num_register_tokens=3), dict(cls_token=False)])
def test_vit_forward_flops_exact(prefix_options):
    model = tiny(**prefix_options)
    parts = hand_forward(model.num_prefix_tokens)
    assert count_flops(model, (B, 3, H, W)) == sum(parts.values())


def test_attention_flops_are_counted_on_cpu():
    register_cpu_sdpa_flops()
    register_cpu_sdpa_flops()  # idempotent
    model = tiny(pos="rope")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(B, 3, H, W))
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = {op: n for op, n in per_op.items() if "scaled_dot_product" in op}
    assert sum(attention.values()) == hand_forward(1)["attention"] > 0, per_op


def test_vit_backward_flops_exact():
    model = tiny(num_register_tokens=1)
    f = hand_forward(2)
    # backward: linear layers need grad-input and grad-weight (2x forward); the patch embedding only
    # grad-weight (the image needs no gradient); attention recomputes scores and does 4 more matmuls
    # (sdpa backward = 5 matmuls vs 2 forward)
    expected = 2 * f["patch_embed"] + 3 * f["linear"] + f["attention"] * (2 + 5) // 2
    model.blocks[0].mlp.fc1.weight.grad = marker = torch.ones_like(model.blocks[0].mlp.fc1.weight)
    assert count_flops(model, (B, 3, H, W), backward=True) == expected
    assert model.blocks[0].mlp.fc1.weight.grad is marker  # the caller's gradients are left alone
    assert model.patch_embed.weight.grad is None


def test_segmenter_flops_add_the_head():
    k = 5
    model = Segmenter(tiny(), LinearHead(C, k))
    n = (H // P) * (W // P)
    assert count_flops(model, (B, 3, H, W)) == sum(hand_forward(1).values()) + 2 * B * n * C * k
