"""Weight loading: the generic mechanism, then numerical parity with transformers' DINOv2 / DINOv3."""

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trustseg.errors import UserError
from trustseg.models.vit import ViT, ViTConfig
from trustseg.models.weights import (
    describe_mismatch,
    detect_vit_layout,
    load_mapped,
    load_vit_weights,
    read_state_dict,
    to_timm_state_dict,
)

transformers = pytest.importorskip("transformers")


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (norm scales around 1), so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ---- generic mechanism ----------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2, bias=False)


def test_read_state_dict_formats_and_containers(tmp_path):
    sd = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    torch.save(sd, tmp_path / "plain.bin")
    for name in ("w.safetensors", "w.pth", "ddp.pt", "plain.bin"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(sd), name
        for k in sd:
            assert torch.equal(got[k], sd[k])


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*missing.pth"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint .*junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="junk.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match="no tensors found"):
        read_state_dict(tmp_path / "empty.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pth")  # needs code execution to load
    with pytest.raises(UserError, match="pickled_module.pth: it pickles Python objects"):
        read_state_dict(tmp_path / "pickled_module.pth")


def test_load_mapped_renames_transforms_and_converts():
    src = Tiny()
    foreign = {
        "enc.first.w": src.a.weight.detach().T.clone(),  # stored transposed
        "enc.first.b": src.a.bias.detach().clone(),
        "enc.second.w_half1": src.b.weight.detach()[:, :2].clone(),
        "enc.second.w_half2": src.b.weight.detach()[:, 2:].clone(),
        "enc.num_batches": torch.tensor(5),
    }

    def rename(key):
        if key == "enc.first.w":
            return "a.weight", lambda t: t.T
        if key == "enc.num_batches":
            return None
        return {"enc.first.b": "a.bias"}.get(key, key)

    def convert(state):
        state = dict(state)
        state["b.weight"] = torch.cat([state.pop("enc.second.w_half1"), state.pop("enc.second.w_half2")], dim=1)
        return state

    dst = Tiny()
    report = load_mapped(dst, foreign, rename, source="test", convert=convert)
    assert report.dropped == ["enc.num_batches"] and report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_load_mapped_readable_diff():
    model = Tiny()
    state = {f"extra.{i}": torch.zeros(1) for i in range(9)}
    state["a.weight"] = torch.zeros(4, 5)
    with pytest.raises(UserError) as info:
        load_mapped(model, state, source="my.ckpt")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("cannot load my.ckpt into Tiny: ")
    assert "2 missing keys (a.bias, b.weight)" in msg
    assert "9 unexpected keys (extra.0, extra.1, extra.2, extra.3, extra.4, extra.5, ... and 3 more)" in msg
    assert "1 shape mismatch (a.weight: checkpoint (4, 5) vs model (4, 3))" in msg


def test_load_mapped_non_strict_and_collisions():
    model = Tiny()
    weight = torch.randn(4, 3)
    report = load_mapped(model, {"a.weight": weight, "zzz": torch.ones(1)}, source="partial", strict=False)
    assert report.missing == ["a.bias", "b.weight"] and report.unexpected == ["zzz"]
    assert torch.equal(model.a.weight, weight)
    with pytest.raises(UserError, match="shape mismatch"):
        load_mapped(model, {"a.weight": torch.randn(3, 3)}, source="partial", strict=False)
    with pytest.raises(UserError, match="'x' and 'y' both map to 'a.bias'"):
        load_mapped(model, {"x": torch.ones(4), "y": torch.ones(4)}, lambda k: "a.bias", source="dup")


def test_describe_mismatch_singular():
    assert describe_mismatch("s", "M", ["k"], [], []) == "cannot load s into M: 1 missing key (k)"


def test_keys_with_line_breaks_are_quoted_so_the_message_stays_one_line():
    message = describe_mismatch("s", "M", [], ["a.weight", "line\nbreak"], [])
    assert message == "cannot load s into M: 2 unexpected keys (a.weight, 'line\\nbreak')"
    with pytest.raises(UserError, match=r"keys such as 'x\\ny'") as info:
        detect_vit_layout({"x\ny": torch.zeros(1)})
    assert "\n" not in str(info.value)


# ---- parity with transformers ---------------------------------------------------------------------


def _compare(hf, ours, sizes, *, num_prefix):
    for size in sizes:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0] * 1000 + size[1]))
        with torch.no_grad():
            expected = hf(pixel_values=x).last_hidden_state
            tokens, grid, _ = ours.forward_tokens(x)
            patches, _, _ = ours.forward_features(x)
        assert tokens.shape == expected.shape, size
        torch.testing.assert_close(patches, expected[:, num_prefix:], atol=1e-5, rtol=0, msg=f"patches at {size}")
        torch.testing.assert_close(tokens[:, 0], expected[:, 0], atol=1e-5, rtol=0, msg=f"CLS at {size}")
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)


