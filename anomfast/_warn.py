"""warn(): the library's warnings name the user's line.

A stack level counted by hand breaks whenever a call path changes (evaluate, refine,
per_image, the torchmetrics adapter each reach the same warning through different
depths, and Python 3.12 inlines comprehensions). warn() walks out of anomfast's own
frames instead, and out of torchmetrics' (its Metric wrappers call the adapter), and
attributes the warning to the first frame beyond them.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

_SKIP: tuple | None = None


def _skipped_dirs() -> tuple:
    global _SKIP
    if _SKIP is None:
        dirs = [os.path.dirname(os.path.abspath(__file__))]
        try:  # where torchmetrics would load from, without importing it
            spec = importlib.util.find_spec("torchmetrics")
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
        _SKIP = tuple(d + os.sep for d in dirs)
    return _SKIP


def warn(message: str, category: type = RuntimeWarning) -> None:
    """warnings.warn(message, category), attributed to the first caller outside anomfast
    (and torchmetrics)."""
    skip = _skipped_dirs()
    level, f = 2, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(skip):
        f = f.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
