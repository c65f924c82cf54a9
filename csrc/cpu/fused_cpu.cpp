// Fused CPU core: logits -> every requested method's bin coordinate -> per-method,
// per-label int64 histograms, in one read of the logits; and the SML fitting pass.
//
// Work is cut into tiles of up to TILE pixels along W of one (b, h) row. A tile's
// logits are copied (and converted to float32) into a class-major buffer buf[c][i],
// so every later loop runs over i with unit stride and vectorizes, whatever the
// input layout (NCHW, channels-last, any strides) and dtype. The tile buffer lives
// in L1; each logit is read from memory once.
//
// Histograms: each OpenMP thread counts into a private copy (mmap'ed, so only the
// pages it touches are ever backed; kept for the thread's lifetime), indexed flat as
// the shared (methods, 2, NBINS) histograms. A count is split in two arrays: its low
// byte in `low`, the carries (multiples of 256) in a uint32 array: the randomly
// addressed increments touch only `low`, 4x smaller, so more of it stays in cache.
// The tiles' bin indices are buffered and counted in bursts (see qbuf). A thread
// remembers the first TOUCHED_CAP distinct bins it touches and, per method and label,
// the smallest and largest slot it counted into (taken with vector min/max while the
// slots are computed; marking touched blocks per increment cost as much as the
// increments). At the end it adds into the shared int64 histograms only the remembered
// bins (small calls: cost independent of the histogram size) or, past the cap, the
// 64-slot groups within those ranges that hold counts: then all threads meet and each
// sums a share of the 1024-slot blocks over every thread's copy, with plain vector adds
// (per-bin atomics on the shared histograms cost more than the counting itself). Past
// the cap, the counting loop's only branch is the rare carry: skipped pixels (void,
// invalid label, non-finite) count into a trash slot after the histograms, never
// added. A thread flushes early after 2^31 pixels (FusedArgs.flush_every lowers this
// for tests), so the counts cannot overflow. Integer sums make the result independent
// of the thread count and of the tile order.
//
// Tie signatures and occupancy (binning.h, views.h): for the methods in FusedArgs.sig_mask
// (those whose coordinate is the exact score: Python reads no other signature), each
// pixel's bin_sig word is computed next to its bin index and queued with its slot;
// burst() ORs it into a private uint32 array beside the counts, and wherever a flush adds
// a slot's count to hist it also ORs the slot's signature into sig (zeroing the private
// one). Every flush marks the occupancy byte of each 64-slot group it adds to (one byte
// per group: the reduction's groups are the occupancy blocks). The trash slot's
// signature is garbage and never leaves the thread, like its count. Cost: the signature
// array is 4x `low` and as randomly addressed; filled for every method it made the
// 4-method pass ~35% slower (Zen 4, 1 MiB L2). Tried and no faster: the signature packed
// with 12 count bits into one uint32 cell (one line per pixel, but 4x the hot
// footprint), prefetching, a separate OR loop, huge pages, skipping saturated signatures
// (a flag in `low`: the dependent load made it slower). Hence sig_mask: methods without
// their bit compute, queue and flush no signature (their psig pages are never touched),
// so they cost what they cost before signatures. Measured (loaded 2-core EPYC VM, 1
// thread, per-thread CPU time, 19 x 512 x 1024 float32, bench/sig_cost.py, medians of
// 8 alternating rounds; before signatures / every method's / sig_mask): 4 methods
// 11.8 / 16.0 / 13.0 ms, energy alone 7.9 / 8.3 / 7.8 ms, max_logit alone 4.7 / 5.5 /
// 5.6 ms (it keeps its signature: ~15% over no signature, measured in one process with
// sig_mask 0 vs 1). Score-only calls compute no signature.
//
// HEAT needs 3x3 neighbourhoods of the softmax: its tiles also use the rows above
// and below and one column either side (see heat_tile; with HEAT the tiles are visited
// down each column block so those rows are cached), so it runs on the true H x W
// geometry (Python does not fold rows for it). EXTERNAL methods bin coordinate
// maps computed outside the core (Python post-processing, user scores).
//
// This file is compiled once per instruction set (ANOMFAST_ISA_NS); dispatch.cpp
// picks the best one the running CPU supports.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#include "../common/binning.h"
#include "../common/pixel.h"
#include "../common/score_math.h"
#include "../common/views.h"

