// Connected components and per-component pixel counts on the device: the CUDA twin of
// csrc/cpu/components_cpu.cpp (same inputs per image, same integer outputs, see
// components_cuda.h), so that component metrics of CUDA score maps never copy a pixel map
// to the host; only the per-component rows come back.
//
// Labeling: union-find over pixel indices in global memory (Playne & Hawick, "A new
// algorithm for parallel connected-component labelling on GPUs", 2018): every
// foreground pixel starts as its own root; one thread per pixel unites it with its
// earlier 8-neighbours (the decision tree of components_cpu.cpp: the upper neighbour
// alone when it is foreground, else the left or upper-left one and the upper-right one;
// these unions connect exactly what 8-adjacency connects, whatever their order); a union
// links the larger root under the smaller with atomicMin and retries when another thread
// moved that root first, so every root ends as its component's smallest pixel index (its
// first pixel in raster order) however the threads interleave. A pass of full finds then
// writes each pixel's root. The merge's finds halve the paths they walk (plain stores,
// see find_root); stale reads of a parent only slow a find down there: a parent is always
// a smaller pixel index of the same set, so no walk can cycle or leave its set. The
// compress pass only reads while it walks (each thread then is the one writer of its own
// pixel's entry): a halving store there could overwrite a pixel's final root with a
// grandparent read before that root was written.
//
// Counting, per image, all on the device: component sizes (warp-aggregated atomics on
// the root's slot), the region of interest (void and small components out), per kept
// segment its pixels there, on a component and off every component, per component the
// pixels some segment covers, and the touching (component, segment) pairs, deduplicated
// in an open-addressing hash set (64-bit keys, atomicCAS; at most components_capacity
// pairs, table twice that size rounded up to a power of two). A last kernel adds each
// pair's terms to the adjusted unions and another writes one row per component kept and
// per segment left, in the order the threads reach them (the metrics sum them exactly,
// so the order does not matter; Python sorts nothing).
#if defined(ANOMFAST_CUDA_EMULATE)
#include "emulate/cuda_emulation.h"  // host threads stand in for the GPU: tests only
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <string>

#include "../common/components.h"
#include "components_cuda.h"
#include "cuda_host.h"

