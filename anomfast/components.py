"""Component-level metrics of the SegmentMeIfYouCan benchmark (road-anomaly-benchmark,
``metrics/instance_segmentation.py``): sIoU_gt, PPV and the component F1 averaged over
IoU thresholds, from the same score maps as the pixel metrics.

Per image (H x W), with a score threshold t (by default each method's best pixel-F1
threshold on the pooled histogram of the whole data set):

1. prediction P = {score > t} minus the void pixels;
2. ground-truth components G_1..G_n: the 8-connected components (3 x 3 structure) of the
   anomaly pixels; predicted segments S_1..S_m: the 8-connected components of P;
3. segments with fewer than ``thresh_segsize`` pixels are dropped; ground-truth
   components with fewer than ``thresh_instsize`` pixels become void (500 / 100 on the
   anomaly track, 50 / 10 on the obstacle track);
4. everything below counts pixels of the region of interest R (the pixels not void):

   sIoU_gt(G)  = |G ∩ P| / (|G| + sum over segments S touching G of |S \\ (all G)|)
   sIoU_pred(S) = |S ∩ (all G)| / (|S| + sum over components G touching S of |G \\ P|)
   PPV(S)      = |S ∩ (all G)| / |S|

   (the benchmark writes the union as |∪S| + |G| - |G ∩ P| - (pixels of those S on other
   components), which is the same number). "Touching" means sharing a pixel.

Over the data set (counts summed over images, means over all components of all images):
sIoU_gt = mean of sIoU_gt(G), PPV = mean of PPV(S), sIoU_pred = mean of sIoU_pred(S), and
for each IoU threshold tau in 0.25, 0.30, ..., 0.75 (11 values):
TP(tau) = #{G: sIoU_gt(G) >= tau}, FN(tau) = #{G: sIoU_gt(G) < tau},
FP(tau) = #{S: PPV(S) < tau}, F1(tau) = 2 TP / (2 TP + FN + FP);
mean F1 = (F1(0.25) + ... + F1(0.75)) / 11, summed in that order as the benchmark does.

mode="benchmark" (default) reproduces the benchmark's code where it departs from the
definition above; mode="clean" follows the definition:

* binarization: the benchmark flags "score > t" although its best-F1 threshold (like
  anomfast's) means "score >= t", so pixels scoring exactly t are left out; clean
  flags "score >= t", the pixel set that attained the best F1.
* order of operations: the benchmark labels and size-filters the predicted segments with
  only the original void cleared, and turns small ground-truth components void
  afterwards; a segment then loses its pixels on those components (keeping its id, so it
  may be split in two, and it disappears if nothing is left) and was size-filtered on
  pixels that no longer count. Clean turns small components void first and labels the
  prediction inside the final region of interest.
* background: the benchmark's size loop over ground-truth ids starts at 0, the
  background, so an image with fewer than thresh_instsize non-anomaly pixels (void
  included) has all of them turned void. Clean does not.
* IoU thresholds: the benchmark compares the float64 quotients with
  np.linspace(0.25, 0.75, 11), whose 7th value is 0.6000000000000001, so an sIoU or PPV
  of exactly 3/5 counts below 0.60. Clean compares the integer counts with tau = k / 20
  exactly (20 I >= k U).

Both modes: NaN scores are never flagged (NaN > t is false, as in the benchmark).
Where the benchmark divides by zero (no component at all) the result is NaN.
The means are the exactly rounded means of the per-component float64 quotients (their
sums are kept in 84-bit fixed point, exact and independent of the batching and of the
number of processes); the benchmark's float sums differ from them in the last bits.

Labeling runs in a compiled core, per image: on the CPU csrc/cpu/components_cpu.cpp
(union-find over pixels in two raster passes); for score maps on a CUDA device, which
are binarized and whose label classes are looked up there, csrc/cuda/components_cuda.cu
labels (parallel union-find with atomicMin) and counts on the device, so only the
per-component rows (a few integers per component) come back to the host (a build
without the CUDA core labels CUDA maps on the CPU). Both give the same integer counts
(tests/test_cuda_build.py runs the CUDA kernels under the host emulation against the CPU
core; tests/test_components.py compares them on a GPU when there is one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from . import _core
from ._fused import check_label_dtype
from .inputs import from_numpy
from .labels import ANOMALY, INVALID, NORMAL, VOID, LabelMap, as_label_map

_C = _core._C
if dict(_C.COMP_CLASSES) != {"normal": NORMAL, "anomaly": ANOMALY, "void": VOID}:  # pragma: no cover
    raise ImportError(f"compiled core's label classes {dict(_C.COMP_CLASSES)} differ from anomfast.labels")

MODES = dict(_C.COMP_MODES)
TRACKS = {"anomaly": (500, 100), "obstacle": (50, 10)}  # (thresh_segsize, thresh_instsize)
# the benchmark's thresholds, float for float (np.linspace(0.25, 0.75, 11, endpoint=True))
IOU_THRESHOLDS = np.linspace(0.25, 0.75, 11, endpoint=True)
IOU_TWENTIETHS = np.arange(5, 16, dtype=np.int64)  # clean mode: tau = k / 20 exactly
N_TAU = IOU_THRESHOLDS.size

# Accumulator layout (int64 per method): every slot sums across images, batches and
# processes. Sums of quotients are 84-bit fixed point in three 28-bit limbs: a quotient
# I / U with U < 2^31 pixels is 0 or >= 2^-31, so its float64 value is a multiple of
# 2^-84, and each limb of one value is <= 2^28 (2^34 values fit before a limb overflows).
IMAGES, N_GT, N_PRED = 0, 1, 2
SIOU_GT, SIOU_PRED, PPV = 3, 6, 9
TP, FP = 12, 12 + N_TAU
N_SLOTS = 12 + 2 * N_TAU
_LIMB = 28
_MAX_PIXELS = 1 << 31


def _fixed_point(x: np.ndarray) -> np.ndarray:
    """Exact sum of float64 values in [0, 1] (each 0 or >= 2^-31) as 3 limbs of 28 bits."""
    t = np.ldexp(x, _LIMB)
    l0 = np.floor(t)
    r = np.ldexp(t - l0, _LIMB)
    l1 = np.floor(r)
    l2 = np.ldexp(r - l1, _LIMB)
    if not np.array_equal(l2, np.floor(l2)):  # pragma: no cover - excluded by the pixel bound
        raise AssertionError("a quotient is not a multiple of 2^-84")
    return np.array([l0.astype(np.int64).sum(), l1.astype(np.int64).sum(), l2.astype(np.int64).sum()], np.int64)


def _exact_mean(limbs, n: int) -> float:
    """The correctly rounded mean of n values whose exact sum the limbs hold."""
    if n == 0:
        return math.nan
    total = (int(limbs[0]) << (2 * _LIMB)) + (int(limbs[1]) << _LIMB) + int(limbs[2])
    return total / (n << (3 * _LIMB))  # Python's int / int rounds correctly


@dataclass(frozen=True)
class ComponentSpec:
    """What component metrics to compute. track: "anomaly" (sizes 500 / 100) or
    "obstacle" (50 / 10); thresh_segsize / thresh_instsize override the track's sizes;
    mode: "benchmark" or "clean" (module docstring); thresholds: {method: score
    threshold} (a float or a MetricResult, e.g. a Results from an earlier evaluation),
    None for each method's best pixel-F1 threshold."""
    track: str = "anomaly"
    thresh_segsize: int | None = None
    thresh_instsize: int | None = None
    mode: str = "benchmark"
    thresholds: Mapping | None = None

    def __post_init__(self):
        if self.track not in TRACKS:
            raise ValueError(f"components track must be one of {sorted(TRACKS)}, got {self.track!r}")
        if self.mode not in MODES:
            raise ValueError(f"components mode must be one of {sorted(MODES)}, got {self.mode!r}")
        seg, inst = TRACKS[self.track]
        for name, default in (("thresh_segsize", seg), ("thresh_instsize", inst)):
            v = getattr(self, name)
            if v is None:
                object.__setattr__(self, name, default)
            elif isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be a non-negative number of pixels, got {v!r}")
            elif v > _MAX_PIXELS:  # the core takes an int64; an image holds fewer than 2^31 pixels
                raise ValueError(f"{name} must be at most 2^31 pixels (images hold fewer, so 2^31 already drops "
                                 f"every component), got {v!r}")
            else:
                object.__setattr__(self, name, int(v))
        if self.thresholds is not None:
            if not hasattr(self.thresholds, "items"):
                raise TypeError(f"component thresholds must be a mapping {{method: threshold}}, got "
                                f"{type(self.thresholds).__name__}")
            object.__setattr__(self, "thresholds", {str(k): _threshold_value(k, v)
                                                    for k, v in self.thresholds.items()})

    def describe(self) -> dict:
        return {"track": self.track, "thresh_segsize": self.thresh_segsize,
                "thresh_instsize": self.thresh_instsize, "mode": self.mode}


