"""Stateful evaluator for training / validation loops (shaped like a torchmetrics metric).

    ev = anomfast.Evaluator(methods=("max_logit", "energy"))
    for logits, labels in loader:
        ev.update(logits, labels)          # no host sync, no device->host copy
    results = ev.compute()                 # all_reduce across ranks, then finalize
    ev.reset()

State: one anomfast.accumulate.Accumulator (the core's HistState and counters, on the
device of the first batch; its distributed sync moves only the blocks some rank touched
and is bit-identical to one process seeing all data). Input checks that need the data
(label values outside the label map, NaN/inf logits) are counted on the device by the
core and raised by compute().

Distributed samplers pad the last batch with duplicated samples (DistributedSampler
repeats indices so every rank gets the same count), which would count those pixels
twice. Pass ``keep`` (bool (B,), e.g. ``dataset_index < len(dataset)``) to update() to
drop padded samples without a host sync; or use ``drop_last=True`` / an uneven sampler.

The fused update is the custom op ``anomfast::fused_update`` under torch.compile, so a
validation step calling update() compiles with ``torch.compile(fullgraph=True)``.

Component metrics (anomfast.components): ``Evaluator(..., components={"thresholds": t})``
with a score threshold per method also labels each updated image's components at those
thresholds and adds ``results.components`` (integer counts, summed by one all_reduce).
The best pixel-F1 threshold is known only after all the data, so the usual use is two
phases: ``r = ev.compute()`` after a first pass, then ``Evaluator(..., components=
{"thresholds": r})`` over the same data. That update() scores the batch a second time
for the maps and labels them (on the CPU, or on the device for CUDA tensors), then waits for
the per-component rows: it is not traced by torch.compile. state_dict()
carries the component counts with the settings and thresholds they were counted at.
"""
from __future__ import annotations

import copy

import torch

from . import _core, _fused
from .accumulate import Accumulator, Results, _is_compiling
from .components import accumulator_for, as_component_spec
from .histogram import _MAX_TOTAL, FORMAT, HistState, check_buffer, check_format
from .inputs import _layout_hint
from .labels import as_label_map
from .metrics import check_conventions
from .methods import resolve
from .protocols import check_protocol


def _mask_dropped(y: torch.Tensor, keep: torch.Tensor, void_ids) -> torch.Tensor:
    """Labels of the samples keep drops set to a void id, in a dtype that holds it: bool
    labels become uint8 (0 / 1 keep their meaning; True cannot hold 255), and when no
    void id fits the label dtype (int8 and 255, uint8 and 1000) the labels widen to int64
    instead of wrapping the fill value into some other class."""
    if y.dtype == torch.bool:
        y = y.to(torch.uint8)
    info = torch.iinfo(y.dtype)
    fits = [v for v in void_ids if info.min <= v <= info.max]
    if not fits:
        y, fits = y.to(torch.int64), list(void_ids)
    void = torch.full((), fits[0], dtype=y.dtype, device=y.device)
    return torch.where(keep.to(y.device)[:, None, None], y, void)


def checked_counters(c, what: str) -> list:
    """Loaded counters as ints: an int64 tensor of shape (N_COUNTERS,), non-negative and
    adding up to at most 2^62 pixels (the histograms' bound, so that no later update()
    can overflow them)."""
    if not isinstance(c, torch.Tensor) or c.dtype != torch.int64 or tuple(c.shape) != (_core.N_COUNTERS,):
        got = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, torch.Tensor) else type(c).__name__
        raise ValueError(f"{what} counters must be a non-negative int64 tensor of shape ({_core.N_COUNTERS},), "
                         f"got {got}")
    v = [int(x) for x in c.tolist()]
    if min(v) < 0 or sum(v) > _MAX_TOTAL:
        raise ValueError(f"{what} counters {v} must be non-negative and add up to at most 2^62 pixels; the state "
                         "is corrupt")
    return v


