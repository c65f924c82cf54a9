"""Label maps: which raw label values mean normal, anomaly and void.

The default is the Fishyscapes / SegmentMeIfYouCan convention: 0 = normal,
1 = anomaly, 255 = void (ignored). Data sets that store a class id for the anomaly
(e.g. 13) and several void ids are used as they are:

    LabelMap(anomaly_ids=[13], void_ids=[255, 0], normal_ids="rest")

``normal_ids="rest"`` makes every other value in [0, max id] normal. Any label value
the map does not cover is an error (reported with the offending value), never
silently treated as normal.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch

from ._core import _C  # noqa: E402

# label classes (csrc/common/views.h: LabelClass), from the core
NORMAL, ANOMALY, VOID, INVALID = (int(_C.LABEL_CLASSES[k]) for k in ("normal", "anomaly", "void", "invalid"))
_MAX_LUT = 1 << 16


def _id(v, name: str) -> int:
    """One label id: an int (Python, NumPy or a one-element integer tensor) or a float
    holding a whole number (13.0); True / False, 1.7 and strings are refused."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer():
            return int(v)
        raise ValueError(f"{name} must be whole numbers (label values), got {v!r}")
    if not isinstance(v, (bool, np.bool_, str, bytes)):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{name} must be integer label values (e.g. 13 or [13, 14]; 13.0 is taken as 13), got {v!r}")


def _ids(x, name: str) -> tuple:
    """Label ids from an int or an iterable of ints (see _id); None: no ids. A string is
    refused, not split into its characters."""
    if x is None:
        return ()
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an int or a list of ints, got the string {x!r}"
                        + (" ('rest' applies to normal_ids only)" if x == "rest" else ""))
    if isinstance(x, (int, float, np.integer, np.floating)) or (isinstance(x, np.ndarray) and x.ndim == 0):
        return (_id(x, name),)
    try:
        items = list(x)
    except TypeError:
        raise TypeError(f"{name} must be an int or a list of ints, got {type(x).__name__}") from None
    return tuple(_id(v, name) for v in items)


@dataclass(frozen=True)
class LabelMap:
    anomaly_ids: Sequence[int] = (1,)
    void_ids: Sequence[int] = (255,)
    normal_ids: Union[Sequence[int], str] = (0,)
    _lut_cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self):
        a, v = _ids(self.anomaly_ids, "anomaly_ids"), _ids(self.void_ids, "void_ids")
        object.__setattr__(self, "anomaly_ids", a)
        object.__setattr__(self, "void_ids", v)
        n = self.normal_ids
        if isinstance(n, str):
            if n != "rest":
                raise ValueError(f"normal_ids must be a list of ints or 'rest', got {n!r}")
        else:
            n = _ids(n, "normal_ids")
            object.__setattr__(self, "normal_ids", n)
        if not a:
            raise ValueError("LabelMap needs at least one anomaly id")
        sets = {"anomaly": set(a), "void": set(v)}
        if not isinstance(n, str):
            sets["normal"] = set(n)
        names = list(sets)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                both = sets[names[i]] & sets[names[j]]
                if both:
                    raise ValueError(f"label ids {sorted(both)} are both {names[i]} and {names[j]}")
        all_ids = set(a) | set(v) | (set() if isinstance(n, str) else set(n))
        lo, hi = min(all_ids | {0}), max(all_ids)
        if hi - lo + 1 > _MAX_LUT:
            raise ValueError(f"label ids span [{lo}, {hi}], more than {_MAX_LUT} values")

    @classmethod
    def default(cls, ignore_index: int = 255) -> "LabelMap":
        """0 normal, 1 anomaly, ignore_index void (an int, a list of ints, or None: no void id)."""
        return cls(anomaly_ids=(1,), void_ids=_ids(ignore_index, "ignore_index"), normal_ids=(0,))

    def __reduce__(self):
        # pickled / copied as its ids, rebuilt through the constructor: the ids are checked
        # again and the lookup table (derived data the core reads) is never taken from a file
        return (type(self), (self.anomaly_ids, self.void_ids, self.normal_ids))

    def lut(self) -> tuple[torch.Tensor, int]:
        """(int8 lookup table, offset): lut[v - offset] is the class of raw value v."""
        hit = self._lut_cache.get("lut")
        if hit is not None and not _sound_table(hit):
            self._lut_cache.clear()  # not what lut() built (set from outside): build it again
        if "lut" not in self._lut_cache:
            ids = set(self.anomaly_ids) | set(self.void_ids)
            if not isinstance(self.normal_ids, str):
                ids |= set(self.normal_ids)
            lo, hi = min(ids | {0}), max(ids)
            table = np.full(hi - lo + 1, INVALID, dtype=np.int8)
            if isinstance(self.normal_ids, str):
                table[:] = NORMAL
            else:
                table[np.array(self.normal_ids, dtype=np.int64) - lo] = NORMAL
            if self.void_ids:
                table[np.array(self.void_ids, dtype=np.int64) - lo] = VOID
            table[np.array(self.anomaly_ids, dtype=np.int64) - lo] = ANOMALY
            self._lut_cache["lut"] = (torch.from_numpy(table), lo)
        return self._lut_cache["lut"]

    def describe(self) -> dict:
        return {"anomaly_ids": list(self.anomaly_ids), "void_ids": list(self.void_ids),
                "normal_ids": self.normal_ids if isinstance(self.normal_ids, str) else list(self.normal_ids)}

    def classify(self, labels: torch.Tensor) -> torch.Tensor:
        """Label class (NORMAL/ANOMALY/VOID/INVALID) of every value, in PyTorch (reference path)."""
        table, lo = self.lut()
        v = labels.to(torch.int64) - lo
        inside = (v >= 0) & (v < table.numel())
        out = torch.full(v.shape, INVALID, dtype=torch.int8, device=labels.device)
        out[inside] = table.to(labels.device)[v[inside]]
        return out

    def first_invalid_value(self, labels: torch.Tensor):
        bad = self.classify(labels) == INVALID
        if not bool(bad.any()):
            return None
        return int(labels[bad].flatten()[0])


def _sound_table(hit) -> bool:
    """Whether a cached (table, offset) is one the core may read: a contiguous (so its
    storage holds every entry: no expanded view) 1-D int8 CPU tensor of 1 .. 2^16 entries,
    and an int offset."""
    if not (isinstance(hit, tuple) and len(hit) == 2 and isinstance(hit[1], int)):
        return False
    t = hit[0]
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype == torch.int8 and t.dim() == 1
            and t.device.type == "cpu" and t.is_contiguous() and 1 <= t.numel() <= _MAX_LUT)


def as_label_map(label_map=None, ignore_index: int = 255) -> LabelMap:
    if label_map is None:
        return LabelMap.default(ignore_index)
    if isinstance(label_map, LabelMap):
        return label_map
    if isinstance(label_map, dict):
        unknown = set(label_map) - {"anomaly_ids", "void_ids", "normal_ids"}
        if unknown:
            raise ValueError(f"label_map has unknown key(s) {sorted(map(str, unknown))}; expected anomaly_ids, "
                             "void_ids, normal_ids")
        return LabelMap(**label_map)
    raise TypeError(f"label_map must be a LabelMap or a dict of its fields, got {type(label_map).__name__}")
