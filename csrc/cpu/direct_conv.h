// Direct convolution microkernels (x86-64 AVX2 + FMA, and AVX-512; float32 accumulation) for the channel_conv
// family: the forward at any stride, grad_x as the transposed convolution at stride 1, and grad_w of 3x3 kernels.
//
// Why: im2col + GEMM writes the input 9x (3x3) and the GEMM packs it again; at the channel counts a
// slimmed layer keeps (16..128) that overhead costs ~30% against oneDNN's direct conv. Here one sample's
// kept input channels are copied once into a zero-padded float buffer (the gather, the padding and the
// bf16/fp16 conversion in one pass, L2-resident), and a register block of 6 output channels x one pixel block
// sums broadcast weights times unaligned input loads over channels and taps. Rows of the weight block are packed
// as [row block][channel][tap][6]. The pixel blocks are "flat" (below): they run across row ends.
//
// A float32 input at stride 1 (3x3 "same", 1x1) on planes that are not small skips the padded copy: the kernels
// read x's kept planes in place, with masked loads where the padding was (direct_unpadded.h).
//
// Two copies, compiled with target attributes (no global -mavx2) and picked by cpu_isa() (isa.h: what the CPU
// has, capped by SLIMOPS_CPU_ISA):
//   AVX2 + FMA   16 pixels per block (two 8-float vectors): 12 accumulators;
//   AVX-512      32 pixels (two 16-float vectors, 12 accumulators), two row blocks per call (direct_block_rows).
//                Measured on a Zen 5 EPYC (full-width AVX-512 FMAs), 2 threads: the forward of channel_conv2d at
//                50/50% went from 0.48x / 0.58x to 0.84-0.86x / 0.97-1.02x oneDNN's conv on the compacted tensors
//                (32x128->128 at 28x28 / 32x64->64 at 56x56; docs/channel_conv.md); oneDNN's conv runs AVX-512
//                there too.
// Until 2026-12-06's third session both copies also had row-by-row kernels (strided convolutions, and the AVX2
// copy at stride 1, with a 16-pixel AVX-512 variant for short rows); the phase split of DirectGeom made them unused.
// Every output pixel is one chain of FMAs over (channel, tap) in the same order in both copies, so they agree
// bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "slimops/channel_conv_checks.h"
#include "transpose16.h"
#include "transpose8.h"
#include "interleave.h"

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

// The direct kernels run "flat": the output pixels are taken in the order of the padded input, p = oy wp + ox, so
// that a pixel block runs on across row ends (the input of tap (i, j) for p is at p + off[t]: one unaligned load
// for the whole block, whatever row each lane is in); the lanes with ox >= ow (wp - ow per row: 1 for a 3x3 "same"
// conv since the rows share their padding, DirectGeom; 2 before) are computed and not stored. At a stride > 1 the
// input is split into phases first (DirectGeom). Against row by row, with 2 wasted lanes per row then: a 28-pixel
// row wasted 2 of 30 lanes instead of 4 of 32, a 14-pixel row 2 of 16 instead of 18 of 32, a 7-pixel row 2 of 9
// instead of 9 of 16. Measured (Zen 5, 2 threads, 32 x C/2 -> C/2 kept of C, 3x3, fwd, AVX-512):
// 28² x 128 385-392 -> 397-420 GFLOP/s, 56² x 64 342-361 -> 375-382, 14² x 256 285-289 -> 410-412, 7² x 512
// 147-149 -> 321-339. The AVX2 copy (since 2026-12-06's third session; as AVX2 on a Xeon, SLIMOPS_CPU_ISA=avx2,
// 2 threads, 32 samples, 3x3, bench/time_channel_conv_ops.py): channel_conv2d's forward at 90% of 128 @ 28²
// 39.5-39.6 -> 35.7-36.2 ms, at 50% 12.3-12.5 -> 11.5-11.6 ms. Strided (3x3, stride 2, 50% kept, 2 threads, Xeon,
// bench_channel_conv.py --stride 2, against im2col + GEMM): 128 @ 28² 4.07-4.10 -> 3.06-3.07 ms, 64 @ 56²
// 5.18 -> 4.04 ms; as AVX2 4.69 -> 4.30 and 5.95 -> 4.96 ms.

// Whether direct panels are packed in the AVX-512 kernel's paired blocks (direct_block_rows): the CPU's ISA decides,
// not the call's geometry (every geometry runs flat). The AVX2 copy does not pair: its 12 accumulators, two input
// vectors and a broadcast take 15 of its 16 registers.
inline bool direct_paired() {
  return cpu_isa() == CpuIsa::kAvx512;
}

// The padded input buffer of one sample: per channel, sh x sw phase planes (1 x 1 at stride 1) of hp x wp floats.
// The flat blocks' reads run on past a row's end into the next row, and past the last row into the buffer's slack
// (2 kPXMax floats at its end, after the `wrap` zeros: buffer_floats).
// At a stride (sh, sw) > 1 the padded input is split into phases, phase (r, s) holding the padded pixels
// (sh Y + r, sw X + s) at (Y, X): tap (i, j) of output (oy, ox) reads padded (sh oy + i dh, sw ox + j dw), which is
// (oy + (i dh) / sh, ox + (j dw) / sw) of phase ((i dh) % sh, (j dw) % sw). Every phase is read at stride 1, so the
// flat kernels run a strided convolution unchanged (only the tap offsets differ: direct_tap_offsets), where it took
// im2col + GEMM before. grad_w's direct kernel reads the same buffer through the same offsets.
// At stride 1 a row's right padding and the next row's left padding are one set of zeros (wp = w + pw, not
// w + 2 pw): the taps of a row's last outputs read on past wp into the next row's left padding, which is zero too;
// the last plane's reads past its end (`wrap` floats) hit zeros that pad_input writes after it. A 3x3 "same" conv on
// a 28-pixel row then computes 29 lanes per row instead of 30 (14: 15 for 16, 7: 8 for 9), in every kernel that reads
// the buffer (forward, grad_x, grad_w), with the same sums bit for bit. Measured (Xeon with AVX-512 and AMX,
// 2 threads, bench/time_channel_conv_ops.py --against the build before, per-round ratios, two runs): channel_conv2d
// 128 @ 28² fwd 0.93-0.98x the time at 90% / 50% kept, its backward 0.92-0.98x, masked_conv2d fwd and bwd
// 0.96-0.97x; 64 @ 56² 0.98-1.0x; as AVX2 0.96-0.98x at 28².
struct DirectGeom {
  int64_t hp, wp, phases_h, phases_w;
  int64_t wrap = 0;  // padded columns a row reads past wp (from the next row's left padding): at stride 1 only
  explicit DirectGeom(const ConvGeom& g) : phases_h(g.sh), phases_w(g.sw) {
    hp = (g.h + 2 * g.ph + phases_h - 1) / phases_h;
    if (phases_h * phases_w == 1) {
      wp = std::max(g.ow, g.w + g.pw);  // >= ow: an output row fits; >= w + pw: the wrapped reads land in padding
      wrap = g.w + 2 * g.pw - wp;
    } else {
      wp = (g.w + 2 * g.pw + phases_w - 1) / phases_w;
    }
  }
  int64_t phase_plane() const { return hp * wp; }
  int64_t plane() const { return phases_h * phases_w * hp * wp; }
  // Floats of the buffer of nc channels: the planes, the zeros read past the last one, and the flat blocks' slack.
  size_t buffer_floats(int64_t nc) const;
};

