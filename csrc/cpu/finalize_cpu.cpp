// Sparse read-out of the histogram buffers and histogram finalization; see finalize_cpu.h
// for the arguments and anomfast/metrics.py for every formula (its NumPy code is the
// spec). Every quotient that decides something (TPR against the target, F1 maxima,
// precisions) is computed with the operations metrics.py uses, in its order; values that
// are only summed may differ by an ulp (products with 1/P, 1/N), and the sums are
// compensated, so the metrics agree with the spec to a few ulps and the chosen groups
// (thresholds) exactly (tests/test_finalize.py). Built with -ffp-contract=off
// (CMakeLists.txt): a fused multiply-add would round a decision differently.
#include "finalize_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/binning.h"

namespace anomfast {

namespace {

constexpr int64_t OCC_BLOCK = int64_t(1) << OCC_SHIFT;
static_assert(OCC_BLOCK <= 64, "a chunk's non-empty bins fit one 64-bit mask");
constexpr int64_t TOTAL_CAP = (int64_t(1) << 62) + 1;  // totals above 2^62 are refused by the caller

// The 2^OCC_SHIFT-bin chunks of a method's bin range [0, NBINS) that may hold counts,
// ascending, each with its label rows (bit 0 normal, bit 1 anomaly): a chunk is listed
// when an occupied block holds one of its slots. NBINS is not a multiple of the block, so
// a row's chunks are offset from its blocks and a block can list two chunks (or straddle
// two rows). Sparse: data touching a few octaves occupies a few thousand of the ~71k
// chunks, and walking all of them cost more than reading the occupied ones.
struct LiveChunk {
  int64_t chunk;
  uint8_t rows;
};

std::vector<LiveChunk> live_chunks(const uint8_t* occ, int64_t method) {
  std::vector<int64_t> per_row[2];
  for (int lab = 0; lab < 2; ++lab) {
    std::vector<int64_t>& out = per_row[lab];
    const int64_t base = (2 * method + lab) * NBINS;
    const int64_t first = base >> OCC_SHIFT, last = (base + NBINS - 1) >> OCC_SHIFT;
    auto push = [&](int64_t c) {
      if (out.empty() || out.back() != c) out.push_back(c);
    };
    for (int64_t q = first; q <= last;) {
      if ((q & 63) == 0 && q + 64 <= last + 1) {  // 64 empty blocks at once (most are)
        uint64_t w[8], any = 0;
        std::memcpy(w, occ + q, 64);
        for (int k = 0; k < 8; ++k) any |= w[k];
        if (any == 0) {
          q += 64;
          continue;
        }
      }
      if ((q & 7) == 0 && q + 8 <= last + 1) {
        uint64_t w;
        std::memcpy(&w, occ + q, 8);
        if (w == 0) {
          q += 8;
          continue;
        }
      }
      if (occ[q]) {
        const int64_t lo = std::max<int64_t>(q * OCC_BLOCK - base, 0);
        const int64_t hi = std::min<int64_t>((q + 1) * OCC_BLOCK - base, NBINS) - 1;
        push(lo >> OCC_SHIFT);
        push(hi >> OCC_SHIFT);
      }
      ++q;
    }
  }
  // merge the two ascending lists
  std::vector<LiveChunk> live;
  live.reserve(per_row[0].size() + per_row[1].size());
  size_t a = 0, b = 0;
  while (a < per_row[0].size() || b < per_row[1].size()) {
    const int64_t ca = a < per_row[0].size() ? per_row[0][a] : INT64_MAX;
    const int64_t cb = b < per_row[1].size() ? per_row[1][b] : INT64_MAX;
    const int64_t c = std::min(ca, cb);
    live.push_back({c, (uint8_t)((ca == c ? 1 : 0) | (cb == c ? 2 : 0))});
    a += ca == c;
    b += cb == c;
  }
  return live;
}

// Neumaier's compensated sum: within an ulp or two of the exact sum, so the difference
// from NumPy's pairwise sum is NumPy's own rounding error.
struct Sum {
  double s = 0.0, c = 0.0;
  void add(double x) {
    const double t = s + x;
    c += std::fabs(s) >= std::fabs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  double value() const { return s + c; }
  void merge(const Sum& o) {
    add(o.s);
    c += o.c;
  }
};

// psi(x + p) - psi(x) for x >= 10 (metrics._asym_psi_diff, the same series and order;
// the negative powers by products, not pow(): they differ from NumPy's y ** -k by an
// ulp of terms below 1e-4)
double asym_psi_diff(double x, double p) {
  const double y = x + p;
  double d = std::log1p(p / x);
  d += p / (2.0 * x * y);
  d += p * (x + y) / (12.0 * ((x * y) * (x * y)));
  static const double c[6] = {1.0 / 120, -1.0 / 252, 1.0 / 240, -1.0 / 132, 691.0 / 32760, -1.0 / 12};
  const double iy2 = 1.0 / (y * y), ix2 = 1.0 / (x * x);
  double yk = iy2 * iy2, xk = ix2 * ix2;  // y^-4, x^-4
  for (int i = 0; i < 6; ++i) {
    d += c[i] * (yk - xk);
    yk *= iy2;
    xk *= ix2;
  }
  return d;
}

// H(K + p) - H(K) (metrics._harmonic_diff): direct terms up to 10, then the series.
double harmonic_diff(int64_t K, int64_t p) {
  const double x = (double)K + 1.0;
  const double pf = (double)p;
  if (x >= 10.0) return asym_psi_diff(x, pf);
  const double steps = std::min(pf, 10.0 - x);
  double acc = 0.0;
  for (int i = 0; i < 9; ++i)
    if (i < steps) acc += 1.0 / (x + i);
  const double rest = pf - steps;
  if (rest > 0) acc += asym_psi_diff(10.0, rest);
  return acc;
}

// sum_{j=1..p} (a+j)/(a+f+n+j) (metrics._ap_step_lower_terms, one group).
constexpr int64_t AP_DIRECT_TERMS = 8;  // metrics.AP_DIRECT_TERMS
double ap_step_lower_term(int64_t a, int64_t f, int64_t p, int64_t n) {
  if (p == 0) return 0.0;
  const double fn = (double)(f + n);
  const double pf = (double)p;
  if (!(fn > 0)) return pf;
  if (p <= AP_DIRECT_TERMS) {  // the sum itself: most groups of sparse anomalies hold 1-2
    const double af = (double)a, K = (double)(a + f + n);  // positives, and a log1p costs more
    double s = 0.0;
    for (int64_t j = 1; j <= p; ++j) s += (af + (double)j) / (K + (double)j);
    return s;
  }
  return std::max(pf - fn * harmonic_diff(a + f + n, p), 0.0);
}

// One pass over the merged, non-empty groups in descending order (metrics.group_sums).
class Finalizer {
 public:
  Finalizer(int64_t P, int64_t N, int64_t fpr_mode, int64_t ap_mode, double target)
      : P_(P), N_(N), Pf_((double)P), Nf_((double)N), invP_(1.0 / Pf_), invN_(1.0 / Nf_), fpr_mode_(fpr_mode),
        ap_mode_(ap_mode), target_(target) {}

