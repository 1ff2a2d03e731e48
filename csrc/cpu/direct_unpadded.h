// The direct forward without the padded buffer: float32 input, stride 1, 3x3 "same" (padding 1, dilation 1) or
// 1x1 (no padding), the geometries of nearly every conv a slimmed VGG or ResNet keeps.
//
// Why: pad_input copies each kept plane of a sample into a zero-padded float buffer before the flat kernels read it
// (direct_conv.h). For a float input whose output has the input's shape the kernels can read x's kept planes where
// they lie: the flat position p = oy w + ox of an output pixel is then its own offset in the output plane (no lane
// computed and dropped: 784 lanes for a 28² plane, not 816, and whole-vector stores), and tap (i, j) of a 3x3 reads
// p + (i - 1) w + (j - 1). The reads that the padding served are masked to zero instead: for j = 0 the lanes at
// column 0 and for j = 2 the lanes at column w - 1 (their reads wrap into the next or previous row), and, in the few
// blocks whose reads reach past the plane's first or last row ("border" blocks), every lane whose read falls outside
// the plane. A masked lane adds weight x 0, as the padded buffer's zeros did: the same sums in the same order, bit
// for bit (tests/test_channel_conv_unpadded.py). AVX-512's masked loads never fault on a masked-off lane; they are
// not free either (masking the FMAs instead measured about 3% faster at 28² in a microbenchmark, but GCC 12 compiles
// merge-masked FMAs into mask copies and a spill: docs/channel_conv.md); the AVX2 copy ANDs its column masks into the
// loads (interior blocks read only inside the plane) and uses vmaskmovps in border blocks.
// The kernels also prefetch the next band of x's planes into L2 while they compute one (direct_conv_sample_unpadded):
// without it, reading in place from memory ran 4% slower than the padded copy at 128 @ 28². And they request the
// output lines of a block ahead for writing (prefetch_for_write): 0.974-0.999 of the forward's time, median 0.99,
// all 12 ratios below 1 (channel_conv2d and masked_conv2d at the three shapes of bench/time_channel_conv_ops.py
// --against the build before, as AVX2 and on AVX-512, with the tool's rounds paired by who goes first). Small, steady.
//
// Measured on the Xeon with AVX-512 and AMX, 2 threads, against the build before (bench/time_channel_conv_ops.py
// --against, median per-round ratio of 11 rounds; < 1: faster): channel_conv2d's forward 0.963 / 0.944 / 0.955 of
// the time (128 @ 28² 90% / 50%, 64 @ 56² 50%), masked_conv2d's 0.967 / 0.969 / 0.938, the backwards (grad_x is
// the same kind of conv of dy) 0.92-0.99, one 1.035; as AVX2 (bench/as_isa.py avx2) 0.97-1.01 and 0.95-1.01.
// A 1x1 conv of 256 @ 28² 0.66-0.72. Small planes keep the padded buffer (unpadded_applies).
#pragma once

#include <array>

#if SLIMOPS_DIRECT_CONV

