// Plain argument structs shared by the CPU and CUDA cores and filled from Python.
//
// The compiled core sees no framework types: Python (anomfast/_fused.py) checks
// shapes, dtypes and devices, then passes raw pointers (as integers), shapes and
// element strides. All strides are in elements, not bytes.
//
//   logits  : (B, C, H, W) of dtype `logit_dtype`, strides ls_b, ls_c, ls_h, ls_w
//   labels  : (B, H, W) integers of dtype `label_dtype`, strides ys_b, ys_h, ys_w
//   lut     : int8[lut_len]; lut[v - lut_offset] is the label class of raw value v
//             (LABEL_NORMAL / LABEL_ANOMALY / LABEL_VOID / LABEL_INVALID)
//   hist    : int64 (n_methods, 2, NBINS) contiguous; [m][0] normal, [m][1] anomaly
//   sig     : uint32 (n_methods, 2, NBINS) contiguous, the bins' tie signatures: every
//             binned coordinate t of method j ORs bin_sig(t) into its slot (binning.h),
//             for the methods j whose bit is set in sig_mask; the others' rows are not
//             touched (Python reads a signature only where the coordinate is the exact
//             score, anomfast.methods.EXACT_COORDINATES, and skipping the rest saves the
//             CPU core a second randomly written array per method)
//   occ     : uint8 [(n_methods * 2 * NBINS + 2^OCC_SHIFT - 1) >> OCC_SHIFT]: the core
//             sets occ[slot >> OCC_SHIFT] = 1 for every flat slot of hist it adds to
//             (never clears), so Python reads only the blocks that hold counts
//   maps    : float32 (n_methods, B, H, W) contiguous or 0 (no per-pixel output);
//             holds each method's *bin coordinate* (see score_math.h)
//   heat_m  : float32 (B, H, W) contiguous, method HEAT only: the feature-space
//             Mahalanobis term M, already upsampled to the logits' size (Python)
//   ext     : float32 (n_ext, B, H, W) contiguous, method EXTERNAL only: per-pixel
//             coordinates computed outside the core (SML with boundary suppression /
//             smoothing, user scores); the i-th EXTERNAL entry of `methods` reads ext[i]
//   counters: int64[N_COUNTERS], see Counter
//
// heat_m, ext and maps are indexed like the core's (B, H, W) geometry, which Python may
// fold (see anomfast/_fused.py: _geometry); contiguous maps index the same either way.
#pragma once
#include <cstdint>

#include "methods.h"

namespace anomfast {

enum DType : int32_t {
  F32 = 0, F16 = 1, BF16 = 2,
  U8 = 10, I16 = 11, I32 = 12, I64 = 13, I8 = 14, BOOL = 15, U16 = 16, U32 = 17,  // labels
};

// Method codes: methods.h (the method table). HEAT needs heat_m_ptr and the true
// (unfolded) H x W geometry (3x3 neighbourhoods); EXTERNAL bins a precomputed map (ext_ptr).
constexpr int MAX_METHODS = 8;
// At most 2^16 classes (a segmentation network has a few thousand at most): the CPU
// core's per-thread scratch, C x 64 floats (HEAT: 4 C x 80 more), stays below ~100 MB.
constexpr int64_t MAX_CLASSES = int64_t(1) << 16;

// What the fused entry returns (the CPU core; CUDA reports through exceptions).
enum FusedStatus : int32_t { FUSED_OK = 0, FUSED_NO_MEMORY = 1 };

enum LabelClass : int8_t { LABEL_NORMAL = 0, LABEL_ANOMALY = 1, LABEL_VOID = 2, LABEL_INVALID = 3 };

enum Counter : int32_t {
  CNT_NONFINITE = 0,  // valid (non-void) pixels with a NaN/inf logit, or a non-finite HEAT /
                      // EXTERNAL coordinate: skipped for every method, never binned
  CNT_INVALID = 1,    // pixels whose label value is not in the label map: skipped
  CNT_VOID = 2,       // void pixels: skipped
  CNT_BINNED = 3,     // pixels added to the histograms
  N_COUNTERS = 4
};

// What both passes read and where they report: the logits, the labels with their lookup
// table (labels_ptr == 0: no labels, only maps / fitting on every pixel), the pixel
// counters, and how they run. FusedArgs and FitArgs add their own outputs.
struct InputArgs {
  // logits
  int64_t logits_ptr = 0;
  int32_t logit_dtype = F32;
  int64_t B = 0, C = 0, H = 0, W = 0;
  int64_t ls_b = 0, ls_c = 0, ls_h = 0, ls_w = 0;
  // labels
  int64_t labels_ptr = 0;
  int32_t label_dtype = U8;
  int64_t ys_b = 0, ys_h = 0, ys_w = 0;
  int64_t lut_ptr = 0;
  int64_t lut_offset = 0, lut_len = 0;
  int64_t counters_ptr = 0;        // int64[N_COUNTERS], accumulated into
  // execution
  int32_t num_threads = 0;         // CPU: 0 = OpenMP default
  int64_t stream = 0;              // CUDA: cudaStream_t as an integer
};

struct FusedArgs : InputArgs {
  // methods, in output order
  int32_t n_methods = 0;
  int32_t methods[MAX_METHODS] = {0};
  float temperature = 1.0f;        // energy
  int64_t sml_mean_ptr = 0;        // float32[C]
  int64_t sml_inv_std_ptr = 0;     // float32[C]
  float gen_gamma = 0.1f;          // gen
  int32_t entropy_normalize = 0;   // entropy / log C
  // heat: (w_E E + M + w_K K) / (w_E + 1 + w_K), then (. - heat_mean) * heat_inv_std
  int64_t heat_m_ptr = 0;          // float32 (B, H, W) contiguous
  float heat_temperature = 1.0f;   // T of heat's energy term (independent of `temperature`)
  float heat_mean = 0.0f;          // standardization fitted on in-distribution data
  float heat_inv_std = 1.0f;       //   (0 and 1: raw score)
  // external coordinates
  int64_t ext_ptr = 0;             // float32 (n_ext, B, H, W) contiguous
  // outputs
  int64_t hist_ptr = 0;            // int64 (n_methods, 2, NBINS), accumulated into
  int64_t sig_ptr = 0;             // uint32 (n_methods, 2, NBINS), OR-ed into (with hist)
  int32_t sig_mask = 0;            // bit j set: method j's signatures are filled (others untouched)
  int64_t occ_ptr = 0;             // uint8 occupancy of hist's 2^OCC_SHIFT-slot blocks (with hist)
  int64_t maps_ptr = 0;            // float32 (n_methods, B, H, W) or 0
  // execution
  int64_t flush_every = 0;         // CPU: pixels a thread counts privately before adding them to
                                   //   hist (0 = 2^31, so counts cannot overflow); tests lower it
};

// SML fitting: per predicted class k = argmax_c l_c, accumulate the count, the sum
// and the sum of squares of the max logit. Only pixels whose label class is
// LABEL_NORMAL are used when labels are given; otherwise every pixel.
struct FitArgs : InputArgs {
  int64_t count_ptr = 0;   // int64[C]
  int64_t sum_ptr = 0;     // float64[C]
  int64_t sumsq_ptr = 0;   // float64[C]
};

}  // namespace anomfast
