// Score math, written once for the CPU (g++) and CUDA (nvcc) cores.
//
// Every score is "higher = more anomalous". Per pixel with logits l_c (c < C),
//   m = max_c l_c, k = argmax_c l_c (first maximum), e_c = exp(l_c - m),
//   S' = sum_{c != k} e_c  (so sum_c e_c = 1 + S'),
//   max_logit : -m
//   msp       : -max softmax = -1 / (1 + S')
//   energy    : -T * logsumexp(l / T) = -(m + T * log(sum_c exp((l_c - m) / T)))
//   sml       : -(m - mean[k]) / std[k]
//   entropy   : H(p) = log(1 + S') - sum_c e_c (l_c - m) / (1 + S')   [/ log C]
//   gen       : sum_c p_c^g (1 - p_c)^g                                [gamma g]
//   heat      : (w_E E + w_M M + w_K K) / (w_E + w_M + w_K)          [see heat_* below]
//   external  : a coordinate computed outside the core, binned as it is
//
// Bin coordinate. The histograms bin a per-method coordinate t that is an increasing
// function of the score. It is the score itself for every method but msp, whose
// coordinate is u = 1 - max softmax = S' / (1 + S') (= score + 1). float32 cannot
// tell -max softmax apart from -1 once max softmax > 1 - 6e-8, which confident
// networks reach on most pixels; S' keeps full relative precision there, so msp is
// resolved as finely as the other methods. The per-pixel maps hold t; Python turns
// msp's t back into the score (t - 1).
//
// exp/log are Cephes-style polynomials (about 1-2 ulp) written with plain float and
// integer arithmetic so that the CPU loops over pixels vectorize without -ffast-math
// and the CUDA build computes bit-for-bit the same formulas.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "methods.h"

// On the host, internal linkage: the CPU kernel is compiled once per instruction set
// (CMakeLists.txt) and these bodies differ between those objects (score_fma, and what the
// compiler contracts), so an out-of-line copy must never be shared between them (one
// merged copy could run AVX code on a CPU without it). Static member functions (pixel.h:
// Logit) cannot be static in that sense: ANOMFAST_HD_MEMBER forces them inline instead.
#if defined(__CUDACC__)
#define ANOMFAST_HD __host__ __device__ __forceinline__
#define ANOMFAST_HD_MEMBER __host__ __device__ __forceinline__
#else
#define ANOMFAST_HD static inline
#if defined(__GNUC__)
#define ANOMFAST_HD_MEMBER __attribute__((always_inline)) inline
#else
#define ANOMFAST_HD_MEMBER inline
#endif
#endif

namespace anomfast {

ANOMFAST_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
ANOMFAST_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// NaN or +-inf (exponent field all ones).
ANOMFAST_HD bool nonfinite_bits(uint32_t u) { return (u & 0x7f800000u) == 0x7f800000u; }

// IEEE half -> float, branch-free so it vectorizes. Normals and subnormals by scaling
// the shifted bits by 2^112; inf/NaN by forcing the float exponent to all ones.
ANOMFAST_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float mag = u2f(em << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t bits = f2u(mag);
  bits = (em >= 0x7c00u) ? ((em << 13) | 0x7f800000u) : bits;
  return u2f(bits | sign);
}
ANOMFAST_HD float bf16_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }

// a * b + c rounded once (a fused multiply-add), for the polynomials of exp and log: one
// instruction on the GPU (FFMA, also with -fmad=false) and on the CPU builds with FMA
// (AVX2, AVX-512; any target whose compiler defines __FP_FAST_FMAF, e.g. aarch64). The
// baseline x86-64 build has no FMA instruction (and fmaf would be a libm call that stops
// the loops from vectorizing): it rounds the exact product a * b (48 bits fit a double)
// plus c to double, then to float, in SSE2 doubles, which makes its class loops about 3x
// slower than before (bench/RESULTS.md; AVX2 / AVX-512 CPUs never run it). That double
// rounding can differ from one rounding in general, but not for any input of fast_exp
// (finite), fast_exp_nonpos (x <= 0 or NaN) or fast_log (positive normals, the only
// inputs it is given): tests/test_score_math.py checks these equal to their hardware-FMA
// forms on every such float32, so every build computes the same bits.
ANOMFAST_HD float score_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FP_FAST_FMAF) || defined(__FMA__) || defined(ANOMFAST_SCORE_HW_FMA)
  return fmaf(a, b, c);
