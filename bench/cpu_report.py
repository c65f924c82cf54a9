"""Prints the CPU benchmark table recorded in bench/RESULTS.md (correctness first).

    python bench/cpu_report.py            # ~1-2 minutes on 2 cores
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import anomfast  # noqa: E402
from anomfast import _fused  # noqa: E402
from anomfast.methods import resolve  # noqa: E402

from common import METHODS4, best_of, check_against_reference, fit_stats, make_inputs, read_bandwidth_gbs, reference_histograms  # noqa: E402


def main():
    x, y = make_inputs()
    st = fit_stats(x)
    spec = resolve(METHODS4, sml=st)
    # correctness before timing
    check_against_reference(x, y, st, spec)
    nbytes = x.numel() * 4
    bw_before = read_bandwidth_gbs()
    hist = _fused.new_histogram(len(METHODS4), "cpu")
    rows = []
    t_ref = best_of(lambda: reference_histograms(x, y, st), 2)
    rows.append(("pure-PyTorch float64 reference (4 methods)", t_ref))
    for nt in (1, 2):
        t = best_of(lambda: _fused.fused_pass(x, y, spec, hist=hist, num_threads=nt), 10)
        rows.append((f"anomfast fused, 4 methods, {nt} thread(s)", t))
    # the score math alone: the same pass without labels adds nothing to any histogram
    rows.append(("anomfast fused, 4 methods, scores only (no histograms), 2 threads",
                 best_of(lambda: _fused.fused_pass(x, None, spec, num_threads=2), 10)))
    ml = resolve(["max_logit"])
    rows.append(("anomfast fused, max_logit, scores only (no histograms), 2 threads",
                 best_of(lambda: _fused.fused_pass(x, None, ml, num_threads=2), 10)))
    for m in METHODS4:
        s1 = resolve([m], sml=st)
        h1 = _fused.new_histogram(1, "cpu")
        rows.append((f"anomfast fused, {m} only, 2 threads", best_of(lambda: _fused.fused_pass(x, y, s1, hist=h1), 10)))
    # the bandwidth of this shared VM moves between runs: measured before and after the
    # timings, the higher one is the reference (the conservative percentage)
    bw_after = read_bandwidth_gbs()
    bw = max(bw_before, bw_after)
    print(f"# CPU benchmark, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, anomfast {anomfast.__version__} "
          f"({anomfast.build_info()['cpu_isa']})")
    print(f"logits 1 x 19 x 512 x 1024 float32 ({nbytes / 2**20:.0f} MiB); machine read bandwidth "
          f"measured before / after the timings: {bw_before:.1f} / {bw_after:.1f} GB/s (percentages of "
          f"the higher)\n")
    print("| what | time (ms) | logits GB/s | % of read bandwidth | speed-up vs reference |")
    print("|:--|--:|--:|--:|--:|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.1f} | {nbytes / t / 1e9:.2f} | {100 * nbytes / t / 1e9 / bw:.0f}% | "
              f"{t_ref / t:.1f}x |")

    # finalization vs scikit-learn on 4M pixels
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    batches = [make_inputs(B=1, seed=s) for s in range(8)]
    res = anomfast.evaluate((b[0] for b in batches), (b[1] for b in batches), methods=["energy"])
    hh = res.histograms["energy"]
    s = np.concatenate([anomfast.score_maps(b[0], methods=["energy"])["energy"].numpy().ravel() for b in batches])
    yy = np.concatenate([b[1].numpy().ravel() for b in batches])
    keep = yy != 255
    s, yy = s[keep], yy[keep]
    t_fin = best_of(hh.finalize, 5)
    t_sk = best_of(lambda: (roc_auc_score(yy, s), average_precision_score(yy, s), roc_curve(yy, s)), 1)
    r = hh.finalize()
    print(f"\nFinalization, energy, {yy.size / 1e6:.1f}M valid pixels, {anomfast.binning.NBINS} bins: "
          f"anomfast {t_fin * 1e3:.1f} ms vs scikit-learn (roc_auc + AP + roc_curve) {t_sk * 1e3:.0f} ms "
          f"({t_sk / t_fin:.0f}x); |AUROC diff| = {abs(r.auroc - roc_auc_score(yy, s)):.1e}")


if __name__ == "__main__":
    main()
