"""The score methods: names, parameters, and what the fused core is told.

All scores are "higher = more anomalous". With logits l_c, p = softmax(l),
m = max_c l_c, k = argmax_c l_c:

    max_logit  s = -m
    msp        s = -max_c p_c
    energy     s = -T logsumexp(l / T)                       temperature T (default 1)
    sml        s = -(m - mean[k]) / std[k]                   needs fit_sml(...) statistics
    entropy    s = -sum_c p_c log p_c   (/ log C if entropy_normalize)
    gen        s = sum_c p_c^g (1 - p_c)^g                   gamma g (default 0.1)

"heat" (energy + feature Mahalanobis + spatial consistency) is not implemented in
this version and raises NotImplementedError rather than returning another score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .sml import SMLStats

CODES = {"max_logit": 0, "msp": 1, "energy": 2, "sml": 3, "entropy": 4, "gen": 5}
DISPLAY = {"max_logit": "Simple Max Logits", "msp": "Maximum Softmax Probability",
           "sml": "Standardized Max Logits", "energy": "Energy Score", "entropy": "Entropy",
           "gen": "GEN", "heat": "HEAT"}
DEFAULT_METHODS = ("max_logit", "msp", "energy")
NOT_IMPLEMENTED = {
    "heat": "HEAT (energy + feature-space Mahalanobis + spatial consistency) is not implemented yet "
            "(tracked in the HEAT issue); it is not replaced by another score",
}
PARAMS = {"temperature", "sml", "sml_stats", "entropy_normalize", "gen_gamma"}


@dataclass
class MethodSpec:
    """Resolved methods and their parameters, ready for the core."""
    names: tuple
    temperature: float = 1.0
    sml: SMLStats | None = None
    entropy_normalize: bool = False
    gen_gamma: float = 0.1
    extra: dict = field(default_factory=dict)

    @property
    def codes(self) -> list:
        return [CODES[n] for n in self.names]

    def params_of(self, name: str) -> dict:
        """The parameters that define method `name`'s score (stored with its histogram)."""
        if name == "energy":
            return {"temperature": self.temperature}
        if name == "sml":
            return {"sml": self.sml.describe(), "sml_mean": [float(v) for v in self.sml.mean],
                    "sml_std": [float(v) for v in self.sml.std]}
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
        if n in NOT_IMPLEMENTED:
            raise NotImplementedError(NOT_IMPLEMENTED[n])
        if n not in CODES:
            raise ValueError(f"unknown method {n!r}; known methods: {', '.join(CODES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"method listed twice in {list(names)}")
    if len(names) > 8:
        raise ValueError("at most 8 methods per pass")
    unknown = set(params) - PARAMS
    if unknown:
        raise TypeError(f"unknown method parameter(s) {sorted(unknown)}; known: {sorted(PARAMS)}")
    sml = params.get("sml", params.get("sml_stats"))
    if "sml" in names:
        if sml is None:
            raise ValueError("method 'sml' needs statistics: pass sml=anomfast.fit_sml(in_distribution_logits) "
                             "(or SMLStats.load(path))")
        if not isinstance(sml, SMLStats):
            raise TypeError(f"sml must be an SMLStats (from anomfast.fit_sml or SMLStats.load), got {type(sml).__name__}")
    t = float(params.get("temperature", 1.0))
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    g = float(params.get("gen_gamma", 0.1))
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"gen_gamma must be a finite number > 0, got {g}")
    return MethodSpec(names=names, temperature=t, sml=sml,
                      entropy_normalize=bool(params.get("entropy_normalize", False)), gen_gamma=g)


def coord_to_score(name: str, t):
    """Bin coordinate -> score. Only msp differs: its coordinate is 1 - max softmax."""
    return t - 1.0 if name == "msp" else t
