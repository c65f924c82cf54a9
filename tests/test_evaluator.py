"""Evaluator: distributed equality, torch.compile, opcheck, state, errors at compute()."""
from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

import anomfast
from anomfast import _fused

from conftest import random_labels, random_logits

METHODS = ["max_logit", "msp", "energy"]


def _data(seed, B=6, H=24, W=32):
    g = torch.Generator().manual_seed(seed)
    return random_logits(g, B, 19, H, W), random_labels(g, B, H, W)


def _worker(rank, world, init_file, seed, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = _data(seed)
    ev = anomfast.Evaluator(methods=METHODS)
    for i in range(rank, x.shape[0], world):  # a strided shard of the batches, like DistributedSampler
        ev.update(x[i:i + 1], y[i:i + 1])
    r = ev.compute()
    if rank == 0:
        torch.save({m: r.histograms[m].counts for m in METHODS} | {"auroc": r["energy"].auroc}, out_file)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(rng, tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), seed, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out)
    x, y = _data(seed)
    ev = anomfast.Evaluator(methods=METHODS)
    ev.update(x, y)
    want = ev.compute()
    for m in METHODS:
        assert torch.equal(got[m], want.histograms[m].counts), m
    assert got["auroc"] == want["energy"].auroc


def test_compile_fullgraph_equals_eager(rng):
    x, y = random_logits(rng, 3, 19, 16, 20), random_labels(rng, 3, 16, 20)
    eager = anomfast.Evaluator(methods=METHODS)
    comp = anomfast.Evaluator(methods=METHODS)

    def step(ev, logits, labels):
        ev.update(logits * 1.5, labels)

    compiled = torch.compile(step, fullgraph=True)
    for i in range(3):
        step(eager, x[i:i + 1], y[i:i + 1])
        compiled(comp, x[i:i + 1], y[i:i + 1])
    assert eager.hist == comp.hist and torch.equal(eager.counters, comp.counters)


def test_opcheck(rng):
    x, y = random_logits(rng, 2, 7, 6, 5), random_labels(rng, 2, 6, 5)
    ev = anomfast.Evaluator(methods=["energy", "msp"])
    lut, off = ev.label_map.lut()
    hist = _fused.new_histogram(2, "cpu")
    cnt = _fused.new_counters("cpu")
    torch.library.opcheck(torch.ops.anomfast.fused_update.default,
                          (x, y, hist.hist, hist.sig, hist.occ, cnt, lut, off, [2, 1], 1.0, 0.1, False, None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_state_dict_roundtrip_and_batch_order(rng):
    x, y = random_logits(rng, 5, 19, 12, 14), random_labels(rng, 5, 12, 14)
    a = anomfast.Evaluator(methods=METHODS)
    for i in range(5):
        a.update(x[i:i + 1], y[i:i + 1])
    b = anomfast.Evaluator(methods=METHODS)
    b.update(x[3:], y[3:])
    b.update(x[:3], y[:3])
    assert a.hist == b.hist
    c = anomfast.Evaluator(methods=METHODS)
    c.load_state_dict(a.state_dict())
    assert c.hist == a.hist and c.compute()["msp"].auroc == a.compute()["msp"].auroc
    with pytest.raises(ValueError, match="methods"):
        anomfast.Evaluator(methods=["energy"]).load_state_dict(a.state_dict())
    a.reset()
    assert a.hist.total() == 0 and not bool(a.hist.occ.any())
    res = b.compute()
    ref = anomfast.evaluate(x, y, methods=METHODS)
    for m in METHODS:
        assert res[m].auroc == ref[m].auroc and res[m].threshold == ref[m].threshold


def test_keep_drops_padded_samples(rng):
    x, y = random_logits(rng, 4, 19, 8, 8), random_labels(rng, 4, 8, 8)
    a = anomfast.Evaluator(methods=METHODS)
    a.update(x, y, keep=torch.tensor([True, True, False, True]))
    b = anomfast.Evaluator(methods=METHODS)
    b.update(x[[0, 1, 3]], y[[0, 1, 3]])
    assert a.hist == b.hist


def test_errors_are_raised_at_compute(rng):
    x = random_logits(rng, 1, 5, 6, 6)
    y = torch.zeros(1, 6, 6, dtype=torch.uint8)
    ev = anomfast.Evaluator(methods=["energy"])
    y[0, 0, 0] = 9
    ev.update(x, y)  # no error here: the check needs the data
    with pytest.raises(ValueError, match="not in the label map"):
        ev.compute()
    ev = anomfast.Evaluator(methods=["energy"])
    y[0, 0, 0] = 1
    x[0, 1, 2, 2] = float("nan")
    ev.update(x, y)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ev.compute()
    with pytest.raises(ValueError, match="does not match"):
        ev.update(x, y[:, :3])  # shape errors are immediate


def test_torchmetrics_adapter(rng):
    pytest.importorskip("torchmetrics")
    from anomfast.tm import AnomalyMetrics
    x, y = random_logits(rng, 3, 19, 10, 12), random_labels(rng, 3, 10, 12)
    m = AnomalyMetrics(methods=METHODS)
    m.update(x[:2], y[:2])
    m.update(x[2:], y[2:])
    r = m.compute()
    ref = anomfast.evaluate(x, y, methods=METHODS)
    for k in METHODS:
        assert r[k].auroc == ref[k].auroc
    assert set(m.compute_flat()) >= {"energy/auroc", "msp/fpr95"}
    m.reset()
    assert int(m.hist.sum()) == 0 and int(m.sig.sum()) == 0 and not bool(m.occ.any())
