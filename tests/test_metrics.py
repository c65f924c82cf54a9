"""Tests of anomfast.metrics: exact mode against scikit-learn, certified bounds of the
histogram mode against the unbinned metric (including adversarial within-bin orders),
degenerate cases and the alternative conventions."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
skm = pytest.importorskip("sklearn.metrics")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    import anomfast.metrics as M
except Exception:  # the package needs its C extension; metrics.py stands alone
    _path = Path(__file__).resolve().parents[1] / "anomfast" / "metrics.py"
    _spec = importlib.util.spec_from_file_location("anomfast_metrics_standalone", _path)
    M = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = M
    _spec.loader.exec_module(M)

TOL = 1e-9
FIVE = ("auroc", "ap", "fpr95", "f1", "threshold", "fpr95_threshold")


# ----------------------------------------------------------------------------- references

def ood_metrics_fpr(y, s, target=0.95):
    """ood_metrics.fpr_at_95_tpr (tayden/ood-metrics), generalized to any target."""
    fpr, tpr, _ = skm.roc_curve(y, s)
    if np.all(tpr < target):
        return 0.0
    if np.all(tpr >= target):
        return float(min(fpr[tpr >= target]))
    return float(np.interp(target, tpr, fpr))


def best_f1_bruteforce(y, s):
    """(best F1, its threshold) over every distinct score, highest threshold on ties,
    with exact rational comparison."""
    y = np.asarray(y, bool)
    P = int(y.sum())
    best, thr = Fraction(-1), None
    for t in np.unique(s)[::-1]:
        flag = s >= t
        tp = int((flag & y).sum())
        fp = int((flag & ~y).sum())
        f1 = Fraction(2 * tp, tp + fp + P)
        if f1 > best:
            best, thr = f1, float(t)
    return float(best), thr


def sk_reference(y, s, target=0.95):
    """Every metric, by scikit-learn / the packages' own definitions on raw scores."""
    y = np.asarray(y).astype(int)
    s = np.asarray(s, np.float64)
    out = {}
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    out["auroc"] = skm.roc_auc_score(y, s)
    out["ap"] = skm.average_precision_score(y, s)
    out["fpr_first"] = float(fpr[np.argmax(tpr >= target)])
    out["fpr_strict"] = float(fpr[np.argmax(tpr > target)]) if target < 1 else math.nan
    out["fpr_interp"] = ood_metrics_fpr(y, s, target)
    prec, rec, thr = skm.precision_recall_curve(y, s)
    out["ap_trap"] = skm.auc(rec, prec)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    out["f1"] = float(np.max(f1[:-1]))
    return out


def metrics(y, s, **kw):
    return M.metrics_from_groups(*M.groups_from_scores(s, y), **kw)


def check_exact_equals_sklearn(y, s, target=0.95):
    ref = sk_reference(y, s, target)
    modes = {"first": "fpr_first", "interp": "fpr_interp"}
    if target < 1:
        modes["strict"] = "fpr_strict"
    for fm, key in modes.items():
        r = metrics(y, s, exact=True, fpr_mode=fm, tpr_target=target)
        assert r.fpr95 == pytest.approx(ref[key], abs=TOL), fm
        assert r.bounds["fpr95"] == (r.fpr95, r.fpr95)
    r = metrics(y, s, exact=True, tpr_target=target)
    assert r.auroc == pytest.approx(ref["auroc"], abs=TOL)
    assert r.ap == pytest.approx(ref["ap"], abs=TOL)
    assert r.f1 == pytest.approx(ref["f1"], abs=TOL)
    f1_bf, thr_bf = best_f1_bruteforce(y, s)
    assert r.f1 == pytest.approx(f1_bf, abs=TOL)
    assert r.threshold == thr_bf
    for k in FIVE:
        assert r.bounds[k] == (getattr(r, k), getattr(r, k)), k
    rt = metrics(y, s, exact=True, ap_mode="trapezoid")
    assert rt.ap == pytest.approx(ref["ap_trap"], abs=TOL)
    assert r.exact and (len(np.unique(s)) == 1 or not r.warnings)