  // continue below a first segment holding tp positives and fp negatives
  void start(int64_t tp, int64_t fp) {
    tp_ = tp;
    fp_ = fp;
    started_ = tp + fp > 0;
    tpr_ = (double)tp / Pf_;
  }

  // fold in the segment that follows this one (started where this one ended)
  void merge(const Finalizer& b) {
    groups_ += b.groups_;
    tp_ = b.tp_;
    fp_ = b.fp_;
    auc_.merge(b.auc_);
    half_.merge(b.half_);
    ap_.merge(b.ap_);
    lower_.merge(b.lower_);
    upper_.merge(b.upper_);
    if (fpr_row_ < 0 && b.fpr_row_ >= 0) {
      fpr_row_ = b.fpr_row_;
      fpr_tied_ = b.fpr_tied_;
      fpr_a_ = b.fpr_a_;
      fpr_f_ = b.fpr_f_;
      fpr_p_ = b.fpr_p_;
      fpr_n_ = b.fpr_n_;
    }
    if (b.have_j_) {
      xj_ = b.xj_;
      yj_ = b.yj_;
      have_j_ = true;
    }
    if (!have_next_ && b.have_next_) {
      have_next_ = true;
      xn_ = b.xn_;
      yn_ = b.yn_;
      fp_next_ = b.fp_next_;
    }
    if (b.f1_ > f1_) {  // the first maximum stays
      f1_ = b.f1_;
      f1_row_ = b.f1_row_;
    }
    f1_upper_ = std::max(f1_upper_, b.f1_upper_);
    all_tied_ = all_tied_ && b.all_tied_;
  }

