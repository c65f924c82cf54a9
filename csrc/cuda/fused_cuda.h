// CUDA core: the fused pass and the SML fit on device memory, plus what the build and
// the runtime can do. Plain C++ (no CUDA headers), so the g++-compiled bindings can
// include it.
//
//   fused_cuda(a)   : logits (B, C, H, W) F32/F16/BF16 and labels (B, H, W) in device
//                     memory, any element strides -> adds to hist int64 (M, 2, NBINS)
//                     and counters int64[N_COUNTERS]; writes maps float32 (M, B, H, W)
//                     when maps_ptr != 0. Same semantics as the CPU core (fused_cpu.cpp).
//   fit_sml_cuda(a) : adds to count int64[C], sum / sumsq float64[C], counters.
//
// Both enqueue one kernel on the stream a.stream (a cudaStream_t passed as an integer,
// 0 = legacy default stream) and return without waiting; all memory is the caller's.
// A launch error throws std::runtime_error with CUDA's message. B * H * W == 0 launches
// nothing.
#pragma once
#include <cstdint>
#include <string>

#include "../common/views.h"

namespace anomfast {

void fused_cuda(const FusedArgs& a);
void fit_sml_cuda(const FitArgs& a);

// How warps combine histogram increments that land in the same bin before the global
// atomicAdd: 0 none, 1 __match_any_sync over the warp (default), 2 runs of equal
// neighbouring lanes only. Results are identical; only the speed differs (benchmarks).
void set_hist_aggregation(int mode);
int hist_aggregation();

// Tests and bench/gpu_check.py: caps the persistent grid at `blocks` blocks (0: as many as
// are resident at once, the default), so that on a small input every thread walks many
// pixels and the grid-stride walk takes every carry (fused_cuda.cu: Walk). Results are
// identical; only the speed differs.
void set_debug_grid(int64_t blocks);
int64_t debug_grid();

// Tests and bench/gpu_check.py: false makes the fused kernel take one pixel a turn even
// where it would take groups of neighbouring pixels (fused_cuda.cu: group_ok), so both forms are
// checked on the same inputs. Results are identical; only the speed differs.
void set_pixel_group_cap(int px);
int pixel_group_cap();

struct CudaInfo {
  int cuda_version = 0;          // CUDART_VERSION the module was compiled against
  std::string archs;             // CMAKE_CUDA_ARCHITECTURES of the build
  bool fmad = false;             // compiled with FMA contraction (-fmad=true)
  bool fast = false;             // ANOMFAST_CUDA_FAST: ex2.approx exps, __fdividef divisions: not bit-identical
  bool probed = false;           // the fields below were filled by asking the runtime
  bool runtime_ok = false;       // cudaGetDeviceCount succeeded
  int device_count = 0;
  int runtime_version = 0;       // cudaRuntimeGetVersion (of the statically linked runtime)
  int driver_version = 0;        // cudaDriverGetVersion (0: no driver)
  std::string error;             // CUDA's message when runtime_ok is false
};

// probe = false reports only compile-time facts and never touches the driver (asking it
// initializes CUDA in this process, which a later fork() cannot undo).
CudaInfo cuda_info(bool probe);

}  // namespace anomfast