#ifndef ANOMFAST_ISA_NS
#define ANOMFAST_ISA_NS generic
#endif

namespace anomfast {
namespace ANOMFAST_ISA_NS {

namespace {

constexpr int TILE = 64;
constexpr int GROUP_SHIFT = 6;   // 64 slots (one cache line of low): the unit a reduction adds or skips
constexpr int BLOCK_SHIFT = 10;  // 1024 slots: the unit threads share the end-of-call reduction by
constexpr uint64_t FLUSH_EVERY = 1ull << 31;
constexpr int TOUCHED_CAP = 4096;  // distinct bins remembered per thread before falling back to ranges
constexpr int BURST_TILES = 16;    // tiles whose counts are added to the private histograms at once
constexpr int QCAP = BURST_TILES * TILE;
static_assert(GROUP_SHIFT <= OCC_SHIFT, "a 64-slot group lies in one occupancy block: a group holding counts "
                                       "marks only a block holding counts (occupancy stays exact)");
static_assert(OCC_SHIFT <= BLOCK_SHIFT, "a reduction block holds whole occupancy bytes: in the reduction each "
                                       "byte has one writer, the block's thread (plain stores)");
static_assert((int64_t)MAX_METHODS * 2 * NBINS + 1 <= INT32_MAX, "flat private slots (and the trash slot) are "
                                                                   "queued as int32");
static_assert((int64_t(1) << BLOCK_SHIFT) < NBINS, "a reduction block spans at most two (method, label) segments");

// Zero-initialised scratch memory whose untouched pages cost nothing.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : bytes_(bytes) {
#if defined(__unix__) || defined(__APPLE__)
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ptr_ = (p == MAP_FAILED) ? nullptr : p;
#else
    ptr_ = std::calloc(bytes, 1);
#endif
  }
  ~Scratch() {
    if (!ptr_) return;
#if defined(__unix__) || defined(__APPLE__)
    munmap(ptr_, bytes_);
#else
    std::free(ptr_);
#endif
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }
  size_t size() const { return ptr_ ? bytes_ : 0; }

