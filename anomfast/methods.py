"""The score methods: names, parameters, and what the fused core is told.

All scores are "higher = more anomalous". With logits l_c, p = softmax(l),
m = max_c l_c, k = argmax_c l_c:

    max_logit  s = -m
    msp        s = 1 - max_c p_c  (computed as sum_{c != k} e^(l_c - m) / sum_c e^(l_c - m))
    energy     s = -T logsumexp(l / T)                       temperature T (default 1)
    sml        s = -(m - mean[k]) / std[k]                   needs fit_sml(...) statistics
    entropy    s = -sum_c p_c log p_c   (/ log C if entropy_normalize)
    gen        s = sum_c p_c^g (1 - p_c)^g                   gamma g (default 0.1)
    heat       s = (w_E E + M + w_K K) / (w_E + 1 + w_K)     needs features= and fit_heat(...)
                   statistics (heat=); see anomfast/heat.py

SML post-processing (Jung et al.'s full method; anomfast/sml.py: postprocess):
``sml_boundary_suppression=True`` replaces the scores on predicted-class boundaries by
the mean of their non-boundary neighbours (4 iterations, width 4),
``sml_smoothing=True`` applies the dilated 7x7 Gaussian smoothing, ``sml_full=True``
turns both on. ``sml_boundary_padding`` is how the image border enters the boundaries:
"original" (default; the official code's kornia: border pixels whose neighbourhood holds
only class ids >= 2 are boundary) or "geodesic" (outside pixels ignored). Default: plain
per-pixel SML. The post-processed map is binned by the core as an external coordinate
map (method code EXTERNAL).
"""
from __future__ import annotations

from dataclasses import dataclass

from ._core import _C
from .heat import HeatStats, positive_float32
from .sml import BOUNDARY_PADDINGS, SMLStats, check_boundary_padding

# the core's method codes (csrc/common/methods.h: the method table), read from the extension
CODES = {name: int(code) for name, code in _C.METHODS.items() if name != "external"}
EXTERNAL = int(_C.METHODS["external"])  # core code of a method whose coordinates are computed outside the core
DISPLAY = {"max_logit": "Simple Max Logits", "msp": "Maximum Softmax Probability",
           "sml": "Standardized Max Logits", "energy": "Energy Score", "entropy": "Entropy",
           "gen": "GEN", "heat": "HEAT"}
DEFAULT_METHODS = ("max_logit", "msp", "energy")
SML_POST = ("sml_full", "sml_boundary_suppression", "sml_smoothing", "sml_boundary_padding")
PARAMS = {"temperature", "sml", "sml_stats", "entropy_normalize", "gen_gamma", "heat", "heat_stats"} | set(SML_POST)


@dataclass
class MethodSpec:
    """Resolved methods and their parameters, ready for the core."""
    names: tuple
    temperature: float = 1.0
    sml: SMLStats | None = None
    entropy_normalize: bool = False
    gen_gamma: float = 0.1
    heat: HeatStats | None = None
    sml_boundary_suppression: bool = False
    sml_smoothing: bool = False
    sml_boundary_padding: str = BOUNDARY_PADDINGS[0]

    @property
    def sml_post(self) -> bool:
        """SML is post-processed (spatially) before binning."""
        return "sml" in self.names and (self.sml_boundary_suppression or self.sml_smoothing)

    @property
    def codes(self) -> list:
        return [EXTERNAL if (n == "sml" and self.sml_post) else CODES[n] for n in self.names]

    @property
    def external(self) -> tuple:
        """Names of the methods binned from external coordinate maps, in core order."""
        return tuple(n for n, c in zip(self.names, self.codes) if c == EXTERNAL)

    def params_of(self, name: str) -> dict:
        """The parameters that define method `name`'s score (stored with its histogram)."""
        if name == "energy":
            return {"temperature": self.temperature}
        if name == "sml":
            d = {"sml": self.sml.describe(), "sml_mean": [float(v) for v in self.sml.mean],
                 "sml_std": [float(v) for v in self.sml.std]}
            if self.sml_post:  # only then, so plain SML keeps its parameters (and histograms add)
                d["sml_boundary_suppression"] = bool(self.sml_boundary_suppression)
                d["sml_smoothing"] = bool(self.sml_smoothing)
                if self.sml_boundary_suppression:  # smoothing alone does not depend on it
                    d["sml_boundary_padding"] = self.sml_boundary_padding
            return d
        if name == "heat":
            return {"heat": self.heat.describe()}
        if name == "entropy":
            return {"entropy_normalize": bool(self.entropy_normalize)}
        if name == "gen":
            return {"gen_gamma": self.gen_gamma}
        return {}