# ----------------------------------------------------------------------------- exact mode

def _data(kind, n, rng):
    if kind == "ties":
        y = rng.random(n) < 0.3
        s = np.round(rng.normal(size=n) + y, 0)
    elif kind == "few":
        y = rng.random(n) < 0.5
        s = rng.integers(0, 3, n).astype(float) + 0.5 * y * (rng.random(n) < 0.5)
    elif kind == "continuous":
        y = rng.random(n) < 0.2
        s = rng.normal(size=n) + 1.5 * y
    else:  # imbalanced, 1% positives
        y = rng.random(n) < 0.01
        y[rng.integers(0, n)] = True
        s = np.round(rng.normal(size=n) + 2 * y, 2)
    y[0], y[1] = True, False
    return y, s


@pytest.mark.parametrize("kind", ["ties", "few", "continuous", "imbalanced"])
@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_sklearn(kind, seed):
    rng = np.random.default_rng(seed)
    y, s = _data(kind, 3000 if kind == "imbalanced" else 400, rng)
    check_exact_equals_sklearn(y, s)
    check_exact_equals_sklearn(y, s, target=0.5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40),
       st.sampled_from([0.95, 0.5, 0.8, 1.0, 0.3]))
def test_exact_matches_sklearn_hypothesis(pix, target):
    s = np.array([p[0] for p in pix], float)
    y = np.array([p[1] for p in pix], bool)
    if y.all() or not y.any():
        return
    check_exact_equals_sklearn(y, s, target)


def test_curves_match_sklearn():
    rng = np.random.default_rng(5)
    y, s = _data("ties", 500, rng)
    r = metrics(y, s, exact=True)
    fpr, tpr, thr = r.roc_curve()
    efpr, etpr, ethr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr, atol=1e-12)
    np.testing.assert_allclose(tpr, etpr, atol=1e-12)
    assert thr[0] == np.inf and np.array_equal(thr[1:], ethr[1:])
    prec, rec, pthr = r.pr_curve()
    eprec, erec, epthr = skm.precision_recall_curve(y, s)
    np.testing.assert_allclose(prec, eprec, atol=1e-12)
    np.testing.assert_allclose(rec, erec, atol=1e-12)
    np.testing.assert_array_equal(pthr, epthr)