 private:
  size_t bytes_;
  void* ptr_ = nullptr;
};

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Per-thread private histogram memory, kept between calls (OpenMP pool threads live
// on), so its pages are faulted in once, not on every call. Invariant: all zero
// outside a call (each flush zeroes what it added).
inline uint32_t* thread_scratch(size_t bytes) {
  thread_local std::unique_ptr<Scratch> s;
  if (!s || s->size() < bytes) {
    s.reset();
    s.reset(new Scratch(bytes));
  }
  return static_cast<uint32_t*>(s->get());
}

// Tile t of a (B, H, W) call cut into rows of nW tiles: image b, row h, first column
// w0 and its n <= TILE pixels (the last tile of a row may be shorter).
struct TilePos {
  int64_t b, h, w0;
  int n;
};
inline TilePos tile_pos(int64_t t, int64_t nW, int64_t H, int64_t W) {
  const int64_t w0 = (t % nW) * TILE, bh = t / nW;
  return {bh / H, bh % H, w0, (int)std::min<int64_t>(TILE, W - w0)};
}

template <int DT>
inline float load_logit(const void* base, int64_t off) {
  return Logit<DT>::to_float(static_cast<const typename Logit<DT>::T*>(base)[off]);
}

// buf[c * TILE + i] = logit (b, c, h, w0 + i) as float32; past n zero-filled.
template <int DT>
inline void load_tile(const void* lp, int64_t C, int64_t base, int64_t ls_c, int64_t ls_w, int n,
                      float* buf) {
  if (n < TILE) {
    for (int64_t c = 0; c < C; ++c) std::memset(buf + c * TILE + n, 0, sizeof(float) * (size_t)(TILE - n));
  }
  if (ls_w == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = base + c * ls_c;
      float* dst = buf + c * TILE;
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = load_logit<DT>(lp, row + i);
    }
  } else {
    // channels-last and general strides: walk pixels in memory order, scatter into buf
    for (int i = 0; i < n; ++i) {
      const int64_t px = base + i * ls_w;
      for (int64_t c = 0; c < C; ++c) buf[c * TILE + i] = load_logit<DT>(lp, px + c * ls_c);
    }
  }
}

// The tile's class rows: straight from the input for float32 rows of a full tile
// (no copy), otherwise converted into buf. Returns the class stride of the result.
template <int DT>
inline const float* tile_rows(const void* lp, int64_t C, int64_t base, int64_t ls_c, int64_t ls_w, int n,
                              float* buf, int64_t& cstride) {
  if (DT == F32 && ls_w == 1 && n == TILE) {
    cstride = ls_c;
    return static_cast<const float*>(lp) + base;
  }
  load_tile<DT>(lp, C, base, ls_c, ls_w, n, buf);
  cstride = TILE;
  return buf;
}

// Label values -> LabelClass through the LUT (pixel.h); one loop per label dtype, so the
// per-pixel work is a load, a range check and the LUT read.
inline void label_tile(const void* yp, int32_t dt, int64_t base, int64_t ys_w, int n,
                       const int8_t* lut, int64_t lut_offset, int64_t lut_len, int8_t* cls) {
  with_label_type(dt, [&](auto tag, auto is_bool) {
    const auto* y = static_cast<const decltype(tag)*>(yp) + base;
    for (int i = 0; i < n; ++i)
      cls[i] = (int8_t)label_class(label_raw<decltype(is_bool)::value>(y[i * ys_w]), lut, lut_offset, lut_len);
  });
}

// The scoring and the fit passes walk tiles alike: a tile's class rows (no copy for full
// float32 rows, else converted into buf; cs: their class stride) and its label classes.
struct TileRows {
  const float* rows;
  int64_t cs;
};
template <int DT>
inline TileRows read_tile(const InputArgs& a, const TilePos& tp, float* buf) {
  TileRows r{nullptr, TILE};
  r.rows = tile_rows<DT>(reinterpret_cast<const void*>(a.logits_ptr), a.C,
                         tp.b * a.ls_b + tp.h * a.ls_h + tp.w0 * a.ls_w, a.ls_c, a.ls_w, tp.n, buf, r.cs);
  return r;
}

// Without labels every pixel is LABEL_NORMAL (the fit on unlabelled in-distribution data).
inline void tile_labels(const InputArgs& a, const TilePos& tp, int8_t* cls) {
  if (!a.labels_ptr) {
    for (int i = 0; i < tp.n; ++i) cls[i] = LABEL_NORMAL;
    return;
  }
  label_tile(reinterpret_cast<const void*>(a.labels_ptr), a.label_dtype, tp.b * a.ys_b + tp.h * a.ys_h + tp.w0 * a.ys_w,
             a.ys_w, tp.n, reinterpret_cast<const int8_t*>(a.lut_ptr), a.lut_offset, a.lut_len, cls);
}

struct TileState {
  float m[TILE], s1[TILE], sT[TILE], sx[TILE], gen[TILE];
  int32_t k[TILE];
  uint8_t bad[TILE];     // skipped and counted: a NaN / inf logit, or a non-finite coordinate of any method
  uint8_t bad_in[TILE];  // some logit of the pixel is NaN or +-inf: every map holds NaN there
};

// A map value: NaN where the pixel's logits are not all finite ("NaN in, NaN out"; the
// coordinate formulas would turn them into finite numbers, e.g. a max logit of -1).
inline void write_map(const float* v, const uint8_t* bad_in, int n, float* out_map) {
  const float nan = u2f(0x7fc00000u);
#pragma omp simd
  for (int i = 0; i < n; ++i) out_map[i] = bad_in[i] ? nan : v[i];
}

// Max/argmax and the exp sums every requested method needs, vectorized over pixels.
// Lanes are pixels: blocks of V pixels keep their running max / sums in fixed-size
// local arrays (registers after unrolling) while the class loop runs outside, so each
// class row of the tile is read once per pass and every V-loop is a few SIMD ops.
// Tiles are always processed whole (load_tile zero-fills past n).
constexpr int V = 16;

inline void tile_sums(const float* buf, int64_t cs, int64_t C, bool need_s1, bool need_sT, bool need_sx,
                      bool need_gen, float inv_t, float gamma, TileState& st) {
  const int32_t Ci = (int32_t)C;
  for (int i0 = 0; i0 < TILE; i0 += V) {
    float mv[V], chk[V];
    int32_t kv[V];
#pragma omp simd
    for (int i = 0; i < V; ++i) {
      mv[i] = buf[i0 + i];
      chk[i] = mv[i] * 0.0f;
      kv[i] = 0;
    }
    for (int32_t c = 1; c < Ci; ++c) {
      const float* row = buf + c * cs + i0;
#pragma omp simd
      for (int i = 0; i < V; ++i) {
        // arithmetic instead of "x = cond ? a : x", which GCC turns into slow masked stores
        const int32_t gt = (int32_t)(row[i] > mv[i]);
        kv[i] += gt * (c - kv[i]);
        mv[i] = std::max(mv[i], row[i]);
        chk[i] += row[i] * 0.0f;  // stays 0 unless some logit is NaN or inf (inf * 0 = NaN)
      }
    }
#pragma omp simd
    for (int i = 0; i < V; ++i) {
      st.m[i0 + i] = mv[i];
      st.k[i0 + i] = kv[i];
      st.bad[i0 + i] = (uint8_t)(chk[i] != 0.0f);
      st.bad_in[i0 + i] = st.bad[i0 + i];
    }
    if (need_s1 || need_sx) {
      float s1[V], sx[V];
#pragma omp simd
      for (int i = 0; i < V; ++i) s1[i] = sx[i] = 0.0f;
      for (int32_t c = 0; c < Ci; ++c) {
        const float* row = buf + c * cs + i0;
        if (need_sx) {
#pragma omp simd
          for (int i = 0; i < V; ++i) {
            const float d = row[i] - mv[i];
            const float e = fast_exp_nonpos(d);
            s1[i] += s1_term(e, c == kv[i]);
            sx[i] += entropy_term(e, d);
          }
        } else {
#pragma omp simd
          for (int i = 0; i < V; ++i) s1[i] += s1_term(fast_exp_nonpos(row[i] - mv[i]), c == kv[i]);
        }
      }
#pragma omp simd
      for (int i = 0; i < V; ++i) {
        st.s1[i0 + i] = s1[i];
        st.sx[i0 + i] = sx[i];
      }
    }
    if (need_sT) {
      float sT[V];
#pragma omp simd
      for (int i = 0; i < V; ++i) sT[i] = 0.0f;
      for (int32_t c = 0; c < Ci; ++c) {
        const float* row = buf + c * cs + i0;
#pragma omp simd
        for (int i = 0; i < V; ++i) sT[i] += s1_term(fast_exp_nonpos((row[i] - mv[i]) * inv_t), c == kv[i]);  // T > 0
      }
#pragma omp simd
      for (int i = 0; i < V; ++i) st.sT[i0 + i] = sT[i];
    }
    if (need_gen) {
      float g[V], z[V], lz[V], s1[V];
#pragma omp simd
      for (int i = 0; i < V; ++i) {
        s1[i] = st.s1[i0 + i];
        z[i] = 1.0f + s1[i];
        lz[i] = fast_log(z[i]);
        g[i] = 0.0f;
      }
      for (int32_t c = 0; c < Ci; ++c) {
        const float* row = buf + c * cs + i0;
#pragma omp simd
        for (int i = 0; i < V; ++i) g[i] += gen_term(row[i] - mv[i], c == kv[i], s1[i], z[i], lz[i], gamma);
      }
#pragma omp simd
      for (int i = 0; i < V; ++i) st.gen[i0 + i] = g[i];
    }
  }
}

// The coordinates' bin indices and tie signature words (binning.h), each where asked
// for (null: not computed; score-only calls compute neither).
inline void bin_loops(const float* v, int n, int32_t* out_idx, uint32_t* out_sig) {
  if (out_idx) {
#pragma omp simd
    for (int i = 0; i < n; ++i) out_idx[i] = bin_index(v[i]);
  }
  if (out_sig) {
#pragma omp simd
    for (int i = 0; i < n; ++i) out_sig[i] = bin_sig(v[i]);
  }
}

// One method's coordinate for every pixel of a tile, then its bins / signatures / map
// where asked for; METH is a compile-time constant so method_coord's switch folds away
// and the loop vectorizes.
template <int METH>
inline void coord_loop(TileState& st, int n, const FusedArgs& a, const float* sml_mean,
                       const float* sml_inv, float inv_log_c, int32_t* out_idx, uint32_t* out_sig,
                       float* out_map) {
  float v[TILE];
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    PixelSums ps{st.m[i], st.k[i], st.s1[i], st.sT[i], st.sx[i], st.gen[i]};
    float mu = 0.0f, inv = 0.0f;
    if (METH == SML) {
      mu = sml_mean[st.k[i]];
      inv = sml_inv[st.k[i]];
    }
    v[i] = method_coord(METH, ps, a.temperature, mu, inv, inv_log_c, a.entropy_normalize);
    // a non-finite coordinate (SML with a zero std, energy past the float range) is not a
    // score: the pixel is skipped for every method and counted, like a NaN logit
    st.bad[i] = (uint8_t)(st.bad[i] | (uint8_t)nonfinite_bits(f2u(v[i])));
  }
  bin_loops(v, n, out_idx, out_sig);
  if (out_map) write_map(v, st.bad_in, n, out_map);
}

