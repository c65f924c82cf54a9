// Fused CUDA core: logits -> every requested method's bin coordinate -> per-method,
// per-label int64 histograms, in one launch on the caller's stream; and the SML fit.
// Argument shapes and units: fused_cuda.h and ../common/views.h.
//
// One thread per pixel, or per group of 2 (4 for max_logit alone and for fp16 / bf16 with
// the 4-method sets: max_group) neighbouring pixels along W where the logits are
// contiguous along W with aligned offsets and C is one the kernels are specialized for
// (group_ok and the dispatch): then each class of the group is one vector load (8 or 16
// bytes of float32, 4 or 8 of fp16 / bf16), and the loop's addressing and walk are paid
// once per group (bench/sass_budget.py); fp16 / bf16 groups also find each pixel's max
// logit and screen for non-finite logits on the packed halves, two pixels an instruction,
// and keep them packed, converting each logit where it is used (load_half_group,
// group_logit). Consecutive threads take consecutive pixels (groups) of the flattened
// (B, H, W) index, which runs along W, so for NCHW logits each class is read by a warp as
// one coalesced line (channels-last and other strides work, one pixel a turn, with more
// sectors per load). The grid is persistent (as many blocks as fit on the device at once),
// each block walking the pixels with a grid-sized stride; every thread of a warp runs the
// same number of iterations, so the warp-wide votes below always see all 32 lanes. A
// thread's pixel moves by the grid's size each turn: its (h, w) and element offsets are
// stepped with at most two carries (Walk), so no turn divides; the label is loaded first,
// so its latency hides behind the score math.
//
// The per-pixel math is score_math.h's, called in the same order as the CPU core
// (class loops from 0 to C - 1, the same accumulators). Built with -fmad=false (the
// default, ANOMFAST_CUDA_FMAD=OFF) it gives the bits of the CPU core's baseline build:
// the same float operations, except that the exp / log polynomials' fused multiply-adds
// (score_math.h: score_fma) are FFMAs here and exact double-rounded emulations there,
// checked equal on every input (the AVX2+FMA CPU build contracts other expressions and
// differs in the last bits). ANOMFAST_CUDA_FAST (opt-in) trades that for speed:
// hardware exp2, reciprocal divisions and FMA contraction (exp_nonpos below, score_math.h:
// score_div; CMakeLists.txt).
//
// Compile-time specialization (with_kernel_config, the one switch): the logit dtype; the
// class count (C = 19 and 21 exactly, so class loops unroll without guards; any other
// C <= CREG in registers with c < C guards; larger C re-read from global memory in each
// pass, which then mostly hits L1/L2); and the method set (max_logit alone and the two
// common 4-method sets compute only their own sums and coordinates; any other list runs
// the generic kernel, which checks the requested kinds at run time).
// bench/sass_budget.py counts the resulting SASS instructions per pixel.
//
// ANOMFAST_CUDA_EMULATE compiles this file with a host C++ compiler against
// emulate/cuda_emulation.h (a thread per CUDA thread), so that CPU-only CI runs these
// kernels (tests/test_cuda_build.py).
//
// Histograms: (M, 2, NBINS) int64 in global memory (8 MiB per method and label, too big
// for shared memory). Lanes of a warp whose pixels fall into the same bin add once
// (__match_any_sync + popcount), which matters for ties: fp16/bf16 logits and very
// confident pixels put many neighbours in one bin, and same-address atomics serialize.
// The lane that adds also marks the slot's block in occ (a byte store of 1, skipped when
// it is already set; concurrent stores of the same value are benign) and, for the methods
// in FusedArgs.sig_mask, ORs its group's tie signatures (binning.h: bin_sig, OR-reduced
// over the group) into sig with one atomicOr; the other methods compute no signature.
// The pixel counters go through a warp sum and a shared-memory sum per block; one global
// atomic per counter and block.
//
// SML fit: per predicted class count / sum / sum of squares of the max logit; lanes
// predicting the same class are reduced in the warp first, then added into per-block
// shared-memory partials (C <= FIT_SMEM_C) that are flushed once per block, or straight
// into global memory for larger C. Sums are float64 atomics, so their last bits depend
// on the order blocks finish in (as the CPU core's depend on its thread order).
#if defined(ANOMFAST_CUDA_EMULATE)
#include "emulate/cuda_emulation.h"  // host threads stand in for the GPU: tests only
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "../common/binning.h"
#include "../common/checks.h"
#include "../common/pixel.h"
#include "../common/score_math.h"
#include "../common/views.h"
#include "cuda_host.h"
#include "fused_cuda.h"

#ifndef ANOMFAST_CUDA_ARCHS
#define ANOMFAST_CUDA_ARCHS "unknown"
#endif
#ifndef ANOMFAST_CUDA_FMAD
#define ANOMFAST_CUDA_FMAD 0
#endif
#ifndef ANOMFAST_CUDA_FAST
#define ANOMFAST_CUDA_FAST 0
#endif

namespace anomfast {
namespace {

constexpr int THREADS = 256;
constexpr int CREG = 32;              // logits per pixel held in registers
constexpr int LUT_SMEM_MAX = 4096;    // label tables up to this many entries go to shared memory
constexpr int FIT_SMEM_C = 256;       // SML fit: per-block shared partials up to this many classes
constexpr unsigned FULL = 0xffffffffu;

std::atomic<int> g_hist_aggregation{1};
std::atomic<int64_t> g_debug_grid{0};  // tests / gpu_check: cap on the grid's blocks (0: none)
std::atomic<int> g_pixel_group_cap{4};  // tests / gpu_check: the largest pixel group (1: one pixel a turn)

// ------------------------------------------------------------------ device helpers

#if !defined(ANOMFAST_CUDA_EMULATE)
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_[];
  return smem_;
}
#endif

__device__ __forceinline__ int lane_id() { return (int)(threadIdx.x & 31u); }

// Bits of the lanes below / above this one (the %lanemask_lt / %lanemask_gt special
// registers on the device: one read each, where shifts by the lane cost two instructions).
__device__ __forceinline__ unsigned lanes_below() {
#if defined(ANOMFAST_CUDA_EMULATE)
  return (1u << lane_id()) - 1u;
#else
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
#endif
}
__device__ __forceinline__ unsigned lanes_above() {
#if defined(ANOMFAST_CUDA_EMULATE)
  return 0xfffffffeu << lane_id();
#else
  unsigned m;
  asm("mov.u32 %0, %%lanemask_gt;" : "=r"(m));
  return m;
#endif
}

template <int DT>
__device__ __forceinline__ float load_logit(const void* base, int64_t off) {
  return Logit<DT>::to_float(__ldg(static_cast<const typename Logit<DT>::T*>(base) + off));
}

// The half of word w that holds pixel j of a pair (pixel j & 1 of the word).
__device__ __forceinline__ uint16_t half_of(unsigned w, int j) { return (uint16_t)(w >> (16 * (j & 1))); }

// fp16 / bf16: PX halves from p (aligned to PX of them) in PX / 2 32-bit words, one
// load; pixel j in half j & 1 of word j / 2 (the low half of word 0 holds p[0]).
template <int PX>
__device__ __forceinline__ void load_half_words(const uint16_t* p, unsigned (&w)[PX / 2]) {
  static_assert(PX == 2 || PX == 4, "groups of 2 or 4 pixels");
  if constexpr (PX == 2) {
    w[0] = __ldg(reinterpret_cast<const unsigned*>(p));
  } else {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  }
}

// Logits off .. off + PX - 1 (one class of PX neighbouring pixels along W) with one vector
// load: 4 * PX bytes for float32, 2 * PX for fp16 / bf16. The caller guarantees the
// alignment (group_ok on the host: W-stride 1, offsets multiple of PX, an aligned base).
template <int DT, int PX>
__device__ __forceinline__ void load_logit_group(const void* base, int64_t off, float (&x)[PX]) {
  using T = typename Logit<DT>::T;
  const T* p = static_cast<const T*>(base) + off;
  if constexpr (sizeof(T) == 4 && PX == 2) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    x[0] = v.x;
    x[1] = v.y;
  } else if constexpr (sizeof(T) == 4 && PX == 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  } else {
    unsigned w[PX / 2];
    load_half_words<PX>(p, w);
#pragma unroll
    for (int j = 0; j < PX; ++j) x[j] = Logit<DT>::to_float(half_of(w[j / 2], j));
  }
}