  void group(int64_t p, int64_t n, bool tied, int64_t row) {
    const int64_t a = tp_, f = fp_;
    const double af = (double)a, ff = (double)f;
    // the precision after the group above (1 at the top): metrics.py's prec[g - 1]
    const double prev = started_ ? af / (af + ff) : 1.0;
    started_ = true;
    ++groups_;
    tp_ += p;
    fp_ += n;
    all_tied_ = all_tied_ && tied;
    const double tpf = (double)tp_, fpf = (double)fp_;
    const double pf = (double)p, nf = (double)n;
    // x / P and x / N of values that are only summed are products with the reciprocals
    // (an ulp per term); quotients that decide (TPR against the target, F1 maxima)
    // are divided as metrics.py divides them
    if (N_ > 0) auc_.add((nf * invN_) * (af + 0.5 * pf));
    if (p == 0) {
      // a group without positives (a merged run) adds 0 to every AP sum and to the
      // AUROC bound, cannot cross the TPR target, and its F1 (and F1 upper bound) is at
      // most the group above's; only the interpolated ROC point moves right
      if (fpr_mode_ == FIN_INTERP && N_ > 0 && tpr_ <= target_) {
        xj_ = tpr_;
        yj_ = fpf * invN_;
        have_j_ = true;
      }
      return;
    }
    if (N_ > 0 && !tied) half_.add((pf * invP_) * (nf * invN_));
    const double prec = tpf / (tpf + fpf);
    const double w = pf * invP_;
    if (ap_mode_ == FIN_STEP) {
      ap_.add(w * prec);
      lower_.add(tied ? w * prec : ap_step_lower_term(a, f, p, n) * invP_);
      upper_.add(tied ? w * prec : w * ((af + pf) / std::max(af + ff + pf, 1.0)));
    } else {
      const double seg = 0.5 * (prev + prec);
      ap_.add(w * 0.5 * (prev + prec));
      const double K = af + ff + nf;
      const double pmin = K > 0 ? af / std::max(K, 1.0) : 1.0;
      const double pmax = std::max(af + ff + pf > 0 ? (af + pf) / std::max(af + ff + pf, 1.0) : 1.0, prev);
      lower_.add(w * (tied ? seg : pmin));
      upper_.add(w * (tied ? seg : pmax));
    }
    tpr_ = tpf / Pf_;
    if (N_ > 0) fpr(tied, a, f, p, n, tpr_, fpf * invN_, row);
    const double f1 = 2.0 * tpf / (tpf + fpf + Pf_);
    if (f1 > f1_) {
      f1_ = f1;
      f1_row_ = row;
    }
    f1_upper_ = std::max(f1_upper_, tied ? f1 : 2.0 * (af + pf) / (Pf_ + af + pf + ff));
  }

