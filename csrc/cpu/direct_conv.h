// Direct convolution microkernels (x86-64 AVX2 + FMA, and AVX-512; float32 accumulation) for the channel_conv
// family: the forward at horizontal stride 1, grad_x as the transposed convolution at stride 1, and (AVX-512)
// grad_w of 3x3 kernels.
//
// Why: im2col + GEMM writes the input 9x (3x3) and the GEMM packs it again; at the channel counts a
// slimmed layer keeps (16..128) that overhead costs ~30% against oneDNN's direct conv. Here one sample's
// kept input channels are copied once into a zero-padded float buffer (the gather, the padding and the
// bf16/fp16 conversion in one pass, L2-resident), and a register block of 6 output channels x one pixel block
// of one output row sums broadcast weights times unaligned input loads over channels and taps. Rows of the
// weight block are packed as [row block][channel][tap][6].
//
// Two copies, compiled with target attributes (no global -mavx2) and picked by cpu_isa() (isa.h: what the CPU
// has, capped by SLIMOPS_CPU_ISA):
//   AVX2 + FMA   16 pixels per block (two 8-float vectors): 12 accumulators;
//   AVX-512      32 pixels (two 16-float vectors, 12 accumulators); at stride 1 "flat" (direct_flat: blocks
//                run across row ends), else row by row, with 16 pixels (one vector, 6 accumulators) where a
//                row is short enough that 32-pixel blocks would mostly compute padding (direct_px). Measured on
//                a Zen 5 EPYC (full-width AVX-512 FMAs), 2 threads: the forward of channel_conv2d at 50/50% went
//                from 0.48x / 0.58x to 0.84-0.86x / 0.97-1.02x oneDNN's conv on the compacted tensors
//                (32x128->128 at 28x28 / 32x64->64 at 56x56; docs/channel_conv.md); oneDNN's conv runs AVX-512
//                there too.
// Every output pixel is one chain of FMAs over (channel, tap) in the same order in both copies, so they agree
// bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "slimops/channel_conv_checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SLIMOPS_DIRECT_CONV 1
#else
#define SLIMOPS_DIRECT_CONV 0
#endif

