"""Validation and dispatch of the fused pass. The compiled core trusts what it gets
from here: shapes, dtypes, devices and pointers are checked once, with clear errors.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _core
from .labels import LabelMap
from .histogram import HistState, check_buffer
from .inputs import check_dense, from_numpy
from .methods import CODES, EXACT_COORDINATES, EXTERNAL, MethodSpec

# dtype codes from the core (views.h: DType); uint16 / uint32 (16-bit label PNGs) where torch has them
_CODES = {getattr(torch, name): code for name, code in _core._C.DTYPES.items() if hasattr(torch, name)}
_LOGIT_DTYPES = {t: c for t, c in _CODES.items() if t in (torch.float32, torch.float16, torch.bfloat16)}
_LABEL_DTYPES = {t: c for t, c in _CODES.items() if t not in _LOGIT_DTYPES}

_MAX_CLASSES = int(_core._C.MAX_CLASSES)  # views.h: the class counts the cores accept


def _misaligned(t: torch.Tensor) -> bool:
    """The buffer does not start on a multiple of its element size. Not asked while
    torch.compile traces (fake tensors have no address; the op then sees real ones)."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return False
    return t.data_ptr() % t.element_size() != 0


def check_num_threads(n) -> int:
    """CPU threads of the core (0: OpenMP's default), an int32 there."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_threads must be an int (0: OpenMP's default), got {type(n).__name__}")
    if not 0 <= n < 2 ** 31:
        raise ValueError(f"num_threads must be in [0, 2^31) (0: OpenMP's default), got {n}")
    return int(n)


def as_logits(x, name: str = "logits") -> torch.Tensor:
    """(B, C, H, W) float tensor. A (C, H, W) array is one image; NumPy arrays are wrapped."""
    if isinstance(x, np.ndarray):
        x = from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape (B, C, H, W), got {type(x).__name__}")
    check_dense(x, name)
    if x.is_complex():
        raise TypeError(f"{name} must be real (float32, float16 or bfloat16), got {x.dtype}")
    # a conjugate or negative *view* (x.conj().imag, torch._neg_view) shares memory whose
    # bits are not the values: the core reads raw pointers, so materialize such views
    x = x.resolve_conj().resolve_neg()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W) (or (C, H, W) for one image), got {tuple(x.shape)}")
    if x.shape[1] > _MAX_CLASSES:  # before anything is allocated per class (a stride-0 view costs nothing)
        raise ValueError(f"{name} has C = {x.shape[1]} classes, above the supported {_MAX_CLASSES} (the core "
                         "keeps C x 64 floats of scratch per thread)")
    if x.dtype == torch.float64:
        big = torch.isfinite(x) & (x.abs() > torch.finfo(torch.float32).max)
        if bool(big.any()):  # they would become +-inf and be reported as non-finite logits
            raise ValueError(f"{name} have {int(big.sum())} finite float64 value(s) beyond float32's range (|l| > "
                             f"3.4e38, e.g. {float(x[big].flatten()[0]):.6g}); the core computes in float32: "
                             "rescale the logits or clamp them")
        x = x.to(torch.float32)  # the core computes in float32; documented in the README
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 is converted to float32), got {x.dtype}")
    if _misaligned(x):
        x = x.clone()  # a misaligned view (e.g. of a NumPy buffer at an odd offset): the core loads whole elements
    if x.shape[1] < 1:
        raise ValueError(f"{name} has C = 0 classes; at least one is needed")
    if x.is_cuda is False and x.device.type != "cpu":
        raise ValueError(f"{name} is on device {x.device}; anomfast runs on CPU and CUDA tensors")
    return x


def check_label_dtype(y: torch.Tensor, name: str = "labels") -> None:
    """The label dtypes the core reads (uint64 is refused: it would wrap to negative values
    in an int64 lookup); evaluate, evaluate_scores and component_metrics alike."""
    if y.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (uint8, uint16, uint32, int8, int16, int32, int64 or bool), "
                        f"got {y.dtype}")


def as_labels(y, logits: torch.Tensor, name: str = "labels") -> torch.Tensor:
    if isinstance(y, np.ndarray):
        y = from_numpy(y)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape (B, H, W), got {type(y).__name__}")
    check_dense(y, name)
    if not y.is_complex():
        y = y.resolve_neg()  # a negative view's memory holds -y (see as_logits)
    if y.dim() == 2:
        y = y.unsqueeze(0)
    B, _, H, W = logits.shape
    if y.dim() == 4 and y.shape[1] == 1:
        y = y[:, 0]
    if tuple(y.shape) != (B, H, W):
        raise ValueError(f"{name} shape {tuple(y.shape)} does not match logits {tuple(logits.shape)}: "
                         f"expected (B, H, W) = {(B, H, W)}")
    check_label_dtype(y, name)
    if _misaligned(y):
        y = y.clone()  # a misaligned view (e.g. of a NumPy buffer at an odd offset): the core loads whole elements
    if y.device != logits.device:
        raise ValueError(f"{name} are on {y.device} but logits on {logits.device}; put both on the same device")
    return y


def _geometry(logits: torch.Tensor, labels: torch.Tensor | None, fold: bool = True):
    """Shape and element strides for the core, folding dimensions where memory allows
    so that tiles run along long rows: (N, C, 1, 1) becomes one row of N pixels, and a
    plane whose rows follow each other in memory becomes one row of H * W pixels.
    fold=False (HEAT: 3x3 neighbourhoods need the true rows) keeps (B, H, W)."""
    B, C, H, W = logits.shape
    lb, lc, lh, lw = logits.stride()
    yb, yh, yw = labels.stride() if labels is not None else (0, 0, 0)
    if not fold:
        return dict(B=B, C=C, H=H, W=W, ls=(lb, lc, lh, lw), ys=(yb, yh, yw))
    if H == 1 and W == 1 and B > 1:
        return dict(B=1, C=C, H=1, W=B, ls=(0, lc, 0, lb), ys=(0, 0, yb))
    if H > 1 and lh == W * lw and (labels is None or yh == W * yw):
        return dict(B=B, C=C, H=1, W=H * W, ls=(lb, lc, 0, lw), ys=(yb, 0, yw))
    return dict(B=B, C=C, H=H, W=W, ls=(lb, lc, lh, lw), ys=(yb, yh, yw))


_DEVICE_TABLES: dict = {}


def _device_table(t: torch.Tensor, device) -> torch.Tensor:
    """A small constant table (label LUT, SML arrays) on `device`, copied there once per
    content and device, so that fused_pass / fit_pass make no host-to-device copy per call
    (a synchronous one from pageable memory, and one a CUDA graph capture cannot record)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    key = (str(device), t.dtype, tuple(t.shape), t.cpu().numpy().tobytes())
    hit = _DEVICE_TABLES.get(key)
    if hit is None:
        if len(_DEVICE_TABLES) >= 64:
            _DEVICE_TABLES.clear()
        hit = _DEVICE_TABLES[key] = t.to(device)
    return hit


