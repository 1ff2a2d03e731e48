// CPU kernels of the distill family (schemas in csrc/registration.cpp; maths in slimops/reference/distill.py,
// docs/algorithms.md §9): FAQD's feature-affinity loss, per sample, with f̂ = f / (‖f‖ + 1e-5) per pixel,
//   Δ = ŜᵀŜ − T̂ᵀT̂ (HW x HW),  loss = Σ φ(Δ) / (HW)²  (exact)  or  Σ φ(ΔZ) / (k (HW)²)  (fast, Z: HW x k),
// φ = |.| ("l1") or (.)² ("l2sq").
//
// Operands: per sample, X = [Ŝ; T̂] ((Cs + Ct) x HW, channel-major like the NCHW input: the normalisation and its
// backward run along contiguous pixel rows) and, for the exact loss, Y = [Ŝ; −T̂], so that Δ = XᵀY is one product
// over K = Cs + Ct.
//
// Exact: the pixels are cut into blocks of kBlock; one work item is a (sample, I <= J) pair of blocks: the tile
// Δ_IJ = X_Iᵀ Y_J by the register-blocked product of small_mm.h and the sum of φ over it (twice off the diagonal:
// Δ is symmetric). Nothing of size HW x HW exists; per-item partial sums are added in a fixed order (the result
// does not depend on the thread count). Backward: with E = φ'(Δ) (symmetric), ∂/∂Ŝ = 2ŜE and ∂/∂T̂ = −2T̂E; one
// work item is a (sample, block I) and accumulates G_I = Σ_J X_J E_JI over every J, recomputing each tile; then
// the normalisation's backward per pixel, ∂/∂f = g/(n + ε) − f̂ (f̂ᵀg)/n.
//
// Fast: U_y = [Ŝ Z; −T̂ Z] (K x k), D = Xᵀ U_y (HW x k), loss from D; backward with G = φ'(D) (scaled),
// ∂/∂X = U_y Gᵀ + [Ŝ G; −T̂ G] Zᵀ. The products run on small_mm.h's panels (panel_mm) and blocks, not torch's
// BLAS: MKL takes its AVX2 code on AMD CPUs (230 GFLOP/s on 2 Zen 5 cores against small_mm's 400+ with AVX-512),
// and blocks let the elementwise passes run on what is in cache: φ and φ' on each 64-pixel block of D as it is made,
// the normalisation's backward on each 64-pixel block of the gradient (no (Cs x HW) gradient is formed). The
// forward returns U_y and E = φ'(D) (the op's 2nd and 3rd outputs, O(HW k) per sample, as SDPA returns its
// logsumexp), so that the backward makes 3 products of Cs·HW·k multiply-adds for the student's gradient instead of
// 7 (it recomputes U_y and D when they are not given). Scratch beyond the outputs: X of a small chunk of samples.
//
// Accumulation in float32 for float32/bfloat16/float16 features (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_tiles.h"
#include "slimops/dispatch.h"
#include "slimops/distill_checks.h"