namespace slimops {
namespace cpu {

constexpr int64_t kRB = 6;       // output channels per register block
constexpr int64_t kPX = 16;      // output pixels per register block of the AVX2 copy (two 8-float vectors)
constexpr int64_t kPXMax = 32;   // the widest pixel block (AVX-512: two 16-float vectors)

inline bool direct_conv_available() {
#if SLIMOPS_DIRECT_CONV
  return static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2);  // isa.h: the CPU's, capped by SLIMOPS_CPU_ISA
#else
  return false;
#endif
}

// Output pixels per register block for rows of ow pixels: 16 (AVX2, and base: unused), on AVX-512 32 unless the
// 16-pixel kernel does more useful work per FMA: it runs 6 accumulator chains, ~3/4 of the FMA rate the 12
// chains of the 32-pixel kernel reach, so 32 wins unless its last block is mostly padding (ow = 14: 14 of 32
// lanes useful against 3/4 x 14 of 16).
inline int64_t direct_px(int64_t ow) {
  if (cpu_isa() != CpuIsa::kAvx512) return kPX;
  const int64_t b32 = (ow + 31) / 32 * 32, b16 = (ow + 15) / 16 * 16;
  return 4 * b16 <= 3 * b32 ? 16 : 32;  // useful fraction ow/b32 against (3/4) ow/b16
}

// Whether the AVX-512 copy runs "flat" (stride 1 both ways): the output pixels are taken in the order of the padded
// input, p = oy wp + ox, so that a 32-pixel block runs on across row ends (the input of tap (i, j) for p is at
// p + i dh wp + j dw: one unaligned load for all 32, whatever row each lane is in); the lanes with ox >= ow (wp - ow
// per row: 2 for a 3x3 "same" conv) are computed and not stored. A 28-pixel row wastes 2 of 30 lanes instead of 4 of
// 32, a 14-pixel row 2 of 16 instead of 18 of 32, a 7-pixel row 2 of 9 instead of 9 of 16. Measured (Zen 5, 2 threads,
// 32 x C/2 -> C/2 kept of C, 3x3, fwd): 28² x 128 385-392 -> 397-420 GFLOP/s, 56² x 64 342-361 -> 375-382,
// 14² x 256 285-289 -> 410-412, 7² x 512 147-149 -> 321-339.
inline bool direct_flat(const ConvGeom& g) {
  return cpu_isa() == CpuIsa::kAvx512 && g.sh == 1 && g.sw == 1;
}

// The padded input buffer of one sample: nc planes of hp x wp floats. Row-wise (not flat), wp leaves room for the
// last pixel block (px wide) to read past the row end (zeros) and is rounded to 8 floats; flat, wp is the padded
// width itself and the block reads run on into the next row (the buffer has 2 kPXMax floats of slack at its end).
struct DirectGeom {
  bool flat;
  int64_t px, hp, wp;  // px: the row-wise kernel's pixel block (flat: its block, kPXMax)
  explicit DirectGeom(const ConvGeom& g)
      : flat(direct_flat(g)), px(flat ? kPXMax : direct_px(g.ow)), hp(g.h + 2 * g.ph), wp(g.w + 2 * g.pw) {
    if (flat) return;  // wp = ow + (kw - 1) dw at stride 1
    const int64_t owb = (g.ow + px - 1) / px * px;
    wp = (std::max(wp, owb + (g.kw - 1) * g.dw) + 7) / 8 * 8;
  }
  int64_t plane() const { return hp * wp; }
};

// How many rows the block starting at row r0 of nr takes: 6, except that a remainder of 7..11 rows is split
// in two blocks of 4..6 (e.g. 8 = 4 + 4, not 6 + 2) so that no block runs with fewer than 4 accumulator
// pairs unless nr itself is smaller.
inline int64_t direct_block_rows(int64_t r0, int64_t nr) {
  const int64_t left = nr - r0;
  if (left <= kRB) return left;
  if (left < 2 * kRB) return (left + 1) / 2;
  return kRB;
}
// Floats of a direct panel: one [c][tap][kRB] slab per row block (at most ceil(nr / 6) + 1 blocks).
inline int64_t direct_panel_size(int64_t nr, int64_t nc, int64_t taps) {
  return ((nr + kRB - 1) / kRB + 1) * nc * taps * kRB;
}

// The direct panel layout: one [channel][tap][kRB] slab per block of panel rows (blocks from direct_block_rows),
// lanes past a block's rows zero; at(q, c, t) is the weight of panel row q, channel c, tap t.
template <typename At>
void pack_direct_panel(int64_t nrows, int64_t nchans, int64_t taps, const At& at, float* out) {
  for (int64_t r0 = 0, b = 0; r0 < nrows; ++b) {
    const int64_t nb = direct_block_rows(r0, nrows);
    float* slab = out + b * nchans * taps * kRB;
    for (int64_t c = 0; c < nchans; ++c)
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t q = 0; q < kRB; ++q) slab[(c * taps + t) * kRB + q] = q < nb ? at(r0 + q, c, t) : 0.f;
    r0 += nb;
  }
}