namespace anomfast {
namespace {

using namespace cuda_host;

constexpr int CC_THREADS = 256;
constexpr int CC_BLOCKS_PER_SM = 8;
constexpr unsigned CC_FULL = 0xffffffffu;
constexpr unsigned long long CC_EMPTY = ~0ull;

// int32 arrays of the workspace, HW entries each (components_cuda.h)
enum WorkArray { GL, PL, GSIZE, PSIZE, ROI_SIZE, ON_GT, OFF_GT, COVERED, GEXTRA, PEXTRA, N_WORK };
constexpr int FIRST_ZEROED = GSIZE;  // GL and PL are written whole by the init kernels

struct CompParams {
  const uint8_t* pred;
  const int8_t* cls;
  int32_t W, HW;
  int64_t seg_min, inst_min;  // kept: size >= these (clamped to [0, HW + 1])
  int32_t mode;
  int32_t* w[N_WORK];
  unsigned long long* table;  // table_size entries, CC_EMPTY when free
  uint32_t table_mask;
  unsigned long long* list;   // the distinct pairs found, at most list_cap
  int32_t list_cap;
  int32_t* scalars;           // [0] anomaly pixels, [1] distinct pairs
  long long* gt_out;
  long long* pred_out;
  unsigned long long* counts;
  int32_t which;  // for the labeling kernels: 0 ground truth, 1 prediction
};

#if defined(ANOMFAST_CUDA_EMULATE)
#define CC_RACE_WINDOW() emulate::race_window()  // host threads: widen the window a GPU's warps hit
#else
#define CC_RACE_WINDOW() ((void)0)
#endif

__device__ __forceinline__ int32_t ld(const int32_t* p) { return *(const volatile int32_t*)p; }

// The root of x's set, with path halving: each visited pixel is pointed at its
// grandparent. A parent is always a smaller index of the same set (L[x] <= x), and a
// store here only ever replaces the parent of a pixel that is no longer a root (a root
// has L[x] == x and is never visited as a non-root), so it cannot undo a union that
// succeeded; it may overwrite what a failed atomicMin left, whose thread retries with the
// parent that atomicMin returned.
__device__ __forceinline__ int32_t find_root(int32_t* L, int32_t x) {
  for (;;) {
    const int32_t p = ld(L + x);
    if (p == x) return x;
    const int32_t gp = ld(L + p);
    if (gp == p) return p;
    CC_RACE_WINDOW();
    *(volatile int32_t*)(L + x) = gp;
    x = gp;
  }
}

// Links the sets of a and b, the larger root under the smaller.
__device__ __forceinline__ void unite(int32_t* L, int32_t a, int32_t b) {
  for (;;) {
    a = find_root(L, a);
    b = find_root(L, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomicMin(L + b, a);
    if (old == b) return;
    b = old;  // b was linked meanwhile (L[b] is now min(old, a)): join a with old's set
  }
}

// Adds v to arr[key] for every active lane, one atomic per distinct key in the warp.
// Every lane of the warp must call it (inactive ones with active = false).
__device__ __forceinline__ void warp_add(int32_t* arr, int32_t key, bool active) {
  const unsigned act = __ballot_sync(CC_FULL, active);
  if (act == 0) return;
  const unsigned peers = __match_any_sync(CC_FULL, active ? key : -1) & act;
  const int lane = (int)(threadIdx.x & 31u);
  if (active && (peers & ((1u << lane) - 1u)) == 0) atomicAdd(arr + key, (int32_t)__popc(peers));
}

__device__ __forceinline__ bool roi_at(const CompParams& P, int32_t i, bool bg_void) {
  if (P.cls[i] == COMP_VOID) return false;
  const int32_t g = P.w[GL][i];
  return g >= 0 ? P.w[GSIZE][g] >= P.inst_min : !bg_void;
}

__device__ __forceinline__ bool background_void(const CompParams& P) {
  // the benchmark's size loop starts at id 0, the background (components_cpu.cpp)
  return P.mode == COMP_BENCHMARK && (int64_t)P.HW - ld(P.scalars) < (int64_t)P.inst_min;
}

__global__ void __launch_bounds__(CC_THREADS) k_clear(const CompParams P) {
  const int64_t zeroed = (int64_t)(N_WORK - FIRST_ZEROED) * P.HW;
  const int64_t table = (int64_t)P.table_mask + 1;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < zeroed + table + 2; k += stride) {
    if (k < zeroed) P.w[FIRST_ZEROED][k] = 0;  // the zeroed arrays are contiguous
    else if (k < zeroed + table) P.table[k - zeroed] = CC_EMPTY;
    else P.scalars[k - zeroed - table] = 0;
  }
  if (blockIdx.x == 0 && threadIdx.x < 2) P.counts[threadIdx.x] = 0;
}

// Every foreground pixel its own root; background -1.
__global__ void __launch_bounds__(CC_THREADS) k_init(const CompParams P) {
  int32_t* L = P.w[P.which == 0 ? GL : PL];
  const bool bg_void = P.which == 1 && background_void(P);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < P.HW; k += stride) {
    const int32_t i = (int32_t)k;
    bool fg;
    if (P.which == 0) fg = P.cls[i] == COMP_ANOMALY;
    else if (P.mode == COMP_BENCHMARK) fg = P.pred[i] != 0 && P.cls[i] != COMP_VOID;
    else fg = P.pred[i] != 0 && roi_at(P, i, bg_void);
    L[i] = fg ? i : -1;
  }
}

__global__ void __launch_bounds__(CC_THREADS) k_merge(const CompParams P) {
  int32_t* L = P.w[P.which == 0 ? GL : PL];
  const int32_t W = P.W;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < P.HW; k += stride) {
    const int32_t i = (int32_t)k;
    if (ld(L + i) < 0) continue;  // foreground entries stay >= 0 whatever unions do
    const int32_t r = i / W, c = i - r * W;
    if (r > 0 && ld(L + i - W) >= 0) {
      unite(L, i, i - W);
      continue;
    }
    if (c > 0 && ld(L + i - 1) >= 0) unite(L, i, i - 1);
    else if (r > 0 && c > 0 && ld(L + i - W - 1) >= 0) unite(L, i, i - W - 1);
    if (r > 0 && c + 1 < W && ld(L + i - W + 1) >= 0) unite(L, i, i - W + 1);
  }
}

