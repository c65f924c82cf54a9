"""The compiled histogram path (csrc/cpu/finalize_cpu.cpp) against its NumPy spec: the
sparse read-out of a HistState against the host-side split, the bin bounds against
anomfast.binning, and Histogram.finalize / finalize_coords against metrics_from_groups
(Histogram._finalize_reference, histogram._finalize_coords_reference) on random and
adversarial group tables: every metric and bound to 1e-12, thresholds, counts, warnings,
definitions and curves identical."""
from __future__ import annotations

import contextlib
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

import anomfast
from anomfast import _fused, binning, histogram
from anomfast._core import _C
from anomfast.histogram import OCC_BLOCK, HistState, Histogram
from anomfast.methods import resolve
from anomfast.metrics import AP_MODES, FPR_MODES, METRIC_NAMES

from conftest import random_labels, random_logits

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOL = 1e-12
CONVENTIONS = [dict(fpr_mode=f, ap_mode=a, tpr_target=t)
               for f in ("first", "strict", "interp") for a in ("step", "trapezoid")
               for t in (0.95, 0.5, 1.0, 1e-9, 0.999999) if not (f == "strict" and t >= 1.0)]
THRESHOLDS = ("threshold", "fpr95_threshold")


def _same_number(x, y, tol):
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y or abs(x - y) <= tol


def _run(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = fn()
    return r, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


def assert_same_result(fast, ref):
    (a, wa), (b, wb) = fast, ref
    for k in METRIC_NAMES:
        tol = 0.0 if k in THRESHOLDS else TOL  # thresholds are chosen, not computed
        assert _same_number(getattr(a, k), getattr(b, k), tol), (k, getattr(a, k), getattr(b, k))
        for x, y in zip(a.bounds[k], b.bounds[k]):
            assert _same_number(x, y, tol), (k, a.bounds[k], b.bounds[k])
    assert list(a.bounds) == list(b.bounds)
    assert (a.n_pos, a.n_neg, a.exact, a.method, a.params) == (b.n_pos, b.n_neg, b.exact, b.method, b.params)
    assert type(a.n_pos) is int and type(a.n_neg) is int
    assert a.definitions == b.definitions
    assert a.warnings == b.warnings and wa == wb
    for u, v in zip(a._table(), b._table()):
        assert u.dtype == v.dtype and np.array_equal(u, v)
    for cu, cv in ((a.roc_curve(), b.roc_curve()), (a.pr_curve(), b.pr_curve())):
        for u, v in zip(cu, cv):
            assert np.array_equal(u, v, equal_nan=True)


@contextlib.contextmanager
def split_at(rows):
    """Tables of at least `rows` rows finalized in two halves (two threads)."""
    old, histogram.SPLIT_MIN_ROWS = histogram.SPLIT_MIN_ROWS, rows
    try:
        yield
    finally:
        histogram.SPLIT_MIN_ROWS = old


def check_histogram(h: Histogram, conventions=CONVENTIONS):
    for conv in conventions:
        ref = _run(lambda: h._finalize_reference(**conv))
        assert_same_result(_run(lambda: h.finalize(**conv)), ref)


# ----------------------------------------------------------------------------- strategies

_SINGLE_SIGS = [int(s) for s in binning.bin_sig(np.array([1.0, 1.0001, -3.25, 7e-3, 0.0], np.float32))]


@st.composite
def histograms(draw):
    n = draw(st.integers(1, 40))
    index = np.array(sorted(draw(st.sets(st.integers(0, binning.NBINS - 1), min_size=n, max_size=n))), np.int64)
    big = draw(st.booleans())
    count = st.one_of(st.just(0), st.integers(1, 5), st.integers(0, 2 ** 40 if big else 1000))
    normal = np.array(draw(st.lists(count, min_size=n, max_size=n)), np.int64)
    anomaly = np.array(draw(st.lists(count, min_size=n, max_size=n)), np.int64)
    sig = np.array(draw(st.lists(st.one_of(st.sampled_from(_SINGLE_SIGS), st.integers(0, 2 ** 32 - 1)),
                                 min_size=n, max_size=n)), np.int64)
    method = draw(st.sampled_from(["max_logit", "msp", "energy", "custom"]))
    params = {"float32_exact": True} if method == "custom" and draw(st.booleans()) else {}
    return Histogram(method, index, normal, anomaly, sig, params)


@st.composite
def tables(draw):
    """Descending coordinate tables with ties, empty groups, huge counts, tie flags."""
    n = draw(st.integers(1, 40))
    lo = np.sort(np.array(draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 0.5, 0.5, 1.0, 3.0, 1e30]),
                                        min_size=n, max_size=n))))[::-1].copy()
    width = np.array(draw(st.lists(st.sampled_from([0.0, 0.0, 1e-3, 0.25]), min_size=n, max_size=n)))
    big = draw(st.booleans())
    count = st.one_of(st.just(0), st.integers(1, 5), st.integers(0, 2 ** 40 if big else 1000))
    pos = np.array(draw(st.lists(count, min_size=n, max_size=n)), np.int64)
    neg = np.array(draw(st.lists(count, min_size=n, max_size=n)), np.int64)
    tied = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))) | (width == 0) & draw(st.booleans())
    return pos, neg, lo, lo + width, tied


