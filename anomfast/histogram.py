"""Histograms as first-class objects: one per method, two rows (normal, anomaly) of
int64 counts over the bins of anomfast.binning. They add exactly (integer counts,
the same bins in every batch, process and run), save and load with the method, its
parameters and the binning, and finalize to metrics with certified bounds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import binning
from .methods import coord_to_score

FORMAT = "anomfast-histograms-v1"


class Histogram:
    """Counts of one method: ``counts[0]`` normal pixels, ``counts[1]`` anomaly pixels per bin."""

    def __init__(self, method: str, counts, params: dict | None = None, binning_scheme: dict | None = None):
        counts = torch.as_tensor(counts)
        if counts.dtype != torch.int64 or tuple(counts.shape) != (2, binning.NBINS):
            raise ValueError(f"counts must be int64 of shape (2, {binning.NBINS}), got {counts.dtype} {tuple(counts.shape)}")
        self.method = method
        self.counts = counts
        self.params = dict(params or {})
        self.binning = dict(binning_scheme or binning.SCHEME)
        if self.binning != binning.SCHEME:
            raise ValueError(f"histogram binning {self.binning} differs from this build's {binning.SCHEME}")

    @property
    def n_normal(self) -> int:
        return int(self.counts[0].sum())

    @property
    def n_anomaly(self) -> int:
        return int(self.counts[1].sum())

    def _check_compatible(self, other: "Histogram"):
        if not isinstance(other, Histogram):
            raise TypeError(f"can only add a Histogram, got {type(other).__name__}")
        if other.method != self.method or other.params != self.params:
            raise ValueError(f"cannot add histograms of different methods/parameters: "
                             f"{self.method} {self.params} vs {other.method} {other.params}")

    def __add__(self, other: "Histogram") -> "Histogram":
        self._check_compatible(other)
        return Histogram(self.method, self.counts.cpu() + other.counts.cpu(), self.params, self.binning)

    def __iadd__(self, other: "Histogram") -> "Histogram":
        self._check_compatible(other)
        self.counts = self.counts + other.counts.to(self.counts.device)
        return self

    def __eq__(self, other) -> bool:
        return (isinstance(other, Histogram) and self.method == other.method and self.params == other.params
                and torch.equal(self.counts.cpu(), other.counts.cpu()))

    def groups(self):
        """Non-empty bins, highest score first: (pos, neg, thr_lo, thr_hi) in score units."""
        c = self.counts.cpu().numpy()
        nz = np.nonzero(c[0] | c[1])[0][::-1]
        lo, hi = binning.bin_edges(nz)
        return (c[1, nz].astype(np.int64), c[0, nz].astype(np.int64),
                coord_to_score(self.method, lo), coord_to_score(self.method, hi))

    def finalize(self, **conventions):
        """Metrics with certified bounds; see anomfast.metrics.metrics_from_groups."""
        from .metrics import metrics_from_groups
        pos, neg, lo, hi = self.groups()
        r = metrics_from_groups(pos, neg, lo, hi, exact=False, **conventions)
        r.method, r.params = self.method, dict(self.params)
        return r

    def __repr__(self) -> str:
        return f"Histogram({self.method!r}, normal={self.n_normal}, anomaly={self.n_anomaly})"

    def to_sparse(self) -> dict:
        c = self.counts.cpu().numpy()
        nz = np.nonzero(c[0] | c[1])[0]
        return {"index": nz.astype(np.int64), "normal": c[0, nz], "anomaly": c[1, nz]}

    @classmethod
    def from_sparse(cls, method, index, normal, anomaly, params=None, binning_scheme=None) -> "Histogram":
        counts = torch.zeros((2, binning.NBINS), dtype=torch.int64)
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= binning.NBINS):
            raise ValueError("histogram file has bin indices outside the binning")
        counts[0, idx] = torch.as_tensor(np.asarray(normal, dtype=np.int64))
        counts[1, idx] = torch.as_tensor(np.asarray(anomaly, dtype=np.int64))
        return cls(method, counts, params, binning_scheme)


def save_histograms(path, hists: dict, extra: dict | None = None) -> None:
    """One .npz file holding several histograms (sparse), their methods, parameters and binning."""
    arrays, meta = {}, {"format": FORMAT, "binning": binning.SCHEME, "extra": extra or {}, "histograms": []}
    for i, (key, h) in enumerate(hists.items()):
        s = h.to_sparse()
        for k, v in s.items():
            arrays[f"h{i}_{k}"] = v
        meta["histograms"].append({"key": key, "method": h.method, "params": h.params})
    arrays["meta"] = np.array(json.dumps(meta))
    with open(Path(path), "wb") as f:
        np.savez_compressed(f, **arrays)


def load_histograms(path) -> tuple[dict, dict]:
    """(histograms by key, extra metadata) from save_histograms' file."""
    with np.load(Path(path), allow_pickle=False) as z:
        if "meta" not in z:
            raise ValueError(f"{path} is not an anomfast histogram file")
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown histogram format {meta.get('format')!r}, expected {FORMAT}")
        out = {}
        for i, m in enumerate(meta["histograms"]):
            out[m["key"]] = Histogram.from_sparse(m["method"], z[f"h{i}_index"], z[f"h{i}_normal"],
                                                  z[f"h{i}_anomaly"], m["params"], meta["binning"])
    return out, meta.get("extra", {})