def new_histogram(n_methods: int, device) -> HistState:
    return HistState.new(n_methods, device)


def new_counters(device) -> torch.Tensor:
    return torch.zeros(_core.N_COUNTERS, dtype=torch.int64, device=device)


def _supports(core, code: int) -> bool:
    return code in tuple(core.METHOD_CODES)


def check_device_support(spec: MethodSpec, device) -> None:
    """HEAT and post-processed SML run on the CPU core only (for now): a clear error
    instead of a wrong or missing score on CUDA."""
    if device.type != "cuda":
        return
    core = _core.cuda_core()
    if "heat" in spec.names and not _supports(core, CODES["heat"]):
        raise NotImplementedError("HEAT on CUDA is not implemented yet; move the logits and features to the CPU")
    if spec.external and not _supports(core, EXTERNAL):
        raise NotImplementedError("SML with boundary suppression / smoothing (sml_full) on CUDA is not implemented "
                                  "yet; move the logits to the CPU or use plain SML")


def heat_input(logits: torch.Tensor, spec: MethodSpec, features):
    """HEAT's Mahalanobis map M (B, H, W) float32, or None when heat is not requested."""
    if "heat" not in spec.names:
        return None
    from . import heat as _heat
    if spec.heat.num_classes != logits.shape[1]:
        raise ValueError(f"HEAT statistics were fitted for {spec.heat.num_classes} classes but the logits have "
                         f"C = {logits.shape[1]}")
    f = _heat.as_features(features, logits, spec.heat)
    return _heat.distance_map(f, spec.heat, logits.shape[2:])


def external_input(logits: torch.Tensor, spec: MethodSpec):
    """(n_ext, B, H, W) float32 coordinate maps of the methods computed outside the core
    (SML with post-processing), or None."""
    if not spec.external:
        return None
    from .sml import postprocess
    mean, inv = spec.sml.kernel_arrays(logits.device)
    m, k = logits.max(dim=1)  # first maximum, as the core; a NaN logit makes the pixel's SML NaN
    m = m.to(torch.float32)
    sml = -(m - mean[k]) * inv[k]  # the core's float32 formula (score_math.h), bit for bit
    out = postprocess(sml, k, spec.sml_boundary_suppression, spec.sml_smoothing, spec.sml_boundary_padding)
    return out.unsqueeze(0).contiguous()


