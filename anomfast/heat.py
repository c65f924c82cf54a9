"""HEAT: energy + feature-space Mahalanobis distance + spatial consistency, per pixel.

With logits l (B, C, H, W), p = softmax(l) and features (B, D, h, w) of the same images:

    E   = -T logsumexp(l / T)                                   energy, T = stats.temperature
    M   = min_c sqrt((f - mu_c)^T S^-1 (f - mu_c))              at the feature resolution,
                                                                then bilinear to (H, W)
    K   = sum_c p_c log((p_c + 1e-8) / (q_c + 1e-8))            q = 3x3 mean of p
    w_E = 1 / (H(p) + 1e-6),  w_M = 1,  w_K = 1 / (v + 1e-6)    v = 3x3 mean of sum_c (p_c - 1/C)^2
    heat = (w_E E + w_M M + w_K K) / (w_E + w_M + w_K)          [- mean] / std  (standardize=True)

3x3 means count pixels outside the image as zeros and always divide by 9
(``avg_pool2d(count_include_pad=True)``). The class means mu_c and the tied covariance
S = sum_c sum_i (f_i - mu_c)(f_i - mu_c)^T / (N - 1) + 1e-4 I (N fitting pixels; the
divisor N - 1 is the source project's) are fitted by :func:`fit_heat` on in-distribution
features grouped by their ground-truth class (labels downsampled to the feature
resolution by nearest neighbour). The components are combined raw, exactly as above.

Standardization: ``fit_heat(standardize=True)`` (default) also stores the mean and std
of the raw score over the in-distribution pixels and the score becomes
(heat - mean) / std. These are fixed numbers, so a pixel's score and the reported
threshold do not depend on which other images were evaluated or in which order. The
source project normalised with a running (EMA) mean/std updated batch by batch during
evaluation, so its scores depended on batch order and batch size; that is not
reproduced. Standardization is an increasing affine map: the metrics do not change
(exactly with exact=True; up to the bin resolution of the histograms otherwise), only
the score scale and the threshold do.

Work split: M needs matrix products, (pixels x D) @ (D x D) to whiten the features
and (pixels x D) @ (D x C) against the whitened class means (see distance_sq), done
here by torch (BLAS / cuBLAS) at the feature resolution; everything else is per pixel
or 3x3 and runs in the fused core in the same pass as the other methods
(csrc/cpu/fused_cpu.cpp: heat_tile; the formulas in csrc/common/score_math.h).

Classes without any fitting pixel have no mean: with ``missing="exclude"`` (default)
they are left out of the min in M (listed in ``stats.missing_classes``, with a
warning); ``missing="error"`` raises instead.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._files import save_npz
from ._warn import warn
from .inputs import check_dense, from_numpy
from .sml import build_from_file, load_stats, real_array

FORMAT = "anomfast-heat-v1"
COV_EPS = 1e-4   # added to the diagonal of the tied covariance before inverting
_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)  # normal float32 range


def positive_float32(name: str, v) -> float:
    """v as a float > 0 that float32 holds as a normal number: the core computes in
    float32, where 1e-50 would be 0 and 1e50 inf."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None
    if not _F32_TINY <= x <= _F32_MAX:  # NaN fails too
        raise ValueError(f"{name} must be a finite number > 0 in float32's range [{_F32_TINY:.3g}, {_F32_MAX:.3g}] "
                         f"(the core computes in float32), got {v!r}")
    return x


def _standardization(score_mean, score_std) -> tuple:
    """(mean, std) as floats, checked for the core: mean and 1 / std finite in float32,
    1 / std > 0 there (a std of 1e50 would make every score 0); or (None, None)."""
    if (score_mean is None) != (score_std is None):
        raise ValueError("HeatStats: give both score_mean and score_std, or neither")
    if score_std is None:
        return None, None
    m, s = float(score_mean), float(score_std)
    if not abs(m) <= _F32_MAX:
        raise ValueError(f"HeatStats: score_mean must be finite in float32 (|mean| <= {_F32_MAX:.3g}), got "
                         f"{score_mean}")
    if not (0 < s < float("inf") and _F32_TINY <= 1.0 / s <= _F32_MAX):
        raise ValueError(f"HeatStats: score_std must be > 0 with 1 / score_std finite and > 0 in float32 (std in "
                         f"[{1 / _F32_MAX:.3g}, {1 / _F32_TINY:.3g}]), got {score_std}")
    return m, s


