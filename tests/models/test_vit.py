import math

import pytest
import torch
import torch.nn.functional as F

from trustseg.errors import UserError
from trustseg.models import vit as vit_module
from trustseg.models.vit import (
    TokenContext,
    ViT,
    ViTConfig,
    apply_rope,
    resample_pos_embed,
    rope_tables,
    vit_b14,
    vit_b16,
    vit_s14,
    vit_s16,
    vit_ti16,
)


def tiny(pos="ape", **kw) -> ViT:
    torch.manual_seed(0)
    options = dict(patch_size=4, embed_dim=16, depth=3, num_heads=2, pos_grid=3, num_register_tokens=1)
    options.update(kw)
    return ViT(ViTConfig(pos=pos, **options)).eval()


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Make embeddings and LayerNorms non-trivial so positional effects are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("pos", ["ape", "rope", "none"])
@pytest.mark.parametrize("size", [(12, 12), (8, 20), (24, 4), (4, 4)])
def test_forward_shapes_any_grid(pos, size):
    model = tiny(pos)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        tokens, grid, layers = model.forward_features(x, return_layers=(0, -1))
        fmap = model(x)
    h, w = size[0] // 4, size[1] // 4
    assert grid == (h, w)
    assert tokens.shape == (2, h * w, 16)
    assert [t.shape for t in layers] == [(2, h * w, 16)] * 2
    assert fmap.shape == (2, 16, h, w)
    assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens)
    assert torch.isfinite(tokens).all()


