"""Fused scores and histograms against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import anomfast
from anomfast import _fused, binning, reference
from anomfast.methods import resolve

from conftest import DEVICES, DTYPES, LOGIT_METHODS, random_labels, random_logits

SHAPES = [(1, 19, 1, 1), (3, 1, 5, 7), (2, 19, 17, 70), (1, 150, 9, 13), (4, 5, 1, 1), (1, 19, 1, 131)]


def ref_kwargs(method, stats=None, **kw):
    if method == "sml":
        return dict(sml_mean=stats.mean, sml_std=stats.std)
    if method == "energy":
        return dict(temperature=kw.get("temperature", 1.0))
    if method == "gen":
        return dict(gen_gamma=kw.get("gen_gamma", 0.1))
    if method == "entropy":
        return dict(entropy_normalize=kw.get("entropy_normalize", False))
    return {}


def scale_of(method, x64, stats):
    """Magnitude that float32 rounding errors scale with (condition of the formula)."""
    if method == "sml":
        m, k = x64.max(dim=1)
        mean = torch.as_tensor(stats.mean)[k]
        std = torch.as_tensor(stats.std)[k]
        return (m.abs() + mean.abs()) / std
    if method in ("max_logit", "energy"):
        return x64.abs().amax(dim=1)
    return torch.ones(x64.shape[0], *x64.shape[2:], dtype=torch.float64)


def coords(x, methods, **params):
    spec = resolve(methods, **params)
    _, _, maps = _fused.fused_pass(_fused.as_logits(x), None, spec, want_maps=True)
    return maps


@pytest.mark.filterwarnings("ignore:SML. classes")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_scores_match_reference(rng, device, shape):
    x = random_logits(rng, *shape).to(device)
    stats = anomfast.fit_sml(random_logits(rng, 2, shape[1], 8, 8).to(device)) if shape[1] > 0 else None
    maps = anomfast.score_maps(x, methods=LOGIT_METHODS, sml=stats)
    x64 = x.double().cpu()
    for m in LOGIT_METHODS:
        ref = reference.score(x64, m, **ref_kwargs(m, stats))
        got = maps[m].double().cpu()
        assert got.shape == ref.shape and maps[m].dtype == torch.float32
        tol = 1e-5 * (ref.abs() + scale_of(m, x64, stats)) + 1e-30
        err = (got - ref).abs()
        assert bool((err <= tol).all()), f"{m}: max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_coordinates_match_reference(rng, device):
    """msp's coordinate (1 - max softmax) keeps relative precision near 1."""
    x = random_logits(rng, 2, 19, 16, 24, scale=8.0).to(device)
    x[0, :, 0, 0] = torch.tensor([40.0] + [0.0] * 18)  # max softmax = 1 - 18 e^-40
    c = coords(x, ["msp"]).double().cpu()[0]
    ref = reference.coordinate(x.cpu(), "msp")
    assert c[0, 0, 0] > 0
    np.testing.assert_allclose(c.numpy(), ref.numpy(), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:SML. classes")
@pytest.mark.parametrize("device", DEVICES)
def test_finite_logits_beyond_float32_spread(rng, device):
    """Finite logits further apart than float32 can hold (l_c - m overflows to -inf) are
    finite pixels: every method's score is finite and matches the float64 reference
    (one-hot softmax: entropy 0, not NaN), and the pixels are binned, not counted as
    non-finite."""
    x = random_logits(rng, 1, 5, 4, 6)
    x[0, 0, :2] = 3e38
    x[0, 1, :2] = -3e38
    x[0, 2, 2:] = -3.4e38
    x[0, 3, 2:] = 1e38
    x = x.to(device)
    y = torch.zeros(1, 4, 6, dtype=torch.uint8, device=device)
    stats = anomfast.fit_sml(random_logits(rng, 2, 5, 8, 8).to(device))
    spec = resolve(LOGIT_METHODS, sml=stats)
    hist, counters, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    assert counters.cpu().tolist() == [0, 0, 0, 24]
    x64 = x.double().cpu()
    for j, m in enumerate(LOGIT_METHODS):
        got = maps[j].double().cpu()
        ref = reference.coordinate(x64, m, **ref_kwargs(m, stats))
        assert bool(torch.isfinite(got).all()), m
        tol = 1e-5 * (ref.abs() + scale_of(m, x64, stats)) + 1e-30
        assert bool(((got - ref).abs() <= tol).all()), m
        assert int(hist[j, 0].sum()) == 24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_at_most_twice_pytorch(rng, device, dtype):
    x = random_logits(rng, 2, 19, 12, 40, dtype=dtype).to(device)
    x64 = x.double().cpu()
    maps = anomfast.score_maps(x, methods=["max_logit", "msp", "energy", "entropy"])
    for m in ["max_logit", "msp", "energy", "entropy"]:
        ref = reference.score(x64, m)
        xl = x.cpu()
        torch_same_precision = {
            "max_logit": lambda: -xl.max(dim=1).values,
            "msp": lambda: -torch.softmax(xl, dim=1).max(dim=1).values,
            "energy": lambda: -torch.logsumexp(xl, dim=1),
            "entropy": lambda: -(torch.softmax(xl, 1) * torch.log_softmax(xl, 1)).sum(1),
        }[m]().double()
        ours = (maps[m].double().cpu() - ref).abs().max()
        theirs = (torch_same_precision - ref).abs().max()
        assert ours <= 2 * theirs + 1e-6, f"{m} {dtype}: ours {ours:.3g} vs torch {theirs:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_histograms_equal_binning_of_own_scores(rng, device, dtype, shape):
    """Histograms exactly equal the reference binning rule applied to the kernel's own
    coordinates (score error and binning error kept apart)."""
    B, C, H, W = shape
    x = random_logits(rng, *shape, dtype=dtype).to(device)
    y = random_labels(rng, B, H, W).to(device)
    methods = ["max_logit", "msp", "energy", "entropy", "gen"]
    spec = resolve(methods, temperature=1.7)
    hist, counters, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    yc = y.cpu()
    for j, m in enumerate(methods):
        idx = reference.bin_index(maps[j].cpu())
        for row, lab in ((0, 0), (1, 1)):
            want = torch.bincount(idx[yc == lab].flatten(), minlength=binning.NBINS)
            assert torch.equal(hist[j, row].cpu(), want), f"{m} label {lab}"
    c = counters.cpu().tolist()
    assert c[2] == int((yc == 255).sum()) and c[3] == int((yc != 255).sum()) and c[0] == c[1] == 0


def _check_repeated_bins(rng, pixels, threads, repeated, need_byte_overflow, flush_every=0):
    """Two fused calls into one histogram on (1, 3, 1, pixels) logits whose first
    `repeated` pixels share one score; the counts equal twice the reference binning."""
    methods = ["max_logit", "msp", "energy", "entropy"]
    spec = resolve(methods)
    x = random_logits(rng, 1, 3, 1, pixels, scale=20.0)
    x[..., :repeated] = x[..., :1]                 # the same bins many times
    y = random_labels(rng, 1, 1, pixels, p_anomaly=0.3)
    hist = _fused.new_histogram(len(methods), "cpu")
    for _ in range(2):                             # the second call adds onto the first
        hist, _, maps = _fused.fused_pass(x, y, spec, hist=hist, want_maps=True, num_threads=threads,
                                          flush_every=flush_every)
    for j, m in enumerate(methods):
        idx = reference.bin_index(maps[j])
        for row, lab in ((0, 0), (1, 1)):
            want = 2 * torch.bincount(idx[y == lab].flatten(), minlength=binning.NBINS)
            if need_byte_overflow:
                assert int(want.max()) > 2 * 256, "the test must overflow a byte within one call"
            assert torch.equal(hist[j, row], want), f"{m} label {lab}"


@pytest.mark.parametrize("pixels", [1, 700, 1024, 1100, 3000, 20000])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_flush_both_modes(rng, pixels, threads):
    """The core flushes a thread's private counts by a list of the distinct bins it
    touched (up to 4096 per thread) or, past that, by the range of slots it counted into per
    method and label (64-slot groups, empty ones skipped); around and
    past the switch, with accumulation across calls and repeated bins, the histograms
    equal the reference binning."""
    _check_repeated_bins(rng, pixels, threads, pixels // 4, need_byte_overflow=False)


@pytest.mark.parametrize("pixels", [1500, 70000])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_counts_past_a_byte(rng, pixels, threads):
    """The core keeps the low byte of each private count apart from the rest and carries
    256 at a time; bins hit hundreds to thousands of times in one call, in small calls
    (bins flushed one by one) and large ones (flushed by slot ranges), count exactly."""
    _check_repeated_bins(rng, pixels, threads, 3 * pixels // 4, need_byte_overflow=True)


@pytest.mark.parametrize("flush_every", [1000, 9000, 30000])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_early_flush(rng, flush_every, threads):
    """A thread adds its private counts to the shared histogram early, while the other
    threads go on counting, every `flush_every` pixels (2^31 in use, so no private count
    can overflow; lowered here to reach that path): by the list of touched bins (1000:
    fewer than 4096 distinct bins by then) or by the slot ranges (larger), with repeated
    bins and counts past a byte, the histograms still equal the reference binning."""
    _check_repeated_bins(rng, 70000, threads, 3 * 70000 // 4, need_byte_overflow=True, flush_every=flush_every)


def test_binning_rules_agree(rng):
    """Bit-twiddling rule (NumPy mirror of binning.h) == frexp-based reference rule,
    on values spanning every octave, signs, zeros, tiny and huge values, inf."""
    mant = torch.rand(200000, generator=rng, dtype=torch.float64) + 0.5
    expo = torch.randint(-45, 45, (200000,), generator=rng)
    sign = torch.where(torch.rand(200000, generator=rng) < 0.5, -1.0, 1.0)
    v = (sign * mant * torch.pow(2.0, expo.double())).float()
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0**-32, -(2.0**-32), 2.0**32, -(2.0**32),
                            float("inf"), -float("inf"), 1.0, -1.0], dtype=torch.float32)
    v = torch.cat([v, special])
    a = binning.bin_index(v.numpy())
    b = reference.bin_index(v).numpy()
    np.testing.assert_array_equal(a, b)
    order = np.argsort(v.numpy(), kind="stable")
    assert np.all(np.diff(a[order]) >= 0), "bins must increase with the value"
    lo, hi = binning.bin_edges(a)
    assert np.all((lo <= v.double().numpy()) & (v.double().numpy() <= hi))


def test_histogram_matches_reference_pipeline(rng):
    """End to end: the kernel's histogram equals the reference's (float64 scores rounded
    to float32 then binned) up to pixels whose float32 rounding crosses a bin edge."""
    x = random_logits(rng, 2, 19, 32, 48)
    y = random_labels(rng, 2, 32, 48)
    spec = resolve(["max_logit", "energy", "msp"])
    hist, _, _ = _fused.fused_pass(x, y, spec)
    for j, m in enumerate(spec.names):
        ref = reference.histogram(x, y, m)
        moved = (hist[j] - ref).abs().sum().item()
        # |diff| counts a moved pixel twice; float32 rounding moves pixels that sit within
        # ~1e-7 relative of a bin edge (the exact equality with the binning of the kernel's
        # own scores is tested above)
        assert moved <= 0.01 * ref.sum().item(), f"{m}: {moved} pixels in other bins"
        assert hist[j].sum().item() == ref.sum().item()


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_channels_last_and_strided(rng, device):
    x = random_logits(rng, 2, 19, 20, 30).to(device)
    y = random_labels(rng, 2, 20, 30).to(device)
    spec = resolve(["max_logit", "msp", "energy"])
    base, _, bm = _fused.fused_pass(x, y, spec, want_maps=True)
    variants = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "sliced": torch.zeros(2, 19, 20, 60, device=x.device).index_copy_(
            3, torch.arange(0, 60, 2, device=x.device), x)[..., ::2],
        "transposed_hw": x.transpose(2, 3).contiguous().transpose(2, 3),
    }
    for name, v in variants.items():
        assert torch.equal(v, x)
        h, _, m = _fused.fused_pass(v, y, spec, want_maps=True)
        assert torch.equal(h, base), name
        assert torch.equal(m, bm), name
    yt = y.transpose(1, 2).contiguous().transpose(1, 2)
    h, _, _ = _fused.fused_pass(x, yt, spec)
    assert torch.equal(h, base)


@pytest.mark.parametrize("device", DEVICES)
def test_determinism_threads_and_batch_split(rng, device):
    x = random_logits(rng, 6, 19, 24, 40).to(device)
    y = random_labels(rng, 6, 24, 40).to(device)
    spec = resolve(["max_logit", "msp", "energy", "entropy"])
    one, _, _ = _fused.fused_pass(x, y, spec, num_threads=1)
    two, _, _ = _fused.fused_pass(x, y, spec, num_threads=2)
    assert torch.equal(one, two)
    split = None
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        split, _, _ = _fused.fused_pass(x[lo:hi], y[lo:hi], spec, hist=split)
    assert torch.equal(one, split)
    rev = None
    for i in reversed(range(6)):
        rev, _, _ = _fused.fused_pass(x[i:i + 1], y[i:i + 1], spec, hist=rev)
    assert torch.equal(one, rev)


def test_ties_constant_void_only_and_anomaly_free(rng):
    spec = resolve(["max_logit", "msp", "energy"])
    x = torch.full((2, 19, 8, 8), 3.0)
    y = random_labels(rng, 2, 8, 8, p_anomaly=0.3, p_void=0.1)
    h, c, _ = _fused.fused_pass(x, y, spec)
    assert (h[0].sum(dim=0) > 0).sum().item() == 1, "constant scores land in one bin"
    assert h[:, 1].sum(dim=1).eq(int((y == 1).sum())).all()
    yv = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    h, c, _ = _fused.fused_pass(random_logits(rng, 2, 19, 8, 8), yv, spec)
    assert h.sum().item() == 0 and c.tolist() == [0, 0, 128, 0]
    y0 = torch.zeros((2, 8, 8), dtype=torch.uint8)
    h, c, _ = _fused.fused_pass(random_logits(rng, 2, 19, 8, 8), y0, spec)
    assert h[:, 1].sum().item() == 0 and h[:, 0].sum().item() == 3 * 128


def test_label_map_dataset_ids(rng):
    """A data set storing anomaly class 13 and voids 255/0, everything else normal."""
    x = random_logits(rng, 2, 19, 16, 16)
    raw = torch.randint(0, 20, (2, 16, 16), generator=rng).to(torch.int64)
    raw[0, :2] = 255
    lm = anomfast.LabelMap(anomaly_ids=[13], void_ids=[255, 0], normal_ids="rest")
    spec = resolve(["max_logit"])
    h, c, _ = _fused.fused_pass(x, raw, spec, label_map=lm)
    norm = ((raw != 13) & (raw != 255) & (raw != 0)).sum().item()
    assert h[0, 0].sum().item() == norm and h[0, 1].sum().item() == int((raw == 13).sum())
    binary = torch.where(raw == 13, 1, torch.where((raw == 255) | (raw == 0), 255, 0)).to(torch.uint8)
    h2, _, _ = _fused.fused_pass(x, binary, spec)
    assert torch.equal(h, h2)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(rng, label_dtype):
    x = random_logits(rng, 2, 7, 9, 11)
    y = random_labels(rng, 2, 9, 11, p_void=0.0)
    spec = resolve(["energy"])
    want, _, _ = _fused.fused_pass(x, y, spec)
    got, _, _ = _fused.fused_pass(x, y.to(label_dtype), spec)
    assert torch.equal(want, got)


def test_real_digits_scores(digits):
    """Real 5-class logits: scores equal the reference; anomalies (digits 5-9) score higher."""
    x = digits["logits"]
    stats = anomfast.fit_sml(digits["fit_logits"])
    maps = anomfast.score_maps(x, methods=LOGIT_METHODS, sml=stats)
    x64 = x.double()
    for m in LOGIT_METHODS:
        ref = reference.score(x64, m, **ref_kwargs(m, stats))
        tol = 1e-5 * (ref.abs() + scale_of(m, x64, stats))
        assert bool(((maps[m].double() - ref).abs() <= tol).all()), m
    y = digits["labels"].bool()
    for m in ["max_logit", "msp", "energy"]:
        assert maps[m][y].mean() > maps[m][~y].mean(), m


_ISA_SCRIPT = r"""
import sys, numpy as np, torch, anomfast
from anomfast import _fused
from anomfast.methods import resolve
g = torch.Generator().manual_seed(int(sys.argv[1]))
x = torch.randn(2, 19, 33, 150, generator=g) * 4
x[:, :, :, :40] = x[:, :, :, :1]                     # repeated scores
x[0, :, 5, 7] = float("nan")
y = torch.randint(0, 3, (2, 33, 150), generator=g).to(torch.uint8)
y[y == 2] = 255
st = anomfast.fit_sml(x[1:])
spec = resolve(["max_logit", "msp", "energy", "sml", "entropy", "gen"], sml=st, temperature=1.3)
hist, counters, maps = _fused.fused_pass(x, y, spec, want_maps=True)
np.savez(sys.argv[2], hist=hist.numpy(), counters=counters.numpy(), maps=maps.numpy(),
         sml_sum=np.asarray(st.sum), isa=anomfast.build_info()["cpu_isa"])
"""


def test_cpu_isa_builds_agree(rng, tmp_path):
    """The AVX-512 and AVX2 builds of the core (ANOMFAST_CPU_ISA caps the dispatch) give
    bit-identical score maps, histograms, counters and SML sums: same arithmetic, FMA
    contraction in both, only the vector width differs. The baseline build has no FMA,
    so its scores may differ in the last bits (a few pixels change bins); it must agree
    within float32 rounding and count the same pixels."""
    import os
    import subprocess
    import sys
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    script = tmp_path / "isa.py"
    script.write_text(_ISA_SCRIPT)
    runs = {}
    for isa in ("baseline", "avx2", "avx512"):
        out = tmp_path / f"{isa}.npz"
        env = dict(os.environ, ANOMFAST_CPU_ISA=isa)
        r = subprocess.run([sys.executable, str(script), str(seed), str(out)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        with np.load(out) as z:
            runs[isa] = {k: z[k] for k in z.files}
    assert str(runs["baseline"]["isa"]) == "baseline"
    if str(runs["avx512"]["isa"]) == "avx512":
        assert str(runs["avx2"]["isa"]) == "avx2+fma"
        for k in ("hist", "counters", "maps", "sml_sum"):
            np.testing.assert_array_equal(runs["avx512"][k], runs["avx2"][k], err_msg=k)
    elif str(runs["avx2"]["isa"]) != "avx2+fma":
        pytest.skip("this CPU runs neither the AVX2 nor the AVX-512 build")
    base, fast = runs["baseline"], runs["avx2"]
    np.testing.assert_array_equal(base["counters"], fast["counters"])
    np.testing.assert_array_equal(base["hist"].sum(axis=-1), fast["hist"].sum(axis=-1))
    ok = np.isfinite(base["maps"])
    np.testing.assert_array_equal(ok, np.isfinite(fast["maps"]))
    np.testing.assert_allclose(fast["maps"][ok], base["maps"][ok], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(fast["sml_sum"], base["sml_sum"], rtol=1e-12)


def test_bad_cpu_isa_value_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, ANOMFAST_CPU_ISA="sse9")
    r = subprocess.run([sys.executable, "-c", "import anomfast"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "ANOMFAST_CPU_ISA='sse9'" in r.stderr