// max.NaN / min.NaN.{f16x2, bf16x2} in software, for the host emulation and devices
// before sm_80 (which lack the instructions): per 16-bit lane, a NaN (0x7fff) when either
// input is NaN, else the larger (MAX) / smaller input; on a tie (-0 and +0, or equal
// values) the first.
template <int DT, bool MAX>
__device__ __forceinline__ unsigned half2_minmax_soft(unsigned a, unsigned b) {
  unsigned d = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint16_t x = half_of(a, j), y = half_of(b, j);
    const float fx = Logit<DT>::to_float(x), fy = Logit<DT>::to_float(y);
    const uint16_t r = (fx != fx || fy != fy) ? (uint16_t)0x7fffu : ((MAX ? fy > fx : fy < fx) ? y : x);
    d |= (unsigned)r << (16 * j);
  }
  return d;
}

// Two halves at once (fp16 or bf16 by DT; one pixel in each 16-bit lane of a 32-bit
// word): the larger (MAX) / smaller of each lane of a and b, NaN when either is NaN (PTX
// max.NaN / min.NaN, sm_80+: one HMNMX2 for two pixels, or one VHMNMX for three inputs).
// Exact (a selection); which of -0 and +0 a tie returns is not specified, and the two
// share a bin.
template <int DT, bool MAX>
__device__ __forceinline__ unsigned half2_minmax_nan(unsigned a, unsigned b) {
#if defined(ANOMFAST_CUDA_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800)
  return half2_minmax_soft<DT, MAX>(a, b);
#else
  unsigned d;
  if constexpr (DT == F16 && MAX) asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  else if constexpr (DT == F16) asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  else if constexpr (MAX) asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  else asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
#endif
}

// The raw value of the label at element offset off (pixel.h: the dtype switch).
__device__ __forceinline__ int64_t load_label(const void* yp, int32_t dt, int64_t off) {
  return with_label_type(dt, [&](auto tag, auto is_bool) -> int64_t {
    using T = decltype(tag);
    const T* y = static_cast<const T*>(yp) + off;
    if constexpr (sizeof(T) == 8) return __ldg(reinterpret_cast<const long long*>(y));  // __ldg has no int64_t
    else return label_raw<decltype(is_bool)::value>(__ldg(y));
  });
}

// The grid-stride loop's pixel -> element offsets without a division per pixel. A
// thread's flat index p = (b * H + h) * W + w advances by the grid's size S each turn;
// with S split once on the host as S = (sb * H + sh) * W + sw, the cursor (h, w and the
// logits / labels offsets) moves by constants plus at most one carry into h and one
// into b. All 64-bit, so any B * H * W works; one division per thread, at its start.
struct Walk {
  int64_t H, W;
  int64_t sh, sw;          // S's h and w digits (its b digit only moves the offsets)
  int64_t dl[4], dy[4];    // offset steps (logits, labels), by carries: [w -> h | (h -> b) << 1]
  int64_t lb, lh, lw, yb, yh, yw;  // element strides, for the start
};

struct Cursor {
  int64_t h, w, lo, yo;  // lo / yo: element offsets of the pixel in the logits / labels
};

// On the host: the walk for a grid of `stride` threads.
Walk make_walk(int64_t H, int64_t W, int64_t lb, int64_t lh, int64_t lw, int64_t yb, int64_t yh, int64_t yw,
               int64_t stride) {
  Walk k{};
  k.H = H;
  k.W = W;
  k.sw = stride % W;
  k.sh = (stride / W) % H;
  const int64_t sb = stride / W / H;
  k.dl[0] = sb * lb + k.sh * lh + k.sw * lw;
  k.dy[0] = sb * yb + k.sh * yh + k.sw * yw;
  for (int i = 1; i < 4; ++i) {
    k.dl[i] = k.dl[0] + (i & 1 ? lh - W * lw : 0) + (i & 2 ? lb - H * lh : 0);  // a row on, an image on
    k.dy[i] = k.dy[0] + (i & 1 ? yh - W * yw : 0) + (i & 2 ? yb - H * yh : 0);
  }
  k.lb = lb, k.lh = lh, k.lw = lw, k.yb = yb, k.yh = yh, k.yw = yw;
  return k;
}

__device__ __forceinline__ Cursor walk_start(const Walk& k, int64_t p) {
  const int64_t r = p / k.W, b = r / k.H;
  Cursor c;
  c.w = p - r * k.W;
  c.h = r - b * k.H;
  c.lo = b * k.lb + c.h * k.lh + c.w * k.lw;
  c.yo = b * k.yb + c.h * k.yh + c.w * k.yw;
  return c;
}

// dl / dy: the Walk's offset steps, staged in shared memory by walk_stage (indexed by the
// carries; indexing the kernel parameters would copy them to local memory).
__device__ __forceinline__ void walk_stage(const Walk& k, int64_t* s_steps) {
  if (threadIdx.x < 4) {
    s_steps[threadIdx.x] = k.dl[threadIdx.x];
    s_steps[4 + threadIdx.x] = k.dy[threadIdx.x];
  }
}

__device__ __forceinline__ void walk_step(const Walk& k, const int64_t* s_steps, Cursor& c) {
  c.w += k.sw;
  const bool wrap_w = c.w >= k.W;  // sw < W: at most one carry
  c.w = wrap_w ? c.w - k.W : c.w;
  c.h += wrap_w ? k.sh + 1 : k.sh;
  const bool wrap_h = c.h >= k.H;  // sh + 1 <= H: at most one carry
  c.h = wrap_h ? c.h - k.H : c.h;
  const int carries = (wrap_w ? 1 : 0) | (wrap_h ? 2 : 0);
  c.lo += s_steps[carries];
  c.yo += s_steps[4 + carries];
}

// exp(x) for x <= 0 (or NaN) in the class loops. Default: the CPU core's fast_exp_nonpos,
// bit for bit. ANOMFAST_CUDA_FAST: the hardware ex2.approx.ftz (relative error <= 2^-22
// for 2^y, plus the rounding of y = x log2(e), |x| 2^-24 relative; results below 2^-126
// flush to 0 as the CPU's below exp(-87.34)): histograms then differ from the CPU's.
__device__ __forceinline__ float exp_nonpos(float x) {
#if ANOMFAST_CUDA_FAST && defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  return fast_exp_nonpos(x);  // the CPU core's, bit for bit (its fused multiply-adds: score_math.h)
#endif
}

// S' += s1_term(e, is_k), as a select of the sum: the same value (s1 + 0 is s1 for the
// s1 >= +0 or NaN it holds), and nvcc makes it one predicated add where the select of
// the term costs a select and an add.
__device__ __forceinline__ float add_s1(float s1, float e, bool is_k) { return is_k ? s1 : s1 + e; }

// Calls f(c) for c = C0 .. C - 1 in order. CR > 0: fully unrolled to CR with a c < C
// guard (which folds away when C is the compile-time CR), so register arrays indexed by
// c stay in registers.
template <int CR, int C0, class F>
__device__ __forceinline__ void for_classes(int32_t C, F&& f) {
  if constexpr (CR > 0) {
#pragma unroll
    for (int c = C0; c < CR; ++c) {
      if (c < C) f(c);
    }
  } else {
#pragma unroll 4
    for (int32_t c = C0; c < C; ++c) f(c);
  }
}

struct Needs {
  bool s1, sT, sx, gen;
};

// Some logit of the pixel is NaN or +-inf (the CPU core's test: x * 0 != 0). Out of line:
// only pixels whose screen (the logit sum; with SX_SCREEN sx, via sx_from_memory) is not
// finite get here.
template <int DT>
__device__ __noinline__ bool any_nonfinite(const void* lp, int64_t base, int64_t ls_c, int32_t C) {
  bool bad = false;
  for (int32_t c = 0; c < C; ++c) bad |= load_logit<DT>(lp, base + c * ls_c) * 0.0f != 0.0f;
  return bad;
}