namespace slimops {
namespace cpu {

// Whether the forward of a sample can read x in place (the caller also needs a float input): the geometry, and
// enough interior blocks. A border block (its reads reach past the plane's first or last row) loads through a mask
// per tap, which costs load slots the interior blocks do not pay; on small planes they are most blocks and the
// padded buffer wins. Measured (a microbenchmark of one sample's forward, C kept of 2C channels, 32 samples
// rotating through memory, one thread, Xeon with AVX-512 and AMX; GFLOP/s padded -> in place), AVX-512 (32-lane
// blocks): 128 @ 28² (88% of the blocks interior) 181-185 -> 192-195, 128 @ 20² (77%) 164 -> 174-176, 64 @ 24²
// (89%) 164-174 -> 176-178, 128 @ 17² (70%) 166-174 -> 168-169, 256 @ 14² (57%) 157-168 -> 157-160, 512 @ 7² (0%)
// 145-157 -> 138-143; as AVX2 (16-lane blocks): 128 @ 28² (92%) 106 -> 108, 256 @ 14² (77%) 99-100 -> 100-102,
// 128 @ 17² (74%) 100 -> 96-104, 512 @ 7² (14%) 89-90 -> 84. Hence: at least 3 / 4 of the blocks interior.
inline bool unpadded_applies(const ConvGeom& g) {
  if (g.sh != 1 || g.sw != 1 || !direct_conv_available()) return false;
  const bool k3 = g.kh == 3 && g.kw == 3 && g.ph == 1 && g.pw == 1 && g.dh == 1 && g.dw == 1;
  const bool k1 = g.kh == 1 && g.kw == 1 && g.ph == 0 && g.pw == 0;
  if (!(k3 || k1) || g.oh != g.h || g.ow != g.w || g.h <= 0 || g.w <= 0) return false;
  const int64_t blk = cpu_isa() == CpuIsa::kAvx512 ? 32 : 16, hw = g.hw(), reach = g.kh / 2 * (g.w + 1);
  const int64_t blocks = (hw + blk - 1) / blk;
  const int64_t first = (reach + blk - 1) / blk, last = (hw - reach - blk) >= 0 ? (hw - reach - blk) / blk : -1;
  return 4 * std::max<int64_t>(0, last - first + 1) >= 3 * blocks;  // interior blocks: first .. last
}

// unpadded_applies where the build has the kernels (python_module.cpp's cpu_conv_in_place), false elsewhere.
inline bool direct_conv_in_place(const ConvGeom& g) {
  return unpadded_applies(g);
}

// The load masks of one sample's geometry, per 16-lane vector k of the flat positions (p = 16 k + l, bit l):
// col[k KS + j]: the lanes whose column p % w + j - KS / 2 lies in [0, w); tap[k KS² + t]: those whose tap t
// = (i, j) also reads inside the plane (0 <= p + off[t] < hw). The AVX2 copy takes 8 bits at a time.
struct UnpaddedMasks {
  std::vector<uint16_t> col, tap;
  void build(int64_t w, int64_t hw, int64_t ks, const int64_t* off, int64_t nvec) {
    const int64_t taps = ks * ks;
    col.assign(static_cast<size_t>(nvec * ks), 0);
    tap.assign(static_cast<size_t>(nvec * taps), 0);
    for (int64_t k = 0; k < nvec; ++k)
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t p = 16 * k + l, x = p % w;
        for (int64_t j = 0; j < ks; ++j) {
          if (x + j - ks / 2 < 0 || x + j - ks / 2 >= w) continue;
          col[k * ks + j] |= static_cast<uint16_t>(1u << l);
          for (int64_t i = 0; i < ks; ++i) {
            const int64_t q = p + off[i * ks + j];
            if (q >= 0 && q < hw) tap[k * taps + i * ks + j] |= static_cast<uint16_t>(1u << l);
          }
        }
      }
  }
};

// Asks for the cache line of p in L1, in the state a store needs (PREFETCHW: a hint that never faults; CPUs before
// Broadwell run it as a NOP). The kernels below store each output line once, after a block's FMAs: a line requested
// a block or two ahead is there when the stores come, instead of each store waiting on a read for ownership. (The
// padded-buffer kernels, whose blocks straddle output rows, measured no gain from it: docs/channel_conv.md.)
inline void prefetch_for_write(const float* p) {
  asm volatile("prefetchw (%0)" : : "r"(p));
}

// One register block of the AVX-512 copy, 32 pixels from p0: a[q][v] as direct_block_avx512's, the input of
// channel c read at xs[c] + p (masked). BORDER: every tap's load masked by its own mask (tap); else the column
// masks of taps j != KS / 2 (col) and plain loads for the middle column.
template <int R, int KS, int R2, bool BORDER>
__attribute__((target("avx512f,fma"), always_inline)) inline void unpadded_block_avx512(
    const float* const* __restrict xs, int64_t nc, const int64_t* __restrict off, int64_t p0,
    const UnpaddedMasks& mk, const float* __restrict panel, __m512 (&a)[R + R2][2]) {
  constexpr int T = KS * KS;
  const int64_t k0 = p0 / 16;
  __mmask16 m[BORDER ? T : KS][2];
#pragma GCC unroll 9
  for (int e = 0; e < (BORDER ? T : KS); ++e)
    for (int v = 0; v < 2; ++v) m[e][v] = BORDER ? mk.tap[(k0 + v) * T + e] : mk.col[(k0 + v) * KS + e];
#pragma GCC unroll 12
  for (int q = 0; q < R + R2; ++q) a[q][0] = _mm512_setzero_ps(), a[q][1] = _mm512_setzero_ps();
  const float* wt = panel;
  const int64_t slab = nc * T * kRB;  // the next slab's distance (R2 > 0 only)
  for (int64_t c = 0; c < nc; ++c) {
    const float* xc = xs[c] + p0;
#pragma GCC unroll 3
    for (int i = 0; i < KS; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < KS; ++j, wt += kRB) {
        const int t = i * KS + j;
        const float* xx = xc + off[t];
        __m512 x[2];
        for (int v = 0; v < 2; ++v) {
          if constexpr (BORDER) x[v] = _mm512_maskz_loadu_ps(m[t][v], xx + 16 * v);
          else if (j == KS / 2) x[v] = _mm512_loadu_ps(xx + 16 * v);
          else x[v] = _mm512_maskz_loadu_ps(m[j][v], xx + 16 * v);
        }
#pragma GCC unroll 12
        for (int q = 0; q < R + R2; ++q) {
          const __m512 w = _mm512_set1_ps(q < R ? wt[q] : wt[slab + q - R]);
          a[q][0] = _mm512_fmadd_ps(w, x[0], a[q][0]);
          a[q][1] = _mm512_fmadd_ps(w, x[1], a[q][1]);
        }
      }
  }
}

// The AVX-512 copy over the flat positions [pa, pb) (pa a multiple of 32): R rows (and R2 of the next slab) to
// out[q] + p. A block is interior when every tap's whole load lies inside the plane.
template <int R, int KS, int R2 = 0>
__attribute__((target("avx512f,fma"))) void direct_unpadded_avx512(const float* const* __restrict xs, int64_t nc,
                                                                   const int64_t* __restrict off, int64_t pa,
                                                                   int64_t pb, int64_t hw, const UnpaddedMasks& mk,
                                                                   const float* __restrict panel, float* const* out,
                                                                   const float* bias) {
  constexpr int64_t kBlk = 32, kAhead = kBlk;
  const int64_t lo = -off[0], hi = hw - off[KS * KS - 1] - kBlk;  // interior: lo <= p0 <= hi
  for (int64_t p0 = pa; p0 < pb; p0 += kBlk) {
    __m512 a[R + R2][2];
    for (int v = 0; v < 2; ++v)  // the output lines of the next block
      if (p0 + kAhead + 16 * v < pb)
        for (int q = 0; q < R + R2; ++q) prefetch_for_write(out[q] + p0 + kAhead + 16 * v);
    if (p0 >= lo && p0 <= hi) unpadded_block_avx512<R, KS, R2, false>(xs, nc, off, p0, mk, panel, a);
    else unpadded_block_avx512<R, KS, R2, true>(xs, nc, off, p0, mk, panel, a);
    const int64_t n = std::min(kBlk, pb - p0);
#pragma GCC unroll 12
    for (int q = 0; q < R + R2; ++q) {
      if (bias) {  // the sum's one rounding with the bias, as the separate pass it replaces made it
        a[q][0] = _mm512_add_ps(a[q][0], _mm512_set1_ps(bias[q]));
        a[q][1] = _mm512_add_ps(a[q][1], _mm512_set1_ps(bias[q]));
      }
      if (n == kBlk) {
        _mm512_storeu_ps(out[q] + p0, a[q][0]);
        _mm512_storeu_ps(out[q] + p0 + 16, a[q][1]);
        continue;
      }
      const auto lanes = [](int64_t k) { return static_cast<__mmask16>(k >= 16 ? 0xffffu : (1u << k) - 1u); };
      _mm512_mask_storeu_ps(out[q] + p0, lanes(n), a[q][0]);
      if (n > 16) _mm512_mask_storeu_ps(out[q] + p0 + 16, lanes(n - 16), a[q][1]);
    }
  }
}

// Lane l of the result is all ones when bit l of the 8-bit mask b is set.
__attribute__((target("avx2"))) inline __m256i unpadded_lanes_avx2(unsigned b) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), bit), bit);
}

