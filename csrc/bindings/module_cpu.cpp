// Python bindings of the CPU core: registration only, no logic. The argument structs and
// constants are registered by register_args.h, shared with the CUDA module (_C_cuda).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cpu/dispatch.h"
#include "register_args.h"

namespace py = pybind11;
using namespace anomfast;

static py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#if defined(_OPENMP)
  d["openmp"] = true;
  d["openmp_version"] = (int)_OPENMP;
#else
  d["openmp"] = false;
  d["openmp_version"] = 0;
#endif
  d["cpu_isa"] = cpu_isa();
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "anomfast CPU core (fused scores -> histograms, SML fitting)";
  bindings::register_args(m, /*module_local=*/false);

  m.def("fused", &fused_cpu, py::arg("args"), py::call_guard<py::gil_scoped_release>(),
        "One fused pass: scores -> histograms (+ optional coordinate maps).");
  m.def("fit_sml", &fit_sml_cpu, py::arg("args"), py::call_guard<py::gil_scoped_release>(),
        "SML fitting pass: per predicted class count / sum / sum of squares of the max logit.");
  m.def("build_info", &build_info);

  bindings::register_constants(m);
  // method codes this core bins (views.h: Method); HEAT and EXTERNAL are CPU-only so far
  m.attr("METHOD_CODES") = std::vector<int32_t>{MAX_LOGIT, MSP, ENERGY, SML, ENTROPY, GEN, HEAT, EXTERNAL};
}
