"""Histograms: what the fused core accumulates and what the metrics are finalized from.

HistState: the core's buffers for M methods, on the device of the logits: int64 counts
(M, 2, NBINS) ([m][0] normal, [m][1] anomaly), uint32 tie signatures (M, 2, NBINS), and
a byte per 2^OCC_SHIFT flat slots saying which blocks hold counts. On the CPU the two big
buffers are allocated lazily zeroed (pages never written are never backed), so their
cost follows the bins the data touches, not the 4.5M bins of the full float32 range;
reading them out (`sparse`) visits only the occupied blocks.

Histogram: one method's counts as a sparse table (bin index, normal, anomaly, signature)
over the bins of anomfast.binning. Histograms add exactly (integer counts and OR-ed
signatures, the same bins in every batch, process and run), save and load with the
method, its parameters, the binning and a format version, and finalize to metrics with
certified bounds.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

from . import binning
from ._core import _C
from ._files import open_npz, read_array, read_meta, savez_fast
from .methods import EXACT_COORDINATES
from .metrics import (GroupSums, check_conventions, check_groups, fpr_inside_bin, metrics_from_groups,
                      result_from_sums)

FORMAT = "anomfast-histograms-v2"
_OLD_FORMATS = {"anomfast-histograms-v1": "binning of 2^-32 .. 2^32 with shared underflow bins (anomfast < 0.2)"}
OCC_BLOCK = 1 << binning.OCC_SHIFT


def check_buffer(t, name: str, shape: tuple, dtype, device) -> None:
    """A buffer the core writes: exactly this shape, dtype, device, and contiguous."""
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype
            or t.device != torch.device(device) or not t.is_contiguous()):
        got = (f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}"
               if isinstance(t, torch.Tensor) else type(t).__name__)
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got {got}")


def _zeros(shape, dtype: np.dtype, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cpu":
        # calloc: large blocks come from the OS as zero pages backed only once written
        return torch.from_numpy(np.zeros(shape, dtype))
    return torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=device)


def _exact_values(method: str, params: dict) -> bool:
    """Histogram.exact_values of a method and its parameters."""
    return method in EXACT_COORDINATES or bool(params.get("float32_exact", False))


def _defining(params: dict) -> dict:
    """The parameters that say what a histogram's scores are (float32_exact only says how
    finely they were given: histograms that differ in it still add)."""
    return {k: v for k, v in params.items() if k != "float32_exact"}


class _Lease:
    """A pooled slab lent out: numpy keeps this object as the base of every array viewing
    it, so when the last of them is gone the slab goes back to the pool."""

    def __init__(self, pool: "_BufferPool", slab: np.ndarray):
        self._pool, self._slab = pool, slab
        self.__array_interface__ = slab.__array_interface__

    def __del__(self):
        try:
            self._pool.give_back(self._slab)
        except Exception:  # interpreter shutdown
            pass


class _BufferPool:
    """CPU buffers reused across evaluate() calls, so that a steady loop of calls takes no
    fresh pages from the OS (on a VM a page fault costs microseconds: the read-out's ~1,700
    fresh pages per call cost more than the read-out itself). Holds histogram states
    (HistState.acquire / release), int64 slabs lent to the arrays of returned Histograms
    (back to the pool when those die). Bounded: at most
    `max_states` states and `max_bytes` of free slabs are kept; `anomfast.release_buffers()`
    empties it. Thread-safe."""

    def __init__(self, max_states: int = 2, max_bytes: int = 256 << 20):
        self.max_states, self.max_bytes = max_states, max_bytes
        self._lock = threading.Lock()
        self._states: list = []
        self._slabs: list = []

    def take_state(self, n_methods: int):
        with self._lock:
            for i, (s, dirty) in enumerate(self._states):
                if s.n_methods == n_methods:
                    self._states.pop(i)
                    break
            else:
                return None
        if dirty:
            s.clear_()
        return s

    def put_state(self, state, dirty: bool = False) -> None:
        """dirty: the state still holds counts (an Evaluator's, handed back when it is
        collected); it is cleared when next taken, not now."""
        with self._lock:
            if len(self._states) < self.max_states:
                self._states.append((state, dirty))

    def _take_slab(self, n: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, b in enumerate(self._slabs) if n <= b.size <= 2 * n + (1 << 16)]
            if fits:
                i = min(fits, key=lambda i: self._slabs[i].size)
                return self._slabs.pop(i)
        return np.empty(max(n, 1), np.int64)

    def give_back(self, slab: np.ndarray) -> None:
        with self._lock:
            if slab.nbytes + sum(b.nbytes for b in self._slabs) <= self.max_bytes:
                self._slabs.append(slab)

    def lend(self, n: int) -> np.ndarray:
        """n int64 items of a pooled slab, returned to the pool with the last view of it."""
        return np.asarray(_Lease(self, self._take_slab(n)))[:n]

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._slabs.clear()


_POOL = _BufferPool()
_READOUT = dict(_C.READOUT_MODES)
_NO_FIN = (0, 0, 0, 0.0, 0, 0)  # sparse_readout's finalization arguments when none is asked
# HistState._readout: a bound above this many items (64 per occupied chunk, summed over the
# methods; 128 MiB of slab) is replaced by the exact count of bins before allocating
EXACT_COUNT_ABOVE = 1 << 22


def release_buffers() -> None:
    """Frees the CPU buffers anomfast keeps for reuse across evaluate() calls (at most two
    histogram states and 256 MiB of read-out buffers)."""
    _POOL.clear()


class HistState:
    """The fused core's accumulation buffers for M methods (see the module docstring)."""

    def __init__(self, hist: torch.Tensor, sig: torch.Tensor, occ: torch.Tensor):
        self.hist, self.sig, self.occ = hist, sig, occ

    @staticmethod
    def n_occ(n_methods: int) -> int:
        return (n_methods * 2 * binning.NBINS + OCC_BLOCK - 1) >> binning.OCC_SHIFT

    @classmethod
    def new(cls, n_methods: int, device) -> "HistState":
        shape = (n_methods, 2, binning.NBINS)
        return cls(_zeros(shape, np.int64, device), _zeros(shape, np.int32, device),
                   _zeros((cls.n_occ(n_methods),), np.uint8, device))

    @classmethod
    def acquire(cls, n_methods: int, device) -> "HistState":
        """An empty state for a one-shot accumulation (evaluate(), the grid runner): a
        pooled CPU state whose pages are already backed when one is free, else a new one.
        Hand it back with release() once read out with clear=True."""
        if torch.device(device).type == "cpu":
            s = _POOL.take_state(n_methods)
            if s is not None:
                return s
        return cls.new(n_methods, device)

    def release(self, dirty: bool = False) -> None:
        """Back to the pool (CPU states only): empty (read out with clear=True), or dirty
        (cleared when next taken)."""
        if self.device.type == "cpu":
            _POOL.put_state(self, dirty)

    @property
    def n_methods(self) -> int:
        return int(self.hist.shape[0])

    @property
    def device(self) -> torch.device:
        return self.hist.device

    def check(self, n_methods: int, device) -> None:
        """Shape, dtype, contiguity and device of every buffer the core writes."""
        shape = (n_methods, 2, binning.NBINS)
        check_buffer(self.hist, "histogram counts", shape, torch.int64, device)
        check_buffer(self.sig, "histogram tie signatures", shape, torch.int32, device)
        check_buffer(self.occ, "histogram occupancy", (self.n_occ(n_methods),), torch.uint8, device)

    def check_counts(self, binned: int, what: str) -> None:
        """A dense state set from outside (a loaded checkpoint) against its counters, in a
        few passes over the counts, once at load time: no negative count, none in a block
        the occupancy map leaves out (the read-out visits only the marked blocks), and each
        method's counts adding up to `binned`, the pixels the counters say were binned
        (every binned pixel goes to every method). Buffers as check() wants them."""
        h = self.hist
        if bool((h < 0).any()):
            raise ValueError(f"{what}: negative histogram counts; the state is corrupt")
        flat = h.view(-1)
        full = flat.numel() >> binning.OCC_SHIFT
        used = torch.zeros(self.occ.numel(), dtype=torch.bool, device=h.device)
        used[:full] = flat[:full * OCC_BLOCK].view(full, OCC_BLOCK).ne(0).any(1)
        if full < used.numel():  # the tail block (the buffers need not fill whole blocks)
            used[full:] = flat[full * OCC_BLOCK:].ne(0).any()
        if bool((used & (self.occ == 0)).any()):
            raise ValueError(f"{what}: histogram counts sit in blocks the occupancy map marks empty (the read-out "
                             "would skip them); the state is corrupt")
        per_method = h.view(self.n_methods, -1)
        # float64 sums first (NumPy's casts in chunks, torch's copies first): an int64 sum
        # cannot wrap where they are near `binned` (<= 2^62)
        approx = (np.sum(per_method.numpy(), 1, dtype=np.float64) if h.device.type == "cpu"
                  else per_method.sum(1, dtype=torch.float64).cpu().numpy()).tolist()
        totals = [int(a) if abs(a - binned) > 1e-6 * binned + 1 else None for a in approx]
        if all(t is None for t in totals):
            totals = per_method.sum(1).tolist()
        for j, t in enumerate(totals):
            if t is not None and t != binned:
                raise ValueError(f"{what}: method {j}'s histogram holds {t} pixels but the counters say {binned} "
                                 "were binned; the state is corrupt")

    def blocks(self) -> np.ndarray:
        """Indices of the occupied 2^OCC_SHIFT-slot blocks (one host sync)."""
        return np.flatnonzero(self.occ.cpu().numpy())

    def gather(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, signatures) of the given ascending blocks, flat (len(blocks) * 2^OCC_SHIFT),
        on the state's device; the last block is padded with zeros past the buffers' end."""
        return _rows(self.hist, blocks), _rows(self.sig, blocks)

    def scatter_(self, blocks: np.ndarray, counts: torch.Tensor, sigs: torch.Tensor) -> None:
        """Overwrites the given blocks with (counts, signatures) as `gather` returns them."""
        total = self.hist.numel()
        b = torch.as_tensor(np.asarray(blocks, np.int64), device=self.device)
        slots = (b[:, None] * OCC_BLOCK + torch.arange(OCC_BLOCK, device=self.device)[None, :]).flatten()
        inside = slots < total
        self.hist.view(-1)[slots[inside]] = counts.to(self.device)[inside]
        self.sig.view(-1)[slots[inside]] = sigs.to(self.device)[inside]
        self.occ[b] = 1

    def sparse(self) -> list:
        """Per method: (index, normal, anomaly, sig) numpy arrays over its non-empty bins,
        ascending bin index. Reads only the occupied blocks."""
        return [t[:4] for t in self._readout()]

    def _readout(self, clear: bool = False, fin=None) -> list:
        """sparse()'s arrays plus each method's (total normal, total anomaly), None where
        they were not taken or some count is negative. On the CPU (finalize_cpu.h:
        sparse_readout) a first call bounds each method's bins from the occupancy map
        alone (64 per occupied chunk); a second walks the occupied blocks of both label rows
        at once and writes the bins (index, counts and signatures, every item) straight into
        views of one pooled slab (_POOL: a steady loop of evaluate() calls takes no fresh
        pages and clears no memory). A bound above EXACT_COUNT_ABOVE items (a
        sparse state spread over many chunks) is replaced by the exact count (a walk over
        the counts) before anything is allocated; a read-out that fills less than half its
        bound is copied into exact-size arrays, so returned histograms do not hold the
        slack. clear=True leaves the state empty (its pages stay backed: see
        HistState.acquire). fin = (exact_values per method, fpr code, ap code, tpr_target):
        each method is also finalized on its thread right after its read-out; the list
        then ends with (out, iout, status) as finalize_hists writes them (status per
        method: 0 done, else not)."""
        if self.device.type != "cpu":
            out = [t + (None,) for t in self._sparse_host()]
            if clear:
                self.clear_()
            return out
        self.check(self.n_methods, "cpu")
        M = self.n_methods
        meta = np.zeros((M, _C.READOUT_META), np.int64)
        ptrs = (self.hist.data_ptr(), self.sig.data_ptr(), self.occ.data_ptr(), M)
        _C.sparse_readout(*ptrs, 0, 0, meta.ctypes.data, _READOUT["bounds"], *_NO_FIN)
        bound = meta[:, 5].copy()
        counted = int(bound.sum()) > EXACT_COUNT_ABOVE
        if counted:
            _C.sparse_readout(*ptrs, 0, 0, meta.ctypes.data, _READOUT["count"], *_NO_FIN)
            cap = meta[:, 0].copy()
        else:
            cap = bound
        starts = np.concatenate(([0], np.cumsum(cap)))
        # index, normal, anomaly, sig of method j in a pooled slab (4 cap[j] items from 4 starts[j])
        slab = _POOL.lend(int(4 * starts[-1]))
        outs = slab.ctypes.data + 8 * (4 * starts[:-1, None] + cap[:, None] * np.arange(4)[None, :])
        fin_args = _NO_FIN
        if fin is not None:
            exact, fpr_code, ap_code, tpr_target = fin
            exact = np.asarray(exact, np.uint8)
            fout = np.empty((M, _OUT["size"]), np.float64)
            fiout = np.empty((M, _IOUT["size"]), np.int64)
            fin_args = (exact.ctypes.data, fpr_code, ap_code, float(tpr_target), fout.ctypes.data, fiout.ctypes.data)
        status = _C.sparse_readout(*ptrs, cap.ctypes.data, outs.ctypes.data, meta.ctypes.data,
                                   _READOUT["read_clear" if clear else "read"], *fin_args)
        if status != 0 or not np.array_equal(meta[:, 5], bound) or (counted and not np.array_equal(meta[:, 0], cap)):
            if clear:  # partly cleared: empty it all (occ still marks every block) before refusing
                self.clear_()
            raise RuntimeError("histogram read-out: the state changed between bounding and reading its bins "
                               "(was another thread adding to it?)")
        if clear:
            self.occ.zero_()
        ks = meta[:, 0].copy()

        def cols(j):  # method j's four arrays in (slab, starts, cap)
            o, c, k = 4 * int(starts[j]), int(cap[j]), int(ks[j])
            return tuple(slab[o + i * c:o + i * c + k] for i in range(4))

        if 2 * int(ks.sum()) < int(cap.sum()):  # mostly slack: exact-size copies
            arrays = [cols(j) for j in range(M)]
            starts, cap = np.concatenate(([0], np.cumsum(ks))), ks
            slab = _POOL.lend(int(4 * starts[-1]))
            for j, a in enumerate(arrays):
                for dst, src in zip(cols(j), a):
                    dst[...] = src
            del arrays
        out = [(*cols(j), None if meta[j, 3] else (int(meta[j, 1]), int(meta[j, 2]))) for j in range(M)]
        if fin is not None:
            out.append((fout, fiout, meta[:, 4].copy()))
        return out

    def _sparse_host(self) -> list:
        """sparse() by copying the occupied blocks to the host and splitting them there
        in NumPy (the path of CUDA states; the reference of the compiled read-out)."""
        blocks = self.blocks()
        h, g = self.gather(blocks)
        h = h.cpu().numpy()
        nz = np.flatnonzero(h)
        slots = blocks[nz >> binning.OCC_SHIFT] * OCC_BLOCK + (nz & (OCC_BLOCK - 1))
        sig = g.cpu().numpy()[nz].astype(np.int64) & 0xFFFFFFFF
        return _split_slots(slots, h[nz], sig, self.n_methods)

    def __eq__(self, other) -> bool:
        """Same histograms: counts per (method, label, bin) and signatures per (method,
        bin), as `sparse` reads them (occupied blocks only)."""
        if not isinstance(other, HistState) or other.n_methods != self.n_methods:
            return False
        return all(np.array_equal(u, v) for a, b in zip(self.sparse(), other.sparse()) for u, v in zip(a, b))

    __hash__ = None

    def total(self) -> int:
        """All counts (one host sync)."""
        return int(sum(int(t[1].sum() + t[2].sum()) for t in self.sparse()))

    def clear_(self) -> None:
        """Zeroes the occupied blocks only (the buffers keep their identity and laziness):
        on the CPU by the compiled read-out's clear-only walk, elsewhere by a scatter."""
        if self.device.type == "cpu":
            self.check(self.n_methods, "cpu")
            meta = np.zeros((self.n_methods, _C.READOUT_META), np.int64)
            _C.sparse_readout(self.hist.data_ptr(), self.sig.data_ptr(), self.occ.data_ptr(), self.n_methods, 0, 0,
                              meta.ctypes.data, _READOUT["clear"], *_NO_FIN)
            self.occ.zero_()
            return
        blocks = self.blocks()
        if blocks.size:
            z = torch.zeros(blocks.size * OCC_BLOCK, dtype=torch.int64, device=self.device)
            self.scatter_(blocks, z, z.to(torch.int32))
        self.occ.zero_()

    def copy(self) -> "HistState":
        """An independent copy that costs what the occupied blocks cost (a dense clone
        would back every page of the lazily allocated buffers)."""
        out = HistState.new(self.n_methods, self.device)
        blocks = self.blocks()
        if blocks.size:
            out.scatter_(blocks, *self.gather(blocks))
        return out

    def to_state(self) -> dict:
        """Sparse, device-free form for state_dict / checkpoints."""
        return {"format": FORMAT, "binning": dict(binning.SCHEME), "n_methods": self.n_methods,
                "methods": [dict(zip(("index", "normal", "anomaly", "sig"), (torch.from_numpy(a) for a in t)))
                            for t in self.sparse()]}

    @classmethod
    def from_state(cls, d, n_methods: int, device, binned: int | None = None) -> "HistState":
        """to_state()'s dict back as a state; binned: the pixels the counters saved with it
        say were binned, which each method's counts must add up to (every binned pixel
        goes to every method)."""
        check_format(d.get("format") if isinstance(d, dict) else None, "histogram state")
        if d.get("binning") != binning.SCHEME:
            raise ValueError(f"histogram state binning {d.get('binning')} differs from this build's {binning.SCHEME}")
        methods = d.get("methods")
        if not isinstance(methods, (list, tuple)):
            raise ValueError(f"histogram state: 'methods' must be a list of {n_methods} per-method dicts, got "
                             f"{type(methods).__name__}")
        if d.get("n_methods") != n_methods or len(methods) != n_methods:
            raise ValueError(f"histogram state holds {len(methods)} method(s) (n_methods {d.get('n_methods')!r}), "
                             f"expected {n_methods}")
        st = cls.new(n_methods, "cpu")
        for j, m in enumerate(methods):
            what = f"histogram state, method {j}"
            if not isinstance(m, dict):
                raise ValueError(f"{what}: expected a dict of 'index, normal, anomaly, sig' arrays, got "
                                 f"{type(m).__name__}")
            idx, normal, anomaly, sig = _checked_sparse(m.get("index"), m.get("normal"), m.get("anomaly"),
                                                        m.get("sig"), what)
            held = int(normal.sum()) + int(anomaly.sum())  # each sum <= 2^62 (_checked_sparse)
            if binned is not None and held != binned:
                raise ValueError(f"{what}: the histogram holds {held} pixels but the counters say {binned} were "
                                 "binned; the state is corrupt")
            for lab, c in ((0, normal), (1, anomaly)):
                nz = c > 0
                i = torch.from_numpy(idx[nz])
                st.hist[j, lab, i] = torch.from_numpy(c[nz])
                st.sig[j, lab, i] = torch.from_numpy(sig[nz].astype(np.uint32).view(np.int32))
                flat = (j * 2 + lab) * binning.NBINS + idx[nz]
                st.occ[torch.from_numpy(np.unique(flat >> binning.OCC_SHIFT))] = 1
        if torch.device(device).type != "cpu":
            st = HistState(st.hist.to(device), st.sig.to(device), st.occ.to(device))
        return st

    def all_reduce_(self, group=None) -> None:
        """Sums the counts and ORs the signatures over the default process group, moving
        only the blocks some process has touched."""
        import torch.distributed as dist
        occ = self.occ.to(torch.int32)
        dist.all_reduce(occ, op=dist.ReduceOp.MAX, group=group)
        blocks = torch.nonzero(occ).flatten().cpu().numpy()
        if blocks.size == 0:
            return
        h, g = self.gather(blocks)
        dist.all_reduce(h, group=group)
        gs = [torch.zeros_like(g) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gs, g, group=group)
        for x in gs[1:]:
            gs[0] |= x
        self.scatter_(blocks, h, gs[0])


