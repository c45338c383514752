"""CalibrationHistogram against torchmetrics (ECE, MCE) and a naive NumPy reference (everything else)."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassCalibrationError

import trustseg.metrics.calibration as calibration
from trustseg.errors import UserError
from trustseg.metrics import CalibrationHistogram, Predictions
from trustseg.metrics.calibration import bin_index, class_edge_band

IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_thread")


def blobby(seed, batch, height, width, K, *, ignore_fraction=0.15, scale=3.0, confident=0.0):
    """Logits (B, K, H, W) and piecewise-constant targets (B, H, W) with ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, K, (batch, (height + 2) // 3, (width + 2) // 3), generator=g)
    target = coarse.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :height, :width].contiguous()
    logits = torch.randn(batch, K, height, width, generator=g) * scale
    logits += confident * torch.nn.functional.one_hot(target, K).permute(0, 3, 1, 2)
    target[torch.rand(target.shape, generator=g) < ignore_fraction] = IGNORE
    return logits, target


def brute_band(target, K, width):
    """Labelled pixels with a labelled pixel of another class within chessboard distance `width`."""
    B, H, W = target.shape
    band = np.zeros((B, H, W), bool)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                c = target[b, i, j]
                if c == IGNORE:
                    continue
                window = target[
                    b,
                    max(0, i - width) : i + width + 1,
                    max(0, j - width) : j + width + 1,
                ]
                band[b, i, j] = bool(((window != IGNORE) & (window != c)).any())
    return band


def bins_of(x32, n):
    """torchmetrics' rule: searchsorted right on float32 linspace edges, minus one (x = 1 -> bin n)."""
    edges = torch.linspace(0, 1, n + 1).numpy()
    return np.searchsorted(edges, x32, side="right") - 1


