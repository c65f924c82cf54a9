"""evaluate()'s fixed cost per call (histogram allocation + finalization, all methods)
against the fused pass itself, resident histogram memory, and finalization time against
the bins the data touches. Correctness first: evaluate() must equal a pass into a
preallocated state finalized the same way.

    python bench/fixed_cost.py
    PYTHONPATH=/path/to/an/older/anomfast python bench/fixed_cost.py   # before / after

Works with any anomfast version that has _fused.new_histogram / fused_pass(hist=...).
"""
from __future__ import annotations

import gc
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

from common import METHODS4, best_of, fit_stats, make_inputs  # noqa: E402


ROUNDS = 40


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    x, y = make_inputs()  # 1 x 19 x 512 x 1024 float32
    st = fit_stats(x)
    spec = resolve(METHODS4, sml=st)
    M = len(METHODS4)
    # correctness: the one-call path equals a preallocated pass finalized the same way
    r = anomfast.evaluate(x, y, methods=METHODS4, sml=st)
    h = _fused.new_histogram(M, "cpu")
    _fused.fused_pass(x, y, spec, hist=h)
    r2 = anomfast.Evaluator(METHODS4, sml=st)
    r2.update(x, y)
    r2 = r2.compute()
    for m in METHODS4:
        assert r[m].auroc == r2[m].auroc and r[m].fpr95 == r2[m].fpr95, m
    try:  # the timed preallocated pass itself: the same histograms (older versions lack the reader)
        from anomfast.histogram import histograms_from_state
    except ImportError:
        histograms_from_state = None
    if histograms_from_state is not None:
        got = histograms_from_state(h, spec.names, spec.params_of)
        for m in METHODS4:
            assert got[m] == r.histograms[m], m

    gc.collect()
    rss0 = rss_mib()
    held = _fused.new_histogram(M, "cpu")
    rss_alloc = rss_mib() - rss0
    _fused.fused_pass(x, y, spec, hist=held)
    rss_pass = rss_mib() - rss0
    del held
    gc.collect()

    t_alloc = best_of(lambda: _fused.new_histogram(M, "cpu"), 10)
    pre = _fused.new_histogram(M, "cpu")
    # interleaved, so that the other tenants of a shared machine slow both alike: the best
    # of each, and the median of the per-round differences (robust to slow drift)
    t_pass, t_eval, diffs = float("inf"), float("inf"), []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        _fused.fused_pass(x, y, spec, hist=pre)
        t1 = time.perf_counter()
        anomfast.evaluate(x, y, methods=METHODS4, sml=st)
        t2 = time.perf_counter()
        t_pass, t_eval = min(t_pass, t1 - t0), min(t_eval, t2 - t1)
        diffs.append((t2 - t1) - (t1 - t0))
    fixed = t_eval - t_pass
    fixed_med = float(np.median(diffs))
    print(f"anomfast {anomfast.__version__}, {anomfast.build_info().get('cpu_isa')}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"logits 1 x 19 x 512 x 1024 float32, methods {METHODS4}")
    print("| what | value |\n|:--|--:|")
    print(f"| fused pass into a preallocated state | {1e3 * t_pass:.1f} ms |")
    print(f"| histogram allocation (new state, {M} methods) | {1e3 * t_alloc:.2f} ms |")
    print(f"| evaluate() end to end | {1e3 * t_eval:.1f} ms |")
    print(f"| fixed cost per call (evaluate - pass: allocation + finalization), best of {ROUNDS} each | "
          f"{1e3 * fixed:.1f} ms = {100 * fixed / t_pass:.0f}% of the pass |")
    print(f"| the same, median of {ROUNDS} interleaved differences | {1e3 * fixed_med:.1f} ms "
          f"= {100 * fixed_med / t_pass:.0f}% of the best pass |")
    print(f"| resident histogram memory after allocation / after the pass | {rss_alloc:.1f} / {rss_pass:.1f} MiB "
          f"({rss_pass / M:.1f} MiB per method) |")

    # where the fixed cost goes: the fresh state's first touch (page faults, zeroing) and
    # release, the read-out of the state into Histograms, their finalization
    from anomfast.histogram import histograms_from_state
    t_fresh = best_of(lambda: _fused.fused_pass(x, y, spec, hist=_fused.new_histogram(M, "cpu")), 10)
    hists = histograms_from_state(pre, spec.names, spec.params_of)
    t_read = best_of(lambda: histograms_from_state(pre, spec.names, spec.params_of), 10)
    from anomfast import histogram as _histogram
    together = getattr(_histogram, "finalize_histograms", None)  # all methods in one call (newer versions)
    t_fin = best_of((lambda: together(hists)) if together else (lambda: [h.finalize() for h in hists.values()]), 10)
    both = getattr(_histogram, "read_and_finalize", None)  # one compiled call (newer versions)
    conv = dict(fpr_mode="first", ap_mode="step", tpr_target=0.95)
    t_both = best_of((lambda: both(pre, spec.names, spec.params_of, conv)) if both else
                     (lambda: (together or (lambda hs: [h.finalize() for h in hs.values()]))(
                         histograms_from_state(pre, spec.names, spec.params_of))), 10)
    bins = sum(h.index.size for h in hists.values())
    print(f"| of which: pass into a fresh state (allocate, first touch, free) - preallocated pass | "
          f"{1e3 * (t_fresh - t_pass):.1f} ms |")
    print(f"| of which: read-out of the state into {M} Histograms ({bins} non-empty bins) | {1e3 * t_read:.2f} ms |")
    print(f"| of which: finalization of the {M} Histograms | {1e3 * t_fin:.2f} ms |")
    print(f"| read-out + finalization as evaluate() runs them{' (one call)' if both else ''} | {1e3 * t_both:.2f} ms |")

    # finalization against the bins touched: scores spread over more and more octaves
    if hasattr(anomfast.Histogram, "from_scores"):
        rng = np.random.default_rng(0)
        print("\n| octaves spanned (energy-like scores, 4M pixels) | non-empty bins | finalize (ms) |\n|--:|--:|--:|")
        for octaves in (1, 4, 16, 64):
            s = -np.exp2(rng.uniform(0, octaves, 4_000_000)).astype(np.float32)
            lab = rng.random(s.size) < 0.05
            hh = anomfast.Histogram.from_scores("custom", s, lab)
            t = best_of(lambda: hh.finalize(), 5)
            print(f"| {octaves} | {hh.index.size} | {1e3 * t:.2f} |")


if __name__ == "__main__":
    main()
