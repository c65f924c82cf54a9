"""Edges a fuzzing review found (2026-12-04): integer scores past float64's exact range
under evaluate_scores(exact=True), NaN coordinates and mismatched lengths in
Histogram.from_scores, component counts that could overflow after a loaded state,
component sizes past int64 and NumPy arrays torch cannot wrap in component_metrics,
uint64 labels, labels passed to score_maps as methods, and histogram metadata that JSON
cannot hold (save) or that save_histograms never writes (load)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anomfast
from anomfast import components as comp
from anomfast.histogram import Histogram


# ---------------------------------------------------------------- evaluate_scores(exact=True)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_exact_integer_scores_beyond_2_53_are_refused(dtype):
    """float64 made 2^53 and 2^53 + 1 one tie: AUROC 0.5 and threshold 2^53 reported as
    exact, where the exact values are 0.75 and 2^53 + 1."""
    s = np.array([2**53, 2**53 + 1, 2**60, 2**60 + 1], dtype=dtype)
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"3 integer values beyond \+-2\^53.*rescale.*or pass float scores"):
        anomfast.evaluate_scores(s, y, exact=True)
    if dtype == np.int64:
        with pytest.raises(ValueError, match=r"1 integer values beyond \+-2\^53"):
            anomfast.evaluate_scores(np.array([-2**53 - 1, 0, 1, 2]), y, exact=True)
    # their ranks (an increasing map) give the exact metrics
    r = anomfast.evaluate_scores(np.argsort(np.argsort(s)).astype(dtype), y, exact=True)["custom"]
    assert r.auroc == 0.75 and r.f1 == 0.8
    # integers up to 2^53 are exact in float64, void pixels beyond it do not count
    r = anomfast.evaluate_scores(np.array([2**53, 2**53 - 1, 3, 2**62], dtype=dtype), np.array([1, 0, 0, 255]),
                                 exact=True)["custom"]
    assert r.auroc == 1.0 and r.threshold == 2.0**53
    # the binned path stays honest: its certified bounds hold the exact values
    r = anomfast.evaluate_scores(s, y)["custom"]
    assert r.bounds["auroc"][0] <= 0.75 <= r.bounds["auroc"][1] and r.bounds["f1"][0] <= 0.8 <= r.bounds["f1"][1]


# ---------------------------------------------------------------- Histogram.from_scores


def test_from_scores_refuses_nan_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r"1 of 3 coordinates are NaN.*nonfinite='ignore'"):
        Histogram.from_scores("custom", np.array([np.nan, 1.0, 0.5]), np.array([True, False, False]))
    with pytest.raises(ValueError, match="2 coordinates but 3 anomaly flags"):
        Histogram.from_scores("custom", np.array([1.0, 0.5]), np.array([True, False, False]))
    with pytest.raises(ValueError, match="3 coordinates but 2 anomaly flags"):
        Histogram.from_scores("custom", np.array([1.0, 0.5, 0.2]), np.array([True, False]))
    # infinities have their own bins
    h = Histogram.from_scores("custom", np.array([np.inf, 1.0, 0.5, -np.inf]), np.array([True, False, True, False]))
    assert h.n_anomaly == 2 and h.n_normal == 2 and h.finalize().auroc == 0.75
    r = anomfast.evaluate_scores(np.array([np.nan, 1.0, 0.5, 0.7]), np.array([1, 0, 0, 1]), nonfinite="ignore")
    assert r.pixels["custom"]["nonfinite"] == 1 and r["custom"].auroc == 0.5


# ---------------------------------------------------------------- component counts


def _scene(seed: int, B: int = 3, H: int = 24, W: int = 32):
    """Scores (B, H, W) float64 and labels (0 normal, 1 anomaly, 255 void) with a few
    anomaly blocks, the scores high on most of them and on some normal blocks."""
    g = np.random.default_rng(seed)
    y = np.zeros((B, H, W), np.int64)
    s = g.normal(0, 0.3, (B, H, W))
    for b in range(B):
        for _ in range(3):
            r0, c0 = int(g.integers(0, H - 6)), int(g.integers(0, W - 6))
            h, w = int(g.integers(2, 6)), int(g.integers(2, 6))
            y[b, r0:r0 + h, c0:c0 + w] = 1
            s[b, r0:r0 + h, c0:c0 + w] += g.uniform(0.5, 2.0)
        r0, c0 = int(g.integers(0, H - 4)), int(g.integers(0, W - 4))
        s[b, r0:r0 + 3, c0:c0 + 3] += 1.5  # a false positive
        y[b, 0, :4] = 255
    return s, y


SIZES = dict(thresh_segsize=3, thresh_instsize=2)


def _accumulator(names=("custom",)):
    spec = comp.ComponentSpec(**SIZES)
    return comp.ComponentAccumulator(list(names), spec, {n: 0.8 for n in names})


def _counted():
    acc = _accumulator()
    s, y = _scene(0)
    acc.update_scores(0, torch.from_numpy(s), acc.classes(torch.from_numpy(y)))
    assert acc.results()["custom"].n_gt > 0 and acc.results()["custom"].n_pred > 0
    return acc


def test_loaded_component_counts_that_could_overflow_are_refused():
    acc = _counted()
    st = acc.state()
    for slot in (comp.IMAGES, comp.N_GT, comp.N_PRED, comp.SIOU_GT, comp.TP, comp.FP + comp.N_TAU - 1):
        c = st["counts"].clone()
        c[0, slot] = 2**63 - 1  # loaded, then one more image wrapped to negative counts
        with pytest.raises(ValueError, match=r"exceeds 2\^62.*overflow"):
            _accumulator().load_state(dict(st, counts=c))
    # the cap itself loads (n_images has no relation to the other columns)
    c = st["counts"].clone()
    c[0, comp.IMAGES] = 2**62
    ok = _accumulator()
    ok.load_state(dict(st, counts=c))
    s, y = _scene(1)
    ok.update_scores(0, torch.from_numpy(s), ok.classes(torch.from_numpy(y)))
    assert ok.results()["custom"].n_images == 2**62 + 3
    # two such states summed wrap: an error, not negative counts
    other = _accumulator()
    other.load_state(dict(st, counts=c))
    with pytest.raises(ValueError, match="overflowed int64"):
        ok.merge_(other).results()
    # an unchanged state loads and gives the same results
    same = _accumulator()
    same.load_state(st)
    assert json.dumps(same.results()["custom"].as_dict()) == json.dumps(acc.results()["custom"].as_dict())


def test_loaded_component_counts_must_be_consistent():
    st = _counted().state()
    r = [int(v) for v in st["counts"][0].tolist()]
    n_gt, n_pred = r[comp.N_GT], r[comp.N_PRED]

    def refused(slot, value, match):
        c = st["counts"].clone()
        c[0, slot] = value
        with pytest.raises(ValueError, match=match):
            _accumulator().load_state(dict(st, counts=c))

    refused(comp.TP, n_gt + 1, "at most n_gt")                       # more true positives than components
    refused(comp.FP + comp.N_TAU - 1, n_pred + 1, "at most\\s+n_pred")  # more false positives than segments
    c = st["counts"].clone()
    c[0, comp.TP:comp.TP + comp.N_TAU] = torch.arange(comp.N_TAU)  # increasing with tau
    c[0, comp.N_GT] = comp.N_TAU
    with pytest.raises(ValueError, match="must not increase"):
        _accumulator().load_state(dict(st, counts=c))
    c = st["counts"].clone()
    c[0, comp.FP:comp.FP + comp.N_TAU] = torch.arange(comp.N_TAU, 0, -1)  # decreasing with tau
    c[0, comp.N_PRED] = comp.N_TAU
    with pytest.raises(ValueError, match="not decrease"):
        _accumulator().load_state(dict(st, counts=c))
    # a quotient sum above its count: sIoU_gt = 1 + 2^-28 per component on average
    c = st["counts"].clone()
    c[0, comp.SIOU_GT:comp.SIOU_GT + 3] = torch.tensor([n_gt << comp._LIMB, 1, 0])
    with pytest.raises(ValueError, match="sIoU_gt sum exceeds"):
        _accumulator().load_state(dict(st, counts=c))
    c[0, comp.SIOU_GT:comp.SIOU_GT + 3] = torch.tensor([n_gt << comp._LIMB, 0, 0])  # all 1: fine
    _accumulator().load_state(dict(st, counts=c))


def test_evaluator_refuses_a_component_state_that_could_overflow():
    x = torch.randn(2, 3, 16, 16)
    y = torch.zeros(2, 16, 16, dtype=torch.int64)
    y[:, 4:9, 4:9] = 1
    cs = dict(SIZES, thresholds={"energy": -1.0})
    ev = anomfast.Evaluator(methods=["energy"], components=cs)
    ev.update(x, y)
    st = ev.state_dict()
    counts = st["components"]["counts"].clone()
    counts[0, comp.IMAGES] = 2**63 - 1
    bad = dict(st, components=dict(st["components"], counts=counts))
    with pytest.raises(ValueError, match=r"exceeds 2\^62"):
        anomfast.Evaluator(methods=["energy"], components=cs).load_state_dict(bad)


# ---------------------------------------------------------------- component_metrics inputs


@pytest.mark.parametrize("name", ["thresh_segsize", "thresh_instsize"])
def test_component_sizes_past_the_pixel_range_are_refused(name):
    s, y = _scene(2)
    with pytest.raises(ValueError, match=rf"{name} must be at most 2\^31"):
        anomfast.component_metrics(s, y, 0.8, **{name: 2**70})
    with pytest.raises(ValueError, match=rf"{name} must be at most 2\^31"):
        comp.ComponentSpec(**{name: 2**31 + 1})
    with pytest.raises(ValueError, match=rf"{name} must be at most 2\^31"):
        anomfast.evaluate(torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long),
                          components={name: np.uint64(2**64 - 1), "thresholds": {m: 0.0 for m in
                                                                                 ("max_logit", "msp", "energy")}})
    r = anomfast.component_metrics(s, y, 0.8, **{name: 2**31})  # the largest: every segment / component dropped
    assert r.n_pred == 0 if name == "thresh_segsize" else r.n_gt == 0


def test_component_metrics_copy_arrays_torch_cannot_wrap():
    s, y = _scene(3)
    want = anomfast.component_metrics(s, y, 0.8, **SIZES).as_dict()
    s_rev, y_rev = np.ascontiguousarray(s[:, ::-1]), np.ascontiguousarray(y[:, ::-1])
    flipped = anomfast.component_metrics(s_rev[:, ::-1], y_rev[:, ::-1], 0.8, **SIZES).as_dict()  # negative strides
    assert json.dumps(flipped) == json.dumps(want)
    swapped = anomfast.component_metrics(s.astype(s.dtype.newbyteorder()), y.astype(y.dtype.newbyteorder()), 0.8,
                                         **SIZES).as_dict()  # non-native byte order
    assert json.dumps(swapped) == json.dumps(want)
    one = anomfast.component_metrics(s[0][::-1, ::-1], y[0][::-1, ::-1], 0.8, **SIZES)  # (H, W), rotated
    assert one.n_gt == anomfast.component_metrics(s[0], y[0], 0.8, **SIZES).n_gt


# ---------------------------------------------------------------- uint64 labels


def _evaluate_uint64_message() -> str:
    with pytest.raises(TypeError) as e:
        anomfast.evaluate(np.zeros((1, 3, 2, 2), np.float32), np.zeros((1, 2, 2), np.uint64))
    return str(e.value)


def test_uint64_labels_are_refused_as_evaluate_refuses_them():
    msg = _evaluate_uint64_message()
    assert "uint64" in msg
    s = np.array([[0.9, 0.1], [0.2, 0.8]])
    # 2^64 - 1 wrapped to -1, which a label map with -1 as void silently voided
    y = np.array([[1, 0], [0, 2**64 - 1]], np.uint64)
    lm = anomfast.LabelMap(anomaly_ids=[1], void_ids=[-1], normal_ids=[0])
    for labels in (y, torch.from_numpy(y)):
        with pytest.raises(TypeError) as e:
            anomfast.evaluate_scores(s, labels, label_map=lm)
        assert str(e.value) == msg
        with pytest.raises(TypeError) as e:
            anomfast.component_metrics(s, labels, 0.5, label_map=lm)
        assert str(e.value) == msg
    # the integer dtypes evaluate reads still work
    for dt in (np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.int64, np.bool_):
        yy = np.array([[1, 0], [0, 0]]).astype(dt)
        assert anomfast.evaluate_scores(s, yy)["custom"].auroc == 1.0
        assert anomfast.component_metrics(s, yy, 0.5, thresh_segsize=0, thresh_instsize=0).n_gt == 1


# ---------------------------------------------------------------- score_maps(logits, labels)


def test_score_maps_with_labels_as_methods_is_a_clear_type_error():
    x = torch.randn(1, 3, 4, 4)
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    for labels in (y, y.numpy()):
        with pytest.raises(TypeError, match="methods must be method names.*score_maps takes no labels"):
            anomfast.score_maps(x, labels)
    maps = anomfast.score_maps(x, ("max_logit",))
    assert set(maps) == {"max_logit"} and maps["max_logit"].shape == (1, 4, 4)


# ---------------------------------------------------------------- histogram files


def _hist(params=None):
    return Histogram.from_scores("custom", np.array([1.0, 0.5, 0.2]), np.array([True, False, False]), params)


def test_save_histograms_names_metadata_json_cannot_hold(tmp_path):
    p = tmp_path / "h.npz"
    with pytest.raises(TypeError, match=r"histogram 'a': params\['scale'\] \(float32\)"):
        anomfast.save_histograms(p, {"a": _hist({"scale": np.float32(2)})})
    with pytest.raises(TypeError, match=r"extra\['run'\]\['seed'\] \(int64\)"):
        anomfast.save_histograms(p, {"a": _hist()}, extra={"run": {"seed": np.int64(3), "ok": 1}})
    with pytest.raises(TypeError, match=r"extra\['x'\] \(object\)"):
        anomfast.save_histograms(p, {"a": _hist()}, extra={"x": object()})
    with pytest.raises(TypeError, match=r"extra \(dict\).*keys must be"):
        anomfast.save_histograms(p, {"a": _hist()}, extra={("model", "m"): 1})
    assert not p.exists()  # refused before anything is written
    anomfast.save_histograms(p, {"a": _hist({"scale": 2.0})}, extra={"run": {"seed": 3}})
    hists, extra = anomfast.load_histograms(p)
    assert hists["a"] == _hist({"scale": 2.0}) and extra == {"run": {"seed": 3}}


def test_load_histograms_refuses_a_boolean_key(tmp_path):
    p = tmp_path / "h.npz"
    anomfast.save_histograms(p, {"a": _hist(), 7: _hist()})
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(anomfast.load_histograms(p)[0]) == {"a", 7}
    meta = json.loads(str(arrays["meta"]))
    meta["histograms"][0]["key"] = True  # JSON true: save_histograms refuses such a key
    arrays["meta"] = np.array(json.dumps(meta))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="histogram 0: 'key' is the JSON boolean true"):
        anomfast.load_histograms(bad)
    with pytest.raises(TypeError, match="histogram keys must be strings"):
        anomfast.save_histograms(tmp_path / "c.npz", {True: _hist()})
