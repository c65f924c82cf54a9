"""Corrupt states, odd inputs and silent-wrong-number cases: each must give a clear
Python exception or the right number, never a crash or a wrong metric. Memory-safety
cases run in a subprocess so that a signal fails the test instead of killing pytest."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import anomfast
from anomfast import Histogram
from anomfast.histogram import HistState


def run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd="/")


def assert_clean_error(setup: str, corrupt: str, call: str = "ev.update(x, y)") -> None:
    """In a fresh process: setup, then corrupt the state, then `call` must raise a
    ValueError (printed), never crash with a signal or a heap error."""
    code = (textwrap.dedent(setup) + "\n" + textwrap.dedent(corrupt) +
            f"\ntry:\n    {call}\nexcept ValueError as e:\n    print('CLEAN:', e)\n")
    r = run_isolated(code)
    assert r.returncode == 0 and "CLEAN:" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


SETUP = """
import torch, anomfast
x = torch.randn(1, 5, 6, 7); y = torch.zeros(1, 6, 7, dtype=torch.uint8); y[0, 0, :3] = 1
"""


def inputs(seed=0, B=3, C=5, H=6, W=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 3
    y = (torch.rand(B, H, W, generator=g) < 0.3).to(torch.uint8)
    return x, y


CORRUPT_STATES = {
    "hist wrong shape": "st.hist = torch.zeros(1, 2, 10, dtype=torch.int64)",
    "hist int32": "st.hist = st.hist.to(torch.int32)",
    "sig int64": "st.sig = st.sig.to(torch.int64)",
    "occ short": "st.occ = st.occ[:10].clone()",
    "hist not contiguous": "st.hist = torch.zeros(2, 2, st.hist.shape[2], dtype=torch.int64).transpose(0, 1)",
}


@pytest.mark.parametrize("what", sorted(CORRUPT_STATES))
def test_corrupt_evaluator_buffers_raise_before_the_core(what):
    assert_clean_error(SETUP + """
ev = anomfast.Evaluator(methods=["energy", "msp"])
ev.update(x, y)
st = ev.hist
""", CORRUPT_STATES[what])


@pytest.mark.parametrize("bad", ["ev.counters = ev.counters[:2].clone()", "ev.counters = ev.counters.to(torch.int32)"])
def test_corrupt_counters_raise(bad):
    assert_clean_error(SETUP + """
