"""Pretrained weights from local files for the models the factory builds.

``load_pretrained(name, model, path)`` finds the weight file, tells which architecture it was saved
for and loads it through that architecture's key map:

- ``segformer``: Hugging Face ``transformers`` SegFormer weights (``SegformerForSemanticSegmentation``,
  ``SegformerModel``, the ImageNet ``mit-bX`` encoders), see ``segformer.load_segformer_weights``;
- ``vit_segmenter``: a ViT backbone in the DINOv2, DINOv2-with-registers, DINOv3 or timm layout, see
  ``weights.load_vit_weights``; the decode head keeps its initialisation.

``path`` is a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``) or a single weight file. The architecture
comes from ``config.json``'s ``model_type`` when there is one, else from the key names, so a file for
another architecture is refused in one line instead of as a list of a hundred missing keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trustseg.data.paths import inside
from trustseg.errors import UserError
from trustseg.models.weights import (
    LoadReport,
    StateDict,
    detect_vit_layout,
    load_vit_weights,
    printable_key,
    read_state_dict,
)

# What each model takes; unet has no published pretrained layout (start it from a trustseg checkpoint).
FAMILIES = {"segformer": "segformer", "vit_segmenter": "vit"}
FAMILY_NAMES = {
    "segformer": "SegFormer weights (transformers layout)",
    "vit": "ViT weights (DINOv2, DINOv3 or timm layout)",
}
# config.json model_type -> family
_MODEL_TYPES = {"segformer": "segformer", "dinov2": "vit", "dinov2_with_registers": "vit", "dinov3_vit": "vit"}
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
_SEGFORMER_KEY = re.compile(
    r"(^|\.)(encoder\.(patch_embeddings|block|layer_norm)\.\d+\.|decode_head\.|stages\.\d+\.patch_embeddings\.)"
)


@dataclass(frozen=True)
class PretrainedFile:
    """A weight file and what its folder's config.json says (``model_type`` may be None)."""

    path: Path
    model_type: str | None


def find_weights(path: str | Path) -> PretrainedFile:
    """The weight file of ``path``: the file itself, or the first of ``WEIGHT_FILES`` in a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"model.weights: {path} does not exist")
    folder = path if path.is_dir() else path.parent
    model_type = None
    if (folder / "config.json").is_file():
        model_type = _read_json(folder / "config.json", "a JSON object").get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise UserError(f"model.weights: {folder / 'config.json'}: model_type {model_type!r} is not a name "
                            "(expected e.g. \"segformer\" or \"dinov2\")")
    if path.is_file():
        return PretrainedFile(path, model_type)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return PretrainedFile(path / name, model_type)
    raise UserError(f"model.weights: {path} holds none of {', '.join(WEIGHT_FILES)} (expected a save_pretrained "
                    "folder or a weight file)")


def read_weights(file: PretrainedFile) -> StateDict:
    """All tensors of ``file``; a sharded index reads and merges its shards."""
    if not file.path.name.endswith(".index.json"):
        return read_state_dict(file.path)
    weight_map = _read_json(file.path, "a shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise UserError(f"model.weights: {file.path} is not a shard index (no weight_map of tensor name -> file)")
    state: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(inside(file.path.parent, shard, f"model.weights: {file.path} names shard")))
    return state


def _read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; anything else (not UTF-8, not JSON, not an object) is a UserError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise UserError(f"model.weights: {path} is not {what} (expected a JSON object)")
    return value


def is_trustseg_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint written by trustseg (those go to ``model.init_from``)."""
    if path.suffix == ".safetensors" or path.name.endswith(".json"):
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch zip file: certainly not ours
        return False
    return isinstance(payload, dict) and "format_version" in payload and "train_config" in payload


def weights_family(state: StateDict, model_type: str | None) -> str | None:
    """``"segformer"``, ``"vit"`` or None (unknown) for a foreign state dict."""
    if model_type is not None and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if any(_SEGFORMER_KEY.search(key) for key in state):
        return "segformer"
    try:
        detect_vit_layout(state)
    except UserError:
        return None
    return "vit"


def load_pretrained(
    name: str, model: nn.Module, path: str | Path, *, reinitialise: Collection[str] = ()
) -> tuple[LoadReport, str]:
    """Load pretrained weights at ``path`` into ``model`` (built by ``build_model(name, ...)``).

    Returns the load report, with keys named as in ``model.state_dict()``, and a short description of
    what was read (e.g. ``"segformer, encoder only"``). ``reinitialise``: our keys that keep their
    initialisation if the file's tensor has another shape (the classifier, for another class count).
    Raises ``UserError`` for a model without a pretrained layout, a file for another architecture and
    any key or shape mismatch (naming the key and both shapes).
    """
    if name not in FAMILIES:
        raise UserError(f"model.weights: model {name!r} has no pretrained layout; start it from a trustseg "
                        "checkpoint with model.init_from instead")
    expected = FAMILIES[name]
    file = find_weights(path)
    if is_trustseg_checkpoint(file.path):
        raise UserError(f"model.weights={path}: this is a trustseg checkpoint; pass it as model.init_from")
    state = read_weights(file)
    found = weights_family(state, file.model_type)
    if found != expected:
        keys = ", ".join(map(printable_key, list(state)[:3]))
        what = FAMILY_NAMES[found] if found else f"weights of an unknown layout (keys such as {keys})"
        raise UserError(f"model.weights={path}: found {what}, but model {name!r} takes {FAMILY_NAMES[expected]}")
    source = str(file.path)
    if expected == "segformer":
        from trustseg.models.segformer import load_segformer_weights

        report = load_segformer_weights(model, state, reinitialise=reinitialise, source=f"SegFormer weights {source}")
        encoder_only = any(key.startswith("decoder.") for key in report.missing)
        return report, "segformer, encoder only" if encoder_only else "segformer"
    backbone = model.backbone
    try:  # config.json may say "dinov2" about keys of no ViT layout
        layout = detect_vit_layout(state)
    except UserError as error:
        raise UserError(f"model.weights={path}: {error}") from None
    report = load_vit_weights(backbone, state, layout=layout, source=f"ViT weights {source}")
    head = [key for key in model.state_dict() if not key.startswith("backbone.")]
    prefixed = LoadReport(missing=[f"backbone.{k}" for k in report.missing] + head,
                          unexpected=report.unexpected, dropped=report.dropped)
    return prefixed, f"{layout} ViT backbone"
