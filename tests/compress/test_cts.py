"""CTS (Content-aware Token Sharing): superpatch ground truth, sharing and unsharing, the reducer on
a ViT segmenter, policy training, the checkpoint round trip and the errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trustseg.compress.cts import (cts_checkpoint, install_cts, plan_sharing, remove_cts, share_tokens,
                                   shared_rope, unshare, window_embeddings, window_patches)
from trustseg.compress.policy import PolicyNet, policy_from_state, superpatch_targets, train_policy
from trustseg.data.base import ClassInfo
from trustseg.data.synthetic import SyntheticDataset
from trustseg.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.vit import TokenContext, ViT, ViTConfig, resample_pos_embed, rope_tables

VIT = {"backbone": "vit_ti16", "depth": 2}  # patch 16


class FixedScores(PolicyNet):
    """A policy whose window scores are given: the tests choose which windows are shared."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def forward(self, images, patch_size):
        return self.scores.to(images.device).expand(images.shape[0], -1, -1)


def segmenter(pos="ape", registers=0, head="linear"):
    torch.manual_seed(0)
    return build_model("vit_segmenter", num_classes=3, pos=pos, num_register_tokens=registers, head=head,
                       **VIT).eval()


@pytest.fixture(scope="module")
def shared_model():
    """One segmenter for the tests that install CTS and take it off again."""
    model = segmenter()
    yield model
    remove_cts(model)


# ---------------------------------------------------------------------------------------------------
# Superpatch ground truth
# ---------------------------------------------------------------------------------------------------


def test_superpatch_targets_of_hand_made_windows():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)  # patch 2: a 4 x 4 grid, 2 x 2 windows of 4 x 4 px
    labels[0, :4, :4] = 1  # one class
    labels[0, :4, 4:] = 2
    labels[0, 3, 7] = 0  # one pixel of another class: mixed
    labels[0, 5, 1] = 255  # class 0 and one ignore pixel: no target
    labels[0, 4:, 4:] = 3  # one class
    targets, valid = superpatch_targets(labels, 2, ignore_index=255)
    assert targets.tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    assert valid.tolist() == [[[True, True], [False, True]]]


def test_superpatch_targets_of_an_odd_grid_cover_the_even_part_only():
    labels = torch.full((1, 10, 14), 4, dtype=torch.long)  # patch 2: 5 x 7 patches -> 2 x 3 windows
    labels[0, 8:, :] = torch.arange(14)  # the last patch row and column are in no window
    labels[0, :, 12:] = 255
    targets, valid = superpatch_targets(labels, 2, ignore_index=255)
    assert targets.shape == (1, 2, 3) and bool(targets.all()) and bool(valid.all())


