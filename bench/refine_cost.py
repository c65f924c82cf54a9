"""What refine=True costs and buys: evaluate() with and without it on 1M pixels of a
19-class network with bf16 logits (the regime where the energy's exact scores pile up
inside bins), 4 methods. Correctness first: every refined metric must equal scikit-learn's
on float64 scores computed without cancellation (1e-9), and the plain results must hold
them inside their bounds; then both are timed (best of 3) in this process.

    python bench/refine_cost.py
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import anomfast  # noqa: E402
from test_fidelity import METHODS, confident, exact_scores, sk_metrics  # noqa: E402


def main():
    rng = np.random.default_rng(2026)
    x, y = confident(rng, 1000 * 1000, lo=2.0, hi=30.0)
    t = torch.from_numpy(x).to(torch.bfloat16)
    x = t.float().numpy()
    logits = t.T.reshape(1, x.shape[1], 1000, 1000).contiguous()
    labels = torch.from_numpy(y.reshape(1, 1000, 1000).astype(np.uint8))
    ex = exact_scores(x)
    want = {m: sk_metrics(ex[m], y) for m in METHODS}
    plain = anomfast.evaluate(logits, labels, methods=METHODS)
    refined = anomfast.evaluate(logits, labels, methods=METHODS, refine=True)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| method | metric | exact | plain (error, bound width) | refine=True (error, bound width) |")
    print("|:--|:--|--:|--:|--:|")
    for m in METHODS:
        for k in ("auroc", "ap", "fpr95", "f1"):
            p, r = plain[m], refined[m]
            assert p.bounds[k][0] <= want[m][k] <= p.bounds[k][1], (m, k)
            assert abs(getattr(r, k) - want[m][k]) <= 1e-9, (m, k, getattr(r, k), want[m][k])
            print(f"| {m} | {k} | {want[m][k]:.6f} | {getattr(p, k) - want[m][k]:+.1e}, "
                  f"{p.bounds[k][1] - p.bounds[k][0]:.0e} | {getattr(r, k) - want[m][k]:+.1e}, "
                  f"{r.bounds[k][1] - r.bounds[k][0]:.0e} |")

    def best(f, n=3):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)
    tp = best(lambda: anomfast.evaluate(logits, labels, methods=METHODS))
    tr = best(lambda: anomfast.evaluate(logits, labels, methods=METHODS, refine=True))
    print(f"\nevaluate(): {tp * 1e3:.1f} ms; evaluate(refine=True): {tr * 1e3:.0f} ms ({tr / tp:.0f}x)")


if __name__ == "__main__":
    main()