ev = anomfast.Evaluator(methods=["energy"])
ev.update(x, y)
""", bad)


def test_load_state_dict_validates_everything():
    x, y = inputs()
    ev = anomfast.Evaluator(methods=["energy"])
    ev.update(x, y)
    good = ev.state_dict()
    assert good["format"] == "anomfast-histograms-v2"
    cases = []
    d = dict(good); d["format"] = "anomfast-histograms-v1"; cases.append((d, "v1"))
    d = dict(good); d["counters"] = good["counters"].to(torch.int32); cases.append((d, "counters"))
    d = dict(good); d["counters"] = good["counters"][:2]; cases.append((d, "counters"))
    h = dict(good["hist"]); m = dict(h["methods"][0]); m["index"] = m["index"] + 10 ** 9
    h["methods"] = [m]; d = dict(good); d["hist"] = h; cases.append((d, "bin indices"))
    h = dict(good["hist"]); m = dict(h["methods"][0]); m["normal"] = -m["normal"]
    h["methods"] = [m]; d = dict(good); d["hist"] = h; cases.append((d, "negative"))
    h = dict(good["hist"]); m = dict(h["methods"][0]); m["normal"] = m["normal"].to(torch.float32)
    h["methods"] = [m]; d = dict(good); d["hist"] = h; cases.append((d, "integer"))
    h = dict(good["hist"]); m = dict(h["methods"][0]); m["normal"] = torch.full_like(m["normal"], 2 ** 61)
    h["methods"] = [m]; d = dict(good); d["hist"] = h; cases.append((d, "2\\^62"))
    for d, msg in cases:
        with pytest.raises(ValueError, match=msg):
            anomfast.Evaluator(methods=["energy"]).load_state_dict(d)
    fresh = anomfast.Evaluator(methods=["energy"])
    fresh.load_state_dict(good)
    assert fresh.compute()["energy"].auroc == ev.compute()["energy"].auroc


def test_histogram_add_refuses_int64_overflow():
    a = Histogram("custom", [5], [2 ** 61], [2 ** 61 - 1], [0])
    with pytest.raises(ValueError, match="2\\^62"):
        a + a


def test_keep_with_bool_labels_drops_samples_not_counts_them_as_anomalies():
    x, y = inputs(1, B=4)
    keep = torch.tensor([True, False, True, True])
    a = anomfast.Evaluator(methods=["energy"])
    a.update(x, y.bool(), keep=keep)
    b = anomfast.Evaluator(methods=["energy"])
    b.update(x[keep], y[keep])
    ra, rb = a.compute()["energy"], b.compute()["energy"]
    assert (ra.n_pos, ra.n_neg, ra.auroc) == (rb.n_pos, rb.n_neg, rb.auroc)


@pytest.mark.parametrize("dtype,void_ids", [(torch.int8, (255,)), (torch.uint8, (1000, 255)),
                                            (torch.uint8, (1000,))])
def test_keep_fill_value_fits_the_label_dtype(dtype, void_ids):
    x, y = inputs(2, B=4)
    keep = torch.tensor([False, True, True, False])
    lm = anomfast.LabelMap(anomaly_ids=[1], void_ids=void_ids, normal_ids=[0])
    a = anomfast.Evaluator(methods=["max_logit"], label_map=lm)
    a.update(x, y.to(dtype), keep=keep)
    b = anomfast.Evaluator(methods=["max_logit"], label_map=lm)
    b.update(x[keep], y[keep].to(dtype))
    ra, rb = a.compute()["max_logit"], b.compute()["max_logit"]
    assert (ra.n_pos, ra.n_neg, ra.auroc) == (rb.n_pos, rb.n_neg, rb.auroc)


def test_negative_and_conjugate_views_are_read_as_their_values():
    x, y = inputs(3)
    want = anomfast.evaluate(-x, y, methods=["max_logit", "energy"])
    neg = torch._neg_view(x)
    assert neg.is_neg()
    got = anomfast.evaluate(neg, y, methods=["max_logit", "energy"])
    imag = torch.complex(torch.zeros_like(x), x).conj().imag  # a negative view of -x
    got2 = anomfast.evaluate(imag, y, methods=["max_logit", "energy"])
    for m in ("max_logit", "energy"):
        assert got[m].auroc == want[m].auroc == got2[m].auroc
        assert got[m].threshold == want[m].threshold


def test_state_sync_helpers_are_sparse_and_exact():
    x, y = inputs(4, B=2, H=40, W=50)
    st = HistState.new(2, "cpu")
    from anomfast import _fused
    from anomfast.methods import resolve
    _fused.fused_pass(_fused.as_logits(x), _fused.as_labels(y, x), resolve(["energy", "msp"]), hist=st)
    c = st.copy()
    assert c == st and c is not st
    c.clear_()
    assert c.total() == 0 and not bool(c.occ.any()) and st.total() == 2 * y.numel()  # 2 methods
    loaded = HistState.from_state(st.to_state(), 2, "cpu")
    assert loaded == st


def test_evaluate_scores_keeps_the_callers_precision():
    """float64 scores: the exact path sorts them as they are (no float32 cast) and every
    reported threshold flags, on the caller's own scores, exactly the pixels behind the
    reported F1."""
    s = np.array([[1.0 + 1e-12, 1.0]])
    y = np.array([[1, 0]])
    r = anomfast.evaluate_scores(s, y, exact=True)["custom"]
    assert r.auroc == 1.0 and not r.warnings
    s = np.array([[0.1, 0.05]])
    r = anomfast.evaluate_scores(s, y, exact=True)["custom"]
    assert r.f1 == 1.0 and bool((s >= r.threshold).sum() == 1)
    g = np.random.default_rng(3)
    for _ in range(5):
        sc = g.normal(size=(40, 50)) * 10.0 ** g.uniform(-3, 3)
        lab = (g.random(sc.shape) < 0.2 + 0.3 * (sc > 0)).astype(np.uint8)
        r = anomfast.evaluate_scores(sc, lab)["custom"]
        flagged = sc >= r.threshold
        tp, fp = int((flagged & (lab == 1)).sum()), int((flagged & (lab == 0)).sum())
        assert 2 * tp / (tp + fp + int(lab.sum())) == pytest.approx(r.f1, abs=1e-12)
        flagged = sc >= r.fpr95_threshold
        assert int((flagged & (lab == 0)).sum()) / int((lab == 0).sum()) == pytest.approx(
            r.bounds["fpr95"][1], abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_thresholds_reproduce_f1_on_score_maps_for_every_method(seed):
    """The reported threshold flags, on the maps score_maps returns, exactly the pixels
    behind the reported F1 (and fpr95_threshold those behind the FPR95 bound), for every
    per-pixel method, on confident logits (margins 20-40: -max softmax would round these
    pixels to -1) mixed with uncertain ones, float32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = 2, 19, 24, 40
    x = torch.randn(B, C, H, W, generator=g) * 3
    k = torch.randint(0, C, (B, 1, H, W), generator=g)
    margin = torch.where(torch.rand(B, 1, H, W, generator=g) < 0.7,
                         20 + 20 * torch.rand(B, 1, H, W, generator=g), 4 * torch.rand(B, 1, H, W, generator=g))
    x.scatter_add_(1, k, margin)
    y = (torch.rand(B, H, W, generator=g) < 0.1 + 0.4 * (margin[:, 0] < 4)).to(torch.uint8)
    y[torch.rand(B, H, W, generator=g) < 0.05] = 255
    if seed % 2:
        x = x.to(torch.bfloat16)
    methods = ("max_logit", "msp", "energy", "sml", "entropy", "gen")
    stats = anomfast.fit_sml(x, y)
    res = anomfast.evaluate(x, y, methods=methods, sml=stats)
    maps = anomfast.score_maps(x, methods, sml=stats)
    valid = y != 255
    lab = (y == 1)[valid]
    P, N = int(lab.sum()), int((~lab).sum())
    for m in methods:
        r, sc = res[m], maps[m][valid]
        flagged = sc >= r.threshold
        tp, fp = int((flagged & lab).sum()), int((flagged & ~lab).sum())
        assert 2 * tp / (tp + fp + P) == pytest.approx(r.f1, abs=1e-12), (m, r.threshold)
        flagged = sc >= r.fpr95_threshold
        assert int((flagged & lab).sum()) >= 0.95 * P, m
        lo, hi = r.bounds["fpr95"]
        assert lo - 1e-12 <= int((flagged & ~lab).sum()) / N <= hi + 1e-12, m