# ----------------------------------------------------------------------------- finalization

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histograms(), st.sampled_from(CONVENTIONS))
def test_histogram_finalize_matches_spec(h, conv):
    check_histogram(h, [conv])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.sampled_from(CONVENTIONS), st.sampled_from(["energy", "msp"]))
def test_finalize_coords_matches_spec(t, conv, method):
    ref = _run(lambda: histogram._finalize_coords_reference(method, {"T": 1}, *t, **conv))
    for rows in (histogram.SPLIT_MIN_ROWS, 2):
        with split_at(rows):
            assert_same_result(_run(lambda: histogram.finalize_coords(method, {"T": 1}, *t, **conv)), ref)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(1e-6, 1.0), st.sampled_from(["first", "strict", "interp"]), st.sampled_from(["step", "trapezoid"]),
       histograms())
def test_any_tpr_target(target, fpr_mode, ap_mode, h):
    if fpr_mode == "strict" and target >= 1.0:
        target = 0.5
    check_histogram(h, [dict(fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=target)])


def _hist(normal, anomaly, sig=None, method="max_logit", start=binning.NMAG + 5000):
    n = len(normal)
    return Histogram(method, np.arange(start, start + n), np.array(normal, np.int64), np.array(anomaly, np.int64),
                     np.zeros(n, np.int64) if sig is None else np.array(sig, np.int64))


@pytest.mark.parametrize("normal,anomaly", [
    ([], []),                                  # no pixels
    ([5, 0, 3], [0, 0, 0]),                    # no positives
    ([0, 0], [4, 1]),                          # no negatives
    ([7], [3]),                                # one bin
    ([0, 7, 0], [0, 3, 0]),                    # one non-empty bin among empty ones
    ([2 ** 40] * 5, [2 ** 40, 0, 1, 2 ** 40, 3]),  # huge counts
    ([1, 0, 0, 4, 0, 9], [0, 0, 0, 0, 0, 1]),  # leading and inner runs without positives
    ([0, 3, 3, 3], [1, 0, 0, 0]),              # the only positives first
])
@pytest.mark.parametrize("tie", [False, True])
def test_degenerate_and_adversarial(normal, anomaly, tie):
    sig = [_SINGLE_SIGS[0] if tie else 0xFFFFFFFF] * len(normal)
    check_histogram(_hist(normal, anomaly, sig))
    check_histogram(_hist(normal, anomaly, sig, method="energy"))


