"""protocol="ml4cv" against a transcription of the ml4cv-assignment scripts' evaluation.

The scripts (anomaly_detection/simple_max_logits.py, maximum_softmax_probability.py,
standardized_max_logits.py, energy_score_anomaly_detection.py) cast each pixel's score
to float16, concatenate the pixels in data set order, draw np.random.seed(42);
np.random.choice(total, 1_000_000, replace=False) when there are more, and evaluate with
scikit-learn as `seed_evaluate` below does. The inputs are built so that the protocol's
differences matter (heavy float16 ties, argmin |tpr - 0.95| away from the first
TPR >= 0.95, a ROC point dropped by drop_intermediate at TPR 0.95).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

import anomfast
from anomfast import protocols
from anomfast.cli import main

from conftest import random_labels, random_logits

KEYS = ("auroc", "ap", "fpr95", "f1", "threshold", "fpr95_threshold")


# ----------------------------------------------------------------- the transcription

def seed_collect(score_maps, valid, total_limit=1_000_000, seed=42):
    """The scripts' detect_anomalies_*: float16 scores of the pixels in order, then the
    seeded draw when there are more than total_limit."""
    scores = score_maps[valid].astype(np.float16)
    return seed_draw(scores, total_limit, seed)


def seed_draw(values, total_limit, seed=42):
    total = len(values)
    if total > total_limit:
        np.random.seed(seed)
        indices = np.random.choice(total, size=total_limit, replace=False)
        return values[indices], indices
    return values, None


def seed_evaluate(anomaly_scores, ground_truth):
    """The scripts' evaluate_anomaly_detection, line for line."""
    valid_mask = np.isfinite(anomaly_scores)
    anomaly_scores = anomaly_scores[valid_mask]
    ground_truth = ground_truth[valid_mask]
    auroc = roc_auc_score(ground_truth, anomaly_scores)
    aupr = average_precision_score(ground_truth, anomaly_scores)
    precision, recall, pr_thresholds = precision_recall_curve(ground_truth, anomaly_scores)
    fpr, tpr, roc_thresholds = roc_curve(ground_truth, anomaly_scores)
    idx_tpr95 = np.argmin(np.abs(tpr - 0.95))
    fpr95 = fpr[idx_tpr95]
    f1_scores = 2 * (precision * recall) / (precision + recall + 1e-8)
    optimal_idx = np.argmax(f1_scores[:-1])
    return {"auroc": auroc, "ap": aupr, "fpr95": fpr95, "f1": f1_scores[optimal_idx],
            "threshold": float(pr_thresholds[optimal_idx]),
            "fpr95_threshold": float(roc_thresholds[idx_tpr95])}  # the operating point of that FPR95


def seed_run(maps: dict, anomaly, valid, n=1_000_000, seed=42):
    """{method: metrics} of the scripts on anomfast's own per-pixel score maps (the scripts'
    msp score is -max softmax: anomfast's u = 1 - max softmax, minus 1 in float32)."""
    gt = anomaly[valid].astype(int)
    out = {}
    for name, m in maps.items():
        m = np.asarray(m) - np.float32(1) if name == "msp" else np.asarray(m)
        s, idx = seed_collect(m, valid, n, seed)
        g = gt[idx] if idx is not None else gt
        out[name] = seed_evaluate(s, g) | {"n_pos": int(g[np.isfinite(s)].sum()), "n": int(np.isfinite(s).sum())}
    return out


def assert_matches(res, ref):
    for name, want in ref.items():
        r = res[name]
        assert r.exact and r.definitions["protocol"].startswith("ml4cv")
        assert (r.n_pos, r.n_pos + r.n_neg) == (want["n_pos"], want["n"]), name
        for k in KEYS:
            assert abs(getattr(r, k) - want[k]) <= 1e-12, (name, k, getattr(r, k), want[k])


# ----------------------------------------------------------------- inputs

def tied_logits(rng, B=3, C=6, H=48, W=64):
    """Logits whose float16 scores tie heavily (max logits in about [8, 12], float16 step
    2^-7 there), anomalies slightly less confident, some void."""
    x = random_logits(rng, B, C, H, W, scale=0.5) + 8.0
    y = random_labels(rng, B, H, W, p_anomaly=0.08, p_void=0.1)
    x[:, 0] -= 1.0 * (y == 1).float()  # anomalies: a lower class-0 logit where class 0 wins
    return x, y


