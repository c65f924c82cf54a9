"""Pixel-level anomaly detection metrics with certified bounds, finalized from groups.

This module depends on numpy only (plus the standard library) and can be used and
tested on its own.

Input: the group table
----------------------
Scores are summarized by a table of *groups* sorted by **descending** score:

* ``pos[g]`` (int64) -- number of anomaly (positive) pixels in group g,
* ``neg[g]`` (int64) -- number of normal (negative) pixels in group g,
* ``thr_lo[g]`` (float64) -- smallest score the group can contain; the decision rule
  "anomaly iff score >= thr_lo[g]" flags exactly groups 0..g,
* ``thr_hi[g]`` (float64) -- largest score the group can contain.

Groups are strictly ordered (every score of group g is larger than every score of
group g+1) but the order of pixels *inside* a group is unknown. Empty groups
(pos + neg == 0) are dropped. A group with ``thr_lo == thr_hi`` holds one single score
value: a *tie group*, with scikit-learn's semantics for ties and nothing unknown inside
it. With ``exact=True`` every group is a tie group (``groups_from_scores``) and every
bound collapses to the value. With ``exact=False`` (histograms) a bin is a tie group
when its tie signature shows one value (anomfast.binning; e.g. bf16 / fp16 logits,
saturated outputs, rounded scores), and every other bin is a range of values; each metric
comes with a certified interval ``bounds[name] = (low, high)`` that contains the metric of
the unbinned scores for *every* ordering and tie structure of the pixels inside each
non-tie group. Everything a metric takes from tie groups is exact.

Notation: P = sum(pos), N = sum(neg). For group g, a = TP before g, f = FP before g,
p = pos[g], n = neg[g]; TP_g = a + p and FP_g = f + n are cumulative counts including g.
"Threshold t" means "anomaly iff score >= t"; positive = anomaly.

Definitions (point values treat each group as one tie group, i.e. scikit-learn applied
to the group index)
----------------------------------------------------------------------------------
AUROC
    Trapezoid area under the ROC curve, ties counted one half
    (= ``sklearn.metrics.roc_auc_score``)::

        AUROC = sum_g n * (a + p/2) / (P * N)

    Bound: AUROC +- 0.5 * sum_g p*n / (P*N) over the non-tie groups (each within-group
    pair may be ordered either way), clipped to [0, 1].

AP, ap_mode="step" (default)
    ``sklearn.metrics.average_precision_score``::

        AP = sum_g (p / P) * TP_g / (TP_g + FP_g)

    Bound, per group (K = a + f + n)::

        low_g  = (1/P) * sum_{j=1..p} (a + j) / (K + j)      # negatives first
        high_g = (1/P) * p * (a + p) / (a + f + p)            # positives tied, first

    Every positive is credited with the precision at the end of its (sub-)tie group,
    which is >= (a+j)/(K+j) for the j-th positive and <= (a+p)/(a+f+p); both ends are
    attained. The sum uses the closed form p - (f+n) * (H(K+p) - H(K)) with H the
    harmonic numbers evaluated through digamma differences. A tie group's term is exact.

AP, ap_mode="trapezoid"
    Trapezoid rule on the precision-recall curve of ``precision_recall_curve``,
    ``sklearn.metrics.auc(recall, precision)`` -- the pytorch-ood / OpenOOD / anomalib
    convention. The curve starts at (recall 0, precision 1) as scikit-learn appends it::

        AP_trap = sum_g (p / P) * (Prec_{g-1} + Prec_g) / 2,   Prec_{-1} = 1

    Bound: inside group g recall grows by p/P and every precision the unbinned curve can
    take there lies in [a/(a+f+n), max((a+p)/(a+f+p), Prec_{g-1})] (1 if a+f+n == 0), so
    the area of the segment lies in (p/P) * [min, max]. This bound is looser than the
    step-AP bound (it does not exploit the order of positives within the group).

FPR95 (tpr_target = 0.95)
    fpr_mode="first" (default): FPR = FP/N at the first group (descending) whose
    TPR = TP/P >= target (= ``roc_curve(y, s, drop_intermediate=False)`` followed by
    ``fpr[argmax(tpr >= target)]``). When the crossing group g is a tie group (always in
    exact mode), value = FP_g / N, exactly scikit-learn's: no threshold separates tied
    pixels. When it is a bin of several values, with k = (smallest integer TP with
    TP/P >= target) - a positives needed inside it, the point value assumes its positives
    and negatives randomly interleaved (the expected FP count before the k-th positive)::

        FPR95 = (f + k * n / (p + 1)) / N,    bound [f/N, (f+n)/N]

    Its error is at most n/N (the crossing bin's negatives over all negatives): below
    1e-4 whenever that bin holds under 1e-4 N negatives, which 2^13 bins per octave give
    continuous scores on >= 1M pixels in practice; ``refine=True`` makes it exact.
    ``fpr95_threshold`` = thr_lo of the crossing group: "anomaly iff score >= t" then
    gives TPR = TP_g/P and FPR = FP_g/N, the reported values for a tie group;
    ``bounds["fpr95_threshold"]`` = (thr_lo, thr_hi) of that group.

    fpr_mode="strict": the same with TPR > target (target < 1 required).
    fpr_mode="interp": ``np.interp(target, tpr, fpr)`` on the ROC curve with one point
    per group and the (0, 0) start, which is what the ``ood_metrics`` package's
    ``fpr_at_95_tpr`` does (it calls ``np.interp(0.95, tpr, fpr)`` on scikit-learn's
    ``roc_curve``; dropping collinear points does not change the interpolation). When
    the curve has a horizontal segment exactly at TPR = target, np.interp (and this
    function) returns the FPR at its right (largest-FPR) end. Histogram bound:
    [f_1/N, FP_2/N] with f_1 = FP before the first group with TPR_g >= target and FP_2 =
    FP up to and including the first group with TPR_g > target (1 if none).

Best F1
    max over group thresholds of F1 = 2 TP / (2 TP + FP + FN) = 2 TP_g / (TP_g + FP_g + P).
    Among equal maxima the HIGHEST threshold (fewest flagged pixels) wins.
    ``threshold`` = thr_lo of the best group. ``bounds["f1"] = (F1, max_g 2(a+p)/(P+a+p+f))``
    with the maximum over the non-tie groups (tie groups contribute their exact F1): the
    value is attained by a threshold of the unbinned scores; the upper end puts the
    group's positives first. ``bounds["threshold"]`` = (thr_lo of the last, thr_hi of the
    first) of the groups that may hold the exact best threshold: the best group and every
    non-tie group with positives whose upper bound 2(a+p)/(P+a+p+f) reaches the attained
    F1 (less 1e-12). The exact maximum is at least the attained F1 and is reached at a
    positive's score (lowering the threshold past negatives only adds FP), so the group
    holding it is among those; that hull is as wide as the F1 bound is loose.

Bounds (histogram mode) are widened outward by 1e-12 against rounding and clipped to
[0, 1]; in exact mode they are (value, value). Bounds of a NaN metric are (nan, nan).

Degenerate cases (never a silent NaN: each adds an entry to ``warnings`` and, for
undefined metrics, a Python ``RuntimeWarning``)
---------------------------------------------------------------------------
* no valid pixels (P = N = 0): handled as "no positives" below, plus a warning.
* no positives (P = 0): auroc, ap, fpr95 = NaN (undefined); f1 = 0.0 (scikit-learn's
  zero_division=0 convention) with threshold = +inf ("flag nothing" -- never "flag
  everything").
* no negatives (N = 0, P > 0): auroc, fpr95 = NaN; ap = 1.0; f1 = 1.0 at the lowest
  group's thr_lo.
* all scores equal (one group) with P, N > 0: auroc = 0.5, step ap = P/(P+N), fpr95 = 1.0
  in exact mode (histogram mode follows the formulas above, e.g. fpr95 =
  k/(P+1)), f1 = 2P/(2P+N) at that group's threshold.
* a single pixel is one of the cases above.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ._warn import warn

__all__ = ["MetricResult", "groups_from_scores", "metrics_from_groups", "mean_over_images",
           "METRIC_NAMES", "FPR_MODES", "AP_MODES"]

METRIC_NAMES = ("auroc", "ap", "fpr95", "f1", "threshold", "fpr95_threshold")
FPR_MODES = ("first", "strict", "interp")
AP_MODES = ("step", "trapezoid")
_EPS = 1e-12
_NAN = float("nan")


# ----------------------------------------------------------------------------- groups

def groups_from_scores(scores, labels):
    """Group table of the distinct score values, highest score first (exact path).

    scores: float array (any shape, flattened); labels: bool or 0/1 int array of the same
    size (1 = anomaly). Returns ``(pos, neg, thr_lo, thr_hi)``: int64 counts of anomaly
    and normal pixels per distinct score, and that score (float64) twice. NaN scores
    raise ValueError; +-inf are ordinary (extreme) values. One full sort of the scores
    plus a sort of the anomaly scores only (fast for ~10M pixels).
    """
    s = np.asarray(scores).ravel()
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    y = np.asarray(labels).ravel()
    if s.size != y.size:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if y.dtype != np.bool_:
        if y.size and not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be boolean or 0/1")
        y = y.astype(bool)
    if s.size == 0:
        e = np.zeros(0, np.int64)
        return e, e.copy(), np.zeros(0, np.float64), np.zeros(0, np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    ss = np.sort(s)
    start = np.flatnonzero(np.concatenate(([True], ss[1:] != ss[:-1])))
    values = ss[start]
    total = np.diff(np.append(start, ss.size)).astype(np.int64)
    # anomaly pixels are counted per distinct value by locating them among the values
    pos = np.bincount(np.searchsorted(values, s[y]), minlength=values.size).astype(np.int64)
    neg = total - pos
    values = values.astype(np.float64)
    values = values[::-1].copy()
    return pos[::-1].copy(), neg[::-1].copy(), values, values.copy()


# ----------------------------------------------------------------------------- result

def _jsonable(v):
    """NaN -> None, +-inf -> "inf"/"-inf" (float() parses them back), numpy -> Python."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