// The root of x's set without writing (the merges are done; see the file's comment).
__device__ __forceinline__ int32_t root_of(const int32_t* L, int32_t x) {
  int32_t p = ld(L + x);
  while (p != x) {
    x = p;
    p = ld(L + x);
  }
  return x;
}

// Each pixel's root; component sizes; for the ground truth, the anomaly pixels.
__global__ void __launch_bounds__(CC_THREADS) k_compress(const CompParams P) {
  int32_t* L = P.w[P.which == 0 ? GL : PL];
  int32_t* size = P.w[P.which == 0 ? GSIZE : PSIZE];
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t base = (int64_t)blockIdx.x * blockDim.x; base < P.HW; base += stride) {  // warp-uniform turns
    const int64_t k = base + threadIdx.x;
    const bool in = k < P.HW;
    const int32_t i = in ? (int32_t)k : 0;
    const bool fg = in && ld(L + i) >= 0;
    const int32_t root = fg ? root_of(L, i) : -1;
    if (fg) *(volatile int32_t*)(L + i) = root;  // only this thread writes L[i] here
    warp_add(size, root, fg);
    if (P.which == 0) {
      const unsigned n = __ballot_sync(CC_FULL, fg);
      if ((threadIdx.x & 31u) == 0 && n) atomicAdd(P.scalars, (int32_t)__popc(n));
    }
  }
}

__device__ __forceinline__ uint32_t pair_hash(unsigned long long key) {
  key ^= key >> 33;
  key *= 0xff51afd7ed558ccdull;
  key ^= key >> 33;
  return (uint32_t)key;
}

// Per kept segment its pixels in the region of interest, on a component and off every
// component; per component the pixels a segment covers; the distinct touching pairs.
__global__ void __launch_bounds__(CC_THREADS) k_count(const CompParams P) {
  const bool bg_void = background_void(P);
  const int32_t* gl = P.w[GL];
  const int32_t* pl = P.w[PL];
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t base = (int64_t)blockIdx.x * blockDim.x; base < P.HW; base += stride) {  // warp-uniform turns
    const int64_t k = base + threadIdx.x;
    const bool in = k < P.HW;
    const int32_t i = in ? (int32_t)k : 0;
    const int32_t s = in ? pl[i] : -1;
    const bool act = s >= 0 && P.w[PSIZE][s] >= P.seg_min && roi_at(P, i, bg_void);
    const int32_t g = act ? gl[i] : -1;
    warp_add(P.w[ROI_SIZE], s, act);
    warp_add(P.w[OFF_GT], s, act && g < 0);
    warp_add(P.w[ON_GT], s, act && g >= 0);
    warp_add(P.w[COVERED], g, act && g >= 0);
    // a pair once per run along a row (the left neighbour on the same pair skips it);
    // a left neighbour with the same component and segment is in the region of interest
    if (act && g >= 0 && !(i % P.W > 0 && pl[i - 1] == s && gl[i - 1] == g)) {
      const unsigned long long key = ((unsigned long long)(uint32_t)g << 32) | (uint32_t)s;
      // at most list_cap distinct pairs (components_capacity) in a table of twice that:
      // the guards below only keep a broken invariant from writing out of bounds
      uint32_t h = pair_hash(key) & P.table_mask;
      for (uint32_t probes = 0; probes <= P.table_mask; ++probes) {
        const unsigned long long prev = atomicCAS(P.table + h, CC_EMPTY, key);
        if (prev == CC_EMPTY) {
          const int32_t idx = atomicAdd(P.scalars + 1, 1);
          if (idx < P.list_cap) P.list[idx] = key;
          break;
        }
        if (prev == key) break;
        h = (h + 1) & P.table_mask;
      }
    }
  }
}

