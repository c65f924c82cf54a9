"""The binning rule in NumPy: bin index <-> score interval, tie signatures.

Mirrors csrc/common/binning.h (the tests check the two agree bit for bit on the
kernel's own coordinates). A float32 value t is binned by its bits, over the whole
float32 range: per sign, each octave (the 254 normal ones and the 23 subnormal ones,
read off |t| * 2^64) is cut into 2^13 equal bins; exactly zero (either sign) has its own
bin, and so has each infinity. Relative bin width <= 2^-13 = 1.22e-4 everywhere. Bin
indices increase with t.

A bin drops the 10 low mantissa bits; the cores OR ``d | (~d & 0x3ff) << 16`` of those
bits into a uint32 "signature" per bin, so a bin is known to hold a single value (a real
tie group) when no bit is set in both halves, and that value is then exact.
"""
from __future__ import annotations

import numpy as np

MANT_BITS = 13
DROP_BITS = 23 - MANT_BITS
OCTAVES = 23 + 254
SUB_OCTAVE_OFFSET = -42
NORMAL_OCTAVE_OFFSET = 22
NMAG = 2 + (OCTAVES << MANT_BITS)
NBINS = 2 * NMAG
OCC_SHIFT = 6
SIG_MASK = (1 << DROP_BITS) - 1
RELATIVE_WIDTH = 2.0 ** -MANT_BITS
SCHEME = {"name": "float32-log-linear-full", "mant_bits": MANT_BITS, "octaves": OCTAVES, "nbins": NBINS}

_TWO64 = np.float32(2.0 ** 64)


def _norm_bits(mag_bits: np.ndarray) -> np.ndarray:
    """|t|'s bits (int64), subnormals replaced by the bits of |t| * 2^64 (exact)."""
    sub = mag_bits < 0x00800000
    scaled = (mag_bits.astype(np.uint32).view(np.float32) * _TWO64).view(np.uint32).astype(np.int64)
    return np.where(sub, scaled, mag_bits)


def _mag_bits(t) -> tuple[np.ndarray, np.ndarray]:
    u = np.ascontiguousarray(t, dtype=np.float32).view(np.uint32).astype(np.int64)
    return u, u & 0x7FFFFFFF


def bin_index(t) -> np.ndarray:
    """Bin index (int64) of each float32 coordinate value."""
    u, mag_bits = _mag_bits(t)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        b = _norm_bits(mag_bits)
    octave = (b >> 23) + np.where(mag_bits < 0x00800000, SUB_OCTAVE_OFFSET, NORMAL_OCTAVE_OFFSET)
    mag = 1 + (octave << MANT_BITS) + ((b >> DROP_BITS) & ((1 << MANT_BITS) - 1))
    mag = np.where(mag_bits == 0, 0, mag)
    mag = np.where(mag_bits >= 0x7F800000, NMAG - 1, mag)
    neg = ((u >> 31) == 1) & (mag_bits != 0)
    return np.where(neg, NMAG - 1 - mag, NMAG + mag)


def bin_sig(t) -> np.ndarray:
    """Tie signature (int64 holding the uint32) of each float32 value."""
    _, mag_bits = _mag_bits(t)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        d = _norm_bits(mag_bits) & SIG_MASK
    return d | ((~d & SIG_MASK) << 16)


def sig_single(sig) -> np.ndarray:
    """True where a bin's OR-ed signature says all its values are one value. A kept
    signature is never 0; 0 means none was kept (methods whose float32 coordinate is not
    the exact score, empty bins): not a tie."""
    s = np.asarray(sig).astype(np.int64) & 0xFFFFFFFF
    return (s != 0) & (((s & SIG_MASK) & (s >> 16)) == 0)


def _mag_norm_range(mag: np.ndarray):
    """Per magnitude bin 1 .. NMAG-2: (octave, smallest normalized bits)."""
    m = mag - 1
    octave = m >> MANT_BITS
    mant = m & ((1 << MANT_BITS) - 1)
    return octave, mant << DROP_BITS


def _mag_to_abs(mag: np.ndarray, low: np.ndarray) -> np.ndarray:
    """|t| (float64) of the value in magnitude bin `mag` whose dropped bits are `low`."""
    mag = np.asarray(mag, np.int64)
    low = np.asarray(low, np.int64)
    octave, mant_bits = _mag_norm_range(np.clip(mag, 1, NMAG - 2))
    sub = octave < 23  # the subnormal octaves come first
    exp_bits = np.where(sub, octave - SUB_OCTAVE_OFFSET, octave - NORMAL_OCTAVE_OFFSET)
    bits = (exp_bits << 23) | mant_bits | low
    v = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    v = np.where(sub, v * 2.0 ** -64, v)
    v = np.where(mag == 0, 0.0, v)
    return np.where(mag == NMAG - 1, np.inf, v)


def _split(index):
    b = np.asarray(index, dtype=np.int64)
    neg = b < NMAG
    mag = np.where(neg, NMAG - 1 - b, b - NMAG)
    return neg, mag


def bin_edges(index) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) float32 value that lands in each bin, as float64.

    The smallest member is the threshold that flags exactly this bin and every bin
    above it ("anomaly iff t >= threshold").
    """
    neg, mag = _split(index)
    small = _mag_to_abs(mag, np.zeros_like(mag))
    big = _mag_to_abs(mag, np.full_like(mag, SIG_MASK))
    # a subnormal octave's top bins may lie past the float32 values it holds; harmless
    # (they are never hit), and the bounds stay valid
    smallest = np.where(neg, -big, small)
    largest = np.where(neg, -small, big)
    largest = np.where(neg & (mag == 0), 0.0, largest)
    return smallest, largest


def bin_value(index, sig) -> np.ndarray:
    """The one value (float64) a bin holds where ``sig_single(sig)``; NaN elsewhere."""
    neg, mag = _split(index)
    s = np.asarray(sig).astype(np.int64) & 0xFFFFFFFF
    v = _mag_to_abs(mag, s & SIG_MASK)
    v = np.where(neg, -v, v)
    return np.where(sig_single(s), v, np.nan)