@dataclass
class MetricResult:
    """Metrics of one score map (or one aggregation) with certified bounds.

    Attributes: auroc, ap, fpr95, f1, threshold (best F1), fpr95_threshold (the operating
    threshold of fpr95) (float); bounds {name: (low, high)} for those six names; n_pos, n_neg (pixel counts); exact (bounds collapsed); definitions
    (conventions used, strings); warnings (degenerate cases met); method, params (set by
    the caller). The compact group table is kept privately for ``roc_curve()`` and
    ``pr_curve()``.
    """

    auroc: float = _NAN
    ap: float = _NAN
    fpr95: float = _NAN
    f1: float = _NAN
    threshold: float = _NAN
    fpr95_threshold: float = _NAN
    bounds: dict = field(default_factory=dict)
    n_pos: int = 0
    n_neg: int = 0
    exact: bool = False
    definitions: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    method: str = ""
    params: dict = field(default_factory=dict)
    _groups: tuple | None = field(default=None, repr=False, compare=False)

    def _table(self):
        if self._groups is None:
            raise ValueError("this result has no group table (e.g. a mean over images); no curve available")
        if callable(self._groups):  # computed on first use (histogram finalization does not pay for it)
            self._groups = self._groups()
        return self._groups

    def roc_curve(self):
        """(fpr, tpr, thresholds) like ``sklearn.metrics.roc_curve(drop_intermediate=False)``:
        a (0, 0) start at threshold +inf, then one point per group at threshold thr_lo.
        fpr (tpr) is NaN when there are no negatives (positives)."""
        pos, neg, lo, _ = self._table()
        tp = np.concatenate(([0], np.cumsum(pos))).astype(np.float64)
        fp = np.concatenate(([0], np.cumsum(neg))).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            fpr = fp / fp[-1] if fp[-1] > 0 else np.full(fp.shape, np.nan)
            tpr = tp / tp[-1] if tp[-1] > 0 else np.full(tp.shape, np.nan)
        return fpr, tpr, np.concatenate(([np.inf], lo))

    def pr_curve(self):
        """(precision, recall, thresholds) like ``sklearn.metrics.precision_recall_curve``:
        increasing thresholds (one per group, thr_lo), with the final point (precision 1,
        recall 0) appended. Recall is 1 everywhere when there are no positives (as in
        scikit-learn)."""
        pos, neg, lo, _ = self._table()
        tp = np.cumsum(pos).astype(np.float64)
        fp = np.cumsum(neg).astype(np.float64)
        ps = tp + fp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(ps != 0, tp / np.where(ps != 0, ps, 1.0), 0.0)
        recall = tp / tp[-1] if tp.size and tp[-1] > 0 else np.ones_like(tp)
        return (np.concatenate((precision[::-1], [1.0])), np.concatenate((recall[::-1], [0.0])),
                lo[::-1].copy())

    def as_dict(self) -> dict:
        """JSON-serializable dict (no group table). NaN becomes None and +-inf the strings
        "inf"/"-inf" (``float(x)`` reads them back)."""
        d = {k: getattr(self, k) for k in METRIC_NAMES}
        d.update(bounds={k: list(v) for k, v in self.bounds.items()}, n_pos=int(self.n_pos),
                 n_neg=int(self.n_neg), exact=bool(self.exact), method=self.method, params=self.params,
                 definitions=self.definitions, warnings=list(self.warnings))
        return _jsonable(d)

    def to_json(self, **kw) -> str:
        return json.dumps(self.as_dict(), **kw)

    def __repr__(self) -> str:
        def one(k):
            v = getattr(self, k)
            lo, hi = self.bounds.get(k, (v, v))
            if self.exact or math.isnan(v) or math.isnan(lo) or hi - lo <= 1e-9:
                return f"{k}={v:.4f}"
            return f"{k}={v:.4f} [{lo:.4f}, {hi:.4f}]"
        head = f"{self.method!r}, " if self.method else ""
        body = ", ".join(one(k) for k in ("auroc", "ap", "fpr95", "f1"))
        w = f", warnings={len(self.warnings)}" if self.warnings else ""
        return (f"MetricResult({head}{body}, threshold={self.threshold:.6g}, n_pos={self.n_pos}, "
                f"n_neg={self.n_neg}, exact={self.exact}{w})")


