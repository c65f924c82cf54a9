"""Full-grid evaluation: every (model x method) pair over the grid's images, one fused
pass per image, a prefetching reader, a progress line, flat memory."""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from .. import _core, _fused, protocols
from ..accumulate import Accumulator, finalize
from ..components import accumulator_for
from ..fitting import fit_heat, fit_sml
from ..functional import refine_histograms
from .grid import Grid, GridError, _first_line, check_semantic_shape, load_array
from .report import warned_already
from ..heat import HeatStats, as_features
from ..inputs import from_numpy
from ..labels import ANOMALY, INVALID, NORMAL
from ..methods import resolve
from ..metrics import mean_iou
from ..sml import SMLStats


class Progress:
    """One status line per model on stderr: images, images/s, pixels/s, time left. Under
    torch.distributed every rank adds its images to one counter in the process group's
    key-value store (`shared`: (store, key); an atomic add, no collective, so ranks with
    one image more or less never wait on each other) and rank 0 shows the sum over all
    ranks against the whole data set."""

    def __init__(self, label: str, total: int, enabled: bool = True, shared=None):
        self.label, self.total, self.enabled, self.shared = label, total, enabled, shared
        self.t0 = time.perf_counter()
        self.n = self.px = 0
        self.done = 0
        self.closed = False

    def update(self, pixels: int):
        self.n += 1
        self.px += pixels
        self.done = self.shared[0].add(self.shared[1], 1) if self.shared else self.n
        if self.enabled and (self.done >= self.total or self.n % 8 == 0):
            self._line()

    def _line(self):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        done = min(self.done, self.total)
        px = self.px * done / max(self.n, 1)  # all ranks' pixels, from this rank's mean image
        bar = "#" * int(24 * done / max(self.total, 1))
        left = (self.total - done) * dt / max(done, 1)
        eta = f"ETA {int(left) // 60:d}:{int(left) % 60:02d}" if done < self.total else f"{dt:6.1f} s"
        sys.stderr.write(f"\r{self.label[:28]:28s} [{bar:24s}] {done}/{self.total} "
                         f"{done / dt:7.1f} img/s {px / dt / 1e6:7.2f} Mpx/s {eta:9s}")
        if done >= self.total:
            sys.stderr.write("\n")
            self.closed = True
        sys.stderr.flush()

    def close(self):
        """Ends the line (rank 0 can finish its share before the other ranks do)."""
        if self.enabled and not self.closed:
            self._line()
            if not self.closed:
                sys.stderr.write("\n")
                sys.stderr.flush()
            self.closed = True


def _shared_counter(key: str):
    """(store, key) of the default process group's store, or None outside torch.distributed
    (or where this torch has no store to share)."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.add(key, 0)
        return store, key
    except Exception:
        return None


def _timed(items, timings: dict, key: str):
    """Yields from `items`, adding the time spent waiting for each item to timings[key]."""
    it = iter(items)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        timings[key] += time.perf_counter() - t
        yield item


def _prefetch(fn, items, depth: int = 4):
    """Yields fn(item) in order, reading up to `depth` items ahead on a thread."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = [ex.submit(fn, it) for it in items[:depth]]
        for i in range(len(items)):
            res = futs[i].result()
            if i + depth < len(items):
                futs.append(ex.submit(fn, items[i + depth]))
            futs[i] = None
            yield res


