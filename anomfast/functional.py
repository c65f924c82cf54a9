"""Functional API: score maps, SML fitting and one-call evaluation.

    maps = anomfast.score_maps(logits, methods=("max_logit", "energy"))
    stats = anomfast.fit_sml(in_distribution_logits)
    heat = anomfast.fit_heat(id_logits, id_features, id_semantic_labels)
    anomfast.evaluate(logits, labels, methods=("energy", "heat"), features=features, heat=heat)
    results = anomfast.evaluate(logits, labels, methods=("max_logit", "msp", "energy", "sml"), sml=stats)
    results["energy"].fpr95, results["energy"].bounds["fpr95"]
"""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch

from . import _fused, binning, protocols
from .histogram import Histogram
from .labels import ANOMALY, INVALID, NORMAL, LabelMap, as_label_map
from .methods import CODES, EXTERNAL, coord_to_score, resolve
from .heat import as_features, fit_heat  # noqa: F401  (fit_heat: part of the functional API)
from .sml import SMLStats


def _batches(logits, labels=None, features=None):
    """Triples (logits, labels, features) from tensors/arrays or from aligned iterables
    of batches (labels / features None: not given)."""
    single = isinstance(logits, (torch.Tensor, np.ndarray))
    if single:
        yield logits, labels, features
        return
    others = {"labels": labels, "features": features}
    its = {}
    for name, v in others.items():
        if v is None:
            continue
        if isinstance(v, (torch.Tensor, np.ndarray)):
            raise TypeError(f"logits is an iterable of batches, so {name} must be an iterable of batches too")
        its[name] = iter(v)
    for i, lg in enumerate(logits):
        got = {}
        for name, it in its.items():
            try:
                got[name] = next(it)
            except StopIteration:
                raise ValueError(f"{name} ran out after {i} batches while logits had more") from None
        yield lg, got.get("labels"), got.get("features")
    for name, it in its.items():
        if next(it, None) is not None:
            raise ValueError(f"{name} have more batches than logits")


def score_maps(logits, methods=None, *, features=None, num_threads: int = 0, **method_params) -> dict:
    """Per-pixel score maps {method: float32 (B, H, W)}, higher = more anomalous.
    features (B, D, h, w): the feature map HEAT needs (heat=fit_heat(...) statistics)."""
    spec = resolve(methods, **method_params)
    x = _fused.as_logits(logits)
    _, _, maps = _fused.fused_pass(x, None, spec, want_maps=True, num_threads=num_threads, features=features)
    return {n: coord_to_score(n, maps[j]) for j, n in enumerate(spec.names)}


def fit_sml(logits_batches, labels=None, *, label_map=None, ignore_index: int = 255, missing: str = "global",
            num_threads: int = 0) -> SMLStats:
    """Fit SML statistics (per predicted class count, mean and unbiased std of the max
    logit) on in-distribution logits: one tensor (B, C, H, W) or an iterable of them.
    With labels, only pixels the label map calls normal are used."""
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
        _fused.check_counters(counters, yy, lm)
    if C is None:
        raise ValueError("fit_sml got no batches")
    return SMLStats(count.cpu().numpy(), total.cpu().numpy(), totsq.cpu().numpy(), missing=missing)


class Results(dict):
    """Mapping method -> MetricResult, plus the histograms and pixel counts behind them."""

    histograms: dict
    pixels: dict

    def table(self, digits: int = 2) -> str:
        from .report import results_table
        return results_table(self, digits=digits)

    def __str__(self) -> str:
        return self.table()


def _finalize(hists: dict, conventions: dict):
    return {name: h.finalize(**conventions) for name, h in hists.items()}