// coord_loop<METH> of every per-pixel method in the table (methods.h) by code; null for
// the others (HEAT, EXTERNAL: their coordinates come from elsewhere).
using CoordLoop = void (*)(TileState&, int, const FusedArgs&, const float*, const float*, float, int32_t*, uint32_t*,
                           float*);
template <int CODE>
constexpr CoordLoop coord_loop_of() {
  if constexpr (CODE < N_PER_PIXEL) return &coord_loop<CODE>;
  else return nullptr;
}
constexpr CoordLoop COORD_LOOPS[N_METHOD_KINDS] = {
#define AF_COORD_LOOP(E, code, name, needs) coord_loop_of<code>(),
    ANOMFAST_METHOD_TABLE(AF_COORD_LOOP)
#undef AF_COORD_LOOP
};

// A precomputed coordinate (HEAT's tile values, an EXTERNAL map row) -> bins. A
// non-finite coordinate marks the pixel bad: it is then skipped for every method and
// counted, exactly like a pixel with a NaN/inf logit, so all methods see the same pixels.
inline void given_coord_loop(const float* src, int n, TileState& st, int32_t* out_idx, uint32_t* out_sig,
                             float* out_map) {
#pragma omp simd
  for (int i = 0; i < n; ++i) st.bad[i] = (uint8_t)(st.bad[i] | (uint8_t)nonfinite_bits(f2u(src[i])));
  bin_loops(src, n, out_idx, out_sig);
  if (out_map) write_map(src, st.bad_in, n, out_map);
}

