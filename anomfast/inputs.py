"""Input normalization shared by the functional API and the fitting functions: batches
of (logits, labels, features) from tensors, arrays, aligned iterables or (logits, labels)
pairs, with the checks every batch gets (same class count, channel-last hint)."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory; an array torch cannot wrap (negative strides,
    non-native byte order) is copied first, as other strides need no copy."""
    if not a.dtype.isnative or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    return torch.from_numpy(a)


def check_dense(t: torch.Tensor, name: str) -> None:
    """The core reads a strided buffer: sparse and nested tensors have none."""
    if t.is_nested or t.layout != torch.strided:
        kind = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor; pass .to_dense() "
                        "(or torch.stack the images of a nested tensor)")


def _classes_of(lg):
    """C of a (B, C, H, W) / (C, H, W) batch, or None when it has no such shape."""
    shape = getattr(lg, "shape", None)
    if shape is None:
        return None
    return int(shape[1]) if len(shape) == 4 else int(shape[0]) if len(shape) == 3 else None


def _layout_hint(lg, y) -> None:
    """Channel-last logits (B, H, W, C) with labels (B, H, W): say so, instead of the
    shape error blaming the labels."""
    ls, ys = getattr(lg, "shape", None), getattr(y, "shape", None)
    if ls is None or ys is None or len(ls) != 4 or len(ys) != 3:
        return
    if tuple(ls[:3]) == tuple(ys) and tuple(ls[2:]) != tuple(ys[1:]):
        raise ValueError(f"logits {tuple(ls)} look channel-last (B, H, W, C) with C = {ls[3]} for labels "
                         f"{tuple(ys)}; anomfast reads (B, C, H, W): pass logits.permute(0, 3, 1, 2) (torch) or "
                         "np.moveaxis(logits, -1, 1) (NumPy; any strides work, no copy needed)")


def _batches(logits, labels=None, features=None):
    """Triples (logits, labels, features) from:

    - tensors / arrays: logits (B, C, H, W), labels (B, H, W), features (B, D, h, w);
    - aligned iterables of such batches (lists, generators), one per argument;
    - labels=None and logits an iterable of (logits, labels) or (logits, labels, features)
      tuples / lists, as a DataLoader yields them.

    Every batch's C must equal the first batch's (the batch is named otherwise)."""
    single = isinstance(logits, (torch.Tensor, np.ndarray))
    if not single and (isinstance(logits, (str, bytes)) or not isinstance(logits, Iterable)):
        raise TypeError("logits must be a tensor / array (B, C, H, W) or an iterable of batches, got "
                        f"{type(logits).__name__}")
    if single:
        for name, v in (("logits", logits), ("labels", labels), ("features", features)):
            if isinstance(v, torch.Tensor):
                check_dense(v, name)  # before any .shape: a nested tensor has none
        _layout_hint(logits, labels)
        yield logits, labels, features
        return
    others = {"labels": labels, "features": features}
    its = {}
    for name, v in others.items():
        if v is None:
            continue
        if isinstance(v, (torch.Tensor, np.ndarray)):
            raise TypeError(f"logits is an iterable of batches, so {name} must be an iterable of batches too")
        its[name] = iter(v)
    C0 = None
    for i, item in enumerate(logits):
        got = {}
        if isinstance(item, (tuple, list)) and not its:
            if len(item) not in (2, 3):
                raise TypeError(f"batch {i}: an item of the iterable must be logits, or a (logits, labels) / "
                                f"(logits, labels, features) pair, got a {type(item).__name__} of {len(item)}")
            lg, got["labels"] = item[0], item[1]
            if len(item) == 3:
                got["features"] = item[2]
            elif features is not None:
                raise TypeError("pass features inside the (logits, labels, features) items, not as features=")
        elif isinstance(item, (tuple, list)):
            raise TypeError(f"batch {i} is a {type(item).__name__}: (logits, labels) pairs come without labels=; "
                            "pass either an iterable of pairs or aligned iterables of logits and labels")
        else:
            lg = item
        for name, it in its.items():
            try:
                got[name] = next(it)
            except StopIteration:
                raise ValueError(f"{name} ran out after {i} batches while logits had more") from None
        for name, v in (("logits", lg), ("labels", got.get("labels")), ("features", got.get("features"))):
            if isinstance(v, torch.Tensor):
                check_dense(v, f"batch {i}: {name}")
        C = _classes_of(lg)
        if C0 is None:
            C0 = C
        elif C is not None and C != C0:
            raise ValueError(f"batch {i}: logits have C = {C} classes but batch 0 had C = {C0}; every batch must "
                             "have the same classes")
        _layout_hint(lg, got.get("labels"))
        yield lg, got.get("labels"), got.get("features")
    for name, it in its.items():
        if next(it, None) is not None:
            raise ValueError(f"{name} have more batches than logits")
