// Host emulation of the CUDA features fused_cuda.cu uses, so that its kernels run, and
// are tested, on machines without a GPU: tests/test_cuda_build.py compiles fused_cuda.cu
// with g++ -DANOMFAST_CUDA_EMULATE into a throw-away module. Not for production.
//
// One std::thread per CUDA thread; the blocks of a launch run one after another (so
// __shared__ variables can be plain statics); warp intrinsics meet at a per-warp barrier,
// so a warp-wide call that some lane of the warp never reaches hangs here, where on a GPU
// it would be undefined behaviour. Dynamic shared memory is poisoned before every block.
// The runtime API calls are stand-ins for one device with one multiprocessor that fits
// two blocks, so every launch runs a grid of at most two blocks and the grid-stride loops
// take several turns.
#pragma once
#include <barrier>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

// ------------------------------------------------------------------ runtime stand-ins
#define CUDART_VERSION 0
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef struct emulated_stream* cudaStream_t;
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2,
                      cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void*) {
  a->type = cudaMemoryTypeDevice;  // host memory is the emulated device's memory
  a->device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = 1; return cudaSuccess; }
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel, int, size_t) {
  *n = 2;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 0; return cudaSuccess; }

// ------------------------------------------------------------------ execution model
struct emulated_dim3 {
  unsigned x = 0, y = 1, z = 1;
};
inline thread_local emulated_dim3 threadIdx, blockIdx;
inline emulated_dim3 blockDim, gridDim;

namespace emulate {

constexpr size_t SMEM_BYTES = 64 * 1024;
alignas(16) inline unsigned char dyn_smem[SMEM_BYTES];

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::barrier<>* block_barrier = nullptr;
inline std::mutex atomic_mutex, launch_mutex;

inline int lane() { return (int)(threadIdx.x & 31u); }

// A per-thread xorshift32 stream, for the race helpers below.
inline uint32_t thread_random() {
  thread_local uint32_t x = 2463534242u ^ (uint32_t)(uintptr_t)&x;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return x;
}

// Gives the processor away on about every other call: called before the emulated
// read-modify-write atomics that lock-free algorithms retry on (atomicMin, atomicCAS), so
// that the host threads interleave there as often as a GPU's warps would, not once in
// thousands of calls.
inline void maybe_yield() {
  if (thread_random() & 1u) std::this_thread::yield();
}

// Sleeps 200 us on about one call in eight: called between a read and a dependent plain
// store of a lock-free algorithm (the path halving of components_cuda.cu's finds), so that
// other host threads act inside that window as warps on a GPU would.
inline void race_window() {
  if ((thread_random() & 7u) == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
}

// Every lane publishes v; returns after all 32 have, with everyone's values in out.
inline void exchange(uint64_t v, uint64_t (&out)[32]) {
  Warp& w = *warps[threadIdx.x / 32];
  w.slot[lane()] = v;
  w.bar.arrive_and_wait();
  std::memcpy(out, w.slot, sizeof(out));
  w.bar.arrive_and_wait();
}

template <class T>
uint64_t to_bits(T v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <class Body>
void launch(unsigned grid, unsigned block, size_t smem, Body&& body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  if (smem > SMEM_BYTES || block % 32 != 0) throw std::runtime_error("emulated launch: bad configuration");
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar((std::ptrdiff_t)block);
    block_barrier = &bar;
    warps.clear();
    for (unsigned i = 0; i < block / 32; ++i) warps.push_back(std::make_unique<Warp>());
    std::memset(dyn_smem, 0xAB, sizeof(dyn_smem));
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&body, t, b] {
        threadIdx.x = t;
        blockIdx.x = b;
        body();
      });
    }
    for (auto& th : threads) th.join();
  }
}

}  // namespace emulate

inline unsigned char* dynamic_smem() { return emulate::dyn_smem; }

// CUDA's vector types of the grouped logit loads (sizes and alignments as on the device)
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

// ------------------------------------------------------------------ intrinsics
inline void __syncthreads() { emulate::block_barrier->arrive_and_wait(); }
// A misaligned load faults on a GPU (the fused kernel's paired loads are 8- or 4-byte
// vector loads): stop here too, rather than let x86 read it.
template <class T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    std::fprintf(stderr, "emulated CUDA: misaligned __ldg of %zu bytes at %p\n", sizeof(T), (const void*)p);
    std::abort();
  }
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

inline unsigned __match_any_sync(unsigned, uint32_t key) {
  uint64_t s[32];
  emulate::exchange(key, s);
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= ((uint32_t)s[i] == key ? 1u : 0u) << i;
  return m;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  uint64_t s[32];
  emulate::exchange(pred ? 1 : 0, s);
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= (s[i] ? 1u : 0u) << i;
  return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  uint64_t s[32];
  emulate::exchange(emulate::to_bits(v), s);
  return emulate::from_bits<T>(s[src & 31]);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  uint64_t s[32];
  emulate::exchange(emulate::to_bits(v), s);
  const int src = emulate::lane() - (int)delta;
  return emulate::from_bits<T>(s[src < 0 ? emulate::lane() : src]);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  uint64_t s[32];
  emulate::exchange(emulate::to_bits(v), s);
  return emulate::from_bits<T>(s[(emulate::lane() ^ lane_mask) & 31]);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> lock(emulate::atomic_mutex);
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline int atomicAdd(int* p, int v) {
  std::lock_guard<std::mutex> lock(emulate::atomic_mutex);
  const int old = *p;
  *p = old + v;
  return old;
}
inline int atomicMin(int* p, int v) {
  emulate::maybe_yield();  // widens the window in which another thread moves *p first
  std::lock_guard<std::mutex> lock(emulate::atomic_mutex);
  const int old = *p;
  if (v < old) *p = v;
  return old;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expected, unsigned long long v) {
  emulate::maybe_yield();
  std::lock_guard<std::mutex> lock(emulate::atomic_mutex);
  const unsigned long long old = *p;
  if (old == expected) *p = v;
  return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  std::lock_guard<std::mutex> lock(emulate::atomic_mutex);
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  std::lock_guard<std::mutex> lock(emulate::atomic_mutex);
  const double old = *p;
  *p = old + v;
  return old;
}
