// Python bindings of the CUDA core: registration only, no logic. Same names as the CPU
// module (_C), so anomfast/_fused.py drives either one. Importing this module makes no
// CUDA call; only build_info(probe=True) asks the runtime.
#include <pybind11/pybind11.h>

#include "../cuda/components_cuda.h"
#include "../cuda/fused_cuda.h"
#include "register_args.h"

namespace py = pybind11;
using namespace anomfast;

static py::dict build_info(bool probe) {
  const CudaInfo info = cuda_info(probe);
  py::dict d;
  d["cuda_version"] = info.cuda_version;
  d["cuda_archs"] = info.archs;
  d["cuda_fmad"] = info.fmad;
  d["cuda_fast"] = info.fast;
  d["cuda_hist_aggregation"] = hist_aggregation();
  if (info.probed) {
    d["cuda_runtime_ok"] = info.runtime_ok;
    d["cuda_device_count"] = info.device_count;
    d["cuda_runtime_version"] = info.runtime_version;
    d["cuda_driver_version"] = info.driver_version;
    if (!info.runtime_ok) d["cuda_error"] = info.error;
  }
  return d;
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "anomfast CUDA core (fused scores -> histograms, SML fitting) on the caller's stream";
  bindings::register_args(m, /*module_local=*/true);
  m.def("fused", &fused_cuda, py::arg("args"), py::call_guard<py::gil_scoped_release>(),
        "One fused pass on device memory, enqueued on args.stream: scores -> histograms "
        "(+ optional coordinate maps). Does not wait for the GPU.");
  m.def("fit_sml", &fit_sml_cuda, py::arg("args"), py::call_guard<py::gil_scoped_release>(),
        "SML fitting pass on device memory, enqueued on args.stream: per predicted class "
        "count / sum / sum of squares of the max logit.");
  m.def("components", &components_cuda, py::call_guard<py::gil_scoped_release>(),
        "Connected components and per-component pixel counts of B images on the device, enqueued "
        "on the stream (components_cuda.h). Does not wait for the GPU.");
  m.def(
      "components_workspace",
      [](int64_t H, int64_t W) {
        const ComponentsWorkspace w = components_cuda_workspace(H, W);
        return py::make_tuple(w.work_int32, w.table_uint64, w.capacity);
      },
      "(int32 scratch words, uint64 scratch words, rows per image) that components() needs for H x W.");
  m.def("build_info", &build_info, py::arg("probe") = true,
        "CUDA version and architectures of the build; with probe=True also the driver, "
        "runtime and device count (this initializes CUDA in the process; never raises).");
  m.def("_set_hist_aggregation", &set_hist_aggregation, py::arg("mode"),
        "Benchmarks only: 0 no warp aggregation of histogram atomics, 1 __match_any_sync "
        "(default), 2 runs of equal neighbouring lanes. Results are identical.");
  m.def("_set_debug_grid", &set_debug_grid, py::arg("blocks"),
        "Tests / GPU check only: cap the persistent grid at this many blocks (0: no cap), so "
        "every thread walks many pixels. Results are identical.");
  m.def("_debug_grid", &debug_grid);
  m.def("_set_pixel_group_cap", &set_pixel_group_cap, py::arg("px"),
        "Tests / GPU check only: the largest group of neighbouring pixels along W the fused "
        "kernel takes a turn (4, the default; 2: pairs at most; 1: one pixel a turn). Results are identical.");
  m.def("_pixel_group_cap", &pixel_group_cap);
  bindings::register_constants(m);
  // method codes this core bins (the method table's per-pixel methods; HEAT and EXTERNAL: CPU only)
  std::vector<int32_t> codes;
  for (const MethodRow& r : METHOD_TABLE)
    if (is_per_pixel_method(r.code)) codes.push_back(r.code);
  m.attr("METHOD_CODES") = codes;
}