def test_intermediate_layers_are_raw_block_outputs_in_requested_order():
    model = tiny("rope")
    randomise(model)
    x = torch.randn(2, 3, 12, 16)
    with torch.no_grad():
        tokens, _, layers = model.forward_tokens(x, return_layers=(-1, 0, 1))
    # the final tokens are the last block's raw output after the final norm
    torch.testing.assert_close(model.norm(layers[0]), tokens)
    assert not torch.allclose(layers[1], layers[2])
    with torch.no_grad():
        _, _, again = model.forward_tokens(x, return_layers=(1, 2, 0))
    torch.testing.assert_close(again[0], layers[2])
    torch.testing.assert_close(again[1], layers[0])
    torch.testing.assert_close(again[2], layers[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_features(x, return_layers=(3,))


def test_prefix_tokens_and_forward_features_slice():
    model = tiny("ape", num_register_tokens=2)
    assert model.num_prefix_tokens == 3
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        all_tokens, _, _ = model.forward_tokens(x)
        patches, _, _ = model.forward_features(x)
    assert all_tokens.shape == (1, 3 + 4, 16)
    torch.testing.assert_close(all_tokens[:, 3:], patches)
    assert tiny("none", cls_token=False, num_register_tokens=0).num_prefix_tokens == 0


def test_not_divisible_input_names_padded_size():
    model = tiny()
    assert model.size_divisor == 4
    with pytest.raises(ValueError, match=r"pad the input to 12x8"):
        model.forward_features(torch.randn(1, 3, 10, 7))


def _patch_permuted(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the image left-right in whole patches; returns the image and the token permutation."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    flipped = x.view(b, c, hh, w, p).flip(3).reshape(b, c, hh, ww)
    perm = torch.arange(h * w).view(h, w).flip(1).reshape(-1)
    return flipped, perm


def test_pos_none_is_permutation_equivariant_and_ape_rope_are_not():
    x = torch.randn(2, 3, 8, 12)
    flipped, perm = _patch_permuted(x, 4)
    for pos in ("none", "ape", "rope"):
        model = tiny(pos)
        randomise(model)
        with torch.no_grad():
            a, _, _ = model.forward_features(x)
            b, _, _ = model.forward_features(flipped)
        equivariant = torch.allclose(a[:, perm], b, atol=1e-5)
        assert equivariant == (pos == "none"), pos


def test_ape_resampling():
    pos = torch.randn(1, 9, 5)
    assert resample_pos_embed(pos, (3, 3)) is pos
    out = resample_pos_embed(pos, (4, 7))
    assert out.shape == (1, 28, 5)
    # bicubic weights sum to one: a constant embedding stays constant on any grid
    const = torch.full((1, 16, 3), 0.7)
    for aa in (False, True):
        torch.testing.assert_close(resample_pos_embed(const, (6, 3), antialias=aa), torch.full((1, 18, 3), 0.7))


def test_rope_depends_on_relative_position_only():
    h, w, d = 4, 6, 8
    cos, sin = rope_tables((h, w), d, theta=100.0)
    assert cos.shape == sin.shape == (h * w, d)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(d, generator=g).expand(1, 1, h * w, d)
    k = torch.randn(d, generator=g).expand(1, 1, h * w, d)
    qr, kr = apply_rope(q, (cos, sin), 0)[0, 0], apply_rope(k, (cos, sin), 0)[0, 0]
    torch.testing.assert_close(qr.norm(dim=-1), q[0, 0].norm(dim=-1))  # rotations keep norms
    scores = (qr @ kr.T).view(h, w, h, w)
    # shifting query and key by the same (dy, dx) leaves the score unchanged
    torch.testing.assert_close(scores[0, 0, 1, 2], scores[2, 3, 3, 5])
    torch.testing.assert_close(scores[1, 1, 0, 4], scores[2, 1, 1, 4])
    assert not torch.allclose(scores[0, 0, 1, 2], scores[0, 0, 2, 1])
    # prefix tokens are not rotated
    x = torch.randn(1, 2, 3 + h * w, d)
    torch.testing.assert_close(apply_rope(x, (cos, sin), 3)[..., :3, :], x[..., :3, :])


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        calls.append(q.shape)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", counting)
    model = tiny("rope")
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 8, 12))
    assert calls == [(2, 2, 2 + 6, 8)] * 3


def test_drop_path_only_in_training():
    model = tiny("none", drop_path=0.5)
    assert [b.drop_path for b in model.blocks] == [0.0, 0.25, 0.5]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        a, b = model.forward_features(x)[0], model.forward_features(x)[0]
        torch.testing.assert_close(a, b)
        model.train()
        torch.manual_seed(0)
        c = model.forward_features(x)[0]
    assert not torch.allclose(a, c)


def test_config_validation():
    with pytest.raises(UserError, match="pos"):
        ViTConfig(pos="sincos")
    with pytest.raises(UserError, match="divisible by num_heads"):
        ViTConfig(embed_dim=10, num_heads=3)
    with pytest.raises(UserError, match="RoPE"):
        ViTConfig(embed_dim=12, num_heads=2, pos="rope")
    with pytest.raises(UserError, match="invalid ViT option"):
        vit_ti16(depth_typo=3)


def _param_count(c, depth, patch, grid, prefix_tokens, layerscale, mlp=4):
    block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (mlp * c * c + mlp * c) + (mlp * c * c + c)
    block += 2 * c if layerscale else 0
    embed = 3 * patch * patch * c + c + grid * grid * c + prefix_tokens * c
    return embed + depth * block + 2 * c


def test_presets():
    # timm reports vit_tiny_patch16_224 at 5.72 M and vit_small_patch16_224 at 22.05 M *with* a 1000-way
    # head (0.19 M / 0.39 M); DINOv2 ViT-S/14 at 22.06 M
    with torch.device("meta"):  # count parameters without initialising 200 M of them
        cases = [
            (vit_ti16(), 192, 16, 14, 1, False, 5.524),
            (vit_s16(), 384, 16, 14, 1, False, 21.665),
            (vit_b16(), 768, 16, 14, 1, False, None),
            (vit_s14(), 384, 14, 37, 1, True, 22.06),
            (vit_b14(registers=True), 768, 14, 37, 5, True, None),
        ]
        reg = vit_s14(registers=True)
        rope = vit_s16(pos="rope")
        none = vit_ti16(pos="none", num_register_tokens=2)
    for model, c, patch, grid, prefix, ls, millions in cases:
        count = sum(p.numel() for p in model.parameters())
        assert count == _param_count(c, 12, patch, grid, prefix, ls)
        if millions is not None:
            assert math.isclose(count / 1e6, millions, abs_tol=0.01)
        assert model.size_divisor == patch
    assert reg.config.num_register_tokens == 4 and reg.config.pos_antialias
    assert rope.pos_embed is None
    assert none.pos_embed is None and none.reg_tokens.shape == (1, 2, 192)


# ---- token-reduction hook -------------------------------------------------------------------------


def pair_merge(x, keys, ctx: TokenContext):
    """Average consecutive pairs of patch tokens; proportional attention (log size) keeps the
    result exact when the pairs are identical."""
    p = ctx.num_prefix
    if keys is not None:
        assert keys.shape[:3] == (x.shape[0], 2, x.shape[1])
    prefix, patches = x[:, :p], x[:, p:]
    b, n, c = patches.shape
    merged = patches.reshape(b, n // 2, 2, c).mean(2)
    sizes = torch.cat([torch.ones(p), torch.full((n // 2,), 2.0)])
    ctx.attn_bias = sizes.log().view(1, 1, 1, -1)

    def unmerge(t):
        return torch.cat([t[:, :p], t[:, p:].repeat_interleave(2, dim=1)], dim=1)

    return torch.cat([prefix, merged], dim=1), unmerge


def paired_image(b=2, h=8, pairs=3, p=4):
    """An image whose patch columns come in identical pairs: tokens 2j and 2j+1 of a row are equal."""
    base = torch.randn(b, 3, h, pairs, p)
    return torch.stack([base, base], dim=4).reshape(b, 3, h, pairs * 2 * p)


def test_no_reducer_and_identity_reducer_leave_output_unchanged():
    model = tiny("rope")
    randomise(model)
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        ref, _, ref_layers = model.forward_features(x, return_layers=(0, 1, 2))
        model.blocks[1].token_reducer = lambda t, keys, ctx: (t, lambda y: y)
        model.input_reducer = lambda t, keys, ctx: (t, lambda y: y)
        out, _, layers = model.forward_features(x, return_layers=(0, 1, 2))
        model.blocks[1].token_reducer = None
        model.input_reducer = None
        again, _, _ = model.forward_features(x)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    for a, b in zip(layers, ref_layers):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["input", "block0", "block1"])
def test_merging_identical_pairs_is_exact(where):
    model = tiny("none")
    randomise(model)
    x = paired_image()
    with torch.no_grad():
        ref, grid, ref_layers = model.forward_tokens(x, return_layers=(0, 1, 2))
        if where == "input":
            model.input_reducer = pair_merge
        else:
            model.blocks[int(where[-1])].token_reducer = pair_merge
        out, grid2, layers = model.forward_tokens(x, return_layers=(0, 1, 2))
    assert grid2 == grid and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(layers, ref_layers):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_merging_without_proportional_attention_differs():
    """Control for the exactness test: the attention bias is what makes it exact."""

    def merge_no_bias(x, keys, ctx):
        y, unmerge = pair_merge(x, keys, ctx)
        ctx.attn_bias = None
        return y, unmerge

    model = tiny("none")
    randomise(model)
    x = paired_image()
    with torch.no_grad():
        ref, _, _ = model.forward_features(x)
        model.blocks[0].token_reducer = merge_no_bias
        out, _, _ = model.forward_features(x)
    assert not torch.allclose(out, ref, atol=1e-4)


def test_drop_then_restore_reducer_round_trips_shapes_with_rope():
    def drop_odd(x, keys, ctx):
        p = ctx.num_prefix
        kept = torch.cat([x[:, :p], x[:, p:][:, ::2]], dim=1)
        if ctx.rope is not None:
            ctx.rope = tuple(t[::2] for t in ctx.rope)

        def unmerge(t):
            return torch.cat([t[:, :p], t[:, p:].repeat_interleave(2, dim=1)], dim=1)

        return kept, unmerge

    model = tiny("rope")
    model.blocks[0].token_reducer = drop_odd
    model.blocks[1].token_reducer = drop_odd
    x = torch.randn(2, 3, 8, 16)  # 2 x 4 patches -> 4 -> 2 tokens
    with torch.no_grad():
        tokens, grid, layers = model.forward_features(x, return_layers=(0, 1, 2))
    assert grid == (2, 4)
    assert tokens.shape == (2, 8, 16) and [t.shape for t in layers] == [(2, 8, 16)] * 3
    # after two halvings every group of 4 consecutive patches shares one token
    for t in (tokens, layers[1], layers[2]):
        torch.testing.assert_close(t[:, 0::4], t[:, 3::4])
    torch.testing.assert_close(layers[0][:, 0::2], layers[0][:, 1::2])
