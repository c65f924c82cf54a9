"""Fidelity on the regimes real networks produce, at >= 1M pixels, against exact
scikit-learn metrics on float64 scores computed without cancellation:

* confident 19-class networks (logit margins 20-60, up to 80),
* bf16 / fp16 logits (ties from the low precision),
* a saturated 2-class network (most max logits exactly 0: a huge exact tie),
* rounded logits (heavy ties everywhere).

Default (histogram) metrics must lie within 1e-4 of exact and inside their certified
bounds; on the confident cases every bound is at most 1e-3 wide. With refine=True, FPR95,
best F1 and both thresholds equal scikit-learn's on the core's own float32 scores.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn.metrics")

import anomfast  # noqa: E402
from anomfast import _fused  # noqa: E402
from anomfast.methods import resolve  # noqa: E402

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
# and refine=True makes FPR95 / F1 exact. Every other (case, method) meets 1e-4.
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
    """refine=True: FPR95, best F1 and both thresholds equal scikit-learn's on the exact
    float64 scores (the decisive pixels are re-scored in float64), whatever the
    pile-ups and float32 ties; AUROC and AP keep bounds that contain the exact value."""
    name, x, y, logits, labels = case
    res = anomfast.evaluate(logits, labels, methods=METHODS, refine=True)
    ex = exact_scores(x)
    for m in METHODS:
        want = sk_metrics(ex[m], y)
        r = res[m]
        assert abs(r.fpr95 - want["fpr95"]) <= 1e-9, (name, m, r.fpr95, want["fpr95"])
        assert abs(r.f1 - want["f1"]) <= 1e-9, (name, m, r.f1, want["f1"])
        for k in ("threshold", "fpr95_threshold"):
            # relative: msp's thresholds are u = 1 - max softmax, down to 1e-30 on confident pixels
            assert abs(getattr(r, k) - want[k]) <= 1e-9 * abs(want[k]), (name, m, k, getattr(r, k), want[k])
        for k in ("auroc", "ap"):
            lo, hi = r.bounds[k]
            assert lo <= want[k] <= hi, (name, m, k)
        assert "refine" in r.definitions


def test_tie_groups_make_fpr95_exact_without_refine(case):
    """Where the crossing bin is a real tie (bf16 / fp16 max logits, the saturated zero,
    rounded logits), FPR95 and its threshold are scikit-learn's with no second pass."""
    name, x, y, logits, labels = case
    r = anomfast.evaluate(logits, labels, methods=["max_logit"])["max_logit"]
    lo, hi = r.bounds["fpr95_threshold"]
    if name in ("bf16", "fp16", "rounded"):
        assert lo == hi, (name, r.bounds["fpr95_threshold"])  # the crossing bin holds one value
    if lo == hi:
        want = sk_metrics(-x.max(axis=1).astype(np.float64), y)
        assert r.fpr95 == pytest.approx(want["fpr95"], abs=1e-12)
        assert r.fpr95_threshold == want["fpr95_threshold"]
        assert r.bounds["fpr95"][1] - r.bounds["fpr95"][0] <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_keep_relative_precision_near_zero(dtype):
    """Confident pixels (margins up to 80) have scores of 1e-35 .. 1e-7 for msp's u,
    entropy and GEN, energy just below 0 for a saturated 2-class network: the float32
    core keeps ~1e-6 relative precision there (float64 reference written without
    cancellation), so the fine bins near 0 are worth having."""
    from anomfast import reference
    rng = np.random.default_rng(7)
    n, C = 20000, 19
    margin = np.linspace(1.0, 80.0, n).astype(np.float32)
    x = rng.normal(0.0, 1.0, (n, C)).astype(np.float32)
    k = rng.integers(0, C, n)
    x[np.arange(n), k] = x.max(axis=1) + margin
    two = np.stack([np.zeros(n, np.float32), -margin], axis=1)  # max logit exactly 0
    for arr in (x, two):
        t = torch.from_numpy(arr).to(dtype).T.reshape(1, arr.shape[1], 1, n).contiguous()
        names = ("max_logit", "msp", "energy", "entropy", "gen")
        _, _, maps = _fused.fused_pass(_fused.as_logits(t), None, resolve(names), want_maps=True)
        for j, m in enumerate(names):
            ref = reference.coordinate(t.double(), m)[0, 0].numpy()
            got = maps[j, 0, 0].double().numpy()
            assert np.all(ref != 0) or m == "max_logit", m  # really near 0, not flushed
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0, err_msg=f"{m} {dtype} C={arr.shape[1]}")


def test_fpr95_exact_when_the_crossing_is_the_saturated_zero_tie():
    """The detector case: most pixels (and most anomalies) have max logit exactly 0, so
    TPR 95% is reached inside that one huge tie: FPR95 and its threshold (0) are
    scikit-learn's with no second pass, for max_logit and for any exact score map."""
    rng = np.random.default_rng(11)
    n = H * W
    y = rng.random(n) < 0.1
    sat = np.where(y, rng.random(n) < 0.97, rng.random(n) < 0.85)
    x = rng.normal(0.0, 2.0, (n, 2)).astype(np.float32)
    x[sat, 0] = 0.0
    x[sat, 1] = -rng.uniform(5.0, 60.0, int(sat.sum())).astype(np.float32)
    logits = torch.from_numpy(x).T.reshape(1, 2, H, W).contiguous()
    labels = torch.from_numpy(y.reshape(1, H, W).astype(np.uint8))
    r = anomfast.evaluate(logits, labels, methods=["max_logit"])["max_logit"]
    want = sk_metrics(-x.max(axis=1).astype(np.float64), y)
    assert r.fpr95_threshold == want["fpr95_threshold"] == 0.0
    assert r.fpr95 == want["fpr95"] and r.bounds["fpr95"][1] - r.bounds["fpr95"][0] <= 2e-12
    own = anomfast.evaluate_scores({"detector": -x.max(axis=1).reshape(1, H, W)}, labels)["detector"]
    assert own.fpr95 == want["fpr95"] and own.fpr95_threshold == 0.0