def evaluate(logits, labels, methods=None, ignore_index: int = 255, exact: bool = False, *,
             label_map=None, fpr_mode: str = "first", ap_mode: str = "step", tpr_target: float = 0.95,
             per_image: bool = False, subsample: int | None = None, seed: int = 42,
             nonfinite: str = "error", num_threads: int = 0, features=None, protocol: str | None = None,
             **method_params) -> Results:
    """Evaluate anomaly scores of segmentation logits against anomaly labels.

    logits (B, C, H, W) and labels (B, H, W), or iterables of such batches. Returns
    {method: MetricResult} with auroc, ap, fpr95, f1, threshold and certified bounds.
    features (B, D, h, w) (or an iterable of batches aligned with the logits): the
    feature maps HEAT needs, with heat=anomfast.fit_heat(...).

    exact=True keeps every valid pixel's score and sorts (verification, small data).
    per_image=True averages the metrics over images (images lacking anomaly or normal
    pixels are skipped for the metrics they leave undefined) instead of pooling pixels.
    subsample=N evaluates exact metrics on N valid pixels drawn uniformly without
    replacement (a seeded reservoir over the stream of valid pixels, `seed`).
    protocol="ml4cv" reproduces the ml4cv-assignment scripts' evaluation (float16 scores,
    np.random.seed(42) subsample of 1,000,000 pixels, their FPR95 / F1 / SML rules; see
    anomfast/protocols.py); subsample= and seed= then set that draw's size and seed.
    """
    from .metrics import groups_from_scores, mean_over_images, metrics_from_groups
    if nonfinite not in ("error", "ignore"):
        raise ValueError(f"nonfinite must be 'error' or 'ignore', got {nonfinite!r}")
    if sum([bool(exact), bool(per_image), subsample is not None]) > 1:
        raise ValueError("choose at most one of exact=True, per_image=True, subsample=N")
    if subsample is not None and (not isinstance(subsample, (int, np.integer)) or subsample < 1):
        raise ValueError(f"subsample must be a positive number of pixels, got {subsample!r}")
    proto = protocols.check_protocol(protocol)
    if proto is not None:  # collect every valid pixel's score as exact=True does, then the preset's metrics
        protocols.check_options(proto, exact=exact, per_image=per_image, fpr_mode=fpr_mode, ap_mode=ap_mode,
                                tpr_target=tpr_target)
        method_params = protocols.method_params(proto, method_params)
        exact, proto_sample, subsample = True, subsample, None
    spec = resolve(methods, **method_params)
    lm = as_label_map(label_map, ignore_index)
    conventions = dict(fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=tpr_target)
    M = len(spec.names)
    need_maps = exact or subsample is not None
    hist = None
    totals = {"nonfinite": 0, "invalid": 0, "void": 0, "binned": 0}
    per_image_results = {n: [] for n in spec.names}
    kept_scores = [[] for _ in range(M)]
    kept_labels = []
    reservoir = None  # (keys, scores (M, n), labels)
    rng = np.random.default_rng(seed)
    n_batches = 0
    need_features = "heat" in spec.names
    for lg, y, f in _batches(logits, labels, features if need_features else None):
        x = _fused.as_logits(lg)
        yy = _fused.as_labels(y, x)
        if need_features:
            f = as_features(f, x, spec.heat)
        n_batches += 1
        images = ([(x[i:i + 1], yy[i:i + 1], None if f is None else f[i:i + 1]) for i in range(x.shape[0])]
                  if per_image else [(x, yy, f)])
        for xi, yi, fi in images:
            counters = _fused.new_counters(x.device)
            h = None
            if per_image:
                h = _fused.new_histogram(M, x.device)
            elif not need_maps:
                if hist is None:
                    hist = _fused.new_histogram(M, x.device)
                h = hist
            h, counters, maps = _fused.fused_pass(xi, yi, spec, label_map=lm, hist=h, counters=counters,
                                                  want_maps=need_maps, num_threads=num_threads, features=fi)
            summary = _fused.check_counters(counters, yi, lm, nonfinite)
            for k in totals:
                totals[k] += summary[k]
            if per_image:
                for j, n in enumerate(spec.names):
                    hj = Histogram(n, h[j].cpu(), spec.params_of(n))
                    per_image_results[n].append(hj.finalize(**conventions))
            if need_maps:
                cls = lm.classify(yi).flatten()
                valid = (cls == NORMAL) | (cls == ANOMALY)
                if nonfinite == "ignore":
                    valid &= torch.isfinite(xi.float()).all(dim=1).flatten()
                    for j, code in enumerate(spec.codes):  # the core also skips non-finite HEAT / external scores
                        if code in (CODES["heat"], EXTERNAL):
                            valid &= torch.isfinite(maps[j]).flatten()
                sc = maps.reshape(M, -1)[:, valid].cpu()
                lab = (cls[valid] == ANOMALY).cpu()
                if exact:
                    for j in range(M):
                        kept_scores[j].append(sc[j].numpy())
                    kept_labels.append(lab.numpy())
                else:
                    keys = rng.random(lab.numel())
                    if reservoir is not None:
                        keys = np.concatenate([reservoir[0], keys])
                        sc = torch.cat([reservoir[1], sc], dim=1)
                        lab = torch.cat([reservoir[2], lab])
                    if keys.size > subsample:
                        sel = np.argpartition(keys, subsample - 1)[:subsample]
                        sel.sort()
                        keys, sc, lab = keys[sel], sc[:, torch.from_numpy(sel)], lab[torch.from_numpy(sel)]
                    reservoir = (keys, sc, lab)
    if n_batches == 0:
        raise ValueError("evaluate got no batches")
    results = Results()
    results.pixels = totals
    results.histograms = {}
    if per_image:
        for n in spec.names:
            r = mean_over_images(per_image_results[n])
            r.method, r.params = n, spec.params_of(n)
            results[n] = r
        return results
    if need_maps:
        if exact:
            labs = np.concatenate(kept_labels) if kept_labels else np.zeros(0, bool)
            cols = [np.concatenate(kept_scores[j]) if kept_scores[j] else np.zeros(0, np.float32) for j in range(M)]
            if proto is not None:
                results.update(protocols.ml4cv_results(spec.names, cols, labs, sample=proto_sample, seed=seed))
                for r in results.values():
                    r.params = spec.params_of(r.method)
                return results
        else:
            if subsample is not None and reservoir is not None and reservoir[2].numel() < subsample:
                warnings.warn(f"subsample={subsample} but only {reservoir[2].numel()} valid pixels exist; "
                              "all of them are used", RuntimeWarning, stacklevel=2)
            labs = reservoir[2].numpy() if reservoir is not None else np.zeros(0, bool)
            cols = [reservoir[1][j].numpy() if reservoir is not None else np.zeros(0, np.float32) for j in range(M)]
        for j, n in enumerate(spec.names):
            s = coord_to_score(n, cols[j].astype(np.float64))
            pos, neg, lo, hi = groups_from_scores(s, labs)
            r = metrics_from_groups(pos, neg, lo, hi, exact=True, **conventions)
            r.method, r.params = n, spec.params_of(n)
            if subsample is not None:
                r.definitions["subsample"] = f"{labs.size} valid pixels drawn uniformly without replacement, seed {seed}"
            results[n] = r
        return results
    for j, n in enumerate(spec.names):
        results.histograms[n] = Histogram(n, hist[j].cpu(), spec.params_of(n))
    results.update(_finalize(results.histograms, conventions))
    return results