// The PixelSums of one pixel, with the CPU core's formulas and accumulation order
// (fused_cpu.cpp, tile_sums). Returns true when some logit is NaN or +-inf. CR > 0: the
// logits are in xr (C <= CR, loaded by the caller); CR == 0: X reads them from memory in
// each pass. C is a compile-time constant where the kernel is specialized for it.
// NEED_K: some method needs the argmax k (S' leaves it out, SML indexes its statistics
// by it); without it the max is one max instruction instead of a compare and a select
// (they differ only for NaN, whose pixel is never binned and maps to NaN, and in the
// sign of a zero maximum, whose two values share one bin). lp / base / ls_c: the pixel's
// logits in memory, for CR == 0 and for the exact non-finite recheck.
//
// Where the S' pass runs, the argmax is found there instead (late_k): the first class
// with l_c - m == 0, i.e. l_c == m, is the first maximum, as the compare-and-select of
// the max pass finds it (-0 and +0 compare equal in both); the max pass is then one max
// instruction (whose zero maximum may carry either sign when -0 and +0 tie: the same bin,
// and the same coordinates except max_logit's map, which may hold -0 for +0), and the S'
// pass's test of c == k becomes the test of d == 0 (it needs a compare per class either
// way). KEEP_K: a method reads k afterwards (SML's statistics, GEN's own loop), so the
// pass also records it.
//
// Non-finite logits are screened for with one add per class (the logit sum; then the
// exact check) unless the caller did it (PRE: m_pre, bad_pre from load_half_group) or
// SX_SCREEN: the kernel always computes the entropy sum sx, whose unclamped terms make it
// NaN exactly when some logit is not finite or d overflows (see the S' pass), so that
// the max pass is one instruction per class.
template <int DT>
__device__ __noinline__ float sx_from_memory(const void* lp, int64_t base, int64_t ls_c, int32_t C, float m);

// X(c): the pixel's logit c as a float (c < C), from registers or memory (the caller's
// choice: floats, packed halves converted where they are used, or loads).
template <int DT, int CR, bool NEED_K = true, bool KEEP_K = true, bool PRE = false, bool SX_SCREEN = false,
          typename XF>
__device__ __forceinline__ bool sums_of(XF&& X, const void* lp, int64_t base, int64_t ls_c, int32_t C, Needs nd,
                                        float inv_t, float gamma, PixelSums& s, float m_pre = 0.0f,
                                        bool bad_pre = false) {
  const bool late_k = NEED_K && (nd.s1 || nd.sx);
  float m = X(0);
  // the sum of the logits is finite unless some logit is NaN or inf, or the sum overflows:
  // one add per class, and only a non-finite sum asks the exact (out-of-line) check
  float sum = m;
  int32_t k = 0;
  const bool k_pass = NEED_K && !late_k;
  if (k_pass) {
    for_classes<CR, 1>(C, [&](int c) {
      const float x = X(c);
      k = x > m ? c : k;  // first maximum
      m = m < x ? x : m;  // std::max(m, x), NaN handling included
      sum += x;
    });
  } else if constexpr (!PRE) {
    for_classes<CR, 1>(C, [&](int c) {
      const float x = X(c);
      m = fmaxf(m, x);
      if constexpr (!SX_SCREEN) sum += x;
    });
  }
  // PRE: the caller found the max and the non-finite logits (load_half_group); the k
  // pass above (m from its compare-and-select, as without PRE) still runs where needed
  if constexpr (PRE) {
    if (!k_pass) m = m_pre;
  }
  // with late_k, whether the first maximum has been passed (then k holds it)
  bool seen = false;
  auto is_k = [&](int c, float d) -> bool {
    if (!late_k) return c == k;
    const bool first = !seen && d == 0.0f;
    seen = seen || d == 0.0f;
    if constexpr (KEEP_K) k = first ? c : k;
    return first;
  };
  float s1 = 0.0f, sx = 0.0f, sT = 0.0f, g = 0.0f;
  float er[CR > 0 ? CR : 1];  // e_c of the S' pass, reused by GEN (registers when CR > 0)
  // d = l_c - m <= 0 (NaN when a logit is not finite, a pixel that is never binned):
  // exp_nonpos, as the CPU core. The sums equal the CPU core's bit for bit on finite
  // pixels: skipping the add for c == k (instead of adding 0 * e) leaves s1 as it is,
  // and the entropy term clamps d at EXP_ZERO_BELOW instead of zeroing it below, or
  // (SX_SCREEN) does not clamp it (where e is 0 either way, so the term is -0 or +0, and
  // sx, never -0, is unchanged by either).
  if (nd.sx) {
    for_classes<CR, 0>(C, [&](int c) {
      const float d = X(c) - m;
      const float e = exp_nonpos(d);
      if constexpr (CR > 0) er[c] = e;
      s1 = add_s1(s1, e, is_k(c, d));
      // SX_SCREEN: e * d unclamped, so that a d of -inf (a logit of -inf, or finite logits
      // further apart than the float range) makes sx NaN (0 * -inf) as NaN and +inf
      // logits do (a NaN d): the screen below; elsewhere the same value (e is 0 there;
      // fast mode's ex2 may give 2^-126 at the clamp's edge, a 1e-45 difference)
      if constexpr (SX_SCREEN) sx += e * d;
      else sx += entropy_term(e, d);
    });
  } else if (nd.s1) {
    for_classes<CR, 0>(C, [&](int c) {
      const float d = X(c) - m;
      const float e = exp_nonpos(d);
      if constexpr (CR > 0) er[c] = e;
      s1 = add_s1(s1, e, is_k(c, d));
    });
  }
  if (nd.sT) {  // S'_T: the argmax (the first class with d == 0, the CPU core's k) left out, as in S'
    bool seen_t = false;
    for_classes<CR, 0>(C, [&](int c) {
      const float d = X(c) - m;
      const bool first = !seen_t && d == 0.0f;
      seen_t = seen_t || d == 0.0f;
      sT = add_s1(sT, exp_nonpos(d * inv_t), first);  // T > 0
    });
  }
  if (nd.gen) {
    const float z = 1.0f + s1, lz = fast_log(z);
    // GEN implies the S' pass (nd.s1), so er holds every e_c when CR > 0
    for_classes<CR, 0>(C, [&](int c) {
      const float d = X(c) - m;
      float e;
      if constexpr (CR > 0) e = er[c];
      else e = exp_nonpos(d);
      g += gen_term_e(d, e, c == k, s1, z, lz, gamma);
    });
  }
  s.m = m;
  s.k = k;
  s.s1 = s1;
  s.sT = sT;
  s.sx = sx;
  s.gen = g;
  if constexpr (SX_SCREEN) {
    // sx is NaN exactly when some logit is not finite or two finite ones are further apart
    // than the float range: the exact check tells them apart, and the latter pixel is
    // summed again with the clamped terms (out of line; no real network gets there)
    if (!nonfinite_bits(f2u(sx))) return false;
    s.sx = sx_from_memory<DT>(lp, base, ls_c, C, m);
    return s.sx != s.sx;
  } else if constexpr (PRE) {
    return bad_pre;
  } else {
    return nonfinite_bits(f2u(sum)) && any_nonfinite<DT>(lp, base, ls_c, C);
  }
}

// SX_SCREEN's second look at a pixel whose sx is NaN (out of line): NaN when some logit is
// NaN or +-inf (any_nonfinite's test), else (finite logits further apart than the float
// range: d = -inf for some class) sx again with the clamped terms, whose value the other
// classes' unclamped terms already had. The only sum d = -inf spoils: e is 0 there.
template <int DT>
__device__ __noinline__ float sx_from_memory(const void* lp, int64_t base, int64_t ls_c, int32_t C, float m) {
  if (any_nonfinite<DT>(lp, base, ls_c, C)) return u2f(0x7fc00000u);
  float sx = 0.0f;
  for (int32_t c = 0; c < C; ++c) {
    const float d = load_logit<DT>(lp, base + c * ls_c) - m;
    sx += entropy_term(exp_nonpos(d), d);
  }
  return sx;
}

