// Checks of the argument structs at the compiled entry points (CPU and CUDA). Python
// (anomfast/_fused.py) validates shapes, dtypes, devices and contiguity of every buffer
// before it fills these structs; this is the core's own guard against a struct filled
// otherwise (a test, a future binding): what it cannot know (a pointer's extent) it
// cannot check, but every code, count and size it is given is checked, and a violation
// is a std::invalid_argument (a Python ValueError), never a wrong method or an
// out-of-range access.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "methods.h"
#include "views.h"

namespace anomfast {

inline void arg_check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("anomfast core: " + what);
}

inline bool is_logit_dtype(int32_t d) { return d == F32 || d == F16 || d == BF16; }
inline bool is_label_dtype(int32_t d) {
  return d == U8 || d == I8 || d == BOOL || d == I16 || d == I32 || d == I64 || d == U16 || d == U32;
}

// The largest element offset of dims (extent, stride) from the first element, or -1 when
// it does not fit an int64 byte offset (so no offset the cores form can overflow).
inline int64_t max_offset(std::initializer_list<std::pair<int64_t, int64_t>> dims) {
  int64_t total = 0;
  for (const auto& d : dims) {
    int64_t t = 0;
    if (d.first == 0) return 0;  // empty: nothing is read
    if (d.second == INT64_MIN) return -1;  // before negating it (UB)
    const int64_t st = d.second < 0 ? -d.second : d.second;
    if (__builtin_mul_overflow(d.first - 1, st, &t) ||
        __builtin_add_overflow(total, t, &total) || total > INT64_MAX / 8)
      return -1;
  }
  return total;
}

// Returns the pixel count B * H * W.
inline int64_t check_geometry(const InputArgs& a) {
  arg_check(a.B >= 0 && a.C >= 1 && a.H >= 0 && a.W >= 0,
            "shape (B, C, H, W) = (" + std::to_string(a.B) + ", " + std::to_string(a.C) + ", " + std::to_string(a.H) +
                ", " + std::to_string(a.W) + "): B, H, W must be >= 0 and C >= 1");
  arg_check(a.C <= MAX_CLASSES, "class count C = " + std::to_string(a.C) + " is above the supported " +
                                   std::to_string(MAX_CLASSES) + " (the cores keep C x 64 floats of scratch per thread)");
  int64_t bh = 0, n = 0;
  arg_check(!__builtin_mul_overflow(a.B, a.H, &bh) && !__builtin_mul_overflow(bh, a.W, &n), "B * H * W overflows int64");
  arg_check(is_logit_dtype(a.logit_dtype), "logit dtype code " + std::to_string(a.logit_dtype) + " is not F32/F16/BF16");
  arg_check(n == 0 || a.logits_ptr != 0, "logits pointer is null");
  arg_check(max_offset({{a.B, a.ls_b}, {a.C, a.ls_c}, {a.H, a.ls_h}, {a.W, a.ls_w}}) >= 0,
            "the logits' strides overflow int64 offsets");
  if (a.labels_ptr) {
    arg_check(is_label_dtype(a.label_dtype), "label dtype code " + std::to_string(a.label_dtype) + " is unknown");
    arg_check(a.lut_ptr != 0 && a.lut_len >= 1 && a.lut_len <= (int64_t(1) << 32),
              "labels need a label lookup table of 1 .. 2^32 entries");
    arg_check(max_offset({{a.B, a.ys_b}, {a.H, a.ys_h}, {a.W, a.ys_w}}) >= 0, "the labels' strides overflow int64 offsets");
  }
  arg_check(a.counters_ptr != 0, "counters pointer is null");
  return n;
}

// Both return the pixel count B * H * W.
inline int64_t check_fused_args(const FusedArgs& a) {
  const int64_t n = check_geometry(a);
  arg_check(a.n_methods >= 0 && a.n_methods <= MAX_METHODS,
            "n_methods = " + std::to_string(a.n_methods) + " is outside 0.." + std::to_string(MAX_METHODS));
  for (int j = 0; j < a.n_methods; ++j) {
    const int32_t m = a.methods[j];
    arg_check(is_method(m), "method code " + std::to_string(m) + " is not in the method table (methods.h)");
    const uint32_t needs = METHOD_TABLE[m].needs;
    if (needs & NEED_HEAT) arg_check(a.heat_m_ptr != 0, "heat needs heat_m_ptr");
    if (needs & NEED_EXT) arg_check(a.ext_ptr != 0, "an external method needs ext_ptr");
    if (m == SML) arg_check(a.sml_mean_ptr != 0 && a.sml_inv_std_ptr != 0, "sml needs its statistics pointers");
  }
  arg_check(a.temperature > 0.0f && a.temperature < INFINITY && a.heat_temperature > 0.0f && a.heat_temperature < INFINITY,
            "temperatures must be finite numbers > 0, got " + std::to_string(a.temperature) + " and " +
                std::to_string(a.heat_temperature));
  if (a.labels_ptr) arg_check(a.hist_ptr != 0 && a.occ_ptr != 0, "labels given but no histogram buffers");
  if (a.sig_mask) arg_check(a.sig_ptr != 0, "sig_mask set but no signature buffer");
  arg_check((a.sig_mask >> (a.n_methods < 31 ? a.n_methods : 31)) == 0, "sig_mask names a method past n_methods");
  arg_check(a.flush_every >= 0, "flush_every must be >= 0");
  return n;
}

inline int64_t check_fit_args(const FitArgs& a) {
  const int64_t n = check_geometry(a);
  arg_check(a.count_ptr != 0 && a.sum_ptr != 0 && a.sumsq_ptr != 0, "fit outputs (count, sum, sumsq) are null");
  return n;
}

}  // namespace anomfast
