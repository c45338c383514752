import pytest
import torch

from trustseg.engine.checkpoint import Checkpoint, atomic_write, load_checkpoint, save_checkpoint
from trustseg.data.base import ClassInfo
from trustseg.errors import UserError

CLASSES = ClassInfo(names=("a", "b"), palette=((0, 0, 0), (255, 0, 0)))


def make_checkpoint() -> Checkpoint:
    return Checkpoint(
        model={"name": "unet", "options": {"base_width": 8, "depth": 2}},
        state_dict={"w": torch.arange(6.0).view(2, 3)},
        classes=CLASSES,
        train_config={"lr": 0.001},
        training_state={"step": 7},
    )


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(make_checkpoint(), path)
    loaded = load_checkpoint(path)
    assert loaded.model == {"name": "unet", "options": {"base_width": 8, "depth": 2}}
    assert torch.equal(loaded.state_dict["w"], torch.arange(6.0).view(2, 3))
    assert loaded.classes == CLASSES
    assert loaded.train_config == {"lr": 0.001} and loaded.training_state == {"step": 7}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def crash(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"not a zip", "unreadable"), ("foreign", "not a trustseg checkpoint")],
)
def test_bad_checkpoint_files_raise_user_error(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "foreign":
        torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def damage(payload, field, value):
    """`payload` with `field` (dotted, e.g. "classes.names") set to `value`."""
    *parents, last = field.split(".")
    target = payload
    for key in parents:
        target = target[key]
    target[last] = value
    return payload


@pytest.mark.parametrize(
    "field, value",
    [
        ("format_version", torch.tensor([])),  # a tensor compared with == has no truth value
        ("model", {"options": {}}),
        ("model.options", [1, 2]),
        ("state_dict", {"w": 3}),
        ("classes.names", [1, 2]),
        ("classes.palette", [[0, 0], [1, 1]]),
        ("classes.ignore_index", "255"),
        ("mean", [0.5, 0.5]),
        ("std", [0.2, 0.0, 0.2]),
        ("calibrator", {"method": "ts", "state_dict": [1.0]}),
        ("token_policy", {"conv.weight": [1.0]}),
        ("train_config", 3),
    ],
)
def test_damaged_fields_are_one_line_user_errors_naming_file_and_field(tmp_path, field, value):
    path = tmp_path / "model.pt"
    torch.save(damage(make_checkpoint().to_payload(), field, value), path)
    with pytest.raises(UserError, match="not a trustseg checkpoint") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert field.split(".")[0] in message or field == "format_version", message
