// Direct convolution microkernel (x86-64 AVX2 + FMA, float32 accumulation) for the forward pass of the
// channel_conv family at horizontal stride 1.
//
// Why: im2col + GEMM writes the input 9x (3x3) and the GEMM packs it again; at the channel counts a
// slimmed layer keeps (16..128) that overhead costs ~30% against oneDNN's direct conv. Here one sample's
// kept input channels are copied once into a zero-padded float buffer (the gather, the padding and the
// bf16/fp16 conversion in one pass, L2-resident), and a 6 x 16 register block (6 output channels x 16
// pixels of one output row: 12 accumulators) sums broadcast weights times unaligned input loads over
// channels and taps. Rows of the weight block are packed as [row block][channel][tap][6].
//
// Compiled with a target attribute (no global -mavx2) and used only when the CPU reports AVX2 and FMA.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "slimops/channel_conv_checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SLIMOPS_DIRECT_CONV 1
#else
#define SLIMOPS_DIRECT_CONV 0
#endif

namespace slimops {
namespace cpu {

constexpr int64_t kRB = 6;   // output channels per register block
constexpr int64_t kPX = 16;  // output pixels per register block (two 8-float vectors)

inline bool direct_conv_available() {
#if SLIMOPS_DIRECT_CONV
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// The padded input buffer of one sample: nc planes of hp x wp floats. wp leaves room for the last
// 16-pixel block to read past the row end (zeros) and is rounded to 8 floats.
struct DirectGeom {
  int64_t hp, wp;
  explicit DirectGeom(const ConvGeom& g) {
    hp = g.h + 2 * g.ph;
    const int64_t ow16 = (g.ow + kPX - 1) / kPX * kPX;
    wp = std::max(g.w + 2 * g.pw, ow16 + (g.kw - 1) * g.dw);
    wp = (wp + 7) / 8 * 8;
  }
  int64_t plane() const { return hp * wp; }
};

// weight[rows][:, chans] as [rb][c][tap][kRB] floats, rows padded with zeros to a multiple of kRB.
template <typename scalar_t>
void pack_weight_direct(const scalar_t* w, int64_t c_in, int64_t taps, const int64_t* rows, int64_t nr,
                        const int64_t* chans, int64_t nc, float* out) {
  const int64_t nrb = (nr + kRB - 1) / kRB;
  for (int64_t rb = 0; rb < nrb; ++rb)
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t q = 0; q < kRB; ++q) {
          const int64_t r = rb * kRB + q;
          out[((rb * nc + c) * taps + t) * kRB + q] =
              r < nr ? static_cast<float>(w[(rows[r] * c_in + chans[c]) * taps + t]) : 0.f;
        }
}

// Copies x_n's channels chans[0..nc) into the zero-padded buffer (converting to float).
template <typename scalar_t>
void pad_input(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g, const DirectGeom& d,
               float* xp) {
  for (int64_t c = 0; c < nc; ++c) {
    float* p = xp + c * d.plane();
    const scalar_t* src = xn + chans[c] * g.hw();
    std::fill(p, p + g.ph * d.wp, 0.f);
    for (int64_t y = 0; y < g.h; ++y) {
      float* row = p + (y + g.ph) * d.wp;
      std::fill(row, row + g.pw, 0.f);
      const scalar_t* s = src + y * g.w;
      for (int64_t x = 0; x < g.w; ++x) row[g.pw + x] = static_cast<float>(s[x]);
      std::fill(row + g.pw + g.w, row + d.wp, 0.f);
    }
    std::fill(p + (g.ph + g.h) * d.wp, p + d.plane(), 0.f);
  }
}

#if SLIMOPS_DIRECT_CONV
// out[q][oy * ow + ox] = sum_{c, t} panel[c][t][q] * xp[c][oy*sh*wp + ox + off[t]] for the nrows (<= kRB)
// rows q of one row block, off[t] = i*dh*wp + j*dw for tap t = (i, j); out[q] are float rows of oh*ow.
// TAPS > 0 fixes the tap count at compile time (1x1, 3x3, 5x5: the tap loop unrolls); 0 reads `taps`.
template <int TAPS>
__attribute__((target("avx2,fma"))) void direct_conv_rows(const float* __restrict xp, int64_t nc, int64_t taps_rt,
                                                          const int64_t* __restrict off, int64_t oy0, int64_t oy1,
                                                          int64_t ow,
                                                          int64_t row_step, int64_t plane,
                                                          const float* __restrict panel, float* const* out,
                                                          int64_t nrows) {
  const int64_t taps = TAPS > 0 ? TAPS : taps_rt;
  alignas(32) float tail[kRB][kPX];
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ox0 = 0; ox0 < ow; ox0 += kPX) {
      __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(),
             a11 = _mm256_setzero_ps(), a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps(),
             a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps(), a40 = _mm256_setzero_ps(),
             a41 = _mm256_setzero_ps(), a50 = _mm256_setzero_ps(), a51 = _mm256_setzero_ps();
      const float* xc = xp + oy * row_step + ox0;
      const float* wt = panel;
      for (int64_t c = 0; c < nc; ++c, xc += plane) {
#pragma GCC unroll 25
        for (int64_t t = 0; t < taps; ++t, wt += kRB) {
          const float* xx = xc + off[t];
          const __m256 x0 = _mm256_loadu_ps(xx), x1 = _mm256_loadu_ps(xx + 8);
          __m256 w = _mm256_broadcast_ss(wt + 0);
          a00 = _mm256_fmadd_ps(w, x0, a00), a01 = _mm256_fmadd_ps(w, x1, a01);
          w = _mm256_broadcast_ss(wt + 1);
          a10 = _mm256_fmadd_ps(w, x0, a10), a11 = _mm256_fmadd_ps(w, x1, a11);
          w = _mm256_broadcast_ss(wt + 2);
          a20 = _mm256_fmadd_ps(w, x0, a20), a21 = _mm256_fmadd_ps(w, x1, a21);
          w = _mm256_broadcast_ss(wt + 3);
          a30 = _mm256_fmadd_ps(w, x0, a30), a31 = _mm256_fmadd_ps(w, x1, a31);
          w = _mm256_broadcast_ss(wt + 4);
          a40 = _mm256_fmadd_ps(w, x0, a40), a41 = _mm256_fmadd_ps(w, x1, a41);
          w = _mm256_broadcast_ss(wt + 5);
          a50 = _mm256_fmadd_ps(w, x0, a50), a51 = _mm256_fmadd_ps(w, x1, a51);
        }
      }
      const __m256 acc[kRB][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
      const int64_t n = std::min(kPX, ow - ox0);
      for (int64_t q = 0; q < nrows; ++q) {
        float* dst = out[q] + oy * ow + ox0;
        if (n == kPX) {
          _mm256_storeu_ps(dst, acc[q][0]);
          _mm256_storeu_ps(dst + 8, acc[q][1]);
        } else {
          _mm256_store_ps(tail[q], acc[q][0]);
          _mm256_store_ps(tail[q] + 8, acc[q][1]);
          std::copy(tail[q], tail[q] + n, dst);
        }
      }
    }
  }
}
#endif

// The forward of one sample through the microkernel: res rows r (float, oh*ow each, row stride ohw)
// = W rows r of the packed direct panel times the sample's kept channels. Returns false when the
// kernel does not apply (no AVX2/FMA, or horizontal stride > 1), leaving res untouched.
template <typename scalar_t>
bool direct_conv_sample(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g,
                        const float* dpanel, int64_t nr, float* xp_buf, float* res) {
#if SLIMOPS_DIRECT_CONV
  if (!dpanel || g.sw != 1 || nc == 0 || !direct_conv_available()) return false;
  const DirectGeom d(g);
  pad_input<scalar_t>(xn, chans, nc, g, d, xp_buf);
  const int64_t taps = g.taps(), ohw = g.ohw();
  int64_t off[64];
  std::vector<int64_t> off_big;
  int64_t* offp = taps <= 64 ? off : (off_big.resize(static_cast<size_t>(taps)), off_big.data());
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) offp[i * g.kw + j] = i * g.dh * d.wp + j * g.dw;
  auto kernel = taps == 9 ? &direct_conv_rows<9> : taps == 1 ? &direct_conv_rows<1>
              : taps == 25 ? &direct_conv_rows<25> : &direct_conv_rows<0>;
  // Output rows in bands: every row block of the band reuses the same input rows from L1/L2, instead of
  // sweeping the whole padded input once per row block.
  const int64_t band = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, nc * g.kh * d.wp));
  for (int64_t oy0 = 0; oy0 < g.oh; oy0 += band) {
    const int64_t oy1 = std::min(g.oh, oy0 + band);
    for (int64_t rb = 0; rb * kRB < nr; ++rb) {
      float* rows[kRB];
      const int64_t nrows = std::min(kRB, nr - rb * kRB);
      for (int64_t q = 0; q < nrows; ++q) rows[q] = res + (rb * kRB + q) * ohw;
      kernel(xp_buf, nc, taps, offp, oy0, oy1, g.ow, g.sh * d.wp, d.plane(), dpanel + rb * nc * taps * kRB, rows,
             nrows);
    }
  }
  return true;
#else
  (void)xn, (void)chans, (void)nc, (void)g, (void)dpanel, (void)nr, (void)xp_buf, (void)res;
  return false;
#endif
}

// Whether a call can use the microkernel (then the caller packs a direct panel).
inline bool direct_conv_applies(const ConvGeom& g, int64_t nc) {
  return direct_conv_available() && g.sw == 1 && nc > 0;
}

}  // namespace cpu
}  // namespace slimops
