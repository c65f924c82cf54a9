"""Fitting the statistics of SML and HEAT on in-distribution data (one read of the
logits per fit, through the fused core). The statistics themselves are data types:
anomfast.sml.SMLStats and anomfast.heat.HeatStats."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import _fused
from .heat import COV_EPS, HeatStats, as_features
from .inputs import _batches
from .labels import INVALID, NORMAL, LabelMap, as_label_map
from .methods import resolve
from .sml import SMLStats


def fit_sml(logits_batches, labels=None, *, label_map=None, ignore_index: int = 255, missing: str = "global",
            nonfinite: str = "error", num_threads: int = 0) -> SMLStats:
    """Fit SML statistics (per predicted class count, mean and unbiased std of the max
    logit) on in-distribution logits: one tensor (B, C, H, W) or an iterable of them.
    With labels, only pixels the label map calls normal are used. Pixels with a NaN or
    infinite logit raise (nonfinite="ignore": they are left out of the statistics)."""
    if nonfinite not in ("error", "ignore"):
        raise ValueError(f"nonfinite must be 'error' or 'ignore', got {nonfinite!r}")
    lm = as_label_map(label_map, ignore_index) if labels is not None else None
    count = total = totsq = None
    counters = None
    C = None
    for lg, y, _ in _batches(logits_batches, labels):
        x = _fused.as_logits(lg)
        yy = _fused.as_labels(y, x) if y is not None else None
        if C is None:
            C = x.shape[1]
            dev = x.device
            count = torch.zeros(C, dtype=torch.int64, device=dev)
            total = torch.zeros(C, dtype=torch.float64, device=dev)
            totsq = torch.zeros(C, dtype=torch.float64, device=dev)
            counters = _fused.new_counters(dev)
        elif x.shape[1] != C:
            raise ValueError(f"batches disagree on the number of classes: {C} then {x.shape[1]}")
        if x.device != count.device:
            raise ValueError(f"batches are on different devices: {count.device} then {x.device}")
        _fused.fit_pass(x, yy, lm, count, total, totsq, counters, num_threads)
        _fused.check_counters(counters, yy, lm, nonfinite)
    if C is None:
        raise ValueError("fit_sml got no batches")
    return SMLStats(count.cpu().numpy(), total.cpu().numpy(), totsq.cpu().numpy(), missing=missing)


def _semantic_valid(y: torch.Tensor, C: int, label_map, ignore_index) -> torch.Tensor:
    """bool (B, H, W): pixels whose semantic label is a class id in [0, C). Values that
    are neither a class nor ignored raise."""
    if label_map is not None:
        cls = label_map.classify(y)
        if bool((cls == INVALID).any()):
            bad = y[cls == INVALID].flatten()[0].item()
            raise ValueError(f"semantic label value {bad} is not in the label map")
        valid = cls == NORMAL
    else:
        ign = torch.zeros_like(y, dtype=torch.bool)
        for v in ([ignore_index] if isinstance(ignore_index, (int, np.integer)) else list(ignore_index or ())):
            ign |= y == int(v)
        valid = ~ign
    yv = y[valid]
    if yv.numel() and (int(yv.min()) < 0 or int(yv.max()) >= C):
        bad = yv[(yv < 0) | (yv >= C)][0].item()
        raise ValueError(f"semantic label value {bad} is neither a class id in [0, {C}) nor ignored "
                         f"(ignore_index={ignore_index!r}); fit_heat needs semantic (class id) labels")
    return valid


def _triples(logits_batches, features_batches, labels_batches):
    single = [isinstance(v, (torch.Tensor, np.ndarray)) for v in (logits_batches, features_batches, labels_batches)]
    if all(single):
        yield logits_batches, features_batches, labels_batches
        return
    if any(single):
        raise TypeError("fit_heat: pass logits, features and labels either all as single batches (tensors / "
                        "arrays) or all as iterables of aligned batches")
    its = [iter(v) for v in (features_batches, labels_batches)]
    for i, lg in enumerate(logits_batches):
        try:
            f, y = next(its[0]), next(its[1])
        except StopIteration:
            raise ValueError(f"features or labels ran out after {i} batches while logits had more") from None
        yield lg, f, y
    for it, what in zip(its, ("features", "labels")):
        if next(it, None) is not None:
            raise ValueError(f"{what} have more batches than logits")


def fit_heat(logits_batches, features_batches, labels_batches, *, label_map=None, ignore_index=255,
             num_classes: int | None = None, standardize: bool = True, temperature: float = 1.0,
             missing: str = "exclude", num_threads: int = 0) -> HeatStats:
    """Fit HEAT statistics on in-distribution data.

    logits (B, C, H, W), features (B, D, h, w) and *semantic* labels (B, H, W) (class ids
    0..C-1 at the logits' resolution, ``ignore_index`` (an int or a list) ignored, or a
    LabelMap whose normal ids are the class ids; a LabelMap needs an anomaly id, so give it
    one that does not occur, e.g. ``LabelMap(anomaly_ids=[253], void_ids=[254, 255],
    normal_ids=list(range(C)))``): one batch each, or aligned iterables of
    batches. Labels are downsampled to (h, w) by nearest neighbour for the feature
    statistics: per-class means and the tied (pooled within-class) covariance, divided
    by N - 1 as in the source project, + 1e-4 I, accumulated in float64. With
    ``standardize=True`` a second pass computes the raw HEAT score of every valid pixel
    and stores its mean and (population) std, so the data must be iterable twice:
    tensors, lists, or re-iterable loaders (a one-shot iterator or generator is refused).
    """
    if label_map is not None and not isinstance(label_map, LabelMap):
        raise TypeError(f"label_map must be an anomfast.LabelMap, got {type(label_map).__name__}")
    if standardize and any(isinstance(v, Iterator) for v in (logits_batches, features_batches, labels_batches)):
        raise ValueError("fit_heat(standardize=True) reads the data twice (feature statistics, then the score's "
                         "mean/std), but got a one-shot iterator/generator; pass lists, tensors or a re-iterable "
                         "loader, or standardize=False")
    C = D = None
    count = sums = scatter = shift = None
    n_batches = 0
    for lg, f, y in _triples(logits_batches, features_batches, labels_batches):
        x = _fused.as_logits(lg)
        feats = as_features(f, x)
        yy = _fused.as_labels(y, x)
        if C is None:
            C = int(num_classes) if num_classes is not None else x.shape[1]
            if C != x.shape[1]:
                raise ValueError(f"num_classes={num_classes} but the logits have C = {x.shape[1]}")
            D = feats.shape[1]
            count = torch.zeros(C, dtype=torch.int64)
            sums = torch.zeros(C, D, dtype=torch.float64)
            scatter = torch.zeros(D, D, dtype=torch.float64)
        elif x.shape[1] != C or feats.shape[1] != D:
            raise ValueError(f"batches disagree: C = {C}, D = {D} then C = {x.shape[1]}, D = {feats.shape[1]}")
        n_batches += 1
        _semantic_valid(yy, C, label_map, ignore_index)  # checks every label value at full resolution
        h, w = feats.shape[2:]
        ys = F.interpolate(yy.unsqueeze(1).to(torch.float32), size=(h, w), mode="nearest")[:, 0].to(torch.int64)
        valid = _semantic_valid(ys, C, label_map, ignore_index)
        g = feats.permute(0, 2, 3, 1)[valid].to(torch.float64).cpu()     # (N, D)
        k = ys[valid].cpu()
        if g.shape[0] == 0:
            continue
        bad = ~torch.isfinite(g).all(dim=1)
        if bool(bad.any()):  # one NaN would make every class mean NaN ("no fitting pixels")
            raise ValueError(f"fit_heat: batch {n_batches} has {int(bad.sum())} fitting pixel(s) whose features hold "
                             "NaN or inf (e.g. a float16 overflow in the network); the class means and covariance "
                             "need finite features: fix or drop those images")
        if shift is None:
            shift = g.mean(dim=0)  # accumulate around a shift: sum g g^T - n mu mu^T keeps its digits
        g = g - shift
        count += torch.bincount(k, minlength=C)
        sums.index_add_(0, k, g)
        scatter += g.T @ g
    if C is None:
        raise ValueError("fit_heat got no batches")
    N = int(count.sum())
    if N < 2:
        raise ValueError(f"fit_heat saw {N} valid feature pixels; at least 2 are needed")
    n = count.to(torch.float64)
    mu_s = sums / n.clamp_min(1).unsqueeze(1)
    within = scatter - (n.unsqueeze(1) * mu_s).T @ mu_s          # sum_c sum_i (g_i - mu_c)(g_i - mu_c)^T
    # N - 1 (not N), as in the source project's heat_anomaly_detection.py: (X^T X) / (N - 1) + 1e-4 I
    cov = (within + within.T) / (2 * (N - 1)) + COV_EPS * torch.eye(D, dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    mean = mu_s + shift
    mean[count == 0] = float("nan")
    stats = HeatStats(mean.numpy(), cov.numpy(), precision.numpy(), count.numpy(), temperature, missing=missing)
    if not standardize:
        return stats
    # second pass: mean / std of the raw combined score over valid in-distribution pixels
    spec = resolve(["heat"], heat=stats)
    tot_n, tot_mean, tot_m2 = 0, 0.0, 0.0
    for lg, f, y in _triples(logits_batches, features_batches, labels_batches):
        x = _fused.as_logits(lg)
        feats = as_features(f, x, stats)
        yy = _fused.as_labels(y, x)
        _, _, maps = _fused.fused_pass(x, None, spec, want_maps=True, features=feats, num_threads=num_threads)
        s = maps[0][_semantic_valid(yy, C, label_map, ignore_index)].to(torch.float64)
        if s.numel() == 0:
            continue
        if not bool(torch.isfinite(s).all()):
            raise ValueError("fit_heat: non-finite HEAT scores on valid pixels (NaN/inf logits or features)")
        bn, bm = s.numel(), float(s.mean())
        bm2 = float(((s - bm) ** 2).sum())
        delta = bm - tot_mean  # Chan et al.'s pairwise update: exact enough, order-independent to rounding
        tot_m2 += bm2 + delta * delta * tot_n * bn / (tot_n + bn)
        tot_mean += delta * bn / (tot_n + bn)
        tot_n += bn
    if tot_n < 2:
        raise ValueError(f"fit_heat: {tot_n} valid pixels for the standardization; at least 2 are needed")
    std = (tot_m2 / tot_n) ** 0.5
    if not std > 0:
        raise ValueError("fit_heat: the raw HEAT score is constant on the fitting data; use standardize=False")
    return stats.with_standardization(tot_mean, std)
