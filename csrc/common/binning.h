// Score -> bin index. No user-chosen range: the bin is read off the float32 bits.
//
// A finite float t = (-1)^s * 2^e * 1.m. Bins are log-linear (as HdrHistogram):
// per sign, each octave e in [-32, 32) is cut into 2^13 equal bins by the top 13
// mantissa bits (relative bin width <= 2^-13 = 1.2e-4); |t| < 2^-32 (zero and
// tiny values) share one bin per sign and |t| >= 2^32 (including inf) one overflow
// bin per sign. Bins are ordered like the values: index increases with t, so the
// histogram is a coarsened sort and every metric can be finalized from it with a
// certified bound (anomfast/metrics.py). -0.0 goes with +0.0. NaN is never binned
// (the cores skip and count non-finite pixels before they get here).
//
// Why this scheme: it needs no calibration pass or first-batch range (the same
// value lands in the same bin in every batch, process and run, so histograms add
// exactly), it resolves every score scale from 2e-10 to 4e9 with the same relative
// precision, and 2^20 + 4 bins x int64 = 8 MiB per method and label.
#pragma once
#include <cstdint>
#include "score_math.h"

namespace anomfast {

constexpr int BIN_MANT_BITS = 13;
constexpr int BIN_EXP_MIN = -32;     // smallest resolved octave: [2^-32, 2^-31)
constexpr int BIN_EXP_COUNT = 64;    // octaves 2^-32 .. 2^31
constexpr int64_t BIN_NMAG = 2 + ((int64_t)BIN_EXP_COUNT << BIN_MANT_BITS);  // per sign
constexpr int64_t NBINS = 2 * BIN_NMAG;                                       // 1048580

ANOMFAST_HD int32_t bin_index(float t) {
  uint32_t u = f2u(t);
  uint32_t mag_bits = u & 0x7fffffffu;
  int32_t e = (int32_t)(mag_bits >> 23) - (127 + BIN_EXP_MIN);  // octave offset
  int32_t mant = (int32_t)((mag_bits >> (23 - BIN_MANT_BITS)) & ((1u << BIN_MANT_BITS) - 1u));
  int32_t mag = 1 + (e << BIN_MANT_BITS) + mant;
  mag = e < 0 ? 0 : mag;
  mag = e >= BIN_EXP_COUNT ? (int32_t)(BIN_NMAG - 1) : mag;
  bool neg = (u >> 31) && mag_bits != 0u;
  return neg ? (int32_t)(BIN_NMAG - 1) - mag : (int32_t)BIN_NMAG + mag;
}

}  // namespace anomfast
