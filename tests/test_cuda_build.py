"""The CUDA module as built: what CPU-only CI can check (it imports without a driver,
exposes the CPU module's names, reports its build, hides the static CUDA runtime, fails
cleanly on bad pointers); the CUDA kernels' logic run on the CPU under a host emulation
(fused_cuda.cu compiled by g++ with csrc/cuda/emulate/cuda_emulation.h, one thread per
CUDA thread) and compared with the CPU core; and a CUDA-vs-CPU comparison that runs
only where a GPU is visible. The full GPU check is bench/gpu_check.py; tests/test_scores.py
and friends also run on "cuda" wherever a GPU is available.

ANOMFAST_EXPECT_CUDA=1 turns "no CUDA module in this build" from a skip into a failure
(set it in CI jobs that install nvcc). ANOMFAST_SKIP_EMULATION=1 skips the emulation
test (it compiles for about 20 s and runs for about 30 s).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import anomfast
from anomfast import _core

cuda_mod = _core._C_cuda
needs_cuda_build = pytest.mark.skipif(cuda_mod is None, reason="built without the CUDA module")
has_gpu = cuda_mod is not None and torch.cuda.is_available()


def test_cuda_module_present_when_expected():
    if os.environ.get("ANOMFAST_EXPECT_CUDA") == "1":
        assert cuda_mod is not None, f"expected a CUDA build: {_core._CUDA_IMPORT_ERROR}"
    info = anomfast.build_info()
    assert info["cuda"] is (cuda_mod is not None)
    if cuda_mod is None:
        assert info["cuda_note"]


@needs_cuda_build
def test_build_info_reports_the_build():
    info = anomfast.build_info()
    assert info["cuda"] is True
    assert isinstance(info["cuda_version"], int) and info["cuda_version"] >= 11000
    assert isinstance(info["cuda_archs"], str) and info["cuda_archs"] not in ("", "unknown")
    assert isinstance(info["cuda_fmad"], bool)
    # probed: never raises, with or without a driver
    assert isinstance(info["cuda_runtime_ok"], bool)
    assert info["cuda_device_count"] >= 0
    if not info["cuda_runtime_ok"]:
        assert info["cuda_device_count"] == 0 and info["cuda_error"]
    quiet = cuda_mod.build_info(probe=False)
    assert "cuda_runtime_ok" not in quiet and quiet["cuda_archs"] == info["cuda_archs"]


@needs_cuda_build
def test_same_names_and_constants_as_cpu_module():
    cpu = _core._C
    for name in ("FusedArgs", "FitArgs", "fused", "fit_sml", "build_info"):
        assert hasattr(cuda_mod, name), name
    for name in ("NBINS", "BIN_MANT_BITS", "BIN_OCTAVES", "OCC_SHIFT", "N_COUNTERS", "MAX_METHODS", "VERSION"):
        assert getattr(cuda_mod, name) == getattr(cpu, name), name
    for cls in ("FusedArgs", "FitArgs"):
        fields_cpu = {k for k in dir(getattr(cpu, cls)()) if not k.startswith("_")}
        fields_cuda = {k for k in dir(getattr(cuda_mod, cls)()) if not k.startswith("_")}
        assert fields_cpu == fields_cuda, cls
    a = cuda_mod.FusedArgs()
    a.methods = [0, 1, 2, 5]
    assert a.methods == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        a.methods = list(range(cpu.MAX_METHODS + 1))


@needs_cuda_build
def test_empty_input_makes_no_cuda_call():
    """B * H * W == 0 returns before touching the runtime, so it works without a GPU: the
    same arguments with one pixel reach the pointer checks (which need the runtime) and
    raise, so the empty call really returned before them."""
    a = cuda_mod.FusedArgs()
    a.B, a.C, a.H, a.W = 0, 19, 4, 4
    a.methods = [0]
    a.counters_ptr = 8  # never dereferenced: the checks of both cores want it non-null (checks.h)
    assert cuda_mod.fused(a) is None
    f = cuda_mod.FitArgs()
    f.B, f.C, f.H, f.W = 2, 19, 0, 4
    f.counters_ptr = f.count_ptr = f.sum_ptr = f.sumsq_ptr = 8
    assert cuda_mod.fit_sml(f) is None
    a.B = 1
    with pytest.raises(ValueError):
        cuda_mod.fused(a)  # a null logits pointer for one pixel
    f.H = 4
    with pytest.raises(ValueError):
        cuda_mod.fit_sml(f)


@needs_cuda_build
def test_host_pointer_raises_instead_of_crashing():
    x = torch.randn(1, 3, 2, 2)
    a = cuda_mod.FusedArgs()
    a.logits_ptr = x.data_ptr()
    a.B, a.C, a.H, a.W = 1, 3, 2, 2
    a.ls_b, a.ls_c, a.ls_h, a.ls_w = x.stride()
    counters = torch.zeros(4, dtype=torch.int64)
    a.counters_ptr = counters.data_ptr()
    a.methods = [0]
    with pytest.raises(RuntimeError, match="anomfast CUDA"):
        cuda_mod.fused(a)


@needs_cuda_build
def test_aggregation_mode_is_validated():
    before = cuda_mod.build_info(probe=False)["cuda_hist_aggregation"]
    with pytest.raises(ValueError):
        cuda_mod._set_hist_aggregation(3)
    assert cuda_mod.build_info(probe=False)["cuda_hist_aggregation"] == before


@needs_cuda_build
def test_import_without_visible_gpu():
    """Importing makes no CUDA call; build_info reports no device instead of raising."""
    code = ("import anomfast, anomfast._core as c; assert c._C_cuda is not None; "
            "i = anomfast.build_info(); assert i['cuda_device_count'] == 0, i; print('ok')")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_cuda_build
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs nm on Linux")
def test_static_cuda_runtime_is_not_exported():
    """torch loads its own libcudart globally; ours must not be interposable."""
    r = subprocess.run(["nm", "-D", "--defined-only", cuda_mod.__file__], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exported = [line.split()[-1] for line in r.stdout.splitlines() if line.strip()]
    leaked = [s for s in exported if s.startswith(("cuda", "__cuda", "cu"))]
    assert not leaked, leaked[:10]
    assert "PyInit__C_cuda" in exported


# ------------------------------------------------------------------ host emulation

ROOT = Path(__file__).resolve().parents[1]


def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def emulated_module(tmp_path_factory):
    """fused_cuda.cu + components_cuda.cu + module_cuda.cpp compiled for the host with
    ANOMFAST_CUDA_EMULATE."""
    if os.environ.get("ANOMFAST_SKIP_EMULATION") == "1":
        pytest.skip("ANOMFAST_SKIP_EMULATION=1")
    src = ROOT / "csrc" / "cuda" / "fused_cuda.cu"
    if not src.exists():
        pytest.skip("no CUDA sources next to the tests (installed package)")
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    pybind11 = pytest.importorskip("pybind11")
    out = tmp_path_factory.mktemp("emulated")
    probe = out / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(out / "probe"), "-lpthread"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    so = out / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas",
           "-DANOMFAST_CUDA_EMULATE", "-DANOMFAST_VERSION=" + str(_core._C.VERSION),
           '-DANOMFAST_CUDA_ARCHS="host-emulation"', "-I" + pybind11.get_include(),
           "-I" + sysconfig.get_paths()["include"], "-x", "c++", str(src),
           str(ROOT / "csrc" / "cuda" / "components_cuda.cu"),
           str(ROOT / "csrc" / "bindings" / "module_cuda.cpp"), "-o", str(so), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return so


@pytest.mark.slow
def test_cuda_kernels_under_host_emulation(emulated_module):
    """The CUDA kernels (warp votes, grid-stride loop, shared-memory LUT and partials,
    every dtype / label type / layout / aggregation mode) against the CPU core; their
    counts, tie signatures and occupancy against the NumPy binning of their own maps."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_cuda_build as t; t.emulation_checks({str(emulated_module)!r})")
    # the baseline CPU build: the emulated kernels (g++, no FMA contraction without -mfma)
    # must then give the CPU core's coordinates bit for bit, as -fmad=false nvcc does
    env = dict(os.environ, ANOMFAST_CPU_ISA="baseline")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert r.returncode == 0 and "EMULATION OK" in r.stdout, (r.stdout + r.stderr)[-4000:]


