"""Functional API: score maps, SML fitting and one-call evaluation.

    maps = anomfast.score_maps(logits, methods=("max_logit", "energy"))
    stats = anomfast.fit_sml(in_distribution_logits)
    heat = anomfast.fit_heat(id_logits, id_features, id_semantic_labels)
    anomfast.evaluate(logits, labels, methods=("energy", "heat"), features=features, heat=heat)
    results = anomfast.evaluate(logits, labels, methods=("max_logit", "msp", "energy", "sml"), sml=stats)
    results["energy"].fpr95, results["energy"].bounds["fpr95"]
"""
from __future__ import annotations

import numpy as np
import torch

from . import _fused, binning, protocols
from .accumulate import Accumulator, Results
from .components import accumulator_for, as_component_spec
from .histogram import Histogram, finalize_coords
from .labels import ANOMALY, INVALID, NORMAL, as_label_map
from .methods import CODES, EXTERNAL, resolve
from .fitting import fit_heat, fit_sml  # noqa: F401  (part of the functional API)
from .heat import as_features
from ._warn import warn
from .inputs import _batches, from_numpy


def score_maps(logits, methods=None, *, features=None, num_threads: int = 0, **method_params) -> dict:
    """Per-pixel score maps {method: float32 (B, H, W)}, higher = more anomalous.
    features (B, D, h, w): the feature map HEAT needs (heat=fit_heat(...) statistics)."""
    if isinstance(methods, (torch.Tensor, np.ndarray)):  # e.g. score_maps(logits, labels)
        raise TypeError(f"methods must be method names (e.g. methods=(\"max_logit\", \"energy\")), got a "
                        f"{type(methods).__name__} of shape {tuple(methods.shape)}; score_maps takes no labels "
                        "(anomfast.evaluate(logits, labels) computes metrics)")
    spec = resolve(methods, **method_params)
    x = _fused.as_logits(logits)
    _, _, maps = _fused.fused_pass(x, None, spec, want_maps=True, num_threads=num_threads, features=features)
    return {n: maps[j] for j, n in enumerate(spec.names)}


def _reiterable(name: str, v, who: str = "refine=True") -> None:
    if v is not None and not isinstance(v, (torch.Tensor, np.ndarray)) and iter(v) is v:
        raise TypeError(f"{who} reads the inputs twice, but {name} is a one-shot iterator "
                        f"({type(v).__name__}); pass a tensor, a list of batches or a re-iterable (e.g. a DataLoader)")


def _valid_mask(lm, yi, xi, maps, spec, nonfinite: str) -> torch.Tensor:
    """Flat mask of the pixels the core bins: labelled normal / anomaly, and (nonfinite=
    'ignore') finite logits and finite HEAT / external coordinates."""
    cls = lm.classify(yi).flatten()
    valid = (cls == NORMAL) | (cls == ANOMALY)
    if nonfinite == "ignore":
        valid &= torch.isfinite(xi.float()).all(dim=1).flatten()
        for j, code in enumerate(spec.codes):  # the core also skips non-finite HEAT / external scores
            if code in (CODES["heat"], EXTERNAL):
                valid &= torch.isfinite(maps[j]).flatten()
    return valid, cls


REFINE_MAX_PIXELS = 200_000_000  # pixels kept by refine=True for FPR95 / F1: a clear error past it
REFINE_AREA_PIXELS = 16_000_000  # further pixels (all methods together) re-scored to narrow AUROC / AP
REFINE_NEIGHBOURS = 2  # groups on each side of a refined bin also re-scored exactly
# methods whose score is a function of the pixel's own logits: refine re-scores their kept
# pixels in float64 (anomfast.reference, no cancellation); HEAT and post-processed SML need
# neighbourhoods and keep the core's float32 coordinate
_PER_PIXEL = ("max_logit", "msp", "energy", "sml", "entropy", "gen")
_NEIGHBOURHOOD = ("heat",)  # (and SML with post-processing): the core's float32 map is the score
# methods whose float32 coordinate ties are ties of the exact score too (max logit: -m is
# exact in float32); a float32 tie of any other per-pixel method may hold distinct exact scores
_EXACT_TIES = ("max_logit",)