inline size_t DirectGeom::buffer_floats(int64_t nc) const {
  return static_cast<size_t>(nc * plane() + wrap + 2 * kPXMax);
}

// Whether a call can use the microkernel (then the caller packs a direct panel).
// A stride beyond the padded input's extent is left to im2col: its phases would be mostly padding (sh x sw planes of
// at least one row each).
inline bool direct_conv_applies(const ConvGeom& g, int64_t nc) {
  return direct_conv_available() && nc > 0 && g.sh <= g.h + 2 * g.ph && g.sw <= g.w + 2 * g.pw;
}

// off[i kw + j]: where tap (i, j) reads in a channel's planes, relative to the output pixel's position.
inline void direct_tap_offsets(const ConvGeom& g, const DirectGeom& d, int64_t* off) {
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t y = i * g.dh, x = j * g.dw;
      off[i * g.kw + j] = (y % d.phases_h * d.phases_w + x % d.phases_w) * d.phase_plane() + y / d.phases_h * d.wp +
                          x / d.phases_w;
    }
}

// How many rows the block starting at row r0 of nr takes.
// Unpaired (the AVX2 kernel, one block per call): 6, except that a remainder of 7..11 rows
// is split in two blocks of 4..6 (e.g. 8 = 4 + 4, not 6 + 2) so that no block runs with fewer than 4 accumulator
// pairs unless nr itself is smaller.
// Paired (the flat AVX-512 kernel, which runs two blocks per call: direct_conv_sample): nr > 6 rows go in
// p = ceil(nr / 12) pairs of blocks, the 2p blocks as even as they can be (sizes 3..6, the larger ones first), so
// that every block has a partner: 115 rows are 5 x (6 + 6) + 5 x (6 + 5) rather than 9 x (6 + 6), 4 and 3 alone, and
// 64 are 4 x (6 + 5) + 2 x (5 + 5) rather than 5 x (6 + 6) and 4 alone. A lone block of R rows makes one 64-byte
// load per R FMAs, a pair one per R + R2; on the Xeon with AMX, where those loads are the scarce resource beside
// the FMAs, the lone 4 and 3 took 7.4% of masked_conv2d's forward at 90% (115 of 128 rows) for 6% of its work.
inline int64_t direct_block_rows(int64_t r0, int64_t nr, bool paired) {
  const int64_t left = nr - r0;
  if (!paired) {
    if (left <= kRB) return left;
    if (left < 2 * kRB) return (left + 1) / 2;
    return kRB;
  }
  if (nr <= kRB) return left;
  const int64_t blocks = 2 * ((nr + 2 * kRB - 1) / (2 * kRB));
  const int64_t base = nr / blocks, extra = nr % blocks;  // the first `extra` blocks take base + 1 rows
  return r0 < extra * (base + 1) ? base + 1 : base;
}
// Floats of a direct panel: one [c][tap][kRB] slab per row block (at most ceil(nr / 6) + 1 blocks either way).
inline int64_t direct_panel_size(int64_t nr, int64_t nc, int64_t taps) {
  return ((nr + kRB - 1) / kRB + 1) * nc * taps * kRB;
}

// The direct panel layout: one [channel][tap][kRB] slab per block of panel rows (blocks from direct_block_rows),
// lanes past a block's rows zero; at(q, c, t) is the weight of panel row q, channel c, tap t. `paired`: the blocks
// of the flat kernel (direct_paired).
// Calls f(b, r0, nb) for the panel's row blocks in order: block b holds the nb rows from r0, its slab at b slabs.
template <typename F>
void for_panel_blocks(int64_t nrows, bool paired, F&& f) {
  for (int64_t r0 = 0, b = 0; r0 < nrows; ++b) {
    const int64_t nb = direct_block_rows(r0, nrows, paired);
    f(b, r0, nb);
    r0 += nb;
  }
}

template <typename At>
void pack_direct_panel(int64_t nrows, int64_t nchans, int64_t taps, const At& at, float* out, bool paired) {
  for_panel_blocks(nrows, paired, [&](int64_t b, int64_t r0, int64_t nb) {
    float* slab = out + b * nchans * taps * kRB;
    for (int64_t c = 0; c < nchans; ++c)
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t q = 0; q < kRB; ++q) slab[(c * taps + t) * kRB + q] = q < nb ? at(r0 + q, c, t) : 0.f;
  });
}

// weight[rows][:, chans] as a direct panel (the forward's). With every input channel in order (masked_conv2d, which
// packs each sample's kept rows), a panel row is one contiguous weight row, copied as such into its lane of the
// slab: the generic path's index arithmetic per float took 3.6% of masked_conv2d's forward (128 @ 28², 90% kept,
// as AVX2, perf).
template <typename scalar_t>
void pack_weight_direct(const scalar_t* w, int64_t c_in, int64_t taps, const int64_t* rows, int64_t nr,
                        const int64_t* chans, int64_t nc, float* out, bool paired) {
  bool all = nc == c_in;
  for (int64_t c = 0; all && c < nc; ++c) all = chans[c] == c;
  if (all) {
    const int64_t k = c_in * taps;  // a slab is [k][kRB]
    for_panel_blocks(nr, paired, [&](int64_t b, int64_t r0, int64_t nb) {
      float* slab = out + b * k * kRB;
      for (int64_t q = 0; q < kRB; ++q) {
        if (q >= nb) {
          for (int64_t i = 0; i < k; ++i) slab[i * kRB + q] = 0.f;
          continue;
        }
        const scalar_t* src = w + rows[r0 + q] * k;
        for (int64_t i = 0; i < k; ++i) slab[i * kRB + q] = static_cast<float>(src[i]);
      }
    });
    return;
  }
  pack_direct_panel(nr, nc, taps, [&](int64_t q, int64_t c, int64_t t) {
    return static_cast<float>(w[(rows[q] * c_in + chans[c]) * taps + t]);
  }, out, paired);
}