namespace slimops {
namespace cpu {
namespace {

constexpr int64_t kBlock = 64;           // pixels per tile side (a multiple of kMMCols); per block of the fast loss
constexpr double kEps = 1e-5;            // the FAQD code's normaliser guard
constexpr int64_t kChunkElems = 1 << 23; // workspace elements per chunk of samples (32 MiB of float32)

// A (B, C, H, W) operand read in place with any strides.
template <typename S>
struct Feat {
  const S* p;
  int64_t sb, sc, sh, sw;
};

template <typename S>
Feat<S> feat(const at::Tensor& t) {
  return {t.data_ptr<S>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Normalises one sample's pixels of f into `c` rows of x (row stride ld, the columns past HW zeroed) and, when y is
// given, their copy times `ysign`; nrm[p] = ‖f[:, p]‖.
template <typename S, typename T>
void pack_normalised(const Feat<S>& f, int64_t b, int64_t c, int64_t h, int64_t w, int64_t ld, T* x, T* y, T ysign,
                     T* nrm, std::vector<T>& inv) {
  const int64_t hw = h * w;
  inv.assign(static_cast<size_t>(hw), T(0));
  std::fill(nrm, nrm + hw, T(0));
  const S* base = f.p + b * f.sb;
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t i = 0; i < h; ++i) {
      const S* row = base + ch * f.sc + i * f.sh;
      T* n = nrm + i * w;
      for (int64_t j = 0; j < w; ++j) {
        const T v = static_cast<T>(row[j * f.sw]);
        n[j] += v * v;
      }
    }
  for (int64_t p = 0; p < hw; ++p) {
    nrm[p] = std::sqrt(nrm[p]);
    inv[p] = T(1) / (nrm[p] + static_cast<T>(kEps));
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    T* xr = x + ch * ld;
    for (int64_t i = 0; i < h; ++i) {
      const S* row = base + ch * f.sc + i * f.sh;
      T* xo = xr + i * w;
      const T* iv = inv.data() + i * w;
      for (int64_t j = 0; j < w; ++j) xo[j] = static_cast<T>(row[j * f.sw]) * iv[j];
    }
    std::fill(xr + hw, xr + ld, T(0));
    if (y != nullptr) {
      T* yr = y + ch * ld;
      for (int64_t p = 0; p < ld; ++p) yr[p] = ysign * xr[p];
    }
  }
}

// The normalisation's backward for the columns [p0, p0 + np) of one part (c rows): g holds the gradient of f̂ for
// those columns (row stride ldg) before the factor `scale`; x the part's f̂ rows (stride ldx, full width); out the
// part's (c, HW) contiguous gradient of f for this sample.
template <typename S, typename T>
void normalise_backward(int64_t c, int64_t hw, int64_t p0, int64_t np, const T* g, int64_t ldg, const T* x, int64_t ldx,
                        const T* nrm, T scale, S* out, std::vector<T>& dot) {
  np = std::min(np, hw - p0);
  if (np <= 0) return;
  dot.assign(static_cast<size_t>(np), T(0));
  for (int64_t r = 0; r < c; ++r) {
    const T *gr = g + r * ldg, *xr = x + r * ldx + p0;
    for (int64_t p = 0; p < np; ++p) dot[p] += xr[p] * gr[p];
  }
  for (int64_t p = 0; p < np; ++p) {
    const T n = nrm[p0 + p];
    // f̂ (f̂ᵀg)/n: 0 where the pixel is all zeros (f̂ = 0 there, the limit of the formula).
    dot[p] = n > T(0) ? scale * dot[p] / n : T(0);
  }
  for (int64_t r = 0; r < c; ++r) {
    const T *gr = g + r * ldg, *xr = x + r * ldx + p0;
    S* o = out + r * hw + p0;
    for (int64_t p = 0; p < np; ++p) {
      const T inv = T(1) / (nrm[p0 + p] + static_cast<T>(kEps));
      o[p] = static_cast<S>(scale * gr[p] * inv - xr[p] * dot[p]);
    }
  }
}

// φ'(d): sign for l1 (0 at 0 and at NaN: torch.sign's and autograd's |.| convention, so a NaN entry of Δ does not
// spread into the gradient of the side that is finite), 2d for l2sq. Branch-free (the sign as a difference of two
// compares), so that the loops applying it vectorise.
template <typename T>
inline T dphi(T d, bool l1) {
  return l1 ? static_cast<T>(static_cast<int>(d > T(0)) - static_cast<int>(d < T(0))) : T(2) * d;
}

// Samples per chunk: the workspace of a chunk stays near kChunkElems (at least one sample).
inline int64_t chunk_samples(int64_t b, int64_t per_sample) {
  return std::max<int64_t>(1, std::min<int64_t>(b, kChunkElems / std::max<int64_t>(1, per_sample)));
}

// ---- exact loss --------------------------------------------------------------------------------------------

struct Tiling {
  int64_t hwp, nblk;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (I, J), I <= J
  explicit Tiling(int64_t hw) : hwp(pad16(hw)), nblk((pad16(hw) + kBlock - 1) / kBlock) {
    for (int64_t i = 0; i < nblk; ++i)
      for (int64_t j = i; j < nblk; ++j) pairs.emplace_back(i, j);
  }
  int64_t len(int64_t blk) const { return std::min(kBlock, hwp - blk * kBlock); }  // a multiple of kMMCols
};

// X and Y of a chunk of samples [b0, b0 + nb): per sample x (K x hwp), y (K x hwp), nrm (2 x hwp: student, teacher).
template <typename T>
struct Packed {
  int64_t kk, hwp;
  std::vector<T> buf;
  Packed(int64_t nb, int64_t kk_, int64_t hwp_) : kk(kk_), hwp(hwp_), buf(static_cast<size_t>(nb * per_sample())) {}
  int64_t per_sample() const { return (2 * kk + 2) * hwp; }
  T* x(int64_t i) { return buf.data() + i * per_sample(); }
  T* y(int64_t i) { return x(i) + kk * hwp; }
  T* nrm(int64_t i) { return y(i) + kk * hwp; }
};

template <typename S, typename T>
void pack_chunk(const AffinityGeom& g, const Feat<S>& fs, const Feat<S>& ft, int64_t b0, int64_t nb, int64_t ld,
                bool with_y, Packed<T>& pk) {
  at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> inv;
    for (int64_t i = lo; i < hi; ++i) {
      T *x = pk.x(i), *y = with_y ? pk.y(i) : nullptr, *n = pk.nrm(i);
      pack_normalised<S, T>(fs, b0 + i, g.cs, g.h, g.w, ld, x, y, T(1), n, inv);
      pack_normalised<S, T>(ft, b0 + i, g.ct, g.h, g.w, ld, x + g.cs * ld, y ? y + g.cs * ld : nullptr, T(-1),
                            n + ld, inv);
    }
  });
}

template <typename S, typename T>
void exact_forward(const AffinityGeom& g, const Feat<S>& fs, const Feat<S>& ft, T* loss) {
  const Tiling tl(g.hw);
  const int64_t kk = g.cs + g.ct, np = static_cast<int64_t>(tl.pairs.size());
  const int64_t chunk = chunk_samples(g.b, (2 * kk + 2) * tl.hwp);
  std::vector<double> part;
  for (int64_t b0 = 0; b0 < g.b; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.b - b0);
    Packed<T> pk(nb, kk, tl.hwp);
    pack_chunk<S, T>(g, fs, ft, b0, nb, tl.hwp, true, pk);
    part.assign(static_cast<size_t>(nb * np), 0.0);
    at::parallel_for(0, nb * np, grain(kBlock * kBlock * std::max<int64_t>(kk, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<T> tile(static_cast<size_t>(kBlock * kBlock));
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t i = t / np;
        const auto [bi, bj] = tl.pairs[t % np];
        const int64_t mi = tl.len(bi), mj = tl.len(bj);
        // Δ_IJ (mi x mj) = X_Iᵀ Y_J: A element (r, p) = x[p, I0 + r].
        small_mm<T>(mi, kk, mj, pk.x(i) + bi * kBlock, 1, tl.hwp, pk.y(i) + bj * kBlock, tl.hwp, tile.data(), mj,
                    false);
        T s = 0;
        if (g.l1) {
          for (int64_t e = 0; e < mi * mj; ++e) s += std::abs(tile[e]);
        } else {
          for (int64_t e = 0; e < mi * mj; ++e) s += tile[e] * tile[e];
        }
        part[t] = static_cast<double>(s) * (bi == bj ? 1.0 : 2.0);
      }
    });
    const double denom = static_cast<double>(g.hw) * static_cast<double>(g.hw);
    for (int64_t i = 0; i < nb; ++i) {
      double s = 0;
      for (int64_t p = 0; p < np; ++p) s += part[i * np + p];
      loss[b0 + i] = static_cast<T>(s / denom);
    }
  }
}

template <typename S>
struct GradOut {
  S *fs, *ft;  // contiguous (B, C, H, W), null when not asked for
};

template <typename S, typename T>
void exact_backward(const AffinityGeom& g, const T* grad, const Feat<S>& fs, const Feat<S>& ft, const GradOut<S>& out) {
  const Tiling tl(g.hw);
  const int64_t kk = g.cs + g.ct;
  // The rows of G needed: the student's, the teacher's or both.
  const int64_t r0 = out.fs != nullptr ? 0 : g.cs, r1 = out.ft != nullptr ? kk : g.cs, nr = r1 - r0;
  const int64_t chunk = chunk_samples(g.b, (2 * kk + 2) * tl.hwp);
  const double denom = static_cast<double>(g.hw) * static_cast<double>(g.hw);
  for (int64_t b0 = 0; b0 < g.b; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.b - b0);
    Packed<T> pk(nb, kk, tl.hwp);
    pack_chunk<S, T>(g, fs, ft, b0, nb, tl.hwp, true, pk);
    const int64_t work = 2 * tl.hwp * kBlock * std::max<int64_t>(kk, 1);
    at::parallel_for(0, nb * tl.nblk, grain(work), [&](int64_t lo, int64_t hi) {
      std::vector<T> tile(static_cast<size_t>(kBlock * kBlock)), acc(static_cast<size_t>(std::max<int64_t>(nr, 1) * kBlock));
      std::vector<T> dot;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t i = t / tl.nblk, bi = t % tl.nblk, mi = tl.len(bi), b = b0 + i;
        const T* x = pk.x(i);
        std::fill(acc.begin(), acc.end(), T(0));
        if (nr > 0 && kk > 0) {
          for (int64_t bj = 0; bj < tl.nblk; ++bj) {
            const int64_t mj = tl.len(bj);
            // Δ_JI (mj x mi) = X_Jᵀ Y_I, then E_JI = φ'(Δ_JI) in place.
            small_mm<T>(mj, kk, mi, x + bj * kBlock, 1, tl.hwp, pk.y(i) + bi * kBlock, tl.hwp, tile.data(), mi, false);
            for (int64_t e = 0; e < mj * mi; ++e) tile[e] = dphi(tile[e], g.l1);
            // G_I (rows r0..r1) += X_J E_JI: A element (r, p) = x[r0 + r, J0 + p].
            small_mm<T>(nr, mj, mi, x + r0 * tl.hwp + bj * kBlock, tl.hwp, 1, tile.data(), mi, acc.data(), mi, true);
          }
        }
        const T c = static_cast<T>(2.0 * static_cast<double>(grad[b]) / denom);
        const T* nrm = pk.nrm(i);
        if (out.fs != nullptr)
          normalise_backward<S, T>(g.cs, g.hw, bi * kBlock, mi, acc.data(), mi, x, tl.hwp, nrm, c,
                                   out.fs + b * g.cs * g.hw, dot);
        if (out.ft != nullptr)
          normalise_backward<S, T>(g.ct, g.hw, bi * kBlock, mi, acc.data() + (g.cs - r0) * mi, mi, x + g.cs * tl.hwp,
                                   tl.hwp, nrm + tl.hwp, -c, out.ft + b * g.ct * g.hw, dot);
      }
    });
  }
}

