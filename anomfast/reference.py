"""Plain float64 PyTorch reference: the specification of every score, of SML fitting
and of the binning rule. Tests compare the compiled cores with it; benchmarks use it
as the baseline. Written straight from the formulas, for clarity, not speed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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
        # u = 1 - max softmax = sum_{c != k} e_c / sum_c e_c: no cancellation near max softmax = 1
        m, k = x.max(dim=1, keepdim=True)
        e_wo = torch.exp(x - m).scatter(1, k, 0.0).sum(dim=1)
        return e_wo / (1.0 + e_wo)
    if method == "energy":
        # -T logsumexp(l / T) = -(m + T log1p(S_T)), S_T = sum_{c != k} e^((l_c - m) / T):
        # log1p keeps energies just below -m (saturated 2-class outputs) exact, where
        # logsumexp rounds log(1 + 1e-30) to 0
        m, k = x.max(dim=1, keepdim=True)
        sT = torch.exp((x - m) / temperature).scatter(1, k, 0.0).sum(dim=1)
        return -(m[:, 0] + temperature * torch.log1p(sT))
    if method == "sml":
        m, k = x.max(dim=1)
        mean = torch.as_tensor(np.asarray(sml_mean), dtype=torch.float64, device=x.device)
        std = torch.as_tensor(np.asarray(sml_std), dtype=torch.float64, device=x.device)
        return -(m - mean[k]) / std[k]
    if method in ("entropy", "gen"):
        # written without cancellation: with S = sum_{c != k} e^(l_c - m), log p_c =
        # (l_c - m) - log1p(S) and 1 - p_k = S / (1 + S); log_softmax / 1 - p would round
        # the argmax's terms to 0 on confident pixels (1 - 1e-26 == 1 in float64), which
        # for margins of 30-80 dominate GEN and are a 1/margin share of the entropy
        m, k = x.max(dim=1, keepdim=True)
        d = x - m
        e = torch.exp(d)
        S = e.scatter(1, k, 0.0).sum(dim=1, keepdim=True)
        z = 1.0 + S
        if method == "entropy":
            h = (torch.log1p(S) - (e * d).sum(dim=1, keepdim=True) / z)[:, 0]
            if entropy_normalize:
                return h / math.log(C) if C > 1 else torch.zeros_like(h)
            return h
        p = e / z
        one_minus = ((z - e) / z).scatter(1, k, S / z)
        return (p.pow(gen_gamma) * one_minus.pow(gen_gamma)).sum(dim=1)
    raise ValueError(f"reference has no method {method!r}")


def coordinate(logits, method: str, **params) -> torch.Tensor:
    """The bin coordinate: the score itself, for every method (msp's score is 1 - max softmax)."""
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

    For float32 t: sign s, |t| = f * 2^E with f in [0.5, 1) (frexp; subnormals included),
    octave o = E + 148 (0 for the smallest subnormal 2^-149, 276 for the top octave
    [2^127, 2^128)). Per sign: magnitude bin 0 for t = 0, 1 + o * 2^13 + floor((2f - 1) *
    2^13) for finite t != 0, and 2 + 277 * 2^13 - 1 for infinity. Negative values are
    mirrored below the positive ones; -0.0 counts as +0.0.
    """
    t = torch.as_tensor(t, dtype=torch.float32).to(torch.float64)  # exact widening
    nmag = 2 + (277 << 13)
    a = t.abs()
    f, E = torch.frexp(a)
    o = E.to(torch.int64) + 148
    frac = torch.floor((2 * f - 1) * (1 << 13)).to(torch.int64)
    mag = 1 + o * (1 << 13) + frac
    mag = torch.where(a == 0, torch.zeros_like(mag), mag)
    mag = torch.where(torch.isinf(a), torch.full_like(mag, nmag - 1), mag)
    neg = t < 0
    return torch.where(neg, nmag - 1 - mag, nmag + mag)


def histogram(logits, labels, method: str, label_map: LabelMap | None = None, **params) -> torch.Tensor:
    """(2, NBINS) int64 counts [normal, anomaly] of the float32-rounded reference coordinate."""
    t = coordinate(logits, method, **params).to(torch.float32)
    cls = (label_map or LabelMap.default()).classify(torch.as_tensor(labels))
    nb = 2 * (2 + (277 << 13))
    out = torch.zeros((2, nb), dtype=torch.int64)
    idx = bin_index(t)
    for c, row in ((NORMAL, 0), (ANOMALY, 1)):
        sel = cls == c
        out[row] = torch.bincount(idx[sel].flatten(), minlength=nb)
    return out


# ---------------------------------------------------------------------------- HEAT

def heat_distance(features, mean, precision, size=None) -> torch.Tensor:
    """M: min_c sqrt((f - mu_c)^T P (f - mu_c)) per feature vector, the quadratic form
    evaluated directly (no expansion), float64 (B, h, w); bilinearly resized to `size`
    (align_corners=False) when given. Classes whose mean is NaN (no fitting pixels) are
    left out of the min."""
    f = torch.as_tensor(features).to(torch.float64)
    mu = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
    P = torch.as_tensor(np.asarray(precision), dtype=torch.float64)
    mu = mu[torch.isfinite(mu).all(dim=1)]
    diff = f.unsqueeze(1) - mu[None, :, :, None, None]                  # (B, C, D, h, w)
    d2 = torch.einsum("bcdhw,de,bcehw->bchw", diff, P, diff)
    d = d2.clamp_min(0).sqrt().amin(dim=1)
    if size is not None and tuple(d.shape[1:]) != tuple(size):
        d = F.interpolate(d.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return d


def heat_score(logits, features, mean, precision, *, temperature: float = 1.0, score_mean: float | None = None,
               score_std: float | None = None) -> torch.Tensor:
    """HEAT, float64 (B, H, W), straight from the definition (anomfast/heat.py)."""
    x = _f64(logits)
    B, C, H, W = x.shape
    E = -temperature * torch.logsumexp(x / temperature, dim=1)
    M = heat_distance(features, mean, precision, size=(H, W))
    p = torch.softmax(x, dim=1)
    q = F.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=True)
    K = (p * torch.log((p + 1e-8) / (q + 1e-8))).sum(dim=1)
    ent = -(p * torch.log_softmax(x, dim=1)).sum(dim=1)
    r = ((p - 1.0 / C) ** 2).sum(dim=1, keepdim=True)
    v = F.avg_pool2d(r, 3, stride=1, padding=1, count_include_pad=True)[:, 0]
    wE, wM, wK = 1.0 / (ent + 1e-6), torch.ones_like(ent), 1.0 / (v + 1e-6)
    tot = wE + wM + wK
    s = (wE / tot) * E + (wM / tot) * M + (wK / tot) * K
    if score_std is not None:
        s = (s - score_mean) / score_std
    return s


def fit_heat(logits_batches, features_batches, labels_batches, ignore_index: int = 255, temperature: float = 1.0,
             standardize: bool = True):
    """(count, mean, cov, precision, score_mean, score_std) from the definition: labels
    downsampled by nearest neighbour to the feature size, per-class means, tied covariance
    (1/(N - 1)) sum_c sum_i (f_i - mu_c)(f_i - mu_c)^T + 1e-4 I (two passes, no shifted sums),
    then mean / population std of the raw HEAT score on pixels with a class label."""
    if isinstance(logits_batches, (torch.Tensor, np.ndarray)):
        logits_batches, features_batches, labels_batches = [logits_batches], [features_batches], [labels_batches]
    fs, ks = [], []
    for f, y in zip(features_batches, labels_batches):
        f = torch.as_tensor(f).to(torch.float64)
        y = torch.as_tensor(y).to(torch.int64)
        ys = F.interpolate(y.unsqueeze(1).double(), size=f.shape[2:], mode="nearest")[:, 0].to(torch.int64)
        keep = ys != ignore_index
        fs.append(f.permute(0, 2, 3, 1)[keep])
        ks.append(ys[keep])
    C = torch.as_tensor(logits_batches[0]).shape[1]
    f, k = torch.cat(fs), torch.cat(ks)
    count = torch.bincount(k, minlength=C)
    mean = torch.stack([f[k == c].mean(dim=0) if count[c] > 0 else torch.full((f.shape[1],), float("nan"),
                                                                               dtype=torch.float64)
                        for c in range(C)])
    dev = f - mean[k]
    cov = dev.T @ dev / (f.shape[0] - 1) + 1e-4 * torch.eye(f.shape[1], dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    sm = ss = None
    if standardize:
        vals = []
        for lg, ft, y in zip(logits_batches, features_batches, labels_batches):
            s = heat_score(lg, ft, mean.numpy(), prec.numpy(), temperature=temperature)
            vals.append(s[torch.as_tensor(y) != ignore_index])
        v = torch.cat(vals)
        sm, ss = float(v.mean()), float(v.std(unbiased=False))
    return count.numpy(), mean.numpy(), cov.numpy(), prec.numpy(), sm, ss


# ------------------------------------------------------------- SML post-processing

def sml_postprocess(score, pred, boundary_suppression: bool = True, smoothing: bool = True,
                    boundary_padding: str = "original") -> np.ndarray:
    """Boundary suppression and dilated smoothing of Jung et al. (official code), float64
    NumPy, written from the description with explicit neighbourhood loops:

    - boundary: pixels whose 3x3-cross max of the class map differs from its 3x3-square
      min; a neighbour outside the image counts as 0 in the max and 1.0 in the min with
      boundary_padding="original" (the official code's kornia), is left out of both with
      "geodesic";
    - 4 iterations i = 0..3: expand the boundary to every pixel within L1 distance
      4 - i - 1 (0 in the last iteration); each boundary pixel becomes the mean of the
      non-boundary values of its 3x3 neighbourhood in the edge-padded image (keeps its
      value if there are none); non-boundary pixels keep theirs;
    - smoothing: edge padding 18, sum of g[a, b] * x[y + 6 (a - 3), x + 6 (b - 3)] over the
      normalised 7x7 Gaussian g of sigma 1.
    """
    s = np.array(score, dtype=np.float64)
    k = np.asarray(pred).astype(np.int64)
    if s.ndim == 2:
        s, k = s[None], k[None]
    B, H, W = s.shape
    out = s.copy()
    if boundary_suppression:
        if boundary_padding not in ("original", "geodesic"):
            raise ValueError(f"unknown boundary_padding {boundary_padding!r}")
        outside_max, outside_min = (0, 1) if boundary_padding == "original" else (None, None)

        def values(b, i, j, offsets, outside):
            """class ids at the offsets; `outside` for those off the image (None: skip them)"""
            inside = [0 <= i + di < H and 0 <= j + dj < W for di, dj in offsets]
            return [k[b, i + di, j + dj] if ok else outside for (di, dj), ok in zip(offsets, inside)
                    if ok or outside is not None]

        cross_offsets = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
        square_offsets = tuple((di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1))
        bnd = np.zeros((B, H, W), bool)
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    dil = max(values(b, i, j, cross_offsets, outside_max))
                    ero = min(values(b, i, j, square_offsets, outside_min))
                    bnd[b, i, j] = dil != ero
        for it in range(4):
            r = 0 if it == 3 else 4 - it - 1
            exp = np.zeros_like(bnd)
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    if abs(di) + abs(dj) > r or abs(di) >= H or abs(dj) >= W:
                        continue
                    sh = np.zeros_like(bnd)
                    sh[:, max(0, -di):H - max(0, di), max(0, -dj):W - max(0, dj)] = \
                        bnd[:, max(0, di):H - max(0, -di), max(0, dj):W - max(0, -dj)]
                    exp |= sh
            keep = ~exp
            xp = np.pad(out * keep, ((0, 0), (1, 1), (1, 1)), mode="edge")
            kp = np.pad(keep.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
            tot = sum(xp[:, a:a + H, c:c + W] for a in range(3) for c in range(3))
            n = sum(kp[:, a:a + H, c:c + W] for a in range(3) for c in range(3))
            with np.errstate(invalid="ignore", divide="ignore"):
                avg = np.where(n == 0, out, tot / np.where(n == 0, 1, n))
            out = np.where(keep, out, avg)
    if smoothing:
        g = np.exp(-((np.arange(7)[:, None] - 3.0) ** 2 + (np.arange(7)[None, :] - 3.0) ** 2) / 2.0)
        g /= g.sum()
        xp = np.pad(out, ((0, 0), (18, 18), (18, 18)), mode="edge")
        out = sum(g[a, c] * xp[:, 6 * a:6 * a + H, 6 * c:6 * c + W] for a in range(7) for c in range(7))
    return out