  void write(double* out, int64_t* iout) const {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    std::fill(out, out + FIN_NF, nan);
    if (N_ > 0) {
      out[FIN_AUROC] = auc_.value() / Pf_;
      out[FIN_AUROC_HALF] = 0.5 * half_.value();
      double val = 0.0, blo = fpr_f_ / Nf_, bhi = (double)(fpr_f_ + fpr_n_) / Nf_;
      if (fpr_mode_ == FIN_INTERP) {
        val = (xj_ == target_ || !have_next_) ? yj_ : (yn_ - yj_) / (xn_ - xj_) * (target_ - xj_) + yj_;
        bhi = have_next_ ? fp_next_ / Nf_ : 1.0;
      } else if (fpr_tied_) {
        val = blo = bhi;
      } else {
        val = nan;  // needs the smallest TP count reaching the target: finished in Python
      }
      out[FIN_FPR] = val;
      out[FIN_FPR_LOWER] = blo;
      out[FIN_FPR_UPPER] = bhi;
    }
    out[FIN_AP] = ap_.value();
    out[FIN_AP_LOWER] = lower_.value();
    out[FIN_AP_UPPER] = upper_.value();
    out[FIN_F1] = f1_;
    out[FIN_F1_UPPER] = f1_upper_;
    iout[FIN_P] = P_;
    iout[FIN_N] = N_;
    iout[FIN_GROUPS] = groups_;
    iout[FIN_FPR_ROW] = N_ > 0 ? fpr_row_ : -1;
    iout[FIN_FPR_TIED] = fpr_tied_;
    iout[FIN_FPR_A] = fpr_a_;
    iout[FIN_FPR_F] = (int64_t)fpr_f_;
    iout[FIN_FPR_POS] = fpr_p_;
    iout[FIN_FPR_NEG] = fpr_n_;
    iout[FIN_F1_ROW] = f1_row_;
    iout[FIN_ALL_TIED] = all_tied_;
    iout[FIN_F1_FIRST] = iout[FIN_F1_LAST] = f1_row_;
  }

  double f1() const { return f1_; }
  int64_t f1_row() const { return f1_row_; }

 private:
  // the crossing group (first with TPR >= target, > for strict) and, for interp, the
  // last ROC point with TPR <= target and the first one past it
  void fpr(bool tied, int64_t a, int64_t f, int64_t p, int64_t n, double tpr, double fpr, int64_t row) {
    const bool crosses = fpr_mode_ == FIN_STRICT ? tpr > target_ : tpr >= target_;
    if (crosses && fpr_row_ < 0) {
      fpr_row_ = row;
      fpr_tied_ = tied;
      fpr_a_ = a;
      fpr_f_ = f;
      fpr_p_ = p;
      fpr_n_ = n;
    }
    if (fpr_mode_ != FIN_INTERP) return;
    if (tpr <= target_) {
      xj_ = tpr;
      yj_ = fpr;
      have_j_ = true;
    } else if (!have_next_) {
      have_next_ = true;
      xn_ = tpr;
      yn_ = fpr;
      fp_next_ = (double)fp_;
    }
  }

  const int64_t P_, N_;
  const double Pf_, Nf_, invP_, invN_;
  const int64_t fpr_mode_, ap_mode_;
  const double target_;
  int64_t tp_ = 0, fp_ = 0, groups_ = 0;
  Sum auc_, half_, ap_, lower_, upper_;
  double tpr_ = 0.0;  // TP / P after the last group
  int64_t fpr_row_ = -1, fpr_a_ = 0, fpr_p_ = 0, fpr_n_ = 0;
  int64_t fpr_f_ = 0;
  bool fpr_tied_ = false;
  double xj_ = 0.0, yj_ = 0.0, xn_ = 0.0, yn_ = 0.0, fp_next_ = 0.0;
  bool have_j_ = false, have_next_ = false;
  bool started_ = false;  // a group lies above
  double f1_ = -1.0, f1_upper_ = -std::numeric_limits<double>::infinity();
  int64_t f1_row_ = -1;
  bool all_tied_ = true;
};

// |t| of the float32 value in magnitude bin `mag` whose dropped mantissa bits are `low`
// (binning.py: _mag_to_abs, the inverse of binning.h's bin_index; tested bin for bin)
double mag_to_abs(int64_t mag, uint32_t low) {
  if (mag == 0) return 0.0;
  if (mag == BIN_NMAG - 1) return std::numeric_limits<double>::infinity();
  const int64_t m = mag - 1;
  const int64_t octave = m >> BIN_MANT_BITS;
  const uint32_t mant = (uint32_t)(m & ((1 << BIN_MANT_BITS) - 1)) << BIN_DROP_BITS;
  const bool sub = octave < 23;  // the subnormal octaves come first
  const int64_t exp_bits = sub ? octave - BIN_SUB_OCTAVE_OFFSET : octave - BIN_NORMAL_OCTAVE_OFFSET;
  const double v = (double)u2f(((uint32_t)exp_bits << 23) | mant | low);
  return sub ? v * 0x1p-64 : v;
}

}  // namespace

BinBounds bin_bounds_cpu(int64_t index, int64_t sig) {
  const bool neg = index < BIN_NMAG;
  const int64_t mag = neg ? BIN_NMAG - 1 - index : index - BIN_NMAG;
  const uint32_t s = (uint32_t)sig;
  if (sig_single(s)) {
    const double v = mag_to_abs(mag, sig_low(s));
    return {neg ? -v : v, neg ? -v : v};
  }
  const double small = mag_to_abs(mag, 0), big = mag_to_abs(mag, SIG_MASK);
  return {neg ? -big : small, neg ? (mag == 0 ? 0.0 : -small) : big};
}

namespace {

// 0 .. n-1 by descending work(j) (ties in index order): the order in which a dynamic
// OpenMP schedule balances unequal items over the threads.
template <class Work>
std::vector<int64_t> longest_first(int64_t n, Work work) {
  std::vector<int64_t> order((size_t)n);
  for (int64_t j = 0; j < n; ++j) order[(size_t)j] = j;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a) > work(b); });
  return order;
}

