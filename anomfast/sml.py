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

``convention="ml4cv"`` computes the statistics as the ml4cv-assignment scripts do
(anomfast/protocols.py): population std sqrt(m2 / n) instead of the unbiased one, 1e-8
added to the std (their denominator is std + 1e-8), and for a class predicted at most
once std 1 with its running mean (0 when never predicted) instead of the pooled
fallback (``missing`` does not apply). ``stats.with_convention("ml4cv")`` converts
fitted statistics: count, sum and sum of squares are all either convention needs.

The published method also post-processes the SML map spatially (boundary suppression
and dilated smoothing, see ``postprocess`` below); it is selected by the method
parameters ``sml_full=True`` (both), ``sml_boundary_suppression=`` and
``sml_smoothing=`` (each alone; they override ``sml_full``), and
``sml_boundary_padding=`` chooses how the image border enters the class boundaries
("original", the default, or "geodesic"; see find_boundaries). The default is plain
per-pixel SML. The post-processed map is computed here in float32 PyTorch and binned
by the core as an external coordinate map, so histograms and metrics work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._files import load_npz, save_npz
from ._warn import warn

FORMAT = "anomfast-sml-v1"
CONVENTIONS = ("sml", "ml4cv")
ML4CV_STD_EPS = 1e-8  # the ml4cv scripts divide by (std + 1e-8)


def real_array(v, name: str, what: str, integral: bool = False) -> np.ndarray:
    """v as a float64 array (int64 when integral), refusing what a cast would silently
    change: complex values (their imaginary part) and, integral, non-whole counts."""
    a = np.asarray(v)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{what}: {name} must be real numbers, got dtype {a.dtype}")
    if integral and a.dtype.kind == "f":
        ok = (a == np.round(a)) & (np.abs(a) < 2.0 ** 63)  # NaN and inf fail both
        if not ok.all():
            raise ValueError(f"{what}: {name} must be whole numbers (pixel counts), got {a[~ok].ravel()[:3].tolist()}")
    return a.astype(np.int64 if integral else np.float64)


def load_stats(path, fmt: str, what: str, arrays: tuple, keys: tuple) -> tuple:
    """load_npz for a statistics file whose `arrays` and metadata `keys` must all be
    there: a missing one is an error naming the file and the entry."""
    z, meta = load_npz(path, fmt, what)
    for names, where, have in ((arrays, "array", z), (keys, "metadata entry", meta)):
        lost = [k for k in names if k not in have]
        if lost:
            raise ValueError(f"{path}: {what} file without the {where}(s) {lost} (a truncated or foreign file?)")
    return z, meta


def build_from_file(path, what: str, make):
    """make() (a statistics type built from a file's arrays and metadata), with its
    validation errors naming the file: they say what is wrong, the file says where."""
    try:
        return make()
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: not usable {what}: {e}") from None


