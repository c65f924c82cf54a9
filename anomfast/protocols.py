"""Evaluation protocols: presets that reproduce how a published table was computed.

``protocol="default"`` (or None) is anomfast's own definitions (anomfast/metrics.py).
``protocol="ml4cv"`` reproduces the evaluation of the public ml4cv-assignment scripts
(``anomaly_detection/simple_max_logits.py``, ``maximum_softmax_probability.py``,
``standardized_max_logits.py``, ``energy_score_anomaly_detection.py``; their shared
``evaluate_anomaly_detection``), whose protocol differs from the clean definitions in
ways that move the numbers:

1. every pixel's score is cast to **float16** before anything else (many ties);
2. when there are more than 1,000,000 pixels, a subsample of 1,000,000 is drawn with
   ``np.random.seed(42); np.random.choice(total, 1_000_000, replace=False)`` over the
   dataset-order concatenation of all pixels; then non-finite (float16) scores are dropped;
3. FPR95 = ``fpr[argmin |tpr - 0.95|]`` on ``sklearn.metrics.roc_curve`` with its default
   ``drop_intermediate=True`` (the point nearest TPR 0.95, possibly below it; not the first
   point with TPR >= 0.95);
4. F1 = 2PR / (P + R + 1e-8) on ``precision_recall_curve``, best over all but its last
   point (the appended (P=1, R=0)); threshold = the curve's threshold at the first maximum
   (thresholds ascend there, so ties go to the LOWEST threshold; anomfast: the highest);
5. SML statistics with the population std, 1e-8 added to the std, std 1 and the running
   mean for classes predicted at most once (``SMLStats(convention="ml4cv")``, applied
   automatically to the statistics under this protocol);

AUROC = ``roc_auc_score`` (trapezoid on the dropped ROC curve) and AUPR =
``average_precision_score`` (step sum on the precision-recall curve) of the float16
subsample. Everything here is NumPy (scikit-learn >= 1.1 semantics; the tests check
against scikit-learn itself).

Pixels: the scripts drop none (every pixel that is not the anomaly class counts as
normal, StreetHazards' "unlabeled" included). anomfast draws over the pixels the label
map calls valid, in dataset order; to reproduce the scripts on data with void ids, pass a
label map without void ids (e.g. ``LabelMap(anomaly_ids=[13], void_ids=[], normal_ids="rest")``).
With ``nonfinite="ignore"`` pixels with NaN/inf logits are dropped before the draw (the
scripts would draw them and drop them after), so the sample can differ then.

Scores are the fused core's float32 per-pixel maps, not a re-implementation in PyTorch:
where the core's float32 value and PyTorch's differ in the last bit (softmax, logsumexp,
SML's division), the float16 cast can land one float16 step apart, for scores within
that bit of a float16 rounding boundary.

Memory: the draw is bit for bit ``np.random.choice(total, n, replace=False)``, which
builds a permutation of ``total`` int64 indices (8 bytes per pixel, 8 GiB for 10^9 pixels),
on top of the collected scores (4 bytes per pixel and method, then 2 as float16). Above
``EXACT_DRAW_LIMIT`` pixels a same-size uniform sample without replacement is drawn with
``np.random.default_rng(seed)`` instead (O(n) memory), with a RuntimeWarning: the same
distribution, not the same pixels.

Provenance: the seed report's table itself (``assets/model_method_comparison.md``, three
tables, HEAT = Energy) is written by the same repository's
``visualizations/create_comparison_table.py``, whose ``evaluate_method`` differs again:
float32 scores (no float16 cast), the same seeded draw, FPR95 = fpr at the FIRST
``tpr >= 0.95`` of ``roc_curve`` with drop_intermediate=True (1.0 if none), F1 with 1e-10
instead of 1e-8, SML statistics from ``torch.std()`` (unbiased; mean 0 and std 1 for a
class never predicted, NaN for a class predicted once), no non-finite filter, and HEAT
computed as the energy score. This preset follows the per-method scripts above.

The streaming histogram ``Evaluator`` cannot apply this protocol (it keeps no per-pixel
scores to cast, draw from and sort); use ``anomfast.evaluate(..., protocol="ml4cv")`` or
``anomfast eval --protocol ml4cv``.
"""
from __future__ import annotations

import numpy as np

from ._warn import warn
from .metrics import METRIC_NAMES, MetricResult, groups_from_scores, metrics_from_groups

PROTOCOLS = ("default", "ml4cv")
ML4CV_SAMPLE = 1_000_000   # the scripts' MAX_PIXELS_EVALUATION
ML4CV_SEED = 42            # the scripts' RANDOM_SEED
ML4CV_TPR = 0.95
ML4CV_F1_EPS = 1e-8
EXACT_DRAW_LIMIT = 1 << 28  # pixels: the exact draw's permutation then takes 2 GiB

