"""Plots of a grid run, sized and labelled for a paper (matplotlib, Agg backend):

- curves_<model>: ROC (log-scale FPR by default, a marker at TPR 95% with its FPR, the
  chance diagonal) and precision-recall (the chance line at the anomaly prevalence);
- scores_<model>: normal vs anomaly score distributions, one panel per method, on a log
  axis where the scores span decades; MSP's score 1 - MSP on a log axis, where a linear
  axis would show one spike at 0;
- examples_<model>: the input image (when the grid has images/), the ground truth
  (anomaly, normal, void) and each method's map (one colorbar per method column, whose
  range the rows share), void pixels in grey.

<model> is the model name in lower case with every other character than a letter or digit
as "_" (plots.slug), with _2, _3, ... added when two models' names give the same one
(plots.unique_slugs). Each figure is written in every requested format (png, pdf, svg).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..methods import DISPLAY

MAX_POINTS = 3000          # curve points kept per line (vector files stay small)
VOID_GREY = "#c8c8c8"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


SLUG_MAX_BYTES = 64  # file names stay far below the usual 255-byte limit, whatever the model name


def slug(name: str) -> str:
    """The name in lower case, other characters than letters and digits as '_', cut to
    SLUG_MAX_BYTES bytes of UTF-8 (unique_slugs keeps cut names apart)."""
    s = "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
    return s.encode("utf-8")[:SLUG_MAX_BYTES].decode("utf-8", errors="ignore").rstrip("_")


def unique_slugs(names) -> list:
    """A file-name slug per model, in order: slug(name), or slug(name)_2, _3, ... (the
    first number free and not another model's own slug) when models' names slug alike
    ("Model A", "model-a"), so no model's plots overwrite another's."""
    base = [slug(n) or "model" for n in names]
    out = []
    for b in base:
        s, k = b, 1
        while s in out or (s != b and s in base):
            k += 1
            s = f"{b}_{k}"
        out.append(s)
    return out


class _Writer:
    """Writes figures. PNG: the figure is drawn here at 150 dpi and its pixels are encoded
    (PIL, zlib level 1) on a background thread while the next figure is built and drawn
    (the encoder releases the GIL: about 0.1 s of each figure overlaps); other formats
    through savefig. close() waits for every file and raises the first error."""

    PNG_DPI = 150

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        # imported here, on the calling thread: an import on the writer thread would parse
        # source while other threads may be parsing too (np.load's header), and CPython 3.11's
        # AST constructor is not safe for that ("recursion depth mismatch", seen in CI)
        from PIL import Image, PngImagePlugin  # noqa: F401
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomfast-png")
        self._pending = []

    def save(self, fig, out: Path, stem: str, formats) -> list:
        """fig in each format. A figure may carry a mosaic (_examples: fig.anomfast_mosaic =
        (uint8 RGB image, x, y), its lower-left corner in pixels at PNG_DPI): PNG pastes it
        into the drawn pixels, as figimage would place it, without matplotlib's image
        pipeline (half the figure's time); vector formats embed it through figimage."""
        paths = []
        mosaic = getattr(fig, "anomfast_mosaic", None)
        for fmt in formats:
            p = out / f"{stem}.{fmt}"
            if fmt == "png":
                fig.set_dpi(self.PNG_DPI)
                fig.canvas.draw()
                rgba = np.array(fig.canvas.buffer_rgba())  # a copy: the figure is closed next
                if mosaic is not None:
                    img, x, y = mosaic
                    top = rgba.shape[0] - y - img.shape[0]
                    rgba[top:top + img.shape[0], x:x + img.shape[1], :3] = img
                    rgba[top:top + img.shape[0], x:x + img.shape[1], 3] = 255
                self._pending.append(self._pool.submit(_write_png, rgba, p, self.PNG_DPI))
            else:
                im = None
                if mosaic is not None:
                    fig.set_dpi(self.PNG_DPI)  # figimage places it in pixels at the figure's dpi
                    im = fig.figimage(mosaic[0], xo=mosaic[1], yo=mosaic[2], origin="upper", zorder=-1)
                try:  # the figures lay themselves out (fixed margins): bbox_inches="tight"
                    fig.savefig(p)  # would draw every figure once more to measure it
                finally:
                    if im is not None:
                        im.remove()
            paths.append(p)
        return paths

    def close(self) -> None:
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pool.shutdown(wait=True)


def _write_png(rgba: np.ndarray, path: Path, dpi: int) -> None:
    """PNG of an RGBA buffer, zlib level 1 (the default 6 spent most of a figure's time
    compressing; lossless either way), with the dpi and the software in its metadata."""
    from PIL import Image, PngImagePlugin
    import matplotlib
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"anomfast (matplotlib {matplotlib.__version__})")
    Image.fromarray(rgba, "RGBA").save(path, format="png", compress_level=1, dpi=(dpi, dpi), pnginfo=info)


def _light_axis(ax, log_x: bool) -> None:
    """Fewer tick objects to build and draw (tick creation and layout were most of a
    figure's time): no minor ticks, at most ~5 major ticks, plain-text labels on a log axis
    (no mathtext parsing)."""
    from matplotlib.ticker import LogFormatter, LogLocator, MaxNLocator, NullLocator
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())
    if log_x:
        ax.xaxis.set_major_locator(LogLocator(numticks=6))
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=True))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))


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
    _light_axis(a1, roc_log)
    _light_axis(a2, False)
    for a in (a1, a2):
        a.grid(True, which="major", lw=0.3, alpha=0.6)
        a.legend(fontsize=7.5, loc=("upper left" if roc_log else "lower right") if a is a1 else "upper right")
    fig.suptitle(m["name"], fontsize=11)
    return fig