# ----------------------------------------------------------------------------- helpers

def _asym_psi_diff(x, p):
    """psi(x + p) - psi(x) for x >= 10, p >= 0 (float arrays), by the asymptotic series
    psi(y) = ln y - 1/(2y) - 1/(12y^2) + 1/(120y^4) - 1/(252y^6) + 1/(240y^8) - 1/(132y^10)
             + 691/(32760y^12) - 1/(12y^14)
    (truncation error < 1e-16 at y >= 10). The logarithm difference is
    log1p(p/x) and the two leading correction terms are differenced analytically, so
    there is no cancellation for p << x."""
    y = x + p
    d = np.log1p(p / x)
    d += p / (2.0 * x * y)                                # -(1/(2y) - 1/(2x))
    d += p * (x + y) / (12.0 * (x * y) ** 2)               # -(1/(12y^2) - 1/(12x^2))
    for c, k in ((1 / 120, 4), (-1 / 252, 6), (1 / 240, 8), (-1 / 132, 10), (691 / 32760, 12), (-1 / 12, 14)):
        d += c * (y ** -k - x ** -k)
    return d


def _harmonic_diff(K, p):
    """H(K + p) - H(K) = sum_{j=1..p} 1/(K + j) = psi(K+p+1) - psi(K+1), vectorized.

    K, p: non-negative integer arrays (any size up to 2^62). Arguments below 10 are
    shifted up with the recurrence psi(x+1) = psi(x) + 1/x (at most 9 direct terms)."""
    x = np.asarray(K, dtype=np.float64) + 1.0
    pf = np.asarray(p, dtype=np.float64)
    out = np.zeros(x.shape, np.float64)
    small = x < 10.0
    if small.any():
        xs, ps_ = x[small], pf[small]
        m = 10.0 - xs                           # shift to reach 10 (1..9)
        steps = np.minimum(ps_, m)
        acc = np.zeros(xs.shape, np.float64)
        for i in range(9):
            acc += np.where(i < steps, 1.0 / (xs + i), 0.0)
        rest = ps_ - steps
        more = rest > 0
        if more.any():
            acc[more] += _asym_psi_diff(np.full(int(more.sum()), 10.0), rest[more])
        out[small] = acc
    big = ~small
    if big.any():
        out[big] = _asym_psi_diff(x[big], pf[big])
    return out


