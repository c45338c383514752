"""ONNX export: the onnxruntime graph against the eager torch predictor (an independent implementation of
the same function) on sizes and batch sizes other than the export example's; calibrated and raw logits;
`trustseg export` + `trustseg predict --onnx` against `predict --checkpoint`; and the user errors."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402

from trustseg.calibrators.methods import build_calibrator  # noqa: E402
from trustseg.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from trustseg.engine.inference import InferenceConfig, Predictor, predictor_from_checkpoint  # noqa: E402
from trustseg.export import graph as graph_module  # noqa: E402
from trustseg.export.graph import export_graph  # noqa: E402
from trustseg.export.parity import check_parity, compare, parity_shapes, random_images  # noqa: E402
from trustseg.export.runtime import graph_info, onnx_predictor, open_session, run_session  # noqa: E402
from trustseg.models.factory import build_model  # noqa: E402
from trustseg.models.segformer import MiTConfig, SegFormer  # noqa: E402
from trustseg.workflows.export import ExportConfig, report_path, run_export  # noqa: E402

from cli_helpers import THREE_CLASSES, run_cli, save_tiny_unet  # noqa: E402

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
ATOL = 1e-4
VITS = {
    # pos_grid 4: the 64 x 64 parity size is the embedding's own grid (the resampling branch not taken)
    "ape": {"backbone": "vit_ti16", "depth": 1, "pos": "ape", "pos_grid": 4},
    "rope-registers-mask-head": {"backbone": "vit_ti16", "depth": 1, "pos": "rope", "num_register_tokens": 2,
                                 "head": "mask", "decoder_depth": 1},
    "none-fpn-head": {"backbone": "vit_ti16", "depth": 2, "pos": "none", "fpn_channels": 16, "head": "fpn"},
}


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "unet":
        return build_model("unet", num_classes=3, base_width=4, depth=2).eval()
    if name == "segformer":
        cfg = MiTConfig(widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
        return SegFormer(3, cfg, decoder_dim=16).eval()
    return build_model("vit_segmenter", num_classes=3, **VITS[name]).eval()


def export_and_session(module, path, **options):
    record = export_graph(module, path, divisor=module.divisor, **options)
    return record, open_session(path, "cpu")


@pytest.mark.parametrize("name", [
    "ape",  # the U-Net is checked fast by the fixture `exported` below
    pytest.param("unet", marks=pytest.mark.slow),
    pytest.param("segformer", marks=pytest.mark.slow),
    pytest.param("rope-registers-mask-head", marks=pytest.mark.slow),
    pytest.param("none-fpn-head", marks=pytest.mark.slow),
])
def test_every_architecture_matches_torch_at_other_sizes_and_batch_sizes(tmp_path, one_thread, name):
    """Exported at batch 2 and a padded, non-square size; run at batch 1 and 3 and three other sizes."""
    predictor = Predictor(tiny_model(name), MEAN, STD).eval()
    record, session = export_and_session(predictor, tmp_path / f"{name}.onnx")
    assert record["exporter"] == "dynamo"
    assert record["inputs"]["images"] == ["batch", 3, "height", "width"]
    assert record["outputs"]["logits"] == ["batch", 3, "height", "width"]
    d = predictor.divisor
    shapes = [*parity_shapes(d), (2, 3, 3 * d + 1, 2 * d - 1)]
    for check in check_parity(predictor, session, random_images(shapes, seed=1), atol=ATOL):
        assert check["ok"] and check["max_abs_diff"] <= ATOL, check
        assert check["argmax_agreement"] == 1.0, check


def test_the_torchscript_exporter_and_the_fallback_to_it(tmp_path, one_thread, monkeypatch):
    predictor = Predictor(tiny_model("ape"), MEAN, STD).eval()
    record, session = export_and_session(predictor, tmp_path / "ts.onnx", exporter="torchscript")
    assert record["exporter"] == "torchscript" and record["inputs"]["images"] == ["batch", 3, "height", "width"]
    assert all(c["ok"] for c in check_parity(predictor, session, random_images(parity_shapes(16)), atol=ATOL))

    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot\nsecond line")

    monkeypatch.setattr(graph_module, "_export_dynamo", broken)
    record = export_graph(predictor, tmp_path / "auto.onnx", divisor=16)
    assert record["exporter"] == "torchscript" and record["dynamo_error"] == "dynamo cannot"
    with pytest.raises(RuntimeError, match="dynamo cannot"):
        export_graph(predictor, tmp_path / "dynamo.onnx", divisor=16, exporter="dynamo")


@pytest.mark.slow
def test_the_requested_opset_is_the_files_opset(tmp_path, one_thread):
    """onnx has no Pad adapter below opset 18, so dynamo's graph cannot be converted to 14: "auto" must notice
    (the exporter only logs it) and take the tracer, which builds opset 14 itself."""
    predictor = Predictor(tiny_model("unet"), MEAN, STD).eval()
    record, session = export_and_session(predictor, tmp_path / "o14.onnx", opset=14)
    assert record["opset_import"]["ai.onnx"] == 14
    assert record["exporter"] == "torchscript" and "opset 14" in record["dynamo_error"]
    assert all(c["ok"] for c in check_parity(predictor, session, random_images(parity_shapes(4)), atol=ATOL))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: calibrator inside, metadata, parity report
# ---------------------------------------------------------------------------------------------------


def save_calibrated_unet(path, method: str, seed: int = 0):
    """A tiny U-Net checkpoint with a `method` calibrator whose parameters are random (not the identity)."""
    save_tiny_unet(path)
    calibrator = build_calibrator(method, 3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in calibrator.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    checkpoint = load_checkpoint(path)
    checkpoint.calibrator = {"method": method, "state_dict": calibrator.state_dict()}
    save_checkpoint(checkpoint, path)
    return checkpoint


def write_images(folder, sizes, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A U-Net checkpoint with a temperature-scaling calibrator, exported by `trustseg export` (checked on two
    real images as well) and by `run_export(logits_only=True)`; shared by the tests below (exports are slow)."""
    root = tmp_path_factory.mktemp("exported")
    checkpoint = save_calibrated_unet(root / "cal.pt", "ts")
    images = write_images(root / "images", [(20, 28), (13, 17), (32, 24)], seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            assert run_cli(["export", "--checkpoint", str(root / "cal.pt"), "--out", str(root / "m.onnx"),
                            "--device", "cpu", "--check-images", str(images)], monkeypatch) == 0
        raw = run_export(ExportConfig(checkpoint=str(root / "cal.pt"), out=str(root / "raw.onnx"), device="cpu",
                                      logits_only=True))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "checkpoint": checkpoint, "images": images, "onnx": root / "m.onnx", "raw": raw.path,
            "session": open_session(root / "m.onnx")}


