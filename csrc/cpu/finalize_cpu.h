// From the fused core's histogram buffers to metrics: the sparse read-out of a HistState
// and the histogram finalization of anomfast.metrics (its NumPy code is the spec; this
// is the same arithmetic in one pass, for the fixed cost of evaluate()). Python
// (anomfast/histogram.py) checks every buffer and passes pointers as integers.
//
// sparse_readout: hist int64 (M, 2, NBINS), sig uint32 (M, 2, NBINS), occ uint8 [n_occ]
//   (views.h: FusedArgs); meta int64[M x READOUT_META], per method j: the number of bins,
//   the total normal and anomaly counts (exact, saturated at 2^62 + 1: larger totals are
//   refused by the caller), 1 if some count is negative (a corrupt state) else 0, the
//   finalization status (below), and 2^OCC_SHIFT times the chunks that may hold method j's
//   counts (the bound, from the occupancy map). By mode (ReadoutMode):
//   READOUT_BOUNDS: only the bound; reads the occupancy map alone.
//   READOUT_COUNT: the exact number of bins in meta[j][0] (a walk over the counts).
//   READOUT_READ / READOUT_READ_CLEAR: per method the ascending bins with a count in either
//     label row: index, normal, anomaly, sig (int64[capacity[j]] each, at the addresses
//     outputs[j][0..3]; sig the uint32 OR of both rows' signatures; every item of the
//     four is written, so the outputs may be uninitialized memory). READ_CLEAR also zeroes the counts
//     and signatures of every occupied block it reads (the caller then zeroes occ): the
//     state is empty again, its pages stay backed, so a pooled state costs no page faults
//     on its next pass. The caller compares the bound (and, after a COUNT call, the
//     number of bins) with its earlier call's: a difference means the state changed in
//     between (another thread adding to it).
//   READOUT_CLEAR: only zeroes the occupied blocks.
//   Methods run in parallel (OpenMP, longest first). Returns 0; -1 when some method has
//   more bins than its capacity (the state changed: its outputs are incomplete, and with
//   READ_CLEAR the state is partly cleared: the caller clears the rest, occ still marking
//   it); -2 for an unknown mode. fin_exact_ptr != 0 (uint8[M], method j's exact_values)
//   with a READ mode: each method is finalized on its thread right after its read-out,
//   as finalize_hists does with these arrays (conventions fpr_mode / ap_mode /
//   tpr_target, out double[M x FIN_NF], iout int64[M x FIN_NI]); meta[j][4] = 0 done, -1
//   where finalize_hist returns -1, READOUT_NOT_FINALIZED where not asked or not
//   finalizable (negative counts, totals above 2^62: the caller refuses those histograms).
//
// finalize_hist: a group table of n rows, pos / neg int64[n] (non-negative counts summing
//   to at most 2^62), with per row either tied uint8[n] or sig int64[n] (tied where
//   exact_values and the signature shows one value) or neither (no tie groups).
//   descending != 0: row 0 is the highest score; else the rows ascend (a Histogram's
//   sparse arrays, bins as index) and are walked from the last. Runs of rows without
//   positives are merged and empty groups dropped, as anomfast.histogram.finalize_coords
//   and metrics_from_groups do. fpr_mode: FinFprMode, ap_mode: FinApMode. A table of at least split_min_rows rows is walked in two halves (of about equal work) on two
//   OpenMP threads. Outputs (anomfast.metrics.GroupSums, exact=False):
//     out  double[FIN_NF]: the FinOut fields below (NaN where not computed)
//     iout int64[FIN_NI]: the FinIOut fields below (rows index the input arrays)
//   Returns 0, or -1 when a chosen group is not a single row (cannot happen for a
//   checked table: the caller raises).
#pragma once
#include <cstdint>
#include <utility>

