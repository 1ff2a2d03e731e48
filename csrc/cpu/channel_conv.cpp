// CPU kernels of the channel_conv family (schemas in csrc/registration.cpp): convolutions that compute
// only the channels a slimmed (static index sets) or gated (per-sample mask) network keeps.
//
// Scheme: per sample, im2col of the kept input channels only, read through the index list (so
// x[:, in_idx] is never built), then one GEMM against the kept block of the weight. The weight block is
// packed once per call into a (C_out_kept, C_in_kept * kh * kw) panel in the accumulation dtype: that is
// O(weight) work, the packing any GEMM does to its operands, against O(N * OH * OW) times more for the
// conv itself. So the work is proportional to |out| * |in|, as for a conv on pre-compacted weights.
// masked_conv2d packs, per sample, only the weight rows of that sample's kept output channels.
//
// Threads: with at least as many samples as threads, samples are split across threads and each GEMM is
// single-threaded (MKL runs sequentially inside a parallel region); with fewer samples (inference at
// batch 1), samples run one after another with the GEMM and im2col threaded instead.
// Accumulation in float32 for float32/bfloat16/float16 (float64 for float64): im2col converts as it
// copies, the GEMM runs in the accumulation dtype, the result is rounded once when stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#include "channel_conv_onednn.h"
#include "direct_conv.h"
#include "direct_gx_strided.h"
#include "small_mm.h"
#include "winograd.h"
#include "slimops/channel_conv_checks.h"

namespace slimops {
namespace cpu {
namespace {

// ---- im2col / col2im over an index list of channels -------------------------------------------------

// Output columns [lo, hi) of row `oy` read input column ox * sw + off, which lies inside [0, w).
inline void valid_cols(int64_t off, int64_t sw, int64_t w, int64_t ow, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
  hi = (w - off) <= 0 ? 0 : std::min<int64_t>(ow, (w - off + sw - 1) / sw);
  lo = std::min(lo, hi);
}

// For the output rows [oy0, oy1) (P = (oy1 - oy0) * ow pixels): cols[(c * taps + t) * P + p] = x_n[chans[c]]
// at the input position of tap t for pixel p (0 in the padding), c in [0, nc). Threaded over channels.
template <typename scalar_t, typename acc_t>
void im2col(const scalar_t* xn, const int64_t* chans, int64_t nc, const ConvGeom& g, int64_t oy0, int64_t oy1,
            acc_t* cols) {
  const int64_t ohw = (oy1 - oy0) * g.ow, taps = g.taps();
  at::parallel_for(0, nc, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* xc = xn + chans[c] * g.hw();
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          acc_t* row = cols + (c * taps + i * g.kw + j) * ohw;
          const int64_t off = j * g.dw - g.pw;
          int64_t lo, hi;
          valid_cols(off, g.sw, g.w, g.ow, lo, hi);
          for (int64_t oy = oy0; oy < oy1; ++oy) {
            acc_t* r = row + (oy - oy0) * g.ow;
            const int64_t iy = oy * g.sh - g.ph + i * g.dh;
            if (iy < 0 || iy >= g.h) {
              std::fill(r, r + g.ow, acc_t(0));
              continue;
            }
            const scalar_t* xr = xc + iy * g.w + off;
            std::fill(r, r + lo, acc_t(0));
            if (g.sw == 1) {
              for (int64_t ox = lo; ox < hi; ++ox) r[ox] = static_cast<acc_t>(xr[ox]);
            } else {
              for (int64_t ox = lo; ox < hi; ++ox) r[ox] = static_cast<acc_t>(xr[ox * g.sw]);
            }
            std::fill(r + hi, r + g.ow, acc_t(0));
          }
        }
      }
    }
  });
}

// The adjoint of im2col over the output rows [oy0, oy1): gx[chans[c]] += the columns of channel c, each
// added at its input position. Channels are distinct, so threads over channels never write the same element.
template <typename acc_t>
void col2im_add(const acc_t* cols, const int64_t* chans, int64_t nc, const ConvGeom& g, int64_t oy0, int64_t oy1,
                acc_t* gx) {
  const int64_t ohw = (oy1 - oy0) * g.ow, taps = g.taps();
  at::parallel_for(0, nc, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* gc = gx + chans[c] * g.hw();
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          const acc_t* row = cols + (c * taps + i * g.kw + j) * ohw;
          const int64_t off = j * g.dw - g.pw;
          int64_t lo, hi;
          valid_cols(off, g.sw, g.w, g.ow, lo, hi);
          for (int64_t oy = oy0; oy < oy1; ++oy) {
            const int64_t iy = oy * g.sh - g.ph + i * g.dh;
            if (iy < 0 || iy >= g.h) continue;
            const acc_t* r = row + (oy - oy0) * g.ow;
            acc_t* gr = gc + iy * g.w + off;
            for (int64_t ox = lo; ox < hi; ++ox) gr[ox * g.sw] += r[ox];
          }
        }
      }
    }
  });
}

// ---- GEMM ----------------------------------------------------------------------------------------------
// The GEMMs are small (one tile of one sample) and many, so the per-call cost of at::mm (dispatcher,
// tensor wrappers: several microseconds) is measurable. When the BLAS torch links (MKL on x86 wheels)
// exports the Fortran sgemm_/dgemm_, they are called directly; otherwise at::mm_out. Inside a parallel
// region MKL runs single-threaded; outside it uses torch's thread count.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                          const int*, const double*, const int*, const double*, double*, const int*);

template <typename T>
void* blas_symbol() {
  static void* sym = dlsym(RTLD_DEFAULT, std::is_same_v<T, float> ? "sgemm_" : "dgemm_");
  return sym;
}

