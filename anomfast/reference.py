"""Plain float64 PyTorch reference: the specification of every score, of SML fitting
and of the binning rule. Tests compare the compiled cores with it; benchmarks use it
as the baseline. Written straight from the formulas, for clarity, not speed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .labels import ANOMALY, NORMAL, LabelMap


def _f64(logits) -> torch.Tensor:
    x = torch.as_tensor(logits)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    return x.to(torch.float64)


def score(logits, method: str, *, temperature: float = 1.0, sml_mean=None, sml_std=None,
          entropy_normalize: bool = False, gen_gamma: float = 0.1) -> torch.Tensor:
    """Float64 score map (B, H, W), higher = more anomalous."""
    x = _f64(logits)
    C = x.shape[1]
    if method == "max_logit":
        return -x.max(dim=1).values
    if method == "msp":
        return -torch.softmax(x, dim=1).max(dim=1).values
    if method == "energy":
        return -temperature * torch.logsumexp(x / temperature, dim=1)
    if method == "sml":
        m, k = x.max(dim=1)
        mean = torch.as_tensor(np.asarray(sml_mean), dtype=torch.float64, device=x.device)
        std = torch.as_tensor(np.asarray(sml_std), dtype=torch.float64, device=x.device)
        return -(m - mean[k]) / std[k]
    if method == "entropy":
        logp = torch.log_softmax(x, dim=1)
        h = -(logp.exp() * logp).sum(dim=1)
        if entropy_normalize:
            return h / math.log(C) if C > 1 else torch.zeros_like(h)
        return h
    if method == "gen":
        p = torch.softmax(x, dim=1)
        return (p.pow(gen_gamma) * (1 - p).pow(gen_gamma)).sum(dim=1)
    raise ValueError(f"reference has no method {method!r}")


def coordinate(logits, method: str, **params) -> torch.Tensor:
    """The bin coordinate: the score, except msp whose coordinate is 1 - max softmax,
    computed as sum_{c != k} e_c / sum_c e_c (no cancellation near max softmax = 1)."""
    if method == "msp":
        x = _f64(logits)
        m, k = x.max(dim=1, keepdim=True)
        e = torch.exp(x - m)
        e_wo = e.scatter(1, k, 0.0).sum(dim=1)
        return e_wo / (1.0 + e_wo)
    return score(logits, method, **params)


def fit_sml(logits_batches, labels_batches=None, label_map: LabelMap | None = None):
    """(count, mean, std) per predicted class, float64, unbiased std; classes with < 2
    pixels get NaN here (the fast path's fallback is tested separately)."""
    if isinstance(logits_batches, (torch.Tensor, np.ndarray)):
        logits_batches = [logits_batches]
        labels_batches = None if labels_batches is None else [labels_batches]
    ms, ks = [], []
    for i, lg in enumerate(logits_batches):
        x = _f64(lg)
        m, k = x.max(dim=1)
        if labels_batches is not None:
            cls = (label_map or LabelMap.default()).classify(torch.as_tensor(labels_batches[i]))
            keep = cls == NORMAL
            m, k = m[keep], k[keep]
        ms.append(m.flatten())
        ks.append(k.flatten())
        C = x.shape[1]
    m, k = torch.cat(ms), torch.cat(ks)
    count = torch.bincount(k, minlength=C).to(torch.float64)
    s = torch.zeros(C, dtype=torch.float64).index_add_(0, k, m)
    mean = s / count
    dev = m - mean[k]
    var = torch.zeros(C, dtype=torch.float64).index_add_(0, k, dev * dev) / (count - 1)
    return count.to(torch.int64).numpy(), mean.numpy(), var.sqrt().numpy()


def bin_index(t) -> torch.Tensor:
    """The binning rule, written from its definition with frexp (independent of the
    bit-twiddling in csrc/common/binning.h and anomfast/binning.py).

    For float32 t: sign s, |t| = f * 2^E with f in [0.5, 1) (frexp), octave e = E - 1.
    Per sign: magnitude bin 0 for |t| < 2^-32, 1 + (e + 32) * 2^13 + floor((2f - 1) * 2^13)
    for 2^-32 <= |t| < 2^32, and 2 + 64 * 2^13 - 1 above. Negative values are mirrored
    below the positive ones; -0.0 counts as +0.0.
    """
    t = torch.as_tensor(t, dtype=torch.float32).to(torch.float64)  # exact widening
    nmag = 2 + (64 << 13)
    a = t.abs()
    f, E = torch.frexp(a)
    e = E.to(torch.int64) - 1
    frac = torch.floor((2 * f - 1) * (1 << 13)).to(torch.int64)
    mag = 1 + (e + 32) * (1 << 13) + frac
    mag = torch.where(a < 2.0 ** -32, torch.zeros_like(mag), mag)
    mag = torch.where(a >= 2.0 ** 32, torch.full_like(mag, nmag - 1), mag)
    neg = t < 0
    return torch.where(neg, nmag - 1 - mag, nmag + mag)


def histogram(logits, labels, method: str, label_map: LabelMap | None = None, **params) -> torch.Tensor:
    """(2, NBINS) int64 counts [normal, anomaly] of the float32-rounded reference coordinate."""
    t = coordinate(logits, method, **params).to(torch.float32)
    cls = (label_map or LabelMap.default()).classify(torch.as_tensor(labels))
    nb = 2 * (2 + (64 << 13))
    out = torch.zeros((2, nb), dtype=torch.int64)
    idx = bin_index(t)
    for c, row in ((NORMAL, 0), (ANOMALY, 1)):
        sel = cls == c
        out[row] = torch.bincount(idx[sel].flatten(), minlength=nb)
    return out