def designed_logits(values, anomaly, rng):
    """(1, 2, 1, N) logits whose max logit is exactly `values` (score -values), shuffled."""
    perm = torch.randperm(len(values), generator=rng)
    v = torch.tensor(values, dtype=torch.float32)[perm]
    x = torch.stack([v, v - 20.0])[None, :, None, :]
    y = torch.tensor(anomaly, dtype=torch.uint8)[perm][None, None, :]
    return x, y


def groups_to_values(groups):
    """[(max_logit, n_anomaly, n_normal), ...] -> pixel values and labels."""
    vals, lab = [], []
    for v, p, n in groups:
        vals += [v] * (p + n)
        lab += [1] * p + [0] * n
    return vals, lab


# ----------------------------------------------------------------- tests

def test_matches_seed_scripts_on_tied_scores(rng):
    x, y = tied_logits(rng)
    methods = ("max_logit", "msp", "energy")
    maps = {k: v.numpy() for k, v in anomfast.score_maps(x, methods).items()}
    valid, anomaly = (y != 255).numpy(), (y == 1).numpy()
    n = 5000  # below the 8.3k valid pixels: the draw is exercised
    ref = seed_run(maps, anomaly, valid, n=n)
    # the input has what makes the protocol differ: ties after the float16 cast
    s16 = maps["max_logit"][valid].astype(np.float16)
    assert np.unique(s16).size < s16.size / 5 < np.unique(maps["max_logit"][valid]).size
    batches = [x[i:i + 1] for i in range(x.shape[0])]  # batches: data set order across them
    res = anomfast.evaluate(batches, [y[i:i + 1] for i in range(y.shape[0])], methods=methods,
                            protocol="ml4cv", subsample=n)
    assert_matches(res, ref)
    assert all(r.definitions["subsample"].startswith(f"{n} of {int(valid.sum())} pixels") for r in res.values())
    # and anomfast's own definitions give other numbers on the same data
    own = anomfast.evaluate(x, y, methods=methods, exact=True)
    assert any(abs(getattr(own[k], a) - getattr(res[k], a)) > 1e-6 for k in methods for a in KEYS)


def test_fpr95_nearest_point_not_first_above():
    # tpr 0.94 then 0.99: the point nearest 0.95 lies below it (FPR 0 vs 0.5)
    vals, lab = groups_to_values([(-10.0, 94, 0), (-5.0, 5, 50), (0.0, 1, 50)])
    x, y = designed_logits(vals, lab, torch.Generator().manual_seed(1))
    s, g = -np.asarray(vals, np.float16), np.asarray(lab)
    fpr, tpr, _ = roc_curve(g, s)
    assert fpr[np.argmin(np.abs(tpr - 0.95))] != fpr[np.argmax(tpr >= 0.95)]
    res = anomfast.evaluate(x, y, methods=("max_logit",), protocol="ml4cv")
    assert_matches(res, {"max_logit": seed_evaluate(s, g) | {"n_pos": 100, "n": 200}})
    assert res["max_logit"].fpr95 == 0.0
    assert anomfast.evaluate(x, y, methods=("max_logit",), exact=True)["max_logit"].fpr95 == 0.5


def test_fpr95_on_the_dropped_roc_curve():
    # ROC points (93, 10), (95, 20), (97, 30): the middle one, exactly at TPR 0.95, is
    # dropped by drop_intermediate=True, so the scripts read FPR at 0.93 or 0.97
    vals, lab = groups_to_values([(-4.0, 93, 10), (-3.0, 2, 10), (-2.0, 2, 10), (-1.0, 3, 70)])
    x, y = designed_logits(vals, lab, torch.Generator().manual_seed(2))
    s, g = -np.asarray(vals, np.float16), np.asarray(lab)
    fpr, tpr, _ = roc_curve(g, s)
    fpr_all, tpr_all, _ = roc_curve(g, s, drop_intermediate=False)
    assert fpr[np.argmin(np.abs(tpr - 0.95))] != fpr_all[np.argmin(np.abs(tpr_all - 0.95))]
    res = anomfast.evaluate(x, y, methods=("max_logit",), protocol="ml4cv")
    assert_matches(res, {"max_logit": seed_evaluate(s, g) | {"n_pos": 100, "n": 200}})


def test_default_sample_size_over_a_million_pixels(rng):
    x = random_logits(rng, 1, 3, 1000, 1030, scale=2.0)  # 1,030,000 pixels, no void
    y = (torch.rand(1, 1000, 1030, generator=rng) < 0.03).to(torch.uint8)
    maps = {"energy": anomfast.score_maps(x, ("energy",))["energy"].numpy()}
    ref = seed_run(maps, (y == 1).numpy(), np.ones(y.shape, bool))
    assert ref["energy"]["n"] == 1_000_000
    res = anomfast.evaluate(x, y, methods=("energy",), protocol="ml4cv")
    assert_matches(res, ref)