def test_histogram_files_carry_a_format_version(tmp_path):
    x, y = inputs(5)
    res = anomfast.evaluate(x, y, methods=["energy"])
    p = tmp_path / "h.npz"
    anomfast.save_histograms(p, res.histograms)
    back, _ = anomfast.load_histograms(p)
    assert back["energy"] == res.histograms["energy"]
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    import json
    meta = json.loads(str(arrays["meta"]))
    for fmt, msg in (("anomfast-histograms-v1", "v1.*v2"), ("something-else", "unknown format")):
        meta["format"] = fmt
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez(tmp_path / "old.npz", **arrays)
        with pytest.raises(ValueError, match=msg):
            anomfast.load_histograms(tmp_path / "old.npz")


def test_nan_logits_give_nan_scores():
    """NaN in, NaN out: score_maps of a pixel with a NaN (or inf) logit is NaN for every
    method (the formulas alone would give e.g. max_logit -1, gen 0)."""
    x, _ = inputs(6, B=1)
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 1, 1] = float("inf")
    maps = anomfast.score_maps(x, methods=["max_logit", "msp", "energy", "entropy", "gen"])
    for m, v in maps.items():
        assert torch.isnan(v[0, 0, 0]) and torch.isnan(v[0, 1, 1]), m
        assert bool(torch.isfinite(v[0, 2:]).all()), m