@pytest.mark.slow
def test_components_kernels_under_host_emulation(emulated_module):
    """The CUDA labeling and counting kernels (components_cuda.cu: union-find with
    atomicMin raced by 256 host threads per block, warp-aggregated counts, the pair hash
    set) give the CPU core's rows, image by image, on scenes with touching, nested, border
    and void-crossing components, both modes and several size filters, on random masks of
    every density and on 1 x 1, 1 x W and H x 1 images."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_cuda_build as t; t.components_emulation_checks({str(emulated_module)!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0 and "COMPONENTS OK" in r.stdout, (r.stdout + r.stderr)[-4000:]


def components_emulation_checks(so_path):
    """Runs in a child process (a kernel bug may hang a warp barrier there)."""
    import importlib.util

    import numpy as np

    from anomfast import components as comp
    from test_components import scene

    spec = importlib.util.spec_from_file_location("_C_cuda", so_path)
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    assert dict(emu.COMP_CLASSES) == dict(comp._C.COMP_CLASSES) and dict(emu.COMP_MODES) == comp.MODES
    rng = np.random.default_rng(20261202)

    def rows(a):
        return sorted(map(tuple, a.tolist()))

    shared = comp._DeviceWorkspace()  # reused across sizes and batch sizes (its row buffers grow)
    chunked = comp._DeviceWorkspace()
    chunked.ROW_BYTES = 2 * 40 * int(emu.components_workspace(48, 64)[2])  # 2 images per call at 48 x 64

    def compare(pred, cls, seg, inst, mode, what, ws=shared):
        got = comp.device_counts(torch.from_numpy(pred), torch.from_numpy(cls), seg, inst, mode, ws, core=emu)
        assert len(got) == pred.shape[0]
        n = 0
        for b in range(pred.shape[0]):
            g, p = comp.image_counts(pred[b], cls[b], seg, inst, mode)
            assert rows(got[b][0]) == rows(g), (what, b, got[b][0].tolist(), g.tolist())
            assert rows(got[b][1]) == rows(p), (what, b, got[b][1].tolist(), p.tolist())
            n += len(g) + len(p)
        return n

    def classes(y):
        return np.where(y == 1, comp.ANOMALY, np.where(y == 255, comp.VOID, comp.NORMAL)).astype(np.int8)

    n_rows = 0
    for mode, (seg, inst) in (("benchmark", (6, 4)), ("clean", (25, 12)), ("benchmark", (0, 0))):
        kinds = ["mixed"] * 5 + (["empty", "all_void", "all_anomaly"] if seg == 6 else [])
        sc, lb = zip(*(scene(rng, 48, 64, k) for k in kinds))
        s, y = np.stack(sc), np.stack(lb)
        pred = ((s > 0.5) if mode == "benchmark" else (s >= 0.5)).astype(np.uint8)
        n_rows += compare(pred, classes(y), seg, inst, mode, f"scenes {mode} {seg}/{inst}")
        compare(pred, classes(y), seg, inst, mode, f"scenes {mode} {seg}/{inst}, 2 images per call", chunked)
    assert chunked.images == 2 and shared.images == 8
    snake = np.zeros((1, 64, 64), bool)  # one path through the whole image: deep trees, long finds
    snake[0, ::2, :] = True
    snake[0, 1::4, -1] = snake[0, 3::4, 0] = True
    for mode, seg, inst in (("benchmark", 0, 0), ("clean", 3, 3)) * 3:
        n_rows += compare(snake.astype(np.uint8), snake.astype(np.int8) * comp.ANOMALY, seg, inst, mode, "snake")
        n_rows += compare((~snake).astype(np.uint8), snake.astype(np.int8) * comp.ANOMALY, seg, inst, mode,
                          "snake complement")
    for density in (0.05, 0.45, 0.6, 0.9):  # random masks: long chains, many merges
        fg = rng.random((1, 37, 53)) < density
        pred = (rng.random((1, 37, 53)) < density).astype(np.uint8)
        n_rows += compare(pred, fg.astype(np.int8) * comp.ANOMALY, 0, 0, "benchmark", f"density {density}")
    for H, W in ((1, 1), (1, 37), (29, 1)):
        fg = rng.random((2, H, W)) < 0.5
        y = np.where(fg, 1, np.where(rng.random((2, H, W)) < 0.2, 255, 0))
        n_rows += compare(fg.astype(np.uint8), classes(y), 0, 2, "clean", f"{H} x {W}")
        n_rows += compare(fg.astype(np.uint8), classes(y), 0, 2, "benchmark", f"{H} x {W}")
    assert n_rows > 300, n_rows  # many components: not a vacuous comparison
    # thresholds beyond the image (clamped in the core) and B = 0
    pred = (rng.random((1, 20, 30)) < 0.5).astype(np.uint8)
    cls = (rng.random((1, 20, 30)) < 0.5).astype(np.int8)
    compare(pred, cls, 10**12, 10**12, "benchmark", "huge thresholds")
    compare(pred, cls, -5, -5, "clean", "negative thresholds")
    assert comp.device_counts(torch.zeros(0, 4, 5, dtype=torch.uint8), torch.zeros(0, 4, 5, dtype=torch.int8), 0, 0,
                              core=emu) == []
    # the core's own checks: nothing launched on a workspace too small or an unknown mode
    n32, n64, cap = emu.components_workspace(20, 30)
    work, table = torch.empty(n32, dtype=torch.int32), torch.empty(n64, dtype=torch.int64)
    gt, pr, counts = (torch.full((1, cap, k), -7, dtype=torch.int64) for k in (2, 3, 1))
    args = [pred.ctypes.data, cls.ctypes.data, 1, 20, 30, 0, 0, 0, work.data_ptr(), n32, table.data_ptr(), n64,
            gt.data_ptr(), pr.data_ptr(), cap, counts.data_ptr(), 0]
    for k, v, msg in ((9, n32 - 1, "workspace too small"), (11, n64 - 1, "workspace too small"),
                      (14, cap - 1, "workspace too small"), (7, 2, "unknown mode"), (3, 0, "1 <= H \\* W"),
                      (0, 0, "prediction maps pointer is null"), (1, 0, "label classes pointer is null")):
        bad = list(args)
        bad[k] = v
        with pytest.raises(ValueError, match=msg):
            emu.components(*bad)
    assert bool((gt == -7).all()) and bool((counts == -7).all())
    for H, W in ((0, 5), (1 << 31, 1), (1 << 16, 1 << 15), (1 << 62, 1 << 62)):  # no overflow, no endless loop
        with pytest.raises(ValueError, match="1 <= H \\* W < 2\\^31"):
            emu.components_workspace(H, W)
    print("COMPONENTS OK", n_rows)


def emulation_checks(so_path):
    """Runs in a child process (a kernel bug may hang a warp barrier there)."""
    import importlib.util

    import numpy as np

    from anomfast import _fused
    from anomfast.histogram import HistState
    from anomfast.labels import LabelMap
    from anomfast.methods import resolve
    from test_scores import assert_state_equals_binning, exact_mask, masked_pass, same_state

    spec = importlib.util.spec_from_file_location("_C_cuda", so_path)
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    assert emu.build_info(probe=False)["cuda_archs"] == "host-emulation"
    cpu = _core._C
    assert cpu.build_info()["cpu_isa"] == "baseline", "the bit-identity checks below need the baseline CPU build"

    class Routed:  # the CPU path of _fused, with the emulated CUDA kernels
        FusedArgs, FitArgs, fused, fit_sml = emu.FusedArgs, emu.FitArgs, emu.fused, emu.fit_sml

    def run(core, fn, *a, **kw):
        saved, _core._C = _core._C, core
        try:
            return fn(*a, **kw)
        finally:
            _core._C = saved

    g = torch.Generator().manual_seed(1234)

    def logits(B, C, H, W, dtype=torch.float32):
        x = torch.randn(B, C, H, W, generator=g) * 4
        k = torch.randint(0, C, (B, 1, H, W), generator=g)
        x.scatter_add_(1, k, torch.rand(B, 1, H, W, generator=g) * 12)
        return x.to(dtype)

    def labels(B, H, W):
        u = torch.rand(B, H, W, generator=g)
        y = torch.zeros(B, H, W, dtype=torch.uint8)
        y[u < 0.1] = 1
        y[u > 0.85] = 255
        return y

    def compare(x, y, sp, lm=None, name=""):
        h, c, maps = run(Routed, _fused.fused_pass, x, y, sp, label_map=lm, want_maps=True)
        hc, cc, mc = _fused.fused_pass(x, y, sp, label_map=lm, want_maps=True)
        assert torch.equal(c, cc), (name, c.tolist(), cc.tolist())
        # the same kernel one pixel a turn and in pairs at most (where it took a larger
        # pixel group): the same state
        for cap in (1, 2):
            emu._set_pixel_group_cap(cap)
            try:
                h1, c1, m1 = run(Routed, _fused.fused_pass, x, y, sp, label_map=lm, want_maps=True)
            finally:
                emu._set_pixel_group_cap(4)
            what = (name, f"groups capped at {cap}")
            assert same_state(h1, h) and torch.equal(c1, c) and torch.equal(m1.isnan(), maps.isnan()), what
            assert torch.equal(torch.nan_to_num(m1), torch.nan_to_num(maps)), what
        assert torch.equal(maps.isnan(), mc.isnan()), (name, "NaN maps (non-finite pixels) differ from the CPU's")
        cls = (lm or LabelMap.default()).classify(y)
        fin = torch.isfinite(x.float()).all(dim=1)
        assert_state_equals_binning(h, maps, cls, ok=fin, what=name, sig_mask=exact_mask(sp.names))
        for j, m in enumerate(sp.names):
            assert torch.allclose(maps[j][fin], mc[j][fin], rtol=1e-5, atol=1e-5), (name, m)
            if cpu.build_info()["cpu_isa"] == "baseline":
                assert torch.equal(maps[j][fin], mc[j][fin]), (name, m, "not bit-identical to the CPU")
        return h, c, maps

    base = resolve(["max_logit", "msp", "energy", "entropy", "gen"], temperature=1.7, entropy_normalize=True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # C = 19, W = 46: neighbouring pixels in pairs (one vector load per class); W = 45 and
        # the unspecialized C = 40 / 7 / 1: one a turn (max_logit alone, below, also takes
        # groups of 4)
        for C, W in ((19, 46), (19, 45), (40, 46), (1, 45), (7, 46)):
            x = logits(2, C, 7, W, dtype)
            y = labels(2, 7, W)
            stats = run(Routed, anomfast.fit_sml, x, y, missing="global") if C > 1 else None
            stats_cpu = anomfast.fit_sml(x, y, missing="global") if C > 1 else None
            if C > 1:
                assert np.array_equal(stats.count, stats_cpu.count)
                assert np.allclose(stats.sum, stats_cpu.sum, rtol=1e-12) and np.allclose(stats.sumsq, stats_cpu.sumsq,
                                                                                          rtol=1e-12)
            sp = resolve(["max_logit", "msp", "energy", "sml", "entropy", "gen"], sml=stats_cpu) if C > 1 else base
            x[0, 0, 0, :2] = float("nan")
            x[1, -1, 1, 3] = float("inf")
            # one pixel of a pair (fp16 / bf16 pairs screen both with one packed max / min)
            x[1, min(3, C - 1), 2, 6] = float("-inf")
            x[0, min(5, C - 1), 3, 7] = float("nan")
            h, c, _ = compare(x, y, sp, name=f"{dtype} C={C}")
            for mode in (0, 2):
                emu._set_hist_aggregation(mode)
                h2, c2, _ = run(Routed, _fused.fused_pass, x, y, sp)
                emu._set_hist_aggregation(1)
                assert same_state(h2, h) and torch.equal(c2, c), f"aggregation mode {mode}"
            # other layouts of the same logits: channels-last, a W-stride of 2, and a view
            # whose first element is one element past an aligned pair (pairs would misalign:
            # the emulation aborts on a misaligned vector load)
            shifted = torch.zeros(2 * C * 7 * W + 1, dtype=dtype)
            shifted[1:] = x.flatten()
            for name, v in (("channels_last", x.contiguous(memory_format=torch.channels_last)), ("strided", None),
                            ("odd base", shifted[1:].view(2, C, 7, W))):
                if v is None:
                    wide = torch.zeros(2, C, 7, 2 * W, dtype=dtype)
                    wide[..., ::2] = x
                    v = wide[..., ::2]
                h3, c3, _ = run(Routed, _fused.fused_pass, v, y, sp)
                assert same_state(h3, h) and torch.equal(c3, c), name
    # coordinates over many octaves: msp's 1 - p from ~1 down to 1e-38 and exact zeros
    # (logit gaps up to 120), max_logit's -m subnormal or zero (subnormal logits); many
    # equal ones (a warp's lanes in one bin with equal or different values: the signature
    # OR over peers); each aggregation mode
    wide = torch.zeros(2, 3, 8, 64)
    gap = torch.linspace(0.0, 120.0, 8 * 64).view(8, 64)
    top = torch.stack([torch.full((8, 64), 3.0),
                       (torch.randint(-3, 8, (8, 64), generator=g) * 2.0**-140).float()])
    top[1, 0, :5] = 0.0
    wide[:, 0] = top
    wide[:, 1] = top - gap
    wide[:, 2] = top - gap - torch.rand(2, 8, 64, generator=g)
    wide[1, :, 2, :8] = wide[1, :, 2, :1]  # runs of equal pixels
    wide[0, :, 6, 32:] = torch.tensor([3.0, 3.0 - 2.0**-10, -1.0]).view(3, 1)  # one value on half a warp
    yw = labels(2, 8, 64)
    spw = resolve(["max_logit", "msp", "energy", "entropy"])
    fin = torch.isfinite(wide).all(dim=1)
    for mode in (1, 0, 2):
        emu._set_hist_aggregation(mode)
        _, _, mw = compare(wide, yw, spw, name=f"wide range, aggregation mode {mode}")
        # other methods' signatures when their bit is set (sig_mask), 0 when it is not
        for mask in (0b1111, 0b0110, 0):
            hm, _, mm = run(Routed, masked_pass, wide, yw, spw, mask)
            assert_state_equals_binning(hm, mm, yw, ok=fin, what=f"wide range, mode {mode}, sig_mask {mask:#b}",
                                        sig_mask=mask)
        emu._set_hist_aggregation(1)
    t = mw.flatten()
    assert (t == 0).any() and ((t != 0) & (t.abs() < 2.0**-126)).any(), "the maps must hold zeros and subnormals"
    x = logits(3, 19, 5, 33)
    y = labels(3, 5, 33)
    sp = resolve(["max_logit", "msp"])
    compare(x, y, resolve(["max_logit"]), name="max_logit alone: its kernel keeps no argmax")
    # several classes tied at the maximum (S' leaves out only the first; GEN and SML read k):
    # the kernels find the first maximum in the S' pass, from l_c - m == 0
    xt, yt = logits(2, 19, 4, 46), labels(2, 4, 46)
    top = xt.amax(1, keepdim=True) + 1.0
    xt[:, 3:4], xt[:, 11:12] = top, top
    xt[0, 0:1, :2] = top[0, :, :2]
    xt[1, 7:8, 1] = top[1, :, 1] - 2.0**-20
    for names in (["max_logit", "msp", "energy", "entropy"], ["max_logit", "msp", "gen"]):
        compare(xt, yt, resolve(names), name=f"tied maxima {names}")
    # the specialized 4-method kernels screen for non-finite logits with the entropy sum
    # (fused_cuda.cu: SX_SCREEN): NaN, +inf and -inf in single pixels (of a pair, and one a
    # turn), a pixel of -inf only, and finite logits further apart than the float range
    # (d = -inf: the pixel is finite and summed again with the clamped terms)
    sp4 = resolve(["max_logit", "msp", "energy", "entropy"])
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for W in (44, 46, 45):  # fp16 / bf16: groups of 4 (44), pairs (46), one a turn (45)
            x4, y4 = logits(2, 19, 3, W, dt), labels(2, 3, W)
            x4[0, 4, 0, 1] = float("nan")
            x4[0, 7, 1, 2] = float("inf")
            x4[1, 0, 2, 3] = -float("inf")
            x4[1, :, 0, 5] = -float("inf")
            if dt != torch.float16:
                x4[1, 2, 1, 8], x4[1, 9, 1, 8] = 3e38, -3e38
                assert torch.isinf(x4[1, 9, 1, 8].float() - x4[1, 2, 1, 8].float())
            _, _, m4 = compare(x4, y4, sp4, name=f"4 methods, non-finite screen {dt} W={W}")
            assert torch.isfinite(m4[:, 1, 1, 8]).all() and m4[:, 0, 0, 1].isnan().all(), "finite / NaN pixels"
    # fp16 / bf16 pairs in the generic kernel where the argmax comes from the max pass (no S'
    # pass: sml without msp, energy at T != 1): the packed max / screen with the k pass
    for dt in (torch.float16, torch.bfloat16):
        xk, yk = logits(2, 19, 3, 46, dt), labels(2, 3, 46)
        stk = anomfast.fit_sml(xk, yk, missing="global")
        xk[0, 4, 1, 3] = -float("inf")
        xk[1, 6, 0, 8] = float("nan")
        xk[1, 0, 2, 9] = float("inf")
        for names, kw in ((["max_logit", "sml"], {}), (["sml"], {}), (["energy"], dict(temperature=1.7))):
            compare(xk, yk, resolve(names, sml=stk, **kw), name=f"generic pairs with the k pass {dt} {names}")
    st = anomfast.fit_sml(xt, yt, missing="global")
    compare(xt, yt, resolve(["max_logit", "msp", "energy", "sml"], sml=st), name="tied maxima, sml")
    # the other 4-method set (sml for entropy: the packed min screens) in fp16 / bf16 groups
    # of 4, with tied maxima and non-finite logits in single pixels of a group
    for dt in (torch.float16, torch.bfloat16):
        xq, yq = logits(2, 19, 4, 44, dt), labels(2, 4, 44)
        stq = anomfast.fit_sml(xq, yq, missing="global")
        topq = xq.amax(1, keepdim=True)
        xq[:, 3:4, 1], xq[:, 11:12, 1] = topq[:, :, 1], topq[:, :, 1]
        xq[0, 5, 2, 6] = float("nan")
        xq[1, 0, 3, 9] = -float("inf")
        xq[1, 18, 0, 2] = float("inf")
        compare(xq, yq, resolve(["max_logit", "msp", "energy", "sml"], sml=stq), name=f"groups of 4, sml {dt}")
    # max_logit alone takes groups of 4 pixels where W and the offsets allow, else pairs, else
    # one: W = 44 (groups of 4), 46 (pairs), a base 2 elements past a 16-byte boundary (pairs),
    # 1 element past (one a turn); each dtype, C = 19 (specialized) and 5 (run-time C: one
    # pixel a turn)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for C, W in ((19, 44), (19, 46), (5, 44), (5, 42)):
            xm, ym = logits(2, C, 3, W, dt), labels(2, 3, W)
            xm[1, 2, 1, 5] = float("nan")
            xm[0, 4, 2, 10] = float("-inf")  # the third and fourth pixel of a group of 4
            xm[0, 0, 0, 3] = float("inf")
            compare(xm, ym, resolve(["max_logit"]), name=f"max_logit groups {dt} C={C} W={W}")
            for shift in (2, 1):
                flat = torch.zeros(xm.numel() + shift, dtype=dt)
                flat[shift:] = xm.flatten()
                compare(flat[shift:].view(xm.shape), ym, resolve(["max_logit"]), name=f"max_logit base +{shift} {dt}")
    for dt in (torch.int64, torch.int32, torch.int16):
        compare(x, y.to(dt), sp, name=str(dt))
    compare(x, y == 1, sp, name="bool labels")
    # byte labels look their class up in a table of all 256 values staged from the label
    # table: one shorter than 256 (values past it invalid), one with ids up to 255
    compare(x, y, sp, lm=LabelMap(anomaly_ids=(1,), void_ids=(7,), normal_ids=(0,)), name="uint8, short table")
    compare(x, y, sp, lm=LabelMap(anomaly_ids=(255,), void_ids=(1,), normal_ids=(0, 254)), name="uint8, ids to 255")
    yl = y.to(torch.int64)
    yl[0, 0, :4] = 9000
    yl[2, 1, :3] = 7
    compare(x, yl, sp, lm=LabelMap(anomaly_ids=(1,), void_ids=(255, 9000), normal_ids=(0,)), name="global LUT")
    y8 = y.to(torch.int16).masked_fill(y == 255, -1).to(torch.int8)
    compare(x, y8, sp, lm=LabelMap(anomaly_ids=(1,), void_ids=(-1,), normal_ids=(0,)), name="int8 labels")
    big = logits(2, 300, 6, 20)
    s1 = run(Routed, anomfast.fit_sml, big, labels(2, 6, 20), missing="global")
    assert s1.count.sum() > 0
    yb = labels(2, 6, 20)
    s1 = run(Routed, anomfast.fit_sml, big, yb, missing="global")
    s2 = anomfast.fit_sml(big, yb, missing="global")
    assert np.array_equal(s1.count, s2.count) and np.allclose(s1.sum, s2.sum, rtol=1e-12), "fit, global partials"
    m1 = run(Routed, anomfast.score_maps, logits(400, 7, 1, 1), methods=["msp", "energy"])
    assert all(torch.isfinite(v).all() for v in m1.values())
    # the grid-stride walk with one block: every thread walks many pixels, every carry
    # w -> h -> b is taken; a crop that does not fold; a method named twice (generic kernel)
    # and C = 21 / 33 (specialized / memory path)
    for shape, crop in (((3, 19, 9, 70), None), ((2, 21, 13, 40), (2, -3, 5, -1)), ((2, 21, 13, 40), (3, -2, 4, -2)),
                        ((2, 7, 11, 30), (1, -1, 2, -4)), ((2, 33, 5, 37), None)):
        xw, yw2 = logits(*shape), labels(shape[0], shape[2], shape[3])
        if crop:  # the second crop keeps pairs (C = 21, even W and offsets); the others do not
            xw, yw2 = xw[:, :, crop[0]:crop[1], crop[2]:crop[3]], yw2[:, crop[0]:crop[1], crop[2]:crop[3]]
            assert _fused._geometry(xw, yw2)["H"] > 1
        sp4 = resolve(["max_logit", "msp", "energy", "entropy"])
        h0, c0, _ = compare(xw, yw2, sp4, name=f"{shape} crop={crop}")
        emu._set_debug_grid(1)
        try:
            h1, c1, _ = run(Routed, _fused.fused_pass, xw, yw2, sp4)
        finally:
            emu._set_debug_grid(0)
        assert same_state(h1, h0) and torch.equal(c1, c0), f"{shape}: one-block grid differs"
    # the entry points refuse what would crash the device: a clear exception instead
    xa, ya = logits(1, 19, 4, 32), labels(1, 4, 32)
    a = emu.FusedArgs()
    a.logits_ptr, a.logit_dtype = xa.data_ptr(), 0
    a.B, a.C, a.H, a.W = 1, 19, 4, 32
    a.ls_b, a.ls_c, a.ls_h, a.ls_w = xa.stride()
    a.methods = [0]
    a.labels_ptr, a.label_dtype = ya.data_ptr(), 10
    a.ys_b, a.ys_h, a.ys_w = ya.stride()
    table = torch.zeros(256, dtype=torch.int8)
    a.lut_ptr, a.lut_len = table.data_ptr(), 256
    st = HistState.new(1, "cpu")
    cnt = torch.zeros(4, dtype=torch.int64)
    a.hist_ptr, a.occ_ptr, a.counters_ptr = st.hist.data_ptr(), st.occ.data_ptr(), cnt.data_ptr()
    emu.fused(a)  # the base call is accepted
    assert int(cnt.sum()) == 4 * 32
    # the checks of both cores (checks.h), then the CUDA core's own (alignment, device)
    for field, value, msg in (("hist_ptr", 0, "no histogram buffers"), ("logit_dtype", 7, "logit dtype"),
                              ("label_dtype", 99, "label dtype"), ("B", -1, "B, H, W must be >= 0"),
                              ("logits_ptr", xa.data_ptr() + 1, "not aligned"), ("C", 0, "C >= 1"),
                              ("temperature", 0.0, "temperature"), ("counters_ptr", 0, "counters pointer"),
                              ("methods", [6], "heat needs"), ("ls_c", 2 ** 62, "strides overflow")):
        bad = emu.FusedArgs()
        for k in ("logits_ptr", "logit_dtype", "B", "C", "H", "W", "ls_b", "ls_c", "ls_h", "ls_w", "methods",
                  "labels_ptr", "label_dtype", "ys_b", "ys_h", "ys_w", "lut_ptr", "lut_len", "hist_ptr", "occ_ptr",
                  "counters_ptr"):
            setattr(bad, k, getattr(a, k))
        setattr(bad, field, value)
        try:
            emu.fused(bad)
        except ValueError as e:
            assert msg in str(e), (field, str(e))
        else:
            raise AssertionError(f"{field} = {value} was accepted")
    print("EMULATION OK")


def test_gpu_check_plans_without_a_gpu():
    """bench/gpu_check.py parses its arguments and prints its plan (sized to --budget)
    without a GPU; a real run without one exits with a clear message, not a traceback."""
    script = ROOT / "bench" / "gpu_check.py"
    if not script.exists():
        pytest.skip("no bench/ next to the tests")
    r = subprocess.run([sys.executable, str(script), "--dry-run", "--budget", "570"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "budget 570 s" in r.stdout and "smoke run in a child" in r.stdout and "compute-sanitizer" in r.stdout
    assert "torch.compile" in r.stdout and "baseline CPU build" in r.stdout
    if not has_gpu:
        r = subprocess.run([sys.executable, str(script), "--budget", "30"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "nothing to check" in r.stdout, (r.stdout + r.stderr)[-2000:]


# ------------------------------------------------------------------ needs a GPU

@pytest.mark.skipif(not has_gpu, reason="needs a CUDA GPU and the CUDA module")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_histograms_match_cpu(rng, dtype):
    from anomfast import _fused
    from anomfast.methods import resolve
    from conftest import random_labels, random_logits
    from test_scores import assert_state_equals_binning, exact_mask, masked_pass

    x = random_logits(rng, 3, 19, 37, 61, dtype=dtype)
    y = random_labels(rng, 3, 37, 61)
    x[0, 2, 0, 0] = float("nan")
    stats = anomfast.fit_sml(x[1:].float())
    spec = resolve(["max_logit", "msp", "energy", "sml", "entropy", "gen"], sml=stats)
    hc, cc, mc = _fused.fused_pass(x, y, spec, want_maps=True)
    sg, cg, mg = _fused.fused_pass(x.cuda(), y.cuda(), spec, want_maps=True)
    torch.cuda.synchronize()
    cg, mg = cg.cpu(), mg.cpu()
    assert torch.equal(cg, cc)
    fin = torch.isfinite(x.float()).all(dim=1)
    assert_state_equals_binning(sg, mg, y, ok=fin, what=f"CUDA {dtype}", sig_mask=exact_mask(spec.names))
    for mask in (0b111111, 0b101010):
        sm, _, mm = masked_pass(x.cuda(), y.cuda(), spec, mask)
        assert_state_equals_binning(sm, mm.cpu(), y, ok=fin, what=f"CUDA {dtype}, sig_mask {mask:#b}", sig_mask=mask)
    hg, hc = sg.hist.cpu(), hc.hist
    for j, m in enumerate(spec.names):
        torch.testing.assert_close(mg[j][fin], mc[j][fin], rtol=1e-5, atol=1e-5)
        if anomfast.build_info()["cpu_isa"] == "baseline" and not anomfast.build_info()["cuda_fmad"]:
            assert torch.equal(hg[j], hc[j]), f"{m}: the baseline CPU build and -fmad=false must agree exactly"
        moved = (hg[j] - hc[j]).abs().sum().item()
        assert moved <= 0.002 * hc[j].sum().item(), f"{m}: {moved} pixels in other bins than on the CPU"
    gpu_stats = anomfast.fit_sml(x[1:].float().cuda())
    assert (gpu_stats.count == stats.count).all()
    torch.testing.assert_close(torch.as_tensor(gpu_stats.sum), torch.as_tensor(stats.sum), rtol=1e-12, atol=1e-9)