// The logits of PX neighbouring pixels (PX > 1: one vector load per class, W-stride 1)
// into registers, every load issued before the first use; classes c >= C (run-time C)
// read as 0.
template <int DT, int CR, int PX>
__device__ __forceinline__ void load_pixels(const void* lp, int64_t base, int64_t ls_c, int32_t C,
                                            float (&xr)[PX][CR > 0 ? CR : 1]) {
  if constexpr (CR > 0) {
#pragma unroll
    for (int c = 0; c < CR; ++c) {
      if constexpr (PX > 1) {
        float v[PX];
        if (c < C) load_logit_group<DT, PX>(lp, base + c * ls_c, v);
#pragma unroll
        for (int j = 0; j < PX; ++j) xr[j][c] = c < C ? v[j] : 0.0f;
      } else {
        xr[0][c] = c < C ? load_logit<DT>(lp, base + c * ls_c) : 0.0f;
      }
    }
  }
}

// fp16 / bf16 groups (PX > 1, C <= CR in registers): the logits as loaded, PX / 2 words of
// two pixels per class, and per pixel j its max logit m[j] and whether some logit is NaN
// or +-inf (bad[j]), from a max and a min over the classes with NaN propagation, two
// pixels an instruction: the max of the halves, converted once, is the max of the
// converted logits (conversion is exact and monotonic), and the max is NaN or +inf or the
// min -inf exactly when some logit is not finite, so neither the max pass's per-class
// max instruction and conversion nor the sum that screens for non-finite logits is paid
// (sums_of with PRE). Without SCREEN (the kernel screens with sx: SX_SCREEN) no min and
// bad[j] false. The words stay packed (two pixels a register, classes c >= C zero): the
// later passes convert each logit where they use it (group_logit), so a group of 4 pixels
// holds 2 words per class instead of 4 floats (register pressure).
template <int DT, int CR, int PX, bool SCREEN>
__device__ __forceinline__ void load_half_group(const void* lp, int64_t base, int64_t ls_c, int32_t C,
                                                unsigned (&hw)[CR][PX / 2], float (&m)[PX], bool (&bad)[PX]) {
  static_assert(DT != F32 && PX > 1 && CR > 0, "fp16 / bf16 pixel groups in registers");
#pragma unroll
  for (int c = 0; c < CR; ++c) {
    if (c < C) load_half_words<PX>(static_cast<const uint16_t*>(lp) + base + c * ls_c, hw[c]);
#pragma unroll
    for (int i = 0; i < PX / 2; ++i) hw[c][i] = c < C ? hw[c][i] : 0u;
  }
  constexpr uint16_t EXP = DT == F16 ? 0x7c00u : 0x7f80u;  // a half's exponent field
#pragma unroll
  for (int i = 0; i < PX / 2; ++i) {
    unsigned mx = hw[0][i], mn = hw[0][i];
#pragma unroll
    for (int c = 1; c < CR; ++c) {
      if (c < C) {
        mx = half2_minmax_nan<DT, true>(mx, hw[c][i]);
        if constexpr (SCREEN) mn = half2_minmax_nan<DT, false>(mn, hw[c][i]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[2 * i + h] = Logit<DT>::to_float(half_of(mx, h));
      bad[2 * i + h] = SCREEN && ((half_of(mx, h) & EXP) == EXP || (half_of(mn, h) & EXP) == EXP);
    }
  }
}

// Logit c of pixel j of a group loaded by load_half_group, as a float (exact).
template <int DT, int CR, int PX>
__device__ __forceinline__ float group_logit(const unsigned (&hw)[CR][PX / 2], int j, int c) {
  return Logit<DT>::to_float(half_of(hw[c][j / 2], j));
}

// OR of x over the lanes of each peer group (lanes with equal keys), valid in the group's
// lowest lane; reduce_peers' tree with | for +. Called by all 32 lanes; when every lane
// is its own group the loop does not run.
__device__ __forceinline__ uint32_t or_peers(unsigned peers, uint32_t x) {
  int rank = __popc(peers & lanes_below());
  peers &= lanes_above();
  while (__any_sync(FULL, peers)) {
    const int next = __ffs(peers);
    const uint32_t t = __shfl_sync(FULL, x, (next - 1) & 31);
    if (next) x |= t;
    const bool done = rank & 1;
    peers &= __ballot_sync(FULL, !done);
    rank >>= 1;
  }
  return x;
}

// Marks the occupancy block of a flat histogram slot (views.h).
__device__ __forceinline__ void mark_occ(unsigned char* occ, uint32_t flat) {
  unsigned char* o = occ + (flat >> OCC_SHIFT);
  if (!*o) *o = 1;
}

// One histogram increment per valid lane into slot `seg + cls * NBINS + bin` of the flat
// (methods, 2, NBINS) hist / sig, with tie signature w (bin_sig of the coordinate; only
// with_sig, which is the same on every lane); lanes with the same (cls, bin) combine
// first. Called by all 32 lanes of the warp.
// Slots are 32-bit: (methods, 2, NBINS) < 2^31 (binning.h), so seg and flat are too.
__device__ __forceinline__ void hist_add(unsigned long long* hist, unsigned* sig, unsigned char* occ, uint32_t seg,
                                         bool valid, int cls, int32_t bin, bool with_sig, uint32_t w, int mode) {
  static_assert((int64_t)MAX_METHODS * 2 * NBINS < (int64_t(1) << 31), "flat slots fit 31 bits");
  const uint32_t key = valid ? (((uint32_t)bin << 1) | (uint32_t)cls) : 0xffffffffu;  // bin < 2^30
  const int lane = lane_id();
  const uint32_t flat = seg + (uint32_t)cls * (uint32_t)NBINS + (uint32_t)bin;
  if (mode == 1) {
    const unsigned peers = __match_any_sync(FULL, key);
    // not __reduce_or_sync(peers, w): with a different mask per peer group nvcc runs it
    // once per group (WARPSYNC.EXCLUSIVE), 32 times when every lane has its own bin
    const uint32_t wg = with_sig ? or_peers(peers, w) : 0u;
    if (valid && (peers & lanes_below()) == 0u) {  // the group's lowest lane adds
      atomicAdd(hist + flat, (unsigned long long)__popc(peers));
      if (with_sig) atomicOr(sig + flat, wg);
      mark_occ(occ, flat);
    }
  } else if (mode == 2) {
    const uint32_t prev = __shfl_up_sync(FULL, key, 1);
    const bool head = lane == 0 || prev != key;
    const unsigned heads = __ballot_sync(FULL, head);
    const unsigned later = heads & ~((2u << lane) - 1u);  // lane 31: 2u << 31 == 0, nothing later
    const int end = later ? __ffs(later) - 1 : 32;        // this lane's run is [its head, end)
    uint32_t wr = w;  // -> OR of w over [lane, end): a suffix scan within runs
    if (with_sig) {
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t t = __shfl_sync(FULL, wr, lane + o < 32 ? lane + o : 31);
        if (lane + o < end) wr |= t;
      }
    }
    if (valid && head) {
      atomicAdd(hist + flat, (unsigned long long)(end - lane));
      if (with_sig) atomicOr(sig + flat, wr);
      mark_occ(occ, flat);
    }
  } else if (valid) {
    atomicAdd(hist + flat, 1ull);
    if (with_sig) atomicOr(sig + flat, w);
    mark_occ(occ, flat);
  }
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}

// Sum of x over the lanes of each peer group (lanes with equal keys), valid in the
// group's lowest lane. Called by all 32 lanes.
template <class T>
__device__ __forceinline__ T reduce_peers(unsigned peers, T x) {
  const int lane = lane_id();
  int rank = __popc(peers & ((1u << lane) - 1u));  // position among the peers
  peers &= 0xfffffffeu << lane;                    // peers above this lane
  while (__any_sync(FULL, peers)) {
    const int next = __ffs(peers);
    const T t = __shfl_sync(FULL, x, (next - 1) & 31);
    if (next) x += t;
    const bool done = rank & 1;  // odd ranks handed their sum down this round
    peers &= __ballot_sync(FULL, !done);
    rank >>= 1;
  }
  return x;
}

// Byte labels (uint8, bool): the class of every byte value 0 .. 255, from the label table
// (any offset and length; values outside it are LABEL_INVALID), into shared memory, so
// that the loop looks a byte label up without the offset and bounds arithmetic.
__device__ __forceinline__ void stage_byte_classes(const int8_t* lut, int64_t lut_offset, int64_t lut_len,
                                                   int8_t* smem) {
  for (int v = threadIdx.x; v < 256; v += blockDim.x) smem[v] = (int8_t)label_class(v, lut, lut_offset, lut_len);
}

// Copies the label table into shared memory when it fits; returns the table to use.
__device__ __forceinline__ const int8_t* stage_lut(const int8_t* lut, int64_t lut_len, bool to_shared,
                                                   int8_t* smem) {
  if (!to_shared) return lut;
  for (int64_t i = threadIdx.x; i < lut_len; i += blockDim.x) smem[i] = lut[i];
  return smem;
}

// Adds the per-thread counters into counters[] with one global atomic per block.
__device__ __forceinline__ void flush_counters(const unsigned long long (&cnt)[N_COUNTERS],
                                               unsigned long long* s_cnt, int64_t* counters) {
#pragma unroll
  for (int q = 0; q < N_COUNTERS; ++q) {
    const unsigned long long v = warp_sum(cnt[q]);
    if (lane_id() == 0 && v) atomicAdd(&s_cnt[q], v);
  }
  __syncthreads();
  if (threadIdx.x < N_COUNTERS && s_cnt[threadIdx.x])
    atomicAdd(reinterpret_cast<unsigned long long*>(counters) + threadIdx.x, s_cnt[threadIdx.x]);
}

// ------------------------------------------------------------------ kernels

// Method kinds as bits (1 << Method code) of a kernel's compile-time method set MASK.
// The specialized sets below compute exactly their methods' sums and coordinates; any
// other list of methods (or one naming a method twice) runs the generic ALL_KINDS kernel,
// which reads the requested kinds at run time.
constexpr int ALL_KINDS = (1 << N_PER_PIXEL) - 1;  // every per-pixel method (methods.h)
constexpr int KINDS_MAX_LOGIT = 1 << MAX_LOGIT;
constexpr int KINDS_4 = (1 << MAX_LOGIT) | (1 << MSP) | (1 << ENERGY) | (1 << ENTROPY);
constexpr int KINDS_4_SML = (1 << MAX_LOGIT) | (1 << MSP) | (1 << ENERGY) | (1 << SML);
__host__ __device__ constexpr int popcount_c(int x) { return x ? (x & 1) + popcount_c(x >> 1) : 0; }
__host__ __device__ constexpr bool has_kind(int mask, int m) { return (mask >> m) & 1; }
static_assert(N_PER_PIXEL <= MAX_METHODS, "one slot per kind fits FusedParams.slot");

struct FusedParams {
  FusedArgs a;
  int64_t n_pix;
  int64_t n_units;  // the grid-stride loop's units: n_pix (one pixel a turn) or n_pix / PX (groups)
  float inv_t, inv_log_c;
  Needs nd;
  bool with_hist, lut_shared;
  bool byte_classes;         // byte labels: classes of all 256 values in shared memory (stage_byte_classes)
  int agg;
  int32_t sig_mask;          // a.sig_mask, 0 without a sig buffer (views.h)
  int32_t kinds;             // OR of 1 << a.methods[j]
  int32_t slot[MAX_METHODS]; // specialized kernels: output index j of each kind (methods named once)
  Walk walk;
};

// Class counts: CK > 0 exactly CK classes (compile-time C; in registers up to CREG);
// CK == 0 any C <= CREG in registers (run-time C, guarded unrolled loops); CK == -1 any
// C, re-read from memory in each pass.
template <int CK>
__host__ __device__ constexpr int class_regs() {
  return CK > 0 ? (CK <= CREG ? CK : 0) : (CK == 0 ? CREG : 0);
}

template <int DT, int CK, int MASK, int PX>
__global__ void __launch_bounds__(THREADS) fused_kernel(const FusedParams P) {
  constexpr int CR = class_regs<CK>();
  static_assert(PX == 1 || CR > 0, "pixel groups need the logits in registers");
  constexpr bool GENERIC = MASK == ALL_KINDS;
  // the set always computes the entropy sum, which then screens for non-finite logits
  constexpr bool SX_SCREEN = !GENERIC && has_kind(MASK, ENTROPY);
  // fp16 / bf16 groups: the max (and, without SX_SCREEN, the non-finite screen) on the
  // packed halves (load_half_group)
  constexpr bool HALF_GROUPS = PX > 1 && DT != F32;
  unsigned char* smem = dynamic_smem();
  __shared__ unsigned long long s_cnt[N_COUNTERS];
  __shared__ int64_t s_steps[8];
  const FusedArgs& a = P.a;
  if (threadIdx.x < N_COUNTERS) s_cnt[threadIdx.x] = 0;
  walk_stage(P.walk, s_steps);
  const int8_t* lut = nullptr;
  if (P.byte_classes) {
    stage_byte_classes(reinterpret_cast<const int8_t*>(a.lut_ptr), a.lut_offset, a.lut_len,
                       reinterpret_cast<int8_t*>(smem));
    lut = reinterpret_cast<const int8_t*>(smem);
  } else if (P.with_hist) {
    lut = stage_lut(reinterpret_cast<const int8_t*>(a.lut_ptr), a.lut_len, P.lut_shared,
                    reinterpret_cast<int8_t*>(smem));
  }
  __syncthreads();

  const void* lp = reinterpret_cast<const void*>(a.logits_ptr);
  const void* yp = reinterpret_cast<const void*>(a.labels_ptr);
  const float* sml_mean = reinterpret_cast<const float*>(a.sml_mean_ptr);
  const float* sml_inv = reinterpret_cast<const float*>(a.sml_inv_std_ptr);
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(a.hist_ptr);
  unsigned* sig = reinterpret_cast<unsigned*>(a.sig_ptr);
  unsigned char* occ = reinterpret_cast<unsigned char*>(a.occ_ptr);
  float* maps = reinterpret_cast<float*>(a.maps_ptr);
  const int32_t C = CK > 0 ? CK : (int32_t)a.C;
  const int64_t N = P.n_pix;    // pixels
  const int64_t NU = P.n_units; // turns' units: pixels (PX = 1) or groups of PX pixels along W
  // a kind is computed when the kernel's set may hold it and (generic kernel) it was asked for
  const int32_t kinds = GENERIC ? P.kinds : MASK;
  auto want = [&](int m) { return has_kind(MASK, m) && (!GENERIC || has_kind(kinds, m)); };
  Needs nd = P.nd;
  // the sums the kernel's set can need at all (the table's needs; methods.h), so that a
  // specialized kernel compiles no other class loop
  constexpr uint32_t SET_NEEDS = KindsNeeds<MASK>::value;
  constexpr bool NEED_K = (SET_NEEDS & (NEED_S1 | NEED_TEMP | NEED_SX | NEED_GEN)) || has_kind(MASK, SML);
  constexpr bool KEEP_K = has_kind(MASK, SML) || has_kind(MASK, GEN);  // read after the sums
  nd.s1 = nd.s1 && (SET_NEEDS & (NEED_S1 | NEED_TEMP));
  nd.sT = nd.sT && (SET_NEEDS & NEED_TEMP);
  nd.sx = nd.sx && (SET_NEEDS & NEED_SX);
  nd.gen = nd.gen && (SET_NEEDS & NEED_GEN);
  // a specialized set with entropy always asks for sx (it names each method once), and the
  // non-finite screen rests on it: fold the branch
  if constexpr (SX_SCREEN) nd.sx = true;
  uint32_t cnt[N_COUNTERS] = {0, 0, 0, 0};  // per thread: < 2^31 pixels each (launch)

  const int64_t stride = (int64_t)gridDim.x * THREADS;
  Cursor cur = walk_start(P.walk, (int64_t)blockIdx.x * THREADS + threadIdx.x);
  // base is the same for every thread of the block, so whole warps iterate together
  for (int64_t base = (int64_t)blockIdx.x * THREADS; base < NU; base += stride, walk_step(P.walk, s_steps, cur)) {
    const int64_t u = base + threadIdx.x;
    const bool active = u < NU;  // then every pixel of the group is (W is a multiple of PX)
    // the labels first: their loads are in flight during the score math
    int64_t raw[PX];
#pragma unroll
    for (int j = 0; j < PX; ++j)
      raw[j] = P.with_hist && active ? load_label(yp, a.label_dtype, cur.yo + j * a.ys_w) : 0;
    // the group's logits: floats (fp32, or one pixel a turn), or packed halves (HALF_GROUPS)
    float xr[HALF_GROUPS ? 1 : PX][HALF_GROUPS || CR == 0 ? 1 : CR];
    unsigned hw[HALF_GROUPS ? CR : 1][HALF_GROUPS ? PX / 2 : 1];
    float m_pre[PX] = {};
    bool bad_pre[PX] = {};
    if (active) {
      if constexpr (HALF_GROUPS) load_half_group<DT, CR, PX, !SX_SCREEN>(lp, cur.lo, a.ls_c, C, hw, m_pre, bad_pre);
      else load_pixels<DT, CR, PX>(lp, cur.lo, a.ls_c, C, xr);
    }
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      const int64_t p = u * PX + j;  // the pixel's flat index (maps)
      PixelSums s{0.0f, 0, 0.0f, 0.0f, 0.0f, 0.0f};
      bool pix_bad = false;
      auto X = [&](int c) -> float {
        if constexpr (HALF_GROUPS) return group_logit<DT, CR, PX>(hw, j, c);
        else if constexpr (CR > 0) return xr[j][c];
        else return load_logit<DT>(lp, cur.lo + j + c * a.ls_c);
      };
      if (active)
        pix_bad = sums_of<DT, CR, NEED_K, KEEP_K, HALF_GROUPS, SX_SCREEN>(X, lp, cur.lo + j, a.ls_c, C, nd, P.inv_t,
                                                                          a.gen_gamma, s, m_pre[j], bad_pre[j]);
      // each requested kind's coordinate, once (method_coord with a constant code folds to
      // that method's formula); a non-finite one (SML with a zero std, energy past the
      // float range) makes the pixel skipped and counted for all methods, as on the CPU
      float t[N_PER_PIXEL] = {};
      bool coord_bad = false;
      // energy (T = 1) and entropy both take log1p(S'): once for both (score_math.h: *_l1p)
      const bool t1 = a.temperature == 1.0f;
      const float l1p = (want(ENERGY) && t1) || want(ENTROPY) ? fast_log1p(s.s1) : 0.0f;
#pragma unroll
      for (int m = 0; m < N_PER_PIXEL; ++m) {
        if (!want(m)) continue;
        float mu = 0.0f, inv = 0.0f;
        if (m == SML && active) {
          mu = __ldg(sml_mean + s.k);
          inv = __ldg(sml_inv + s.k);
        }
        if (m == ENERGY) {
          t[m] = t1 ? energy_score_t1(s.m, l1p) : energy_score(s.m, s.s1, s.sT, a.temperature);
        } else if (m == ENTROPY) {
          const float h = entropy_score_l1p(s.s1, s.sx, l1p);
          t[m] = a.entropy_normalize ? h * P.inv_log_c : h;  // as method_coord
        } else {
          t[m] = method_coord(m, s, a.temperature, mu, inv, P.inv_log_c, a.entropy_normalize);
        }
        coord_bad |= nonfinite_bits(f2u(t[m]));
      }
      // the pixel's one counter (pixel.h), as on the CPU
      bool valid = false;
      int cls = LABEL_VOID;
      if (P.with_hist && active) {
        // a byte label's raw value is 0 .. 255 (bool: 0 / 1), each with its class staged
        cls = P.byte_classes ? (int)lut[raw[j] & 0xff] : label_class(raw[j], lut, a.lut_offset, a.lut_len);
        const PixelFate f = pixel_fate(cls, (int32_t)(pix_bad | coord_bad));
        count_fate(cnt, f);
        valid = f.binned;
      }
      const int cls01 = valid ? cls : 0;
      // out: output index jm, coordinate tj
      auto emit = [&](int jm, float tj) {
        // maps are (M, B, H, W) contiguous; NaN where a logit is not finite (NaN in, NaN out)
        if (maps && active) maps[(int64_t)jm * N + p] = pix_bad ? u2f(0x7fc00000u) : tj;
        if (P.with_hist) {
          const bool with_sig = (P.sig_mask >> jm) & 1;
          hist_add(hist, sig, occ, (uint32_t)(jm * 2 * NBINS), valid, cls01, bin_index(tj), with_sig,
                   with_sig ? bin_sig(tj) : 0u, P.agg);
        }
      };
      if constexpr (GENERIC) {
        for (int jm = 0; jm < a.n_methods; ++jm) {
          const int32_t meth = a.methods[jm];
          float tj = t[0];
#pragma unroll
          for (int m = 1; m < N_PER_PIXEL; ++m) tj = meth == m ? t[m] : tj;
          emit(jm, tj);
        }
      } else {
#pragma unroll
        for (int m = 0; m < N_PER_PIXEL; ++m) {
          if (has_kind(MASK, m)) emit(P.slot[m], t[m]);
        }
      }
    }
  }
  if (P.with_hist) {
    const unsigned long long wide[N_COUNTERS] = {cnt[0], cnt[1], cnt[2], cnt[3]};
    flush_counters(wide, s_cnt, reinterpret_cast<int64_t*>(a.counters_ptr));
  }
}

