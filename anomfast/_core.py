"""Loads the compiled cores. The CPU core always exists; the CUDA core is optional."""
from __future__ import annotations

import os

if os.environ.get("ANOMFAST_CPU_ISA", "avx512") not in ("baseline", "avx2", "avx512"):
    raise ImportError(f"ANOMFAST_CPU_ISA={os.environ['ANOMFAST_CPU_ISA']!r}: expected baseline, avx2 or avx512 "
                      "(a cap on the CPU core's instruction set; unset: the widest this CPU runs)")

from . import _C  # noqa: E402  (built by CMake; see CMakeLists.txt)

try:  # built only when CMake found a CUDA compiler
    from . import _C_cuda  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the build
    _C_cuda = None
    _CUDA_IMPORT_ERROR = str(exc)
else:  # pragma: no cover
    _CUDA_IMPORT_ERROR = ""

NBINS = int(_C.NBINS)
N_COUNTERS = int(_C.N_COUNTERS)
MAX_METHODS = int(_C.MAX_METHODS)

# counter slots (csrc/common/views.h: Counter), from the core
CNT_NONFINITE, CNT_INVALID, CNT_VOID, CNT_BINNED = (int(_C.COUNTERS[k]) for k in ("nonfinite", "invalid", "void",
                                                                                  "binned"))


def cuda_core():
    """The CUDA core module, or a clear error when this build has none."""
    if _C_cuda is None:
        raise RuntimeError(
            "anomfast was built without CUDA support, so CUDA tensors cannot be evaluated; "
            "move the logits to the CPU or rebuild on a machine with nvcc (ANOMFAST_CUDA=ON)"
        )
    return _C_cuda