def test_sml_statistics_are_validated_and_nonfinite_scores_counted():
    from anomfast.sml import SMLStats
    with pytest.raises(ValueError, match="finite"):
        SMLStats(np.array([5, 5]), np.array([1.0, np.nan]), np.array([3.0, 3.0]))
    huge = SMLStats(np.array([5, 5]), np.array([1e300, 5.0]), np.array([1e300, 20.0]))
    x, y = inputs(7, C=2)
    with pytest.raises(ValueError, match="finite float32"):
        anomfast.evaluate(x, y, methods=["sml"], sml=huge)
    # finite statistics whose score overflows float32 for these logits: counted, not binned
    st = SMLStats(np.array([10, 10]), np.array([-3e39, -3e39]), np.array([9.1e77, 9.1e77]))
    assert np.isfinite(st.mean.astype(np.float32)).all()
    x = torch.full((1, 2, 4, 5), 3e38)
    x[0, 1] = 0.0
    y = torch.zeros(1, 4, 5, dtype=torch.uint8)
    y[0, 0, :2] = 1
    with pytest.raises(ValueError, match="non-finite"):
        anomfast.evaluate(x, y, methods=["sml", "max_logit"], sml=st)
    r = anomfast.evaluate(x, y, methods=["sml", "max_logit"], sml=st, nonfinite="ignore")
    assert r.pixels["nonfinite"] == 20 and r.pixels["binned"] == 0


@pytest.mark.skipif(not hasattr(torch, "uint16"), reason="torch without uint16")
def test_uint16_and_uint32_labels():
    x, y = inputs(8)
    lm = anomfast.LabelMap(anomaly_ids=[1000], void_ids=[65535], normal_ids=[0])
    raw = np.where(y.numpy() == 1, 1000, 0).astype(np.uint16)
    raw[0, 0, 0] = 65535
    want = anomfast.evaluate(x, torch.from_numpy(raw.astype(np.int64)), methods=["energy"], label_map=lm)
    for dt in (np.uint16, np.uint32):
        got = anomfast.evaluate(x, torch.from_numpy(raw.astype(dt)), methods=["energy"], label_map=lm)
        assert got["energy"].auroc == want["energy"].auroc and got.pixels == want.pixels


def test_misaligned_and_extreme_inputs():
    """A float32 view at an odd byte offset is read correctly (copied, not misread), and
    labels at the int64 limits are invalid labels, not undefined behaviour."""
    x, y = inputs(9)
    raw = np.zeros(x.numel() * 4 + 1, np.uint8)
    raw[1:] = x.numpy().view(np.uint8).ravel()
    mis = np.frombuffer(raw.data, dtype=np.float32, offset=1, count=x.numel()).reshape(x.shape)
    assert mis.ctypes.data % 4 != 0
    assert anomfast.evaluate(mis, y, methods=["energy"])["energy"].auroc == \
        anomfast.evaluate(x, y, methods=["energy"])["energy"].auroc
    yy = y.to(torch.int64)
    yy[0, 0, 0] = torch.iinfo(torch.int64).max
    yy[0, 0, 1] = torch.iinfo(torch.int64).min
    lm = anomfast.LabelMap(anomaly_ids=[1], void_ids=[-5], normal_ids=[0])
    with pytest.raises(ValueError, match="not in the label map"):
        anomfast.evaluate(x, yy, methods=["energy"], label_map=lm)


def test_torchmetrics_adapter_state_is_checked():
    pytest.importorskip("torchmetrics")
    assert_clean_error(SETUP + """
from anomfast.tm import AnomalyMetrics
m = AnomalyMetrics(methods=["energy"])
m.update(x, y)
""", "m.hist = torch.zeros(1, 2, 100, dtype=torch.int64)  # a foreign / compacted state", "m.update(x, y)")


def test_threshold_bounds_span_the_bin_for_methods_without_signatures():
    """msp / energy / sml keep no tie signature (0): their thresholds' bounds are the
    bin's range, not a point at its lower edge; max_logit of bf16 logits (ties) is a point."""
    x, y = inputs(10, B=2, H=40, W=50)
    r = anomfast.evaluate(x, y, methods=["msp", "energy", "max_logit"])
    for m in ("msp", "energy"):
        for k in ("threshold", "fpr95_threshold"):
            lo, hi = r[m].bounds[k]
            assert lo < hi and lo <= getattr(r[m], k) <= hi, (m, k, r[m].bounds[k])
    rb = anomfast.evaluate(x.to(torch.bfloat16), y, methods=["max_logit"])["max_logit"]
    assert rb.bounds["threshold"][0] == rb.bounds["threshold"][1] == rb.threshold


