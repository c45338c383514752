"""Load foreign checkpoints into our modules through explicit, strict key maps.

Generic part (used by every model file):

- ``read_state_dict(path)`` reads ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` into a flat
  ``{name: Tensor}`` dict, unwrapping common containers (``{"model": ...}``, ``{"state_dict": ...}``,
  DDP's ``module.`` prefix).
- ``load_mapped(model, state, rename, source=...)`` renames keys (``None`` drops a key; a
  ``(new_key, fn)`` pair also transforms the tensor), optionally runs a whole-dict ``convert`` (for
  many-to-one maps such as fusing q/k/v), then loads and reports any mismatch as one readable
  ``UserError``: missing keys, unexpected keys and shape mismatches, each list truncated with a count.

ViT part: ``load_vit_weights(model, path_or_state, layout="auto")`` for the layouts Hugging Face
``transformers`` saves for DINOv2 (with and without registers) and DINOv3 ViT, and the timm ViT layout.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

from trustseg.errors import UserError

if TYPE_CHECKING:
    from trustseg.models.vit import ViT

StateDict = dict[str, Tensor]
TensorFn = Callable[[Tensor], Tensor]
# rename(key) -> new key | None (drop) | (new key, tensor transform)
Rename = Callable[[str], Union[str, None, tuple[str, TensorFn]]]

# Keys under which training scripts commonly nest the weights, most specific first.
_CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "teacher", "net")


# ---------------------------------------------------------------------------------------------------
# Generic mechanism
# ---------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> StateDict:
    """Read a checkpoint file into a flat ``{name: Tensor}`` dict on the CPU.

    ``.safetensors`` is read with ``safetensors.torch.load_file``; ``.pth``/``.pt``/``.bin`` (and any
    other suffix that is not safetensors) with ``torch.load(weights_only=True)``, so no code in the
    file is executed. Raises ``UserError`` if the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle/zip errors have many types
        if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
            try:  # an unknown suffix may still be a safetensors file
                return _read_safetensors(path)
            except UserError:
                pass
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            reason = "it pickles Python objects besides tensors (refused for safety); re-save model.state_dict()"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read checkpoint {path}: {reason}") from error
    return unwrap_state_dict(obj, source=str(path))


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"cannot read safetensors checkpoint {path}: {error}") from error


