import pytest
import torch

from trustseg.errors import UserError
from trustseg.models.heads import FPNHead, LinearHead, MaskTransformerHead, default_fpn_layers
from trustseg.models.segmenter import Segmenter, vit_segmenter
from trustseg.models.vit import ViT, ViTConfig


def tiny_vit(pos="ape") -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(patch_size=8, embed_dim=32, depth=4, num_heads=2, pos=pos, pos_grid=4))


def test_linear_head_is_a_per_patch_linear_classifier():
    head = LinearHead(32, 5)
    tokens = torch.randn(2, 6, 32)
    out = head(tokens, (2, 3))
    expected = torch.einsum("bnc,kc->bkn", tokens, head.proj.weight) + head.proj.bias[:, None]
    torch.testing.assert_close(out, expected.reshape(2, 5, 2, 3))
    assert LinearHead.layers == ()


def test_mask_transformer_scores_are_mask_normed_and_class_equivariant():
    torch.manual_seed(0)
    head = MaskTransformerHead(32, 6, dim=16, depth=2, num_heads=2).eval()
    assert len(head.blocks) == 2
    tokens = torch.randn(2, 12, 32)
    with torch.no_grad():
        out = head(tokens, (3, 4))
    assert out.shape == (2, 6, 3, 4)
    # mask norm = LayerNorm over the K class scores of each patch (identity affine at init)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(2, 3, 4), atol=1e-2, rtol=0)  # eps
    # classes carry no position: permuting the class embeddings permutes the output channels
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        head.cls_emb.copy_(head.cls_emb[:, perm])
        permuted = head(tokens, (3, 4))
    torch.testing.assert_close(permuted, out[:, perm], atol=1e-5, rtol=1e-5)


def test_mask_transformer_defaults_follow_segmenter():
    head = MaskTransformerHead(192, 3)
    assert head.proj_in.out_features == 192 and head.blocks[0].attn.num_heads == 3


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 2)])
def test_fpn_head_output_stride_and_odd_grids(grid):
    head = FPNHead(32, 7, layers=(0, 1, 2, 3), channels=16).eval()
    n = grid[0] * grid[1]
    feats = [torch.randn(2, n, 32) for _ in range(4)]
    with torch.no_grad():
        out = head(feats[-1], grid, feats)
    assert out.shape == (2, 7, 4 * grid[0], 4 * grid[1])
    with pytest.raises(ValueError, match="expects the outputs of blocks"):
        head(feats[-1], grid, feats[:3])


def test_default_fpn_layers():
    assert default_fpn_layers(12) == (2, 5, 8, 11)
    assert default_fpn_layers(4) == (0, 1, 2, 3)
    assert default_fpn_layers(24) == (5, 11, 17, 23)


@pytest.mark.parametrize("head_name", ["linear", "mask", "fpn"])
def test_segmenter_logits_at_input_size_and_trainable(head_name):
    vit = tiny_vit("rope")
    heads = {
        "linear": LinearHead(32, 4),
        "mask": MaskTransformerHead(32, 4, dim=16, num_heads=2),
        "fpn": FPNHead(32, 4, layers=(0, 1, 2, 3), channels=16),
    }
    model = Segmenter(vit, heads[head_name])
    assert model.size_divisor == 8
    x = torch.randn(2, 3, 24, 40)
    logits = model(x)
    assert logits.shape == (2, 4, 24, 40)
    logits.logsumexp(1).mean().backward()
    assert vit.patch_embed.weight.grad is not None
    assert all(p.grad is not None for p in model.head.parameters())


def test_segmenter_rejects_undivisible_input_with_padded_size():
    model = Segmenter(tiny_vit(), LinearHead(32, 3))
    with pytest.raises(ValueError, match="pad the input to 24x48"):
        model(torch.randn(1, 3, 20, 41))


def test_segmenter_fpn_requests_intermediate_layers():
    vit = tiny_vit("none")
    seen = []
    original = vit.forward_features

    def spy(x, return_layers=()):
        seen.append(tuple(return_layers))
        return original(x, return_layers)

    vit.forward_features = spy
    Segmenter(vit, FPNHead(32, 2, layers=(0, 1, 2, 3), channels=8))(torch.randn(1, 3, 16, 16))
    Segmenter(vit, LinearHead(32, 2))(torch.randn(1, 3, 16, 16))
    assert seen == [(0, 1, 2, 3), ()]


def test_vit_segmenter_builds_through_the_model_factory():
    from trustseg.models.factory import build_model

    model = build_model("vit_segmenter", num_classes=4, head="fpn", depth=4, pos_grid=2, pos="none")
    assert model.backbone.config.depth == 4 and model.head.layers == (0, 1, 2, 3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_vit_segmenter_builder():
    with torch.device("meta"):
        for backbone, patch in (("vit_ti16", 16), ("vit_s14", 14)):
            for head in ("linear", "mask", "fpn"):
                model = vit_segmenter(num_classes=11, backbone=backbone, head=head, pos="rope")
                assert model.size_divisor == patch and model.backbone.config.pos == "rope"
        fpn = vit_segmenter(num_classes=3, head="fpn", fpn_channels=64)
        assert fpn.head.layers == (2, 5, 8, 11) and fpn.head.classifier.in_channels == 64
        reg = vit_segmenter(num_classes=3, backbone="vit_s14", num_register_tokens=4, pos_grid=16)
        assert reg.backbone.num_prefix_tokens == 5 and reg.backbone.pos_embed.shape == (1, 256, 384)
        assert vit_segmenter(num_classes=3, num_register_tokens=2, pos="none").backbone.num_prefix_tokens == 3
    small = vit_segmenter(num_classes=5, head="mask", depth=2, pos="none")
    assert small(torch.randn(1, 3, 32, 48)).shape == (1, 5, 32, 48)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=3, backbone="vit_h16"), "unknown backbone 'vit_h16'"),
        (dict(num_classes=3, head="upernet"), "unknown head 'upernet'"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=3, backbone="vit_s14", num_register_tokens=2), "0 or 4 register tokens"),
        (dict(num_classes=3, pos="sincos"), "pos"),
        (dict(num_classes=3, depth=0), "depth"),
    ],
)
def test_vit_segmenter_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        vit_segmenter(**kwargs)
