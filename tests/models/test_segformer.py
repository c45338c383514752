"""SegFormer: parity with Hugging Face transformers, checkpoint loading, shapes, modes, presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from trustseg.errors import UserError
from trustseg.models.segformer import PRESETS, MiTConfig, SegFormer, drop_path, load_segformer_weights, segformer

TINY = MiTConfig(widths=(8, 16, 32, 48), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4))
NUM_CLASSES = 5
DECODER_DIM = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_config(**overrides):
    options = {
        "hidden_sizes": list(TINY.widths),
        "depths": list(TINY.depths),
        "num_attention_heads": list(TINY.num_heads),
        "decoder_hidden_size": DECODER_DIM,
        "num_labels": NUM_CLASSES,
        "image_size": 64,
        **overrides,
    }
    return transformers.SegformerConfig(**options)


def randomised(model):
    """Perturb every parameter and buffer so that a wrong mapping (e.g. two swapped norms) shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def tiny(**options) -> SegFormer:
    torch.manual_seed(0)
    return SegFormer(options.pop("num_classes", NUM_CLASSES), TINY, decoder_dim=DECODER_DIM, **options)


@pytest.fixture(scope="module")
def hf_segmenter():
    torch.manual_seed(0)
    return randomised(transformers.SegformerForSemanticSegmentation(hf_config()))


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def test_parity_with_transformers_segmentation_model(hf_segmenter, images):
    ours = tiny().eval()
    report = load_segformer_weights(ours, hf_segmenter.state_dict())
    assert report.missing == [] and report.dropped == []
    with torch.no_grad():
        theirs = hf_segmenter(pixel_values=images).logits  # (B, K, H/4, W/4)
        quarter = ours.decoder(ours.encoder(images))
        full = ours(images)
    assert quarter.shape == theirs.shape == (2, NUM_CLASSES, 16, 16)
    torch.testing.assert_close(quarter, theirs, atol=1e-5, rtol=0)
    upsampled = F.interpolate(theirs, size=images.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, upsampled, atol=1e-5, rtol=0)


def test_parity_from_a_saved_hub_layout_file(hf_segmenter, images, tmp_path):
    hf_segmenter.save_pretrained(tmp_path)  # writes the hub key layout (segformer.encoder.block.N.M...)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as file:
        keys = list(file.keys())
    assert any(k.startswith("segformer.encoder.block.1.1.attention.self.query") for k in keys)
    assert any(k.startswith("decode_head.linear_c.3.proj") for k in keys)
    ours = tiny().eval()
    load_segformer_weights(ours, tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(ours.decoder(ours.encoder(images)), hf_segmenter(images).logits, atol=1e-5, rtol=0)


def _assert_encoder_parity(ours, hf_encoder, images):
    with torch.no_grad():
        theirs = hf_encoder(pixel_values=images, output_hidden_states=True).hidden_states
        mine = ours.forward_features(images)
    assert len(mine) == len(theirs) == 4
    for stage, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape == (2, TINY.widths[stage], 64 // 4 // 2**stage, 64 // 4 // 2**stage)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("saved", [False, True], ids=["in-memory", "hub-file"])
def test_encoder_only_checkpoint_loads_the_encoder_and_leaves_the_decoder(images, tmp_path, saved):
    torch.manual_seed(3)
    hf_encoder = randomised(transformers.SegformerModel(hf_config()))  # keys without "segformer."
    ours = tiny().eval()
    decoder_before = {k: v.clone() for k, v in ours.decoder.state_dict().items()}
    if saved:
        hf_encoder.save_pretrained(tmp_path)
        report = load_segformer_weights(ours, tmp_path / "model.safetensors")
    else:
        report = load_segformer_weights(ours, hf_encoder.state_dict())
    _assert_encoder_parity(ours, hf_encoder, images)
    assert report.missing == [f"decoder.{k}" for k in decoder_before]
    assert "decoder.classifier.weight" in report.missing and report.dropped == []
    for key, value in ours.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), key


def test_imagenet_mit_checkpoint_drops_its_classifier(images, tmp_path):
    torch.manual_seed(4)
    hf_classifier = randomised(transformers.SegformerForImageClassification(hf_config(num_labels=10)))
    hf_classifier.save_pretrained(tmp_path)  # "segformer.encoder..." + "classifier.*", like nvidia/mit-b0
    ours = tiny().eval()
    report = load_segformer_weights(ours, tmp_path / "model.safetensors")
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight"]
    _assert_encoder_parity(ours, hf_classifier.segformer, images)


def test_encoder_only_option_takes_the_encoder_of_a_model_with_other_classes(hf_segmenter, images):
    ours = tiny(num_classes=3).eval()
    with pytest.raises(UserError, match=r"shape mismatch.*decoder\.classifier\.weight"):
        load_segformer_weights(ours, hf_segmenter.state_dict())
    report = load_segformer_weights(ours, hf_segmenter.state_dict(), encoder_only=True)
    assert all(key.startswith("decode_head.") for key in report.dropped) and len(report.dropped) == 16
    _assert_encoder_parity(ours, hf_segmenter.segformer, images)


def test_mismatched_checkpoints_raise_a_readable_user_error(hf_segmenter):
    state = hf_segmenter.state_dict()
    incomplete = {k: v for k, v in state.items() if "stages.1.blocks.1.mlp.fc2" not in k}
    with pytest.raises(UserError, match=r"2 missing keys \(encoder\.stages\.1\.blocks\.1\.mlp\.fc2\.weight"):
        load_segformer_weights(tiny(), incomplete)
    with pytest.raises(UserError, match=r"1 unexpected key \(segformer\.stages\.0\.blocks\.0\.attention\.rope\)"):
        load_segformer_weights(tiny(), {**state, "segformer.stages.0.blocks.0.attention.rope": torch.zeros(1)})
    bigger = SegFormer(NUM_CLASSES, MiTConfig(widths=(8, 16, 32, 64), depths=TINY.depths, num_heads=TINY.num_heads))
    with pytest.raises(UserError, match="shape mismatch"):
        load_segformer_weights(bigger, state)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (160, 32)])
