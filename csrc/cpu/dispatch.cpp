// Picks the widest instruction-set build of the CPU core that this CPU runs.
#include "dispatch.h"

namespace anomfast {
namespace generic {
void fused(const FusedArgs& a);
void fit_sml(const FitArgs& a);
}  // namespace generic
#if defined(ANOMFAST_HAVE_AVX2)
namespace avx2 {
void fused(const FusedArgs& a);
void fit_sml(const FitArgs& a);
}  // namespace avx2
#endif

static bool use_avx2() {
#if defined(ANOMFAST_HAVE_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

const char* cpu_isa() { return use_avx2() ? "avx2+fma" : "baseline"; }

void fused_cpu(const FusedArgs& a) {
#if defined(ANOMFAST_HAVE_AVX2)
  if (use_avx2()) return avx2::fused(a);
#endif
  generic::fused(a);
}

void fit_sml_cpu(const FitArgs& a) {
#if defined(ANOMFAST_HAVE_AVX2)
  if (use_avx2()) return avx2::fit_sml(a);
#endif
  generic::fit_sml(a);
}

}  // namespace anomfast
