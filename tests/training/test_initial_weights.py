"""Where a fresh run starts: model.weights (published layouts) and model.init_from (trustseg checkpoints),
the classifier re-initialised for another class count, weights.json, and the errors of each."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from cli_helpers import run_cli
from trustseg.data.classes import generic_classes
from trustseg.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model, class_dependent_keys
from trustseg.training import train
from trustseg.training.config import ModelConfig
from trustseg.training.initial_weights import load_initial_weights

# small members of each family: (builder name, options)
MODELS = {
    "unet": {"base_width": 4, "depth": 2},
    "segformer": {"variant": "b0", "decoder_dim": 16},
    "vit_segmenter": {"backbone": "vit_ti16", "depth": 1, "head": "mask", "decoder_depth": 1},
}


def built(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes=num_classes, **MODELS[name])


def save_trustseg(path, name: str, num_classes: int, seed: int = 1) -> torch.nn.Module:
    """A trustseg checkpoint as `trustseg train` writes it (save_checkpoint), with random BN statistics too."""
    model = built(name, num_classes, seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand(tensor.shape))
    classes = generic_classes(f"c{i}" for i in range(num_classes))
    save_checkpoint(Checkpoint({"name": name, "options": MODELS[name]}, model.state_dict(), classes), path)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_init_from_with_another_class_count_reinitialises_only_the_classifier(tmp_path, name):
    source = save_trustseg(tmp_path / "source.pt", name, num_classes=3).state_dict()
    config = ModelConfig(name=name, options=MODELS[name], init_from=str(tmp_path / "source.pt"))

    same = built(name, 3, seed=2)
    record = load_initial_weights(same, config)
    assert record.new == [] and record.ignored == [] and record.loaded == list(source)
    for key, tensor in same.state_dict().items():
        assert torch.equal(tensor, source[key]), key

    fresh = built(name, 5, seed=2).state_dict()
    model = built(name, 5, seed=2)
    record = load_initial_weights(model, config)
    classifier = class_dependent_keys(name, **MODELS[name])
    assert classifier and set(record.new) == classifier
    assert len(record.loaded) == len(source) - len(classifier)
    for key, tensor in model.state_dict().items():
        expected = fresh[key] if key in classifier else source[key]
        assert torch.equal(tensor, expected), key


def test_vit_backbone_from_a_file_in_our_layout(tmp_path):
    source = built("vit_segmenter", 3, seed=1)
    save_file(source.backbone.state_dict(), tmp_path / "backbone.safetensors")
    model = built("vit_segmenter", 4, seed=2)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    config = ModelConfig(name="vit_segmenter", options=MODELS["vit_segmenter"],
                         weights=str(tmp_path / "backbone.safetensors"))
    record = load_initial_weights(model, config)
    for key, tensor in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor), key
    for key, tensor in model.head.state_dict().items():
        assert torch.equal(tensor, head[key]), key
    assert record.new == [f"head.{k}" for k in head] and record.layout == "trustseg ViT backbone"


def segformer_folder(path, num_labels: int = 3, **sizes) -> None:
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_labels=num_labels, decoder_hidden_size=16, **sizes)
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(path)


def test_a_segformer_of_another_class_count_keeps_all_but_its_classifier(tmp_path):
    segformer_folder(tmp_path / "ade", num_labels=7)
    model = built("segformer", 4, seed=2)
    before = model.state_dict()["decoder.classifier.weight"].clone()
    record = load_initial_weights(model, ModelConfig(name="segformer", options=MODELS["segformer"],
                                                     weights=str(tmp_path / "ade")))
    assert record.new == ["decoder.classifier.weight", "decoder.classifier.bias"]
    assert torch.equal(model.state_dict()["decoder.classifier.weight"], before)
    assert len(record.loaded) == len(model.state_dict()) - 2
    assert "decoder.classifier.weight (shape differs: classifier)" in record.ignored


def test_weights_path_follows_the_model_options(tmp_path):
    segformer_folder(tmp_path / "mit-b0")
    options = {**MODELS["segformer"], "variant": "b1"}
    config = ModelConfig(name="segformer", options=options, weights=f"{tmp_path}/mit-{{variant}}")
    with pytest.raises(UserError, match=f"{tmp_path}/mit-b1 does not exist"):
        load_initial_weights(built("segformer", 3, seed=0), config)
    config = ModelConfig(name="segformer", options=MODELS["segformer"], weights=f"{tmp_path}/mit-{{size}}")
    with pytest.raises(UserError, match=r"\{size\} is not one of the model options \(variant, decoder_dim\)"):
        load_initial_weights(built("segformer", 3, seed=0), config)
    with pytest.raises(UserError, match="model.init_from.*null when model.weights is set"):
        ModelConfig(weights="a", init_from="b")


def test_wrong_architecture_is_one_readable_error(tmp_path):
    segformer_folder(tmp_path / "segformer")
    torch.manual_seed(0)
    dinov2 = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=48, num_hidden_layers=1,
                                                                num_attention_heads=3, image_size=28))
    dinov2.save_pretrained(tmp_path / "dinov2")
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "odd.safetensors")
    save_trustseg(tmp_path / "unet.pt", "unet", 3)
    cases = [
        ("vit_segmenter", "weights", tmp_path / "segformer",
         "found SegFormer weights (transformers layout), but model 'vit_segmenter' takes ViT weights"),
        ("segformer", "weights", tmp_path / "dinov2", "found ViT weights (DINOv2, DINOv3 or timm layout), but model "
         "'segformer' takes SegFormer weights"),
        ("segformer", "weights", tmp_path / "odd.safetensors", "unknown layout (keys such as fc.weight)"),
        ("unet", "weights", tmp_path / "segformer", "model 'unet' has no pretrained layout; start it from a "
         "trustseg checkpoint with model.init_from"),
        ("segformer", "weights", tmp_path / "unet.pt", "this is a trustseg checkpoint; pass it as model.init_from"),
        ("segformer", "init_from", tmp_path / "unet.pt", "found a trustseg unet checkpoint, but model.name is "
         "'segformer'"),
        ("segformer", "weights", tmp_path, "holds none of model.safetensors"),
    ]
    for name, key, path, message in cases:
        config = ModelConfig(name=name, options=MODELS[name], **{key: str(path)})
        with pytest.raises(UserError) as info:
            load_initial_weights(built(name, 3, seed=0), config)
        assert message in str(info.value) and "\n" not in str(info.value), (name, path)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    save_trustseg(tmp_path / "wide.pt", "unet", 3)
    narrow = {"base_width": 2, "depth": 2}
    with pytest.raises(UserError, match=r"shape mismatch.*: checkpoint \(4, 3, 3, 3\) vs model \(2, 3, 3, 3\)"):
        load_initial_weights(build_model("unet", num_classes=3, **narrow),
                             ModelConfig(name="unet", options=narrow, init_from=str(tmp_path / "wide.pt")))


def test_cli_writes_weights_json_and_refuses_mismatches_with_exit_2(tmp_path, monkeypatch, capsys):
    segformer_folder(tmp_path / "narrow", hidden_sizes=[16, 64, 160, 256])
    save_trustseg(tmp_path / "unet.pt", "unet", 7)
    base = ["train", "--set", "steps=1", "--set", "batch_size=2", "--set", "data.crop=[32,32]", "--no-progress",
            "--data", "synthetic#size=32,num_images=2", "--set", "data.val=synthetic#split=val,size=32,num_images=1"]
    unet = ["--set", "model.name=unet", "--set", "model.options={base_width: 4, depth: 2}"]

    assert run_cli([*base, *unet, "--set", f"model.init_from={tmp_path}/unet.pt", "--out", str(tmp_path / "a")],
                   monkeypatch) == 0
    written = json.loads((tmp_path / "a" / "weights.json").read_text())
    assert written["key"] == "model.init_from" and written["path"] == f"{tmp_path}/unet.pt"
    assert written["counts"] == {"loaded": len(written["loaded"]), "new": 0, "ignored": 0}
    assert written["loaded"] == list(load_checkpoint(tmp_path / "unet.pt").state_dict)
    assert "model.init_from: " in capsys.readouterr().out

    segformer = ["--set", "model.name=segformer", "--set", "model.options={variant: b0}"]
    for extra, needles in [
        ([*segformer, "--set", f"model.weights={tmp_path}/narrow"],
         ["encoder.stages.0.patch_embed.proj.weight: checkpoint (16, 3, 7, 7) vs model (32, 3, 7, 7)"]),
        ([*unet, "--set", f"model.weights={tmp_path}/narrow"], ["model 'unet' has no pretrained layout"]),
        ([*segformer, "--set", f"model.init_from={tmp_path}/unet.pt"], ["found a trustseg unet checkpoint"]),
    ]:
        code = run_cli([*base, *extra, "--out", str(tmp_path / "b")], monkeypatch)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in err, err


def test_resume_restores_last_pt_and_never_rereads_the_initial_weights(tiny_config, tmp_path, train_until_killed):
    source = tmp_path / "source.pt"
    save_trustseg(source, "unet", 7)
    overrides = ("steps=4", "checkpoint_every=2", f"model.init_from={source}")
    reference = train(tiny_config(*overrides, out="whole"), progress=False)
    config = tiny_config(*overrides, out="interrupted")
    train_until_killed(config, step=2)
    source.unlink()  # a resumed run must not need it
    train(config, resume=True, progress=False)
    ours = load_checkpoint(config.out + "/last.pt").state_dict
    theirs = load_checkpoint(reference.run_dir / "last.pt").state_dict
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


# (transformers model with ViT-S widths and one block, our options, CLS + register tokens, an image size)
def dinov2_with_registers():
    config = transformers.Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                                                    image_size=56, patch_size=14, num_register_tokens=4)
    options = {"backbone": "vit_s14", "num_register_tokens": 4, "depth": 1, "pos_grid": 4}
    return transformers.Dinov2WithRegistersModel(config), options, 5, (56, 70)


def dinov3():
    config = transformers.DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=1,
                                          num_attention_heads=6, image_size=32, patch_size=16, num_register_tokens=4)
    return transformers.DINOv3ViTModel(config), {"backbone": "vit_s16_dinov3", "depth": 1}, 5, (32, 48)


@pytest.mark.parametrize("layout", [dinov2_with_registers, dinov3])
def test_vit_layouts_through_model_weights_match_transformers(tmp_path, layout):
    torch.manual_seed(0)
    hf, options, num_prefix, size = layout()
    with torch.no_grad():  # random LayerScale and biases, so that a wrong map shows
        for tensor in hf.parameters():
            tensor.add_(0.1 * torch.randn(tensor.shape))
    hf.save_pretrained(tmp_path / "weights")
    model = build_model("vit_segmenter", num_classes=3, **options)
    record = load_initial_weights(model, ModelConfig(name="vit_segmenter", options=options,
                                                     weights=str(tmp_path / "weights")))
    assert record.new == ["head.proj.weight", "head.proj.bias"]
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = hf.eval()(pixel_values=images).last_hidden_state[:, num_prefix:]
        patches, _, _ = model.backbone.eval().forward_features(images)
    torch.testing.assert_close(patches, expected, atol=1e-4, rtol=0)


def test_a_sharded_save_pretrained_folder_loads_like_a_single_file(tmp_path):
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_labels=3, decoder_hidden_size=16)
    hf = transformers.SegformerForSemanticSegmentation(config)
    hf.save_pretrained(tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    models = []
    for seed, folder in enumerate(("whole", "sharded")):
        model = built("segformer", 3, seed=seed)
        record = load_initial_weights(model, ModelConfig(name="segformer", options=MODELS["segformer"],
                                                         weights=str(tmp_path / folder)))
        assert record.new == [] and len(record.loaded) == len(model.state_dict())
        models.append(model.state_dict())
    for key, tensor in models[0].items():
        assert torch.equal(models[1][key], tensor), key