// One register block of the AVX2 copy, 16 pixels from p0 (the lanes of mask vector p0 / 16): interior blocks AND
// the column masks into plain loads, border blocks load with vmaskmovps.
template <int R, int KS, bool BORDER>
__attribute__((target("avx2,fma"), always_inline)) inline void unpadded_block_avx2(
    const float* const* __restrict xs, int64_t nc, const int64_t* __restrict off, int64_t p0,
    const UnpaddedMasks& mk, const float* __restrict panel, __m256 (&a)[R][2]) {
  constexpr int T = KS * KS;
  const int64_t k = p0 / 16;
  // Interior: the column masks as floats, read from memory by each masked load's AND (kept in registers, they
  // pushed accumulators out of them).
  alignas(32) float cm[KS][2][8];
  alignas(32) int32_t tm[BORDER ? T : 1][2][8];  // border: every tap's load mask, made once per block
  if constexpr (!BORDER) {
    for (int j = 0; j < KS; ++j)
      for (int v = 0; v < 2; ++v)
        _mm256_store_ps(cm[j][v], _mm256_castsi256_ps(unpadded_lanes_avx2((mk.col[k * KS + j] >> (8 * v)) & 0xffu)));
  } else {
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < 2; ++v)
        _mm256_store_si256(reinterpret_cast<__m256i*>(tm[t][v]),
                           unpadded_lanes_avx2((mk.tap[k * T + t] >> (8 * v)) & 0xffu));
  }