def _wquantile(x: np.ndarray, w: np.ndarray, qs) -> np.ndarray:
    """Weighted quantiles of x, ascending (a histogram's groups reversed)."""
    cw = np.cumsum(w.astype(np.float64))
    return x[np.clip(np.searchsorted(cw, np.asarray(qs) * cw[-1]), 0, x.size - 1)]


def _distributions(plt, m: dict):
    ks = list(m["histograms"])
    ncols = min(3, len(ks))
    nrows = -(-len(ks) // ncols)
    fw, fh = 3.7 * ncols, 2.9 * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(fw, fh), squeeze=False,
                             gridspec_kw=dict(left=0.7 / fw, right=1 - 0.15 / fw, bottom=0.5 / fh,
                                              top=1 - 0.75 / fh, wspace=0.6 / 3.7 * ncols / max(ncols - 1, 1) * 0.8,
                                              hspace=1.1 / 2.9))
    for ax in axes.flat[len(ks):]:
        ax.set_visible(False)
    counts = []
    for ax, k in zip(axes.flat, ks):
        pos, neg, lo, hi, *_ = m["histograms"][k].groups()   # bin coordinates; msp's is u = 1 - MSP
        pos, neg, lo, hi = pos[::-1], neg[::-1], lo[::-1], hi[::-1]  # ascending
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
        _light_axis(ax, log_x)
        ax.tick_params(labelsize=7.5)
        counts.append((int(neg.sum()), int(pos.sum())))
    shown = [ax for ax in axes.flat[:len(ks)] if ax.get_legend_handles_labels()[0]]
    if shown and len(set(counts)) == 1:  # every method saw the same pixels: one legend for all panels
        handles, labels = shown[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=2, frameon=False,
                   bbox_to_anchor=(1 - 0.15 / fw, 1 - 0.05 / fh))
    else:
        for ax in shown:
            ax.legend(fontsize=7)
    fig.suptitle(f"Score distributions - {m['name']}", fontsize=11)
    return fig


