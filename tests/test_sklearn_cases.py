"""scikit-learn's own known-answer cases (sklearn/metrics/tests/test_ranking.py: the
binary, unweighted toy data of roc_curve / roc_auc_score, precision_recall_curve /
average_precision_score, det_curve tie handling, constant scores), run through
evaluate_scores in both modes: the exact sort (exact=True) and the histogram
(default). The expected values are copied from those tests; the curves are also compared
with scikit-learn itself, live, on the same inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import anomfast

sk = pytest.importorskip("sklearn.metrics")

# (y_true, y_score, roc fpr, roc tpr, auroc) from test_roc_curve_toydata (its `tpr, fpr, _ =
# roc_curve(...)` unpacks fpr into "tpr"; here the names are the right way round)
ROC_CASES = [
    ([0, 1], [0, 1], [0, 0, 1], [0, 1, 1], 1.0),
    ([0, 1], [1, 0], [0, 1, 1], [0, 0, 1], 0.0),
    ([1, 0], [1, 1], [0, 1], [0, 1], 0.5),
    ([1, 0], [1, 0], [0, 0, 1], [0, 1, 1], 1.0),
    ([1, 0], [0.5, 0.5], [0, 1], [0, 1], 0.5),
]
# (y_true, y_score, precision, recall, AP) from test_precision_recall_curve_toydata
PR_CASES = [
    ([0, 1], [0, 1], [0.5, 1, 1], [1, 1, 0], 1.0),
    ([0, 1], [1, 0], [0.5, 0.0, 1.0], [1.0, 0.0, 0.0], 0.5),
    ([1, 0], [1, 1], [0.5, 1], [1.0, 0], 0.5),
    ([1, 0], [1, 0], [0.5, 1, 1], [1, 1, 0], 1.0),
    ([1, 0], [0.5, 0.5], [0.5, 1], [1, 0.0], 0.5),
    ([1, 1], [0.25, 0.75], [1.0, 1.0, 1.0], [1, 0.5, 0.0], 1.0),
]
# (y_true, y_score, det fpr, det fnr) from test_det_curve_tie_handling: det_curve keeps the
# thresholds up to the first with fpr 0 (from the lowest); each of its points must be a
# point of our ROC curve (fnr = 1 - tpr)
DET_TIE_CASES = [
    ([1, 0], [0.5, 0.5], [1, 0], [0, 1]),
    ([0, 1], [0.5, 0.5], [1, 0], [0, 1]),
    ([0, 0, 1], [0.25, 0.5, 0.5], [0.5, 0], [0, 1]),
    ([0, 1, 0], [0.25, 0.5, 0.5], [0.5, 0], [0, 1]),
    ([0, 1, 1], [0.25, 0.5, 0.5], [0], [0]),
    ([1, 0, 0], [0.25, 0.5, 0.5], [1, 1, 0], [0, 1, 1]),
    ([1, 0, 1], [0.25, 0.5, 0.5], [1, 1, 0], [0, 0.5, 1]),
    ([1, 1, 0], [0.25, 0.5, 0.5], [1, 1, 0], [0, 0.5, 1]),
]
MODES = [True, False]


def run(y, s, exact):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one-class inputs warn, as sklearn does
        return anomfast.evaluate_scores(np.asarray(s, np.float64), np.asarray(y, np.uint8), exact=exact)["custom"]


def assert_curves(ours, sklearn_live, known):
    """Our curve arrays equal scikit-learn's on the same input and its tests' known answers."""
    for a, b in zip(ours, sklearn_live):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ours, known):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("exact", MODES)
@pytest.mark.parametrize("kind,case", [("roc", c) for c in ROC_CASES] + [("pr", c) for c in PR_CASES])
def test_curve_toydata(kind, case, exact):
    y, s, c1, c2, area = case  # (fpr, tpr) or (precision, recall), then the area
    r = run(y, s, exact)
    if kind == "roc":
        assert r.auroc == area
        f, t, thr = r.roc_curve()
        sf, st, sthr = sk.roc_curve(y, s, drop_intermediate=False)
        # sklearn's first threshold is inf (>= 1.3); these small cases have no intermediate point to drop
        assert_curves((f, t, thr[1:]), (sf, st, sthr[1:]), (c1, c2))
    else:
        assert r.ap == area
        assert_curves(r.pr_curve(), sk.precision_recall_curve(y, s), (c1, c2))


@pytest.mark.parametrize("exact", MODES)
@pytest.mark.parametrize("case", DET_TIE_CASES)
def test_det_tie_handling_points_lie_on_our_roc(case, exact):
    y, s, fpr, fnr = case
    f, t, _ = run(y, s, exact).roc_curve()
    ours = set(zip(f.tolist(), (1 - t).tolist()))
    for point in zip(map(float, fpr), map(float, fnr)):
        assert point in ours, (point, sorted(ours))


@pytest.mark.parametrize("exact", MODES)
def test_average_precision_constant_values(exact):
    y = np.zeros(100, dtype=np.uint8)
    y[::4] = 1
    r = run(y, np.ones(100), exact)
    assert r.ap == 0.25 and r.auroc == 0.5
    # one tie group holding everything: FPR95 1 at threshold 1 (sklearn's first tpr >= 0.95)
    assert r.fpr95 == 1.0 and r.fpr95_threshold == 1.0
    assert r.f1 == pytest.approx(2 * 0.25 / 1.25, abs=1e-15) and r.threshold == 1.0


@pytest.mark.parametrize("exact", MODES)
def test_one_class_inputs(exact):
    """No positives / no negatives: scikit-learn's roc_auc_score gives NaN (with a
    warning); so do we, and FPR95 is NaN where it is undefined."""
    r = run([0, 0], [0.25, 0.75], exact)
    assert np.isnan(r.auroc) and np.isnan(r.fpr95)
    r = run([1, 1], [0.25, 0.75], exact)
    assert np.isnan(r.auroc) and r.ap == 1.0


@pytest.mark.parametrize("exact", MODES)
def test_score_scale_invariance(exact):
    """test_score_scale_invariance: AUROC and AP do not move when the scores are scaled up,
    down or shifted. Exact mode: any of these; histogram mode: scaling by powers of two
    (the bins are relative, so the same values share bins), with bounds that contain
    scikit-learn's value."""
    g = np.random.default_rng(0)
    y = (g.random(500) < 0.3).astype(np.uint8)
    s = g.random(500) + 0.5 * y
    base = run(y, s, exact)
    for t in (s * 128, s * 2.0 ** -20) + ((s - 8, s * 100, s * 1e-6) if exact else ()):
        r = run(y, t, exact)
        assert (r.auroc, r.ap) == (base.auroc, base.ap)
    want = {"auroc": sk.roc_auc_score(y, s), "ap": sk.average_precision_score(y, s)}
    for k, v in want.items():
        if exact:
            assert getattr(base, k) == pytest.approx(v, abs=1e-15)
        else:
            assert base.bounds[k][0] <= v <= base.bounds[k][1]
