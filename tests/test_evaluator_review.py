"""Evaluator in training loops, as a review used it (2026-12-03): distributed runs where the
ranks differ (no update() on a rank, other C, other methods), state_dict() round trips
that must keep the class-count and label-map checks, pickling, and arguments checked at
construction."""
from __future__ import annotations

import copy
import datetime
import pickle

import pytest
import torch
import torch.multiprocessing as mp

import anomfast

from conftest import random_labels, random_logits

METHODS = ("max_logit", "energy")


def _data(seed, B=2, C=19, H=24, W=32):
    g = torch.Generator().manual_seed(seed)
    return random_logits(g, B, C, H, W), random_labels(g, B, H, W)


def _outcome(fn):
    try:
        r = fn()
        return ("ok", {m: (r[m].auroc, r[m].fpr95, r.histograms[m].counts) for m in METHODS})
    except (RuntimeError, ValueError) as e:
        return (type(e).__name__, str(e))


def _worker(rank, world, init_file, seed, out_file):
    # a short timeout: a collective left waiting fails the test instead of hanging it
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    x, y = _data(seed)
    out = {}
    # 1. no update() on rank 1 (fewer images than ranks, an uneven sampler): both ranks
    # get the result of all data, no collective left waiting
    ev = anomfast.Evaluator(methods=METHODS)
    if rank == 0:
        ev.update(x, y)
    out["zero_rank"] = _outcome(ev.compute)
    # 2. no update() anywhere: the same error on both ranks
    out["no_rank"] = _outcome(anomfast.Evaluator(methods=METHODS).compute)
    # 3. another class count on rank 1: refused on both ranks (was summed silently)
    ev = anomfast.Evaluator(methods=METHODS)
    ev.update(x if rank == 0 else _data(seed, C=21)[0], y)
    out["other_C"] = _outcome(ev.compute)
    # 4. other methods on rank 1: refused on both ranks (gloo aborted the process on
    # buffers of another size)
    ev = anomfast.Evaluator(methods=METHODS if rank == 0 else ("max_logit", "msp"))
    ev.update(x, y)
    out["other_methods"] = _outcome(ev.compute)
    # 5. the group still works: everything above left the collectives in step
    ev = anomfast.Evaluator(methods=METHODS)
    ev.update(x[rank:rank + 1], y[rank:rank + 1])
    out["after"] = _outcome(ev.compute)
    torch.save(out, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_differ_give_the_same_answer_on_every_rank(rng, tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    out = tmp_path / "out"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), seed, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    x, y = _data(seed)
    ev = anomfast.Evaluator(methods=METHODS)
    ev.update(x, y)
    want = _outcome(ev.compute)
    for r in range(2):
        g = got[r]
        assert g["zero_rank"][0] == "ok", g["zero_rank"]
        for m in METHODS:
            assert g["zero_rank"][1][m][:2] == want[1][m][:2], (r, m)
            assert torch.equal(g["zero_rank"][1][m][2], want[1][m][2]), (r, m)
            assert g["after"][0] == "ok" and g["after"][1][m][:2] == want[1][m][:2], (r, m, g["after"])
        assert g["no_rank"][0] == "RuntimeError" and "before any update" in g["no_rank"][1], g["no_rank"]
        assert g["other_C"][0] == "ValueError" and "C from 19 to 21" in g["other_C"][1], g["other_C"]
        assert g["other_methods"][0] == "RuntimeError" and "do not count the same things" in g["other_methods"][1]


def test_state_dict_keeps_the_class_count_and_label_map_checks(rng):
    x, y = random_logits(rng, 2, 19, 16, 16), random_labels(rng, 2, 16, 16)
    a = anomfast.Evaluator(methods=METHODS)
    a.update(x, y)
    sd = a.state_dict()
    b = anomfast.Evaluator(methods=METHODS)
    b.load_state_dict(sd)
    with pytest.raises(ValueError, match="C = 21 classes but earlier update"):
        b.update(random_logits(rng, 2, 21, 16, 16), y)
    b.update(x, y)  # the same C is fine
    other = anomfast.LabelMap(anomaly_ids=[0], void_ids=[255], normal_ids=[1])
    with pytest.raises(ValueError, match="label map"):
        anomfast.Evaluator(methods=METHODS, label_map=other).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"'temperature': 1\.0.*'temperature': 2\.0"):
        anomfast.Evaluator(methods=METHODS, temperature=2.0).load_state_dict(sd)
    # a state from before these fields (no 'classes', no 'label_map') still loads
    old = {k: v for k, v in sd.items() if k not in ("classes", "label_map")}
    c = anomfast.Evaluator(methods=METHODS)
    c.load_state_dict(old)
    c.update(random_logits(rng, 2, 21, 16, 16), y)  # C unknown: nothing to compare with
    with pytest.raises(ValueError, match="class count"):
        anomfast.Evaluator(methods=METHODS).load_state_dict({**sd, "classes": "19"})