#pragma GCC unroll 6
  for (int q = 0; q < R; ++q) a[q][0] = _mm256_setzero_ps(), a[q][1] = _mm256_setzero_ps();
  const float* wt = panel;
  for (int64_t c = 0; c < nc; ++c) {
    const float* xc = xs[c] + p0;
#pragma GCC unroll 3
    for (int i = 0; i < KS; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < KS; ++j, wt += kRB) {
        const int t = i * KS + j;
        const float* xx = xc + off[t];
        __m256 x[2];
        for (int v = 0; v < 2; ++v) {
          if constexpr (BORDER)
            x[v] = _mm256_maskload_ps(xx + 8 * v, _mm256_load_si256(reinterpret_cast<const __m256i*>(tm[t][v])));
          else if (j == KS / 2) x[v] = _mm256_loadu_ps(xx + 8 * v);
          else {
            // the mask as the AND's memory operand, into the loaded register: with a register of its own the
            // masks pushed two accumulators onto the stack (GCC 12)
            x[v] = _mm256_loadu_ps(xx + 8 * v);
            asm("vandps %1, %0, %0" : "+x"(x[v]) : "m"(*reinterpret_cast<const __m256*>(cm[j][v])));
          }
        }
#pragma GCC unroll 6
        for (int q = 0; q < R; ++q) {
          const __m256 w = _mm256_broadcast_ss(wt + q);
          a[q][0] = _mm256_fmadd_ps(w, x[0], a[q][0]);
          a[q][1] = _mm256_fmadd_ps(w, x[1], a[q][1]);
        }
      }
  }
}

