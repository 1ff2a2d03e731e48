// Tile helpers shared by the CPU attention kernels (sema.cpp: SEMA windows; token_attention.cpp: attention over kept
// tokens): operands read in place through their strides, packed once into cache-resident tiles in the accumulation
// dtype, products by small_mm.h, and the vectorised row softmax of sema_core.inc.
//
// sema_core.inc is compiled three times, into attn_base (the x86-64 base ISA, 16-byte vectors), attn_avx2 (AVX2 +
// FMA, 32-byte vectors) and attn_avx512 (64-byte vectors), the last two under target pragmas (no global -mavx2), and
// the dispatchers below pick the copy of the ISA isa.h chose at run time.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "small_mm.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace slimops {
namespace cpu {

#define SLIMOPS_SEMA_VBYTES 16
namespace attn_base {
#include "sema_core.inc"
}  // namespace attn_base
#undef SLIMOPS_SEMA_VBYTES

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIMOPS_ATTN_ISA_COPIES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SLIMOPS_SEMA_VBYTES 32
namespace attn_avx2 {
#include "sema_core.inc"
}  // namespace attn_avx2
#undef SLIMOPS_SEMA_VBYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#define SLIMOPS_SEMA_VBYTES 64
namespace attn_avx512 {
#include "sema_core.inc"
}  // namespace attn_avx512
#undef SLIMOPS_SEMA_VBYTES
#pragma GCC pop_options
#else
#define SLIMOPS_ATTN_ISA_COPIES 0
#endif

// Calls FN<T> of the sema_core.inc copy for the ISA isa.h chose (the CPU's, capped by SLIMOPS_CPU_ISA).
#if SLIMOPS_ATTN_ISA_COPIES
#define SLIMOPS_ATTN_CALL(FN, T, ...)                                                   \
  switch (cpu_isa()) {                                                                   \
    case CpuIsa::kAvx512: return attn_avx512::FN<T>(__VA_ARGS__);                        \
    case CpuIsa::kAvx2: return attn_avx2::FN<T>(__VA_ARGS__);                            \
    default: return attn_base::FN<T>(__VA_ARGS__);                                       \
  }
#else
#define SLIMOPS_ATTN_CALL(FN, T, ...) return attn_base::FN<T>(__VA_ARGS__);
#endif

// Row-wise softmax in place over the first n columns of `rows` rows (leading dimension ld).
template <typename T>
void softmax_rows(T* s, int64_t rows, int64_t n, int64_t ld) {
  SLIMOPS_ATTN_CALL(softmax_rows, T, s, rows, n, ld)
}

// The softmax backward in place: ds_ij = p_ij (dp_ij - sum_j p_ij dp_ij), over the first n columns.
template <typename T>
void softmax_grad_rows(const T* p, T* dp, int64_t rows, int64_t n, int64_t ld) {
  SLIMOPS_ATTN_CALL(softmax_grad_rows, T, p, dp, rows, n, ld)
}

// Rows of packed operands: the head dim (and the key count) padded with zeros to a multiple of 16, the column
// multiple of small_mm.h (a multiple of the vector width for float and double).
inline int64_t pad16(int64_t n) { return (n + kMMCols - 1) / kMMCols * kMMCols; }

// Work items per parallel chunk: about 64k multiply-adds each, so small calls stay on one thread.
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
}

// A (B, heads, N, d) operand read in place: element (b, h, n, t) at p[b sb + h sh + n sn + t st] (st = 1 after
// unit_last_stride; the packing loops take any st, so an operand is never copied whole just for its strides).
template <typename S>
struct Plane {
  const S* p;
  int64_t sb, sh, sn, st;
  const S* row(int64_t b, int64_t h, int64_t n) const { return p + b * sb + h * sh + n * sn; }
};

// The operand with a contiguous head dim (a copy only when it is not: e.g. a transposed d).
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