def ece_loops(conf, correct, n_bins):
    N = len(conf)
    idx = bins_of(conf.astype(np.float32), n_bins)
    ece, mce = 0.0, 0.0
    rel = {"count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins + 1):
        sel = idx == b
        n = int(sel.sum())
        acc = correct[sel].mean() if n else math.nan
        cf = conf[sel].astype(np.float64).mean() if n else math.nan
        rel["count"].append(n)
        rel["confidence"].append(cf)
        rel["accuracy"].append(acc)
        if n:
            ece += n / N * abs(acc - cf)
            mce = max(mce, abs(acc - cf))
    return (ece, mce, rel) if N else (math.nan, math.nan, rel)


def adaptive_exact(conf, correct, groups):
    """Nixon et al. equal-mass bins: sorted pixel i goes to group floor(i * R / N)."""
    N = len(conf)
    order = np.argsort(conf, kind="stable")
    group = np.arange(N) * groups // N
    gap = np.zeros(groups)
    np.add.at(gap, group, correct[order].astype(np.float64) - conf[order].astype(np.float64))
    return np.abs(gap).sum() / N


def straddle_bound(conf, groups, fine_bins):
    """2 x fraction of pixels in fine bins whose sorted positions cross an equal-mass group boundary.

    Fine bins as the metric defines them: each of the `groups` (= num_bins) ECE bins split into
    S = ceil(fine_bins / groups) equal parts, in float32, plus {1.0}."""
    N, M = len(conf), groups
    S = -(-fine_bins // M)
    x = conf.astype(np.float32)
    b = np.searchsorted(torch.linspace(0, 1, M + 1).numpy(), x, side="right") - 1
    part = np.clip(np.floor((x * np.float32(M) - b.astype(np.float32)) * np.float32(S)), 0, S - 1)
    fine = b * S + part.astype(int)
    counts = np.bincount(fine, minlength=M * S + 1)
    end = np.cumsum(counts)
    start = end - counts
    moved = sum(c for c, s, e in zip(counts, start, end) if c and (s * groups // N) != ((e - 1) * groups // N))
    return 2 * moved / N


def reference(logits, target, K, *, n_bins=15, width=2):
    """Every metric by explicit formulas over the labelled pixels (float64 on the float32 softmax)."""
    probs = logits.softmax(1).numpy().astype(np.float64)  # (B, K, H, W)
    t = target.numpy()
    band = brute_band(t, K, width)
    out = {}
    for suffix, region in (("", t != IGNORE), ("_boundary", band)):
        p = np.moveaxis(probs, 1, -1)[region]  # (N, K)
        y = t[region]
        conf, pred = p.max(1), p.argmax(1)
        correct = (pred == y).astype(np.float64)
        ece, mce, rel = ece_loops(conf, correct, n_bins)
        cw = []
        for k in range(K):
            idx = bins_of(p[:, k].astype(np.float32), n_bins)
            cw.append(sum(abs((y[idx == b] == k).sum() - p[idx == b, k].sum()) for b in range(n_bins + 1)) / len(y))
        onehot = np.eye(K)[y]
        per_image = []
        for b in range(t.shape[0]):
            sel = region[b]
            if sel.any():
                pb = np.moveaxis(probs[b], 0, -1)[sel]
                per_image.append(ece_loops(pb.max(1), (pb.argmax(1) == t[b][sel]).astype(float), n_bins)[0])
        out.update(
            {
                f"ECE{suffix}": ece,
                f"MCE{suffix}": mce,
                f"aECE_exact{suffix}": adaptive_exact(conf, correct, n_bins) if len(y) else math.nan,
                f"cwECE{suffix}": float(np.mean(cw)),
                f"NLL{suffix}": float(np.mean(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)))),
                f"Brier{suffix}": float(np.mean(((p - onehot) ** 2).sum(1))),
                f"ECE{suffix}_img_mean": float(np.mean(per_image)),
                f"ECE{suffix}_img_std": float(np.std(per_image)),
                f"reliability{suffix}": rel,
                f"conf{suffix}": conf,
                f"per_class{suffix}": cw,
            }
        )
    return out


def assert_close(a, b, tol=1e-6):
    assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol, (a, b)


# (pixels per scan step, per float32 run of the column sums, confidence boost): one step and no whole
# run per image, every pixel uncertain; then steps of 7 pixels, runs of 16 and a remainder, some
# pixels confident enough for their K-vectors to be skipped.
@pytest.mark.parametrize("pixels, column_pixels, confident", [(calibration._PIXELS, calibration._COLUMN_PIXELS, 0.0), (7, 16, 4.0)])
def test_matches_torchmetrics_and_naive_reference(monkeypatch, pixels, column_pixels, confident):
    monkeypatch.setattr(calibration, "_PIXELS", pixels)
    monkeypatch.setattr(calibration, "_COLUMN_PIXELS", column_pixels)
    K, width = 5, 2
    logits, target = blobby(0, 3, 13, 17, K, confident=confident)
    metric = CalibrationHistogram(K, boundary_width=width)
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    got = metric.compute()
    ref = reference(logits, target, K, width=width)

    # torchmetrics on the flattened labelled pixels (ignore pixels are present in the target)
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, K)
    flat = target.flatten()
    for norm, key in (("l1", "ECE"), ("max", "MCE")):
        oracle = MulticlassCalibrationError(K, n_bins=15, norm=norm, ignore_index=IGNORE)(probs, flat)
        assert_close(got[key], float(oracle))
        band = torch.from_numpy(brute_band(target.numpy(), K, width)).flatten()
        oracle = MulticlassCalibrationError(K, n_bins=15, norm=norm)(probs[band], flat[band])
        assert_close(got[f"{key}_boundary"], float(oracle))

    for suffix in ("", "_boundary"):
        keys = [k + suffix for k in ("ECE", "MCE", "cwECE", "NLL", "Brier")]
        for key in keys + [f"ECE{suffix}_img_mean", f"ECE{suffix}_img_std"]:
            assert_close(got[key], ref[key])
        np.testing.assert_allclose(got["per_class"][f"cwECE{suffix}"], ref[f"per_class{suffix}"], atol=1e-6)
        rel, ref_rel = (
            got["reliability"]["boundary" if suffix else "all"],
            ref[f"reliability{suffix}"],
        )
        assert rel["count"] == ref_rel["count"]
        for field in ("confidence", "accuracy"):
            np.testing.assert_allclose(rel[field], ref_rel[field], atol=1e-7, equal_nan=True)
        bound = straddle_bound(ref[f"conf{suffix}"], 15, metric.fine_bins)
        assert abs(got[f"aECE{suffix}"] - ref[f"aECE_exact{suffix}"]) <= bound + 1e-9
    assert got["reliability"]["lower"][0] == 0.0 and got["reliability"]["upper"][-1] == 1.0
    assert 0 < got["boundary_fraction"] < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_bins", [1, 2, 3, 7, 10, 15, 19, 20, 100, 1000])
def test_bin_index_is_torchmetrics_bucketize_around_every_edge(num_bins, dtype):
    """The fast path agrees with bucketize on every float within 256 ulps of every edge; elsewhere
    both are monotone and constant between those neighbourhoods, so they agree on every float."""
    edges = torch.linspace(0, 1, num_bins + 1, dtype=dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    x = (edges.view(bits)[:, None] + torch.arange(-256, 257, dtype=bits)).view(dtype).flatten()
    x = torch.cat((x[(x >= 0) & (x <= 1)], torch.rand(10_000, dtype=dtype, generator=torch.Generator().manual_seed(0))))
    bins = bin_index(x, num_bins)
    assert torch.equal(bins, torch.bucketize(x, edges, right=True, out_int32=True) - 1)
    # fine bins: inside their ECE bin, and monotone in x
    sub = calibration.sub_bins(num_bins, 1000)
    fine = calibration.fine_index(x, bins, num_bins, sub)
    assert torch.equal(torch.div(fine, sub, rounding_mode="floor"), bins)
    order = x.argsort()
    assert bool((fine[order].diff() >= 0).all())


@pytest.mark.parametrize("num_classes", [254, 255, 400])
def test_band_depends_only_on_which_labels_differ(num_classes):
    """Relabelling the classes injectively (into the uint8 and int32 ranges) keeps the band."""
    _, target = blobby(4, 2, 12, 15, 3)
    ignored = target == IGNORE
    expected = torch.from_numpy(brute_band(target.numpy(), 3, 2))
    relabelled = torch.where(ignored, -1, target * (num_classes // 3) + num_classes % 3)
    assert torch.equal(class_edge_band(relabelled, ignored, num_classes, 2), expected)
    assert torch.equal(class_edge_band(target, ignored, 3, 2), expected)


@pytest.mark.parametrize("fine_bins", [20, 200, 5000])
def test_adaptive_ece_error_within_bound_that_shrinks_with_fine_bins(fine_bins):
    K = 4
    logits, target = blobby(1, 2, 30, 30, K, scale=1.5)
    metric = CalibrationHistogram(K, fine_bins=fine_bins)
    metric.update(logits, target)
    ref = reference(logits, target, K)
    bound = straddle_bound(ref["conf"], 15, fine_bins)
    error = abs(metric.compute()["aECE"] - ref["aECE_exact"])
    assert error <= bound + 1e-9
    if fine_bins == 5000:
        assert bound < 0.02  # about 2 (M - 1) f / F for a smooth confidence density f


def test_saturated_confidences_use_the_top_bin_like_torchmetrics():
    K = 3
    logits = torch.zeros(1, K, 4, 4)
    logits[:, 0, :2] = 200.0  # softmax is exactly 1.0 on the top half
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, 0, 0] = 1
    metric = CalibrationHistogram(K)
    metric.update(logits, target)
    got = metric.compute()
    oracle = MulticlassCalibrationError(K, n_bins=15)(
        logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, K), target.flatten()
    )
    assert_close(got["ECE"], float(oracle))
    assert got["reliability"]["all"]["count"][-1] == 8
    # the clamp: the wrong pixel has p_target = 0 in float32 and costs -log(1e-12), not infinity; the
    # other 7 saturated pixels cost 0 and the 8 uniform ones log(3) each
    assert got["NLL"] == pytest.approx((-math.log(1e-12) + 8 * math.log(3)) / 16, rel=1e-6)


@st.composite
def streams(draw):
    K = draw(st.integers(1, 4))
    images = draw(st.integers(2, 5))
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    logits, target = blobby(
        draw(st.integers(0, 2**31 - 1)),
        images,
        height,
        width,
        K,
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
    )
    return K, logits, target


def fed(K, logits, target, batch_size=1):
    metric = CalibrationHistogram(K, boundary_width=1, fine_bins=50)
    for start in range(0, len(logits), batch_size):
        metric.update(logits[start : start + batch_size], target[start : start + batch_size])
    return metric


def assert_same_state(a, b):
    for name, value in a.state_dict()["state"].items():
        other = b.state_dict()["state"][name]
        if value.is_floating_point():  # float addition order differs; float32 column sums per batch
            torch.testing.assert_close(value, other, rtol=1e-6, atol=1e-5)  # float32 column sums: 1 ulp
        else:
            assert torch.equal(value, other), name


@settings(max_examples=20, deadline=None)
@given(data=streams(), split=st.integers(0, 5))
def test_merge_of_two_halves_equals_whole(data, split):
    K, logits, target = data
    split = min(split, len(logits))
    halves = fed(K, logits[:split], target[:split]).merge(fed(K, logits[split:], target[split:]))
    assert_same_state(halves, fed(K, logits, target))


@settings(max_examples=20, deadline=None)
@given(data=streams(), batch_size=st.integers(1, 5), seed=st.integers(0, 1000))
def test_batch_size_and_image_order_do_not_matter(data, batch_size, seed):
    K, logits, target = data
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))
    assert_same_state(fed(K, logits[order], target[order], batch_size), fed(K, logits, target))