def _threshold_value(name, v) -> float:
    v = getattr(v, "threshold", v)  # a MetricResult
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or math.isnan(float(v)):
        raise ValueError(f"component threshold of {name!r} must be a number (not NaN), got {v!r}")
    return float(v)


def as_component_spec(components) -> ComponentSpec | None:
    """False / None: off; True: the defaults; a dict of ComponentSpec fields; a ComponentSpec."""
    if components is None or components is False:
        return None
    if components is True:
        return ComponentSpec()
    if isinstance(components, ComponentSpec):
        return components
    if isinstance(components, dict):
        return ComponentSpec(**components)
    raise TypeError(f"components must be True, a dict of ComponentSpec fields or a ComponentSpec, got "
                    f"{type(components).__name__}")


# ---------------------------------------------------------------- one image


class _Workspace:
    """Per-image buffers of the core, reused while the image size stays the same."""

    def __init__(self):
        self.shape = None

    def get(self, H: int, W: int):
        if self.shape != (H, W):
            cap = int(_C.components_capacity(H, W))
            self.work = np.empty(2 * H * W, np.int32)
            self.gt = np.empty((cap, 2), np.int64)
            self.pred = np.empty((cap, 3), np.int64)
            self.counts = np.zeros(2, np.int64)
            self.cap, self.shape = cap, (H, W)
        return self