struct FitParams {
  FitArgs a;
  int64_t n_pix;
  bool lut_shared, smem_partials;
  int64_t lut_bytes;  // offset of the partials in dynamic shared memory
  Walk walk;
};

template <int DT>
__global__ void __launch_bounds__(THREADS) fit_kernel(const FitParams P) {
  unsigned char* smem = dynamic_smem();
  __shared__ unsigned long long s_cnt[N_COUNTERS];
  const FitArgs& a = P.a;
  const int32_t C = (int32_t)a.C;
  unsigned long long* g_count = reinterpret_cast<unsigned long long*>(a.count_ptr);
  double* g_sum = reinterpret_cast<double*>(a.sum_ptr);
  double* g_sumsq = reinterpret_cast<double*>(a.sumsq_ptr);
  unsigned long long* p_count = g_count;
  double* p_sum = g_sum;
  double* p_sumsq = g_sumsq;
  if (P.smem_partials) {
    p_count = reinterpret_cast<unsigned long long*>(smem + P.lut_bytes);
    p_sum = reinterpret_cast<double*>(p_count + C);
    p_sumsq = p_sum + C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      p_count[c] = 0;
      p_sum[c] = 0.0;
      p_sumsq[c] = 0.0;
    }
  }
  if (threadIdx.x < N_COUNTERS) s_cnt[threadIdx.x] = 0;
  __shared__ int64_t s_steps[8];
  walk_stage(P.walk, s_steps);
  const void* yp = reinterpret_cast<const void*>(a.labels_ptr);
  const int8_t* lut = nullptr;
  if (yp)
    lut = stage_lut(reinterpret_cast<const int8_t*>(a.lut_ptr), a.lut_len, P.lut_shared,
                    reinterpret_cast<int8_t*>(smem));
  __syncthreads();

  const void* lp = reinterpret_cast<const void*>(a.logits_ptr);
  const int64_t N = P.n_pix;
  const Needs none{false, false, false, false};
  unsigned long long cnt[N_COUNTERS] = {0, 0, 0, 0};
  const int64_t stride = (int64_t)gridDim.x * THREADS;
  Cursor cur = walk_start(P.walk, (int64_t)blockIdx.x * THREADS + threadIdx.x);
  for (int64_t base = (int64_t)blockIdx.x * THREADS; base < N; base += stride, walk_step(P.walk, s_steps, cur)) {
    const int64_t p = base + threadIdx.x;
    bool valid = false;
    PixelSums s{0.0f, 0, 0.0f, 0.0f, 0.0f, 0.0f};
    if (p < N) {
      const int64_t raw = yp ? load_label(yp, a.label_dtype, cur.yo) : 0;
      auto X = [&](int c) { return load_logit<DT>(lp, cur.lo + c * a.ls_c); };  // CR = 0: from memory
      const bool bad = sums_of<DT, 0>(X, lp, cur.lo, a.ls_c, C, none, 1.0f, 0.0f, s);
      const int32_t cls = yp ? label_class(raw, lut, a.lut_offset, a.lut_len) : (int32_t)LABEL_NORMAL;
      const PixelFate f = fit_fate(cls, (int32_t)bad);  // pixel.h, as on the CPU
      count_fate(cnt, f);
      valid = f.binned;
    }
    const double m = valid ? (double)s.m : 0.0;
    const unsigned peers = __match_any_sync(FULL, valid ? (uint32_t)s.k : 0xffffffffu);
    const double sum = reduce_peers(peers, m);
    const double sumsq = reduce_peers(peers, m * m);  // exact: a float's square fits a double
    if (valid && lane_id() == __ffs(peers) - 1) {
      atomicAdd(p_count + s.k, (unsigned long long)__popc(peers));
      atomicAdd(p_sum + s.k, sum);
      atomicAdd(p_sumsq + s.k, sumsq);
    }
  }
  // flush_counters' __syncthreads also orders every shared partial before the flush below
  flush_counters(cnt, s_cnt, reinterpret_cast<int64_t*>(a.counters_ptr));
  if (P.smem_partials) {
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      if (p_count[c]) {
        atomicAdd(g_count + c, p_count[c]);
        atomicAdd(g_sum + c, p_sum[c]);
        atomicAdd(g_sumsq + c, p_sumsq[c]);
      }
    }
  }
}

