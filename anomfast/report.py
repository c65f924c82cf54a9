"""Tables of results (Markdown)."""
from __future__ import annotations

import math

from .methods import DISPLAY


def _pct(v: float, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def results_table(results, digits: int = 2) -> str:
    """One row per method: FPR95, AUROC, AP, F1 (in %), threshold, with bound widths."""
    head = "| Method | FPR95 | AUROC | AUPR | F1 | Threshold | max bound width |\n|:--|--:|--:|--:|--:|--:|--:|"
    rows = [head]
    for name, r in results.items():
        width = max((hi - lo) for k, (lo, hi) in r.bounds.items() if k != "threshold"
                    and not (math.isnan(lo) or math.isnan(hi))) if r.bounds else 0.0
        rows.append(f"| {DISPLAY.get(name, name)} | {_pct(r.fpr95, digits)} | {_pct(r.auroc, digits)} | "
                    f"{_pct(r.ap, digits)} | {_pct(r.f1, digits)} | {r.threshold:.4f} | {width:.1e} |")
    return "\n".join(rows)
