// Picks the widest instruction-set build of the CPU core that this CPU runs.
// ANOMFAST_CPU_ISA=baseline|avx2 (read once) caps it, so tests can check that every
// build gives the same bits (anomfast/_core.py rejects other values before loading).
#include "dispatch.h"

#include "../common/checks.h"

#include <cstdlib>
#include <cstring>

namespace anomfast {
namespace generic {
int fused(const FusedArgs& a);
void fit_sml(const FitArgs& a);
}  // namespace generic
#if defined(ANOMFAST_HAVE_AVX2)
namespace avx2 {
int fused(const FusedArgs& a);
void fit_sml(const FitArgs& a);
}  // namespace avx2
#endif
#if defined(ANOMFAST_HAVE_AVX512)
namespace avx512 {
int fused(const FusedArgs& a);
void fit_sml(const FitArgs& a);
}  // namespace avx512
#endif

static int isa_cap() {  // 0 baseline, 1 avx2, 2 avx512 (no cap)
  static const int cap = [] {
    const char* v = std::getenv("ANOMFAST_CPU_ISA");
    if (v && std::strcmp(v, "baseline") == 0) return 0;
    if (v && std::strcmp(v, "avx2") == 0) return 1;
    return 2;
  }();
  return cap;
}

static bool use_avx2() {
#if defined(ANOMFAST_HAVE_AVX2)
  static const bool ok = isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

static bool use_avx512() {
#if defined(ANOMFAST_HAVE_AVX512)
  static const bool ok = isa_cap() >= 2 && use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

const char* cpu_isa() { return use_avx512() ? "avx512" : use_avx2() ? "avx2+fma" : "baseline"; }

int fused_cpu(const FusedArgs& a) {
  check_fused_args(a);
#if defined(ANOMFAST_HAVE_AVX512)
  if (use_avx512()) return avx512::fused(a);
#endif
#if defined(ANOMFAST_HAVE_AVX2)
  if (use_avx2()) return avx2::fused(a);
#endif
  return generic::fused(a);
}

void fit_sml_cpu(const FitArgs& a) {
  check_fit_args(a);
#if defined(ANOMFAST_HAVE_AVX512)
  if (use_avx512()) return avx512::fit_sml(a);
#endif
#if defined(ANOMFAST_HAVE_AVX2)
  if (use_avx2()) return avx2::fit_sml(a);
#endif
  generic::fit_sml(a);
}

}  // namespace anomfast
