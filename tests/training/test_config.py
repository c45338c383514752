from pathlib import Path

import pytest
import torch

from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.training import TrainConfig, config_from_dict, load_train_config
from trustseg.training.config import apply_overrides

CONFIGS = Path(__file__).parents[2] / "configs"


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_nested_dataclasses_with_coercion(tmp_path):
    path = write(tmp_path, """
steps: 100
bf16: true
optim: {lr: 3e-4, betas: [0.9, 0.95], grad_clip: null}
data: {train: "synthetic#size=64", crop: [64, 96], scale: [0.5, 2], base_size: [64, 64]}
model: {name: unet, options: {base_width: 16}}
loss: {class_weights: [1, 2.5, 0]}
""")
    config = load_train_config(path)
    assert config.steps == 100 and config.bf16 is True
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)  # PyYAML reads 3e-4 as a string
    assert config.optim.betas == (0.9, 0.95) and config.optim.grad_clip is None
    assert config.data.crop == (64, 96) and config.data.scale == (0.5, 2.0)
    assert config.model.options == {"base_width": 16}
    assert config.loss.class_weights == (1.0, 2.5, 0.0)
    assert config.schedule == TrainConfig(steps=1).schedule  # untouched sections keep their defaults


def test_overrides_win_and_coerce_strings(tmp_path):
    path = write(tmp_path, "steps: 100\noptim: {lr: 0.001}\n")
    config = load_train_config(path, ["optim.lr=2e-3", "steps=5e2", "bf16=yes", "data.crop=240,320",
                                      "model.options.depth=3", "loss.class_weights=sqrt_inverse",
                                      "time_budget_min=null", "data.val=synthetic#split=test"])
    assert config.optim.lr == 2e-3 and config.steps == 500 and config.bf16 is True
    assert config.data.crop == (240, 320) and config.model.options == {"depth": 3}
    assert config.loss.class_weights == "sqrt_inverse" and config.data.val == "synthetic#split=test"


def test_apply_overrides_does_not_mutate_its_input():
    values = {"optim": {"lr": 1.0}}
    assert apply_overrides(values, ["optim.lr=2"]) == {"optim": {"lr": 2}}
    assert values == {"optim": {"lr": 1.0}}


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["optim.lrr=1"], r"unknown config key optim\.lrr; accepted keys in optim: lr, weight_decay"),
        (["stepz=3"], r"unknown config key stepz; accepted keys: out, seed"),
        (["steps=many"], r"steps='many': expected an int or null"),
        (["steps=2.5"], r"steps=2\.5: expected an int"),
        (["bf16=maybe"], r"bf16='maybe': expected true or false"),
        (["data.crop=[1,2,3]"], r"data\.crop=\[1, 2, 3\]: expected a list of 2 ints"),
        (["schedule.kind=step"], r"schedule\.kind='step': expected one of cosine, poly, constant"),
        (["loss.class_weights=inverse"], r"loss\.class_weights='inverse': expected one of none, median_frequency"),
        (["optim.lr=-1"], r"optim\.lr=-1\.0: expected a learning rate > 0"),
        (["data.scale=[0.5,2]"], r"data\.scale.*unless data\.base_size is set"),
        (["epochs=3"], r"epochs=3: expected null when steps is set"),
        (["steps=null"], r"no training budget; set steps, epochs or time_budget_min"),
        (["optim=3"], r"optim=3: expected a mapping of lr"),
        (["lr"], r"--set 'lr': expected key=value"),
        (["steps.x=1"], r"steps is not a section"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(tmp_path, overrides, pattern):
    path = write(tmp_path, "steps: 10\n")
    with pytest.raises(UserError, match=pattern) as error:
        load_train_config(path, overrides)
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_train_config(write(tmp_path, "steps: [1\n"))
    with pytest.raises(UserError, match="expected a mapping"):
        load_train_config(write(tmp_path, "- 1\n- 2\n"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"steps: 10\n\x80\xff")
    with pytest.raises(UserError, match=r"binary.yaml: not UTF-8 text \(byte 10\)"):
        load_train_config(binary)


def test_deep_nesting_is_a_user_error_in_a_file_and_a_plain_string_in_an_override(tmp_path):
    deep = 5000
    with pytest.raises(UserError, match="deep.yaml: nested too deeply"):
        load_train_config(write(tmp_path, "steps: 10\nmodel: {options: {a: " + "[" * deep + "]" * deep + "}}\n")
                          .rename(tmp_path / "deep.yaml"))
    # an override value that is not YAML stays the string it is (here refused as a number)
    with pytest.raises(UserError, match=r"optim\.lr='\[\[\[") as error:
        load_train_config(None, ["steps=10", "optim.lr=" + "[" * deep])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_and_their_crops_fit_the_model(name):
    config = load_train_config(CONFIGS / f"{name}.yaml")
    assert config.steps or config.epochs or config.time_budget_min
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_model(config.model.name, num_classes=2, **config.model.options)
    divisor = getattr(model, "size_divisor", 1)
    for crop in (config.data.crop, config.data.val_crop or (divisor, divisor)):
        assert crop[0] % divisor == 0 and crop[1] % divisor == 0, (crop, divisor)


def test_sliding_window_validation_needs_crop_and_stride_together():
    config = config_from_dict({"steps": 1}, ["data.val_crop=[64,64]", "data.val_stride=[32,32]"])
    assert (config.data.val_crop, config.data.val_stride) == ((64, 64), (32, 32))
    with pytest.raises(UserError, match="data.val_stride=None: expected set together with data.val_crop"):
        config_from_dict({"steps": 1}, ["data.val_crop=[64,64]"])
    with pytest.raises(UserError, match=r"data.val_crop=\(0, 64\): expected two positive ints"):
        config_from_dict({"steps": 1}, ["data.val_crop=[0,64]", "data.val_stride=[32,32]"])


def test_packaged_demo_recipe_is_the_configs_one():
    # `trustseg demo` reads the copy inside the package; it must not drift from configs/.
    packaged = Path(__file__).parents[2] / "src" / "trustseg" / "recipes" / "demo_synthetic.yaml"
    assert load_train_config(packaged) == load_train_config(CONFIGS / "demo_synthetic.yaml")