def resolve(methods=None, **params) -> MethodSpec:
    if methods is None:
        methods = DEFAULT_METHODS + (("sml",) if params.get("sml") is not None or
                                     params.get("sml_stats") is not None else ())
    if isinstance(methods, str):
        methods = (methods,)
    names = tuple(methods)
    if not names:
        raise ValueError("no methods requested; choose from " + ", ".join(CODES))
    for n in names:
        if n not in CODES:
            raise ValueError(f"unknown method {n!r}; known methods: {', '.join(CODES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"method listed twice in {list(names)}")
    if len(names) > 8:
        raise ValueError("at most 8 methods per pass")
    unknown = set(params) - PARAMS
    if unknown:
        raise TypeError(f"unknown method parameter(s) {sorted(unknown)}; known: {sorted(PARAMS)}")
    # methods that need fitted statistics: (keyword, its type, where it comes from)
    for name, kind, a_kind, source in (
            ("sml", SMLStats, "an SMLStats", "anomfast.fit_sml(in_distribution_logits)"),
            ("heat", HeatStats, "a HeatStats", "anomfast.fit_heat(logits, features, semantic_labels)")):
        stats = params.get(name, params.get(f"{name}_stats"))
        if name not in names:
            continue
        if stats is None:
            extra = ", and features= with the data" if name == "heat" else ""
            raise ValueError(f"method {name!r} needs statistics: pass {name}={source} "
                             f"(or {kind.__name__}.load(path)){extra}")
        if not isinstance(stats, kind):
            raise TypeError(f"{name} must be {a_kind} (from {source.split('(')[0]} or "
                            f"{kind.__name__}.load), got {type(stats).__name__}")
    sml = params.get("sml", params.get("sml_stats"))
    heat = params.get("heat", params.get("heat_stats"))
    full = bool(params.get("sml_full", False))
    bs = bool(params.get("sml_boundary_suppression", full))
    sm = bool(params.get("sml_smoothing", full))
    if (full or bs or sm) and "sml" not in names:  # post-processing of a score that is not computed
        asked = [k for k in ("sml_full", "sml_boundary_suppression", "sml_smoothing") if params.get(k)]
        raise ValueError(f"{', '.join(f'{k}=True' for k in asked)} post-process(es) the 'sml' score, but 'sml' is not "
                         f"among the methods {list(names)}; add it (with sml=anomfast.fit_sml(...))")
    padding = check_boundary_padding(params.get("sml_boundary_padding", BOUNDARY_PADDINGS[0]))
    t = positive_float32("temperature", params.get("temperature", 1.0))
    g = positive_float32("gen_gamma", params.get("gen_gamma", 0.1))
    return MethodSpec(names=names, temperature=t, sml=sml,
                      entropy_normalize=bool(params.get("entropy_normalize", False)), gen_gamma=g,
                      heat=heat, sml_boundary_suppression=bs, sml_smoothing=sm, sml_boundary_padding=padding)


# Methods whose float32 coordinate is an exact function of the input values (no rounding):
# only there does "one float32 value in a bin" mean "one exact score" (a real tie). A
# computed score (msp's u, energy, ...) can round distinct exact scores to one float32.
EXACT_COORDINATES = frozenset({"max_logit"})


# Every method's bin coordinate is its score: msp's score is u = 1 - max softmax (not
# -max softmax), which float32 holds to full relative precision on confident pixels
# (u ~ 1e-7 .. 1e-35) where -max softmax rounds them all to -1; so score maps, bins and
# thresholds are one and the same number, and "score >= threshold" on score_maps
# reproduces the reported F1.