// The AVX2 copy over [pa, pb) (pa a multiple of 16), R rows, unpaired.
template <int R, int KS>
__attribute__((target("avx2,fma"))) void direct_unpadded_avx2(const float* const* __restrict xs, int64_t nc,
                                                              const int64_t* __restrict off, int64_t pa, int64_t pb,
                                                              int64_t hw, const UnpaddedMasks& mk,
                                                              const float* __restrict panel, float* const* out,
                                                              const float* bias) {
  constexpr int64_t kBlk = 16, kAhead = 2 * kBlk;
  const int64_t lo = -off[0], hi = hw - off[KS * KS - 1] - kBlk;
  for (int64_t p0 = pa; p0 < pb; p0 += kBlk) {
    __m256 a[R][2];
    if (p0 + kAhead < pb)  // the output lines of the block after next
      for (int q = 0; q < R; ++q) prefetch_for_write(out[q] + p0 + kAhead);
    if (p0 >= lo && p0 <= hi) unpadded_block_avx2<R, KS, false>(xs, nc, off, p0, mk, panel, a);
    else unpadded_block_avx2<R, KS, true>(xs, nc, off, p0, mk, panel, a);
    const int64_t n = std::min(kBlk, pb - p0);
#pragma GCC unroll 6
    for (int q = 0; q < R; ++q) {
      if (bias) {
        a[q][0] = _mm256_add_ps(a[q][0], _mm256_set1_ps(bias[q]));
        a[q][1] = _mm256_add_ps(a[q][1], _mm256_set1_ps(bias[q]));
      }
      if (n == kBlk) {
        _mm256_storeu_ps(out[q] + p0, a[q][0]);
        _mm256_storeu_ps(out[q] + p0 + 8, a[q][1]);
        continue;
      }
      _mm256_maskstore_ps(out[q] + p0, unpadded_lanes_avx2(n >= 8 ? 0xffu : (1u << n) - 1u), a[q][0]);
      if (n > 8) _mm256_maskstore_ps(out[q] + p0 + 8, unpadded_lanes_avx2((1u << (n - 8)) - 1u), a[q][1]);
    }
  }
}

using UnpaddedFn = void (*)(const float* const*, int64_t, const int64_t*, int64_t, int64_t, int64_t,
                            const UnpaddedMasks&, const float*, float* const*, const float*);

// The kernel for a block of `rows` rows, paired with `rows2` (AVX-512: the pairs of direct_block_rows) or alone.
template <int KS>
UnpaddedFn unpadded_kernel_for(int64_t rows, int64_t rows2) {
  if (cpu_isa() != CpuIsa::kAvx512) {
    switch (rows) {
      case 6: return &direct_unpadded_avx2<6, KS>;
      case 5: return &direct_unpadded_avx2<5, KS>;
      case 4: return &direct_unpadded_avx2<4, KS>;
      case 3: return &direct_unpadded_avx2<3, KS>;
      case 2: return &direct_unpadded_avx2<2, KS>;
      default: return &direct_unpadded_avx2<1, KS>;
    }
  }
  switch (rows * 8 + rows2) {
    case 6 * 8 + 6: return &direct_unpadded_avx512<6, KS, 6>;
    case 6 * 8 + 5: return &direct_unpadded_avx512<6, KS, 5>;
    case 5 * 8 + 5: return &direct_unpadded_avx512<5, KS, 5>;
    case 5 * 8 + 4: return &direct_unpadded_avx512<5, KS, 4>;
    case 4 * 8 + 4: return &direct_unpadded_avx512<4, KS, 4>;
    case 4 * 8 + 3: return &direct_unpadded_avx512<4, KS, 3>;
    case 3 * 8 + 3: return &direct_unpadded_avx512<3, KS, 3>;
    case 6 * 8: return &direct_unpadded_avx512<6, KS>;
    case 5 * 8: return &direct_unpadded_avx512<5, KS>;
    case 4 * 8: return &direct_unpadded_avx512<4, KS>;
    case 3 * 8: return &direct_unpadded_avx512<3, KS>;
    case 2 * 8: return &direct_unpadded_avx512<2, KS>;
    case 1 * 8: return &direct_unpadded_avx512<1, KS>;
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "unpadded_kernel_for: no kernel for blocks of ", rows, " and ", rows2, " rows");
  return nullptr;
}