def test_table_kept_only_when_asked_and_pickles():
    h = _hist([3, 1, 4, 1, 5], [0, 2, 0, 0, 1], method="msp")
    r = h.finalize()
    assert callable(r._groups)  # not computed by finalize
    r2 = pickle.loads(pickle.dumps(r))
    assert_same_result((r2, []), (h._finalize_reference(), []))
    assert not callable(r2._groups)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(histograms(), min_size=1, max_size=9), st.sampled_from(CONVENTIONS))
def test_histograms_finalized_together_equal_each_alone_and_the_spec(hs, conv):
    """finalize_histograms walks several histograms at once, one per thread (evaluate() and
    compute() finalize all their methods so): each result is bit for bit the one of that
    histogram alone, whatever it is finalized with, and the spec's to 1e-12."""
    together = _run(lambda: histogram.finalize_histograms(dict(enumerate(hs)), **conv))[0]
    for j, h in enumerate(hs):
        alone = _run(lambda: h.finalize(**conv))
        assert together[j].as_dict() == alone[0].as_dict() or all(
            _same_number(u, v, 0.0) for u, v in zip(_flat(together[j]), _flat(alone[0]))), j
        assert_same_result((together[j], alone[1]), _run(lambda: h._finalize_reference(**conv)))


def _flat(r):
    return [getattr(r, k) for k in METRIC_NAMES] + [x for k in METRIC_NAMES for x in r.bounds[k]]


def test_compiled_conventions_are_the_spec_s():
    assert set(_C.FIN_FPR_MODES) == set(FPR_MODES) and set(_C.FIN_AP_MODES) == set(AP_MODES)
    assert len(set(_C.FIN_FPR_MODES.values())) == len(FPR_MODES)


def test_exact_flag_runs_the_spec_only_where_every_bin_is_one_value():
    one = int(binning.bin_sig(np.array([1.5], np.float32))[0])  # the signature of a bin that saw one value
    h = _hist([3, 1, 4], [0, 2, 1], sig=[one] * 3)
    r = h.finalize(exact=True)
    assert r.exact and r.bounds["auroc"] == (r.auroc, r.auroc)
    # bins of several values: their order is lost, so "exact" would be a false claim
    # (it reported the binned value with zero-width bounds that excluded the true one)
    with pytest.raises(ValueError, match="hold several distinct values"):
        _hist([3, 1, 4], [0, 2, 1]).finalize(exact=True)


def test_bad_conventions_raise_like_the_spec():
    h = _hist([3, 1], [1, 2])
    for bad in (dict(fpr_mode="nope"), dict(ap_mode="nope"), dict(tpr_target=0.0), dict(fpr_mode="strict", tpr_target=1.0)):
        with pytest.raises(ValueError) as e1:
            h.finalize(**bad)
        with pytest.raises(ValueError) as e2:
            h._finalize_reference(**bad)
        assert str(e1.value) == str(e2.value)


def test_evaluate_histograms_match_spec(rng):
    x = random_logits(rng, 2, 7, 48, 64)
    y = random_labels(rng, 2, 48, 64)
    x16 = x.to(torch.float16)  # fp16 logits: many exact tie groups for max_logit
    for xi in (x, x16):
        res = anomfast.evaluate(xi, y, methods=("max_logit", "msp", "energy", "entropy"))
        for h in res.histograms.values():
            check_histogram(h)
            assert_same_result(_run(lambda: res[h.method]), _run(lambda: h._finalize_reference()))


# ----------------------------------------------------------------------------- bin bounds

def test_bin_bounds_match_binning():
    nb, nm = binning.NBINS, binning.NMAG
    special = np.concatenate([np.arange(0, 40), np.arange(nm - 40, nm + 40), np.arange(nb - 40, nb),
                              np.arange(23 << binning.MANT_BITS, (23 << binning.MANT_BITS) + 4) + nm,
                              nm - 1 - (np.arange(23 << binning.MANT_BITS, (23 << binning.MANT_BITS) + 4))])
    g = np.random.default_rng(0)
    index = np.concatenate([special, g.integers(0, nb, 40000)])
    for sig in (0, 0xFFFFFFFF, *_SINGLE_SIGS, int(g.integers(0, 2 ** 32))):
        s = np.full(index.size, sig, np.int64)
        lo, hi, _ = histogram._bin_lo_hi(index, s)
        got = np.array([_C.bin_bounds(int(i), sig) for i in index])
        assert np.array_equal(got[:, 0], lo) and np.array_equal(got[:, 1], hi), sig


