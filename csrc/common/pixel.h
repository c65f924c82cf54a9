// What happens to a pixel, written once for the CPU and CUDA cores: the logit and label
// dtype switches and conversions, the label rule (raw value -> LabelClass through the
// lookup table) and the classification of a pixel into exactly one counter (views.h:
// Counter).
#pragma once
#include <cstdint>
#include <type_traits>
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "score_math.h"  // ANOMFAST_HD
#include "views.h"

namespace anomfast {

// The storage type of logit dtype DT and its exact conversion to float (every half and
// bfloat16 is a float). On the device fp16 uses the hardware conversion, also exact (a
// NaN stays a NaN; its payload may differ, but a NaN pixel is never binned).
template <int DT>
struct Logit;
template <>
struct Logit<F32> {
  using T = float;
  ANOMFAST_HD_MEMBER static float to_float(float v) { return v; }
};
template <>
struct Logit<F16> {
  using T = uint16_t;
  ANOMFAST_HD_MEMBER static float to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return half_to_float(h);
#endif
  }
};
template <>
struct Logit<BF16> {
  using T = uint16_t;
  ANOMFAST_HD_MEMBER static float to_float(uint16_t h) { return bf16_to_float(h); }
};

// Calls f(std::integral_constant<int, DT>{}) for logit dtype code dt (host code: the
// cores' one switch from the run-time dtype to their templates). Codes are checked at
// the entry points (checks.h).
template <class F>
inline void with_logit_dtype(int32_t dt, F&& f) {
  switch (dt) {
    case F16: f(std::integral_constant<int, F16>{}); break;
    case BF16: f(std::integral_constant<int, BF16>{}); break;
    default: f(std::integral_constant<int, F32>{}); break;
  }
}

// Compile-time flag passed to with_label_type's callback.
template <bool B>
struct IsBool {
  static constexpr bool value = B;
};

// Calls f(T{}, IsBool<b>{}) with the storage type T of label dtype code dt; BOOL is
// stored as bytes, read through label_raw as 0 / 1 (any nonzero byte is true). Codes are
// checked at the entry points (checks.h), so the default is I64. Returns what f returns.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // f runs where the caller runs (a device lambda in the kernels)
#endif
template <class F>
ANOMFAST_HD auto with_label_type(int32_t dt, F&& f) {
  switch (dt) {
    case U8: return f(uint8_t{}, IsBool<false>{});
    case BOOL: return f(uint8_t{}, IsBool<true>{});
    case I8: return f(int8_t{}, IsBool<false>{});
    case I16: return f(int16_t{}, IsBool<false>{});
    case U16: return f(uint16_t{}, IsBool<false>{});
    case I32: return f(int32_t{}, IsBool<false>{});
    case U32: return f(uint32_t{}, IsBool<false>{});
    default: return f(int64_t{}, IsBool<false>{});
  }
}

// A stored label as the raw value the lookup table is indexed by.
template <bool IS_BOOL, class T>
ANOMFAST_HD int64_t label_raw(T v) {
  return IS_BOOL ? (int64_t)(v != 0) : (int64_t)v;
}

// The label class of raw label value `raw`: lut[raw - lut_offset] inside the table,
// LABEL_INVALID outside. Unsigned: well defined near the int64 limits, and a negative
// difference wraps past lut_len, so one comparison checks both ends.
ANOMFAST_HD int32_t label_class(int64_t raw, const int8_t* lut, int64_t lut_offset, int64_t lut_len) {
  const uint64_t v = (uint64_t)raw - (uint64_t)lut_offset;
  return v < (uint64_t)lut_len ? (int32_t)lut[v] : (int32_t)LABEL_INVALID;
}

// The one counter a pixel goes to, as 0 / 1 flags (exactly one set), branch-free so that
// the CPU's loops over pixels vectorize. `bad`: some logit of the pixel, or some
// method's coordinate, is not finite. A class the label classes do not define (only a
// hand-filled table holds one: LabelMap.lut writes 0 .. 3) counts as invalid.
struct PixelFate {
  int32_t is_void, invalid, nonfinite, binned;
};

// Scoring passes: void, then invalid, then non-finite, then binned (normal and anomaly
// pixels alike).
ANOMFAST_HD PixelFate pixel_fate(int32_t cls, int32_t bad) {
  const int32_t labelled = (int32_t)(cls == LABEL_NORMAL) | (int32_t)(cls == LABEL_ANOMALY);
  const int32_t is_void = (int32_t)(cls == LABEL_VOID);
  return PixelFate{is_void, (labelled | is_void) ^ 1, labelled & bad, labelled & (bad ^ 1)};
}

// The SML fit: only normal pixels are in-distribution data; anomaly pixels count as
// void (not used), invalid labels as invalid, normal pixels with a non-finite logit as
// non-finite.
ANOMFAST_HD PixelFate fit_fate(int32_t cls, int32_t bad) {
  const int32_t normal = (int32_t)(cls == LABEL_NORMAL);
  const int32_t is_void = (int32_t)(cls == LABEL_ANOMALY) | (int32_t)(cls == LABEL_VOID);
  return PixelFate{is_void, (normal | is_void) ^ 1, normal & bad, normal & (bad ^ 1)};
}

// Adds a pixel's fate to per-thread counters indexed by Counter.
template <class T>
ANOMFAST_HD void count_fate(T (&cnt)[N_COUNTERS], const PixelFate& f) {
  cnt[CNT_VOID] += (T)f.is_void;
  cnt[CNT_INVALID] += (T)f.invalid;
  cnt[CNT_NONFINITE] += (T)f.nonfinite;
  cnt[CNT_BINNED] += (T)f.binned;
}

}  // namespace anomfast
