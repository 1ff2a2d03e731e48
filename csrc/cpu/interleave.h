// Interleaving two rows and splitting one, for the stride-2 phases of the direct convolutions (direct_conv.h's
// phase-split input, direct_gx_strided.h's phase results): a stride-2 conv's rows are two phases side by side.
// Written out as permutes because these loops run once per input row of every strided layer: as scalar loops with a
// runtime stride (one 4-byte load and store per pixel) they took 11-13% of a stride-2 channel_conv2d backward each.
#pragma once

#include <cstdint>

#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SLIMOPS_INTERLEAVE_X86 1
#else
#define SLIMOPS_INTERLEAVE_X86 0
#endif

namespace slimops {
namespace cpu {

#if SLIMOPS_INTERLEAVE_X86
// The lanes below n (n may be <= 0 or past the width): a 16-lane mask, an 8-lane AVX2 mask vector.
inline __mmask16 mask16(int64_t n) {
  return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
}
__attribute__((target("avx2"))) inline __m256i mask8(int64_t n) {
  const int c = static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// d[2 m] = a[m], d[2 m + 1] = b[m], for the n floats d[0 .. n).
__attribute__((target("avx512f"))) inline void zip2_avx512(const float* a, const float* b, float* d, int64_t n) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 va = _mm512_loadu_ps(a + i / 2), vb = _mm512_loadu_ps(b + i / 2);
    _mm512_storeu_ps(d + i, _mm512_permutex2var_ps(va, lo, vb));
    _mm512_storeu_ps(d + i + 16, _mm512_permutex2var_ps(va, hi, vb));
  }
  if (i < n) {  // the last rem < 32 outputs, masked: a gives ceil(rem / 2) of them, b floor(rem / 2)
    const int64_t rem = n - i;
    const __m512 va = _mm512_maskz_loadu_ps(mask16((rem + 1) / 2), a + i / 2);
    const __m512 vb = _mm512_maskz_loadu_ps(mask16(rem / 2), b + i / 2);
    _mm512_mask_storeu_ps(d + i, mask16(rem), _mm512_permutex2var_ps(va, lo, vb));
    if (rem > 16) _mm512_mask_storeu_ps(d + i + 16, mask16(rem - 16), _mm512_permutex2var_ps(va, hi, vb));
  }
}

__attribute__((target("avx2"))) inline void zip2_avx2(const float* a, const float* b, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 va = _mm256_loadu_ps(a + i / 2), vb = _mm256_loadu_ps(b + i / 2);
    const __m256 l = _mm256_unpacklo_ps(va, vb), h = _mm256_unpackhi_ps(va, vb);  // per 128-bit lane
    _mm256_storeu_ps(d + i, _mm256_permute2f128_ps(l, h, 0x20));
    _mm256_storeu_ps(d + i + 8, _mm256_permute2f128_ps(l, h, 0x31));
  }
  if (i < n) {  // the last rem < 16 outputs, masked
    const int64_t rem = n - i;
    const __m256 va = _mm256_maskload_ps(a + i / 2, mask8((rem + 1) / 2));
    const __m256 vb = _mm256_maskload_ps(b + i / 2, mask8(rem / 2));
    const __m256 l = _mm256_unpacklo_ps(va, vb), h = _mm256_unpackhi_ps(va, vb);
    _mm256_maskstore_ps(d + i, mask8(rem), _mm256_permute2f128_ps(l, h, 0x20));
    if (rem > 8) _mm256_maskstore_ps(d + i + 8, mask8(rem - 8), _mm256_permute2f128_ps(l, h, 0x31));
  }
}

#endif

inline void zip2(const float* a, const float* b, float* d, int64_t n) {
#if SLIMOPS_INTERLEAVE_X86
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: zip2_avx512(a, b, d, n); return;
    case CpuIsa::kAvx2: zip2_avx2(a, b, d, n); return;
    default: break;
  }
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = (i & 1) ? b[i / 2] : a[i / 2];
}

#if SLIMOPS_INTERLEAVE_X86

// a[m] = s[2 m], b[m] = s[2 m + 1], for the n floats s[0 .. n) (a takes ceil(n / 2), b floor(n / 2)).
__attribute__((target("avx512f"))) inline void unzip2_avx512(const float* s, float* a, float* b, int64_t n) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(s + i), v1 = _mm512_loadu_ps(s + i + 16);
    _mm512_storeu_ps(a + i / 2, _mm512_permutex2var_ps(v0, ev, v1));
    _mm512_storeu_ps(b + i / 2, _mm512_permutex2var_ps(v0, od, v1));
  }
  if (i < n) {  // the last rem < 32 inputs, masked
    const int64_t rem = n - i;
    const __m512 v0 = _mm512_maskz_loadu_ps(mask16(rem), s + i);
    const __m512 v1 = _mm512_maskz_loadu_ps(rem > 16 ? mask16(rem - 16) : 0, s + i + 16);
    _mm512_mask_storeu_ps(a + i / 2, mask16((rem + 1) / 2), _mm512_permutex2var_ps(v0, ev, v1));
    _mm512_mask_storeu_ps(b + i / 2, mask16(rem / 2), _mm512_permutex2var_ps(v0, od, v1));
  }
}

__attribute__((target("avx2"))) inline void unzip2_avx2(const float* s, float* a, float* b, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(s + i), v1 = _mm256_loadu_ps(s + i + 8);
    // per 128-bit lane: evens (0 2 | 4 6 from v0, 8 10 | 12 14 from v1) in the order 0 2 8 10 | 4 6 12 14
    const __m256 e = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
    _mm256_storeu_ps(a + i / 2, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
    _mm256_storeu_ps(b + i / 2, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
  }
  if (i < n) {  // the last rem < 16 inputs, masked
    const int64_t rem = n - i;
    const __m256 v0 = _mm256_maskload_ps(s + i, mask8(rem));
    const __m256 v1 = _mm256_maskload_ps(s + i + 8, mask8(rem - 8));
    const __m256 e = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
    _mm256_maskstore_ps(a + i / 2, mask8((rem + 1) / 2),
                        _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
    _mm256_maskstore_ps(b + i / 2, mask8(rem / 2), _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
  }
}

#endif

inline void unzip2(const float* s, float* a, float* b, int64_t n) {
#if SLIMOPS_INTERLEAVE_X86
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: unzip2_avx512(s, a, b, n); return;
    case CpuIsa::kAvx2: unzip2_avx2(s, a, b, n); return;
    default: break;
  }
#endif
  for (int64_t i = 0; i < n; ++i) ((i & 1) ? b : a)[i / 2] = s[i];
}

}  // namespace cpu
}  // namespace slimops