// C = op(A) B [+ C] in float on small_mm.h's panels (its AVX2 + FMA or AVX-512 copy), rows split over threads
// outside a parallel region. Why not BLAS here: torch's MKL takes its AVX2 code on AMD CPUs, so on an AVX-512 Zen
// the GEMM fallback (im2col + GEMM: stride-2 convs, and grad_x where the direct one does not apply) ran at ~200
// GFLOP/s where the panels make ~400; with AVX2 the two are within a few percent. The AVX2 and AVX-512 copies sum
// alike, so the two ISAs' results stay bit-identical. B transposed (grad_w's GEMM) is left to BLAS.
inline bool panel_gemm(bool ta, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                       int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  if (static_cast<int>(cpu_isa()) < static_cast<int>(CpuIsa::kAvx2)) return false;
  const int64_t ars = ta ? 1 : lda, acs = ta ? lda : 1, blocks = blocks_of(m, kPanelM);
  auto rows = [&](int64_t lo, int64_t hi) {
    const int64_t i0 = lo * kPanelM, i1 = std::min(m, hi * kPanelM);
    panel_mm<float>(i1 - i0, k, n, a + i0 * ars, ars, acs, b, ldb, c + i0 * ldc, ldc, accumulate);
  };
  if (at::in_parallel_region() || at::get_num_threads() == 1) rows(0, blocks);
  else at::parallel_for(0, blocks, 1, rows);
  return true;
}

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (!tb && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) &&
        panel_gemm(ta, m, n, k, a, lda, b, ldb, beta == 1.0f, c, ldc))
      return;
  }
  const int64_t big = std::numeric_limits<int>::max();
  void* sym = blas_symbol<T>();
  if (sym && m < big && n < big && k < big && lda < big && ldb < big && ldc < big) {
    // Column-major view: C^T (n x m) = op(B)^T op(A)^T.
    const char tb_c = tb ? 'T' : 'N', ta_c = ta ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int lb = static_cast<int>(ldb), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      reinterpret_cast<sgemm_fn>(sym)(&tb_c, &ta_c, &mi, &ni, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    } else {
      reinterpret_cast<dgemm_fn>(sym)(&tb_c, &ta_c, &mi, &ni, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor am = ta ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                           : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  const at::Tensor bm = tb ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                           : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor cm = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    cm.mul_(beta);
    return;
  }
  at::addmm_out(cm, cm, am, bm, beta, alpha);
}

// ---- shared plumbing ---------------------------------------------------------------------------------

// Output rows per tile: the im2col tile (k x rows * ow) stays within ~256 KB (L2), at least 64 pixels.
// SLIMOPS_TILE_KB overrides the budget (read once; for tuning, and to force many tiles in tests).
int64_t tile_rows(const ConvGeom& g, int64_t k, size_t elem) {
  static const int64_t budget = std::getenv("SLIMOPS_TILE_KB") ? std::atoi(std::getenv("SLIMOPS_TILE_KB")) * 1024 : 256 * 1024;
  int64_t t = budget / std::max<int64_t>(1, k * g.ow * static_cast<int64_t>(elem));
  t = std::max(t, (64 + g.ow - 1) / g.ow);
  return std::max<int64_t>(1, std::min(t, g.oh));
}

// x is read one sample at a time, so only each sample's (C, H, W) block must be dense: a batch of any stride (0 for
// an expanded batch, a slice of a larger one) is read in place instead of being copied whole first (a stride-0
// batch of 2^31 elements would otherwise cost gigabytes for a small result).
struct SampleReader {
  at::Tensor t;         // x, or a dense copy when its samples are not dense
  int64_t stride = 0;   // elements between consecutive samples
};

SampleReader sample_reader(const at::Tensor& x) {
  if (x.size(0) > 0 && x.select(0, 0).is_contiguous()) return {x, x.size(0) > 1 ? x.stride(0) : 0};
  at::Tensor c = x.contiguous();
  return {c, c.size(0) > 0 ? c.numel() / c.size(0) : 0};
}

std::vector<int64_t> iota(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

// Runs body(n, slot) for every sample: split across threads (slot = thread index, single-threaded
// GEMMs) when there are enough samples, else in order with slot 0 (threaded GEMMs and im2col).
template <typename F>
int64_t for_samples(int64_t n, F body) {
  const int64_t threads = at::get_num_threads();
  if (n >= threads && threads > 1) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      const int64_t slot = at::get_thread_num();
      for (int64_t i = b; i < e; ++i) body(i, slot);
    });
    return threads;
  }
  for (int64_t i = 0; i < n; ++i) body(i, 0);
  return 1;
}

int64_t slots() { return at::get_num_threads(); }

// The kept rows of a per-sample mask, as index lists.
std::vector<std::vector<int64_t>> rows_of_mask(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  const bool* p = m.const_data_ptr<bool>();
  const int64_t n = m.size(0), c = m.size(1);
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j)
      if (p[i * c + j]) rows[i].push_back(j);
  return rows;
}

// Whether some sample of a masked_conv2d call (its kept rows) runs a Winograd conv of nc channels into nr (the
// forward: c_in into c_out; grad_x: c_out into c_in): the shape takes it and the sample keeps most of its c_out rows.
bool masked_takes_winograd(const ConvGeom& g, int64_t nc, int64_t nr, int64_t c_out,
                           const std::vector<std::vector<int64_t>>& rows) {
  return winograd_applies(g, nc, nr) && std::any_of(rows.begin(), rows.end(), [&](const auto& r) {
           return winograd_masked_sample(static_cast<int64_t>(r.size()), c_out);
         });
}

// Packs weight[rows][:, chans] as a (|rows|, |chans| * taps) panel in acc_t.
template <typename scalar_t, typename acc_t>
void pack_weight(const scalar_t* w, int64_t c_in, int64_t taps, const int64_t* rows, int64_t nr,
                 const int64_t* chans, int64_t nc, acc_t* out) {
  at::parallel_for(0, nr, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* wr = w + rows[r] * c_in * taps;
      acc_t* o = out + r * nc * taps;
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t t = 0; t < taps; ++t) o[c * taps + t] = static_cast<acc_t>(wr[chans[c] * taps + t]);
    }
  });
}

// ---- the engine: one sample, a set of output rows, a set of input channels ----------------------------

// Forward of one sample: y_rows = W_panel (nr x K) @ im2col(x_n, chans) (K x ohw), plus bias, stored into
// the output rows `dst_rows` of y_n. The pixels go in tiles of output rows whose im2col block stays in
// cache; a float32 (float64) output whose rows are all of y_n is written in place by the GEMM.
template <typename scalar_t, typename acc_t>
struct ForwardWork {
  const ConvGeom& g;
  int64_t k, rows;
  std::vector<acc_t> cols, tmp;
  std::vector<float> xp;         // the padded input of the direct microkernel
  std::vector<float*> out_rows;  // its output rows, when it writes a float output's rows in place
  std::vector<float> bias_f;     // the bias of its rows, which it adds as it stores them

  ForwardWork(const ConvGeom& geom, int64_t nc, int64_t nr)
      : g(geom), k(nc * geom.taps()), rows(tile_rows(geom, k, sizeof(acc_t))) {
    if (!std::is_same_v<acc_t, scalar_t>) tmp.resize(static_cast<size_t>(nr * geom.ohw()));
  }