# ----------------------------------------------------------------------------- read-out

def _random_state(g, n_methods, n_slots, big=False):
    st_ = HistState.new(n_methods, "cpu")
    total = n_methods * 2 * binning.NBINS
    # around the rows' edges (blocks straddling two rows) and anywhere
    edges = np.arange(1, 2 * n_methods) * binning.NBINS
    near = (edges[:, None] + np.arange(-70, 70)[None, :]).ravel()
    slots = np.unique(np.concatenate([g.choice(near, n_slots // 2), g.integers(0, total, n_slots),
                                      [0, total - 1]]))
    counts = g.integers(1, 2 ** 40 if big else 50, slots.size)
    sigs = g.integers(-2 ** 31, 2 ** 31, slots.size).astype(np.int32)
    st_.hist.view(-1)[torch.from_numpy(slots)] = torch.from_numpy(counts)
    st_.sig.view(-1)[torch.from_numpy(slots)] = torch.from_numpy(sigs)
    st_.occ[torch.from_numpy(np.unique(slots >> binning.OCC_SHIFT))] = 1
    # occupied blocks without counts (cleared, or a flush that added zero) are harmless
    st_.occ[torch.from_numpy(g.integers(0, st_.occ.numel(), 50))] = 1
    return st_


@pytest.mark.parametrize("n_methods", [1, 3, 8])
@pytest.mark.parametrize("big", [False, True])
def test_readout_matches_host_split(n_methods, big):
    g = np.random.default_rng(n_methods)
    state = _random_state(g, n_methods, 3000, big)
    fast, ref = state.sparse(), state._sparse_host()
    for a, b in zip(fast, ref):
        for u, v in zip(a, b):
            assert u.dtype == np.int64 and np.array_equal(u, v)
    for t in state._readout():
        assert t[4] == (int(t[1].sum()), int(t[2].sum()))


_NAMES = ("max_logit", "msp", "energy", "ext3", "sml", "gen", "entropy", "ext7")


@pytest.mark.parametrize("n_methods", [1, 3, 8])
@pytest.mark.parametrize("clear", [False, True])
@pytest.mark.parametrize("conventions", [{}, {"fpr_mode": "strict", "ap_mode": "trapezoid"},
                                         {"fpr_mode": "interp", "tpr_target": 0.8}])
def test_read_and_finalize_equals_readout_then_finalize(n_methods, clear, conventions):
    """The one-call read-out + finalization (what evaluate() and compute() use) gives the
    histograms of histograms_from_state and, bit for bit, the results of
    finalize_histograms on them: random states with counts around the rows' edges, random
    signatures (tie groups where the method's values are exact: max_logit, and an
    external score declared float32-exact), and a method without counts."""
    g = np.random.default_rng(100 + n_methods)
    state = _random_state(g, n_methods, 3000, big=n_methods == 3)
    if n_methods == 8:
        state.hist[5].zero_()  # occupied blocks, no counts
    names = _NAMES[:n_methods]

    def params_of(n):
        return {"float32_exact": True} if n == "ext3" else {}

    ref_state = state.copy()
    want_h = histogram.histograms_from_state(ref_state, names, params_of)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the method without counts
        want = histogram.finalize_histograms(want_h, **conventions)
        got_h, got = histogram.read_and_finalize(state, names, params_of, conventions, clear=clear)
    assert list(got) == list(names) == list(got_h)
    for n in names:
        assert got_h[n] == want_h[n], n
        assert str(got[n].as_dict()) == str(want[n].as_dict()), n  # repr: bit for bit, NaN included
        assert got[n].definitions == want[n].definitions
    if clear:
        assert int(state.hist.abs().sum()) == 0 and int(state.occ.sum()) == 0
    else:
        assert state == ref_state


def test_read_and_finalize_refuses_corrupt_counts():
    state = HistState.new(2, "cpu")
    state.hist[1, 0, 7] = -3
    state.occ[(2 * binning.NBINS + 7) >> binning.OCC_SHIFT] = 1
    with pytest.raises(ValueError, match="negative counts"):
        histogram.read_and_finalize(state, ["a", "b"], lambda n: {}, {})
    state = HistState.new(1, "cpu")
    state.hist[0, 0, 7] = 2 ** 62
    state.hist[0, 1, 9] = 2 ** 62
    state.occ[7 >> binning.OCC_SHIFT] = 1
    state.occ[(binning.NBINS + 9) >> binning.OCC_SHIFT] = 1
    with pytest.raises(ValueError, match="more than 2\\^62"):
        histogram.read_and_finalize(state, ["a"], lambda n: {}, {})


def test_readout_of_a_pass_and_empty_state(rng):
    x = random_logits(rng, 1, 5, 40, 56)
    y = random_labels(rng, 1, 40, 56)
    h, _, _ = _fused.fused_pass(x, y, resolve(("max_logit", "energy", "gen")))
    for a, b in zip(h.sparse(), h._sparse_host()):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    empty = HistState.new(2, "cpu")
    assert all(t[0].size == 0 for t in empty.sparse())


@pytest.mark.parametrize("n_methods", [1, 3])
def test_readout_with_clear_empties_the_state(n_methods):
    """The clearing read-out reads what the plain one reads and leaves every counter,
    signature and occupancy byte at zero (dense check), so a pooled state is as new."""
    g = np.random.default_rng(7 + n_methods)
    state = _random_state(g, n_methods, 3000, True)
    want = state.sparse()
    got = state._readout(clear=True)
    for a, b in zip(want, got):
        assert all(np.array_equal(u, v) for u, v in zip(a, b[:4]))
    assert int(state.hist.abs().sum()) == 0 and int(state.sig.abs().sum()) == 0 and int(state.occ.sum()) == 0


def test_pooled_buffers_never_change_returned_results(rng):
    """evaluate() reuses a pooled state and lends read-out slabs: a later call (other data,
    other method count) must not touch the histograms an earlier call returned, and a pooled
    state must give the same numbers as a fresh one."""
    histogram.release_buffers()
    x1, y1 = random_logits(rng, 2, 7, 48, 64), random_labels(rng, 2, 48, 64)
    x2, y2 = random_logits(rng, 1, 7, 48, 64, scale=9.0), random_labels(rng, 1, 48, 64)
    methods = ("max_logit", "msp", "energy")
    r1 = anomfast.evaluate(x1, y1, methods=methods)
    kept = {n: [a.copy() for a in (h.index, h.normal, h.anomaly, h.sig)] for n, h in r1.histograms.items()}
    assert len(histogram._POOL._states) == 1  # handed back, empty
    for _ in range(3):
        r2 = anomfast.evaluate(x2, y2, methods=methods)
        anomfast.evaluate(x2, y2, methods=methods[:2])
    for n, h in r1.histograms.items():
        assert all(np.array_equal(a, b) for a, b in zip((h.index, h.normal, h.anomaly, h.sig), kept[n])), n
    histogram.release_buffers()
    fresh = anomfast.evaluate(x2, y2, methods=methods)
    for n in methods:
        assert fresh[n].as_dict() == r2[n].as_dict(), n
        assert fresh.histograms[n] == r2.histograms[n], n
    # per image: one pooled state emptied after every image equals a fresh state per image
    per = anomfast.evaluate(x1, y1, methods=methods, per_image=True)
    per_ref = [anomfast.evaluate(x1[i:i + 1], y1[i:i + 1], methods=methods) for i in range(2)]
    for n in methods:
        assert per[n].auroc == pytest.approx(np.mean([r[n].auroc for r in per_ref]), abs=1e-15), n


def test_evaluate_hands_back_read_out_states_clean_and_unread_ones_dirty(rng):
    """A state read out with clear=True goes back to the pool clean (not cleared a second
    time when next taken); one that was never read out (exact=True keeps scores instead)
    goes back dirty, and the next call must still see it empty."""
    histogram.release_buffers()
    methods = ("max_logit", "msp", "energy")
    x1, y1 = random_logits(rng, 2, 6, 40, 48), random_labels(rng, 2, 40, 48)
    x2, y2 = random_logits(rng, 1, 6, 40, 48, scale=7.0), random_labels(rng, 1, 40, 48)
    anomfast.evaluate(x1, y1, methods=methods)
    assert [dirty for _, dirty in histogram._POOL._states] == [False]
    anomfast.evaluate(x1, y1, methods=methods, exact=True)
    assert [dirty for _, dirty in histogram._POOL._states] == [True]
    got = anomfast.evaluate(x2, y2, methods=methods)
    histogram.release_buffers()
    want = anomfast.evaluate(x2, y2, methods=methods)
    for n in methods:
        assert got[n].as_dict() == want[n].as_dict() and got.histograms[n] == want.histograms[n], n


@pytest.mark.parametrize("change,counted", [(c, n) for n in (False, True) for c in ("new block", "gain", "loss")]
                         + [("gain after the count", True)])
@pytest.mark.parametrize("clear", [False, True])
def test_readout_of_a_state_changed_between_its_calls(monkeypatch, change, clear, counted):
    """The read-out bounds each method's bins by its occupied chunks (and, counted: counts
    them exactly), then writes them into arrays of that size. A state that gains an
    occupied chunk in between (another thread adding to it), or, counted, a bin after the
    count, is refused, never read past the arrays, and with clear=True left empty, not
    half cleared; a change inside the occupied chunks before the sizes are taken is read as
    it is when read."""
    if counted:
        monkeypatch.setattr(histogram, "EXACT_COUNT_ABOVE", 0)
    g = np.random.default_rng(5)
    state = _random_state(g, 2, 2000)
    calls = []
    modes = dict(_C.READOUT_MODES)
    when = modes["count"] if change == "gain after the count" else modes["bounds"]

    class Core:  # the compiled module, with the state changed right after one call
        def __getattr__(self, name):
            return getattr(_C, name)

        def sparse_readout(self, *args):
            status = _C.sparse_readout(*args)
            calls.append(args[7])
            if args[7] == when:
                h = state.hist[0].numpy()  # method 0's two label rows
                occ = state.occ.numpy()
                if change == "new block":  # a count in a block no chunk of method 0 touched
                    q = next(q for q in range(2, binning.NBINS >> binning.OCC_SHIFT)
                             if not occ[q - 2:q + 3].any())
                    h[0, q << binning.OCC_SHIFT] = 3
                    occ[q] = 1
                elif change.startswith("gain"):  # a new non-empty bin, in an occupied block of the normal row
                    q = int(np.flatnonzero(occ[:binning.NBINS >> binning.OCC_SHIFT])[0])
                    b = next(i for i in range(q << binning.OCC_SHIFT, (q + 1) << binning.OCC_SHIFT)
                             if h[0, i] == 0 and h[1, i] == 0)
                    h[0, b] = 3
                else:  # a bin emptied
                    b = int(np.flatnonzero((h[0] > 0) & (h[1] == 0))[0])
                    h[0, b] = 0
                want.extend(state._sparse_host())
            return status

    want = []
    monkeypatch.setattr(histogram, "_C", Core())
    if change in ("new block", "gain after the count"):
        with pytest.raises(RuntimeError, match="changed between bounding and reading"):
            state._readout(clear=clear)
    else:
        got = state._readout(clear=clear)
        for a, b in zip(got, want):
            for u, v in zip(a[:4], b):
                np.testing.assert_array_equal(u, v)
    assert calls[0] == modes["bounds"] and (calls[1] == modes["count"]) == counted
    if clear:
        assert int(state.hist.abs().sum()) == 0 and int(state.sig.abs().sum()) == 0 and int(state.occ.sum()) == 0


@pytest.mark.parametrize("counted", [False, True])
def test_readout_arrays_are_exact_size_when_the_bound_is_loose(monkeypatch, counted):
    """64 slots per occupied chunk bound a method's bins: a sparse state (one bin per
    chunk) would leave returned histograms holding 64 times the memory they need, so such
    a read-out is copied into exact-size arrays (or, above EXACT_COUNT_ABOVE, counted
    exactly before anything is allocated); the values are the same."""
    if counted:
        monkeypatch.setattr(histogram, "EXACT_COUNT_ABOVE", 0)
    state = HistState.new(2, "cpu")
    idx = np.arange(0, binning.NBINS, 400)  # one bin in about every sixth chunk (bound: 1-2M slots)
    for j in range(2):
        state.hist[j, j, torch.from_numpy(idx)] = 1 + j
        state.occ[torch.from_numpy(np.unique((j * 2 * binning.NBINS + j * binning.NBINS + idx) >> binning.OCC_SHIFT))] = 1
    want = state._sparse_host()
    lent = []
    real = histogram._POOL.lend
    monkeypatch.setattr(histogram._POOL, "lend", lambda n: lent.append(n) or real(n))
    got = state._readout()
    for a, b in zip(got, want):
        for u, v in zip(a[:4], b):
            np.testing.assert_array_equal(u, v)
    k = sum(t[0].size for t in got)
    assert k == 2 * idx.size and lent[-1] == 4 * k, (k, lent)  # index, normal, anomaly, sig: exact size


def test_readout_writes_every_item_of_reused_memory(monkeypatch):
    """The read-out's arrays are views of pooled slabs that may still hold an earlier
    read-out's items: every item must be written, a signature of 0 (a method that keeps
    none, a bin whose counted rows have none) included."""
    g = np.random.default_rng(11)
    state = _random_state(g, 3, 3000)
    state.sig[1].zero_()  # method 1 keeps no signatures
    state.sig[2, 0].zero_()  # method 2: only the anomaly row has some
    want = state._sparse_host()
    real = histogram._POOL.lend

    def dirty(n):
        a = real(n)
        a.fill(-1)
        return a

    monkeypatch.setattr(histogram._POOL, "lend", dirty)
    got = state._readout()
    assert not got[1][3].any() and (got[2][3] == 0).any()
    for a, b in zip(got, want):
        for u, v in zip(a[:4], b):
            np.testing.assert_array_equal(u, v)


def test_readout_refuses_corrupt_counts():
    state = HistState.new(2, "cpu")
    state.hist[1, 0, 7] = -3
    state.occ[(2 * binning.NBINS + 7) >> binning.OCC_SHIFT] = 1
    with pytest.raises(ValueError, match="negative counts"):
        histogram.histograms_from_state(state, ["a", "b"], lambda n: {})
    state = HistState.new(1, "cpu")
    state.hist[0, 0, 7] = 2 ** 62
    state.hist[0, 1, 9] = 2 ** 62
    state.occ[7 >> binning.OCC_SHIFT] = 1
    state.occ[(binning.NBINS + 9) >> binning.OCC_SHIFT] = 1
    assert state._readout()[0][4] == (2 ** 62, 2 ** 62)
    with pytest.raises(ValueError, match="more than 2\\^62"):
        histogram.histograms_from_state(state, ["a"], lambda n: {})


def test_readout_checks_buffers():
    state = HistState.new(2, "cpu")
    state.sig = state.sig[:1]
    with pytest.raises(ValueError, match="tie signatures"):
        state.sparse()
    assert OCC_BLOCK == 1 << int(_C.OCC_SHIFT)


def test_evaluator_hands_its_state_back_and_a_reused_state_starts_empty(rng):
    """A collected Evaluator's CPU state goes back to the pool holding counts; the next
    Evaluator (or evaluate()) that takes it must see it empty: results equal a fresh state's.
    A state that replaced the pooled one (load_state_dict) is never pooled."""
    import gc
    histogram.release_buffers()
    methods = ("max_logit", "msp", "energy")
    x1, y1 = random_logits(rng, 2, 6, 40, 48), random_labels(rng, 2, 40, 48)
    x2, y2 = random_logits(rng, 1, 6, 40, 48, scale=7.0), random_labels(rng, 1, 40, 48)
    ev1 = anomfast.Evaluator(methods)
    ev1.update(x1, y1)
    st = ev1.hist
    del ev1
    gc.collect()
    assert [s for s, dirty in histogram._POOL._states] == [st]
    ev2 = anomfast.Evaluator(methods)
    ev2.update(x2, y2)
    assert ev2.hist is st
    got = ev2.compute()
    histogram.release_buffers()
    ev3 = anomfast.Evaluator(methods)
    ev3.update(x2, y2)
    want = ev3.compute()
    assert ev3.hist is not st
    for n in methods:
        assert got[n].as_dict() == want[n].as_dict() and got.histograms[n] == want.histograms[n], n
    sd = ev3.state_dict()
    del ev2, ev3
    gc.collect()
    histogram.release_buffers()
    ev4 = anomfast.Evaluator(methods)
    ev4.update(x1, y1)
    ev4.load_state_dict(sd)  # its state is now the loaded one, not the pooled one
    loaded = ev4.hist
    del ev4
    gc.collect()
    assert all(s is not loaded for s, _ in histogram._POOL._states)
    # a clear of a CPU state (the compiled clear-only walk) leaves every buffer at zero
    ev5 = anomfast.Evaluator(methods)
    ev5.update(x1, y1)
    ev5.reset()
    h = ev5.hist
    assert int(h.hist.abs().sum()) == 0 and int(h.sig.abs().sum()) == 0 and int(h.occ.sum()) == 0


def test_undefined_metric_warnings_point_at_the_callers_line(rng):
    """The warnings about metrics left undefined (no anomaly pixels) name the line that
    called evaluate() (plain, refine=True, per_image=True), Evaluator.compute(),
    Histogram.finalize(), finalize_histograms() or the torchmetrics adapter's compute(),
    not a line inside anomfast or torchmetrics (anomfast._warn walks out of their frames;
    a stack level counted by hand broke with every new call path)."""
    x = random_logits(rng, 1, 4, 8, 8)
    y = torch.zeros(1, 8, 8, dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = anomfast.evaluate(x, y, methods=["msp", "energy"])
        e = anomfast.Evaluator(["msp"])
        e.update(x, y)
        e.compute()
        r.histograms["msp"].finalize()
        histogram.finalize_histograms(r.histograms)
        anomfast.evaluate(x, y, methods=["msp"], refine=True)
        anomfast.evaluate(x, y, methods=["msp"], per_image=True)
    mine = [ww for ww in w if "no anomaly" in str(ww.message) or "undefined for every image" in str(ww.message)]
    assert len(mine) >= 2 + 1 + 1 + 2 + 1 + 1
    assert {ww.filename for ww in mine} == {__file__}, [(ww.filename, ww.lineno) for ww in mine]
    tm = pytest.importorskip("anomfast.tm")
    m = tm.AnomalyMetrics(methods=("msp",))
    m.update(x, y)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.compute()
    mine = [ww for ww in w if "no anomaly" in str(ww.message)]
    assert mine and {ww.filename for ww in mine} == {__file__}, [(ww.filename, ww.lineno) for ww in mine]
