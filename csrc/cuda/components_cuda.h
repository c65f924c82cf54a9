// CUDA core: connected components and per-component pixel counts of B images on the
// device, the twin of components_cpu (csrc/cpu/components_cpu.h has the per-image
// outputs; anomfast/components.py the definitions). Plain C++ (no CUDA headers), so the
// g++-compiled bindings can include it.
//
// components_cuda: device memory, all buffers the caller's (Python allocates them from
// components_cuda_workspace):
//   pred      uint8 [B, H, W]: 1 where the score passed the threshold, else 0
//   cls       int8  [B, H, W]: label class, COMP_NORMAL / COMP_ANOMALY / COMP_VOID
//   work      int32 [work_len >= workspace.work_int32]: scratch, reused image after image
//   table     uint64 [table_len >= workspace.table_uint64]: scratch (pair hash set)
//   gt_out    int64 [B, capacity, 2]: image b's ground-truth components kept, (|G ∩ P|,
//             adjusted union), in rows 0 .. counts[b, 0] - 1
//   pred_out  int64 [B, capacity, 3]: image b's segments with a pixel in the region of
//             interest, (|S ∩ all G|, |S|, adjusted union), rows 0 .. counts[b, 1] - 1
//   counts    int64 [B, 2]
// Rows come in an unspecified order (the metrics only sum them). Everything is enqueued
// on `stream` (a cudaStream_t as an integer, 0 = legacy default stream) and the call
// returns without waiting. Bad sizes, modes or pointers throw std::invalid_argument /
// std::runtime_error before anything is launched.
#pragma once
#include <cstdint>

namespace anomfast {

struct ComponentsWorkspace {
  int64_t work_int32;    // 10 H W
  int64_t table_uint64;  // hash set (power of two >= 2 capacity) + pair list (capacity) + 1
  int64_t capacity;      // components_capacity(H, W): rows per image in gt_out / pred_out
};

ComponentsWorkspace components_cuda_workspace(int64_t H, int64_t W);

void components_cuda(int64_t pred_ptr, int64_t cls_ptr, int64_t B, int64_t H, int64_t W, int64_t thresh_segsize,
                     int64_t thresh_instsize, int64_t mode, int64_t work_ptr, int64_t work_len, int64_t table_ptr,
                     int64_t table_len, int64_t gt_out_ptr, int64_t pred_out_ptr, int64_t capacity,
                     int64_t counts_ptr, int64_t stream);

}  // namespace anomfast