namespace anomfast {

enum FinFprMode : int32_t { FIN_FIRST = 0, FIN_STRICT = 1, FIN_INTERP = 2 };  // metrics.FPR_MODES
enum FinApMode : int32_t { FIN_STEP = 0, FIN_TRAPEZOID = 1 };                 // metrics.AP_MODES
enum FinOut : int32_t {
  FIN_AUROC = 0, FIN_AUROC_HALF, FIN_AP, FIN_AP_LOWER, FIN_AP_UPPER,
  FIN_FPR, FIN_FPR_LOWER, FIN_FPR_UPPER, FIN_F1, FIN_F1_UPPER, FIN_NF
};
enum FinIOut : int32_t {
  FIN_P = 0, FIN_N, FIN_GROUPS,
  FIN_FPR_ROW,      // the crossing group's row (-1 when N == 0)
  FIN_FPR_TIED,
  FIN_FPR_A, FIN_FPR_F, FIN_FPR_POS, FIN_FPR_NEG,  // its TP / FP before it and its counts:
                                                   // Python finishes a non-tie first/strict value
  FIN_F1_ROW, FIN_ALL_TIED,
  FIN_F1_FIRST, FIN_F1_LAST,  // the first and last row (descending scores) of the groups that may
                              // hold the exact best-F1 threshold: the best group, and every group
                              // with positives, not a tie group, whose F1 upper bound reaches the
                              // attained F1 (less F1_CANDIDATE_SLACK); -1 when P == 0
  FIN_NI
};
constexpr double F1_CANDIDATE_SLACK = 1e-12;  // metrics._EPS

// bin_bounds: (lo, hi) coordinates of bin `index` with OR-ed signature `sig` (uint32 in an
//   int64): its smallest / largest float32 value (float64), both the one value it holds
//   where the signature shows a single value (anomfast.histogram._bin_lo_hi: binning.py's
//   bin_edges / bin_value, which the tests check it against bin for bin).
using BinBounds = std::pair<double, double>;
BinBounds bin_bounds_cpu(int64_t index, int64_t sig);

enum ReadoutMode : int32_t { READOUT_BOUNDS = 0, READOUT_COUNT, READOUT_READ, READOUT_READ_CLEAR, READOUT_CLEAR };
constexpr int64_t READOUT_META = 6;            // sparse_readout's meta columns per method
constexpr int64_t READOUT_NOT_FINALIZED = 1;    // meta[j][4]: no finalization done
constexpr int64_t READOUT_FINALIZABLE = 2;      // (internal: read out, counts fit the finalization)
int64_t sparse_readout_cpu(int64_t hist_ptr, int64_t sig_ptr, int64_t occ_ptr, int64_t n_methods,
                           int64_t capacity_ptr, int64_t outputs_ptr, int64_t meta_ptr, int64_t mode,
                           int64_t fin_exact_ptr, int64_t fpr_mode, int64_t ap_mode, double tpr_target,
                           int64_t out_ptr, int64_t iout_ptr);

// finalize_hists: finalize_hist of several histograms' sparse arrays at once, one method
//   per thread (OpenMP, longest first; each walked whole, not in halves): table int64[n_hists
//   x 5] = (n rows, anomaly ptr, normal ptr, sig ptr, exact_values) per histogram, rows
//   ascending (descending = 0); out double[n_hists x FIN_NF], iout int64[n_hists x FIN_NI].
//   Returns 0, or -1 when some histogram's finalize_hist does.
int64_t finalize_hists_cpu(int64_t n_hists, int64_t table_ptr, int64_t fpr_mode, int64_t ap_mode, double tpr_target,
                           int64_t out_ptr, int64_t iout_ptr);

int64_t finalize_hist_cpu(int64_t n, int64_t pos_ptr, int64_t neg_ptr, int64_t tied_ptr, int64_t sig_ptr,
                          int64_t exact_values, int64_t descending, int64_t fpr_mode, int64_t ap_mode,
                          double tpr_target, int64_t split_min_rows, int64_t out_ptr, int64_t iout_ptr);

}  // namespace anomfast
