"""CPU benchmarks (pytest-benchmark). Each checks correctness before timing.

    pytest bench/test_bench_cpu.py --benchmark-group-by=group --benchmark-columns=min,median,mean
"""
from __future__ import annotations

import pytest

import anomfast
from anomfast import _fused
from anomfast.methods import resolve

from common import METHODS4, check_against_reference, fit_stats, make_inputs, read_bandwidth_gbs, reference_histograms


@pytest.fixture(scope="module")
def data():
    x, y = make_inputs()
    st = fit_stats(x)
    return x, y, st


@pytest.fixture(scope="module")
def checked(data):
    """The fused histograms agree with the float64 reference before anything is timed."""
    x, y, st = data
    spec = resolve(METHODS4, sml=st)
    check_against_reference(x, y, st, spec)
    return spec


@pytest.mark.benchmark(group="fused-19x512x1024-f32")
def test_fused_cpu(benchmark, data, checked):
    x, y, st = data
    hist = _fused.new_histogram(len(METHODS4), "cpu")
    benchmark.extra_info["read_bandwidth_GBs"] = read_bandwidth_gbs()
    benchmark(lambda: _fused.fused_pass(x, y, checked, hist=hist))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["logit_GBs"] = x.numel() * 4 / benchmark.stats.stats.min / 1e9


@pytest.mark.benchmark(group="fused-19x512x1024-f32")
def test_fused_cpu_scores_only(benchmark, data, checked):
    """The same pass without labels: the score math alone, no histogram touched."""
    x, y, st = data
    benchmark(lambda: _fused.fused_pass(x, None, checked))


@pytest.mark.benchmark(group="fused-19x512x1024-f32")
def test_reference_torch_float64(benchmark, data, checked):
    x, y, st = data
    benchmark.pedantic(lambda: reference_histograms(x, y, st), rounds=2, iterations=1)


@pytest.mark.benchmark(group="finalize")
def test_finalize_histogram(benchmark, data):
    x, y, st = data
    r = anomfast.evaluate(x, y, methods=["energy"])
    h = r.histograms["energy"]
    assert h.finalize().auroc == r["energy"].auroc  # correctness before timing
    benchmark(h.finalize)


@pytest.mark.benchmark(group="finalize")
def test_finalize_sklearn_exact(benchmark, data):
    from sklearn.metrics import average_precision_score, roc_auc_score
    x, y, st = data
    s = anomfast.score_maps(x, methods=["energy"])["energy"].numpy().ravel()
    yy = y.numpy().ravel()
    keep = yy != 255
    s, yy = s[keep], yy[keep]
    # correctness before timing: anomfast's certified bounds hold scikit-learn's exact values
    r = anomfast.evaluate(x, y, methods=["energy"])["energy"]
    au, ap = roc_auc_score(yy, s), average_precision_score(yy, s)
    assert r.bounds["auroc"][0] <= au <= r.bounds["auroc"][1] and r.bounds["ap"][0] <= ap <= r.bounds["ap"][1]
    benchmark.pedantic(lambda: (roc_auc_score(yy, s), average_precision_score(yy, s)), rounds=2, iterations=1)
