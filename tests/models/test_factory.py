"""build_model: option names and option types are checked against the builder before it runs."""

import pytest
import torch

from trustseg.errors import UserError
from trustseg.models.factory import build_model


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("unet", {"depth": "x"}, r"model 'unet': option depth='x'; expected an int"),
        ("unet", {"base_width": True}, r"option base_width=True; expected an int"),
        ("unet", {"norm": 3}, r"option norm=3; expected one of 'batch', 'group'"),
        ("segformer", {"decoder_dim": "256"}, r"option decoder_dim='256'; expected an int or null"),
        ("vit_segmenter", {"pos": "learned"}, r"option pos='learned'; expected one of 'ape', 'rope', 'none' or null"),
        ("vit_segmenter", {"drop_path": [0.1]}, r"option drop_path=\[0\.1\]; expected a number"),
        ("unet", {"width": 4}, r"unknown option\(s\) \['width'\]"),
    ],
)
def test_options_of_the_wrong_type_are_one_line_errors(name, options, message):
    with torch.device("meta"), pytest.raises(UserError, match=message) as info:
        build_model(name, num_classes=3, **options)
    assert "\n" not in str(info.value)


def test_options_of_the_right_type_build():
    with torch.device("meta"):
        build_model("unet", num_classes=3, base_width=4, depth=2, norm="group")
        build_model("segformer", num_classes=3, variant="b0", decoder_dim=None, dropout=0)
        build_model("vit_segmenter", num_classes=3, pos=None, depth=1, drop_path=0.1)
