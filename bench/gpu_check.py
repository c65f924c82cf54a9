"""GPU check of the CUDA core in one run, sized to one 570-second call (--budget):
a tiny smoke run in a child process first (a device fault there stops the check before
it can poison this process), then correctness (float64 reference, the CPU core, exact
histograms, bit identity with the baseline CPU build in a child with
ANOMFAST_CPU_ISA=baseline, the grid-stride walk with a one-block debug grid, a cropped
non-flattenable input, certified metric bounds, fp16/bf16, SML fit, stream semantics,
component labeling and counts on the device against the CPU core (and its time per
1024 x 2048 image), Evaluator.update under torch.compile(fullgraph) and CUDA graph capture, PyTorch's
expandable-segments allocator), then timing (GB/s of logits read as a % of a read-only
baseline over the same tensor, torch.sum, and of the nominal 4.8 TB/s of an H200;
scores-only vs histogram rows; the pure-PyTorch float32 and float64 baselines), a
rebuild with -fmad=true, and compute-sanitizer (memcheck, racecheck, synccheck) on a
tiny workload, each tool in its own child, a timeout reported as inconclusive. Every
section records its failure and the run goes on, unless the CUDA context is broken
(sticky error): then the remaining in-process sections are skipped and named. Sections
whose estimated time does not fit the budget left are skipped and named at the end.

On the GPU machine, from the repository root. First check that PyTorch sees the GPU:

    python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"

(it must print True; if not, install a CUDA build of torch first). Then build and run:

    python3 -m pip install --no-build-isolation --no-deps -e . \
        --config-settings=cmake.define.ANOMFAST_CUDA=ON \
        --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90-real \
      && python3 bench/gpu_check.py --budget 570

As one line for a remote call that keeps the build log:

    (python3 -m pip install --no-build-isolation --no-deps -e . --config-settings=cmake.define.ANOMFAST_CUDA=ON --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90-real > $OUT/build.log 2>&1 || (tail -60 $OUT/build.log; false)) && python3 bench/gpu_check.py --budget 570

(the build itself is not inside --budget: leave it a few minutes, or run it in its own call.)

Options: --seed N (default: from the clock, printed), --budget SECONDS (default 570),
--no-sanitizer, --quick (2 images in the timing), --dry-run (print the plan and the
estimated seconds per section; needs no GPU). Internal: --tiny (the small workload of the
smoke run and the sanitizers), --bits (the baseline-CPU bit-identity child). Results go
to $OUT/gpu_check.json when OUT is set. Exit status: 0 all ran sections passed, 1 some
failed (or a device fault), 2 no usable CUDA device or module. The last thing printed is
a Markdown table of the checks and one of the timings.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import torch

import anomfast
from anomfast import _core, _fused, reference
from anomfast import components as comp
from anomfast.labels import LabelMap
from anomfast.methods import resolve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_state, same_state  # noqa: E402

ALL = ["max_logit", "msp", "energy", "sml", "entropy", "gen"]
METHODS4 = ["max_logit", "msp", "energy", "sml"]
NBINS = _core.NBINS
NOMINAL_GBPS = 4800.0  # H200 HBM3e, nominal
T0 = time.time()
RESULTS: dict = {"sections": {}, "timing": [], "env": {}}
warnings.filterwarnings("ignore", message="SML: classes")  # tiny fits leave classes unseen; expected here


# ----------------------------------------------------------------------------- helpers

def log(*a):
    print(*a, flush=True)


def run_section(name, fn, *args, **kw):
    """Runs one section; records ok / failure (with traceback) and its duration."""
    t = time.time()
    log(f"\n=== {name}")
    try:
        details = fn(*args, **kw)
        torch.cuda.synchronize()  # surface asynchronous errors inside the section
        RESULTS["sections"][name] = {"ok": True, "seconds": round(time.time() - t, 1), "details": details}
        log(f"--- {name}: ok ({time.time() - t:.1f} s)")
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the run
        tb = traceback.format_exc()
        RESULTS["sections"][name] = {"ok": False, "seconds": round(time.time() - t, 1),
                                     "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tb[-4000:]}
        log(tb)
        log(f"--- {name}: FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        if torch.cuda.is_available() and device_broken():
            RESULTS["device_fault"] = f"after {name}: {exc}"[:500]
            log("!!! the CUDA context is broken (sticky device error): the in-process sections after this one "
                "would all fail; stopping them")


def device_broken() -> bool:
    """A device fault (illegal address, ...) is sticky: every later CUDA call in the process fails."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


SKIPPED: list = []


def child_timeout(args, want):
    """A child's timeout: `want` seconds, less when the budget has less left (>= 20)."""
    return max(20.0, min(want, args.budget - (time.time() - T0) - 15))


def random_logits(g, B, C, H, W, scale=4.0, dtype=torch.float32, device="cuda"):
    """Segmentation-like logits (as tests/conftest.py): a confident class plus noise."""
    x = torch.randn(B, C, H, W, generator=g, device=device) * scale
    k = torch.randint(0, C, (B, 1, H, W), generator=g, device=device)
    boost = torch.rand(B, 1, H, W, generator=g, device=device) * 3 * scale
    x.scatter_add_(1, k, boost)
    return x.to(dtype)


def random_labels(g, B, H, W, p_anomaly=0.05, p_void=0.1, device="cuda"):
    u = torch.rand(B, H, W, generator=g, device=device)
    y = torch.zeros(B, H, W, dtype=torch.uint8, device=device)
    y[u < p_anomaly] = 1
    y[u > 1 - p_void] = 255
    return y


def ref_kwargs(method, stats=None, temperature=1.0, entropy_normalize=False, gen_gamma=0.1):
    if method == "sml":
        return dict(sml_mean=stats.mean, sml_std=stats.std)
    if method == "energy":
        return dict(temperature=temperature)
    if method == "entropy":
        return dict(entropy_normalize=entropy_normalize)
    if method == "gen":
        return dict(gen_gamma=gen_gamma)
    return {}


def scale_of(method, x64, stats):
    """As tests/test_scores.py: the magnitude float32 rounding errors scale with."""
    if method == "sml":
        m, k = x64.max(dim=1)
        mean = torch.as_tensor(stats.mean, device=x64.device)[k]
        std = torch.as_tensor(stats.std, device=x64.device)[k]
        return (m.abs() + mean.abs()) / std
    if method in ("max_logit", "energy"):
        return x64.abs().amax(dim=1)
    return torch.ones(x64.shape[0], *x64.shape[2:], dtype=torch.float64, device=x64.device)


def sync():
    torch.cuda.synchronize()


def bincount_hist(idx, cls):
    """(2, NBINS) counts of bin indices `idx` split by label class 0 / 1."""
    return torch.stack([torch.bincount(idx[cls == c].flatten(), minlength=NBINS) for c in (0, 1)])


# ----------------------------------------------------------------------------- sections

