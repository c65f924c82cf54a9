// The method table: the one place where a method's code, name and per-pixel needs are
// written. The Method enum, the needs both cores compute, the validation of codes at the
// compiled entry points and the constants Python reads (_C.METHODS: {name: code}) all
// come from it; adding a method is a row here plus its formula (score_math.h:
// method_coord) and its Python parameters (anomfast/methods.py).
#pragma once
#include <cstdint>

namespace anomfast {

// What a method's coordinate needs from a pixel's class loop (score_math.h: PixelSums).
enum MethodNeed : uint32_t {
  NEED_S1 = 1u << 0,    // S' = sum_{c != k} e^(l_c - m)
  NEED_TEMP = 1u << 1,  // energy: S' at T = 1, else S_T = sum_{c != k} e^((l_c - m) / T)
  NEED_SX = 1u << 2,    // sum_c (l_c - m) e^(l_c - m) (entropy)
  NEED_GEN = 1u << 3,   // the GEN sum
  NEED_HEAT = 1u << 4,  // 3x3 neighbourhoods and the Mahalanobis map (true H x W geometry)
  NEED_EXT = 1u << 5,   // a precomputed coordinate map (FusedArgs.ext_ptr)
};

// X(ENUM, code, name, needs); codes are 0, 1, 2, ... in this order (checked below)
#define ANOMFAST_METHOD_TABLE(X)                              \
  X(MAX_LOGIT, 0, "max_logit", 0u)                            \
  X(MSP, 1, "msp", NEED_S1)                                   \
  X(ENERGY, 2, "energy", NEED_TEMP)                           \
  X(SML, 3, "sml", 0u)                                        \
  X(ENTROPY, 4, "entropy", NEED_S1 | NEED_SX)                 \
  X(GEN, 5, "gen", NEED_S1 | NEED_GEN)                        \
  X(HEAT, 6, "heat", NEED_S1 | NEED_SX | NEED_HEAT)           \
  X(EXTERNAL, 7, "external", NEED_EXT)

enum Method : int32_t {
#define AF_METHOD_ENUM(E, code, name, needs) E = code,
  ANOMFAST_METHOD_TABLE(AF_METHOD_ENUM)
#undef AF_METHOD_ENUM
};

struct MethodRow {
  int32_t code;
  const char* name;
  uint32_t needs;
};

constexpr MethodRow METHOD_TABLE[] = {
#define AF_METHOD_ROW(E, code, name, needs) {code, name, needs},
    ANOMFAST_METHOD_TABLE(AF_METHOD_ROW)
#undef AF_METHOD_ROW
};
constexpr int32_t N_METHOD_KINDS = int32_t(sizeof(METHOD_TABLE) / sizeof(METHOD_TABLE[0]));

constexpr bool method_codes_are_dense(int32_t i = 0) {
  return i == N_METHOD_KINDS || (METHOD_TABLE[i].code == i && method_codes_are_dense(i + 1));
}
static_assert(method_codes_are_dense(), "method codes must be 0, 1, ... in table order");

// A code the table defines (every entry point checks each requested method with this:
// an unknown code is an error, never another method).
constexpr bool is_method(int32_t code) { return code >= 0 && code < N_METHOD_KINDS; }

// The methods whose coordinate is a function of one pixel's class loop (method_coord).
constexpr bool is_per_pixel_method(int32_t code) {
  return is_method(code) && !(METHOD_TABLE[code].needs & (NEED_HEAT | NEED_EXT));
}

// The per-pixel methods come first in the table (codes 0 .. N_PER_PIXEL - 1): the CUDA
// kernel's coordinate arrays and compile-time method sets are indexed by their codes.
constexpr int32_t count_per_pixel(int32_t i = 0) {
  return i < N_METHOD_KINDS && is_per_pixel_method(i) ? 1 + count_per_pixel(i + 1) : 0;
}
constexpr int32_t N_PER_PIXEL = count_per_pixel();
constexpr bool none_per_pixel_from(int32_t i) {
  return i == N_METHOD_KINDS || (!is_per_pixel_method(i) && none_per_pixel_from(i + 1));
}
static_assert(none_per_pixel_from(N_PER_PIXEL), "per-pixel methods must come before HEAT / EXTERNAL-like rows");

// The union of the needs of a set of methods given as bits (1 << code).
constexpr uint32_t needs_of_kinds(int32_t kinds, int32_t i = 0) {
  return i == N_METHOD_KINDS ? 0u : (((kinds >> i) & 1) ? METHOD_TABLE[i].needs : 0u) | needs_of_kinds(kinds, i + 1);
}

template <int32_t KINDS>
struct KindsNeeds {  // needs_of_kinds as a compile-time constant (usable in device code)
  static constexpr uint32_t value = needs_of_kinds(KINDS);
};

// Which sums the class loop computes for a list of (checked) method codes: the union of
// their needs, energy's as S' at T = 1 and S_T otherwise. Both cores call it on the host.
struct ClassLoopNeeds {
  bool s1 = false, sT = false, sx = false, gen = false, heat = false;
};

inline ClassLoopNeeds class_loop_needs(const int32_t* methods, int n_methods, float temperature) {
  ClassLoopNeeds f;
  for (int j = 0; j < n_methods; ++j) {
    const uint32_t n = METHOD_TABLE[methods[j]].needs;
    f.s1 = f.s1 || (n & NEED_S1) || ((n & NEED_TEMP) && temperature == 1.0f);
    f.sT = f.sT || ((n & NEED_TEMP) && temperature != 1.0f);
    f.sx = f.sx || (n & NEED_SX);
    f.gen = f.gen || (n & NEED_GEN);
    f.heat = f.heat || (n & NEED_HEAT);
  }
  return f;
}

}  // namespace anomfast
