// A stride-1 3x3 convolution with padding 1 by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", CVPR 2016): channel_conv2d's float32 forward, masked_conv2d's for
// the samples that keep most rows, and grad_x of both (the same kind of conv of dy with the flipped filters).
// Each 2x2 block of output pixels ("tile") of output channel r is
//     Y = A^T [ sum_c (G g_rc G^T) .* (B^T d_c B) ] A
// with d_c the 4x4 input patch of kept channel c around the tile (zeros outside the plane: the padding), g_rc the
// 3x3 filter, and
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//     A^T = [1 1 1 0; 0 1 -1 -1].
// The sum over channels is, for each of the 16 positions xi of the 4x4 transformed tile, a matrix product:
//     M_xi (rows x tiles) = U_xi (rows x channels) V_xi (channels x tiles),
// 16 products with 2 * rows * channels * tiles flops, where the direct convolution needs 9 * 4 = 36 multiplies per
// (row, channel, tile) against 16 here: 2.25x fewer. The transforms are additions only (U's halves are exact) and
// cost O((rows + channels) * tiles).
//
// Numerics: the sums are not the direct convolution's sums in another order but sums of transformed terms; the
// error stays of the order of the direct sum's (against a float64 truth, relative to sum |term|: 1.1-1.7e-7 at
// 64 @ 28², 115 @ 28², 128 @ 14², 256 @ 7²; the direct kernel 3.0e-7 at 64 @ 28², oneDNN's direct conv
// 0.4-0.8e-7; the float32 tests allow 1e-6). The arithmetic is additions, subtractions and small_mm's FMAs in a
// fixed order, so every ISA copy gives the same bits, and so does any thread count (each sample is computed by one
// thread).
//
// Why: at 2.25x fewer multiplies a float32 3x3 conv is no longer bound by the FMA units' peak, which the direct
// kernels (direct_conv.h, direct_unpadded.h) already reach within ~10%. SLIMOPS_CPU_CONV=direct turns it off
// (read once), for the tests that check the direct kernels bit for bit and for comparisons.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "isa.h"
#include "small_mm.h"
#include "slimops/channel_conv_checks.h"

#if SLIMOPS_SMALL_MM_ISA_COPIES
#include <immintrin.h>
#endif

namespace slimops {
namespace cpu {

// Whether SLIMOPS_CPU_CONV allows the Winograd path (unset or "auto": yes; "direct": no).
inline bool winograd_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("SLIMOPS_CPU_CONV");
    return v == nullptr || std::string_view(v) != "direct";
  }();
  return on;
}

// The geometry F(2x2, 3x3) computes here (stride 1, 3x3, padding 1, dilation 1, output the input's size, planes of
// at least 4 x 4), with enough channels that it is the faster path on this ISA. Measured (a microbenchmark of one
// sample's forward, C of 2C channels kept in and out, 32 samples rotating through memory, one thread, the Xeon with
// AVX-512 and AMX; the direct kernel's time over Winograd's, > 1: Winograd faster). With the row transforms and
// output rows vectorised by hand (wino_row, wino_store_row): as AVX2, C = 16 @ 28² 0.89, 24 @ 28² 1.15, 64 @ 28²
// 1.37; on AVX-512, where the direct kernel runs 1.6x faster, 32 @ 28² 0.92, 48 @ 28² 1.05, 64 @ 28² 1.06,
// 64 @ 56² 1.13, 128 @ 28² 1.20, 256 @ 14² 1.30, 512 @ 7² 1.26. (Before them, with auto-vectorised loops: as AVX2
// 32 @ 56² 1.20, 128 @ 28² 1.46, 256 @ 14² 1.66, 512 @ 7² 1.78; AVX-512 64 @ 28² 1.00, 128 @ 28² 1.14.) Hence at
// least 24 channels in and out with AVX2, a product of 48² with AVX-512 (the transforms cost (nc + nr) per tile,
// the products nc nr). Without AVX2 (the base copy) the direct path runs.
inline bool winograd_applies(const ConvGeom& g, int64_t nc, int64_t nr) {
  if (!winograd_enabled() || !small_mm_avx2()) return false;
  if (g.kh != 3 || g.kw != 3 || g.sh != 1 || g.sw != 1 || g.ph != 1 || g.pw != 1 || g.dh != 1 || g.dw != 1)
    return false;
  if (g.oh != g.h || g.ow != g.w || g.h < 4 || g.w < 4) return false;
  if (cpu_isa() == CpuIsa::kAvx512) return nc * nr >= 48 * 48;
  return nc >= 24 && nr >= 24;
}

