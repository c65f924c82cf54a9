"""Plots of a grid run, sized and labelled for a paper (matplotlib, Agg backend):

- curves_<model>: ROC (log-scale FPR by default, a marker at TPR 95% with its FPR, the
  chance diagonal) and precision-recall (the chance line at the anomaly prevalence);
- scores_<model>: normal vs anomaly score distributions, one panel per method, on a log
  axis where the scores span decades; MSP's score 1 - MSP on a log axis, where a linear
  axis would show one spike at 0;
- examples_<model>: the input image (when the grid has images/), the ground truth
  (anomaly, normal, void) and each method's map (one colorbar per method column, whose
  range the rows share), void pixels in grey.

Each figure is written in every requested format (png, pdf, svg).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .methods import DISPLAY

MAX_POINTS = 3000          # curve points kept per line (vector files stay small)
VOID_GREY = "#c8c8c8"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _save(fig, out: Path, stem: str, formats) -> list:
    paths = []
    for fmt in formats:
        p = out / f"{stem}.{fmt}"
        # the figures lay themselves out (tight / constrained layout): bbox_inches="tight"
        # would draw every figure once more to measure it (half of the plotting time)
        # PNG: zlib level 1 (the default 6 spent most of the examples figure's time
        # compressing; the files stay lossless, a little larger)
        fig.savefig(p, dpi=150 if fmt == "png" else None,
                    **({"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}))
        paths.append(p)
    return paths


def _thin(x: np.ndarray, y: np.ndarray, log_x: bool = False):
    """At most about MAX_POINTS points of a monotone curve, keeping its ends and the
    points nearest an even grid in x (log-spaced on a log axis) and in y."""
    n = x.size
    if n <= MAX_POINTS:
        return x, y
    k = MAX_POINTS // 3
    idx = [np.linspace(0, n - 1, k).astype(np.int64)]
    order = np.argsort(x, kind="stable")
    xs = x[order]
    pos = xs[xs > 0]
    grid = np.geomspace(max(pos.min(), 1e-12), xs.max(), k) if (log_x and pos.size) else np.linspace(xs[0], xs[-1], k)
    idx.append(order[np.clip(np.searchsorted(xs, grid), 0, n - 1)])
    oy = np.argsort(y, kind="stable")
    idx.append(oy[np.clip(np.searchsorted(y[oy], np.linspace(y.min(), y.max(), k)), 0, n - 1)])
    keep = np.unique(np.concatenate(idx + [np.array([0, n - 1])]))
    return x[keep], y[keep]


def _curves(plt, m: dict, roc_log: bool):
    # fixed margins (inches) instead of tight_layout, which draws the figure once more to measure it
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.3),
                                 gridspec_kw=dict(left=0.7 / 10, right=1 - 0.2 / 10, bottom=0.6 / 4.3,
                                                  top=1 - 0.7 / 4.3, wspace=0.25))
    prevalence = None
    floor = 1.0
    for k, r in m["results"].items():
        if not (r.n_pos and r.n_neg):
            continue
        prevalence = r.n_pos / (r.n_pos + r.n_neg)
        fpr, tpr, _ = r.roc_curve()
        if roc_log:  # start the axis a decade below where the first curve reaches TPR 1%
            at = fpr[np.argmax(tpr >= 0.01)]
            floor = min(floor, max(0.5 / r.n_neg, 10.0 ** (np.floor(np.log10(max(at, 1e-300))) - 1)))
        x, y = _thin(fpr, tpr, roc_log)
        line, = a1.plot(x, y, lw=1.4, label=f"{DISPLAY.get(k, k)} (AUROC {100 * r.auroc:.1f})")
        if np.isfinite(r.fpr95):
            a1.plot([max(r.fpr95, floor) if roc_log else r.fpr95], [0.95], "o", ms=5, color=line.get_color(),
                    mec="black", mew=0.6)
        p, rc, _ = r.pr_curve()
        keep = rc > 0  # recall-0 points (the appended (0, 1), top groups without anomalies) weigh nothing in AP
        p, rc = p[keep], rc[keep]
        x, y = _thin(rc, p)
        a2.plot(x, y, lw=1.4, color=line.get_color(), label=f"{DISPLAY.get(k, k)} (AP {100 * r.ap:.1f})")
    a1.axhline(0.95, color="grey", lw=0.7, ls="--")
    if roc_log:
        a1.set_xscale("log")
        xs = np.geomspace(floor, 1, 100)
        a1.plot(xs, xs, "k:", lw=0.8, label="chance")
        a1.set_xlim(floor, 1)
        a1.set_xlabel("false positive rate (log scale)")
    else:
        a1.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
        a1.set_xlim(0, 1)
        a1.set_xlabel("false positive rate")
    a1.set_ylim(0, 1.01)
    a1.set(ylabel="true positive rate", title="ROC (markers: FPR at TPR 95%)")
    if prevalence is not None:
        a2.axhline(prevalence, color="black", ls=":", lw=0.8, label=f"chance (prevalence {100 * prevalence:.1f}%)")
    a2.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    for a in (a1, a2):
        a.grid(True, which="major", lw=0.3, alpha=0.6)
        a.legend(fontsize=7.5, loc=("upper left" if roc_log else "lower right") if a is a1 else "upper right")
    fig.suptitle(m["name"], fontsize=11)
    return fig


def _wquantile(x: np.ndarray, w: np.ndarray, qs) -> np.ndarray:
    o = np.argsort(x, kind="stable")
    cw = np.cumsum(w[o].astype(np.float64))
    return x[o][np.clip(np.searchsorted(cw, np.asarray(qs) * cw[-1]), 0, x.size - 1)]


def _distributions(plt, m: dict):
    ks = list(m["histograms"])
    ncols = min(3, len(ks))
    nrows = -(-len(ks) // ncols)
    fw, fh = 3.7 * ncols, 2.9 * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(fw, fh), squeeze=False,
                             gridspec_kw=dict(left=0.55 / fw, right=1 - 0.15 / fw, bottom=0.5 / fh,
                                              top=1 - 0.75 / fh, wspace=0.6 / 3.7 * ncols / max(ncols - 1, 1) * 0.8,
                                              hspace=1.1 / 2.9))
    for ax in axes.flat[len(ks):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, ks):
        pos, neg, lo, hi, *_ = m["histograms"][k].groups()   # bin coordinates; msp's is u = 1 - MSP
        ax.set_title(DISPLAY.get(k, k), fontsize=10)
        if pos.size == 0:
            ax.text(0.5, 0.5, "no pixels", ha="center", va="center", transform=ax.transAxes)
            continue
        x = 0.5 * (np.clip(lo, -1e300, 1e300) + np.clip(hi, -1e300, 1e300))
        w = pos + neg
        q_lo, q_hi = _wquantile(x, w, [0.001, 0.999])
        positive = x[x > 0]
        log_x = k == "msp" or (positive.size == x.size and q_lo > 0 and q_hi / q_lo > 1e3)
        if log_x:
            small = _wquantile(positive, w[x > 0], [0.001])[0] if positive.size else 1e-8
            q_lo = max(small, q_hi * 1e-12, np.finfo(np.float64).tiny)
            edges = np.geomspace(q_lo, max(q_hi, q_lo * 10), 61)
        else:
            if q_hi <= q_lo:
                q_lo, q_hi = q_lo - 0.5, q_hi + 0.5
            edges = np.linspace(q_lo, q_hi, 61)
        xc = np.clip(x, edges[0], edges[-1])   # the tails go into the outer bins
        hn, _ = np.histogram(xc, bins=edges, weights=neg)
        ha, _ = np.histogram(xc, bins=edges, weights=pos)
        ax.stairs(hn / max(hn.sum(), 1), edges, fill=True, alpha=0.35, color="tab:blue")
        ax.stairs(hn / max(hn.sum(), 1), edges, color="tab:blue", lw=1.1, label=f"normal ({int(neg.sum())} px)")
        ax.stairs(ha / max(ha.sum(), 1), edges, fill=True, alpha=0.35, color="tab:red")
        ax.stairs(ha / max(ha.sum(), 1), edges, color="tab:red", lw=1.1, label=f"anomaly ({int(pos.sum())} px)")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(("1 - MSP" if k == "msp" else "score") + (" (log scale)" if log_x else "")
                      + ", higher = more anomalous", fontsize=8)
        ax.set_ylabel("fraction of pixels", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.legend(fontsize=7)
    fig.suptitle(f"Score distributions - {m['name']}", fontsize=11)
    return fig


def _classes(e: dict) -> np.ndarray:
    """0 normal, 1 anomaly, 2 void per pixel (from the label map when the runner gave it)."""
    if e.get("classes") is not None:
        return np.asarray(e["classes"])
    y = np.asarray(e["labels"])
    return np.where(y == 255, 2, np.where(y != 0, 1, 0))


def _examples(plt, m: dict):
    from matplotlib.colors import ListedColormap
    ex = m["examples"]
    ks = list(ex[0]["maps"])
    has_image = any(e.get("image") is not None for e in ex)
    ncols = len(ks) + 1 + has_image
    H, W = np.asarray(ex[0]["labels"]).shape
    cell_w = 2.5
    cell_h = cell_w * H / W + 0.15
    # a fixed layout in inches (no layout engine: constrained layout measured every axis and
    # tick label twice per save, most of this figure's time): margins for the row labels,
    # the column titles and suptitle, and a row of colorbars under the method columns
    left, right, top, bottom = 0.35, 0.1, 0.55, 0.6
    fw, fh = cell_w * ncols + left + right, cell_h * len(ex) + top + bottom
    fig, axes = plt.subplots(len(ex), ncols, figsize=(fw, fh), squeeze=False,
                             gridspec_kw=dict(left=left / fw, right=1 - right / fw, top=1 - top / fh,
                                              bottom=bottom / fh, wspace=0.08, hspace=0.06))
    gt_cmap = ListedColormap(["#1f1f1f", "#ff7f0e", VOID_GREY])
    ranges = {}
    for k in ks:  # one color range per method over all examples: rows stay comparable
        vals = np.concatenate([np.asarray(e["maps"][k])[_classes(e) != 2].ravel() for e in ex])
        vals = vals[np.isfinite(vals)]
        ranges[k] = tuple(np.percentile(vals, [1, 99])) if vals.size else (0.0, 1.0)
    for i, (row, e) in enumerate(zip(axes, ex)):
        cls = _classes(e)
        c = 0
        if has_image:
            img = e.get("image")
            if img is not None:
                row[0].imshow(np.asarray(img), cmap="gray" if np.asarray(img).ndim == 2 else None)
            c = 1
        row[c].imshow(cls, cmap=gt_cmap, vmin=0, vmax=2, interpolation="nearest")
        for j, k in enumerate(ks):
            ax = row[c + 1 + j]
            cmap = plt.get_cmap("magma").with_extremes(bad=VOID_GREY)
            im = ax.imshow(np.ma.masked_where(cls == 2, np.asarray(e["maps"][k])), cmap=cmap,
                           vmin=ranges[k][0], vmax=ranges[k][1], interpolation="nearest")
            if i == len(ex) - 1:  # one colorbar per method column (its range is shared by the rows)
                pos = ax.get_position()
                cax = fig.add_axes([pos.x0 + 0.05 * pos.width, 0.32 / fh, 0.9 * pos.width, 0.1 / fh])
                cb = fig.colorbar(im, cax=cax, orientation="horizontal")
                cb.ax.tick_params(labelsize=6.5)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(e["stem"], fontsize=8)
        if i == 0:
            titles = (["input"] if has_image else []) + ["ground truth"] + [DISPLAY.get(k, k) for k in ks]
            for ax, t in zip(row, titles):
                ax.set_title(t, fontsize=9)
    fig.suptitle(f"Anomaly maps - {m['name']} (ground truth: orange anomaly, grey void; maps: brighter = "
                 "more anomalous, void grey)", fontsize=9)
    return fig


def write_plots(run: dict, out: Path, formats=("png",), roc_log: bool = True, progress=None) -> list:
    """Writes the figures of every model of a run in each format; returns the paths."""
    plt = _plt()
    say = progress or (lambda s: None)
    out = Path(out)
    written = []
    for m in run["models"]:
        s = slug(m["name"])
        say(f"anomfast: plotting {m['name']} ({', '.join(formats)})")
        for stem, make in (("curves", lambda: _curves(plt, m, roc_log)), ("scores", lambda: _distributions(plt, m)),
                           ("examples", lambda: _examples(plt, m) if m.get("examples") else None)):
            fig = make()
            if fig is None:
                continue
            written += _save(fig, out, f"{stem}_{s}", formats)
            plt.close(fig)
    return written
