"""PNG plots of a grid run: ROC and PR curves per model, score distributions per
method, example anomaly maps next to their ground truth (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .methods import DISPLAY, coord_to_score


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(run: dict, out: Path) -> list:
    plt = _plt()
    out = Path(out)
    written = []
    for m in run["models"]:
        slug = "".join(c if c.isalnum() else "_" for c in m["name"]).strip("_").lower()
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        for k, r in m["results"].items():
            if not (r.n_pos and r.n_neg):
                continue
            fpr, tpr, _ = r.roc_curve()
            p, rc, _ = r.pr_curve()
            a1.plot(fpr, tpr, label=f"{DISPLAY.get(k, k)} (AUROC {100 * r.auroc:.1f})")
            a2.plot(rc, p, label=f"{DISPLAY.get(k, k)} (AP {100 * r.ap:.1f})")
        a1.plot([0, 1], [0, 1], "k:", lw=0.8)
        a1.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC - {m['name']}")
        a2.set(xlabel="recall", ylabel="precision", title=f"PR - {m['name']}")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"curves_{slug}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

        ks = list(m["histograms"])
        fig, axes = plt.subplots(1, len(ks), figsize=(3.2 * len(ks), 2.8), squeeze=False)
        for ax, k in zip(axes[0], ks):
            pos, neg, lo, hi, *_ = m["histograms"][k].groups()  # coordinates: to score units
            lo, hi = coord_to_score(k, lo), coord_to_score(k, hi)
            if pos.size == 0:
                continue
            centers = 0.5 * (np.clip(lo, -1e30, 1e30) + np.clip(hi, -1e30, 1e30))
            lo_q, hi_q = np.quantile(np.repeat(centers, np.minimum(pos + neg, 1000)), [0.001, 0.999])
            edges = np.linspace(lo_q, hi_q, 61)
            hn, _ = np.histogram(centers, bins=edges, weights=neg)
            ha, _ = np.histogram(centers, bins=edges, weights=pos)
            ax.stairs(hn / max(hn.sum(), 1), edges, label="normal", fill=True, alpha=0.5)
            ax.stairs(ha / max(ha.sum(), 1), edges, label="anomaly", fill=True, alpha=0.5)
            ax.set_title(DISPLAY.get(k, k), fontsize=9)
            ax.set_xlabel("score (higher = more anomalous)", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Score distributions - {m['name']}", fontsize=10)
        fig.tight_layout()
        p = out / f"scores_{slug}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

        ex = m.get("examples") or []
        if ex:
            ks = list(ex[0]["maps"])
            fig, axes = plt.subplots(len(ex), 1 + len(ks), figsize=(2.3 * (1 + len(ks)), 2.3 * len(ex)), squeeze=False)
            for row, e in zip(axes, ex):
                gt = np.where(e["labels"] == 255, 0.5, (e["labels"] != 0) * 1.0)
                row[0].imshow(gt, cmap="gray", vmin=0, vmax=1)
                row[0].set_title(f"{e['stem']}: ground truth", fontsize=7)
                for ax, k in zip(row[1:], ks):
                    ax.imshow(e["maps"][k], cmap="magma")
                    ax.set_title(DISPLAY.get(k, k), fontsize=7)
                for ax in row:
                    ax.axis("off")
            fig.suptitle(f"Anomaly maps - {m['name']} (white = anomaly, grey = void)", fontsize=9)
            fig.tight_layout()
            p = out / f"examples_{slug}.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            written.append(p)
    return written