// weight[rows][:, chans] as a direct panel (the forward's).
template <typename scalar_t>
void pack_weight_direct(const scalar_t* w, int64_t c_in, int64_t taps, const int64_t* rows, int64_t nr,
                        const int64_t* chans, int64_t nc, float* out) {
  pack_direct_panel(nr, nc, taps, [&](int64_t q, int64_t c, int64_t t) {
    return static_cast<float>(w[(rows[q] * c_in + chans[c]) * taps + t]);
  }, out);
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
// out[q][oy * ow + ox] = sum_{c, t} panel[c][t][q] * xp[c][oy*sh*wp + ox + off[t]] for the R (<= kRB) rows q
// of one row block, off[t] = i*dh*wp + j*dw for tap t = (i, j); out[q] are float rows of oh*ow. R < kRB
// serves the last rows of a block list (32 rows = 4 x 6 + 2 x 4, not 6 x 6 with 4 wasted).
// TAPS > 0 fixes the tap count at compile time (1x1, 3x3, 5x5: the tap loop unrolls); 0 reads `taps`.
template <int R, int TAPS>
__attribute__((target("avx2,fma"))) void direct_conv_rows(const float* __restrict xp, int64_t nc, int64_t taps_rt,
                                                          const int64_t* __restrict off, int64_t oy0, int64_t oy1,
                                                          int64_t ow, int64_t row_step, int64_t plane,
                                                          const float* __restrict panel, float* const* out) {
  static_assert(R >= 1 && R <= kRB, "row block");
  const int64_t taps = TAPS > 0 ? TAPS : taps_rt;
  alignas(32) float tail[kPX];
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ox0 = 0; ox0 < ow; ox0 += kPX) {
      __m256 a[R][2];
      for (int q = 0; q < R; ++q) a[q][0] = _mm256_setzero_ps(), a[q][1] = _mm256_setzero_ps();
      const float* xc = xp + oy * row_step + ox0;
      const float* wt = panel;
      for (int64_t c = 0; c < nc; ++c, xc += plane) {
#pragma GCC unroll 25
        for (int64_t t = 0; t < taps; ++t, wt += kRB) {
          const float* xx = xc + off[t];
          const __m256 x0 = _mm256_loadu_ps(xx), x1 = _mm256_loadu_ps(xx + 8);
#pragma GCC unroll 6
          for (int q = 0; q < R; ++q) {
            const __m256 w = _mm256_broadcast_ss(wt + q);
            a[q][0] = _mm256_fmadd_ps(w, x0, a[q][0]);
            a[q][1] = _mm256_fmadd_ps(w, x1, a[q][1]);
          }
        }
      }
      const int64_t n = std::min(kPX, ow - ox0);
#pragma GCC unroll 6
      for (int q = 0; q < R; ++q) {
        float* dst = out[q] + oy * ow + ox0;
        if (n == kPX) {
          _mm256_storeu_ps(dst, a[q][0]);
          _mm256_storeu_ps(dst + 8, a[q][1]);
        } else {
          _mm256_store_ps(tail, a[q][0]);
          _mm256_store_ps(tail + 8, a[q][1]);
          std::copy(tail, tail + n, dst);
        }
      }
    }
  }
}

// One register block of the AVX-512 kernels: a[q][v] lane l = Σ_(c, t) panel[c][t][q] x_c[off[t] + 16 v + l], the
// input block starting at xc (channel planes `plane` apart), summed in the order of direct_conv_rows.
template <int R, int NV, int TAPS>
__attribute__((target("avx512f,fma"), always_inline)) inline void direct_block_avx512(
    const float* __restrict xc, int64_t nc, int64_t taps, const int64_t* __restrict off, int64_t plane,
    const float* __restrict panel, __m512 (&a)[R][NV]) {
  for (int q = 0; q < R; ++q)
    for (int v = 0; v < NV; ++v) a[q][v] = _mm512_setzero_ps();
  const float* wt = panel;
  for (int64_t c = 0; c < nc; ++c, xc += plane) {
#pragma GCC unroll 25
    for (int64_t t = 0; t < (TAPS > 0 ? TAPS : taps); ++t, wt += kRB) {
      const float* xx = xc + off[t];
      __m512 x[NV];
      for (int v = 0; v < NV; ++v) x[v] = _mm512_loadu_ps(xx + 16 * v);
#pragma GCC unroll 6
      for (int q = 0; q < R; ++q) {
        const __m512 w = _mm512_set1_ps(wt[q]);
        for (int v = 0; v < NV; ++v) a[q][v] = _mm512_fmadd_ps(w, x[v], a[q][v]);
      }
    }
  }
}

// The AVX-512 copy of direct_conv_rows: NV 16-float vectors per row (pixel blocks of 16 NV), the same sums in the
// same order; the last block of a row is stored under a lane mask.
template <int R, int NV, int TAPS>
__attribute__((target("avx512f,fma"))) void direct_conv_rows_avx512(const float* __restrict xp, int64_t nc,
                                                                    int64_t taps_rt, const int64_t* __restrict off,
                                                                    int64_t oy0, int64_t oy1, int64_t ow,
                                                                    int64_t row_step, int64_t plane,
                                                                    const float* __restrict panel, float* const* out) {
  static_assert(R >= 1 && R <= kRB && (NV == 1 || NV == 2), "row block");
  constexpr int64_t PX = 16 * NV;
  const int64_t taps = TAPS > 0 ? TAPS : taps_rt;
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ox0 = 0; ox0 < ow; ox0 += PX) {
      __m512 a[R][NV];
      direct_block_avx512<R, NV, TAPS>(xp + oy * row_step + ox0, nc, taps, off, plane, panel, a);
      const int64_t n = std::min(PX, ow - ox0);
#pragma GCC unroll 6
      for (int q = 0; q < R; ++q) {
        float* dst = out[q] + oy * ow + ox0;
        for (int v = 0; v < NV; ++v) {
          const int64_t left = n - 16 * v;
          if (left >= 16) _mm512_storeu_ps(dst + 16 * v, a[q][v]);
          else if (left > 0)
            _mm512_mask_storeu_ps(dst + 16 * v, static_cast<__mmask16>((1u << left) - 1u), a[q][v]);
        }
      }
    }
  }
}