class Evaluator:
    """A stateful shell over one anomfast.accumulate.Accumulator (see the module docstring)."""

    def __init__(self, methods=None, *, label_map=None, ignore_index: int = 255, nonfinite: str = "error",
                 fpr_mode: str = "first", ap_mode: str = "step", tpr_target: float = 0.95,
                 sync_on_compute: bool = True, process_group=None, protocol: str | None = None, components=None,
                 **method_params):
        if check_protocol(protocol) is not None:  # every preset needs per-pixel scores
            raise ValueError(f"protocol={protocol!r} cannot run in the streaming Evaluator: it casts every pixel's "
                             "score to float16, draws a seeded subsample over all pixels and sorts it, and this "
                             "evaluator keeps histograms, not per-pixel scores; use anomfast.evaluate(logits, "
                             f"labels, protocol={protocol!r}) or `anomfast eval --protocol {protocol}`")
        if nonfinite not in ("error", "ignore"):
            raise ValueError(f"nonfinite must be 'error' or 'ignore', got {nonfinite!r}")
        self.spec = resolve(methods, **method_params)
        self.label_map = as_label_map(label_map, ignore_index)
        self.nonfinite = nonfinite
        # checked now, not at compute() after a whole epoch
        tpr_target = check_conventions(fpr_mode, ap_mode, tpr_target)
        self.conventions = dict(fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=tpr_target)
        self.sync_on_compute = sync_on_compute
        self.process_group = process_group
        self._acc = Accumulator(self.spec, self.label_map, nonfinite)
        # C of the updates since construction / reset(), and the counters tensor it goes with
        # (a state swapped in from outside, as the torchmetrics adapter does, starts afresh)
        self._classes: tuple | None = None
        cs = as_component_spec(components)
        self.components = None if cs is None else accumulator_for(cs, self.spec.names, self.label_map,
                                                                  where="Evaluator(components=...)")

    # the accumulator's buffers, as the torchmetrics adapter and checkpoints see them
    hist = property(lambda self: self._acc.state, lambda self, v: setattr(self._acc, "state", v))
    counters = property(lambda self: self._acc.counters, lambda self, v: setattr(self._acc, "counters", v))

    @property
    def methods(self) -> tuple:
        return self.spec.names

    def update(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None, *,
               features: torch.Tensor | None = None) -> None:
        """Adds a batch: logits (B, C, H, W) float32/16/bf16, labels (B, H, W) integers.
        ``keep`` (bool (B,)) drops samples (e.g. distributed padding) without a host sync.
        ``features`` (B, D, h, w): the feature map of the batch, needed by HEAT."""
        _layout_hint(logits, labels)  # channel-last logits: say so, not a label shape error
        x = _fused.as_logits(logits)
        if self._classes is not None and self._classes[1] is self.counters and x.shape[1] != self._classes[0]:
            raise ValueError(f"logits have C = {x.shape[1]} classes but earlier update() calls (since construction "
                             f"or the last reset()) had C = {self._classes[0]}; every batch must have the same "
                             "classes")
        y = _fused.as_labels(labels, x)
        if keep is not None:
            if not self.label_map.void_ids:
                raise ValueError("keep= needs a void id in the label map to mask dropped samples")
            if not isinstance(keep, torch.Tensor):
                raise TypeError(f"keep must be a bool tensor of shape ({x.shape[0]},), got {type(keep).__name__}")
            if keep.shape != (x.shape[0],) or keep.dtype != torch.bool:
                raise ValueError(f"keep must be a bool tensor of shape ({x.shape[0]},), got {keep.dtype} {tuple(keep.shape)}")
            y = _mask_dropped(y, keep, self.label_map.void_ids)
        self._acc.add(x, y, features)  # no host sync; one opaque op inside torch.compile
        self._classes = (int(x.shape[1]), self.counters)
        if self.components is not None:
            self._update_components(x, y, features)

    def _update_components(self, x, y, features) -> None:
        if _is_compiling():
            raise RuntimeError("Evaluator(components=...) waits for each batch's component rows (a host sync, and "
                               "CPU labeling for CPU tensors); call update() outside "
                               "torch.compile (or evaluate the components in a separate, eager Evaluator)")
        _, _, maps = _fused.fused_pass(x, None, self.spec, want_maps=True, features=features)
        self.components.update_maps(maps, y)

    def compute(self) -> Results:
        """Per method AUROC, AP, FPR95, best F1 + threshold with certified bounds.
        Raises RuntimeError when no pixel was added: before any update(), and likewise
        after reset() with no update() since (in a distributed run: on no rank)."""
        st = self._acc.state
        if st is not None:  # buffers set from outside (the torchmetrics adapter's states) meet the read-out here
            st.check(len(self.spec.names), st.device)
            check_buffer(self.counters, "counters", (_core.N_COUNTERS,), torch.int64, st.device)
        acc = self._acc
        if self.sync_on_compute:
            comp = self.components
            extra = None if comp is None else {"components": comp.spec.describe(), "thresholds": comp.thresholds}
            acc = self._acc.synced(self.process_group, classes=self._classes_seen(), extra=extra)
        if acc.state is None:
            raise RuntimeError("compute() called before any update()")
        if not bool(acc.counters.any()):
            raise RuntimeError("compute() called with no data: no update() with pixels since construction or the "
                               "last reset()")
        res = acc.results(self.conventions)
        if self.components is not None:
            comp = self.components
            if acc is not self._acc:  # synced: the component counts too
                comp = copy.copy(comp)
                comp.counts = comp.counts.clone()
                comp.all_reduce_(group=self.process_group, device=acc.state.device)
            res.components = comp.results()
        return res

    def _classes_seen(self) -> int | None:
        """C of the updates into the current counters (since construction, reset() or a
        loaded state that records it), None when unknown."""
        return self._classes[0] if self._classes is not None and self._classes[1] is self.counters else None

    def reset(self) -> None:
        self._classes = None
        self._acc.clear_()   # only the occupied blocks: the buffers keep their identity
        if self.components is not None:
            self.components.reset()

    def state_dict(self) -> dict:
        """Sparse, versioned state (only the non-empty bins; the device is not kept: a
        loaded state goes to the device of the next update())."""
        d = {"format": FORMAT, "methods": list(self.spec.names),
             "params": {n: self.spec.params_of(n) for n in self.spec.names},
             "label_map": self.label_map.describe(), "classes": self._classes_seen(),
             "hist": None if self.hist is None else self.hist.to_state(),
             "counters": None if self.counters is None else self.counters.cpu().clone()}
        if self.components is not None:
            d["components"] = self.components.state()
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restores state_dict()'s output; every buffer is checked before the core sees it."""
        if not isinstance(d, dict):
            raise TypeError(f"state must be a dict from Evaluator.state_dict(), got {type(d).__name__}")
        check_format(d.get("format"), "evaluator state")
        mine = {n: self.spec.params_of(n) for n in self.spec.names}
        if list(d.get("methods", ())) != list(self.spec.names) or d.get("params") != mine:
            raise ValueError(f"state is for methods {d.get('methods')} with parameters {d.get('params')}, this "
                             f"evaluator has {list(self.spec.names)} with {mine}")
        # label map and class count: recorded since 2026-12-03 (older states have neither: not checked)
        if "label_map" in d and d["label_map"] != self.label_map.describe():
            raise ValueError(f"state was counted with label map {d['label_map']}, this evaluator has "
                             f"{self.label_map.describe()}: the same pixels would mean other classes")
        classes = d.get("classes")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
            raise ValueError(f"state's class count must be a positive int or None, got {classes!r}")
        if self.components is not None:
            self.components.load_state(d.get("components"))
        self._classes = None
        if d.get("hist") is None:
            self.hist = self.counters = None
            return
        c = d.get("counters")
        binned = checked_counters(c, "state")[_core.CNT_BINNED]
        hist = HistState.from_state(d["hist"], len(self.spec.names), "cpu", binned=binned)
        dev = self.hist.device if self.hist is not None else torch.device("cpu")
        self._acc.follows_batch = self.hist is None
        self.hist = HistState(hist.hist.to(dev), hist.sig.to(dev), hist.occ.to(dev))
        self.counters = c.to(dev).clone().contiguous()
        if classes is not None:  # later update() calls must have the same C, as before the save
            self._classes = (classes, self.counters)

    # pickle / copy.deepcopy / torch.save of the evaluator itself: the sparse state_dict(),
    # not the dense buffers (4.5M bins per method and label: ~300 MB for 3 methods)
    def __getstate__(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("_acc", "_classes")}
        d["_saved_state"] = self.state_dict()
        return d

    def __setstate__(self, d: dict) -> None:
        d = dict(d)
        saved = d.pop("_saved_state")
        self.__dict__.update(d)
        self._acc = Accumulator(self.spec, self.label_map, self.nonfinite)
        self._classes = None
        self.load_state_dict(saved)  # on the CPU until the next update() moves it to that batch's device
