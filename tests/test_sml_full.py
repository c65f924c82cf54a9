"""SML with Jung et al.'s boundary suppression and dilated smoothing: the float32 PyTorch
post-process against the float64 reference, and its binning through the core's
external-coordinate path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import anomfast
from anomfast import _fused, reference, sml
from anomfast.methods import resolve

from conftest import random_labels, random_logits

OPTIONS = [(False, False), (True, False), (False, True), (True, True)]
PADDINGS = ["original", "geodesic"]
SHAPES = [(2, 24, 36), (1, 1, 9), (1, 7, 1), (1, 5, 6), (1, 40, 50)]


def block_classes(g, B, H, W, C=6):
    """Class maps made of blocks of 2x2 .. 4x4 pixels (many small regions, boundaries
    everywhere, touching the image borders)."""
    out = torch.empty(B, H, W, dtype=torch.int64)
    for b in range(B):
        s = int(torch.randint(2, 5, (1,), generator=g))
        small = torch.randint(0, C, ((H + s - 1) // s, (W + s - 1) // s), generator=g)
        out[b] = small.repeat_interleave(s, 0).repeat_interleave(s, 1)[:H, :W]
    return out


def logits_for(g, pred, C=6, scale=3.0):
    """Random logits whose argmax is `pred`."""
    B, H, W = pred.shape
    x = torch.randn(B, C, H, W, generator=g) * scale
    x.scatter_add_(1, pred.unsqueeze(1), torch.full((B, 1, H, W), 4 * scale) + x.abs().amax(1, keepdim=True))
    return x


def tol(ref_in, ref_out):
    """float32 post-processing of float32 inputs: sums of at most 49 weighted terms of
    magnitude <= max|x|, so the error is a few 1e-7 of max|x|."""
    return 1e-5 * (np.abs(ref_in).max() + np.abs(ref_out))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_postprocess_matches_reference(rng, shape, opts, padding):
    B, H, W = shape
    pred = block_classes(rng, B, H, W)
    s = torch.randn(B, H, W, generator=rng) * 2 + 1
    got = sml.postprocess(s, pred, *opts, boundary_padding=padding).double().numpy()
    ref = reference.sml_postprocess(s.double().numpy(), pred.numpy(), *opts, boundary_padding=padding)
    assert np.all(np.abs(got - ref) <= tol(s.numpy(), ref)), np.abs(got - ref).max()
    if opts == (False, False):
        assert np.array_equal(got, s.double().numpy())


@pytest.mark.parametrize("padding", PADDINGS)
def test_boundaries_follow_the_official_structuring_elements(padding):
    """Boundary = (3x3 cross dilation != 3x3 square erosion) of the class ids: a diagonal
    neighbour with a larger id is not a boundary, one with a smaller id is (as
    published); a map of 0s has none. With ids 0 and 1 only, the two border rules agree."""
    pred = torch.zeros(1, 5, 5, dtype=torch.int64)
    assert not sml.find_boundaries(pred, padding).any()
    pred[0, 2, 2] = 1
    b = sml.find_boundaries(pred, padding)[0, 0]
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[1:4, 1:4] = True                      # the 3x3 square around the 1: erosion sees the 0s...
    want[1, 1] = want[1, 3] = want[3, 1] = want[3, 3] = False  # ...but corners only see 1 diagonally
    assert torch.equal(b, want)
    ref = reference.sml_postprocess(np.zeros((1, 5, 5)), pred.numpy(), True, False, boundary_padding=padding)
    assert np.allclose(ref, 0.0)


def test_original_border_rule_marks_the_ring_of_a_one_class_map():
    """The official code's kornia erodes with the image padded by 1.0 (and dilates with
    0): on a one-class 6x6 map of a class id >= 2 the 20-pixel outer ring is boundary,
    so boundary suppression changes the border scores. The geodesic rule sees no
    boundary; ids 0 and 1 give none under either rule. Default = original."""
    ring = torch.ones(6, 6, dtype=torch.bool)
    ring[1:5, 1:5] = False
    s = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6)
    for c in (0, 1, 2, 7):
        pred = torch.full((1, 6, 6), c, dtype=torch.int64)
        want = ring if c >= 2 else torch.zeros(6, 6, dtype=torch.bool)
        assert torch.equal(sml.find_boundaries(pred)[0, 0], want), c
        assert torch.equal(sml.find_boundaries(pred, "original")[0, 0], want), c
        assert not sml.find_boundaries(pred, "geodesic").any(), c
        got = sml.postprocess(s, pred, True, False)
        ref = reference.sml_postprocess(s.double().numpy(), pred.numpy(), True, False)
        assert np.allclose(got.double().numpy(), ref, rtol=0, atol=1e-5)
        assert torch.equal(got, s) == (c < 2)
        assert torch.equal(sml.postprocess(s, pred, True, False, "geodesic"), s)
    assert int(ring.sum()) == 20
    with pytest.raises(ValueError, match="sml_boundary_padding"):
        sml.find_boundaries(pred, "zeros")


def test_score_is_the_negated_published_map(rng):
    """Every step commutes with negation, bit for bit."""
    pred = block_classes(rng, 2, 30, 41)
    s = torch.randn(2, 30, 41, generator=rng)
    assert torch.equal(sml.postprocess(-s, pred), -sml.postprocess(s, pred))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("opts", OPTIONS[1:])
def test_end_to_end_scores_and_histograms(rng, opts, padding):
    """score_maps / fused_pass with the options == reference post-process of the float64
    SML score; histograms == binning of the kernel's own (external) coordinates."""
    B, C, H, W = 2, 6, 26, 70
    pred = block_classes(rng, B, H, W, C)
    x = logits_for(rng, pred, C)
    stats = anomfast.fit_sml(random_logits(rng, 2, C, 16, 16) + 3)
    kw = dict(sml=stats, sml_boundary_suppression=opts[0], sml_smoothing=opts[1], sml_boundary_padding=padding)
    got = anomfast.score_maps(x, methods=["sml"], **kw)["sml"].double().numpy()
    s64 = reference.score(x, "sml", sml_mean=stats.mean, sml_std=stats.std).numpy()
    ref = reference.sml_postprocess(s64, pred.numpy(), *opts, boundary_padding=padding)
    assert np.all(np.abs(got - ref) <= tol(s64, ref))
    y = random_labels(rng, B, H, W)
    methods = ["max_logit", "sml", "energy"]
    spec = resolve(methods, **kw)
    assert spec.codes == [0, 7, 2]
    hist, counters, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    for j, m in enumerate(methods):
        idx = reference.bin_index(maps[j])
        for row in (0, 1):
            want = torch.bincount(idx[y == row].flatten(), minlength=hist.hist.shape[-1])
            assert torch.equal(hist.hist[j, row], want), m
    assert counters.tolist()[3] == int((y != 255).sum())
    one, _, _ = _fused.fused_pass(x, y, spec, num_threads=1)
    assert one == hist