// The lanes [0, n) of v hold the flat positions p0 + l (row p / wp, column p % wp); stores those with a column
// below ow to out (rows of ow), one masked store per row the lanes reach.
__attribute__((target("avx512f"))) inline void store_flat(float* out, __m512 v, int64_t p0, int64_t n, int64_t ow,
                                                          int64_t wp) {
  int64_t oy = p0 / wp, ox = p0 - oy * wp;
  for (int64_t l = 0; l < n; ++oy, ox = 0) {
    const int64_t seg = std::min(n - l, wp - ox), valid = std::min(seg, ow - ox);
    if (valid > 0)  // lanes [l, l + valid) to out[oy][ox ...]: the masked-off lanes before l are never written
      _mm512_mask_storeu_ps(out + oy * ow + ox - l, static_cast<__mmask16>(((1u << valid) - 1u) << l), v);
    l += seg;
  }
}

// 16-float vectors per block of the flat kernel: 2 (12 accumulators); 3 (18) measured slower, 383 against 420 GFLOP/s.
constexpr int kFlatVectors = 2;

// The flat AVX-512 kernel (direct_flat): the flat positions [pa, pb) in blocks of 16 kFlatVectors (its caller cuts
// the positions into chunks, not rows: the DirectRowsFn arguments oy0, oy1 are pa, pb here, and row_step is wp);
// the same sums in the same order as direct_conv_rows.
template <int R, int TAPS>
__attribute__((target("avx512f,fma"))) void direct_conv_flat_avx512(const float* __restrict xp, int64_t nc,
                                                                    int64_t taps_rt, const int64_t* __restrict off,
                                                                    int64_t pa, int64_t pb, int64_t ow, int64_t wp,
                                                                    int64_t plane, const float* __restrict panel,
                                                                    float* const* out) {
  static_assert(R >= 1 && R <= kRB, "row block");
  constexpr int NV = kFlatVectors;
  const int64_t taps = TAPS > 0 ? TAPS : taps_rt;
  for (int64_t p0 = pa; p0 < pb; p0 += 16 * NV) {
    __m512 a[R][NV];
    direct_block_avx512<R, NV, TAPS>(xp + p0, nc, taps, off, plane, panel, a);
    const int64_t n = std::min<int64_t>(16 * NV, pb - p0);
#pragma GCC unroll 6
    for (int q = 0; q < R; ++q)
      for (int v = 0; v < NV && 16 * v < n; ++v)
        store_flat(out[q], a[q][v], p0 + 16 * v, std::min<int64_t>(16, n - 16 * v), ow, wp);
  }
}

using DirectRowsFn = void (*)(const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, const float*, float* const*);

// The kernel for a block of `rows` (1..kRB) rows: AVX2 (K = 0), AVX-512 with K vectors per row (K = 1, 2), or the
// flat AVX-512 kernel (K = 3).
template <int K, int R, int TAPS>
constexpr DirectRowsFn direct_rows_fn() {
  if constexpr (K == 0) return &direct_conv_rows<R, TAPS>;
  else if constexpr (K == 3) return &direct_conv_flat_avx512<R, TAPS>;
  else return &direct_conv_rows_avx512<R, K, TAPS>;
}

template <int K, int TAPS>
DirectRowsFn direct_rows_for(int64_t rows) {
  switch (rows) {
    case 6: return direct_rows_fn<K, 6, TAPS>();
    case 5: return direct_rows_fn<K, 5, TAPS>();
    case 4: return direct_rows_fn<K, 4, TAPS>();
    case 3: return direct_rows_fn<K, 3, TAPS>();
    case 2: return direct_rows_fn<K, 2, TAPS>();
    default: return direct_rows_fn<K, 1, TAPS>();
  }
}

template <int K>
DirectRowsFn direct_rows_isa(int64_t taps, int64_t rows) {
  return taps == 9 ? direct_rows_for<K, 9>(rows) : taps == 1 ? direct_rows_for<K, 1>(rows)
       : taps == 25 ? direct_rows_for<K, 25>(rows) : direct_rows_for<K, 0>(rows);
}

