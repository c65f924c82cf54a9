"""evaluate_scores, Histogram and components at their edges, as a review found them
(2026-12-03): float64 scores past float32's range, thresholds of float64 scores and their
bounds, Histogram.finalize(exact=True), adding histograms of one custom method, saving
keys that cannot be loaded, components with refine=True."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import anomfast

from test_evaluate import exact_best_f1_threshold


def test_float64_scores_beyond_float32_are_an_error_and_below_it_a_warning():
    y = np.array([1, 1, 1, 0, 0, 0])
    # they became +-inf in float32: F1 1.0 at threshold +inf, which flags nothing
    with pytest.raises(ValueError, match="beyond float32's range"):
        anomfast.evaluate_scores({"m": np.array([1e39, 2e39, 3e39, .1, .2, .3])}, y)
    r = anomfast.evaluate_scores({"m": np.array([1e39, 2e39, 3e39, .1, .2, .3])}, y, exact=True)["m"]
    assert r.auroc == 1.0 and r.threshold == 1e39
    with pytest.warns(RuntimeWarning, match="below float32's smallest subnormal"):
        r = anomfast.evaluate_scores({"m": np.array([3e-300, 2e-300, 1e-300, 0.5e-300, 0.2e-300, 0.1e-300])}, y)["m"]
    assert any("subnormal" in w for w in r.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32-representable tiny scores: nothing lost, nothing said
        anomfast.evaluate_scores({"m": np.array([3e-40, 2e-40, 1e-40, 0.5e-40, 0.2e-40, 0.1e-40])}, y)


def test_float64_thresholds_lie_inside_their_bounds_and_bound_the_exact_ones(rng):
    """The reported thresholds are the caller's own values and lie inside their bounds (the
    upper bound stayed a float32 value); the exact best-F1 threshold of the float64 scores
    lies inside too. Scores packed closer than float32 resolves, and rounded ones."""
    g = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    for it in range(60):
        n = int(g.integers(20, 400))
        y = (g.random(n) < g.uniform(0.05, 0.8)).astype(np.int64)
        if y.sum() in (0, n):
            continue
        kind = it % 3
        if kind == 0:
            s = 1.0 + (g.normal(size=n) + y) * 1e-8        # below float32's resolution at 1
        elif kind == 1:
            s = np.round(g.normal(size=n) + y, 1)         # rounded: ties, not float32 values
        else:
            s = g.normal(size=n) + y
        r = anomfast.evaluate_scores({"m": s}, y)["m"]
        for k in ("threshold", "fpr95_threshold"):
            lo, hi = r.bounds[k]
            assert lo <= getattr(r, k) <= hi, (it, k, getattr(r, k), r.bounds[k])
        _, t = exact_best_f1_threshold(s, y)
        assert r.bounds["threshold"][0] <= t <= r.bounds["threshold"][1], (it, t, r.bounds["threshold"])
        flagged = s >= r.threshold
        tp = int((flagged & (y == 1)).sum())
        assert abs(2 * tp / (flagged.sum() + y.sum()) - r.f1) < 1e-12, it


def test_bool_labels_read_as_0_and_1(rng):
    s = torch.randn(4, 8, 8, generator=rng)
    y = torch.rand(4, 8, 8, generator=rng) < 0.3
    a = anomfast.evaluate_scores({"m": s}, y)["m"]
    b = anomfast.evaluate_scores({"m": s}, y.to(torch.uint8))["m"]
    assert (a.auroc, a.ap, a.fpr95, a.f1) == (b.auroc, b.ap, b.fpr95, b.f1)


def test_histogram_finalize_exact_is_refused_for_bins_of_several_values(rng):
    s = torch.rand(4000, generator=rng).double()
    y = (torch.rand(4000, generator=rng) < s).to(torch.uint8)
    h = anomfast.evaluate_scores({"m": (s * 1e-3 + 1).float()}, y).histograms["m"]
    with pytest.raises(ValueError, match="hold several distinct values"):
        h.finalize(exact=True)


def test_histograms_of_one_custom_method_add_whatever_their_float32_exactness(rng):
    y = (torch.rand(2, 64, generator=rng) < 0.3).to(torch.uint8)
    sat = torch.where(torch.rand(64, generator=rng) < 0.5, 0.0, 1.0).double()  # float32 values
    soft = torch.rand(64, generator=rng).double() / 3                           # not float32 values
    h1 = anomfast.evaluate_scores({"m": sat}, y[0]).histograms["m"]
    h2 = anomfast.evaluate_scores({"m": soft}, y[1]).histograms["m"]
    assert h1.params["float32_exact"] and not h2.params["float32_exact"]
    both = h1 + h2
    assert both.params["float32_exact"] is False  # a bin of one float32 value is no tie in the sum
    assert both == anomfast.evaluate_scores({"m": torch.cat([sat, soft])}, y.flatten()).histograms["m"]
    h1 += h2
    assert h1 == both and h1.params == both.params
    other = anomfast.evaluate_scores({"other": sat}, y[0]).histograms["other"]
    with pytest.raises(ValueError, match="different methods"):
        h1 + other


def test_save_histograms_refuses_keys_load_cannot_read(tmp_path, rng):
    h = anomfast.evaluate_scores({"m": torch.rand(32, generator=rng)}, torch.ones(32, dtype=torch.uint8)).histograms["m"]
    with pytest.raises(TypeError, match="keys must be strings"):
        anomfast.save_histograms(tmp_path / "h.npz", {("model", "m"): h})
    assert not (tmp_path / "h.npz").exists()
    anomfast.save_histograms(tmp_path / "h.npz", {"model::m": h, 3: h})
    got, _ = anomfast.load_histograms(tmp_path / "h.npz")
    assert got["model::m"] == h and got[3] == h


def test_components_with_refine_binarize_at_the_maps_own_best_threshold(rng):
    """refine=True's threshold belongs to the exact float64 scores; the component pass
    binarizes the core's float32 maps, whose own best pixel-F1 set is the unrefined
    threshold's (it used the refined one: another pixel set)."""
    x = (torch.randn(2, 19, 32, 40, generator=rng) * 3).to(torch.bfloat16)
    y = (torch.rand(2, 32, 40, generator=rng) < 0.1).to(torch.uint8)
    r = anomfast.evaluate(x, y, methods=("energy",), refine=True, components=True)
    plain = r.histograms["energy"].finalize()
    assert r.components["energy"].threshold == plain.threshold
    maps = anomfast.score_maps(x, methods=["energy"])["energy"]
    flagged = maps >= plain.threshold
    tp = int((flagged & (y == 1)).sum())
    assert abs(2 * tp / (int(flagged.sum()) + int((y == 1).sum())) - plain.f1) < 1e-12


