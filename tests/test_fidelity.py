"""Fidelity on the regimes real networks produce, at >= 1M pixels, against exact
scikit-learn metrics on float64 scores computed without cancellation:

* confident 19-class networks (logit margins 20-60, up to 80),
* bf16 / fp16 logits (ties from the low precision),
* a saturated 2-class network (most max logits exactly 0: a huge exact tie),
* rounded logits (heavy ties everywhere).

Default (histogram) metrics must lie within 1e-4 of exact and inside their certified
bounds; on the confident cases every bound is at most 1e-3 wide. With refine=True, every
metric and both thresholds equal scikit-learn's on the exact float64 scores.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn.metrics")

import anomfast  # noqa: E402

METHODS = ("max_logit", "msp", "energy", "entropy")
H, W = 1000, 1000  # 1M pixels


def exact_scores(logits: np.ndarray) -> dict:
    """float64 scores (N pixels, C classes), without cancellation: msp ranked by
    u = 1 - max softmax = S / (1 + S), S = sum_{c != k} e^(l_c - m)."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    k = x.argmax(axis=1)
    d = x - m
    e = np.exp(d)
    e[np.arange(x.shape[0]), k] = 0.0
    S = e.sum(axis=1)
    ent = np.log1p(S) - (e * d).sum(axis=1) / (1.0 + S)
    return {"max_logit": -m[:, 0], "msp": S / (1.0 + S), "energy": -(m[:, 0] + np.log1p(S)), "entropy": ent}


def sk_metrics(score: np.ndarray, y: np.ndarray) -> dict:
    """scikit-learn's AUROC and AP; FPR95 (first point with TPR >= 0.95) and best F1
    (highest threshold among equal maxima) with their thresholds, from roc_curve."""
    fpr, tpr, thr = sklearn.roc_curve(y, score, drop_intermediate=False)
    P, N = int(y.sum()), int((~y).sum())
    i = int(np.argmax(tpr >= 0.95))
    tps, fps = tpr[1:] * P, fpr[1:] * N
    f1 = 2 * tps / (tps + fps + P)
    b = int(np.argmax(f1))
    return {"auroc": sklearn.roc_auc_score(y, score), "ap": sklearn.average_precision_score(y, score),
            "fpr95": fpr[i], "fpr95_threshold": thr[i], "f1": f1[b], "threshold": thr[1:][b]}


def confident(rng, n, C=19, lo=20.0, hi=60.0):
    """Logits of a confident segmentation network: the winner ahead by a margin in [lo, hi];
    anomalies (label 1) are more often the less confident pixels."""
    margin = rng.uniform(lo, hi, n).astype(np.float32)
    x = rng.normal(0.0, 3.0, (n, C)).astype(np.float32)
    k = rng.integers(0, C, n)
    x[np.arange(n), k] = x.max(axis=1) + margin
    p_anom = 0.02 + 0.5 * (margin < lo + 0.25 * (hi - lo))
    y = rng.random(n) < p_anom
    return x, y


def saturated(rng, n):
    """A 2-class detector: 87% of the pixels have max logit exactly 0 (the other class far
    below), the rest ordinary logits."""
    x = rng.normal(0.0, 2.0, (n, 2)).astype(np.float32)
    sat = rng.random(n) < 0.87
    x[sat, 0] = 0.0
    x[sat, 1] = -rng.uniform(5.0, 60.0, int(sat.sum())).astype(np.float32)
    y = rng.random(n) < np.where(sat, 0.05, 0.4)
    return x, y


def rounded(rng, n, C=19):
    x, y = confident(rng, n, C, 2.0, 12.0)
    return np.round(x * 2.0) / 2.0, y