def test_pickle_and_deepcopy_carry_the_sparse_state(rng):
    x, y = random_logits(rng, 2, 19, 16, 16), random_labels(rng, 2, 16, 16)
    ev = anomfast.Evaluator(methods=METHODS)
    ev.update(x, y)
    blob = pickle.dumps(ev)
    assert len(blob) < 1_000_000, len(blob)  # was 312 MiB: the dense buffers
    back = pickle.loads(blob)
    dup = copy.deepcopy(ev)
    want = ev.compute()
    for other in (back, dup):
        got = other.compute()
        for m in METHODS:
            assert got[m].auroc == want[m].auroc and torch.equal(got.histograms[m].counts, want.histograms[m].counts)
        with pytest.raises(ValueError, match="C = 21"):
            other.update(random_logits(rng, 1, 21, 16, 16), y[:1])
    dup.update(x, y)  # independent of the original
    assert dup.compute().pixels["binned"] == 2 * ev.compute().pixels["binned"]
    empty = pickle.loads(pickle.dumps(anomfast.Evaluator(methods=METHODS)))
    with pytest.raises(RuntimeError, match="before any update"):
        empty.compute()


def test_arguments_and_layout_are_checked_before_the_epoch(rng):
    with pytest.raises(ValueError, match="fpr_mode"):
        anomfast.Evaluator(methods=METHODS, fpr_mode="frist")
    with pytest.raises(ValueError, match="ap_mode"):
        anomfast.Evaluator(methods=METHODS, ap_mode="trapz")
    with pytest.raises(ValueError, match="tpr_target"):
        anomfast.Evaluator(methods=METHODS, tpr_target=1.5)
    x, y = random_logits(rng, 2, 19, 16, 12), random_labels(rng, 2, 16, 12)
    with pytest.raises(ValueError, match=r"channel-last.*permute\(0, 3, 1, 2\)"):
        anomfast.Evaluator(methods=METHODS).update(x.permute(0, 2, 3, 1), y)


def test_torchmetrics_forward_results_and_class_count(rng):
    """metric(logits, labels), as Lightning calls it: each call returns that batch's results
    and adds the batch to the state (no dense state copies any more), and a batch with
    another C is refused, which forward()'s state swaps used to let through."""
    pytest.importorskip("torchmetrics")
    from anomfast.tm import AnomalyMetrics
    xs = [random_logits(rng, 2, 19, 16, 20) for _ in range(3)]
    ys = [random_labels(rng, 2, 16, 20) for _ in range(3)]
    m = AnomalyMetrics(methods=METHODS)
    for x, y in zip(xs, ys):
        got, want = m(x, y), anomfast.evaluate(x, y, methods=METHODS)
        for k in METHODS:
            assert (got[k].auroc, got[k].fpr95, got[k].f1) == (want[k].auroc, want[k].fpr95, want[k].f1)
    got, want = m.compute(), anomfast.evaluate(xs, ys, methods=METHODS)
    for k in METHODS:
        assert got[k].auroc == want[k].auroc and torch.equal(got.histograms[k].counts, want.histograms[k].counts)
    with pytest.raises(ValueError, match="C = 21"):
        m(random_logits(rng, 2, 21, 16, 20), ys[0])
    # the class-count states merge like the counts (forward, processes): compute() refuses a mix
    m.classes_min = torch.minimum(m.classes_min, torch.tensor(21))
    m.classes_max = torch.maximum(m.classes_max, torch.tensor(21))
    with pytest.raises(ValueError, match="C from 19 to 21"):
        m.compute()
    # single (C, H, W) images of different H: C is the class count, not H
    one = AnomalyMetrics(methods=METHODS)
    one.update(random_logits(rng, 1, 19, 8, 8)[0], random_labels(rng, 1, 8, 8)[0])
    one.update(random_logits(rng, 1, 19, 12, 8)[0], random_labels(rng, 1, 12, 8)[0])
    assert int(one.classes_min) == int(one.classes_max) == 19
    one.compute()
    # a persistent state saved before the class-count states still loads
    m.reset()
    m.update(xs[0], ys[0])
    m.persistent(True)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("classes_")}
    n = AnomalyMetrics(methods=METHODS)
    n.persistent(True)
    n.load_state_dict(sd)
    assert n.compute()["energy"].auroc == anomfast.evaluate(xs[0], ys[0], methods=METHODS)["energy"].auroc


def test_tm_loaded_state_is_not_shared_with_the_state_dict():
    """torchmetrics keeps the loaded tensors themselves, and the adapter adds into its
    states in place: two metrics loaded from one state_dict shared their counts (each saw
    the other's updates) and the state_dict itself changed with every update."""
    from anomfast.tm import AnomalyMetrics
    (x0, y0), (x1, y1) = _data(21), _data(22)
    src = AnomalyMetrics(methods=METHODS)
    src.persistent(True)
    src.update(x0, y0)
    sd = src.state_dict()
    saved = {k: v.clone() for k, v in sd.items()}
    a, b = AnomalyMetrics(methods=METHODS), AnomalyMetrics(methods=METHODS)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    a.update(x1, y1)
    assert all(torch.equal(sd[k], saved[k]) for k in saved), "the caller's state_dict changed"
    ref0 = anomfast.evaluate(x0, y0, methods=METHODS)
    both = anomfast.evaluate(torch.cat([x0, x1]), torch.cat([y0, y1]), methods=METHODS)
    for m in METHODS:
        assert torch.equal(b.compute().histograms[m].counts, ref0.histograms[m].counts), "b saw a's update"
        assert torch.equal(a.compute().histograms[m].counts, both.histograms[m].counts)