def _as_chw(a, path, kind: str = "logits") -> torch.Tensor:
    t = from_numpy(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise GridError(f"{path}: {kind} must be ({'C, H, W' if kind != 'features' else 'D, h, w'}), "
                        f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise GridError(f"{path}: {kind} must be floating point (float32, float16, bfloat16 or float64), "
                        f"got {t.dtype}")
    return t


def _as_labels(a, path, kind: str = "label map") -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else from_numpy(np.array(a))  # a .pt tensor as it is (bfloat16 has no NumPy)
    if t.dtype not in _fused._LABEL_DTYPES:  # the dtypes the core reads (uint64 is not one)
        names = ", ".join(str(d).replace("torch.", "") for d in sorted(
            _fused._LABEL_DTYPES, key=lambda d: (d == torch.bool, d.is_signed, d.itemsize)))
        other_int = not (t.is_floating_point() or t.is_complex())
        raise GridError(f"{path}: {kind} must hold integer label values ({names}), got "
                        f"{str(t.dtype).replace('torch.', '')}" + ("; save it as e.g. int32" if other_int else ""))
    return t


def _label_summary(values: dict, lm) -> str:
    d = lm.describe()
    seen = ", ".join(f"{v}: {n} px" for v, n in sorted(values.items())[:8]) + (", ..." if len(values) > 8 else "")
    return (f"label mapping anomaly_ids {d['anomaly_ids']}, void_ids {d['void_ids']}, normal_ids {d['normal_ids']}; "
            f"label values seen: {seen or 'none'}")


def _value_counts(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(distinct raw label values, ascending: int64, bool for a bool map; their pixel counts)
    of a label map: a bincount for 8-bit maps (1 ms for 512 x 1024; torch.unique sorts, 8
    ms), else a sort."""
    if y.dtype in (torch.uint8, torch.bool):
        n = torch.bincount(y.reshape(-1).to(torch.uint8), minlength=256).numpy()
        v = np.flatnonzero(n)
        return v.astype(bool if y.dtype == torch.bool else np.int64), n[v].astype(np.int64)
    v, n = torch.unique(y, return_counts=True)
    return v.to(torch.int64).numpy(), n.to(torch.int64).numpy()


def _check_classes(model, hists, values: dict, lm, allow: bool, notes: list, skipped: int = 0) -> bool:
    """A model whose images hold no anomaly (or no normal) pixel under the label mapping
    has undefined metrics: almost always a label mapping that does not fit the masks
    (0 / 255 masks with 255 = void). An error unless allow (then a warning and a note;
    returns True)."""
    h = next(iter(hists.values()), None)
    if h is None:
        return False
    pos, neg = h.n_anomaly, h.n_normal
    if pos and neg:
        return False
    what = "anomaly" if not pos else "normal"
    # what the library's finalization then reports (its RuntimeWarning, silenced where this
    # warning is given: warned_already)
    undefined = "AUROC, AUPR and FPR95 are n/a, F1 is 0" if not pos else "AUROC and FPR95 are n/a"
    if skipped and (not values or any(values.get(v) for v in values if lm.classify(torch.tensor([v])).item()
                       == (ANOMALY if what == "anomaly" else NORMAL))):
        # the label maps hold such pixels: --nonfinite ignore skipped them, not the label mapping
        msg = (f"model {model.name!r}: no {what} pixel left to score: {skipped} valid pixel(s) were skipped as "
               f"non-finite (NaN / inf logits or scores, --nonfinite ignore), including every {what} pixel of the "
               f"label maps; {undefined}" + ("" if allow else "; --allow-empty-class makes this a warning"))
        if not allow:
            raise GridError(msg)
        notes.append(msg)
        print(f"anomfast: warning: {msg}", file=sys.stderr)
        return True
    msg = (f"model {model.name!r}: no {what} pixel in its images under the {_label_summary(values, lm)}; "
           f"{undefined}. Map your label values with --anomaly-ids / --void-ids / --normal-ids ([labels] "
           "anomaly_ids / void_ids / normal_ids in a grid), e.g. --anomaly-ids 255 --void-ids for 0/255 masks"
           + ("" if allow else ", or pass --allow-empty-class"))
    if not allow:
        raise GridError(msg)
    notes.append(msg)
    print(f"anomfast: warning: {msg}", file=sys.stderr)
    return True


def _check_semantic_values(sem: torch.Tensor, C: int, path, ignore: int = 255) -> None:
    """Semantic label values are class ids in [0, C) or the ignore value (255), as anomfast
    fit requires: anything else would silently drop out of the mIoU."""
    s = sem.to(torch.int64)
    bad = (s != ignore) & ((s < 0) | (s >= C))
    if bool(bad.any()):
        v = int(s[bad][0])
        raise GridError(f"semantic label map {path}: value {v} is neither a class id in [0, {C}) (the logits' C) nor "
                        f"the ignore value {ignore}; the mIoU needs semantic (class id) labels")


def _check_feature_size(model, stem, fshape, xshape, first: dict) -> None:
    """Every feature map of a model has the same size relative to its logits (HEAT resizes
    the (h, w) distance map to (H, W) bilinearly: mixed image sizes are fine, a different
    stride is a misaligned map) and is not larger than them."""
    path = model.features[stem]
    (h, w), (H, W) = (int(fshape[-2]), int(fshape[-1])), (int(xshape[-2]), int(xshape[-1]))
    if h > H or w > W:
        raise GridError(f"model {model.name!r}: features {path} are {h} x {w}, larger than the logits' {H} x {W}; "
                        "features are the network's (D, h, w) map at the logits' resolution or below")
    if "feat" not in first:
        first["feat"] = (H / h, W / w, path, (h, w), (H, W))
        return
    rh, rw, p0, hw0, HW0 = first["feat"]
    if abs(h - H / rh) > 1 or abs(w - W / rw) > 1:
        raise GridError(f"model {model.name!r}: features {path} are {h} x {w} for logits {H} x {W}, but "
                        f"{p0.name} (the model's first image) has {hw0[0]} x {hw0[1]} features for {HW0[0]} x {HW0[1]} "
                        "logits: every image of a model needs its features at the same scale relative to its logits")


def _example_image(path):
    """An images_dir input image as uint8 RGB (grey, grey + alpha, palette, RGBA, 16-bit...),
    or a GridError naming the file."""
    from .plots import _rgb_image
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        a = load_array(path)
    else:
        try:  # one decode, converted where the mode is not grey / RGB already
            with Image.open(path) as im:
                if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                    im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
                a = np.asarray(im)
        except FileNotFoundError:
            raise GridError(f"{path} does not exist") from None
        except Exception as exc:
            raise GridError(f"image {path}: cannot read it ({type(exc).__name__}: {_first_line(exc)})") from None
    a = np.asarray(a)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 2, 3, 4))) or 0 in a.shape:
        raise GridError(f"image {path}: shape {a.shape}, expected (H, W) grey or (H, W, 3 / 4) RGB(A)")
    return _rgb_image(a)


def fit_model_sml(model, progress: bool = True) -> SMLStats:
    if model.sml_stats is not None:
        return SMLStats.load(model.sml_stats)
    if not model.fit_logits:
        raise GridError(f"model {model.name!r}: method 'sml' needs sml_stats = ... or fit_logits = ... in the grid")
    logits = _Reader(model.fit_logits, sorted(model.fit_logits), "logits")
    with naming_the_file(logits):
        return fit_sml(logits)


class _Reader:
    """Re-iterable lazy reader of aligned per-image files (one image per batch): fit_heat
    reads the fitting data twice without holding it in memory. Logits (features) files
    must all have the first file's class count C (dimension D); `current` is the file of
    the batch the consumer holds (naming_the_file)."""

    def __init__(self, files: dict, stems, kind: str):
        self.files, self.stems, self.kind = files, list(stems), kind
        self.first = None  # (C or D, path) of the first file read
        self.current = None

    def __iter__(self):
        for s in self.stems:
            path = self.files[s]
            self.current = path  # before reading: an error about this file names this file
            a = load_array(path)
            try:
                t = _as_labels(a, path, "semantic label map") if self.kind == "labels" else _as_chw(a, path, self.kind)
            except GridError:
                raise
            except (ValueError, TypeError) as exc:  # e.g. a structured dtype NumPy -> torch cannot convert
                raise GridError(f"{path}: cannot read it as {self.kind} ({_first_line(exc)})") from None
            if self.kind == "labels":
                if t.dim() != 2:
                    raise GridError(f"{path}: semantic label map must be (H, W), got {tuple(t.shape)}")
            else:
                n, what = int(t.shape[0]), ("C", "classes") if self.kind == "logits" else ("D", "dimensions")
                if self.first is None:
                    self.first = (n, path)
                elif n != self.first[0]:
                    raise GridError(f"{path}: {self.kind} have {what[0]} = {n} {what[1]} but {self.first[1].name} "
                                    f"(the first file) has {what[0]} = {self.first[0]}; every file must have the "
                                    f"same {what[1]}" + (_channel_last_fit_hint(t.shape) if self.kind == "logits"
                                                         else ""))
            yield t.unsqueeze(0)
        self.current = None


def _channel_last_fit_hint(shape) -> str:
    """'; they look channel-last ...' for fitting logits (no label map to compare with) whose
    last dimension is smaller than both others, e.g. (64, 128, 19)."""
    s = tuple(int(n) for n in shape)
    if len(s) == 3 and s[2] < s[0] and s[2] < s[1]:
        return (f"; they look channel-last (H, W, C) with C = {s[2]}: save them as (C, H, W), e.g. "
                "np.moveaxis(a, -1, 0)")
    return ""


def check_fit_logits_layout(logits_files: dict, label_files: dict | None = None) -> None:
    """anomfast fit: the first and last logits file are (C, H, W): with semantic label maps
    (HEAT) their (H, W) must match, as eval checks; without (SML), a file whose last
    dimension is smaller than both others is taken for channel-last (H, W, C), which would
    silently give statistics for C = H classes."""
    from .grid import array_shape, channel_last_hint
    stems = sorted(logits_files)
    for stem in dict.fromkeys((stems[0], stems[-1])):
        s = array_shape(logits_files[stem])
        if len(s) == 4 and s[0] == 1:
            s = s[1:]
        if len(s) != 3:
            raise GridError(f"{logits_files[stem]}: logits must be (C, H, W), got {tuple(s)}")
        if label_files:
            ls = array_shape(label_files[stem])
            if len(ls) == 2 and tuple(s[1:]) != tuple(ls):
                raise GridError(f"logits {logits_files[stem]} have shape {tuple(s)}, expected (C, {ls[0]}, {ls[1]}) "
                                f"to match semantic label map {label_files[stem].name}" + channel_last_hint(s, ls))
        elif _channel_last_fit_hint(s):
            raise GridError(f"logits {logits_files[stem]} have shape {tuple(s)}: C = {s[0]} classes for "
                            f"{s[1]} x {s[2]} pixels" + _channel_last_fit_hint(s) + " (if they really are (C, H, W) "
                            "with W below C and H, save them as (C, W, H), np.swapaxes(a, 1, 2): SML statistics "
                            "do not depend on where a pixel is)")


@contextmanager
def naming_the_file(*readers):
    """An error the library raises about a batch (it knows no files) names the files of
    that batch: those the readers yielded last."""
    try:
        yield
    except GridError:
        raise
    except (ValueError, TypeError) as exc:
        files = [str(r.current) for r in readers if r.current is not None]
        if not files:
            raise
        raise GridError(f"{', '.join(files)}: {_first_line(exc)}") from None


def fit_model_heat(model) -> HeatStats:
    """The model's HEAT statistics: heat_stats file, or fitted on fit_logits /
    fit_features / fit_semantic (255 ignored) with standardization."""
    if model.heat_stats is not None:
        return HeatStats.load(model.heat_stats)
    if not model.fit_features:
        raise GridError(f"model {model.name!r}: method 'heat' needs heat_stats = ... or fit_logits, fit_features "
                        "and fit_semantic in the grid")
    stems = sorted(model.fit_logits)
    readers = (_Reader(model.fit_logits, stems, "logits"), _Reader(model.fit_features, stems, "features"),
               _Reader(model.fit_semantic, stems, "labels"))
    with naming_the_file(*readers):
        return fit_heat(*readers, ignore_index=255)


def evaluate_grid(grid: Grid, methods, *, device: str = "cpu", progress: bool = True, n_examples: int = 3,
                  temperature: float = 1.0, distributed: bool = False, protocol: str | None = None,
                  refine: bool = False, conventions: dict | None = None, nonfinite: str = "error",
                  allow_empty_class: bool = False, components=None) -> dict:
    """Returns {"models": [{name, histograms{method: Histogram}, miou, pixels, examples}], ...}.
    methods: one list for every model, or {model name: list}.
    nonfinite="error": NaN / inf logits on a valid pixel raise, naming the file; "ignore"
    skips and counts them. A model without anomaly (or normal) pixels under the label map
    raises unless allow_empty_class (then a note in the run's "notes").
    protocol="ml4cv": each model also gets "results" {method: MetricResult} of that preset,
    from every valid pixel's score in image (file name) order (see anomfast/protocols.py).
    refine=True: each model gets "results" with every metric made exact (AUROC / AP within a
    pixel budget) by a second pass over its files (see anomfast.evaluate(refine=True)).
    components (an anomfast.components.ComponentSpec): each model also gets "components"
    {method: ComponentResult} from one more pass over its files (_component_pass)."""
    methods_by_model = methods
    stems = sorted(grid.labels)
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    proto = protocols.check_protocol(protocol)
    if proto is not None and world > 1:
        raise ValueError(f"--protocol {proto} draws its subsample over the whole data set in order; run it in one "
                         "process (without --distributed)")
    my_stems = stems[rank::world]
    out, notes = [], []
    t_grid = time.perf_counter()
    # where the time goes (this rank): waiting for files (read on a prefetch thread), the
    # fused pass, the rest (checks, label statistics, sync, finalization); results "timings"
    timings = {"read_wait_s": 0.0, "fused_pass_s": 0.0}
    all_methods = []
    for model in grid.models:
        methods = list(methods_by_model[model.name]) if isinstance(methods_by_model, dict) else list(methods_by_model)
        all_methods += [k for k in methods if k not in all_methods]
        params = {"temperature": temperature}
        if "sml" in methods:
            params["sml"] = fit_model_sml(model, progress)
        if proto is not None:
            params = protocols.method_params(proto, params)
            kept, kept_labels = [[] for _ in methods], []
        need_feats = "heat" in methods
        if need_feats:
            if not model.features:
                raise GridError(f"model {model.name!r}: method 'heat' needs features = ... (per-image feature maps)")
            params["heat"] = fit_model_heat(model)
        spec = resolve(methods, **params)
        acc = Accumulator(spec, grid.label_map, nonfinite)
        acc.allocate(device)  # every rank holds a state to all_reduce, images or not
        conf = None
        examples = []
        shared = _shared_counter(f"anomfast/progress/{len(out)}/{model.name}") if world > 1 else None
        pb = Progress(model.name, len(stems) if shared else len(my_stems), progress and rank == 0, shared)
        first = {}  # the model's class count and the file it came from
        values: dict = {}  # raw label value -> pixels (for the empty-class message)

        def read(stem):
            x = _as_chw(load_array(model.logits[stem]), model.logits[stem])
            y = _as_labels(load_array(grid.labels[stem]), grid.labels[stem])
            if x.dim() == 3 and y.dim() == 2 and tuple(x.shape[1:]) != tuple(y.shape):
                from .grid import channel_last_hint
                raise GridError(f"model {model.name!r}: logits {model.logits[stem]} have shape {tuple(x.shape)}, "
                                f"expected (C, {y.shape[0]}, {y.shape[1]}) to match label map "
                                f"{grid.labels[stem].name}" + channel_last_hint(x.shape, y.shape))
            # here, on the reading thread: the raw label values and their pixel counts (for the
            # empty-class message), and a value outside the label map, to name the file
            counts = _value_counts(y)
            bad = None
            if (grid.label_map.classify(torch.from_numpy(counts[0])) == INVALID).any():
                bad = grid.label_map.first_invalid_value(y)  # the first in raster order
            if bad is not None:
                d = grid.label_map.describe()
                raise GridError(f"label map {grid.labels[stem].name}: value {bad} is in none of [labels]' "
                                f"anomaly_ids {d['anomaly_ids']}, void_ids {d['void_ids']}, normal_ids "
                                f"{d['normal_ids']} "
                                '(normal_ids = "rest" / --normal-ids rest counts every other value from 0 to the '
                                'largest listed id as normal)')
            sem = None
            if stem in grid.semantic:
                sem = _as_labels(load_array(grid.semantic[stem]), grid.semantic[stem], "semantic label map")
                check_semantic_shape(grid.semantic[stem], sem.shape, grid.labels[stem], y.shape)
            if sem is not None and x.dim() == 3:
                _check_semantic_values(sem, int(x.shape[0]), grid.semantic[stem])
            f = _as_chw(load_array(model.features[stem]), model.features[stem], "features") if need_feats else None
            return stem, x, y, sem, f, counts

        for stem, x, y, sem, f, counts in _timed(_prefetch(read, my_stems), timings, "read_wait_s"):
            if tuple(y.shape) != tuple(x.shape[1:]):
                raise GridError(f"image {stem!r}: label map {tuple(y.shape)} vs logits {tuple(x.shape)} of model {model.name!r}")
            C = int(x.shape[0])
            if not first:
                first.update(C=C, path=model.logits[stem])
                for what, st in (("SML", params.get("sml")), ("HEAT", params.get("heat"))):
                    if st is not None and st.num_classes != C:
                        src = model.sml_stats if what == "SML" else model.heat_stats
                        raise GridError(f"model {model.name!r}: logits {model.logits[stem]} have C = {C} classes but "
                                        f"the {what} statistics ({src or 'fitted from fit_logits'}) are for "
                                        f"{st.num_classes}")
            elif C != first["C"]:
                raise GridError(f"model {model.name!r}: logits {model.logits[stem]} have C = {C} classes but "
                                f"{first['path'].name} (the model's first image) has {first['C']}; every image "
                                "of a model must have the same classes")
            if f is not None:
                _check_feature_size(model, stem, f.shape, x.shape, first)
            if not out:  # the label values, once (every model reads the same label maps)
                for a, b in zip(counts[0].tolist(), counts[1].tolist()):
                    values[a] = values.get(a, 0) + b
            xb = _fused.as_logits(x.unsqueeze(0).to(device))
            yb = _fused.as_labels(y.unsqueeze(0).to(device), xb)
            want_example = len(examples) < n_examples and bool((y != 0).any())
            want_maps = want_example or proto is not None
            fb = None
            if f is not None:
                fb = as_features(f.unsqueeze(0).to(device), xb, spec.heat, name=f"features of image {stem!r}")
            t_pass = time.perf_counter()
            maps = acc.add(xb, yb, fb, want_maps=want_maps)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()  # timing only: the pass is asynchronous on CUDA
            timings["fused_pass_s"] += time.perf_counter() - t_pass
            if nonfinite == "error":
                bad = int(acc.counters[_core.CNT_NONFINITE])  # this file's: an earlier one would have raised
                if bad:
                    if f is not None and bool(torch.isfinite(x).all()):  # the logits are fine: the features
                        raise GridError(f"model {model.name!r}: {bad} valid pixel(s) of image {stem!r} have a "
                                        f"non-finite HEAT score: features {model.features[stem]} hold NaN or inf "
                                        "(or post-processing overflowed); --nonfinite ignore skips and counts them")
                    raise GridError(f"model {model.name!r}: {bad} valid pixel(s) of {model.logits[stem]} have NaN or "
                                    "infinite logits (or a non-finite HEAT / post-processed SML score, e.g. from "
                                    "NaN features); --nonfinite ignore skips and counts them")
            if sem is not None:
                C = xb.shape[1]
                pred = xb[0].argmax(dim=0).flatten().to(torch.int64)
                s = sem.to(device).flatten().to(torch.int64)
                ok = (s >= 0) & (s < C)
                cm = torch.bincount(s[ok] * C + pred[ok], minlength=C * C).reshape(C, C)
                conf = cm if conf is None else conf + cm
            if proto is not None:
                cls = grid.label_map.classify(yb).flatten()
                valid = (cls == NORMAL) | (cls == ANOMALY)
                sc = maps.reshape(len(spec.names), -1)[:, valid].cpu().numpy()
                for j in range(len(spec.names)):
                    kept[j].append(sc[j])
                kept_labels.append((cls[valid] == ANOMALY).cpu().numpy())
            if want_example:
                examples.append({"stem": stem, "labels": y.numpy(),
                                 "classes": grid.label_map.classify(y.to(torch.int64)).numpy(),
                                 "image": _example_image(grid.images[stem]) if stem in grid.images else None,
                                 "maps": {n: maps[j, 0].cpu().numpy() for j, n in enumerate(spec.names)}})
            pb.update(int(y.numel()))
        pb.close()
        total = acc.synced() if world > 1 else acc
        if world > 1 and conf is not None:
            torch.distributed.all_reduce(conf)
        pixels = total.check()
        miou = None if conf is None else mean_iou(conf.cpu().numpy())[0]
        skipped = int(total.counters[_core.CNT_NONFINITE]) if getattr(total, "counters", None) is not None else 0
        hists = total.histograms(clear=True)
        acc.release()
        warned = _check_classes(model, hists, values, grid.label_map, allow_empty_class, notes, skipped)
        entry = {"name": model.name, "histograms": hists, "miou": miou, "pixels": pixels, "examples": examples,
                 "images": len(stems), "empty_class_warned": warned}

        def batches():  # the second passes (refine, components): the same files, the same inputs
            for _, x, y, _, f, _ in _prefetch(read, my_stems):
                xb = _fused.as_logits(x.unsqueeze(0).to(device))
                fb = None if f is None else as_features(f.unsqueeze(0).to(device), xb, spec.heat)
                yield xb, _fused.as_labels(y.unsqueeze(0).to(device), xb), fb
        if proto is not None:
            cols = [np.concatenate(k) if k else np.zeros(0, np.float32) for k in kept]
            labs = np.concatenate(kept_labels) if kept_labels else np.zeros(0, bool)
            del kept, kept_labels
            entry["results"] = protocols.ml4cv_results(spec.names, cols, labs)
            for n, r in entry["results"].items():
                r.params = spec.params_of(n)
        elif refine:
            if progress and rank == 0:
                print(f"{model.name}: refining FPR95 / F1 (second pass)", file=sys.stderr)
            with warned_already(entry):
                entry["results"] = refine_histograms(hists, spec, grid.label_map, batches, dict(conventions or {}),
                                                     nonfinite, 0)
        if components is not None:
            entry["components"] = _component_pass(model.name, spec, entry, components, grid.label_map, batches,
                                                  device, world, conventions, progress and rank == 0)
        out.append(entry)
    timings["grid_s"] = time.perf_counter() - t_grid
    timings["images"] = len(my_stems) * len(grid.models)
    return {"models": out, "methods": all_methods, "protocol": proto, "notes": notes, "timings": timings}


def _component_pass(name, spec, entry, cs, label_map, batches, device, world, conventions, say) -> dict:
    """The component metrics of one model: a second pass over its images with the
    prefetching reader, each method's maps binarized at its pooled best-F1 threshold (taken
    after the histograms' all_reduce, so every rank uses the same one), the integer counts
    summed over the ranks."""
    if "results" not in entry:  # write_report then keeps these
        with warned_already(entry):
            entry["results"] = finalize(entry["histograms"], conventions or {})
    acc = accumulator_for(cs, spec.names, label_map, best_f1=entry["results"])
    if say:
        print(f"{name}: component metrics (second pass)", file=sys.stderr)
    for xb, yb, fb in batches():
        _, _, maps = _fused.fused_pass(xb, None, spec, want_maps=True, features=fb)
        acc.update_maps(maps, yb)
    if world > 1:
        acc.all_reduce_(device=device)
    return acc.results()