// Adjusted unions: a component gains the off-component pixels of every segment touching
// it, a segment the uncovered pixels of every component it touches.
__global__ void __launch_bounds__(CC_THREADS) k_pairs(const CompParams P) {
  const int32_t found = ld(P.scalars + 1);
  const int32_t n = found < P.list_cap ? found : P.list_cap;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
    const unsigned long long key = P.list[k];
    const int32_t g = (int32_t)(key >> 32), s = (int32_t)(key & 0xffffffffu);
    atomicAdd(P.w[GEXTRA] + g, P.w[OFF_GT][s]);
    atomicAdd(P.w[PEXTRA] + s, P.w[GSIZE][g] - P.w[COVERED][g]);
  }
}

// One row per component kept (covered, adjusted union) and per segment with a pixel in
// the region of interest (on components, size there, adjusted union).
__global__ void __launch_bounds__(CC_THREADS) k_rows(const CompParams P) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < P.HW; k += stride) {
    const int32_t i = (int32_t)k;
    if (P.w[GL][i] == i && P.w[GSIZE][i] >= P.inst_min) {
      const unsigned long long r = atomicAdd(P.counts, 1ull);
      P.gt_out[2 * r] = P.w[COVERED][i];
      P.gt_out[2 * r + 1] = (long long)P.w[GSIZE][i] + P.w[GEXTRA][i];
    }
    if (P.w[PL][i] == i && P.w[PSIZE][i] >= P.seg_min && P.w[ROI_SIZE][i] > 0) {
      const unsigned long long r = atomicAdd(P.counts + 1, 1ull);
      P.pred_out[3 * r] = P.w[ON_GT][i];
      P.pred_out[3 * r + 1] = P.w[ROI_SIZE][i];
      P.pred_out[3 * r + 2] = (long long)P.w[ROI_SIZE][i] + P.w[PEXTRA][i];
    }
  }
}

// ------------------------------------------------------------------ host side

int64_t table_size(int64_t H, int64_t W) {
  int64_t t = 1;
  while (t < 2 * components_capacity(H, W)) t <<= 1;
  return t;
}

template <class Kernel>
void run(Kernel kernel, const CompParams& P, int64_t n, int64_t max_blocks, int64_t stream) {
  int64_t grid = (n + CC_THREADS - 1) / CC_THREADS;
  if (grid > max_blocks) grid = max_blocks;
  if (grid < 1) grid = 1;
#if defined(ANOMFAST_CUDA_EMULATE)
  (void)stream;
  emulate::launch((unsigned)grid, CC_THREADS, 0, [&] { kernel(P); });
#else
  kernel<<<(unsigned)grid, CC_THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(P);
#endif
  check(cudaGetLastError(), "components kernel launch");
}

void check_size(int64_t B, int64_t H, int64_t W) {
  if (B < 0 || H < 1 || W < 1 || H >= (int64_t(1) << 31) || W >= (int64_t(1) << 31) || H * W >= (int64_t(1) << 31))
    bad_arg("components: need B >= 0 images of H x W pixels, 1 <= H * W < 2^31; got B = " + std::to_string(B) +
            ", H = " + std::to_string(H) + ", W = " + std::to_string(W));
}

}  // namespace

ComponentsWorkspace components_cuda_workspace(int64_t H, int64_t W) {
  check_size(0, H, W);
  const int64_t cap = components_capacity(H, W);
  return ComponentsWorkspace{(int64_t)N_WORK * H * W, table_size(H, W) + cap + 1, cap};
}

