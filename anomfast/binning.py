"""The binning rule in NumPy: bin index <-> score interval.

Mirrors csrc/common/binning.h (the tests check the two agree bit for bit on the
kernel's own coordinates). A float32 value t is binned by its bits: per sign, each
octave 2^e, e in [-32, 32), is cut into 2^13 equal bins; |t| < 2^-32 shares one bin
per sign (+-0 in the positive one), |t| >= 2^32 (and inf) one overflow bin per sign.
Relative bin width <= 2^-13 = 1.22e-4. Bin indices increase with t.
"""
from __future__ import annotations

import numpy as np

MANT_BITS = 13
EXP_MIN = -32
EXP_COUNT = 64
NMAG = 2 + (EXP_COUNT << MANT_BITS)
NBINS = 2 * NMAG
RELATIVE_WIDTH = 2.0 ** -MANT_BITS
SCHEME = {"name": "float-log-linear", "mant_bits": MANT_BITS, "exp_min": EXP_MIN,
          "exp_count": EXP_COUNT, "nbins": NBINS}


def bin_index(t) -> np.ndarray:
    """Bin index (int64) of each float32 coordinate value."""
    u = np.ascontiguousarray(t, dtype=np.float32).view(np.uint32).astype(np.int64)
    mag_bits = u & 0x7FFFFFFF
    e = (mag_bits >> 23) - (127 + EXP_MIN)
    mant = (mag_bits >> (23 - MANT_BITS)) & ((1 << MANT_BITS) - 1)
    mag = 1 + (e << MANT_BITS) + mant
    mag = np.where(e < 0, 0, mag)
    mag = np.where(e >= EXP_COUNT, NMAG - 1, mag)
    neg = ((u >> 31) == 1) & (mag_bits != 0)
    return np.where(neg, NMAG - 1 - mag, NMAG + mag)


def _mag_range_bits(mag: np.ndarray):
    """Smallest and largest |t| bit patterns (uint32 as int64) of magnitude bins."""
    base = (127 + EXP_MIN) << 23
    lo = np.where(mag == 0, 0, base + ((mag - 1) << (23 - MANT_BITS)))
    hi = np.where(mag == 0, base - 1, base + (mag << (23 - MANT_BITS)) - 1)
    hi = np.where(mag == NMAG - 1, 0x7F800000, hi)  # overflow bin ends at inf
    lo = np.where(mag == NMAG - 1, base + (EXP_COUNT << 23), lo)
    return lo, hi


def _bits_to_f64(bits: np.ndarray, negative: np.ndarray) -> np.ndarray:
    v = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.where(negative, -v, v)


def bin_edges(index) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) float32 value that lands in each bin, as float64.

    The smallest member is the threshold that flags exactly this bin and every bin
    above it ("anomaly iff t >= threshold").
    """
    b = np.asarray(index, dtype=np.int64)
    neg = b < NMAG
    mag = np.where(neg, NMAG - 1 - b, b - NMAG)
    lo_bits, hi_bits = _mag_range_bits(mag)
    # negative side: the smallest value has the largest magnitude
    smallest = np.where(neg, _bits_to_f64(hi_bits, np.ones_like(neg)), _bits_to_f64(lo_bits, np.zeros_like(neg)))
    largest = np.where(neg, _bits_to_f64(lo_bits, np.ones_like(neg)), _bits_to_f64(hi_bits, np.zeros_like(neg)))
    # the negative underflow bin holds (-2^-32, -0): its largest member is -tiny, not -0
    tiny = np.float64(np.float32(np.finfo(np.float32).smallest_subnormal))
    largest = np.where(neg & (mag == 0), -tiny, largest)
    return smallest, largest