def assert_calibrated_and_raw_logits(checkpoint, calibrated_path, raw_path):
    calibrated_torch = predictor_from_checkpoint(checkpoint, calibrated=True)
    raw_torch = predictor_from_checkpoint(checkpoint, calibrated=False)
    (images,) = random_images([(2, 3, 13, 19)], seed=5)
    with torch.no_grad():
        want_calibrated, want_raw = calibrated_torch(images), raw_torch(images)
    got_calibrated = run_session(open_session(calibrated_path), images)
    torch.testing.assert_close(got_calibrated, want_calibrated, atol=ATOL, rtol=0)
    assert (want_calibrated - want_raw).abs().max() > 1e-2  # the calibrator does change the logits
    if raw_path is not None:
        torch.testing.assert_close(run_session(open_session(raw_path), images), want_raw, atol=ATOL, rtol=0)
    return got_calibrated, want_raw


def test_a_calibrated_checkpoint_exports_calibrated_logits_and_logits_only_the_raw_ones(exported, one_thread):
    checkpoint = exported["checkpoint"]
    got_calibrated, want_raw = assert_calibrated_and_raw_logits(checkpoint, exported["onnx"], exported["raw"])
    # temperature scaling by hand: z / T with T = exp(log_temperature)
    temperature = math.exp(float(checkpoint.calibrator["state_dict"]["log_temperature"]))
    torch.testing.assert_close(got_calibrated, want_raw / temperature, atol=ATOL, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(exported["raw"])).metadata_props}
    assert props["trustseg.logits"] == "raw" and props["trustseg.calibrator"] == "none"


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), height=st.integers(1, 40), width=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_any_batch_and_size_matches_torch(exported, batch, height, width, seed):
    """Property: the graph is the torch predictor for every batch size and image size (padded inside)."""
    predictor = predictor_from_checkpoint(exported["checkpoint"])
    images = random_images([(batch, 3, height, width)], seed=seed)
    (check,) = check_parity(predictor, exported["session"], images, atol=ATOL)
    assert check["ok"], check


@pytest.mark.slow
def test_a_spatial_calibrator_exports_too(tmp_path, one_thread):
    """Local temperature scaling: convolutions with reflect padding on the logits and the image."""
    checkpoint = save_calibrated_unet(tmp_path / "lts.pt", "lts")
    result = run_export(ExportConfig(checkpoint=str(tmp_path / "lts.pt"), out=str(tmp_path / "lts.onnx"), device="cpu"))
    assert result.report["ok"] and result.report["calibrator"] == "lts" and result.report["export"]["exporter"] == "dynamo"
    assert_calibrated_and_raw_logits(checkpoint, result.path, None)


