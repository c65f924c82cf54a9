"""Component metrics (anomfast.components) against a float64 NumPy / scipy transcription of
the SegmentMeIfYouCan benchmark's definitions (road-anomaly-benchmark,
metrics/instance_segmentation.py: default_instancer, segment_metrics,
MetricSegment.aggregate), and against the clean definition for mode="clean"."""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import anomfast
from anomfast import _fused
from anomfast import components as comp
from anomfast.methods import resolve

ndimage = pytest.importorskip("scipy.ndimage")

STRUCT = np.ones((3, 3), dtype=np.uint8)
TAUS = np.linspace(0.25, 0.75, 11, endpoint=True)


# ---------------------------------------------------------------- the references


def _adjusted(a, b, i):
    """The benchmark's loop body for component i of map a against map b (the same code
    with the roles of ground truth and prediction swapped): intersection with the
    components of b touching it, and the union less the parts of those lying on other
    components of a."""
    tp_loc = b[a == i]
    ind = np.unique(tp_loc[tp_loc != 0])
    intersection = len(tp_loc[np.isin(tp_loc, ind)])
    adjustment = len(b[np.logical_and(~np.isin(a, [0, i]), np.isin(b, ind))])
    union = int(np.sum(np.isin(b, ind)) + np.sum(a == i) - intersection - adjustment)
    return intersection, union


def _segment_metrics(inst, seg, taus, clean):
    """segment_metrics on the flattened region of interest (inst / seg: component ids, 0 =
    none), loop for loop; also returns the integer numerators / denominators."""
    out = {"siou_gt": [], "siou_pred": [], "prec": [], "gt_int": [], "pred_int": []}
    for i in np.unique(inst[inst > 0]):
        intersection, union = _adjusted(inst, seg, i)
        out["siou_gt"].append(intersection / union)
        out["gt_int"].append((intersection, union))
    for i in np.unique(seg[seg > 0]):
        intersection, union = _adjusted(seg, inst, i)
        size = int(np.sum(seg == i))
        out["siou_pred"].append(intersection / union)
        out["prec"].append(intersection / size)
        out["pred_int"].append((intersection, size, union))
    s_gt, prec = np.array(out["siou_gt"]), np.array(out["prec"])
    if clean:  # tau = k / 20 compared exactly
        ks = range(5, 16)
        out["tp"] = [sum(Fraction(a, b) >= Fraction(k, 20) for a, b in out["gt_int"]) for k in ks]
        out["fn"] = [len(out["gt_int"]) - t for t in out["tp"]]
        out["fp"] = [sum(Fraction(a, s) < Fraction(k, 20) for a, s, _ in out["pred_int"]) for k in ks]
    else:
        out["tp"] = [np.count_nonzero(s_gt >= t) for t in taus]
        out["fn"] = [np.count_nonzero(s_gt < t) for t in taus]
        out["fp"] = [np.count_nonzero(prec < t) for t in taus]
    return out


def ref_benchmark(score, label, thr, segsize, instsize):
    """default_instancer + segment_metrics of the benchmark (label 0 / 1 / 255)."""
    segmentation = np.zeros(score.shape)
    segmentation[score > thr] = 1
    anomaly_gt = (label == 1).astype(np.float64)
    anomaly_pred = (segmentation == 1).astype(np.float64)
    anomaly_pred[label == 255] = 0
    instances, n_gt = ndimage.label(anomaly_gt, STRUCT)
    seg_pred, n_seg = ndimage.label(anomaly_pred, STRUCT)
    mask = seg_pred.copy()
    for c in range(n_seg + 1):
        if len(seg_pred[mask == c]) < segsize:
            seg_pred[mask == c] = 0
    mask = instances.copy()
    label = label.copy()
    for c in range(n_gt + 1):  # from id 0, the background, as the benchmark loops
        if len(instances[mask == c]) < instsize:
            label[mask == c] = 255
    roi = label < 255
    return _segment_metrics(instances[roi], seg_pred[roi], TAUS, clean=False)


def ref_clean(score, label, thr, segsize, instsize):
    """The definition: small instances void first, then 'score >= t' labeled inside the
    region of interest, exact thresholds k / 20."""
    instances, n_gt = ndimage.label(label == 1, STRUCT)
    sizes = np.bincount(instances.ravel(), minlength=n_gt + 1)
    void = (label == 255) | ((instances > 0) & (sizes[instances] < instsize))
    seg_pred, n_seg = ndimage.label((score >= thr) & ~void, STRUCT)
    psizes = np.bincount(seg_pred.ravel(), minlength=n_seg + 1)
    seg_pred[psizes[seg_pred] < segsize] = 0
    roi = ~void
    return _segment_metrics(instances[roi], seg_pred[roi], TAUS, clean=True)