// HEAT's tiles: 3x3 neighbourhoods of the softmax (heat_tile.inc)
#include "heat_tile.inc"

// Called once by every thread of a parallel region after its set-up (scratch
// allocations), `mine` saying whether it succeeded: returns whether every thread's did
// (the barrier lets all see the shared flag), so that all threads work or none does.
inline bool all_set_up(bool mine, int* failed) {
  if (!mine) {
#pragma omp atomic write
    *failed = 1;
  }
#if defined(_OPENMP)
#pragma omp barrier
#endif
  int any = 0;
#pragma omp atomic read
  any = *failed;
  return !any;
}

// The per-thread private histogram and its reduction into the shared one (private_hist.inc)
#include "private_hist.inc"


template <int DT>
int fused_impl(const FusedArgs& a) {
  const int64_t C = a.C, nW = (a.W + TILE - 1) / TILE;
  const int64_t n_tiles = a.B * a.H * nW;
  const int M = a.n_methods;
  const bool with_hist = a.labels_ptr != 0 && a.hist_ptr != 0;
  const ClassLoopNeeds fl = class_loop_needs(a.methods, a.n_methods, a.temperature);  // methods.h
  const float inv_t = 1.0f / a.temperature;
  const float inv_log_c = C > 1 ? 1.0f / fast_log((float)C) : 0.0f;
  const float* sml_mean = reinterpret_cast<const float*>(a.sml_mean_ptr);
  const float* sml_inv = reinterpret_cast<const float*>(a.sml_inv_std_ptr);
  const void* lp = reinterpret_cast<const void*>(a.logits_ptr);
  int64_t* hist = reinterpret_cast<int64_t*>(a.hist_ptr);
  uint32_t* sig = reinterpret_cast<uint32_t*>(a.sig_ptr);
  uint8_t* occ = reinterpret_cast<uint8_t*>(a.occ_ptr);
  float* maps = reinterpret_cast<float*>(a.maps_ptr);
  const float* heat_m = reinterpret_cast<const float*>(a.heat_m_ptr);
  const float* ext = reinterpret_cast<const float*>(a.ext_ptr);
  int64_t* counters = reinterpret_cast<int64_t*>(a.counters_ptr);
  const int64_t plane = a.H * a.W, map_stride = a.B * plane;
  // methods whose tie signatures are filled (views.h); the others cost what they did
  // before signatures: no signature word computed, queued, OR-ed or flushed
  const int32_t sig_mask = (with_hist && a.sig_ptr) ? (a.sig_mask & ((1 << M) - 1)) : 0;
  int ext_slot[MAX_METHODS];  // which ext map each EXTERNAL method reads (order of appearance)
  for (int j = 0, e = 0; j < M; ++j) ext_slot[j] = a.methods[j] == EXTERNAL ? e++ : -1;
  int err = 0;
  // flat private histograms: (methods, 2, NBINS) like hist, then the trash slot
  const int64_t trash = with_hist ? (int64_t)M * 2 * NBINS : 0;
  const int64_t n_blocks = (trash >> BLOCK_SHIFT) + 1;
  const uint64_t flush_every = a.flush_every > 0 ? std::min<uint64_t>((uint64_t)a.flush_every, FLUSH_EVERY) : FLUSH_EVERY;
  const int n_seg = 2 * M;  // (method, label) segments of NBINS slots
  int any_blocks = 0;  // some thread flushes by ranges: the shared reduction runs

#if defined(_OPENMP)
  int nt = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, n_tiles));
  const int chunk = (int)std::max<int64_t>(16, std::min<int64_t>(64, n_tiles / (8 * nt)));
