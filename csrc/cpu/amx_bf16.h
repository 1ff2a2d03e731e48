// bfloat16 products on AMX tiles (Intel Sapphire Rapids and later): C (float) = A B with A and B in the pair layout
// of bf16_dot.h (A: rows of K-pairs; B: K-pair rows of N columns, the "VNNI" layout a tile multiply reads as it is).
//
// One tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 floats: 8192 multiply-adds, where
// vdpbf16ps (bf16_dot.h) does 32 per instruction. The kernel keeps 2 x 2 C tiles, two A tiles and two B tiles in
// the eight tile registers. Operands are padded by the caller: A has m rounded up to 16 readable rows and K pairs
// rounded up to 16 per row (zeros past K), B has that many pair rows (zeros past K), n is a multiple of 16, and C
// has room for m rounded up to 16 rows. Each thread configures the tiles before its first product
// (amx_bf16_begin) and releases them after its last (amx_bf16_end): the configuration is per thread.
#pragma once

#include <ATen/cpu/Utils.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "isa.h"
#include "transpose16.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11)
#include <immintrin.h>
#define SLIMOPS_AMX 1
#else
#define SLIMOPS_AMX 0
#endif

namespace slimops {
namespace cpu {

constexpr int64_t kAmxRows = 16;   // rows of a tile, and K pairs per tile row
constexpr int64_t kAmxCols = 16;   // floats (or pairs) per tile row

inline int64_t amx_pad16(int64_t n) { return (n + 15) / 16 * 16; }

// Whether the bf16 kernels may use the tiles: the avx512 ISA (isa.h, capped by SLIMOPS_CPU_ISA), a CPU with
// AMX-BF16 whose tiles the OS lets this process use (at::cpu::init_amx asks Linux for them), and SLIMOPS_CPU_AMX not
// 0 (the tests run the other bf16 paths on such a CPU this way). Read once.
inline bool cpu_amx_bf16() {
  static const bool on = [] {
    if (const char* v = std::getenv("SLIMOPS_CPU_AMX"); v != nullptr && std::string_view(v) == "0") return false;
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11)
    return cpu_isa() == CpuIsa::kAvx512 && __builtin_cpu_supports("amx-bf16") && at::cpu::init_amx();
#else
    return false;
#endif
  }();
  return on;
}

#if SLIMOPS_AMX
struct alignas(64) AmxTileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (2 x 2), 4-5: A, 6-7: B; every one 16 rows of 64 bytes.
__attribute__((target("amx-tile"))) inline void amx_bf16_begin() {
  AmxTileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  // GCC 12 does not count ldtilecfg as a read of cfg and drops the stores above without this barrier (the
  // instruction then faults on a configuration of zeros and stack garbage).
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) inline void amx_bf16_end() { _tile_release(); }

// MI x NJ C tiles (MI, NJ in 1..2) at rows i, columns j; ACC: C += A B (the C tiles loaded first).
template <int MI, int NJ, bool ACC>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_bf16_block(int64_t kp16, const uint32_t* a, int64_t lda,
                                                                       const uint32_t* b, int64_t ldb, float* c,
                                                                       int64_t ldc) {
  if constexpr (ACC) {
    _tile_loadd(0, c, ldc * 4);
    if constexpr (NJ > 1) _tile_loadd(1, c + 16, ldc * 4);
    if constexpr (MI > 1) _tile_loadd(2, c + 16 * ldc, ldc * 4);
    if constexpr (MI > 1 && NJ > 1) _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  } else {
    _tile_zero(0);
    if constexpr (NJ > 1) _tile_zero(1);
    if constexpr (MI > 1) _tile_zero(2);
    if constexpr (MI > 1 && NJ > 1) _tile_zero(3);
  }
  const int64_t sa = lda * 4, sb = ldb * 4;
  for (int64_t p = 0; p < kp16; p += kAmxRows) {
    _tile_loadd(4, a + p, sa);
    if constexpr (MI > 1) _tile_loadd(5, a + 16 * lda + p, sa);
    _tile_loadd(6, b + p * ldb, sb);
    if constexpr (NJ > 1) _tile_loadd(7, b + p * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MI > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MI > 1 && NJ > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  if constexpr (NJ > 1) _tile_stored(1, c + 16, ldc * 4);
  if constexpr (MI > 1) _tile_stored(2, c + 16 * ldc, ldc * 4);
  if constexpr (MI > 1 && NJ > 1) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// C (m16 x n16) = A (m16 x kp16 pairs) B (kp16 pairs x n16), or C += A B with ACC: m16, kp16, n16 multiples of 16.
template <bool ACC = false>
inline void amx_bf16_mm(int64_t m16, int64_t kp16, int64_t n16, const uint32_t* a, int64_t lda, const uint32_t* b,
                        int64_t ldb, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m16; i += 32) {
    const bool two_rows = i + 32 <= m16;
    for (int64_t j = 0; j < n16; j += 32) {
      const bool two_cols = j + 32 <= n16;
      const uint32_t* ai = a + i * lda;
      const uint32_t* bj = b + j;
      float* cij = c + i * ldc + j;
      if (two_rows && two_cols) amx_bf16_block<2, 2, ACC>(kp16, ai, lda, bj, ldb, cij, ldc);
      else if (two_rows) amx_bf16_block<2, 1, ACC>(kp16, ai, lda, bj, ldb, cij, ldc);
      else if (two_cols) amx_bf16_block<1, 2, ACC>(kp16, ai, lda, bj, ldb, cij, ldc);
      else amx_bf16_block<1, 1, ACC>(kp16, ai, lda, bj, ldb, cij, ldc);
    }
  }
}

// out[j] = (bf16(r0[j]), bf16(r1[j])) as a pair (r1 null: 0), j < n (a multiple of 16): two float rows rounded to
// the pairs a product over them takes (rows 2p and 2p + 1 of P or dS, contracted over the queries).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void amx_round_interleave(const float* r0,
                                                                                        const float* r1, int64_t n,
                                                                                        uint32_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j)));
    const __m512i b = r1 != nullptr ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r1 + j)))
                                    : _mm512_setzero_si512();
    _mm512_storeu_si512(out + j, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (both multiples of 16), in 16 x 16 register blocks.
__attribute__((target("avx512f"))) inline void amx_transpose_pairs(const uint32_t* src, int64_t rows, int64_t cols,
                                                                   int64_t lds, uint32_t* dst, int64_t ldd) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      __m512 v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_castsi512_ps(_mm512_loadu_si512(src + (i0 + r) * lds + j0));
      transpose16x16(v);
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + (j0 + r) * ldd + i0, _mm512_castps_si512(v[r]));
    }
}
#endif

}  // namespace cpu
}  // namespace slimops