ML4CV_DEFINITIONS = {
    "protocol": "ml4cv (ml4cv-assignment anomaly_detection/*.py, evaluate_anomaly_detection)",
    "positive": "anomaly (higher score = more anomalous)",
    "scores": "the fused core's float32 score cast to float16; non-finite float16 scores dropped after the draw",
    "auroc": "sklearn roc_auc_score of the float16 scores (trapezoid on roc_curve, drop_intermediate=True)",
    "ap": "sklearn average_precision_score of the float16 scores",
    "fpr95": "fpr[argmin |tpr - 0.95|] on sklearn roc_curve (drop_intermediate=True, (0,0) start): the point "
             "nearest TPR 0.95, first among equals",
    "f1": "max of 2PR/(P+R+1e-8) over precision_recall_curve without its last point; first maximum "
          "(lowest threshold among ties)",
    "threshold": "precision_recall_curve threshold of the best F1 (a float16 value; anomaly iff score >= threshold)",
    "sml": "SML statistics with convention='ml4cv': population std + 1e-8, std 1 (+1e-8) and the running mean "
           "for classes predicted at most once",
    "bounds": "exact: bounds equal the values",
}


def check_protocol(protocol) -> str | None:
    """None for anomfast's own definitions, else the preset's name (validated)."""
    if protocol is None or protocol == "default":
        return None
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


def check_options(protocol: str, *, exact=False, per_image=False, fpr_mode="first", ap_mode="step",
                  tpr_target=0.95) -> None:
    """The preset fixes the definitions; other options would be silently overridden."""
    clash = [name for name, bad in (("exact=True", exact), ("per_image=True", per_image),
                                    (f"fpr_mode={fpr_mode!r}", fpr_mode != "first"),
                                    (f"ap_mode={ap_mode!r}", ap_mode != "step"),
                                    (f"tpr_target={tpr_target!r}", tpr_target != 0.95)) if bad]
    if clash:
        raise ValueError(f"protocol={protocol!r} fixes its own definitions (float16 scores, seeded subsample, "
                         f"sklearn curves); it cannot be combined with {', '.join(clash)}")


def method_params(protocol: str, params: dict) -> dict:
    """Method parameters under the protocol: SML statistics in the ml4cv convention."""
    from .sml import SMLStats  # here: the CLI reads PROTOCOLS without importing torch
    out = dict(params)
    for key in ("sml", "sml_stats"):
        if isinstance(out.get(key), SMLStats):
            out[key] = out[key].with_convention("ml4cv")
    return out


# --------------------------------------------------------------------------- the draw

def ml4cv_indices(total: int, n: int = ML4CV_SAMPLE, seed: int = ML4CV_SEED,
                  exact_limit: int | None = None) -> np.ndarray | None:
    """Indices of the subsample, or None when total <= n (the scripts keep every pixel).

    Bit for bit ``np.random.seed(seed); np.random.choice(total, n, replace=False)``
    (through a private RandomState: NumPy's global state is left alone) when total <=
    exact_limit (default EXACT_DRAW_LIMIT); above it, a uniform draw of n distinct
    indices from ``np.random.default_rng(seed)`` with a RuntimeWarning."""
    total, n = int(total), int(n)
    if n < 1:
        raise ValueError(f"the subsample size must be a positive number of pixels, got {n}")
    if total <= n:
        return None
    limit = EXACT_DRAW_LIMIT if exact_limit is None else int(exact_limit)
    if total > limit:
        warn(f"protocol ml4cv: {total} pixels exceed the exact-draw limit of {limit} (np.random.choice "
             f"without replacement builds an {8 * total / 2**30:.1f} GiB permutation); drawing a "
             f"same-size uniform sample with np.random.default_rng({seed}) instead: same distribution, "
             "not the scripts' pixels (raise anomfast.protocols.EXACT_DRAW_LIMIT to draw exactly)")
        return np.random.default_rng(seed).choice(total, n, replace=False)
    return np.random.RandomState(seed).choice(total, n, replace=False)


# --------------------------------------------------------------------------- the metrics

def _keep_curve_points(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """roc_curve's drop_intermediate=True: keep the ends and every point where the step
    in (fps, tps) changes (a zero second difference in both is dropped)."""
    if fps.size <= 2:
        return np.arange(fps.size)
    return np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])


