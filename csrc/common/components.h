// What the CPU and CUDA component cores (csrc/cpu/components_cpu.cpp,
// csrc/cuda/components_cuda.cu) share: the label classes and modes they take, and the
// most components an image holds. anomfast/components.py has the metric definitions.
#pragma once
#include <cstdint>

namespace anomfast {

// label classes, as anomfast/labels.py numbers them (components.py checks at import)
enum CompClass : int8_t { COMP_NORMAL = 0, COMP_ANOMALY = 1, COMP_VOID = 2 };
// COMP_BENCHMARK: the benchmark's order of operations and its quirks; COMP_CLEAN: void,
// small instances included, cleared before labeling
enum CompMode : int32_t { COMP_BENCHMARK = 0, COMP_CLEAN = 1 };

// Each aligned 2 x 2 block holds the first pixel (raster order) of at most one component:
// any two pixels of a 2 x 2 block are 8-neighbours. The same bound holds for the touching
// (component, segment) pairs: two 8-neighbouring pixels on a component and a segment lie
// on the same component and the same segment.
inline int64_t components_capacity(int64_t H, int64_t W) { return ((H + 1) / 2) * ((W + 1) / 2); }

}  // namespace anomfast