  // dpanel: the weight rows packed for the direct microkernel (float accumulation only), or nullptr.
  void run(const scalar_t* xn, const int64_t* chans, int64_t nc, const acc_t* panel, const float* dpanel, int64_t nr,
           const int64_t* dst_rows, bool dst_is_all, const scalar_t* bias_full, const int64_t* bias_rows,
           scalar_t* yn) {
    const int64_t ohw = g.ohw();
    if (nr == 0) return;
    // In place when the result is already in the storage dtype and fills y_n's rows in order.
    bool direct = std::is_same_v<acc_t, scalar_t> && dst_is_all;
    if (!direct && tmp.size() < static_cast<size_t>(nr * ohw)) tmp.resize(static_cast<size_t>(nr * ohw));
    acc_t* res = direct ? reinterpret_cast<acc_t*>(yn) : tmp.data();
    if (k == 0) std::fill(res, res + nr * ohw, acc_t(0));
    bool done = k == 0, bias_added = false;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!done && dpanel) {
        const float* bias = nullptr;
        if (bias_full) {
          bias_f.resize(static_cast<size_t>(nr));
          for (int64_t r = 0; r < nr; ++r) bias_f[r] = static_cast<float>(bias_full[bias_rows[r]]);
          bias = bias_f.data();
        }
        float* const* rows_out = nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (!direct) {  // a float output's scattered rows (masked_conv2d): the microkernel stores them in place
            out_rows.resize(static_cast<size_t>(nr));
            for (int64_t r = 0; r < nr; ++r) out_rows[r] = yn + dst_rows[r] * ohw;
            rows_out = out_rows.data();
          }
        }
        done = direct_conv_sample<scalar_t>(xn, chans, nc, g, dpanel, nr, xp, res, rows_out, bias);
        bias_added = done && bias != nullptr;
        if (done && rows_out != nullptr) direct = true;  // y_n's rows hold the result
      }
    }
    // im2col's buffer only when im2col runs (zeroing it cost the direct path a memset per worker and call)
    if (!done && cols.empty()) cols.resize(static_cast<size_t>(k * rows * g.ow));
    for (int64_t oy0 = 0; !done && oy0 < g.oh; oy0 += rows) {
      const int64_t oy1 = std::min(g.oh, oy0 + rows), np = (oy1 - oy0) * g.ow;
      im2col<scalar_t, acc_t>(xn, chans, nc, g, oy0, oy1, cols.data());
      gemm<acc_t>(false, false, nr, np, k, acc_t(1), panel, k, cols.data(), np, acc_t(0), res + oy0 * g.ow, ohw);
    }
    if (direct && (bias_added || !bias_full)) return;  // y_n's rows hold the whole result
    const bool add_bias = bias_full != nullptr && !bias_added;
    for (int64_t r = 0; r < nr; ++r) {
      const acc_t b = add_bias ? static_cast<acc_t>(bias_full[bias_rows[r]]) : acc_t(0);
      const acc_t* src = res + r * ohw;
      scalar_t* d = yn + dst_rows[r] * ohw;
      if (direct) {  // the result is in y_n's row already (d; src too when the rows are all of y_n's, in order)
        for (int64_t p = 0; p < ohw; ++p) d[p] = static_cast<scalar_t>(static_cast<acc_t>(d[p]) + b);
      } else if (add_bias) {
        for (int64_t p = 0; p < ohw; ++p) d[p] = static_cast<scalar_t>(src[p] + b);
      } else {
        for (int64_t p = 0; p < ohw; ++p) d[p] = static_cast<scalar_t>(src[p]);
      }
    }
  }
};

// Backward of one sample: given dy rows (nr of grad_out[n]'s rows), writes W_panel^T dy into the kept planes of gx
// (zeroed, then col2im adds) and adds dy @ im2col(x_n)^T into the weight-panel gradient gw (nr x K), and row sums of
// dy into gb; in tiles of output rows, like the forward. With a transposed direct panel (direct_conv.h: float
// accumulation, stride 1; at a stride > 1 the phased panels of direct_gx_strided.h), gx is instead the direct
// convolution of dy with the flipped kernel (per stride phase), written whole (each
// kept channel's plane gets this sample's only contribution: no zeroing first). Either way the kept planes need not
// be initialised. The direct paths read a float32 grad_out's rows in place; the GEMM paths and low-precision inputs
// read a copy in acc_t, made on first use.
template <typename scalar_t, typename acc_t>
struct BackwardWork {
  const ConvGeom& g;
  int64_t k, rows;
  std::vector<acc_t> cols, dy;  // dy: the copy of this sample's rows (nr x ohw), when one is needed
  std::vector<int64_t> seq;     // 0, 1, ..., nr - 1: the copy's rows
  std::vector<float> xpt;       // dy zero-padded for the transposed convolution
  const GxPhases* gx_phases = nullptr;  // a strided conv's: grad_x by phases (direct_gx_strided.h)
  std::vector<float> gx_res;    // the phases' results before they are interleaved into gx
  std::vector<float*> gx_rows;  // the kept channels' planes of gx
  std::vector<float> xpg;       // x zero-padded for the direct weight gradient
  std::vector<float> dyt;       // dy as [pixel][row] for it
  // grad_x by Winograd F(2x2, 3x3) (winograd.h), where the caller set wino_u_t (U of the flipped filters,
  // winograd_pack_weights(..., transposed)) over wino_k rows of dy: nr (channel_conv2d) or all c_out rows
  // (masked_conv2d: the rows this sample drops are planes of zeros)
  const float* wino_u_t = nullptr;
  int64_t wino_k = 0;
  std::unique_ptr<WinogradWork> wino;
  std::vector<const float*> wino_in;
  std::vector<float*> wino_out;
  const scalar_t* go = nullptr;       // grad_out[n]
  const int64_t* go_rows = nullptr;   // dy row r is grad_out[n]'s row go_rows[r]
  int64_t nr_loaded = 0;
  bool copied = false;

  BackwardWork(const ConvGeom& geom, int64_t nc, int64_t nr)
      : g(geom), k(nc * geom.taps()), rows(tile_rows(geom, k, sizeof(acc_t))), seq(iota(nr)) {}

  // This sample's dy: the rows src_rows of grad_out[n] (read in place or copied when first needed).
  void load_dy(const scalar_t* go_n, const int64_t* src_rows, int64_t nr) {
    go = go_n, go_rows = src_rows, nr_loaded = nr, copied = false;
  }

  // dy as nr contiguous rows of acc_t (copied on first use).
  const acc_t* dy_copy() {
    if (!copied) {
      const int64_t ohw = g.ohw();
      if (dy.size() < static_cast<size_t>(nr_loaded * ohw)) dy.resize(static_cast<size_t>(nr_loaded * ohw));
      for (int64_t r = 0; r < nr_loaded; ++r) {
        const scalar_t* s = go + go_rows[r] * ohw;
        acc_t* d = dy.data() + r * ohw;
        for (int64_t p = 0; p < ohw; ++p) d[p] = static_cast<acc_t>(s[p]);
      }
      copied = true;
    }
    return dy.data();
  }

