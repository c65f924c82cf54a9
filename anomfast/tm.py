"""A real ``torchmetrics.Metric`` around the fused core (optional dependency), so the
evaluator plugs into Lightning as is::

    from anomfast.tm import AnomalyMetrics
    self.val_anomaly = AnomalyMetrics(methods=("max_logit", "energy"))
    self.val_anomaly.update(logits, labels)        # in validation_step
    self.log_dict(self.val_anomaly.compute_flat()) # or .compute() -> Results

States are the HistState buffers (counts and counters summed, tie signatures OR-ed, occupancy max-ed): torchmetrics'
own sync sums them across processes.
"""
from __future__ import annotations

try:
    from torchmetrics import Metric
except ImportError as exc:  # pragma: no cover - optional
    raise ImportError("anomfast.tm needs torchmetrics: pip install torchmetrics") from exc

import functools

import torch

from . import _core, _fused
from .evaluator import Evaluator, checked_counters
from .accumulate import _NO_C  # classes_min before any update
from .histogram import HistState, check_buffer


def _bitwise_or(x: torch.Tensor) -> torch.Tensor:
    """torchmetrics' reduction of gathered signature states (stacked on dim 0): OR."""
    if x.dim() == 0 or x.shape[0] == 0:
        return x
    out = x[0].clone()
    for y in x[1:]:
        out |= y
    return out


def _same_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """torchmetrics' reduction of gathered / merged fingerprint states (stacked on dim 0):
    they must all be equal, or the counts about to be summed mean different things."""
    if x.dim() == 0 or x.shape[0] == 0:
        return x
    if bool((x != x[0]).any()):
        raise ValueError("anomfast.tm.AnomalyMetrics: merging or syncing states counted with other methods, method "
                         "parameters or label maps (their fingerprints differ: "
                         f"{sorted(set(int(v) for v in x.flatten()))}); construct every metric with the same arguments")
    return x[0].clone()


class _Boxed:
    """compute()'s Results as torchmetrics' compute wrapper handles it: its
    apply_to_collection rebuilds a dict subclass from the items alone (dropping
    .histograms, .pixels, .components) but passes other objects through. No tensor is
    inside to clone."""

    __slots__ = ("results",)

    def __init__(self, results):
        self.results = results