// ---- fast loss (panel products of small_mm.h) -------------------------------------------------------------------

// X (chunk, K, HW) in T and the per-pixel norms (chunk, 2, HW): one allocation per call, refilled per chunk.
struct FastPack {
  at::Tensor x, nrm;
  FastPack(int64_t chunk, const AffinityGeom& g, const at::TensorOptions& opts)
      : x(at::empty({chunk, g.cs + g.ct, g.hw}, opts)), nrm(at::empty({chunk, 2, g.hw}, opts)) {}

  // Packs the samples [b0, b0 + nb) into the first nb slots.
  template <typename S, typename T>
  void fill(const AffinityGeom& g, const Feat<S>& fs, const Feat<S>& ft, int64_t b0, int64_t nb) {
    const int64_t kk = g.cs + g.ct;
    T *xp = x.data_ptr<T>(), *np = nrm.data_ptr<T>();
    at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> inv;
      for (int64_t i = lo; i < hi; ++i) {
        T *xi = xp + i * kk * g.hw, *ni = np + i * 2 * g.hw;
        pack_normalised<S, T>(fs, b0 + i, g.cs, g.h, g.w, g.hw, xi, nullptr, T(1), ni, inv);
        pack_normalised<S, T>(ft, b0 + i, g.ct, g.h, g.w, g.hw, xi + g.cs * g.hw, nullptr, T(1), ni + g.hw, inv);
      }
    });
  }
};

