"""Evaluation grids: models x methods over one set of label maps, read from disk.

A grid file (TOML) names the label directory and mapping and, per model, where its
per-image logits live (and optional SML statistics or in-distribution logits to fit
them). Paths are relative to the grid file::

    [labels]
    dir = "labels"            # PNG (as data sets ship them) or .npy/.npz/.pt label maps
    anomaly_ids = [1]
    void_ids = [255]
    normal_ids = [0]          # the default; "rest": every value not anomaly or void is normal
    semantic_dir = "semantic" # optional: semantic labels for mIoU (255 = ignore)
    [[models]]
    name = "SmallFCN Baseline"
    logits = "models/a/logits"        # a directory or a glob of .npy/.npz/.pt/.safetensors
    sml_stats = "a_sml.npz"           # optional (method sml), or
    fit_logits = "models/a/fit/logits"  # in-distribution logits to fit SML (and HEAT) on
    features = "models/a/features"    # optional (method heat): per-image (D, h, w) feature maps
    heat_stats = "a_heat.npz"         # optional (anomfast fit --method heat), or
    fit_features = "models/a/fit/features"  # with fit_logits and fit_semantic (class ids,
    fit_semantic = "models/a/fit/semantic"  # 255 ignored): HEAT statistics fitted on the fly
    methods = ["max_logit", "energy"] # optional: this model's methods (default: every method
                                      # it has what it needs for)

Checked before any long work starts: every label has a logits file of the same stem for
every model (and the other way round), feature files and semantic label maps likewise,
the fitting files of a model match each other, the shapes of the first and last image
agree (header reads; every other file is checked when it is read), methods exist.
"""
from __future__ import annotations

import glob as _glob
import os
import stat as _stat
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..labels import LabelMap

LOGIT_EXT = (".npy", ".npz", ".pt", ".safetensors")
LABEL_EXT = (".png", ".npy", ".npz", ".pt")
MODEL_KEYS = {"name", "logits", "sml_stats", "fit_logits", "features", "heat_stats", "fit_features", "fit_semantic",
              "methods"}
LABEL_KEYS = {"dir", "anomaly_ids", "void_ids", "normal_ids", "semantic_dir", "images_dir"}
MODEL_PATH_KEYS = ("logits", "sml_stats", "fit_logits", "features", "heat_stats", "fit_features", "fit_semantic")
LABEL_PATH_KEYS = ("dir", "semantic_dir", "images_dir")
TOP_KEYS = {"labels", "models"}


class GridError(ValueError):
    """A grid that cannot be evaluated (missing files, mismatched shapes...)."""


@dataclass
class ModelSpec:
    name: str
    logits: dict            # stem -> path
    sml_stats: Path | None = None
    fit_logits: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)       # stem -> path, for HEAT
    heat_stats: Path | None = None
    fit_features: dict = field(default_factory=dict)
    fit_semantic: dict = field(default_factory=dict)
    methods: list | None = None                        # the grid's methods = [...] for this model

    @property
    def has_heat(self) -> bool:
        """Features for every image and a source of HEAT statistics."""
        return bool(self.features) and (self.heat_stats is not None or bool(self.fit_features))

    @property
    def heat_gap(self) -> str | None:
        """What HEAT still needs when the model has some of its inputs but not all, else None."""
        stats = self.heat_stats is not None or bool(self.fit_features)
        if bool(self.features) == stats:
            return None
        return ("it has features but no HEAT statistics (heat_stats, or fit_logits + fit_features + fit_semantic; "
                "--heat-stats)" if self.features else
                "it has HEAT statistics but no features (per-image feature maps: features = ..., --features)")

    @property
    def has_sml(self) -> bool:
        return self.sml_stats is not None or bool(self.fit_logits)


@dataclass
class Grid:
    labels: dict            # stem -> path
    label_map: LabelMap
    models: list
    semantic: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    root: Path | None = None


def _files(spec, base: Path, exts, what: str) -> dict:
    p = Path(spec)
    if not p.is_absolute():
        p = base / p
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.suffix in exts]
    else:
        files = [Path(f) for f in sorted(_glob.glob(str(p))) if Path(f).suffix in exts]
        if not files and not any(ch in str(spec) for ch in "*?["):
            raise GridError(f"{what}: {p} does not exist")
    if not files:
        raise GridError(f"{what}: no {'/'.join(exts)} files in {p}")
    out = {}
    for f in files:
        if f.stem in out:
            raise GridError(f"{what}: two files for image {f.stem!r}: {out[f.stem].name} and {f.name}")
        check_regular(f, what)
        out[f.stem] = f
    return out