def test_core_refuses_unknown_method_codes_and_bad_arguments():
    """The compiled entry checks every code and size it is given (checks.h): an unknown
    method code is an error (it once computed GEN), as are bad dtype codes, null buffers
    for what the methods need, and sig_mask bits past the methods."""
    from anomfast._core import _C
    x = torch.randn(1, 3, 4, 5)
    counters = torch.zeros(int(_C.N_COUNTERS), dtype=torch.int64)
    maps = torch.zeros(1, 1, 4, 5)

    def args(**kw):
        a = _C.FusedArgs()
        a.logits_ptr, a.B, a.C, a.H, a.W = x.data_ptr(), 1, 3, 4, 5
        a.ls_b, a.ls_c, a.ls_h, a.ls_w = x.stride()
        a.counters_ptr, a.maps_ptr = counters.data_ptr(), maps.data_ptr()
        a.methods = [0]
        for k, v in kw.items():
            setattr(a, k, v)
        return a

    _C.fused(args())  # the baseline call is accepted
    assert torch.equal(maps[0, 0], -x[0].max(dim=0).values)
    for kw, msg in [({"methods": [8]}, "method code 8"), ({"methods": [-1]}, "method code -1"),
                    ({"logit_dtype": 9}, "logit dtype"), ({"methods": [6]}, "heat needs"),
                    ({"methods": [7]}, "external method needs"), ({"methods": [3]}, "sml needs"),
                    ({"sig_mask": 2}, "sig_mask"), ({"logits_ptr": 0}, "logits pointer"),
                    ({"counters_ptr": 0}, "counters pointer"), ({"temperature": 0.0}, "temperatures"),
                    ({"labels_ptr": x.data_ptr(), "label_dtype": 99}, "label dtype"),
                    ({"temperature": float("inf")}, "temperatures"), ({"C": 0}, "C >= 1"),
                    ({"B": 2 ** 40, "H": 2 ** 40}, "overflows int64"),
                    ({"ls_c": 2 ** 62}, "logits' strides overflow"),
                    ({"labels_ptr": x.data_ptr(), "label_dtype": 10, "lut_ptr": x.data_ptr(), "lut_len": 4,
                      "ys_w": -(2 ** 63)}, "labels' strides overflow")]:
        with pytest.raises(ValueError, match=msg):
            _C.fused(args(**kw))
    assert set(_C.METHODS) >= set(anomfast.METHODS) and int(_C.METHODS["external"]) == len(_C.METHODS) - 1


@pytest.mark.parametrize("fit", [False, True])
def test_a_label_class_outside_the_label_classes_counts_as_invalid(fit):
    """A hand-filled lookup table may hold a class the cores do not define (LabelMap.lut
    writes only 0 .. 3): such pixels are counted invalid, once (pixel.h: exactly one
    counter per pixel), never binned, in the scoring and in the fit pass alike."""
    from anomfast._core import _C
    from anomfast.histogram import HistState
    x = torch.randn(1, 3, 4, 5)
    y = torch.tensor([0, 1, 2, 3, 4] * 4, dtype=torch.uint8).reshape(1, 4, 5)
    lut = torch.tensor([0, 1, 2, 3, 5], dtype=torch.int8)  # label 4 -> class 5
    counters = torch.zeros(int(_C.N_COUNTERS), dtype=torch.int64)
    a = _C.FitArgs() if fit else _C.FusedArgs()
    a.logits_ptr, a.B, a.C, a.H, a.W = x.data_ptr(), 1, 3, 4, 5
    a.ls_b, a.ls_c, a.ls_h, a.ls_w = x.stride()
    a.labels_ptr, a.label_dtype, a.lut_ptr, a.lut_offset, a.lut_len = y.data_ptr(), 10, lut.data_ptr(), 0, 5
    a.ys_b, a.ys_h, a.ys_w = y.stride()
    a.counters_ptr = counters.data_ptr()
    if fit:
        count, total, totsq = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        a.count_ptr, a.sum_ptr, a.sumsq_ptr = count.data_ptr(), total.data_ptr(), totsq.data_ptr()
        _C.fit_sml(a)
        want = {"void": 8, "invalid": 8, "nonfinite": 0, "binned": 4}  # anomaly pixels are void for the fit
        assert int(count.sum()) == 4
    else:
        st = HistState.new(1, "cpu")
        a.hist_ptr, a.sig_ptr, a.occ_ptr = st.hist.data_ptr(), st.sig.data_ptr(), st.occ.data_ptr()
        a.methods = [0]
        _C.fused(a)
        want = {"void": 4, "invalid": 8, "nonfinite": 0, "binned": 8}
        assert int(st.hist.sum()) == 8
    got = {k: int(counters[int(v)]) for k, v in _C.COUNTERS.items()}
    assert got == want, got