  // Row r of dy in acc_t: grad_out's own row where it is already acc_t, else the copy's.
  const acc_t* dy_row(int64_t r) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) return go + go_rows[r] * g.ohw();
    else return dy_copy() + r * g.ohw();
  }

  // dy for the direct (float) paths: a base and the index of each row's plane in it.
  std::pair<const float*, const int64_t*> dy_float_rows() {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return {go, go_rows};
    } else if constexpr (std::is_same_v<acc_t, float>) {
      return {dy_copy(), seq.data()};
    } else {
      TORCH_INTERNAL_ASSERT(false, "the direct paths accumulate in float");
      return {nullptr, nullptr};
    }
  }

  // gx's kept planes by the transposed direct convolution; false when it does not apply.
  bool direct_gx(const int64_t* chans, int64_t nc, int64_t nr, const float* dpanel_t, acc_t* gx_n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (wino_u_t != nullptr) {  // dy row r is grad_out[n]'s row go_rows[r] (< wino_k), read in place
        if (!wino) wino = std::make_unique<WinogradWork>();
        wino_in.assign(static_cast<size_t>(wino_k), nullptr);
        for (int64_t r = 0; r < nr; ++r) wino_in[go_rows[r]] = go + go_rows[r] * g.ohw();
        wino_out.resize(static_cast<size_t>(nc));
        for (int64_t c = 0; c < nc; ++c) wino_out[c] = gx_n + chans[c] * g.hw();
        wino->run(wino_in.data(), wino_k, g, wino_u_t, nc, nullptr, wino_out.data());
        return true;
      }
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (dpanel_t == nullptr) return false;
      gx_rows.resize(static_cast<size_t>(nc));
      for (int64_t c = 0; c < nc; ++c) gx_rows[c] = gx_n + chans[c] * g.hw();
      if (gx_phases != nullptr) {
        const GxPhases& P = *gx_phases;
        if (xpt.size() < P.buffer_floats(nr)) xpt.resize(P.buffer_floats(nr));
        if (gx_res.size() < P.result_floats(nc)) gx_res.resize(P.result_floats(nc));
        const auto [dyp, dyr] = dy_float_rows();
        direct_gx_phased(dyp, dyr, nr, g, P, dpanel_t, nc, xpt.data(), gx_res.data(), gx_rows.data());
        return true;
      }
      const ConvGeom gt = transposed_geometry(g);
      const auto [dyp, dyr] = dy_float_rows();  // dy's planes are the channels of this convolution
      return direct_conv_sample<float>(dyp, dyr, nr, gt, dpanel_t, nc, xpt, nullptr, gx_rows.data());
    } else {
      (void)chans, (void)nc, (void)nr, (void)dpanel_t, (void)gx_n;
      return false;
    }
  }

  // gw_row_map (only where direct_gw_applies: the caller checks): dy row r adds into gw row gw_row_map[r].
  void run(const scalar_t* xn, const int64_t* chans, int64_t nc, const acc_t* panel, const float* dpanel_t,
           int64_t nr, acc_t* gx_n, acc_t* gw, acc_t* gb, const int64_t* gw_row_map = nullptr) {
    const int64_t ohw = g.ohw();
    if (nr == 0) return;
    TORCH_INTERNAL_ASSERT(nr == nr_loaded, "load_dy first");
    // The direct weight gradient takes the bias sums while it transposes dy.
    const bool gw_direct = std::is_same_v<acc_t, float> && gw != nullptr && k > 0 && direct_gw_applies(g);
    if (gb && !gw_direct) {
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* d = dy_row(r);
        acc_t s = 0;
        for (int64_t p = 0; p < ohw; ++p) s += d[p];
        gb[r] += s;
      }
    }
    if (k == 0 || !(gx_n || gw)) return;
    if (gx_n && direct_gx(chans, nc, nr, dpanel_t, gx_n)) gx_n = nullptr;  // done: every kept plane written whole
    if (gx_n)  // col2im adds into the kept planes
      for (int64_t c = 0; c < nc; ++c) std::fill_n(gx_n + chans[c] * g.hw(), g.hw(), acc_t(0));
    if constexpr (std::is_same_v<acc_t, float>) {
      if (gw_direct) {
        const size_t need = DirectGeom(g).buffer_floats(nc);
        if (xpg.size() < need) xpg.resize(need);
        const auto [dyp, dyr] = dy_float_rows();
        const bool done = direct_gw_sample<scalar_t>(xn, chans, nc, g, dyp, dyr, nr, xpg.data(), dyt, gw, k,
                                                     gw_row_map, gb);
        TORCH_INTERNAL_ASSERT(done, "direct_gw_applies but the direct weight gradient did not run");
        gw = nullptr;
      }
    }
    TORCH_INTERNAL_ASSERT(gw == nullptr || gw_row_map == nullptr, "a gw row map needs the direct weight gradient");
    if (!(gx_n || gw)) return;
    if (cols.empty()) cols.resize(static_cast<size_t>(k * rows * g.ow));  // sized when im2col first runs
    const acc_t* dyc = dy_copy();
    for (int64_t oy0 = 0; oy0 < g.oh; oy0 += rows) {
      const int64_t oy1 = std::min(g.oh, oy0 + rows), np = (oy1 - oy0) * g.ow;
      const acc_t* dyt = dyc + oy0 * g.ow;
      if (gx_n) {  // cols = panel^T (k x nr) @ dy tile (nr x np)
        gemm<acc_t>(true, false, k, np, nr, acc_t(1), panel, k, dyt, ohw, acc_t(0), cols.data(), np);
        col2im_add<acc_t>(cols.data(), chans, nc, g, oy0, oy1, gx_n);
      }
      if (gw) {  // gw (nr x k) += dy tile (nr x np) @ cols^T (np x k)
        im2col<scalar_t, acc_t>(xn, chans, nc, g, oy0, oy1, cols.data());
        gemm<acc_t>(false, true, nr, k, np, acc_t(1), dyt, ohw, cols.data(), np, acc_t(1), gw, k);
      }
    }
  }
};

// ---- backward preamble shared by both ops ------------------------------------------------------------

// grad_out must be the forward output's shape (N, c_out, OH, OW) and x's dtype.
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const ConvGeom& g, int64_t c_out) {
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({g.n, c_out, g.oh, g.ow}), "slimops.", op,
                    ": grad_out has shape ", grad_out.sizes(), " but the output has shape (", g.n, ", ", c_out, ", ",
                    g.oh, ", ", g.ow, ")");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "slimops.", op, ": grad_out has dtype ",
                   grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
}