def _rescored(spec, name: str) -> bool:
    """Whether refine re-scores method `name` in float64 from the pixel's logits; else
    (HEAT, SML with boundary suppression or smoothing: an EXTERNAL coordinate) the core's
    float32 map is the score and its pixels keep it. A method in neither list (a new one)
    is an error, not a silent float32 score under a definition that says "exact"."""
    if name not in _PER_PIXEL and name not in _NEIGHBOURHOOD:
        raise NotImplementedError(f"refine=True does not know how method {name!r} is re-scored exactly: add it to "
                                  "anomfast.functional._PER_PIXEL (re-scored in float64 by anomfast.reference.score, "
                                  "parameters from _reference_params) or _NEIGHBOURHOOD (its float32 map is kept)")
    return name in _PER_PIXEL and not (name == "sml" and spec.sml_post)


def _refine_table(table, name: str, rescored: bool):
    """The group table as refine sees it, plus a chain id per row. A method re-scored in
    float64 (every per-pixel method but max logit) has exact scores a few float32 ulps from
    the core's: a float32 tie group may hold distinct exact scores (so it is an open group
    here), and a pixel may cross one bin edge, so rows whose bins are at most 2 apart may
    interleave (both may cross into the bin between): such rows form one chain. Rows of
    different chains never interleave. Other methods: each row is its own chain."""
    pos, neg, lo, hi, tied, idx = table
    if rescored and name not in _EXACT_TIES:
        tied = np.zeros_like(tied)
        chain = np.concatenate(([0], np.cumsum(np.abs(np.diff(idx.astype(np.int64))) > 2)))
    else:
        chain = np.arange(pos.size)
    return pos, neg, lo, hi, tied, idx, chain


def _decisive_groups(table, conventions: dict) -> np.ndarray:
    """Positions (in Histogram.groups()' descending table) of the groups inside which FPR95
    or the best F1 and their thresholds are decided and which are not already exact tie
    groups: the crossing group of FPR95 and every group whose F1 upper bound reaches the
    best attained F1. Outside them both metrics are already exact."""
    from .metrics import _min_count_ratio
    pos, neg, lo, hi, tied, idx = table
    P, N = int(pos.sum()), int(neg.sum())
    if P == 0 or pos.size == 0:
        return np.zeros(0, np.int64)
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    a, f = tp - pos, fp - neg
    want = np.zeros(pos.size, bool)
    if N > 0:
        target, mode = float(conventions.get("tpr_target", 0.95)), conventions.get("fpr_mode", "first")
        need = _min_count_ratio(P, target, mode == "strict")
        want[int(np.argmax(tp >= need))] = True
        if mode == "interp":  # np.interp also reads the point after the crossing
            above = np.flatnonzero(tp * 1.0 / P > target)
            if above.size:
                want[above[0]] = True
    f1 = 2.0 * tp / (tp + fp + P)
    f1_hi = 2.0 * (a + pos) / (P + a + pos + f)
    want |= f1_hi >= f1.max() * (1 - 1e-12)
    return np.flatnonzero(want & ~tied)


def _padded(positions: np.ndarray, n: int, pad: int) -> np.ndarray:
    """Mask of the table positions within `pad` of any given position."""
    d = np.zeros(n + 1, np.int64)
    np.add.at(d, np.maximum(positions - pad, 0), 1)
    np.add.at(d, np.minimum(positions + pad + 1, n), -1)
    return np.cumsum(d[:n]) > 0


def _refine_rows(table, conventions: dict, area_budget: int) -> np.ndarray:
    """The table positions to re-score: the decisive groups of FPR95 / F1 with their
    REFINE_NEIGHBOURS neighbours on each side (a pixel crosses at most one bin edge, so
    nothing further away can reach them), then whole chains (_refine_table), widest first
    (a chain's width: its AUROC / AP bound width as one open group), as many as fit
    `area_budget` pixels."""
    from .metrics import area_widths
    pos, neg, _, _, tied, idx, chain = table
    n = pos.size
    base = _padded(_decisive_groups(table[:6], conventions), n, REFINE_NEIGHBOURS)
    if n == 0:
        return np.flatnonzero(base)
    c_pos, c_neg = np.bincount(chain, weights=pos).astype(np.int64), np.bincount(chain, weights=neg).astype(np.int64)
    c_tied = np.bincount(chain, weights=~tied) == 0
    c_w = area_widths(c_pos, c_neg, c_tied, conventions.get("ap_mode", "step"))
    c_px = np.bincount(chain, weights=np.where(base, 0, pos + neg))
    order = np.flatnonzero(c_w > 0)
    order = order[np.argsort(-c_w[order], kind="stable")]
    take = order[np.cumsum(c_px[order]) <= area_budget]
    return np.flatnonzero(base | np.isin(chain, take))


