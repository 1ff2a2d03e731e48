// A register-blocked matrix product for the small dense operands of the spectral and attention kernels:
//   C (m x n) = [C +] A (m x k) B (k x n)
// A is read one scalar at a time (broadcast), so any strides work for it (a DFT matrix, or a transposed
// spectrum); B and C have contiguous rows (ldb, ldc). Blocks of kMR rows x 2 vectors of accumulators, a one-vector
// block for a last vector that does not fill two; a last n mod V columns run on zero-padded copies of their B and C
// columns (mm_cols_tail: B copied once per call; a partial-vector memcpy per row of B inside the product's loop
// made the fast FA loss 75% slower at k = 100 than at k = 96). The kernels that own their layout pad n to
// kMMCols = 16, which no copy's vector exceeds, and never take that path; panel_mm's callers need not.
//
// Why not BLAS: the spectral kernels make many products of a few microseconds each (one DFT slice of one
// channel block); a BLAS call's fixed cost (argument checks, packing) is of the same order. This has no
// per-call cost and keeps the operands where they are.
//
// The body is compiled three times, each with the vector width of its ISA (no function uses a vector wider
// than its registers: a 32-byte GCC vector on SSE2 is split through memory and ran ~25x slower):
//   mm_base   16-byte vectors, 6 rows  (the x86-64 base, SSE2: 16 registers)
//   mm_avx2   32-byte vectors, 6 rows  (AVX2 + FMA, target pragma, no global -mavx2: 16 registers)
//   mm_avx512 64-byte vectors, 8 rows  (AVX-512 F/BW/VL + FMA: 32 registers, 16 accumulators)
// The per-element order of the sums is the same in every copy (sequential over k); the AVX2 and AVX-512
// copies contract to FMA, so those two agree bit for bit. GCC vector extensions keep it one piece of source.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>
#include "isa.h"

namespace slimops {
namespace cpu {

#define SLIMOPS_SMALL_MM_BODY                                                                                  \
  template <typename T, int MR, int NV>                                                                        \
  inline void mm_block(int64_t k, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c,         \
                       int64_t ldc, bool accumulate) {                                                         \
    typedef T vec __attribute__((vector_size(kVB)));                                                           \
    constexpr int V = kVB / sizeof(T);                                                                         \
    vec r[MR][NV];                                                                                             \
    for (int i = 0; i < MR; ++i)                                                                               \
      for (int u = 0; u < NV; ++u) {                                                                           \
        if (accumulate) std::memcpy(&r[i][u], c + i * ldc + u * V, sizeof(vec));                               \
        else r[i][u] = vec{};                                                                                  \
      }                                                                                                        \
    for (int64_t p = 0; p < k; ++p, b += ldb) {                                                                \
      vec bv[NV];                                                                                              \
      for (int u = 0; u < NV; ++u) std::memcpy(&bv[u], b + u * V, sizeof(vec));                                \
      for (int i = 0; i < MR; ++i) {                                                                           \
        const T s = a[i * ars + p * acs];                                                                      \
        for (int u = 0; u < NV; ++u) r[i][u] += s * bv[u];                                                     \
      }                                                                                                        \
    }                                                                                                          \
    for (int i = 0; i < MR; ++i)                                                                               \
      for (int u = 0; u < NV; ++u) std::memcpy(c + i * ldc + u * V, &r[i][u], sizeof(vec));                   \
  }                                                                                                            \
  template <typename T, int MR>                                                                                \
  inline void mm_rows(int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb,   \
                      T* c, int64_t ldc, bool accumulate) {                                                    \
    constexpr int V = kVB / sizeof(T);                                                                         \
    int64_t j = 0;                                                                                             \
    for (; j + 2 * V <= n; j += 2 * V) mm_block<T, MR, 2>(k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate); \
    for (; j < n; j += V) mm_block<T, MR, 1>(k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);             \
  }                                                                                                            \
  /* The last m % kMR rows: the block of exactly that many rows. */                                           \
  template <typename T, int MR>                                                                                \
  inline void mm_tail(int64_t rows, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b,  \
                      int64_t ldb, T* c, int64_t ldc, bool accumulate) {                                       \
    if constexpr (MR > 0) {                                                                                    \
      if (rows == MR) return mm_rows<T, MR>(k, n, a, ars, acs, b, ldb, c, ldc, accumulate);                    \
      mm_tail<T, MR - 1>(rows, k, n, a, ars, acs, b, ldb, c, ldc, accumulate);                                 \
    }                                                                                                          \
  }                                                                                                            \
  /* n a multiple of the vector. */                                                                            \
  template <typename T>                                                                                        \
  void mm_full(int64_t m, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb,  \
               T* c, int64_t ldc, bool accumulate) {                                                           \
    int64_t i = 0;                                                                                             \
    for (; i + kMR <= m; i += kMR)                                                                             \
      mm_rows<T, kMR>(k, n, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);                      \
    mm_tail<T, kMR - 1>(m - i, k, n, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);             \
  }                                                                                                            \
  /* The last `cols` < V columns: B's (once per call) and C's copied into zero-padded scratch one vector wide, */ \
  /* mm_full on that, the valid columns copied back. The sums run as in mm_full: the same bits. */              \
  template <typename T>                                                                                        \
  void mm_cols_tail(int64_t m, int64_t k, int64_t cols, const T* a, int64_t ars, int64_t acs, const T* b,      \
                    int64_t ldb, T* c, int64_t ldc, bool accumulate) {                                         \
    constexpr int V = kVB / sizeof(T);                                                                         \
    thread_local std::vector<T> bt, ct;                                                                        \
    bt.assign(static_cast<size_t>(k * V), T(0));                                                               \
    ct.assign(static_cast<size_t>(m * V), T(0));                                                               \
    for (int64_t p = 0; p < k; ++p) std::memcpy(bt.data() + p * V, b + p * ldb, cols * sizeof(T));             \
    if (accumulate)                                                                                            \
      for (int64_t i = 0; i < m; ++i) std::memcpy(ct.data() + i * V, c + i * ldc, cols * sizeof(T));           \
    mm_full<T>(m, k, V, a, ars, acs, bt.data(), V, ct.data(), V, accumulate);                                  \
    for (int64_t i = 0; i < m; ++i) std::memcpy(c + i * ldc, ct.data() + i * V, cols * sizeof(T));             \
  }                                                                                                            \
  template <typename T>                                                                                        \
  void mm(int64_t m, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c, \
          int64_t ldc, bool accumulate) {                                                                      \
    constexpr int V = kVB / sizeof(T);                                                                         \
    const int64_t nv = n / V * V;                                                                              \
    if (nv > 0) mm_full<T>(m, k, nv, a, ars, acs, b, ldb, c, ldc, accumulate);                                 \
    if (nv < n) mm_cols_tail<T>(m, k, n - nv, a, ars, acs, b + nv, ldb, c + nv, ldc, accumulate);              \
  }

namespace mm_base {
constexpr int kVB = 16, kMR = 6;
SLIMOPS_SMALL_MM_BODY
}  // namespace mm_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIMOPS_SMALL_MM_ISA_COPIES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mm_avx2 {
constexpr int kVB = 32, kMR = 6;
SLIMOPS_SMALL_MM_BODY
}  // namespace mm_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace mm_avx512 {
constexpr int kVB = 64, kMR = 8;
SLIMOPS_SMALL_MM_BODY
}  // namespace mm_avx512
#pragma GCC pop_options
#else
#define SLIMOPS_SMALL_MM_ISA_COPIES 0
#endif
#undef SLIMOPS_SMALL_MM_BODY