// Whether a masked_conv2d sample that keeps `kept` of c_out rows (winograd_applies for all c_out) runs Winograd
// (its forward, and its grad_x): its products compute every row (a 6- or 8-row block of U's rows is the products'
// unit, and a sample's kept rows are scattered), so it pays where the rows dropped cost less than the multiplies
// saved. bench_channel_conv.py's masked_conv2d at 90% kept, 128 @ 28²: fwd x dense*mask 1.02 -> 1.32 as AVX2,
// 1.13 -> 1.33 on AVX-512; at 50% kept (direct) 1.72 as AVX2 (docs/channel_conv.md).
inline bool winograd_masked_sample(int64_t kept, int64_t c_out) {
  return 4 * kept >= 3 * c_out;
}

// U[xi][r][c] = (G g G^T)[xi] of the filter g = weight[rows[r]][chans[c]] (a 3x3 block of c_in * 9 floats per row).
// transposed: U[xi][c][r] of g rotated by 180 degrees instead: grad_x = the "same" conv of dy (channels r) with the
// flipped filters (outputs c).
template <typename scalar_t>
void winograd_pack_weights(const scalar_t* w, int64_t c_in, const int64_t* rows, int64_t nr, const int64_t* chans,
                           int64_t nc, float* u, bool transposed = false) {
  const int64_t plane = nr * nc;
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c) {
      const scalar_t* src = w + (rows[r] * c_in + chans[c]) * 9;
      scalar_t g[9];
      for (int t = 0; t < 9; ++t) g[t] = src[transposed ? 8 - t : t];
      float gg[4][3];  // G g: the rows of g combined
      for (int j = 0; j < 3; ++j) {
        const float g0 = static_cast<float>(g[j]), g1 = static_cast<float>(g[3 + j]), g2 = static_cast<float>(g[6 + j]);
        gg[0][j] = g0;
        gg[1][j] = 0.5f * (g0 + g1 + g2);
        gg[2][j] = 0.5f * (g0 - g1 + g2);
        gg[3][j] = g2;
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T: the columns combined
        const float a = gg[i][0], b = gg[i][1], d = gg[i][2];
        float* ui = u + (4 * i) * plane + (transposed ? c * nr + r : r * nc + c);
        ui[0] = a;
        ui[plane] = 0.5f * (a + b + d);
        ui[2 * plane] = 0.5f * (a - b + d);
        ui[3 * plane] = d;
      }
    }
}

// The transforms. The column and output transforms (loops over a chunk's tiles) are inlined into each ISA copy of the
// sample loop below; the row transform and the output rows have a copy per ISA of their own.

// h[j][t] (j = 0..3, t < tw) = the row transform of the input row x (w floats; the caller zeroes rows outside):
// a tile t covers columns 2t - 1 .. 2t + 2 (a, b, c, d; zero outside the row); h0 = a - c, h1 = b + c,
// h2 = c - b, h3 = b - d. Vectorised over the tiles: a vector of a (b) is the even (odd) lanes of the two vectors
// from column 2 t0 - 1, c and d those from 2 t0 + 1; columns outside the row load as zeros through the load masks
// (masked lanes never fault). A loop of scalar loads with stride 2 over one row (14 tiles at 28²) took ~16% of
// the AVX-512 copy's time at 64 @ 28².
// (A call per row, not inlined: the sample loop that calls it is compiled without the ISA's target until it is
// inlined into run_avx512 / run_avx2.)
template <bool kAvx512>
void wino_row(const float* __restrict x, int64_t w, int64_t tw, float* __restrict h0, float* __restrict h1,
              float* __restrict h2, float* __restrict h3);