AP_DIRECT_TERMS = 8  # csrc/cpu/finalize_cpu.cpp: groups of at most this many positives sum directly


def _ap_step_lower_terms(a, f, p, n):
    """sum_{j=1..p} (a+j)/(a+f+n+j) per group: summed term by term for p <= AP_DIRECT_TERMS
    (most groups of sparse anomalies), else p - (f+n) * (H(K+p) - H(K)), K=a+f+n."""
    fn = (f + n).astype(np.float64)
    pf = p.astype(np.float64)
    out = pf.copy()
    m = (fn > 0) & (p > 0)
    direct = m & (p <= AP_DIRECT_TERMS)
    if direct.any():
        ad, Kd, pd = a[direct].astype(np.float64), (a + f + n)[direct].astype(np.float64), p[direct]
        acc = np.zeros(ad.shape, np.float64)
        for j in range(1, AP_DIRECT_TERMS + 1):
            acc += np.where(j <= pd, (ad + j) / (Kd + j), 0.0)
        out[direct] = acc
    m &= ~direct
    if m.any():
        K = a[m] + f[m] + n[m]
        out[m] = np.maximum(pf[m] - fn[m] * _harmonic_diff(K, p[m]), 0.0)
    out[p == 0] = 0.0
    return out


def _min_count_ratio(P: int, target: float, strict: bool) -> int:
    """Smallest integer m with m / P >= target (> target if strict), in float64 division."""
    ok = (lambda m: m / P > target) if strict else (lambda m: m / P >= target)
    m = min(max(int(math.ceil(target * P)), 0), P)
    while m > 0 and ok(m - 1):
        m -= 1
    while not ok(m):
        m += 1
    return m


def _interval(lo, hi, exact, value):
    if exact:
        return (float(value), float(value))
    lo, hi = float(lo) - _EPS, float(hi) + _EPS
    return (min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0))


def _definitions(fpr_mode, ap_mode, tpr_target, exact):
    """The definitions dict of a result (a fresh copy: callers may add entries)."""
    return dict(_definitions_of(fpr_mode, ap_mode, float(tpr_target), bool(exact)))