def test_output_is_logits_at_input_size(size):
    model = tiny().eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
        features = model.forward_features(torch.randn(1, 3, *size))
    assert logits.shape == (2, NUM_CLASSES, *size)
    assert [f.shape[-2:] for f in features] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize(("size", "padded"), [((64, 65), "64x96"), ((20, 32), "32x32")])
def test_indivisible_size_names_the_padded_size(size, padded):
    model = tiny()
    assert model.size_divisor == 32
    with pytest.raises(ValueError, match=f"divisible by 32, got {size[0]}x{size[1]}; pad the input to {padded}"):
        model(torch.randn(1, 3, *size))


def test_every_parameter_gets_a_gradient():
    model = tiny(drop_path_rate=0.0).train()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, NUM_CLASSES, (2, 64, 64))
    F.cross_entropy(model(images), target).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_train_mode_is_stochastic_and_eval_mode_is_deterministic():
    model = tiny(drop_path_rate=0.5, dropout=0.5)
    images = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    first = model(images)
    second = model(images)
    assert not torch.allclose(first, second)
    assert model.decoder.bn.num_batches_tracked.item() == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), atol=0, rtol=0)
    assert model.decoder.bn.num_batches_tracked.item() == 2


def test_drop_path_keeps_the_expectation():
    x = torch.ones(20000, 3)
    dropped = drop_path(x, 0.25, training=True)
    kept = dropped[:, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / 0.75))
    assert abs(dropped.mean().item() - 1.0) < 0.03
    assert drop_path(x, 0.25, training=False) is x


def test_channels_last_input_and_bf16_autocast():
    model = tiny().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        torch.testing.assert_close(model(images.contiguous(memory_format=torch.channels_last)), reference)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.shape == reference.shape and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, atol=0.15, rtol=0.05)


def _hf_preset_config(variant: str, num_labels: int):
    cfg, decoder_dim = PRESETS[variant]
    return transformers.SegformerConfig(
        hidden_sizes=list(cfg.widths),
        depths=list(cfg.depths),
        num_attention_heads=list(cfg.num_heads),
        sr_ratios=list(cfg.sr_ratios),
        decoder_hidden_size=decoder_dim,
        num_labels=num_labels,
    )


@pytest.mark.parametrize("variant", list(PRESETS))
def test_preset_parameter_counts_match_transformers(variant):
    with torch.device("meta"):  # counting needs shapes only; no memory, no init time
        theirs = transformers.SegformerForSemanticSegmentation(_hf_preset_config(variant, 150))
        ours = segformer(num_classes=150, variant=variant)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())


# The paper's Table 1 (ADE20K, 150 classes): encoder / decoder / total parameters in millions.
@pytest.mark.parametrize(("variant", "encoder_m", "decoder_m"), [("b0", 3.4, 0.4), ("b1", 13.1, 0.6), ("b2", 24.2, 3.3)])
def test_preset_parameter_counts_match_the_paper(variant, encoder_m, decoder_m):
    with torch.device("meta"):
        model = segformer(num_classes=150, variant=variant)
    encoder = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    decoder = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    assert encoder == pytest.approx(encoder_m, rel=0.03)
    assert decoder == pytest.approx(decoder_m, abs=0.06)
    assert encoder + decoder == pytest.approx(encoder_m + decoder_m, rel=0.03)


def test_builder_options_and_errors():
    with pytest.raises(UserError, match="unknown SegFormer variant 'b9'; expected one of b0, b1, b2, b3, b4, b5"):
        segformer(num_classes=3, variant="b9")
    with pytest.raises(TypeError):
        segformer(3)  # type: ignore[misc]
    with torch.device("meta"):
        b2 = segformer(num_classes=3, variant="b2")
        narrow = segformer(num_classes=3, variant="b2", decoder_dim=128, in_channels=1)
    assert b2.decoder.fuse.out_channels == 768 and narrow.decoder.fuse.out_channels == 128
    assert narrow.encoder.stages[0].patch_embed.proj.in_channels == 1
    assert [len(stage.blocks) for stage in b2.encoder.stages] == [3, 4, 6, 3]


def test_fresh_model_starts_near_the_uniform_prediction_loss():
    # A fresh decode head must predict near-uniformly: cross-entropy ~ ln K, not several times that.
    torch.manual_seed(0)
    model = segformer(num_classes=11, variant="b0").eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 11, (2, 64, 64)))
    assert abs(loss.item() - math.log(11)) < 0.1
