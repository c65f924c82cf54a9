"""HEAT: the fused core (+ the Mahalanobis matmul in Python) against the float64 reference,
fitting, save/load, errors, and real digits data."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import anomfast
from anomfast import _fused, heat, reference
from anomfast.methods import resolve

from conftest import random_labels, random_logits

# (B, C, H, W, D, h, w): tiles, borders (H or W = 1, 2, 3), one pixel, C = 1, D = 1 and 512,
# features coarser than the logits, W spanning several 64-pixel tiles with a short last one
SHAPES = [
    (2, 19, 17, 70, 16, 9, 35),
    (1, 19, 8, 16, 512, 4, 8),
    (1, 7, 1, 9, 1, 1, 3),
    (2, 5, 2, 2, 3, 2, 2),
    (1, 4, 3, 130, 8, 2, 33),
    (3, 6, 9, 1, 2, 3, 1),
    (1, 3, 1, 1, 4, 1, 1),
    (1, 1, 5, 6, 4, 5, 6),
    (4, 5, 1, 1, 6, 1, 1),
]


def class_features(g, B, D, h, w, labels_small, C, spread=3.0):
    """Features clustered by class: a per-class centre plus unit noise (with a common
    offset, so the centering of distance_sq matters)."""
    centres = torch.randn(C, D, generator=g, dtype=torch.float64) * spread
    f = centres[labels_small].permute(0, 3, 1, 2) + torch.randn(B, D, h, w, generator=g, dtype=torch.float64)
    return (f + 5.0).to(torch.float32)


def make_data(g, B, C, H, W, D, h, w, dtype=torch.float32):
    x = random_logits(g, B, C, H, W, dtype=dtype)
    sem = torch.randint(0, C, (B, H, W), generator=g)
    small = torch.nn.functional.interpolate(sem[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    f = class_features(g, B, D, h, w, small, C)
    return x, f, sem


def fitted(g, C, D, h=12, w=14, B=3, standardize=True, temperature=1.0):
    x, f, sem = make_data(g, B, C, 2 * h, 2 * w, D, h, w)
    return anomfast.fit_heat(x, f, sem, standardize=standardize, temperature=temperature)


def tolerance(x64, f, stats, ref):
    """|kernel - reference| bound for float32 HEAT. Every term is float32: E and the
    entropy carry ~1e-6 relative error of max|l| (as energy); K and v are sums of float32
    probabilities (absolute ~1e-6); M is a float32 whitening matmul followed by a direct
    |z - w_k|^2 for the nearest class (no cancellation; measured <= 5e-7 relative to
    M + 1, see test_distance_map_matches_direct_quadratic_form), and bilinear
    upsampling averages such values. Normalised weights make HEAT a convex combination,
    so its error is bounded by the terms' errors plus ~1e-6 of their size. 1e-4 of that
    scale leaves a margin of 50x or more over the errors measured on these shapes while
    still catching any formula slip (a wrong pad rule or weight moves pixels by O(1) of
    the scale)."""
    H, W = x64.shape[2:]
    M = reference.heat_distance(f, stats.mean, stats.precision, size=(H, W))
    scale = x64.abs().amax(dim=1) + M + 1.0
    if stats.standardized:
        scale = scale / stats.score_std
    return 1e-4 * (ref.abs() + scale)


def ref_heat(x, f, stats):
    return reference.heat_score(x.double().cpu(), f.double().cpu(), stats.mean, stats.precision,
                                temperature=stats.temperature, score_mean=stats.score_mean,
                                score_std=stats.score_std)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("standardize", [True, False])
def test_heat_matches_reference(rng, shape, standardize):
    B, C, H, W, D, h, w = shape
    stats = fitted(rng, C, D, standardize=standardize)
    x, f, _ = make_data(rng, B, C, H, W, D, h, w)
    got = anomfast.score_maps(x, methods=["heat"], features=f, heat=stats)["heat"]
    assert got.dtype == torch.float32 and got.shape == (B, H, W) and bool(torch.isfinite(got).all())
    ref = ref_heat(x, f, stats)
    err = (got.double() - ref).abs()
    tol = tolerance(x.double(), f, stats, ref)
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_heat_half_precision_logits_and_layouts(rng, dtype):
    """Half logits are widened exactly; channels-last and sliced logits give the same bits."""
    stats = fitted(rng, 19, 8, temperature=1.5)
    x, f, _ = make_data(rng, 2, 19, 12, 40, 8, 6, 20, dtype=dtype)
    got = anomfast.score_maps(x, methods=["heat"], features=f, heat=stats)["heat"]
    ref = ref_heat(x, f, stats)
    tol = tolerance(x.double(), f, stats, ref)
    assert bool(((got.double() - ref).abs() <= tol).all())
    for v in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert torch.equal(anomfast.score_maps(v, methods=["heat"], features=f, heat=stats)["heat"], got)


def test_heat_temperature_and_single_class(rng):
    """C = 1: p = 1, K = 0 inside, r = v = 0 (weights at their 1e-6 floors), no NaN."""
    stats = fitted(rng, 1, 3, standardize=False, temperature=2.0)
    x, f, _ = make_data(rng, 2, 1, 6, 7, 3, 3, 4)
    got = anomfast.score_maps(x, methods=["heat"], features=f, heat=stats)["heat"]
    ref = ref_heat(x, f, stats)
    assert bool(torch.isfinite(got).all())
    assert bool(((got.double() - ref).abs() <= tolerance(x.double(), f, stats, ref)).all())


def test_distance_map_matches_direct_quadratic_form(rng):
    """The expanded float32 matmul form of M against (f - mu)' P (f - mu) in float64,
    including D = 512 and features with a large common offset."""
    for D in (1, 7, 512):
        stats = fitted(rng, 5, D, standardize=False)
        x, f, _ = make_data(rng, 2, 5, 10, 12, D, 5, 6)
        got = heat.distance_map(f, stats, (10, 12)).double()
        ref = reference.heat_distance(f, stats.mean, stats.precision, size=(10, 12))
        assert bool(((got - ref).abs() <= 1e-5 * (ref + 1.0)).all()), D


def test_histograms_equal_binning_of_own_scores(rng):
    """HEAT together with the other methods: histograms are exactly the binning of the
    kernel's own maps, and the other methods' maps do not change when heat is added."""
    B, C, H, W = 2, 19, 13, 70
    stats = fitted(rng, C, 8)
    x, f, _ = make_data(rng, B, C, H, W, 8, 7, 35)
    y = random_labels(rng, B, H, W)
    methods = ["max_logit", "msp", "energy", "entropy", "gen", "heat"]
    spec = resolve(methods, heat=stats, temperature=1.3)
    hist, counters, maps = _fused.fused_pass(x, y, spec, want_maps=True, features=f)
    for j, m in enumerate(methods):
        idx = reference.bin_index(maps[j])
        for row in (0, 1):
            want = torch.bincount(idx[y == row].flatten(), minlength=hist.hist.shape[-1])
            assert torch.equal(hist.hist[j, row], want), m
    c = counters.tolist()
    assert c[0] == c[1] == 0 and c[2] == int((y == 255).sum()) and c[3] == int((y != 255).sum())
    plain = resolve(methods[:-1], temperature=1.3)
    _, _, maps2 = _fused.fused_pass(x, y, plain, want_maps=True)
    assert torch.equal(maps[:-1], maps2)


@pytest.mark.parametrize("shape", [(3, 21, 150, 11, 75), (2, 70, 150, 35, 75)])
def test_thread_determinism(rng, shape):
    """The core caches the softmax of halo rows while it walks down a column of tiles and
    refills it where a thread's chunk of tiles starts (mid-column, at a new column block
    or image): 1 and 2 threads (different chunks) give the same bits, equal to the
    reference within the usual bound."""
    B, H, W, h, w = shape
    stats = fitted(rng, 7, 5)
    x, f, _ = make_data(rng, B, 7, H, W, 5, h, w)
    y = random_labels(rng, B, H, W)
    spec = resolve(["energy", "heat"], heat=stats)
    one, _, m1 = _fused.fused_pass(x, y, spec, want_maps=True, features=f, num_threads=1)
    two, _, m2 = _fused.fused_pass(x, y, spec, want_maps=True, features=f, num_threads=2)
    assert one == two and torch.equal(m1, m2)
    ref = ref_heat(x, f, stats)
    assert bool(((m1[1].double() - ref).abs() <= tolerance(x.double(), f, stats, ref)).all())


def test_nonfinite_logits_and_features_are_counted(rng):
    """A NaN logit makes its own pixel and (through q and v) its 3x3 neighbours
    non-finite; a NaN feature makes M NaN where the bilinear upsampling reads it. Those
    pixels are skipped for every method and counted, never binned as NaN."""
    stats = fitted(rng, 5, 4)
    x, f, _ = make_data(rng, 1, 5, 8, 9, 4, 8, 9)
    y = torch.zeros(1, 8, 9, dtype=torch.uint8)
    y[0, 7, 0] = 1
    x[0, 2, 0, 4] = float("nan")  # top border: 2 x 3 neighbourhood
    with pytest.raises(ValueError, match="NaN or infinite"):
        anomfast.evaluate(x, y, methods=["energy", "heat"], features=f, heat=stats)
    r = anomfast.evaluate(x, y, methods=["energy", "heat"], features=f, heat=stats, nonfinite="ignore")
    assert r.pixels["nonfinite"] == 6 and r.pixels["binned"] == 72 - 6
    x[0, 2, 0, 4] = 0.0
    f[0, 1, 5, 5] = float("nan")  # same resolution: only that pixel
    r = anomfast.evaluate(x, y, methods=["energy", "heat"], features=f, heat=stats, nonfinite="ignore")
    assert r.pixels["nonfinite"] == 1
    ex = anomfast.evaluate(x, y, methods=["energy", "heat"], features=f, heat=stats, nonfinite="ignore", exact=True)
    assert ex["heat"].n_neg == r["heat"].n_neg == 70 and ex["heat"].n_pos == 1


def test_fit_heat_matches_reference_fit(rng):
    C, D = 6, 5
    batches = [make_data(rng, 2, C, 12, 14, D, 6, 7) for _ in range(3)]
    for x, _, sem in batches:
        sem[0, :3] = 255  # ignored pixels
    xs, fs, ys = zip(*batches)
    stats = anomfast.fit_heat(list(xs), list(fs), list(ys), temperature=1.5)
    count, mean, cov, prec, sm, ss = reference.fit_heat(list(xs), list(fs), list(ys), temperature=1.5)
    np.testing.assert_array_equal(stats.count, count)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.precision, prec, rtol=1e-9, atol=1e-10)
    # the score statistics come from the float32 kernel scores: float32 agreement
    assert abs(stats.score_mean - sm) <= 1e-5 * (abs(sm) + ss) and abs(stats.score_std - ss) <= 1e-5 * ss
    # one batch as tensors == the same batch in a list; standardized scores on the fitting data ~ N(0, 1)
    one = anomfast.fit_heat(xs[0], fs[0], ys[0])
    same = anomfast.fit_heat([xs[0]], [fs[0]], [ys[0]])
    np.testing.assert_array_equal(one.precision, same.precision)
    assert one.score_mean == same.score_mean and one.score_std == same.score_std
    s = torch.cat([anomfast.score_maps(x, methods=["heat"], features=f, heat=stats)["heat"][y != 255]
                   for x, f, y in batches]).double()
    assert abs(float(s.mean())) < 1e-4 and abs(float(s.std(unbiased=False)) - 1) < 1e-4


def test_tied_covariance_divides_by_n_minus_1():
    """The source project's covariance: class-centred features, (X^T X) / (N - 1) + 1e-4 I.
    Five hand-made 2-D features in two classes (N = 5: the divisor N would scale the
    scatter part by 4/5)."""
    sem = torch.tensor([[[0, 0, 1, 1, 1]]])                   # (1, 1, 5), features at the same size
    g = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 5.0], [4.0, 0.0]])
    f = torch.tensor(g.T[None, :, None, :], dtype=torch.float32)  # (1, D=2, 1, 5)
    x = torch.zeros(1, 2, 1, 5)
    stats = anomfast.fit_heat(x, f, sem, standardize=False)
    k = sem.flatten().numpy()
    dev = g - np.stack([g[k == c].mean(axis=0) for c in (0, 1)])[k]
    want = np.cov(dev.T, ddof=1) + 1e-4 * np.eye(2)          # dev has mean 0, so np.cov centres nothing
    np.testing.assert_allclose(stats.cov, want, rtol=1e-12)
    np.testing.assert_allclose(stats.precision, np.linalg.inv(want), rtol=1e-10)
    _, _, cov, prec, _, _ = reference.fit_heat(x, f, sem, standardize=False)
    np.testing.assert_allclose(cov, want, rtol=1e-12)
    np.testing.assert_allclose(prec, np.linalg.inv(want), rtol=1e-10)


def test_fit_heat_missing_class_and_one_shot_iterator(rng):
    x, f, sem = make_data(rng, 2, 4, 8, 8, 3, 8, 8)
    sem[sem == 2] = 1  # class 2 never appears
    with pytest.warns(RuntimeWarning, match=r"classes \[2\] have no fitting pixels"):
        stats = anomfast.fit_heat(x, f, sem)
    assert stats.missing_classes == [2] and np.isnan(stats.mean[2]).all()
    got = heat.distance_map(f, stats, (8, 8)).double()
    ref = reference.heat_distance(f, stats.mean, stats.precision, size=(8, 8))  # min over classes 0, 1, 3
    assert bool(((got - ref).abs() <= 1e-5 * (ref + 1)).all())
    with pytest.raises(ValueError, match=r"classes \[2\] have no fitting pixels"):
        anomfast.fit_heat(x, f, sem, missing="error")
    with pytest.raises(ValueError, match="one-shot iterator"):
        anomfast.fit_heat(iter([x]), iter([f]), iter([sem]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s1 = anomfast.fit_heat(iter([x]), iter([f]), iter([sem]), standardize=False)
    assert not s1.standardized
    bad = sem.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match="semantic label value 9"):
        anomfast.fit_heat(x, f, bad)


def test_save_load_roundtrip(rng, tmp_path):
    stats = fitted(rng, 5, 6, temperature=0.7)
    stats.save(tmp_path / "heat.npz")
    back = anomfast.HeatStats.load(tmp_path / "heat.npz")
    for k in ("mean", "cov", "precision", "count"):
        np.testing.assert_array_equal(getattr(back, k), getattr(stats, k))
    assert (back.temperature, back.score_mean, back.score_std) == (stats.temperature, stats.score_mean, stats.score_std)
    x, f, _ = make_data(rng, 1, 5, 6, 8, 6, 3, 4)
    a = anomfast.score_maps(x, methods=["heat"], features=f, heat=stats)["heat"]
    b = anomfast.score_maps(x, methods=["heat"], features=f, heat=back)["heat"]
    assert torch.equal(a, b)
    anomfast.SMLStats(np.array([2, 2]), np.array([1.0, 2.0]), np.array([1.0, 3.0])).save(tmp_path / "sml.npz")
    with pytest.raises(ValueError, match="unknown HEAT statistics format 'anomfast-sml-v1'"):
        anomfast.HeatStats.load(tmp_path / "sml.npz")


def test_errors(rng):
    stats = fitted(rng, 5, 6)
    x, f, _ = make_data(rng, 2, 5, 6, 8, 6, 3, 4)
    y = torch.zeros(2, 6, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"HEAT needs features=\(B, D, h, w\)"):
        anomfast.score_maps(x, methods=["heat"], heat=stats)
    with pytest.raises(ValueError, match="batch size 1 does not match the logits' 2"):
        anomfast.evaluate(x, y, methods=["heat"], heat=stats, features=f[:1])
    with pytest.raises(ValueError, match="fitted on D = 6 features but features have D = 5"):
        anomfast.evaluate(x, y, methods=["heat"], heat=stats, features=f[:, :5])
    # channel-last features: the error names the layout and the permute (f is (2, 6, 3, 4):
    # a (B, h, w, D) tensor with D = 6 reads as D = 3 here)
    with pytest.raises(ValueError, match=r"look channel-last \(B, h, w, D\) with D = 6.*permute\(0, 3, 1, 2\)"):
        anomfast.evaluate(x, y, methods=["heat"], heat=stats, features=f.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="fitted for 5 classes but the logits have C = 4"):
        anomfast.evaluate(x[:, :4], y, methods=["heat"], heat=stats, features=f)
    with pytest.raises(ValueError, match="needs statistics"):
        anomfast.score_maps(x, methods=["heat"], features=f)
    with pytest.raises(TypeError, match="heat must be a HeatStats"):
        anomfast.score_maps(x, methods=["heat"], features=f, heat=object())
    with pytest.raises(ValueError, match=r"HEAT needs features=\(B, D, h, w\)"):
        anomfast.score_maps(x, methods=["heat"], features=f[0, 0], heat=stats)


@pytest.mark.skipif(not (torch.cuda.is_available() and anomfast.build_info()["cuda"]), reason="needs CUDA")
def test_heat_on_cuda_is_refused(rng):  # pragma: no cover - needs a GPU
    stats = fitted(rng, 5, 6)
    x, f, _ = make_data(rng, 1, 5, 6, 8, 6, 3, 4)
    with pytest.raises(NotImplementedError, match="HEAT on CUDA is not implemented yet"):
        anomfast.score_maps(x.cuda(), methods=["heat"], features=f.cuda(), heat=stats)


def test_evaluate_iterables_per_image_and_evaluator(rng):
    stats = fitted(rng, 5, 6)
    data = [make_data(rng, 2, 5, 10, 12, 6, 5, 6) for _ in range(3)]
    ys = [random_labels(rng, 2, 10, 12) for _ in data]
    xs, fs = [d[0] for d in data], [d[1] for d in data]
    kw = dict(methods=["energy", "heat"], heat=stats)
    it = anomfast.evaluate(xs, ys, features=fs, **kw)
    whole = anomfast.evaluate(torch.cat(xs), torch.cat(ys), features=torch.cat(fs), **kw)
    assert it.histograms["heat"] == whole.histograms["heat"]
    ev = anomfast.Evaluator(**kw)
    for x, y, f in zip(xs, ys, fs):
        ev.update(x, y, features=f)
    assert ev.compute().histograms["heat"] == whole.histograms["heat"]
    per = anomfast.evaluate(xs, ys, features=fs, per_image=True, **kw)
    ex = anomfast.evaluate(xs, ys, features=fs, exact=True, **kw)
    assert np.isfinite(per["heat"].auroc)
    low, high = whole["heat"].bounds["auroc"]
    assert low <= ex["heat"].auroc <= high
    with pytest.raises(ValueError, match="features ran out after 2 batches"):
        anomfast.evaluate(xs, ys, features=fs[:2], **kw)


def test_real_digits_heat_differs_from_energy(digits):
    """Real 5-class logits and hidden features (N, 32) of a classifier trained on digits
    0-4: HEAT is fitted on the training digits' features and labels and evaluated on the
    test half (digits 5-9 anomalous)."""
    ff = digits["fit_features"].reshape(-1, 32, 1, 1)
    stats = anomfast.fit_heat(digits["fit_logits"], ff, digits["fit_labels"])
    f = digits["features"].reshape(-1, 32, 1, 1)
    res = anomfast.evaluate(digits["logits"], digits["labels"], methods=["energy", "heat"], features=f, heat=stats)
    e, h = res["energy"], res["heat"]
    assert (h.auroc, h.ap, h.fpr95) != (e.auroc, e.ap, e.fpr95)
    assert h.auroc > 0.6, h.auroc  # a real detector, not noise
    maps = anomfast.score_maps(digits["logits"], methods=["heat"], features=f, heat=stats)["heat"]
    ref = ref_heat(digits["logits"], f, stats)
    assert bool(((maps.double() - ref).abs() <= tolerance(digits["logits"].double(), f, stats, ref)).all())