def test_non_finite_float16_scores_dropped_after_the_draw(rng):
    x, y = tied_logits(rng, B=1, H=40, W=50)
    y[y == 255] = 0
    x[0, :, :2, :] = 7e4  # max logit beyond float16: score -inf after the cast
    maps = {"max_logit": anomfast.score_maps(x, ("max_logit",))["max_logit"].numpy()}
    valid = np.ones(y.shape, bool)
    ref = seed_run(maps, (y == 1).numpy(), valid, n=1500)
    assert ref["max_logit"]["n"] < 1500
    res = anomfast.evaluate(x, y, methods=("max_logit",), protocol="ml4cv", subsample=1500)
    assert_matches(res, ref)
    assert any("non-finite float16" in w for w in res["max_logit"].warnings)


@pytest.mark.parametrize("total,n,seed", [(10, 3, 42), (12_345, 1_000, 42), (50_000, 49_999, 7)])
def test_subsample_indices_are_numpys_seeded_choice(total, n, seed):
    np.random.seed(seed)
    want = np.random.choice(total, n, replace=False)
    np.random.seed(123)
    before = np.random.random_sample()
    np.random.seed(123)
    got = protocols.ml4cv_indices(total, n, seed)
    assert np.random.random_sample() == before  # NumPy's global state is left alone
    np.testing.assert_array_equal(got, want)
    assert protocols.ml4cv_indices(n, n, seed) is None  # the scripts draw only when there are more


def test_subsample_above_the_exact_limit_warns_and_draws_uniformly():
    with pytest.warns(RuntimeWarning, match="exact-draw limit"):
        idx = protocols.ml4cv_indices(10_000, 600, 42, exact_limit=5_000)
    np.testing.assert_array_equal(idx, np.random.default_rng(42).choice(10_000, 600, replace=False))
    assert np.unique(idx).size == 600 and idx.min() >= 0 and idx.max() < 10_000


def seed_class_statistics(batches, num_classes, dtype=np.float64):
    """The scripts' compute_class_statistics (Welford per predicted class, population std).
    Literally (dtype=None) its sums run in float32 under NumPy 2 (float32 values, Python
    float scalars are weak), ~1e-7 relative rounding; dtype=np.float64 is the same
    algorithm in float64, which anomfast's float64 sums match to rounding."""
    count = {c: 0 for c in range(num_classes)}
    mean = {c: 0.0 for c in range(num_classes)}
    m2 = {c: 0.0 for c in range(num_classes)}
    for output in batches:
        max_logits, pred = output.max(dim=1)
        max_logits, pred = max_logits.numpy(), pred.numpy()
        for c in range(num_classes):
            mask = pred == c
            n_pixels = mask.sum()
            if n_pixels == 0:
                continue
            values = max_logits[mask].flatten()
            if dtype is not None:
                values = values.astype(dtype)
            n_new = count[c] + n_pixels
            delta = values - mean[c]
            mean[c] += np.sum(delta) / n_new
            delta2 = values - mean[c]
            m2[c] += np.sum(delta * delta2)
            count[c] = n_new
    means = np.array([mean[c] for c in range(num_classes)])
    stds = np.array([np.sqrt(m2[c] / count[c]) if count[c] > 1 else 1.0 for c in range(num_classes)])
    return means, stds


def sml_fit_batches(rng, C=6):
    out = []
    for _ in range(3):
        x = random_logits(rng, 2, C, 20, 24)
        x[:, C - 1] = -100.0   # never predicted: mean 0, std 1
        x[:, C - 2] = -100.0
        out.append(x)
    out[1][0, C - 2, 3, 4] = 100.0  # predicted exactly once: its value, std 1
    return out


