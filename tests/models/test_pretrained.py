"""Pretrained weight folders: what config.json and a shard index may hold, and where shards may live."""

import json

import pytest
import torch
from safetensors.torch import save_file

from trustseg.errors import UserError
from trustseg.models.heads import LinearHead
from trustseg.models.pretrained import load_pretrained
from trustseg.models.segmenter import Segmenter
from trustseg.models.vit import vit_s14
from trustseg.models.weights import to_timm_state_dict

SHARD = "model-00001-of-00001.safetensors"


def tiny_segmenter() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(vit_s14(depth=1, pos_grid=2, embed_dim=24, num_heads=2), LinearHead(24, 3))


@pytest.fixture
def folder(tmp_path):
    """A weight folder with one timm-layout shard; the same shard also lies next to the folder."""
    weights = {k: v.contiguous() for k, v in to_timm_state_dict(tiny_segmenter().backbone).items()}
    save_file(weights, tmp_path / SHARD)
    (tmp_path / "weights").mkdir()
    save_file(weights, tmp_path / "weights" / SHARD)
    return tmp_path / "weights"


def index(folder, shard: str):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"cls_token": shard}}))


def test_a_shard_index_loads_its_shards(folder):
    index(folder, f"sub/../{SHARD}")
    report, layout = load_pretrained("vit_segmenter", tiny_segmenter(), folder)
    assert layout == "timm ViT backbone" and report.missing == ["head.proj.weight", "head.proj.bias"]


@pytest.mark.parametrize("shard", [f"../{SHARD}", f"/{SHARD}", "..", ""])
def test_a_shard_index_cannot_reach_outside_its_folder(folder, shard):
    index(folder, shard)
    with pytest.raises(UserError, match="names shard .* leads outside"):
        load_pretrained("vit_segmenter", tiny_segmenter(), folder)


def test_an_index_of_no_shards_is_an_error_naming_the_folder(folder):
    (folder / "config.json").write_text('{"model_type": "dinov2"}')
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    message = r"model\.weights=.*weights: cannot tell the ViT layout from keys such as \(none\)"
    with pytest.raises(UserError, match=message):
        load_pretrained("vit_segmenter", tiny_segmenter(), folder)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("config.json", b"\x80\x81", "config.json is not a JSON object"),
        ("config.json", b'{"model_type": ["vit"]}', r"model_type \['vit'\] is not a name"),
        ("model.safetensors.index.json", b"\xff", "index.json is not a shard index"),
        ("model.safetensors.index.json", b'{"weight_map": {"a": 3}}', "index.json is not a shard index"),
        ("model.safetensors.index.json", b"[" * 5000, "index.json is not a shard index"),
    ],
)
def test_damaged_json_files_are_one_line_errors_naming_them(folder, name, content, message):
    (folder / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        load_pretrained("vit_segmenter", tiny_segmenter(), folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