// Lanes i of [q, q + n) inside [0, w), as a bit mask.
inline uint32_t wino_lanes(int64_t q, int64_t n, int64_t w) {
  const int64_t lo = std::max<int64_t>(0, -q), hi = std::min<int64_t>(n, w - q);
  if (hi <= lo) return 0;
  const uint32_t upto = hi >= 32 ? 0xffffffffu : (1u << hi) - 1u;
  return upto & ~((1u << lo) - 1u);
}

#if SLIMOPS_SMALL_MM_ISA_COPIES
template <>
__attribute__((target("avx512f"))) inline void wino_row<true>(
    const float* __restrict x, int64_t w, int64_t tw, float* __restrict h0, float* __restrict h1,
    float* __restrict h2, float* __restrict h3) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t t0 = 0; t0 < tw; t0 += 16) {
    const int64_t q = 2 * t0 - 1;  // column of a at t0; c's is q + 2
    // (no lambdas: GCC 12 compiles a lambda without its enclosing function's target)
    const __m512 l0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(wino_lanes(q, 16, w)), x + q);
    const __m512 l1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(wino_lanes(q + 16, 16, w)), x + q + 16);
    const __m512 r0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(wino_lanes(q + 2, 16, w)), x + q + 2);
    const __m512 r1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(wino_lanes(q + 18, 16, w)), x + q + 18);
    const __m512 a = _mm512_permutex2var_ps(l0, ev, l1), b = _mm512_permutex2var_ps(l0, od, l1);
    const __m512 c = _mm512_permutex2var_ps(r0, ev, r1), d = _mm512_permutex2var_ps(r0, od, r1);
    const __mmask16 st = static_cast<__mmask16>(wino_lanes(t0, 16, tw));
    _mm512_mask_storeu_ps(h0 + t0, st, _mm512_sub_ps(a, c));
    _mm512_mask_storeu_ps(h1 + t0, st, _mm512_add_ps(b, c));
    _mm512_mask_storeu_ps(h2 + t0, st, _mm512_sub_ps(c, b));
    _mm512_mask_storeu_ps(h3 + t0, st, _mm512_sub_ps(b, d));
  }
}

// AVX2 helpers of wino_row<false>: lanes i with 0 <= at + i < n as a vmaskmovps mask, and the even / odd lanes of
// (lo, hi) in order.
__attribute__((target("avx2"), always_inline)) inline __m256i wino_inside_avx2(int64_t at, int64_t n) {
  const __m256i i =
      _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(at)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), i),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), i));
}
__attribute__((target("avx2"), always_inline)) inline __m256 wino_even_avx2(__m256 lo, __m256 hi) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xd8));
}
__attribute__((target("avx2"), always_inline)) inline __m256 wino_odd_avx2(__m256 lo, __m256 hi) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xdd)), 0xd8));
}

template <>
__attribute__((target("avx2"))) inline void wino_row<false>(
    const float* __restrict x, int64_t w, int64_t tw, float* __restrict h0, float* __restrict h1,
    float* __restrict h2, float* __restrict h3) {
  for (int64_t t0 = 0; t0 < tw; t0 += 8) {
    const int64_t q = 2 * t0 - 1;
    const __m256 l0 = _mm256_maskload_ps(x + q, wino_inside_avx2(q, w));
    const __m256 l1 = _mm256_maskload_ps(x + q + 8, wino_inside_avx2(q + 8, w));
    const __m256 r0 = _mm256_maskload_ps(x + q + 2, wino_inside_avx2(q + 2, w));
    const __m256 r1 = _mm256_maskload_ps(x + q + 10, wino_inside_avx2(q + 10, w));
    const __m256 a = wino_even_avx2(l0, l1), b = wino_odd_avx2(l0, l1);
    const __m256 c = wino_even_avx2(r0, r1), d = wino_odd_avx2(r0, r1);
    const __m256i st = wino_inside_avx2(t0, tw);
    _mm256_maskstore_ps(h0 + t0, st, _mm256_sub_ps(a, c));
    _mm256_maskstore_ps(h1 + t0, st, _mm256_add_ps(b, c));
    _mm256_maskstore_ps(h2 + t0, st, _mm256_sub_ps(c, b));
    _mm256_maskstore_ps(h3 + t0, st, _mm256_sub_ps(b, d));
  }
}
#else
template <bool kAvx512>  // no ISA copies (winograd_applies is false): a portable loop, never run
inline void wino_row(const float* __restrict x, int64_t w, int64_t tw, float* __restrict h0, float* __restrict h1,
                     float* __restrict h2, float* __restrict h3) {
  const auto at = [&](int64_t q) { return q >= 0 && q < w ? x[q] : 0.f; };
  for (int64_t t = 0; t < tw; ++t) {
    const float a = at(2 * t - 1), b = at(2 * t), c = at(2 * t + 1), d = at(2 * t + 2);
    h0[t] = a - c, h1[t] = b + c, h2[t] = c - b, h3[t] = b - d;
  }
}
#endif