def _rows(t: torch.Tensor, blocks: np.ndarray) -> torch.Tensor:
    """Blocks of 2^OCC_SHIFT consecutive elements of t (flattened), as one flat tensor:
    whole rows copied with index_select, the last partial block zero-padded."""
    flat = t.view(-1)
    full = flat.numel() >> binning.OCC_SHIFT
    b = torch.as_tensor(np.asarray(blocks, np.int64), device=t.device)
    head = b[b < full]
    out = flat[:full * OCC_BLOCK].view(full, OCC_BLOCK).index_select(0, head).reshape(-1)
    if head.numel() < b.numel():  # the tail block (the buffers need not fill whole blocks)
        tail = torch.zeros(OCC_BLOCK, dtype=t.dtype, device=t.device)
        rest = flat[full * OCC_BLOCK:]
        tail[:rest.numel()] = rest
        out = torch.cat([out, tail])
    return out


def _split_slots(slots, counts, sigs, n_methods: int) -> list:
    """Ascending flat (method, label, bin) slots -> per method (index, normal, anomaly, sig)."""
    nb = binning.NBINS
    cut = np.searchsorted(slots, np.arange(2 * n_methods + 1) * nb)  # (method, label) segments
    out = []
    for j in range(n_methods):
        a0, a1, a2 = cut[2 * j], cut[2 * j + 1], cut[2 * j + 2]
        i0, i1 = slots[a0:a1] - 2 * j * nb, slots[a1:a2] - (2 * j + 1) * nb
        u = np.concatenate([i0, i1])  # two sorted runs: a stable sort merges them in linear time
        u.sort(kind="stable")
        u = u[np.r_[True, u[1:] != u[:-1]]] if u.size else u
        p0, p1 = np.searchsorted(u, i0), np.searchsorted(u, i1)
        normal = np.zeros(u.size, np.int64)
        anomaly = np.zeros(u.size, np.int64)
        sig = np.zeros(u.size, np.int64)
        normal[p0], anomaly[p1] = counts[a0:a1], counts[a1:a2]
        sig[p0] = sigs[a0:a1]
        sig[p1] |= sigs[a1:a2]
        out.append((u.astype(np.int64), normal, anomaly, sig))
    return out


