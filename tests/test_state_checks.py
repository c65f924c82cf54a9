"""Loaded state, saved files and public arrays are checked before the core or the metrics
see them: clear errors, never a crash, an overflow or a silently wrong number."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anomfast
from anomfast import _core, binning
from anomfast.histogram import HistState


def _batch(seed=0, B=2, C=5, H=8, W=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), (torch.rand(B, H, W, generator=g) < 0.3).long()


def _evaluator(methods=("max_logit",)):
    ev = anomfast.Evaluator(methods=list(methods))
    ev.update(*_batch())
    return ev


# ---------------------------------------------------------------- torchmetrics compute


def test_tm_compute_keeps_histograms_and_pixels():
    tm = pytest.importorskip("anomfast.tm")
    m = tm.AnomalyMetrics(methods=["max_logit", "energy"])
    x, y = _batch()
    m.update(x, y)
    r = m.compute()
    assert r.pixels["binned"] == y.numel() and set(r.histograms) == {"max_logit", "energy"}
    assert r.histograms["energy"].n_normal + r.histograms["energy"].n_anomaly == y.numel()
    assert m.compute().histograms is r.histograms  # the cached result keeps them too
    m.to(torch.float64)  # torchmetrics' _apply maps the cached result again
    assert hasattr(m.compute(), "pixels")
    assert set(m.compute_flat()) >= {"energy/auroc", "max_logit/f1"}
    ref = anomfast.evaluate(x, y, methods=["max_logit", "energy"])
    assert r["energy"].auroc == ref["energy"].auroc


# ---------------------------------------------------------------- Evaluator counters


def test_loaded_counters_past_the_total_bound_are_refused():
    d = _evaluator().state_dict()
    for bad in (2 ** 63 - 10, 2 ** 62 + 1):
        e = dict(d, counters=d["counters"].clone())
        e["counters"][_core.CNT_VOID] = bad
        with pytest.raises(ValueError, match="2\\^62"):
            anomfast.Evaluator(methods=["max_logit"]).load_state_dict(e)
    e = dict(d, counters=d["counters"].clone())  # each fits, the sum does not
    e["counters"][_core.CNT_VOID] = e["counters"][_core.CNT_INVALID] = 2 ** 61 + 1
    with pytest.raises(ValueError, match="2\\^62"):
        anomfast.Evaluator(methods=["max_logit"]).load_state_dict(e)


def test_loaded_counters_must_match_the_histograms():
    d = _evaluator(("max_logit", "energy")).state_dict()
    for c in ([0, 0, 0, 5], [0, 0, 0, 0], [0, 0, 5, 123]):
        e = dict(d, counters=torch.tensor(c))
        with pytest.raises(ValueError, match="binned"):
            anomfast.Evaluator(methods=["max_logit", "energy"]).load_state_dict(e)
    e = dict(d, counters=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        anomfast.Evaluator(methods=["max_logit", "energy"]).load_state_dict(e)
    ok = anomfast.Evaluator(methods=["max_logit", "energy"])
    ok.load_state_dict(d)
    assert ok.compute().pixels["binned"] == 128


def test_compute_checks_buffers_set_from_outside():
    ev = _evaluator()
    ev.counters = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="counters must be"):
        ev.compute()


def _tm_state(methods=("max_logit",)):
    tm = pytest.importorskip("anomfast.tm")
    m = tm.AnomalyMetrics(methods=list(methods))
    m.persistent(True)
    m.update(*_batch())
    return tm, {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # a loaded metric computes before any update()
def test_tm_loaded_state_is_checked():
    tm, s = _tm_state()
    fresh = tm.AnomalyMetrics(methods=["max_logit"])
    fresh.persistent(True)
    fresh.load_state_dict(dict(s))
    assert fresh.compute().pixels["binned"] == 128
    bad = {
        "counters": (torch.tensor([0, 0, 0, 5]), "binned"),
        "counters ": (torch.zeros(4, dtype=torch.int64), "binned"),
        "counters  ": (torch.zeros(3, dtype=torch.int64), "counters must be"),
        "counters   ": (torch.zeros(5, dtype=torch.float64), "counters must be"),
        "counters    ": (torch.tensor([0, 2 ** 62, 0, 128]), "2\\^62"),
        "occ": (torch.zeros_like(s["occ"]), "occupancy"),
        "hist": (torch.zeros(2, 2, binning.NBINS, dtype=torch.int64), "histogram counts"),
    }
    for key, (value, msg) in bad.items():
        m = tm.AnomalyMetrics(methods=["max_logit"])
        m.persistent(True)
        with pytest.raises(ValueError, match=msg):
            m.load_state_dict(dict(s, **{key.strip(): value}))
        assert int(m.counters.sum()) == 0  # refused before any state was replaced
    h = s["hist"].clone()  # a count in a block whose occupancy byte is 0
    h[0, 0, binning.NBINS - 1] = 7
    m = tm.AnomalyMetrics(methods=["max_logit"])
    m.persistent(True)
    with pytest.raises(ValueError, match="occupancy"):
        m.load_state_dict(dict(s, hist=h, counters=s["counters"] + torch.tensor([0, 0, 0, 7])))
    h = s["hist"].clone()  # a negative count balanced by a positive one
    i = int(torch.nonzero(h[0, 0])[0])
    h[0, 0, i] -= 1000
    h[0, 1, i] += 1000
    m = tm.AnomalyMetrics(methods=["max_logit"])
    m.persistent(True)
    with pytest.raises(ValueError, match="negative"):
        m.load_state_dict(dict(s, hist=h))


# ---------------------------------------------------------------- histogram files


def _assert_refused(path, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        anomfast.load_histograms(path)
    from anomfast.cli.app import main
    assert main(["report", "--histograms", str(path), "--out", str(tmp_path / "o")]) == 2


def test_histogram_file_with_bad_metadata(tmp_path):
    res = anomfast.evaluate(*_batch(), methods=["max_logit", "energy"])
    p = tmp_path / "h.npz"
    anomfast.save_histograms(p, res.histograms)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))

    def write(meta_value, **drop):
        q = tmp_path / "bad.npz"
        a = {k: v for k, v in arrays.items() if k not in drop}
        a["meta"] = np.array(meta_value if isinstance(meta_value, str) else json.dumps(meta_value))
        np.savez(q, **a)
        return q

    _assert_refused(write("[1,2]"), "JSON object", tmp_path)
    _assert_refused(write("{not json"), "JSON", tmp_path)
    for key in ("binning", "histograms"):
        _assert_refused(write({k: v for k, v in meta.items() if k != key}), repr(key), tmp_path)
    for key in ("method", "key", "params"):
        m = json.loads(json.dumps(meta))
        del m["histograms"][1][key]
        _assert_refused(write(m), repr(key), tmp_path)
    m = json.loads(json.dumps(meta))
    m["histograms"][1]["key"] = m["histograms"][0]["key"]
    _assert_refused(write(m), "twice", tmp_path)
    m = json.loads(json.dumps(meta))
    m["histograms"][0] = "max_logit"
    _assert_refused(write(m), "JSON object", tmp_path)
    _assert_refused(write(meta, h1_sig=1), "h1_sig", tmp_path)
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    _assert_refused(text, "not a valid .npz", tmp_path)
    assert anomfast.load_histograms(write(meta))[0] == res.histograms
    raw = p.read_bytes()  # damaged members (bad CRC, a broken deflate stream): named, never a zlib.error
    for frac in (0.3, 0.5, 0.7):
        i = int(len(raw) * frac)
        (tmp_path / "damaged.npz").write_bytes(raw[:i] + bytes(40) + raw[i + 40:])
        _assert_refused(tmp_path / "damaged.npz", "cannot be read|not a valid", tmp_path)


def test_stats_file_with_bad_metadata(tmp_path):
    p = tmp_path / "s.npz"
    np.savez(p, meta=np.array("[1,2]"))
    with pytest.raises(ValueError, match="JSON object"):
        anomfast.SMLStats.load(p)
    t = tmp_path / "t.npz"
    t.write_text("hello\n")
    with pytest.raises(ValueError, match="not a valid .npz"):
        anomfast.SMLStats.load(t)


# ---------------------------------------------------------------- HistState.from_state


def test_from_state_names_what_is_wrong():
    d = _evaluator(("max_logit", "energy")).state_dict()
    h = dict(d["hist"], methods=d["hist"]["methods"][:1])
    with pytest.raises(ValueError, match="holds 1 method.*expected 2"):
        HistState.from_state(h, 2, "cpu")
    for entries in (["a", "b"], [d["hist"]["methods"][0], None]):
        with pytest.raises(ValueError, match="method [01]: expected a dict of 'index, normal, anomaly, sig'"):
            HistState.from_state(dict(d["hist"], methods=entries), 2, "cpu")
    with pytest.raises(ValueError, match="list"):
        HistState.from_state(dict(d["hist"], methods="ab"), 2, "cpu")


# ---------------------------------------------------------------- Histogram.finalize


def _hist():
    return anomfast.evaluate(*_batch(), methods=["max_logit"]).histograms["max_logit"]


def test_finalize_checks_the_public_arrays():
    h = _hist()
    h.normal[0] = -100
    with pytest.raises(ValueError, match="negative"):
        h.finalize()
    h = _hist()
    h.anomaly[-1] = -1
    with pytest.raises(ValueError, match="negative"):
        h.finalize()
    h = _hist()
    h.normal[0] = h.anomaly[0] = 2 ** 62
    with pytest.raises(ValueError, match="2\\^62"):
        h.finalize()
    h = _hist()
    h.sig = h.sig[:-1]
    with pytest.raises(ValueError, match="differ in length"):
        h.finalize()
    h = _hist()
    h.normal = h.normal.astype(np.float64)
    with pytest.raises(ValueError, match="'normal' must be a 1-d int64 array"):
        h.finalize()
    h = _hist()
    h.index = h.index[::-1].copy()
    with pytest.raises(ValueError, match="increasing"):
        h.finalize()
    h = _hist()
    h.sig[0] = -1
    with pytest.raises(ValueError, match="uint32"):
        anomfast.histogram.finalize_histograms({"a": h})
    h = _hist()
    assert h.finalize().auroc == anomfast.evaluate(*_batch(), methods=["max_logit"])["max_logit"].auroc