@functools.lru_cache(maxsize=64)
def _definitions_of(fpr_mode, ap_mode, tpr_target, exact):
    t = f"{tpr_target:g}"
    fpr = {
        "first": f"FP/N at the first threshold (descending) with TP/P >= {t} "
                 "(sklearn roc_curve(drop_intermediate=False), fpr[argmax(tpr >= target)])",
        "strict": f"FP/N at the first threshold (descending) with TP/P > {t}",
        "interp": f"np.interp({t}, tpr, fpr) on the ROC curve (one point per tie group, (0,0) start; "
                  "ood_metrics.fpr_at_95_tpr convention; right end of a plateau at TPR = target)",
    }[fpr_mode]
    if not exact and fpr_mode != "interp":
        fpr += ("; exact when the crossing bin holds one value (a tie); for a bin of several values the "
                "point value interleaves its positives and negatives at random")
    return {
        "positive": "anomaly (higher score = more anomalous); threshold t: anomaly iff score >= t",
        "auroc": "trapezoid area under ROC, ties count 1/2 (sklearn roc_auc_score)",
        "ap": ("step: sum_g (R_g - R_{g-1}) * Prec_g (sklearn average_precision_score)" if ap_mode == "step" else
               "trapezoid: sklearn auc(recall, precision) on precision_recall_curve, starting at (0, 1) "
               "(pytorch-ood / OpenOOD / anomalib)"),
        "fpr95": fpr,
        "f1": "max over thresholds of 2TP/(2TP+FP+FN); ties -> highest threshold",
        "threshold": "score threshold of the best F1 (anomaly iff score >= threshold)",
        "fpr95_threshold": "operating threshold of fpr95: anomaly iff score >= it gives the crossing TPR/FPR "
                           "(lowest value of the crossing bin; exact for a tie group or with refine=True)",
        "tpr_target": t,
        "fpr_mode": fpr_mode,
        "ap_mode": ap_mode,
        "bounds": ("exact: bounds equal the values" if exact else
                   "certified: contain the unbinned metric for any order/ties inside each bin; "
                   "point values treat each bin as one tie group (except fpr95, see fpr95)"),
    }


# ----------------------------------------------------------------------------- metrics

def check_conventions(fpr_mode: str, ap_mode: str, tpr_target) -> float:
    """The conventions' values checked; returns tpr_target as a float."""
    if fpr_mode not in FPR_MODES:
        raise ValueError(f"fpr_mode must be one of {FPR_MODES}, got {fpr_mode!r}")
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode must be one of {AP_MODES}, got {ap_mode!r}")
    tpr_target = float(tpr_target)
    if not (0.0 < tpr_target <= 1.0) or (fpr_mode == "strict" and tpr_target >= 1.0):
        raise ValueError(f"tpr_target must be in (0, 1] ((0, 1) for fpr_mode='strict'), got {tpr_target}")
    return tpr_target


def metrics_from_groups(pos, neg, thr_lo, thr_hi, *, exact: bool = False, fpr_mode: str = "first",
                        ap_mode: str = "step", tpr_target: float = 0.95, tied=None) -> MetricResult:
    """AUROC, AP, FPR at ``tpr_target`` TPR, best F1 and its threshold, with certified bounds.

    pos, neg: int counts per group; thr_lo, thr_hi: score range per group; groups sorted
    by descending score (see the module docstring for the table and every formula).
    exact=True: each group is a set of exactly tied scores (bounds collapse).
    tied: optional bool per group, True where the group is known to hold one value (a tie
    group); default thr_lo == thr_hi (pass it when thr_lo/thr_hi are rounded values that
    may coincide for distinct values).
    fpr_mode: "first" (TPR >= target), "strict" (TPR > target), "interp" (np.interp).
    ap_mode: "step" (sklearn average_precision_score) or "trapezoid" (auc(recall, precision)).
    Vectorized; ~1M groups finalize in well under a second.
    """
    tpr_target = check_conventions(fpr_mode, ap_mode, tpr_target)
    pos, neg, lo, hi, tied = check_groups(pos, neg, thr_lo, thr_hi, tied)
    exact = bool(exact)
    tied = np.ones(lo.size, bool) if exact else tied  # tie groups: nothing unknown inside
    P, N = int(pos.sum()), int(neg.sum())
    sums = (group_sums(pos, neg, tied, exact=exact, fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=tpr_target)
            if P > 0 else None)
    return result_from_sums(P, N, sums, lambda g: (float(lo[g]), float(hi[g])), exact=exact, fpr_mode=fpr_mode,
                            ap_mode=ap_mode, tpr_target=tpr_target, groups=(pos, neg, lo, hi))


def check_groups(pos, neg, thr_lo, thr_hi, tied=None):
    """A group table checked (equal lengths, integer non-negative counts, descending,
    thr_lo <= thr_hi) and compacted (empty groups dropped): (pos, neg, lo, hi, tied)."""
    pos = np.asarray(pos).ravel()
    neg = np.asarray(neg).ravel()
    lo = np.asarray(thr_lo, dtype=np.float64).ravel()
    hi = np.asarray(thr_hi, dtype=np.float64).ravel()
    if not (pos.size == neg.size == lo.size == hi.size):
        raise ValueError(f"group arrays differ in length: {pos.size}, {neg.size}, {lo.size}, {hi.size}")
    for name, c in (("pos", pos), ("neg", neg)):
        if c.size and not np.issubdtype(c.dtype, np.integer):
            if not np.all(np.asarray(c, np.float64) == np.round(np.asarray(c, np.float64))):
                raise ValueError(f"{name} counts must be integers")
        if c.size and (c < 0).any():
            raise ValueError(f"{name} counts must be non-negative")
    pos = pos.astype(np.int64)
    neg = neg.astype(np.int64)
    tied = (lo == hi) if tied is None else np.asarray(tied, bool).ravel()
    if tied.size != pos.size:
        raise ValueError(f"tied has {tied.size} entries for {pos.size} groups")
    keep = (pos + neg) > 0
    if not keep.all():
        pos, neg, lo, hi, tied = pos[keep], neg[keep], lo[keep], hi[keep], tied[keep]
    if lo.size > 1 and np.any(lo[1:] > lo[:-1]):
        raise ValueError("groups must be sorted by descending score (thr_lo non-increasing)")
    if np.any(lo > hi):
        raise ValueError("thr_lo must be <= thr_hi for every group")
    return pos, neg, lo, hi, tied