def _checked_sparse(index, normal, anomaly, sig, what: str):
    arrs = []
    for name, v in (("index", index), ("normal", normal), ("anomaly", anomaly), ("sig", sig)):
        if v is None:
            raise ValueError(f"{what}: missing {name!r}")
        a = v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{what}: {name!r} must be a 1-d integer array, got {a.dtype} {a.shape}")
        arrs.append(a.astype(np.int64))
    idx, normal, anomaly, sig = arrs
    if not (idx.size == normal.size == anomaly.size == sig.size):
        raise ValueError(f"{what}: index/normal/anomaly/sig differ in length")
    if idx.size and (idx.min() < 0 or idx.max() >= binning.NBINS or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"{what}: bin indices must be increasing and within [0, {binning.NBINS})")
    if (normal < 0).any() or (anomaly < 0).any():
        raise ValueError(f"{what}: negative counts")
    _check_total(normal, anomaly, what)
    if (sig < 0).any() or (sig > 0xFFFFFFFF).any():
        raise ValueError(f"{what}: tie signatures must be uint32 values")
    return idx, normal, anomaly, sig


_MAX_TOTAL = 2 ** 62  # every cumulative count of the metrics stays far inside int64


def _check_total(normal, anomaly, what: str) -> None:
    """Counts whose total would overflow int64 (an edited file, a corrupt state) would make
    every cumulative sum of the metrics wrap: refuse them (exact Python-int sums)."""
    approx = sum(float(np.sum(c, dtype=np.float64)) for c in (normal, anomaly))
    if approx > _MAX_TOTAL / 2 and sum(int(np.sum(c, dtype=object)) for c in (normal, anomaly)) > _MAX_TOTAL:
        raise ValueError(f"{what}: the counts add up to more than 2^62 pixels; the file or state is corrupt")


