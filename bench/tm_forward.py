"""torchmetrics adapter: forward() (Lightning's ``metric(logits, labels)``) and update()
per call, correctness first (each forward's batch results equal anomfast.evaluate on that
batch, the accumulated state equals evaluate on all batches).

    python bench/tm_forward.py
    PYTHONPATH=/path/to/an/older/anomfast python bench/tm_forward.py   # before / after
"""
from __future__ import annotations

import platform
import time
import warnings

import torch

import anomfast
from anomfast.tm import AnomalyMetrics

M = ("max_logit", "msp", "energy")
N = 8


def main():
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 19, 128, 128, generator=g) for _ in range(N)]
    ys = [(torch.rand(2, 128, 128, generator=g) < .2).long() for _ in range(N)]
    # correctness first: each forward's batch results, and the accumulated state
    m = AnomalyMetrics(methods=M)
    for x, y in zip(xs, ys):
        o, e = m(x, y), anomfast.evaluate(x, y, methods=M)
        assert all(o[k].auroc == e[k].auroc and o[k].fpr95 == e[k].fpr95 for k in M)
    r, ref = m.compute(), anomfast.evaluate(xs, ys, methods=M)
    assert all(r[k].auroc == ref[k].auroc for k in M)
    m, tf = AnomalyMetrics(methods=M), []
    for x, y in zip(xs, ys):
        t = time.perf_counter()
        m(x, y)
        tf.append(time.perf_counter() - t)
    u, tu = AnomalyMetrics(methods=M), []
    for x, y in zip(xs, ys):
        t = time.perf_counter()
        u.update(x, y)
        tu.append(time.perf_counter() - t)
    print(f"anomfast {anomfast.__version__} ({anomfast.__file__}), torch {torch.__version__}, {platform.machine()}")
    print(f"{N} batches of 2 x 19 x 128 x 128 float32, methods {list(M)}")
    print("forward: min %.1f ms, median %.1f ms | update: min %.1f ms, median %.1f ms"
          % (min(tf) * 1e3, sorted(tf)[N // 2] * 1e3, min(tu) * 1e3, sorted(tu)[N // 2] * 1e3))


if __name__ == "__main__":
    main()