def test_groups_from_scores():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=5000), 1)
    y = (rng.random(5000) < 0.1).astype(np.int64)
    pos, neg, lo, hi = M.groups_from_scores(s, y)
    u = np.unique(s)[::-1]
    np.testing.assert_array_equal(lo, u)
    np.testing.assert_array_equal(hi, u)
    np.testing.assert_array_equal(pos, [int(((s == v) & (y == 1)).sum()) for v in u])
    np.testing.assert_array_equal(neg, [int(((s == v) & (y == 0)).sum()) for v in u])
    assert pos.dtype == np.int64 and neg.dtype == np.int64 and lo.dtype == np.float64
    p32 = M.groups_from_scores(s.astype(np.float32), y.astype(bool))
    assert p32[0].sum() == pos.sum() and p32[2].dtype == np.float64
    assert [len(a) for a in M.groups_from_scores([], [])] == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        M.groups_from_scores([1.0, np.nan], [0, 1])
    with pytest.raises(ValueError):
        M.groups_from_scores([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError):
        M.groups_from_scores([1.0, 2.0], [0])
    # +-inf are ordinary extreme values
    r = metrics(np.array([1, 0, 0]), np.array([np.inf, 0.0, -np.inf]), exact=True)
    assert r.auroc == 1.0 and r.threshold == np.inf


# ----------------------------------------------------------------------------- histogram mode

def binned_groups(s, y, K):
    """Groups of the bins floor(s*K), descending; thr_lo/thr_hi = bin edges."""
    b = np.floor(s * K).astype(np.int64)
    ub = np.unique(b)[::-1]
    pos = np.array([int(((b == v) & y).sum()) for v in ub], np.int64)
    neg = np.array([int(((b == v) & ~y).sum()) for v in ub], np.int64)
    return pos, neg, ub / K, (ub + 1) / K


def check_in_bounds(y, s, groups, target=0.95):
    """The metric of the raw scores lies in each certified bound, all conventions."""
    y = np.asarray(y, bool)
    ref = sk_reference(y, s, target)
    pos, neg, lo, hi = groups
    modes = [("first", "step"), ("interp", "trapezoid")] + ([("strict", "step")] if target < 1 else [])
    for fm, am in modes:
        r = M.metrics_from_groups(pos, neg, lo, hi, exact=False, fpr_mode=fm, ap_mode=am, tpr_target=target)
        for k in ("auroc", "ap", "fpr95", "f1"):
            low, high = r.bounds[k]
            v = getattr(r, k)
            assert low <= v <= high, (k, low, v, high)
        assert r.bounds["auroc"][0] - 1e-12 <= ref["auroc"] <= r.bounds["auroc"][1] + 1e-12
        apref = ref["ap"] if am == "step" else ref["ap_trap"]
        assert r.bounds["ap"][0] - 1e-12 <= apref <= r.bounds["ap"][1] + 1e-12, (am, r.bounds["ap"], apref)  # sklearn can round to 1 + 2e-16
        fref = ref[f"fpr_{fm}"]
        assert r.bounds["fpr95"][0] <= fref <= r.bounds["fpr95"][1], (fm, r.bounds["fpr95"], fref)
        assert r.bounds["f1"][0] - 1e-12 <= ref["f1"] <= r.bounds["f1"][1] + 1e-12, (r.bounds["f1"], ref["f1"])
        tl, th = r.bounds["threshold"]
        assert tl <= r.threshold <= th
        g = int(np.flatnonzero(lo == r.threshold)[0])
        assert tl <= lo[g] and hi[g] <= th  # the best group's interval, and the others that may hold the best
        assert tl in lo and th in hi  # a hull of whole groups
        assert tl <= best_f1_threshold(y, s) <= th, (r.bounds["threshold"], best_f1_threshold(y, s))
    return r


def best_f1_threshold(y, s):
    """The threshold of the best F1 over the distinct raw scores (ties -> the highest)."""
    o = np.argsort(-s, kind="stable")
    ss, yy = s[o], np.asarray(y, np.int64)[o]
    tp, fp = np.cumsum(yy), np.cumsum(1 - yy)
    last = np.r_[ss[1:] != ss[:-1], True]
    f1 = 2.0 * tp[last] / (tp[last] + fp[last] + yy.sum())
    return float(ss[last][int(np.argmax(f1))])


@pytest.mark.parametrize("K", [1, 2, 5, 20, 100, 1000])
@pytest.mark.parametrize("seed", range(3))
def test_histogram_bounds_contain_exact(K, seed):
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.random(n) < 0.1
    s = rng.normal(size=n) * 0.3 + 0.5 + 0.3 * y
    check_in_bounds(y, s, binned_groups(s, y, K))
    check_in_bounds(y, s, binned_groups(s, y, K), target=0.5)


def _arranged_scores(counts, arrangement, offsets=None):
    """Raw scores for bins (descending) with a chosen within-bin arrangement. Bin g
    covers [base_g, base_g + 10); returns (y, s, groups)."""
    ys, ss = [], []
    nb = len(counts)
    lo = np.array([10.0 * (nb - g) for g in range(nb)])
    it = iter(offsets or [])
    for g, (p, n) in enumerate(counts):
        base = lo[g]
        if arrangement == "pos_first":
            sp = base + 5 + np.arange(p) * 0.1
            sn = base + 1 + np.arange(n) * 0.1
        elif arrangement == "neg_first":
            sp = base + 1 + np.arange(p) * 0.1
            sn = base + 5 + np.arange(n) * 0.1
        elif arrangement == "tied":
            sp = np.full(p, base + 3.0)
            sn = np.full(n, base + 3.0)
        elif arrangement == "pos_tied_first":
            sp = np.full(p, base + 5.0)
            sn = base + 1 + np.arange(n) * 0.1
        else:  # explicit small offsets (ties and interleavings)
            sp = base + np.array([next(it) for _ in range(p)], float)
            sn = base + np.array([next(it) for _ in range(n)], float)
        ys += [True] * p + [False] * n
        ss += list(sp) + list(sn)
    pos = np.array([c[0] for c in counts], np.int64)
    neg = np.array([c[1] for c in counts], np.int64)
    return np.array(ys, bool), np.array(ss), (pos, neg, lo, lo + 9.9)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_histogram_bounds_adversarial(data):
    counts = data.draw(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=7))
    P, N = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if P == 0 or N == 0:
        return
    arrangement = data.draw(st.sampled_from(["pos_first", "neg_first", "tied", "pos_tied_first", "random"]))
    offsets = None
    if arrangement == "random":
        offsets = data.draw(st.lists(st.integers(0, 4), min_size=P + N, max_size=P + N))
    target = data.draw(st.sampled_from([0.95, 0.5, 0.75, 1.0, 0.2]))
    y, s, groups = _arranged_scores(counts, arrangement, offsets)
    r = check_in_bounds(y, s, groups, target)
    # the reported F1 is attained by the reported threshold on the raw scores
    flag = s >= r.threshold
    tp = int((flag & y).sum())
    assert r.f1 == pytest.approx(2 * tp / (int(flag.sum()) + P), abs=1e-12)