// The kernel of a call's geometry (DirectGeom: flat, or the pixel block px: 16 on AVX2, 16 or 32 on AVX-512).
inline DirectRowsFn direct_rows_kernel(int64_t taps, int64_t rows, const DirectGeom& d) {
  if (cpu_isa() != CpuIsa::kAvx512) return direct_rows_isa<0>(taps, rows);
  if (d.flat) return direct_rows_isa<3>(taps, rows);
  return d.px == 32 ? direct_rows_isa<2>(taps, rows) : direct_rows_isa<1>(taps, rows);
}

#endif

// The forward of one sample through the microkernel (the copy of cpu_isa()): res rows r (float, oh*ow each, row
// stride ohw) = W rows r of the packed direct panel times the sample's kept channels; with out_rows, row r goes to
// out_rows[r] instead. Returns false when the kernel does not apply (no AVX2/FMA, or horizontal stride > 1), leaving
// the output untouched.
template <typename scalar_t>
bool direct_conv_sample(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g,
                        const float* dpanel, int64_t nr, float* xp_buf, float* res, float* const* out_rows = nullptr) {
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
  // Output rows in bands (flat: chunks of flat positions, multiples of 32): every row block of the band reuses the
  // same input rows from L1/L2, instead of sweeping the whole padded input once per row block. Row-wise, about 64 KB
  // of input per band; flat, 128 KB (L2), which lets a chunk run over several rows: with one-row bands a flat block
  // would still end at every row end.
  int64_t band, end;
  if (d.flat) {
    const int64_t reach = (g.kh - 1) * g.dh * d.wp + (g.kw - 1) * g.dw;  // input past a chunk that its taps read
    constexpr int64_t blk = 16 * kFlatVectors;
    band = std::max<int64_t>(blk, ((32 * 1024) / std::max<int64_t>(1, nc) - reach) / blk * blk);
    end = (g.oh - 1) * d.wp + g.ow;  // one past the last output pixel's flat position
  } else {
    band = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, nc * g.kh * d.wp));
    end = g.oh;
  }
  for (int64_t oy0 = 0; oy0 < end; oy0 += band) {
    const int64_t oy1 = std::min(end, oy0 + band);
    for (int64_t r0 = 0, b = 0; r0 < nr; ++b) {
      const int64_t nrows = direct_block_rows(r0, nr);
      float* rows[kRB];
      for (int64_t q = 0; q < nrows; ++q) rows[q] = out_rows != nullptr ? out_rows[r0 + q] : res + (r0 + q) * ohw;
      direct_rows_kernel(taps, nrows, d)(xp_buf, nc, taps, offp, oy0, oy1, g.ow, g.sh * d.wp, d.plane(),
                                         dpanel + b * nc * taps * kRB, rows);
      r0 += nrows;
    }
  }
  return true;
#else
  (void)xn, (void)chans, (void)nc, (void)g, (void)dpanel, (void)nr, (void)xp_buf, (void)res, (void)out_rows;
  return false;
#endif
}

// Whether a call can use the microkernel (then the caller packs a direct panel).
inline bool direct_conv_applies(const ConvGeom& g, int64_t nc) {
  return direct_conv_available() && g.sw == 1 && nc > 0;
}

// ---- the input gradient as a direct convolution ---------------------------------------------------------------
// At stride 1, grad_x[c] = Σ_r Σ_(i,j) W[r, c, kh-1-i, kw-1-j] dy_pad[r][y + i dh, x + j dw], with dy zero-padded by
// (k-1) d - p: the transposed convolution is a stride-1 convolution of dy with the flipped, transposed kernel, which
// the same microkernel computes (no col2im, no GEMM). It needs p <= (k-1) d on both axes (true of every "same" or
// "valid" padding); other calls keep im2col + GEMM.

inline bool transposed_direct_applies(const ConvGeom& g) {
  return direct_conv_available() && g.sh == 1 && g.sw == 1 && g.ph <= (g.kh - 1) * g.dh && g.pw <= (g.kw - 1) * g.dw;
}

// The geometry of that convolution: dy (oh x ow) in, grad_x (h x w) out, same kernel size and dilation.
inline ConvGeom transposed_geometry(const ConvGeom& g) {
  ConvGeom t = g;
  t.h = g.oh, t.w = g.ow, t.oh = g.h, t.ow = g.w;
  t.ph = (g.kh - 1) * g.dh - g.ph, t.pw = (g.kw - 1) * g.dw - g.pw;
  return t;
}