@pytest.mark.parametrize("patch_size, size", [(1, (6, 9)), (2, (9, 12)), (3, (13, 12))])
def test_superpatch_targets_against_loops(patch_size, size):
    gen = torch.Generator().manual_seed(patch_size)
    labels = torch.randint(0, 2, (3, *size), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.02] = 7  # ignore
    labels[1, :] = 1  # one image of a single class
    targets, valid = superpatch_targets(labels, patch_size, ignore_index=7)
    side = 2 * patch_size
    for b in range(3):
        for i in range(size[0] // patch_size // 2):
            for j in range(size[1] // patch_size // 2):
                pixels = set(labels[b, i * side:(i + 1) * side, j * side:(j + 1) * side].flatten().tolist())
                assert bool(valid[b, i, j]) == (7 not in pixels)
                assert float(targets[b, i, j]) == float(len(pixels) == 1 and 7 not in pixels)


# ---------------------------------------------------------------------------------------------------
# Sharing and unsharing as tensor functions
# ---------------------------------------------------------------------------------------------------


def test_window_patches_by_hand():
    windows = window_patches((5, 6))  # odd height: windows over rows 0-3
    assert windows.shape == (6, 4)
    assert windows[0].tolist() == [0, 1, 6, 7]
    assert windows[5].tolist() == [2 * 6 + 4, 2 * 6 + 5, 3 * 6 + 4, 3 * 6 + 5]  # window (1, 2): rows 2-3, cols 4-5


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 7), w=st.integers(2, 7), prefix=st.integers(0, 3), data=st.data())
def test_sharing_removes_3k_tokens_and_unsharing_restores_every_position(h, w, prefix, data):
    windows = (h // 2) * (w // 2)
    k = data.draw(st.integers(0, windows))
    gen = torch.Generator().manual_seed(h * 100 + w * 10 + k)
    b, c = 2, 5
    x = torch.randn(b, prefix + h * w, c, generator=gen)
    window_tokens = torch.randn(b, windows, c, generator=gen)
    scores = torch.randn(b, windows, generator=gen)
    plan = plan_sharing(scores, k, (h, w), prefix)
    out = share_tokens(x, window_tokens, plan, prefix)
    assert out.shape == (b, prefix + h * w - 3 * k, c)
    restored = unshare(out, plan)
    assert restored.shape == x.shape
    cells = window_patches((h, w)).tolist()
    for i in range(b):
        chosen = sorted(range(windows), key=lambda m: -float(scores[i, m]))[:k]  # the top-k by score
        assert sorted(plan.shared[i].tolist()) == sorted(chosen)
        owner = {patch: m for m in chosen for patch in cells[m]}
        assert torch.equal(restored[i, :prefix], x[i, :prefix])
        for patch in range(h * w):
            expected = window_tokens[i, owner[patch]] if patch in owner else x[i, prefix + patch]
            assert torch.equal(restored[i, prefix + patch], expected)
        kept = [p for p in range(h * w) if p not in owner]  # kept tokens follow the prefix, in grid order
        assert torch.equal(out[i, prefix:prefix + len(kept)], x[i, prefix + torch.tensor(kept, dtype=torch.long)])


def test_shared_rope_is_the_table_of_the_mean_position():
    grid, head_dim, theta = (4, 6), 8, 100.0
    scores = torch.zeros(1, 6)
    scores[0, 4] = 1.0  # window (1, 1): patch rows 2-3, columns 2-3
    plan = plan_sharing(scores, 1, grid, num_prefix=0)
    cos, sin = shared_rope(rope_tables(grid, head_dim, theta), plan, grid, head_dim, theta)
    assert cos.shape == (1, 24 - 3, head_dim)
    full_cos, full_sin = rope_tables(grid, head_dim, theta)
    assert torch.equal(cos[0, :-1], full_cos[plan.kept[0]]) and torch.equal(sin[0, :-1], full_sin[plan.kept[0]])
    # patch centres are (i + 0.5) / n * 2 - 1: rows 2, 3 of 4 -> 0.25, 0.75 (mean 0.5); columns 2, 3 of 6 -> 0
    row, col = 0.5, 0.0
    periods = [theta ** (4 * i / head_dim) for i in range(head_dim // 4)]
    angles = [2 * math.pi * row / t for t in periods] + [2 * math.pi * col / t for t in periods]
    expected = torch.tensor(angles * 2)
    torch.testing.assert_close(cos[0, -1], expected.cos())
    torch.testing.assert_close(sin[0, -1], expected.sin())


def test_window_embedding_is_the_downsampled_window_through_the_patch_embedding():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2, pos="ape", pos_grid=3))
    images = torch.randn(2, 3, 20, 12)  # 5 x 3 patches: windows over patch rows 0-3, column 0-1
    grid = (5, 3)
    got = window_embeddings(vit, images, grid)
    assert got.shape == (2, 2, 16)
    ape = resample_pos_embed(vit.pos_embed, grid)[0]
    for m, (i, j) in enumerate([(0, 0), (1, 0)]):
        pixels = images[:, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
        half = F.interpolate(pixels, scale_factor=0.5, mode="bilinear", align_corners=False)  # CTS's downsampling
        embedded = F.conv2d(half, vit.patch_embed.weight, vit.patch_embed.bias, stride=4)[:, :, 0, 0]
        patches = [(2 * i + di) * 3 + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
        torch.testing.assert_close(got[:, m], embedded + ape[patches].mean(0))


# ---------------------------------------------------------------------------------------------------
# The reducer on a ViT segmenter
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["ape", "rope"])
def test_k_zero_is_bit_identical_to_no_reducer(pos, one_thread):
    model = segmenter(pos, registers=2)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
        install_cts(model, PolicyNet(), k=0)
        shared = model(images)
        remove_cts(model)
        again = model(images)
    assert torch.equal(plain, shared) and torch.equal(plain, again)


@pytest.mark.parametrize("pos, registers, head", [("ape", 0, "linear"), ("rope", 4, "linear"),
                                                  ("none", 2, "fpn"), ("rope", 0, "mask")])
def test_logits_keep_their_shape_and_blocks_see_3k_fewer_tokens(pos, registers, head, one_thread):
    model = segmenter(pos, registers, head)
    images = torch.randn(2, 3, 96, 64)  # 6 x 4 patches, 6 windows
    prefix = 1 + registers
    counts = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda _m, args: counts.append(args[0].shape[1]))
    install_cts(model, PolicyNet(), k=4)
    with torch.no_grad():
        logits = model(images)
        tokens, grid, layers = model.backbone.forward_features(images, return_layers=(0,))
    assert logits.shape == (2, 3, 96, 64) and bool(torch.isfinite(logits).all())
    assert counts[0] == prefix + 24 - 3 * 4
    assert tokens.shape == (2, 24, 192) and layers[0].shape == (2, 24, 192) and grid == (6, 4)


def test_the_four_positions_of_a_shared_window_get_its_one_output(one_thread):
    model = segmenter("rope", registers=1)
    scores = torch.zeros(1, 2, 2)  # 64 x 64 px: 4 x 4 patches, 2 x 2 windows
    scores[0, 1, 0] = 1.0  # share window (1, 0): patches 8, 9, 12, 13
    install_cts(model, FixedScores(scores), k=1)
    with torch.no_grad():
        tokens, _, _ = model.backbone.forward_features(torch.randn(1, 3, 64, 64))
    shared = tokens[0, [8, 9, 12, 13]]
    assert all(torch.equal(shared[0], row) for row in shared[1:])
    others = tokens[0, [p for p in range(16) if p not in (8, 9, 12, 13)]]
    assert torch.cdist(others, others).add(torch.eye(12)).min() > 0  # the kept tokens stay distinct


def test_the_reducer_shares_the_windows_the_policy_scores_highest_with_their_embedding():
    model = segmenter("ape")
    vit = model.backbone
    scores = torch.tensor([[[0.1, 0.9], [0.8, 0.2]]])  # windows 1 and 2 of 4
    install_cts(model, FixedScores(scores), k=2)
    images = torch.randn(1, 3, 64, 64)
    vit.patch_embed(images)  # what forward_tokens does first: the reducer reads the images from this call
    x = torch.randn(1, 1 + 16, 192)
    ctx = TokenContext(num_prefix=1, grid=(4, 4))
    out, unmerge = vit.input_reducer(x, None, ctx)
    assert out.shape == (1, 1 + 16 - 6, 192)
    torch.testing.assert_close(out[0, -2:], window_embeddings(vit, images, (4, 4))[0, [1, 2]])
    assert torch.equal(unmerge(out)[0, 1 + 2], out[0, -2])  # patch 2 lies in window 1


def test_installing_twice_replaces_and_removing_restores(shared_model):
    model = shared_model
    install_cts(model, PolicyNet(), k=1)
    install_cts(model, PolicyNet(), k=2)
    assert model.backbone.input_reducer.k == 2 and len(model.backbone.patch_embed._forward_pre_hooks) == 1
    remove_cts(model)
    assert model.backbone.input_reducer is None and not model.backbone.patch_embed._forward_pre_hooks


def test_fine_tuning_with_cts_trains_the_vit_not_the_policy(one_thread):
    model = segmenter("rope", registers=2).train()
    policy = PolicyNet()
    install_cts(model, policy, k=2)
    model(torch.randn(2, 3, 64, 96)).square().mean().backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in policy.parameters())  # installed frozen


