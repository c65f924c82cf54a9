"""Property tests (hypothesis) of the fused core and the binning on small random inputs
built from the values real networks and corrupt data produce: large margins, exact ties,
one class (C = 1), +-0, subnormal differences, NaN and +-inf logits, void labels. For every
draw: finite pixels' scores equal the float64 reference within float32 tolerance, a pixel
with a non-finite logit is NaN in every map and counted (never binned), and the histogram
state holds exactly the binning of the core's own coordinates. The binning of any float32
(subnormals, zeros, infinities) equals the independent frexp rule of the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anomfast import _core, _fused, binning, reference
from anomfast.methods import resolve

from test_scores import assert_state_equals_binning, exact_mask, ref_kwargs, scale_of

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

METHODS = ("max_logit", "msp", "energy", "entropy", "gen")
SPECIAL = [0.0, -0.0, 1.0, -1.0, 40.0, -40.0, 80.0, 1e-30, -1e-30, 3e38, -3e38]
NONFINITE = [float("nan"), float("inf"), float("-inf")]


@st.composite
def batches(draw):
    C = draw(st.integers(1, 6))
    H = draw(st.integers(1, 3))
    W = draw(st.integers(1, 9))
    n = C * H * W
    finite = st.one_of(st.floats(-60, 60, width=32), st.sampled_from(SPECIAL))
    vals = draw(st.lists(st.one_of(finite, finite, finite, st.sampled_from(NONFINITE)), min_size=n, max_size=n))
    if draw(st.booleans()):  # exact ties: a few distinct values repeated
        pool = draw(st.lists(finite, min_size=1, max_size=3))
        vals = [pool[i % len(pool)] if i % 3 else v for i, v in enumerate(vals)]
    x = torch.tensor(vals, dtype=torch.float32).reshape(1, C, H, W)
    y = torch.tensor(draw(st.lists(st.sampled_from([0, 1, 1, 255]), min_size=H * W, max_size=H * W)),
                     dtype=torch.uint8).reshape(1, H, W)
    return x, y


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_fused_core_on_random_batches(batch):
    x, y = batch
    spec = resolve(METHODS)
    hist, counters, maps = _fused.fused_pass(_fused.as_logits(x), _fused.as_labels(y, x), spec, want_maps=True)
    bad = ~torch.isfinite(x).all(dim=1)  # (1, H, W): a NaN / inf logit
    valid = y != 255
    for j, m in enumerate(METHODS):
        got = maps[j]
        assert bool(torch.isnan(got[bad]).all()), f"{m}: a non-finite logit must give NaN"
        ok = ~bad
        if bool(ok.any()):
            x64 = x.double()
            ref = reference.score(x64, m, **ref_kwargs(m))
            # finite logits further apart than float32 holds may overflow exp sums to inf
            fin = ok & torch.isfinite(got)
            if m == "gen":
                # known limit (README, Methods): when every other class is more than 87.3
                # below the winner, float32 exp underflows and the winner's (1 - p)^g
                # term is lost (the reference keeps it down to a 745 margin): compared
                # up to that margin only
                top2 = x64.topk(min(2, x64.shape[1]), dim=1).values
                margin = (top2[:, 0] - top2[:, -1]) if x64.shape[1] > 1 else torch.zeros_like(top2[:, 0])
                fin = fin & ((margin <= 87.0) | (margin > 745.0))
            err = (got.double() - ref)[fin].abs()
            tol = (1e-5 * (ref.abs() + scale_of(m, x64, None)) + 1e-30)[fin]
            assert bool((err <= tol).all()), f"{m}: max err {err.max():.3g}"
    c = counters.tolist()
    assert c[_core.CNT_NONFINITE] == int((bad & valid).sum())
    assert c[_core.CNT_VOID] == int((~valid).sum())
    binned = (~bad & valid & torch.isfinite(maps).all(dim=0))
    assert c[_core.CNT_BINNED] == int(binned.sum()) and c[_core.CNT_INVALID] == 0
    assert_state_equals_binning(hist, maps, y.to(torch.int64), ok=binned, sig_mask=exact_mask(METHODS),
                                what="random batch")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_subnormal=True), min_size=1, max_size=64))
def test_binning_of_any_float32_equals_the_frexp_rule(vals):
    t = np.asarray(vals, dtype=np.float32)
    np.testing.assert_array_equal(binning.bin_index(t), reference.bin_index(torch.from_numpy(t)).numpy())
    # monotone: a larger value never lands in a lower bin
    o = np.argsort(t, kind="stable")
    assert (np.diff(binning.bin_index(t[o]).astype(np.int64)) >= 0).all()
