"""The CLI's reports of a grid run: report.md, results.csv / .json, report.tex,
histograms.npz and the plots (the library's own table: anomfast/tables.py)."""
from __future__ import annotations

import csv
import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..methods import DISPLAY
from ..protocols import ML4CV_DEFINITIONS, seed_note
from ..tables import _pct, _thr, bound_width, results_table  # noqa: F401  (results_table: re-exported)

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


def _md_escape(t: str) -> str:
    """A Markdown table cell: a '|' (in a model name) would end the cell."""
    return t.replace("|", "\\|")


def _md_table(header, rows, align):
    out = ["| " + " | ".join(map(_md_escape, header)) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(map(_md_escape, r)) + " |" for r in rows]
    return "\n".join(out)


def _cell(m, k, fn) -> str:
    """A table cell, or '-' where this model was not evaluated with method k."""
    r = m["results"].get(k)
    return "-" if r is None else fn(r)


def _main_cell(r, digits: int = 1) -> str:
    return " / ".join(_fmt(getattr(r, a), digits) for a in ("fpr95", "auroc", "ap", "f1"))


def _tables(models: list, methods: list) -> list:
    """(title, blurb, header, rows, align) of the seed report's tables."""
    head = ["Model"] + [DISPLAY.get(m, m) for m in methods]
    rows = lambda fn: [[_row_label(m)] + [_cell(m, k, fn) for k in methods] for m in models]  # noqa: E731
    right = [":--"] + ["--:"] * len(methods)
    return [
        ("Main Results", ["**Format**: FPR95 / AUROC / AUPR / F1 (all in %)",
                          "**Lower FPR95 is better**, **Higher AUROC/AUPR/F1 is better**"],
         head, rows(_main_cell), [":--"] * (len(methods) + 1)),
        ("F1 Scores (%) - For Threshold Selection",
         ["**Higher is better**. This is the metric used to find optimal thresholds."],
         head, rows(lambda r: _fmt(r.f1, 2)), right),
        ("Optimal Thresholds", ["These are the thresholds that maximize F1 score for each method/model combination."],
         head, rows(lambda r: _fmt(r.threshold, 4, pct=False)), right),
        ("FPR95 Operating Thresholds",
         ["The score threshold (anomaly iff score >= t) at which the FPR95 above is measured."],
         head, rows(lambda r: _thr(r.fpr95_threshold)), right),
    ]


def seed_tables(models: list, methods: list) -> str:
    """The three tables of the seed report (main results, F1, optimal thresholds), plus
    the FPR95 operating thresholds. A '-' cell: the model was not evaluated with that method."""
    parts = ["# Model vs Anomaly Detection Method Comparison", ""]
    for title, blurb, head, rows, align in _tables(models, methods):
        parts += [f"## {title}", ""]
        for b in blurb:
            parts += [b, ""]
        parts += [_md_table(head, rows, align), ""]
    return "\n".join(parts)


_TEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
        "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def _tex_escape(t: str) -> str:
    return "".join(_TEX.get(c, c) for c in t)


def tex_tables(models: list, methods: list) -> str:
    """The same tables as report.md (the component table too, when there is one), as LaTeX
    table environments (booktabs)."""
    out = ["% anomfast report: needs \\usepackage{booktabs}", ""]
    for title, blurb, head, rows, _ in _tables(models, methods) + _component_table(models, methods):
        cols = "l" + "c" * len(methods)
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex_escape(title)}}}", "\\small",
                f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
                " & ".join(_tex_escape(h) for h in head) + " \\\\", "\\midrule"]
        out += [" & ".join(_tex_escape(c) for c in r) + " \\\\" for r in rows]
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def describe_conventions(conventions: dict) -> str:
    """The definitions in words (not a dict printout)."""
    fpr = {"first": "FPR at the first threshold with TPR >= 95%", "strict": "FPR at the first threshold with "
           "TPR > 95%", "interp": "FPR interpolated at TPR = 95%"}.get(conventions.get("fpr_mode", "first"))
    ap = {"step": "AUPR as average precision (step-wise)", "trapezoid": "AUPR by the trapezoid rule"}.get(
        conventions.get("ap_mode", "step"))
    return f"FPR95: {fpr}; {ap}; anomaly is the positive class; F1 is the best over thresholds"