// ------------------------------------------------------------------ host side

using namespace cuda_host;  // check, DeviceGuard, bad_arg, device_of, check_on (cuda_host.h)

// Element sizes, from pixel.h's dtype switches (the codes were checked by checks.h).
int64_t logit_size(int32_t dt) {
  int64_t size = 0;
  with_logit_dtype(dt, [&](auto d) { size = sizeof(typename Logit<decltype(d)::value>::T); });
  return size;
}

int64_t label_size(int32_t dt) {
  return with_label_type(dt, [](auto tag, auto) -> int64_t { return sizeof(tag); });
}

void check_labels(int dev, int64_t labels_ptr, int32_t label_dtype, int64_t lut_ptr) {
  check_on(dev, labels_ptr, "labels", label_size(label_dtype));
  check_on(dev, lut_ptr, "label table", 1);
}

// Blocks of a persistent grid: as many as can be resident at once (cached per device
// and kernel; the occupancy query is host-only but not free).
template <class Kernel>
int64_t resident_blocks(Kernel kernel, int dev, size_t smem) {
  struct Entry {
    const void* fn;
    int dev;
    size_t smem;
    int64_t blocks;
  };
  static std::mutex mu;
  static Entry cache[64];
  static int n_cached = 0;
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < n_cached; ++i) {
    if (cache[i].fn == (const void*)kernel && cache[i].dev == dev && cache[i].smem == smem) return cache[i].blocks;
  }
  int sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t blocks = (int64_t)sms * (per_sm > 0 ? per_sm : 1);
  if (n_cached < 64) cache[n_cached++] = Entry{(const void*)kernel, dev, smem, blocks};
  return blocks;
}

