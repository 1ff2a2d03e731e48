// 16 x 16 float transposes in AVX-512 registers, for the broadcast kernel of the 3x3 weight gradient
// (direct_conv.h), which keeps 16 output rows in the lanes of a vector:
//   - rows_to_pixel_major: dy [row][pixel] -> [pixel][row] once per sample, with each row's sum (the bias
//     gradient) taken on the way;
//   - add_transposed: the kernel's sums, [column (channel, tap)][16 rows] per vector, added into gw's rows.
// Both replaced scalar loops (one element per iteration, strided on one side) that took ~18% of the weight
// gradient's time on a Xeon with AVX-512 (28² x 128, masked_conv2d at 90%: `perf`, direct_gw_bcast's own samples
// beside the kernel's).
// Only the layout changes: every value is the one the scalar loops moved or added, and each row sum adds the
// pixels in their order, so the results are bit for bit those of the loops.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace slimops {
namespace cpu {

// v[j] lane i <- v[i] lane j. Within each 128-bit lane 4 x 4 blocks transpose by unpack (32-bit pairs) and
// shuffle (64-bit pairs); then the 128-bit lanes move across vectors in two rounds of shuffle_f32x4.
__attribute__((target("avx512f"))) inline void transpose16x16(__m512 (&v)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // u[4g + m], 128-bit lane k: rows 4g..4g+3 at column 4k + m
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // column 4k + m = lane k of u[m], u[4 + m], u[8 + m], u[12 + m]
  for (int m = 0; m < 4; ++m) {
    const __m512 a = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);       // u[m].0 u[m].1 u[4+m].0 u[4+m].1
    const __m512 b = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);       // lanes 2 and 3 of the same
    const __m512 c = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    const __m512 d = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    v[m] = _mm512_shuffle_f32x4(a, c, 0x88);        // lane 0 of each
    v[4 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);    // lane 1
    v[8 + m] = _mm512_shuffle_f32x4(b, d, 0x88);    // lane 2
    v[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);   // lane 3
  }
}

// dyt[p * ld + r] = dy_r[p] for every pixel p < np and row r < 16 * ceil(nr / 16) (rows from nr on are 0), where
// dy_r = dy + (rows ? rows[r] : r) * np; with sums, sums[r] += Σ_p dy_r[p] (pixels in order) for r < nr.
__attribute__((target("avx512f"))) inline void rows_to_pixel_major(const float* dy, const int64_t* rows, int64_t nr,
                                                                   int64_t np, float* dyt, int64_t ld, float* sums) {
  for (int64_t r0 = 0; r0 < nr; r0 += 16) {
    const int64_t rv = nr - r0 < 16 ? nr - r0 : 16;
    const float* src[16];
    for (int64_t q = 0; q < rv; ++q) src[q] = dy + (rows != nullptr ? rows[r0 + q] : r0 + q) * np;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < np; p0 += 16) {
      const int64_t pv = np - p0 < 16 ? np - p0 : 16;
      const __mmask16 pm = static_cast<__mmask16>((1u << pv) - 1u);
      __m512 v[16];
      for (int64_t q = 0; q < 16; ++q) v[q] = q < rv ? _mm512_maskz_loadu_ps(pm, src[q] + p0) : _mm512_setzero_ps();
      transpose16x16(v);
      float* d = dyt + p0 * ld + r0;
      for (int64_t i = 0; i < pv; ++i) {
        _mm512_storeu_ps(d + i * ld, v[i]);
        acc = _mm512_add_ps(acc, v[i]);
      }
    }
    if (sums != nullptr) {
      alignas(64) float s[16];
      _mm512_store_ps(s, acc);
      for (int64_t q = 0; q < rv; ++q) sums[r0 + q] += s[q];
    }
  }
}

// out[q][j] += s[j * lds + q] for columns j < nj and rows q < nrows (<= 16): s holds per column one vector of 16
// consecutive rows (the broadcast kernel's sums, lds floats apart).
__attribute__((target("avx512f"))) inline void add_transposed(const float* s, int64_t lds, int64_t nj, int64_t nrows,
                                                              float* const* out) {
  for (int64_t j0 = 0; j0 < nj; j0 += 16) {
    const int64_t jv = nj - j0 < 16 ? nj - j0 : 16;
    const __mmask16 jm = static_cast<__mmask16>((1u << jv) - 1u);
    __m512 v[16];
    for (int64_t i = 0; i < 16; ++i) v[i] = i < jv ? _mm512_loadu_ps(s + (j0 + i) * lds) : _mm512_setzero_ps();
    transpose16x16(v);
    for (int64_t q = 0; q < nrows; ++q) {
      float* o = out[q] + j0;
      _mm512_mask_storeu_ps(o, jm, _mm512_add_ps(_mm512_maskz_loadu_ps(jm, o), v[q]));
    }
  }
}

}  // namespace cpu
}  // namespace slimops

#endif