template <typename S>
Plane<S> plane(const at::Tensor& t) {
  return {t.data_ptr<S>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Packs rows `toks` (null: rows 0..n-1) of (b, h) into dst (rows of dp elements, T), multiplied by `mul`,
// zero-padded.
template <typename S, typename T>
void pack(const Plane<S>& src, int64_t b, int64_t h, const int64_t* toks, int64_t n, int64_t d, int64_t dp, T mul,
          T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const S* r = src.row(b, h, toks != nullptr ? toks[i] : i);
    T* o = dst + i * dp;
    if (src.st == 1)
      for (int64_t t = 0; t < d; ++t) o[t] = static_cast<T>(r[t]) * mul;
    else
      for (int64_t t = 0; t < d; ++t) o[t] = static_cast<T>(r[t * src.st]) * mul;
    for (int64_t t = d; t < dp; ++t) o[t] = T(0);
  }
}

// dst[t * ld + i] = rows[i][t] for 4 rows of float and t < d (unit stride): 4 x 4 blocks transposed in SSE registers
// (the x86-64 base ISA: every copy has it), 4 loads and 4 stores per 16 elements where element copies make 16 of
// each, with a store stride of ld floats; the last d mod 4 columns element by element.
inline void transpose_4_rows(const float* const* rows, int64_t d, int64_t ld, float* dst) {
  int64_t t = 0;
#if defined(__SSE2__)
  for (; t + 4 <= d; t += 4) {
    __m128 r0 = _mm_loadu_ps(rows[0] + t), r1 = _mm_loadu_ps(rows[1] + t), r2 = _mm_loadu_ps(rows[2] + t),
           r3 = _mm_loadu_ps(rows[3] + t);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    _mm_storeu_ps(dst + t * ld, r0);
    _mm_storeu_ps(dst + (t + 1) * ld, r1);
    _mm_storeu_ps(dst + (t + 2) * ld, r2);
    _mm_storeu_ps(dst + (t + 3) * ld, r3);
  }
#endif
  for (; t < d; ++t)
    for (int i = 0; i < 4; ++i) dst[t * ld + i] = rows[i][t];
}

// Packs rows `toks` of (b, h) transposed: dst[t * ld + i] = src[toks[i]][t] for t < d; columns n..ld zero. Float rows
// of unit stride go 4 at a time through transpose_4_rows (the K^T of every attention tile: the element loop was 80%
// of the kept-token forward's own time outside the products and the softmax).
template <typename S, typename T>
void pack_transposed(const Plane<S>& src, int64_t b, int64_t h, const int64_t* toks, int64_t n, int64_t d, int64_t ld,
                     T* dst) {
  for (int64_t t = 0; t < d; ++t) std::fill(dst + t * ld + n, dst + (t + 1) * ld, T(0));
  int64_t i = 0;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (src.st == 1)
      for (; i + 4 <= n; i += 4) {
        const float* rows[4] = {src.row(b, h, toks[i]), src.row(b, h, toks[i + 1]), src.row(b, h, toks[i + 2]),
                                src.row(b, h, toks[i + 3])};
        transpose_4_rows(rows, d, ld, dst + i);
      }
  }
  for (; i < n; ++i) {
    const S* r = src.row(b, h, toks[i]);
    for (int64_t t = 0; t < d; ++t) dst[t * ld + i] = static_cast<T>(r[t * src.st]);
  }
}

// Stores n rows of dp elements (T) to rows `toks` (null: rows 0..n-1) of a contiguous (rows, d) plane `base`, as
// (src + add) when `add` (dp elements) is given, else src * mul.
template <typename S, typename T>
void store_rows(S* base, int64_t d, const int64_t* toks, int64_t n, int64_t dp, const T* src, const T* add,
                T mul = T(1)) {
  for (int64_t i = 0; i < n; ++i) {
    S* o = base + (toks != nullptr ? toks[i] : i) * d;
    const T* r = src + i * dp;
    if (add != nullptr)
      for (int64_t t = 0; t < d; ++t) o[t] = static_cast<S>(r[t] + add[t]);
    else
      for (int64_t t = 0; t < d; ++t) o[t] = static_cast<S>(r[t] * mul);
  }
}

}  // namespace cpu
}  // namespace slimops