@pytest.mark.filterwarnings("ignore:SML. classes")
def test_plain_sml_unchanged_and_params(rng):
    x = random_logits(rng, 2, 5, 12, 14)
    stats = anomfast.fit_sml(random_logits(rng, 2, 5, 16, 16))
    y = random_labels(rng, 2, 12, 14)
    plain = anomfast.evaluate(x, y, methods=["sml"], sml=stats)
    off = anomfast.evaluate(x, y, methods=["sml"], sml=stats, sml_full=False)
    assert plain.histograms["sml"] == off.histograms["sml"]
    assert "sml_smoothing" not in plain["sml"].params
    full = anomfast.evaluate(x, y, methods=["sml"], sml=stats, sml_full=True)
    p = full["sml"].params
    assert p["sml_boundary_suppression"] and p["sml_smoothing"] and p["sml_boundary_padding"] == "original"
    with pytest.raises(ValueError, match="different methods/parameters"):
        plain.histograms["sml"] + full.histograms["sml"]
    geo = anomfast.evaluate(x, y, methods=["sml"], sml=stats, sml_full=True, sml_boundary_padding="geodesic")
    assert geo["sml"].params["sml_boundary_padding"] == "geodesic"
    with pytest.raises(ValueError, match="different methods/parameters"):
        geo.histograms["sml"] + full.histograms["sml"]
    with pytest.raises(ValueError, match="sml_boundary_padding"):
        resolve(["sml"], sml=stats, sml_full=True, sml_boundary_padding="zeros")
    only_bs = resolve(["sml"], sml=stats, sml_full=True, sml_smoothing=False)
    assert only_bs.sml_boundary_suppression and not only_bs.sml_smoothing
    only_sm = resolve(["sml"], sml=stats, sml_smoothing=True, sml_boundary_padding="geodesic")
    assert "sml_boundary_padding" not in only_sm.params_of("sml")  # smoothing alone does not use it
    ev = anomfast.Evaluator(methods=["energy", "sml"], sml=stats, sml_full=True)
    ev.update(x, y)
    assert ev.compute().histograms["sml"] == full.histograms["sml"]
    ev = anomfast.Evaluator(methods=["sml"], sml=stats, sml_full=True, sml_boundary_padding="geodesic")
    ev.update(x, y)
    assert ev.compute().histograms["sml"] == geo.histograms["sml"]
    per = anomfast.evaluate(x, y, methods=["sml"], sml=stats, sml_full=True, exact=True)
    low, high = full["sml"].bounds["auroc"]
    assert low <= per["sml"].auroc <= high