// Copies x_n's channels chans[0..nc) into the zero-padded buffer (converting to float; flat at a stride > 1, into
// its phases: DirectGeom).
template <typename scalar_t>
void pad_input(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g, const DirectGeom& d,
               float* xp) {
  if (d.phases_h * d.phases_w > 1) {
    const int64_t sh = d.phases_h, sw = d.phases_w, full = sw * d.wp;  // a padded row, in whole phase columns
    thread_local std::vector<float> tmp;
    if (sw == 2 && tmp.size() < static_cast<size_t>(full)) tmp.resize(static_cast<size_t>(full));
    for (int64_t c = 0; c < nc; ++c) {
      const scalar_t* src = xn + chans[c] * g.hw();
      for (int64_t py = 0; py < sh * d.hp; ++py) {  // padded row py is row py / sh of the phases (py % sh, *)
        float* row = xp + c * d.plane() + py % sh * sw * d.phase_plane() + py / sh * d.wp;  // phase (py % sh, 0)
        const int64_t y = py - g.ph;
        if (y < 0 || y >= g.h) {  // a padding row
          for (int64_t ps = 0; ps < sw; ++ps) std::fill_n(row + ps * d.phase_plane(), d.wp, 0.f);
          continue;
        }
        const scalar_t* sr = src + y * g.w;
        if (sw == 2) {  // the padded row, split into its even and odd columns (interleave.h)
          float* t = tmp.data();
          std::fill_n(t, g.pw, 0.f);
          for (int64_t x = 0; x < g.w; ++x) t[g.pw + x] = static_cast<float>(sr[x]);
          std::fill(t + g.pw + g.w, t + full, 0.f);
          unzip2(t, row, row + d.phase_plane(), full);
          continue;
        }
        for (int64_t ps = 0; ps < sw; ++ps)  // phase column ps: padded columns ps + sw k
          for (int64_t k = 0, x = ps - g.pw; k < d.wp; ++k, x += sw)
            row[ps * d.phase_plane() + k] = x >= 0 && x < g.w ? static_cast<float>(sr[x]) : 0.f;
      }
    }
    return;
  }
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
  std::fill_n(xp + nc * d.plane(), d.wrap, 0.f);  // the last plane's wrapped reads (the buffer may be reused)
}

#if SLIMOPS_DIRECT_CONV
// One register block of the AVX2 kernels: a[q][v] lane l = Σ_(c, t) panel[c][t][q] x_c[off[t] + 8 v + l] for the R
// rows q of one row block and 16 pixels, the input block starting at xc (channel planes `plane` apart).
template <int R, int TAPS>
__attribute__((target("avx2,fma"), always_inline)) inline void direct_block_avx2(
    const float* __restrict xc, int64_t nc, int64_t taps, const int64_t* __restrict off, int64_t plane,
    const float* __restrict panel, __m256 (&a)[R][2]) {
#pragma GCC unroll 6
  for (int q = 0; q < R; ++q) a[q][0] = _mm256_setzero_ps(), a[q][1] = _mm256_setzero_ps();
  const float* wt = panel;
  for (int64_t c = 0; c < nc; ++c, xc += plane) {
#pragma GCC unroll 25
    for (int64_t t = 0; t < (TAPS > 0 ? TAPS : taps); ++t, wt += kRB) {
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
}

// One register block of the AVX-512 kernels: a[q][v] lane l = Σ_(c, t) panel[c][t][q] x_c[off[t] + 16 v + l], the
// input block starting at xc (channel planes `plane` apart), summed in the order of direct_block_avx2. With R2 > 0
// the block also computes R2 rows of the next slab of the panel (rows R .. R + R2 - 1 of a, weights read at
// panel + nc taps kRB): R2 = 6 makes 24 accumulators, 2 input loads and 12 broadcasts per 24 FMAs, against 8 loads
// per 12 FMAs for one slab. Each row is still one chain over (channel, tap) in the same order, so pairing changes
// no result bit. Measured on a Xeon with AVX-512 and AMX: the flat loop alone (a microbenchmark, 64 channels, 28²)
// 138 -> 158-162 GFLOP/s per thread; channel_conv2d's forward at 50/50% on 32 x 128 -> 128, 28², 2 threads, four
// interleaved runs of bench_channel_conv.py each: 153-183 -> 166-204 GFLOP/s. Not measured on Zen 5 yet.
template <int R, int NV, int TAPS, int R2 = 0>
__attribute__((target("avx512f,fma"), always_inline)) inline void direct_block_avx512(
    const float* __restrict xc, int64_t nc, int64_t taps, const int64_t* __restrict off, int64_t plane,
    const float* __restrict panel, __m512 (&a)[R + R2][NV]) {
#pragma GCC unroll 12
  for (int q = 0; q < R + R2; ++q)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[q][v] = _mm512_setzero_ps();
  const float* wt = panel;
  const int64_t slab = nc * (TAPS > 0 ? TAPS : taps) * kRB;  // the next slab's distance (R2 > 0 only)
  for (int64_t c = 0; c < nc; ++c, xc += plane) {
#pragma GCC unroll 25
    for (int64_t t = 0; t < (TAPS > 0 ? TAPS : taps); ++t, wt += kRB) {
      const float* xx = xc + off[t];
      __m512 x[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) x[v] = _mm512_loadu_ps(xx + 16 * v);
#pragma GCC unroll 12
      for (int q = 0; q < R + R2; ++q) {
        const __m512 w = _mm512_set1_ps(q < R ? wt[q] : wt[slab + q - R]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) a[q][v] = _mm512_fmadd_ps(w, x[v], a[q][v]);
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

// 16-float vectors per block of the flat kernel: 2 (12 accumulators per slab); 3 (18) measured slower, 383 against
// 420 GFLOP/s (Zen 5).
constexpr int kFlatVectors = 2;

// The flat AVX-512 kernel: the flat positions [pa, pb) in blocks of 16 kFlatVectors (its caller cuts the positions
// into chunks, not rows);
// the same sums in the same order as direct_conv_flat_avx2. R2 > 0: also the R2 rows of the next slab (out[R ..]).
template <int R, int TAPS, int R2 = 0>
__attribute__((target("avx512f,fma"))) void direct_conv_flat_avx512(const float* __restrict xp, int64_t nc,
                                                                    int64_t taps_rt, const int64_t* __restrict off,
                                                                    int64_t pa, int64_t pb, int64_t ow, int64_t wp,
                                                                    int64_t plane, const float* __restrict panel,
                                                                    float* const* out) {
  static_assert(R >= 1 && R <= kRB && R2 >= 0 && R2 <= R, "row block");
  constexpr int NV = kFlatVectors;
  const int64_t taps = TAPS > 0 ? TAPS : taps_rt;
  for (int64_t p0 = pa; p0 < pb; p0 += 16 * NV) {
    __m512 a[R + R2][NV];
    direct_block_avx512<R, NV, TAPS, R2>(xp + p0, nc, taps, off, plane, panel, a);
    const int64_t n = std::min<int64_t>(16 * NV, pb - p0);
#pragma GCC unroll 12
    for (int q = 0; q < R + R2; ++q)
      for (int v = 0; v < NV && 16 * v < n; ++v)
        store_flat(out[q], a[q][v], p0 + 16 * v, std::min<int64_t>(16, n - 16 * v), ow, wp);
  }
}

// The AVX2 copy of store_flat: lanes [0, n) of v (n <= 8) hold the flat positions p0 + l.
__attribute__((target("avx2"))) inline void store_flat_avx2(float* out, __m256 v, int64_t p0, int64_t n, int64_t ow,
                                                            int64_t wp) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t oy = p0 / wp, ox = p0 - oy * wp;
  for (int64_t l = 0; l < n; ++oy, ox = 0) {
    const int64_t seg = std::min(n - l, wp - ox), valid = std::min(seg, ow - ox);
    if (valid > 0) {  // lanes l <= lane < l + valid
      const __m256i m = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(l) - 1)),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(l + valid)), lane));
      _mm256_maskstore_ps(out + oy * ow + ox - l, m, v);
    }
    l += seg;
  }
}

