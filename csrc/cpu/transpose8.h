// 8 x 8 float transposes in AVX2 registers: transpose16.h's two moves for the AVX2 copy of the broadcast kernel of
// the 3x3 weight gradient (direct_conv.h), which keeps 8 output rows in the lanes of a vector:
//   - rows_to_pixel_major_avx2: dy [row][pixel] -> [pixel][row] once per sample, each row's sum (the bias gradient)
//     taken on the way;
//   - add_transposed_avx2: the kernel's sums, [column (channel, tap)][8 rows] per vector, added into gw's rows.
// Every value is the one the AVX-512 copies move or add, and each row sum adds the pixels in their order from +0, so
// the two ISAs' weight and bias gradients agree bit for bit (tests/test_base_isa.py).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace slimops {
namespace cpu {

// v[j] lane i <- v[i] lane j: unpack (32-bit pairs), shuffle (64-bit pairs), then the 128-bit halves across vectors.
__attribute__((target("avx2"))) inline void transpose8x8(__m256 (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // u[4h + m], half k: rows 4h..4h+3 at column 4k + m
  for (int h = 0; h < 2; ++h) {
    u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {
    v[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);      // the low halves: column m
    v[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);  // the high halves: column 4 + m
  }
}

// The lane mask of the first n (0..8) lanes, for maskload / maskstore.
__attribute__((target("avx2"))) inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// dyt[p * ld + r] = dy_r[p] for every pixel p < np and row r < 8 * ceil(nr / 8) (rows from nr on are 0), where
// dy_r = dy + (rows ? rows[r] : r) * np; with sums, sums[r] += Σ_p dy_r[p] (pixels in order) for r < nr.
__attribute__((target("avx2"))) inline void rows_to_pixel_major_avx2(const float* dy, const int64_t* rows,
                                                                     int64_t nr, int64_t np, float* dyt, int64_t ld,
                                                                     float* sums) {
  for (int64_t r0 = 0; r0 < nr; r0 += 8) {
    const int64_t rv = nr - r0 < 8 ? nr - r0 : 8;
    const float* src[8];
    for (int64_t q = 0; q < rv; ++q) src[q] = dy + (rows != nullptr ? rows[r0 + q] : r0 + q) * np;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < np; p0 += 8) {
      const int64_t pv = np - p0 < 8 ? np - p0 : 8;
      const __m256i pm = first_lanes(pv);
      __m256 v[8];
      for (int64_t q = 0; q < 8; ++q)
        v[q] = q >= rv ? _mm256_setzero_ps() : pv == 8 ? _mm256_loadu_ps(src[q] + p0)
                                                         : _mm256_maskload_ps(src[q] + p0, pm);
      transpose8x8(v);
      float* d = dyt + p0 * ld + r0;
      for (int64_t i = 0; i < pv; ++i) {
        _mm256_storeu_ps(d + i * ld, v[i]);
        acc = _mm256_add_ps(acc, v[i]);
      }
    }
    if (sums != nullptr) {
      alignas(32) float s[8];
      _mm256_store_ps(s, acc);
      for (int64_t q = 0; q < rv; ++q) sums[r0 + q] += s[q];
    }
  }
}

// out[q][j] += s[j * lds + q] for columns j < nj and rows q < nrows (<= 8): s holds per column one vector of 8
// consecutive rows (the broadcast kernel's sums, lds floats apart).
__attribute__((target("avx2"))) inline void add_transposed_avx2(const float* s, int64_t lds, int64_t nj,
                                                                int64_t nrows, float* const* out) {
  for (int64_t j0 = 0; j0 < nj; j0 += 8) {
    const int64_t jv = nj - j0 < 8 ? nj - j0 : 8;
    const __m256i jm = first_lanes(jv);
    __m256 v[8];
    for (int64_t i = 0; i < 8; ++i) v[i] = i < jv ? _mm256_loadu_ps(s + (j0 + i) * lds) : _mm256_setzero_ps();
    transpose8x8(v);
    for (int64_t q = 0; q < nrows; ++q) {
      float* o = out[q] + j0;
      if (jv == 8) _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v[q]));
      else _mm256_maskstore_ps(o, jm, _mm256_add_ps(_mm256_maskload_ps(o, jm), v[q]));
    }
  }
}

}  // namespace cpu
}  // namespace slimops

#endif