CASES = {
    "margins20-60": lambda rng: confident(rng, H * W),
    "margins40-80": lambda rng: confident(rng, H * W, lo=40.0, hi=80.0),
    "bf16": lambda rng: confident(rng, H * W, lo=2.0, hi=30.0),
    "fp16": lambda rng: confident(rng, H * W, lo=2.0, hi=30.0),
    "saturated-2class": lambda rng: saturated(rng, H * W),
    "rounded": lambda rng: rounded(rng, H * W),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONFIDENT = ("margins20-60", "margins40-80")
# Energy of quantized logits piles up: most pixels have energy = -m - log1p(S) with m on a
# coarse grid (bf16: 8 bits) and log1p(S) of 1e-9 .. 1e-4 |m|, so thousands of distinct
# exact scores share one bin of relative width 2^-13 and their order inside it is lost
# (float32 itself rounds many of them to -m). There the default point values can be
# 1e-4 .. 4e-4 away from exact (AUROC, AP, FPR95); they stay inside the certified bound,
# and refine=True makes every metric exact. Every other (case, method) meets 1e-4.
PILE_UPS = {("bf16", "energy"), ("rounded", "energy")}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    rng = np.random.default_rng(zlib.crc32(request.param.encode()))
    x, y = CASES[request.param](rng)
    t = torch.from_numpy(x)
    if request.param in DTYPES:
        t = t.to(DTYPES[request.param])
        x = t.float().numpy()  # the exact reference sees the logits the network gave
    logits = t.T.reshape(1, x.shape[1], H, W).contiguous()
    labels = torch.from_numpy(y.reshape(1, H, W).astype(np.uint8))
    return request.param, x, y, logits, labels


def test_default_within_1e4_of_exact_and_inside_bounds(case):
    name, x, y, logits, labels = case
    res = anomfast.evaluate(logits, labels, methods=METHODS)
    ex = exact_scores(x)
    for m in METHODS:
        want = sk_metrics(ex[m], y)
        r = res[m]
        for k in ("auroc", "ap", "fpr95", "f1"):
            got = getattr(r, k)
            lo, hi = r.bounds[k]
            tol = 0.5 * (hi - lo) if (name, m) in PILE_UPS else 1e-4
            assert abs(got - want[k]) <= tol, (name, m, k, got, want[k])
            assert lo <= want[k] <= hi, (name, m, k, want[k], r.bounds[k])
            if name in CONFIDENT:
                assert hi - lo <= 1e-3, (name, m, k, r.bounds[k])


def test_refine_equals_sklearn_on_exact_scores(case):
    """refine=True: every metric and both thresholds equal scikit-learn's on the exact
    float64 scores (the pixels of the decisive bins and of every bin that widens the
    AUROC / AP bounds are re-scored in float64; 1M pixels fit REFINE_AREA_PIXELS), whatever
    the pile-ups and float32 ties (the energy of bf16 / rounded logits included); AUROC
    and AP bounds contain the exact value and are at most 1e-8 wide."""
    name, x, y, logits, labels = case
    res = anomfast.evaluate(logits, labels, methods=METHODS, refine=True)
    ex = exact_scores(x)
    for m in METHODS:
        want = sk_metrics(ex[m], y)
        r = res[m]
        for k in ("auroc", "ap", "fpr95", "f1"):
            assert abs(getattr(r, k) - want[k]) <= 1e-9, (name, m, k, getattr(r, k), want[k])
        for k in ("threshold", "fpr95_threshold"):
            # relative: msp's thresholds are u = 1 - max softmax, down to 1e-30 on confident pixels
            assert abs(getattr(r, k) - want[k]) <= 1e-9 * abs(want[k]), (name, m, k, getattr(r, k), want[k])
        for k in ("auroc", "ap"):
            lo, hi = r.bounds[k]
            assert lo <= want[k] <= hi, (name, m, k, want[k], r.bounds[k])
            assert hi - lo <= 1e-8, (name, m, k, r.bounds[k])
        assert "refine" in r.definitions


def test_refine_within_a_pixel_budget_keeps_honest_bounds(monkeypatch):
    """When the bins that widen AUROC / AP hold more pixels than REFINE_AREA_PIXELS, refine
    re-scores the chains that narrow them most and leaves the rest as open groups: the
    bounds contain the exact value at every budget and narrow as the budget grows; FPR95
    and F1 are exact at every budget."""
    from anomfast import functional
    rng = np.random.default_rng(7)
    t = torch.from_numpy(confident(rng, 400 * 500, lo=2.0, hi=30.0)[0]).to(torch.bfloat16)
    x = t.float().numpy()
    y = rng.random(x.shape[0]) < 0.02 + 0.5 * (x.max(1) - np.sort(x, 1)[:, -2] < 9.0)
    logits = t.T.reshape(1, x.shape[1], 400, 500).contiguous()
    labels = torch.from_numpy(y.reshape(1, 400, 500).astype(np.uint8))
    ex = exact_scores(x)
    want = {m: sk_metrics(ex[m], y) for m in METHODS}
    widths = []
    for budget in (0, 5_000, 50_000, 400_000):
        monkeypatch.setattr(functional, "REFINE_AREA_PIXELS", budget * len(METHODS))
        res = anomfast.evaluate(logits, labels, methods=METHODS, refine=True)
        for m in METHODS:
            r = res[m]
            for k in ("auroc", "ap"):
                lo, hi = r.bounds[k]
                assert lo <= want[m][k] <= hi, (budget, m, k, want[m][k], r.bounds[k])
            for k in ("fpr95", "f1"):
                assert abs(getattr(r, k) - want[m][k]) <= 1e-9, (budget, m, k, getattr(r, k), want[m][k])
        widths.append([res[m].bounds[k][1] - res[m].bounds[k][0] for m in METHODS for k in ("auroc", "ap")])
    w = np.array(widths)
    assert (np.diff(w, axis=0) <= 1e-12).all(), w
    assert w[-1].max() <= 1e-8 < w[0].max(), w  # the whole image fits the last budget


@pytest.mark.parametrize("area,n", [(False, 300_000), (True, 300_000), (False, 4_000)])
def test_refine_bounds_cover_pixels_crossing_a_run_edge(area, n, monkeypatch):
    """A pixel's exact score may sit across a bin edge from its float32 score. Refine's runs
    are chains of bin-close groups (nothing outside can interleave) except around the
    FPR95 / F1 bins, where a run's top / bottom bin may interleave with the row next to it:
    the AUROC / AP bounds must cover that. Simulated by exact scores jittered by up to half
    a bin (2^-14 relative), so pixels near every bin edge cross it."""
    from anomfast import functional, reference
    exact = reference.coordinate

    def jittered(x, name, **kw):
        v = exact(x, name, **kw)
        h = (v.contiguous().view(torch.int64) * 2654435761) % 2001  # a fixed hash of the value
        return v * (1.0 + (h.to(torch.float64) - 1000.0) / 1000.0 * 2.0 ** -14)
    monkeypatch.setattr(reference, "coordinate", jittered)
    if not area:
        monkeypatch.setattr(functional, "REFINE_AREA_PIXELS", 0)  # only the FPR95 / F1 runs
    rng = np.random.default_rng(11)
    x = rng.normal(0.0, 1.0, (n, 5)).astype(np.float32)
    y = rng.random(x.shape[0]) < 0.3
    x[y, 0] += 0.5
    # n = 4000: mostly one pixel per bin, so only the interleaving of neighbouring rows
    # (not any row's own width) can move AUROC / AP
    logits = torch.from_numpy(x).T.reshape(1, 5, n // 100, 100).contiguous()
    labels = torch.from_numpy(y.reshape(1, n // 100, 100).astype(np.uint8))
    r = anomfast.evaluate(logits, labels, methods=["energy"], refine=True)["energy"]
    ex = jittered(torch.from_numpy(x).double()[:, :, None, None], "energy")[:, 0, 0].numpy()
    want = sk_metrics(ex, y)
    for k in ("auroc", "ap"):
        lo, hi = r.bounds[k]
        assert lo <= want[k] <= hi, (k, want[k], r.bounds[k])
        if area:  # every chain re-scored: nothing can interleave across a chain's ends
            assert abs(getattr(r, k) - want[k]) <= 1e-9 and hi - lo <= 1e-8, (k, getattr(r, k), want[k])
    for k in ("fpr95", "f1"):
        assert abs(getattr(r, k) - want[k]) <= 1e-9, (k, getattr(r, k), want[k])