@dataclass
class GroupSums:
    """What one pass over a group table with P > 0 yields, before the result's clipping,
    intervals and degenerate cases (result_from_sums). Written by group_sums (NumPy, the
    spec) and by the compiled histogram finalization (csrc/cpu/finalize_cpu.cpp), which
    must agree with it to rounding. Unused fields stay NaN / -1: auroc*, fpr95* when N = 0,
    ap_lower / ap_upper in exact mode."""

    n_groups: int
    auroc: float = _NAN          # sum_g n (a + p/2) / (P N), unclipped
    auroc_half: float = _NAN     # 0.5 sum over non-tie groups of p n / (P N)
    ap: float = _NAN             # step or trapezoid sum, unclipped
    ap_lower: float = _NAN
    ap_upper: float = _NAN
    fpr95: float = _NAN          # point value, unclipped
    fpr95_lower: float = _NAN
    fpr95_upper: float = _NAN
    fpr95_group: int = -1        # the crossing group (position in the table)
    fpr95_tied: bool = False     # whether that group is a tie group
    f1: float = _NAN             # best F1
    f1_upper: float = _NAN       # max over groups of the F1 upper bound
    f1_group: int = -1           # the best F1's group (first maximum)
    f1_first: int = -1           # first / last group that may hold the exact best-F1 threshold:
    f1_last: int = -1            # f1_group and the non-tie groups whose F1 upper bound reaches f1
    all_tied: bool = False