// Zeroes n signatures that may hold bits. Most are already zero (only methods whose
// float32 coordinate is the exact score keep signatures, FusedArgs.sig_mask), and their
// rows are often never-written zero pages: reading them is free, writing would back them
// with memory and write them back to it on every clear.
inline void clear_sigs(uint32_t* g, int64_t n) {
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) any |= g[i];
  if (any) std::memset(g, 0, sizeof(uint32_t) * (size_t)n);
}

// One method's read-out (see sparse_readout in finalize_cpu.h).
int64_t readout_method(int64_t* hist, uint32_t* sig, const std::vector<LiveChunk>& live, int64_t method,
                       int64_t capacity, bool clear, int64_t* index, int64_t* normal, int64_t* anomaly,
                       int64_t* sig_out, int64_t* meta) {
  const int64_t base0 = 2 * method * NBINS, base1 = base0 + NBINS;
  int64_t k = 0;
  unsigned __int128 t0 = 0, t1 = 0;  // exact totals: int64 counts may sum past 2^63
  int64_t sign = 0;                  // OR of all counts: negative iff some count is
  static const int64_t zero_counts[OCC_BLOCK] = {};  // an unmarked row is not read (its
  static const uint32_t zero_sigs[OCC_BLOCK] = {};   // pages may be unbacked)
  for (const LiveChunk& chunk : live) {
    const uint8_t rows = chunk.rows;
    const int64_t b0 = chunk.chunk * OCC_BLOCK;
    const int len = (int)std::min<int64_t>(OCC_BLOCK, NBINS - b0);
    const int64_t* h0 = (rows & 1) ? hist + base0 + b0 : zero_counts;
    const int64_t* h1 = (rows & 2) ? hist + base1 + b0 : zero_counts;
    const uint32_t* g0 = (rows & 1) ? sig + base0 + b0 : zero_sigs;
    const uint32_t* g1 = (rows & 2) ? sig + base1 + b0 : zero_sigs;
    // which bins of the chunk hold a count (no data-dependent branch: empty and full
    // bins interleave), then only those are visited
    uint64_t full = 0;
    alignas(64) uint8_t nz[OCC_BLOCK] = {};  // flags as bytes (vectorized), packed 8 at a time by a multiply
    int64_t s = 0;
    for (int i = 0; i < len; ++i) {
      const int64_t either = h0[i] | h1[i];
      s |= either;
      nz[i] = either != 0;
    }
    sign |= s;
    for (int g = 0; g < OCC_BLOCK / 8; ++g) {  // bytes b_0..b_7 in {0, 1} -> bits 0..7
      uint64_t w;
      std::memcpy(&w, nz + 8 * g, 8);
      full |= ((w * 0x0102040810204080ull) >> 56) << (8 * g);
    }
    if (!index) {  // counting call: nothing read out
      k += __builtin_popcountll(full);
    } else if (k + __builtin_popcountll(full) > capacity) {  // the state gained bins since the
      return -1;                                             // capacity was taken
    }
    for (; index && full; full &= full - 1, ++k) {
      const int i = __builtin_ctzll(full);
      const int64_t c0 = h0[i], c1 = h1[i];
      index[k] = b0 + i;
      normal[k] = c0;
      anomaly[k] = c1;
      const uint32_t s = (g0[i] & (0u - (uint32_t)(c0 != 0))) | (g1[i] & (0u - (uint32_t)(c1 != 0)));
      sig_out[k] = (int64_t)s;  // every item written (0 included): the outputs may be reused memory
      t0 += (uint64_t)c0;
      t1 += (uint64_t)c1;
    }
    if (clear) {  // the chunk's marked rows back to zero while they are in cache (only
      for (int lab = 0; lab < 2; ++lab) {  // this method's rows: threads never share one)
        if (!(rows & (1 << lab))) continue;
        const int64_t at = (lab ? base1 : base0) + b0;
        std::memset(hist + at, 0, sizeof(int64_t) * len);
        clear_sigs(sig + at, len);
      }
    }
  }
  const bool negative = sign < 0;
  meta[0] = k;
  meta[1] = (int64_t)std::min<unsigned __int128>(t0, TOTAL_CAP);
  meta[2] = (int64_t)std::min<unsigned __int128>(t1, TOTAL_CAP);
  meta[3] = negative;
  meta[4] = (!negative && t0 + t1 <= (unsigned __int128)(TOTAL_CAP - 1)) ? READOUT_FINALIZABLE : READOUT_NOT_FINALIZED;
  return 0;
}

}  // namespace