// Full-size gradients of x, weight and bias (C_out), an empty tensor for each one not asked for. The weight and bias
// gradients start at zero; x's is left uninitialised: the callers write each of its planes once (BackwardWork::run
// the kept ones, the callers zero the rest), where zeroing all of it first was a pass over x's size (12.8 MB for
// 32 x 128 x 28 x 28) that the direct grad_x then overwrote.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_buffers(const at::Tensor& x, const at::Tensor& weight,
                                                            std::array<bool, 3> need) {
  const auto contiguous = x.options().memory_format(at::MemoryFormat::Contiguous);
  return {need[0] ? at::empty(x.sizes(), contiguous) : x.new_empty({0}),
          need[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : weight.new_empty({0}),
          need[2] ? at::zeros({weight.size(0)}, weight.options()) : weight.new_empty({0})};
}

// ---- channel_conv2d -----------------------------------------------------------------------------------

struct ChannelCall {
  ConvGeom g;
  at::Tensor in_idx, out_idx;  // int64, CPU, checked
  int64_t c_out, c_in;
};

ChannelCall prepare_channel(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& in_idx, const at::Tensor& out_idx,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            bool input_gathered) {
  ChannelCall c;
  c.g = conv_geometry(op, x, weight, bias, stride, padding, dilation);
  c.c_out = weight.size(0), c.c_in = weight.size(1);
  c.in_idx = checked_index(op, "in_idx", in_idx, c.c_in, "input channels of weight", x.device());
  c.out_idx = checked_index(op, "out_idx", out_idx, c.c_out, "output channels of weight", x.device());
  if (input_gathered) {
    TORCH_CHECK_VALUE(x.size(1) == c.in_idx.numel(), "slimops.", op, ": input_gathered: x has ", x.size(1),
                      " channels but in_idx has ", c.in_idx.numel());
  } else {
    TORCH_CHECK_VALUE(x.size(1) == c.c_in, "slimops.", op, ": x has ", x.size(1), " channels but weight has ",
                      c.c_in, " input channels");
  }
  return c;
}

// channel_conv2d's float32 forward by Winograd F(2x2, 3x3) (winograd_applies): U once per call, then each sample
// by one thread (for_samples), written into y_n's rows with the bias.
void winograd_forward(const SampleReader& xr, const at::Tensor& wc, const at::Tensor& bc, const ChannelCall& c,
                      const int64_t* chans, int64_t nc, int64_t nr, at::Tensor& y) {
  const ConvGeom& g = c.g;
  const int64_t* out_idx = c.out_idx.const_data_ptr<int64_t>();
  std::vector<float> u(static_cast<size_t>(16 * nr * nc)), bias_f;
  winograd_pack_weights<float>(wc.const_data_ptr<float>(), c.c_in, out_idx, nr, c.in_idx.const_data_ptr<int64_t>(),
                               nc, u.data());
  if (bc.defined()) {
    bias_f.resize(static_cast<size_t>(nr));
    for (int64_t r = 0; r < nr; ++r) bias_f[r] = bc.const_data_ptr<float>()[out_idx[r]];
  }
  const float* xp = xr.t.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  std::vector<std::unique_ptr<WinogradWork>> work(static_cast<size_t>(slots()));
  std::vector<std::vector<const float*>> ins(work.size());
  std::vector<std::vector<float*>> outs(work.size());
  for_samples(g.n, [&](int64_t n, int64_t slot) {
    auto& w = work[slot];
    if (!w) w = std::make_unique<WinogradWork>();
    auto& in = ins[slot];
    auto& out = outs[slot];
    in.resize(static_cast<size_t>(nc)), out.resize(static_cast<size_t>(nr));
    for (int64_t i = 0; i < nc; ++i) in[i] = xp + n * xr.stride + chans[i] * g.hw();
    for (int64_t r = 0; r < nr; ++r) out[r] = yp + (n * nr + r) * g.ohw();
    w->run(in.data(), nc, g, u.data(), nr, bias_f.empty() ? nullptr : bias_f.data(), out.data());
  });
}

at::Tensor channel_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool input_gathered) {
  const char* op = "channel_conv2d";
  const ChannelCall c = prepare_channel(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation, input_gathered);
  const ConvGeom& g = c.g;
  const int64_t nc = c.in_idx.numel(), nr = c.out_idx.numel();
  const SampleReader xr = sample_reader(x);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({g.n, nr, g.oh, g.ow}, x.options());
  if (y.numel() == 0) return y;
  if (channel_conv_takes_onednn(x, nr, nc, c.c_out, c.c_in))  // bf16 on AMX tiles (channel_conv_onednn.h)
    return channel_conv2d_onednn(x, weight, bias, c.in_idx, c.out_idx, g, input_gathered);
  // The channels im2col reads from x: in_idx, or 0..nc-1 when x is already compact.
  const std::vector<int64_t> compact = iota(nc);
  const int64_t* chans = input_gathered ? compact.data() : c.in_idx.const_data_ptr<int64_t>();
  if (x.scalar_type() == at::kFloat && winograd_applies(g, nc, nr)) {  // float32 3x3 "same" convs (winograd.h)
    winograd_forward(xr, wc, bc, c, chans, nc, nr, y);
    return y;
  }
  const std::vector<int64_t> rows = iota(nr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slimops.channel_conv2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // One weight panel: the direct kernel's where it runs, else im2col + GEMM's (as the backward and masked_conv2d).
    std::vector<acc_t> panel;
    std::vector<float> dpanel;
    if (std::is_same_v<acc_t, float> && direct_conv_applies(g, nc)) {
      dpanel.resize(static_cast<size_t>(direct_panel_size(nr, nc, g.taps())));
      pack_weight_direct<scalar_t>(wc.const_data_ptr<scalar_t>(), c.c_in, g.taps(), c.out_idx.const_data_ptr<int64_t>(),
                                   nr, c.in_idx.const_data_ptr<int64_t>(), nc, dpanel.data(), direct_paired());
    } else {
      panel.resize(static_cast<size_t>(nr * nc * g.taps()));
      pack_weight<scalar_t, acc_t>(wc.const_data_ptr<scalar_t>(), c.c_in, g.taps(), c.out_idx.const_data_ptr<int64_t>(),
                                   nr, c.in_idx.const_data_ptr<int64_t>(), nc, panel.data());
    }
    const float* dp = dpanel.empty() ? nullptr : dpanel.data();
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    std::vector<std::unique_ptr<ForwardWork<scalar_t, acc_t>>> work(static_cast<size_t>(slots()));
    for_samples(g.n, [&](int64_t n, int64_t slot) {
      auto& w = work[slot];
      if (!w) w = std::make_unique<ForwardWork<scalar_t, acc_t>>(g, nc, nr);
      w->run(xp + n * xr.stride, chans, nc, panel.data(), dp, nr, rows.data(), true, bp,
             c.out_idx.const_data_ptr<int64_t>(), yp + n * nr * g.ohw());
    });
  });
  return y;
}

// Scatters a reduced (nr, nc * taps) panel gradient into the full weight gradient.
template <typename scalar_t, typename acc_t>
void scatter_weight_grad(const acc_t* panel, const int64_t* rows, int64_t nr, const int64_t* chans, int64_t nc,
                         int64_t c_in, int64_t taps, scalar_t* gw) {
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t ci = 0; ci < nc; ++ci)
      for (int64_t t = 0; t < taps; ++t)
        gw[(rows[r] * c_in + chans[ci]) * taps + t] = static_cast<scalar_t>(panel[(r * nc + ci) * taps + t]);
}

