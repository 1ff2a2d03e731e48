// bfloat16 products with float32 accumulation on the AVX512-BF16 dot instruction (vdpbf16ps):
//   C (m x n, float) = A (m x 2kp, bfloat16) B (2kp x n, bfloat16)
// One vdpbf16ps multiplies 16 lanes of bf16 pairs and adds both products to 16 float accumulators: 32 multiply-adds
// per instruction against 16 for a float FMA, with the products exact (8-bit significands) and the sums in float.
// This is what oneDNN's bfloat16 matmuls run on such CPUs (Intel Cooper Lake and later, AMD Zen 4 and later), and
// what the attention kernels' bfloat16 paths need to be as fast as a composite of those matmuls.
//
// Operands, as the instruction wants them (p = 0 .. kp - 1 indexes a pair of the reduction dim):
//   A: row i is kp pairs (a[2p], a[2p + 1]) at a + i * lda, as uint32: a bfloat16 row in its natural order (an odd
//      length padded with one zero);
//   B: "pair-packed", row p holds n pairs (b[2p][j], b[2p + 1][j]) at b + p * ldb (uint32 each);
//   C: float rows, n a multiple of 16 (the packers pad columns with zeros).
// Blocks of 8 rows x 2 vectors (16 accumulators), one vector for a last 16 columns, fewer rows for the last rows: the
// same blocking as small_mm.h's AVX-512 copy. The sum over pairs runs in order p = 0, 1, ...
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SLIMOPS_BF16_DOT 1
#else
#define SLIMOPS_BF16_DOT 0
#endif

namespace slimops {
namespace cpu {

// Whether the bfloat16 paths use vdpbf16ps: the ISA is avx512 (isa.h, capped by SLIMOPS_CPU_ISA), the CPU has
// AVX512_BF16, and SLIMOPS_CPU_BF16_DOT is not 0 (the tests turn it off to run the float path on such a CPU).
inline bool cpu_bf16_dot() {
#if SLIMOPS_BF16_DOT
  static const bool on = [] {
    if (cpu_isa() != CpuIsa::kAvx512 || !__builtin_cpu_supports("avx512bf16")) return false;
    const char* v = std::getenv("SLIMOPS_CPU_BF16_DOT");
    return v == nullptr || std::string_view(v) != "0";
  }();
  return on;
#else
  return false;
#endif
}

#if SLIMOPS_BF16_DOT
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")
namespace bf16dot {

template <int MR, int NV>
inline void block(int64_t kp, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                  int64_t ldc) {
  __m512 r[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) r[i][u] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p, b += ldb) {
    __m512bh bv[NV];
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) bv[u] = (__m512bh)_mm512_loadu_si512(b + 16 * u);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * lda + p]));
#pragma GCC unroll 2
      for (int u = 0; u < NV; ++u) r[i][u] = _mm512_dpbf16_ps(r[i][u], av, bv[u]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(c + i * ldc + 16 * u, r[i][u]);
}

template <int MR>
inline void rows(int64_t kp, int64_t n, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                 int64_t ldc) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) block<MR, 2>(kp, a, lda, b + j, ldb, c + j, ldc);
  for (; j < n; j += 16) block<MR, 1>(kp, a, lda, b + j, ldb, c + j, ldc);
}

template <int MR>
inline void tail(int64_t m, int64_t kp, int64_t n, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                 float* c, int64_t ldc) {
  if constexpr (MR > 0) {
    if (m == MR) return rows<MR>(kp, n, a, lda, b, ldb, c, ldc);
    tail<MR - 1>(m, kp, n, a, lda, b, ldb, c, ldc);
  }
}

inline void mm(int64_t m, int64_t kp, int64_t n, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
               float* c, int64_t ldc) {
  constexpr int kMR = 8;
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR) rows<kMR>(kp, n, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
  tail<kMR - 1>(m - i, kp, n, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
}

// dst (rows x n / 2 pairs, row stride ldd) = src (rows x n floats, row stride lds) rounded to bfloat16 (nearest
// even), n even: the A operand of the next product (attention's probabilities before P V).
inline void round_rows(const float* src, int64_t rows, int64_t n, int64_t lds, uint32_t* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * lds;
    uint32_t* d = dst + i * ldd;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32)
      _mm512_storeu_si512(d + j / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + j + 16), _mm512_loadu_ps(s + j)));
    if (j < n) {  // 2 .. 30 floats left: masked, so nothing past the row is read or written
      const int64_t r = n - j;
      const __mmask16 lo = static_cast<__mmask16>(r >= 16 ? 0xFFFFu : (1u << r) - 1u);
      const __mmask16 hi = static_cast<__mmask16>(r > 16 ? (1u << (r - 16)) - 1u : 0u);
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, s + j + 16), _mm512_maskz_loadu_ps(lo, s + j));
      _mm512_mask_storeu_epi32(d + j / 2, static_cast<__mmask16>((1u << (r / 2)) - 1u), (__m512i)v);
    }
  }
}

// Transposes pairs: kt[p * ldk + j] = rows[j][p] for j < n (n row pointers, dh pairs each), 16 x 16 blocks of
// 32-bit elements by unpacks and lane shuffles (4 stages); columns n .. (n rounded up to 16) get zeros. ldk must be a
// multiple of 16 and at least n rounded up.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4 g + c], 128-bit lane L: rows 4 g .. 4 g + 3 at column 4 L + c. The result's row 4 L + c takes lane g from
  // r[4 g + c]'s lane L: a 4 x 4 transpose of lanes over r[c], r[4 + c], r[8 + c], r[12 + c], in two shuffle stages
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