def test_sml_population_std_variant(rng):
    C = 6
    batches = sml_fit_batches(rng, C)
    means, stds = seed_class_statistics(batches, C)
    paper = anomfast.fit_sml(batches, missing="global")
    st = paper.with_convention("ml4cv")
    np.testing.assert_allclose(st.mean, means, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.std, stds + 1e-8, rtol=1e-10, atol=0)
    means32, stds32 = seed_class_statistics(batches, C, dtype=None)
    np.testing.assert_allclose(st.mean, means32, rtol=1e-5)
    np.testing.assert_allclose(st.std, stds32 + 1e-8, rtol=1e-5)
    assert st.mean[C - 1] == 0.0 and st.mean[C - 2] == 100.0 and st.std[C - 2] == 1.0 + 1e-8
    assert st.fallback_classes == [C - 2, C - 1]
    # the default stays the SML paper's unbiased std, and the two differ by sqrt(n / (n - 1))
    n = paper.count[0]
    np.testing.assert_allclose(paper.std[0] / (st.std[0] - 1e-8), np.sqrt(n / (n - 1)), rtol=1e-10)
    # the core scores with them: -(m - mean) / (std + 1e-8) up to float32 rounding
    x = random_logits(rng, 1, C, 16, 16)
    m, k = x.max(dim=1)
    want = -(m.double().numpy() - st.mean[k.numpy()]) / st.std[k.numpy()]
    got = anomfast.score_maps(x, ("sml",), sml=st)["sml"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sml_statistics_converted_under_the_protocol(rng, tmp_path):
    C = 6
    paper = anomfast.fit_sml(sml_fit_batches(rng, C))
    st = paper.with_convention("ml4cv")
    st.save(tmp_path / "sml.npz")
    loaded = anomfast.SMLStats.load(tmp_path / "sml.npz")
    assert loaded.convention == "ml4cv" and np.array_equal(loaded.std, st.std)
    x = random_logits(rng, 2, C, 40, 40)
    y = random_labels(rng, 2, 40, 40, p_anomaly=0.1)
    res = anomfast.evaluate(x, y, methods=("sml",), sml=paper, protocol="ml4cv", subsample=2000)
    assert res["sml"].params["sml"]["convention"] == "ml4cv"
    maps = {"sml": anomfast.score_maps(x, ("sml",), sml=st)["sml"].numpy()}
    assert_matches(res, seed_run(maps, (y == 1).numpy(), (y != 255).numpy(), n=2000))


def test_protocol_refused_where_it_cannot_apply(rng):
    x, y = random_logits(rng, 1, 4, 8, 8), random_labels(rng, 1, 8, 8)
    with pytest.raises(ValueError, match="anomfast.evaluate"):
        anomfast.Evaluator(protocol="ml4cv")
    anomfast.Evaluator(protocol="default")
    with pytest.raises(ValueError, match="unknown protocol"):
        anomfast.evaluate(x, y, protocol="ml4CV")
    for kw in ({"fpr_mode": "interp"}, {"exact": True}, {"per_image": True}, {"ap_mode": "trapezoid"}):
        with pytest.raises(ValueError, match="fixes its own definitions"):
            anomfast.evaluate(x, y, protocol="ml4cv", **kw)
    a = anomfast.evaluate(x, y, protocol="default")
    b = anomfast.evaluate(x, y)
    # NaN where the 64 random pixels hold no anomaly (about one run in seven): equal too
    assert all(np.array_equal(getattr(a[k], m), getattr(b[k], m), equal_nan=True)
               for k in a for m in ("auroc", "ap", "fpr95", "f1"))


def test_cli_protocol_ml4cv(tmp_path, rng):
    from PIL import Image
    (tmp_path / "labels").mkdir()
    (tmp_path / "m").mkdir()
    xs, ys = [], []
    for i in range(3):
        x, y = tied_logits(rng, B=1, C=5, H=30, W=40)
        Image.fromarray(y[0].numpy()).save(tmp_path / "labels" / f"img{i}.png")
        np.save(tmp_path / "m" / f"img{i}.npy", x[0].numpy())
        xs.append(x)
        ys.append(y)
    (tmp_path / "grid.toml").write_text('[labels]\ndir = "labels"\nanomaly_ids = [1]\nvoid_ids = [255]\n'
                                        'normal_ids = [0]\n[[models]]\nname = "M"\nlogits = "m"\n')
    out = tmp_path / "out"
    methods = ["max_logit", "msp", "energy"]
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots",
                 "--methods", ",".join(methods), "--protocol", "ml4cv"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["protocol"] == "ml4cv" and doc["conventions"] == {"protocol": "ml4cv"}
    assert "Protocol ml4cv" in (out / "report.md").read_text()
    api = anomfast.evaluate(xs, ys, methods=methods, protocol="ml4cv")
    for meth in methods:
        got = doc["models"][0]["results"][meth]
        assert got["definitions"]["protocol"].startswith("ml4cv") and got["exact"]
        for k in KEYS:
            assert got[k] == getattr(api[meth], k), (meth, k)
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots",
                 "--protocol", "ml4cv", "--fpr-mode", "interp"]) == 2