def _dinov2(registers: int):
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56, patch_size=14)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        hf = transformers.Dinov2WithRegistersModel(cfg)
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    randomise(hf)
    ours = ViT(
        ViTConfig(
            patch_size=14, embed_dim=48, depth=2, num_heads=3, pos_grid=4, layerscale=1.0,
            num_register_tokens=registers, pos_antialias=registers > 0,
        )
    )
    return hf.eval(), ours.eval()


# the config's 56 px (4 x 4 patches, no interpolation), then interpolated APE: larger, smaller, non-square
SIZES_14 = [(56, 56), (84, 84), (28, 28), (42, 70)]


def test_parity_dinov2():
    hf, ours = _dinov2(0)
    report = load_vit_weights(ours, hf.state_dict())
    assert report.dropped == ["embeddings.mask_token"]
    _compare(hf, ours, SIZES_14, num_prefix=1)


def test_parity_dinov2_with_registers_from_safetensors(tmp_path):
    hf, ours = _dinov2(4)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    load_vit_weights(ours, tmp_path / "model.safetensors", layout="auto")
    _compare(hf, ours, SIZES_14, num_prefix=5)


def test_parity_dinov2_hub_key_names():
    """The files on the hub use the pre-v5 names (attention.attention.query, attention.output.dense)
    and a classification wrapper prefixes 'dinov2.'; both map to the same weights."""
    hf, ours = _dinov2(0)
    legacy = {}
    for key, value in hf.state_dict().items():
        key = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)], key)
        key = key.replace("attention.o_proj", "attention.output.dense")
        legacy["dinov2." + key] = value
    legacy["classifier.weight"] = torch.zeros(10, 96)
    assert "dinov2.encoder.layer.0.attention.attention.query.weight" in legacy
    assert detect_vit_layout(legacy) == "dinov2"
    load_vit_weights(ours, legacy)
    _compare(hf, ours, SIZES_14[:2], num_prefix=1)


def _dinov3(registers: int):
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=16, num_register_tokens=registers,
    )
    hf = transformers.DINOv3ViTModel(cfg)
    randomise(hf)
    ours = ViT(
        ViTConfig(
            patch_size=16, embed_dim=32, depth=2, num_heads=2, pos="rope", layerscale=1.0,
            num_register_tokens=registers, norm_eps=1e-5,
        )
    )
    return hf.eval(), ours.eval()


SIZES_16 = [(32, 32), (64, 64), (16, 16), (48, 80)]


@pytest.mark.parametrize("registers", [0, 4])
def test_parity_dinov3(registers):
    hf, ours = _dinov3(registers)
    assert "model.layer.0.attention.k_proj.bias" not in hf.state_dict()  # DINOv3 has no key bias
    load_vit_weights(ours, hf.state_dict())
    assert torch.count_nonzero(ours.blocks[0].attn.qkv.bias[32:64]) == 0
    _compare(hf, ours, SIZES_16, num_prefix=1 + registers)


def test_parity_dinov3_hub_key_names():
    hf, ours = _dinov3(4)
    hub = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert "layer.1.mlp.up_proj.weight" in hub
    assert detect_vit_layout(hub) == "dinov3"
    load_vit_weights(ours, hub)
    _compare(hf, ours, SIZES_16[:2], num_prefix=5)


def test_dinov3_weights_need_rope_and_dinov2_needs_matching_grid():
    hf, _ = _dinov3(0)
    ape = ViT(ViTConfig(patch_size=16, embed_dim=32, depth=2, num_heads=2, layerscale=1.0))
    with pytest.raises(UserError, match="pos='rope'"):
        load_vit_weights(ape, hf.state_dict())
    hf2, _ = _dinov2(0)
    wrong_grid = ViT(ViTConfig(patch_size=14, embed_dim=48, depth=2, num_heads=3, pos_grid=6, layerscale=1.0))
    with pytest.raises(UserError, match="4x4 patch grid .* pos_grid=6; build the ViT with pos_grid=4"):
        load_vit_weights(wrong_grid, hf2.state_dict())


def test_mismatched_architecture_lists_missing_and_unexpected_keys():
    hf, _ = _dinov2(0)
    deeper = ViT(ViTConfig(patch_size=14, embed_dim=48, depth=3, num_heads=3, pos_grid=4, layerscale=1.0))
    with pytest.raises(UserError) as info:
        load_vit_weights(deeper, hf.state_dict())
    msg = str(info.value)
    assert msg.startswith("cannot load dinov2 ViT state dict into ViT: 14 missing keys (blocks.2.norm1.weight, ")
    no_ls = ViT(ViTConfig(patch_size=14, embed_dim=48, depth=2, num_heads=3, pos_grid=4))
    with pytest.raises(UserError, match=r"4 unexpected keys \(blocks\.0\.ls1\.gamma, blocks\.0\.ls2\.gamma"):
        load_vit_weights(no_ls, hf.state_dict())