def ref_aggregate(frames):
    """MetricSegment.aggregate (float sums in its order), plus the exact means."""
    def mean(key):
        n = sum(len(r[key]) for r in frames)
        return (sum(np.sum(r[key]) for r in frames) / n if n else float("nan"),
                float(sum(Fraction(v) for r in frames for v in r[key]) / n) if n else float("nan"))
    out = {"siou_gt": mean("siou_gt"), "siou_pred": mean("siou_pred"), "ppv": mean("prec")}
    f1s, f1_mean = [], 0.0
    for k in range(11):
        tp, fn, fp = (sum(int(r[c][k]) for r in frames) for c in ("tp", "fn", "fp"))
        f1 = (2 * tp) / (2 * tp + fn + fp) if 2 * tp + fn + fp else float("nan")
        f1s.append(f1)
        f1_mean += f1
    out["f1"], out["mean_f1"] = f1s, f1_mean / 11
    out["tp"] = [sum(int(r["tp"][k]) for r in frames) for k in range(11)]
    out["fp"] = [sum(int(r["fp"][k]) for r in frames) for k in range(11)]
    out["n_gt"] = sum(len(r["gt_int"]) for r in frames)
    out["n_pred"] = sum(len(r["pred_int"]) for r in frames)
    return out


# ---------------------------------------------------------------- scenes


