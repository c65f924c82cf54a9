"""The results table of the library (Results.table): one Markdown row per method. The
CLI's reports (anomfast/cli/report.py) build their grid tables from the same cells."""
from __future__ import annotations

import math

from .methods import DISPLAY


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