// weight[rows][:, chans] transposed and flipped as a direct panel: its rows are the input channels chans (grad_x's
// rows), its channels the output rows `rows` (dy's), tap t <- taps - 1 - t.
template <typename scalar_t>
void pack_weight_direct_transposed(const scalar_t* w, int64_t c_in, int64_t taps, const int64_t* rows, int64_t nr,
                                   const int64_t* chans, int64_t nc, float* out) {
  pack_direct_panel(nc, nr, taps, [&](int64_t q, int64_t r, int64_t t) {
    return static_cast<float>(w[(rows[r] * c_in + chans[q]) * taps + (taps - 1 - t)]);
  }, out);
}

// ---- the weight gradient of a 3x3 kernel, direct (AVX-512) -------------------------------------------------------
// gw[r, c, (i, j)] += Σ_(oy, ox) dy[r][oy, ox] x_pad[c][oy sh + i, ox + j] (3x3, dilation 1, stride sw = 1): per
// sample, per input channel c and block of 3 dy rows, 27 accumulators (3 rows x 9 taps) of 16 pixels swept over the
// output rows, then reduced (12 loads per 27 FMAs; 2 rows, 11 per 18, measured ~10% slower). The x plane is the
// forward's padded buffer (pad_input), read in place for every tap: no im2col and no GEMM. The accumulators are named
// variables (a macro per tap), not an array: GCC kept an array of them on the stack, one store per FMA. The last
// block of a row loads dy and x under a lane mask (zeros past the row: a padded x entry past the row can be a real
// pixel, whose inf or NaN must not meet a product with nothing).
// AVX-512 only: with 16 registers an AVX2 copy holds 9 accumulators and makes about one load per FMA, no faster
// than im2col + BLAS, which it keeps.

// Rows narrower than kGwMinWidth go to im2col + BLAS: a row of ow pixels fills ow / (16 ceil(ow / 16)) of the
// lanes, and the 27 reductions per (channel, 3 rows) are paid per plane, so small planes starve the FMAs. Measured
// (2 Zen 5 cores, 32 x 256 -> 256, GFLOP/s direct / im2col + MKL): 4²: 32 / 144, 7²: 76 / 165, 8²: 95 / 173,
// 10²: 136 / 189, 12²: 164 / 214, 14²: 222 / 216, 16²: 265 / 215, 28² (128 channels): 319 / 211.
constexpr int64_t kGwMinWidth = 14;

inline bool direct_gw_applies(const ConvGeom& g) {
  return cpu_isa() == CpuIsa::kAvx512 && g.kh == 3 && g.kw == 3 && g.dh == 1 && g.dw == 1 && g.sw == 1 &&
         g.ow >= kGwMinWidth;
}

#if SLIMOPS_DIRECT_CONV
#define SLIMOPS_GW_TAPS(X) \
  X(0, 0, 0) X(1, 0, 1) X(2, 0, 2) X(3, 1, 0) X(4, 1, 1) X(5, 1, 2) X(6, 2, 0) X(7, 2, 1) X(8, 2, 2)
#define SLIMOPS_GW_DECL(t, i, j) \
  __m512 a##t = _mm512_setzero_ps(), b##t = _mm512_setzero_ps(), c##t = _mm512_setzero_ps();
#define SLIMOPS_GW_STEP(t, i, j)                                              \
  {                                                                           \
    const __m512 xv = _mm512_maskz_loadu_ps(m, x##i + ox0 + j);               \
    a##t = _mm512_fmadd_ps(d0, xv, a##t);                                     \
    b##t = _mm512_fmadd_ps(d1, xv, b##t);                                     \
    c##t = _mm512_fmadd_ps(d2, xv, c##t);                                     \
  }

// The sums of the lanes of 16 vectors, in order, as one vector: a transpose-add tree (pairs of floats, pairs of
// doubles, then 128-bit lanes twice), 30 shuffles and 15 adds where 16 horizontal sums make about 128 operations.
// direct_gw_rows3_avx512 reduces 27 accumulators per (channel, 3 rows) and plane: on a 14 x 14 plane the horizontal
// sums were as many operations as a fifth of the FMAs.
__attribute__((target("avx512f"))) inline __m512 lane_sums16_avx512(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i (0+2), v2i+1 (0+2), v2i (1+3), v2i+1 (1+3)]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v4i .. v4i+3
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88), _mm512_shuffle_f32x4(c, d, 0xDD));
}

