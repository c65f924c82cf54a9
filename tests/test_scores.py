"""Fused scores and histograms against the float64 reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import anomfast
from anomfast import _fused, binning, reference
from anomfast.labels import LabelMap
from anomfast.methods import EXACT_COORDINATES, EXTERNAL, resolve

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


def exact_mask(names) -> int:
    """The signature mask the cores get for these methods by default (FusedArgs.sig_mask):
    a bit for each method whose coordinate is the exact score."""
    return sum(1 << j for j, n in enumerate(names) if n in EXACT_COORDINATES)


def expected_slots(maps, cls, ok, sig_mask=None):
    """What the core must have added for these coordinates: the flat (method, label, bin)
    slots of the pixels with label class 0 / 1 and `ok`, their counts, and per slot the OR
    of binning.bin_sig over its pixels (NumPy binning of the core's own coordinates) for
    the methods j with bit j of sig_mask set (None: all), 0 for the others."""
    maps = maps.detach().cpu()
    cls = cls.detach().cpu().reshape(-1).numpy()
    ok = ok.detach().cpu().reshape(-1).numpy()
    slots, sigs = [], []
    for j in range(maps.shape[0]):
        t = maps[j].reshape(-1).numpy()
        for lab in (0, 1):
            sel = (cls == lab) & ok
            slots.append((j * 2 + lab) * binning.NBINS + binning.bin_index(t[sel]))
            filled = sig_mask is None or (sig_mask >> j) & 1
            sigs.append(binning.bin_sig(t[sel]) if filled else np.zeros(int(sel.sum()), np.int64))
    u, inv = np.unique(np.concatenate(slots), return_inverse=True)
    sig = np.zeros(u.size, np.int64)
    np.bitwise_or.at(sig, inv, np.concatenate(sigs))
    return u, np.bincount(inv, minlength=u.size), sig


def assert_state_equals_binning(state, maps, cls, ok=None, times=1, fresh=True, what="", sig_mask=None):
    """A HistState holds exactly what `times` passes over these coordinates add: the
    counts, the tie signatures (OR of bin_sig; 0 in every slot never counted), and an
    occupancy byte of 1 on every block holding a count (fresh: and on no other block).
    cls: label class per pixel (0 normal, 1 anomaly, anything else not binned); ok:
    pixels the core bins (default: every coordinate finite). sig_mask: the methods whose
    signatures the core filled (FusedArgs.sig_mask; None: all); every other method's
    signatures must be 0 everywhere."""
    if ok is None:
        ok = torch.isfinite(maps.detach().cpu()).all(dim=0)
    slots, counts, sigs = expected_slots(maps, cls, ok, sig_mask)
    h = state.hist.cpu().reshape(-1).numpy()
    s = state.sig.cpu().reshape(-1).numpy().view(np.uint32)
    o = state.occ.cpu().numpy()
    nz = np.flatnonzero(h)
    np.testing.assert_array_equal(nz, slots, err_msg=f"{what}: which slots hold counts")
    np.testing.assert_array_equal(h[nz], times * counts, err_msg=f"{what}: counts")
    np.testing.assert_array_equal(np.flatnonzero(s), slots[sigs != 0], err_msg=f"{what}: which slots hold a signature")
    np.testing.assert_array_equal(s[slots].astype(np.int64), sigs, err_msg=f"{what}: signatures")
    assert set(np.unique(o).tolist()) <= {0, 1}, f"{what}: occupancy bytes must be 0 or 1"
    blocks = np.unique(slots >> binning.OCC_SHIFT)
    assert o[blocks].all(), f"{what}: {int((o[blocks] == 0).sum())} blocks hold counts but are not marked"
    if fresh:
        np.testing.assert_array_equal(np.flatnonzero(o), blocks, err_msg=f"{what}: marked blocks without counts")


def same_state(a, b) -> bool:
    return torch.equal(a.hist, b.hist) and torch.equal(a.sig, b.sig) and torch.equal(a.occ, b.occ)


def coords(x, methods, **params):
    spec = resolve(methods, **params)
    _, _, maps = _fused.fused_pass(_fused.as_logits(x), None, spec, want_maps=True)
    return maps


def masked_pass(x, y, spec, sig_mask, num_threads=0, flush_every=0):
    """fused_pass of logit methods (no HEAT / post-processed SML) with an explicit
    FusedArgs.sig_mask instead of the default exact_mask(spec.names)."""
    x = _fused.as_logits(x)
    y = _fused.as_labels(y, x)
    B, _, H, W = x.shape
    M = len(spec.names)
    hist, counters = _fused.new_histogram(M, x.device), _fused.new_counters(x.device)
    maps = torch.empty(M, B, H, W, device=x.device)
    lut, off = LabelMap.default().lut()
    mean, inv = spec.sml.kernel_arrays(x.device) if "sml" in spec.names else (None, None)
    _fused.launch(x, y, hist, counters, maps, spec.codes, spec.temperature, spec.gen_gamma, spec.entropy_normalize,
                  mean, inv, lut.to(x.device), off, num_threads, flush_every=flush_every, sig_mask=sig_mask)
    return hist, counters, maps


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5, 2.0, 7.0])
def test_energy_keeps_relative_precision_just_below_zero_at_every_temperature(rng, device, temperature):
    """-(m + T log1p(S'_T)), S'_T without the argmax's own term, at every T: with the max
    logit at 0 and the rest 15-40 below, energies of 1e-3 .. 1e-35 keep float32's relative
    precision (T != 1 used log(sum), whose 1 + S'_T rounds: 3% off at T = 1.5, 100% at
    T = 0.5, where T = 1 was exact)."""
    x = torch.empty(2, 19, 8, 8).uniform_(-40.0, -15.0, generator=rng)
    x[:, 3] = 0.0  # the argmax, at 0
    x[0, 5, 0, 0] = 0.0  # a tie at the max: one of the two is the argmax, the other counts
    got = anomfast.score_maps(x.to(device), methods=["energy"], temperature=temperature)["energy"].double().cpu()
    ref = reference.score(x.double(), "energy", temperature=temperature)
    assert bool((ref < 0).all())
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel < 1e-5, (temperature, rel)


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
        assert int(hist.hist[j, 0].sum()) == 24


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
            "msp": lambda: 1 - torch.softmax(xl, dim=1).max(dim=1).values,
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
    coordinates (score error and binning error kept apart): counts, tie signatures
    (bf16 / fp16 logits make real ties) and occupancy."""
    B, C, H, W = shape
    x = random_logits(rng, *shape, dtype=dtype).to(device)
    y = random_labels(rng, B, H, W).to(device)
    methods = ["max_logit", "msp", "energy", "entropy", "gen"]
    spec = resolve(methods, temperature=1.7)
    hist, counters, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    yc = y.cpu()
    assert_state_equals_binning(hist, maps, yc, what=f"{dtype} {shape}", sig_mask=exact_mask(methods))
    c = counters.cpu().tolist()
    assert c[2] == int((yc == 255).sum()) and c[3] == int((yc != 255).sum()) and c[0] == c[1] == 0


def _check_repeated_bins(rng, pixels, threads, repeated, need_byte_overflow, flush_every=0):
    """Two fused calls into one histogram on (1, 3, 1, pixels) logits whose first
    `repeated` pixels share one score; the counts equal twice the reference binning, the
    signatures its OR, the occupancy its blocks."""
    methods = ["max_logit", "msp", "energy", "entropy"]
    spec = resolve(methods)
    x = random_logits(rng, 1, 3, 1, pixels, scale=20.0)
    x[..., :repeated] = x[..., :1]                 # the same bins many times
    y = random_labels(rng, 1, 1, pixels, p_anomaly=0.3)
    hist = _fused.new_histogram(len(methods), "cpu")
    for _ in range(2):                             # the second call adds onto the first
        hist, _, maps = _fused.fused_pass(x, y, spec, hist=hist, want_maps=True, num_threads=threads,
                                          flush_every=flush_every)
    if need_byte_overflow:
        assert int(hist.hist.max()) > 2 * 256, "the test must overflow a byte within one call"
    assert_state_equals_binning(hist, maps, y, times=2, what=f"{pixels} px, {threads} threads, flush {flush_every}",
                                sig_mask=exact_mask(methods))


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


@pytest.mark.filterwarnings("ignore:SML. classes")
@pytest.mark.parametrize("threads", [1, 3])
def test_signatures_follow_sig_mask(rng, threads):
    """FusedArgs.sig_mask: bit j fills method j's tie signatures exactly, the other methods'
    stay 0 everywhere; counts and occupancy stay exact for every method whatever the mask.
    Small calls (touched-list flush), large ones (slot ranges, shared reduction, groups
    straddling two methods), early flushes, ties and counts past a byte."""
    methods = ["msp", "max_logit", "energy", "sml", "entropy", "gen"]
    spec = resolve(methods, sml=anomfast.fit_sml(random_logits(rng, 1, 19, 8, 64)), temperature=1.3)
    for W, flush_every in ((500, 0), (30000, 0), (30000, 7000)):
        x = random_logits(rng, 1, 19, 2, W, dtype=torch.bfloat16)
        x[..., : W // 2] = x[..., :1]  # repeated bins
        y = random_labels(rng, 1, 2, W, p_anomaly=0.3)
        for mask in (0, 0b111111, int(torch.randint(1, 63, (1,), generator=rng)), exact_mask(methods)):
            h, _, maps = masked_pass(x, y, spec, mask, num_threads=threads, flush_every=flush_every)
            assert_state_equals_binning(h, maps, y, what=f"W={W}, flush_every={flush_every}, sig_mask={mask:#b}",
                                        sig_mask=mask)


def test_default_sig_mask_on_every_entry_point(rng):
    """Python asks the cores for the signatures of the exact-coordinate methods only
    (max_logit, wherever it sits in the method list): fused_pass, the Evaluator and its
    custom op (which pass method codes to the same launch)."""
    from anomfast.evaluator import Evaluator
    methods = ["energy", "max_logit", "msp"]
    assert exact_mask(methods) == 0b010
    x = random_logits(rng, 2, 19, 9, 40)
    y = random_labels(rng, 2, 9, 40)
    spec = resolve(methods)
    h, _, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    assert_state_equals_binning(h, maps, y, what="fused_pass", sig_mask=0b010)
    ev = Evaluator(methods)
    ev.update(x, y)
    assert same_state(ev.hist, h), "Evaluator.update"
    st, cnt = _fused.new_histogram(3, "cpu"), _fused.new_counters("cpu")
    lut, off = LabelMap.default().lut()
    torch.ops.anomfast.fused_update(x, y, st.hist, st.sig, st.occ, cnt, lut, off, spec.codes, 1.0, 0.1, False,
                                    None, None)
    assert same_state(st, h), "custom op"


def wide_coords(g, n, W):
    """(n, 1, 1, W) float32 coordinates over the whole float32 range: random bit patterns
    (every octave of both signs), subnormals, exact zeros of both signs, repeated values
    (ties), many distinct values inside one bin, and a few infinities (their pixels are
    skipped for every method)."""
    N = n * W
    u = torch.randint(0, 2**32, (N,), generator=g, dtype=torch.int64)
    exp = (u >> 23) & 0xFF
    u = torch.where(exp == 0xFF, u & ~(1 << 30), u)  # no NaN / inf here
    kind = torch.randint(0, 12, (N,), generator=g)
    sub = torch.randint(1, 1 << 23, (N,), generator=g, dtype=torch.int64) | (u & (1 << 31))
    u = torch.where(kind == 2, sub, u)
    t = torch.from_numpy(u.numpy().astype(np.uint32).view(np.float32).copy())
    t[kind == 0] = 0.0
    t[kind == 1] = -0.0
    pool = t[torch.randint(0, N, (16,), generator=g)]
    t[kind == 3] = pool[torch.randint(0, 16, (int((kind == 3).sum()),), generator=g)]
    one_bin = 1.0 + torch.randint(0, 1024, (N,), generator=g).double() * 2.0**-23  # all in 1.0's bin
    t[kind == 4] = one_bin[kind == 4].float()
    t[kind == 5] = -1e-40  # one subnormal value, many times
    t[(kind == 6) & (torch.rand(N, generator=g) < 0.01)] = float("inf")
    return t.view(n, 1, 1, W)


def external_pass(coords, y, hist=None, num_threads=0, flush_every=0, sig_mask=None):
    """Bins the given (n, B, H, W) coordinates through the core's EXTERNAL method (sig_mask:
    FusedArgs.sig_mask; None: launch's default, which fills no EXTERNAL signature)."""
    n, B, H, W = coords.shape
    if hist is None:
        hist = _fused.new_histogram(n, "cpu")
    counters = _fused.new_counters("cpu")
    maps = torch.empty(n, B, H, W)
    lut, off = LabelMap.default().lut()
    _fused.launch(torch.zeros(B, 1, H, W), y, hist, counters, maps, [EXTERNAL] * n, 1.0, 0.1, False, None, None,
                  lut, off, num_threads, ext=coords.contiguous(), flush_every=flush_every, sig_mask=sig_mask)
    assert torch.equal(maps, coords), "EXTERNAL maps are the given coordinates"
    return hist, counters


def core_binning_checks(seed):
    """Counts, tie signatures and occupancy of the CPU core, exactly, on coordinates over
    the whole float32 range: small calls (each thread flushes the list of bins it touched),
    large ones (flushes by slot ranges, shared block reduction), one to seven threads,
    early flushes, accumulation over two calls with different data; signatures filled for
    the EXTERNAL rows whose sig_mask bit is set (each of the four masks of two rows in
    turn) and 0 for the others. Also run under every ISA build (test_cpu_isa_builds_agree)."""
    g = torch.Generator().manual_seed(seed)
    cases = [(300, 1, 0), (300, 3, 0), (2500, 2, 0), (2500, 1, 700), (40000, 1, 0), (40000, 3, 0),
             (40000, 2, 5000), (40000, 7, 1000)]
    for i, (W, threads, flush_every) in enumerate(cases):
        mask = (3, 1, 2, 0)[i % 4]
        c1, c2 = wide_coords(g, 2, W), wide_coords(g, 2, W)
        y1, y2 = random_labels(g, 1, 1, W, p_anomaly=0.3), random_labels(g, 1, 1, W, p_anomaly=0.3)
        st, cnt = external_pass(c1, y1, num_threads=threads, flush_every=flush_every, sig_mask=mask)
        what = f"W={W}, {threads} threads, flush_every={flush_every}, sig_mask={mask}"
        assert_state_equals_binning(st, c1, y1, what=what, sig_mask=mask)
        fin = torch.isfinite(c1).all(dim=0)
        assert cnt[3] == int(((y1 != 255) & fin).sum()) and cnt[0] == int(((y1 != 255) & ~fin).sum())
        external_pass(c2, y2, hist=st, num_threads=threads, flush_every=flush_every, sig_mask=mask)
        assert_state_equals_binning(st, torch.cat([c1, c2], -1), torch.cat([y1, y2], -1), what=what + ", 2 calls",
                                    sig_mask=mask)
    st, _ = external_pass(c1, y1)
    assert_state_equals_binning(st, c1, y1, what="EXTERNAL, default mask", sig_mask=0)
    t = c1.flatten()
    assert (t == 0).any() and (t.abs() < 2.0**-126).logical_and(t != 0).any(), "the data must hold zeros and subnormals"


def test_signatures_and_occupancy_whole_float_range(rng):
    """The CPU core's counts, tie signatures and occupancy equal the NumPy binning of
    coordinates spread over the whole float32 range (subnormals, zeros, ties), on every
    flush path (see core_binning_checks)."""
    core_binning_checks(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


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
        # |diff| counts a moved pixel twice; float32 rounding moves pixels that sit within
        # ~1e-7 relative of a bin edge (the exact equality with the binning of the kernel's
        # own scores is tested above)
        moved = (hist.hist[j] - ref).abs().sum().item()
        assert moved <= 0.01 * ref.sum().item(), f"{m}: {moved} pixels in other bins"
        assert hist.hist[j].sum().item() == ref.sum().item()


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
        assert same_state(h, base), name
        assert torch.equal(m, bm), name
    yt = y.transpose(1, 2).contiguous().transpose(1, 2)
    h, _, _ = _fused.fused_pass(x, yt, spec)
    assert same_state(h, base)


@pytest.mark.parametrize("device", DEVICES)
def test_determinism_threads_and_batch_split(rng, device):
    x = random_logits(rng, 6, 19, 24, 40).to(device)
    y = random_labels(rng, 6, 24, 40).to(device)
    spec = resolve(["max_logit", "msp", "energy", "entropy"])
    one, _, _ = _fused.fused_pass(x, y, spec, num_threads=1)
    two, _, _ = _fused.fused_pass(x, y, spec, num_threads=2)
    assert same_state(one, two)
    split = None
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        split, _, _ = _fused.fused_pass(x[lo:hi], y[lo:hi], spec, hist=split)
    assert same_state(one, split)
    rev = None
    for i in reversed(range(6)):
        rev, _, _ = _fused.fused_pass(x[i:i + 1], y[i:i + 1], spec, hist=rev)
    assert same_state(one, rev)


def test_ties_constant_void_only_and_anomaly_free(rng):
    spec = resolve(["max_logit", "msp", "energy"])
    x = torch.full((2, 19, 8, 8), 3.0)
    y = random_labels(rng, 2, 8, 8, p_anomaly=0.3, p_void=0.1)
    st, c, maps = _fused.fused_pass(x, y, spec, want_maps=True)
    h = st.hist
    assert (h[0].sum(dim=0) > 0).sum().item() == 1, "constant scores land in one bin"
    assert h[:, 1].sum(dim=1).eq(int((y == 1).sum())).all()
    for lab in (0, 1):  # one value per bin: max_logit's signature says so and gives it back exactly
        b = torch.nonzero(h[0, lab]).flatten().numpy()
        sig = st.sig[0, lab, b].numpy().view(np.uint32)
        assert binning.sig_single(sig).all()
        np.testing.assert_array_equal(binning.bin_value(b, sig), maps[0, 0, 0, 0].double().numpy())
    assert int(st.sig[1:].count_nonzero()) == 0, "msp / energy: no signatures (not exact coordinates)"
    yv = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    st, c, _ = _fused.fused_pass(random_logits(rng, 2, 19, 8, 8), yv, spec)
    assert st.hist.sum().item() == 0 and c.tolist() == [0, 0, 128, 0]
    assert int(st.sig.count_nonzero()) == 0 and int(st.occ.sum()) == 0, "nothing binned: nothing marked"
    y0 = torch.zeros((2, 8, 8), dtype=torch.uint8)
    st, c, _ = _fused.fused_pass(random_logits(rng, 2, 19, 8, 8), y0, spec)
    h = st.hist
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
    assert h.hist[0, 0].sum().item() == norm and h.hist[0, 1].sum().item() == int((raw == 13).sum())
    binary = torch.where(raw == 13, 1, torch.where((raw == 255) | (raw == 0), 255, 0)).to(torch.uint8)
    h2, _, _ = _fused.fused_pass(x, binary, spec)
    assert same_state(h, h2)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(rng, label_dtype):
    x = random_logits(rng, 2, 7, 9, 11)
    y = random_labels(rng, 2, 9, 11, p_void=0.0)
    spec = resolve(["energy"])
    want, _, _ = _fused.fused_pass(x, y, spec)
    got, _, _ = _fused.fused_pass(x, y.to(label_dtype), spec)
    assert same_state(want, got)


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
sys.path.insert(0, sys.argv[3])
from test_scores import assert_state_equals_binning, core_binning_checks
core_binning_checks(int(sys.argv[1]))
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
assert_state_equals_binning(hist, maps, y, ok=torch.isfinite(x).all(dim=1), what="ISA script", sig_mask=1)
from test_scores import masked_pass
for mask in (0, 0b111111, 0b010110):
    h2, _, m2 = masked_pass(x, y, spec, mask, num_threads=2)
    assert_state_equals_binning(h2, m2, y, ok=torch.isfinite(x).all(dim=1), what=f"ISA script, mask {mask}",
                                sig_mask=mask)
np.savez(sys.argv[2], hist=hist.hist.numpy(), sig=hist.sig.numpy(), occ=hist.occ.numpy(),
         counters=counters.numpy(), maps=maps.numpy(),
         sml_sum=np.asarray(st.sum), isa=anomfast.build_info()["cpu_isa"])
"""


@pytest.mark.slow
def test_cpu_isa_builds_agree(rng, tmp_path):
    """The AVX-512 and AVX2 builds of the core (ANOMFAST_CPU_ISA caps the dispatch) give
    bit-identical score maps, histograms (counts, signatures, occupancy), counters and SML
    sums: same arithmetic, FMA contraction in both, only the vector width differs. The
    baseline build has no FMA, so its scores may differ in the last bits (a few pixels
    change bins); it must agree within float32 rounding and count the same pixels. Every
    build's histograms equal the NumPy binning of its own coordinates exactly
    (core_binning_checks and the script's own check)."""
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
        r = subprocess.run([sys.executable, str(script), str(seed), str(out), str(Path(__file__).parent)], env=env,
                           cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        with np.load(out) as z:
            runs[isa] = {k: z[k] for k in z.files}
    assert str(runs["baseline"]["isa"]) == "baseline"
    if str(runs["avx512"]["isa"]) == "avx512":
        assert str(runs["avx2"]["isa"]) == "avx2+fma"
        for k in ("hist", "sig", "occ", "counters", "maps", "sml_sum"):
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
    # the package loads lazily: the core (and the check) comes with the first name used
    r = subprocess.run([sys.executable, "-c", "import anomfast; anomfast.evaluate"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ANOMFAST_CPU_ISA='sse9'" in r.stderr