def unwrap_state_dict(obj: object, *, source: str = "checkpoint") -> StateDict:
    """Find the ``{name: Tensor}`` dict inside a loaded checkpoint object.

    Descends through container keys such as ``"model"`` or ``"state_dict"`` and strips a ``module.``
    prefix carried by every key (DistributedDataParallel). Non-tensor entries next to the weights
    (epoch counters, configs) are ignored.
    """
    for _ in range(4):  # containers nest at most a few levels deep in practice
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(printable_key(key) for key in sorted(map(str, obj.keys()))[:8])
        raise UserError(f"{source}: no tensors found (top-level keys: {keys or 'none'})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def as_state_dict(path_or_state: str | Path | Mapping[str, Tensor], *, source: str | None = None) -> StateDict:
    """A state dict from either a path (read with ``read_state_dict``) or an in-memory mapping."""
    if isinstance(path_or_state, (str, Path)):
        return read_state_dict(path_or_state)
    return unwrap_state_dict(path_or_state, source=source or "state dict")


@dataclass(frozen=True)
class LoadReport:
    """What ``load_mapped`` did not load: our keys without a checkpoint tensor (``missing``; always
    empty when ``strict=True``), checkpoint keys that are not ours (``unexpected``) or were dropped by
    the rename (``dropped``), and our keys whose checkpoint tensor had another shape and was skipped on
    purpose (``reinitialised``, e.g. a classifier for another number of classes)."""

    missing: list[str]
    unexpected: list[str]
    dropped: list[str]
    reinitialised: list[str] = field(default_factory=list)

    def loaded(self, model: nn.Module) -> list[str]:
        """Our keys that received a checkpoint tensor."""
        kept = set(self.missing) | set(self.reinitialised)
        return [key for key in model.state_dict() if key not in kept]


def rename_keys(state: Mapping[str, Tensor], rename: Rename, *, source: str) -> tuple[StateDict, list[str]]:
    """Apply ``rename`` to every key; returns the renamed dict and the list of dropped source keys."""
    out: StateDict = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    for key, tensor in state.items():
        target = rename(key)
        if target is None:
            dropped.append(key)
            continue
        if isinstance(target, tuple):
            target, fn = target
            tensor = fn(tensor)
        if target in out:
            raise UserError(f"{source}: keys {origin[target]!r} and {key!r} both map to {target!r}")
        out[target] = tensor
        origin[target] = key
    return out, dropped


def load_mapped(
    model: nn.Module,
    state: Mapping[str, Tensor],
    rename: Rename = lambda key: key,
    *,
    source: str,
    convert: Callable[[StateDict], StateDict] | None = None,
    strict: bool = True,
    reinitialise: Collection[str] = (),
) -> LoadReport:
    """Rename, convert and load ``state`` into ``model``; mismatches raise one readable ``UserError``.

    Args:
        model: the module to load into (its persistent parameters and buffers are the targets).
        state: the foreign ``{name: Tensor}`` dict.
        rename: maps a foreign key to ours: a string, ``None`` to drop the key, or ``(key, fn)`` to
            also transform the tensor (e.g. a transpose or a reshape).
        source: what is being loaded, for messages (e.g. ``"dinov2 checkpoint vits14.safetensors"``).
        convert: optional whole-dict step after renaming, for many-to-one maps (fusing q, k, v).
        strict: if False, missing and unexpected keys are reported in the result instead of raising;
            shape mismatches always raise.
        reinitialise: our keys that keep their initialisation when the checkpoint's tensor has another
            shape (a classifier trained for another number of classes); any other mismatch raises.
    """
    renamed, dropped = rename_keys(state, rename, source=source)
    if convert is not None:
        renamed = convert(renamed)
    expected = model.state_dict()
    reinitialised = [
        k for k in expected if k in reinitialise and k in renamed and renamed[k].shape != expected[k].shape
    ]
    renamed = {k: v for k, v in renamed.items() if k not in reinitialised}
    missing, unexpected, mismatched = _compare(expected, renamed, skip=reinitialised)
    if mismatched or (strict and (missing or unexpected)):
        raise UserError(describe_mismatch(source, type(model).__name__, missing, unexpected, mismatched))
    with torch.no_grad():
        model.load_state_dict(renamed, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected, dropped=dropped, reinitialised=reinitialised)


def require_fit(model: nn.Module, state: Mapping[str, Tensor], *, source: str) -> None:
    """Raise one readable UserError unless ``state`` holds exactly ``model``'s keys, with its shapes.

    Only names and shapes are read, so ``model`` may live on the meta device: a check before building
    the model for real.
    """
    missing, unexpected, mismatched = _compare(model.state_dict(), state)
    if missing or unexpected or mismatched:
        raise UserError(describe_mismatch(source, type(model).__name__, missing, unexpected, mismatched))


def _compare(
    expected: Mapping[str, Tensor], state: Mapping[str, Tensor], skip: Collection[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """(our keys ``state`` lacks, its keys we lack, "key: checkpoint (shape) vs model (shape)" lines)."""
    missing = [k for k in expected if k not in state and k not in skip]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def printable_key(key: str) -> str:
    """`key` as it is, or quoted with escapes when it holds a line break or another control character."""
    return key if key.isprintable() else repr(key)


def describe_mismatch(
    source: str, target: str, missing: list[str], unexpected: list[str], mismatched: list[str], *, limit: int = 6
) -> str:
    """One line such as ``cannot load X into ViT: 2 missing keys (a, b); 1 unexpected key (c)``."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if not items:
            continue
        noun = label if label == "shape mismatch" else f"{label} key"
        plural = "es" if noun.endswith("mismatch") else "s"
        head = f"{len(items)} {noun}{plural if len(items) != 1 else ''}"
        shown = ", ".join(map(printable_key, items[:limit]))
        shown += f", ... and {len(items) - limit} more" if len(items) > limit else ""
        parts.append(f"{head} ({shown})")
    return f"cannot load {source} into {target}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------
# ViT layouts: transformers DINOv2 / DINOv2-with-registers / DINOv3, timm, and our own
# ---------------------------------------------------------------------------------------------------

Rules = list[tuple[str, "str | None"]]

# (regex on the foreign key, replacement template or None to drop); first full match wins; keys that
# match no rule pass through unchanged and show up as "unexpected" if they are not ours.
_DINOV2_RULES: Rules = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", None),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.register_tokens", "reg_tokens"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    # transformers >= 5 names, then the names in the files on the Hugging Face hub
    (r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.q.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.k.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.v.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.(?:o_proj|output\.dense)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\..*", None),
]

_DINOV3_RULES: Rules = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", None),
    (r"embeddings\.register_tokens", "reg_tokens"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.\1"),
    # transformers >= 5 nests the blocks under "model."; the hub files do not
    (r"(?:model\.)?layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"(?:model\.)?layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"(?:model\.)?layer\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"(?:model\.)?layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"(?:model\.)?layer\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"(?:model\.)?layer\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"rope_embeddings\.inv_freq", None),
]

_TIMM_RULES: Rules = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"reg_token|register_tokens", "reg_tokens"),  # timm | original DINOv2 repository
    (r"mask_token", None),
    (r"(?:head|fc_norm)\..*", None),  # classification head
]

# Prefixes that transformers' wrapper classes (…ForImageClassification) put before the backbone keys.
_DINOV2_PREFIX = r"^(?:dinov2_with_registers|dinov2)\."

VIT_LAYOUTS = ("dinov2", "dinov3", "timm", "trustseg")


def rules_renamer(rules: Rules, prefix: str | None = None) -> Rename:
    """A ``rename`` function from an ordered list of (regex, template | None) rules, applied after
    removing an optional ``prefix`` regex."""
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    prefix_re = re.compile(prefix) if prefix else None

    def rename(key: str) -> str | None:
        if prefix_re is not None:
            key = prefix_re.sub("", key, count=1)
        for pattern, template in compiled:
            match = pattern.fullmatch(key)
            if match:
                return None if template is None else match.expand(template)
        return key

    return rename


def fuse_qkv(state: StateDict) -> StateDict:
    """Fuse ``blocks.N.attn.{q,k,v}.*`` into ``blocks.N.attn.qkv.*``; an absent bias part (DINOv3 has
    no key bias) becomes zeros, which is exactly what the unfused layer computed."""
    out = dict(state)
    blocks = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"blocks\.(\d+)\.attn\.[qkv]\.weight", k))})
    for i in blocks:
        p = f"blocks.{i}.attn."
        weights = [state.get(f"{p}{n}.weight") for n in "qkv"]
        biases = [state.get(f"{p}{n}.bias") for n in "qkv"]
        if any(w is None or w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights) or any(
            b is not None and b.shape != w.shape[:1] for b, w in zip(biases, weights)
        ):
            continue  # incomplete or not (out, in) matrices with matching biases: parts left for the mismatch report
        out[f"{p}qkv.weight"] = torch.cat(weights, dim=0)
        if any(b is not None for b in biases):
            out[f"{p}qkv.bias"] = torch.cat(
                [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]
            )
        for n in "qkv":
            out.pop(f"{p}{n}.weight")
            out.pop(f"{p}{n}.bias", None)
    return out


def fold_cls_pos(state: StateDict) -> StateDict:
    """Move a CLS slot of ``pos_embed`` (1, 1 + G*G, C) into ``cls_token``; our APE covers patches only.

    Adding the CLS position to the CLS token once is what the embedding layer did on every forward.
    """
    pos, cls = state.get("pos_embed"), state.get("cls_token")
    if pos is None or cls is None or pos.dim() != 3 or cls.shape != (1, 1, pos.shape[2]):
        return state  # not a token and positions of one width: left for the mismatch report
    n = pos.shape[1]
    if math.isqrt(n) ** 2 == n or math.isqrt(n - 1) ** 2 != n - 1:
        return state  # no CLS slot (or not a square grid: left for the mismatch report)
    return {**state, "cls_token": cls + pos[:, :1], "pos_embed": pos[:, 1:]}


def detect_vit_layout(state: Mapping[str, Tensor]) -> str:
    """Guess which of ``VIT_LAYOUTS`` a state dict uses from its key names."""
    keys = list(state)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"(^|\.)encoder\.layer\.\d+\.") or has(r"embeddings\.patch_embeddings\.projection\."):
        return "dinov2"
    if has(r"embeddings\.patch_embeddings\.weight$") or has(r"(^|\.)layer\.\d+\.attention\.[qkv]_proj\."):
        return "dinov3"
    if has(r"^patch_embed\.proj\.") or (has(r"^blocks\.\d+\.attn\.qkv\.") and not has(r"^patch_embed\.weight$")):
        return "timm"
    if has(r"^patch_embed\.weight$") and has(r"^blocks\.\d+\.attn\.qkv\."):
        return "trustseg"
    raise UserError(
        f"cannot tell the ViT layout from keys such as {', '.join(map(printable_key, keys[:4])) or '(none)'}; "
        f"pass layout= one of {VIT_LAYOUTS}"
    )


def load_vit_weights(
    model: ViT,
    path_or_state: str | Path | Mapping[str, Tensor],
    *,
    layout: str = "auto",
    strict: bool = True,
    source: str | None = None,
) -> LoadReport:
    """Load DINOv2 / DINOv3 (transformers layout), timm or trustseg ViT weights into ``model``.

    ``source`` names what is loaded in messages (default: the path).

    The model must be built with the matching architecture: e.g. DINOv2 ViT-S/14 from the hub is
    ``vit_s14()`` (``registers=True`` for the register variant), DINOv3 ViT-S/16 is ``vit_s16_dinov3()``.
    """
    if source is None:
        source = f"ViT weights {path_or_state}" if isinstance(path_or_state, (str, Path)) else "ViT state dict"
    state = as_state_dict(path_or_state, source=source)
    if layout == "auto":
        layout = detect_vit_layout(state)
    if layout not in VIT_LAYOUTS:
        raise UserError(f"unknown ViT weight layout {layout!r}; expected 'auto' or one of {VIT_LAYOUTS}")
    source = f"{layout} {source}"
    if layout == "dinov3" and model.config.pos != "rope" and strict:
        raise UserError(f"{source}: DINOv3 weights need a ViT built with pos='rope', not {model.config.pos!r}")
    rename = {
        "dinov2": rules_renamer(_DINOV2_RULES, _DINOV2_PREFIX),
        "dinov3": rules_renamer(_DINOV3_RULES),
        "timm": rules_renamer(_TIMM_RULES),
        "trustseg": lambda key: key,
    }[layout]

    def convert(renamed: StateDict) -> StateDict:
        renamed = fold_cls_pos(fuse_qkv(renamed))
        if "reg_tokens" in renamed and renamed["reg_tokens"].numel() == 0:
            del renamed["reg_tokens"]  # transformers keeps a (1, 0, C) parameter when there are none
        _check_pos_grid(model, renamed, source)
        return renamed

    return load_mapped(model, state, rename, source=source, convert=convert, strict=strict)


def _check_pos_grid(model: ViT, state: StateDict, source: str) -> None:
    pos, ours = state.get("pos_embed"), model.pos_embed
    if pos is None or ours is None or pos.shape == ours.shape or pos.dim() != 3:
        return
    side = math.isqrt(pos.shape[1])
    if side * side == pos.shape[1] and pos.shape[2] == ours.shape[2]:
        raise UserError(
            f"{source}: absolute position embedding is trained on a {side}x{side} patch grid but the model "
            f"has pos_grid={model.config.pos_grid}; build the ViT with pos_grid={side}"
        )


def to_timm_state_dict(model: ViT) -> StateDict:
    """Our ViT's weights under timm's VisionTransformer key names.

    With a CLS token and no registers, ``pos_embed`` gets timm's classic CLS slot (zeros, since our
    CLS position lives in ``cls_token``); otherwise it is patch-only (timm's ``no_embed_class``).
    """
    out: StateDict = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("patch_embed."):
            key = "patch_embed.proj." + key[len("patch_embed.") :]
        elif key == "reg_tokens":
            key = "reg_token"
        elif key == "pos_embed" and model.cls_token is not None and model.reg_tokens is None:
            tensor = torch.cat([tensor.new_zeros(1, 1, tensor.shape[2]), tensor], dim=1)
        out[key] = tensor.clone()
    return out