def _disc(H, W, cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def scene(rng, H, W, kind="mixed"):
    """(score float64 (H, W) on a 1/8 grid, so ties with a threshold of 0.5 occur; label
    uint8 0 / 1 / 255)."""
    label = np.zeros((H, W), np.uint8)
    if kind == "empty":
        return np.floor(rng.random((H, W)) * 4) / 8, label
    if kind == "all_void":
        return np.floor(rng.random((H, W)) * 8) / 8, np.full((H, W), 255, np.uint8)
    if kind == "all_anomaly":
        return np.floor(rng.random((H, W)) * 8) / 8, np.ones((H, W), np.uint8)
    gt = np.zeros((H, W), bool)
    for _ in range(rng.integers(3, 9)):
        shape = rng.integers(0, 5)
        cy, cx = rng.integers(-3, H + 3), rng.integers(-3, W + 3)  # some cross the border
        if shape == 0:
            h, w = rng.integers(1, max(2, H // 3)), rng.integers(1, max(2, W // 3))
            gt[max(cy, 0):max(cy + h, 0), max(cx, 0):max(cx + w, 0)] = True
        elif shape == 1:
            gt |= _disc(H, W, cy, cx, rng.integers(1, max(2, min(H, W) // 4)))
        elif shape == 2:  # nested: a ring around a disc, a gap between them
            r = rng.integers(5, max(6, min(H, W) // 3))
            gt |= _disc(H, W, cy, cx, r) & ~_disc(H, W, cy, cx, r - 2)
            gt |= _disc(H, W, cy, cx, r - 4)
        elif shape == 3:  # a diagonal chain: connected only through corners
            n = rng.integers(3, max(4, min(H, W)))
            for k in range(n):
                y, x = cy + k, cx + k
                if 0 <= y < H and 0 <= x < W:
                    gt[y, x] = True
        else:  # two rectangles touching by an edge or a corner
            h, w = rng.integers(2, max(3, H // 4)), rng.integers(2, max(3, W // 4))
            gt[max(cy, 0):max(cy + h, 0), max(cx, 0):max(cx + w, 0)] = True
            gt[max(cy + h, 0):max(cy + 2 * h, 0), max(cx + w, 0):max(cx + 2 * w, 0)] = True
    label[gt] = 1
    for _ in range(rng.integers(0, 4)):  # void inside, across and around components
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        h, w = rng.integers(1, max(2, H // 4)), rng.integers(1, max(2, W // 4))
        label[cy:cy + h, cx:cx + w] = 255
    if rng.random() < 0.3:  # a void frame, as around an image's border
        label[:2], label[-2:], label[:, :2], label[:, -2:] = 255, 255, 255, 255
    score = rng.random((H, W)) * 0.55 + 0.45 * gt * (rng.random((H, W)) < 0.85)
    for _ in range(rng.integers(0, 3)):  # predicted blobs: one may cover several components
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        h, w = rng.integers(2, max(3, H // 2)), rng.integers(2, max(3, W // 2))
        score[cy:cy + h, cx:cx + w] += 0.4
    return np.floor(np.clip(score, 0, 1) * 8) / 8, label


def _batch(rng, n, H, W):
    kinds = ["mixed"] * n
    kinds[:3] = ["empty", "all_void", "all_anomaly"]
    sc, lb = zip(*(scene(rng, H, W, k) for k in kinds))
    return np.stack(sc), np.stack(lb)


@pytest.fixture
def nrng(rng):
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


def _check(res, ref):
    assert (res.n_gt, res.n_pred) == (ref["n_gt"], ref["n_pred"])
    assert list(res.tp) == ref["tp"] and list(res.fp) == ref["fp"]
    assert list(res.fn) == [ref["n_gt"] - t for t in ref["tp"]]
    np.testing.assert_array_equal(np.array(res.f1), np.array(ref["f1"]))
    assert res.mean_f1 == ref["mean_f1"] or (np.isnan(res.mean_f1) and np.isnan(ref["mean_f1"]))
    for k in ("siou_gt", "siou_pred", "ppv"):
        bench, exact = ref[k]
        got = getattr(res, k)
        if np.isnan(exact):
            assert np.isnan(got), k
            continue
        assert got == exact, k  # the exactly rounded mean
        assert abs(got - bench) <= 1e-12 * max(abs(bench), 1e-300), k  # the benchmark's float sums


# ---------------------------------------------------------------- equality with the references


@pytest.mark.parametrize("sizes", [(0, 0), (6, 4), (25, 12), (50, 10)])
@pytest.mark.parametrize("mode", ["benchmark", "clean"])
def test_equals_reference_on_scenes(nrng, sizes, mode):
    scores, labels = _batch(nrng, 16, 48, 64)
    seg, inst = sizes
    ref_fn = ref_benchmark if mode == "benchmark" else ref_clean
    frames = [ref_fn(scores[b], labels[b], 0.5, seg, inst) for b in range(len(scores))]
    res = comp.component_metrics(scores, labels, 0.5, thresh_segsize=seg, thresh_instsize=inst, mode=mode)
    assert res.n_images == len(scores)
    _check(res, ref_aggregate(frames))
    assert res.n_gt >= 10 and res.n_pred >= 5  # many components, not a vacuous comparison


@pytest.mark.parametrize("mode", ["benchmark", "clean"])
def test_per_image_counts_equal_reference(nrng, mode):
    """The integers of every component (intersection, size, adjusted union), image by image."""
    ref_fn = ref_benchmark if mode == "benchmark" else ref_clean
    binarize = (lambda s: s > 0.5) if mode == "benchmark" else (lambda s: s >= 0.5)
    for _ in range(12):
        s, y = scene(nrng, 40, 56)
        cls = np.where(y == 1, comp.ANOMALY, np.where(y == 255, comp.VOID, comp.NORMAL)).astype(np.int8)
        gt, pred = comp.image_counts(binarize(s).astype(np.uint8), cls, 8, 5, mode)
        ref = ref_fn(s, y, 0.5, 8, 5)
        assert sorted(map(tuple, gt.tolist())) == sorted(ref["gt_int"])
        assert sorted(map(tuple, pred.tolist())) == sorted(ref["pred_int"])


def test_track_defaults_on_larger_images(nrng):
    """The anomaly track's 500 / 100 and the obstacle track's 50 / 10 (the defaults)."""
    scores, labels = _batch(nrng, 5, 160, 240)
    for track, (seg, inst) in comp.TRACKS.items():
        frames = [ref_benchmark(scores[b], labels[b], 0.5, seg, inst) for b in range(len(scores))]
        res = comp.component_metrics(scores, labels, 0.5, track=track)
        assert (res.spec["thresh_segsize"], res.spec["thresh_instsize"]) == (seg, inst)
        _check(res, ref_aggregate(frames))


def test_labeling_equals_scipy(nrng):
    """Component count and sizes of random masks of every density (pred = ground truth,
    nothing void: each component is one segment covering it exactly)."""
    for density in (0.05, 0.3, 0.45, 0.6, 0.9):
        for H, W in ((1, 1), (1, 37), (29, 1), (31, 47)):
            fg = (nrng.random((H, W)) < density)
            lab, n = ndimage.label(fg, STRUCT)
            sizes = np.bincount(lab.ravel())[1:]
            cls = fg.astype(np.int8) * comp.ANOMALY
            gt, pred = comp.image_counts(fg.astype(np.uint8), cls, 0, 0)
            assert gt.shape[0] == n and pred.shape[0] == n
            np.testing.assert_array_equal(gt[:, 0], sizes)
            np.testing.assert_array_equal(gt[:, 1], sizes)
            np.testing.assert_array_equal(pred, np.stack([sizes, sizes, sizes], 1).reshape(-1, 3))


def test_one_blob_over_two_components_by_the_formula():
    """A predicted rectangle covering two ground-truth squares and the gap between them:
    each square's adjusted union is itself plus the blob's pixels off the ground truth (the
    other square is not counted), the blob's PPV its share on the ground truth."""
    label = np.zeros((30, 40), np.uint8)
    label[5:15, 5:15] = 1
    label[5:15, 20:30] = 1
    score = np.zeros((30, 40))
    score[4:16, 4:31] = 1.0
    blob, square = 12 * 27, 100
    off = blob - 2 * square
    r = comp.component_metrics(score, label, 0.5, thresh_segsize=0, thresh_instsize=0)
    assert (r.n_gt, r.n_pred) == (2, 1)
    assert r.siou_gt == square / (square + off)
    assert r.ppv == 2 * square / blob
    assert r.siou_pred == 2 * square / blob  # both squares fully covered: nothing uncovered to add


# ---------------------------------------------------------------- the quirks, one by one


def _both(score, label, seg, inst):
    b = comp.component_metrics(score, label, 0.5, thresh_segsize=seg, thresh_instsize=inst)
    c = comp.component_metrics(score, label, 0.5, thresh_segsize=seg, thresh_instsize=inst, mode="clean")
    _check(b, ref_aggregate([ref_benchmark(score, label, 0.5, seg, inst)]))
    _check(c, ref_aggregate([ref_clean(score, label, 0.5, seg, inst)]))
    return b, c


def test_quirk_binarize_strictly_above():
    label = np.zeros((20, 20), np.uint8)
    label[5:10, 5:10] = 1
    score = np.zeros((20, 20))
    score[5:10, 5:10] = 0.5  # exactly the threshold
    b, c = _both(score, label, 0, 0)
    assert b.n_pred == 0 and c.n_pred == 1 and c.siou_gt == 1.0


def test_quirk_segments_sized_before_small_instances_turn_void():
    """A 12-pixel segment, 8 of them on a 9-pixel ground-truth component that instsize=10
    turns void: the benchmark keeps it (12 >= segsize 10) with 4 pixels left; clean drops it."""
    label = np.zeros((20, 20), np.uint8)
    label[2:5, 2:5] = 1  # 9 pixels < instsize
    label[12:18, 12:18] = 1  # a kept component
    score = np.zeros((20, 20))
    score[2:4, 2:8] = 1.0  # 12 pixels, 6 on the small component
    score[4, 2:4] = 1.0  # +2 on it: 14 in all, 8 on it
    b, c = _both(score, label, 10, 10)
    assert b.n_pred == 1 and c.n_pred == 0
    assert b.ppv == 0.0


def test_quirk_background_voided_when_small():
    """An image with fewer non-anomaly pixels than thresh_instsize: the benchmark's loop
    from id 0 turns all of them void, so a segment lying on them disappears."""
    label = np.ones((10, 10), np.uint8)
    label[0, :] = 0  # 10 normal pixels < instsize 20
    score = np.zeros((10, 10))
    score[0, :] = 1.0
    b, c = _both(score, label, 0, 20)
    assert b.n_pred == 0 and c.n_pred == 1 and c.ppv == 0.0


def test_quirk_iou_threshold_of_three_fifths():
    """sIoU exactly 3/5: below the benchmark's 0.6000000000000001, at tau = 0.60 in clean."""
    label = np.zeros((20, 20), np.uint8)
    label[2:7, 2:12] = 1  # 50 pixels
    score = np.zeros((20, 20))
    score[2:7, 2:8] = 1.0  # covers 30 of them, nothing off the ground truth
    b, c = _both(score, label, 0, 0)
    k = 7  # tau = 0.60
    assert b.siou_gt == c.siou_gt == 0.6
    assert b.tp[k] == 0 and c.tp[k] == 1 and b.tp[k - 1] == 1


def test_nan_scores_are_not_flagged():
    label = np.zeros((10, 10), np.uint8)
    label[2:6, 2:6] = 1
    score = np.full((10, 10), np.nan)
    r = comp.component_metrics(score, label, 0.5, thresh_segsize=0, thresh_instsize=0)
    assert r.n_pred == 0 and r.n_gt == 1 and r.siou_gt == 0.0


def test_no_components_is_nan_not_an_error():
    r = comp.component_metrics(np.zeros((8, 8)), np.zeros((8, 8), np.uint8), 0.5)
    assert (r.n_gt, r.n_pred) == (0, 0)
    assert np.isnan(r.siou_gt) and np.isnan(r.ppv) and np.isnan(r.mean_f1)


# ---------------------------------------------------------------- API: evaluate, Evaluator, distributed


def _logit_scenes(seed, B=6, H=40, W=56, C=5):
    rng = np.random.default_rng(seed)
    scores, labels = _batch(rng, B, H, W)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    x[:, 0] += 6 * torch.from_numpy(scores).float()
    return x, torch.from_numpy(labels.astype(np.int64))


METHODS = ["max_logit", "msp", "energy"]


def _same(a: dict, b: dict) -> bool:
    """Equal component results (NaN equal to NaN)."""
    return json.dumps({k: v.as_dict() for k, v in a.items()}) == json.dumps({k: v.as_dict() for k, v in b.items()})
SIZES = {"thresh_segsize": 6, "thresh_instsize": 4}


def test_evaluate_components_equal_reference_at_the_best_f1_threshold():
    x, y = _logit_scenes(1)
    r = anomfast.evaluate(x, y, methods=METHODS, components=SIZES)
    # the core's float32 maps are the scores (msp: 1 - max softmax)
    maps = _fused.fused_pass(_fused.as_logits(x), None, resolve(METHODS), want_maps=True)[2]
    for j, m in enumerate(METHODS):
        t = r[m].threshold
        assert r.components[m].threshold == t and np.isfinite(t)
        s = maps[j].double().numpy()
        frames = [ref_benchmark(s[b], y[b].numpy(), t, 6, 4) for b in range(len(x))]
        _check(r.components[m], ref_aggregate(frames))


def test_evaluate_batches_and_one_shot_iterators():
    x, y = _logit_scenes(2)
    one = anomfast.evaluate(x, y, methods=METHODS, components=SIZES)
    parts = anomfast.evaluate([x[:2], x[2:5], x[5:]], [y[:2], y[2:5], y[5:]], methods=METHODS, components=SIZES)
    pairs = anomfast.evaluate([(x[:3], y[:3]), (x[3:], y[3:])], methods=METHODS, components=SIZES)
    assert _same(parts.components, one.components) and _same(pairs.components, one.components)
    given = dict(SIZES, thresholds=one)  # every threshold given: one read, a one-shot iterator is fine
    once = anomfast.evaluate(iter([x[:4], x[4:]]), iter([y[:4], y[4:]]), methods=METHODS, components=given)
    assert _same(once.components, one.components)
    with pytest.raises(TypeError, match="one-shot iterator"):
        anomfast.evaluate(iter([x[:4], x[4:]]), iter([y[:4], y[4:]]), methods=METHODS, components=SIZES)
    refined = anomfast.evaluate([x[:4], x[4:]], [y[:4], y[4:]], methods=METHODS, refine=True, components=given)
    assert _same(refined.components, one.components)


def test_evaluator_across_batches_equals_one_call():
    x, y = _logit_scenes(3)
    want = anomfast.evaluate(x, y, methods=METHODS, components=SIZES)
    ev = anomfast.Evaluator(methods=METHODS, components=dict(SIZES, thresholds=want))
    for i in range(0, len(x), 2):
        ev.update(x[i:i + 2], y[i:i + 2])
    assert _same(ev.compute().components, want.components)
    ev.reset()
    ev.update(x[3:4], y[3:4])
    assert ev.compute().components["energy"].n_images == 1


def _worker(rank, world, init_file, seed, thresholds, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = _logit_scenes(seed)
    ev = anomfast.Evaluator(methods=METHODS, components=dict(SIZES, thresholds=thresholds))
    for i in range(rank, x.shape[0], world):
        ev.update(x[i:i + 1], y[i:i + 1])
    r = ev.compute()
    if rank == 0:
        torch.save({"counts": ev.components.counts, "results": {m: r.components[m].as_dict() for m in METHODS}},
                   out_file)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path):
    seed = 4
    x, y = _logit_scenes(seed)
    want = anomfast.evaluate(x, y, methods=METHODS, components=SIZES)
    thresholds = {m: want[m].threshold for m in METHODS}
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), seed, thresholds, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out)
    ev = anomfast.Evaluator(methods=METHODS, components=dict(SIZES, thresholds=thresholds))
    ev.update(x, y)
    r = ev.compute()
    # rank 0 itself counted only its shard; compute() summed both
    assert got["counts"][0, comp.IMAGES] == 3 and got["results"]["energy"]["n_images"] == len(x)
    assert _same(r.components, want.components)
    assert json.dumps({m: r.components[m].as_dict() for m in METHODS}) == json.dumps(got["results"])


# ---------------------------------------------------------------- errors


def test_clear_errors():
    with pytest.raises(ValueError, match="needs a score threshold per method"):
        anomfast.Evaluator(methods=["energy"], components=True)
    with pytest.raises(ValueError, match="not among the methods"):
        anomfast.Evaluator(methods=["energy"], components={"thresholds": {"msp": 0.1, "energy": 0.2}})
    with pytest.raises(ValueError, match="track must be one of"):
        comp.ComponentSpec(track="road")
    with pytest.raises(ValueError, match="mode must be one of"):
        comp.ComponentSpec(mode="strict")
    with pytest.raises(ValueError, match="thresh_segsize must be a non-negative"):
        comp.ComponentSpec(thresh_segsize=-1)
    with pytest.raises(ValueError, match="must be a number"):
        comp.ComponentSpec(thresholds={"energy": float("nan")})
    with pytest.raises(TypeError, match="components must be True"):
        anomfast.evaluate(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), components="yes")
    with pytest.raises(ValueError, match="label value 7"):
        comp.component_metrics(np.zeros((4, 4)), np.full((4, 4), 7), 0.5)
    with pytest.raises(ValueError, match="must both be"):
        comp.component_metrics(np.zeros((4, 4)), np.zeros((4, 5), np.uint8), 0.5)
    x, y = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    y[:, 0] = 1
    with pytest.raises(ValueError, match="no pooled best-F1 threshold"):
        anomfast.evaluate(x, y, per_image=True, components=True)
    with pytest.raises(ValueError, match="drop protocol="):
        anomfast.evaluate(x, y, protocol="ml4cv", components=True)


def test_core_wrapper_checks_every_buffer():
    p, c = np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.int8)
    with pytest.raises(TypeError, match="pred must be uint8, got int64"):
        comp.image_counts(p.astype(np.int64), c, 0, 0)
    with pytest.raises(TypeError, match="classes must be int8"):
        comp.image_counts(p, c.astype(np.uint8), 0, 0)
    with pytest.raises(ValueError, match="one \\(H, W\\) image"):
        comp.image_counts(p[None], c[None], 0, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        comp.image_counts(np.zeros((5, 4), np.uint8).T, c, 0, 0)
    with pytest.raises(ValueError, match="same shape"):
        comp.image_counts(p, np.zeros((4, 6), np.int8), 0, 0)
    with pytest.raises(ValueError, match="0 / 1"):
        comp.image_counts(p + 2, c, 0, 0)
    with pytest.raises(ValueError, match="classes must hold"):
        comp.image_counts(p, c + 3, 0, 0)
    with pytest.raises(TypeError, match="NumPy array or a CPU tensor"):
        comp.image_counts([[0]], [[0]], 0, 0)
    if torch.cuda.is_available():  # pragma: no cover - needs a GPU
        with pytest.raises(ValueError, match="on the CPU"):
            comp.image_counts(torch.zeros(4, 5, dtype=torch.uint8, device="cuda"), c, 0, 0)
    # the core's own size check: a capacity below the bound is refused, nothing written
    counts = np.full(2, -7, np.int64)
    work, gt, pr = np.empty(40, np.int32), np.empty((6, 2), np.int64), np.empty((6, 3), np.int64)
    rc = comp._C.components(p.ctypes.data, c.ctypes.data, 4, 5, 0, 0, 0, work.ctypes.data, gt.ctypes.data,
                            pr.ctypes.data, 5, counts.ctypes.data)
    assert rc == -1 and (counts == -7).all()
    assert comp._C.components_capacity(4, 5) == 6


def test_device_wrapper_checks_every_buffer():
    """device_counts (the CUDA core's wrapper) refuses wrong buffers before any launch (the
    kernels themselves: tests/test_cuda_build.py under the host emulation)."""
    p, c = torch.zeros(2, 4, 5, dtype=torch.uint8), torch.zeros(2, 4, 5, dtype=torch.int8)

    class NoCore:  # any use of the core would fail loudly
        pass

    cases = [((p.to(torch.int64), c), "pred must be a contiguous torch.uint8"),
             ((p, c.to(torch.uint8)), "classes must be a contiguous torch.int8"),
             ((p[0], c[0]), "pred must be a contiguous torch.uint8 tensor \\(B, H, W\\)"),
             ((p.transpose(1, 2), c.transpose(1, 2)), "pred must be a contiguous"),
             ((p, torch.zeros(2, 4, 6, dtype=torch.int8)), "same shape and device"),
             ((p.numpy(), c), "pred must be a contiguous")]
    for (a, b), msg in cases:
        with pytest.raises(ValueError, match=msg):
            comp.device_counts(a, b, 0, 0, core=NoCore())
    with pytest.raises(ValueError, match="mode must be one of"):
        comp.device_counts(p, c, 0, 0, mode="strict", core=NoCore())


@pytest.mark.skipif(not torch.cuda.is_available() or anomfast._core._C_cuda is None, reason="needs a CUDA GPU")
def test_cuda_labeling_equals_cpu(nrng):  # pragma: no cover - needs a GPU
    """On a GPU: the device labeling gives the CPU core's rows, and evaluate(components=...)
    on CUDA logits equals the CPU."""
    for mode, seg, inst in (("benchmark", 6, 4), ("clean", 25, 12)):
        scores, labels = _batch(nrng, 8, 48, 64)
        binar = (scores > 0.5) if mode == "benchmark" else (scores >= 0.5)
        cls = np.where(labels == 1, comp.ANOMALY, np.where(labels == 255, comp.VOID, comp.NORMAL)).astype(np.int8)
        got = comp.device_counts(torch.from_numpy(binar.astype(np.uint8)).cuda(), torch.from_numpy(cls).cuda(),
                                 seg, inst, mode)
        for b in range(len(scores)):
            gt, pr = comp.image_counts(binar[b].astype(np.uint8), cls[b], seg, inst, mode)
            assert sorted(map(tuple, got[b][0].tolist())) == sorted(map(tuple, gt.tolist()))
            assert sorted(map(tuple, got[b][1].tolist())) == sorted(map(tuple, pr.tolist()))
    x, y = _logit_scenes(3)
    kw = dict(methods=METHODS, components=SIZES)
    rg, rc = anomfast.evaluate(x.cuda(), y.cuda(), **kw), anomfast.evaluate(x, y, **kw)
    assert _same(rg.components, rc.components)


# ---------------------------------------------------------------- CLI


def test_cli_components_equal_evaluate(tmp_path):
    """anomfast eval --components: the component table in report.md, results.json and
    components.csv equal anomfast.evaluate(..., components=...) on the same files."""
    from PIL import Image

    from anomfast.cli import main
    x, y = _logit_scenes(5, B=4)
    xb, yb = _logit_scenes(6, B=4)
    for d in ("labels", "a", "b"):
        (tmp_path / d).mkdir()
    for i in range(len(x)):
        Image.fromarray(y[i].numpy().astype(np.uint8)).save(tmp_path / "labels" / f"img{i}.png")
        np.save(tmp_path / "a" / f"img{i}.npy", x[i].numpy())
        np.save(tmp_path / "b" / f"img{i}.npy", xb[i].numpy())
    (tmp_path / "grid.toml").write_text(
        '[labels]\ndir = "labels"\nanomaly_ids = [1]\nvoid_ids = [255]\nnormal_ids = [0]\n'
        '[[models]]\nname = "A"\nlogits = "a"\n[[models]]\nname = "B"\nlogits = "b"\n')
    out = tmp_path / "out"
    args = ["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots",
            "--methods", "max_logit,energy", "--components", "--components-track", "obstacle"]
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    assert "## Component Metrics (SegmentMeIfYouCan)" in md and "obstacle track" in md
    csv_rows = (out / "components.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 2
    for model, logits in (("A", x), ("B", xb)):
        want = anomfast.evaluate(logits, y, methods=["max_logit", "energy"], components={"track": "obstacle"})
        got = next(m for m in doc["models"] if m["name"] == model)["components"]
        for k in ("max_logit", "energy"):
            assert json.dumps(got[k]) == json.dumps(want.components[k].as_dict())
            c = want.components[k]
            cell = " / ".join(f"{100 * v:.1f}" for v in (c.siou_gt, c.ppv, c.mean_f1))
            assert cell in md and cell in (out / "report.tex").read_text()  # the LaTeX table too
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "o2"), "--quiet",
                 "--components-mode", "clean"]) == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.bool_])
def test_label_classes_equal_label_map(nrng, dtype):
    """The accumulator's table lookup gives LabelMap.classify's classes for every label
    dtype, and names a value the map does not cover."""
    if dtype == np.bool_:
        lm, y = anomfast.LabelMap(anomaly_ids=[1], void_ids=[], normal_ids=[0]), nrng.random((2, 9, 11)) < 0.5
    elif np.dtype(dtype).kind == "i":  # negative ids: the table starts below 0
        lm = anomfast.LabelMap(anomaly_ids=[-3], void_ids=[7], normal_ids="rest")
        y = nrng.integers(-3, 8, (2, 9, 11)).astype(dtype)
    else:
        lm = anomfast.LabelMap(anomaly_ids=[1], void_ids=[255], normal_ids=[0, 2])
        y = nrng.choice([0, 1, 2, 255], (2, 9, 11)).astype(dtype)
    acc = comp.ComponentAccumulator(["c"], comp.ComponentSpec(), {"c": 0.0}, lm)
    yt = torch.from_numpy(y)
    assert torch.equal(acc.classes(yt), lm.classify(yt))
    if dtype != np.bool_:
        y.flat[5] = 9 if np.dtype(dtype).kind == "i" else 3
        with pytest.raises(ValueError, match=f"label value {y.flat[5]} is neither"):
            acc.classes(torch.from_numpy(y))


@pytest.mark.slow
def test_cli_components_torchrun_equals_single_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m anomfast eval --distributed --components`: images
    sharded over two gloo ranks, component counts summed; results.json equals one process."""
    import subprocess
    import sys

    from PIL import Image

    from anomfast.cli import main
    x, y = _logit_scenes(7, B=5)
    for d in ("labels", "a"):
        (tmp_path / d).mkdir()
    for i in range(len(x)):
        Image.fromarray(y[i].numpy().astype(np.uint8)).save(tmp_path / "labels" / f"img{i}.png")
        np.save(tmp_path / "a" / f"img{i}.npy", x[i].numpy())
    (tmp_path / "grid.toml").write_text('[labels]\ndir = "labels"\nanomaly_ids = [1]\nvoid_ids = [255]\n'
                                        'normal_ids = [0]\n[[models]]\nname = "A"\nlogits = "a"\n')
    common = ["--grid", str(tmp_path / "grid.toml"), "--quiet", "--no-plots", "--methods", "max_logit,energy",
              "--components", "--components-track", "obstacle"]
    assert main(["eval", "--out", str(tmp_path / "single")] + common) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "anomfast", "eval", "--out", str(tmp_path / "dist"), "--distributed"] + common,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "results.json").read_text())["models"][0]["components"]
    two = json.loads((tmp_path / "dist" / "results.json").read_text())["models"][0]["components"]
    assert one["energy"]["n_images"] == 5 and one["energy"]["n_gt"] > 0
    assert json.dumps(one) == json.dumps(two)


def test_evaluator_state_dict_carries_component_counts():
    x, y = _logit_scenes(8)
    want = anomfast.evaluate(x, y, methods=METHODS, components=SIZES)
    cs = dict(SIZES, thresholds=want)
    ev = anomfast.Evaluator(methods=METHODS, components=cs)
    ev.update(x[:3], y[:3])
    st = ev.state_dict()
    ev2 = anomfast.Evaluator(methods=METHODS, components=cs)
    ev2.load_state_dict(st)
    ev2.update(x[3:], y[3:])
    assert _same(ev2.compute().components, want.components)
    other = anomfast.Evaluator(methods=METHODS, components=dict(cs, mode="clean"))
    with pytest.raises(ValueError, match="component counts in the state were made with"):
        other.load_state_dict(st)
    plain = anomfast.Evaluator(methods=METHODS)
    plain.update(x[:1], y[:1])
    with pytest.raises(ValueError, match="has no component counts"):
        anomfast.Evaluator(methods=METHODS, components=cs).load_state_dict(plain.state_dict())
    bad = dict(st, components=dict(st["components"], counts=-st["components"]["counts"]))
    with pytest.raises(ValueError, match="non-negative int64"):
        anomfast.Evaluator(methods=METHODS, components=cs).load_state_dict(bad)