def test_the_file_carries_the_metadata_and_the_report_records_the_checks(exported):
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    assert json.loads(props["trustseg.class_names"]) == list(THREE_CLASSES.names)
    assert json.loads(props["trustseg.palette"]) == [list(c) for c in THREE_CLASSES.palette]
    assert json.loads(props["trustseg.size_divisor"]) == 4 and props["trustseg.logits"] == "calibrated"
    assert props["trustseg.calibrator"] == "ts"
    assert json.loads(props["trustseg.mean"]) == pytest.approx(list(exported["checkpoint"].mean))
    report = json.loads(report_path(exported["onnx"]).read_text())
    assert report_path(exported["onnx"]).name == "m.export.json"
    assert report["ok"] and report["check_images"] == 3 and report["export"]["opset_import"]["ai.onnx"] == 18
    checks = report["parity"]["cpu"]
    assert [c["shape"] for c in checks] == [[1, 3, 16, 16], [3, 3, 11, 21], [1, 3, 20, 28], [1, 3, 13, 17],
                                            [1, 3, 32, 24]]
    assert all(c["ok"] and c["max_abs_diff"] <= ATOL for c in checks)


def test_a_graph_that_disagrees_with_torch_is_an_internal_error_with_its_report(tmp_path, one_thread, monkeypatch):
    save_tiny_unet(tmp_path / "unet.pt")
    import trustseg.export.parity as parity

    monkeypatch.setattr(parity, "run_session", lambda session, images: run_session(session, images) + 1e-3)
    with pytest.raises(RuntimeError, match="disagrees with torch"):
        run_export(ExportConfig(checkpoint=str(tmp_path / "unet.pt"), out=str(tmp_path / "m.onnx"), device="cpu",
                                exporter="torchscript"))
    report = json.loads((tmp_path / "m.export.json").read_text())
    assert report["ok"] is False and (tmp_path / "m.onnx").is_file()
    assert report["parity"]["cpu"][0]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)


