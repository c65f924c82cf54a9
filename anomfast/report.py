"""Tables of results (Markdown)."""
from __future__ import annotations

import math

from .methods import DISPLAY
from .protocols import ML4CV_DEFINITIONS, seed_note


def _pct(v: float, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def _thr(v) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.6g}"


def bound_width(r) -> float:
    """Largest certified bound width of the metrics (thresholds are in score units: left out)."""
    w = [hi - lo for k, (lo, hi) in r.bounds.items() if k in ("auroc", "ap", "fpr95", "f1")
         and not (math.isnan(lo) or math.isnan(hi))]
    return max(w or [0.0])


def results_table(results, digits: int = 2) -> str:
    """One row per method: FPR95 and its operating threshold, AUROC, AP, F1 (in %) and its
    threshold, with the largest bound width of the four metrics."""
    head = ("| Method | FPR95 | FPR95 threshold | AUROC | AUPR | F1 | F1 threshold | max bound width |\n"
            "|:--|--:|--:|--:|--:|--:|--:|--:|")
    rows = [head]
    for name, r in results.items():
        rows.append(f"| {DISPLAY.get(name, name)} | {_pct(r.fpr95, digits)} | {_thr(r.fpr95_threshold)} | "
                    f"{_pct(r.auroc, digits)} | {_pct(r.ap, digits)} | {_pct(r.f1, digits)} | {_thr(r.threshold)} | "
                    f"{bound_width(r):.1e} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- grid reports
import csv  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

DEFINITIONS = {
    "FPR95": "FPR at the first threshold (descending) where TPR >= 0.95 (Fishyscapes / SMIYC convention)",
    "AUROC": "area under the ROC curve, ties counted one half (= sklearn roc_auc_score)",
    "AUPR": "average precision, step-wise sum (R_n - R_{n-1}) P_n, anomaly positive (= sklearn average_precision_score)",
    "F1": "best F1 over thresholds 'anomaly iff score >= t'; ties -> highest threshold",
    "FPR95 threshold": "the score threshold t (anomaly iff score >= t) at which FPR95 is measured",
    "bounds": "certified [low, high] the exact (unbinned) metric lies in",
}


def _row_label(m) -> str:
    return f"{m['name']} ({100 * m['miou']:.2f}% mIoU)" if m.get("miou") is not None else m["name"]


def _fmt(v, digits, pct=True):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "n/a"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def _md_table(header, rows, align):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def seed_tables(models: list, methods: list) -> str:
    """The three tables of the seed report (main results, F1, optimal thresholds)."""
    names = [DISPLAY.get(m, m) for m in methods]
    head = ["Model"] + names
    main = [[_row_label(m)] + [" / ".join(_fmt(getattr(m["results"][k], a), 1) for a in ("fpr95", "auroc", "ap", "f1"))
                               for k in methods] for m in models]
    f1 = [[_row_label(m)] + [_fmt(m["results"][k].f1, 2) for k in methods] for m in models]
    thr = [[_row_label(m)] + [_fmt(m["results"][k].threshold, 4, pct=False) for k in methods] for m in models]
    op = [[_row_label(m)] + [_thr(m["results"][k].fpr95_threshold) for k in methods] for m in models]
    left = [":--"] + ["--:"] * len(methods)
    parts = [
        "# Model vs Anomaly Detection Method Comparison", "",
        "## Main Results", "", "**Format**: FPR95 / AUROC / AUPR / F1 (all in %)", "",
        "**Lower FPR95 is better**, **Higher AUROC/AUPR/F1 is better**", "",
        _md_table(head, main, [":--"] + [":--"] * len(methods)), "",
        "## F1 Scores (%) - For Threshold Selection", "",
        "**Higher is better**. This is the metric used to find optimal thresholds.", "",
        _md_table(head, f1, left), "",
        "## Optimal Thresholds", "",
        "These are the thresholds that maximize F1 score for each method/model combination.", "",
        _md_table(head, thr, left), "",
        "## FPR95 Operating Thresholds", "",
        "The score threshold (anomaly iff score >= t) at which the FPR95 above is measured.", "",
        _md_table(head, op, left), "",
    ]
    return "\n".join(parts)


def write_report(run: dict, out: Path, conventions: dict | None = None, plots: bool = True) -> dict:
    """Writes report.md, results.csv, results.json, report.tex, histograms.npz and plots."""
    from .histogram import save_histograms
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conventions = conventions or {}
    methods = run["methods"]
    protocol = run.get("protocol")
    for m in run["models"]:  # a protocol's results and --refine's come computed by the runner
        if "results" not in m:
            m["results"] = {k: h.finalize(**conventions) for k, h in m["histograms"].items()}
    md = seed_tables(run["models"], methods)
    widths = [bound_width(r) for m in run["models"] for r in m["results"].values() if r.n_pos and r.n_neg]
    if protocol is not None:
        md += f"\n---\n\n{seed_note(protocol)} Definitions: results.json.\n"
        conventions = {"protocol": protocol}
    else:
        md += ("\n---\n\nMetrics are finalized from histograms; every number has a certified bound "
               f"(largest bound width in this report: {max(widths or [0.0]):.1e}, see results.json). "
               f"Definitions: {conventions or 'defaults'}.\n")
    notes = run.get("notes", [])
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "report.md").write_text(md)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "miou", "method", "fpr95", "fpr95_low", "fpr95_high", "auroc", "auroc_low", "auroc_high",
                    "ap", "ap_low", "ap_high", "f1", "f1_low", "f1_high", "threshold", "threshold_low",
                    "threshold_high", "fpr95_threshold", "fpr95_threshold_low", "fpr95_threshold_high",
                    "n_anomaly", "n_normal"])
        for m in run["models"]:
            for k, r in m["results"].items():
                row = [m["name"], m.get("miou"), k]
                for a in ("fpr95", "auroc", "ap", "f1", "threshold", "fpr95_threshold"):
                    row += [getattr(r, a), *r.bounds[a]]
                w.writerow(row + [r.n_pos, r.n_neg])
    doc = {"definitions": DEFINITIONS if protocol is None else ML4CV_DEFINITIONS, "conventions": conventions,
           "protocol": protocol or "default", "methods": methods, "notes": notes,
           "models": [{"name": m["name"], "miou": m.get("miou"), "pixels": m.get("pixels"), "images": m.get("images"),
                       "results": {k: r.as_dict() for k, r in m["results"].items()}} for m in run["models"]]}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    tex = ["\\begin{tabular}{l" + "c" * len(methods) + "}", "\\toprule",
           "Model & " + " & ".join(DISPLAY.get(k, k) for k in methods) + " \\\\", "\\midrule"]
    for m in run["models"]:
        cells = [" / ".join(_fmt(getattr(m["results"][k], a), 1) for a in ("fpr95", "auroc", "ap", "f1")) for k in methods]
        tex.append(_row_label(m).replace("%", "\\%") + " & " + " & ".join(cells) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}", ""]
    (out / "report.tex").write_text("\n".join(tex))
    save_histograms(out / "histograms.npz",
                    {f"{m['name']}::{k}": h for m in run["models"] for k, h in m["histograms"].items()},
                    extra={"models": [{"name": m["name"], "miou": m.get("miou"), "images": m.get("images")}
                                      for m in run["models"]], "methods": methods, "notes": notes})
    if plots:
        from .plots import write_plots
        write_plots(run, out)
    return doc
