"""What reaches the compiled core from loaded or shared objects, as a fuzzing review
(2026-12-03) found it: a pickled LabelMap's lookup table, SML statistics changed after
fitting, two threads updating one Evaluator, torchmetrics states of other methods."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch

import anomfast
from anomfast.labels import LabelMap

from conftest import random_labels, random_logits


def _run(code: str) -> subprocess.CompletedProcess:
    """In a child, so that a crash of the core fails the test instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_label_map_table_from_a_pickle_or_set_from_outside_is_never_read():
    code = """
import pickle, torch, anomfast
from anomfast.labels import LabelMap
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 5, 64, 64, generator=g)
y = torch.randint(0, 3, (1, 64, 64), generator=g, dtype=torch.int32)
lm = LabelMap(anomaly_ids=[1], void_ids=[255], normal_ids="rest")
want = anomfast.evaluate(x, y, methods=["max_logit"], label_map=lm)["max_logit"]
for bad in ((torch.zeros(1, dtype=torch.int8).expand(1 << 26), 0),   # 1 byte of memory, numel 2^26
            (torch.tensor([0, 1, 1], dtype=torch.int64), 0),          # int64, read as bytes
            (torch.zeros(4, dtype=torch.int8)[::2], 0), ("junk", 1)):
    m = LabelMap(anomaly_ids=[1], void_ids=[255], normal_ids="rest")
    m.lut()
    m._lut_cache["lut"] = bad
    for use in (m, pickle.loads(pickle.dumps(m))):
        got = anomfast.evaluate(x, y, methods=["max_logit"], label_map=use)["max_logit"]
        assert (got.auroc, got.n_pos, got.n_neg) == (want.auroc, want.n_pos, want.n_neg)
        ev = anomfast.Evaluator(methods=["max_logit"], label_map=use)
        ev.update(x, y)
        assert ev.compute()["max_logit"].auroc == want.auroc
# a pickle is rebuilt from the ids, through the constructor's checks
s = pickle.dumps(LabelMap(anomaly_ids=[1]))
assert pickle.loads(s) == LabelMap(anomaly_ids=[1]) and "_lut_cache" not in str(pickle.loads(s).__reduce__())
print("OK")
"""
    r = _run(code)
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout[-2000:] + r.stderr[-3000:])


def test_tampered_label_map_ids_in_a_pickle_are_checked_again():
    lm = LabelMap(anomaly_ids=[1])
    object.__setattr__(lm, "anomaly_ids", (1, 2 ** 40))  # what an edited pickle would carry
    with pytest.raises(ValueError, match="more than 65536 values"):
        pickle.loads(pickle.dumps(lm))


def test_sml_stats_shorter_than_the_classes_are_refused():
    g = torch.Generator().manual_seed(1)
    st = anomfast.fit_sml(random_logits(g, 4, 19, 16, 16))
    x, y = random_logits(g, 1, 19, 32, 32), random_labels(g, 1, 32, 32)
    for cut in (lambda s: pickle.loads(pickle.dumps(s)), lambda s: s):
        s = cut(st)
        s.mean, s.std = s.mean[:1], s.std[:1]
        with pytest.raises(ValueError, match=r"mean / std of shapes \(1,\) / \(1,\) for 19 classes"):
            anomfast.score_maps(x, methods=("sml",), sml=s)
        with pytest.raises(ValueError, match=r"shapes \(1,\) / \(1,\) for 19 classes"):
            anomfast.evaluate(x, y, methods=("sml",), sml=s)


def test_two_threads_updating_one_evaluator_lose_nothing():
    g = torch.Generator().manual_seed(2)
    x, y = random_logits(g, 1, 5, 128, 128), random_labels(g, 1, 128, 128)
    one = anomfast.Evaluator(methods=("max_logit",))
    one.update(x, y)
    want = one.compute()["max_logit"]
    for trial in range(6):
        ev = anomfast.Evaluator(methods=("max_logit",))
        bar = threading.Barrier(2)
        errors = []

        def work():
            try:
                bar.wait()
                for _ in range(3):
                    ev.update(x, y)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        ts = [threading.Thread(target=work) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        r = ev.compute()
        got = r["max_logit"]
        assert (got.n_pos, got.n_neg) == (6 * want.n_pos, 6 * want.n_neg), trial
        assert torch.equal(r.histograms["max_logit"].counts, 6 * one.compute().histograms["max_logit"].counts)


def test_tm_states_of_other_methods_or_label_maps_are_refused():
    from anomfast.tm import AnomalyMetrics
    g = torch.Generator().manual_seed(3)
    x, y = random_logits(g, 2, 7, 16, 16), random_labels(g, 2, 16, 16)
    a, b = AnomalyMetrics(methods=("max_logit",)), AnomalyMetrics(methods=("msp",))
    b.update(x, y)
    with pytest.raises(ValueError, match="fingerprints differ"):
        a.merge_state(b)
    swapped = AnomalyMetrics(methods=("max_logit",), label_map=LabelMap(anomaly_ids=[0], normal_ids=[1]))
    swapped.update(x, y)
    with pytest.raises(ValueError, match="fingerprints differ"):
        a.merge_state(swapped)
    b.persistent(True)
    a.persistent(True)
    with pytest.raises(ValueError, match="counted with other methods"):
        a.load_state_dict(b.state_dict())
    # the same arguments: merged and loaded as before
    c = AnomalyMetrics(methods=("max_logit",))
    c.update(x, y)
    a.update(x, y)
    a.merge_state(c)
    both = anomfast.evaluate(torch.cat([x, x]), torch.cat([y, y]), methods=("max_logit",))
    assert torch.equal(a.compute().histograms["max_logit"].counts, both.histograms["max_logit"].counts)
    d = AnomalyMetrics(methods=("max_logit",))
    d.persistent(True)
    d.load_state_dict(a.state_dict())
    assert torch.equal(d.compute().histograms["max_logit"].counts, both.histograms["max_logit"].counts)


def test_statistics_files_with_bad_contents_name_the_file(tmp_path):
    import numpy as np
    g = torch.Generator().manual_seed(4)
    st = anomfast.fit_sml(random_logits(g, 2, 5, 8, 8))
    path = tmp_path / "sml.npz"
    st.save(path)
    z = dict(np.load(path))
    bad = tmp_path / "bad_sml.npz"
    np.savez(bad, **{**z, "count": z["count"][:3]})  # count no longer as long as sum / sumsq
    with pytest.raises(ValueError, match=r"bad_sml\.npz: not usable SML statistics: .*same length"):
        anomfast.SMLStats.load(bad)