def test_compare_against_hand_made_logits():
    reference = torch.zeros(1, 3, 1, 3, dtype=torch.float64)
    reference[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # clear winner: class 0
    reference[0, :, 0, 1] = torch.tensor([0.0, 0.5, 0.5 - 1e-5])  # a tie at float precision
    reference[0, :, 0, 2] = torch.tensor([0.0, 0.0, 2.0])
    candidate = reference.clone()
    candidate[0, 2, 0, 1] += 2e-5  # flips the tie: class 2 now wins, by 1e-5
    check = compare(reference, candidate, atol=1e-4)
    assert check["max_abs_diff"] == pytest.approx(2e-5, rel=1e-3)
    assert check["argmax_agreement"] == pytest.approx(2 / 3)
    assert check["argmax_flips_beyond_tolerance"] == 0 and check["ok"]
    candidate[0, 1, 0, 0] += 1.5  # a real flip at the clear pixel
    check = compare(reference, candidate, atol=1e-4)
    assert check["argmax_flips_beyond_tolerance"] == 1 and not check["ok"]
    assert not compare(reference, candidate[..., :2])["ok"]  # a wrong shape never passes


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def image_folder(tmp_path):
    return write_images(tmp_path / "images", [(20, 28), (13, 17)], seed=4)


def read_pngs(folder):
    """The PNGs predict wrote into its output folders (labels/, masks/, ...; the report's figures sit above them)."""
    return {p.relative_to(folder).as_posix(): np.array(Image.open(p)) for p in sorted(folder.glob("*/**/*.png"))}


@pytest.mark.parametrize("inference", [[], ["--mode", "slide", "--crop", "12,12", "--stride", "8,8"]],
                         ids=["whole", "slide"])
def test_predict_onnx_writes_the_same_masks_as_predict_checkpoint(exported, tmp_path, monkeypatch, one_thread,
                                                                   inference):
    common = ["--input", str(exported["images"]), "--device", "cpu", "--no-progress", "--uncertainty", "entropy",
              *inference]
    assert run_cli(["predict", "--onnx", str(exported["onnx"]), "--out", str(tmp_path / "onnx"), *common],
                   monkeypatch) == 0
    assert run_cli(["predict", "--checkpoint", str(exported["root"] / "cal.pt"), "--out", str(tmp_path / "torch"),
                    *common], monkeypatch) == 0
    onnx_outputs, torch_outputs = read_pngs(tmp_path / "onnx"), read_pngs(tmp_path / "torch")
    assert sorted(onnx_outputs) == sorted(torch_outputs) and len(onnx_outputs) == 3 * 4  # labels, masks, overlays, maps
    for name in onnx_outputs:
        if name.startswith(("labels/", "masks/")):
            np.testing.assert_array_equal(onnx_outputs[name], torch_outputs[name], err_msg=name)
    for npy in (tmp_path / "torch" / "uncertainty").glob("*.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "onnx" / "uncertainty" / npy.name), np.load(npy), atol=1e-5)


def test_the_onnx_predictor_takes_its_classes_from_the_file(exported):
    predictor, classes = onnx_predictor(exported["onnx"], InferenceConfig(scale=0.5))
    assert classes == THREE_CLASSES and predictor.config.scale == 0.5
    info = graph_info(open_session(exported["onnx"]), "m.onnx")
    assert info.calibrator == "ts" and info.size_divisor == 4 and info.std == pytest.approx(exported["checkpoint"].std)


def stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_export_without_the_optional_packages_says_how_to_install_them(tmp_path, monkeypatch, capsys, missing):
    save_tiny_unet(tmp_path / "unet.pt")
    monkeypatch.setitem(sys.modules, missing, None)  # import -> ImportError
    assert run_cli(["export", "--checkpoint", str(tmp_path / "unet.pt"), "--out", str(tmp_path / "m.onnx")],
                   monkeypatch) == 2
    err = stderr_line(capsys)
    assert f"{missing} not installed" in err and "pip install 'trustseg[export]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_predict_onnx_without_onnxruntime_says_how_to_install_it(tmp_path, image_folder, monkeypatch, capsys):
    (tmp_path / "m.onnx").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert run_cli(["predict", "--onnx", str(tmp_path / "m.onnx"), "--input", str(image_folder), "--out",
                    str(tmp_path / "out")], monkeypatch) == 2
    assert "onnxruntime not installed" in stderr_line(capsys) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format 'tflite': expected one of onnx"),
    (["--opset", "12"], "--opset 12: expected 14..23"),
    (["--opset", "22", "--exporter", "torchscript"], "--opset 22: expected 14..20"),
    (["--exporter", "jit"], "--exporter 'jit'"),
    (["--check-images", "absent"], "--check-images absent does not exist"),
])
def test_bad_export_options_are_user_errors(tmp_path, monkeypatch, capsys, args, message):
    save_tiny_unet(tmp_path / "unet.pt")
    assert run_cli(["export", "--checkpoint", str(tmp_path / "unet.pt"), "--out", str(tmp_path / "m.onnx"), *args],
                   monkeypatch) == 2
    assert message in stderr_line(capsys) and not (tmp_path / "m.onnx").exists()


def test_bad_predict_models_are_user_errors(tmp_path, image_folder, monkeypatch, capsys):
    save_tiny_unet(tmp_path / "unet.pt")
    base = ["predict", "--input", str(image_folder), "--out", str(tmp_path / "out")]
    assert run_cli(base, monkeypatch) == 2
    assert "exactly one model" in stderr_line(capsys)
    assert run_cli([*base, "--checkpoint", str(tmp_path / "unet.pt"), "--onnx", "m.onnx"], monkeypatch) == 2
    assert "exactly one model" in stderr_line(capsys)
    assert run_cli([*base, "--onnx", str(tmp_path / "absent.onnx")], monkeypatch) == 2
    assert "absent.onnx does not exist" in stderr_line(capsys)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert run_cli([*base, "--onnx", str(tmp_path / "junk.onnx")], monkeypatch) == 2
    assert "is not a readable ONNX model" in stderr_line(capsys)
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 2, 2])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, 2, 2])]),
        opset_imports=[onnx.helper.make_opsetid("", 18)])
    foreign.ir_version = 9
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    assert run_cli([*base, "--onnx", str(tmp_path / "foreign.onnx")], monkeypatch) == 2
    assert "not a graph exported by trustseg" in stderr_line(capsys)
    assert not (tmp_path / "out").exists()


def test_mc_dropout_and_bf16_are_refused_for_an_onnx_model(exported, tmp_path, image_folder, monkeypatch, capsys):
    base = ["predict", "--onnx", str(exported["onnx"]), "--input", str(image_folder), "--out", str(tmp_path / "o")]
    assert run_cli([*base, "--uncertainty", "mc-dropout"], monkeypatch) == 2
    assert "runs without dropout" in stderr_line(capsys)
    assert run_cli([*base, "--bf16"], monkeypatch) == 2
    assert "--bf16 does not apply" in stderr_line(capsys)
    assert not (tmp_path / "o").exists()