@settings(max_examples=10, deadline=None)
@given(data=streams())
def test_state_dict_round_trip(data):
    K, logits, target = data
    metric = fed(K, logits, target)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    restored = CalibrationHistogram(K, boundary_width=1, fine_bins=50)
    restored.load_state_dict(torch.load(buffer))
    assert_same_state(metric, restored)
    a, b = metric.compute(), restored.compute()
    assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a if isinstance(a[k], float))
    with pytest.raises(UserError):
        CalibrationHistogram(K, boundary_width=2, fine_bins=50).load_state_dict(metric.state_dict())


@pytest.mark.parametrize("pixels", [calibration._PIXELS, 7])
def test_top_label_only_gives_the_same_values_without_classwise_and_band(monkeypatch, pixels):
    """classwise=False, boundary_width=0 drops cwECE and the band, and every other value stays."""
    monkeypatch.setattr(calibration, "_PIXELS", pixels)
    K = 4
    logits, target = blobby(5, 3, 13, 17, K)
    full, top = CalibrationHistogram(K, fine_bins=50), CalibrationHistogram(K, fine_bins=50, classwise=False, boundary_width=0)
    for metric in (full, top):
        metric.update(logits, target)
    a, b = full.compute(), top.compute()
    assert not any(key.startswith("cwECE") for key in b) and b["per_class"] == {}
    for key in ("ECE", "MCE", "aECE", "NLL", "Brier", "ECE_img_mean", "ECE_img_std"):
        assert b[key] == pytest.approx(a[key], abs=1e-12)
        assert math.isnan(b[f"{key.replace('ECE_img', 'ECE_boundary_img')}" if "img" in key else f"{key}_boundary"])
    assert b["boundary_fraction"] == 0
    for field in ("count", "confidence", "accuracy"):
        np.testing.assert_allclose(b["reliability"]["all"][field], a["reliability"]["all"][field], rtol=1e-12, equal_nan=True)
    assert "class_count" not in top.state_dict()["state"] and top.config["classwise"] is False
    with pytest.raises(UserError):
        full.load_state_dict(top.state_dict())