// The one switch from run-time choices to template arguments: logit dtype x class count
// (specialized for SPECIAL_C, else registers up to CREG, else memory) x method set
// (specialized for the KINDS_* sets when each method is named once, else generic).
// Usage:
//   with_kernel_config(a.logit_dtype, a.C, kinds, [&](auto dt, auto ck, auto mask) {
//     launch(fused_kernel<decltype(dt)::value, decltype(ck)::value, decltype(mask)::value>, ...);
//   });
// The large-C memory path only has the generic method set (its class loops dominate).
template <int V>
using Int = std::integral_constant<int, V>;

template <class F>
void with_kernel_config(int32_t dtype, int64_t C, int32_t kinds, F&& f) {
  auto by_mask = [&](auto dt, auto ck) {
    switch (kinds) {
      case KINDS_MAX_LOGIT: f(dt, ck, Int<KINDS_MAX_LOGIT>{}); break;
      case KINDS_4: f(dt, ck, Int<KINDS_4>{}); break;
      case KINDS_4_SML: f(dt, ck, Int<KINDS_4_SML>{}); break;
      default: f(dt, ck, Int<ALL_KINDS>{}); break;
    }
  };
  auto by_c = [&](auto dt) {
    switch (C) {  // SPECIAL_C: Cityscapes-style 19 classes, Pascal VOC's 21
      case 19: by_mask(dt, Int<19>{}); break;
      case 21: by_mask(dt, Int<21>{}); break;
      default:
        if (C <= CREG) by_mask(dt, Int<0>{});
        else f(dt, Int<-1>{}, Int<ALL_KINDS>{});
    }
  };
  with_logit_dtype(dtype, by_c);  // pixel.h; the code was checked before (checks.h)
}

// px: pixels a thread takes per turn (a group along W, see group_ok), so the
// grid-stride walk runs over n_pix / px units of W / px columns.
template <class Kernel, class Params>
void launch(Kernel kernel, Params P, int dev, size_t smem, int64_t stream, int px = 1) {
  const int64_t units = P.n_pix / px;
  const int64_t want = (units + THREADS - 1) / THREADS;
  int64_t cap = resident_blocks(kernel, dev, smem);
  // a debug cap only while each thread keeps < 2^31 pixels (the fused kernel's 32-bit counters)
  const int64_t debug = g_debug_grid.load();
  if (debug > 0 && debug < cap && P.n_pix / (debug * THREADS) < (int64_t(1) << 31)) cap = debug;
  static_assert(N_COUNTERS == 4, "the fused kernel widens four counters");
  const unsigned grid = (unsigned)(want < cap ? want : cap);
  P.walk = make_walk(P.a.H, P.a.W / px, P.a.ls_b, P.a.ls_h, P.a.ls_w * px, P.a.ys_b, P.a.ys_h, P.a.ys_w * px,
                     (int64_t)grid * THREADS);
#if defined(ANOMFAST_CUDA_EMULATE)
  (void)stream;
  emulate::launch(grid, THREADS, smem, [&] { kernel(P); });
#else
  kernel<<<grid, THREADS, smem, reinterpret_cast<cudaStream_t>(stream)>>>(P);
#endif
  check(cudaGetLastError(), "kernel launch");
}

// Whether the fused kernel may take groups of px neighbouring pixels (w .. w + px - 1, w
// a multiple of px) with one vector load per class: logits contiguous along W, W a
// multiple of px (a group never straddles a row), every element offset of a group's first
// pixel a multiple of px and the base aligned to a group (so each load is aligned), the
// class count in registers (and, in the dispatch, a kernel specialized for it). Anything
// else (channels-last, crops with odd offsets, odd W, other class counts) runs one pixel
// a turn.
bool group_ok(const FusedArgs& a, int64_t lsz, int px) {
  auto multiple = [&](int64_t stride, int64_t extent) { return extent <= 1 || stride % px == 0; };
  return a.ls_w == 1 && a.W % px == 0 && a.C <= CREG && multiple(a.ls_c, a.C) && multiple(a.ls_h, a.H) &&
         multiple(a.ls_b, a.B) && a.logits_ptr % (px * lsz) == 0;
}