int64_t sparse_readout_cpu(int64_t hist_ptr, int64_t sig_ptr, int64_t occ_ptr, int64_t n_methods,
                           int64_t capacity_ptr, int64_t outputs_ptr, int64_t meta_ptr, int64_t mode,
                           int64_t fin_exact_ptr, int64_t fpr_mode, int64_t ap_mode, double tpr_target,
                           int64_t out_ptr, int64_t iout_ptr) {
  auto* hist = reinterpret_cast<int64_t*>(hist_ptr);
  auto* sig = reinterpret_cast<uint32_t*>(sig_ptr);
  const auto* occ = reinterpret_cast<const uint8_t*>(occ_ptr);
  const auto* capacity = reinterpret_cast<const int64_t*>(capacity_ptr);
  const auto* outputs = reinterpret_cast<const int64_t*>(outputs_ptr);
  const auto* fin_exact = reinterpret_cast<const uint8_t*>(fin_exact_ptr);
  auto* meta = reinterpret_cast<int64_t*>(meta_ptr);
  for (int64_t j = 0; j < n_methods; ++j) {
    std::fill(meta + READOUT_META * j, meta + READOUT_META * (j + 1), 0);
    meta[READOUT_META * j + 4] = READOUT_NOT_FINALIZED;
  }
  if (mode == READOUT_CLEAR) {  // zero every occupied block, nothing read
    const int64_t slots = 2 * n_methods * NBINS, n_occ = (slots + OCC_BLOCK - 1) >> OCC_SHIFT;
#pragma omp parallel for schedule(static)
    for (int64_t q0 = 0; q0 < n_occ; q0 += 4096) {
      for (int64_t q = q0; q < std::min(n_occ, q0 + 4096); ++q) {
        if (!occ[q]) continue;
        const int64_t at = q * OCC_BLOCK, len = std::min<int64_t>(OCC_BLOCK, slots - at);
        std::memset(hist + at, 0, sizeof(int64_t) * len);
        clear_sigs(sig + at, len);
      }
    }
    return 0;
  }
  const bool read = mode == READOUT_READ || mode == READOUT_READ_CLEAR;
  if (mode != READOUT_BOUNDS && mode != READOUT_COUNT && !read) return -2;
  std::vector<std::vector<LiveChunk>> live((size_t)n_methods);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t j = 0; j < n_methods; ++j) live[(size_t)j] = live_chunks(occ, j);
  for (int64_t j = 0; j < n_methods; ++j) meta[READOUT_META * j + 5] = OCC_BLOCK * (int64_t)live[(size_t)j].size();
  if (mode == READOUT_BOUNDS) return 0;  // the bound alone: room for every bin of every chunk that may hold counts
  int64_t status = 0;
  // methods are independent (own rows, own outputs): one per thread, the most occupied
  // chunks first (dynamic): longest-first balances unequal methods over the threads (in
  // method order, 4 methods of 58k / 207k / 44k / 300k slots split 402k : 207k over two);
  // a method's finalization follows its read-out on the same thread, while its arrays
  // are still in cache
  const std::vector<int64_t> order = longest_first(n_methods, [&](int64_t j) { return (int64_t)live[(size_t)j].size(); });