// The flat AVX2 kernel: direct_conv_flat_avx512's loop over direct_block_avx2 (16 pixels, R rows, no pairing); the
// same sums in the same order.
template <int R, int TAPS>
__attribute__((target("avx2,fma"))) void direct_conv_flat_avx2(const float* __restrict xp, int64_t nc,
                                                               int64_t taps_rt, const int64_t* __restrict off,
                                                               int64_t pa, int64_t pb, int64_t ow, int64_t wp,
                                                               int64_t plane, const float* __restrict panel,
                                                               float* const* out) {
  static_assert(R >= 1 && R <= kRB, "row block");
  const int64_t taps = TAPS > 0 ? TAPS : taps_rt;
  for (int64_t p0 = pa; p0 < pb; p0 += kPX) {
    __m256 a[R][2];
    direct_block_avx2<R, TAPS>(xp + p0, nc, taps, off, plane, panel, a);
    const int64_t n = std::min<int64_t>(kPX, pb - p0);
#pragma GCC unroll 6
    for (int q = 0; q < R; ++q) {
      store_flat_avx2(out[q], a[q][0], p0, std::min<int64_t>(8, n), ow, wp);
      if (n > 8) store_flat_avx2(out[q], a[q][1], p0 + 8, n - 8, ow, wp);
    }
  }
}

using DirectRowsFn = void (*)(const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, const float*, float* const*);

// The flat kernel of one ISA copy (AVX512: the AVX-512 one, else AVX2) for a lone block of `rows` (1..kRB) rows.
template <bool AVX512, int R, int TAPS>
constexpr DirectRowsFn direct_rows_fn() {
  if constexpr (AVX512) return &direct_conv_flat_avx512<R, TAPS>;
  else return &direct_conv_flat_avx2<R, TAPS>;
}

template <bool AVX512, int TAPS>
DirectRowsFn direct_rows_for(int64_t rows) {
  switch (rows) {
    case 6: return direct_rows_fn<AVX512, 6, TAPS>();
    case 5: return direct_rows_fn<AVX512, 5, TAPS>();
    case 4: return direct_rows_fn<AVX512, 4, TAPS>();
    case 3: return direct_rows_fn<AVX512, 3, TAPS>();
    case 2: return direct_rows_fn<AVX512, 2, TAPS>();
    default: return direct_rows_fn<AVX512, 1, TAPS>();
  }
}

template <bool AVX512>
DirectRowsFn direct_rows_isa(int64_t taps, int64_t rows) {
  return taps == 9 ? direct_rows_for<AVX512, 9>(rows) : taps == 1 ? direct_rows_for<AVX512, 1>(rows)
       : taps == 25 ? direct_rows_for<AVX512, 25>(rows) : direct_rows_for<AVX512, 0>(rows);
}

// The flat kernel for a block of `rows` rows paired with the next block's `rows2`: the pairs of direct_block_rows'
// paired blocks, (b + 1, b + 1), (b + 1, b) or (b, b) with b in 3..5.
template <int TAPS>
DirectRowsFn direct_flat_pair_for(int64_t rows, int64_t rows2) {
  switch (rows * 8 + rows2) {
    case 6 * 8 + 6: return &direct_conv_flat_avx512<6, TAPS, 6>;
    case 6 * 8 + 5: return &direct_conv_flat_avx512<6, TAPS, 5>;
    case 5 * 8 + 5: return &direct_conv_flat_avx512<5, TAPS, 5>;
    case 5 * 8 + 4: return &direct_conv_flat_avx512<5, TAPS, 4>;
    case 4 * 8 + 4: return &direct_conv_flat_avx512<4, TAPS, 4>;
    case 4 * 8 + 3: return &direct_conv_flat_avx512<4, TAPS, 3>;
    case 3 * 8 + 3: return &direct_conv_flat_avx512<3, TAPS, 3>;
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "direct_flat_pair: no kernel for blocks of ", rows, " and ", rows2, " rows");
  return nullptr;
}

