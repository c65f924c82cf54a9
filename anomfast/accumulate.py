"""The one accumulation of the fused core's histograms (torchmetrics' _update / _compute).

    acc = Accumulator(spec, label_map, nonfinite="error")
    for x, y in batches:             # validated by _fused.as_logits / as_labels
        acc.add(x, y)                # one fused pass into the state, no host sync
    results = acc.synced().results(conventions)   # all_reduce under torch.distributed, finalize
    acc.release()                    # the pooled CPU state back to the pool

anomfast.evaluate (histogram and per-image modes), anomfast.Evaluator (a shell over one
Accumulator) and the CLI's grid runner all go through it: the fused update, the
distributed sync, the read-out and the finalization exist once. State: a HistState and
the core's int64 counters on the first batch's device; a CPU state comes from the pool
(HistState.acquire) and goes back by release() or, still holding counts, when the
Accumulator is collected; a state set from outside (loaded, the torchmetrics adapter's)
is never pooled. Counters are cumulative: check() after each batch raises on the first
bad one, so the counts it reports past a clean history are that batch's.
"""
from __future__ import annotations

import hashlib
import json
import threading
import weakref
from typing import Optional

import torch

from . import _fused
from .histogram import HistState, finalize_histograms, histograms_from_state, read_and_finalize
from .labels import LabelMap
from .methods import MethodSpec
from .tables import results_table


_NO_C = 2**62  # a process that knows no class count takes no part in the C agreement


class Results(dict):
    """Mapping method -> MetricResult, plus the histograms and pixel counts behind them."""

    histograms: dict
    pixels: dict

    def table(self, digits: int = 2) -> str:
        return results_table(self, digits=digits)

    def __str__(self) -> str:
        return self.table()


def finalize(histograms: dict, conventions: dict) -> dict:
    """{method: MetricResult} of {method: Histogram} under the FPR95 / AP conventions (all
    at once: histogram.finalize_histograms)."""
    return finalize_histograms(histograms, **conventions)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()  # torch >= 2.3 (custom_op needs 2.4)


# torch.compile traces Accumulator.add as this one opaque op; eager calls go through
# _fused.fused_pass to the same launch (the op dispatch costs tens of microseconds per call)
@torch.library.custom_op("anomfast::fused_update", mutates_args=("hist", "sig", "occ", "counters"))
def fused_update(logits: torch.Tensor, labels: torch.Tensor, hist: torch.Tensor, sig: torch.Tensor,
                 occ: torch.Tensor, counters: torch.Tensor, lut: torch.Tensor, lut_offset: int, codes: list[int],
                 temperature: float, gen_gamma: float, entropy_normalize: bool, sml_mean: Optional[torch.Tensor],
                 sml_inv: Optional[torch.Tensor], heat_m: Optional[torch.Tensor] = None,
                 heat_params: Optional[list[float]] = None, ext: Optional[torch.Tensor] = None) -> None:
    """Adds the batch to the HistState buffers (hist, sig, occ) and counters in one fused
    pass. heat_m: HEAT's Mahalanobis map (B, H, W); heat_params: (T, mean, 1 / std); ext:
    (n_ext, B, H, W) external coordinates (post-processed SML)."""
    _fused.launch(logits, labels, HistState(hist, sig, occ), counters, None, codes, temperature, gen_gamma,
                  entropy_normalize, sml_mean, sml_inv, lut, lut_offset, heat_m=heat_m,
                  heat_params=heat_params if heat_params is not None else (1.0, 0.0, 1.0), ext=ext)


@fused_update.register_fake
def _(logits, labels, hist, sig, occ, counters, lut, lut_offset, codes, temperature, gen_gamma, entropy_normalize,
      sml_mean, sml_inv, heat_m=None, heat_params=None, ext=None) -> None:
    return None


def _give_back(lent: list, dirty: bool = True) -> None:
    if lent[0] is not None:
        lent[0].release(dirty=dirty)  # a dirty state is cleared when next taken, not at collection time
        lent[0] = None