def section_env(args):
    env = {"seed": args.seed, "python": sys.version.split()[0], "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                            "clocks.mem,temperature.gpu,power.draw,power.limit", "--format=csv"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip()
        log(q.stdout.strip())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = {"name": p.name, "cc": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                         "mem_gib": round(p.total_memory / 2**30, 1)}
    env["build_info"] = anomfast.build_info()
    env["cuda_import_error"] = _core._CUDA_IMPORT_ERROR
    for k, v in env.items():
        if k != "nvidia_smi":
            log(f"{k}: {v}")
    RESULTS["env"] = env
    if not env["build_info"].get("cuda"):
        raise RuntimeError(f"anomfast has no CUDA module: {_core._CUDA_IMPORT_ERROR}")
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    return {"cuda_archs": env["build_info"].get("cuda_archs"), "fmad": env["build_info"].get("cuda_fmad")}


def section_maps(g):
    """(a) GPU coordinate maps vs the float64 reference, with test_scores.py's tolerance;
    also how close they are to the CPU core's."""
    cases = [("C=19 NCHW", (2, 19, 67, 131), None), ("C=150 (no register path)", (1, 150, 33, 47), None),
             ("C=32 (register limit)", (2, 32, 21, 35), None), ("C=33", (1, 33, 17, 29), None),
             ("C=1", (2, 1, 9, 11), None), ("(N, C, 1, 1)", (700, 19, 1, 1), None),
             ("channels-last", (2, 19, 40, 50), "cl"), ("strided W", (2, 19, 23, 90), "slice")]
    params_sets = [dict(), dict(temperature=1.7, entropy_normalize=True, gen_gamma=0.3)]
    out = {}
    worst_overall = 0.0
    for name, shape, layout in cases:
        x = random_logits(g, *shape)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "slice":
            x = x[..., ::2]
        C = shape[1]
        stats = anomfast.fit_sml(random_logits(g, 2, C, 8, 8))
        x64 = x.double()
        for pi, params in enumerate(params_sets):
            maps = anomfast.score_maps(x, methods=ALL, sml=stats, **params)
            cpu_maps = anomfast.score_maps(x.cpu(), methods=ALL, sml=stats, **params)
            for m in ALL:
                ref = reference.score(x64, m, **ref_kwargs(m, stats, **params))
                got = maps[m].double()
                tol = 1e-5 * (ref.abs() + scale_of(m, x64, stats)) + 1e-30
                ratio = float(((got - ref).abs() / tol).max())
                cm = cpu_maps[m]
                same = float((maps[m].cpu().view(torch.int32) == cm.view(torch.int32)).double().mean())
                out[f"{name} p{pi} {m}"] = {"worst_err_over_tol": round(ratio, 4), "bitwise_equal_to_cpu": round(same, 4),
                                            "max_abs_diff_cpu": float((maps[m].cpu().double() - cm.double()).abs().max())}
                worst_overall = max(worst_overall, ratio)
                assert ratio <= 1.0, f"{name} {params} {m}: error {ratio:.3g} x the tolerance"
    log(f"worst error / tolerance over all cases: {worst_overall:.3g}")
    eq = [v["bitwise_equal_to_cpu"] for v in out.values()]
    log(f"fraction of pixels bit-identical to the CPU core: min {min(eq):.4f}, mean {np.mean(eq):.4f} "
        f"(CPU isa {anomfast.build_info()['cpu_isa']}, cuda_fmad {anomfast.build_info()['cuda_fmad']})")
    return {"worst_err_over_tol": worst_overall, "min_bitwise_equal_to_cpu": min(eq), "cases": out}


def section_hist(g):
    """(b) GPU histograms == the NumPy binning of the GPU's own maps, per label (counts,
    tie signatures, occupancy), for every dtype and aggregation mode; counters == the CPU
    core's."""
    cuda = _core._C_cuda
    spec = resolve(ALL, temperature=1.7, sml=anomfast.fit_sml(random_logits(g, 2, 19, 16, 16)))
    out = {}
    shapes = [(3, 19, 45, 77), (4, 19, 512, 1024), (2, 40, 30, 31)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in shapes:
            if shape[1] != 19:
                spec_s = resolve(["max_logit", "msp", "energy", "entropy", "gen"], temperature=1.7)
            else:
                spec_s = spec
            B, C, H, W = shape
            x = random_logits(g, *shape, dtype=dtype)
            y = random_labels(g, B, H, W)
            x[0, 1, 0, :3] = float("nan")
            x[-1, 0, -1, -2:] = float("inf")
            base = None
            for agg in (1, 0, 2):
                cuda._set_hist_aggregation(agg)
                hist, counters, maps = _fused.fused_pass(x, y, spec_s, want_maps=True)
                if base is None:
                    base = hist.clone()
                    fin = torch.isfinite(x.float()).all(dim=1)
                    check_state(hist, maps, y, fin, f"{dtype} {shape}", names=spec_s.names)
                    h_nomaps, c2, _ = _fused.fused_pass(x, y, spec_s, want_maps=False)
                    assert same_state(h_nomaps, hist) and torch.equal(c2, counters), "maps on/off changes the result"
                    hc, cc, _ = _fused.fused_pass(x.cpu(), y.cpu(), spec_s)
                    assert torch.equal(counters.cpu(), cc), f"counters {counters.tolist()} vs CPU {cc.tolist()}"
                    moved = [int((hist.hist[j].cpu() - hc.hist[j]).abs().sum()) // 2 for j in range(len(spec_s.names))]
                    out[f"{dtype} {shape}"] = {"counters": counters.tolist(), "pixels_in_other_bins_than_cpu": moved}
                else:
                    assert same_state(hist, base), f"aggregation mode {agg} changes the histogram"
            cuda._set_hist_aggregation(1)
    # label dtypes, a label table too big for shared memory, invalid values, int8 offsets
    x = random_logits(g, 2, 19, 33, 65)
    y = random_labels(g, 2, 33, 65)
    sp = resolve(["max_logit", "msp"])
    h0, c0, _ = _fused.fused_pass(x, y, sp)
    for dt in (torch.int64, torch.int32, torch.int16):
        h1, c1, _ = _fused.fused_pass(x, y.to(dt), sp)
        assert same_state(h1, h0) and torch.equal(c1, c0), f"labels {dt}"
    yb = (y == 1)
    hb, cb, _ = _fused.fused_pass(x, yb, sp)
    hbc, cbc, _ = _fused.fused_pass(x.cpu(), yb.cpu(), sp)
    assert torch.equal(cb.cpu(), cbc)
    big = LabelMap(anomaly_ids=(1,), void_ids=(255, 9000), normal_ids=(0,))
    yl = y.to(torch.int64)
    yl[0, 0, :7] = 9000
    yl[1, 2, :3] = 7  # not in the map: invalid
    hl, cl, ml = _fused.fused_pass(x, yl, sp, label_map=big, want_maps=True)
    hlc, clc, _ = _fused.fused_pass(x.cpu(), yl.cpu(), sp, label_map=big)
    assert torch.equal(cl.cpu(), clc) and int(cl[1]) == 3, (cl.tolist(), clc.tolist())
    i8 = LabelMap(anomaly_ids=(1,), void_ids=(-1,), normal_ids=(0,))
    y8 = y.to(torch.int16).masked_fill(y == 255, -1).to(torch.int8)
    h8, c8, _ = _fused.fused_pass(x, y8, sp, label_map=i8)
    assert same_state(h8, h0) and torch.equal(c8, c0), "int8 labels with a negative void id"
    out["label dtypes"] = "ok"
    return out


def section_metrics(g):
    """(c) anomfast.evaluate on GPU vs CPU: the certified intervals overlap and the
    values agree within the interval widths; exact mode agrees closely."""
    B, C, H, W = 4, 19, 256, 512
    x = random_logits(g, B, C, H, W)
    y = random_labels(g, B, H, W, p_anomaly=0.08)
    # make anomalies less confident so the metrics are not trivial
    anom = (y == 1).unsqueeze(1)
    x = torch.where(anom, x * 0.35, x)
    stats = anomfast.fit_sml(x, y)
    stats_cpu = anomfast.fit_sml(x.cpu(), y.cpu())
    assert (stats.count == stats_cpu.count).all()
    kw = dict(methods=ALL, sml=stats_cpu, temperature=1.3)
    rg = anomfast.evaluate(x, y, **kw)
    rc = anomfast.evaluate(x.cpu(), y.cpu(), **kw)
    out = {}
    for m in ALL:
        row = {}
        for k in ("auroc", "ap", "fpr95", "f1"):
            vg, vc = getattr(rg[m], k), getattr(rc[m], k)
            (lg, hg), (lc, hc) = rg[m].bounds[k], rc[m].bounds[k]
            overlap = max(lg, lc) <= min(hg, hc) + 1e-12
            width = max(hg - lg, hc - lc)
            row[k] = {"gpu": vg, "cpu": vc, "gpu_bounds": (lg, hg), "cpu_bounds": (lc, hc)}
            assert overlap, f"{m} {k}: GPU bounds {(lg, hg)} and CPU bounds {(lc, hc)} do not overlap"
            assert abs(vg - vc) <= width + 1e-9, f"{m} {k}: GPU {vg} vs CPU {vc}, bound width {width}"
        out[m] = row
        log(f"{m:>9}: auroc {rg[m].auroc:.6f} / {rc[m].auroc:.6f}  fpr95 {rg[m].fpr95:.6f} / {rc[m].fpr95:.6f}"
            f"  (GPU / CPU)")
    xs, ys = x[:1, :, :128, :256], y[:1, :128, :256]
    eg = anomfast.evaluate(xs, ys, exact=True, **kw)
    ec = anomfast.evaluate(xs.cpu(), ys.cpu(), exact=True, **kw)
    for m in ALL:
        for k in ("auroc", "ap", "fpr95", "f1"):
            assert abs(getattr(eg[m], k) - getattr(ec[m], k)) <= 1e-4, f"exact {m} {k}"
    pg = anomfast.evaluate(xs, ys, per_image=True, methods=["max_logit", "energy"])
    pc = anomfast.evaluate(xs.cpu(), ys.cpu(), per_image=True, methods=["max_logit", "energy"])
    assert abs(pg["energy"].auroc - pc["energy"].auroc) <= 1e-3
    return out


def section_half(g):
    """(d) fp16/bf16 on GPU: error vs the float64 reference at most twice PyTorch's at the
    same precision (flash-attention's rule, as tests/test_scores.py)."""
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        x = random_logits(g, 2, 19, 64, 96, dtype=dtype)
        x64 = x.double()
        maps = anomfast.score_maps(x, methods=["max_logit", "msp", "energy", "entropy"])
        same = {
            "max_logit": lambda: -x.max(dim=1).values,
            "msp": lambda: 1 - torch.softmax(x, dim=1).max(dim=1).values,
            "energy": lambda: -torch.logsumexp(x, dim=1),
            "entropy": lambda: -(torch.softmax(x, 1) * torch.log_softmax(x, 1)).sum(1),
        }
        for m in same:
            ref = reference.score(x64, m)
            ours = float((maps[m].double() - ref).abs().max())
            theirs = float((same[m]().double() - ref).abs().max())
            out[f"{dtype} {m}"] = {"ours": ours, "torch_same_precision": theirs}
            assert ours <= 2 * theirs + 1e-6, f"{m} {dtype}: ours {ours:.3g} vs torch {theirs:.3g}"
    return out


def section_fit(g):
    """SML fit on GPU vs CPU: equal counts, float64 sums equal up to summation order."""
    out = {}
    for C, dtype in ((19, torch.float32), (19, torch.bfloat16), (300, torch.float32), (2, torch.float16)):
        x = random_logits(g, 3, C, 70, 90, dtype=dtype)
        y = random_labels(g, 3, 70, 90)
        for labels in (None, y):
            sg = anomfast.fit_sml(x, labels, missing="global")
            sc = anomfast.fit_sml(x.cpu(), None if labels is None else labels.cpu(), missing="global")
            assert (sg.count == sc.count).all(), f"C={C} {dtype}: counts differ"
            assert np.allclose(sg.sum, sc.sum, rtol=1e-12, atol=1e-9), f"C={C} {dtype}: sums differ"
            assert np.allclose(sg.sumsq, sc.sumsq, rtol=1e-12, atol=1e-9), f"C={C} {dtype}: sums of squares differ"
            out[f"C={C} {dtype} labels={labels is not None}"] = {
                "max_rel_sum_diff": float(np.max(np.abs(sg.sum - sc.sum) / np.maximum(np.abs(sc.sum), 1e-300)))}
    return out


def section_streams(g):
    """The kernel runs on the caller's stream and the call returns without waiting."""
    cuda = _core._C_cuda
    x = random_logits(g, 2, 19, 256, 512)
    y = random_labels(g, 2, 256, 512)
    sp = resolve(METHODS4, sml=anomfast.fit_sml(x))
    want, wc, _ = _fused.fused_pass(x, y, sp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        hist = _fused.new_histogram(len(sp.names), x.device)
        cnt = _fused.new_counters(x.device)
        torch.cuda._sleep(50_000_000)  # keep the side stream busy (~25 ms)
        _fused.fused_pass(x, y, sp, hist=hist, counters=cnt)
    s.synchronize()
    assert same_state(hist, want) and torch.equal(cnt, wc), "result on a side stream differs"
    a = _prepared_args(x, y, sp, hist)
    sync()
    torch.cuda._sleep(100_000_000)  # ~50 ms of GPU work ahead of us on the current stream
    t = time.perf_counter()
    for _ in range(10):
        cuda.fused(a)
    host_ms = (time.perf_counter() - t) * 1e3 / 10
    sync()
    log(f"host time per fused call while the GPU is busy: {host_ms * 1e3:.0f} us")
    assert host_ms < 5.0, f"the call seems to wait for the GPU ({host_ms:.1f} ms per call)"
    return {"host_us_per_call": host_ms * 1e3}


def section_baseline_bits(args):
    """Bit identity with the baseline CPU build, in a child with ANOMFAST_CPU_ISA=baseline
    (the AVX2/AVX-512 builds contract into FMA and differ in the last bits): with the
    default CUDA build (-fmad=false, no fast mode) every method's maps and histograms equal
    the CPU core's exactly, for fp32 / fp16 / bf16."""
    bi = anomfast.build_info()
    if bi.get("cuda_fmad") or bi.get("cuda_fast"):
        return {"skipped": f"this CUDA build contracts FMA (fmad={bi.get('cuda_fmad')}, fast={bi.get('cuda_fast')}): "
                           "not meant to be bit-identical"}
    env = dict(os.environ, ANOMFAST_CPU_ISA="baseline")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--bits", "--seed", str(args.seed)],
                       capture_output=True, text=True, timeout=child_timeout(args, 150), env=env)
    assert r.returncode == 0 and "BITS OK" in r.stdout, (r.stdout + r.stderr)[-3000:]
    return {"child": r.stdout.strip().splitlines()[-1]}


def bits(seed):
    """--bits (child of section_baseline_bits): GPU == baseline CPU build, bit for bit."""
    assert anomfast.build_info()["cpu_isa"] == "baseline", anomfast.build_info()["cpu_isa"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    # W = 97: one pixel a turn; W = 98: pixel pairs (fp16 / bf16: the packed max). One pixel
    # with finite logits 6e38 apart (fp32, bf16): the 4-method kernels' second look at sx
    for W, dtype in itertools.product((97, 98), (torch.float32, torch.float16, torch.bfloat16)):
        x = random_logits(g, 2, 19, 31, W, dtype=dtype)
        y = random_labels(g, 2, 31, W)
        if dtype != torch.float16:
            x[0, 2, 1, 8], x[0, 9, 1, 8] = 3e38, -3e38
        stats = anomfast.fit_sml(x.float().cpu())
        for params in (dict(), dict(temperature=1.7, entropy_normalize=True, gen_gamma=0.3)):
            for methods in (["max_logit"], ["max_logit", "msp", "energy", "entropy"], METHODS4, ALL):
                sp = resolve(methods, sml=stats, **params)
                hg, cg, mg = _fused.fused_pass(x, y, sp, want_maps=True)
                hc, cc, mc = _fused.fused_pass(x.cpu(), y.cpu(), sp, want_maps=True)
                what = f"{dtype} W={W} {methods} {params}"
                assert torch.equal(cg.cpu(), cc), what
                assert torch.equal(mg.cpu().view(torch.int32), mc.view(torch.int32)), f"maps differ: {what}"
                assert same_state(hg, hc), f"histograms differ: {what}"
    print("BITS OK", flush=True)


def section_walk_and_crop(g):
    """Pixel groups against one pixel a turn (see the end). The grid-stride walk
    (fused_cuda.cu: Walk, all 64-bit, no division per pixel) with the grid capped at 1, 3
    and 7 blocks (_set_debug_grid: every thread walks many pixels, every carry w -> h -> b
    is taken) gives exactly the default grid's histograms; and a cropped view (strides
    that no reshape flattens) gives exactly the histogram of its contiguous copy and of
    the binning of its own maps."""
    cuda = _core._C_cuda
    sp = resolve(METHODS4, sml=anomfast.fit_sml(random_logits(g, 1, 19, 16, 16)))
    out = {}
    for shape in ((3, 19, 37, 61), (700, 19, 1, 1), (2, 19, 1, 3001)):
        x = random_logits(g, *shape)
        y = random_labels(g, shape[0], shape[2], shape[3])
        want, wc, _ = _fused.fused_pass(x, y, sp)
        for blocks in (1, 3, 7):
            cuda._set_debug_grid(blocks)
            try:
                h, c, _ = _fused.fused_pass(x, y, sp)
                sync()
            finally:
                cuda._set_debug_grid(0)
            assert same_state(h, want) and torch.equal(c, wc), f"{shape}: grid of {blocks} block(s) differs"
        out[str(shape)] = "equal for grids of 1, 3, 7 blocks"
    big = random_logits(g, 3, 19, 70, 130)
    yb = random_labels(g, 3, 70, 130)
    xc, yc = big[:, :, 5:-7, 9:-4], yb[:, 5:-7, 9:-4]  # rows do not follow each other: no folding
    assert _fused._geometry(xc, yc)["H"] > 1, "the crop should not fold"
    for blocks in (0, 2):
        cuda._set_debug_grid(blocks)
        try:
            h, c, maps = _fused.fused_pass(xc, yc, sp, want_maps=True)
            h2, c2, _ = _fused.fused_pass(xc.contiguous(), yc.contiguous(), sp)
            sync()
        finally:
            cuda._set_debug_grid(0)
        check_state(h, maps, yc, torch.isfinite(xc).all(dim=1), f"crop, grid {blocks}", names=sp.names)
        assert same_state(h, h2) and torch.equal(c, c2), "crop vs its contiguous copy"
    out["crop"] = "exact"
    # pixel groups (fused_cuda.cu: group_ok, max_group): 4 (max_logit alone; fp16 / bf16 with
    # 4 methods) or 2 neighbouring pixels a turn with one vector load per class, against one
    # pixel a turn and pairs at most (_set_pixel_group_cap):
    # W = 64 (groups of 4), 66 (pairs), bases 2 and 1 elements off an aligned group; every
    # dtype (fp16 / bf16 groups take the max and the non-finite screen on packed halves:
    # load_half_group), with NaN / +inf / -inf logits in single pixels of a group
    for dtype, W in itertools.product((torch.float32, torch.float16, torch.bfloat16), (64, 66)):
        xg = random_logits(g, 2, 19, 33, W, dtype=dtype)
        xg[0, 3, 1, 5] = float("nan")
        xg[1, 18, 2, 2] = float("inf")
        xg[1, 0, 3, 7] = -float("inf")
        if dtype != torch.float16:  # finite logits 6e38 apart: d = -inf, the 4-method kernels' second look
            xg[0, 2, 4, 9], xg[0, 9, 4, 9] = 3e38, -3e38
        yg = random_labels(g, 2, 33, W)
        views = {"contiguous": xg}
        for shift in (2, 1):
            flat = torch.zeros(xg.numel() + shift, device=xg.device, dtype=dtype)
            flat[shift:] = xg.flatten()
            views[f"base +{shift}"] = flat[shift:].view(xg.shape)
        for name, v in views.items():
            for spg in (resolve(["max_logit"]), sp, resolve(["max_logit", "msp", "energy", "entropy"])):
                h, c, maps = _fused.fused_pass(v, yg, spg, want_maps=True)
                for cap in (1, 2):
                    cuda._set_pixel_group_cap(cap)
                    try:
                        h1, c1, m1 = _fused.fused_pass(v, yg, spg, want_maps=True)
                        sync()
                    finally:
                        cuda._set_pixel_group_cap(4)
                    what = f"pixel groups capped at {cap}, {dtype} W={W} {name} {spg.names}"
                    assert same_state(h, h1) and torch.equal(c, c1), what
                    # values (a max of tied -0 / +0 may keep either sign; they share a bin)
                    assert torch.equal(maps.isnan(), m1.isnan()), what
                    assert torch.equal(maps.nan_to_num(), m1.nan_to_num()), what
    out["pixel groups"] = "equal to one pixel a turn (fp32 / fp16 / bf16, W 64 / 66, bases +0 / +1 / +2)"
    return out


def section_compile_and_graph(g):
    """Evaluator.update on CUDA under torch.compile(fullgraph=True) and inside a CUDA
    graph capture (after one eager warm-up update, which caches the device-side tables):
    the same counts as eager updates."""
    x = random_logits(g, 2, 19, 64, 96)
    y = random_labels(g, 2, 64, 96)
    kw = dict(methods=["max_logit", "msp", "energy", "entropy"])
    ref = anomfast.Evaluator(**kw)
    for _ in range(3):
        ref.update(x, y)
    out = {}
    ev = anomfast.Evaluator(**kw)
    ev.update(x, y)  # warm-up: state and tables on the device
    step = torch.compile(lambda a, b: ev.update(a, b), fullgraph=True)
    step(x, y)
    step(x, y)
    sync()
    assert same_state(ev.hist, ref.hist) and torch.equal(ev.counters, ref.counters), "torch.compile(fullgraph)"
    out["torch.compile fullgraph"] = "equal to eager"
    ev2 = anomfast.Evaluator(**kw)
    ev2.update(x, y)  # warm-up outside the capture
    sync()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            ev2.update(x, y)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()  # capture does not run the work: warm-up + 2 replays = 3 updates
    graph.replay()
    sync()
    assert same_state(ev2.hist, ref.hist) and torch.equal(ev2.counters, ref.counters), "CUDA graph replay"
    out["CUDA graph capture + 2 replays"] = "equal to 3 eager updates"
    return out



_KEEP = []


def _blob_scene(g, B, H, W, device="cuda"):
    """(pred uint8, classes int8) (B, H, W): rectangles of anomaly (some touching, some
    crossing the border), void bands, a prediction that covers most of the anomalies,
    spills over and adds speckle (many small segments)."""
    cls = torch.zeros(B, H, W, dtype=torch.int8, device=device)
    pred = (torch.rand(B, H, W, generator=g, device=device) < 0.02).to(torch.uint8)
    r = torch.randint(0, 1 << 30, (B, 40, 4), generator=g, device=device).cpu()
    for b in range(B):
        for k in range(40):
            y0, x0 = int(r[b, k, 0]) % H, int(r[b, k, 1]) % W
            h, w = 1 + int(r[b, k, 2]) % max(1, H // 6), 1 + int(r[b, k, 3]) % max(1, W // 6)
            if k % 8 == 7:
                cls[b, y0:y0 + max(1, h // 4), :] = comp.VOID
            else:
                cls[b, y0:y0 + h, x0:x0 + w] = comp.ANOMALY
                pred[b, max(0, y0 - 2):y0 + h - 1, x0 + 1:x0 + w + 3] = 1
    return pred.contiguous(), cls.contiguous()


def section_components(g, device="cuda"):
    """Component labeling and counting on the device (components_cuda.cu) against the CPU
    core, image by image (rows compared as sets: the device writes them in thread order),
    both modes, on scenes and random masks of every density; evaluate(components=True) on
    CUDA equals the CPU; then the time per 1024 x 2048 image: the device path (labeling +
    counting + the row copies, as ComponentAccumulator runs it) vs the CPU core."""
    def rows(a):
        return sorted(map(tuple, np.asarray(a).tolist()))

    n_rows = 0
    cases = [("scenes", *_blob_scene(g, 3, 256, 384, device))]
    for d in (0.1, 0.45, 0.6, 0.9):
        m = torch.rand(2, 2, 128, 200, generator=g, device=device) < d
        cases.append((f"density {d}", m[0].to(torch.uint8).contiguous(),
                      (m[1].to(torch.int8) * comp.ANOMALY).contiguous()))
    for what, pred, cls in cases:
        for mode, seg, inst in (("benchmark", 0, 0), ("benchmark", 50, 10), ("clean", 500, 100)):
            got = comp.device_counts(pred, cls, seg, inst, mode)
            pc, cc = pred.cpu().numpy(), cls.cpu().numpy()
            for b in range(pc.shape[0]):
                gt, pr = comp.image_counts(pc[b], cc[b], seg, inst, mode)
                assert rows(got[b][0]) == rows(gt), (what, mode, seg, inst, b, "ground-truth rows differ")
                assert rows(got[b][1]) == rows(pr), (what, mode, seg, inst, b, "segment rows differ")
                n_rows += len(gt) + len(pr)
    assert n_rows > 1000, n_rows
    x, y = random_logits(g, 2, 19, 96, 160), random_labels(g, 2, 96, 160, p_anomaly=0.0)
    y[:, 20:50, 30:90] = 1
    y[1, 60:70, 100:150] = 1
    kw = dict(methods=["max_logit", "msp", "energy"], components={"thresh_segsize": 20, "thresh_instsize": 10})
    rg, rc = anomfast.evaluate(x, y, **kw), anomfast.evaluate(x.cpu(), y.cpu(), **kw)
    for m in kw["methods"]:
        a, b = rg.components[m].as_dict(), rc.components[m].as_dict()
        assert a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), (m, a, b)
    # timing: one 1024 x 2048 image
    pred, cls = _blob_scene(g, 1, 1024, 2048)
    ws = comp._DeviceWorkspace()
    comp.device_counts(pred, cls, 500, 100, "benchmark", ws)
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        comp.device_counts(pred, cls, 500, 100, "benchmark", ws)
    dev_ms = (time.perf_counter() - t) / reps * 1e3
    pc, cc = pred[0].cpu().numpy(), cls[0].cpu().numpy()
    t = time.perf_counter()
    for _ in range(3):
        comp.image_counts(pc, cc, 500, 100, "benchmark")
    cpu_ms = (time.perf_counter() - t) / 3 * 1e3
    log(f"components, 1024 x 2048: device {dev_ms:.2f} ms per image (wall, rows copied back), "
        f"CPU core {cpu_ms:.1f} ms ({cpu_ms / dev_ms:.0f}x)")
    return {"rows_compared": n_rows, "device_ms_per_image": round(dev_ms, 3), "cpu_core_ms_per_image": round(cpu_ms, 2)}


def _prepared_args(x, y, spec, hist, maps=None, core=None):
    """FusedArgs filled once by _fused.fused_args (as fused_pass does, tie signatures of
    the exact methods included: the times are those of the kernel fused_pass runs) to time
    the kernel without the per-call Python work; core: another build of the CUDA module
    (fmad=true)."""
    lut, off = LabelMap.default().lut()
    lut = lut.to(x.device)
    cnt = _fused.new_counters(x.device)
    mean = inv = None
    if "sml" in spec.names:
        mean, inv = spec.sml.kernel_arrays(x.device)
    _KEEP.extend([lut, cnt, mean, inv])  # alive as long as the struct's pointers are used
    _, a = _fused.fused_args(x, y, hist, cnt, maps, spec.codes, spec.temperature, spec.gen_gamma,
                             spec.entropy_normalize, mean, inv, lut, off, core=core or _core._C_cuda)
    return a


def gpu_time_ms(fn, reps=20, warmup=3):
    """Median over `reps` of the time between CUDA events around fn()."""
    for _ in range(warmup):
        fn()
    sync()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    sync()
    return float(np.median([s.elapsed_time(e) for s, e in ev]))


def torch_bin_index(t):
    """binning.h's rule on float32 tensors with integer ops (the float32 baseline's binning)."""
    u = t.contiguous().view(torch.int32)
    mag_bits = u & 0x7FFFFFFF
    e = (mag_bits >> 23) - (127 - 32)
    mant = (mag_bits >> 10) & 0x1FFF
    mag = 1 + (e << 13) + mant
    nmag = NBINS // 2
    mag = torch.where(e < 0, torch.zeros_like(mag), mag)
    mag = torch.where(e >= 64, torch.full_like(mag, nmag - 1), mag)
    neg = (u < 0) & (mag_bits != 0)
    return torch.where(neg, nmag - 1 - mag, nmag + mag)


def torch_f32_histograms(x, y, methods, stats, temperature=1.0, gen_gamma=0.1):
    """Float32 PyTorch baseline: the same scores with torch ops, binned with the same
    rule, one bincount over (method, label, bin)."""
    xf = x.float()
    m, k = xf.max(dim=1)
    lse = torch.logsumexp(xf, dim=1)
    cols = []
    for meth in methods:
        if meth == "max_logit":
            t = -m
        elif meth == "msp":
            t = -torch.expm1(m - lse)  # 1 - max softmax
        elif meth == "energy":
            t = -(temperature * torch.logsumexp(xf / temperature, dim=1)) if temperature != 1.0 else -lse
        elif meth == "sml":
            mean = torch.as_tensor(stats.mean, dtype=torch.float32, device=x.device)
            std = torch.as_tensor(stats.std, dtype=torch.float32, device=x.device)
            t = -(m - mean[k]) / std[k]
        elif meth == "entropy":
            logp = xf - lse.unsqueeze(1)
            t = -(logp.exp() * logp).sum(dim=1)
        else:
            p = torch.softmax(xf, dim=1)
            t = (p.pow(gen_gamma) * (1 - p).pow(gen_gamma)).sum(dim=1)
        cols.append(torch_bin_index(t))
    valid = (y == 0) | (y == 1)
    lab = y.to(torch.int64)
    idx = torch.stack([(j * 2 + lab) * NBINS + c.to(torch.int64) for j, c in enumerate(cols)])
    return torch.bincount(idx[:, valid].flatten(), minlength=len(methods) * 2 * NBINS).view(len(methods), 2, NBINS)


def torch_f64_histograms(x, y, methods, stats):
    """Float64 reference baseline (anomfast.reference) on the GPU, binned per label."""
    out = []
    for meth in methods:
        t = reference.coordinate(x, meth, **ref_kwargs(meth, stats)).to(torch.float32)
        out.append(bincount_hist(reference.bin_index(t), y))
    return torch.stack(out)


def section_timing(g, quick=False):
    """(f) Timing: 8 x 19 x 1024 x 2048 logits; achieved GB/s of logits read vs a
    device-to-device copy; speed-up vs the float64 reference and a float32 PyTorch
    baseline, all measured in this run."""
    cuda = _core._C_cuda
    B, C, H, W = (2, 19, 1024, 2048) if quick else (8, 19, 1024, 2048)
    npix = B * H * W
    x32 = random_logits(g, B, C, H, W)
    y = random_labels(g, B, H, W)
    stats = anomfast.fit_sml(x32[:1])
    rows = RESULTS["timing"]

    def add(what, dtype, methods, ms, nbytes, extra=None):
        r = {"what": what, "dtype": str(dtype).replace("torch.", ""), "methods": methods, "ms": ms,
             "logits_GBps": nbytes / ms / 1e6, "Mpix_per_s": npix / ms / 1e3}
        r.update(extra or {})
        rows.append(r)
        log(f"{what:<48} {r['dtype']:>8} {methods:>5}: {ms:8.3f} ms  {r['logits_GBps']:7.0f} GB/s")
        return r

    # read-only baseline over the same tensor: a sum reads every byte once and writes
    # nothing of note (a copy also writes, so its rate is not a read rate); and the nominal
    # HBM figure of the part
    reads = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        src = x32 if dtype == torch.float32 else x32.to(dtype)
        nb = src.numel() * src.element_size()
        ms = gpu_time_ms(lambda t=src: torch.sum(t, dtype=torch.float32))
        reads[dtype] = nb / ms / 1e6
        add("read-only baseline: torch.sum over the logits", dtype, "-", ms, nb, {"read_GBps": reads[dtype]})
        del src
    # correctness of the timed configuration before timing it
    spec4 = resolve(METHODS4, sml=stats)
    spec6 = resolve(ALL, sml=stats)
    h6, _, maps6 = _fused.fused_pass(x32[:1], y[:1], spec6, want_maps=True)
    check_state(h6, maps6, y[:1], torch.isfinite(x32[:1]).all(dim=1), "timed configuration", names=spec6.names)
    t_probe = torch.cat([torch.randn(1 << 20, device=x32.device) * 1e3,
                         torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0**-32, 2.0**32, -(2.0**32), float("inf"),
                                       -float("inf"), 1e-12, -3e12], device=x32.device)])
    assert torch.equal(torch_bin_index(t_probe).to(torch.int64), reference.bin_index(t_probe)), "baseline binning rule"
    del h6, maps6

    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = x32 if dtype == torch.float32 else x32.to(dtype)
        nbytes = x.numel() * x.element_size()
        sets = [("max_logit", ["max_logit"]), ("4", METHODS4), ("6", ALL)]
        if dtype == torch.float16:
            sets = [("4", METHODS4)]
        for label, methods in sets:
            sp = resolve(methods, sml=stats)
            hist = _fused.new_histogram(len(methods), x.device)
            a = _prepared_args(x, y, sp, hist)
            for agg in ((1, 0, 2) if label != "max_logit" and dtype != torch.float16 else (1,)):
                cuda._set_hist_aggregation(agg)
                ms = gpu_time_ms(lambda: cuda.fused(a))
                r = add(f"anomfast fused kernel, aggregation {agg}", dtype, label, ms, nbytes, {"aggregation": agg})
                results[(str(dtype), label, agg)] = ms
            cuda._set_hist_aggregation(1)
            # one pixel a turn instead of the pixel groups: do the vector loads pay for the
            # doubled registers (fewer resident warps)? And pairs at most where the default takes groups of 4 (max_logit alone; fp16 /
            # bf16 with 4 methods: fewer instructions a pixel, a longer loop body)
            for cap, what in ((1, "one pixel a turn (no groups)"), (2, "pairs at most (groups of 4 off)")):
                cuda._set_pixel_group_cap(cap)
                try:
                    ms = gpu_time_ms(lambda: cuda.fused(a))
                finally:
                    cuda._set_pixel_group_cap(4)
                add(f"anomfast fused kernel, {what}", dtype, label, ms, nbytes)
            # scores only: no labels, no histograms, no maps (what the histogram adds costs)
            a0 = _prepared_args(x, y, sp, hist)
            a0.labels_ptr = 0
            ms = gpu_time_ms(lambda: cuda.fused(a0))
            add("anomfast fused kernel, scores only (no histogram)", dtype, label, ms, nbytes)
            cuda._set_hist_aggregation(1)
        if dtype == torch.float32:
            sp = spec4
            hist = _fused.new_histogram(4, x.device)
            ms = gpu_time_ms(lambda: _fused.fused_pass(x, y, sp, hist=hist))
            add("anomfast _fused.fused_pass (with Python work)", dtype, "4", ms, nbytes)
            maps = torch.empty((4, B, H, W), device=x.device)
            a = _prepared_args(x, y, sp, hist, maps=maps)
            ms = gpu_time_ms(lambda: cuda.fused(a))
            add("anomfast fused kernel + coordinate maps", dtype, "4", ms, nbytes)
            del maps
            xcl = x.contiguous(memory_format=torch.channels_last)
            a = _prepared_args(xcl, y, sp, hist)
            ms = gpu_time_ms(lambda: cuda.fused(a), reps=10)
            add("anomfast fused kernel, channels-last logits", dtype, "4", ms, nbytes)
            del xcl
            cnt = torch.zeros(C, dtype=torch.int64, device=x.device)
            tot = torch.zeros(C, dtype=torch.float64, device=x.device)
            sq = torch.zeros(C, dtype=torch.float64, device=x.device)
            ctr = _fused.new_counters(x.device)
            ms = gpu_time_ms(lambda: _fused.fit_pass(x, y, None, cnt, tot, sq, ctr), reps=10)
            add("anomfast SML fit pass (with Python work)", dtype, "fit", ms, nbytes)
        # baselines on the same data
        for label, methods in ((("4", METHODS4), ("6", ALL)) if dtype != torch.float16 else (("4", METHODS4),)):
            f32 = gpu_time_ms(lambda: torch_f32_histograms(x, y, methods, stats), reps=5, warmup=1)
            add("PyTorch float32 baseline (scores + bincount)", dtype, label, f32, nbytes)
            results[(str(dtype), label, "f32")] = f32
            if dtype != torch.float16:
                f64 = gpu_time_ms(lambda: torch_f64_histograms(x, y, methods, stats), reps=2, warmup=1)
                add("float64 reference on GPU (anomfast.reference)", dtype, label, f64, nbytes)
                results[(str(dtype), label, "f64")] = f64
        if dtype != torch.float32:
            del x
        torch.cuda.empty_cache()
    # speed-ups of the default kernel (aggregation 1)
    for r in rows:
        if r["what"].startswith("anomfast fused kernel, aggregation 1"):
            key = (("torch." + r["dtype"]), r["methods"])
            f32 = results.get((key[0], key[1], "f32"))
            f64 = results.get((key[0], key[1], "f64"))
            r["speedup_vs_f32_torch"] = f32 / r["ms"] if f32 else None
            r["speedup_vs_f64_reference"] = f64 / r["ms"] if f64 else None
    for r in rows:
        ro = reads.get(getattr(torch, r["dtype"], None))
        if ro and r["methods"] != "-":
            r["pct_of_read"] = 100 * r["logits_GBps"] / ro
        if r["methods"] != "-" or "baseline" in r["what"]:
            r["pct_of_nominal"] = 100 * r["logits_GBps"] / NOMINAL_GBPS
    return {"read_only_GBps": {str(k): v for k, v in reads.items()}, "nominal_GBps": NOMINAL_GBPS, "pixels": npix}


def section_fmad_variant(g, args):
    """Builds the CUDA module once more with ANOMFAST_CUDA_FMAD=ON (nvcc contracts into
    FMA) for this GPU only, and compares its speed and bits with the default build
    (-fmad=false, bit-identical to the CPU baseline build)."""
    import importlib.util
    left = args.budget - (time.time() - T0)
    if left < 150:
        return {"skipped": f"time budget spent ({left:.0f} s left)"}
    if not (shutil.which("cmake") and shutil.which("nvcc")):
        return {"skipped": "cmake or nvcc not on PATH"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bdir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "anomfast_fmad_build")
    p = torch.cuda.get_device_properties(0)
    pyb = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True).stdout.strip()
    cfg = ["cmake", "-S", root, "-B", bdir, "-DANOMFAST_CUDA=ON", "-DANOMFAST_CUDA_FMAD=ON",
           f"-DCMAKE_CUDA_ARCHITECTURES={p.major}{p.minor}-real", f"-Dpybind11_DIR={pyb}",
           f"-DPython_EXECUTABLE={sys.executable}", f"-DSKBUILD_PROJECT_VERSION={anomfast.__version__}",
           "-DCMAKE_BUILD_TYPE=Release"] + (["-G", "Ninja"] if shutil.which("ninja") else [])
    t = time.time()
    for cmd in (cfg, ["cmake", "--build", bdir, "--target", "_C_cuda", "-j", str(os.cpu_count() or 4)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, min(240, left - 90)))
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed: {(r.stdout + r.stderr)[-1500:]}")
    build_s = time.time() - t
    so = [os.path.join(dp, f) for dp, _, fs in os.walk(bdir) for f in fs if f.startswith("_C_cuda") and f.endswith(".so")]
    spec = importlib.util.spec_from_file_location("_C_cuda", so[0])
    fm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fm)
    assert fm.build_info(probe=False)["cuda_fmad"] is True
    log(f"built the -fmad=true variant in {build_s:.0f} s")
    B, C, H, W = 4, 19, 1024, 2048
    x = random_logits(g, B, C, H, W)
    y = random_labels(g, B, H, W)
    stats = anomfast.fit_sml(x[:1])
    out = {"build_seconds": round(build_s, 1)}
    for label, methods in (("4", METHODS4), ("6", ALL)):
        sp = resolve(methods, sml=stats)
        M = len(methods)
        res = {}
        for name, core in (("fmad=false (default)", _core._C_cuda), ("fmad=true", fm)):
            hist = _fused.new_histogram(M, x.device)
            maps = torch.empty((M, B, H, W), device=x.device)
            a = _prepared_args(x, y, sp, hist, maps=maps, core=core)
            core.fused(a)
            sync()
            res[name] = maps.clone()
            a.maps_ptr = 0
            ms = gpu_time_ms(lambda: core.fused(a))
            nbytes = x.numel() * 4
            RESULTS["timing"].append({"what": f"anomfast fused kernel, {name}", "dtype": "float32", "methods": label,
                                      "ms": ms, "logits_GBps": nbytes / ms / 1e6, "Mpix_per_s": B * H * W / ms / 1e3})
            out[f"{label} {name} ms"] = ms
            log(f"{label} methods, {name}: {ms:.3f} ms")
            del maps
        a0, a1 = res["fmad=false (default)"], res["fmad=true"]
        out[f"{label} bitwise_equal_fraction"] = float((a0.view(torch.int32) == a1.view(torch.int32)).double().mean())
        out[f"{label} max_rel_diff"] = float(((a0.double() - a1.double()).abs() / (a0.double().abs() + 1e-30)).max())
    return out


def section_expandable_segments(args):
    """The kernels accept memory from PyTorch's expandable-segments allocator (virtual
    memory mappings): the tiny workload in a child process with that allocator."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--tiny", "--seed", str(args.seed)],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0 and "TINY OK" in r.stdout, (r.stdout + r.stderr)[-2000:]
    return {"returncode": r.returncode}


def section_sanitizers(args):
    """(e) compute-sanitizer on a tiny workload (this script with --tiny)."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        for p in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
            if os.path.exists(p):
                exe = p
    if exe is None:
        return {"skipped": "compute-sanitizer not found"}
    out = {}
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one allocation per tensor: overruns are caught
    for tool in ("memcheck", "racecheck", "synccheck"):
        left = args.budget - (time.time() - T0)
        if left < 200:  # keep the timing's share of the budget
            out[tool] = {"skipped": f"time budget spent ({left:.0f} s left)"}
            SKIPPED.append(f"compute-sanitizer {tool}: {left:.0f} s left")
            continue
        cmd = [exe, "--tool", tool, "--error-exitcode", "17", sys.executable, os.path.abspath(__file__), "--tiny",
               "--seed", str(args.seed)]
        t = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=child_timeout(args, 60), env=env)
            tail = (r.stdout + r.stderr)[-1500:]
            summary = [ln for ln in (r.stdout + r.stderr).splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
            out[tool] = {"returncode": r.returncode, "summary": summary, "seconds": round(time.time() - t, 1),
                         "tiny_ok": "TINY OK" in r.stdout, "tail": tail}
        except subprocess.TimeoutExpired:
            out[tool] = {"inconclusive": f"timed out after {time.time() - t:.0f} s (not a finding)",
                         "seconds": round(time.time() - t, 1)}
            SKIPPED.append(f"compute-sanitizer {tool}: inconclusive, timed out")
        log(f"{tool}: {out[tool].get('returncode')} {out[tool].get('summary')} ({out[tool].get('seconds')} s)")
    bad = [k for k, v in out.items() if "returncode" in v and (v["returncode"] != 0 or not v.get("tiny_ok"))]
    if bad:
        raise RuntimeError(f"compute-sanitizer reported problems with: {bad} (see the json)")
    return out


def tiny(seed):
    """Small workload touching every kernel path, for compute-sanitizer."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    cuda = _core._C_cuda
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for C in (19, 40):
            x = random_logits(g, 2, C, 9, 37, dtype=dtype)
            y = random_labels(g, 2, 9, 37)
            stats = anomfast.fit_sml(x.float(), y, missing="global")
            x[0, 0, 0, 0] = float("nan")  # counted, not binned
            sp = resolve(ALL, sml=stats, temperature=1.5)
            for agg in (0, 1, 2):
                cuda._set_hist_aggregation(agg)
                _fused.fused_pass(x, y, sp, want_maps=True)
            cuda._set_hist_aggregation(1)
            _fused.fused_pass(x.contiguous(memory_format=torch.channels_last), y, sp)
    x = random_logits(g, 1, 300, 5, 33)
    anomfast.fit_sml(x, missing="global")
    yl = random_labels(g, 1, 5, 33).to(torch.int64)
    big = LabelMap(anomaly_ids=(1,), void_ids=(255, 9000), normal_ids=(0,))
    _fused.fused_pass(x, yl, resolve(["max_logit", "msp"]), label_map=big)
    anomfast.fit_sml(x, yl, label_map=big, missing="global")
    anomfast.score_maps(random_logits(g, 300, 5, 1, 1), methods=["msp"])
    for mode in ("benchmark", "clean"):  # the labeling kernels (union-find atomics, pair hash set)
        comp.device_counts(*_blob_scene(g, 2, 37, 61), 5, 3, mode)
    torch.cuda.synchronize()
    print("TINY OK", flush=True)


# ----------------------------------------------------------------------------- report

def summary_tables():
    lines = ["", "## anomfast GPU check", ""]
    env = RESULTS.get("env", {})
    dev = env.get("device", {})
    bi = env.get("build_info", {})
    lines.append(f"{dev.get('name', '?')} ({dev.get('sms', '?')} SMs), torch {env.get('torch')} (CUDA "
                 f"{env.get('torch_cuda')}), anomfast CUDA {bi.get('cuda_version')} archs {bi.get('cuda_archs')} "
                 f"fmad={bi.get('cuda_fmad')}, seed {env.get('seed')}, {time.time() - T0:.0f} s")
    lines += ["", "| check | result | s |", "|:--|:--|--:|"]
    for name, s in RESULTS["sections"].items():
        res = "ok" if s["ok"] else "FAIL: " + s.get("error", "")[:150].replace("|", "/").replace("\n", " ")
        skipped = s.get("details", {}).get("skipped") if isinstance(s.get("details"), dict) else None
        if skipped:
            res = f"skipped ({skipped})"
        lines.append(f"| {name} | {res} | {s['seconds']} |")
    rows = RESULTS["timing"]
    if rows:
        lines += ["", f"% of read: of the read-only baseline (torch.sum over the same tensor) in this run; "
                  f"% of nominal: of {NOMINAL_GBPS:.0f} GB/s (H200 HBM3e)", "",
                  "| what | dtype | methods | ms | logits GB/s | % of read | % of nominal | Gpix/s | vs f32 torch | vs f64 ref |",
                  "|:--|:--|:-:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            pct = f"{r['pct_of_read']:.0f}%" if "pct_of_read" in r else ""
            pct += f" | {r['pct_of_nominal']:.0f}%" if "pct_of_nominal" in r else " | "
            s32 = f"{r['speedup_vs_f32_torch']:.1f}x" if r.get("speedup_vs_f32_torch") else ""
            s64 = f"{r['speedup_vs_f64_reference']:.0f}x" if r.get("speedup_vs_f64_reference") else ""
            lines.append(f"| {r['what']} | {r['dtype']} | {r['methods']} | {r['ms']:.3f} | {r['logits_GBps']:.0f} | "
                         f"{pct} | {r['Mpix_per_s'] / 1e3:.2f} | {s32} | {s64} |")
    return "\n".join(lines)


# (name, function, estimated seconds on an H200, needs --no-sanitizer unset). The plan is
# walked in order; a section whose estimate does not fit the time left is skipped and
# named at the end. The estimates are guesses until the first GPU run replaces them.
def plan(args):
    g = "g"
    steps = [
        ("(a) maps vs float64 reference", section_maps, (g,), 25),
        ("(b) histograms == binning of own maps; counters == CPU", section_hist, (g,), 60),
        ("bit identity with the baseline CPU build (child, ANOMFAST_CPU_ISA=baseline)", section_baseline_bits, (args,), 40),
        ("grid-stride walk (debug grid) and cropped input: exact histograms", section_walk_and_crop, (g,), 15),
        ("(c) metrics GPU vs CPU within certified bounds", section_metrics, (g,), 40),
        ("(d) fp16/bf16 error <= 2x PyTorch's", section_half, (g,), 10),
        ("SML fit GPU vs CPU", section_fit, (g,), 15),
        ("stream semantics, no host sync", section_streams, (g,), 5),
        ("component labeling and counts on the device vs the CPU core", section_components, (g,), 30),
        ("Evaluator.update under torch.compile(fullgraph) and CUDA graph capture", section_compile_and_graph, (g,), 60),
        ("expandable-segments allocator (child)", section_expandable_segments, (args,), 25),
    ]
    if not args.no_sanitizer:  # correctness before speed: the sanitizers run before the timing
        steps.append(("(e) compute-sanitizer memcheck/racecheck/synccheck (one child each)", section_sanitizers,
                      (args,), 100))
    steps += [
        ("(f) timing", section_timing, (g, args.quick), 90 if args.quick else 150),
        ("(g) -fmad=true variant: speed and bits", section_fmad_variant, (g, args), 150),
    ]
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for the whole check (default 570: one 10-minute remote call with margin)")
    ap.add_argument("--no-sanitizer", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller timing problem (2 images)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bits", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seed is None:
        args.seed = int(time.time() * 1000) % (2**31)
    if args.tiny:
        tiny(args.seed)
        return 0
    if args.bits:
        bits(args.seed)
        return 0
    steps = plan(args)
    if args.dry_run:
        log(f"anomfast GPU check plan (budget {args.budget:.0f} s, seed {args.seed}):")
        log("  smoke run in a child (stops the check on a device fault), ~20 s")
        total = 20
        for name, _, _, est in steps:
            total += est
            log(f"  {name}: ~{est} s (cumulative ~{total} s)")
        log(f"estimated total ~{total} s; sections that do not fit the budget are skipped and listed at the end")
        return 0
    log(f"anomfast GPU check, seed {args.seed} (rerun with --seed {args.seed}), budget {args.budget:.0f} s")
    run_section("environment", section_env, args)
    if not RESULTS["sections"]["environment"]["ok"]:
        log("no usable CUDA device or CUDA module: nothing to check")
        log(summary_tables())
        _save()
        return 2
    run_section("smoke run in a child process", section_smoke, args)
    if not RESULTS["sections"]["smoke run in a child process"]["ok"]:
        log("!!! the smoke run failed: stopping here (a device fault in this process would fail every section)")
        log(summary_tables())
        _save()
        return 1
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    for name, fn, fargs, est in steps:
        left = args.budget - (time.time() - T0)
        if RESULTS.get("device_fault"):
            SKIPPED.append(f"{name}: device fault earlier")
            continue
        if est > left:
            SKIPPED.append(f"{name}: needs ~{est} s, {left:.0f} s left")
            log(f"\n=== {name}: skipped (needs ~{est} s, {left:.0f} s left)")
            continue
        run_section(name, fn, *[g if a == "g" else a for a in fargs])
        _save()
    RESULTS["skipped"] = SKIPPED
    log(summary_tables())
    if SKIPPED:
        log("\nskipped: " + "; ".join(SKIPPED))
    _save()
    return 0 if all(s["ok"] for s in RESULTS["sections"].values()) and not RESULTS.get("device_fault") else 1


def section_smoke(args):
    """The tiny workload (every kernel path) in a child process first: a device fault there
    cannot poison this process's CUDA context, and stops the check with its message."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--tiny", "--seed", str(args.seed)],
                       capture_output=True, text=True, timeout=child_timeout(args, 120))
    assert r.returncode == 0 and "TINY OK" in r.stdout, (r.stdout + r.stderr)[-3000:]
    return {"returncode": r.returncode}


def _save():
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)

    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return o

    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(clean(RESULTS), f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