inline DirectRowsFn direct_flat_pair(int64_t taps, int64_t rows, int64_t rows2) {
  return taps == 9 ? direct_flat_pair_for<9>(rows, rows2) : taps == 1 ? direct_flat_pair_for<1>(rows, rows2)
       : taps == 25 ? direct_flat_pair_for<25>(rows, rows2) : direct_flat_pair_for<0>(rows, rows2);
}

// The kernel of the CPU's ISA for a lone block of `rows` rows.
inline DirectRowsFn direct_rows_kernel(int64_t taps, int64_t rows) {
  return cpu_isa() == CpuIsa::kAvx512 ? direct_rows_isa<true>(taps, rows) : direct_rows_isa<false>(taps, rows);
}

#endif

#if SLIMOPS_DIRECT_CONV
// Cuts the flat positions [0, end) into bands and each band's nr panel rows into blocks (AVX-512: each block
// paired with the next one, direct_block_avx512's R2: half the loads per FMA), and calls
// f(pa, pb, r0, rows, rows2, slab, outs): positions [pa, pb), panel rows r0 .. r0 + rows + rows2 - 1, whose blocks
// start at `slab` in dpanel (slabs of slab_floats), and whose output rows are outs[0 ..] (out_rows[r], or
// res + r ld_res without out_rows). Bands (chunks of flat positions, multiples of 32): every row block of the band
// reuses the same input from L2 (about 128 KB of it per band), instead of sweeping the whole input once per row
// block.
template <class F>
void for_flat_bands(int64_t end, int64_t planes, int64_t reach, int64_t nr, const float* dpanel,
                    int64_t slab_floats, float* res, int64_t ld_res, float* const* out_rows, F&& f) {
  constexpr int64_t blk = 16 * kFlatVectors;
  const int64_t band = std::max<int64_t>(blk, ((32 * 1024) / std::max<int64_t>(1, planes) - reach) / blk * blk);
  const bool paired = direct_paired();
  for (int64_t pa = 0; pa < end; pa += band) {
    const int64_t pb = std::min(end, pa + band);
    for (int64_t r0 = 0, b = 0; r0 < nr;) {
      const int64_t nrows = direct_block_rows(r0, nr, paired);
      const int64_t nrows2 = paired && r0 + nrows < nr ? direct_block_rows(r0 + nrows, nr, true) : 0;
      float* outs[2 * kRB];
      for (int64_t q = 0; q < nrows + nrows2; ++q)
        outs[q] = out_rows != nullptr ? out_rows[r0 + q] : res + (r0 + q) * ld_res;
      f(pa, pb, r0, nrows, nrows2, dpanel + b * slab_floats, outs);
      r0 += nrows + nrows2;
      b += nrows2 > 0 ? 2 : 1;
    }
  }
}

// The flat kernels over the flat output positions [0, end) of one sample (row stride wp, ow stored per row): output
// row r (out_rows[r], or res + r ld_res without out_rows) <- Σ over the nc channels (planes `plane` apart in xbuf) and
// the taps (offsets off) of panel rows r. `reach`: how far past a position its taps read, in each of the `planes`
// planes the input spans (which sets the band width).
inline void direct_flat_bands(const float* xbuf, int64_t nc, int64_t taps, const int64_t* off, int64_t reach,
                              int64_t planes, int64_t end, int64_t ow, int64_t wp, int64_t plane,
                              const float* dpanel, int64_t nr, float* res, int64_t ld_res,
                              float* const* out_rows) {
  for_flat_bands(end, planes, reach, nr, dpanel, nc * taps * kRB, res, ld_res, out_rows,
                 [&](int64_t pa, int64_t pb, int64_t, int64_t nrows, int64_t nrows2, const float* slab,
                     float* const* outs) {
    const DirectRowsFn fn = nrows2 > 0 ? direct_flat_pair(taps, nrows, nrows2) : direct_rows_kernel(taps, nrows);
    fn(xbuf, nc, taps, off, pa, pb, ow, wp, plane, slab, outs);
  });
}
#endif

}  // namespace cpu
}  // namespace slimops

#include "direct_unpadded.h"  // the float forward read in place (needs the kernels and bands above)

