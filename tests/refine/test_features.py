"""The model's features as a refinement guide: the classifier input each architecture exposes, checked
against the model's own logits (its classifier applied to the features gives them back)."""

import pytest
import torch

from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.refine.features import FeatureTap, classifier_layer

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


def images(height=64, width=96, seed=0):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_unet_features_are_its_decoder_output_and_the_logits_pass_through():
    model = build_model("unet", num_classes=K, base_width=4, depth=2).eval()
    x = images()
    with torch.no_grad():
        out = FeatureTap(model, K)(x)
        torch.testing.assert_close(out[:, :K], model(x), rtol=0, atol=0)
        torch.testing.assert_close(out[:, K:], model.forward_features(x), rtol=0, atol=0)  # 4 channels: no projection
        projected = FeatureTap(model, K, channels=2)(x)[:, K:]
    directions = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(projected, torch.einsum("bdhw,dc->bchw", model.forward_features(x).detach(), directions))


@pytest.mark.parametrize("name,options", [
    ("segformer", {"variant": "b0", "dropout": 0.0}),  # 1x1 conv on 256 decoder channels at 1/4 resolution
    ("vit_segmenter", {"backbone": "vit_ti16", "depth": 2, "pos": "none"}),  # linear layer on the patch tokens
])
def test_the_classifier_applied_to_the_upsampled_features_gives_the_logits(name, options):
    """Bilinear resizing commutes with the per-pixel linear classifier, so a wrong layer, grid or layout
    would show: classifier(features at full resolution) must equal the model's logits."""
    model = build_model(name, num_classes=K, **options).eval()
    classifier = classifier_layer(model, K)
    x = images()
    with torch.no_grad():
        out = FeatureTap(model, K, channels=100_000)(x)  # wide enough that nothing is projected
        logits, features = out[:, :K], out[:, K:]
        weight = classifier.weight.reshape(K, -1)
        rebuilt = torch.einsum("bdhw,kd->bkhw", features, weight) + classifier.bias[:, None, None]
    assert features.shape[1] == weight.shape[1]
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-4)


def test_a_mask_transformer_head_has_no_classifier_layer():
    model = build_model("vit_segmenter", num_classes=K, backbone="vit_ti16", depth=2, pos="none", head="mask")
    with pytest.raises(UserError, match="--refine-guide features: .* use --refine-guide image"):
        classifier_layer(model, K)