def _runs(rows: np.ndarray) -> np.ndarray:
    """Maximal runs of consecutive table positions, as an (R, 2) array of [start, stop)."""
    if rows.size == 0:
        return np.zeros((0, 2), np.int64)
    cut = np.flatnonzero(np.diff(rows) > 1) + 1
    return np.stack([rows[np.concatenate(([0], cut))], rows[np.concatenate((cut - 1, [rows.size - 1]))] + 1], 1)


def refine_histograms(hists: dict, spec, lm, batches, conventions: dict, nonfinite: str, num_threads: int) -> dict:
    """Second fused pass: keeps the pixels of each method's decisive groups (FPR95, best
    F1) and of the groups that widen its AUROC / AP bounds most (REFINE_AREA_PIXELS over
    all methods), with REFINE_NEIGHBOURS neighbours on each side, re-scores them exactly
    (float64 reference for per-pixel methods, the core's coordinate for HEAT /
    post-processed SML) and replaces those groups by the exact tie groups: FPR95, best F1
    and both thresholds are then scikit-learn's on the exact scores, AUROC and AP too when
    every group that widened their bounds fit the budget (their bounds say what is left)."""
    from . import reference
    names = list(spec.names)
    tables = {n: hists[n].groups() for n in names}
    budget = REFINE_AREA_PIXELS // max(len(names), 1)
    rescored = {n: _rescored(spec, n) for n in names}
    rows = {n: _refine_rows(_refine_table(tables[n], n, rescored[n]), conventions, budget) for n in names}
    if not any(r.size for r in rows.values()):
        return {n: _mark_refined(hists[n].finalize(**conventions), 0) for n in names}
    sel = {}
    for n in names:  # the coordinate ranges of the groups to re-score, ascending, with their table position
        r = rows[n]
        o = np.argsort(tables[n][2][r]) if r.size else r
        lo_e, hi_e = binning.bin_edges(tables[n][5][r[o]])
        sel[n] = (r[o], torch.from_numpy(lo_e), torch.from_numpy(hi_e))
    kept = {n: ([], [], []) for n in names}  # exact coordinate, anomaly, table position
    total = 0
    for xi, yi, fi in batches():
        _, _, maps = _fused.fused_pass(xi, None, spec, want_maps=True, num_threads=num_threads, features=fi)
        valid, cls = _valid_mask(lm, yi, xi, maps, spec, nonfinite)
        flat = maps.reshape(len(names), -1)
        pix = None
        for j, n in enumerate(names):
            r, lo, hi = sel[n]
            if not r.size:
                continue
            t = flat[j].to(torch.float64)
            k = torch.searchsorted(lo.to(t.device), t, right=True) - 1
            kc = k.clamp(min=0)
            inside = (k >= 0) & (t <= hi.to(t.device)[kc]) & valid
            total += int(inside.sum())
            if total > REFINE_MAX_PIXELS + REFINE_AREA_PIXELS:
                raise MemoryError(f"refine=True: the decisive bins hold more than {REFINE_MAX_PIXELS} pixels; "
                                  "such a pile-up of nearly equal scores cannot be refined in bounded memory "
                                  "(the certified bounds of the histogram result still hold)")
            if rescored[n]:
                if pix is None:  # (B*H*W, C) view of the batch's logits, in the maps' pixel order
                    pix = xi.permute(0, 2, 3, 1).reshape(-1, xi.shape[1])
                x64 = pix[inside].to(torch.float64)[:, :, None, None]
                coord = reference.coordinate(x64, n, **_reference_params(spec, n))[:, 0, 0]
            else:
                coord = t[inside]
            kept[n][0].append(coord.cpu().numpy())
            kept[n][1].append((cls[inside] == ANOMALY).cpu().numpy())
            kept[n][2].append(r[kc[inside].cpu().numpy()])
    return {n: _refined_result(hists[n], tables[n], rows[n], kept[n], conventions, rescored[n]) if rows[n].size
            else _mark_refined(hists[n].finalize(**conventions), 0) for n in names}


def _reference_params(spec, name: str) -> dict:
    if name == "energy":
        return {"temperature": spec.temperature}
    if name == "sml":
        return {"sml_mean": spec.sml.mean, "sml_std": spec.sml.std}
    if name == "entropy":
        return {"entropy_normalize": bool(spec.entropy_normalize)}
    if name == "gen":
        return {"gen_gamma": spec.gen_gamma}
    return {}