// Samples per chunk of the fast loss: scratch near kFastChunkElems, but at least one sample per thread. Small on
// purpose: the scratch is allocated afresh per call, and memory the allocator has just returned to the system costs
// a page fault per 4 KiB on first touch (about as much as the products on 8 x 64 x 56 x 56 when the whole batch was
// one chunk, after a caller freed a large tensor); the chunks reuse one allocation.
constexpr int64_t kFastChunkElems = 1 << 20;
inline int64_t fast_chunk_samples(int64_t b, int64_t per_sample) {
  const int64_t fit = std::max<int64_t>(1, kFastChunkElems / std::max<int64_t>(1, per_sample));
  return std::min(b, std::max<int64_t>(fit, at::get_num_threads()));
}

// U_y = [Ŝ Z; −T̂ Z] of nb samples (x: (nb, K, HW)) into u (nb, K, k); one work item per sample and kPanelM rows.
template <typename T>
void fast_u(const AffinityGeom& g, int64_t nb, const T* x, const T* z, T* u) {
  const int64_t kk = g.cs + g.ct, rblk = blocks_of(kk, kPanelM);
  at::parallel_for(0, nb * rblk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t i = t / rblk, r0 = (t % rblk) * kPanelM, nr = std::min(kPanelM, kk - r0);
      T* ui = u + (i * kk + r0) * g.k;
      panel_mm<T>(nr, g.hw, g.k, x + (i * kk + r0) * g.hw, g.hw, 1, z, g.k, ui, g.k, false);
      for (int64_t r = std::max(r0, g.cs) - r0; r < nr; ++r)
        for (int64_t q = 0; q < g.k; ++q) ui[r * g.k + q] = -ui[r * g.k + q];
    }
  });
}