#else
  const int nt = 1;
#endif
  std::vector<PrivateHist> all_ph((size_t)nt);  // every thread's, for the reduction
  std::vector<SlotRanges> all_ranges((size_t)nt);
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> buf;  // C x TILE logits of a tile
    int8_t cls[TILE];
    // Counts wait in qbuf (per method: flat slots in the private histogram, one per pixel)
    // and are added in bursts of BURST_TILES tiles: interleaved tile by tile with the
    // streaming reads of the logits, the scattered increments miss the caches far more
    // often (bursts made the 4-method pass 15% faster on Zen 4).
    std::unique_ptr<int32_t[]> qbuf;  // M x QCAP, uninitialized: written before read
    // and their tie signature words (binning.h), queued alongside
    std::unique_ptr<uint32_t[]> wbuf;
    int nq = 0;  // pixels waiting in qbuf
    TileState st;
    std::unique_ptr<HeatBuf> hb;
    int64_t cnt[N_COUNTERS] = {0, 0, 0, 0};
    const int tid = thread_id();
    PrivateHist& ph = all_ph[(size_t)tid];
    SlotRanges& rng = all_ranges[(size_t)tid];
    // Scratch and private histogram. A failed allocation (a huge class count, a full
    // memory) must neither throw out of the parallel region (std::terminate) nor leave the
    // other threads adding their share: every thread sets up, the barrier lets all see
    // whether one failed, and then all work or none does (FUSED_NO_MEMORY, nothing added).
    bool set_up = true;
    try {
      buf.resize((size_t)C * TILE);
      qbuf.reset(new int32_t[(size_t)M * QCAP]);
      if (sig_mask) wbuf.reset(new uint32_t[(size_t)M * QCAP]);
      if (fl.heat) hb.reset(new HeatBuf(C));
      set_up = !with_hist || ph.init(hist, sig, occ, trash, sig_mask, n_seg, flush_every, &rng);
    } catch (const std::exception&) {
      set_up = false;
    }
    const bool ready = all_set_up(set_up, &err);
    auto burst = [&]() {
      ph.burst(qbuf.get(), wbuf.get(), M, nq);
      nq = 0;
    };

    // Chunks of up to 64 tiles: each class row is then read as a 16 KiB sequential
    // stream, long enough for the hardware prefetcher to ramp up (16-tile chunks, one
    // 4 KiB page per stream, were ~4% slower); at least 8 chunks per thread when the
    // call has tiles enough.
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, chunk)
#endif
    for (int64_t t = 0; t < n_tiles; ++t) {
      if (!ready) continue;
      const TilePos tp = fl.heat ? heat_tile_pos(t, nW, a.H, a.W) : tile_pos(t, nW, a.H, a.W);
      const int64_t b = tp.b, h = tp.h, w0 = tp.w0;
      const int n = tp.n;
      const TileRows tr = read_tile<DT>(a, tp, buf.data());
      const float* rows = tr.rows;
      const int64_t cs = tr.cs;
      tile_sums(rows, cs, C, fl.s1, fl.sT, fl.sx, fl.gen, inv_t, a.gen_gamma, st);
      const int64_t px = b * plane + h * a.W + w0;  // the tile's offset in (B, H, W) maps
      if (fl.heat) heat_tile<DT>(a, lp, b, h, w0, n, rows, cs, st, heat_m + px, *hb);

      for (int j = 0; j < M; ++j) {
        float* out_map = maps ? maps + j * map_stride + px : nullptr;
        int32_t* out_idx = with_hist ? qbuf.get() + (size_t)j * QCAP + nq : nullptr;
        uint32_t* out_sig = ((sig_mask >> j) & 1) ? wbuf.get() + (size_t)j * QCAP + nq : nullptr;
        const int32_t code = a.methods[j];  // checked at entry (checks.h)
        if (code == HEAT) {
          given_coord_loop(hb->val, n, st, out_idx, out_sig, out_map);
        } else if (code == EXTERNAL) {
          given_coord_loop(ext + ext_slot[j] * map_stride + px, n, st, out_idx, out_sig, out_map);
        } else {
          if (!COORD_LOOPS[code]) std::abort();  // a new non-per-pixel row needs its own branch here
          COORD_LOOPS[code](st, n, a, sml_mean, sml_inv, inv_log_c, out_idx, out_sig, out_map);
        }
      }
      if (!with_hist) continue;

      tile_labels(a, tp, cls);
      // where each pixel's count goes: its label's row of method 0, or -1 (skipped)
      int32_t row[TILE];
      int32_t n_void = 0, n_invalid = 0, n_nonfinite = 0;
      for (int i = 0; i < n; ++i) {
        // pixel_fate is branch-free, so the loop vectorizes (integer sums: no pragma needed)
        const PixelFate f = pixel_fate(cls[i], st.bad[i]);
        n_void += f.is_void;
        n_invalid += f.invalid;
        n_nonfinite += f.nonfinite;
        row[i] = f.binned ? cls[i] * (int32_t)NBINS : -1;
      }
      cnt[CNT_VOID] += n_void;
      cnt[CNT_INVALID] += n_invalid;
      cnt[CNT_NONFINITE] += n_nonfinite;
      cnt[CNT_BINNED] += n - n_void - n_invalid - n_nonfinite;
      for (int j = 0; j < M; ++j) {
        const int32_t hj = j * 2 * (int32_t)NBINS;
        int32_t* q = qbuf.get() + (size_t)j * QCAP + nq;
        // and the smallest / largest slot of each label (the flush scans only between them)
        int32_t lo0 = INT32_MAX, hi0 = -1, lo1 = INT32_MAX, hi1 = -1;
#pragma omp simd reduction(min : lo0, lo1) reduction(max : hi0, hi1)
        for (int i = 0; i < n; ++i) {
          const int32_t s = row[i] >= 0 ? hj + row[i] + q[i] : (int32_t)trash;
          q[i] = s;
          lo0 = std::min(lo0, row[i] == 0 ? s : INT32_MAX);
          hi0 = std::max(hi0, row[i] == 0 ? s : -1);
          lo1 = std::min(lo1, row[i] > 0 ? s : INT32_MAX);
          hi1 = std::max(hi1, row[i] > 0 ? s : -1);
        }
        rng.lo[2 * j] = std::min(rng.lo[2 * j], lo0);
        rng.hi[2 * j] = std::max(rng.hi[2 * j], hi0);
        rng.lo[2 * j + 1] = std::min(rng.lo[2 * j + 1], lo1);
        rng.hi[2 * j + 1] = std::max(rng.hi[2 * j + 1], hi1);
      }
      nq += n;
      if (nq + TILE > QCAP) burst();
    }
    if (with_hist) {
      if (ready) burst();
      // Threads past the cap leave their counts for the shared reduction below;
      // the others flush theirs first (their atomics must not meet its plain adds).
      if (ready && !ph.past_cap()) ph.flush();
      if (ready && ph.past_cap()) {
#pragma omp atomic write
        any_blocks = 1;
      }
#if defined(_OPENMP)
#pragma omp barrier
#endif
      int blocks_pending = 0;
#pragma omp atomic read
      blocks_pending = any_blocks;
      if (blocks_pending) {
        // every block of hist is written by one thread, from every thread's copy
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t blk = 0; blk < n_blocks; ++blk) PrivateHist::reduce_block(blk, all_ph.data(), nt, trash, n_seg);
        if (ready) ph.clear_trash();
        rng.reset();  // after the omp for's implicit barrier: every thread's ranges were read above
      }
    }
    for (int q = 0; q < N_COUNTERS; ++q) {
#if defined(_OPENMP)
#pragma omp atomic
#endif
      counters[q] += cnt[q];
    }
  }
  return err ? FUSED_NO_MEMORY : FUSED_OK;  // scratch allocation failed: Python raises MemoryError
}