def test_bounds_are_attained():
    """Extreme within-bin orders attain the AUROC, step-AP, FPR and F1 bound ends."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        counts = [(int(rng.integers(0, 6)), int(rng.integers(0, 6))) for _ in range(int(rng.integers(1, 6)))]
        if sum(c[0] for c in counts) == 0 or sum(c[1] for c in counts) == 0:
            continue
        yp, sp, groups = _arranged_scores(counts, "pos_first")
        yn, sn, _ = _arranged_scores(counts, "neg_first")
        yt, st_, _ = _arranged_scores(counts, "pos_tied_first")
        r = M.metrics_from_groups(*groups)
        assert r.bounds["auroc"][1] == pytest.approx(skm.roc_auc_score(yp, sp), abs=1e-10)
        assert r.bounds["auroc"][0] == pytest.approx(skm.roc_auc_score(yn, sn), abs=1e-10)
        assert r.bounds["ap"][0] == pytest.approx(skm.average_precision_score(yn, sn), abs=1e-10)
        assert r.bounds["ap"][1] == pytest.approx(skm.average_precision_score(yt, st_), abs=1e-10)
        assert r.bounds["fpr95"][0] == pytest.approx(sk_reference(yp, sp)["fpr_first"], abs=1e-10)
        assert r.bounds["fpr95"][1] == pytest.approx(sk_reference(yn, sn)["fpr_first"], abs=1e-10)
        assert r.bounds["f1"][1] == pytest.approx(sk_reference(yt, st_)["f1"], abs=1e-10)


def test_tied_bins_value_equals_exact():
    """Bins whose pixels are exactly tied: the histogram point values (tie semantics)
    equal the exact metric for auroc, ap and f1."""
    rng = np.random.default_rng(4)
    counts = [(int(rng.integers(0, 20)), int(rng.integers(0, 50))) for _ in range(30)]
    y, s, groups = _arranged_scores(counts, "tied")
    r = M.metrics_from_groups(*groups)
    ref = sk_reference(y, s)
    for k in ("auroc", "ap", "f1"):
        assert getattr(r, k) == pytest.approx(ref[k], abs=TOL)


def test_fine_bins_close_to_exact():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(0, 1, 200_000), rng.normal(2, 1, 2_000)])
    y = np.concatenate([np.zeros(200_000, bool), np.ones(2_000, bool)])
    K = 2 ** 16
    smin, smax = s.min(), s.max()
    b = np.minimum(np.floor((s - smin) / (smax - smin) * K), K - 1).astype(np.int64)
    cp = np.bincount(b[y], minlength=K)
    cn = np.bincount(b[~y], minlength=K)
    idx = np.arange(K)[::-1]
    lo = smin + idx * (smax - smin) / K
    hi = smin + (idx + 1) * (smax - smin) / K
    ref = sk_reference(y, s)
    for fm, am in (("first", "step"), ("interp", "trapezoid"), ("strict", "step")):
        r = M.metrics_from_groups(cp[idx], cn[idx], lo, hi, fpr_mode=fm, ap_mode=am)
        assert abs(r.auroc - ref["auroc"]) < 1e-4
        assert abs(r.ap - ref["ap" if am == "step" else "ap_trap"]) < 1e-4
        assert abs(r.fpr95 - ref[f"fpr_{fm}"]) < 1e-4
        assert abs(r.f1 - ref["f1"]) < 1e-4
        for k in ("auroc", "ap", "fpr95", "f1"):
            assert r.bounds[k][1] - r.bounds[k][0] < 0.05, k
        assert r.bounds["auroc"][0] - 1e-12 <= ref["auroc"] <= r.bounds["auroc"][1] + 1e-12
        assert r.bounds["fpr95"][0] - 1e-12 <= ref[f"fpr_{fm}"] <= r.bounds["fpr95"][1] + 1e-12


def test_histogram_fpr_point_value_formula():
    # one crossing group: a = 0, f = 0, p = 20, n = 10, P = 20 -> k = 19, value = 19*10/21/N
    r = M.metrics_from_groups([20, 0], [10, 5], [1.0, 0.0], [2.0, 0.5])
    assert r.fpr95 == pytest.approx(19 * 10 / 21 / 15)
    assert r.bounds["fpr95"][0] == pytest.approx(0.0, abs=1e-11)
    assert r.bounds["fpr95"][1] == pytest.approx(10 / 15, abs=1e-11)
    rs = M.metrics_from_groups([20, 0], [10, 5], [1.0, 0.0], [2.0, 0.5], fpr_mode="strict")
    assert rs.fpr95 == pytest.approx(20 * 10 / 21 / 15)


# ----------------------------------------------------------------------------- AP bound math

def test_harmonic_diff_accuracy():
    cases = [(0, 1), (0, 9), (0, 10), (0, 11), (3, 500), (8, 1), (9, 1), (9, 7), (10, 3), (50, 10_000),
             (0, 300_000), (12345, 1), (10 ** 9, 3), (10 ** 12, 100_000), (2 ** 40, 2 ** 20), (7, 2 ** 21)]
    K = np.array([c[0] for c in cases], np.int64)
    p = np.array([c[1] for c in cases], np.int64)
    got = M._harmonic_diff(K, p)
    for (k, q), g in zip(cases, got):
        ref = math.fsum(1.0 / (k + j) for j in range(1, q + 1))
        assert g == pytest.approx(ref, rel=1e-13, abs=1e-300), (k, q)


def test_ap_lower_terms_exact_fractions():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 40, 300)
    f = rng.integers(0, 40, 300)
    p = rng.integers(0, 40, 300)
    n = rng.integers(0, 40, 300)
    got = M._ap_step_lower_terms(a, f, p, n)
    for i in range(300):
        K = int(a[i] + f[i] + n[i])
        ref = sum(Fraction(int(a[i]) + j, K + j) for j in range(1, int(p[i]) + 1)) if K + p[i] > 0 else 0
        assert got[i] == pytest.approx(float(ref), rel=1e-13, abs=1e-13)
    big = M._ap_step_lower_terms(np.array([5, 0]), np.array([10 ** 9, 10 ** 7]), np.array([100_000, 3000]),
                                 np.array([7, 0]))
    for (aa, ff, pp, nn), g in zip([(5, 10 ** 9, 100_000, 7), (0, 10 ** 7, 3000, 0)], big):
        ref = math.fsum((aa + j) / (aa + ff + nn + j) for j in range(1, pp + 1))
        assert g == pytest.approx(ref, rel=1e-12)


# ----------------------------------------------------------------------------- degenerate cases

def test_no_positives():
    with pytest.warns(RuntimeWarning):
        r = M.metrics_from_groups([0, 0], [3, 4], [2.0, 1.0], [2.0, 1.0], exact=True)
    for k in ("auroc", "ap", "fpr95"):
        assert math.isnan(getattr(r, k)) and all(math.isnan(b) for b in r.bounds[k])
    assert r.f1 == 0.0 and r.threshold == math.inf and r.bounds["threshold"] == (math.inf, math.inf)
    assert r.warnings and r.n_pos == 0 and r.n_neg == 7


def test_no_negatives():
    with pytest.warns(RuntimeWarning):
        r = M.metrics_from_groups([1] * 10, [0] * 10, np.arange(10.0)[::-1], np.arange(10.0)[::-1], exact=True)
    assert r.ap == 1.0 and r.bounds["ap"] == (1.0, 1.0) and r.f1 == 1.0 and r.threshold == 0.0
    with pytest.warns(RuntimeWarning):
        r = M.metrics_from_groups([2, 3], [0, 0], [2.0, 1.0], [2.5, 1.5])
    assert math.isnan(r.auroc) and math.isnan(r.fpr95)
    assert r.ap == 1.0 and r.f1 == 1.0 and r.threshold == 1.0
    assert r.bounds["ap"][0] <= 1.0 <= r.bounds["ap"][1]
    assert r.warnings


def test_empty_input():
    with pytest.warns(RuntimeWarning):
        r = metrics(np.zeros(0, bool), np.zeros(0))
    assert math.isnan(r.auroc) and math.isnan(r.ap) and math.isnan(r.fpr95)
    assert r.f1 == 0.0 and r.threshold == math.inf
    assert any("no valid pixels" in w for w in r.warnings)
    with pytest.warns(RuntimeWarning):
        r = M.metrics_from_groups([0, 0], [0, 0], [1.0, 0.0], [1.0, 0.0])  # empty groups only
    assert r.n_pos == 0 and r.n_neg == 0


@pytest.mark.parametrize("label", [0, 1])
def test_single_pixel(label):
    with pytest.warns(RuntimeWarning):
        r = metrics(np.array([label]), np.array([0.7]), exact=True)
    if label:
        assert r.ap == 1.0 and r.f1 == 1.0 and r.threshold == 0.7
    else:
        assert math.isnan(r.ap) and r.f1 == 0.0 and r.threshold == math.inf
    assert math.isnan(r.auroc) and math.isnan(r.fpr95)


def test_all_equal_scores():
    y = np.array([1, 1, 0, 0, 0, 0, 0], bool)
    s = np.full(7, 0.3)
    r = metrics(y, s, exact=True)
    assert r.auroc == 0.5 and r.ap == pytest.approx(2 / 7) and r.fpr95 == 1.0
    assert r.f1 == pytest.approx(4 / 9) and r.threshold == 0.3
    check_exact_equals_sklearn(y, s)
    h = M.metrics_from_groups([2], [5], [0.0], [1.0])
    assert h.auroc == 0.5 and h.bounds["auroc"] == (0.0, 1.0)
    assert h.fpr95 == pytest.approx(2 * 5 / 3 / 5)  # k = 2 of p = 2 positives, n = 5
    assert h.bounds["fpr95"] == (0.0, 1.0)
    assert h.f1 == pytest.approx(4 / 9) and h.bounds["threshold"] == (0.0, 1.0)


def test_input_validation():
    with pytest.raises(ValueError):
        M.metrics_from_groups([1], [1, 2], [0.0], [0.0])
    with pytest.raises(ValueError):
        M.metrics_from_groups([-1], [1], [0.0], [0.0])
    with pytest.raises(ValueError):
        M.metrics_from_groups([1, 1], [1, 1], [0.0, 1.0], [0.0, 1.0])  # ascending
    with pytest.raises(ValueError):
        M.metrics_from_groups([1], [1], [0.0], [0.0], fpr_mode="nope")
    with pytest.raises(ValueError):
        M.metrics_from_groups([1], [1], [0.0], [0.0], ap_mode="nope")
    with pytest.raises(ValueError):
        M.metrics_from_groups([1], [1], [0.0], [0.0], fpr_mode="strict", tpr_target=1.0)
    with pytest.raises(ValueError):
        M.metrics_from_groups([1], [1], [0.0], [0.0], tpr_target=0.0)


def test_empty_groups_are_ignored():
    rng = np.random.default_rng(7)
    y, s = _data("ties", 300, rng)
    pos, neg, lo, hi = M.groups_from_scores(s, y)
    a = M.metrics_from_groups(pos, neg, lo, hi)
    ins = np.arange(len(pos))
    z = M.metrics_from_groups(np.insert(pos, ins, 0), np.insert(neg, ins, 0), np.insert(lo, ins, lo),
                              np.insert(hi, ins, hi))
    for k in FIVE:
        assert getattr(a, k) == getattr(z, k) and a.bounds[k] == z.bounds[k]


# ----------------------------------------------------------------------------- result object

def test_result_object():
    rng = np.random.default_rng(8)
    y, s = _data("ties", 300, rng)
    r = metrics(y, s)
    r.method, r.params = "msp", {"T": np.float32(1.5)}
    d = r.as_dict()
    json.dumps(d, allow_nan=False)
    assert set(d["bounds"]) == set(FIVE) and d["method"] == "msp"
    rep = repr(r)
    assert rep.startswith("MetricResult('msp'") and len(rep) < 400
    with pytest.warns(RuntimeWarning):
        e = M.metrics_from_groups([0], [2], [1.0], [1.0])
    de = e.as_dict()
    json.dumps(de, allow_nan=False)
    assert de["auroc"] is None and de["threshold"] == "inf" and float(de["threshold"]) == math.inf
    assert isinstance(r.definitions, dict) and all(isinstance(v, str) for v in r.definitions.values())
    r.definitions["extra"] = "x"  # per-result dict
    assert "extra" not in metrics(y, s).definitions


def test_mean_over_images():
    rng = np.random.default_rng(9)
    rs = []
    for i in range(4):
        y, s = _data("continuous", 200, rng)
        rs.append(metrics(y, s))
    with pytest.warns(RuntimeWarning):
        rs.append(M.metrics_from_groups([0], [5], [1.0], [1.0]))  # no anomalies
    m = M.mean_over_images(rs)
    for k in ("auroc", "ap", "fpr95", "f1"):
        assert getattr(m, k) == pytest.approx(np.mean([getattr(r, k) for r in rs[:4]]))
        assert m.bounds[k][0] == pytest.approx(np.mean([r.bounds[k][0] for r in rs[:4]]))
        assert m.bounds[k][0] <= getattr(m, k) <= m.bounds[k][1]
    assert math.isnan(m.threshold) and m.warnings
    assert m.n_pos == sum(r.n_pos for r in rs)
    with pytest.raises(ValueError):
        m.roc_curve()
    with pytest.warns(RuntimeWarning):
        empty = M.mean_over_images([])
    assert math.isnan(empty.auroc)


def test_one_million_groups():
    """Histogram-scale input (10^6 groups, as many as bins): every convention finalizes
    with consistent bounds (its time is measured in bench/, never asserted here)."""
    rng = np.random.default_rng(0)
    G = 1_000_000
    pos = rng.poisson(0.3, G).astype(np.int64)
    neg = rng.poisson(30, G).astype(np.int64)
    pos[0] = 1
    lo = -np.arange(G, dtype=np.float64)
    for am in M.AP_MODES:
        r = M.metrics_from_groups(pos, neg, lo, lo + 0.5, ap_mode=am, fpr_mode="interp")
        for k in ("auroc", "ap", "fpr95", "f1"):
            assert r.bounds[k][0] <= getattr(r, k) <= r.bounds[k][1], (am, k)
        assert 0.0 < r.auroc < 1.0


def test_large_counts_no_overflow():
    big = 2 ** 60
    r = M.metrics_from_groups(np.array([big, 1, 0], np.int64), np.array([1, big, 3], np.int64),
                              [3.0, 2.0, 1.0], [3.0, 2.0, 1.0])
    assert 0.99 < r.auroc <= 1.0 and 0.99 < r.ap <= 1.0
    for k in ("auroc", "ap", "fpr95", "f1"):
        assert r.bounds[k][0] <= getattr(r, k) <= r.bounds[k][1]


def test_tie_groups_in_histogram_mode_are_exact():
    """A histogram group known to hold one value (thr_lo == thr_hi, or tied=True) is a real
    tie: every metric equals scikit-learn's and every bound collapses; the same table
    with tied=False gets the interleaving point value and honest, wider bounds."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    g = np.random.default_rng(5)
    s = np.round(g.normal(size=50_000), 1)
    y = g.random(s.size) < 0.15 + 0.3 * (s > 1)
    pos, neg, lo, hi = M.groups_from_scores(s, y)
    ex = M.metrics_from_groups(pos, neg, lo, hi, exact=True)
    ht = M.metrics_from_groups(pos, neg, lo, hi, exact=False)  # lo == hi: tie groups
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    i = int(np.argmax(tpr >= 0.95))
    assert ht.fpr95 == fpr[i] and ht.fpr95_threshold == thr[i] == ex.fpr95_threshold
    assert ht.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ht.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    for k in FIVE:
        assert getattr(ht, k) == pytest.approx(getattr(ex, k), abs=1e-12), k
        lo_k, hi_k = ht.bounds[k]
        assert hi_k - lo_k <= 3e-12, (k, ht.bounds[k])
    un = M.metrics_from_groups(pos, neg, lo, hi, exact=False, tied=np.zeros(pos.size, bool))
    assert un.bounds["fpr95"][1] - un.bounds["fpr95"][0] > 1e-3
    assert un.bounds["fpr95"][0] <= ht.fpr95 <= un.bounds["fpr95"][1]
    assert un.bounds["auroc"][0] <= ht.auroc <= un.bounds["auroc"][1]
    assert un.bounds["ap"][0] <= ht.ap <= un.bounds["ap"][1]
    assert un.bounds["f1"][0] <= ht.f1 <= un.bounds["f1"][1]


def test_mean_iou_one_definition():
    """mIoU over the classes in the ground truth or the prediction: a class predicted but
    absent from the ground truth counts with IoU 0 (the runner once left it out, while
    the demo counted it); a class in neither is left out."""
    from anomfast.metrics import mean_iou
    cm = np.array([[5, 1, 0], [0, 0, 0], [0, 0, 0]])  # class 1 predicted once, never in the truth
    m, iou = mean_iou(cm)
    assert iou == [5 / 6, 0.0, None] and m == pytest.approx((5 / 6 + 0.0) / 2)
    assert mean_iou(np.zeros((2, 2))) == (None, [None, None])