#else
  return (float)((double)a * (double)b + (double)c);
#endif
}

// exp's range reduction: t = x / ln2 + 1.5 * 2^23 rounds x / ln2 to the nearest
// integer n = t - 1.5 * 2^23 (no floor call, vectorizes on SSE2); while |n| < 2^22 the
// low mantissa bits of t hold n itself.
constexpr float EXP_ROUND = 12582912.0f;  // 1.5 * 2^23
ANOMFAST_HD float exp_round(float x) { return score_fma(x, 1.44269504088896341f, EXP_ROUND); }

// exp(x - n ln2), |x - n ln2| <= ln2 / 2: the polynomial part of exp (Cephes' expf
// coefficients, evaluated with fused multiply-adds). n * 0.693359375 is exact (|n| <= 128,
// 9 significant bits), so the first step is the exact x - n ln2_hi rounded once.
ANOMFAST_HD float exp_reduced(float x, float n) {
  float r = score_fma(-n, 0.693359375f, x);
  r = score_fma(n, 2.12194440e-4f, r);
  float z = r * r;
  float p = score_fma(1.9875691500E-4f, r, 1.3981999507E-3f);
  p = score_fma(p, r, 8.3334519073E-3f);
  p = score_fma(p, r, 4.1665795894E-2f);
  p = score_fma(p, r, 1.6666665459E-1f);
  p = score_fma(p, r, 5.0000001201E-1f);
  return score_fma(p, z, r) + 1.0f;
}

// Below this exp gives 0 (exp(-87.33654) is about FLT_MIN: 2^n stays a normal float).
constexpr float EXP_ZERO_BELOW = -87.33654f;

// exp(x). Inputs below -87.3 give 0 (they only appear as e_c = exp(l_c - m) of
// negligible classes), above 88.7 are clamped.
ANOMFAST_HD float fast_exp(float x) {
  x = x < EXP_ZERO_BELOW ? EXP_ZERO_BELOW : x;
  x = x > 88.72283f ? 88.72283f : x;
  float n = exp_round(x) - EXP_ROUND;
  float p = exp_reduced(x, n);
  int32_t ni = (int32_t)n;
  // 2^n built in two halves so n = -126 .. 128 never overflows the exponent field
  int32_t n1 = ni >> 1, n2 = ni - n1;
  float s1 = u2f((uint32_t)(n1 + 127) << 23), s2 = u2f((uint32_t)(n2 + 127) << 23);
  float out = p * s1 * s2;
  return x <= EXP_ZERO_BELOW ? 0.0f : out;
}

// fast_exp(x) for x <= 0 (and NaN), bit for bit (checked on every such float32, both
// score_fma forms, 2026-12-02), in fewer operations: the hot loops' exp(l_c - m). Where
// the result is kept (x > EXP_ZERO_BELOW, or NaN) n = -126 .. 0, so 2^n is one float,
// read straight off the bits of t (no float -> int conversion, no upper clamp), and
// p * 2^n rounds once like p * s1 * s2 (p * s1 is exact). The CPU msp pass got ~15%
// faster with it. No lower clamp either: at and below EXP_ZERO_BELOW (-inf included) the
// computed value is garbage (n < -126 wraps the exponent field, -inf gives NaN) and the
// select returns 0, so clamping x first would only change what is thrown away (one
// max per class and pixel less in the CUDA class loops; tests/test_score_math.py checks
// every non-positive float and NaN against the clamped fast_exp).
ANOMFAST_HD float fast_exp_nonpos(float x) {
  float t = exp_round(x);
  float p = exp_reduced(x, t - EXP_ROUND);
  float out = p * u2f((f2u(t) + 127u) << 23);  // (n + 127) << 23: the bits above 9 shift out
  return x <= EXP_ZERO_BELOW ? 0.0f : out;
}