void components_cuda(int64_t pred_ptr, int64_t cls_ptr, int64_t B, int64_t H, int64_t W, int64_t thresh_segsize,
                     int64_t thresh_instsize, int64_t mode, int64_t work_ptr, int64_t work_len, int64_t table_ptr,
                     int64_t table_len, int64_t gt_out_ptr, int64_t pred_out_ptr, int64_t capacity,
                     int64_t counts_ptr, int64_t stream) {
  check_size(B, H, W);
  if (mode != COMP_BENCHMARK && mode != COMP_CLEAN) bad_arg("components: unknown mode " + std::to_string(mode));
  const ComponentsWorkspace ws = components_cuda_workspace(H, W);
  if (work_len < ws.work_int32 || table_len < ws.table_uint64 || capacity < ws.capacity)
    bad_arg("components: workspace too small for " + std::to_string(H) + " x " + std::to_string(W) +
            " (components_workspace gives the sizes)");
  if (B == 0) return;
  const int dev = device_of(pred_ptr, "prediction maps", 1);
  check_on(dev, cls_ptr, "label classes", 1, "prediction maps");
  check_on(dev, work_ptr, "components workspace", 4, "prediction maps");
  check_on(dev, table_ptr, "components pair table", 8, "prediction maps");
  check_on(dev, gt_out_ptr, "ground-truth component rows", 8, "prediction maps");
  check_on(dev, pred_out_ptr, "predicted segment rows", 8, "prediction maps");
  check_on(dev, counts_ptr, "component counts", 8, "prediction maps");
  const int64_t HW = H * W;
  const auto clamp = [HW](int64_t t) { return t < 0 ? 0 : t > HW + 1 ? HW + 1 : t; };
  CompParams P{};
  P.W = (int32_t)W;
  P.HW = (int32_t)HW;
  P.seg_min = clamp(thresh_segsize);
  P.inst_min = clamp(thresh_instsize);
  P.mode = (int32_t)mode;
  int32_t* work = reinterpret_cast<int32_t*>(work_ptr);
  for (int k = 0; k < N_WORK; ++k) P.w[k] = work + (int64_t)k * HW;
  const int64_t tsize = table_size(H, W);
  P.table = reinterpret_cast<unsigned long long*>(table_ptr);
  P.table_mask = (uint32_t)(tsize - 1);
  P.list = P.table + tsize;
  P.list_cap = (int32_t)ws.capacity;
  P.scalars = reinterpret_cast<int32_t*>(P.list + ws.capacity);  // 2 int32 in the last uint64 word
  DeviceGuard guard(dev);
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  const int64_t max_blocks = (int64_t)(sms > 0 ? sms : 1) * CC_BLOCKS_PER_SM;
  const int64_t n_clear = (int64_t)(N_WORK - FIRST_ZEROED) * HW + tsize + 2;
  for (int64_t b = 0; b < B; ++b) {
    P.pred = reinterpret_cast<const uint8_t*>(pred_ptr) + b * HW;
    P.cls = reinterpret_cast<const int8_t*>(cls_ptr) + b * HW;
    P.gt_out = reinterpret_cast<long long*>(gt_out_ptr) + b * 2 * capacity;
    P.pred_out = reinterpret_cast<long long*>(pred_out_ptr) + b * 3 * capacity;
    P.counts = reinterpret_cast<unsigned long long*>(counts_ptr) + 2 * b;
    run(k_clear, P, n_clear, max_blocks, stream);
    for (int32_t which = 0; which < 2; ++which) {  // ground truth first: the prediction's ROI needs its sizes
      P.which = which;
      run(k_init, P, HW, max_blocks, stream);
      run(k_merge, P, HW, max_blocks, stream);
      run(k_compress, P, HW, max_blocks, stream);
    }
    run(k_count, P, HW, max_blocks, stream);
    run(k_pairs, P, ws.capacity, max_blocks, stream);
    run(k_rows, P, HW, max_blocks, stream);
  }
}

}  // namespace anomfast