def ml4cv_metrics(scores, labels) -> MetricResult:
    """The scripts' evaluate_anomaly_detection on given scores (float16 as they cast
    them; any float works) and labels (1 = anomaly): drops non-finite scores, then AUROC,
    AP, FPR95, best F1 and its threshold with the definitions of the module docstring.
    Undefined cases (no anomaly or no normal pixel; scikit-learn raises there) give
    anomfast's conventions (NaN with a warning) and say so in ``warnings``."""
    s = np.asarray(scores).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size != y.size:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    fin = np.isfinite(s)
    dropped = int(s.size - fin.sum())
    s, y = s[fin].astype(np.float64), y[fin]  # float16 -> float64 is exact
    pos, neg, lo, hi = groups_from_scores(s, y)
    P, N = int(pos.sum()), int(neg.sum())
    if P == 0 or N == 0:
        res = metrics_from_groups(pos, neg, lo, hi, exact=True)
        res.warnings.append("protocol ml4cv: only one class present (scikit-learn raises here); anomfast's "
                            "conventions used for the undefined case")
    else:
        # cumulative counts per distinct score, descending = sklearn's _binary_clf_curve
        tps = np.cumsum(pos).astype(np.float64)
        fps = np.cumsum(neg).astype(np.float64)
        keep = _keep_curve_points(fps, tps)
        rt, rf = np.r_[0.0, tps[keep]], np.r_[0.0, fps[keep]]
        tpr, fpr = rt / rt[-1], rf / rf[-1]
        auroc = float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())
        i95 = int(np.argmin(np.abs(tpr - ML4CV_TPR)))
        fpr95 = float(fpr[i95])
        fpr95_thr = float(np.r_[np.inf, lo[keep]][i95])  # roc_curve's threshold of that point
        # precision_recall_curve, ascending thresholds, without the appended (1, 0) point
        precision = (tps / (tps + fps))[::-1]
        recall = (tps / tps[-1])[::-1]
        ap = float(-np.sum(np.diff(np.r_[recall, 0.0]) * precision))
        f1 = 2 * (precision * recall) / (precision + recall + ML4CV_F1_EPS)
        b = int(np.argmax(f1))
        thr = float(lo[::-1][b])
        res = MetricResult(auroc=auroc, ap=ap, fpr95=fpr95, f1=float(f1[b]), threshold=thr,
                           fpr95_threshold=fpr95_thr, n_pos=P, n_neg=N, exact=True, _groups=(pos, neg, lo, hi))
        res.bounds = {k: (getattr(res, k), getattr(res, k)) for k in METRIC_NAMES}
    res.definitions = dict(ML4CV_DEFINITIONS)
    if dropped:
        res.warnings.append(f"protocol ml4cv: {dropped} non-finite float16 score(s) dropped after the draw")
    return res


def ml4cv_results(names, coords, labels, *, sample: int | None = None, seed: int | None = None,
                  exact_limit: int | None = None) -> dict:
    """{method: MetricResult} under the ml4cv protocol from the core's per-pixel coordinate
    maps of the valid pixels in dataset order (coords[j]: float32 1-D, labels: bool 1-D,
    1 = anomaly). One draw serves every method (the scripts all draw with the same seed
    over the same pixels)."""
    sample = ML4CV_SAMPLE if sample is None else int(sample)
    seed = ML4CV_SEED if seed is None else int(seed)
    labels = np.asarray(labels).astype(bool)
    total = labels.size
    idx = ml4cv_indices(total, sample, seed, exact_limit)
    if idx is not None:
        labels = labels[idx]
    how = (f"{sample} of {total} pixels drawn by np.random.seed({seed}); np.random.choice(total, {sample}, "
           "replace=False)" if idx is not None and total <= (EXACT_DRAW_LIMIT if exact_limit is None else exact_limit)
           else f"{sample} of {total} pixels drawn uniformly without replacement by np.random.default_rng({seed}) "
           "(above the exact-draw limit)" if idx is not None else f"all {total} pixels ({total} <= {sample})")
    out = {}
    for name, c in zip(names, coords):
        c = np.asarray(c, dtype=np.float32)
        if idx is not None:
            c = c[idx]
        with np.errstate(over="ignore"):  # beyond float16: +-inf, dropped after the draw and reported
            # the scripts' msp score is -max softmax = u - 1 (anomfast's msp score is u = 1 - MSP)
            s16 = np.asarray(c - np.float32(1) if name == "msp" else c, dtype=np.float32).astype(np.float16)
        r = ml4cv_metrics(s16, labels)
        r.method = name
        r.definitions["subsample"] = how
        out[name] = r
    return out


def seed_note(protocol: str | None) -> str | None:
    """One line for reports saying what the protocol did (None: anomfast's definitions)."""
    if protocol is None:
        return None
    return ("Protocol ml4cv (the ml4cv-assignment scripts): float16 scores, a seeded subsample of "
            f"{ML4CV_SAMPLE:,} pixels when there are more (np.random.seed({ML4CV_SEED})), FPR95 at argmin |TPR - 0.95| on "
            "roc_curve(drop_intermediate=True), F1 = 2PR/(P+R+1e-8), SML with the population std; exact values "
            "of that protocol, no bounds.")


__all__ = ["PROTOCOLS", "EXACT_DRAW_LIMIT", "ML4CV_SAMPLE", "ML4CV_SEED", "check_protocol", "ml4cv_indices",
           "ml4cv_metrics", "ml4cv_results"]
