"""`trustseg report` on real run directories: the sections each run's files enable, the comparison page
(side by side, ranking, bootstrap) checked against the runs' own files, and the errors."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from trustseg.report.compare import bootstrap_miou_difference
from trustseg.report.comparison import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from trustseg.report.pages import RunFiles, run_page
from trustseg.report.tables import percent

from cli_helpers import run_cli


def embedded_images(page: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        images.append(image)
    return images


def test_eval_writes_its_report_with_confusion_and_per_image_matrices(runs):
    run = runs["eval0"]
    metrics = json.loads((run / "metrics.json").read_text())
    confusion = np.load(run / "confusion_matrix.npy")
    per_image = np.load(run / "per_image_confusion.npy")
    assert confusion.shape == (3, 3) and per_image.shape == (4, 3, 3) and per_image.dtype == np.int64
    assert (per_image.sum(0) == confusion).all()
    assert confusion.sum(1).tolist() == metrics["per_class"]["support"]
    page = (run / "report.html").read_text()
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched: every asset is inline
    # reliability, class frequencies, IoU per class, confusion matrix, and the 4 images of the gallery
    assert len(embedded_images(page)) == 8
    markdown = (run / "report.md").read_text()
    for heading in ("## Metrics", "## Data", "## Per class", "## Confusion matrix", "## Predictions", "## Configuration"):
        assert heading in markdown
    assert f"| {percent(metrics['aAcc'])} | {percent(metrics['mIoU'])} |" in markdown


def test_robustness_report_has_its_sections(runs):
    markdown = (runs["robustness"] / "report.md").read_text()
    for text in ("## Robustness", "## Per corruption", "robustness_heatmap.png", "robustness_noise.png",
                 "## Agreement of metrics across conditions"):
        assert text in markdown


def test_comparison_page_side_by_side_ranking_and_bootstrap(runs, tmp_path, monkeypatch):
    out = tmp_path / "report"
    assert run_cli(["report", str(runs["eval0"]), str(runs["eval1"]), str(runs["robustness"]), "--out", str(out)],
                   monkeypatch) == 0
    for name in ("eval0", "eval1", "robustness"):
        assert (out / name / "report.html").is_file()
    markdown = (out / "comparison.md").read_text()
    first, second = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("eval0", "eval1"))
    clean = json.loads((runs["robustness"] / "robustness.json").read_text())["conditions"]["clean"]
    assert f"| mIoU ↑ | {percent(first['mIoU'])} | {percent(second['mIoU'])} | {percent(clean['mIoU'])} |" in markdown
    best = "eval0" if first["mIoU"] > second["mIoU"] else "eval1"
    ranked = re.split(" > | = ", re.search(r"\| mIoU \| (.*) \|", markdown).group(1))
    assert ranked[0] in (best, "robustness") and sorted(ranked) == ["eval0", "eval1", "robustness"]
    assert "eval0 = robustness" in markdown  # the robustness run's clean condition is eval0's evaluation
    interval = bootstrap_miou_difference(*(torch.from_numpy(np.load(runs[n] / "per_image_confusion.npy"))
                                           for n in ("eval0", "eval1")), resamples=BOOTSTRAP_RESAMPLES,
                                         seed=BOOTSTRAP_SEED)
    assert f"| eval0 | eval1 | {100 * interval.difference:+.2f} | [{100 * interval.low:+.2f}, " in markdown
    assert f"{100 * (first['mIoU'] - second['mIoU']):+.2f}" in markdown
    assert "Kendall's tau between metrics across runs" in markdown
    assert "Kendall's tau between metrics across corruption conditions" in markdown
    assert len(embedded_images((out / "comparison.html").read_text())) == 1


def test_training_history_gives_curves(tmp_path):
    run = tmp_path / "train"
    run.mkdir()
    records = [{"kind": "train", "step": s, "loss": 2.0 / s} for s in range(1, 6)]
    records += [{"kind": "val", "step": 5, "mIoU": 0.4}]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = run_page(RunFiles(run), tmp_path / "out")
    assert [b[1] for b in page.blocks if b[0] == "heading"] == ["Training"]
    assert {value[0].name for kind, value in page.blocks if kind == "image"} == {"loss.png", "val_miou.png"}


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "holds none of"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text("{broken")), "cannot be read"),
    (lambda d: (d.mkdir(), (d / "robustness.json").write_text('{"conditions": 3}')), "not as trustseg writes it"),
])
def test_report_errors_are_one_line(tmp_path, monkeypatch, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    assert run_cli(["report", str(run), "--out", str(tmp_path / "out")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_robustness_stores_the_image_quality_of_what_the_model_saw(runs):
    from trustseg.data.spec import load_dataset
    from trustseg.metrics.image_quality import noise_level, psnr, ssim
    from trustseg.robustness.dataset import CorruptedDataset

    results = json.loads((runs["robustness"] / "robustness.json").read_text())
    conditions = results["conditions"]
    assert conditions["clean"]["quality"]["PSNR"] is None and conditions["clean"]["quality"]["SSIM"] == 1.0
    dataset = load_dataset(results["setup"]["data"], split="val")
    corrupted = CorruptedDataset(dataset, "gaussian_noise", 3, seed=results["setup"]["seed"])
    pairs = [(corrupted[i]["image"][None], dataset[i]["image"][None]) for i in range(len(dataset))]
    expected = {"PSNR": np.mean([psnr(a, b).item() for a, b in pairs]),
                "SSIM": np.mean([ssim(a, b).item() for a, b in pairs]),
                "noise": np.mean([noise_level(a).item() for a, _ in pairs])}
    stored = conditions["gaussian_noise/3"]["quality"]
    for name, value in expected.items():
        assert stored[name] == pytest.approx(value, rel=1e-9)
    markdown = (runs["robustness"] / "report.md").read_text()
    assert "## Image quality per condition" in markdown and "| measure | tau with mIoU | tau with ECE |" in markdown


def test_gallery_panels_show_image_truth_prediction_error_and_uncertainty(runs):
    from trustseg.report.gallery import error_map, normalised_entropy

    index = json.loads((runs["eval0"] / "gallery" / "index.json").read_text())
    assert [e["file"] for e in index["images"]] == [f"gallery/{i:03d}.png" for i in range(4)]
    first = Image.open(runs["eval0"] / index["images"][0]["file"])
    assert first.size == (5 * 40 + 4 * 4, 32)  # five 40x32 panels, four 4-pixel gutters
    pred, target = torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 2], [255, 2]])
    colours = error_map(pred, target, 3)
    assert colours[0, 0].tolist() == colours[1, 1].tolist() == [40, 170, 60]
    assert colours[0, 1].tolist() == [220, 30, 30] and colours[1, 0].tolist() == [0, 0, 0]
    assert torch.allclose(normalised_entropy(torch.zeros(4, 2, 2)), torch.ones(2, 2, dtype=torch.float64))
    assert normalised_entropy(torch.tensor([50.0, 0.0, 0.0])[:, None, None]).item() < 1e-12


def test_no_report_skips_the_pages(tmp_path, monkeypatch):
    from cli_helpers import mixed_size_folder, save_tiny_unet

    data = mixed_size_folder(tmp_path / "data", sizes=((12, 16), (9, 11)))
    save_tiny_unet(tmp_path / "model.pt")
    out = tmp_path / "eval"
    assert run_cli(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--data", f"folder:{data}", "--out", str(out),
                    "--no-report", "--gallery", "0", "--no-progress"], monkeypatch) == 0
    assert (out / "metrics.json").is_file() and (out / "confusion_matrix.npy").is_file()
    assert not (out / "report.html").exists() and not (out / "gallery").exists()
    assert not (out / "per_image_confusion.npy").exists()  # only with --per-image


def test_quality_tau_across_conditions_matches_scipy(tmp_path):
    from scipy.stats import kendalltau

    from trustseg.report.comparison import condition_agreement
    from trustseg.report.document import Document

    miou = {"clean": 0.6, "noise/1": 0.5, "noise/3": 0.3, "blur/1": 0.55, "blur/3": 0.4}
    ece = {"clean": 0.02, "noise/1": 0.05, "noise/3": 0.04, "blur/1": 0.03, "blur/3": 0.09}
    psnr = {"clean": None, "noise/1": 25.0, "noise/3": 15.0, "blur/1": 28.0, "blur/3": 20.0}
    sharp = {"clean": 900.0, "noise/1": 1500.0, "noise/3": 3000.0, "blur/1": 400.0, "blur/3": 100.0}
    conditions = {k: {"mIoU": miou[k], "ECE": ece[k], "per_class": {}, "quality": {"PSNR": psnr[k], "sharpness": sharp[k]}}
                  for k in miou}
    run = tmp_path / "run"
    run.mkdir()
    (run / "robustness.json").write_text(json.dumps({"class_names": ["a"], "conditions": conditions}))
    page = Document("t")
    condition_agreement(RunFiles(run), page, tmp_path)
    tables = {tuple(value[0]): value[1] for kind, value in page.blocks if kind == "table"}
    rows = {row[0]: row[1:] for row in tables[("measure", "tau with mIoU", "tau with ECE")]}
    keys = [k for k in miou if psnr[k] is not None]
    for name, values, subset in (("PSNR", psnr, keys), ("sharpness", sharp, list(miou))):
        for column, metric in enumerate((miou, ece)):
            expected = kendalltau([values[k] for k in subset], [metric[k] for k in subset]).statistic
            assert rows[name][column] == f"{expected:+.2f}"
    best = max(("PSNR", "sharpness"), key=lambda n: abs(float(rows[n][0])))
    assert any(kind == "paragraph" and value.startswith(f"{best} predicts the change in mIoU best")
               for kind, value in page.blocks)
