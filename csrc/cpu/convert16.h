// 16-bit float storage <-> float32: bfloat16 one value at a time (inlined into the elementwise loops), and arrays of
// bfloat16 or float16 (one copy per ISA).
//
// bfloat16 rounds as c10::BFloat16 does: to nearest, ties to even, every NaN to 0x7FC0. float16 rounds as c10::Half
// does (IEEE to nearest even, subnormals and overflow to inf included), by F16C's vcvtps2ph with the rounding in its
// immediate; a NaN stays a NaN (c10 writes 0x7E00 with the sign, F16C keeps the payload's top bits). Results are
// bit-identical to torch's and across the ISA copies (tested; any NaN matches any NaN).
//
// The array copies exist for the staged loops of the prox family (fused_apply.h). A fused loop over bfloat16 storage
// that converts element by element is vectorised by GCC 16 lanes wide (the width of the 16-bit type), two ymm per
// float operand on AVX2, and spills (prox_adamw_ as AVX2: ~50 of ~218 instructions per 16 elements). Converting 128
// elements of each array with these, running the float loop on the buffers and converting back took 20% less time
// (a standalone AdamW step, 25M elements, 2 threads, AVX2: 9.6 -> 7.6 ms). Written element by element, the same
// array conversion took 8.8 ms: GCC packs 32 -> 16 bits and tests NaN with integer operations where one vpackusdw
// and one unordered compare do. float16 element by element is c10's software conversion, which GCC leaves scalar.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SLIMOPS_CONVERT16_SIMD 1
#else
#define SLIMOPS_CONVERT16_SIMD 0
#endif

namespace slimops {
namespace cpu {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, NaN -> 0x7FC0, branch-free. c10's conversion branches on NaN, which keeps a whole fused loop
// scalar (5x slower than fp32 on a 25M-parameter SGD step). The NaN test is integer arithmetic: a float compare or a
// select here stops GCC's if-conversion. It gives an all-ones mask (|u| is below 2^31, so it is a signed compare)
// that blends by and / xor, which GCC turns into one vpblendvb; a multiply by a 0/1 flag took a vpmullw (bf16 AdamW
// 8% slower).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - static_cast<uint32_t>(static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000);
  return static_cast<uint16_t>(r ^ ((r ^ 0x7FC0u) & nan));
}

// x rounded to float16 and back, as float: IEEE to nearest even (subnormals, overflow to inf), NaN stays NaN, in
// integer and float operations a loop vectorises (c10's conversion and GCC 12's _Float16 casts do not). For a step
// that reads back the value it stores (SGD's momentum buffer). Normal results round the float's significand to 10
// bits by integer addition; below 2^-14 the result is a multiple of 2^-24, which (|x| + 0.5) - 0.5 rounds to. Checked
// against the F16C conversion on all 2^32 floats (any NaN matching any NaN).
inline float round_through_half(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t sign = u & 0x80000000u, a = u & 0x7FFFFFFFu;
  uint32_t normal = (a + 0xFFFu + ((a >> 13) & 1u)) & 0xFFFFE000u;
  const uint32_t overflow = 0u - static_cast<uint32_t>(static_cast<int32_t>(normal) >= 0x47800000);  // >= 2^16
  normal = (normal & ~overflow) | (0x7F800000u & overflow);
  float abs_x, sub_f;
  std::memcpy(&abs_x, &a, sizeof(a));
  sub_f = (abs_x + 0.5f) - 0.5f;
  uint32_t sub;
  std::memcpy(&sub, &sub_f, sizeof(sub));
  const uint32_t small = 0u - static_cast<uint32_t>(static_cast<int32_t>(a) < 0x38800000);  // < 2^-14
  uint32_t r = (sub & small) | (normal & ~small);
  const uint32_t nan = 0u - static_cast<uint32_t>(static_cast<int32_t>(a) > 0x7F800000);
  r = ((a & nan) | (r & ~nan)) | sign;
  float out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

namespace bf16conv {

inline void to_float_base(const uint16_t* __restrict s, float* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits_to_float(s[i]);
}
inline void to_bf16_base(const float* __restrict s, uint16_t* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(s[i]);
}

#if SLIMOPS_CONVERT16_SIMD
__attribute__((target("avx2"))) inline void to_float_avx2(const uint16_t* __restrict s, float* __restrict d,
                                                          int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
  }
  to_float_base(s + i, d + i, n - i);
}

// 8 floats -> 8 rounded bfloat16 in the low halves of 32-bit lanes.
__attribute__((target("avx2"))) inline __m256i round_avx2(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

__attribute__((target("avx2"))) inline void to_bf16_avx2(const float* __restrict s, uint16_t* __restrict d,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // packus interleaves the two inputs by 128-bit lane; the permute puts the 16 results back in order.
    const __m256i p = _mm256_packus_epi32(round_avx2(_mm256_loadu_ps(s + i)), round_avx2(_mm256_loadu_ps(s + i + 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_permute4x64_epi64(p, 0xD8));
  }
  to_bf16_base(s + i, d + i, n - i);
}

__attribute__((target("avx512f,avx512bw"))) inline void to_float_avx512(const uint16_t* __restrict s,
                                                                        float* __restrict d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
  }
  to_float_base(s + i, d + i, n - i);
}

__attribute__((target("avx512f,avx512bw"))) inline void to_bf16_avx512(const float* __restrict s,
                                                                       uint16_t* __restrict d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_loadu_ps(s + i);
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(r));  // vpmovdw: r < 2^16
  }
  to_bf16_base(s + i, d + i, n - i);
}
#endif

}  // namespace bf16conv