def _refined_result(h: Histogram, table, rows: np.ndarray, kept, conventions, rescored: bool):
    pos, neg, lo, hi, tied, idx = table
    t = np.concatenate(kept[0]) if kept[0] else np.zeros(0)
    y = np.concatenate(kept[1]) if kept[1] else np.zeros(0, bool)
    where = np.concatenate(kept[2]) if kept[2] else np.zeros(0, np.int64)
    runs = _runs(rows)
    rep = np.zeros(pos.size, bool)  # the rows replaced by exact groups
    rep[rows] = True
    if not (np.array_equal(np.bincount(where[y], minlength=pos.size)[rep], pos[rep])
            and np.array_equal(np.bincount(where[~y], minlength=pos.size)[rep], neg[rep])):
        raise RuntimeError(f"refine=True: the second pass over the inputs did not reproduce the first pass's "
                           f"counts for {h.method!r}; the inputs must be the same (same order, not reshuffled or "
                           "augmented) in both passes")
    # An exact score may lie a few float32 ulps outside the bins its float32 score fell in;
    # past the rows next to its run it is clamped to them (so the table stays sorted) and
    # its group is not claimed exact (the bounds below merge such run edges anyway).
    edge_lo, edge_hi = binning.bin_edges(idx)
    run = np.searchsorted(runs[:, 0], where, side="right") - 1
    above, below = runs[:, 0] - 1, runs[:, 1]
    lim_hi = np.where(above >= 0, edge_lo[np.maximum(above, 0)], np.inf)
    lim_lo = np.where(below < pos.size, edge_hi[np.minimum(below, pos.size - 1)], -np.inf)
    top, bottom = lim_hi[run], lim_lo[run]
    out = (t > top) | (t < bottom)
    tv = np.clip(t, bottom, top)
    o = np.lexsort((-tv, run))  # by run, then descending exact score
    run, tv, y, out = run[o], tv[o], y[o], out[o]
    start = np.flatnonzero(np.concatenate(([True], (np.diff(run) != 0) | (np.diff(tv) != 0)))) if tv.size \
        else np.zeros(0, np.int64)
    sp = np.add.reduceat(y.astype(np.int64), start) if start.size else np.zeros(0, np.int64)
    sn = np.diff(np.append(start, tv.size)) - sp
    sv = tv[start]
    exact = ~(np.add.reduceat(out.astype(np.int64), start) > 0) if start.size else np.zeros(0, bool)
    # place the exact groups where their run's rows were: key = run start + rank in the run / size
    g_run = run[start]
    first = np.searchsorted(g_run, g_run, side="left")
    count = np.searchsorted(g_run, g_run, side="right") - first
    g_key = runs[g_run, 0] + (np.arange(start.size) - first) / np.maximum(count, 1)
    keep_rows = np.flatnonzero(~rep)
    order = np.argsort(np.concatenate((keep_rows.astype(np.float64), g_key)), kind="stable")
    _, _, _, _, tied, _, chain = _refine_table(table, h.method, rescored)
    cols = [np.concatenate(pair)[order] for pair in
            ((pos[~rep], sp), (neg[~rep], sn), (lo[~rep], sv), (hi[~rep], sv), (tied[~rep], exact))]
    r = finalize_coords(h.method, h.params, *cols, **conventions)
    # AUROC / AP bounds. Point values order the pixels of rows kept as they were by their
    # float32 bins; those of one chain may interleave (_refine_table), and so may a run's
    # top (bottom) bin with the row above (below) it in the same chain. The bounds come from
    # the same table with such neighbours merged into open groups.
    n_keep = keep_rows.size
    a_r, b_r = runs[:, 0], runs[:, 1] - 1  # each run's top and bottom row
    open_top = (a_r > 0) & (chain[a_r] == chain[np.maximum(a_r - 1, 0)])
    open_bot = (b_r < pos.size - 1) & (chain[b_r] == chain[np.minimum(b_r + 1, pos.size - 1)])
    is_top = np.concatenate((np.zeros(n_keep, bool), (sv >= edge_lo[a_r[g_run]]) & open_top[g_run]))[order]
    is_bot = np.concatenate((np.zeros(n_keep, bool), (sv <= edge_hi[b_r[g_run]]) & open_bot[g_run]))[order]
    owner = np.concatenate((np.full(n_keep, -1), g_run))[order]  # run id, -1 for a row kept as it was
    row_chain = np.concatenate((chain[keep_rows], np.full(g_run.size, -1)))[order]
    prev_run, cur_run = owner[:-1], owner[1:]
    join = (((prev_run == cur_run) & (cur_run >= 0) & ((is_top[1:] & is_top[:-1]) | (is_bot[1:] & is_bot[:-1])))
            | ((prev_run >= 0) & (cur_run < 0) & is_bot[:-1])
            | ((prev_run < 0) & (cur_run >= 0) & is_top[1:])
            | ((prev_run < 0) & (cur_run < 0) & (row_chain[1:] == row_chain[:-1])))
    c0 = np.flatnonzero(np.concatenate(([True], ~join)))
    single = np.diff(np.append(c0, join.size + 1)) == 1
    ccols = (np.add.reduceat(cols[0], c0), np.add.reduceat(cols[1], c0), np.minimum.reduceat(cols[2], c0),
             np.maximum.reduceat(cols[3], c0), np.logical_and.reduceat(cols[4], c0) & single)
    rb = finalize_coords(h.method, h.params, *ccols, **conventions)
    for k in ("auroc", "ap"):
        r.bounds[k] = (min(rb.bounds[k][0], getattr(r, k)), max(rb.bounds[k][1], getattr(r, k)))
    return _mark_refined(r, int(y.size))