// V[xi][c][n] for the nt tiles n = (ty - ty0) tw + t of a chunk of channel c: the column transform of the row
// transforms, kept as he[j] (x rows 2q - 1) and ho[j] (x rows 2q) for q = ty0 .. ty1: tile row ty reads rows
// 2ty - 1 .. 2ty + 2, i.e. he[q], ho[q], he[q + 1], ho[q + 1], so one loop over n covers the chunk (offset tw).
__attribute__((always_inline)) inline void wino_col(float* const (&he)[4], float* const (&ho)[4], int64_t nt,
                                                    int64_t tw, float* v, int64_t vstride) {
  for (int j = 0; j < 4; ++j) {
    const float *__restrict e = he[j], *__restrict o = ho[j];
    float *__restrict v0 = v + j * vstride, *__restrict v1 = v + (4 + j) * vstride,
          *__restrict v2 = v + (8 + j) * vstride, *__restrict v3 = v + (12 + j) * vstride;
    #pragma GCC ivdep
    for (int64_t n = 0; n < nt; ++n) {
      const float r0 = e[n], r1 = o[n], r2 = e[n + tw], r3 = o[n + tw];
      v0[n] = r0 - r2;
      v1[n] = r1 + r2;
      v2[n] = r2 - r1;
      v3[n] = r1 - r3;
    }
  }
}

// The output transform of output channel r over a chunk's nt tiles, from its 16 M rows m[xi]: A^T along each
// tile's columns, then along its rows, plus the bias: z[k][n] (k = 2 i + j: the tile's pixel (i, j)).
__attribute__((always_inline)) inline void wino_out(const float* const (&m)[16], int64_t nt, float bias,
                                                    float* __restrict s, float* __restrict z, int64_t ld) {
  for (int i = 0; i < 4; ++i) {  // s[2 i + j]: the row i of the tile after A^T along the columns
    const float *__restrict a = m[4 * i], *__restrict b = m[4 * i + 1], *__restrict c = m[4 * i + 2],
                *__restrict d = m[4 * i + 3];
    float *__restrict s0 = s + (2 * i) * ld, *__restrict s1 = s + (2 * i + 1) * ld;
    #pragma GCC ivdep
    for (int64_t n = 0; n < nt; ++n) {
      s0[n] = a[n] + b[n] + c[n];
      s1[n] = b[n] - c[n] - d[n];
    }
  }
  for (int j = 0; j < 2; ++j) {
    const float *__restrict a = s + j * ld, *__restrict b = s + (2 + j) * ld, *__restrict c = s + (4 + j) * ld,
                *__restrict d = s + (6 + j) * ld;
    float *__restrict top = z + j * ld, *__restrict bot = z + (2 + j) * ld;
    #pragma GCC ivdep
    for (int64_t n = 0; n < nt; ++n) {
      top[n] = (a[n] + b[n] + c[n]) + bias;
      bot[n] = (b[n] - c[n] - d[n]) + bias;
    }
  }
}

// Output row y (w pixels) from a tile row's pixels (0, j) or (1, j) of tw tiles: the two columns of each tile
// interleaved (vector permutes, masked at the row's end; a call per output row, as wino_row).
template <bool kAvx512>
void wino_store_row(const float* __restrict z0, const float* __restrict z1, int64_t tw, int64_t w,
                    float* __restrict y);