class AnomalyMetrics(Metric):
    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, methods=None, *, label_map=None, ignore_index: int = 255, nonfinite: str = "error",
                 fpr_mode: str = "first", ap_mode: str = "step", **kwargs):
        from .methods import PARAMS
        method_params = {k: kwargs.pop(k) for k in list(kwargs) if k in PARAMS}
        super().__init__(**kwargs)
        self._ev_args = dict(methods=methods, label_map=label_map, ignore_index=ignore_index, nonfinite=nonfinite,
                             fpr_mode=fpr_mode, ap_mode=ap_mode, sync_on_compute=False, **method_params)
        self._ev = Evaluator(**self._ev_args)
        self._batch_ev = None  # forward()'s per-batch evaluator, made on first use
        M = len(self._ev.spec.names)
        # what the counts mean (methods, parameters, label map: Accumulator.fingerprint),
        # registered first so that a merge or sync of other counts is refused before any
        # state is summed
        self._fingerprint = self._ev._acc.fingerprint()
        self.add_state("fingerprint", default=torch.tensor(self._fingerprint, dtype=torch.int64),
                       dist_reduce_fx=_same_fingerprint)
        # torchmetrics keeps dense states (it clones the defaults): 4.5M bins x 12 bytes x 2
        # per method; the plain Evaluator allocates lazily and syncs only occupied blocks
        st = HistState.new(M, "cpu")
        self.add_state("hist", default=st.hist, dist_reduce_fx="sum")
        self.add_state("sig", default=st.sig, dist_reduce_fx=_bitwise_or)
        self.add_state("occ", default=st.occ, dist_reduce_fx="max")
        self.add_state("counters", default=torch.zeros(_core.N_COUNTERS, dtype=torch.int64), dist_reduce_fx="sum")
        # the smallest and largest class count C updated since reset(), merged by forward()
        # and across processes like the counts (the Evaluator's own C check restarts with
        # every state torchmetrics swaps in, as forward() does on each call): compute()
        # refuses a mix
        self.add_state("classes_min", default=torch.tensor(_NO_C, dtype=torch.int64), dist_reduce_fx="min")
        self.add_state("classes_max", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="max")

    def _state(self) -> HistState:
        return HistState(self.hist, self.sig, self.occ)

    def _wrap_compute(self, compute):
        # torchmetrics' wrapper (sync, cache) sees the Results boxed: see _Boxed
        wrapped = super()._wrap_compute(lambda *a, **k: _Boxed(compute(*a, **k)))

        @functools.wraps(compute)
        def unboxed(*args, **kwargs):
            return wrapped(*args, **kwargs).results

        return unboxed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchmetrics sets loaded states as they come: check them, and against each other,
        # before any is replaced (once here, not per update(): that would sync the host)
        fp = state_dict.get(prefix + "fingerprint")  # absent in states saved before it existed
        if fp is not None:
            if not (isinstance(fp, torch.Tensor) and fp.dtype == torch.int64 and fp.dim() == 0):
                raise ValueError(f"{type(self).__name__} state 'fingerprint' must be an int64 scalar tensor, got {fp!r}")
            if int(fp) != self._fingerprint:
                raise ValueError(f"{type(self).__name__}: this state was counted with other methods, method parameters "
                                 f"or label map (fingerprint {int(fp)}, this metric's {self._fingerprint}: methods "
                                 f"{list(self._ev.spec.names)}, label map {self._ev.label_map.describe()}); load it "
                                 "into a metric constructed with the same arguments")
            state_dict[prefix + "fingerprint"] = fp.clone()
        new = {k: state_dict.get(prefix + k, getattr(self, k)) for k in ("hist", "sig", "occ", "counters")}
        if prefix + "hist" in state_dict:  # saved before the class-count states: C unknown
            for k, v in (("classes_min", _NO_C), ("classes_max", 0)):
                state_dict.setdefault(prefix + k, torch.tensor(v, dtype=torch.int64))
        for k in ("classes_min", "classes_max"):
            v = state_dict.get(prefix + k)
            if v is not None and not (isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.dim() == 0
                                      and 0 <= int(v) <= _NO_C):
                raise ValueError(f"{type(self).__name__} state {k!r} must be an int64 scalar tensor in [0, 2^62], "
                                 f"got {v!r}")
        if any(prefix + k in state_dict for k in new):
            what = f"{type(self).__name__} state"
            binned = checked_counters(new["counters"], what)[_core.CNT_BINNED]
            st = HistState(new["hist"], new["sig"], new["occ"])
            dev = st.hist.device if isinstance(st.hist, torch.Tensor) else torch.device("cpu")
            st.check(len(self._ev.spec.names), dev)
            check_buffer(new["counters"], "counters", (_core.N_COUNTERS,), torch.int64, dev)
            st.check_counts(binned, what)
            # torchmetrics keeps the loaded tensors themselves, and update() adds into the
            # states in place: load copies, or the caller's state_dict (and every metric
            # loaded from it) would change with each update. The occupied blocks only
            # (HistState.copy): a dense clone would back every page of the 4.5M-bin buffers.
            cp = st.copy()
            for k in ("hist", "sig", "occ"):
                if prefix + k in state_dict:
                    state_dict[prefix + k] = getattr(cp, k)
            if prefix + "counters" in state_dict:
                state_dict[prefix + "counters"] = new["counters"].clone()
        for k in ("classes_min", "classes_max"):
            if isinstance(state_dict.get(prefix + k), torch.Tensor):
                state_dict[prefix + k] = state_dict[prefix + k].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None,
               features: torch.Tensor | None = None) -> None:
        self._ev.hist, self._ev.counters = self._state(), self.counters
        self._ev.update(logits, labels, keep, features=features)
        C = self._ev._classes[0]  # the C update() read (a (C, H, W) image too); no host sync below
        self.classes_min = torch.clamp(self.classes_min, max=C)
        self.classes_max = torch.clamp(self.classes_max, min=C)

    def _forward_reduce_state_update(self, *args, **kwargs):
        """forward() (Lightning's ``metric(logits, labels)``): the batch's own results, and the
        batch added to the accumulated state. torchmetrics' version copies the whole state,
        resets it to fresh dense defaults and adds them back (about 1 GB of copies per call
        for 3 methods: 0.4 s on 2 cores for a 64 x 64 batch); here a second, sparse
        Evaluator (pooled state, emptied after each call) scores the batch for its results,
        and update() adds it to the state in place: two fused passes, no dense copy.
        (dist_sync_on_step=True still takes torchmetrics' full-state path.)"""
        batch = self._batch_results(*args, **kwargs)
        self.update(*args, **kwargs)  # torchmetrics' wrapped update: the update count, the cache reset
        return batch

    def _batch_results(self, logits, labels, keep=None, features=None):
        if self._batch_ev is None:
            self._batch_ev = Evaluator(**self._ev_args)
        ev = self._batch_ev
        try:
            ev.update(logits, labels, keep, features=features)
            return ev.compute()
        finally:
            ev.reset()

    def compute(self):
        lo, hi = int(self.classes_min), int(self.classes_max)
        if hi > 0 and lo != hi:
            raise ValueError(f"the updates since reset() (merged by forward() or across processes) had logits with "
                             f"different class counts, C from {lo} to {hi}; every batch must have the same classes")
        self._ev.hist, self._ev.counters = self._state(), self.counters
        return self._ev.compute()

    def compute_flat(self) -> dict:
        """{"<method>/<metric>": float} for logging."""
        r = self.compute()
        return {f"{m}/{k}": getattr(v, k) for m, v in r.items() for k in ("auroc", "ap", "fpr95", "f1", "threshold", "fpr95_threshold")}


__all__ = ["AnomalyMetrics"]
del _fused