def test_bf16_autocast_runs_and_stays_close(one_thread):
    model = segmenter("rope", registers=2)
    install_cts(model, PolicyNet(), k=3)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert half.shape == full.shape
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = segmenter("rope", registers=2)
    install_cts(model, PolicyNet(), k=3)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cpu = model(images)
        gpu = model.cuda()(images.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Policy training
# ---------------------------------------------------------------------------------------------------


def synthetic(num_images=16):
    return SyntheticDataset("train", num_images=num_images, size=64, cache=True)


def test_a_trained_policy_beats_the_base_rate_on_its_training_windows(one_thread):
    data = synthetic()
    policy, report = train_policy(data, 8, steps=40, batch_size=8, seed=0)  # 16 px windows: 4 x 4 per image
    assert report["steps"] == 40 and 0 < report["single_class_fraction"] < 1
    shift, scale = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255, torch.tensor(
        (0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255
    images = torch.stack([data[i]["image"] for i in range(len(data))]).float()
    masks = torch.stack([data[i]["mask"] for i in range(len(data))])
    targets, valid = superpatch_targets(masks, 8, ignore_index=255)
    with torch.no_grad():
        logits = policy((images - shift) / scale, 8)
    bce = F.binary_cross_entropy_with_logits(logits[valid], targets[valid])
    rate = targets[valid].mean()
    base = F.binary_cross_entropy(rate.expand(int(valid.sum())), targets[valid])  # the best constant
    assert bce < 0.5 * base, (float(bce), float(base))


def test_policy_training_is_reproducible_with_its_seed(one_thread):
    data = synthetic(4)
    first, _ = train_policy(data, 8, steps=2, batch_size=2, seed=3)
    second, _ = train_policy(data, 8, steps=2, batch_size=2, seed=3)
    other, _ = train_policy(data, 8, steps=2, batch_size=2, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------

CLASSES = ClassInfo(names=tuple(f"c{i}" for i in range(7)), palette=tuple((i, i, i) for i in range(7)))


def vit_checkpoint():
    options = {**VIT, "pos": "rope", "num_register_tokens": 1}
    model = build_model("vit_segmenter", num_classes=7, **options)
    return Checkpoint({"name": "vit_segmenter", "options": options}, model.state_dict(), CLASSES)


def test_cts_checkpoint_round_trip_installs_the_trained_policy(tmp_path, one_thread):
    compressed, report = cts_checkpoint(vit_checkpoint(), 3, dataset=synthetic(4), steps=2, batch_size=2)
    assert compressed.model["token_reduction"] == "cts:k=3" and report["steps"] == 2
    save_checkpoint(compressed, tmp_path / "cts.pt")
    loaded = load_checkpoint(tmp_path / "cts.pt")
    assert loaded.token_policy.keys() == compressed.token_policy.keys()
    policy = policy_from_state(loaded.token_policy, source="test")
    model = build_model("vit_segmenter", num_classes=7, **loaded.model["options"])
    model.load_state_dict(loaded.state_dict)
    install_cts(model.eval(), policy, k=3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 7, 64, 96)
    plain = dataclasses.replace(loaded, model={k: v for k, v in loaded.model.items() if k != "token_reduction"})
    kept, report = cts_checkpoint(plain, 5)  # a checkpoint that holds a policy needs no data
    assert report == {"policy": "kept"} and kept.token_policy is loaded.token_policy


def test_a_checkpoint_without_token_policy_loads(tmp_path):
    payload = vit_checkpoint().to_payload()
    del payload["token_policy"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").token_policy is None


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_a_model_without_vit_is_refused():
    unet = build_model("unet", num_classes=3, base_width=4, depth=2)
    with pytest.raises(UserError, match="^CTS needs a ViT backbone; UNet has none"):
        install_cts(unet, PolicyNet(), k=1)
    checkpoint = Checkpoint({"name": "unet", "options": {"base_width": 4, "depth": 2}}, unet.state_dict(), CLASSES)
    with pytest.raises(UserError, match="CTS needs a ViT backbone; model 'unet' has none"):
        cts_checkpoint(checkpoint, 4, dataset=synthetic(2))


@pytest.mark.parametrize("k", [-1, 1.5, True, "3"])
def test_k_must_be_a_count(k, shared_model):
    with pytest.raises(UserError, match="k=.*expected an int >= 0"):
        install_cts(shared_model, PolicyNet(), k=k)


def test_k_above_the_number_of_windows_is_a_user_error(shared_model):
    model = install_cts(shared_model, PolicyNet(), k=5)
    with pytest.raises(UserError, match="k=5 .* a 64x64 input has only 4 2x2 windows"):
        model(torch.randn(1, 3, 64, 64))
    remove_cts(model)


def test_checkpoint_errors():
    checkpoint = vit_checkpoint()
    with pytest.raises(UserError, match="has no CTS policy; training one needs a labelled dataset"):
        cts_checkpoint(checkpoint, 2)
    reducing = dataclasses.replace(checkpoint, model={**checkpoint.model, "token_reduction": "tome:r=2"})
    with pytest.raises(UserError, match="already reduces tokens"):
        cts_checkpoint(reducing, 2, dataset=synthetic(2))
    damaged = dataclasses.replace(checkpoint, token_policy={"layers.0.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="CTS policy of"):
        cts_checkpoint(damaged, 2)


def test_policy_training_errors():
    with pytest.raises(UserError, match="smaller than one superpatch"):
        train_policy(synthetic(2), 40, steps=1)  # 64 px images, 80 px superpatches
    with pytest.raises(UserError, match="steps=0"):
        train_policy(synthetic(2), 8, steps=0)