def fused_pass(logits: torch.Tensor, labels: torch.Tensor | None, spec: MethodSpec, *,
               label_map: LabelMap | None = None, hist: HistState | None = None,
               counters: torch.Tensor | None = None, want_maps: bool = False,
               num_threads: int = 0, features=None, flush_every: int = 0):
    """One read of the logits: adds to `hist` (a HistState of M methods) and `counters`, optionally
    returns the (M, B, H, W) float32 coordinate maps. Inputs must come from as_logits /
    as_labels; `features` (B, D, h, w) are needed for HEAT. Raises nothing about the data
    itself: callers inspect `counters`."""
    dev = logits.device
    M = len(spec.names)
    with_hist = labels is not None
    if with_hist:
        if hist is None:
            hist = new_histogram(M, dev)
    if counters is None:
        counters = new_counters(dev)
    B, C, H, W = logits.shape
    maps = torch.empty((M, B, H, W), dtype=torch.float32, device=dev) if want_maps else None
    if B * H * W == 0:
        return hist, counters, maps
    if spec.sml is not None and "sml" in spec.names and spec.sml.num_classes != C:
        raise ValueError(f"SML statistics were fitted for {spec.sml.num_classes} classes but the logits have C = {C}")
    check_device_support(spec, dev)
    heat_m = heat_input(logits, spec, features)
    ext = external_input(logits, spec)
    lut = off = None
    if with_hist:
        lut, off = (label_map or LabelMap.default()).lut()
        lut = _device_table(lut, dev)
    sml_mean = sml_inv = None
    if "sml" in spec.names:
        sml_mean, sml_inv = (_device_table(t, dev) for t in spec.sml.kernel_arrays("cpu"))
    heat_params = list(spec.heat.kernel_constants()) if heat_m is not None else [1.0, 0.0, 1.0]
    launch(logits, labels, hist, counters, maps, spec.codes, spec.temperature, spec.gen_gamma,
           spec.entropy_normalize, sml_mean, sml_inv, lut, off or 0, num_threads,
           heat_m=heat_m, heat_params=heat_params, ext=ext, flush_every=flush_every)
    return hist, counters, maps


def exact_sig_mask(codes) -> int:
    """FusedArgs.sig_mask for these core method codes: bit j for each method whose float32
    coordinate is the exact score (EXACT_COORDINATES)."""
    exact = {CODES[n] for n in EXACT_COORDINATES}
    return sum(1 << j for j, c in enumerate(codes) if c in exact)


def _input_args(core_args, logits, labels, lut, lut_offset, counters, num_threads, fold=True):
    """A new core argument struct (core_args: FusedArgs or FitArgs of the CPU or CUDA
    core) with the fields both passes share (views.h: InputArgs) filled from validated
    tensors: logits, labels with their lookup table, counters, threads, stream."""
    g = _geometry(logits, labels, fold=fold)
    a = core_args()
    a.logits_ptr = logits.data_ptr()
    a.logit_dtype = _LOGIT_DTYPES[logits.dtype]
    a.B, a.C, a.H, a.W = g["B"], g["C"], g["H"], g["W"]
    a.ls_b, a.ls_c, a.ls_h, a.ls_w = g["ls"]
    if labels is not None:
        a.labels_ptr = labels.data_ptr()
        a.label_dtype = _LABEL_DTYPES[labels.dtype]
        a.ys_b, a.ys_h, a.ys_w = g["ys"]
        a.lut_ptr, a.lut_offset, a.lut_len = lut.data_ptr(), int(lut_offset), lut.numel()
    a.counters_ptr = counters.data_ptr()
    a.num_threads = check_num_threads(num_threads)
    if logits.device.type == "cuda":
        a.stream = torch.cuda.current_stream(logits.device).cuda_stream
    return a