#pragma omp parallel for schedule(dynamic, 1) reduction(min : status)
  for (int64_t r = 0; r < n_methods; ++r) {
    const int64_t j = order[(size_t)r];
    auto out = [&](int k) { return read ? reinterpret_cast<int64_t*>(outputs[4 * j + k]) : nullptr; };
    int64_t* m = meta + READOUT_META * j;
    const int64_t st = readout_method(hist, sig, live[(size_t)j], j, read ? capacity[j] : 0,
                                      mode == READOUT_READ_CLEAR, out(0), out(1), out(2), out(3), m);
    status = std::min(status, st);
    if (st != 0 || !read || !fin_exact || m[4] != READOUT_FINALIZABLE) {
      m[4] = READOUT_NOT_FINALIZED;
      continue;
    }
    m[4] = finalize_hist_cpu(m[0], (int64_t)out(2), (int64_t)out(1), 0, (int64_t)out(3), fin_exact[j], 0, fpr_mode,
                             ap_mode, tpr_target, std::numeric_limits<int64_t>::max(), out_ptr + 8 * FIN_NF * j,
                             iout_ptr + 8 * FIN_NI * j);
  }
  return status;
}

int64_t finalize_hist_cpu(int64_t n, int64_t pos_ptr, int64_t neg_ptr, int64_t tied_ptr, int64_t sig_ptr,
                          int64_t exact_values, int64_t descending, int64_t fpr_mode, int64_t ap_mode,
                          double tpr_target, int64_t split_min_rows, int64_t out_ptr, int64_t iout_ptr) {
  const auto* pos = reinterpret_cast<const int64_t*>(pos_ptr);
  const auto* neg = reinterpret_cast<const int64_t*>(neg_ptr);
  const auto* tied_in = reinterpret_cast<const uint8_t*>(tied_ptr);
  const auto* sig = reinterpret_cast<const int64_t*>(sig_ptr);
  auto* out = reinterpret_cast<double*>(out_ptr);
  auto* iout = reinterpret_cast<int64_t*>(iout_ptr);
  int64_t P = 0, N = 0, pos_rows = 0;
  for (int64_t i = 0; i < n; ++i) {
    P += pos[i];
    N += neg[i];
    pos_rows += pos[i] > 0;
  }
  Finalizer fin(P, N, fpr_mode, ap_mode, tpr_target);
  int64_t first = -1, last = -1;  // rows of the groups that may hold the exact best-F1 threshold
  if (P > 0) {
    auto row = [&](int64_t j) { return descending ? j : n - 1 - j; };  // walk position -> row
    auto tied = [&](int64_t i) -> bool {
      if (tied_in) return tied_in[i] != 0;
      return sig && exact_values && sig_single((uint32_t)sig[i]);
    };
    // rows [j0, j1) of the walk into f: a run of rows without positives becomes one
    // group (finalize_coords' _merge_negative_runs: a tie group only when it is one
    // row); empty groups drop
    auto walk = [&](Finalizer& f, int64_t j0, int64_t j1) {
      int64_t run_rows = 0, run_neg = 0;
      bool run_tied = false;
      auto flush = [&] {
        if (run_rows && run_neg > 0) f.group(0, run_neg, run_tied && run_rows == 1, -1);
        run_rows = run_neg = 0;
      };
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = row(j);
        if (pos[i] > 0) {
          flush();
          f.group(pos[i], neg[i], tied(i), i);
        } else {
          if (run_rows == 0) run_tied = tied(i);
          ++run_rows;
          run_neg += neg[i];
        }
      }
      flush();
    };
    // a long table is walked in two halves at once, cut at a row with positives (no
    // run crosses the cut) where half the work is done: a group with positives costs
    // about POS_ROW_COST rows without (its AUROC / AP / bound terms, divisions), and
    // anomalies crowd the top scores, so halves of the rows would not be halves of the
    // work; the second half starts from the first half's totals
    constexpr int64_t POS_ROW_COST = 20;
    int64_t cut = n, tp0 = 0, fp0 = 0;
    if (n >= split_min_rows && n >= 2) {
      const int64_t half_work = (n + (POS_ROW_COST - 1) * pos_rows) / 2;
      int64_t work = 0;
      for (cut = 0; cut < n; ++cut) {
        const int64_t i = row(cut);
        if (work >= half_work && pos[i] > 0) break;
        work += 1 + (POS_ROW_COST - 1) * (pos[i] > 0);
        tp0 += pos[i];
        fp0 += neg[i];
      }
    }
    if (cut > 0 && cut < n) {
      Finalizer second(P, N, fpr_mode, ap_mode, tpr_target);
      second.start(tp0, fp0);
#pragma omp parallel for num_threads(2) schedule(static, 1)
      for (int half = 0; half < 2; ++half) {
        if (half == 0)
          walk(fin, 0, cut);
        else
          walk(second, cut, n);
      }
      fin.merge(second);
    } else {
      walk(fin, 0, n);
    }
    // the groups that may hold the exact best-F1 threshold (metrics.group_sums: f1_first /
    // f1_last): the exact maximum is at least the attained F1 and sits at a positive's
    // score, inside a group with positives whose upper bound 2(a+p)/(P+a+p+f) reaches it.
    // Past f FP above, no bound reaches `need` any more (2P/(2P+f) < need), so the scan
    // stops there: usually early, the best F1 lying among the top scores.
    if (fin.f1_row() >= 0) {
      const double need = fin.f1() - F1_CANDIDATE_SLACK, Pf = (double)P;
      const double f_stop = need > 0 ? 2.0 * Pf * (1.0 - need) / need * (1.0 + 1e-9) + 1.0
                                     : std::numeric_limits<double>::infinity();
      int64_t jfirst = -1, jlast = -1, a = 0, f = 0;
      for (int64_t j = 0; j < n && (double)f <= f_stop; ++j) {
        const int64_t i = row(j), p = pos[i];
        if (p > 0 && !tied(i) && 2.0 * (double)(a + p) / (Pf + (double)(a + p) + (double)f) >= need) {
          if (jfirst < 0) jfirst = j;
          jlast = j;
        }
        a += p;
        f += neg[i];
      }
      const int64_t jbest = row(fin.f1_row());  // row() is its own inverse
      first = row(jfirst < 0 ? jbest : std::min(jfirst, jbest));
      last = row(jlast < 0 ? jbest : std::max(jlast, jbest));
    }
  }
  fin.write(out, iout);
  if (P > 0 && first >= 0) {
    iout[FIN_F1_FIRST] = first;
    iout[FIN_F1_LAST] = last;
  }
  if (P > 0 && (iout[FIN_F1_ROW] < 0 || (N > 0 && iout[FIN_FPR_ROW] < 0))) return -1;
  return 0;
}

int64_t finalize_hists_cpu(int64_t n_hists, int64_t table_ptr, int64_t fpr_mode, int64_t ap_mode, double tpr_target,
                           int64_t out_ptr, int64_t iout_ptr) {
  const auto* table = reinterpret_cast<const int64_t*>(table_ptr);
  const std::vector<int64_t> order = longest_first(n_hists, [&](int64_t j) { return table[5 * j]; });
  int64_t status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(min : status)
  for (int64_t r = 0; r < n_hists; ++r) {
    const int64_t j = order[(size_t)r];
    const int64_t* t = table + 5 * j;
    status = std::min(status, finalize_hist_cpu(t[0], t[1], t[2], 0, t[3], t[4], 0, fpr_mode, ap_mode, tpr_target,
                                                std::numeric_limits<int64_t>::max(), out_ptr + 8 * FIN_NF * j,
                                                iout_ptr + 8 * FIN_NI * j));
  }
  return status;
}

}  // namespace anomfast