class Accumulator:
    """HistState + counters of one method spec and label map (see the module docstring)."""

    def __init__(self, spec: MethodSpec, label_map: LabelMap, nonfinite: str = "error"):
        self.spec, self.label_map, self.nonfinite = spec, label_map, nonfinite
        # one fused pass, read-out or clear at a time: passes running at once into one state
        # lose counts (the first allocation and the core's unlocked adds), and a read-out
        # during a pass mixes batches (eager calls only: a traced update() takes no lock)
        self._lock = threading.RLock()
        self._lent = [None]  # the pooled CPU state taken, handed back when this is collected
        weakref.finalize(self, _give_back, self._lent)
        self._state: HistState | None = None
        self.counters: torch.Tensor | None = None
        self.follows_batch = False  # a state loaded before any batch (on the CPU) moves to its device
        self._dirty = False  # the state may hold counts (a read-out with clear=True or clear_() empties it)

    @property
    def state(self) -> Optional[HistState]:
        return self._state

    @state.setter
    def state(self, value: Optional[HistState]) -> None:
        self._state = value
        if value is not self._lent[0]:
            self._lent[0] = None  # not the pooled state any more: never handed back

    def allocate(self, device) -> HistState:
        """The state on `device`: a pooled CPU state when one is free (not while torch.compile
        traces: the pool's lock is no graph operation), else a new one."""
        device = torch.device(device) if isinstance(device, str) else device
        if self.state is None:
            self.state = (HistState.new if _is_compiling() else HistState.acquire)(len(self.spec.names), device)
            self._lent[0] = self.state if self.state.device.type == "cpu" else None
            self.counters = _fused.new_counters(device)
        elif self.state.device != device and self.follows_batch:
            st = self.state
            self.state = HistState(st.hist.to(device), st.sig.to(device), st.occ.to(device))
            self.counters = self.counters.to(device)
        elif self.state.device != device:
            raise ValueError(f"this evaluator's state is on {self.state.device} but the batch is on {device}")
        self.follows_batch = False
        return self.state

    def add(self, logits: torch.Tensor, labels: torch.Tensor, features=None, *, want_maps: bool = False,
            num_threads: int = 0):
        """Adds a batch (from _fused.as_logits / as_labels; features (B, D, h, w) for HEAT)
        in one fused pass; returns the (M, B, H, W) float32 score maps when want_maps
        (eager), else None. Raises nothing about the data itself: see check()."""
        x, spec = logits, self.spec
        if not _is_compiling():
            with self._lock:
                st = self.allocate(x.device)
                self._dirty = True
                return _fused.fused_pass(x, labels, spec, label_map=self.label_map, hist=st, counters=self.counters,
                                         want_maps=want_maps, num_threads=num_threads, features=features)[2]
        st = self.allocate(x.device)
        self._dirty = True
        # traced: the same launch as one opaque op (fused_pass's checks and inputs, no maps)
        if spec.sml is not None and "sml" in spec.names and spec.sml.num_classes != x.shape[1]:
            raise ValueError(f"SML statistics were fitted for {spec.sml.num_classes} classes but the logits have "
                             f"C = {x.shape[1]}")
        _fused.check_device_support(spec, x.device)
        heat_m = _fused.heat_input(x, spec, features)
        lut, off = self.label_map.lut()
        mean, inv = spec.sml.kernel_arrays(x.device) if "sml" in spec.names else (None, None)
        torch.ops.anomfast.fused_update(x, labels, st.hist, st.sig, st.occ, self.counters, lut.to(x.device), off,
                                        spec.codes, spec.temperature, spec.gen_gamma, spec.entropy_normalize, mean,
                                        inv, heat_m, None if heat_m is None else list(spec.heat.kernel_constants()),
                                        _fused.external_input(x, spec))

    def check(self, labels: torch.Tensor | None = None) -> dict:
        """{nonfinite, invalid, void, binned} pixels (one host sync); raises on label values
        outside the label map (named from `labels`, the last batch) and, nonfinite="error",
        on non-finite scores."""
        return _fused.check_counters(self.counters, labels, self.label_map, self.nonfinite)

    def fingerprint(self, extra=None) -> int:
        """A 62-bit digest of what the counts mean (methods, their parameters, the label map,
        and `extra`), equal in every process that counts the same things."""
        what = {"methods": list(self.spec.names), "params": {n: self.spec.params_of(n) for n in self.spec.names},
                "label_map": self.label_map.describe(), "extra": extra}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 2

    def _comm_device(self, group) -> torch.device:
        """Where this process's side of a collective lives: its state's device, else what
        the backend needs (a CUDA device for NCCL, the CPU otherwise)."""
        if self.state is not None:
            return self.state.device
        if "nccl" in str(torch.distributed.get_backend(group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def synced(self, group=None, classes: int | None = None, extra=None) -> "Accumulator":
        """A copy summed over the processes of `group` when torch.distributed is initialized
        (the occupied blocks' counts summed, signatures OR-ed, and the counters), else self.

        First, one small all_reduce makes every process agree on what it is about to sum:
        the same methods, parameters and label map (fingerprint(extra)), the same class
        count C where known (`classes`), and whether any process has a state. A mismatch
        raises the same error in every process, and a process without updates takes part
        with an empty state, so no collective is left waiting or fed buffers of another
        size. With no state anywhere, self is returned unchanged (state None) everywhere."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        has = self.state is not None
        fp = self.fingerprint(extra)
        c = int(classes) if (has and classes is not None) else None
        # max over processes of (fp, -fp, has, -has, C, -C): the max and the min of each
        v = torch.tensor([fp, -fp, int(has), -int(has), -1 if c is None else c, -_NO_C if c is None else -c],
                         dtype=torch.int64, device=self._comm_device(group))
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
        fp_max, fp_min, any_has, c_max, c_min = int(v[0]), -int(v[1]), int(v[2]), int(v[4]), -int(v[5])
        if fp_max != fp_min:
            raise RuntimeError("the processes of this distributed run do not count the same things: their methods, "
                               "method parameters or label maps differ (this process: methods "
                               f"{list(self.spec.names)}, label map {self.label_map.describe()}); construct the "
                               "evaluator with the same arguments on every rank")
        if c_max >= 0 and c_max != c_min:
            raise ValueError(f"the processes of this distributed run saw logits with different class counts (C from "
                             f"{c_min} to {c_max}; this process: {c}); every rank must evaluate the same classes")
        if not any_has:
            return self
        out = Accumulator(self.spec, self.label_map, self.nonfinite)
        if has:
            with self._lock:
                out.state, out.counters = self.state.copy(), self.counters.clone()
        else:  # no update() here: an empty state takes part
            out.allocate(self._comm_device(group))
        out.state.all_reduce_(group=group)
        dist.all_reduce(out.counters, group=group)
        return out

    def histograms(self, clear: bool = False) -> dict:
        """{method: Histogram}; clear=True empties the state as it is read."""
        with self._lock:
            out = histograms_from_state(self.state, self.spec.names, self.spec.params_of, clear=clear)
            if clear:
                self._dirty = False
            return out

    def histograms_and_results(self, conventions: dict, clear: bool = False) -> tuple[dict, dict]:
        """({method: Histogram}, {method: MetricResult}): histograms() and finalize() of
        them, in one compiled call on the CPU (histogram.read_and_finalize)."""
        with self._lock:
            out = read_and_finalize(self.state, self.spec.names, self.spec.params_of, conventions, clear=clear)
            if clear:
                self._dirty = False
            return out

    def results(self, conventions: dict) -> Results:
        """Checked pixel counts, histograms and their finalized metrics."""
        res = Results()
        with self._lock:  # the counters and the histograms of the same batches
            res.pixels = self.check()
            res.histograms, fin = self.histograms_and_results(conventions)
        res.update(fin)
        return res

    def clear_(self) -> None:
        """Empties the state (its buffers keep their identity) and the counters."""
        with self._lock:
            if self.state is not None:
                self.state.clear_()
                self.counters.zero_()
                self._dirty = False

    def release(self) -> None:
        """Hands a pooled state back (cleared when next taken unless it was read out with
        clear=True since the last add); empties self."""
        _give_back(self._lent, self._dirty)
        self._state = self.counters = None