// The column multiple the kernels pad their blocks to: two vectors of float (16) also covers double (8), so no
// partial block runs.
constexpr int64_t kMMCols = 16;

// Whether the AVX2 + FMA copies run: the ISA of isa.h (the CPU's, capped by SLIMOPS_CPU_ISA) is at least avx2.
inline bool small_mm_avx2() {
#if SLIMOPS_SMALL_MM_ISA_COPIES
  return static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2);
#else
  return false;
#endif
}

// C (m x n) = [C +] A B, A element (i, p) at a[i * ars + p * acs]; any n (a multiple of kMMCols is all full vectors).
template <typename T>
inline void small_mm(int64_t m, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b,
                     int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
#if SLIMOPS_SMALL_MM_ISA_COPIES
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return mm_avx512::mm<T>(m, k, n, a, ars, acs, b, ldb, c, ldc, accumulate);
    case CpuIsa::kAvx2: return mm_avx2::mm<T>(m, k, n, a, ars, acs, b, ldb, c, ldc, accumulate);
    default: break;
  }
#endif
  mm_base::mm<T>(m, k, n, a, ars, acs, b, ldb, c, ldc, accumulate);
}

// Operands larger than the caches: C (m x n) = [C +] A B by small_mm on panels. k is taken kPanelK rows of B at a time
// (a kPanelK x n panel stays in L2, 256 KiB for n = 256 float columns, while the rows of A sweep it), and the rows
// of C kPanelM at a time (their block of C stays in cache across the panels). Each element's sum still runs over k
// in order, so the result is small_mm's bit for bit. One thread: callers split the rows (or the samples) over
// threads. Why not BLAS: torch's MKL takes its AVX2 code on AMD CPUs (230 GFLOP/s on 2 Zen 5 cores, where this
// makes 400), and one call per block of a fused kernel keeps the operands where the kernel has them.
constexpr int64_t kPanelK = 256, kPanelM = 64;

// Blocks of `blk` that cover n (the row blocks callers split over threads).
inline int64_t blocks_of(int64_t n, int64_t blk) { return (n + blk - 1) / blk; }

template <typename T>
inline void panel_mm(int64_t m, int64_t k, int64_t n, const T* a, int64_t ars, int64_t acs, const T* b,
                     int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if (k <= 0) return small_mm<T>(m, 0, n, a, ars, acs, b, ldb, c, ldc, accumulate);
  for (int64_t i0 = 0; i0 < m; i0 += kPanelM)
    for (int64_t p0 = 0; p0 < k; p0 += kPanelK)
      small_mm<T>(std::min(kPanelM, m - i0), std::min(kPanelK, k - p0), n, a + i0 * ars + p0 * acs, ars, acs,
                  b + p0 * ldb, ldb, c + i0 * ldc, ldc, accumulate || p0 > 0);
}

}  // namespace cpu
}  // namespace slimops
