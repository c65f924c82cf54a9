"""Shared inputs and baselines of the benchmarks."""
from __future__ import annotations

import torch

import anomfast
from anomfast import reference

METHODS4 = ["max_logit", "msp", "energy", "sml"]


def make_inputs(B=1, C=19, H=512, W=1024, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 3
    k = torch.randint(0, C, (B, 1, H, W), generator=g)
    x.scatter_add_(1, k, torch.rand(B, 1, H, W, generator=g) * 9)
    u = torch.rand(B, H, W, generator=g)
    y = torch.zeros(B, H, W, dtype=torch.uint8)
    y[u < 0.01] = 1
    y[u > 0.9] = 255
    return x.to(dtype), y


def fit_stats(x):
    return anomfast.fit_sml(x)


def reference_histograms(x, y, stats, methods=METHODS4):
    """The pure-PyTorch float64 baseline: every score from the reference, binned."""
    out = {}
    for m in methods:
        kw = dict(sml_mean=stats.mean, sml_std=stats.std) if m == "sml" else {}
        out[m] = reference.histogram(x, y, m, **kw)
    return out


def read_bandwidth_gbs(nbytes=512 * 2**20, repeat=5):
    """Memory read bandwidth of this machine, measured now: a float32 sum over a buffer
    much larger than the caches, all threads torch uses (best of `repeat`)."""
    import time
    buf = torch.ones(nbytes // 4)
    buf.sum()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def check_against_reference(x, y, stats, spec):
    """Before timing: the fused scores match the float64 reference (abs + rel 1e-5 of the
    logit scale) and the histograms equal the binning of the kernel's own scores."""
    from anomfast import _fused, binning
    hist, _, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    scale = x.double().abs().amax(dim=1)
    for j, m in enumerate(spec.names):
        kw = dict(sml_mean=stats.mean, sml_std=stats.std) if m == "sml" else {}
        ref = reference.coordinate(x, m, **kw)
        tol = 1e-5 * (ref.abs() + (scale / float(stats.std.min()) if m == "sml" else scale))
        assert bool(((maps[j].double() - ref).abs() <= tol).all()), f"{m}: scores differ from the reference"
        idx = reference.bin_index(maps[j])
        for row, lab in ((0, 0), (1, 1)):
            want = torch.bincount(idx[y == lab].flatten(), minlength=binning.NBINS)
            assert torch.equal(hist[j, row], want), f"{m}: histogram differs from its own scores' binning"