namespace slimops {
namespace cpu {

// The forward of one sample through the microkernel (the copy of cpu_isa()): res rows r (float, oh*ow each, row
// stride ohw) = W rows r of the packed direct panel times the sample's kept channels, plus bias[r] when bias is
// given (nr floats: each sum rounded once with its bias, as a pass over the result would); with out_rows, row r
// goes to out_rows[r] instead. Returns false when the kernel does not apply (no AVX2/FMA), leaving the output
// untouched. xp_buf: the padded buffer, grown here only when the call uses it (a float input read in place does not).
template <typename scalar_t>
bool direct_conv_sample(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g,
                        const float* dpanel, int64_t nr, std::vector<float>& xp_buf, float* res,
                        float* const* out_rows = nullptr, const float* bias = nullptr) {
#if SLIMOPS_DIRECT_CONV
  if (!dpanel || !direct_conv_applies(g, nc)) return false;
  if constexpr (std::is_same_v<scalar_t, float>)  // these kernels add the bias as they store a block
    if (direct_conv_sample_unpadded(xn, chans, nc, g, dpanel, nr, res, out_rows, bias)) return true;
  const DirectGeom d(g);
  if (xp_buf.size() < d.buffer_floats(nc)) xp_buf.resize(d.buffer_floats(nc));
  pad_input<scalar_t>(xn, chans, nc, g, d, xp_buf.data());
  const int64_t taps = g.taps(), ohw = g.ohw();
  int64_t off[64];
  std::vector<int64_t> off_big;
  int64_t* offp = taps <= 64 ? off : (off_big.resize(static_cast<size_t>(taps)), off_big.data());
  direct_tap_offsets(g, d, offp);
  // `reach`: the input past a position that its taps read, in each phase plane.
  const int64_t reach = (g.kh - 1) * g.dh / d.phases_h * d.wp + (g.kw - 1) * g.dw / d.phases_w;
  const int64_t end = (g.oh - 1) * d.wp + g.ow;  // one past the last output pixel's flat position
  direct_flat_bands(xp_buf.data(), nc, taps, offp, reach, nc * d.phases_h * d.phases_w, end, g.ow, d.wp, d.plane(),
                    dpanel, nr, res, ohw, out_rows);
  for (int64_t r = 0; bias != nullptr && r < nr; ++r) {
    float* row = out_rows != nullptr ? out_rows[r] : res + r * ohw;
    for (int64_t p = 0; p < ohw; ++p) row[p] += bias[r];
  }
  return true;
#else
  (void)xn, (void)chans, (void)nc, (void)g, (void)dpanel, (void)nr, (void)xp_buf, (void)res, (void)out_rows,
      (void)bias;
  return false;
#endif
}

// ---- the input gradient as a direct convolution ---------------------------------------------------------------
// At stride 1, grad_x[c] = Σ_r Σ_(i,j) W[r, c, kh-1-i, kw-1-j] dy_pad[r][y + i dh, x + j dw], with dy zero-padded by
// (k-1) d - p: the transposed convolution is a stride-1 convolution of dy with the flipped, transposed kernel, which
// the same microkernel computes (no col2im, no GEMM). It needs p <= (k-1) d on both axes (true of every "same" or
// "valid" padding); a strided conv's runs by phases (direct_gx_strided.h); other calls keep im2col + GEMM.

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
                                   const int64_t* chans, int64_t nc, float* out, bool paired) {
  pack_direct_panel(nc, nr, taps, [&](int64_t q, int64_t r, int64_t t) {
    return static_cast<float>(w[(rows[r] * c_in + chans[q]) * taps + (taps - 1 - t)]);
  }, out, paired);
}

// The panel of the channels sel[0..nsel) of a direct panel `full` packed over all nchans channels (pack_direct_panel's
// layout: per row block, one [tap][kRB] piece per channel): per row block, the selected channels' pieces, in order.
// masked_conv2d's backward packs the transposed weight once per call and selects each sample's kept output rows
// (its channels) with one contiguous copy of taps x kRB floats each, where packing per sample read the weight
// 9 floats apart.
inline void select_panel_channels(const float* full, int64_t nrows, int64_t nchans, int64_t taps, const int64_t* sel,
                                  int64_t nsel, float* out, bool paired) {
  const int64_t piece = taps * kRB;
  for_panel_blocks(nrows, paired, [&](int64_t b, int64_t, int64_t) {
    const float* src = full + b * nchans * piece;
    float* dst = out + b * nsel * piece;
    for (int64_t i = 0; i < nsel; ++i) std::copy_n(src + sel[i] * piece, piece, dst + i * piece);
  });
}

// ---- the weight gradient of a 3x3 kernel, direct (AVX-512 and AVX2) ----------------------------------------------
// gw[r, c, (i, j)] += Σ_(oy, ox) dy[r][oy, ox] x_pad[c][oy sh + i dh, ox sw + j dw] (3x3), per sample, against the
// forward's padded buffer (pad_input; a strided conv's in phases, read at stride 1): no im2col and no GEMM.

// Planes narrower than kGwMinWidth go to im2col + GEMM: the kernel's fixed cost per (channel, row block) and plane
// (27 accumulators zeroed, stored, and moved into gw) is paid per plane, so small planes starve the FMAs. It was 14
// while that move was a scalar loop (direct 79 GFLOP/s at 7², 92 at 10², 131 at 12² against 164-171 for im2col at
// 12²). With the moves in registers (transpose16.h), bench/bench_conv_grad_w.py (Xeon with AVX-512 and AMX, 2 threads,
// 32 x 256 -> 256), direct with the threshold lowered / im2col + GEMM at the same size: 4²: 71 / 52-58, 7²: 192 /
// 119-120, 8²: 212 / 140-141, 10²: 230 / 159-160, 12²: 250 / 172-178 GFLOP/s. Below 4 px is not measured. Nor is
// any of this on Zen 5 (the earlier pixel-lane kernel lost to im2col + MKL there below 14²: 7²: 76 / 165). The AVX2
// copy, as AVX2 on the same Xeon (MKL capped too): 4²: 67 / 45, 7²: 112 / 90, 10²: 143 / 126, 14²: 159 / 148.
constexpr int64_t kGwMinWidth = 4;

// Any stride and dilation (the taps read through direct_tap_offsets; until 2026-12-06's third session only
// dilation 1 and horizontal stride 1).
inline bool direct_gw_applies(const ConvGeom& g) {
  return direct_conv_applies(g, 1) && g.kh == 3 && g.kw == 3 && g.ow >= kGwMinWidth;
}

#if SLIMOPS_DIRECT_CONV
// ---- the weight gradient of a 3x3 kernel, broadcast form (AVX-512) ---------------------------------------------
// gw[r, c, t] += Σ_(oy, ox) dyT[oy ow + ox][r] x_pad[c][oy sh + i, ox + j], t = 3 i + j: 16 V output rows r in the
// lanes of V vectors (dy transposed once per sample to [pixel][row], rows padded to 16 with zeros), one input pixel
// per tap broadcast from the forward's padded plane. Per output pixel: V dy loads and 9 broadcasts for 9 V FMAs,
// 27 accumulators at V = 3, each one chain over the pixels in order; no lane sums and no masks, and the plane's
// width no longer sets the lanes' use (the rows of the row block do).
// It replaced a kernel with the pixels in the lanes (commit 25170c9, direct_gw_rows3_avx512: per (channel, 3 dy
// rows), 27 accumulators of 16 pixels, 9 full-width tap loads at every offset, most of them split across two cache
// lines, then 27 lane sums). On a Xeon with AVX-512 and AMX, 2 threads, bench/bench_conv_grad_w.py: 28² x 128
// 145 -> 219-222 GFLOP/s, 56² x 64 148-152 -> 207-229, 14² x 256 111 -> 174-176, 20² x 256 102-104 -> 198-207 (the
// same rate as the pixel-lane kernel in a microbenchmark: 72-82 against 123 GFLOP/s per thread). Broadcasts are
// 4-byte loads, which that core issues beside the FMAs where it does not keep up with 64-byte ones. Both make 12
// loads per 27 FMAs, so a CPU with cheap 64-byte loads (Zen 5, where the old kernel made 319 GFLOP/s at 28² x 128)
// should lose nothing; that is not measured yet.
// dy rows are read kGwPrefetch pixels ahead. The hardware prefetcher follows dyT's [pixel][row] stride when it is
// 256 or 512 bytes (64 or 128 rows) and not at 384 or 576: in a microbenchmark (Xeon, 28², one thread) V = 3 went
// from 103-137 to 157-168 GFLOP/s at those strides with it, and V = 2 from 169-171 to 158-161 at 256 and 512.
constexpr int64_t kGwPrefetch = 4;
// The AVX2 copy reads dy rows 8 pixels ahead (its passes make 3 V FMAs per pixel, the AVX-512 one 9 V): on the Xeon
// as AVX2, 2 threads, 32 x 128 -> 128 at 28² / 64 -> 64 at 56²: 151 / 150 GFLOP/s without, 166 / 183 at 4 pixels,
// 169 / 184 at 8.
constexpr int64_t kGwPrefetchAvx2 = 8;

template <int V, bool UNIT>
__attribute__((target("avx512f,fma"))) void direct_gw_bcast_avx512(const float* __restrict dyt, int64_t nrp,
                                                                   const float* __restrict xc,
                                                                   const int64_t* __restrict off, int64_t oh,
                                                                   int64_t ow, int64_t row_step,
                                                                   float* __restrict sums) {
  __m512 a[9][V];
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) a[t][v] = _mm512_setzero_ps();
  for (int64_t oy = 0; oy < oh; ++oy) {
    const float* xt[9];  // tap t's input for output row oy: xt[t][ox]
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t)  // UNIT: off[t] = i wp + j, three row pointers and constant column offsets
      xt[t] = UNIT ? xc + oy * row_step + t / 3 * off[3] + t % 3 : xc + off[t] + oy * row_step;
    const float* d = dyt + oy * ow * nrp;
    for (int64_t ox = 0; ox < ow; ++ox, d += nrp) {
      __m512 dv[V];
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(d + kGwPrefetch * nrp + 16 * v), _MM_HINT_T0);
        dv[v] = _mm512_loadu_ps(d + 16 * v);
      }
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const __m512 xb = _mm512_set1_ps(xt[t][ox]);
#pragma GCC unroll 3
        for (int v = 0; v < V; ++v) a[t][v] = _mm512_fmadd_ps(xb, dv[v], a[t][v]);
      }
    }
  }
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(sums + (t * V + v) * 16, a[t][v]);
}