@pytest.mark.filterwarnings("ignore:no normal")
def test_a_huge_class_count_is_refused_not_a_crash():
    """C above the cores' 2^16 classes (a stride-0 view costs no memory, so nothing else
    stops it) is a clear error before anything is allocated per class, not a
    std::bad_alloc thrown out of an OpenMP region (std::terminate: the process aborted)
    nor gigabytes of zeroed scratch per thread; the compiled entries refuse it too."""
    from anomfast import _core, _fused
    from anomfast.methods import resolve
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    assert _core._C.MAX_CLASSES == 2 ** 16
    for C in (2 ** 16 + 1, 2 ** 31 - 1, 2 ** 40):
        x = torch.zeros(1, 1, 1, 1).expand(1, C, 1, 1)
        for call in (lambda: anomfast.evaluate(x, y, methods=["max_logit"]), lambda: anomfast.fit_sml(x),
                     lambda: anomfast.score_maps(x, methods=["msp"])):
            with pytest.raises(ValueError, match=f"C = {C} classes, above the supported 65536"):
                call()
    # the core's own check (a caller past the Python checks)
    x = torch.zeros(1, 1, 1, 1).expand(1, 2 ** 16 + 1, 1, 1)
    with pytest.raises(ValueError, match="class count C = 65537 is above the supported 65536"):
        _fused.launch(x, None, None, _fused.new_counters("cpu"), None, resolve(["max_logit"]).codes, 1.0, 0.1, False,
                      None, None, *anomfast.LabelMap().lut())
    x = torch.zeros(1, 1, 1, 1).expand(1, 2 ** 16, 1, 1)  # the cap itself works
    r = anomfast.evaluate(x, torch.ones(1, 1, 1, dtype=torch.long), methods=["max_logit"])
    assert r.pixels["binned"] == 1


def test_keep_must_be_a_bool_tensor():
    x, y = torch.randn(2, 5, 8, 8), (torch.rand(2, 8, 8) < 0.3).long()
    ev = anomfast.Evaluator(methods=["max_logit"])
    with pytest.raises(TypeError, match="keep must be a bool tensor of shape \\(2,\\), got list"):
        ev.update(x, y, keep=[True, False])
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape \\(2,\\), got torch.int64"):
        ev.update(x, y, keep=torch.tensor([1, 0]))
    ev.update(x, y, keep=torch.tensor([True, False]))
    assert ev.compute().pixels["binned"] == 64



@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's own allocator aborts under an address-space cap (.ci/sanitize)")
def test_scratch_that_cannot_be_allocated_is_a_memory_error_not_an_abort():
    """The CPU core allocates each thread's scratch (C x 64 floats) inside its OpenMP
    region: a failed allocation must come back as MemoryError with nothing added (all
    threads skip the work), not std::terminate. Run in a child whose address space is
    capped just above what it holds, so that C = 2^16's 16 MB per thread cannot fit."""
    code = r'''
import resource, torch, anomfast
x0 = torch.randn(1, 4, 8, 8)
anomfast.fit_sml(x0)  # the OpenMP threads exist before the cap
anomfast.evaluate(x0, (torch.arange(64).reshape(1, 8, 8) % 2), methods=["msp"])
x = torch.zeros(1, 1, 1, 1).expand(1, 2 ** 16, 1, 1)
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 20), resource.RLIM_INFINITY))
for name, call in (("fit", lambda: anomfast.fit_sml(x)),
                   ("evaluate", lambda: anomfast.evaluate(x, torch.ones(1, 1, 1, dtype=torch.long), methods=["max_logit"]))):
    try:
        call()
        print(name, "ran")
    except MemoryError:
        print(name, "MemoryError")
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "fit MemoryError" in r.stdout and "evaluate MemoryError" in r.stdout, r.stdout + r.stderr[-2000:]
