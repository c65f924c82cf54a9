"""Standardized Max Logits (SML) statistics: per predicted class mean and std of the max logit.

Jung et al., "Standardizing Max Logits", ICCV 2021: s = -(max_c l_c - mean[k]) / std[k]
with k = argmax_c l_c, the statistics fitted on in-distribution data grouped by the
predicted class. The fitting pass accumulates, per class, the count, the sum and the
sum of squares of the max logit in the compiled core (float64 partial sums per
thread) and combines them here in float64; std is the unbiased (n - 1) one.

A class predicted fewer than twice during fitting (or with zero spread) has no usable
statistics. ``missing="global"`` (default) gives such classes the statistics pooled
over all fitted pixels and records them in ``fallback_classes`` (with a warning);
``missing="error"`` raises instead. Scores are never NaN because of a missing class.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT = "anomfast-sml-v1"


@dataclass
class SMLStats:
    count: np.ndarray      # int64 [C]
    sum: np.ndarray        # float64 [C]
    sumsq: np.ndarray      # float64 [C]
    missing: str = "global"

    def __post_init__(self):
        self.count = np.asarray(self.count, dtype=np.int64)
        self.sum = np.asarray(self.sum, dtype=np.float64)
        self.sumsq = np.asarray(self.sumsq, dtype=np.float64)
        if not (self.count.shape == self.sum.shape == self.sumsq.shape) or self.count.ndim != 1:
            raise ValueError("SMLStats: count, sum and sumsq must be 1-D arrays of the same length")
        if self.missing not in ("global", "error"):
            raise ValueError(f"missing must be 'global' or 'error', got {self.missing!r}")
        if self.count.sum() < 2:
            raise ValueError(f"SML fitting saw {int(self.count.sum())} pixels; at least 2 are needed")
        n = self.count.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = self.sum / n
            var = (self.sumsq - n * mean * mean) / (n - 1)
        var = np.maximum(var, 0.0)
        std = np.sqrt(var)
        bad = (self.count < 2) | ~(std > 0) | ~np.isfinite(std)
        N = n.sum()
        gmean = self.sum.sum() / N
        gvar = max((self.sumsq.sum() - N * gmean * gmean) / (N - 1), 0.0)
        gstd = float(np.sqrt(gvar))
        if not gstd > 0:
            gstd = 1.0
        self.fallback_classes = [int(c) for c in np.nonzero(bad)[0]]
        if self.fallback_classes:
            if self.missing == "error":
                raise ValueError(
                    f"SML: classes {self.fallback_classes} were predicted fewer than 2 times (or with zero "
                    "spread) during fitting, so they have no mean/std; fit on more data or pass "
                    "missing='global' to use the pooled statistics for them")
            warnings.warn(f"SML: classes {self.fallback_classes} have no usable statistics (predicted < 2 "
                          "times or zero spread during fitting); using the pooled mean/std for them",
                          RuntimeWarning, stacklevel=3)
        self.mean = np.where(bad, gmean, mean)
        self.std = np.where(bad, gstd, std)
        self.global_mean, self.global_std = float(gmean), gstd

    @property
    def num_classes(self) -> int:
        return int(self.count.shape[0])

    def kernel_arrays(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device).contiguous()
        inv = torch.as_tensor(1.0 / self.std, dtype=torch.float32, device=device).contiguous()
        return mean, inv

    def describe(self) -> dict:
        return {"num_classes": self.num_classes, "pixels": int(self.count.sum()),
                "fallback_classes": self.fallback_classes}

    def save(self, path) -> None:
        path = Path(path)
        meta = json.dumps({"format": FORMAT, "missing": self.missing})
        with open(path, "wb") as f:
            np.savez(f, count=self.count, sum=self.sum, sumsq=self.sumsq, meta=np.array(meta))

    @classmethod
    def load(cls, path) -> "SMLStats":
        with np.load(Path(path), allow_pickle=False) as z:
            try:
                meta = json.loads(str(z["meta"]))
            except KeyError:
                raise ValueError(f"{path} is not an anomfast SML statistics file (no metadata)") from None
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: unknown SML statistics format {meta.get('format')!r}, expected {FORMAT}")
            return cls(z["count"], z["sum"], z["sumsq"], missing=meta.get("missing", "global"))