// The AVX2 copy (8 rows per vector, V <= 4): 27 accumulators do not fit its 16 registers, so the taps go in three
// passes over the plane, one per kernel row i, each with 3 V accumulators (12 at V = 4, with the three broadcasts
// and the dy vector: all 16 registers): per pixel V dy loads and 3 broadcasts for 3 V FMAs. Each accumulator is
// still one chain over the pixels in order from 0, so the sums are bit for bit the AVX-512 copy's. Earlier this
// copy ran im2col + GEMM, on the estimate that 9 accumulators would make one load per FMA (this layout makes 7
// per 12).
template <int V, bool UNIT>
__attribute__((target("avx2,fma"))) void direct_gw_bcast_avx2(const float* __restrict dyt, int64_t nrp,
                                                              const float* __restrict xc,
                                                              const int64_t* __restrict off, int64_t oh, int64_t ow,
                                                              int64_t row_step, float* __restrict sums) {
  for (int i = 0; i < 3; ++i) {
    __m256 a[3][V];
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) a[j][v] = _mm256_setzero_ps();
    for (int64_t oy = 0; oy < oh; ++oy) {
      const float* xr0 = xc + off[3 * i] + oy * row_step;  // taps (i, 0), (i, 1), (i, 2)
      const float* xr1 = UNIT ? xr0 + 1 : xc + off[3 * i + 1] + oy * row_step;
      const float* xr2 = UNIT ? xr0 + 2 : xc + off[3 * i + 2] + oy * row_step;
      const float* d = dyt + oy * ow * nrp;
      for (int64_t ox = 0; ox < ow; ++ox, d += nrp) {
        const __m256 x0 = _mm256_broadcast_ss(xr0 + ox), x1 = _mm256_broadcast_ss(xr1 + ox),
                     x2 = _mm256_broadcast_ss(xr2 + ox);
#pragma GCC unroll 2
        for (int v = 0; v < V; v += 2)
          _mm_prefetch(reinterpret_cast<const char*>(d + kGwPrefetchAvx2 * nrp + 8 * v), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          const __m256 dv = _mm256_loadu_ps(d + 8 * v);
          a[0][v] = _mm256_fmadd_ps(x0, dv, a[0][v]);
          a[1][v] = _mm256_fmadd_ps(x1, dv, a[1][v]);
          a[2][v] = _mm256_fmadd_ps(x2, dv, a[2][v]);
        }
      }
    }
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) _mm256_storeu_ps(sums + ((3 * i + j) * V + v) * 8, a[j][v]);
  }
}

// The two copies of the broadcast kernel and its moves, for direct_gw_bcast's loop: kLanes rows per vector, the
// vectors a row block takes when `left` rows are still to do, the kernel for v vectors, the transposes.
struct GwAvx512 {
  static constexpr int64_t kLanes = 16;
  // 3 (48 rows) while more than 64 are left, then the fewest 16-row vectors that hold the rest, with 64 as 32 + 32
  // (two 18-accumulator blocks run faster than 48 + a 9-accumulator block of 16).
  static int vectors(int64_t left) {
    if (left > 64) return 3;
    const int64_t v16 = (left + 15) / 16;
    return v16 == 4 ? 2 : static_cast<int>(v16);
  }
  template <bool UNIT>
  static void kernel(int v, const float* dyt, int64_t nrp, const float* xc, const int64_t* off, const ConvGeom& g,
                     int64_t wp, float* sums) {
    if (v == 3) direct_gw_bcast_avx512<3, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
    else if (v == 2) direct_gw_bcast_avx512<2, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
    else direct_gw_bcast_avx512<1, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
  }
  static void to_pixel_major(const float* dy, const int64_t* rows, int64_t nr, int64_t np, float* dyt, int64_t ld,
                             float* sums) {
    rows_to_pixel_major(dy, rows, nr, np, dyt, ld, sums);
  }
  static void add(const float* s, int64_t lds, int64_t nj, int64_t nrows, float* const* out) {
    add_transposed(s, lds, nj, nrows, out);
  }
};

