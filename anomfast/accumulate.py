"""The one accumulation of the fused core's histograms (torchmetrics' _update / _compute).

    acc = Accumulator(spec, label_map, nonfinite="error")
    for x, y in batches:                     # validated by _fused.as_logits / as_labels
        acc.add(x, y)                        # one fused pass into the state, no host sync
        acc.check(y)                         # optional: raise now, naming this batch's bad label
    results = acc.synced().results(conventions)   # all_reduce under torch.distributed, finalize
    acc.release()                            # the pooled CPU state back to the pool

Every entry point goes through it: anomfast.evaluate (histogram and per-image modes), the
stateful anomfast.Evaluator (a shell over one Accumulator) and the CLI's grid runner, so
the fused update, the distributed sync, the read-out and the finalization exist once.

State: a HistState (anomfast.histogram) and the core's int64 counters, on the device of the
first batch. A CPU state comes from the pool (HistState.acquire: its pages already backed)
and goes back by release(), or, still holding counts, when the Accumulator is collected
(cleared when next taken); a state set from outside (a loaded state, the torchmetrics
adapter's buffers) is never pooled. Counters are cumulative: since check() raises on the
first bad batch, the counts it reports past a clean history are the last batch's.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _fused
from .histogram import HistState, histograms_from_state
from .labels import LabelMap
from .methods import MethodSpec
from .tables import results_table


class Results(dict):
    """Mapping method -> MetricResult, plus the histograms and pixel counts behind them."""

    histograms: dict
    pixels: dict

    def table(self, digits: int = 2) -> str:
        return results_table(self, digits=digits)

    def __str__(self) -> str:
        return self.table()


def finalize(histograms: dict, conventions: dict) -> dict:
    """{method: MetricResult} of {method: Histogram} under the FPR95 / AP conventions."""
    return {n: h.finalize(**conventions) for n, h in histograms.items()}


def _is_compiling() -> bool:
    f = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    if f is None:  # pragma: no cover - older torch
        from torch._dynamo import is_compiling as f
    return bool(f())


def _fused_update_eager(logits: torch.Tensor, labels: torch.Tensor, hist: torch.Tensor, sig: torch.Tensor,
                        occ: torch.Tensor, counters: torch.Tensor, lut: torch.Tensor, lut_offset: int, codes: list[int], temperature: float, gen_gamma: float,
                        entropy_normalize: bool, sml_mean: Optional[torch.Tensor],
                        sml_inv: Optional[torch.Tensor], heat_m: Optional[torch.Tensor] = None,
                        heat_params: Optional[list[float]] = None, ext: Optional[torch.Tensor] = None) -> None:
    """Adds the batch to the HistState buffers (hist, sig, occ) and counters in one fused
    pass. heat_m: HEAT's Mahalanobis map (B, H, W); heat_params: (T, mean, 1 / std); ext:
    (n_ext, B, H, W) external coordinates (post-processed SML)."""
    _fused.launch(logits, labels, HistState(hist, sig, occ), counters, None, codes, temperature, gen_gamma, entropy_normalize,
                  sml_mean, sml_inv, lut, lut_offset, heat_m=heat_m,
                  heat_params=heat_params if heat_params is not None else (1.0, 0.0, 1.0), ext=ext)


# torch.compile traces Accumulator.add as this one opaque op; eager calls launch the core
# directly (the op dispatch costs tens of microseconds per call)
fused_update = torch.library.custom_op("anomfast::fused_update", mutates_args=("hist", "sig", "occ", "counters"))(
    _fused_update_eager)


@fused_update.register_fake
def _(logits, labels, hist, sig, occ, counters, lut, lut_offset, codes, temperature, gen_gamma, entropy_normalize,
      sml_mean, sml_inv, heat_m=None, heat_params=None, ext=None) -> None:
    return None


class _Lent:
    """The pooled CPU state an Accumulator took, handed back when it is collected."""
    __slots__ = ("state",)

    def __init__(self):
        self.state = None


def _give_back(lent: _Lent) -> None:
    if lent.state is not None:
        lent.state.release(dirty=True)  # cleared when next taken, not at collection time
        lent.state = None


class Accumulator:
    """HistState + counters of one method spec and label map (see the module docstring)."""

    def __init__(self, spec: MethodSpec, label_map: LabelMap, nonfinite: str = "error"):
        self.spec, self.label_map, self.nonfinite = spec, label_map, nonfinite
        self._lent = _Lent()
        weakref.finalize(self, _give_back, self._lent)
        self._state: HistState | None = None
        self.counters: torch.Tensor | None = None
        self.follows_batch = False  # a loaded state (on the CPU) moves to the first batch's device
        self._dirty = False  # the state may hold counts (release() then leaves the clear to the next taker)
        self._consts: dict = {}

    @property
    def state(self) -> Optional[HistState]:
        return self._state

    @state.setter
    def state(self, value: Optional[HistState]) -> None:
        self._state, self._dirty = value, True
        if value is not self._lent.state:
            self._lent.state = None  # not the pooled state any more: never handed back

    def load(self, state: Optional[HistState], counters: Optional[torch.Tensor]) -> None:
        """Replaces the state (e.g. a checkpoint's); one loaded before any batch follows the
        first batch to its device."""
        self.follows_batch = self.state is None and state is not None
        self.state, self.counters = state, counters

    def allocate(self, device) -> HistState:
        """The state on `device`: a pooled CPU state when one is free (not while torch.compile
        traces: the pool's lock is no graph operation), else a new one."""
        device = torch.device(device) if isinstance(device, str) else device
        if self.state is None:
            self.state = (HistState.new if _is_compiling() else HistState.acquire)(len(self.spec.names), device)
            self._lent.state = self.state if self.state.device.type == "cpu" else None
            self.counters = _fused.new_counters(device)
        elif self.state.device != device and self.follows_batch:
            st = self.state
            self.state = HistState(st.hist.to(device), st.sig.to(device), st.occ.to(device))
            self.counters = self.counters.to(device)
        elif self.state.device != device:
            raise ValueError(f"this evaluator's state is on {self.state.device} but the batch is on {device}")
        self.follows_batch = False
        return self.state

    def constants(self, device) -> tuple:
        """(label LUT, LUT offset, SML means, SML 1 / std) on `device`, copied there once."""
        if device not in self._consts:
            table = (lambda t: t.to(device)) if _is_compiling() else (lambda t: _fused._device_table(t, device))
            lut, off = self.label_map.lut()
            mean = inv = None
            if "sml" in self.spec.names:
                mean, inv = (table(t) for t in self.spec.sml.kernel_arrays("cpu"))
            self._consts[device] = (table(lut), off, mean, inv)
        return self._consts[device]

    def add(self, logits: torch.Tensor, labels: torch.Tensor, features=None, *, want_maps: bool = False,
            num_threads: int = 0):
        """Adds a batch (logits (B, C, H, W) and labels (B, H, W) from _fused.as_logits /
        as_labels; features (B, D, h, w) for HEAT) to the state and counters in one fused
        pass. Returns the (M, B, H, W) float32 score maps when want_maps (eager only), else
        None. Raises nothing about the data itself: see check()."""
        x, spec = logits, self.spec
        st = self.allocate(x.device)
        self._dirty = True
        B, C, H, W = x.shape
        maps = torch.empty((len(spec.names), B, H, W), dtype=torch.float32, device=x.device) if want_maps else None
        if B * H * W == 0:
            return maps
        if spec.sml is not None and "sml" in spec.names and spec.sml.num_classes != C:
            raise ValueError(f"SML statistics were fitted for {spec.sml.num_classes} classes, logits have {C}")
        _fused.check_device_support(spec, x.device)
        heat_m = _fused.heat_input(x, spec, features)
        ext = _fused.external_input(x, spec)
        heat_params = list(spec.heat.kernel_constants()) if heat_m is not None else None
        lut, off, mean, inv = self.constants(x.device)
        if _is_compiling():
            if want_maps:
                raise RuntimeError("score maps are not returned inside torch.compile")
            torch.ops.anomfast.fused_update(x, labels, st.hist, st.sig, st.occ, self.counters, lut, off, spec.codes,
                                            spec.temperature, spec.gen_gamma, spec.entropy_normalize, mean, inv,
                                            heat_m, heat_params, ext)
            return None
        _fused.launch(x, labels, st, self.counters, maps, spec.codes, spec.temperature, spec.gen_gamma,
                      spec.entropy_normalize, mean, inv, lut, off, num_threads, heat_m=heat_m,
                      heat_params=heat_params or (1.0, 0.0, 1.0), ext=ext)
        return maps

    def check(self, labels: torch.Tensor | None = None) -> dict:
        """The pixel summary {nonfinite, invalid, void, binned} of the counters (one host
        sync). Raises on label values outside the label map (named from `labels`, the last
        batch, when given) and, nonfinite="error", on non-finite scores."""
        return _fused.check_counters(self.counters, labels, self.label_map, self.nonfinite)

    def synced(self, group=None) -> "Accumulator":
        """This accumulation summed over the processes of `group` when torch.distributed is
        initialized (a copy: self keeps its own counts), else self. The one all_reduce:
        the occupied blocks' counts summed, their signatures OR-ed, and the counters."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.state is None:
            raise RuntimeError("compute() in a distributed run needs at least one update() on every rank")
        out = Accumulator(self.spec, self.label_map, self.nonfinite)
        out.state, out.counters = self.state.copy(), self.counters.clone()
        out.state.all_reduce_(group=group)
        dist.all_reduce(out.counters, group=group)
        return out

    def histograms(self, clear: bool = False) -> dict:
        """{method: Histogram}; clear=True empties the state as it is read."""
        hists = histograms_from_state(self.state, self.spec.names, self.spec.params_of, clear=clear)
        if clear:
            self._dirty = False
        return hists

    def results(self, conventions: dict) -> Results:
        """Checked pixel counts, histograms and their finalized metrics."""
        res = Results()
        res.pixels = self.check()
        res.histograms = self.histograms()
        res.update(finalize(res.histograms, conventions))
        return res

    def clear_(self) -> None:
        """Empties the state (its buffers keep their identity) and the counters."""
        if self.state is not None:
            self.state.clear_()
            self.counters.zero_()
            self._dirty = False

    def release(self) -> None:
        """Hands a pooled state back (cleared when next taken if it still holds counts);
        the Accumulator is then empty."""
        if self._lent.state is not None:
            self._lent.state.release(dirty=self._dirty)
            self._lent.state = None
        self._state = self.counters = None
