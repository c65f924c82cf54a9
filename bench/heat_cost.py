"""What HEAT and SML-full add to the fused CPU pass.

    python bench/heat_cost.py [--repeats 5] [--threads 0]

One 1 x 19 x 512 x 1024 float32 logits batch with labels (features 1 x 64 x 64 x 128):
the fused pass (scores -> histograms) with the four plain methods (max_logit, msp,
energy, sml), then + heat, then + SML-full instead of plain SML, best of --repeats
runs each, all in one run. HEAT's time includes its Mahalanobis map (torch matmul +
bilinear upsampling, also shown alone); SML-full's includes its post-process (also
shown alone). A correctness check against the float64 reference runs first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import anomfast
from anomfast import _fused, heat, reference
from anomfast.methods import resolve
from anomfast.sml import postprocess

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of  # noqa: E402

PLAIN = ["max_logit", "msp", "energy", "sml"]


def data(g, B, C, H, W, D, h, w):
    x = torch.randn(B, C, H, W, generator=g) * 3
    k = torch.randint(0, C, (B, 1, h, w), generator=g)
    k = torch.nn.functional.interpolate(k.float(), size=(H, W), mode="nearest").long()
    x.scatter_add_(1, k, torch.full((B, 1, H, W), 8.0))
    f = torch.randn(B, D, h, w, generator=g) + torch.nn.functional.interpolate(
        k.float(), size=(h, w), mode="nearest") * 0.5
    y = torch.zeros(B, H, W, dtype=torch.uint8)
    y[:, H // 3: H // 3 + 40, W // 2: W // 2 + 60] = 1
    return x, f, k[:, 0], y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="OpenMP threads of the core (0: default)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    B, C, H, W, D, h, w = 1, 19, 512, 1024, 64, 64, 128

    # fitted on a smaller in-distribution batch of the same kind
    fx, ff, fk, _ = data(g, 1, C, 128, 256, D, 16, 32)
    sml = anomfast.fit_sml(fx)
    hs = anomfast.fit_heat(fx, ff, fk)

    # check first: a crop against the float64 reference
    cx, cf, _, _ = data(g, 1, C, 32, 64, D, 4, 8)
    got = anomfast.score_maps(cx, methods=["heat"], features=cf, heat=hs)["heat"].double()
    ref = reference.heat_score(cx, cf, hs.mean, hs.precision, temperature=hs.temperature,
                               score_mean=hs.score_mean, score_std=hs.score_std)
    err = float((got - ref).abs().max())
    assert err <= 1e-4 * (float(ref.abs().max()) + float(cx.abs().max())), f"HEAT check failed: {err}"
    print(f"check: HEAT vs float64 reference on 1x{C}x32x64, max abs error {err:.2e}")

    x, f, _, y = data(g, B, C, H, W, D, h, w)
    n_px = B * H * W
    runs = {
        "plain (max_logit, msp, energy, sml)": resolve(PLAIN, sml=sml),
        "plain + heat": resolve(PLAIN + ["heat"], sml=sml, heat=hs),
        "plain with SML-full": resolve(PLAIN, sml=sml, sml_full=True),
        "plain with SML-full + heat": resolve(PLAIN + ["heat"], sml=sml, heat=hs, sml_full=True),
    }
    print(f"logits {B}x{C}x{H}x{W} float32 ({x.numel() * 4 / 2**20:.0f} MiB), features {B}x{D}x{h}x{w}, "
          f"threads {args.threads or torch.get_num_threads()} (core: {anomfast.build_info()['cpu_isa']}), "
          f"best of {args.repeats}")
    times = {}
    for name, spec in runs.items():
        hist = _fused.new_histogram(len(spec.names), x.device)

        def run(spec=spec, hist=hist):
            c = _fused.new_counters(x.device)
            _fused.fused_pass(x, y, spec, hist=hist, counters=c, features=f, num_threads=args.threads)
        times[name] = t = best_of(run, args.repeats)
        print(f"  {name:<32s} {t * 1e3:8.1f} ms  {n_px / t / 1e6:8.1f} Mpx/s")
    t_m = best_of(lambda: heat.distance_map(f, hs, (H, W)), args.repeats)
    k = x.argmax(dim=1)
    s = torch.randn(B, H, W, generator=g)
    t_pp = best_of(lambda: postprocess(s, k), args.repeats)
    base = times["plain (max_logit, msp, energy, sml)"]
    print(f"  of which HEAT's Mahalanobis map (matmul at {h}x{w}, D={D}, + upsampling): {t_m * 1e3:.1f} ms")
    print(f"  of which SML-full's post-process (boundary suppression + dilated smoothing): {t_pp * 1e3:.1f} ms")
    print(f"  heat adds {(times['plain + heat'] - base) * 1e3:.1f} ms "
          f"({times['plain + heat'] / base:.2f}x), SML-full adds "
          f"{(times['plain with SML-full'] - base) * 1e3:.1f} ms ({times['plain with SML-full'] / base:.2f}x)")


if __name__ == "__main__":
    main()