#if SLIMOPS_SMALL_MM_ISA_COPIES
template <>
__attribute__((target("avx512f"))) inline void wino_store_row<true>(const float* __restrict z0,
                                                                   const float* __restrict z1, int64_t tw, int64_t w,
                                                                   float* __restrict y) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t t0 = 0; t0 < tw; t0 += 16) {
    const __mmask16 in = static_cast<__mmask16>(wino_lanes(t0, 16, tw));
    const __m512 a = _mm512_maskz_loadu_ps(in, z0 + t0), b = _mm512_maskz_loadu_ps(in, z1 + t0);
    _mm512_mask_storeu_ps(y + 2 * t0, static_cast<__mmask16>(wino_lanes(2 * t0, 16, w)),
                          _mm512_permutex2var_ps(a, lo, b));
    _mm512_mask_storeu_ps(y + 2 * t0 + 16, static_cast<__mmask16>(wino_lanes(2 * t0 + 16, 16, w)),
                          _mm512_permutex2var_ps(a, hi, b));
  }
}

template <>
__attribute__((target("avx2"))) inline void wino_store_row<false>(const float* __restrict z0,
                                                                 const float* __restrict z1, int64_t tw, int64_t w,
                                                                 float* __restrict y) {
  for (int64_t t0 = 0; t0 < tw; t0 += 8) {
    const __m256i in = wino_inside_avx2(t0, tw);
    const __m256 a = _mm256_maskload_ps(z0 + t0, in), b = _mm256_maskload_ps(z1 + t0, in);
    const __m256 l = _mm256_unpacklo_ps(a, b), h = _mm256_unpackhi_ps(a, b);
    _mm256_maskstore_ps(y + 2 * t0, wino_inside_avx2(2 * t0, w), _mm256_permute2f128_ps(l, h, 0x20));
    _mm256_maskstore_ps(y + 2 * t0 + 8, wino_inside_avx2(2 * t0 + 8, w), _mm256_permute2f128_ps(l, h, 0x31));
  }
}
#else
template <bool kAvx512>  // no ISA copies: never run
inline void wino_store_row(const float* __restrict z0, const float* __restrict z1, int64_t tw, int64_t w,
                           float* __restrict y) {
  for (int64_t q = 0; q < w; ++q) y[q] = q % 2 == 0 ? z0[q / 2] : z1[q / 2];
  (void)tw;
}
#endif

// One thread's buffers and the forward of one sample.
struct WinogradWork {
  std::vector<float> v, m, hbuf, s;

  // out[r] (h x w planes, r < nr; nullptr: not written) <- the conv of the nc planes in[c] (nullptr: a plane of
  // zeros) with U's nr rows (winograd_pack_weights), plus bias[r] (nr floats, or nullptr). Every row is computed:
  // masked_conv2d's samples that keep most rows write only those. The transforms are compiled for the ISA the
  // products run on.
  void run(const float* const* in, int64_t nc, const ConvGeom& g, const float* u, int64_t nr, const float* bias,
           float* const* out) {
#if SLIMOPS_SMALL_MM_ISA_COPIES
    if (cpu_isa() == CpuIsa::kAvx512) return run_avx512(in, nc, g, u, nr, bias, out);
    run_avx2(in, nc, g, u, nr, bias, out);
#else
    body<false>(in, nc, g, u, nr, bias, out);
#endif
  }

 private:
#if SLIMOPS_SMALL_MM_ISA_COPIES
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void run_avx512(
      const float* const* in, int64_t nc, const ConvGeom& g, const float* u, int64_t nr, const float* bias,
      float* const* out) {
    body<true>(in, nc, g, u, nr, bias, out);
  }
  __attribute__((target("avx2,fma"))) void run_avx2(const float* const* in, int64_t nc, const ConvGeom& g,
                                                     const float* u, int64_t nr, const float* bias,
                                                     float* const* out) {
    body<false>(in, nc, g, u, nr, bias, out);
  }
#endif

