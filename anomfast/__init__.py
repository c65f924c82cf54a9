"""anomfast: fast, certified pixel-level anomaly (OOD) detection evaluation for
semantic segmentation. Logits are read once by a fused C++ (CPU) or CUDA core that
computes every method's score and bins it into per-method, per-label histograms;
metrics are finalized from the histograms with certified bounds.
"""
from __future__ import annotations

from . import _core
from .evaluator import Evaluator
from .functional import Results, evaluate, evaluate_scores, fit_sml, score_maps
from .heat import HeatStats, fit_heat
from .histogram import Histogram, load_histograms, save_histograms
from .labels import LabelMap
from .methods import CODES as _CODES
from .sml import SMLStats

__version__ = str(_core._C.VERSION)
METHODS = tuple(_CODES)

__all__ = ["Evaluator", "evaluate", "evaluate_scores", "score_maps", "fit_sml", "SMLStats", "fit_heat", "HeatStats", "LabelMap",
           "Histogram", "save_histograms", "load_histograms", "Results", "build_info", "METHODS", "__version__"]


def build_info() -> dict:
    """What this build contains: version, compiler, OpenMP, CPU instruction set, CUDA."""
    info = {"version": __version__}
    info.update(_core._C.build_info())
    info["cuda"] = _core._C_cuda is not None
    if _core._C_cuda is not None:  # pragma: no cover - needs a CUDA build
        info.update(_core._C_cuda.build_info())
    else:
        info["cuda_note"] = _core._CUDA_IMPORT_ERROR or "built without CUDA"
    info["nbins"] = _core.NBINS
    return info