def fused_args(logits, labels, hist, counters, maps, codes, temperature, gen_gamma, entropy_normalize,
               sml_mean, sml_inv, lut, lut_offset, num_threads=0, *, heat_m=None, heat_params=(1.0, 0.0, 1.0),
               ext=None, flush_every=0, sig_mask=None, core=None):
    """The core (CPU, or CUDA for CUDA tensors; `core`: another build of the compiled
    module, which bench/gpu_check.py times) and its FusedArgs filled from already
    validated tensors, for launch().
    heat_m: (B, H, W) float32 contiguous M map; heat_params: (temperature, mean, 1 / std);
    ext: (n_ext, B, H, W) float32 contiguous external coordinates. flush_every (CPU, for
    tests): pixels a thread counts privately before adding them to `hist` (0: the core's
    2^31). sig_mask: bit j fills method j's tie signatures (default: the methods whose
    coordinate is the exact score, EXACT_COORDINATES, the only ones Python reads them
    for; tests set others)."""
    dev = logits.device
    if core is None:
        core = _core.cuda_core() if dev.type == "cuda" else _core._C
    check_buffer(counters, "counters", (_core.N_COUNTERS,), torch.int64, dev)
    for t, what in ((logits, "logits"), (labels, "labels")):
        if t is not None and _misaligned(t):  # as_logits / as_labels copy these, except inside a compiled graph
            raise ValueError(f"{what} start at a misaligned address ({t.data_ptr()} is not a multiple of "
                             f"{t.element_size()}); pass a contiguous copy (.clone())")
    a = _input_args(core.FusedArgs, logits, labels, lut, lut_offset, counters, num_threads,
                    fold=CODES["heat"] not in codes)
    if labels is not None:
        hist.check(len(codes), dev)  # every buffer the core writes, on every path (loaded states too)
        a.hist_ptr, a.sig_ptr, a.occ_ptr = hist.hist.data_ptr(), hist.sig.data_ptr(), hist.occ.data_ptr()
        a.sig_mask = exact_sig_mask(codes) if sig_mask is None else int(sig_mask)
    a.methods = list(codes)
    a.temperature = float(temperature)
    a.gen_gamma = float(gen_gamma)
    a.entropy_normalize = int(bool(entropy_normalize))
    if sml_mean is not None:
        a.sml_mean_ptr, a.sml_inv_std_ptr = sml_mean.data_ptr(), sml_inv.data_ptr()
    if heat_m is not None:
        a.heat_m_ptr = heat_m.data_ptr()
        a.heat_temperature, a.heat_mean, a.heat_inv_std = (float(v) for v in heat_params)
    if ext is not None:
        a.ext_ptr = ext.data_ptr()
    if maps is not None:
        a.maps_ptr = maps.data_ptr()
    if flush_every:
        a.flush_every = int(flush_every)
    return core, a


def launch(logits, labels, *args, **kwargs) -> None:
    """Runs the fused pass on already validated tensors (fused_args' arguments), on the
    CUDA core and the caller's current stream for CUDA tensors."""
    B, _, H, W = logits.shape
    if B * H * W == 0:
        return
    core, a = fused_args(logits, labels, *args, **kwargs)
    if core.fused(a):  # the CPU core's FusedStatus (views.h); the CUDA core raises instead
        raise MemoryError("anomfast: could not allocate the per-thread histogram scratch memory")


def fit_pass(logits: torch.Tensor, labels: torch.Tensor | None, label_map: LabelMap | None,
             count: torch.Tensor, total: torch.Tensor, totsq: torch.Tensor, counters: torch.Tensor,
             num_threads: int = 0) -> None:
    B, C, H, W = logits.shape
    if B * H * W == 0:
        return
    core = _core.cuda_core() if logits.device.type == "cuda" else _core._C
    lut, off = (label_map or LabelMap.default()).lut() if labels is not None else (None, 0)
    if lut is not None:
        lut = _device_table(lut, logits.device)
    a = _input_args(core.FitArgs, logits, labels, lut, off, counters, num_threads)
    a.count_ptr, a.sum_ptr, a.sumsq_ptr = count.data_ptr(), total.data_ptr(), totsq.data_ptr()
    core.fit_sml(a)


def check_counters(counters: torch.Tensor, labels: torch.Tensor | None, label_map: LabelMap | None,
                   nonfinite: str = "error") -> dict:
    """Turns the core's counters into errors (bad labels, NaN/inf logits) or a summary."""
    c = [int(v) for v in counters.tolist()]
    lm = label_map or LabelMap.default()
    if min(c) < 0:
        raise ValueError(f"the pixel counters {c} hold a negative count: the state is corrupt")
    if c[_core.CNT_INVALID] > 0:
        first = lm.first_invalid_value(labels) if labels is not None else None
        d = lm.describe()
        raise ValueError(
            f"{c[_core.CNT_INVALID]} label value(s) are not in the label map"
            + (f" (first: {first})" if first is not None else "")
            + f"; expected anomaly ids {d['anomaly_ids']}, void ids {d['void_ids']}, normal ids {d['normal_ids']} "
            "(pass ignore_index=... or label_map=LabelMap(...); normal_ids='rest' counts every other value "
            "from 0 to the largest listed id as normal)")
    if c[_core.CNT_NONFINITE] > 0 and nonfinite == "error":
        raise ValueError(f"{c[_core.CNT_NONFINITE]} valid pixel(s) have NaN or infinite logits (or a non-finite "
                         "score of some method: HEAT / post-processed SML from NaN features or a NaN logit nearby, "
                         "SML or energy past the float32 range); "
                         "pass nonfinite='ignore' to skip them (they are counted, not scored)")
    return {"nonfinite": c[_core.CNT_NONFINITE], "invalid": c[_core.CNT_INVALID],
            "void": c[_core.CNT_VOID], "binned": c[_core.CNT_BINNED]}