def check_regular(f: Path, what: str) -> None:
    """f (after resolving symlinks) is a regular file: a FIFO, socket or device (e.g. a
    link to /dev/zero) would block or never end when read (the prefetch thread would hang
    in open()), a folder named like a file would fail late."""
    try:
        st = os.stat(f)
    except FileNotFoundError:
        raise GridError(f"{what}: {f} does not exist" + (" (a dangling symbolic link)" if os.path.islink(f) else ""))\
            from None
    except OSError as exc:
        raise GridError(f"{what}: {f}: cannot read it ({exc.strerror or exc})") from None
    if not _stat.S_ISREG(st.st_mode):
        kind = ("a folder" if _stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if _stat.S_ISFIFO(st.st_mode)
                else "a socket" if _stat.S_ISSOCK(st.st_mode) else "a device" if _stat.S_ISCHR(st.st_mode)
                or _stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise GridError(f"{what}: {f} is {kind}" + (f" (via a link to {os.path.realpath(f)})"
                                                      if os.path.islink(f) else "") + "; give regular files")


def check_model_name(name, where: str) -> None:
    """A model name: a non-empty string without '::' (it separates model and method in
    histograms.npz) and without control characters (a newline or tab would break
    report.md's tables and the CSV / LaTeX outputs)."""
    if not isinstance(name, str) or not name or "::" in name:
        raise GridError(f"{where} {name!r}: a non-empty string without '::' (it separates model and method in "
                        "histograms.npz)")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise GridError(f"{where} {name!r}: a model name cannot contain control characters (here {bad!r}): it "
                        "would break report.md's tables")


# NumPy parses .npy headers with ast.literal_eval, and CPython 3.11 keeps the AST
# constructor's recursion depth in per-interpreter state: two threads parsing at once (the
# CLI's prefetch readers; a garbage collection inside one parse can run Python code and
# switch threads) occasionally fail with "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905; it failed tests/test_cli.py twice in three full runs).
# Headers are parsed under this lock; .npy data is read outside it.
_NPY_HEADER_LOCK = threading.Lock()


def _read_npy(path: Path) -> np.ndarray:
    """np.load(path, allow_pickle=False) of a .npy file, its header parsed under
    _NPY_HEADER_LOCK (the data read as NumPy's own read_array reads it)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        with _NPY_HEADER_LOCK:
            if version not in ((1, 0), (2, 0)):  # 3.0 (a utf-8 header): NumPy's reader, all of it locked
                f.seek(0)
                return np.load(f, allow_pickle=False)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError("the array holds Python objects, which would need unpickling (never done)")
        count = int(np.prod([int(n) for n in shape], dtype=object)) if shape else 1
        need, have = count * dtype.itemsize, os.fstat(f.fileno()).st_size - f.tell()
        if need > have:  # before allocating: a tiny file whose header claims (19, 100000, 100000)
            raise ValueError(f"the file is truncated or its header is wrong: shape {tuple(shape)} {dtype} needs "
                             f"{need} bytes of data, the file holds {have}")
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"the file is truncated ({data.size} of {count} values)")
    return data.reshape(shape, order="F" if fortran else "C")


def _load_array(path: Path):
    s = path.suffix
    if s == ".npy":
        return _read_npy(path)
    if s == ".npz":
        with _NPY_HEADER_LOCK, np.load(path, allow_pickle=False) as z:  # each member is a .npy
            keys = list(z.keys())
            if len(keys) != 1:
                raise GridError(f"{path}: expected one array in the .npz, found {keys}")
            return z[keys[0]]
    if s == ".pt":
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError (not tensors), RuntimeError (truncated zip), EOFError...
            raise GridError(f"{path}: not a readable tensor file (torch.load with weights_only=True: "
                            f"{_first_line(exc)})") from None
        if not isinstance(t, torch.Tensor):
            raise GridError(f"{path}: expected a tensor, got {type(t).__name__}")
        return t.detach()  # saved with requires_grad=True: the values are all we read
    if s == ".safetensors":
        try:
            from safetensors.torch import load_file  # torch tensors: NumPy has no bfloat16
        except ImportError:
            raise GridError(f"{path}: reading .safetensors files needs the safetensors package: "
                            "pip install safetensors") from None
        d = load_file(str(path))
        if len(d) != 1:
            raise GridError(f"{path}: expected one tensor in the .safetensors file, found {list(d)}")
        return next(iter(d.values()))
    if s == ".png":
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            from .demo import read_png
            return read_png(path)
        with Image.open(path) as im:
            return np.asarray(im)
    raise GridError(f"{path}: unsupported file type {s}")


def _first_line(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_array(path: Path):
    """The array in one per-image file; any reading problem is a GridError naming the file."""
    path = Path(path)
    try:
        return _load_array(path)
    except GridError:
        raise
    except FileNotFoundError:
        raise GridError(f"{path} does not exist") from None
    except MemoryError:
        raise GridError(f"{path}: not enough memory to read it (its header claims a huge array?)") from None
    except Exception as exc:  # truncated .npy / .npz, bad safetensors header, broken or huge PNG...
        raise GridError(f"{path}: cannot read it ({type(exc).__name__}: {_first_line(exc)})") from None


def array_shape(path: Path) -> tuple:
    """The array's shape from the file header where the format allows (cheap), else from
    the array load_array reads (a tensor's shape as it is: no NumPy conversion)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            with _NPY_HEADER_LOCK:  # see _read_npy
                return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)  # a truncated file raises
        if path.suffix == ".png":
            try:
                from PIL import Image
            except ImportError:  # pragma: no cover
                return tuple(load_array(path).shape)
            with Image.open(path) as im:
                return (im.size[1], im.size[0]) if im.mode in ("L", "P", "I", "I;16", "1") else \
                    (im.size[1], im.size[0], len(im.getbands()))
    except GridError:
        raise
    except Exception as exc:
        raise GridError(f"{path}: cannot read it ({type(exc).__name__}: {_first_line(exc)})") from None
    return tuple(load_array(path).shape)


INTERSECT_HINT = ("; the label folder decides the image list: --intersect evaluates only the images that have "
                  "every file")


def _match(what: str, labels: dict, files: dict, kind: str = "logits", other: str = "label map", hint: str = ""):
    missing = sorted(set(labels) - set(files))
    extra = sorted(set(files) - set(labels))
    if missing:
        raise GridError(f"{what}: no {kind} file for {len(missing)} image(s) that have a {other}, "
                        f"e.g. {missing[:3]}{hint}")
    if extra:
        raise GridError(f"{what}: {len(extra)} {kind} file(s) have no {other}, e.g. {extra[:3]}{hint}")


def _path(spec, base: Path, what: str) -> Path:
    p = Path(spec) if Path(spec).is_absolute() else base / spec
    if not p.exists():
        raise GridError(f"{what} {p} does not exist")
    check_regular(p, what)
    return p


def _check_paths(table: dict, keys, where: str) -> None:
    """Each path key given in a grid table holds a non-empty string (a TOML number, boolean
    or list would otherwise surface as Python's "expected str ... not int")."""
    for k in keys:
        if k in table and (not isinstance(table[k], str) or not table[k].strip()):
            raise GridError(f"{where} {k} = {table[k]!r} must be a path string (a folder, glob or file, relative "
                            "to the grid file), e.g. " + f'{k} = "{"labels" if k == "dir" else "path/to/" + k}"')


def load_grid(path, intersect: bool = False) -> Grid:
    path = Path(path)
    if not path.exists():
        raise GridError(f"grid file {path} does not exist")
    check_regular(path, "grid file")
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte order mark (Windows editors) is fine
    except UnicodeDecodeError as exc:
        raise GridError(f"{path}: not a UTF-8 text file ({exc})") from None
    try:
        cfg = tomllib.loads(text)
    except Exception as exc:
        raise GridError(f"{path}: not valid TOML ({exc})") from None
    return grid_from_config(cfg, path.parent, intersect=intersect)


def grid_from_config(cfg: dict, base: Path, intersect: bool = False) -> Grid:
    """intersect=True: only the images with a label map and every model's logits (and
    features) file are evaluated; otherwise each label map needs all of them."""
    if "labels" not in cfg or not isinstance(cfg["labels"], dict) or "dir" not in cfg["labels"]:
        raise GridError("grid: a [labels] table with dir = ... is required"
                        + (f", got labels = {cfg['labels']!r}" if "labels" in cfg and not isinstance(cfg["labels"], dict)
                           else ""))
    if not cfg.get("models"):
        raise GridError("grid: at least one [[models]] entry is required")
    if not isinstance(cfg["models"], list) or not all(isinstance(m, dict) for m in cfg["models"]):
        got = cfg["models"] if not isinstance(cfg["models"], list) else \
            next(m for m in cfg["models"] if not isinstance(m, dict))
        raise GridError(f"grid: each model is a [[models]] table (double brackets) with name = ... and logits = ...; "
                        f"got {'[models] (one table)' if isinstance(got, dict) else repr(got)[:60]}")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise GridError(f"grid: unknown key(s) or table(s) {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    lab = cfg["labels"]
    unknown = set(lab) - LABEL_KEYS
    if unknown:
        raise GridError(f"grid: unknown key(s) {sorted(unknown)} in [labels]; known: {sorted(LABEL_KEYS)}")
    _check_paths(lab, LABEL_PATH_KEYS, "grid: [labels]")
    # normal_ids defaults to [0] like the API: a label value outside the map is an error,
    # never silently a normal pixel (normal_ids = "rest" for data sets storing class ids)
    try:
        lm = LabelMap(anomaly_ids=lab.get("anomaly_ids", [1]), void_ids=lab.get("void_ids", [255]),
                      normal_ids=lab.get("normal_ids", [0]))
    except (TypeError, ValueError) as exc:
        raise GridError(f"grid: [labels]: {exc}") from None
    labels = _files(lab["dir"], base, LABEL_EXT, "labels")
    semantic = _files(lab["semantic_dir"], base, LABEL_EXT, "semantic labels") if lab.get("semantic_dir") else {}
    images = _files(lab["images_dir"], base, (".png",), "images") if lab.get("images_dir") else {}
    if not images and (base / "images").is_dir():
        images = _files("images", base, (".png",), "images")
    specs = []
    names = set()
    for i, m in enumerate(cfg["models"]):
        if "name" not in m or "logits" not in m:
            raise GridError(f"grid: model #{i + 1} needs name = ... and logits = ...")
        check_model_name(m["name"], "grid: model name")
        if m["name"] in names:
            raise GridError(f"grid: model name {m['name']!r} appears twice")
        names.add(m["name"])
        unknown = set(m) - MODEL_KEYS
        if unknown:
            raise GridError(f"model {m['name']!r}: unknown key(s) {sorted(unknown)} in the grid; known: "
                            f"{sorted(MODEL_KEYS)}")
        _check_paths(m, MODEL_PATH_KEYS, f"model {m['name']!r}:")
        meths = m.get("methods")
        if meths is not None and (not isinstance(meths, list) or not meths
                                  or not all(isinstance(k, str) for k in meths)):
            raise GridError(f"model {m['name']!r}: methods = [...] must be a non-empty list of method names")
        logits = _files(m["logits"], base, LOGIT_EXT, f"model {m['name']!r} logits")
        feats = _files(m["features"], base, LOGIT_EXT, f"model {m['name']!r} features") if m.get("features") else {}
        specs.append((m, logits, feats))
    if intersect:
        keep = set(labels)
        for _, logits, feats in specs:
            keep &= set(logits)
            if feats:
                keep &= set(feats)
        if not keep:
            raise GridError("--intersect: no image has a label map and a logits (and features) file for every model")
        labels = {k: v for k, v in labels.items() if k in keep}
        semantic = {k: v for k, v in semantic.items() if k in keep}
        specs = [(m, {k: v for k, v in lg.items() if k in keep}, {k: v for k, v in ft.items() if k in keep})
                 for m, lg, ft in specs]
    if semantic:  # matched like the logits: an mIoU over some of the images is not the data set's
        missing = sorted(set(labels) - set(semantic))
        if missing:
            raise GridError(f"semantic labels: no semantic label map for {len(missing)} image(s) that have a label "
                            f"map, e.g. {missing[:3]}; the mIoU needs one for every image (without semantic_dir "
                            "there is no mIoU)")
        _match("semantic labels", labels, semantic, kind="semantic label map", hint=INTERSECT_HINT)
    models = []
    for m, logits, feats in specs:
        name = m["name"]
        _match(f"model {name!r}", labels, logits, hint=INTERSECT_HINT)
        sml = _path(m["sml_stats"], base, f"model {name!r}: SML statistics file") if m.get("sml_stats") else None
        fit = _files(m["fit_logits"], base, LOGIT_EXT, f"model {name!r} fit logits") if m.get("fit_logits") else {}
        if feats:
            _match(f"model {name!r}", labels, feats, kind="features", hint=INTERSECT_HINT)
        heat = _path(m["heat_stats"], base, f"model {name!r}: HEAT statistics file") if m.get("heat_stats") else None
        fit_f, fit_s = {}, {}
        if m.get("fit_features") or m.get("fit_semantic"):
            if not (m.get("fit_features") and m.get("fit_semantic") and fit):
                raise GridError(f"model {name!r}: fitting HEAT needs fit_logits, fit_features and fit_semantic "
                                "(semantic class-id label maps) together")
            fit_f = _files(m["fit_features"], base, LOGIT_EXT, f"model {name!r} fit features")
            fit_s = _files(m["fit_semantic"], base, LABEL_EXT, f"model {name!r} fit semantic labels")
            _match(f"model {name!r} fitting data", fit, fit_f, kind="fit features", other="fit logits file")
            _match(f"model {name!r} fitting data", fit, fit_s, kind="fit semantic label", other="fit logits file")
        models.append(ModelSpec(name, logits, sml, fit, feats, heat, fit_f, fit_s,
                                list(m["methods"]) if m.get("methods") else None))
    g = Grid(labels=labels, label_map=lm, models=models, semantic=semantic, images=images, root=base)
    check_shapes(g)
    return g


def check_shapes(g: Grid) -> None:
    """Label maps (H, W), semantic label maps (H, W) and logits (C, H, W) agree, for the
    first and last image of every model (cheap header reads); every image is checked again
    when it is read (its class count against the model's first image)."""
    stems = sorted(g.labels)
    for stem in dict.fromkeys((stems[0], stems[-1])):  # the first file's error first
        ls = array_shape(g.labels[stem])
        if len(ls) != 2:
            raise GridError(f"label map {g.labels[stem].name} has shape {ls}, expected (H, W)")
        if g.semantic:
            check_semantic_shape(g.semantic[stem], array_shape(g.semantic[stem]), g.labels[stem], ls)
        for m in g.models:
            s = array_shape(m.logits[stem])
            if len(s) == 4 and s[0] == 1:
                s = s[1:]
            if len(s) != 3 or tuple(s[1:]) != tuple(ls):
                raise GridError(f"model {m.name!r}: logits {m.logits[stem].name} have shape {s}, "
                                f"expected (C, {ls[0]}, {ls[1]}) to match the label map" + channel_last_hint(s, ls))
            if m.features:
                fs = array_shape(m.features[stem])
                if len(fs) == 4 and fs[0] == 1:
                    fs = fs[1:]
                if len(fs) != 3:
                    raise GridError(f"model {m.name!r}: features {m.features[stem].name} have shape {fs}, "
                                    "expected (D, h, w)")


def check_semantic_shape(path, shape, label_path, hw) -> None:
    """A semantic label map has its label map's (H, W)."""
    shape, hw = tuple(shape), tuple(hw)
    if shape != hw:
        raise GridError(f"semantic label map {path} has shape {shape}, expected {hw} like label map {label_path.name}"
                        + ("; it looks transposed (W, H)" if shape == hw[::-1] else ""))


def channel_last_hint(shape, hw) -> str:
    """' (they look channel-last ...)' when a per-image shape is (H, W, C) for label maps (H, W)."""
    shape, hw = tuple(shape), tuple(hw)
    if len(shape) == 3 and shape[:2] == hw and shape[1:] != hw:
        return (f"; they look channel-last (H, W, C) with C = {shape[2]}: save them as (C, H, W), "
                "e.g. np.moveaxis(a, -1, 0)")
    return ""