struct GwAvx2 {
  static constexpr int64_t kLanes = 8;
  // 4 (32 rows) while more than 32 are left, then the fewest 8-row vectors that hold the rest.
  static int vectors(int64_t left) { return left > 32 ? 4 : static_cast<int>((left + 7) / 8); }
  template <bool UNIT>
  static void kernel(int v, const float* dyt, int64_t nrp, const float* xc, const int64_t* off, const ConvGeom& g,
                     int64_t wp, float* sums) {
    if (v == 4) direct_gw_bcast_avx2<4, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
    else if (v == 3) direct_gw_bcast_avx2<3, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
    else if (v == 2) direct_gw_bcast_avx2<2, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
    else direct_gw_bcast_avx2<1, UNIT>(dyt, nrp, xc, off, g.oh, g.ow, wp, sums);
  }
  static void to_pixel_major(const float* dy, const int64_t* rows, int64_t nr, int64_t np, float* dyt, int64_t ld,
                             float* sums) {
    rows_to_pixel_major_avx2(dy, rows, nr, np, dyt, ld, sums);
  }
  static void add(const float* s, int64_t lds, int64_t nj, int64_t nrows, float* const* out) {
    add_transposed_avx2(s, lds, nj, nrows, out);
  }
};

// Channels whose sums the broadcast kernel leaves in a scratch block before the transposes move them into gw:
// 16 channels x 9 taps = 144 columns, nine 16 x 16 transposes per 16 rows, 27 KB at 48 rows (L1).
constexpr int64_t kGwChanChunk = 16;

// gw (nr x nc * 9, row stride ldg) += the broadcast kernel's sums for dy (nr rows of ohw floats: row r at
// dy + (dy_rows ? dy_rows[r] : r) * ohw) against the padded planes xp (nc planes of d.plane()); with row_map, dy
// row r adds into gw row row_map[r]; with gb, gb[r] += the sum of dy row r. dyt_buf is scratch.
template <class Isa>
void direct_gw_bcast_isa(const float* dy, const int64_t* dy_rows, int64_t nr, const float* xp, int64_t nc,
                         const ConvGeom& g, const DirectGeom& d, std::vector<float>& dyt_buf, float* gw, int64_t ldg,
                         const int64_t* row_map, float* gb) {
  constexpr int64_t L = Isa::kLanes;
  const int64_t ohw = g.ohw(), nrp = (nr + L - 1) / L * L;
  const size_t need = static_cast<size_t>((ohw + std::max(kGwPrefetch, kGwPrefetchAvx2)) * nrp);  // the prefetches stay inside the buffer
  if (dyt_buf.size() < need) dyt_buf.resize(need);
  float* dyt = dyt_buf.data();
  Isa::to_pixel_major(dy, dy_rows, nr, ohw, dyt, nrp, gb);  // the padding rows zero
  int64_t off[9];  // tap t of output (oy, ox) reads x_c[off[t] + oy wp + ox] (the phases of a strided conv: DirectGeom)
  direct_tap_offsets(g, d, off);
  // Stride and dilation 1: the taps at i wp + j, which the kernels address from three row pointers (nine pointers
  // made 14² x 256 5% slower on the Xeon).
  const bool unit = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1;
  alignas(64) float sums[kGwChanChunk * 9 * 48];
  float* out[L];
  for (int64_t r0 = 0; r0 < nr;) {
    const int v = Isa::vectors(nr - r0);
    const int64_t rows = std::min<int64_t>(L * v, nr - r0);
    for (int64_t c0 = 0; c0 < nc; c0 += kGwChanChunk) {
      const int64_t c1 = std::min(nc, c0 + kGwChanChunk);
      for (int64_t c = c0; c < c1; ++c) {  // sums: per column (c, t), v vectors of L rows
        float* sc = sums + (c - c0) * 9 * L * v;
        if (unit) Isa::template kernel<true>(v, dyt + r0, nrp, xp + c * d.plane(), off, g, d.wp, sc);
        else Isa::template kernel<false>(v, dyt + r0, nrp, xp + c * d.plane(), off, g, d.wp, sc);
      }
      for (int64_t vq = 0; vq < v && L * vq < rows; ++vq) {
        const int64_t nq = std::min<int64_t>(L, rows - L * vq);
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t r = r0 + L * vq + q;
          out[q] = gw + (row_map != nullptr ? row_map[r] : r) * ldg + c0 * 9;
        }
        Isa::add(sums + L * vq, L * v, (c1 - c0) * 9, nq, out);
      }
    }
    r0 += rows;
  }
}

inline void direct_gw_bcast(const float* dy, const int64_t* dy_rows, int64_t nr, const float* xp, int64_t nc,
                            const ConvGeom& g, const DirectGeom& d, std::vector<float>& dyt_buf, float* gw,
                            int64_t ldg, const int64_t* row_map, float* gb) {
  if (cpu_isa() == CpuIsa::kAvx512) direct_gw_bcast_isa<GwAvx512>(dy, dy_rows, nr, xp, nc, g, d, dyt_buf, gw, ldg,
                                                                   row_map, gb);
  else direct_gw_bcast_isa<GwAvx2>(dy, dy_rows, nr, xp, nc, g, d, dyt_buf, gw, ldg, row_map, gb);
}

#endif

// One sample: gw (nr x nc * 9, row stride ldg) += dy (nr rows of oh * ow floats, row r at dy + (dy_rows ? dy_rows[r]
// : r) * oh * ow: grad_out's kept rows in place) against the sample's kept channels chans, padded into xp_buf
// (DirectGeom(g).buffer_floats(nc)); with row_map, dy row r adds into gw row row_map[r] (masked_conv2d:
// the sample's kept rows, straight into the full-size accumulator); with gb, gb[r] += the sum of dy row r (the bias
// gradient, taken while dy is transposed). False (nothing done) when it does not apply.
template <typename scalar_t>
bool direct_gw_sample(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g, const float* dy,
                      const int64_t* dy_rows, int64_t nr, float* xp_buf, std::vector<float>& dyt_buf, float* gw,
                      int64_t ldg, const int64_t* row_map, float* gb) {
#if SLIMOPS_DIRECT_CONV
  if (!direct_gw_applies(g) || nc == 0 || nr == 0) return false;
  const DirectGeom d(g);
  pad_input<scalar_t>(xn, chans, nc, g, d, xp_buf);
  direct_gw_bcast(dy, dy_rows, nr, xp_buf, nc, g, d, dyt_buf, gw, ldg, row_map, gb);
  return true;
#else
  (void)xn, (void)chans, (void)nc, (void)g, (void)dy, (void)dy_rows, (void)nr, (void)xp_buf, (void)dyt_buf, (void)gw,
      (void)ldg, (void)row_map, (void)gb;
  return false;
#endif
}

}  // namespace cpu
}  // namespace slimops