@dataclass
class HeatStats:
    """Fitted HEAT statistics (see the module docstring). float64 throughout.

    mean: (C, D) class means (NaN rows for classes without pixels); cov: (D, D) tied
    covariance including + 1e-4 I; precision: its inverse; count: (C,) feature pixels
    per class; temperature: T of the energy term; score_mean / score_std: the
    standardization of the combined score (None: raw score)."""
    mean: np.ndarray
    cov: np.ndarray
    precision: np.ndarray
    count: np.ndarray
    temperature: float = 1.0
    score_mean: float | None = None
    score_std: float | None = None
    missing: str = "exclude"

    def __post_init__(self):
        self.mean = real_array(self.mean, "mean", "HeatStats")
        self.cov = real_array(self.cov, "cov", "HeatStats")
        self.precision = real_array(self.precision, "precision", "HeatStats")
        self.count = real_array(self.count, "count", "HeatStats", integral=True)
        if self.mean.ndim != 2:
            raise ValueError(f"HeatStats: mean must be (C, D), got shape {self.mean.shape}")
        C, D = self.mean.shape
        if self.cov.shape != (D, D) or self.precision.shape != (D, D) or self.count.shape != (C,):
            raise ValueError(f"HeatStats: shapes disagree: mean {self.mean.shape}, cov {self.cov.shape}, "
                             f"precision {self.precision.shape}, count {self.count.shape}")
        if self.missing not in ("exclude", "error"):
            raise ValueError(f"missing must be 'exclude' or 'error', got {self.missing!r}")
        self.temperature = positive_float32("HeatStats: temperature", self.temperature)
        self.score_mean, self.score_std = _standardization(self.score_mean, self.score_std)
        present = (self.count > 0) & np.isfinite(self.mean).all(axis=1)
        self.missing_classes = [int(c) for c in np.nonzero(~present)[0]]
        if not present.any():
            raise ValueError("HEAT statistics have no class with fitting pixels")
        if self.missing_classes:
            if self.missing == "error":
                raise ValueError(f"HEAT: classes {self.missing_classes} have no fitting pixels (no class mean); "
                                 "fit on more data or pass missing='exclude' to leave them out of the "
                                 "Mahalanobis min")
            warn(f"HEAT: classes {self.missing_classes} have no fitting pixels; they are left out of "
                 "the Mahalanobis min")
        self._present = present
        self._host = self._whitening()
        self._cache: dict = {}

    def _whitening(self) -> tuple:
        """float64 (L, w, |w_c|^2, center) for _matrices (see there), checked: the core's
        float32 copies must be finite, and the precision symmetric positive definite."""
        P = self.precision
        if not np.isfinite(self.cov).all() or not np.isfinite(P).all():
            raise ValueError("HeatStats: cov and precision must be finite (a corrupt statistics file?)")
        if P.size and np.abs(P - P.T).max() > 1e-6 * np.abs(P).max():
            raise ValueError("HeatStats: precision is not symmetric; it must be the inverse of the tied covariance")
        try:
            L = np.linalg.cholesky(P)                     # P = L L^T
        except np.linalg.LinAlgError:
            raise ValueError("HeatStats: precision is not positive definite; it must be the inverse of the tied "
                             "covariance (refit with anomfast.fit_heat)") from None
        mu = self.mean[self._present]
        center = mu.mean(axis=0)
        with np.errstate(over="ignore", invalid="ignore"):
            w = (mu - center) @ L                         # (C', D): rows w_c^T = (mu_c - center)^T L
            host = (L, w, (w * w).sum(axis=1), center)
            if not all(np.isfinite(a.astype(np.float32)).all() for a in host):
                raise ValueError("HeatStats: the class means and the precision overflow float32 once whitened "
                                 "(the core computes in float32); refit them on in-distribution features")
        return host

    @property
    def num_classes(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @property
    def standardized(self) -> bool:
        return self.score_std is not None

    def kernel_constants(self) -> tuple[float, float, float]:
        """(temperature, mean, 1 / std) for the core; (T, 0, 1) when not standardized."""
        t = positive_float32("HeatStats: temperature", self.temperature)  # fields may be set after __init__
        m, s = _standardization(self.score_mean, self.score_std)
        if s is None:
            return t, 0.0, 1.0
        return t, m, 1.0 / s

    def with_standardization(self, score_mean: float | None, score_std: float | None) -> "HeatStats":
        """A copy with another standardization (None, None: the raw combined score)."""
        out = copy.copy(self)
        out.score_mean, out.score_std = _standardization(score_mean, score_std)
        return out

    def _matrices(self, device) -> tuple:
        """float32 (L, Wt, ww, center) on `device` for distance_sq: P = L L^T (Cholesky),
        class means whitened, w_c = L^T (mu_c - center), stacked as Wt (D, C'), ww = |w_c|^2.
        center = mean of the class means."""
        key = str(device)
        if key not in self._cache:
            L, w, ww, center = self._host
            f32 = dict(dtype=torch.float32, device=device)
            self._cache[key] = (torch.as_tensor(L, **f32), torch.as_tensor(w.T.copy(), **f32),
                                torch.as_tensor(ww, **f32), torch.as_tensor(center, **f32),
                                torch.as_tensor(w, **f32))
        return self._cache[key]

    def describe(self) -> dict:
        return {"num_classes": self.num_classes, "dim": self.dim, "pixels": int(self.count.sum()),
                "temperature": self.temperature, "missing_classes": self.missing_classes,
                "score_mean": self.score_mean, "score_std": self.score_std}

    def save(self, path) -> None:
        save_npz(path, {"format": FORMAT, "temperature": self.temperature, "score_mean": self.score_mean,
                        "score_std": self.score_std, "missing": self.missing},
                 mean=self.mean, cov=self.cov, precision=self.precision, count=self.count)

    @classmethod
    def load(cls, path) -> "HeatStats":
        z, meta = load_stats(path, FORMAT, "HEAT statistics", ("mean", "cov", "precision", "count"),
                             ("temperature", "score_mean", "score_std"))
        return build_from_file(path, "HEAT statistics",
                               lambda: cls(z["mean"], z["cov"], z["precision"], z["count"], meta["temperature"],
                                           meta["score_mean"], meta["score_std"], missing=meta.get("missing", "exclude")))


def as_features(f, logits: torch.Tensor, stats: HeatStats | None = None, name: str = "features") -> torch.Tensor:
    """(B, D, h, w) float tensor on the logits' device (a (D, h, w) array is one image)."""
    if f is None:
        raise ValueError("HEAT needs features=(B, D, h, w): the feature map of the same images, aligned with "
                         "the logits")
    if isinstance(f, np.ndarray):
        f = from_numpy(f)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape (B, D, h, w), got {type(f).__name__}")
    check_dense(f, name)
    if f.dim() == 3:
        f = f.unsqueeze(0)
    if f.dim() != 4:
        raise ValueError(f"HEAT needs features=(B, D, h, w); got shape {tuple(f.shape)}")
    if f.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {f.dtype}")
    B = logits.shape[0]
    if f.shape[0] != B:
        raise ValueError(f"{name} batch size {f.shape[0]} does not match the logits' {B}")
    if min(f.shape[1:]) < 1:
        raise ValueError(f"{name} shape {tuple(f.shape)} has an empty dimension")
    if stats is not None and f.shape[1] != stats.dim:
        hint = ""
        if f.shape[3] == stats.dim:  # (B, h, w, D): the channel-last layout
            hint = (f"; they look channel-last (B, h, w, D) with D = {f.shape[3]}: anomfast reads (B, D, h, w), pass "
                    f"{name}.permute(0, 3, 1, 2) (torch) or .transpose(0, 3, 1, 2) (numpy)")
        raise ValueError(f"HEAT statistics were fitted on D = {stats.dim} features but {name} have D = {f.shape[1]} "
                         f"(shape {tuple(f.shape)})" + hint)
    if f.device != logits.device:
        raise ValueError(f"{name} are on {f.device} but logits on {logits.device}; put both on the same device")
    return f


def distance_sq(features: torch.Tensor, stats: HeatStats) -> torch.Tensor:
    """min_c (f - mu_c)^T P (f - mu_c) per feature vector: float32 (B, h, w).

    With P = L L^T, z = L^T (f - center) and w_c = L^T (mu_c - center) (center = mean of
    the class means), the distance is |z - w_c|^2 = |z|^2 - 2 z.w_c + |w_c|^2: two
    matrix products (z for all pixels, then z against every w_c) give every class's
    distance. That expansion cancels when a feature is much closer to a class mean than
    to the center (in float32 a distance below ~1e-3 of |z| would lose all its digits),
    so it only picks the nearest class; the distance to that class is then recomputed
    directly as |z - w_k|^2, whose error is relative to the distance itself. Centering
    keeps |z| near the spread of the classes rather than the features' offset from 0."""
    L, Wt, ww, center, Wrows = stats._matrices(features.device)
    B, D, h, w = features.shape
    g = features.to(torch.float32).permute(0, 2, 3, 1).reshape(-1, D) - center
    z = g @ L                                                        # (N, D)
    approx = (z * z).sum(dim=1, keepdim=True) - 2.0 * (z @ Wt) + ww   # (N, C')
    k = approx.argmin(dim=1)
    d = z - Wrows[k]
    return (d * d).sum(dim=1).reshape(B, h, w)


def distance_map(features: torch.Tensor, stats: HeatStats, size) -> torch.Tensor:
    """M: sqrt of distance_sq at the feature resolution, bilinearly resized to `size`
    = (H, W) (align_corners=False). float32 (B, H, W), contiguous."""
    d = distance_sq(features, stats).sqrt_()
    H, W = int(size[0]), int(size[1])
    if tuple(d.shape[1:]) != (H, W):
        d = F.interpolate(d.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    return d.contiguous()