// D = Xᵀ U_y into e (nb, HW, k), kBlock pixels per work item; f(i, j, d, n) then gets block j of sample i (its n
// elements at d) while it is in cache.
template <typename T, typename F>
void fast_d_blocks(const AffinityGeom& g, int64_t nb, const T* x, const T* u, T* e, const F& f) {
  const int64_t kk = g.cs + g.ct, nblk = blocks_of(g.hw, kBlock);
  at::parallel_for(0, nb * nblk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t i = t / nblk, j = t % nblk, p0 = j * kBlock, np = std::min(kBlock, g.hw - p0);
      T* d = e + (i * g.hw + p0) * g.k;
      small_mm<T>(np, kk, g.k, x + i * kk * g.hw + p0, 1, g.hw, u + i * kk * g.k, g.k, d, g.k, false);
      f(i, j, d, np * g.k);
    }
  });
}

// Σ φ(d[0, n)) and d ← φ'(d) in place, one pass. The sum runs in kLanes independent lanes (added in a fixed order at
// the end), so the loop vectorises without reassociation and the result does not depend on the ISA.
template <typename T>
T phi_sum_and_dphi(T* d, int64_t n, bool l1) {
  constexpr int64_t kLanes = 16;
  T lane[kLanes] = {};
  int64_t e = 0;
  if (l1) {
    for (; e + kLanes <= n; e += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const T v = d[e + l];
        lane[l] += std::abs(v);
        d[e + l] = dphi(v, true);
      }
  } else {
    for (; e + kLanes <= n; e += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const T v = d[e + l];
        lane[l] += v * v;
        d[e + l] = dphi(v, false);
      }
  }
  for (int64_t l = 0; e < n; ++e, ++l) {
    const T v = d[e];
    lane[l] += l1 ? std::abs(v) : v * v;
    d[e] = dphi(v, l1);
  }
  T s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// The forward: loss (B,), u (B, K, k) = U_y and e (B, HW, k) = φ'(D), the two saved for the backward. Samples go
// in chunks (the packed X is the only scratch); each block of D is computed in e's memory and turned into φ'(D) by
// the pass that sums φ over it, while it is in cache. One partial sum per (sample, block), added in block order:
// the loss does not depend on the thread count.
template <typename S, typename T>
void fast_forward(const AffinityGeom& g, const Feat<S>& fs, const Feat<S>& ft, const at::Tensor& z, T* loss,
                  at::Tensor& u, at::Tensor& e) {
  const int64_t kk = g.cs + g.ct, nblk = blocks_of(g.hw, kBlock);
  const int64_t chunk = fast_chunk_samples(g.b, g.hw * (kk + 2));
  const double denom = static_cast<double>(g.k) * static_cast<double>(g.hw) * static_cast<double>(g.hw);
  std::vector<double> part;
  FastPack c(chunk, g, z.options());
  for (int64_t b0 = 0; b0 < g.b; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.b - b0);
    c.fill<S, T>(g, fs, ft, b0, nb);
    T *xp = c.x.data_ptr<T>(), *up = u.data_ptr<T>() + b0 * kk * g.k, *ep = e.data_ptr<T>() + b0 * g.hw * g.k;
    fast_u<T>(g, nb, xp, z.data_ptr<T>(), up);
    part.assign(static_cast<size_t>(nb * nblk), 0.0);
    fast_d_blocks<T>(g, nb, xp, up, ep, [&](int64_t i, int64_t j, T* d, int64_t n) {
      part[i * nblk + j] = static_cast<double>(phi_sum_and_dphi(d, n, g.l1));
    });
    for (int64_t i = 0; i < nb; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < nblk; ++j) sum += part[i * nblk + j];
      loss[b0 + i] = static_cast<T>(sum / denom);
    }
  }
}

