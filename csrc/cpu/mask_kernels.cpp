// The mask-update loops of mask_kernels_body.h compiled three times: for the baseline
// target, for AVX2 and for AVX-512 (function-level target options, so the rest of the
// extension keeps running on any x86-64), and the run-time choice between them.
// Measured on the 2-core Xeon of benchmarks/NOTES.md: AVX2 halves the time of both
// loops, AVX-512 takes another 15% off.
#include "cpu/mask_kernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace chase_ext::cpu {

namespace isa_baseline {
#include "cpu/mask_kernels_body.h"
}  // namespace isa_baseline

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CHASE_EXT_X86_ISAS 1

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace isa_avx2 {
#include "cpu/mask_kernels_body.h"
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#endif
namespace isa_avx512 {
#include "cpu/mask_kernels_body.h"
}  // namespace isa_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

bool cpu_has(const std::string& isa) {
#ifdef CHASE_EXT_X86_ISAS
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#endif
  return isa == "baseline";
}

const MaskKernels& table(const std::string& isa) {
  static const MaskKernels base = isa_baseline::make_table("baseline");
#ifdef CHASE_EXT_X86_ISAS
  static const MaskKernels avx2 = isa_avx2::make_table("avx2");
  static const MaskKernels avx512 = isa_avx512::make_table("avx512");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") return avx512;
#endif
  return base;
}

}  // namespace

const MaskKernels& mask_kernels() {
  static const std::string best = cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "baseline";
  const char* env = std::getenv("CHASE_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return table(best);
  const std::string want(env);
  TORCH_CHECK(want == "baseline" || want == "avx2" || want == "avx512",
              "CHASE_EXT_CPU_ISA must be baseline, avx2 or avx512; got '", want, "'");
  TORCH_CHECK(cpu_has(want), "CHASE_EXT_CPU_ISA=", want, ": this CPU (or this build) cannot run ", want);
  return table(want);
}

}  // namespace chase_ext::cpu