@dataclass
class SMLStats:
    count: np.ndarray      # int64 [C]
    sum: np.ndarray        # float64 [C]
    sumsq: np.ndarray      # float64 [C]
    missing: str = "global"
    convention: str = "sml"  # "sml" (Jung et al.: unbiased std) or "ml4cv" (see the module docstring)

    def __post_init__(self):
        self.count = real_array(self.count, "count", "SMLStats", integral=True)
        self.sum = real_array(self.sum, "sum", "SMLStats")
        self.sumsq = real_array(self.sumsq, "sumsq", "SMLStats")
        if not (self.count.shape == self.sum.shape == self.sumsq.shape) or self.count.ndim != 1:
            raise ValueError("SMLStats: count, sum and sumsq must be 1-D arrays of the same length")
        if (self.count < 0).any() or not (np.isfinite(self.sum).all() and np.isfinite(self.sumsq).all()):
            raise ValueError("SMLStats: counts must be non-negative and sums finite (a corrupt statistics file?)")
        if self.missing not in ("global", "error"):
            raise ValueError(f"missing must be 'global' or 'error', got {self.missing!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if self.convention == "ml4cv":
            self._ml4cv()
            return
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
            warn(f"SML: classes {self.fallback_classes} have no usable statistics (predicted < 2 "
                 "times or zero spread during fitting); using the pooled mean/std for them")
        self.mean = np.where(bad, gmean, mean)
        self.std = np.where(bad, gstd, std)
        self.global_mean, self.global_std = float(gmean), gstd

    def _ml4cv(self):
        """The ml4cv scripts' statistics: mean = sum / n (0 when n = 0), std = sqrt(m2 / n)
        + 1e-8 for n > 1, else 1 + 1e-8; m2 = sumsq - n mean^2 (their Welford m2)."""
        n = self.count.astype(np.float64)
        seen = self.count > 0
        mean = np.where(seen, self.sum / np.where(seen, n, 1.0), 0.0)
        m2 = np.maximum(self.sumsq - n * mean * mean, 0.0)
        many = self.count > 1
        std = np.where(many, np.sqrt(m2 / np.where(many, n, 1.0)), 1.0)
        self.mean, self.std = mean, std + ML4CV_STD_EPS
        self.fallback_classes = [int(c) for c in np.nonzero(~many)[0]]
        N = max(float(n.sum()), 1.0)
        self.global_mean = float(self.sum.sum() / N)
        self.global_std = float(np.sqrt(max(self.sumsq.sum() / N - self.global_mean ** 2, 0.0)))

    def with_convention(self, convention: str) -> "SMLStats":
        """The same fitted sums under another convention ("sml" or "ml4cv")."""
        if convention == self.convention:
            return self
        return SMLStats(self.count, self.sum, self.sumsq, missing=self.missing, convention=convention)

    @property
    def num_classes(self) -> int:
        return int(self.count.shape[0])

    def kernel_arrays(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (mean, 1 / std) of the C classes, as the core reads them (mean[k] for
        every argmax k < C: exactly C of each, checked here on every path to the core)."""
        C = self.num_classes
        shapes = tuple(np.shape(v) for v in (self.mean, self.std))
        if shapes != ((C,), (C,)):
            raise ValueError(f"SML statistics hold mean / std of shapes {shapes[0]} / {shapes[1]} for {C} classes "
                             f"(count has {C}); expected ({C},) each: were they changed after fitting? Refit them "
                             "or load them again")
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            mean = np.asarray(self.mean, np.float64).astype(np.float32)
            inv = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)
        if not (np.isfinite(mean).all() and np.isfinite(inv).all() and (inv > 0).all()):
            bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(inv) & (inv > 0)))
            raise ValueError(f"SML statistics of class(es) {bad[:10].tolist()} have no finite float32 mean / "
                             "positive std (e.g. sums of 1e300); refit them on in-distribution logits")
        return (torch.from_numpy(mean).to(device).contiguous(), torch.from_numpy(inv).to(device).contiguous())

    def describe(self) -> dict:
        d = {"num_classes": self.num_classes, "pixels": int(self.count.sum()),
             "fallback_classes": self.fallback_classes}
        if self.convention != "sml":  # only then, so existing parameters (and histograms) stay as they were
            d["convention"] = self.convention
        return d

    def save(self, path) -> None:
        save_npz(path, {"format": FORMAT, "missing": self.missing, "convention": self.convention},
                 count=self.count, sum=self.sum, sumsq=self.sumsq)

    @classmethod
    def load(cls, path) -> "SMLStats":
        z, meta = load_stats(path, FORMAT, "SML statistics", ("count", "sum", "sumsq"), ())
        return build_from_file(path, "SML statistics",
                               lambda: cls(z["count"], z["sum"], z["sumsq"], missing=meta.get("missing", "global"),
                                           convention=meta.get("convention", "sml")))


# ------------------------------------------------------------- SML post-processing
# Jung et al.'s boundary suppression and dilated smoothing, as in the official code
# (BoundarySuppressionWithSmoothing, boundary width 4 in 4 iterations, 7x7 Gaussian of
# sigma 1 with dilation 6; the image border as the kornia its requirements pin treats
# it, unless sml_boundary_padding="geodesic"). The published code post-processes the
# standardized max logit (high = in-distribution); our score is its negative. Every step
# is a masked average or a convolution, which commute with negation (round-to-nearest
# is symmetric), so post-processing the score gives exactly the negated published map.
BOUNDARY_WIDTH = 4
BOUNDARY_ITERATIONS = 4
SMOOTH_SIZE, SMOOTH_SIGMA, SMOOTH_DILATION = 7, 1.0, 6
BOUNDARY_PADDINGS = ("original", "geodesic")  # the first is the default (find_boundaries)


def gaussian_kernel_1d(size: int = SMOOTH_SIZE, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """1-D Gaussian (float64, sum 1). Its outer product with itself is the official code's
    size x size kernel (exp(-(dx^2 + dy^2) / 2 sigma^2), normalised to sum 1), which
    postprocess applies as a row pass and a column pass."""
    c = (size - 1) / 2
    g = np.exp(-((np.arange(size, dtype=np.float64) - c) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _cross_max(x: torch.Tensor, fill: float) -> torch.Tensor:
    """max over the pixel and its 4 neighbours; outside the image counts as `fill`."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), value=fill)
    H, W = x.shape[-2:]
    out = p[..., 1:H + 1, 1:W + 1]
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = torch.maximum(out, p[..., dy:dy + H, dx:dx + W])
    return out


def check_boundary_padding(padding) -> str:
    if padding not in BOUNDARY_PADDINGS:
        raise ValueError(f"sml_boundary_padding must be one of {', '.join(map(repr, BOUNDARY_PADDINGS))}, "
                         f"got {padding!r}")
    return padding


def find_boundaries(pred: torch.Tensor, padding: str = "original") -> torch.Tensor:
    """bool (B, 1, H, W): dilation of the class map with the 3x3 cross != its erosion with
    the 3x3 square (the official code's structuring elements, one step each). Class ids
    compare as numbers, which makes a diagonal neighbour with a larger id (only) not a
    boundary, as published.

    padding="original" (default): the official code's border, that of the kornia its
    requirements pin, whose erosion pads the map with the constant 1.0 and dilation with
    0. A pixel whose 3x3 square reaches outside the image erodes to at most 1, so where
    its neighbourhood holds only class ids >= 2 it is a boundary pixel (a one-class map of
    such a class has its outer ring as boundary); ids 0 and 1 are unaffected, and the 0
    of the dilation never wins (ids are >= 0). padding="geodesic": pixels outside the
    image are ignored (kornia's later default), so the border creates no boundary."""
    y = pred.unsqueeze(1).to(torch.float32)  # class ids are exact in float32
    if check_boundary_padding(padding) == "original":
        dil = _cross_max(y, 0.0)
        padded = torch.nn.functional.pad(y, (1, 1, 1, 1), value=1.0)
        ero = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)
    else:
        dil = _cross_max(y, -float("inf"))
        ero = -torch.nn.functional.max_pool2d(-y, 3, stride=1, padding=1)  # max_pool pads with -inf
    return dil != ero


def _expand(boundaries: torch.Tensor, r: int) -> torch.Tensor:
    """Dilation by the L1 ball (diamond) of radius r: the official d_ks[r] kernels are the
    centre pixel dilated r times by the 3x3 cross."""
    out = boundaries.to(torch.float32)
    for _ in range(r):
        out = _cross_max(out, 0.0)
    return out > 0


def _box3_sum(x: torch.Tensor) -> torch.Tensor:
    """3x3 sums with replication padding (out-of-image neighbours repeat the edge), as
    three column sums of three-pixel row sums: a one-channel 3x3 conv2d took ~10x longer
    on the CPU (12 ms on 512 x 1024, called 8 times per map)."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    H, W = x.shape[-2:]
    rows = p[..., 0:W] + p[..., 1:W + 1] + p[..., 2:W + 2]
    return rows[..., 0:H, :] + rows[..., 1:H + 1, :] + rows[..., 2:H + 2, :]


def postprocess(score: torch.Tensor, pred: torch.Tensor, boundary_suppression: bool = True,
                smoothing: bool = True, boundary_padding: str = "original") -> torch.Tensor:
    """SML post-processing of a float32 score map (B, H, W), given the predicted class map
    pred (B, H, W). Returns a new float32 (B, H, W) map.

    Boundary suppression (4 iterations): at iteration i the class boundaries (see
    find_boundaries, with padding=boundary_padding) are expanded by a diamond of radius
    4 - i - 1 (the last iteration uses the raw boundary); each boundary pixel takes the
    mean of the non-boundary values in its 3x3 neighbourhood (replication padding, so
    edge pixels count repeatedly, as published) and keeps its value when there is none.
    Dilated smoothing: 7x7 Gaussian (sigma 1, sum 1), dilation 6, replication padding 18."""
    check_boundary_padding(boundary_padding)
    out = score.to(torch.float32).unsqueeze(1)
    if boundary_suppression:
        boundaries = find_boundaries(pred, boundary_padding)
        diff = BOUNDARY_WIDTH // BOUNDARY_ITERATIONS
        for it in range(BOUNDARY_ITERATIONS):
            r = 0 if it == BOUNDARY_ITERATIONS - 1 else BOUNDARY_WIDTH - diff * it - 1
            keep = (~_expand(boundaries, r)).to(torch.float32)  # 1 = non-boundary
            prev = out
            total = _box3_sum(out * keep)          # NaN/inf at a boundary pixel spread, as published
            n = _box3_sum(keep)
            avg = torch.where(n == 0, prev, total / n.clamp_min(1.0))
            out = torch.where(keep == 0, avg, prev)
    if smoothing:
        # the separable Gaussian as a row pass then a column pass of 7 dilated taps (a
        # one-channel dilated conv2d took longer than everything else here on the CPU)
        pad = SMOOTH_DILATION * (SMOOTH_SIZE // 2)
        H, W = out.shape[-2:]
        p = torch.nn.functional.pad(out, (pad, pad, pad, pad), mode="replicate")
        g = [float(v) for v in gaussian_kernel_1d().astype(np.float32)]
        d = SMOOTH_DILATION
        rows = sum(g[k] * p[..., k * d:k * d + W] for k in range(SMOOTH_SIZE))
        out = sum(g[k] * rows[..., k * d:k * d + H, :] for k in range(SMOOTH_SIZE))
    return out[:, 0].contiguous()