def test_method_inputs_that_used_to_mislead(rng):
    """A review's findings on the methods' inputs: NaN features in fit_heat blamed missing
    classes or a corrupt file; sml_full=True without 'sml' was silently ignored; float64
    logits past float32's range were reported as NaN / inf logits."""
    x = torch.randn(2, 5, 16, 16, generator=rng) * 3
    f = torch.randn(2, 4, 4, 4, generator=rng)
    sem = torch.randint(0, 5, (2, 16, 16), generator=rng)
    anomfast.fit_heat(x, f, sem)  # finite: fine
    for bad in (float("nan"), float("inf")):
        g = f.clone()
        g[1, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="features hold NaN or inf"):
            anomfast.fit_heat(x, g, sem)
        with pytest.raises(ValueError, match="features hold NaN or inf"):
            anomfast.fit_heat([x[:1], x[1:]], [g[:1], g[1:]], [sem[:1], sem[1:]])
    y = (torch.rand(2, 16, 16, generator=rng) < 0.2).to(torch.uint8)
    with pytest.raises(ValueError, match="'sml' is not among the methods"):
        anomfast.evaluate(x, y, methods=("energy",), sml_full=True)
    x64 = x.double()
    x64[0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match="beyond float32's range"):
        anomfast.evaluate(x64, y, methods=("energy",))


def test_refine_refuses_a_method_it_cannot_rescore():
    """A method missing from both of refine's lists (a new one whose contributor skipped
    that step) used to keep its float32 score under a definition that said "re-scored
    exactly": the exact AP fell outside its bound. Now it is an error."""
    from anomfast import functional
    spec = anomfast.methods.resolve(["energy"])
    assert functional._rescored(spec, "energy")
    with pytest.raises(NotImplementedError, match="_PER_PIXEL"):
        functional._rescored(spec, "sprime")