// The backward, from the forward's u and e when `saved` (only X is re-packed: an elementwise pass) or recomputing
// them per chunk. With G = φ'(D) (grad[b] / (k (HW)²) is applied in the normalisation's backward), on the rows r asked
// for: ∂/∂X_r = U_r Gᵀ + V_r Zᵀ, V_r = X_r G (teacher rows negated). Two passes per chunk:
//   1. per sample and kVRows rows: V_r = X_r G (panel_mm over the pixels), and the right operands W = [U_rᵀ; V_rᵀ]
//      (2k x nr, small) of pass 2;
//   2. per sample and kBlock pixels: (∂/∂X_r)ᵀ for the block = G_blk U_rᵀ + Z_blk V_rᵀ (two small_mm, (pixels x nr)
//      in cache), transposed to rows, and the normalisation's backward for those pixels. No (nr x HW) gradient exists.
template <typename S, typename T>
void fast_backward(const AffinityGeom& g, const at::Tensor& grad, const Feat<S>& fs, const Feat<S>& ft,
                   const at::Tensor& z, const at::Tensor* saved_u, const at::Tensor* saved_e, const GradOut<S>& out) {
  constexpr int64_t kVRows = 32;
  const int64_t kk = g.cs + g.ct, per = g.hw * g.k;
  const int64_t r0 = out.fs != nullptr ? 0 : g.cs, r1 = out.ft != nullptr ? kk : g.cs, nr = r1 - r0;
  const bool saved = saved_u != nullptr;
  const int64_t chunk = fast_chunk_samples(g.b, g.hw * (kk + 2) + 2 * g.k * nr + (saved ? 0 : kk * g.k + per));
  const int64_t nblk = blocks_of(g.hw, kBlock), vblk = blocks_of(nr, kVRows);
  const double denom = static_cast<double>(g.k) * static_cast<double>(g.hw) * static_cast<double>(g.hw);
  const T *gp = grad.data_ptr<T>(), *zp = z.data_ptr<T>();
  FastPack c(chunk, g, z.options());
  at::Tensor u, e;
  if (!saved) {  // recomputed per chunk, in one allocation each
    u = at::empty({chunk, kk, g.k}, z.options());
    e = at::empty({chunk, g.hw, g.k}, z.options());
  }
  std::vector<T> w(static_cast<size_t>(chunk * 2 * g.k * nr));
  for (int64_t b0 = 0; b0 < g.b; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.b - b0);
    c.fill<S, T>(g, fs, ft, b0, nb);
    const T *xp = c.x.data_ptr<T>(), *np = c.nrm.data_ptr<T>();
    const T *up, *ep;
    if (saved) {
      up = saved_u->data_ptr<T>() + b0 * kk * g.k;
      ep = saved_e->data_ptr<T>() + b0 * per;
    } else {
      fast_u<T>(g, nb, xp, zp, u.data_ptr<T>());
      fast_d_blocks<T>(g, nb, xp, u.data_ptr<T>(), e.data_ptr<T>(), [&](int64_t, int64_t, T* d, int64_t n) {
        for (int64_t q = 0; q < n; ++q) d[q] = dphi(d[q], g.l1);
      });
      up = u.data_ptr<T>();
      ep = e.data_ptr<T>();
    }
    at::parallel_for(0, nb * vblk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> v;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t i = t / vblk, q0 = (t % vblk) * kVRows, nq = std::min(kVRows, nr - q0), ra = r0 + q0;
        v.resize(static_cast<size_t>(nq * g.k));
        panel_mm<T>(nq, g.hw, g.k, xp + (i * kk + ra) * g.hw, g.hw, 1, ep + i * per, g.k, v.data(), g.k, false);
        T* wi = w.data() + i * 2 * g.k * nr;
        for (int64_t r = 0; r < nq; ++r) {
          const T sign = ra + r >= g.cs ? T(-1) : T(1);
          const T *ur = up + (i * kk + ra + r) * g.k, *vr = v.data() + r * g.k;
          for (int64_t q = 0; q < g.k; ++q) {
            wi[q * nr + q0 + r] = ur[q];
            wi[(g.k + q) * nr + q0 + r] = sign * vr[q];
          }
        }
      }
    });
    at::parallel_for(0, nb * nblk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> gt(static_cast<size_t>(kBlock * nr)), rows(static_cast<size_t>(nr * kBlock)), dot;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t i = t / nblk, p0 = (t % nblk) * kBlock, npx = std::min(kBlock, g.hw - p0), b = b0 + i;
        const T* wi = w.data() + i * 2 * g.k * nr;
        small_mm<T>(npx, g.k, nr, ep + i * per + p0 * g.k, g.k, 1, wi, nr, gt.data(), nr, false);
        small_mm<T>(npx, g.k, nr, zp + p0 * g.k, g.k, 1, wi + g.k * nr, nr, gt.data(), nr, true);
        for (int64_t p = 0; p < npx; ++p)
          for (int64_t r = 0; r < nr; ++r) rows[r * kBlock + p] = gt[p * nr + r];
        const T s = static_cast<T>(static_cast<double>(gp[b]) / denom);
        const T *xi = xp + i * kk * g.hw, *ni = np + i * 2 * g.hw;
        if (out.fs != nullptr)
          normalise_backward<S, T>(g.cs, g.hw, p0, npx, rows.data(), kBlock, xi, g.hw, ni, s,
                                   out.fs + b * g.cs * g.hw, dot);
        if (out.ft != nullptr)
          normalise_backward<S, T>(g.ct, g.hw, p0, npx, rows.data() + (g.cs - r0) * kBlock, kBlock,
                                   xi + g.cs * g.hw, g.hw, ni + g.hw, s, out.ft + b * g.ct * g.hw, dot);
      }
    });
  }
}

