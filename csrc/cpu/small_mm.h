// A register-blocked matrix product for the small dense operands of the spectral kernels:
//   C (m x n) = [C +] A (m x k) B (k x n)
// A is read one scalar at a time (broadcast), so any strides work for it (a DFT matrix, or a transposed
// spectrum); B and C have contiguous rows (ldb, ldc) and n is a multiple of two 32-byte vectors (the
// kernels pad their channel blocks with zeros to 16 columns). 6 x (2 vectors) accumulators per block.
//
// Why not BLAS: the spectral kernels make many products of a few microseconds each (one DFT slice of one
// channel block); a BLAS call's fixed cost (argument checks, packing) is of the same order. This has no
// per-call cost and keeps the operands where they are.
//
// The body is compiled twice: for AVX2 + FMA (target pragma, no global -mavx2; used when the CPU reports
// both) and for the build's base ISA. GCC vector extensions keep it one piece of source.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include "isa.h"

namespace slimops {
namespace cpu {

#define SLIMOPS_SMALL_MM_BODY                                                                                  \
  template <typename T, int MR>                                                                                \
  inline void mm_rows(int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb,   \
                      T* c, int64_t ldc, bool accumulate) {                                                    \
    constexpr int V = 32 / sizeof(T);                                                                          \
    typedef T vec __attribute__((vector_size(32)));                                                            \
    for (int64_t j = 0; j < n; j += 2 * V) {                                                                   \
      vec r[MR][2];                                                                                            \
      for (int i = 0; i < MR; ++i) {                                                                           \
        if (accumulate) {                                                                                      \
          std::memcpy(&r[i][0], c + i * ldc + j, sizeof(vec));                                                 \
          std::memcpy(&r[i][1], c + i * ldc + j + V, sizeof(vec));                                             \
        } else {                                                                                               \
          r[i][0] = vec{};                                                                                     \
          r[i][1] = vec{};                                                                                     \
        }                                                                                                      \
      }                                                                                                        \
      const T* bp = b + j;                                                                                     \
      for (int64_t p = 0; p < k; ++p, bp += ldb) {                                                             \
        vec b0, b1;                                                                                            \
        std::memcpy(&b0, bp, sizeof(vec));                                                                     \
        std::memcpy(&b1, bp + V, sizeof(vec));                                                                 \
        for (int i = 0; i < MR; ++i) {                                                                         \
          const T s = a[i * ars + p * acs];                                                                    \
          r[i][0] += s * b0;                                                                                   \
          r[i][1] += s * b1;                                                                                   \
        }                                                                                                      \
      }                                                                                                        \
      for (int i = 0; i < MR; ++i) {                                                                           \
        std::memcpy(c + i * ldc + j, &r[i][0], sizeof(vec));                                                   \
        std::memcpy(c + i * ldc + j + V, &r[i][1], sizeof(vec));                                               \
      }                                                                                                        \
    }                                                                                                          \
  }                                                                                                            \
  template <typename T>                                                                                        \
  void mm(int64_t m, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c, \
          int64_t ldc, bool accumulate) {                                                                      \
    int64_t i = 0;                                                                                             \
    for (; i + 6 <= m; i += 6)                                                                                 \
      mm_rows<T, 6>(k, n, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);                        \
    const T* ai = a + i * ars;                                                                                 \
    T* ci = c + i * ldc;                                                                                       \
    switch (m - i) {                                                                                           \
      case 5: mm_rows<T, 5>(k, n, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;                           \
      case 4: mm_rows<T, 4>(k, n, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;                           \
      case 3: mm_rows<T, 3>(k, n, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;                           \
      case 2: mm_rows<T, 2>(k, n, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;                           \
      case 1: mm_rows<T, 1>(k, n, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;                           \
      default: break;                                                                                          \
    }                                                                                                          \
  }

namespace mm_base {
SLIMOPS_SMALL_MM_BODY
}  // namespace mm_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIMOPS_SMALL_MM_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mm_avx2 {
SLIMOPS_SMALL_MM_BODY
}  // namespace mm_avx2
#pragma GCC pop_options
#else
#define SLIMOPS_SMALL_MM_AVX2 0
#endif
#undef SLIMOPS_SMALL_MM_BODY

// The column multiple `n` must have: two vectors of float (16) also covers double (8).
constexpr int64_t kMMCols = 16;

// Whether the AVX2 + FMA copies run: the ISA of isa.h (the CPU's, capped by SLIMOPS_CPU_ISA) is at least avx2.
inline bool small_mm_avx2() {
#if SLIMOPS_SMALL_MM_AVX2
  return static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2);
#else
  return false;
#endif
}

// C (m x n) = [C +] A B, A element (i, p) at a[i * ars + p * acs]; n a multiple of kMMCols.
template <typename T>
inline void small_mm(int64_t m, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b,
                     int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
#if SLIMOPS_SMALL_MM_AVX2
  if (small_mm_avx2()) return mm_avx2::mm<T>(m, k, n, a, ars, acs, b, ldb, c, ldc, accumulate);
#endif
  mm_base::mm<T>(m, k, n, a, ars, acs, b, ldb, c, ldc, accumulate);
}

}  // namespace cpu
}  // namespace slimops