// Prefetches the floats [qa, qb) of the planes xs[c0 .. c1) into L2, a cache line (16 floats) at a time.
inline void prefetch_planes(const float* const* xs, int64_t c0, int64_t c1, int64_t qa, int64_t qb) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t q = std::max<int64_t>(0, qa); q < qb; q += 16)
      _mm_prefetch(reinterpret_cast<const char*>(xs[c] + q), _MM_HINT_T1);
}

// The forward of one sample read in place (unpadded_applies; float input): output row r (out_rows[r], or
// res + r ohw) <- the panel rows r times the nc planes x_n + chans[c] hw, plus bias[r] (bias: nr floats, or
// nullptr). Returns false when it does not apply.
inline bool direct_conv_sample_unpadded(const float* xn, const int64_t* chans, int64_t nc, const ConvGeom& g,
                                        const float* dpanel, int64_t nr, float* res, float* const* out_rows,
                                        const float* bias) {
  if (!dpanel || nc <= 0 || !unpadded_applies(g)) return false;
  const int64_t hw = g.hw(), w = g.w, ks = g.kh, taps = g.taps();
  thread_local std::vector<const float*> xs;
  thread_local UnpaddedMasks mk;
  thread_local std::array<int64_t, 3> geom{};  // (w, h, ks) the masks were built for
  xs.resize(static_cast<size_t>(nc));
  for (int64_t c = 0; c < nc; ++c) xs[c] = xn + chans[c] * hw;
  int64_t off[9];
  for (int64_t i = 0; i < ks; ++i)
    for (int64_t j = 0; j < ks; ++j) off[i * ks + j] = (i - ks / 2) * w + (j - ks / 2);
  if (geom != std::array<int64_t, 3>{w, g.h, ks}) {
    mk.build(w, hw, ks, off, (hw + 31) / 32 * 2);  // whole 32-lane blocks
    geom = {w, g.h, ks};
  }
  // Bands as direct_flat_bands' (a tap reads from p - reach / 2 to p + reach / 2).
  for_flat_bands(hw, nc, (ks - 1) * (w + 1), nr, dpanel, nc * taps * kRB, res, hw, out_rows,
                 [&](int64_t pa, int64_t pb, int64_t r0, int64_t rows, int64_t rows2, const float* slab,
                     float* const* outs) {
    // x's planes come from memory: this call's share of the next band's input is prefetched into L2 while the
    // kernels compute this band (the band's first row block would otherwise wait on demand misses in nc streams,
    // more than the hardware prefetchers follow), and the first band all at once.
    if (pa == 0 && r0 == 0) prefetch_planes(xs.data(), 0, nc, 0, std::min(hw, pb + off[taps - 1]));
    if (pb < hw)
      prefetch_planes(xs.data(), nc * r0 / nr, nc * (r0 + rows + rows2) / nr, pb + off[0],
                      std::min(hw, 2 * pb - pa + off[taps - 1]));
    const UnpaddedFn fn = ks == 3 ? unpadded_kernel_for<3>(rows, rows2) : unpadded_kernel_for<1>(rows, rows2);
    fn(xs.data(), nc, off, pa, pb, hw, mk, slab, outs, bias != nullptr ? bias + r0 : nullptr);
  });
  return true;
}

}  // namespace cpu
}  // namespace slimops

#else

namespace slimops {
namespace cpu {
inline bool direct_conv_in_place(const ConvGeom&) {
  return false;  // no direct kernels in this build
}
}  // namespace cpu
}  // namespace slimops

#endif