  template <bool kAvx512>
  __attribute__((always_inline)) inline void body(const float* const* in, int64_t nc, const ConvGeom& g,
                                                  const float* u, int64_t nr, const float* bias, float* const* out) {
    const int64_t h = g.h, w = g.w, th = (h + 1) / 2, tw = (w + 1) / 2;
    // Chunks of tile rows: V and M of a chunk (16 (nc + nr) floats per tile) within ~1 MiB, half a core's L2 here,
    // beside U (16 nr nc floats); the tile rows shared out evenly over the chunks.
    const int64_t per_tile = 16 * (nc + nr) * 4;
    const int64_t most = std::max<int64_t>(1, std::min(th, (int64_t{1} << 20) / (per_tile * tw)));
    const int64_t chunks = (th + most - 1) / most, rows_per_chunk = (th + chunks - 1) / chunks;
    const int64_t ld_max = (rows_per_chunk * tw + kMMCols - 1) / kMMCols * kMMCols;
    v.resize(static_cast<size_t>(16 * nc * ld_max));
    m.resize(static_cast<size_t>(16 * nr * ld_max));
    hbuf.resize(static_cast<size_t>(8 * (rows_per_chunk + 1) * tw));
    s.resize(static_cast<size_t>(12 * ld_max));
    float *he[4], *ho[4];
    for (int j = 0; j < 4; ++j)
      he[j] = hbuf.data() + j * (rows_per_chunk + 1) * tw, ho[j] = hbuf.data() + (4 + j) * (rows_per_chunk + 1) * tw;
    for (int64_t ty0 = 0; ty0 < th; ty0 += rows_per_chunk) {
      const int64_t ty1 = std::min(th, ty0 + rows_per_chunk), nt = (ty1 - ty0) * tw;
      const int64_t ld = (nt + kMMCols - 1) / kMMCols * kMMCols;
      // the columns past the chunk's tiles: zeros (they feed only M columns never read; never NaN or denormal)
      if (nt < ld)
        for (int64_t e = 0; e < 16 * nc; ++e) std::fill(v.data() + e * ld + nt, v.data() + (e + 1) * ld, 0.f);
      for (int64_t c = 0; c < nc; ++c) {
        const float* plane = in[c];
        if (plane == nullptr) {  // a channel of zeros (masked_conv2d's grad_x: a dropped row of dy)
          for (int e = 0; e < 16; ++e) std::fill_n(v.data() + (e * nc + c) * ld, nt, 0.f);
          continue;
        }
        for (int64_t q = ty0; q <= ty1; ++q)  // rows 2q - 1 (he) and 2q (ho), q = ty0 .. ty1
          for (int odd = 0; odd < 2; ++odd) {
            float* const* hh = odd ? ho : he;
            const int64_t o = (q - ty0) * tw, row = 2 * q - 1 + odd;
            if (row < 0 || row >= h)  // the padding's rows
              for (int j = 0; j < 4; ++j) std::fill_n(hh[j] + o, tw, 0.f);
            else
              wino_row<kAvx512>(plane + row * w, w, tw, hh[0] + o, hh[1] + o, hh[2] + o, hh[3] + o);
          }
        wino_col(he, ho, nt, tw, v.data() + c * ld, nc * ld);
      }
      for (int xi = 0; xi < 16; ++xi)
        small_mm<float>(nr, nc, ld, u + xi * nr * nc, nc, 1, v.data() + xi * nc * ld, ld, m.data() + xi * nr * ld, ld,
                        false);
      float* z = s.data() + 8 * ld;
      for (int64_t r = 0; r < nr; ++r) {
        if (out[r] == nullptr) continue;
        const float* mt[16];
        for (int xi = 0; xi < 16; ++xi) mt[xi] = m.data() + (xi * nr + r) * ld;
        wino_out(mt, nt, bias != nullptr ? bias[r] : 0.f, s.data(), z, ld);
        float* yr = out[r];
        for (int64_t ty = ty0; ty < ty1; ++ty) {
          const int64_t n0 = (ty - ty0) * tw;
          wino_store_row<kAvx512>(z + n0, z + ld + n0, tw, w, yr + 2 * ty * w);
          if (2 * ty + 1 < h)
            wino_store_row<kAvx512>(z + 2 * ld + n0, z + 3 * ld + n0, tw, w, yr + (2 * ty + 1) * w);
        }
      }
    }
  }
};

}  // namespace cpu
}  // namespace slimops