@pytest.mark.filterwarnings("ignore:SML. classes")
def test_nonfinite_logit_spreads_and_is_counted(rng):
    """A NaN logit makes the pixel's SML NaN; smoothing spreads it over the dilated
    kernel's footprint; those pixels are counted as non-finite, never binned."""
    x = random_logits(rng, 1, 5, 40, 40)
    stats = anomfast.fit_sml(random_logits(rng, 2, 5, 16, 16))
    y = torch.zeros(1, 40, 40, dtype=torch.uint8)
    y[0, 0, 0] = 1
    x[0, 1, 20, 20] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        anomfast.evaluate(x, y, methods=["sml"], sml=stats, sml_smoothing=True)
    r = anomfast.evaluate(x, y, methods=["sml"], sml=stats, sml_smoothing=True, nonfinite="ignore")
    assert r.pixels["nonfinite"] == 49  # the 7 x 7 taps at spacing 6 that see (20, 20)
    r = anomfast.evaluate(x, y, methods=["sml"], sml=stats, nonfinite="ignore")
    assert r.pixels["nonfinite"] == 1


@pytest.mark.filterwarnings("ignore:SML. classes")
@pytest.mark.parametrize("opts", OPTIONS[1:])
def test_refine_keeps_the_post_processed_score(rng, opts):
    """refine=True with boundary suppression / smoothing: the score is the core's float32
    post-processed map (an external coordinate), so its kept pixels keep that value; they
    must not be re-scored with the plain per-pixel SML formula. FPR95, F1 and both
    thresholds equal scikit-learn's on the same maps, AUROC / AP lie inside their bounds."""
    sk = pytest.importorskip("sklearn.metrics")
    B, C, H, W = 4, 6, 40, 64
    pred = block_classes(rng, B, H, W, C)
    x = logits_for(rng, pred, C)
    y = (torch.rand(B, H, W, generator=rng) < 0.2).to(torch.uint8)
    kw = dict(sml=anomfast.fit_sml(x), sml_boundary_suppression=opts[0], sml_smoothing=opts[1])
    s = anomfast.score_maps(x, methods=["sml"], **kw)["sml"].double().flatten().numpy()
    lab = y.flatten().numpy().astype(bool)
    fpr, tpr, thr = sk.roc_curve(lab, s, drop_intermediate=False)
    i = int(np.argmax(tpr >= 0.95))
    tps, fps = tpr[1:] * lab.sum(), fpr[1:] * (~lab).sum()
    f1 = 2 * tps / (tps + fps + lab.sum())
    b = int(np.argmax(f1))
    r = anomfast.evaluate(x, y, methods=["sml"], refine=True, **kw)["sml"]
    assert r.fpr95 == pytest.approx(fpr[i], abs=1e-12) and r.fpr95_threshold == pytest.approx(thr[i], rel=1e-6)
    assert r.f1 == pytest.approx(f1[b], abs=1e-12) and r.threshold == pytest.approx(thr[1:][b], rel=1e-6)
    for k, want in (("auroc", sk.roc_auc_score(lab, s)), ("ap", sk.average_precision_score(lab, s))):
        lo, hi = r.bounds[k]
        assert lo <= want <= hi, (k, want, r.bounds[k])