def evaluate_scores(scores, labels, ignore_index: int = 255, exact: bool = False, *, label_map=None,
                    fpr_mode: str = "first", ap_mode: str = "step", tpr_target: float = 0.95,
                    nonfinite: str = "error") -> Results:
    """Certified metrics for per-pixel scores computed elsewhere (your own method).

    scores: a tensor / array of any shape (e.g. (B, H, W)), higher = more anomalous, or a
    dict {name: scores} for several methods; labels: integers of the same shape. The
    scores are binned with the same rule as the fused core (as float32), so the result,
    its bounds and its Histogram behave exactly like a built-in method's; exact=True
    sorts instead. Names of built-in methods are refused (their histograms hold the
    core's coordinates, which differ for msp). Non-finite scores on valid pixels raise
    (``nonfinite="ignore"``: skipped and counted in ``results.pixels``).
    """
    from .metrics import groups_from_scores, metrics_from_groups
    if nonfinite not in ("error", "ignore"):
        raise ValueError(f"nonfinite must be 'error' or 'ignore', got {nonfinite!r}")
    named = scores if isinstance(scores, dict) else {"custom": scores}
    if not named:
        raise ValueError("evaluate_scores got no scores")
    lm = as_label_map(label_map, ignore_index)
    y = torch.as_tensor(labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels))
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(f"labels must be an integer array, got {y.dtype}")
    cls = lm.classify(y.to(torch.int64))
    if bool((cls == INVALID).any()):
        bad = y[cls == INVALID].flatten()[0].item()
        raise ValueError(f"label value {bad} is neither normal, anomaly nor void in the label map {lm}")
    valid = ((cls == NORMAL) | (cls == ANOMALY)).numpy()
    anomaly = (cls == ANOMALY).numpy()
    conventions = dict(fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=tpr_target)
    results = Results()
    results.histograms, results.pixels = {}, {}
    for name, s in named.items():
        if not isinstance(name, str) or name in CODES:
            raise ValueError(f"score name {name!r} is a built-in method (or not a string); evaluate built-in "
                             "methods from logits with anomfast.evaluate, or pick another name")
        s = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        if not np.issubdtype(s.dtype, np.floating) and not np.issubdtype(s.dtype, np.integer):
            raise TypeError(f"scores {name!r} must be numbers, got {s.dtype}")
        if s.shape != tuple(y.shape):
            raise ValueError(f"scores {name!r} have shape {s.shape} but labels {tuple(y.shape)}; they must match")
        s = s.astype(np.float32)   # the bins are defined on float32 values
        fin = np.isfinite(s)
        bad = valid & ~fin
        if bad.any() and nonfinite == "error":
            raise ValueError(f"scores {name!r} have {int(bad.sum())} non-finite values on valid pixels "
                             "(nonfinite='ignore' skips them)")
        keep = valid & fin
        results.pixels[name] = {"binned": int(keep.sum()), "nonfinite": int(bad.sum()),
                                "void": int((~valid).sum()), "invalid": 0}
        if exact:
            sv = s[keep].astype(np.float64)
            pos, neg, lo, hi = groups_from_scores(sv, anomaly[keep])
            r = metrics_from_groups(pos, neg, lo, hi, exact=True, **conventions)
            r.method, r.params = name, {}
        else:
            idx = binning.bin_index(s[keep])
            counts = np.stack([np.bincount(idx[~anomaly[keep]], minlength=binning.NBINS),
                               np.bincount(idx[anomaly[keep]], minlength=binning.NBINS)]).astype(np.int64)
            h = Histogram(name, torch.from_numpy(counts), {"source": "evaluate_scores"})
            results.histograms[name] = h
            r = h.finalize(**conventions)
        results[name] = r
    return results