// The largest pixel group a kernel with method set MASK takes: 4 for max_logit alone (its
// loop body stays small: ~0.6-0.7k instructions a turn) and for fp16 / bf16 logits with
// the 4-method sets (two pixels a 32-bit word, converted where used: a group of 4 holds 38
// words in 128 registers, the occupancy of the fp32 pairs; 799 / 798 instructions per
// pixel against 822 / 826 in pairs, ~3.2k a turn: bench/sass_budget.py), 2 for the others
// (fp32 groups of 4 hold 76 floats; the same groups of halves held as floats took 181
// registers, one block per SM; 6 methods: the loop body of pairs is already ~3.8k
// instructions). The first GPU run times groups of 4 against pairs (bench/gpu_check.py).
__host__ __device__ constexpr int max_group(int dt, int mask) {
  return mask == KINDS_MAX_LOGIT || (dt != F32 && (mask == KINDS_4 || mask == KINDS_4_SML)) ? 4 : 2;
}

}  // namespace

void set_hist_aggregation(int mode) {
  if (mode < 0 || mode > 2) throw std::invalid_argument("histogram aggregation mode must be 0, 1 or 2");
  g_hist_aggregation.store(mode);
}

int hist_aggregation() { return g_hist_aggregation.load(); }

void set_debug_grid(int64_t blocks) {
  if (blocks < 0) throw std::invalid_argument("debug grid must be >= 0 blocks (0: as many as fit)");
  g_debug_grid.store(blocks);
}

int64_t debug_grid() { return g_debug_grid.load(); }

void set_pixel_group_cap(int px) {
  if (px != 1 && px != 2 && px != 4) throw std::invalid_argument("pixel group cap must be 1, 2 or 4 pixels");
  g_pixel_group_cap.store(px);
}

int pixel_group_cap() { return g_pixel_group_cap.load(); }

void fused_cuda(const FusedArgs& a) {
  // the checks of both cores (codes, counts, sizes, offsets; checks.h) first: they need no
  // CUDA call, so that an empty input works without a driver
  const int64_t n = check_fused_args(a);
  int32_t kinds = 0;
  for (int j = 0; j < a.n_methods; ++j) {
    // HEAT (3x3 neighbourhoods) and EXTERNAL coordinate maps exist only in the CPU core
    if (!is_per_pixel_method(a.methods[j]))
      bad_arg(std::string("method ") + METHOD_TABLE[a.methods[j]].name + " is not implemented on CUDA yet");
    kinds |= 1 << a.methods[j];
  }
  const int64_t lsz = logit_size(a.logit_dtype);
  const bool labels = a.labels_ptr != 0;
  if (n == 0) return;
  // every buffer the kernel reads or writes
  const int dev = device_of(a.logits_ptr, "logits", lsz);
  if (labels) {
    check_labels(dev, a.labels_ptr, a.label_dtype, a.lut_ptr);
    check_on(dev, a.hist_ptr, "histograms", 8);
    check_on(dev, a.occ_ptr, "histogram occupancy map", 1);
    check_on(dev, a.counters_ptr, "counters", 8);
    if (a.sig_ptr) check_on(dev, a.sig_ptr, "tie signatures", 4);
  }
  if (a.maps_ptr) check_on(dev, a.maps_ptr, "coordinate maps", 4);
  if (kinds & (1 << SML)) {
    check_on(dev, a.sml_mean_ptr, "SML means", 4);
    check_on(dev, a.sml_inv_std_ptr, "SML inverse stds", 4);
  }
  FusedParams P{};
  P.a = a;
  P.n_pix = n;
  P.inv_t = 1.0f / a.temperature;
  P.inv_log_c = a.C > 1 ? 1.0f / fast_log((float)a.C) : 0.0f;  // as the CPU core
  const ClassLoopNeeds cn = class_loop_needs(a.methods, a.n_methods, a.temperature);  // methods.h
  P.nd = Needs{cn.s1, cn.sT, cn.sx, cn.gen};
  P.kinds = kinds;
  for (int j = 0; j < a.n_methods; ++j) P.slot[a.methods[j]] = j;
  // a method named twice keeps the generic kernel (one slot per kind in the specialized ones)
  const int32_t set = popcount_c(kinds) == a.n_methods ? kinds : ALL_KINDS;
  P.with_hist = labels;
  P.byte_classes = P.with_hist && (a.label_dtype == U8 || a.label_dtype == BOOL);
  P.lut_shared = P.with_hist && !P.byte_classes && a.lut_len <= LUT_SMEM_MAX;
  P.agg = g_hist_aggregation.load();
  P.sig_mask = (P.with_hist && a.sig_ptr) ? a.sig_mask : 0;
  const size_t smem = P.byte_classes ? 256 : P.lut_shared ? (size_t)a.lut_len : 0;
  DeviceGuard guard(dev);
  const int cap = g_pixel_group_cap.load();
  with_kernel_config(a.logit_dtype, a.C, set, [&](auto dt, auto ck, auto mask) {
    constexpr int D = decltype(dt)::value, K = decltype(ck)::value, M = decltype(mask)::value;
    // groups only where C is a compile-time constant (19, 21): with a run-time C the
    // group's logits are registers for CREG classes each (nvcc: ~180-200 registers, one
    // block per SM), even for C = 2
    if constexpr (K > 0 && class_regs<K>() > 0) {
      if constexpr (max_group(D, M) >= 4) {
        if (cap >= 4 && group_ok(a, lsz, 4)) {
          P.n_units = n / 4;
          return launch(fused_kernel<D, K, M, 4>, P, dev, smem, a.stream, 4);
        }
      }
      if (cap >= 2 && group_ok(a, lsz, 2)) {
        P.n_units = n / 2;
        return launch(fused_kernel<D, K, M, 2>, P, dev, smem, a.stream, 2);
      }
    }
    P.n_units = n;
    launch(fused_kernel<D, K, M, 1>, P, dev, smem, a.stream);
  });
}

void fit_sml_cuda(const FitArgs& a) {
  const int64_t n = check_fit_args(a);  // checks.h, as the CPU core
  const int64_t lsz = logit_size(a.logit_dtype);
  const bool labels = a.labels_ptr != 0;
  if (n == 0) return;
  const int dev = device_of(a.logits_ptr, "logits", lsz);
  if (labels) check_labels(dev, a.labels_ptr, a.label_dtype, a.lut_ptr);
  check_on(dev, a.count_ptr, "per-class counts", 8);
  check_on(dev, a.sum_ptr, "per-class sums", 8);
  check_on(dev, a.sumsq_ptr, "per-class sums of squares", 8);
  check_on(dev, a.counters_ptr, "counters", 8);
  FitParams P{};
  P.a = a;
  P.n_pix = n;
  P.lut_shared = labels && a.lut_len <= LUT_SMEM_MAX;
  P.lut_bytes = P.lut_shared ? (a.lut_len + 15) / 16 * 16 : 0;
  P.smem_partials = a.C <= FIT_SMEM_C;
  const size_t smem = (size_t)P.lut_bytes + (P.smem_partials ? (size_t)a.C * 24 : 0);
  DeviceGuard guard(dev);
  // one pass over the classes: nothing to keep in registers
  with_logit_dtype(a.logit_dtype, [&](auto dt) { launch(fit_kernel<decltype(dt)::value>, P, dev, smem, a.stream); });
}

CudaInfo cuda_info(bool probe) {
  CudaInfo info;
  info.cuda_version = CUDART_VERSION;
  info.archs = ANOMFAST_CUDA_ARCHS;
  info.fmad = ANOMFAST_CUDA_FMAD != 0;
  info.fast = ANOMFAST_CUDA_FAST != 0;
  if (!probe) return info;
  info.probed = true;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  const cudaError_t e = cudaGetDeviceCount(&info.device_count);
  info.runtime_ok = e == cudaSuccess;
  if (!info.runtime_ok) {
    info.device_count = 0;
    info.error = cudaGetErrorString(e);
    cudaGetLastError();  // do not leave the error for the next call to report
  }
  return info;
}

}  // namespace anomfast