def _mark_refined(r, n_kept: int):
    r.definitions["refine"] = (f"exact: fpr95, f1 and both thresholds re-decided from {n_kept} pixels "
                               "re-scored exactly (float64) in the bins where they are decided and in the bins "
                               "that widened the auroc / ap bounds most (second fused pass); auroc and ap are "
                               "exact where their bounds are closed")
    for k in ("fpr95", "f1", "threshold", "fpr95_threshold"):
        v = getattr(r, k)
        r.bounds[k] = (v, v)
    return r


# ---------------------------------------------------------------- component metrics


class _TappedBatches:
    """Re-iterable (logits, labels, features) items of evaluate's inputs; the first
    iteration also hands every raw batch to on_batch (the component pass riding along
    the pixel pass when every component threshold is given)."""

    def __init__(self, logits, labels, features, on_batch):
        self.args, self.on_batch, self.fed = (logits, labels, features), on_batch, False

    def __iter__(self):
        feed, self.fed = not self.fed, True
        for lg, y, f in _batches(*self.args):
            if feed:
                self.on_batch(lg, y, f)
            yield lg, y, f


def _with_components(evaluate_fn):
    """Adds components= to evaluate: the SegmentMeIfYouCan component metrics
    (anomfast.components) in results.components {method: ComponentResult}."""
    import functools
    import inspect
    sig = inspect.signature(evaluate_fn)

    @functools.wraps(evaluate_fn)
    def evaluate_with_components(*args, components=False, **kwargs):
        cs = as_component_spec(components)
        if cs is None:
            return evaluate_fn(*args, **kwargs)
        a = sig.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        if p["protocol"] is not None:
            raise ValueError("components= uses the default protocol's best-F1 threshold; drop protocol=")
        spec = resolve(p["methods"], **p["method_params"])
        lm = as_label_map(p["label_map"], p["ignore_index"])
        logits, labels = p["logits"], p["labels"]
        features = p["features"] if "heat" in spec.names else None
        if labels is None and isinstance(logits, (torch.Tensor, np.ndarray)):
            return evaluate_fn(*args, **kwargs)  # its own error: labels are missing

        def on_batch(lg, y, f):
            x = _fused.as_logits(lg)
            yy = _fused.as_labels(y, x)
            f = as_features(f, x, spec.heat) if "heat" in spec.names else None
            _, _, maps = _fused.fused_pass(x, None, spec, want_maps=True, num_threads=p["num_threads"], features=f)
            acc.update_maps(maps, yy)

        given = set((cs.thresholds or {}).keys())
        if set(spec.names) <= given:  # every threshold known: one read, along the pixel pass
            acc = accumulator_for(cs, spec.names, lm)
            if p["refine"]:
                for name, v in (("logits", logits), ("labels", labels), ("features", features)):
                    _reiterable(name, v)
            a.arguments.update(logits=_TappedBatches(logits, labels, features, on_batch), labels=None, features=None)
            results = evaluate_fn(*a.args, **a.kwargs)
        else:  # the best-F1 thresholds come from the pixel pass: a second read
            for name, v in (("logits", logits), ("labels", labels), ("features", features)):
                _reiterable(name, v, "components= without a threshold for every method")
            results = evaluate_fn(*args, **kwargs)
            best = results
            if p["refine"]:  # refined thresholds apply to exact float64 scores; the maps binarized here are
                # the core's float32 ones, whose own best pixel-F1 set is the unrefined threshold's
                conv = {k: p[k] for k in ("fpr_mode", "ap_mode", "tpr_target")}
                best = {m: results.histograms[m].finalize(**conv) for m in spec.names}
            acc = accumulator_for(cs, spec.names, lm, best_f1=best)
            for lg, y, f in _batches(logits, labels, features):
                on_batch(lg, y, f)
        results.components = acc.results()
        return results

    params = list(sig.parameters.values())
    comp = inspect.Parameter("components", inspect.Parameter.KEYWORD_ONLY, default=False)
    evaluate_with_components.__signature__ = sig.replace(parameters=params[:-1] + [comp, params[-1]])
    evaluate_with_components.__doc__ = (evaluate_fn.__doc__ or "") + """
    components=True (or a dict of anomfast.components.ComponentSpec fields: track,
    thresh_segsize, thresh_instsize, mode, thresholds) adds the SegmentMeIfYouCan component
    metrics (sIoU_gt, PPV, F1 per IoU threshold and mean F1) in results.components. Each
    method's score map is binarized at its pooled best pixel-F1 threshold, so the inputs
    are read a second time and must be re-iterable (tensors, lists, DataLoaders; a one-shot
    iterator is refused); with components={"thresholds": {method: t, ...}} for every method
    they are read once.
    """
    return evaluate_with_components