// g[0, 9) += s[0, 9) under a mask.
__attribute__((target("avx512f"))) inline void add9_avx512(float* g, const float* s) {
  constexpr __mmask16 m = 0x1FF;
  _mm512_mask_storeu_ps(g, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g), _mm512_maskz_loadu_ps(m, s)));
}

// Three dy rows r0, r1, r2 (oh * ow floats each) against the padded plane xc (row stride wp, rows sh apart): g0[t],
// g1[t], g2[t] (t = 3 i + j) += the sums. A last block of fewer rows repeats its last row, whose extra results go to
// scratch.
__attribute__((target("avx512f,fma"))) inline void direct_gw_rows3_avx512(
    const float* __restrict r0, const float* __restrict r1, const float* __restrict r2, const float* __restrict xc,
    int64_t oh, int64_t ow, int64_t sh, int64_t wp, float* g0, float* g1, float* g2) {
  SLIMOPS_GW_TAPS(SLIMOPS_GW_DECL)
  for (int64_t oy = 0; oy < oh; ++oy) {
    const float* x0 = xc + oy * sh * wp;
    const float *x1 = x0 + wp, *x2 = x1 + wp;
    const float *p0 = r0 + oy * ow, *p1 = r1 + oy * ow, *p2 = r2 + oy * ow;
    for (int64_t ox0 = 0; ox0 < ow; ox0 += 16) {
      const int64_t n = std::min<int64_t>(16, ow - ox0);
      const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1u);
      const __m512 d0 = _mm512_maskz_loadu_ps(m, p0 + ox0), d1 = _mm512_maskz_loadu_ps(m, p1 + ox0),
                   d2 = _mm512_maskz_loadu_ps(m, p2 + ox0);
      SLIMOPS_GW_TAPS(SLIMOPS_GW_STEP)
    }
  }
  const __m512 z = _mm512_setzero_ps();
  const __m512 v0[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, b0, b1, b2, b3, b4, b5, b6};
  const __m512 v1[16] = {b7, b8, c0, c1, c2, c3, c4, c5, c6, c7, c8, z, z, z, z, z};
  float s[32];
  _mm512_storeu_ps(s, lane_sums16_avx512(v0));
  _mm512_storeu_ps(s + 16, lane_sums16_avx512(v1));
  add9_avx512(g0, s);
  add9_avx512(g1, s + 9);
  add9_avx512(g2, s + 18);
}
#undef SLIMOPS_GW_STEP
#undef SLIMOPS_GW_DECL
#undef SLIMOPS_GW_TAPS
#endif

// One sample: gw (nr x nc * 9, row stride ldg) += dy (nr rows of oh * ow floats) against the sample's kept channels
// chans, padded into xp_buf (nc * DirectGeom(g).plane() + 2 kPXMax floats). False (nothing done) when it does not
// apply.
template <typename scalar_t>
bool direct_gw_sample(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g, const float* dy,
                      int64_t nr, float* xp_buf, float* gw, int64_t ldg) {
#if SLIMOPS_DIRECT_CONV
  if (!direct_gw_applies(g) || nc == 0 || nr == 0) return false;
  const DirectGeom d(g);
  pad_input<scalar_t>(xn, chans, nc, g, d, xp_buf);
  const int64_t ohw = g.ohw();
  float scratch[2][9];
  for (int64_t c = 0; c < nc; ++c) {
    const float* xc = xp_buf + c * d.plane();
    for (int64_t r = 0; r < nr; r += 3) {
      const int64_t k1 = std::min(r + 1, nr - 1), k2 = std::min(r + 2, nr - 1);
      direct_gw_rows3_avx512(dy + r * ohw, dy + k1 * ohw, dy + k2 * ohw, xc, g.oh, g.ow, g.sh, d.wp,
                             gw + r * ldg + c * 9, k1 > r ? gw + k1 * ldg + c * 9 : scratch[0],
                             k2 > k1 ? gw + k2 * ldg + c * 9 : scratch[1]);
    }
  }
  return true;
#else
  (void)xn, (void)chans, (void)nc, (void)g, (void)dy, (void)nr, (void)xp_buf, (void)gw, (void)ldg;
  return false;
#endif
}

}  // namespace cpu
}  // namespace slimops
