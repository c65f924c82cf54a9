"""Evaluator vs torchmetrics (pytest-benchmark). Each checks correctness before timing.

    pytest bench/test_bench_evaluator.py --benchmark-group-by=group --benchmark-columns=min,median,mean
(the table in bench/RESULTS.md comes from bench/evaluator_report.py: whole job, errors, state size)
"""
from __future__ import annotations

import pytest
import torch

import anomfast

from common import METHODS4, TorchmetricsJob, fit_stats, make_inputs

JOBS = ["anomfast", "torchmetrics-exact", "torchmetrics-1000"]


@pytest.fixture(scope="module")
def big():
    x, y = make_inputs()
    return x, y, fit_stats(x)


def make_job(name, stats):
    if name == "anomfast":
        ev = anomfast.Evaluator(methods=METHODS4, sml=stats)
        return ev.update
    return TorchmetricsJob(stats, thresholds=None if name == "torchmetrics-exact" else 1000).update


@pytest.fixture(scope="module")
def checked(big):
    """anomfast's AUROC / AP equal torchmetrics' exact ones (1e-4) on the same batch."""
    x, y, st = big
    ev = anomfast.Evaluator(methods=METHODS4, sml=st)
    ev.update(x, y)
    r = ev.compute()
    tm = TorchmetricsJob(st)
    tm.update(x, y)
    ref = tm.compute()
    for m in METHODS4:
        assert abs(r[m].auroc - ref[m]["auroc"]) < 1e-4 and abs(r[m].ap - ref[m]["ap"]) < 1e-4, m
    return True


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.benchmark(group="update-1x19x8x8")
def test_update_tiny_batch(benchmark, big, checked, job):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 19, 8, 8, generator=g) * 3
    y = torch.randint(0, 2, (1, 8, 8), generator=g).to(torch.uint8)
    update = make_job(job, big[2])
    benchmark(update, x, y)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.benchmark(group="update-1x19x512x1024")
def test_update_big_batch(benchmark, big, checked, job):
    x, y, st = big
    update = make_job(job, st)
    benchmark.pedantic(update, args=(x, y), rounds=3 if job != "torchmetrics-1000" else 1, iterations=1)