inline void pack_transposed_pairs(const uint32_t* const* rows, int64_t n, int64_t dh, uint32_t* kt, int64_t ldk) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int64_t p0 = 0; p0 < dh; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, dh - p0);
      const __mmask16 m = static_cast<__mmask16>(np == 16 ? 0xFFFFu : (1u << np) - 1u);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_maskz_loadu_epi32(m, rows[j0 + i] + p0) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t i = 0; i < np; ++i) _mm512_storeu_si512(kt + (p0 + i) * ldk + j0, r[i]);
    }
  }
}

// out[t] = (r0[t], r1[t]) for t < d (r1 null: zeros), then zeros up to dm: two value rows as the pairs of P V's B.
inline void interleave_rows(const uint16_t* r0, const uint16_t* r1, int64_t d, uint32_t* out, int64_t dm) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  int64_t t = 0;
  for (; t < d; t += 32) {
    const int64_t k = std::min<int64_t>(32, d - t);
    const __mmask32 m = k == 32 ? 0xFFFFFFFFu : (1u << k) - 1u;
    const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + t);
    const __m512i b = r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + t) : _mm512_setzero_si512();
    const __m512i x = _mm512_permutex2var_epi16(a, lo, b), y = _mm512_permutex2var_epi16(a, hi, b);
    const __mmask16 m0 = static_cast<__mmask16>(k >= 16 ? 0xFFFFu : (1u << k) - 1u);
    const __mmask16 m1 = static_cast<__mmask16>(k > 16 ? (k == 32 ? 0xFFFFu : (1u << (k - 16)) - 1u) : 0u);
    _mm512_mask_storeu_epi32(out + t, m0, x);
    if (m1) _mm512_mask_storeu_epi32(out + t + 16, m1, y);
  }
  std::fill(out + d, out + dm, 0u);
}

// s[i][j] *= scale for j < n.
inline void scale_rows(float* s, int64_t rows, int64_t n, int64_t ld, float scale) {
  const __m512 f = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < rows; ++i) {
    float* r = s + i * ld;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = static_cast<__mmask16>(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1u);
      _mm512_mask_storeu_ps(r + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, r + j), f));
    }
  }
}

// dst rows (d bfloat16 each, contiguous) = src rows (row stride ld) rounded to nearest even.
inline void store_rows(uint16_t* dst, int64_t d, const float* src, int64_t rows, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t t = 0; t < d; t += 16) {
      const __mmask16 m = static_cast<__mmask16>(d - t >= 16 ? 0xFFFFu : (1u << (d - t)) - 1u);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i * ld + t));
      _mm256_mask_storeu_epi16(dst + i * d + t, m, v);
    }
  }
}

}  // namespace bf16dot
#pragma GCC pop_options
#endif

// C (m x n) = A B as above; only call when cpu_bf16_dot().
inline void bf16_dot_mm(int64_t m, int64_t kp, int64_t n, const uint32_t* a, int64_t lda, const uint32_t* b,
                        int64_t ldb, float* c, int64_t ldc) {
#if SLIMOPS_BF16_DOT
  if (m > 0 && n > 0) bf16dot::mm(m, kp, n, a, lda, b, ldb, c, ldc);
#else
  (void)m, (void)kp, (void)n, (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc;
#endif
}

// The packers and row passes of the bfloat16 attention path (see their bf16dot:: versions); only call when
// cpu_bf16_dot().
inline void bf16_dot_pack_transposed(const uint32_t* const* rows, int64_t n, int64_t dh, uint32_t* kt, int64_t ldk) {
#if SLIMOPS_BF16_DOT
  bf16dot::pack_transposed_pairs(rows, n, dh, kt, ldk);
#else
  (void)rows, (void)n, (void)dh, (void)kt, (void)ldk;
#endif
}
inline void bf16_dot_interleave(const uint16_t* r0, const uint16_t* r1, int64_t d, uint32_t* out, int64_t dm) {
#if SLIMOPS_BF16_DOT
  bf16dot::interleave_rows(r0, r1, d, out, dm);
#else
  (void)r0, (void)r1, (void)d, (void)out, (void)dm;
#endif
}
inline void bf16_dot_scale_rows(float* s, int64_t rows, int64_t n, int64_t ld, float scale) {
#if SLIMOPS_BF16_DOT
  bf16dot::scale_rows(s, rows, n, ld, scale);
#else
  (void)s, (void)rows, (void)n, (void)ld, (void)scale;
#endif
}
inline void bf16_dot_store_rows(uint16_t* dst, int64_t d, const float* src, int64_t rows, int64_t ld) {
#if SLIMOPS_BF16_DOT
  bf16dot::store_rows(dst, d, src, rows, ld);
#else
  (void)dst, (void)d, (void)src, (void)rows, (void)ld;
#endif
}

// bfloat16 rounding of float rows into pairs (see bf16dot::round_rows); only call when cpu_bf16_dot().
inline void bf16_dot_round_rows(const float* src, int64_t rows, int64_t n, int64_t lds, uint32_t* dst, int64_t ldd) {
#if SLIMOPS_BF16_DOT
  bf16dot::round_rows(src, rows, n, lds, dst, ldd);
#else
  (void)src, (void)rows, (void)n, (void)lds, (void)dst, (void)ldd;
#endif
}

}  // namespace cpu
}  // namespace slimops
