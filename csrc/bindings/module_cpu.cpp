// Python bindings of the CPU core: registration only, no logic. The argument structs and
// constants are registered by register_args.h, shared with the CUDA module (_C_cuda).
#include <pybind11/pybind11.h>
#if defined(ANOMFAST_HAVE_BUILD_CONFIG)
#include "af_build_config.h"
#endif
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cpu/components_cpu.h"
#include "../cpu/dispatch.h"
#include "../cpu/finalize_cpu.h"
#include "register_args.h"

namespace py = pybind11;
using namespace anomfast;

static py::dict build_info() {
  py::dict d;
#if defined(ANOMFAST_HAVE_BUILD_CONFIG)
  d["cuda_build"] = ANOMFAST_CUDA_DECISION;  // whether and why the CUDA core was built
#endif
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
  m.def("sparse_readout", &sparse_readout_cpu, py::call_guard<py::gil_scoped_release>(),
        "Per method the ascending non-empty bins of a histogram state, optionally finalized (finalize_cpu.h).");
  m.attr("READOUT_META") = (int)READOUT_META;
  m.attr("READOUT_MODES") = py::dict(py::arg("bounds") = (int)READOUT_BOUNDS, py::arg("count") = (int)READOUT_COUNT,
                                     py::arg("read") = (int)READOUT_READ,
                                     py::arg("read_clear") = (int)READOUT_READ_CLEAR,
                                     py::arg("clear") = (int)READOUT_CLEAR);
  m.def("finalize_hist", &finalize_hist_cpu, py::call_guard<py::gil_scoped_release>(),
        "Histogram finalization sums of one group table (finalize_cpu.h).");
  m.def("finalize_hists", &finalize_hists_cpu, py::call_guard<py::gil_scoped_release>(),
        "finalize_hist of several histograms, one per thread (finalize_cpu.h).");
  m.def("bin_bounds", &bin_bounds_cpu, "(lo, hi) coordinates of one bin given its tie signature (finalize_cpu.h).");
  // finalize_hist's conventions and output slots, by name (finalize_cpu.h)
  m.attr("FIN_FPR_MODES") = py::dict(py::arg("first") = (int)FIN_FIRST, py::arg("strict") = (int)FIN_STRICT,
                                     py::arg("interp") = (int)FIN_INTERP);
  m.attr("FIN_AP_MODES") = py::dict(py::arg("step") = (int)FIN_STEP, py::arg("trapezoid") = (int)FIN_TRAPEZOID);
  m.attr("FIN_OUT") = py::dict(
      py::arg("auroc") = (int)FIN_AUROC, py::arg("auroc_half") = (int)FIN_AUROC_HALF, py::arg("ap") = (int)FIN_AP,
      py::arg("ap_lower") = (int)FIN_AP_LOWER, py::arg("ap_upper") = (int)FIN_AP_UPPER,
      py::arg("fpr95") = (int)FIN_FPR, py::arg("fpr95_lower") = (int)FIN_FPR_LOWER,
      py::arg("fpr95_upper") = (int)FIN_FPR_UPPER, py::arg("f1") = (int)FIN_F1,
      py::arg("f1_upper") = (int)FIN_F1_UPPER, py::arg("size") = (int)FIN_NF);
  m.attr("FIN_IOUT") = py::dict(
      py::arg("P") = (int)FIN_P, py::arg("N") = (int)FIN_N, py::arg("groups") = (int)FIN_GROUPS,
      py::arg("fpr95_row") = (int)FIN_FPR_ROW, py::arg("fpr95_tied") = (int)FIN_FPR_TIED,
      py::arg("fpr95_a") = (int)FIN_FPR_A, py::arg("fpr95_f") = (int)FIN_FPR_F,
      py::arg("fpr95_pos") = (int)FIN_FPR_POS, py::arg("fpr95_neg") = (int)FIN_FPR_NEG,
      py::arg("f1_row") = (int)FIN_F1_ROW, py::arg("all_tied") = (int)FIN_ALL_TIED,
      py::arg("f1_first") = (int)FIN_F1_FIRST, py::arg("f1_last") = (int)FIN_F1_LAST, py::arg("size") = (int)FIN_NI);
  m.def("components", &components_cpu, py::call_guard<py::gil_scoped_release>(),
        "Connected components and per-component pixel counts of one image (components_cpu.h).");
  m.def("components_capacity", &components_capacity, "Most 8-connected components an H x W image holds.");
  m.def("build_info", &build_info);

  bindings::register_constants(m);
  // method codes this core bins (views.h: Method); HEAT and EXTERNAL are CPU-only so far
  std::vector<int32_t> codes;  // every method of the table (methods.h)
  for (const MethodRow& r : METHOD_TABLE) codes.push_back(r.code);
  m.attr("METHOD_CODES") = codes;
}