// Sums the per-slot accumulators into slot 0.
template <typename acc_t>
void reduce_slots(std::vector<std::vector<acc_t>>& acc, int64_t used) {
  for (int64_t s = 1; s < used; ++s) {
    if (acc[s].empty()) continue;
    for (size_t i = 0; i < acc[0].size(); ++i) acc[0][i] += acc[s][i];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool input_gathered, std::array<bool, 3> output_mask) {
  const char* op = "channel_conv2d_backward";
  const ChannelCall c =
      prepare_channel(op, x, weight, std::nullopt, in_idx, out_idx, stride, padding, dilation, input_gathered);
  const ConvGeom& g = c.g;
  const int64_t nc = c.in_idx.numel(), nr = c.out_idx.numel(), taps = g.taps(), k = nc * taps;
  check_grad_out(op, grad_out, x, g, nr);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  if (g.n > 0 && (need_x || need_w || need_b) && channel_conv_takes_onednn(x, nr, nc, c.c_out, c.c_in))
    return channel_conv2d_backward_onednn(grad_out, x, weight, c.in_idx, c.out_idx, g, input_gathered, output_mask);
  at::Tensor gx, gw, gb;  // not a structured binding: the dispatch lambdas below capture them
  std::tie(gx, gw, gb) = grad_buffers(x, weight, output_mask);
  if (g.n == 0 || nr == 0 || !(need_x || need_w || need_b)) {
    if (need_x) gx.zero_();
    return {gx, gw, gb};
  }
  const SampleReader xr = sample_reader(x);
  const at::Tensor wc = weight.contiguous(), goc = grad_out.contiguous();
  const std::vector<int64_t> compact = iota(nc), rows = iota(nr);
  const int64_t* chans = input_gathered ? compact.data() : c.in_idx.const_data_ptr<int64_t>();
  std::vector<int64_t> dropped;  // x's channels outside in_idx: their planes of gx are 0
  if (need_x && !input_gathered) {
    std::vector<bool> kept(static_cast<size_t>(g.cx), false);
    for (int64_t ci = 0; ci < nc; ++ci) kept[chans[ci]] = true;
    for (int64_t ch = 0; ch < g.cx; ++ch)
      if (!kept[ch]) dropped.push_back(ch);
  }
  const int64_t* in_p = c.in_idx.const_data_ptr<int64_t>();
  const int64_t* out_p = c.out_idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slimops.channel_conv2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    // grad_x by the transposed direct convolution (direct_conv.h), or by a GEMM against the packed panel
    std::vector<acc_t> panel;
    std::vector<float> dpanel_t, wino_u_t;
    std::optional<GxPhases> gx_phases;  // a strided conv's grad_x by phases
    // grad_x = the "same" conv of dy's nr planes with the flipped filters into nc planes: Winograd where the
    // forward of that shape would take it (float32)
    if (std::is_same_v<scalar_t, float> && need_x && winograd_applies(g, nr, nc)) {
      wino_u_t.resize(static_cast<size_t>(16 * nc * nr));
      winograd_pack_weights<scalar_t>(wc.const_data_ptr<scalar_t>(), c.c_in, out_p, nr, in_p, nc, wino_u_t.data(),
                                      true);
    } else if (std::is_same_v<acc_t, float> && need_x && transposed_direct_applies(g)) {
      dpanel_t.resize(static_cast<size_t>(direct_panel_size(nc, nr, taps)));
      pack_weight_direct_transposed<scalar_t>(wc.const_data_ptr<scalar_t>(), c.c_in, taps, out_p, nr, in_p, nc,
                                              dpanel_t.data(), direct_paired());
    } else if (std::is_same_v<acc_t, float> && need_x && strided_gx_applies(g)) {
      gx_phases.emplace(g);
      dpanel_t.resize(static_cast<size_t>(direct_panel_size(nc, nr, taps)));
      pack_weight_direct_phased<scalar_t>(wc.const_data_ptr<scalar_t>(), c.c_in, taps, out_p, nr, in_p, nc,
                                          *gx_phases, dpanel_t.data(), direct_paired());
    } else if (need_x) {
      panel.resize(static_cast<size_t>(nr * k));
      pack_weight<scalar_t, acc_t>(wc.const_data_ptr<scalar_t>(), c.c_in, taps, out_p, nr, in_p, nc, panel.data());
    }
    const int64_t ns = slots();
    std::vector<std::vector<acc_t>> gw_acc(ns), gb_acc(ns), gx_buf(ns);
    std::vector<std::unique_ptr<BackwardWork<scalar_t, acc_t>>> work(static_cast<size_t>(ns));
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* gop = goc.const_data_ptr<scalar_t>();
    const int64_t used = for_samples(g.n, [&](int64_t n, int64_t slot) {
      auto& w = work[slot];
      if (!w) {
        w = std::make_unique<BackwardWork<scalar_t, acc_t>>(g, nc, nr);
        if (gx_phases) w->gx_phases = &*gx_phases;
        if (!wino_u_t.empty()) w->wino_u_t = wino_u_t.data(), w->wino_k = nr;
        if (need_w) gw_acc[slot].assign(static_cast<size_t>(nr * k), acc_t(0));
        if (need_b) gb_acc[slot].assign(static_cast<size_t>(nr), acc_t(0));
        if (need_x && !same) gx_buf[slot].resize(static_cast<size_t>(g.cx * g.hw()));
      }
      w->load_dy(gop + n * nr * g.ohw(), rows.data(), nr);
      acc_t* gx_n = nullptr;
      if (need_x) {
        scalar_t* gx_s = gx.mutable_data_ptr<scalar_t>() + n * g.cx * g.hw();
        for (const int64_t ch : dropped) std::fill_n(gx_s + ch * g.hw(), g.hw(), scalar_t(0));
        if constexpr (same) gx_n = reinterpret_cast<acc_t*>(gx_s);
        else gx_n = gx_buf[slot].data();  // run writes its kept planes
      }
      w->run(xp + n * xr.stride, chans, nc, panel.data(), dpanel_t.empty() ? nullptr : dpanel_t.data(), nr, gx_n,
             need_w ? gw_acc[slot].data() : nullptr, need_b ? gb_acc[slot].data() : nullptr);
      if constexpr (!same) {
        if (need_x) {
          scalar_t* d = gx.mutable_data_ptr<scalar_t>() + n * g.cx * g.hw();
          for (int64_t ci = 0; ci < nc; ++ci)
            for (int64_t p = 0; p < g.hw(); ++p)
              d[chans[ci] * g.hw() + p] = static_cast<scalar_t>(gx_n[chans[ci] * g.hw() + p]);
        }
      }
    });
    if (need_w) {
      reduce_slots(gw_acc, used);
      scatter_weight_grad<scalar_t, acc_t>(gw_acc[0].data(), out_p, nr, in_p, nc, c.c_in, taps,
                                           gw.mutable_data_ptr<scalar_t>());
    }
    if (need_b) {
      reduce_slots(gb_acc, used);
      scalar_t* d = gb.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < nr; ++r) d[out_p[r]] = static_cast<scalar_t>(gb_acc[0][r]);
    }
  });
  return {gx, gw, gb};
}

