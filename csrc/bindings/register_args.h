// Registration of the argument structs (views.h) and the binning constants, shared by
// the compiled modules so that _C and _C_cuda expose the same names. Registration
// only, no logic.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../common/binning.h"
#include "../common/components.h"
#include "../common/methods.h"
#include "../common/views.h"

#define AF_STR2(x) #x
#define AF_STR(x) AF_STR2(x)

namespace anomfast {
namespace bindings {

namespace py = pybind11;

// The fields of InputArgs on a class deriving from it (FusedArgs, FitArgs).
template <class T>
void def_input_fields(py::class_<T>& c) {
  c.def_readwrite("logits_ptr", &T::logits_ptr)
      .def_readwrite("logit_dtype", &T::logit_dtype)
      .def_readwrite("B", &T::B).def_readwrite("C", &T::C)
      .def_readwrite("H", &T::H).def_readwrite("W", &T::W)
      .def_readwrite("ls_b", &T::ls_b).def_readwrite("ls_c", &T::ls_c)
      .def_readwrite("ls_h", &T::ls_h).def_readwrite("ls_w", &T::ls_w)
      .def_readwrite("labels_ptr", &T::labels_ptr)
      .def_readwrite("label_dtype", &T::label_dtype)
      .def_readwrite("ys_b", &T::ys_b).def_readwrite("ys_h", &T::ys_h)
      .def_readwrite("ys_w", &T::ys_w)
      .def_readwrite("lut_ptr", &T::lut_ptr)
      .def_readwrite("lut_offset", &T::lut_offset)
      .def_readwrite("lut_len", &T::lut_len)
      .def_readwrite("counters_ptr", &T::counters_ptr)
      .def_readwrite("num_threads", &T::num_threads)
      .def_readwrite("stream", &T::stream);
}

// module_local: a second module registering the same C++ types (the CUDA module next to
// the CPU one) must keep them local, or pybind11 refuses the duplicate at import.
inline void register_args(py::module_& m, bool module_local) {
  py::class_<FusedArgs> fused(m, "FusedArgs", py::module_local(module_local));
  fused.def(py::init<>());
  def_input_fields(fused);
  fused
      .def_property(
          "methods",
          [](const FusedArgs& a) { return std::vector<int32_t>(a.methods, a.methods + a.n_methods); },
          [](FusedArgs& a, const std::vector<int32_t>& v) {
            if (v.size() > (size_t)MAX_METHODS) throw std::invalid_argument("too many methods");
            a.n_methods = (int32_t)v.size();
            for (size_t i = 0; i < v.size(); ++i) a.methods[i] = v[i];
          })
      .def_readwrite("temperature", &FusedArgs::temperature)
      .def_readwrite("sml_mean_ptr", &FusedArgs::sml_mean_ptr)
      .def_readwrite("sml_inv_std_ptr", &FusedArgs::sml_inv_std_ptr)
      .def_readwrite("gen_gamma", &FusedArgs::gen_gamma)
      .def_readwrite("entropy_normalize", &FusedArgs::entropy_normalize)
      .def_readwrite("heat_m_ptr", &FusedArgs::heat_m_ptr)
      .def_readwrite("heat_temperature", &FusedArgs::heat_temperature)
      .def_readwrite("heat_mean", &FusedArgs::heat_mean)
      .def_readwrite("heat_inv_std", &FusedArgs::heat_inv_std)
      .def_readwrite("ext_ptr", &FusedArgs::ext_ptr)
      .def_readwrite("hist_ptr", &FusedArgs::hist_ptr)
      .def_readwrite("sig_ptr", &FusedArgs::sig_ptr)
      .def_readwrite("sig_mask", &FusedArgs::sig_mask)
      .def_readwrite("occ_ptr", &FusedArgs::occ_ptr)
      .def_readwrite("maps_ptr", &FusedArgs::maps_ptr)
      .def_readwrite("flush_every", &FusedArgs::flush_every);

  py::class_<FitArgs> fit(m, "FitArgs", py::module_local(module_local));
  fit.def(py::init<>());
  def_input_fields(fit);
  fit.def_readwrite("count_ptr", &FitArgs::count_ptr)
      .def_readwrite("sum_ptr", &FitArgs::sum_ptr)
      .def_readwrite("sumsq_ptr", &FitArgs::sumsq_ptr);
}

// NBINS & co.: the binning scheme and counter layout the module was compiled with.
inline void register_constants(py::module_& m) {
  m.attr("NBINS") = NBINS;
  m.attr("BIN_MANT_BITS") = BIN_MANT_BITS;
  m.attr("BIN_OCTAVES") = BIN_OCTAVES;
  m.attr("OCC_SHIFT") = OCC_SHIFT;
  m.attr("N_COUNTERS") = (int)N_COUNTERS;
  m.attr("MAX_METHODS") = MAX_METHODS;
  m.attr("MAX_CLASSES") = MAX_CLASSES;
  // the C++ enums Python needs, by name (one source: methods.h, views.h)
  py::dict methods;
  for (const MethodRow& r : METHOD_TABLE) methods[r.name] = r.code;
  m.attr("METHODS") = methods;
  m.attr("DTYPES") = py::dict(py::arg("float32") = (int)F32, py::arg("float16") = (int)F16,
                              py::arg("bfloat16") = (int)BF16, py::arg("uint8") = (int)U8, py::arg("int8") = (int)I8,
                              py::arg("bool") = (int)BOOL, py::arg("int16") = (int)I16, py::arg("int32") = (int)I32,
                              py::arg("int64") = (int)I64, py::arg("uint16") = (int)U16,
                              py::arg("uint32") = (int)U32);
  m.attr("LABEL_CLASSES") = py::dict(py::arg("normal") = (int)LABEL_NORMAL, py::arg("anomaly") = (int)LABEL_ANOMALY,
                                     py::arg("void") = (int)LABEL_VOID, py::arg("invalid") = (int)LABEL_INVALID);
  m.attr("COUNTERS") = py::dict(py::arg("nonfinite") = (int)CNT_NONFINITE, py::arg("invalid") = (int)CNT_INVALID,
                                py::arg("void") = (int)CNT_VOID, py::arg("binned") = (int)CNT_BINNED);
  m.attr("COMP_CLASSES") = py::dict(py::arg("normal") = (int)COMP_NORMAL, py::arg("anomaly") = (int)COMP_ANOMALY,
                                    py::arg("void") = (int)COMP_VOID);
  m.attr("COMP_MODES") = py::dict(py::arg("benchmark") = (int)COMP_BENCHMARK, py::arg("clean") = (int)COMP_CLEAN);
#if defined(ANOMFAST_VERSION)
  m.attr("VERSION") = AF_STR(ANOMFAST_VERSION);
#endif
}

}  // namespace bindings
}  // namespace anomfast