def check_format(fmt, what: str) -> None:
    if fmt == FORMAT:
        return
    if fmt in _OLD_FORMATS:
        raise ValueError(f"{what} is format {fmt!r} ({_OLD_FORMATS[fmt]}); this anomfast reads {FORMAT!r}. "
                         "Its bins cannot be converted exactly (values below 2^-32 shared one bin): "
                         "re-run the evaluation to rebuild it")
    raise ValueError(f"{what}: unknown format {fmt!r}, expected {FORMAT!r}")


class Histogram:
    """Counts of one method over its non-empty bins: ``index`` (ascending bin indices),
    ``normal`` and ``anomaly`` (int64 counts), ``sig`` (OR-ed tie signatures)."""

    def __init__(self, method: str, index, normal, anomaly, sig, params: dict | None = None,
                 binning_scheme: dict | None = None):
        self.index, self.normal, self.anomaly, self.sig = _checked_sparse(index, normal, anomaly, sig,
                                                                          f"histogram of {method!r}")
        self.method = method
        self.params = dict(params or {})
        self.binning = dict(binning_scheme or binning.SCHEME)
        if self.binning != binning.SCHEME:
            raise ValueError(f"histogram binning {self.binning} differs from this build's {binning.SCHEME}")

    @classmethod
    def _from_readout(cls, method: str, index, normal, anomaly, sig, totals, params: dict | None = None):
        """A histogram from HistState._readout's arrays, which hold _checked_sparse's
        invariants by construction (ascending bins in range, uint32 signatures); the
        totals it took stand for the count checks."""
        if totals is None:
            return cls(method, index, normal, anomaly, sig, params)
        what = f"histogram of {method!r}"
        if totals[0] + totals[1] > _MAX_TOTAL:
            raise ValueError(f"{what}: the counts add up to more than 2^62 pixels; the file or state is corrupt")
        h = cls.__new__(cls)
        h.index, h.normal, h.anomaly, h.sig = index, normal, anomaly, sig
        h.method, h.params, h.binning = method, dict(params or {}), dict(binning.SCHEME)
        return h

    @property
    def exact_values(self) -> bool:
        """Whether the binned float32 values are the exact scores (max_logit; external
        scores that were float32-exact): only then a one-value bin is a real tie."""
        return _exact_values(self.method, self.params)

    @classmethod
    def from_scores(cls, method: str, coords, anomaly, params=None) -> "Histogram":
        """Bins float32 coordinates (NumPy, the core's rule) split by the boolean `anomaly`."""
        t = np.asarray(coords, np.float32).ravel()
        y = np.asarray(anomaly, bool).ravel()
        if t.size != y.size:
            raise ValueError(f"from_scores: {t.size} coordinates but {y.size} anomaly flags; they must match one "
                             "to one")
        nan = int(np.count_nonzero(np.isnan(t)))
        if nan:  # NaN has no bin (the core counts such pixels apart)
            raise ValueError(f"from_scores: {nan} of {t.size} coordinates are NaN, and NaN is never binned; drop them "
                             "first, or use anomfast.evaluate_scores(..., nonfinite='ignore'), which skips and counts "
                             "them")
        idx = binning.bin_index(t)
        u, inv = np.unique(idx, return_inverse=True)
        normal = np.bincount(inv[~y], minlength=u.size).astype(np.int64)
        anom = np.bincount(inv[y], minlength=u.size).astype(np.int64)
        sig = np.zeros(u.size, np.int64)
        np.bitwise_or.at(sig, inv, binning.bin_sig(t))
        return cls(method, u, normal, anom, sig, params)

    @property
    def counts(self) -> torch.Tensor:
        """Dense (2, NBINS) int64 counts (36 MB: for inspection and tests)."""
        c = torch.zeros((2, binning.NBINS), dtype=torch.int64)
        c[0, torch.from_numpy(self.index)] = torch.from_numpy(self.normal)
        c[1, torch.from_numpy(self.index)] = torch.from_numpy(self.anomaly)
        return c

    @property
    def n_normal(self) -> int:
        return int(self.normal.sum())

    @property
    def n_anomaly(self) -> int:
        return int(self.anomaly.sum())

    def _check_compatible(self, other: "Histogram"):
        if not isinstance(other, Histogram):
            raise TypeError(f"can only add a Histogram, got {type(other).__name__}")
        if other.method != self.method or _defining(other.params) != _defining(self.params):
            raise ValueError(f"cannot add histograms of different methods/parameters: "
                             f"{self.method} {self.params} vs {other.method} {other.params}")

    def _sum_params(self, other: "Histogram") -> dict:
        """The sum's parameters: float32_exact (evaluate_scores: whether the caller's scores
        were float32 values, so a bin of one float32 value is a real tie) holds for the sum
        only where it held for both."""
        params = dict(self.params)
        if "float32_exact" in self.params or "float32_exact" in other.params:
            params["float32_exact"] = bool(self.params.get("float32_exact")) and bool(other.params.get("float32_exact"))
        return params

    def __add__(self, other: "Histogram") -> "Histogram":
        self._check_compatible(other)
        _check_total(np.concatenate([self.normal, other.normal]), np.concatenate([self.anomaly, other.anomaly]),
                     f"sum of two {self.method!r} histograms")
        idx = np.concatenate([self.index, other.index])
        u, inv = np.unique(idx, return_inverse=True)
        out = []
        for a, b in ((self.normal, other.normal), (self.anomaly, other.anomaly)):
            c = np.zeros(u.size, np.int64)
            np.add.at(c, inv, np.concatenate([a, b]))
            out.append(c)
        sig = np.zeros(u.size, np.int64)
        np.bitwise_or.at(sig, inv, np.concatenate([self.sig, other.sig]))
        return Histogram(self.method, u, out[0], out[1], sig, self._sum_params(other), self.binning)

    def __iadd__(self, other: "Histogram") -> "Histogram":
        s = self + other
        self.index, self.normal, self.anomaly, self.sig, self.params = s.index, s.normal, s.anomaly, s.sig, s.params
        return self

    def __eq__(self, other) -> bool:
        return (isinstance(other, Histogram) and self.method == other.method and self.params == other.params
                and all(np.array_equal(getattr(self, k), getattr(other, k))
                        for k in ("index", "normal", "anomaly", "sig")))

    def groups(self):
        """Non-empty bins, highest coordinate first: (pos, neg, lo, hi, tied, index) with lo /
        hi the bin's smallest / largest coordinate (float64). A bin whose tie signature shows
        one value has lo == hi == that value, and is a real tie group (tied True) when the
        binned values are the exact scores (``exact_values``). Coordinates are the scores
        (msp's is u = 1 - max softmax, resolved in float32 where -max softmax is not)."""
        return _bin_groups(self.index, self.normal, self.anomaly, self.sig, self.exact_values)

    def finalize(self, exact: bool = False, **conventions):
        """Metrics with certified bounds; see anomfast.metrics.metrics_from_groups (the
        histogram path runs compiled: csrc/cpu/finalize_cpu.cpp; exact=True and
        _finalize_reference run the NumPy spec)."""
        if exact:  # a histogram is exact only where every bin holds one value
            pos, neg, lo, hi, tied, _ = self.groups()
            mixed = int(np.count_nonzero(~tied))
            if mixed:
                raise ValueError(f"finalize(exact=True): {mixed} of {tied.size} bins of this {self.method!r} histogram "
                                 "hold several distinct values, whose order it does not keep; finalize() gives the "
                                 "metrics with certified bounds, and evaluate(..., exact=True) or refine=True the "
                                 "exact ones")
            return self._finalize_reference(exact=True, **conventions)
        # the walk evaluate() and compute() run on all their methods at once: bit for bit the same
        return finalize_histograms({0: self}, **conventions)[0]

    def _walk_columns(self) -> tuple:
        """(anomaly, normal, sig) as the compiled walk reads them: contiguous int64 of one
        length, the constructor's invariants checked again in a few vectorized passes (the
        arrays are public attributes). read_and_finalize's histograms hold them by
        construction and skip this."""
        what = f"histogram of {self.method!r}"
        cols = []
        for name in ("index", "anomaly", "normal", "sig"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"{what}: {name!r} must be a 1-d int64 array, got {got}")
            cols.append(np.ascontiguousarray(a, np.int64))
        idx, anomaly, normal, sig = cols
        if not (idx.size == normal.size == anomaly.size == sig.size):
            raise ValueError(f"{what}: index/normal/anomaly/sig differ in length")
        if idx.size and (idx[0] < 0 or idx[-1] >= binning.NBINS or not (idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{what}: bin indices must be increasing and within [0, {binning.NBINS})")
        if idx.size and (normal.min() < 0 or anomaly.min() < 0):
            raise ValueError(f"{what}: negative counts")
        _check_total(normal, anomaly, what)
        if (sig >> 32).any():  # negative or past 32 bits
            raise ValueError(f"{what}: tie signatures must be uint32 values")
        return anomaly, normal, sig

    def _lo_hi(self, rows):
        """The compiled _bin_lo_hi of the given (decisive) rows."""
        return tuple(zip(*(_C.bin_bounds(int(self.index[r]), int(self.sig[r])) for r in rows))) or ((), ())

    def _deferred_table(self) -> "_Deferred":
        return _Deferred(_bin_table, self.method, self.index, self.normal, self.anomaly, self.sig, self.exact_values)

    def _finalize_reference(self, **conventions):
        """finalize() through anomfast.metrics' NumPy code (the spec the compiled path
        is tested against)."""
        pos, neg, lo, hi, tied, _ = self.groups()
        return _finalize_coords_reference(self.method, self.params, pos, neg, lo, hi, tied, **conventions)

    def __repr__(self) -> str:
        return f"Histogram({self.method!r}, normal={self.n_normal}, anomaly={self.n_anomaly})"

    def to_sparse(self) -> dict:
        return {"index": self.index, "normal": self.normal, "anomaly": self.anomaly, "sig": self.sig}

    @classmethod
    def from_sparse(cls, method, index, normal, anomaly, sig, params=None, binning_scheme=None) -> "Histogram":
        return cls(method, index, normal, anomaly, sig, params, binning_scheme)


def _merge_negative_runs(pos, neg, lo, hi, tied):
    """Consecutive groups without anomaly pixels merged into one: no metric, bound or
    threshold depends on where normal pixels sit inside such a run (AUROC and AP terms of a
    group without positives are zero or carry over unchanged, FPR95 crosses and F1 peaks
    only in groups with positives), and most bins of real data hold normal pixels only,
    so finalization works on a few times fewer groups."""
    if pos.size < 2:
        return pos, neg, lo, hi, tied
    start = np.r_[True, (pos[1:] > 0) | (pos[:-1] > 0)]  # a run of pos == 0 continues otherwise
    if start.all():
        return pos, neg, lo, hi, tied
    first = np.flatnonzero(start)
    last = np.r_[first[1:], pos.size] - 1
    single = first == last
    return (pos[first], np.add.reduceat(neg, first), lo[last], hi[first], tied[first] & single)


def _bin_lo_hi(index, sig):
    """(lo, hi, single) of bins: their smallest / largest coordinate, both the one value
    where the tie signature shows a single value."""
    lo, hi = binning.bin_edges(index)
    v = binning.bin_value(index, sig)
    single = ~np.isnan(v)
    return np.where(single, v, lo), np.where(single, v, hi), single


def _bin_groups(index, normal, anomaly, sig, exact_values: bool):
    """Histogram.groups() of these sparse arrays."""
    idx = index[::-1].copy()
    lo, hi, single = _bin_lo_hi(idx, sig[::-1])
    tied = single & exact_values
    return anomaly[::-1].copy(), normal[::-1].copy(), lo, hi, tied, idx


def _bin_table(method: str, index, normal, anomaly, sig, exact_values: bool):
    """The group table a histogram's result keeps for its curves, as the
    reference finalization keeps it."""
    pos, neg, lo, hi, tied, _ = _bin_groups(index, normal, anomaly, sig, exact_values)
    pos, neg, lo, hi, _ = check_groups(*_merge_negative_runs(pos, neg, lo, hi, tied))
    return pos, neg, lo, hi


class _Deferred:
    """fn(*args) on call: a result's group table, computed when a curve asks for it
    (MetricResult._table); module-level so that results pickle."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self):
        return self.fn(*self.args)


def finalize_coords(method: str, params: dict, pos, neg, lo, hi, tied, exact: bool = False, **conventions):
    """metrics_from_groups on a group table in coordinates (= scores; descending).
    exact=False runs compiled (csrc/cpu/finalize_cpu.cpp), exact=True the NumPy spec."""
    if exact:
        return _finalize_coords_reference(method, params, pos, neg, lo, hi, tied, exact=True, **conventions)
    pos, neg, lo, hi, tied = check_groups(*_merge_negative_runs(*_checked_table(pos, neg, lo, hi, tied)))
    return _finalize_coords_compiled(method, params, pos, neg, tied, lo, hi, **conventions)


def _checked_table(pos, neg, lo, hi, tied):
    """The columns as arrays (tied: lo == hi when None), of one length, before the merge."""
    pos, neg = np.asarray(pos).ravel(), np.asarray(neg).ravel()
    lo, hi = np.asarray(lo, np.float64).ravel(), np.asarray(hi, np.float64).ravel()
    tied = (lo == hi) if tied is None else np.asarray(tied, bool).ravel()
    if not (pos.size == neg.size == lo.size == hi.size == tied.size):
        raise ValueError(f"group arrays differ in length: {pos.size}, {neg.size}, {lo.size}, {hi.size}, {tied.size}")
    return pos, neg, lo, hi, tied


def _finalize_coords_reference(method: str, params: dict, pos, neg, lo, hi, tied, exact: bool = False,
                               **conventions):
    """finalize_coords through metrics_from_groups (NumPy): the spec."""
    if not exact:
        pos, neg, lo, hi, tied = _merge_negative_runs(pos, neg, lo, hi, tied)
    r = metrics_from_groups(pos, neg, lo, hi, exact=exact, tied=tied, **conventions)
    r.method, r.params = method, dict(params)
    return r


_FPR_CODE, _AP_CODE = dict(_C.FIN_FPR_MODES), dict(_C.FIN_AP_MODES)
_OUT, _IOUT = dict(_C.FIN_OUT), dict(_C.FIN_IOUT)
# tables this long are finalized on two threads (bench image: 19k-103k bins per method,
# about 0.1-0.3 ms on one); tests lower it to cover the split
SPLIT_MIN_ROWS = 1 << 14


def _finalize_coords_compiled(method: str, params: dict, pos, neg, tied, lo, hi, fpr_mode: str = "first",
                              ap_mode: str = "step", tpr_target: float = 0.95):
    """A checked group table's (exact=False) MetricResult from one compiled pass over its
    rows, highest first (finalize_cpu.h: finalize_hist; a table of SPLIT_MIN_ROWS rows or
    more is walked in two halves), assembled by metrics.result_from_sums as the spec
    assembles it. pos / neg: int64 counts per row, non-negative, summing to <= 2^62; tied:
    the tie groups (uint8 per row); lo / hi: the rows' coordinates. Histograms go through
    finalize_histograms instead."""
    tpr_target = check_conventions(fpr_mode, ap_mode, tpr_target)
    cols = [np.ascontiguousarray(c, dt) for c, dt in ((pos, np.int64), (neg, np.int64), (tied, np.uint8))]
    n = cols[0].size
    if any(c.ndim != 1 or c.size != n for c in cols):
        raise ValueError("group columns differ in length")
    out = np.empty(_OUT["size"], np.float64)
    iout = np.empty(_IOUT["size"], np.int64)
    if _C.finalize_hist(n, *(c.ctypes.data for c in cols), 0, 0, 1, _FPR_CODE[fpr_mode], _AP_CODE[ap_mode],
                        tpr_target, SPLIT_MIN_ROWS, out.ctypes.data, iout.ctypes.data) != 0:
        raise RuntimeError("finalize_hist: a decisive group spans several rows")
    return _result_from_walk(method, params, out, iout, lambda rows: (lo[rows], hi[rows]), (pos, neg, lo, hi),
                             fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=tpr_target)


def _result_from_walk(method: str, params: dict, out: np.ndarray, iout: np.ndarray, lo_hi, table, *,
                      fpr_mode: str, ap_mode: str, tpr_target: float):
    """The MetricResult of one compiled walk's outputs (finalize_hist's out / iout)."""
    P, N = int(iout[_IOUT["P"]]), int(iout[_IOUT["N"]])
    sums = None
    if P > 0:
        o = {k: float(out[i]) for k, i in _OUT.items() if k != "size"}
        sums = GroupSums(n_groups=int(iout[_IOUT["groups"]]), f1_group=int(iout[_IOUT["f1_row"]]),
                         f1_first=int(iout[_IOUT["f1_first"]]), f1_last=int(iout[_IOUT["f1_last"]]),
                         fpr95_group=int(iout[_IOUT["fpr95_row"]]), fpr95_tied=bool(iout[_IOUT["fpr95_tied"]]),
                         all_tied=bool(iout[_IOUT["all_tied"]]), **o)
        if N > 0 and fpr_mode != "interp" and not sums.fpr95_tied:  # needs Python's exact int ratio
            sums.fpr95 = fpr_inside_bin(P, N, *(int(iout[_IOUT[k]]) for k in ("fpr95_a", "fpr95_f", "fpr95_pos",
                                                                               "fpr95_neg")),
                                        tpr_target, fpr_mode == "strict")
    rows = [] if sums is None else ([sums.f1_group, sums.f1_first, sums.f1_last] +
                                    ([sums.fpr95_group] if N > 0 else []))
    los, his = lo_hi(np.asarray(rows, np.int64)) if rows else ((), ())
    bounds = {g: (float(x), float(y)) for g, x, y in zip(rows, los, his)}
    r = result_from_sums(P, N, sums, bounds.__getitem__, exact=False, fpr_mode=fpr_mode, ap_mode=ap_mode,
                         tpr_target=tpr_target, groups=table)
    r.method, r.params = method, dict(params)
    return r


def _results_of_walks(items, out: np.ndarray, iout: np.ndarray, fpr_mode: str, ap_mode: str,
                      tpr_target: float) -> dict:
    """{key: MetricResult} of [(key, Histogram)] whose compiled walks wrote row j of out /
    iout (finalize_hists, or sparse_readout's finalization)."""
    return {key: _result_from_walk(h.method, h.params, out[j], iout[j], h._lo_hi, h._deferred_table(),
                                   fpr_mode=fpr_mode, ap_mode=ap_mode, tpr_target=tpr_target)
            for j, (key, h) in enumerate(items)}


def finalize_histograms(hists: dict, fpr_mode: str = "first", ap_mode: str = "step",
                        tpr_target: float = 0.95) -> dict:
    """{key: MetricResult} of {key: Histogram}, as each one's finalize() gives it (the same
    walk over the same rows), in one compiled call that finalizes the histograms in
    parallel, one per thread (finalize_cpu.h: finalize_hists)."""
    tpr_target = check_conventions(fpr_mode, ap_mode, tpr_target)
    items = list(hists.items())
    cols, table = [], np.zeros((len(items), 5), np.int64)
    for j, (_, h) in enumerate(items):
        c = h._walk_columns()
        cols.append(c)
        table[j] = (c[0].size, c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, int(bool(h.exact_values)))
    out = np.empty((len(items), _OUT["size"]), np.float64)
    iout = np.empty((len(items), _IOUT["size"]), np.int64)
    if items and _C.finalize_hists(len(items), table.ctypes.data, _FPR_CODE[fpr_mode], _AP_CODE[ap_mode], tpr_target,
                                   out.ctypes.data, iout.ctypes.data) != 0:
        raise RuntimeError("finalize_hists: a decisive group spans several rows")
    return _results_of_walks(items, out, iout, fpr_mode, ap_mode, tpr_target)


def read_and_finalize(state: HistState, names, params_of, conventions: dict, clear: bool = False) -> tuple[dict, dict]:
    """(histograms_from_state(...), finalize_histograms(those, **conventions)) with the
    same values, in one compiled call on the CPU: each method is finalized on its thread
    right after its read-out (finalize_cpu.h: sparse_readout with fin_exact), not in a
    second parallel call after Python has built the histograms."""
    if state.device.type != "cpu":
        hists = histograms_from_state(state, names, params_of, clear=clear)
        return hists, finalize_histograms(hists, **conventions)
    fpr_mode, ap_mode = conventions.get("fpr_mode", "first"), conventions.get("ap_mode", "step")
    tpr_target = check_conventions(fpr_mode, ap_mode, conventions.get("tpr_target", 0.95))
    params = [params_of(n) for n in names]
    exact = [_exact_values(n, p) for n, p in zip(names, params)]
    *rows, (out, iout, status) = state._readout(clear, (exact, _FPR_CODE[fpr_mode], _AP_CODE[ap_mode], tpr_target))
    hists = {n: Histogram._from_readout(n, *t, p) for n, t, p in zip(names, rows, params)}  # refuses corrupt counts
    if (status != 0).any():  # every histogram was built: their counts fit, so the walk ran
        raise RuntimeError("finalize_hists: a decisive group spans several rows")
    return hists, _results_of_walks([(n, hists[n]) for n in names], out, iout, fpr_mode, ap_mode, tpr_target)


def histograms_from_state(state: HistState, names, params_of, clear: bool = False) -> dict:
    """{name: Histogram} of a HistState whose methods are `names` (in order); clear=True
    empties the state as it is read (HistState._readout)."""
    return {n: Histogram._from_readout(n, *t, params_of(n)) for n, t in zip(names, state._readout(clear))}


def save_histograms(path, hists: dict, extra: dict | None = None) -> None:
    """One .npz file holding several histograms (sparse), their methods, parameters,
    binning and the format version."""
    arrays, meta = {}, {"format": FORMAT, "binning": binning.SCHEME, "extra": extra or {}, "histograms": []}
    _check_json(meta["extra"], "save_histograms: extra")
    for key, h in hists.items():  # what load_histograms accepts, checked before anything is written
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(f"histogram keys must be strings (or integers) to be saved and loaded, got {key!r}; "
                            "e.g. join a (model, method) pair as 'model::method'")
        if not isinstance(h, Histogram):
            raise TypeError(f"save_histograms: {key!r} is a {type(h).__name__}, not a Histogram")
        _check_json(h.params, f"save_histograms: histogram {key!r}: params")
    for i, (key, h) in enumerate(hists.items()):
        for k, v in h.to_sparse().items():
            arrays[f"h{i}_{k}"] = v
        meta["histograms"].append({"key": key, "method": h.method, "params": h.params})
    arrays["meta"] = np.array(json.dumps(meta))
    savez_fast(path, **arrays)


def _check_json(v, what: str) -> None:
    """A metadata value save_histograms writes as JSON: refused, naming the innermost dict
    key at fault, when JSON cannot hold it (e.g. a NumPy scalar or array)."""
    try:
        json.dumps(v)
    except (TypeError, ValueError) as e:
        if isinstance(v, dict) and isinstance(e, TypeError):  # (a circular reference is a ValueError)
            for k, x in v.items():
                _check_json(x, f"{what}[{k!r}]")  # raises for a value at fault, else the keys are
        raise TypeError(f"{what} ({type(v).__name__}) cannot be written to the file's JSON metadata ({e}); pass "
                        "plain numbers, strings, lists and dicts with string keys (e.g. float(x), x.tolist())") \
            from None


def load_histograms(path) -> tuple[dict, dict]:
    """(histograms by key, extra metadata) from save_histograms' file."""
    with open_npz(path, "histogram") as z:
        meta = read_meta(z, path, "histogram")
        check_format(meta.get("format"), f"histogram file {path}")
        for k in ("binning", "histograms"):
            if k not in meta:
                raise ValueError(f"{path}: the histogram file's metadata has no {k!r} record")
        if meta["binning"] != binning.SCHEME:
            raise ValueError(f"{path}: histogram binning {meta['binning']} differs from this build's {binning.SCHEME}")
        if not isinstance(meta["histograms"], list):
            raise ValueError(f"{path}: the metadata's 'histograms' must be a list, got "
                             f"{type(meta['histograms']).__name__}")
        out = {}
        for i, m in enumerate(meta["histograms"]):
            what = f"{path}: histogram {i}"
            if not isinstance(m, dict):
                raise ValueError(f"{what}: its metadata must be a JSON object with 'key', 'method' and 'params', "
                                 f"got {type(m).__name__}")
            for k in ("key", "method", "params"):
                if k not in m:
                    raise ValueError(f"{what}: its metadata has no {k!r}")
            key, params = m["key"], m["params"]
            if isinstance(key, bool):  # JSON true / false: save_histograms never writes one
                raise ValueError(f"{what}: 'key' is the JSON boolean {json.dumps(key)}; keys are strings (or "
                                 "integers), as save_histograms writes them")
            if not isinstance(key, (str, int)) or not isinstance(m["method"], str) or not isinstance(params, dict):
                raise ValueError(f"{what}: 'key' must be a string (or integer), 'method' a string and 'params' an "
                                 f"object, got {type(key).__name__}, {type(m['method']).__name__}, "
                                 f"{type(params).__name__}")
            if key in out:
                raise ValueError(f"{what}: key {key!r} appears twice; the file is corrupt")
            arrays = []
            for k in ("index", "normal", "anomaly", "sig"):
                if f"h{i}_{k}" not in z.files:
                    raise ValueError(f"{what} ({key!r}): the array 'h{i}_{k}' is missing")
                arrays.append(read_array(z, f"h{i}_{k}", path, "histogram"))
            out[key] = Histogram.from_sparse(m["method"], *arrays, params, meta["binning"])
    return out, meta.get("extra", {})