// ---- masked_conv2d ------------------------------------------------------------------------------------

ConvGeom prepare_masked(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& out_mask, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  ConvGeom g = conv_geometry(op, x, weight, bias, stride, padding, dilation);
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "slimops.", op, ": x has ", x.size(1), " channels but weight has ",
                    weight.size(1), " input channels");
  check_out_mask(op, out_mask, g.n, weight.size(0), x.device());
  return g;
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& out_mask, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const char* op = "masked_conv2d";
  const ConvGeom g = prepare_masked(op, x, weight, bias, out_mask, stride, padding, dilation);
  const int64_t c_out = weight.size(0), c_in = weight.size(1), taps = g.taps(), k = c_in * taps;
  at::Tensor y = at::empty({g.n, c_out, g.oh, g.ow}, x.options());
  if (y.numel() == 0) return y;
  if (masked_conv_takes_onednn(x, out_mask, c_in))  // bf16 on AMX tiles (channel_conv_onednn.h)
    return masked_conv2d_onednn(x, weight, bias, out_mask, g, y.sizes());
  const SampleReader xr = sample_reader(x);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto rows = rows_of_mask(out_mask);
  const std::vector<int64_t> chans = iota(c_in);
  // float32 samples that keep most rows: Winograd F(2x2, 3x3) over all rows, the kept ones written (winograd.h)
  const bool wino = x.scalar_type() == at::kFloat && masked_takes_winograd(g, c_in, c_out, c_out, rows);
  std::vector<float> wino_u, wino_bias;
  std::vector<std::unique_ptr<WinogradWork>> wino_work(static_cast<size_t>(wino ? slots() : 0));
  std::vector<std::vector<const float*>> wino_in(wino_work.size());
  std::vector<std::vector<float*>> wino_out(wino_work.size());
  if (wino) {
    const std::vector<int64_t> all_rows = iota(c_out);
    wino_u.resize(static_cast<size_t>(16 * c_out * c_in));
    winograd_pack_weights<float>(wc.const_data_ptr<float>(), c_in, all_rows.data(), c_out, chans.data(), c_in,
                                 wino_u.data());
    if (bc.defined()) wino_bias.assign(bc.const_data_ptr<float>(), bc.const_data_ptr<float>() + c_out);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slimops.masked_conv2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t ns = slots();
    std::vector<std::unique_ptr<ForwardWork<scalar_t, acc_t>>> work(static_cast<size_t>(ns));
    std::vector<std::vector<acc_t>> panels(static_cast<size_t>(ns));
    std::vector<std::vector<float>> dpanels(static_cast<size_t>(ns));
    const bool direct = std::is_same_v<acc_t, float> && direct_conv_applies(g, c_in);
    for_samples(g.n, [&](int64_t n, int64_t slot) {
      const auto& r = rows[n];
      const int64_t nr = static_cast<int64_t>(r.size());
      // Masked channels are exactly 0 (written here, so the output is touched once).
      scalar_t* yn = yp + n * c_out * g.ohw();
      for (int64_t j = 0, i = 0; j < c_out; ++j) {
        if (i < nr && r[i] == j) ++i;
        else std::fill_n(yn + j * g.ohw(), g.ohw(), scalar_t(0));
      }
      if (nr == 0) return;
      if (wino && winograd_masked_sample(nr, c_out)) {  // wino: float32 x, so scalar_t is float here
        auto& ww = wino_work[slot];
        if (!ww) ww = std::make_unique<WinogradWork>();
        auto& in = wino_in[slot];
        auto& out = wino_out[slot];
        const float* xf = reinterpret_cast<const float*>(xp + n * xr.stride);
        in.resize(static_cast<size_t>(c_in));
        for (int64_t i = 0; i < c_in; ++i) in[i] = xf + i * g.hw();
        out.assign(static_cast<size_t>(c_out), nullptr);  // the kept rows only
        for (const int64_t j : r) out[j] = reinterpret_cast<float*>(yn) + j * g.ohw();
        ww->run(in.data(), c_in, g, wino_u.data(), c_out, wino_bias.empty() ? nullptr : wino_bias.data(), out.data());
        return;
      }
      auto& w = work[slot];
      if (!w) {
        w = std::make_unique<ForwardWork<scalar_t, acc_t>>(g, c_in, c_out);
        if (direct) dpanels[slot].resize(static_cast<size_t>(direct_panel_size(c_out, c_in, taps)));
        else panels[slot].resize(static_cast<size_t>(c_out * k));
      }
      // Only this sample's kept rows are packed (and then computed).
      if (direct)
        pack_weight_direct<scalar_t>(wp, c_in, taps, r.data(), nr, chans.data(), c_in, dpanels[slot].data(),
                                     direct_paired());
      else pack_weight<scalar_t, acc_t>(wp, c_in, taps, r.data(), nr, chans.data(), c_in, panels[slot].data());
      w->run(xp + n * xr.stride, chans.data(), c_in, panels[slot].data(), direct ? dpanels[slot].data() : nullptr,
             nr, r.data(), nr == c_out, bp,
             r.data(), yp + n * c_out * g.ohw());
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  const ConvGeom g = prepare_masked(op, x, weight, std::nullopt, out_mask, stride, padding, dilation);
  const int64_t c_out = weight.size(0), c_in = weight.size(1), taps = g.taps(), k = c_in * taps;
  check_grad_out(op, grad_out, x, g, c_out);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  if (g.n > 0 && c_out > 0 && (need_x || need_w || need_b) && masked_conv_takes_onednn(x, out_mask, c_in))
    return masked_conv2d_backward_onednn(grad_out, x, weight, out_mask, g, output_mask);
  at::Tensor gx, gw, gb;  // not a structured binding: the dispatch lambdas below capture them
  std::tie(gx, gw, gb) = grad_buffers(x, weight, output_mask);
  if (g.n == 0 || c_out == 0 || !(need_x || need_w || need_b)) {
    if (need_x) gx.zero_();
    return {gx, gw, gb};
  }
  const SampleReader xr = sample_reader(x);
  const at::Tensor wc = weight.contiguous(), goc = grad_out.contiguous();
  const auto rows = rows_of_mask(out_mask);
  const std::vector<int64_t> chans = iota(c_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slimops.masked_conv2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    const int64_t ns = slots();
    // Per slot: a packed panel of this sample's rows, the full-size weight and bias accumulators (a
    // sample's rows are scattered into them), and a float image for the input gradient of low precision.
    std::vector<std::vector<acc_t>> panels(ns), gw_acc(ns), gb_acc(ns), gx_buf(ns), gw_rows(ns);
    std::vector<std::vector<float>> dpanels_t(ns);  // grad_x by the transposed direct convolution (direct_conv.h)
    const bool direct_x = std::is_same_v<acc_t, float> && need_x &&
                          (transposed_direct_applies(g) || strided_gx_applies(g));
    std::optional<GxPhases> gx_phases;  // a strided conv's grad_x by phases
    if (direct_x && !transposed_direct_applies(g)) gx_phases.emplace(g);
    // The direct weight gradient adds each sample's rows straight into the slot's full-size accumulator.
    const bool gw_in_place = std::is_same_v<acc_t, float> && need_w && direct_gw_applies(g);
    std::vector<std::unique_ptr<BackwardWork<scalar_t, acc_t>>> work(static_cast<size_t>(ns));
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* gop = goc.const_data_ptr<scalar_t>();
    // The transposed panel of every output row, once; each sample selects its kept rows from it.
    std::vector<float> dpanel_t_all;
    const bool paired_t = direct_paired();  // its row blocks, for the pack and the selections
    if (direct_x) {
      dpanel_t_all.resize(static_cast<size_t>(direct_panel_size(c_in, c_out, taps)));
      const std::vector<int64_t> all_rows = iota(c_out);
      if (gx_phases)
        pack_weight_direct_phased<scalar_t>(wp, c_in, taps, all_rows.data(), c_out, chans.data(), c_in, *gx_phases,
                                            dpanel_t_all.data(), paired_t);
      else
        pack_weight_direct_transposed<scalar_t>(wp, c_in, taps, all_rows.data(), c_out, chans.data(), c_in,
                                                dpanel_t_all.data(), paired_t);
    }
    // grad_x by Winograd F(2x2, 3x3) for the float32 samples that keep most rows (as the forward): the flipped
    // filters of every row, once; a sample's dropped rows are planes of zeros
    const bool wino_x = std::is_same_v<scalar_t, float> && need_x && masked_takes_winograd(g, c_out, c_in, c_out, rows);
    std::vector<float> wino_u_t;
    if (wino_x) {
      const std::vector<int64_t> all_rows = iota(c_out);
      wino_u_t.resize(static_cast<size_t>(16 * c_in * c_out));
      winograd_pack_weights<scalar_t>(wp, c_in, all_rows.data(), c_out, chans.data(), c_in, wino_u_t.data(), true);
    }
    const int64_t used = for_samples(g.n, [&](int64_t n, int64_t slot) {
      const auto& r = rows[n];
      const int64_t nr = static_cast<int64_t>(r.size());
      auto& w = work[slot];
      if (!w) {
        w = std::make_unique<BackwardWork<scalar_t, acc_t>>(g, c_in, c_out);
        if (gx_phases) w->gx_phases = &*gx_phases;
        panels[slot].resize(static_cast<size_t>(c_out * k));
        if (need_w) gw_acc[slot].assign(static_cast<size_t>(c_out * k), acc_t(0));
        if (need_w && !gw_in_place) gw_rows[slot].resize(c_out * k);
        if (need_b) gb_acc[slot].assign(static_cast<size_t>(c_out), acc_t(0));
        if (need_x && !same) gx_buf[slot].resize(static_cast<size_t>(c_in * g.hw()));
        if (direct_x) dpanels_t[slot].resize(static_cast<size_t>(direct_panel_size(c_in, c_out, taps)));
      }
      if (nr == 0) {  // nothing kept: this sample's input gradient is 0
        if (need_x) std::fill_n(gx.mutable_data_ptr<scalar_t>() + n * c_in * g.hw(), c_in * g.hw(), scalar_t(0));
        return;
      }
      w->load_dy(gop + n * c_out * g.ohw(), r.data(), nr);
      const bool wino_n = wino_x && winograd_masked_sample(nr, c_out);
      w->wino_u_t = wino_n ? wino_u_t.data() : nullptr, w->wino_k = c_out;
      if (need_x && !direct_x)  // the GEMM panel serves only grad_x's GEMM
        pack_weight<scalar_t, acc_t>(wp, c_in, taps, r.data(), nr, chans.data(), c_in, panels[slot].data());
      if (wino_n) {
        // grad_x by Winograd: no transposed panel to select
      } else if (direct_x && gx_phases)
        select_phased_panel_channels(dpanel_t_all.data(), c_in, c_out, *gx_phases, r.data(), nr,
                                     dpanels_t[slot].data(), paired_t);
      else if (direct_x)
        select_panel_channels(dpanel_t_all.data(), c_in, c_out, taps, r.data(), nr, dpanels_t[slot].data(), paired_t);
      acc_t* gx_n = nullptr;
      if (need_x) {
        if constexpr (same) gx_n = reinterpret_cast<acc_t*>(gx.mutable_data_ptr<scalar_t>()) + n * c_in * g.hw();
        else gx_n = gx_buf[slot].data();  // run writes every plane (all channels are kept inputs)
      }
      acc_t* gwr = nullptr;
      std::vector<acc_t> gbr(need_b ? nr : 0, acc_t(0));
      if (need_w && gw_in_place) {
        gwr = gw_acc[slot].data();
      } else if (need_w) {
        gwr = gw_rows[slot].data();
        std::fill_n(gwr, nr * k, acc_t(0));
      }
      w->run(xp + n * xr.stride, chans.data(), c_in, panels[slot].data(), direct_x ? dpanels_t[slot].data() : nullptr,
             nr, gx_n, gwr, need_b ? gbr.data() : nullptr, gw_in_place ? r.data() : nullptr);
      for (int64_t i = 0; i < nr; ++i) {
        if (need_w && !gw_in_place) {
          acc_t* d = gw_acc[slot].data() + r[i] * k;
          const acc_t* s = gwr + i * k;
          for (int64_t j = 0; j < k; ++j) d[j] += s[j];
        }
        if (need_b) gb_acc[slot][r[i]] += gbr[i];
      }
      if constexpr (!same) {
        if (need_x) {
          scalar_t* d = gx.mutable_data_ptr<scalar_t>() + n * c_in * g.hw();
          for (int64_t p = 0; p < c_in * g.hw(); ++p) d[p] = static_cast<scalar_t>(gx_n[p]);
        }
      }
    });
    if (need_w) {
      reduce_slots(gw_acc, used);
      scalar_t* d = gw.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < c_out * k; ++i) d[i] = static_cast<scalar_t>(gw_acc[0][i]);
    }
    if (need_b) {
      reduce_slots(gb_acc, used);
      scalar_t* d = gb.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < c_out; ++i) d[i] = static_cast<scalar_t>(gb_acc[0][i]);
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("channel_conv2d", &channel_conv2d_cpu);
  m.impl("channel_conv2d_backward", &channel_conv2d_backward_cpu);
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace slimops
