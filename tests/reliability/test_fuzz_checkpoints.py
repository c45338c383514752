"""Fuzzing checkpoints, their calibrators and pretrained weight files.

Inputs: a valid trustseg checkpoint (a tiny U-Net, with and without a fitted calibrator) truncated,
bit-flipped or replaced by random bytes; its payload with fields deleted or replaced by values of a
wrong type and weights of a wrong shape or dtype; calibrator payloads of every method with missing,
extra, reshaped or non-tensor parameters; pretrained ViT weights in the timm, DINOv2 and trustseg
layouts as safetensors and ``.pth`` files, mutated as bytes or as tensors, behind fuzzed
``config.json`` and shard-index files.
Property: `load_checkpoint` + `predictor_from_checkpoint` give a predictor whose logits have shape
(B, K, H, W), and `load_pretrained` a load report, or either raises a one-line UserError naming the
file or the checkpoint; a shard named by an index never resolves outside the weight folder.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
from functools import cache
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from cli_helpers import THREE_CLASSES
from fuzzing import fuzz_settings, mutated, outcome
from trustseg.calibrators.methods import METHODS, build_calibrator
from trustseg.engine.checkpoint import Checkpoint, load_checkpoint
from trustseg.engine.inference import predictor_from_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.heads import LinearHead
from trustseg.models.pretrained import load_pretrained
from trustseg.models.segmenter import Segmenter
from trustseg.models.vit import vit_s14
from trustseg.models.weights import load_vit_weights, to_timm_state_dict

IMAGES = torch.randint(0, 256, (2, 3, 9, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
_names = itertools.count()


# --- valid inputs ----------------------------------------------------------------------------------

def unet_checkpoint(calibrator: str | None) -> Checkpoint:
    torch.manual_seed(0)
    options = {"base_width": 4, "depth": 2}
    model = build_model("unet", num_classes=THREE_CLASSES.num_classes, **options)
    fitted = None
    if calibrator is not None:
        state = build_calibrator(calibrator, THREE_CLASSES.num_classes).state_dict()
        fitted = {"method": calibrator, "state_dict": {k: v + 0.1 for k, v in state.items()}}
    return Checkpoint({"name": "unet", "options": options}, model.state_dict(), THREE_CLASSES, calibrator=fitted)


@cache
def valid_payloads() -> dict[str, dict[str, Any]]:
    return {name: unet_checkpoint(method).to_payload() for name, method in (("plain", None), ("ts", "ts"),
                                                                             ("lts", "lts"), ("ms", "ms"))}


@cache
def valid_checkpoint_bytes(name: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(valid_payloads()[name], buffer)
    return buffer.getvalue()


def tiny_segmenter() -> Segmenter:
    """A DINOv2-layout ViT (patch 14, LayerScale, CLS token) of width 24 and depth 1, linear head."""
    torch.manual_seed(0)
    return Segmenter(vit_s14(depth=1, pos_grid=2, embed_dim=24, num_heads=2), LinearHead(24, 3))


@cache
def shared_segmenter() -> Segmenter:
    return tiny_segmenter()


def dinov2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT state dict under the key names transformers' Dinov2Model saves (CLS slot in the positions,
    q/k/v apart, a mask token)."""
    out = {"embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    for key, tensor in state.items():
        block, _, rest = key.removeprefix("blocks.").partition(".")
        layer = f"encoder.layer.{block}."
        if key == "cls_token":
            out["embeddings.cls_token"] = tensor
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = torch.cat([tensor.new_zeros(1, 1, tensor.shape[2]), tensor], 1)
        elif key.startswith("patch_embed."):
            out["embeddings.patch_embeddings.projection." + key.split(".")[-1]] = tensor
        elif key.startswith("norm."):
            out["layernorm." + key.split(".")[-1]] = tensor
        elif rest.startswith("attn.qkv."):
            for part, name in zip(tensor.chunk(3), ("query", "key", "value")):
                out[f"{layer}attention.attention.{name}.{rest.split('.')[-1]}"] = part.clone()
        elif rest.startswith("attn.proj."):
            out[f"{layer}attention.output.dense.{rest.split('.')[-1]}"] = tensor
        elif rest.startswith("ls"):
            out[f"{layer}layer_scale{rest[2]}.lambda1"] = tensor
        else:  # norm1/norm2, mlp.fc1/fc2: same names under encoder.layer.N
            out[layer + rest] = tensor
    return out


@cache
def valid_weights() -> dict[str, dict[str, torch.Tensor]]:
    """layout -> backbone weights of `tiny_segmenter` in that layout."""
    backbone = tiny_segmenter().backbone
    ours = {k: v.clone() for k, v in backbone.state_dict().items()}
    return {"trustseg": ours, "timm": to_timm_state_dict(backbone), "dinov2": dinov2_layout(ours)}


def weight_bytes(state: dict[str, Any], suffix: str) -> bytes:
    """`state` as a safetensors file or (any other suffix) a torch.save file."""
    if suffix == ".safetensors":
        return save_safetensors({k: v.contiguous() for k, v in state.items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_valid_inputs_load():
    """The fuzzers' starting points are valid, so a refusal of a mutant is about the mutation."""
    for payload in valid_payloads().values():
        logits = predictor_from_checkpoint(Checkpoint.from_payload(payload, "valid"))(IMAGES)
        assert logits.shape == (2, 3, 9, 13) and bool(logits.isfinite().all())
    for layout, state in valid_weights().items():
        report = load_vit_weights(vit_s14(depth=1, pos_grid=2, embed_dim=24, num_heads=2), state, layout=layout)
        assert not report.missing and not report.unexpected, layout


# --- mutations of values -----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
          torch.complex64]


@st.composite
def tensors(draw: st.DrawFn, like: torch.Tensor | None = None) -> torch.Tensor:
    """A random tensor: `like` with one dimension off, or with another dtype; or any small shape
    (0-size dimensions included) and dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    if like is not None and like.dim() and draw(st.integers(0, 3)):
        shape = list(like.shape)
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.sampled_from([0, 1, max(shape[axis] - 1, 0), shape[axis] + 1, 2 * shape[axis]]))
        dtype = like.dtype if draw(st.integers(0, 3)) else dtype
    elif like is not None and draw(st.booleans()):
        shape = list(like.shape)
    else:
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 3
    return values.to(dtype)


plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=5,
)
payload_values = st.one_of(plain_values, tensors())


def paths_in(value: Any, prefix: tuple = (), depth: int = 3) -> list[tuple]:
    """Every key path into nested dicts and lists, e.g. ("classes", "names", 1)."""
    if depth == 0:
        return []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for key, inner in items:
        found.append((*prefix, key))
        found += paths_in(inner, (*prefix, key), depth - 1)
    return found


@st.composite
def mutated_mapping(draw: st.DrawFn, valid: dict[str, Any], max_edits: int = 3,
                    tensor_edits: int = 0) -> dict[str, Any]:
    """A deep copy of `valid` with `tensor_edits` tensors reshaped or retyped, then 1..`max_edits` edits of
    any kind: a tensor reshaped or retyped, a value replaced by anything, a key deleted or renamed, an
    unknown key added."""
    result = copy.deepcopy(valid)
    kinds = ["tensor"] * tensor_edits + [draw(st.sampled_from(["tensor", "tensor", "replace", "delete", "rename",
                                                               "add"])) for _ in range(draw(st.integers(1, max_edits)))]
    for kind in kinds:
        paths = paths_in(result)
        tensor_paths = [p for p in paths if isinstance(_get(result, p), torch.Tensor)]
        if not paths or kind == "add":
            result[draw(st.sampled_from(["extra", "x.weight", "", "line\nbreak"]))] = draw(payload_values)
            continue
        path = draw(st.sampled_from(tensor_paths if kind == "tensor" and tensor_paths else paths))
        parent, key = _get(result, path[:-1]), path[-1]
        if kind == "tensor" and isinstance(parent[key], torch.Tensor):
            parent[key] = draw(tensors(parent[key]))
        elif kind in ("tensor", "replace"):
            parent[key] = draw(payload_values)
        elif kind == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[f"{key}_" if isinstance(key, str) else str(key)] = parent.pop(key)
    return result


def _get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


# --- the property --------------------------------------------------------------------------------

def check_predictor(checkpoint: Checkpoint) -> None:
    """A loaded checkpoint gives a predictor of logits (B, K, H, W), or a one-line UserError."""
    def predict():
        return predictor_from_checkpoint(checkpoint)(IMAGES)

    logits = outcome("predictor_from_checkpoint", predict, "checkpoint")
    if not isinstance(logits, UserError):
        assert logits.shape == (2, checkpoint.classes.num_classes, 9, 13), logits.shape
        assert logits.dtype == torch.float32


def load_and_predict(path) -> None:
    checkpoint = outcome("load_checkpoint", lambda: load_checkpoint(path), str(path))
    if not isinstance(checkpoint, UserError):
        check_predictor(checkpoint)


def write(folder, data: bytes, suffix: str):
    path = folder / f"f{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


@fuzz_settings(max_examples=200)
@given(data=st.data(), name=st.sampled_from(sorted(valid_payloads())))
def test_mutated_checkpoint_files(tmp_path, data, name):
    load_and_predict(write(tmp_path, data.draw(mutated(valid_checkpoint_bytes(name), head=512)), ".pt"))


@fuzz_settings(max_examples=150)
@given(data=st.data(), name=st.sampled_from(sorted(valid_payloads())))
def test_checkpoint_payloads_with_wrong_fields(tmp_path, data, name):
    payload = data.draw(mutated_mapping(valid_payloads()[name]))
    path = tmp_path / f"f{next(_names)}.pt"
    torch.save(payload, path)
    load_and_predict(path)


@st.composite
def calibrator_payloads(draw: st.DrawFn) -> Any:
    """``{"method": ..., "state_dict": ...}`` of any method, its parameters mutated; or something else."""
    method = draw(st.sampled_from([*METHODS, "TS", "", "platt"]))
    state = build_calibrator(method, 3).state_dict() if method in METHODS else {"weight": torch.ones(3)}
    payload = {"method": method, "state_dict": state}
    kind = draw(st.sampled_from(["state", "state", "state", "payload", "other"]))
    if kind == "state":
        return {"method": method, "state_dict": draw(mutated_mapping(state)) if state else draw(payload_values)}
    if kind == "payload":
        return draw(mutated_mapping(payload, max_edits=2))
    return draw(payload_values)


@fuzz_settings(max_examples=200)
@given(calibrator=calibrator_payloads())
def test_calibrator_payloads(tmp_path, calibrator):
    payload = {**valid_payloads()["plain"], "calibrator": calibrator}
    path = tmp_path / f"f{next(_names)}.pt"
    torch.save(payload, path)
    load_and_predict(path)


# --- pretrained weights ----------------------------------------------------------------------------

def check_pretrained(folder, path) -> None:
    model = shared_segmenter()  # a refused load leaves it untouched; a successful one is checked below
    result = outcome("load_pretrained", lambda: load_pretrained("vit_segmenter", model, path), str(folder))
    if not isinstance(result, UserError):
        report, description = result
        assert isinstance(description, str) and set(report.missing) <= set(model.state_dict())
        assert model(torch.zeros(1, 3, 28, 28)).shape == (1, 3, 28, 28)


layouts = st.sampled_from(sorted(valid_weights()))
# DINOv2 weights pass through the most conversions (q/k/v fusion, the CLS position folded into the token)
converted_layouts = st.sampled_from(["dinov2", "dinov2", "timm", "trustseg"])
suffixes = st.sampled_from([".safetensors", ".pth", ".bin", ".weights"])


@fuzz_settings(max_examples=200)
@given(data=st.data(), layout=layouts, suffix=suffixes)
def test_mutated_weight_files(tmp_path, data, layout, suffix):
    valid = weight_bytes(valid_weights()[layout], ".safetensors" if suffix == ".weights" else suffix)
    path = write(tmp_path, data.draw(mutated(valid, head=256)), suffix)
    check_pretrained(path, path)


@fuzz_settings(max_examples=150)
@given(data=st.data(), layout=converted_layouts, suffix=st.sampled_from([".safetensors", ".pth"]),
       reshaped=st.integers(1, 3))
def test_weight_tensors_of_wrong_shape_dtype_or_name(tmp_path, data, layout, suffix, reshaped):
    state = data.draw(mutated_mapping(valid_weights()[layout], max_edits=2, tensor_edits=reshaped))
    if suffix == ".safetensors":  # safetensors holds tensors only
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    path = tmp_path / f"f{next(_names)}{suffix}"
    try:
        path.write_bytes(weight_bytes(state, suffix))
    except (ValueError, TypeError, RuntimeError):  # safetensors refuses to write it (e.g. no tensors)
        return
    check_pretrained(path, path)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=6)
SHARD = "model-00001-of-00001.safetensors"


@st.composite
def folder_files(draw: st.DrawFn) -> dict[str, bytes]:
    """A save_pretrained folder: config.json and a shard index, each valid, fuzzed JSON or random bytes."""
    def fuzzed(valid: Any) -> bytes:
        kind = draw(st.sampled_from(["valid", "json", "bytes", "missing"]))
        if kind == "valid":
            return json.dumps(valid).encode()
        if kind == "json":
            return json.dumps(draw(mutated_json(valid))).encode()
        return draw(st.binary(max_size=40)) if kind == "bytes" else b""

    shard = draw(st.sampled_from([SHARD, SHARD, f"../{SHARD}", f"/{SHARD}", f"sub/../{SHARD}", "", ".", "..",
                                  f"sub/../../{SHARD}"]))
    files = {"config.json": fuzzed({"model_type": "dinov2"}),
             "model.safetensors.index.json": fuzzed({"weight_map": {"a": shard, "b": shard}})}
    return {name: data for name, data in files.items() if data}


@st.composite
def mutated_json(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    if not draw(st.integers(0, 3)):
        return draw(json_values)
    result = copy.deepcopy(valid)
    key = draw(st.sampled_from(sorted(result)))
    result[key] = draw(json_values)
    return result


@pytest.fixture(scope="module")
def shard_bytes() -> bytes:
    return weight_bytes(valid_weights()["dinov2"], ".safetensors")


@fuzz_settings(max_examples=150)
@given(files=folder_files())
def test_weight_folders_with_fuzzed_config_and_index(tmp_path, shard_bytes, files):
    base = tmp_path / f"b{next(_names)}"
    folder = base / "weights"
    folder.mkdir(parents=True)
    (base / SHARD).write_bytes(shard_bytes)  # a valid shard outside the folder: an index must not reach it
    (folder / SHARD).write_bytes(shard_bytes)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    index = folder / "model.safetensors.index.json"
    target = folder if index.exists() else folder / SHARD
    model = tiny_segmenter()
    result = outcome("load_pretrained", lambda: load_pretrained("vit_segmenter", model, target), str(folder))
    if not isinstance(result, UserError) and index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert all((folder / s).resolve().parent == folder.resolve() for s in shards), shards