def test_perfectly_calibrated_labels_give_near_zero_ece():
    K = 4
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, K, 64, 64, generator=g) * 2
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, K).double()
    target = torch.multinomial(probs, 1, generator=g).view(4, 64, 64)
    metric = CalibrationHistogram(K)
    metric.update(logits, target)
    got = metric.compute()
    assert got["ECE"] < 0.02 and got["aECE"] < 0.02 and got["cwECE"] < 0.02
    overconfident = CalibrationHistogram(K)
    overconfident.update(logits * 3, target)
    assert overconfident.compute()["ECE"] > 0.1


def test_errors():
    K = 3
    logits, target = blobby(2, 1, 4, 4, K)
    metric = CalibrationHistogram(K)
    bad = logits.clone()
    bad[0, 1, 2, 2] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        metric.update(bad, target)
    with pytest.raises(UserError, match="channels"):
        metric.update(logits[:, :2], target)
    wrong = target.clone()
    wrong[0, 0, 0] = K
    with pytest.raises(UserError, match="outside"):
        metric.update(logits, wrong)
    with pytest.raises(UserError, match="logits"):
        metric.update(logits.argmax(1), target)  # hard predictions carry no probabilities
    with pytest.raises(UserError, match="num_bins"):
        CalibrationHistogram(K, num_bins=0)
    with pytest.raises(UserError, match="boundary_width must be an integer >= 0"):
        CalibrationHistogram(K, boundary_width=-1)
    shared = Predictions(logits)  # the same softmax serves every metric
    metric.update(shared, target)
    assert shared._probs is not None
    # the rejected updates left nothing behind, and shared predictions count like the logits themselves
    ref = reference(logits, target, K)
    got = metric.compute()
    for key in ("ECE", "MCE", "cwECE", "NLL", "Brier"):
        assert_close(got[key], ref[key])


def test_empty_and_all_ignored_give_nan():
    metric = CalibrationHistogram(2)
    metric.update(torch.randn(1, 2, 3, 3), torch.full((1, 3, 3), IGNORE))
    got = metric.compute()
    assert all(math.isnan(got[k]) for k in ("ECE", "MCE", "aECE", "cwECE", "NLL", "Brier", "ECE_img_mean"))