// ---- the ops -----------------------------------------------------------------------------------------------

at::ScalarType compute_type(const at::Tensor& fs) {
  return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_affinity_loss_cpu(const at::Tensor& fs, const at::Tensor& ft,
                                                                         const std::optional<at::Tensor>& proj,
                                                                         c10::string_view norm) {
  const char* op = "feature_affinity_loss";
  const AffinityGeom g = check_feature_affinity(op, fs, ft, proj, norm);
  const auto opts = fs.options().dtype(compute_type(fs));
  at::Tensor loss = at::empty({g.b}, opts);
  at::Tensor u = g.k > 0 ? at::empty({g.b, g.cs + g.ct, g.k}, opts) : at::empty({0}, opts);
  at::Tensor e = g.k > 0 ? at::empty({g.b, g.hw, g.k}, opts) : at::empty({0}, opts);
  if (g.b == 0) return {loss, u, e};
  SLIMOPS_DISPATCH_FLOATS(fs.scalar_type(), "feature_affinity_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    T* lp = loss.data_ptr<T>();
    if (g.k > 0)
      fast_forward<scalar_t, T>(g, feat<scalar_t>(fs), feat<scalar_t>(ft), proj->to(opts.dtype()).contiguous(), lp, u,
                                e);
    else exact_forward<scalar_t, T>(g, feat<scalar_t>(fs), feat<scalar_t>(ft), lp);
  });
  return {loss, u, e};
}