def _plane(a, dtype: np.dtype, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU for the labeling core, got {a.device}")
        a = a.numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array or a CPU tensor, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be one (H, W) image, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (row-major)")
    return a


def image_counts(pred, classes, thresh_segsize: int, thresh_instsize: int, mode: str = "benchmark",
                 workspace: _Workspace | None = None):
    """Integer counts of one image from the compiled core. pred: uint8 (H, W), 1 where the
    score passed the threshold; classes: int8 (H, W) label classes (anomfast.labels:
    NORMAL, ANOMALY, VOID). Returns (gt int64 (n, 2): per ground-truth component kept,
    |G ∩ P| and its adjusted union; pred int64 (m, 3): per predicted segment, |S ∩ all G|,
    |S| and its adjusted union), all within the region of interest."""
    p = _plane(pred, np.dtype(np.uint8), "pred")
    c = _plane(classes, np.dtype(np.int8), "classes")
    if p.shape != c.shape:
        raise ValueError(f"pred {p.shape} and classes {c.shape} must have the same shape")
    H, W = p.shape
    if H * W == 0:
        return np.zeros((0, 2), np.int64), np.zeros((0, 3), np.int64)
    if H * W >= _MAX_PIXELS:
        raise ValueError(f"an image of {H} x {W} pixels has 2^31 or more pixels; the labeling core counts in int32")
    if p.max(initial=0) > 1:
        raise ValueError("pred must hold 0 / 1")
    if c.min(initial=0) < 0 or c.max(initial=0) > VOID:
        raise ValueError(f"classes must hold {NORMAL} (normal), {ANOMALY} (anomaly) or {VOID} (void)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    ws = (workspace or _Workspace()).get(H, W)
    rc = _C.components(p.ctypes.data, c.ctypes.data, H, W, int(thresh_segsize), int(thresh_instsize), MODES[mode],
                       ws.work.ctypes.data, ws.gt.ctypes.data, ws.pred.ctypes.data, ws.cap, ws.counts.ctypes.data)
    if rc != 0:  # pragma: no cover - the checks above exclude it
        raise RuntimeError(f"components core refused an image of {H} x {W} (status {rc})")
    n_gt, n_pred = int(ws.counts[0]), int(ws.counts[1])
    return ws.gt[:n_gt].copy(), ws.pred[:n_pred].copy()


class _DeviceWorkspace:
    """Buffers of the CUDA labeling core (components_cuda.h), reused while the image size
    and the device stay the same (the row buffers grow with the batch, up to ROW_BYTES)."""

    ROW_BYTES = 64 << 20  # images per call: their output rows within this many bytes

    def __init__(self):
        self.key, self.images = None, 0

    def get(self, core, H: int, W: int, device, B: int = 1):
        key = (H, W, device, id(core))
        if self.key != key:
            n32, n64, self.cap = (int(v) for v in core.components_workspace(H, W))
            self.work = torch.empty(n32, dtype=torch.int32, device=device)
            self.table = torch.empty(n64, dtype=torch.int64, device=device)
            self.key, self.images = key, 0
        want = max(1, min(B, self.ROW_BYTES // (40 * self.cap)))
        if self.images < want:
            self.images = want
            self.gt = torch.empty((want, self.cap, 2), dtype=torch.int64, device=device)
            self.pred = torch.empty((want, self.cap, 3), dtype=torch.int64, device=device)
            self.counts = torch.empty((want, 2), dtype=torch.int64, device=device)
        return self


def device_counts(pred: torch.Tensor, classes: torch.Tensor, thresh_segsize: int, thresh_instsize: int,
                  mode: str = "benchmark", workspace: _DeviceWorkspace | None = None, core=None) -> list:
    """image_counts of B images whose maps stay on the device: pred uint8 (B, H, W) 0 / 1,
    classes int8 (B, H, W) (NORMAL / ANOMALY / VOID), both contiguous on one CUDA device
    (core: the CUDA core, by default anomfast's; tests pass the host emulation with CPU
    tensors). Labeling and counting run there; one host sync per chunk of images copies
    back the rows. Returns [(gt, pred)] per image, rows in an unspecified order."""
    core = core if core is not None else _core.cuda_core()
    for t, dt, name in ((pred, torch.uint8, "pred"), (classes, torch.int8, "classes")):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 3 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dt} tensor (B, H, W), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if pred.shape != classes.shape or pred.device != classes.device:
        raise ValueError(f"pred {tuple(pred.shape)} on {pred.device} and classes {tuple(classes.shape)} on "
                         f"{classes.device} must have the same shape and device")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    B, H, W = pred.shape
    if B == 0 or H * W == 0:
        return [(np.zeros((0, 2), np.int64), np.zeros((0, 3), np.int64)) for _ in range(B)]
    if H * W >= _MAX_PIXELS:
        raise ValueError(f"an image of {H} x {W} pixels has 2^31 or more pixels; the labeling core counts in int32")
    ws = (workspace or _DeviceWorkspace()).get(core, H, W, pred.device, B)
    stream = torch.cuda.current_stream(pred.device).cuda_stream if pred.is_cuda else 0
    out = []
    for b0 in range(0, B, ws.images):
        n = min(ws.images, B - b0)
        core.components(pred[b0].data_ptr(), classes[b0].data_ptr(), n, H, W, int(thresh_segsize),
                        int(thresh_instsize), MODES[mode], ws.work.data_ptr(), ws.work.numel(), ws.table.data_ptr(),
                        ws.table.numel(), ws.gt.data_ptr(), ws.pred.data_ptr(), ws.cap, ws.counts.data_ptr(), stream)
        counts = ws.counts[:n].cpu().numpy()  # waits for the kernels (stream order)
        # the rows in use, one copy each (np.array: a CPU workspace, under the emulation, is
        # not copied by .cpu() and the next chunk would overwrite it)
        gt = np.array(ws.gt[:n, :int(counts[:, 0].max())].cpu())
        pr = np.array(ws.pred[:n, :int(counts[:, 1].max())].cpu())
        out += [(gt[b, :counts[b, 0]], pr[b, :counts[b, 1]]) for b in range(n)]
    return out


def image_row(gt: np.ndarray, pred: np.ndarray, mode: str = "benchmark") -> np.ndarray:
    """One image's contribution to the accumulator (int64 (N_SLOTS,))."""
    row = np.zeros(N_SLOTS, np.int64)
    row[IMAGES], row[N_GT], row[N_PRED] = 1, gt.shape[0], pred.shape[0]
    gi, gu = gt[:, 0], gt[:, 1]
    pi, ps, pu = pred[:, 0], pred[:, 1], pred[:, 2]
    siou_gt, siou_pred, ppv = gi / gu, pi / pu, pi / ps  # float64, as the benchmark divides
    row[SIOU_GT:SIOU_GT + 3] = _fixed_point(siou_gt)
    row[SIOU_PRED:SIOU_PRED + 3] = _fixed_point(siou_pred)
    row[PPV:PPV + 3] = _fixed_point(ppv)
    if mode == "benchmark":
        row[TP:TP + N_TAU] = (siou_gt[None, :] >= IOU_THRESHOLDS[:, None]).sum(1)
        row[FP:FP + N_TAU] = (ppv[None, :] < IOU_THRESHOLDS[:, None]).sum(1)
    else:  # tau = k / 20: I / U >= k / 20  <=>  20 I >= k U, in integers (U, S < 2^31)
        k = IOU_TWENTIETHS[:, None]
        row[TP:TP + N_TAU] = (20 * gi[None, :] >= k * gu[None, :]).sum(1)
        row[FP:FP + N_TAU] = (20 * pi[None, :] < k * ps[None, :]).sum(1)
    return row


# ---------------------------------------------------------------- accumulation


@dataclass
class ComponentResult:
    """Component metrics of one method over a data set (module docstring)."""
    method: str
    threshold: float
    spec: dict
    n_images: int
    n_gt: int
    n_pred: int
    siou_gt: float
    siou_pred: float
    ppv: float
    iou_thresholds: tuple
    tp: tuple
    fn: tuple
    fp: tuple
    f1: tuple
    mean_f1: float
    definitions: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"method": self.method, "threshold": self.threshold, **self.spec, "n_images": self.n_images,
                "n_gt": self.n_gt, "n_pred": self.n_pred, "siou_gt": self.siou_gt, "siou_pred": self.siou_pred,
                "ppv": self.ppv, "mean_f1": self.mean_f1, "iou_thresholds": [float(t) for t in self.iou_thresholds],
                "tp": list(self.tp), "fn": list(self.fn), "fp": list(self.fp), "f1": list(self.f1)}


def result_from_row(row, method: str, threshold: float, spec: ComponentSpec) -> ComponentResult:
    """Finalizes one method's accumulated counts (int64 (N_SLOTS,))."""
    row = [int(v) for v in np.asarray(row).tolist()]
    n_gt, n_pred = row[N_GT], row[N_PRED]
    tp = tuple(row[TP:TP + N_TAU])
    fp = tuple(row[FP:FP + N_TAU])
    fn = tuple(n_gt - t for t in tp)
    f1 = tuple((2 * a) / (2 * a + b + c) if 2 * a + b + c else math.nan for a, b, c in zip(tp, fn, fp))
    s = 0.0
    for v in f1:  # the benchmark's order of summation
        s += v
    taus = tuple(float(t) for t in IOU_THRESHOLDS) if spec.mode == "benchmark" else \
        tuple(int(k) / 20 for k in IOU_TWENTIETHS)
    return ComponentResult(
        method=method, threshold=float(threshold), spec=spec.describe(), n_images=row[IMAGES], n_gt=n_gt,
        n_pred=n_pred, siou_gt=_exact_mean(row[SIOU_GT:SIOU_GT + 3], n_gt),
        siou_pred=_exact_mean(row[SIOU_PRED:SIOU_PRED + 3], n_pred), ppv=_exact_mean(row[PPV:PPV + 3], n_pred),
        iou_thresholds=taus, tp=tp, fn=fn, fp=fp, f1=f1, mean_f1=s / N_TAU,
        definitions={"binarize": "score > threshold" if spec.mode == "benchmark" else "score >= threshold",
                     "connectivity": "8 (3x3 structure)", "source": "SegmentMeIfYouCan road-anomaly-benchmark"})


class ComponentAccumulator:
    """Integer counts of the component metrics of several methods (int64 (M, N_SLOTS),
    on the CPU): they sum across images, batches and processes (merge_ / all_reduce_)."""

    def __init__(self, names, spec: ComponentSpec, thresholds: Mapping, label_map: LabelMap | None = None):
        self.names = tuple(names)
        self.spec = spec
        missing = [n for n in self.names if n not in thresholds]
        if missing:
            raise ValueError(f"component thresholds missing for {missing}")
        self.thresholds = {n: _threshold_value(n, thresholds[n]) for n in self.names}
        self.label_map = as_label_map(label_map)
        self.counts = torch.zeros((len(self.names), N_SLOTS), dtype=torch.int64)
        self._ws = _Workspace()
        self._dws = _DeviceWorkspace()

    def classes(self, labels: torch.Tensor) -> torch.Tensor:
        """int8 (B, H, W) label classes, one byte per pixel: for CPU labels a table lookup
        in NumPy, for CUDA labels the label map's lookup on the device; label values
        outside the map raise."""
        if labels.is_cuda:
            cls = self.label_map.classify(labels).contiguous()
            bad = cls > VOID
            if bool(bad.any()):
                x = int(labels[bad].flatten()[0])
                raise ValueError(f"label value {x} is neither normal, anomaly nor void in the label map "
                                 f"{self.label_map}")
            return cls
        table, lo = self.label_map.lut()
        y = labels.cpu().numpy()
        if y.dtype == np.bool_:
            y = y.view(np.uint8)
        t = table.numpy()
        if y.dtype in (np.uint8, np.uint16) and lo == 0:  # every value indexes a padded table
            full = np.full(1 << (8 * y.itemsize), INVALID, np.int8)
            full[:min(t.size, full.size)] = t[:full.size]
            cls = np.take(full, y)
        else:
            v = y.astype(np.int64) - lo
            cls = np.take(t, v, mode="clip")
            cls[(v < 0) | (v >= t.size)] = INVALID
        if cls.max(initial=0) > VOID:
            x = int(y[cls > VOID].flat[0])
            raise ValueError(f"label value {x} is neither normal, anomaly nor void in the label map {self.label_map}")
        return torch.from_numpy(np.ascontiguousarray(cls))

    def update_scores(self, j: int, scores: torch.Tensor, classes: torch.Tensor) -> None:
        """Adds method j's score maps (B, H, W), any float dtype and device; classes from
        classes(). The comparison with the threshold is done in float64."""
        if scores.dim() != 3 or tuple(scores.shape) != tuple(classes.shape):
            raise ValueError(f"scores {tuple(scores.shape)} and classes {tuple(classes.shape)} must be (B, H, W)")
        t = self.thresholds[self.names[j]]
        s = scores.to(torch.float64)
        pred = ((s > t) if self.spec.mode == "benchmark" else (s >= t)).to(torch.uint8).contiguous()
        acc = np.zeros(N_SLOTS, np.int64)
        if pred.is_cuda and _core._C_cuda is not None:  # labeled and counted on the device (components_cuda.cu)
            rows = device_counts(pred, classes.to(pred.device).contiguous(), self.spec.thresh_segsize,
                                 self.spec.thresh_instsize, self.spec.mode, self._dws)
        else:  # the CPU core (also for CUDA score maps of a build without the CUDA core: the same counts)
            pn, cn = pred.cpu().numpy(), classes.cpu().numpy()
            rows = (image_counts(pn[b], cn[b], self.spec.thresh_segsize, self.spec.thresh_instsize, self.spec.mode,
                                 self._ws) for b in range(pn.shape[0]))
        for gt, pr in rows:
            acc += image_row(gt, pr, self.spec.mode)
        self.counts[j] += torch.from_numpy(acc)

    def update_maps(self, maps: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch of the fused core's maps (M, B, H, W): the scores themselves (every
        method's coordinate is its score; msp's is 1 - max softmax)."""
        cls = self.classes(labels)
        for j in range(len(self.names)):
            self.update_scores(j, maps[j].to(torch.float64), cls)

    def merge_(self, other: "ComponentAccumulator") -> "ComponentAccumulator":
        if other.names != self.names or other.spec != self.spec or other.thresholds != self.thresholds:
            raise ValueError("component accumulators differ in methods, settings or thresholds")
        self.counts += other.counts
        return self

    def all_reduce_(self, group=None, device=None) -> None:
        """Sums the counts over the processes of `group` (on `device` for the transfer,
        e.g. the CUDA device under NCCL)."""
        t = self.counts.to(device) if device is not None else self.counts
        torch.distributed.all_reduce(t, group=group)
        self.counts = t.cpu()

    def reset(self) -> None:
        self.counts.zero_()

    def state(self) -> dict:
        """The counts with the methods, settings and thresholds they were counted at."""
        return {"methods": list(self.names), "spec": self.spec.describe(), "thresholds": dict(self.thresholds),
                "counts": self.counts.clone()}

    def load_state(self, st) -> None:
        """Restores state(); refuses counts made with other methods, settings or thresholds,
        counts above 2^62 (later sums could overflow int64) and counts that no sum of images
        gives (_check_counts)."""
        if not isinstance(st, dict):
            raise ValueError("the state has no component counts (saved without components=...), but this evaluator "
                             "counts components")
        mine = {"methods": list(self.names), "spec": self.spec.describe(), "thresholds": dict(self.thresholds)}
        theirs = {k: st.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"component counts in the state were made with {theirs}, this evaluator uses {mine}")
        c = st.get("counts")
        if not isinstance(c, torch.Tensor) or c.dtype != torch.int64 or tuple(c.shape) != tuple(self.counts.shape) \
                or bool((c < 0).any()):
            raise ValueError(f"component counts must be a non-negative int64 tensor of shape "
                             f"{tuple(self.counts.shape)}")
        c = c.detach().cpu().clone()
        _check_counts(c.numpy(), self.names)
        self.counts = c

    def results(self) -> dict:
        if bool((self.counts < 0).any()):  # two loaded states near the 2^62 cap, merged
            raise ValueError("component counts overflowed int64 (negative after summing states); the states summed "
                             "hold more than 2^62 counts together")
        return {n: result_from_row(self.counts[j].numpy(), n, self.thresholds[n], self.spec)
                for j, n in enumerate(self.names)}


_MAX_COUNT = 2 ** 62  # as the histograms' counts: later sums of images, batches and processes stay inside int64


def _check_counts(c: np.ndarray, names) -> None:
    """Loaded counts (M, N_SLOTS), non-negative: none above 2^62 (a later sum could wrap to
    negative counts) and what holds for every sum of image rows: TP(tau) <= n_gt and
    FP(tau) <= n_pred, TP non-increasing and FP non-decreasing in tau, each quotient sum
    (in [0, 1] per component) at most its count."""
    for j, n in enumerate(names):
        r = [int(v) for v in c[j].tolist()]
        what = f"component counts of {n!r}"
        if max(r) > _MAX_COUNT:
            raise ValueError(f"{what}: a count exceeds 2^62 (slot {int(np.argmax(c[j]))}: {max(r)}); later sums could "
                             "overflow int64; the state is corrupt")
        n_gt, n_pred = r[N_GT], r[N_PRED]
        tp, fp = r[TP:TP + N_TAU], r[FP:FP + N_TAU]
        if max(tp) > n_gt or max(fp) > n_pred:
            raise ValueError(f"{what}: TP per IoU threshold {tp} must be at most n_gt = {n_gt} and FP {fp} at most "
                             f"n_pred = {n_pred}; the state is corrupt")
        if any(a < b for a, b in zip(tp, tp[1:])) or any(a > b for a, b in zip(fp, fp[1:])):
            raise ValueError(f"{what}: TP {tp} must not increase and FP {fp} not decrease with the IoU threshold; "
                             "the state is corrupt")
        for slot, label, k in ((SIOU_GT, "sIoU_gt", n_gt), (SIOU_PRED, "sIoU_pred", n_pred), (PPV, "PPV", n_pred)):
            total = (r[slot] << (2 * _LIMB)) + (r[slot + 1] << _LIMB) + r[slot + 2]
            if total > k << (3 * _LIMB):
                raise ValueError(f"{what}: the {label} sum exceeds its {k} components (each quotient is at most 1); "
                                 "the state is corrupt")


def component_metrics(scores, labels, threshold: float, *, label_map=None, ignore_index: int = 255,
                      track: str = "anomaly", thresh_segsize: int | None = None, thresh_instsize: int | None = None,
                      mode: str = "benchmark", name: str = "custom") -> ComponentResult:
    """Component metrics of per-pixel scores computed elsewhere: scores (B, H, W) or
    (H, W) floats (higher = more anomalous), labels of the same shape, one threshold."""
    # arrays torch cannot wrap (negative strides, non-native byte order) are copied, as evaluate does
    s = scores if isinstance(scores, torch.Tensor) else from_numpy(np.asarray(scores))
    y = labels if isinstance(labels, torch.Tensor) else from_numpy(np.asarray(labels))
    if not (s.dtype.is_floating_point or s.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"scores must be numbers, got {s.dtype}")
    if y.dtype.is_floating_point or y.dtype.is_complex:
        raise TypeError(f"labels must be integers, got {y.dtype}")
    check_label_dtype(y)
    if s.dim() == 2:
        s, y = s[None], y[None] if y.dim() == 2 else y
    if s.dim() != 3 or tuple(s.shape) != tuple(y.shape):
        raise ValueError(f"scores {tuple(s.shape)} and labels {tuple(y.shape)} must both be (B, H, W) or (H, W)")
    spec = ComponentSpec(track=track, thresh_segsize=thresh_segsize, thresh_instsize=thresh_instsize, mode=mode)
    acc = ComponentAccumulator([name], spec, {name: threshold}, as_label_map(label_map, ignore_index))
    acc.update_scores(0, s, acc.classes(y))
    return acc.results()[name]


def accumulator_for(spec: ComponentSpec, names, label_map, best_f1: Mapping | None = None,
                    where: str = "") -> ComponentAccumulator:
    """The accumulator of `names` with spec.thresholds, the rest from best_f1 ({method:
    MetricResult}, the pooled best pixel-F1 thresholds). Without best_f1 every method needs a
    threshold in spec.thresholds; `where` names the caller in that error."""
    given = dict(spec.thresholds or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"component thresholds given for {unknown}, which are not among the methods {list(names)}")
    missing = [n for n in names if n not in given]
    if missing and best_f1 is None:
        raise ValueError(f"{where} needs a score threshold per method for the component metrics, missing for "
                         f"{missing}: the best pixel-F1 threshold is known only after all the data. Run two phases: a "
                         "first pass without components (r = evaluator.compute() or r = anomfast.evaluate(...)), "
                         "then components={'thresholds': r} over the same data again")
    for n in missing:
        t = best_f1[n].threshold
        if math.isnan(t):
            raise ValueError(f"method {n!r} has no pooled best-F1 threshold (NaN, e.g. per_image=True); give one in "
                             "components={'thresholds': {...}}")
        given[n] = t
    return ComponentAccumulator(names, spec, given, label_map)
