"""anomfast: fast, certified pixel-level anomaly (OOD) detection evaluation for
semantic segmentation. Logits are read once by a fused C++ (CPU) or CUDA core that
computes every method's score and bins it into per-method, per-label histograms;
metrics are finalized from the histograms with certified bounds.
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path


def _installed_copy():
    """An installed anomfast (with its compiled core) further down sys.path, or None."""
    here = _Path(__file__).resolve().parent
    for entry in _sys.path:
        cand = _Path(entry or ".").resolve() / "anomfast"
        if cand != here and (cand / "__init__.py").is_file() and any(cand.glob("_C.*")):
            return cand
    return None


def _use_installed_copy(exc: ImportError):
    """Running from a source checkout (e.g. the repository root, where `python -m anomfast`
    puts this folder first on sys.path): the compiled core lives in the installed copy,
    not here. Hand the import over to that copy, or say in one line what to do."""
    import importlib.util
    here = _Path(__file__).resolve().parent
    if _core_findable() or "_C" not in str(exc):
        raise exc  # a compiled core is here but does not load (ABI, ISA cap...): the real error
    where = _installed_copy()
    if where is None:
        msg = (f"anomfast: {here} is a source checkout without the compiled core (_C); build it with "
               "`pip install .` (or `pip install -e .`) and run anomfast from another folder, or the installed "
               "`anomfast` command")
        if _sys.argv[:1] == ["-m"]:  # `python -m anomfast ...`: one line, no traceback
            print(msg, file=_sys.stderr)
            raise SystemExit(2)
        raise ImportError(msg) from None
    spec = importlib.util.spec_from_file_location(__name__, where / "__init__.py",
                                                  submodule_search_locations=[str(where)])
    mod = importlib.util.module_from_spec(spec)
    for k in [k for k in _sys.modules if k.startswith(__name__ + ".")]:
        del _sys.modules[k]  # partial imports from the source folder
    _sys.modules[__name__] = mod  # the import statement returns sys.modules' entry
    spec.loader.exec_module(mod)
    return mod


def _core_findable() -> bool:
    """A compiled core this package can import: a _C file in this folder, or one an
    import hook maps here (an editable install keeps it in its build folder)."""
    if any(_Path(__file__).resolve().parent.glob("_C.*")):
        return True
    import importlib.util
    try:
        return importlib.util.find_spec(__name__ + "._C") is not None
    except (ImportError, ValueError):
        return False


# A source checkout has no compiled core: hand over to the installed copy at once (no
# import of the core), so that the lazy names below come from the copy that can run.
if not _core_findable():
    _use_installed_copy(ImportError("no compiled core (_C) in this folder"))

# Public names load on first use (PEP 562): `import anomfast` and `anomfast --help` do not
# import torch or the compiled core (about 2 s); the first evaluate() / Evaluator does.
_LAZY = {
    "Evaluator": "evaluator", "evaluate": "functional", "evaluate_scores": "functional", "score_maps": "functional",
    "fit_sml": "fitting", "Results": "functional", "fit_heat": "fitting", "HeatStats": "heat",
    "Histogram": "histogram", "load_histograms": "histogram", "save_histograms": "histogram",
    "release_buffers": "histogram", "LabelMap": "labels", "SMLStats": "sml",
    "ComponentSpec": "components", "component_metrics": "components",
}

__all__ = ["Evaluator", "evaluate", "evaluate_scores", "score_maps", "fit_sml", "SMLStats", "fit_heat", "HeatStats",
           "LabelMap", "Histogram", "save_histograms", "load_histograms", "release_buffers", "Results", "build_info",
           "METHODS", "__version__", "ComponentSpec", "component_metrics"]


def __getattr__(name: str):
    import importlib
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name == "__version__":
        from . import _core
        value = str(_core._C.VERSION)
    elif name == "METHODS":
        from .methods import CODES
        value = tuple(CODES)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def build_info() -> dict:
    """What this build contains: version, compiler, OpenMP, CPU instruction set, CUDA."""
    from . import _core
    info = {"version": str(_core._C.VERSION)}
    info.update(_core._C.build_info())
    info["cuda"] = _core._C_cuda is not None
    if _core._C_cuda is not None:  # pragma: no cover - needs a CUDA build
        info.update(_core._C_cuda.build_info())
    else:
        info["cuda_note"] = _core._CUDA_IMPORT_ERROR or "built without CUDA"
    info["nbins"] = _core.NBINS
    return info