std::tuple<at::Tensor, at::Tensor> feature_affinity_loss_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& fs, const at::Tensor& ft, const std::optional<at::Tensor>& proj,
    c10::string_view norm, std::array<bool, 2> output_mask, const std::optional<at::Tensor>& u,
    const std::optional<at::Tensor>& e) {
  const char* op = "feature_affinity_loss_backward";
  const AffinityGeom g = check_feature_affinity(op, fs, ft, proj, norm);
  check_affinity_grad(op, grad_in, fs);
  const bool saved = check_affinity_saved(op, g, fs, u, e);
  at::Tensor gs = output_mask[0] ? at::empty(fs.sizes(), fs.options().memory_format(at::MemoryFormat::Contiguous))
                                 : fs.new_empty({0});
  at::Tensor gt = output_mask[1] ? at::empty(ft.sizes(), ft.options().memory_format(at::MemoryFormat::Contiguous))
                                 : ft.new_empty({0});
  if (g.b == 0 || !(output_mask[0] || output_mask[1])) return {gs, gt};
  const at::Tensor grad = grad_in.to(compute_type(fs)).contiguous();
  const at::Tensor su = saved ? u->contiguous() : at::Tensor(), se = saved ? e->contiguous() : at::Tensor();
  SLIMOPS_DISPATCH_FLOATS(fs.scalar_type(), "feature_affinity_loss_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const GradOut<scalar_t> out{output_mask[0] ? gs.data_ptr<scalar_t>() : nullptr,
                                output_mask[1] ? gt.data_ptr<scalar_t>() : nullptr};
    if (g.k > 0)
      fast_backward<scalar_t, T>(g, grad, feat<scalar_t>(fs), feat<scalar_t>(ft),
                                 proj->to(grad.scalar_type()).contiguous(), saved ? &su : nullptr,
                                 saved ? &se : nullptr, out);
    else exact_backward<scalar_t, T>(g, grad.data_ptr<T>(), feat<scalar_t>(fs), feat<scalar_t>(ft), out);
  });
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("feature_affinity_loss", &feature_affinity_loss_cpu);
  m.impl("feature_affinity_loss_backward", &feature_affinity_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace slimops