def _classes(e: dict) -> np.ndarray:
    """0 normal, 1 anomaly, 2 void per pixel (from the label map when the runner gave it)."""
    if e.get("classes") is not None:
        return np.asarray(e["classes"])
    y = np.asarray(e["labels"])
    return np.where(y == 255, 2, np.where(y != 0, 1, 0))


def _cells(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """a (H, W[, C]) resampled to (h, w) by nearest pixel."""
    a = np.asarray(a)
    r = np.minimum((np.arange(h) * a.shape[0]) // h, a.shape[0] - 1)
    c = np.minimum((np.arange(w) * a.shape[1]) // w, a.shape[1] - 1)
    return a[r[:, None], c[None, :]]


def _rgb_image(img: np.ndarray) -> np.ndarray:
    """An input image as uint8 RGB, as imshow shows it: 2-D arrays on a grey scale spanning
    their own range, RGB(A) floats in [0, 1] or uint8."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] in (1, 2):  # grey (+ alpha): as RGB(A)
        img = np.concatenate([np.repeat(img[..., :1], 3, axis=2), img[..., 1:]], axis=2)
    if img.ndim == 2:
        v = img.astype(np.float64)
        lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if v.size else (0.0, 1.0)
        g = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
        return np.repeat((np.clip(np.nan_to_num(g), 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.dtype == np.uint8:
        v = img.astype(np.float64) / 255.0
    elif np.issubdtype(img.dtype, np.integer):  # imshow takes integer RGB(A) in 0..255
        v = np.clip(img.astype(np.float64), 0, 255) / 255.0
    else:
        v = np.clip(np.nan_to_num(img.astype(np.float64)), 0, 1)
    if v.shape[-1] == 4:  # over white, as the figure's background
        v = v[..., :3] * v[..., 3:] + (1.0 - v[..., 3:])
    return np.round(v[..., :3] * 255).astype(np.uint8)


def _examples(plt, m: dict):
    """The examples drawn as one mosaic image (rows: examples; columns: input, ground truth,
    one map per method), with text titles and a colorbar per method column. Colours are
    mapped in NumPy with matplotlib's colormaps and the mosaic is built at the PNG's own
    pixel size (each data pixel an integer block) and placed unresampled (_Writer.save:
    pasted into a PNG's pixels, figimage in vector formats): one image instead of an axes
    per cell, each with ticks and a frame to lay out, and no resampling pass, cost a
    fraction of the time."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, to_rgb
    ex = m["examples"]
    ks = list(ex[0]["maps"])
    has_image = any(e.get("image") is not None for e in ex)
    ncols, nrows = len(ks) + 1 + has_image, len(ex)
    H, W = np.asarray(ex[0]["labels"]).shape
    dpi = _Writer.PNG_DPI
    target = int(2.5 * dpi)  # a cell about 2.5 inches wide
    # large maps: every step-th pixel (still about what is shown); a cell at most 2.5 inches
    # wide and 5 high
    step = max(1, -(-W // target), -(-H // (2 * target)))
    h, w = -(-H // step), -(-W // step)
    k = max(1, min(target // w, 2 * target // h))  # display pixels per data pixel
    ch, cw = h * k, w * k
    gx, gy = max(1, round(0.08 * cw)), max(1, round(0.1 * ch))
    mh, mw = nrows * ch + (nrows - 1) * gy, ncols * cw + (ncols - 1) * gx
    left, right, top, bottom = 0.35, 0.1, 0.7, 0.6
    fw, fh = mw / dpi + left + right, mh / dpi + top + bottom
    fig = plt.figure(figsize=(fw, fh), dpi=dpi)
    grey = (np.array(to_rgb(VOID_GREY)) * 255).astype(np.uint8)
    gt_lut = (np.array([to_rgb(c) for c in ("#1f1f1f", "#ff7f0e", VOID_GREY)]) * 255).astype(np.uint8)
    cmap = plt.get_cmap("magma")
    ranges = {}
    for key in ks:  # one color range per method over all examples: rows stay comparable
        vals = np.concatenate([np.asarray(e["maps"][key])[_classes(e) != 2].ravel() for e in ex])
        vals = vals[np.isfinite(vals)]
        ranges[key] = tuple(np.percentile(vals, [1, 99])) if vals.size else (0.0, 1.0)
    mosaic = np.full((mh, mw, 3), 255, np.uint8)

    def put(i, c, rgb):
        mosaic[i * (ch + gy):i * (ch + gy) + ch, c * (cw + gx):c * (cw + gx) + cw] = \
            np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)

    for i, e in enumerate(ex):
        cls = _cells(_classes(e), h, w).astype(np.int64)
        c = 0
        if has_image:
            if e.get("image") is not None:
                put(i, 0, _cells(_rgb_image(e["image"]), h, w))
            c = 1
        put(i, c, gt_lut[np.clip(cls, 0, 2)])
        for j, key in enumerate(ks):
            v = _cells(np.asarray(e["maps"][key], np.float64), h, w)
            lo, hi = ranges[key]
            with np.errstate(invalid="ignore"):
                t = np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(v)
            bad = (cls == 2) | np.isnan(v)
            rgb = cmap(np.where(bad, 0.0, t), bytes=True)[..., :3]
            rgb[bad] = grey
            put(i, c + 1 + j, rgb)
    fig.anomfast_mosaic = (mosaic, round(left * dpi), round(bottom * dpi))  # placed by _Writer.save
    ax = fig.add_axes([left / fw, bottom / fh, mw / dpi / fw, mh / dpi / fh])  # for the texts: mosaic pixels
    ax.set_xlim(0, mw)
    ax.set_ylim(mh, 0)
    ax.set_axis_off()
    titles = (["input"] if has_image else []) + ["ground truth"] + [DISPLAY.get(key, key) for key in ks]
    for c, t in enumerate(titles):
        ax.text(c * (cw + gx) + cw / 2, -0.04 * ch, t, ha="center", va="bottom", fontsize=9)
    for i, e in enumerate(ex):
        ax.text(-0.3 * gx, i * (ch + gy) + ch / 2, e["stem"], rotation=90, ha="right", va="center", fontsize=8)
    for j, key in enumerate(ks):  # one colorbar per method column (its range is shared by the rows)
        x0 = (1 + has_image + j) * (cw + gx) + 0.05 * cw
        cax = fig.add_axes([(left + x0 / dpi) / fw, 0.32 / fh, 0.9 * cw / dpi / fw, 0.1 / fh])
        lo, hi = ranges[key]
        cb = fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap), cax=cax, orientation="horizontal")
        cb.ax.tick_params(labelsize=6.5)
    fig.suptitle(f"Anomaly maps - {m['name']} (ground truth: orange anomaly, grey void; maps: brighter = "
                 "more anomalous, void grey)", fontsize=9, y=1 - 0.12 / fh, va="top")
    return fig


def write_plots(run: dict, out: Path, formats=("png",), roc_log: bool = True, progress=None) -> list:
    """Writes the figures of every model of a run in each format; returns the paths."""
    plt = _plt()
    say = progress or (lambda s: None)
    out = Path(out)
    written = []
    writer = _Writer()
    try:
        for m, s in zip(run["models"], unique_slugs(m["name"] for m in run["models"])):
            say(f"anomfast: plotting {m['name']} ({', '.join(formats)})")
            for stem, make in (("curves", lambda: _curves(plt, m, roc_log)),
                               ("scores", lambda: _distributions(plt, m)),
                               ("examples", lambda: _examples(plt, m) if m.get("examples") else None)):
                fig = make()
                if fig is None:
                    continue
                written += writer.save(fig, out, f"{stem}_{s}", formats)
                plt.close(fig)
    finally:
        writer.close()
    return written