@pytest.mark.parametrize(
    "key, shape, message",
    [
        # q, k and v that cannot be stacked into one (3C, C) matrix stay apart and are reported
        (r"layer\.0\.attention\..*(key|k_proj)\.weight", (48, 47), r"unexpected keys \(blocks\.0\.attn\.q\.weight"),
        (r"layer\.0\.attention\..*(query|q_proj)\.weight", (), r"unexpected keys \(blocks\.0\.attn\.q\.weight"),
        (r"layer\.0\.attention\..*(value|v_proj)\.bias", (2, 48), r"unexpected keys \(blocks\.0\.attn\.q\.weight"),
        # a CLS token of another width is not added to the CLS position: both are reported by shape
        (r"embeddings\.cls_token", (1, 1, 47), r"cls_token: checkpoint \(1, 1, 47\)"),
    ],
)
def test_damaged_dinov2_tensors_are_one_readable_error(key, shape, message):
    hf, _ = _dinov2(0)
    state = dict(hf.state_dict())
    (name,) = [k for k in state if re.search(key, k)]
    state[name] = torch.zeros(shape)
    model = ViT(ViTConfig(patch_size=14, embed_dim=48, depth=2, num_heads=3, pos_grid=4, layerscale=1.0))
    with pytest.raises(UserError, match=message):
        load_vit_weights(model, state)


# ---- timm layout ----------------------------------------------------------------------------------

TIMM_KEYS_TINY = [  # timm VisionTransformer(depth=1, reg_tokens=1, no_embed_class=True, init_values=...)
    "cls_token", "reg_token", "pos_embed",
    "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.ls1.gamma",
    "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
    "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "blocks.0.ls2.gamma",
    "norm.weight", "norm.bias",
]  # fmt: skip


def test_timm_key_names():
    model = ViT(ViTConfig(embed_dim=16, depth=1, num_heads=2, num_register_tokens=1, pos_grid=2, layerscale=1e-5))
    timm_sd = to_timm_state_dict(model)
    assert sorted(timm_sd) == sorted(TIMM_KEYS_TINY)
    assert timm_sd["pos_embed"].shape == (1, 4, 16)  # registers: patch-only APE (no_embed_class)
    assert timm_sd["reg_token"].shape == (1, 1, 16)
    assert detect_vit_layout(timm_sd) == "timm"
    classic = to_timm_state_dict(ViT(ViTConfig(embed_dim=16, depth=1, num_heads=2, pos_grid=2)))
    assert classic["pos_embed"].shape == (1, 5, 16)  # CLS slot, as in timm's classic ViT


@pytest.mark.parametrize(
    "options",
    [
        dict(num_register_tokens=0, pos="ape"),
        dict(num_register_tokens=2, pos="ape", layerscale=0.1),
        dict(num_register_tokens=0, pos="none", cls_token=False),
    ],
)
def test_timm_round_trip(options):
    cfg = ViTConfig(embed_dim=16, depth=2, num_heads=2, pos_grid=3, **options)
    src, dst = ViT(cfg).eval(), ViT(cfg).eval()
    randomise(src, seed=1)
    timm_sd = to_timm_state_dict(src)
    timm_sd["head.weight"], timm_sd["head.bias"] = torch.zeros(10, 16), torch.zeros(10)
    report = load_vit_weights(dst, timm_sd, layout="auto")
    assert report.dropped == ["head.weight", "head.bias"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=1e-7)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_tokens(x)[0], src.forward_tokens(x)[0])


def test_timm_classic_cls_position_is_folded_into_cls_token():
    cfg = ViTConfig(embed_dim=16, depth=1, num_heads=2, pos_grid=2)
    model = ViT(cfg)
    sd = to_timm_state_dict(model)
    cls_pos = torch.randn(1, 1, 16)
    sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"][:, 1:]], dim=1)
    expected_cls = sd["cls_token"] + cls_pos
    load_vit_weights(model, sd, layout="timm")
    torch.testing.assert_close(model.cls_token.detach(), expected_cls)
    assert model.pos_embed.shape == (1, 4, 16)


def test_own_layout_and_unknown_layouts(tmp_path):
    model = ViT(ViTConfig(embed_dim=16, depth=1, num_heads=2, pos_grid=2))
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    assert detect_vit_layout(model.state_dict()) == "trustseg"
    load_vit_weights(ViT(model.config), tmp_path / "ours.pth")
    with pytest.raises(UserError, match="cannot tell the ViT layout"):
        load_vit_weights(model, {"foo.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="unknown ViT weight layout 'mae'"):
        load_vit_weights(model, model.state_dict(), layout="mae")