// The device forms below: on the GPU, and in the host emulation of the CUDA kernels
// (csrc/cuda/emulate), whose bit-identity test with the CPU core then checks them.
#if defined(__CUDA_ARCH__) || defined(ANOMFAST_CUDA_EMULATE)
#define ANOMFAST_DEVICE_FORMS 1
#else
#define ANOMFAST_DEVICE_FORMS 0
#endif

// The per-class terms of the class loops, with e = fast_exp_nonpos(d), d = l_c - m <= 0
// (NaN when a logit is not finite: such pixels are never binned, their maps hold NaN).
// Both cores add them in class order 0 .. C - 1. On the device they take forms a few
// instructions cheaper with the same value wherever the pixel is finite (on the host the
// form the CPU core has always computed: GCC contracts the neighbouring sums of its
// vectorized loops differently with another form, which changes their last bits).
//
// S' = sum_{c != k} e_c: class c's term, 0 for the argmax k (whose e is 1); the CPU core
// adds it (0 * e is +0 for e >= 0), the CUDA kernel skips the add for k (fused_cuda.cu:
// add_s1, the same sum).
ANOMFAST_HD float s1_term(float e, bool is_k) {
  return (float)(int32_t)!is_k * e;  // via int32: GCC vectorizes a signed conversion, not a bool one
}

// The entropy sum sx = sum_c e_c (l_c - m): class c's term. Where e is 0 the term is 0:
// finite logits further apart than the float32 range give d = -inf, and 0 * -inf would
// make the entropy NaN (the float64 reference gives 0 there). The device clamps d at
// EXP_ZERO_BELOW instead (one max, where the host's compare and select are two): at and
// below EXP_ZERO_BELOW e is 0, so the term is -0 or +0 either way, and sx (never -0) is
// unchanged by both.
ANOMFAST_HD float entropy_term(float e, float d) {
#if ANOMFAST_DEVICE_FORMS
  return e * (d < EXP_ZERO_BELOW ? EXP_ZERO_BELOW : d);
#else
  return e * (d < EXP_ZERO_BELOW ? 0.0f : d);
#endif
}