namespace halfconv {

inline void to_float_base(const uint16_t* __restrict s, float* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
}
inline void to_half_base(const float* __restrict s, uint16_t* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(s[i]).x;
}

#if SLIMOPS_CONVERT16_SIMD
__attribute__((target("avx2,f16c"))) inline void to_float_f16c(const uint16_t* __restrict s, float* __restrict d,
                                                               int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  to_float_base(s + i, d + i, n - i);
}
__attribute__((target("avx2,f16c"))) inline void to_half_f16c(const float* __restrict s, uint16_t* __restrict d,
                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  to_half_base(s + i, d + i, n - i);
}
__attribute__((target("avx512f"))) inline void to_float_avx512(const uint16_t* __restrict s, float* __restrict d,
                                                               int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
  to_float_base(s + i, d + i, n - i);
}
__attribute__((target("avx512f"))) inline void to_half_avx512(const float* __restrict s, uint16_t* __restrict d,
                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  to_half_base(s + i, d + i, n - i);
}
#endif

}  // namespace halfconv

// The array conversions of 16-bit storage type T (c10::BFloat16 or c10::Half) in this CPU's ISA copy (isa.h).
struct Converters16 {
  void (*to_float)(const uint16_t*, float*, int64_t);
  void (*from_float)(const float*, uint16_t*, int64_t);
};

template <typename T>
inline Converters16 converters16() {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
#if SLIMOPS_CONVERT16_SIMD
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      if constexpr (kBf16) return {bf16conv::to_float_avx512, bf16conv::to_bf16_avx512};
      return {halfconv::to_float_avx512, halfconv::to_half_avx512};
    case CpuIsa::kAvx2:
      if constexpr (kBf16) return {bf16conv::to_float_avx2, bf16conv::to_bf16_avx2};
      if (__builtin_cpu_supports("f16c")) return {halfconv::to_float_f16c, halfconv::to_half_f16c};
      break;
    default: break;
  }
#endif
  if constexpr (kBf16) return {bf16conv::to_float_base, bf16conv::to_bf16_base};
  return {halfconv::to_float_base, halfconv::to_half_base};
}

}  // namespace cpu
}  // namespace slimops