@_with_components
def evaluate(logits, labels=None, methods=None, ignore_index: int = 255, exact: bool = False, *,
             label_map=None, fpr_mode: str = "first", ap_mode: str = "step", tpr_target: float = 0.95,
             per_image: bool = False, subsample: int | None = None, seed: int = 42, refine: bool = False,
             nonfinite: str = "error", num_threads: int = 0, features=None, protocol: str | None = None,
             **method_params) -> Results:
    """Evaluate anomaly scores of segmentation logits against anomaly labels.

    logits (B, C, H, W) and labels (B, H, W) (tensors or NumPy arrays), or aligned
    iterables of such batches, or (labels omitted) one iterable of (logits, labels) or
    (logits, labels, features) tuples, e.g. a DataLoader. Returns
    {method: MetricResult} with auroc, ap, fpr95, f1, threshold, fpr95_threshold and
    certified bounds. features (B, D, h, w) (or an iterable of batches aligned with the
    logits): the feature maps HEAT needs, with heat=anomfast.fit_heat(...).

    refine=True reads the inputs a second time (they must be re-iterable and identical)
    and re-scores in float64 the pixels of the few bins where FPR95 and the best F1 are
    decided and of the bins that widen the AUROC / AP bounds (up to REFINE_AREA_PIXELS):
    FPR95, F1 and both thresholds are then exactly scikit-learn's on exact float64 scores,
    AUROC and AP too when those bins fit (their bounds say what is left).
    exact=True keeps every valid pixel's score and sorts (verification, small data).
    per_image=True averages the metrics over images (images lacking anomaly or normal
    pixels are skipped for the metrics they leave undefined) instead of pooling pixels.
    subsample=N evaluates exact metrics on N valid pixels drawn uniformly without
    replacement (a seeded reservoir over the stream of valid pixels, `seed`).
    protocol="ml4cv" reproduces the ml4cv-assignment scripts' evaluation (float16 scores,
    np.random.seed(42) subsample of 1,000,000 pixels, their FPR95 / F1 / SML rules; see
    anomfast/protocols.py); subsample= and seed= then set that draw's size and seed.
    """
    from .metrics import groups_from_scores, mean_over_images
    if labels is None and isinstance(logits, (torch.Tensor, np.ndarray)):
        raise TypeError("evaluate needs labels (B, H, W); only an iterable of (logits, labels) pairs carries "
                        "its own")
    if nonfinite not in ("error", "ignore"):
        raise ValueError(f"nonfinite must be 'error' or 'ignore', got {nonfinite!r}")
    if sum([bool(exact), bool(per_image), subsample is not None, bool(refine)]) > 1:
        raise ValueError("choose at most one of exact=True, per_image=True, subsample=N, refine=True")
    if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, (int, np.integer))
                                  or subsample < 1):
        raise ValueError(f"subsample must be a positive number of pixels, got {subsample!r}")
    proto = protocols.check_protocol(protocol)
    if proto is not None and refine:
        raise ValueError(f"protocol={proto!r} computes its metrics from every pixel's score; refine=True applies "
                         "to the default (histogram) protocol")
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
    need_features = "heat" in spec.names
    if refine:
        for name, v in (("logits", logits), ("labels", labels), ("features", features if need_features else None)):
            _reiterable(name, v)

    def batches():
        for lg, y, f in _batches(logits, labels, features if need_features else None):
            x = _fused.as_logits(lg)
            yy = _fused.as_labels(y, x)
            if need_features:
                f = as_features(f, x, spec.heat)
            yield x, yy, f

    acc = Accumulator(spec, lm, nonfinite)  # one pooled state, emptied as it is read (per image: after each image)
    per_image_results = {n: [] for n in spec.names}
    kept_scores = [[] for _ in range(M)]
    kept_labels = []
    reservoir = None  # (keys, scores (M, n), labels)
    rng = np.random.default_rng(seed) if subsample is not None else None  # the reservoir's keys
    for x, yy, f in batches():
        images = ([(x[i:i + 1], yy[i:i + 1], None if f is None else f[i:i + 1]) for i in range(x.shape[0])]
                  if per_image else [(x, yy, f)])
        if not images:
            acc.allocate(x.device)  # a batch of B = 0 images is still a batch (no metric is defined)
        for xi, yi, fi in images:
            maps = acc.add(xi, yi, fi, want_maps=need_maps, num_threads=num_threads)
            acc.check(yi)
            if per_image:
                for n, hj in acc.histograms(clear=True).items():
                    per_image_results[n].append(hj.finalize(**conventions))
            if need_maps:
                valid, cls = _valid_mask(lm, yi, xi, maps, spec, nonfinite)
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
    if acc.state is None:  # every batch, even an empty one, takes the state
        raise ValueError("evaluate got no batches")
    results = Results()
    results.pixels = acc.check()
    finalized = None
    if need_maps or per_image:
        results.histograms = {}
    elif refine:
        results.histograms = acc.histograms(clear=True)
    else:  # read out and finalized in one compiled call
        results.histograms, finalized = acc.histograms_and_results(conventions, clear=True)
    acc.release()
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
                warn(f"subsample={subsample} but only {reservoir[2].numel()} valid pixels exist; "
                     "all of them are used")
            labs = reservoir[2].numpy() if reservoir is not None else np.zeros(0, bool)
            cols = [reservoir[1][j].numpy() if reservoir is not None else np.zeros(0, np.float32) for j in range(M)]
        for j, n in enumerate(spec.names):
            # grouped in coordinates: msp's u keeps pixels apart that -max softmax rounds together
            pos, neg, lo, hi = groups_from_scores(cols[j].astype(np.float64), labs)
            r = finalize_coords(n, spec.params_of(n), pos, neg, lo, hi, None, exact=True, **conventions)
            if subsample is not None:
                r.definitions["subsample"] = f"{labs.size} valid pixels drawn uniformly without replacement, seed {seed}"
            results[n] = r
        return results
    if refine:
        results.update(refine_histograms(results.histograms, spec, lm, batches, conventions, nonfinite, num_threads))
    else:
        results.update(finalized)
    return results