// a / b in the coordinate formulas (msp, entropy, log1p's correction: 1 <= b <= C). The
// CUDA kernel's opt-in fast mode (ANOMFAST_CUDA_FAST, device code) takes the hardware
// reciprocal and a multiply (__fdividef: at most 2 ulp off for such b, where the IEEE
// division costs ~9 instructions and an out-of-line slow path); everywhere else a / b.
ANOMFAST_HD float score_div(float a, float b) {
#if defined(__CUDA_ARCH__) && defined(ANOMFAST_CUDA_FAST) && ANOMFAST_CUDA_FAST
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

// log(x) for finite x > 0 (normal range).
ANOMFAST_HD float fast_log(float x) {
  uint32_t u = f2u(x);
  int32_t e = (int32_t)((u >> 23) & 0xffu) - 126;
  float m = u2f((u & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  float f = small ? (m + m - 1.0f) : (m - 1.0f);
  float z = f * f;
  // Cephes' logf coefficients, evaluated with fused multiply-adds (score_fma)
  float y = score_fma(7.0376836292E-2f, f, -1.1514610310E-1f);
  y = score_fma(y, f, 1.1676998740E-1f);
  y = score_fma(y, f, -1.2420140846E-1f);
  y = score_fma(y, f, 1.4249322787E-1f);
  y = score_fma(y, f, -1.6668057665E-1f);
  y = score_fma(y, f, 2.0000714765E-1f);
  y = score_fma(y, f, -2.4999993993E-1f);
  y = score_fma(y, f, 3.3333331174E-1f);
  y = y * f * z;
  float fe = (float)e;
  y = score_fma(fe, -2.12194440e-4f, y);
  y = score_fma(-0.5f, z, y);
  float out = f + y;
  out = out + fe * 0.693359375f;  // fe * 0.693359375 is exact (|fe| <= 150, 9 significant bits)
  return out;
}

// log(1 + x) for x >= 0: a short series below 1e-3, where 1 + x would round away x;
// above, log(u) of u = fl(1 + x) corrected by the rounding of that sum, (u - 1 - x) / u
// (u - 1 is exact): log(u) alone is off by up to half an ulp of 1 relative to x, 5e-5 at
// x = 6e-3 (the energy of a 2-class network with a margin of 5 lost 4 digits).
ANOMFAST_HD float fast_log1p(float x) {
  float series = x * (1.0f - x * (0.5f - x * (0.33333333f - 0.25f * x)));
  float u = 1.0f + x;
  float corrected = fast_log(u) - score_div((u - 1.0f) - x, u);
  return x < 1e-3f ? series : corrected;
}

// One class's GEN term p^g (1 - p)^g, in logs: log p = (l_c - m) - log z exactly (p itself
// may underflow: p = e^-100 still gives p^0.1 = 4.5e-5), 1 - p without cancellation:
// (z - e_c) / z for c != k, S' / z for the argmax. d = l_c - m <= 0, z = 1 + S',
// lz = log z; the exponent is <= 0 in exact arithmetic (clamped against rounding).
ANOMFAST_HD float gen_term(float d, bool is_k, float s1, float z, float lz, float gamma) {
  const float e = fast_exp_nonpos(d);
  const float one_minus = is_k ? s1 : (z - e);
  const float l1 = fast_log(one_minus > 0.0f ? one_minus : 1.0f) - lz;
  const float a = gamma * ((d - lz) + l1);
  const float term = fast_exp_nonpos(a < 0.0f ? a : 0.0f);
  return one_minus > 0.0f ? term : 0.0f;
}

// gen_term with e = fast_exp_nonpos(d) passed in, for a core that has it from the S' pass
// (the CUDA kernel keeps it in registers). The same operations on the same values as
// gen_term, so the same bits.
ANOMFAST_HD float gen_term_e(float d, float e, bool is_k, float s1, float z, float lz, float gamma) {
  const float one_minus = is_k ? s1 : (z - e);
  const float l1 = fast_log(one_minus > 0.0f ? one_minus : 1.0f) - lz;
  const float a = gamma * ((d - lz) + l1);
  const float term = fast_exp_nonpos(a < 0.0f ? a : 0.0f);
  return one_minus > 0.0f ? term : 0.0f;
}

// Everything a pixel's scores need, accumulated over the class loop.
struct PixelSums {
  float m;       // max logit
  int32_t k;     // argmax (first)
  float s1;      // S' = sum_{c != k} exp(l_c - m)
  float sT;      // S'_T = sum_{c != k} exp((l_c - m) / T) (energy with T != 1)
  float sx;      // sum_c exp(l_c - m) * (l_c - m)      (entropy)
  float gen;     // sum_c p_c^g (1 - p_c)^g             (gen, filled in a later loop)
};

// -T logsumexp(l / T) = -(m + T log1p(S'_T)) from the pixel's sums (sT = S'_T, T != 1):
// log1p of the sum without the argmax's own term 1, as for T = 1, so that energies just
// below -m keep their relative precision (log(1 + S'_T) rounded 1 + 2.4e-6 to 8 bits).
ANOMFAST_HD float energy_score(float m, float s1, float sT, float temperature) {
  return temperature == 1.0f ? -(m + fast_log1p(s1)) : -(m + temperature * fast_log1p(sT));
}

// Entropy of the softmax in nats, clamped at 0 (rounding can dip below for one-hot pixels).
ANOMFAST_HD float entropy_score(float s1, float sx) {
  float h = fast_log1p(s1) - score_div(sx, 1.0f + s1);
  return h < 0.0f ? 0.0f : h;
}

// energy_score for T = 1 and entropy_score with log1p(S') = fast_log1p(s1) passed in: the
// same operations in the same order, so the same bits, for a core that computes log1p(S')
// once for both methods (the CUDA kernel; the compiler does not merge the two calls).
ANOMFAST_HD float energy_score_t1(float m, float log1p_s1) { return -(m + log1p_s1); }
ANOMFAST_HD float entropy_score_l1p(float s1, float sx, float log1p_s1) {
  float h = log1p_s1 - score_div(sx, 1.0f + s1);
  return h < 0.0f ? 0.0f : h;
}

// Bin coordinate of one method (see the header comment); `z` = 1 + S'.
// HEAT and EXTERNAL need more than one pixel's logits and are computed by the cores
// with the heat_* pieces below; here they return 0.
ANOMFAST_HD float method_coord(int32_t method, const PixelSums& s, float temperature,
                               float sml_mean_k, float sml_inv_std_k, float inv_log_c,
                               int32_t entropy_normalize) {
  float z = 1.0f + s.s1;
  switch (method) {
    case MAX_LOGIT:
      return -s.m;
    case MSP:  // u = 1 - max softmax
      return score_div(s.s1, z);
    case ENERGY:
      return energy_score(s.m, s.s1, s.sT, temperature);
    case SML:
      return -(s.m - sml_mean_k) * sml_inv_std_k;
    case ENTROPY: {
      float h = entropy_score(s.s1, s.sx);
      return entropy_normalize ? h * inv_log_c : h;
    }
    case GEN:
      return s.gen;
    default:  // HEAT / EXTERNAL are not per-pixel (is_per_pixel_method); codes are checked at entry
      return 0.0f;
  }
}

// ---------------------------------------------------------------------------- HEAT
// Per pixel, p = softmax(l), all neighbourhoods 3x3 with zeros outside the image and a
// fixed divisor 9 (avg_pool2d(count_include_pad=True)):
//   E   = energy_score(...) with heat's own temperature
//   M   = min_c Mahalanobis distance of the pixel's feature vector (computed in Python
//         with a matrix product at the feature resolution, upsampled bilinearly)
//   K   = sum_c p_c log((p_c + 1e-8) / (q_c + 1e-8)),  q = 3x3 mean of p
//   H   = entropy of p;  r = sum_c (p_c - 1/C)^2;  v = 3x3 mean of r
//   w_E = 1 / (H + 1e-6),  w_M = 1,  w_K = 1 / (v + 1e-6), normalized to sum 1
//   heat = (w_E E + M + w_K K) / (w_E + 1 + w_K), standardized: (heat - mean) * inv_std
// The 1e-6 floors keep the weights finite for one-hot pixels (H = 0) and uniform
// neighbourhoods (v = 0, e.g. C = 1), where they reach 1e6 and the score tends to the
// mean of the terms with the largest weights instead of dividing by zero.
constexpr float HEAT_EPS_KL = 1e-8f;
constexpr float HEAT_EPS_W = 1e-6f;

// softmax probability of one class from l_c - m and 1 / sum_c exp(l_c - m)
ANOMFAST_HD float softmax_p(float l_minus_m, float inv_z) { return fast_exp(l_minus_m) * inv_z; }

// one class's term of K; q >= p / 9 (the centre is in its own neighbourhood), so the
// ratio lies in [1e-8 / (1 + 1e-8), 9] and the log never sees 0 or a denormal
ANOMFAST_HD float heat_kl_term(float p, float q) {
  return p * fast_log((p + HEAT_EPS_KL) / (q + HEAT_EPS_KL));
}

// one class's term of r (spread of p around the uniform distribution)
ANOMFAST_HD float heat_spread_term(float p, float inv_c) {
  float d = p - inv_c;
  return d * d;
}

ANOMFAST_HD float heat_combine(float E, float M, float K, float H, float v, float mean, float inv_std) {
  float wE = 1.0f / (H + HEAT_EPS_W);
  float wK = 1.0f / (v + HEAT_EPS_W);
  float raw = (wE * E + M + wK * K) / (wE + 1.0f + wK);
  return (raw - mean) * inv_std;
}

}  // namespace anomfast