def group_sums(pos, neg, tied, *, exact: bool, fpr_mode: str, ap_mode: str, tpr_target: float) -> GroupSums:
    """The formulas of the module docstring on a checked table (check_groups) with P > 0."""
    P, N = int(pos.sum()), int(neg.sum())
    s = GroupSums(n_groups=int(pos.size))
    # cumulative counts: a, f before the group; tp, fp including it
    tp = np.cumsum(pos)
    fp = np.cumsum(neg)
    a = tp - pos
    f = fp - neg
    Pf, Nf = float(P), float(N)
    tpf, fpf, af, ff = (v.astype(np.float64) for v in (tp, fp, a, f))
    pf = pos.astype(np.float64)

    # ---- AUROC and AP: per-group terms (point, lower, upper), summed
    au, au_half, ap, ap_lo, ap_hi = _area_terms(pos, neg, tied, ap_mode)
    if N > 0:
        s.auroc, s.auroc_half = float(np.sum(au)) / Pf, float(np.sum(au_half))
    s.ap = float(np.sum(ap))
    if not exact:
        s.ap_lower, s.ap_upper = float(np.sum(ap_lo)), float(np.sum(ap_hi))

    # ---- FPR at tpr_target
    if N > 0:
        tpr = tpf / Pf
        g1 = int(np.argmax(tpr > tpr_target)) if fpr_mode == "strict" else int(np.argmax(tpr >= tpr_target))
        if fpr_mode == "interp":
            xs = np.concatenate(([0.0], tpr))
            ys = np.concatenate(([0.0], fpf / Nf))
            j = int(np.searchsorted(xs, tpr_target, side="right")) - 1
            if xs[j] == tpr_target or j + 1 >= xs.size:
                val = float(ys[j])
            else:
                val = float((ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (tpr_target - xs[j]) + ys[j])
            above = np.flatnonzero(tpr > tpr_target)
            blo = float(f[g1]) / Nf
            bhi = float(fp[above[0]]) / Nf if above.size else 1.0
        elif tied[g1]:
            val = blo = bhi = float(fp[g1]) / Nf
        else:
            val = fpr_inside_bin(P, N, int(a[g1]), int(f[g1]), int(pos[g1]), int(neg[g1]), tpr_target,
                                 fpr_mode == "strict")
            blo, bhi = float(f[g1]) / Nf, float(fp[g1]) / Nf
        s.fpr95, s.fpr95_lower, s.fpr95_upper = val, blo, bhi
        s.fpr95_group, s.fpr95_tied = g1, bool(tied[g1])

    # ---- best F1 (np.argmax: first maximum = highest threshold)
    f1 = 2.0 * tpf / (tpf + fpf + Pf)
    s.f1_group = int(np.argmax(f1))
    s.f1 = float(f1[s.f1_group])
    ub = 2.0 * (af + pf) / (Pf + af + pf + ff)
    s.f1_upper = float(np.max(np.where(tied, f1, ub)))
    cand = np.flatnonzero(~tied & (pos > 0) & (ub >= s.f1 - _EPS))
    s.f1_first = min(s.f1_group, int(cand[0])) if cand.size else s.f1_group
    s.f1_last = max(s.f1_group, int(cand[-1])) if cand.size else s.f1_group
    s.all_tied = bool(tied.all())
    return s


def _area_terms(pos, neg, tied, ap_mode: str):
    """Per-group terms of AUROC (times P) and AP on a checked table with P > 0: (auroc, auroc_half,
    ap, ap_lower, ap_upper). Summed, they give the point values and the certified bounds;
    auroc_half and ap_upper - ap_lower say how much each group widens them (0 for a tie
    group), which is what refine=True spends its re-scoring budget on."""
    P, N = int(pos.sum()), int(neg.sum())
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    a, f = tp - pos, fp - neg
    Pf, Nf = float(P), float(max(N, 1))
    tpf, fpf, af, ff = (v.astype(np.float64) for v in (tp, fp, a, f))
    pf, nf = pos.astype(np.float64), neg.astype(np.float64)
    au = (nf / Nf) * (af + 0.5 * pf)  # / P after the sum
    au_half = 0.5 * np.where(tied, 0.0, (pf / Pf) * (nf / Nf))
    prec = tpf / (tpf + fpf)
    w = pf / Pf
    if ap_mode == "step":
        ap = w * prec
        ap_lo = np.where(tied, ap, _ap_step_lower_terms(a, f, pos, neg) / Pf)
        ap_hi = np.where(tied, ap, w * np.where(pos > 0, (af + pf) / np.maximum(af + ff + pf, 1.0), 0.0))
    else:
        prev = np.concatenate(([1.0], prec[:-1]))
        ap = w * 0.5 * (prev + prec)
        K = af + ff + nf
        pmin = np.where(K > 0, af / np.maximum(K, 1.0), 1.0)
        pmax = np.maximum(np.where(af + ff + pf > 0, (af + pf) / np.maximum(af + ff + pf, 1.0), 1.0), prev)
        ap_lo = np.where(tied, ap, w * pmin)
        ap_hi = np.where(tied, ap, w * pmax)
    return au, au_half, ap, ap_lo, ap_hi


def area_widths(pos, neg, tied, ap_mode: str = "step") -> np.ndarray:
    """How much each group of a checked table widens the AUROC and AP bounds together."""
    if int(pos.sum()) == 0:
        return np.zeros(pos.size)
    _, au_half, _, ap_lo, ap_hi = _area_terms(pos, neg, tied, ap_mode)
    return 2.0 * au_half + (ap_hi - ap_lo)


def fpr_inside_bin(P: int, N: int, a: int, f: int, p: int, n: int, tpr_target: float, strict: bool) -> float:
    """The point FPR when the crossing group (a positives and f negatives above it, p and
    n inside) is a bin of several values: its positives and negatives interleaved at
    random, the FP count expected before the k-th positive it must contribute."""
    k = _min_count_ratio(P, tpr_target, strict) - a
    return (float(f) + k * float(n) / (float(p) + 1.0)) / float(N)


def result_from_sums(P: int, N: int, s: GroupSums | None, lo_hi, *, exact: bool, fpr_mode: str, ap_mode: str,
                     tpr_target: float, groups=None) -> MetricResult:
    """The MetricResult of a table's sums (None when P == 0): clipping, intervals, the
    degenerate cases and their warnings. lo_hi(g) -> (thr_lo, thr_hi) of group g;
    groups: the table kept for the curves (or a callable returning it, computed on
    first use)."""
    res = MetricResult(n_pos=P, n_neg=N, exact=exact,
                       definitions=_definitions(fpr_mode, ap_mode, tpr_target, exact), _groups=groups)
    nanb = (_NAN, _NAN)

    def undefined(msg, names):
        res.warnings.append(msg)
        warn(msg)
        for k in names:
            setattr(res, k, _NAN)
            res.bounds[k] = nanb

    if P == 0:
        if N == 0:
            res.warnings.append("no valid pixels")
        undefined("no anomaly (positive) pixels: auroc, ap and fpr95 are undefined (NaN); "
                  "f1 = 0 at threshold +inf (flag nothing)", ("auroc", "ap", "fpr95"))
        res.f1, res.threshold = 0.0, math.inf
        res.bounds["f1"] = (0.0, 0.0)
        res.bounds["threshold"] = (math.inf, math.inf)
        res.fpr95_threshold = _NAN
        res.bounds["fpr95_threshold"] = nanb
        return _ordered(res)

    # ---- AUROC
    if N == 0:
        undefined("no normal (negative) pixels: auroc and fpr95 are undefined (NaN)", ("auroc", "fpr95"))
    else:
        res.auroc = min(max(s.auroc, 0.0), 1.0)
        res.bounds["auroc"] = _interval(s.auroc - s.auroc_half, s.auroc + s.auroc_half, exact, res.auroc)

    # ---- AP
    ap, lower, upper = s.ap, s.ap_lower, s.ap_upper
    if N == 0:
        ap, lower, upper = 1.0, 1.0, 1.0  # every precision is 1 (avoid rounding of the sum)
    res.ap = min(max(ap, 0.0), 1.0)
    res.bounds["ap"] = (res.ap, res.ap) if exact else _interval(lower, upper, False, res.ap)

    # ---- FPR at tpr_target
    if N > 0:
        res.fpr95 = min(max(s.fpr95, 0.0), 1.0)
        res.bounds["fpr95"] = _interval(s.fpr95_lower, s.fpr95_upper,
                                        exact or (fpr_mode != "interp" and s.fpr95_tied), res.fpr95)
        glo, ghi = lo_hi(s.fpr95_group)
        res.fpr95_threshold = glo
        res.bounds["fpr95_threshold"] = (glo, ghi)
    else:
        res.fpr95_threshold = _NAN
        res.bounds["fpr95_threshold"] = nanb

    # ---- best F1
    glo = lo_hi(s.f1_group)[0]
    res.f1 = s.f1
    res.threshold = glo
    res.bounds["f1"] = _interval(res.f1, max(s.f1_upper, res.f1), exact or s.all_tied, res.f1)
    first, last = (s.f1_group, s.f1_group) if s.f1_first < 0 else (s.f1_first, s.f1_last)
    res.bounds["threshold"] = (lo_hi(last)[0], lo_hi(first)[1])
    if s.n_groups == 1:
        res.warnings.append("all scores are equal: the ranking carries no information" if exact else
                            "all pixels fall in one bin: the bounds are uninformative")
    return _ordered(res)


def _ordered(res: MetricResult) -> MetricResult:
    res.bounds = {k: tuple(float(x) for x in res.bounds.get(k, (_NAN, _NAN))) for k in METRIC_NAMES}
    return res


# ----------------------------------------------------------------------------- aggregation

def mean_over_images(results) -> MetricResult:
    """Mean of per-image results (e.g. per-image AUROC as in some anomaly benchmarks).

    Each metric is averaged over the images where it is defined: auroc and fpr95 over
    images with both anomaly and normal pixels, ap and f1 over images with anomaly pixels
    (images without anomalies have f1 = 0 by convention and are skipped). Bounds are the
    means of the per-image bounds over the same images (a mean of certified bounds
    certifies the mean). threshold is NaN: per-image thresholds are not averaged.
    n_pos / n_neg are totals; exact is True only if every image is exact. No curves.
    """
    results = list(results)
    out = MetricResult(n_pos=sum(int(r.n_pos) for r in results), n_neg=sum(int(r.n_neg) for r in results),
                       exact=bool(results) and all(r.exact for r in results))
    if results:
        out.definitions = dict(results[0].definitions)
        out.method = results[0].method
        out.params = dict(results[0].params)
    out.definitions["aggregation"] = ("mean over images of per-image metrics; auroc/fpr95 over images with "
                                      "anomaly and normal pixels, ap/f1 over images with anomaly pixels")
    for k in ("auroc", "ap", "fpr95", "f1"):
        use = [r for r in results if not math.isnan(getattr(r, k)) and (k != "f1" or r.n_pos > 0)]
        if not use:
            msg = f"{k}: undefined for every image (NaN)"
            out.warnings.append(msg)
            warn(msg)
            setattr(out, k, _NAN)
            out.bounds[k] = (_NAN, _NAN)
            continue
        if len(use) < len(results):
            out.warnings.append(f"{k}: averaged over {len(use)} of {len(results)} images (others undefined)")
        setattr(out, k, float(math.fsum(getattr(r, k) for r in use) / len(use)))
        out.bounds[k] = (float(math.fsum(r.bounds[k][0] for r in use) / len(use)),
                         float(math.fsum(r.bounds[k][1] for r in use) / len(use)))
    out.threshold = _NAN
    out.bounds["threshold"] = (_NAN, _NAN)
    out.warnings.append("threshold: per-image thresholds are not averaged (NaN)")
    if not results:
        out.warnings.insert(0, "no images")
    return _ordered(out)


def mean_iou(confusion) -> tuple:
    """(mIoU, per-class IoU) of a (C, C) confusion matrix (rows: ground truth, columns:
    prediction): IoU_c = TP / (TP + FP + FN) over the classes that occur in the ground truth
    or the prediction (union > 0; a class predicted but absent from the ground truth counts
    with IoU 0, as in mmsegmentation / the Cityscapes scripts); None for a class that occurs
    in neither, and mIoU None when no class occurs."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    seen = [v for v in iou if v is not None]
    return (float(np.mean(seen)) if seen else None), iou
