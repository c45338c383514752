"""ToMe installed on the ViT: exactness where it must be exact, state invariants at every block, errors."""

import pytest
import torch

from trustseg.compress.reducers import find_vit, reduced_token_counts
from trustseg.compress.tome import ToMeReducer, install_tome, remove_token_reducers
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops
from trustseg.models.vit import TokenContext, ViT, ViTConfig, rope_tables


def tiny_vit(pos="none", registers=0, depth=3, seed=0) -> ViT:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        patch_size=4, embed_dim=16, depth=depth, num_heads=2, pos=pos, pos_grid=3, num_register_tokens=registers
    )
    model = ViT(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial embeddings and norms, so every token differs
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return model


def segmenter(pos="ape", registers=0):
    torch.manual_seed(0)
    model = build_model(
        "vit_segmenter", num_classes=5, backbone="vit_ti16", depth=3, pos=pos, num_register_tokens=registers
    )
    return model.eval()


def record_states(vit: ViT) -> list[dict]:
    """Wrap each installed reducer so the context after it is kept for inspection."""
    log: list[dict] = []
    for i, block in enumerate(vit.blocks):
        inner = block.token_reducer
        if inner is None:
            continue

        def wrapped(x, keys, ctx, inner=inner, i=i):
            out, unmerge = inner(x, keys, ctx)
            log.append(
                dict(block=i, tokens=out.shape[1], store=dict(ctx.store), rope=ctx.rope, bias=ctx.attn_bias)
            )
            return out, unmerge

        block.token_reducer = wrapped
    return log


def paired_image(b=2, h=4, pairs=3, p=4):
    """An image whose patch columns come in identical pairs: patches 2j and 2j+1 of a row are equal."""
    base = torch.randn(b, 3, h * p, pairs, p)
    return torch.stack([base, base], dim=4).reshape(b, 3, h * p, pairs * 2 * p)


def test_r0_is_bit_identical_to_no_reducer(one_thread):
    model = segmenter("rope", registers=4)
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        ref = model(x)
        assert install_tome(model, r=0) == [0, 0, 0]
        same = model(x)
        install_tome(model, r=1)  # a 1x1 grid has nothing to merge: r is clipped to 0 in every block
        single = torch.randn(2, 3, 16, 16)
        remove_token_reducers(model)
        single_ref = model(single)
        install_tome(model, r=1)
        single_out = model(single)
    assert torch.equal(same, ref) and torch.equal(single_out, single_ref)


def test_a_step_that_merges_nothing_leaves_the_context_alone():
    x = torch.randn(2, 5, 8)
    ctx = TokenContext(num_prefix=1, grid=(2, 2), rope=rope_tables((2, 2), 4, 100.0))
    out, unmerge = ToMeReducer(0, proportional_attention=True)(x, torch.randn(2, 2, 5, 4), ctx)
    assert out is x and unmerge(x) is x and ctx.store == {} and ctx.attn_bias is None and ctx.rope[0].dim() == 2


def test_proportional_attention_makes_merging_identical_twins_exact(one_thread):
    """Every A token has an identical twin in B; merging all of them with log(size) attention is
    the same computation as attending to both copies, so the output must not change."""
    model = tiny_vit("none", registers=4)
    x = paired_image()
    n_patch = 4 * 6
    with torch.no_grad():
        ref, _, ref_layers = model.forward_tokens(x, return_layers=(0, 1, 2))
        install_tome(model, r=[n_patch // 2, 0, 0])
        log = record_states(model)
        out, _, layers = model.forward_tokens(x, return_layers=(0, 1, 2))
        assert log[0]["tokens"] == 1 + 4 + n_patch // 2  # CLS, registers, half the patches
        install_tome(model, r=[n_patch // 2, 0, 0], proportional_attention=False)
        plain, _, _ = model.forward_tokens(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(layers, ref_layers):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, ref, atol=1e-3)  # control: without the bias it is not exact


def test_zero_bias_equals_plain_attention():
    """Proportional attention with every size 1 adds log(1) = 0: plain attention."""
    attn = tiny_vit().blocks[0].attn
    x = torch.randn(2, 7, 16)
    ctx = TokenContext(num_prefix=1, grid=(2, 3))
    with torch.no_grad():
        plain, _ = attn(x, ctx)
        ctx.attn_bias = torch.ones(2, 7).log()[:, None, None, :]
        biased, _ = attn(x, ctx)
    torch.testing.assert_close(biased, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pos", ["ape", "rope", "none"])
@pytest.mark.parametrize("registers", [0, 4])
def test_state_stays_consistent_at_every_block(pos, registers, one_thread):
    model = segmenter(pos, registers)
    vit = find_vit(model)
    prefix = 1 + registers
    h, w = 3, 5  # non-square, odd
    x = torch.randn(2, 3, 16 * h, 16 * w)
    install_tome(model, r=(4, -0.5))  # 6, 4, 2
    log = record_states(vit)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 5, 16 * h, 16 * w) and torch.isfinite(logits).all()
    total = prefix + h * w
    full_rope = rope_tables((h, w), vit.config.head_dim, vit.config.rope_theta) if pos == "rope" else None
    assert [entry["tokens"] for entry in log] == [total - 6, total - 10, total - 12]
    for entry in log:
        sizes, source = entry["store"]["sizes"], entry["store"]["source"]
        n = entry["tokens"]
        assert sizes.shape == (2, n) and torch.equal(sizes.sum(1), torch.full((2,), float(total)))
        counts = torch.stack([torch.bincount(row, minlength=n) for row in source]).float()
        assert torch.equal(counts, sizes)
        assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(2, -1))  # prefix never merged
        assert (source[:, prefix:] >= prefix).all()
        torch.testing.assert_close(entry["bias"], sizes.log()[:, None, None, :])
        if full_rope is None:
            assert entry["rope"] is None
            continue
        for table, full in zip(entry["rope"], full_rope):
            assert table.shape == (2, n - prefix, vit.config.head_dim)
            for b in range(2):
                for slot in range(prefix, n):
                    members = (source[b] == slot).nonzero().flatten() - prefix
                    # a merged slot keeps the table of one of its own patches (its destination's)
                    assert (full[members] == table[b, slot - prefix]).all(-1).any()


def test_unmerge_copies_each_merged_token_to_all_its_patches(one_thread):
    model = tiny_vit("rope", registers=2)
    install_tome(model, r=5)
    log = record_states(model)
    with torch.no_grad():
        tokens, _, _ = model.forward_tokens(torch.randn(2, 3, 16, 24))
    source = log[-1]["store"]["source"]
    assert tokens.shape == (2, 1 + 2 + 24, 16)
    for b in range(2):
        for slot in source[b].unique():
            group = tokens[b, source[b] == slot]
            assert torch.equal(group, group[:1].expand_as(group))
    assert source.unique().numel() < source.shape[1]  # something was merged


def test_gradients_flow_through_merging():
    model = segmenter("ape")
    model.train()
    install_tome(model, r=3)
    x = torch.randn(2, 3, 64, 48)
    model(x).square().mean().backward()
    vit = find_vit(model)
    assert vit.patch_embed.weight.grad is not None and vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_flops_follow_the_reduced_token_counts():
    """count_flops traces the forward: its total must equal the hand formula on the per-block token
    counts, plus ToMe's similarity matmul (|A| x |B| x head_dim per sample)."""
    model = tiny_vit("none", registers=1)  # 2 prefix tokens
    batch, c, hidden, head_dim = 2, 16, 64, 8
    shape = (batch, 3, 16, 28)  # 4 x 7 patches
    install_tome(model, r=[6, 4, 0])
    counts = reduced_token_counts(model, shape)
    assert [(t.attention, t.mlp) for t in counts] == [(30, 24), (24, 20), (20, 20)]
    expected = 2 * batch * 28 * c * 3 * 4 * 4  # patch embedding
    for tokens in counts:
        expected += 2 * batch * tokens.attention * 4 * c * c + 4 * batch * tokens.attention**2 * c
        expected += 2 * batch * tokens.mlp * 2 * hidden * c
        patches = tokens.attention - 2
        if tokens.mlp < tokens.attention:
            expected += 2 * batch * ((patches + 1) // 2) * (patches // 2) * head_dim
    assert count_flops(model, shape) == expected
    remove_token_reducers(model)
    assert count_flops(model, shape) > expected


def test_install_replaces_and_remove_restores(one_thread):
    model = segmenter("rope")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        install_tome(model, r=2)
        install_tome(model, r=[0, 3, 0])
        installed = [type(b.token_reducer).__name__ for b in find_vit(model).blocks]
        assert installed == ["NoneType", "ToMeReducer", "NoneType"]
        merged = model(x)
        remove_token_reducers(model)
        back = model(x)
    assert not torch.equal(merged, ref) and torch.equal(back, ref)


def test_install_keeps_an_input_reducer_and_remove_takes_it_off():
    vit = tiny_vit()
    vit.input_reducer = lambda x, keys, ctx: (x, lambda y: y)
    install_tome(vit, r=2)
    assert vit.input_reducer is not None
    remove_token_reducers(vit)
    assert vit.input_reducer is None and all(b.token_reducer is None for b in vit.blocks)


@pytest.mark.parametrize("name, options", [("unet", dict(base_width=4, depth=2)), ("segformer", {})])
def test_models_without_a_vit_are_refused(name, options):
    with torch.device("meta"):
        model = build_model(name, num_classes=3, **options)
    with pytest.raises(UserError, match="token merging needs a ViT backbone"):
        install_tome(model, r=4)
    with pytest.raises(UserError, match="token merging needs a ViT backbone"):
        remove_token_reducers(model)


def test_r_larger_than_the_token_count_is_a_user_error():
    model = segmenter("ape")
    with pytest.raises(UserError, match=r"r=20 is larger than the 16 patch tokens of a 4x4 patch grid"):
        install_tome(model, r=20, image_size=(64, 64))
    assert all(b.token_reducer is None for b in find_vit(model).blocks)  # nothing half-installed
    install_tome(model, r=20)  # size unknown: checked at the forward
    with pytest.raises(UserError, match=r"r=20 is larger than the 16 patch tokens"):
        model(torch.randn(1, 3, 64, 64))
    install_tome(model, r=16, image_size=(64, 64))  # as many as the patches: allowed, clipped per block
    counts = reduced_token_counts(model, (1, 3, 64, 64))
    assert [(t.attention, t.mlp) for t in counts] == [(17, 9), (9, 5), (5, 3)]  # CLS + 16 -> 8 -> 4 -> 2 patches


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=-2), "token merging r=-2"),
        (dict(r=[1, 2]), "a per-block list needs 3 ints"),
        (dict(r=2, image_size=(60, 64)), "not a multiple of the ViT's patch size 16"),
        (dict(r=2, image_size=(64,)), "expected \\(H, W\\)"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with torch.device("meta"):  # the arguments are checked before anything runs
        model = segmenter()
    with pytest.raises(UserError, match=message):
        install_tome(model, **kwargs)


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_runs_under_bf16_autocast(pos, one_thread):
    """Keys come out of the qkv Linear in bf16; the matching upcasts and the bias follows the stream."""
    model = segmenter(pos, registers=4)
    install_tome(model, r=3)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 5, 64, 48) and torch.isfinite(logits).all()
