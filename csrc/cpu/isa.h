// Which instruction-set copy of the CPU kernels runs: decided once per process, at run time.
//
// The kernels with ISA-specific copies have a base-ISA copy and copies compiled with target attributes, so one
// binary runs on any x86-64 and uses what the CPU has: base / AVX2 + FMA / AVX-512 for small_mm.h's register-blocked
// products and sema_core.inc's row loops (spectral, sema, token_attention), the quant family's block loops, the prox
// family's elementwise loops (fused_apply.h) and channel_conv's direct convolution (direct_conv.h; its base ISA is
// im2col + BLAS). SLIMOPS_CPU_ISA=base|avx2|avx512 caps the choice (the tests run every copy the machine
// supports this way); the older SLIMOPS_CPU_BASE_ISA=1 means base.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

namespace slimops {
namespace cpu {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "base";
  }
}

// What this CPU supports (AVX2 counts only with FMA: every AVX2 copy uses both).
inline CpuIsa detected_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBase;
}

// The ISA the kernels use: the detected one, capped by SLIMOPS_CPU_ISA (or SLIMOPS_CPU_BASE_ISA=1). Read once; a
// value that is not base, avx2 or avx512 is an error at the first kernel call that asks.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa cap = CpuIsa::kAvx512;
    if (const char* v = std::getenv("SLIMOPS_CPU_ISA"); v != nullptr && *v != '\0') {
      const std::string_view s(v);
      if (s == "base") cap = CpuIsa::kBase;
      else if (s == "avx2") cap = CpuIsa::kAvx2;
      else if (s == "avx512") cap = CpuIsa::kAvx512;
      else TORCH_CHECK_VALUE(false, "slimops: SLIMOPS_CPU_ISA must be base, avx2 or avx512, got '", s, "'");
    }
    if (const char* v = std::getenv("SLIMOPS_CPU_BASE_ISA"); v != nullptr && std::string_view(v) == "1")
      cap = CpuIsa::kBase;
    const CpuIsa have = detected_isa();
    return static_cast<int>(have) < static_cast<int>(cap) ? have : cap;
  }();
  return isa;
}

}  // namespace cpu
}  // namespace slimops