def _thresholds_in_caller_values(r, scores: np.ndarray) -> None:
    """Bins hold float32 values; a caller's float64 score just below a float32 value rounds
    up into the bin whose smallest float32 member is the reported threshold, so "score >=
    threshold" would miss it. Replace each threshold t (a bin's smallest float32 value) by
    the smallest caller score whose float32 value is >= t: exactly the same pixels are then
    flagged, in the caller's own precision. Its bound (lo, hi), float32 values of the bins
    that may hold the exact threshold, becomes the smallest and largest caller score whose
    float32 value lies in [lo, hi]: the exact threshold is one of the caller's scores, and
    rounding to float32 keeps their order, so it is one of those."""
    s32 = scores.astype(np.float32)
    for k in ("threshold", "fpr95_threshold"):
        t = getattr(r, k)
        if not np.isfinite(t):
            continue
        above = scores[s32 >= np.float32(t)]
        if above.size:
            v = float(above.min())
            setattr(r, k, v)
            lo, hi = r.bounds[k]
            inside = scores[(s32 >= np.float32(lo)) & (s32 <= np.float32(hi))]
            r.bounds[k] = (min(float(inside.min()), v), max(float(inside.max()), v))


def evaluate_scores(scores, labels, ignore_index: int = 255, exact: bool = False, *, label_map=None,
                    fpr_mode: str = "first", ap_mode: str = "step", tpr_target: float = 0.95,
                    nonfinite: str = "error") -> Results:
    """Certified metrics for per-pixel scores computed elsewhere (your own method).

    scores: a tensor / array of any shape (e.g. (B, H, W)), higher = more anomalous, or a
    dict {name: scores} for several methods; labels: integers of the same shape. The
    scores are binned with the same rule as the fused core (as float32), so the result,
    its bounds and its Histogram behave exactly like a built-in method's; exact=True
    sorts instead. Names of built-in methods are refused (a built-in method's
    histogram comes from the core, with its parameters and tie rules). Non-finite scores on valid pixels raise
    (``nonfinite="ignore"``: skipped and counted in ``results.pixels``).
    """
    from .metrics import groups_from_scores, metrics_from_groups
    if nonfinite not in ("error", "ignore"):
        raise ValueError(f"nonfinite must be 'error' or 'ignore', got {nonfinite!r}")
    named = scores if isinstance(scores, dict) else {"custom": scores}
    if not named:
        raise ValueError("evaluate_scores got no scores")
    lm = as_label_map(label_map, ignore_index)
    y = from_numpy(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels))
    if y.dtype.is_floating_point or y.dtype.is_complex:
        raise TypeError(f"labels must be an integer (or bool) array, got {y.dtype}")
    _fused.check_label_dtype(y)  # uint64 would wrap to negative values in the int64 lookup
    if y.dtype == torch.bool:  # False / True = 0 / 1, as evaluate() reads them
        y = y.to(torch.uint8)
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
        fin = np.isfinite(s)
        bad = valid & ~fin
        if bad.any() and nonfinite == "error":
            raise ValueError(f"scores {name!r} have {int(bad.sum())} non-finite values on valid pixels "
                             "(nonfinite='ignore' skips them)")
        keep = valid & fin
        lost = None  # the warning about nonzero scores that float32 makes 0
        if not exact and s.dtype.kind == "f" and s.dtype.itemsize > 4:
            big = np.abs(s[keep]) > np.finfo(np.float32).max
            if big.any():  # float32 would make them +-inf, which the bins never hold
                raise ValueError(f"scores {name!r} have {int(big.sum())} finite values beyond float32's range "
                                 f"(|s| > 3.4e38, e.g. {float(s[keep][big][0]):.6g}); the histograms bin float32 "
                                 "values: rescale the scores (any increasing map keeps the ranking) or pass exact=True")
            tiny = (s[keep] != 0) & (s[keep].astype(np.float32) == 0)
            if tiny.any():
                lost = (f"scores {name!r}: {int(tiny.sum())} nonzero values are below float32's smallest "
                        "subnormal (1.4e-45) and are binned as 0, so their order is lost; rescale the scores "
                        "(any increasing map keeps the ranking) or pass exact=True")
                warn(lost)
        results.pixels[name] = {"binned": int(keep.sum()), "nonfinite": int(bad.sum()),
                                "void": int((~valid).sum()), "invalid": 0}
        if exact:
            if s.dtype.kind in "iu" and s.dtype.itemsize == 8:
                big = (s[keep] > 2 ** 53) if s.dtype.kind == "u" else ((s[keep] > 2 ** 53) | (s[keep] < -2 ** 53))
                if big.any():  # float64 would merge distinct integers into ties and report them as exact
                    raise ValueError(f"scores {name!r} have {int(big.sum())} integer values beyond +-2^53 (e.g. "
                                     f"{s[keep][big][0]}), where float64, which exact=True sorts, cannot tell "
                                     "neighbouring integers apart; rescale them into +-2^53 (subtract an offset, "
                                     "or take their ranks: any increasing map keeps the metrics) or pass float scores")
            sv = s[keep].astype(np.float64)
            pos, neg, lo, hi = groups_from_scores(sv, anomaly[keep])
            r = metrics_from_groups(pos, neg, lo, hi, exact=True, **conventions)
            r.method, r.params = name, {}
        else:
            sv = s[keep]
            # one float32 value per bin is a real tie only if the caller's scores were float32-exact
            exact32 = bool(np.array_equal(sv.astype(np.float32).astype(sv.dtype), sv))
            h = Histogram.from_scores(name, sv, anomaly[keep], {"source": "evaluate_scores", "float32_exact": exact32})
            results.histograms[name] = h
            r = h.finalize(**conventions)
            if not exact32:
                _thresholds_in_caller_values(r, sv)
            if lost:
                r.warnings.append(lost)
        results[name] = r
    return results
