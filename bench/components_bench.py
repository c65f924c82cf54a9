"""Component metrics (SegmentMeIfYouCan) on one 1024 x 2048 image: anomfast against
scipy's labeling + the benchmark's per-component loops (the float64 transcription in
tests/test_components.py), same inputs, correctness checked first.

    python bench/components_bench.py        # ~1 minute on 2 cores
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
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import best_of  # noqa: E402
from test_components import _check, ref_aggregate, ref_benchmark  # noqa: E402

from anomfast import components as comp  # noqa: E402

H, W, THRESHOLD = 1024, 2048, 0.5


def road_scene(seed=0):
    """A road-like scene: a void band on top (sky / ego vehicle), ground-truth anomalies of
    several sizes (some under the anomaly track's 100 px, two touching), and a smooth
    score map with blobs on most anomalies, a few false blobs and speckle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    label = np.zeros((H, W), np.uint8)
    label[:200] = 255
    label[-60:, 700:1300] = 255
    score = rng.random((H, W)) * 0.35
    for k in range(14):  # anomalies: ellipses, radii 4..90 px
        cy, cx = rng.integers(260, H - 80), rng.integers(60, W - 60)
        ry, rx = rng.integers(4, 90), rng.integers(4, 90)
        e = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        label[e] = 1
        if k % 4 != 3:  # detected, a bit shifted and wider
            d = ((yy - cy - ry // 4) / (1.2 * ry)) ** 2 + ((xx - cx) / (1.1 * rx)) ** 2 <= 1
            score[d] += 0.3 + 0.4 * rng.random()
    label[600:640, 300:360] = 1  # two touching boxes
    label[640:680, 360:420] = 1
    score[590:690, 290:430] += 0.5  # one blob over both
    for _ in range(6):  # false positives
        cy, cx = rng.integers(220, H), rng.integers(0, W)
        r = rng.integers(3, 40)
        score[((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r] += 0.5
    score += (rng.random((H, W)) < 0.002) * 0.6  # speckle: tiny segments the size limit drops
    return score, label


def main():
    score, label = road_scene()
    # correctness first: the same counts and means as the benchmark's definitions
    ref = ref_aggregate([ref_benchmark(score, label, THRESHOLD, 500, 100)])
    res = comp.component_metrics(score, label, THRESHOLD, track="anomaly")
    _check(res, ref)
    print(f"checked: n_gt {res.n_gt}, n_pred {res.n_pred}, sIoU {res.siou_gt:.4f}, PPV {res.ppv:.4f}, "
          f"mean F1 {res.mean_f1:.4f} equal the benchmark transcription")

    t0 = time.perf_counter()
    ref_benchmark(score, label, THRESHOLD, 500, 100)
    t_ref = time.perf_counter() - t0
    from scipy import ndimage
    t0 = time.perf_counter()
    ndimage.label(label == 1, np.ones((3, 3), np.uint8))
    ndimage.label((score > THRESHOLD) & (label != 255), np.ones((3, 3), np.uint8))
    t_label = time.perf_counter() - t0
    s, y = torch.from_numpy(score), torch.from_numpy(label)
    # per image as evaluate() / the Evaluator run it: one accumulator (its buffers reused)
    acc = comp.ComponentAccumulator(["bench"], comp.ComponentSpec(track="anomaly"), {"bench": THRESHOLD})
    t_api = best_of(lambda: acc.update_scores(0, s[None], acc.classes(y[None])), 5)
    pred = (score > THRESHOLD).astype(np.uint8)
    cls = np.where(label == 1, comp.ANOMALY, np.where(label == 255, comp.VOID, comp.NORMAL)).astype(np.int8)
    ws = comp._Workspace()
    t_core = best_of(lambda: comp.image_counts(pred, cls, 500, 100, "benchmark", ws), 5)

    import scipy
    print(f"\n{H} x {W} image, {platform.machine()} {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, scipy {scipy.__version__}\n")
    print("| path | ms / image | speed-up |")
    print("|:--|--:|--:|")
    print(f"| benchmark: scipy.ndimage.label + per-component loops (one run) | {1e3 * t_ref:.0f} | 1.0x |")
    print(f"| of which scipy.ndimage.label of both maps (one run) | {1e3 * t_label:.0f} | |")
    print(f"| anomfast per image (label classes, float64 binarization, core, accumulation; best of 5) | "
          f"{1e3 * t_api:.1f} | {t_ref / t_api:.0f}x |")
    print(f"| anomfast core alone (labeling + counts, best of 5) | {1e3 * t_core:.1f} | {t_ref / t_core:.0f}x |")
    if torch.cuda.is_available() and comp._core._C_cuda is not None:  # the device path, same image
        sd, yd = s.cuda(), y.cuda()
        one = [comp.ComponentAccumulator(["bench"], comp.ComponentSpec(track="anomaly"), {"bench": THRESHOLD})
               for _ in range(2)]
        for a, (si, yi) in zip(one, ((s, y), (sd, yd))):
            a.update_scores(0, si[None], a.classes(yi[None]))
        assert torch.equal(one[0].counts, one[1].counts), "CUDA component counts differ from the CPU's"
        accd = one[1]

        def on_device():
            accd.update_scores(0, sd[None], accd.classes(yd[None]))
            torch.cuda.synchronize()
        t_dev = best_of(on_device, 20)
        print(f"| anomfast on {torch.cuda.get_device_name()} (label classes, binarization, labeling + counts on "
              f"the device, rows copied back; best of 20) | {1e3 * t_dev:.2f} | {t_ref / t_dev:.0f}x |")


if __name__ == "__main__":
    main()
