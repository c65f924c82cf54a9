"""Corrupt states, odd inputs and silent-wrong-number cases: each must give a clear
Python exception or the right number, never a crash or a wrong metric. Memory-safety
cases run in a subprocess so that a signal fails the test instead of killing pytest."""
from __future__ import annotations

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
    r = run_isolated(f"""
        import torch, anomfast
        x = torch.randn(1, 5, 6, 7); y = torch.zeros(1, 6, 7, dtype=torch.uint8); y[0, 0, :3] = 1
        ev = anomfast.Evaluator(methods=["energy", "msp"])
        ev.update(x, y)
        st = ev.hist
        {CORRUPT_STATES[what]}
        try:
            ev.update(x, y)
        except ValueError as e:
            print("CLEAN:", e)
        """)
    assert r.returncode == 0 and "CLEAN:" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("bad", ["short counters", "int32 counters"])
def test_corrupt_counters_raise(bad):
    r = run_isolated(f"""
        import torch, anomfast
        x = torch.randn(1, 5, 6, 7); y = torch.zeros(1, 6, 7, dtype=torch.uint8)
        ev = anomfast.Evaluator(methods=["energy"])
        ev.update(x, y)
        ev.counters = ev.counters[:2].clone() if {bad!r} == "short counters" else ev.counters.to(torch.int32)
        try:
            ev.update(x, y)
        except ValueError as e:
            print("CLEAN:", e)
        """)
    assert r.returncode == 0 and "CLEAN:" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


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
