// Score -> bin index, over the whole float32 range. No user-chosen range: the bin is
// read off the float32 bits, so the same value lands in the same bin in every batch,
// process and run, and histograms add exactly.
//
// A finite float t = (-1)^s * 2^e * 1.m. Bins are log-linear (as HdrHistogram): per sign,
// every octave is cut into 2^13 equal bins by the top 13 mantissa bits, so a bin's width
// relative to any value in it is at most 2^-13 = 1.2e-4. The octaves are all 254 normal
// ones (2^-126 .. 2^127) and, below them, the 23 octaves of the subnormals (2^-149 ..
// 2^-127), read off |t| * 2^64, which is normal and exact: subnormals are binned with the
// same relative width as normal values (a subnormal octave holds fewer than 2^13 distinct
// floats, so its bins hold one value or none). Per sign, magnitude bin 0 holds exactly
// zero (-0.0 and +0.0 are one value, in the positive half) and the last magnitude bin
// exactly infinity. Index increases with t, so the histogram is a coarsened sort and
// every metric can be finalized from it with a certified bound (anomfast/metrics.py).
// NaN is never binned (the cores skip and count non-finite pixels before they get here).
//
// Tie signature: a bin drops the 10 low mantissa bits (of |t| * 2^64 for subnormals). The
// cores OR bin_sig(t) = d | (~d & 0x3ff) << 16, d = those bits, into a uint32 per bin:
// all values in the bin are one value iff no bit is set in both halves (sig_single), and
// then that value is known exactly (sig_low). Signatures OR across batches, processes and
// the two label rows, like the counts add.
//
// Memory: 2 * (2 + 277 * 2^13) = 4538372 bins per method and label. The cores mark every
// block of 2^OCC_SHIFT flat slots they add to in an occupancy byte map, so that Python
// allocates the histograms lazily (pages never written are never backed) and finalizes
// only the blocks that hold counts. A block is one cache line of int64 counts, so the
// read-out copies about the lines that hold counts (4-method bench image, 238k non-empty
// bins: 9527 x 64 slots instead of 842 x 1024), for an occupancy map of NBINS / 32 bytes
// per method.
#pragma once
#include <cstdint>
#include "score_math.h"

namespace anomfast {

constexpr int BIN_MANT_BITS = 13;
constexpr int BIN_DROP_BITS = 23 - BIN_MANT_BITS;   // 10 mantissa bits a bin does not resolve
constexpr int BIN_OCTAVES = 23 + 254;               // subnormal + normal octaves
constexpr int BIN_SUB_OCTAVE_OFFSET = -42;           // octave of a subnormal: exponent of |t| 2^64 - 42
constexpr int BIN_NORMAL_OCTAVE_OFFSET = 22;         // octave of a normal: its biased exponent + 22
constexpr int64_t BIN_NMAG = 2 + ((int64_t)BIN_OCTAVES << BIN_MANT_BITS);  // per sign: zero, octaves, inf
constexpr int64_t NBINS = 2 * BIN_NMAG;                                     // 4538372
constexpr int OCC_SHIFT = 6;  // occupancy: one byte per 64 flat slots (one 512-byte line of int64 counts)
constexpr uint32_t SIG_MASK = (1u << BIN_DROP_BITS) - 1u;

static_assert(NBINS < (int64_t(1) << 30), "bin indices (and the CUDA key bin << 1 | label) fit in 31 bits");
static_assert((int64_t)8 * 2 * NBINS < (int64_t(1) << 31),
              "flat private slots of 8 methods x 2 labels fit the CPU core's int32 slot indices");
static_assert(BIN_DROP_BITS <= 16, "a tie signature's two halves fit a uint32");

// |t|'s bits, normalized: subnormals scaled by 2^64 (exact), everything else as it is.
ANOMFAST_HD uint32_t bin_norm_bits(uint32_t mag_bits) {
  const bool sub = mag_bits < 0x00800000u;
  return sub ? f2u(u2f(mag_bits) * 18446744073709551616.0f) : mag_bits;  // 2^64
}

ANOMFAST_HD int32_t bin_index(float t) {
  const uint32_t u = f2u(t);
  const uint32_t mag_bits = u & 0x7fffffffu;
  const bool sub = mag_bits < 0x00800000u;
  const uint32_t b = bin_norm_bits(mag_bits);
  // (branch-free integer form, about half the instructions of the select chain it replaced;
  // checked equal to that form on all 2^32 bit patterns, NaNs included, 2026-12-02)
  // magnitude bin: 1 + (octave << 13) + the top 13 mantissa bits, i.e. b >> 10 plus a
  // constant per kind of value. Zero (b = 0 on the subnormal side) comes out negative and
  // clamps to 0; infinity (exponent field 255: the octave after the last normal one, 0
  // mantissa) is exactly BIN_NMAG - 1 by the normal formula; NaN clamps there too.
  constexpr int32_t SUB_ADD = 1 + BIN_SUB_OCTAVE_OFFSET * (1 << BIN_MANT_BITS);
  constexpr int32_t NORMAL_ADD = 1 + BIN_NORMAL_OCTAVE_OFFSET * (1 << BIN_MANT_BITS);
  int32_t mag = (int32_t)(b >> BIN_DROP_BITS) + (sub ? SUB_ADD : NORMAL_ADD);
  mag = mag < 0 ? 0 : mag;
  mag = mag > (int32_t)(BIN_NMAG - 1) ? (int32_t)(BIN_NMAG - 1) : mag;
  // all ones for a negative nonzero value (-0.0 counts as +0.0): u & -mag_bits keeps the
  // sign bit only when mag_bits != 0. Negative values mirror below BIN_NMAG:
  // BIN_NMAG + ~mag = BIN_NMAG - 1 - mag.
  const int32_t neg = (int32_t)(u & (0u - mag_bits)) >> 31;
  return (int32_t)BIN_NMAG + (mag ^ neg);
}

// The tie signature of t (see the header comment); OR it into the bin's uint32.
ANOMFAST_HD uint32_t bin_sig(float t) {
  const uint32_t d = bin_norm_bits(f2u(t) & 0x7fffffffu) & SIG_MASK;
  return d | ((~d & SIG_MASK) << 16);
}

// A kept signature is never 0 (each bit position is set in one half or the other); 0
// means none was kept (FusedArgs.sig_mask clear, an empty bin): not a tie.
ANOMFAST_HD bool sig_single(uint32_t s) { return s != 0u && ((s & SIG_MASK) & (s >> 16)) == 0u; }
ANOMFAST_HD uint32_t sig_low(uint32_t s) { return s & SIG_MASK; }

}  // namespace anomfast
