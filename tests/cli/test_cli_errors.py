"""Bad input at the CLI: exit status 2 and exactly one line on stderr naming the culprit."""


import numpy as np
import pytest
from PIL import Image

from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.data.base import ClassInfo
from trustseg.models.factory import build_model

from cli_helpers import folder_tree, run_cli as run_trustseg, save_tiny_unet


def run_cli(args, monkeypatch, capsys):
    code = run_trustseg(args, monkeypatch)
    return code, capsys.readouterr().err.strip()


def write_folder_dataset(root, *, mask_value=1, mask_size=(8, 8), image_bytes=None, num_images=2):
    folder_tree(root)
    for i in range(num_images):
        image_path = root / "images" / f"im{i}.png"
        if image_bytes is None:
            Image.fromarray(np.full((8, 8, 3), 50 * i, dtype=np.uint8)).save(image_path)
        else:
            image_path.write_bytes(image_bytes)
        Image.fromarray(np.full(mask_size, mask_value, dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    return root


@pytest.fixture()
def checkpoint_path(tmp_path):
    """An untrained 3-class U-Net checkpoint."""
    path = tmp_path / "model.pt"
    save_tiny_unet(path)
    return path


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_dataset_path(tmp_path, monkeypatch, capsys):
    code, err = run_cli(["info", "--data", f"camvid:{tmp_path}/nowhere", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "nowhere")


def test_unknown_data_spec(tmp_path, monkeypatch, capsys):
    code, err = run_cli(["info", "--data", "kitti:/x", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "kitti", "camvid")


def test_image_mask_size_mismatch(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d", mask_size=(8, 9))
    code, err = run_cli(["info", "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "im0.png")


def test_label_out_of_range(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d", mask_value=7)
    code, err = run_cli(["info", "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "im0.png", "7")


def test_truncated_image(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d", image_bytes=b"\x89PNG\r\n\x1a\n\x00\x00")
    code, err = run_cli(["info", "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "im0.png")


def test_empty_dataset(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d", num_images=0)
    code, err = run_cli(["info", "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, str(root))


def test_unreadable_checkpoint(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d")
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"garbage")
    code, err = run_cli(
        ["eval", "--checkpoint", str(bad), "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys
    )
    assert_one_line_error(code, err, "broken.pt")


def test_mismatched_class_count(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d")
    (root / "classes.txt").write_text("zero\none\ntwo\nthree\n")
    classes = ClassInfo(names=("a", "b"), palette=((0, 0, 0), (1, 1, 1)))
    path = tmp_path / "two.pt"
    model = build_model("unet", num_classes=2, base_width=4, depth=2)
    save_checkpoint(Checkpoint({"name": "unet", "options": {"base_width": 4, "depth": 2}}, model.state_dict(), classes), path)
    code, err = run_cli(
        ["eval", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys
    )
    assert_one_line_error(code, err, "4 classes", "2")


def test_missing_predict_input(tmp_path, checkpoint_path, monkeypatch, capsys):
    code, err = run_cli(
        ["predict", "--checkpoint", str(checkpoint_path), "--input", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, "none")


@pytest.mark.parametrize(
    "options,needles",
    [
        (["--uncertainty", "variance"], ["--uncertainty 'variance'", "mc-dropout"]),
        (["--mc-samples", "0"], ["--mc-samples 0"]),
        (["--uncertainty", "mc-dropout"], ["no dropout", "entropy|msp|margin"]),  # the U-Net has no dropout
    ],
)
def test_bad_predict_uncertainty(tmp_path, checkpoint_path, monkeypatch, capsys, options, needles):
    root = write_folder_dataset(tmp_path / "d")
    code, err = run_cli(
        ["predict", "--checkpoint", str(checkpoint_path), "--input", str(root / "images"), "--out", str(tmp_path / "o"),
         *options],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(
    "options,needles",
    [
        (["--uncertainty", "variance"], ["variance", "mutual-information"]),
        (["--uncertainty", "mc-dropout"], ["no dropout", "entropy|msp|margin"]),  # the U-Net has no dropout
        (["--uncertainty", "mutual-information", "--mc-samples", "0"], ["--mc-samples"]),
    ],
)
def test_bad_eval_uncertainty(tmp_path, checkpoint_path, monkeypatch, capsys, options, needles):
    root = write_folder_dataset(tmp_path / "d")
    code, err = run_cli(
        ["eval", "--checkpoint", str(checkpoint_path), "--data", f"folder:{root}", "--out", str(tmp_path / "o"), *options],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_bad_crop_argument(tmp_path, checkpoint_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path / "d")
    code, err = run_cli(
        ["eval", "--checkpoint", str(checkpoint_path), "--data", f"folder:{root}", "--out", str(tmp_path / "o"),
         "--mode", "slide", "--crop", "a,b", "--stride", "4"],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, "--crop")


def test_split_list_id_outside_the_dataset(tmp_path, monkeypatch, capsys):
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("../../../etc/passwd\n")
    code, err = run_cli(["info", "--data", f"voc:{root}#split=val", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "val.txt: sample id '../../../etc/passwd.jpg' leads outside")


def test_brackets_in_messages_are_text_not_console_markup(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "[x]" / "[/b]"
    code, err = run_cli(["info", "--data", f"folder:{missing}", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, str(missing))


def test_brackets_in_printed_paths_and_class_names_are_text(tmp_path, monkeypatch, capsys):
    classes = ClassInfo(names=("zero", "[/b]", "[red]two"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    root = folder_tree(tmp_path / "d", classes)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 3).save(root / "masks" / "a.png")
    out = tmp_path / "runs" / "[/b]"
    code = run_trustseg(["info", "--data", f"folder:{root}", "--out", str(out), "--no-progress"], monkeypatch)
    printed = capsys.readouterr().out
    assert code == 0 and str(out) in printed and "[/b]" in printed and "[red]two" in printed


def test_a_line_break_in_a_file_name_is_written_as_backslash_n(tmp_path, monkeypatch, capsys):
    root = folder_tree(tmp_path / "d")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "images" / "line\nbreak.png")
    code, err = run_cli(["info", "--data", f"folder:{root}", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert_one_line_error(code, err, "line\\nbreak.png: no mask for this image")
