// Connected components of one image for the SegmentMeIfYouCan component metrics
// (anomfast/components.py has the definitions and the formulas; its docstring is the
// spec). Python validates every buffer and passes pointers as integers.
//
// components_cpu: one image of H x W pixels, row-major, contiguous:
//   pred      uint8 [H * W]: 1 where the score passed the threshold, else 0
//   cls       int8  [H * W]: label class, COMP_NORMAL / COMP_ANOMALY / COMP_VOID
//   work      int32 [2 * H * W]: scratch (ground-truth and predicted component ids)
//   gt_out    int64 [2 * capacity]: per ground-truth component kept, (intersection,
//             adjusted union) in pixels
//   pred_out  int64 [3 * capacity]: per predicted segment with a pixel in the region of
//             interest, (intersection, size, adjusted union) in pixels
//   counts    int64 [2]: the number of ground-truth components and of predicted segments
//             written
//   capacity  >= components_capacity(H, W), the most 8-connected components H x W holds
//   thresh_segsize / thresh_instsize: predicted segments with fewer pixels are dropped,
//             ground-truth components with fewer pixels become void
//   mode      COMP_BENCHMARK (the benchmark's order of operations and its quirks) or
//             COMP_CLEAN (void, small instances included, cleared before labeling)
// Connectivity: 8 neighbours (scipy.ndimage.label with a 3x3 structure of ones).
// Memory: the caller's buffers plus O(number of components and touching pairs).
// Returns 0, or -1 when the sizes are inconsistent (H, W < 1, H * W >= 2^31, capacity
// too small, unknown mode): nothing is written then.
#pragma once
#include <cstdint>

#include "../common/components.h"  // COMP_* classes and modes, components_capacity

namespace anomfast {

int64_t components_cpu(int64_t pred_ptr, int64_t cls_ptr, int64_t H, int64_t W, int64_t thresh_segsize,
                       int64_t thresh_instsize, int64_t mode, int64_t work_ptr, int64_t gt_out_ptr,
                       int64_t pred_out_ptr, int64_t capacity, int64_t counts_ptr);

}  // namespace anomfast
