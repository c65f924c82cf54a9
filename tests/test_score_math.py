"""The score math's fused multiply-adds give the same bits in every build.

csrc/common/score_math.h evaluates the exp and log polynomials with score_fma: the
hardware fused multiply-add on the GPU and on the AVX2 / AVX-512 CPU builds, and on the
baseline x86-64 build (no FMA instruction) the exact product rounded to double plus the
addend, then to float. Double rounding can make that differ from one rounding in
general, so this test compiles both forms of fast_exp, fast_exp_nonpos and fast_log and
compares them on every input each is called with: fast_exp_nonpos on every non-positive
float32 and NaN (and there against fast_exp too, whose lower clamp it leaves out), fast_exp on every float32 from its lower clamp to its upper clamp (the
clamps map every input outside onto those two), fast_log on every positive normal
float32. The CUDA core's default build, bit-identical to the baseline CPU build, relies
on it. Needs g++ (with OpenMP) and a CPU with AVX2 and FMA (skipped otherwise); about a
minute on 2 cores.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # compiles and runs ~13e9 function evaluations (about a minute)

KERNEL = r"""
#include <cstdint>
#include "csrc/common/score_math.h"
using namespace anomfast;
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
// f(u2f(lo + i)) for i < n, as bits; f = 0: fast_exp_nonpos, 1: fast_exp, 2: fast_log
extern "C" void CAT(NAME, run)(int f, uint32_t lo, uint32_t n, uint32_t* out) {
  if (f == 0) {
    for (uint32_t i = 0; i < n; ++i) out[i] = f2u(fast_exp_nonpos(u2f(lo + i)));
  } else if (f == 1) {
    for (uint32_t i = 0; i < n; ++i) out[i] = f2u(fast_exp(u2f(lo + i)));
  } else {
    for (uint32_t i = 0; i < n; ++i) out[i] = f2u(fast_log(u2f(lo + i)));
  }
}
"""

MAIN = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
extern "C" void hw_run(int, uint32_t, uint32_t, uint32_t*);
extern "C" void dbl_run(int, uint32_t, uint32_t, uint32_t*);
static bool is_nan(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }
int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) { std::puts("SKIP no FMA"); return 0; }
  // each function's inputs as ranges of bit patterns [first, last]: fast_exp_nonpos on
  // +0, every negative float and every NaN; fast_exp between its clamps (below
  // EXP_ZERO_BELOW = -87.33654 it is 0, above 88.72283 the clamp's value); fast_log on
  // the positive normals. "Function" 3: fast_exp_nonpos against the clamped fast_exp
  // (both hardware-FMA forms) on fast_exp_nonpos's inputs: the same bits, though it has
  // no lower clamp of its own.
  struct Range { int f; uint32_t first, last; };
  const Range ranges[] = {{0, 0x00000000u, 0x00000000u}, {0, 0x7f800001u, 0x7fffffffu}, {0, 0x80000000u, 0xffffffffu},
                          {1, 0x00000000u, 0x42b17217u + 2}, {1, 0x80000000u, 0xc2aeac4fu + 2},
                          {2, 0x00800000u, 0x7f7fffffu},
                          {3, 0x00000000u, 0x00000000u}, {3, 0x7f800001u, 0x7fffffffu}, {3, 0x80000000u, 0xffffffffu}};
  const uint32_t CH = 1u << 20;
  unsigned long long seen[4] = {0, 0, 0, 0}, bad[4] = {0, 0, 0, 0};
  #pragma omp parallel
  {
    std::vector<uint32_t> r1(CH), r2(CH);
    unsigned long long s_[4] = {0, 0, 0, 0}, b_[4] = {0, 0, 0, 0};
    for (const Range& g : ranges) {
      const unsigned long long n = (unsigned long long)g.last - g.first + 1, chunks = (n + CH - 1) / CH;
      #pragma omp for schedule(dynamic, 16)
      for (long long c = 0; c < (long long)chunks; ++c) {
        const uint32_t lo = g.first + (uint32_t)(c * CH);
        const uint32_t cnt = (uint32_t)((n - c * CH) < CH ? (n - c * CH) : CH);
        if (g.f == 3) {
          hw_run(0, lo, cnt, r1.data());
          hw_run(1, lo, cnt, r2.data());
        } else {
          hw_run(g.f, lo, cnt, r1.data());
          dbl_run(g.f, lo, cnt, r2.data());
        }
        s_[g.f] += cnt;
        if (std::memcmp(r1.data(), r2.data(), cnt * 4) == 0) continue;
        for (uint32_t i = 0; i < cnt; ++i) {
          if (r1[i] == r2[i] || (is_nan(lo + i) && is_nan(r1[i]) && is_nan(r2[i]))) continue;
          #pragma omp critical
          if (b_[g.f]++ < 3) std::printf("function %d input %08x: fma %08x, double %08x\n", g.f, lo + i, r1[i], r2[i]);
        }
      }
    }
    #pragma omp critical
    for (int f = 0; f < 4; ++f) { seen[f] += s_[f]; bad[f] += b_[f]; }
  }
  std::printf("checked %llu %llu %llu %llu mismatches %llu %llu %llu %llu\n", seen[0], seen[1], seen[2], seen[3],
              bad[0], bad[1], bad[2], bad[3]);
  return (bad[0] || bad[1] || bad[2] || bad[3]) ? 1 : 0;
}
"""


def test_fma_forms_agree_on_every_input(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    src = tmp_path / "kernel.cpp"
    src.write_text(KERNEL)
    (tmp_path / "main.cpp").write_text(MAIN)
    common = [cxx, "-std=c++17", "-O3", "-mavx2", "-ffp-contract=off", f"-I{ROOT}", "-c", str(src)]
    builds = [common + ["-mfma", "-DANOMFAST_SCORE_HW_FMA", "-DNAME=hw", "-o", str(tmp_path / "hw.o")],
              common + ["-mno-fma", "-DNAME=dbl", "-o", str(tmp_path / "dbl.o")],
              [cxx, "-O2", "-fopenmp", str(tmp_path / "main.cpp"), str(tmp_path / "hw.o"), str(tmp_path / "dbl.o"),
               "-o", str(tmp_path / "check")]]
    for cmd in builds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and "-mavx2" in cmd and "unrecognized" in r.stderr:
            pytest.skip("g++ without -mavx2 (not x86-64)")
        assert r.returncode == 0, r.stderr[-3000:]
    # the two object files really differ in how they add: fused in one, not in the other
    dis = {k: subprocess.run(["objdump", "-d", str(tmp_path / f"{k}.o")], capture_output=True, text=True).stdout
           for k in ("hw", "dbl")} if shutil.which("objdump") else None
    if dis:
        assert "vfmadd" in dis["hw"] and "vfmadd" not in dis["dbl"], "the two forms did not compile as intended"
    r = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=600)
    if r.stdout.startswith("SKIP"):
        pytest.skip("this CPU has no AVX2 / FMA")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    counts = [int(v) for v in r.stdout.split("checked", 1)[1].split("mismatches")[0].split()]
    assert counts == [2**31 + 2**23, 0x42b17217 + 3 + 0x42aeac4f + 3, 0x7f7fffff - 0x00800000 + 1, 2**31 + 2**23], counts
