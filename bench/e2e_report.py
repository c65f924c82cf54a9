"""End to end, as users call it: anomfast.evaluate() and Evaluator.update + compute against
what users write today, timed in one run on the same machine, correctness checked first.

Baselines (float32 PyTorch, as a user writes it, with shared intermediates):
  * "PyTorch scores": amax, logsumexp, exp for MSP, the SML gather; scores only, no metrics;
  * "PyTorch scores + scikit-learn": those scores on the valid pixels, then roc_auc_score,
    average_precision_score, roc_curve (FPR95) and precision_recall_curve (best F1);
  * torchmetrics BinaryAUROC / BinaryAveragePrecision / BinaryROC, exact (thresholds=None)
    and binned (thresholds=1000), fed the PyTorch scores per batch.
Every configuration runs in its own subprocess; its peak memory is the resident-set peak
(VmHWM, reset after the inputs are made) above the resident set before it started.

    python bench/e2e_report.py                 # 1, 4 and 16 images of 19 x 512 x 1024
    python bench/e2e_report.py --images 1 4    # fewer
    python bench/e2e_report.py --methods max_logit,msp,energy,sml
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# the set (max_logit, msp, energy) by default; ANOMFAST_BENCH_METHODS / --methods for others
METHODS = os.environ.get("ANOMFAST_BENCH_METHODS", "max_logit,msp,energy").split(",")


def torch_scores(x, mean, std):
    """float32 PyTorch as a user writes it: the requested methods (METHODS), sharing max and
    logsumexp."""
    import torch
    m, k = x.max(dim=1)
    lse = torch.logsumexp(x, dim=1) if {"msp", "energy"} & set(METHODS) else None
    make = {"max_logit": lambda: -m, "msp": lambda: 1 - torch.exp(m - lse), "energy": lambda: -lse,
            "sml": lambda: -(m - mean[k]) / std[k]}
    return {name: make[name]() for name in METHODS}


def sk_metrics(s, y):
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
    fpr, tpr, _ = roc_curve(y, s)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.max(2 * p * r / np.maximum(p + r, 1e-300))
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s),
            "fpr95": float(fpr[np.argmax(tpr >= 0.95)]), "f1": float(f1)}


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_one(kind: str, n_images: int) -> dict:
    """One configuration in this process; returns seconds (best of a few) and peak RSS."""
    import torch
    sys.path.insert(0, str(HERE))
    import anomfast
    from common import make_inputs
    x, y = make_inputs(B=n_images)
    stats = anomfast.fit_sml(x[:1])
    mean = torch.as_tensor(stats.mean, dtype=torch.float32)
    std = torch.as_tensor(stats.std, dtype=torch.float32)
    valid = y != 255
    # the fast configurations: best of 7 (other tenants of a shared VM slow single calls by 20-40%)
    repeat = 7 if kind in ("anomfast_evaluate", "anomfast_evaluator", "anomfast_update", "torch_scores") else 1
    evaluators = []

    def once():
        if kind == "anomfast_evaluate":
            return anomfast.evaluate(x, y, methods=METHODS, sml=stats)
        if kind == "anomfast_evaluator":
            ev = anomfast.Evaluator(METHODS, sml=stats)
            for i in range(n_images):
                ev.update(x[i:i + 1], y[i:i + 1])
            return ev.compute()
        if kind == "anomfast_update":  # the training-loop cost: update per batch (the Evaluator is
            ev = evaluators[-1]           # made, and compute() run, outside the timed region)
            for i in range(n_images):
                ev.update(x[i:i + 1], y[i:i + 1])
            return None
        if kind == "torch_scores":
            return [torch_scores(x[i:i + 1], mean, std) for i in range(n_images)]
        if kind == "torch_sklearn":
            sc = {k: [] for k in METHODS}
            for i in range(n_images):
                s = torch_scores(x[i:i + 1], mean, std)
                for k in METHODS:
                    sc[k].append(s[k][valid[i:i + 1]])
            lab = y[valid].numpy() == 1
            return {k: sk_metrics(torch.cat(v).numpy(), lab) for k, v in sc.items()}
        if kind.startswith("torchmetrics"):
            from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryROC
            thr = None if kind == "torchmetrics_exact" else 1000
            ms = {k: (BinaryAUROC(thresholds=thr), BinaryAveragePrecision(thresholds=thr), BinaryROC(thresholds=thr))
                  for k in METHODS}
            for i in range(n_images):
                s = torch_scores(x[i:i + 1], mean, std)
                v = valid[i:i + 1]
                t = (y[i:i + 1][v] == 1).long()
                for k in METHODS:
                    for metric in ms[k]:
                        metric.update(s[k][v], t)
            out = {}
            for k, (a, ap, roc) in ms.items():
                fpr, tpr, _ = roc.compute()
                out[k] = {"auroc": float(a.compute()), "ap": float(ap.compute()),
                          "fpr95": float(fpr[int(torch.argmax((tpr >= 0.95).int()))])}
            return out
        raise ValueError(kind)

    def fresh():
        if kind == "anomfast_update":
            evaluators[:] = [None]  # the previous one hands its state back to the pool first
            evaluators[:] = [anomfast.Evaluator(METHODS, sml=stats)]

    rss0 = _rss_kib("VmRSS")
    fresh()
    res = once()  # warm-up, and the result that is checked before anything is timed
    out = {}
    if kind == "anomfast_update":
        res = evaluators[-1].compute()
    if kind in ("anomfast_evaluate", "anomfast_evaluator", "anomfast_update"):
        # correctness before timing: scikit-learn's exact values inside the certified bounds
        lab = y[valid].numpy() == 1
        s = torch_scores(x, mean, std)
        for k in METHODS:
            ref = sk_metrics(s[k][valid].double().numpy(), lab)
            for name in ("auroc", "ap"):
                lo, hi = res[k].bounds[name]
                assert lo - 1e-6 <= ref[name] <= hi + 1e-6, (kind, k, name, ref[name], res[k].bounds[name])
        out["fpr95"] = {k: res[k].fpr95 for k in METHODS}
        del s, ref, lab
    try:  # reset the peak (VmHWM) so it measures the timed runs, not the input generation or the check
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    best = float("inf")
    for _ in range(repeat):
        fresh()
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    out.update(seconds=best, peak_rss_mib=(_rss_kib("VmHWM") - rss0) / 1024)
    return out


KINDS = ["anomfast_evaluate", "anomfast_evaluator", "anomfast_update", "torch_scores", "torch_sklearn", "torchmetrics_binned",
         "torchmetrics_exact"]
LABELS = {"anomfast_evaluate": "anomfast.evaluate()", "anomfast_evaluator": "anomfast Evaluator.update + compute",
          "anomfast_update": "anomfast Evaluator.update only (compute not timed)",
          "torch_scores": "float32 PyTorch scores only (no metrics)",
          "torch_sklearn": "float32 PyTorch scores + scikit-learn metrics",
          "torchmetrics_binned": "torchmetrics, thresholds=1000 (binned)",
          "torchmetrics_exact": "torchmetrics, thresholds=None (exact)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--methods", help="comma-separated methods (default max_logit,msp,energy; sml is fitted)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.methods:
        os.environ["ANOMFAST_BENCH_METHODS"] = a.methods  # the per-configuration subprocesses read it
        METHODS[:] = a.methods.split(",")
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]))))
        return
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; "
          f"logits B x 19 x 512 x 1024 float32, methods {METHODS}")
    for n in a.images:
        rows = {}
        for kind in KINDS:
            if kind == "torchmetrics_binned" and n > 4:
                continue  # O(pixels x 1000 thresholds) per update: minutes per image on 2 cores
            p = subprocess.run([sys.executable, __file__, "--one", kind, str(n)], capture_output=True, text=True)
            if p.returncode != 0:
                rows[kind] = None
                print(f"  {kind}: failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
                continue
            rows[kind] = json.loads(p.stdout.strip().splitlines()[-1])
        base = rows["torch_scores"]["seconds"] if rows.get("torch_scores") else float("nan")
        base2 = rows["torch_sklearn"]["seconds"] if rows.get("torch_sklearn") else float("nan")
        print(f"\n{n} image(s)\n| what | time (ms) | per image (ms) | speed-up vs PyTorch scores only | "
              "speed-up vs PyTorch + scikit-learn | peak RSS (MiB) |\n|:--|--:|--:|--:|--:|--:|")
        for kind in KINDS:
            r = rows.get(kind)
            if r is None:
                continue
            t = r["seconds"]
            print(f"| {LABELS[kind]} | {1e3 * t:.1f} | {1e3 * t / n:.1f} | {base / t:.2f}x | {base2 / t:.2f}x | "
                  f"{r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
