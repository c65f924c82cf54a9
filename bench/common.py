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


def best_of(fn, repeat):
    """Best wall time of `repeat` calls after one warm-up call (thread pool, page faults
    of the histogram scratch)."""
    import time
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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


def check_state(state, maps, cls, ok, what="", names=None):
    """A fresh HistState (anomfast.histogram) holds exactly the NumPy binning
    (anomfast.binning, the mirror of binning.h) of the core's own coordinates `maps`
    (M, B, H, W) for the pixels with label class 0 / 1 and `ok`: the counts, the tie
    signatures (OR of bin_sig; 0 where never counted) and the occupancy bytes (1 exactly
    on the blocks holding counts). names: the methods of the M rows; the cores fill the
    signatures of those in EXACT_COORDINATES only (FusedArgs.sig_mask), the other rows
    must stay 0 (None: every row filled)."""
    import numpy as np
    from anomfast import binning
    from anomfast.methods import EXACT_COORDINATES
    filled = [True] * maps.shape[0] if names is None else [n in EXACT_COORDINATES for n in names]
    cls = cls.detach().cpu().reshape(-1).numpy()
    ok = ok.detach().cpu().reshape(-1).numpy()
    slots, sigs = [], []
    for j in range(maps.shape[0]):
        t = maps[j].detach().cpu().reshape(-1).numpy()
        for lab in (0, 1):
            sel = (cls == lab) & ok
            slots.append((j * 2 + lab) * binning.NBINS + binning.bin_index(t[sel]))
            sigs.append(binning.bin_sig(t[sel]) if filled[j] else np.zeros(int(sel.sum()), np.int64))
    u, inv = np.unique(np.concatenate(slots), return_inverse=True)
    want_sig = np.zeros(u.size, np.int64)
    np.bitwise_or.at(want_sig, inv, np.concatenate(sigs))
    h = state.hist.cpu().reshape(-1).numpy()
    s = state.sig.cpu().reshape(-1).numpy().view(np.uint32)
    o = state.occ.cpu().numpy()
    nz = np.flatnonzero(h)
    assert np.array_equal(nz, u) and np.array_equal(h[nz], np.bincount(inv, minlength=u.size)), \
        f"{what}: histogram counts differ from the binning of the core's own scores"
    assert np.array_equal(np.flatnonzero(s), u[want_sig != 0]) and np.array_equal(s[u].astype(np.int64), want_sig), \
        f"{what}: tie signatures differ from the OR of bin_sig over each bin"
    assert np.array_equal(np.flatnonzero(o), np.unique(u >> binning.OCC_SHIFT)) and o.max(initial=0) <= 1, \
        f"{what}: occupancy is not exactly the blocks holding counts"


def same_state(a, b) -> bool:
    """Two HistStates hold the same counts, signatures and occupancy (any devices)."""
    return all(torch.equal(getattr(a, k).cpu(), getattr(b, k).cpu()) for k in ("hist", "sig", "occ"))


def check_against_reference(x, y, stats, spec):
    """Before timing: the fused scores match the float64 reference (abs + rel 1e-5 of the
    logit scale) and the histograms (counts, tie signatures, occupancy) equal the binning
    of the kernel's own scores."""
    from anomfast import _fused
    hist, _, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    scale = x.double().abs().amax(dim=1)
    for j, m in enumerate(spec.names):
        kw = dict(sml_mean=stats.mean, sml_std=stats.std) if m == "sml" else {}
        ref = reference.coordinate(x, m, **kw)
        tol = 1e-5 * (ref.abs() + (scale / float(stats.std.min()) if m == "sml" else scale))
        assert bool(((maps[j].double() - ref).abs() <= tol).all()), f"{m}: scores differ from the reference"
    check_state(hist, maps, y, torch.isfinite(x).all(dim=1), "fused pass", names=spec.names)


def torch_scores(x, stats, methods=METHODS4):
    """float32 pure-PyTorch scores (B, H, W) per method, as a user feeding a peer library
    would compute them (higher = more anomalous)."""
    out = {}
    x = x.float()
    mx, k = x.max(dim=1)
    for m in methods:
        if m == "max_logit":
            out[m] = -mx
        elif m == "msp":
            out[m] = 1 - torch.softmax(x, dim=1).amax(dim=1)
        elif m == "energy":
            out[m] = -torch.logsumexp(x, dim=1)
        elif m == "sml":
            mu = torch.as_tensor(stats.mean, dtype=torch.float32)
            sd = torch.as_tensor(stats.std, dtype=torch.float32)
            out[m] = -(mx - mu[k]) / sd[k]
        else:
            raise ValueError(f"no torch baseline for {m}")
    return out


class TorchmetricsJob:
    """The same job with torchmetrics: per method a MetricCollection of BinaryAUROC and
    BinaryAveragePrecision (the collection shares their precision-recall state), fed the
    valid pixels' scores. thresholds=None: exact (keeps every score); an int: binned on
    that many thresholds over [0, 1] (torchmetrics applies a sigmoid to scores outside
    [0, 1]). Default validate_args, as users run it."""

    def __init__(self, stats, thresholds=None, methods=METHODS4, ignore_index=255):
        from torchmetrics import MetricCollection
        from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision
        self.stats, self.methods, self.ignore_index = stats, list(methods), ignore_index
        self.metrics = {m: MetricCollection({"auroc": BinaryAUROC(thresholds=thresholds),
                                             "ap": BinaryAveragePrecision(thresholds=thresholds)})
                        for m in self.methods}

    def update(self, x, y):
        valid = y != self.ignore_index
        t = y[valid].long()
        for m, s in torch_scores(x, self.stats, self.methods).items():
            self.metrics[m].update(s[valid], t)

    def compute(self):
        return {m: {k: float(v) for k, v in c.compute().items()} for m, c in self.metrics.items()}

    def reset(self):
        for c in self.metrics.values():
            c.reset()