template <int DT>
void fit_impl(const FitArgs& a) {
  const int64_t C = a.C, nW = (a.W + TILE - 1) / TILE;
  const int64_t n_tiles = a.B * a.H * nW;
  int64_t* count = reinterpret_cast<int64_t*>(a.count_ptr);
  double* sum = reinterpret_cast<double*>(a.sum_ptr);
  double* sumsq = reinterpret_cast<double*>(a.sumsq_ptr);
  int64_t* counters = reinterpret_cast<int64_t*>(a.counters_ptr);
  // Floating-point sums depend on their order: each fixed group of FIT_GROUP tiles is
  // summed in tile order into its own slot, and the slots are added in group order
  // after the parallel loop, so the statistics are bit-identical for any thread count
  // and schedule (counts are integers and need no such care).
  constexpr int64_t FIT_GROUP = 256;
  const int64_t n_groups = (n_tiles + FIT_GROUP - 1) / FIT_GROUP;
  std::vector<double> gsum((size_t)(n_groups * C), 0.0), gsq((size_t)(n_groups * C), 0.0);
  int failed = 0;  // some thread's scratch could not be allocated
#if defined(_OPENMP)
  int nt = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, n_groups));
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> buf;
    int8_t cls[TILE];
    TileState st;
    std::vector<int64_t> lc;
    int64_t cnt[N_COUNTERS] = {0, 0, 0, 0};
    // a failed allocation must not throw out of the parallel region (std::terminate):
    // every thread learns of it at the barrier, none fits anything, and the call throws
    // std::bad_alloc after the region (MemoryError in Python)
    bool set_up = true;
    try {
      buf.resize((size_t)C * TILE);
      lc.assign((size_t)C, 0);
    } catch (const std::exception&) {
      set_up = false;
    }
    const bool ready = all_set_up(set_up, &failed);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t g = 0; g < n_groups; ++g) {
      if (!ready) continue;
      double* ls = gsum.data() + g * C;
      double* lq = gsq.data() + g * C;
      for (int64_t t = g * FIT_GROUP; t < std::min(n_tiles, (g + 1) * FIT_GROUP); ++t) {
        const TilePos tp = tile_pos(t, nW, a.H, a.W);
        const TileRows tr = read_tile<DT>(a, tp, buf.data());
        tile_sums(tr.rows, tr.cs, C, false, false, false, false, 1.0f, 0.0f, st);
        tile_labels(a, tp, cls);
        for (int i = 0; i < tp.n; ++i) {
          const PixelFate f = fit_fate(cls[i], st.bad[i]);
          count_fate(cnt, f);
          if (!f.binned) continue;
          const int32_t k = st.k[i];
          const double m = st.m[i];
          lc[k] += 1;
          ls[k] += m;
          lq[k] += m * m;
        }
      }
    }
#if defined(_OPENMP)
#pragma omp critical(anomfast_fit_reduce)
#endif
    if (ready) {
      for (int64_t c = 0; c < C; ++c) count[c] += lc[c];
      for (int q = 0; q < N_COUNTERS; ++q) counters[q] += cnt[q];
    }
  }
  if (failed) throw std::bad_alloc();
  for (int64_t g = 0; g < n_groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += gsum[g * C + c];
      sumsq[c] += gsq[g * C + c];
    }
  }
}

}  // namespace

int fused(const FusedArgs& a) {
  int status = FUSED_OK;
  with_logit_dtype(a.logit_dtype, [&](auto dt) { status = fused_impl<decltype(dt)::value>(a); });
  return status;
}

void fit_sml(const FitArgs& a) {
  with_logit_dtype(a.logit_dtype, [&](auto dt) { fit_impl<decltype(dt)::value>(a); });
}

}  // namespace ANOMFAST_ISA_NS
}  // namespace anomfast