def source_notes(options: dict | None) -> list:
    """Notes for `anomfast report`: where the eval run that wrote the histograms (its
    options, recorded in histograms.npz) computed numbers that re-finalizing the histograms
    does not give back. [] for files without that record (older ones, save_histograms)."""
    if not options:
        return []
    notes = []
    if options.get("refine"):
        notes.append("These histograms come from `anomfast eval --refine`, whose tables are exact (a second pass "
                     "over the logits); this report is finalized from the histograms alone, so its FPR95, F1 and "
                     "thresholds can differ from that run's: each lies within the certified bounds in results.json.")
    protocol = options.get("protocol")
    if protocol not in (None, "default"):
        notes.append(f"These histograms come from `anomfast eval --protocol {protocol}`, whose tables follow that "
                     "protocol (its subsample and definitions); this report finalizes the histograms of every "
                     "valid pixel with anomfast's definitions below, so its numbers differ from that run's.")
    if options.get("components"):
        notes.append("The eval run also computed component metrics (--components); they need the score maps, so "
                     "this report has none.")
    return notes


@contextmanager
def warned_already(model: dict):
    """Silences the library's RuntimeWarnings while a model whose empty class the CLI has
    already warned about is finalized: the same fact once (its results keep them in
    .warnings)."""
    if not model.get("empty_class_warned"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def write_report(run: dict, out: Path, conventions: dict | None = None, plots: bool = True,
                 formats=("png",), progress=None, roc_log: bool = True) -> dict:
    """Writes report.md, results.csv, results.json, report.tex, histograms.npz and plots.
    progress: a callable taking one status line (e.g. print to stderr), or None."""
    from ..histogram import finalize_histograms, save_histograms
    say = progress or (lambda s: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conventions = conventions or {}
    methods = run["methods"]
    protocol = run.get("protocol")
    todo = [m for m in run["models"] if "results" not in m]
    if todo:
        say(f"anomfast: finalizing metrics of {sum(len(m['histograms']) for m in todo)} histograms")
    for m in todo:  # a protocol's results and --refine's come computed by the runner
        # the library's finalization, all of a model's methods in one call (as evaluate() and
        # Evaluator.compute() do): the same numbers as each Histogram.finalize()
        with warned_already(m):
            m["results"] = finalize_histograms(m["histograms"], **conventions)
    md = seed_tables(run["models"], methods)
    md += component_tables(run["models"], methods)
    widths = [bound_width(r) for m in run["models"] for r in m["results"].values() if r.n_pos and r.n_neg]
    if protocol is not None:
        md += f"\n---\n\n{seed_note(protocol)} Definitions: results.json.\n"
        conventions = {"protocol": protocol}
    else:
        md += ("\n---\n\nMetrics are finalized from histograms; every number has a certified bound "
               f"(largest bound width in this report: {max(widths or [0.0]):.1e}, see results.json). "
               f"{describe_conventions(conventions)}.\n")
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
            for k in [k for k in methods if k in m["results"]]:
                r = m["results"][k]
                row = [m["name"], m.get("miou"), k]
                for a in ("fpr95", "auroc", "ap", "f1", "threshold", "fpr95_threshold"):
                    row += [getattr(r, a), *r.bounds[a]]
                w.writerow(row + [r.n_pos, r.n_neg])
    # the definitions the numbers were computed under (the results carry them: --fpr-mode /
    # --ap-mode change them), not a fixed text
    first = next((m["results"][k] for m in run["models"] for k in methods if k in m.get("results", {})), None)
    defs = (ML4CV_DEFINITIONS if protocol is not None else
            dict(first.definitions) if first is not None and first.definitions else DEFINITIONS)
    options = run.get("options")
    doc = {"definitions": defs, "conventions": conventions,
           "protocol": protocol or "default", "methods": methods, "notes": notes,
           **({"run": options} if options else {}),
           "models": [{"name": m["name"], "miou": m.get("miou"), "pixels": m.get("pixels"), "images": m.get("images"),
                       "results": {k: m["results"][k].as_dict() for k in methods if k in m["results"]}}
                      for m in run["models"]]}
    _component_outputs(doc, run["models"], methods, out)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "report.tex").write_text(tex_tables(run["models"], methods))
    save_histograms(out / "histograms.npz",
                    {f"{m['name']}::{k}": m["histograms"][k] for m in run["models"] for k in methods
                     if k in m["histograms"]},
                    extra={"models": [{"name": m["name"], "miou": m.get("miou"), "images": m.get("images"),
                                       "pixels": m.get("pixels")} for m in run["models"]],
                           "methods": methods, "notes": notes, **({"run": options} if options else {})})
    if plots:
        from .plots import write_plots
        write_plots(run, out, formats=formats, progress=say, roc_log=roc_log)
    return doc


# ---------------------------------------------------------------- component metrics

COMPONENT_DEFINITIONS = {
    "sIoU": "mean over ground-truth components of the adjusted IoU sIoU_gt (SegmentMeIfYouCan)",
    "PPV": "mean over predicted segments of the share of their pixels on ground-truth components",
    "mean F1": "mean over IoU thresholds 0.25, 0.30, ..., 0.75 of 2TP / (2TP + FN + FP), TP: components with "
               "sIoU_gt >= t, FP: segments with PPV < t",
    "threshold": "each method's best pixel-F1 threshold; 8-connected components; see anomfast/components.py",
}


def _component_cell(c) -> str:
    return " / ".join(_fmt(v, 1) for v in (c.siou_gt, c.ppv, c.mean_f1))


def _component_table(models: list, methods: list) -> list:
    """[(title, blurb, header, rows, align)] of the component table (models x methods,
    sIoU / PPV / mean F1 in %), or [] when no model has component metrics."""
    if not any(m.get("components") for m in models):
        return []
    spec = next(iter(next(m["components"] for m in models if m.get("components")).values())).spec
    rows = [[_row_label(m)] + [_component_cell(m["components"][k]) if k in m.get("components", {}) else "-"
                               for k in methods] for m in models]
    head = ["Model"] + [DISPLAY.get(m, m) for m in methods]
    blurb = ("**Format**: sIoU / PPV / mean F1 (all in %), **higher is better**. Score maps binarized at each "
             f"method's best pixel-F1 threshold; {spec['track']} track (segments under {spec['thresh_segsize']} px "
             f"dropped, ground-truth components under {spec['thresh_instsize']} px void), {spec['mode']} mode.")
    return [("Component Metrics (SegmentMeIfYouCan)", [blurb], head, rows, [":--"] * (len(methods) + 1))]


def component_tables(models: list, methods: list) -> str:
    """The component table in Markdown, or "" when no model has component metrics."""
    return "".join("\n".join(["", f"## {title}", "", *blurb, "", _md_table(head, rows, align), ""])
                   for title, blurb, head, rows, align in _component_table(models, methods))


def _component_outputs(doc: dict, models: list, methods: list, out: Path) -> None:
    """Component metrics into results.json (per model "components") and components.csv."""
    if not any(m.get("components") for m in models):
        return
    doc["component_definitions"] = COMPONENT_DEFINITIONS
    for d, m in zip(doc["models"], models):
        if m.get("components"):
            d["components"] = {k: m["components"][k].as_dict() for k in methods if k in m["components"]}
    with open(out / "components.csv", "w", newline="") as f:
        w = csv.writer(f)
        taus = [f"f1_{round(100 * t)}" for t in next(iter(next(
            m["components"] for m in models if m.get("components")).values())).iou_thresholds]
        w.writerow(["model", "method", "threshold", "siou_gt", "ppv", "mean_f1", "siou_pred", "n_gt", "n_pred",
                    "n_images"] + taus)
        for m in models:
            for k in [k for k in methods if k in m.get("components", {})]:
                c = m["components"][k]
                w.writerow([m["name"], k, c.threshold, c.siou_gt, c.ppv, c.mean_f1, c.siou_pred, c.n_gt, c.n_pred,
                            c.n_images] + list(c.f1))
