// CPU kernels of the quant family (schemas in csrc/registration.cpp, maths in docs/algorithms.md §9 and
// csrc/include/slimops/quant_math.h): fda_sign and its surrogate gradients, the LSQ fake quantiser and its
// gradients. fp32 math for fp32/bf16/fp16 storage, fp64 for fp64.
//
// fake_quantize_backward reduces the scale / zero-point gradients over fixed blocks of each channel (partial sums
// in double, added in block order): the result does not depend on the number of threads.
//
// The loops over a block (one grid) exist in three copies, picked at run time by cpu_isa() (isa.h): base x86-64,
// AVX2 and AVX-512, compiled from the same always-inline bodies with a target attribute. The reductions keep 16
// lane-wise partial sums so that they vectorise without reassociation flags. FMA contraction is off in this file:
// x * (1/s) must be rounded before it is rounded to a level (as torch's fake quantisers do), or a tie could round
// the other way on an FMA machine.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "fused_apply.h"
#include "isa.h"
#include "slimops/dispatch.h"
#include "slimops/quant_checks.h"
#include "slimops/quant_math.h"

#pragma GCC optimize("fp-contract=off")

namespace slimops {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;   // elements per task of the elementwise loops
constexpr int64_t kBlock = 1 << 13;   // elements per partial sum of the reductions

// Round half to even for |v| < 2^22 (float) / 2^51 (double) as two adds, which vectorise where nearbyint does not.
// Callers clamp v to a few steps around the grid first, so that the bound holds.
template <typename T>
inline T rne_near(T v) {
  const T magic = sizeof(T) == 4 ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^23, 1.5 * 2^52
  return (v + magic) - magic;
}

// ---- fake_quantize: the grids of a call, and its blocks ----------------------------------------------------------

// The per-channel grids of one call: scale and zero point read once (in the math type).
template <typename T>
std::vector<QuantGrid<T>> make_grids(const QuantGeom& g, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point) {
  const at::Tensor s = scale.reshape({-1}).to(at::kDouble).contiguous();
  at::Tensor z;
  if (zero_point.has_value()) z = zero_point->reshape({-1}).to(at::kDouble).contiguous();
  std::vector<QuantGrid<T>> grids(g.channels);
  const double* sp = s.const_data_ptr<double>();
  for (int64_t c = 0; c < g.channels; ++c) {
    T zc = 0;
    if (z.defined()) {  // in the math type first, then rounded (a float64 2.5 + 1e-10 is 2.5 in float32: level 2)
      zc = quant_rint(static_cast<T>(z.const_data_ptr<double>()[c]));
      zc = zc < T(g.qn) ? T(g.qn) : (zc > T(g.qp) ? T(g.qp) : zc);  // NaN stays NaN
    }
    const T sc = static_cast<T>(sp[c]);
    grids[c] = QuantGrid<T>{T(g.qn), T(g.qp), zc, sc, T(1) / sc};
  }
  return grids;
}

// Blocks of at most kBlock elements per row of x (a row: `inner` contiguous elements under one grid).
inline int64_t blocks_per_row(const QuantGeom& g) { return std::max<int64_t>(1, (g.inner + kBlock - 1) / kBlock); }

// Visits x as rows (outer * channels rows, one grid per row) cut into blocks_per_row blocks each: f(block index,
// row, first element, one past the last).
template <typename F>
void for_blocks(const QuantGeom& g, int64_t grain_blocks, const F& f) {
  const int64_t per_row = blocks_per_row(g);
  const int64_t rows = g.outer * g.channels;
  at::parallel_for(0, rows * per_row, grain_blocks, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t row = blk / per_row, part = blk % per_row;
      const int64_t lo = part * kBlock, hi = std::min(g.inner, lo + kBlock);
      f(blk, row, row * g.inner + lo, row * g.inner + hi);
    }
  });
}

inline int64_t grain_blocks(const QuantGeom& g) {
  const int64_t per_block = std::max<int64_t>(1, std::min(g.inner, kBlock));
  return std::max<int64_t>(1, kGrain / per_block);
}

// ---- the loops over one block (one grid), and their ISA copies --------------------------------------------------

// The integer level of v = x / s (clamped to one step outside the grid before rounding: the same levels, and
// rne_near's bound holds).
template <typename acc_t, bool kBinary>
SLIMOPS_ALWAYS_INLINE acc_t level_of(acc_t v, acc_t z, acc_t qn, acc_t qp, acc_t vlo, acc_t vhi) {
  if constexpr (kBinary) {
    return binary_sign(v);
  } else {
    v = v < vlo ? vlo : v;
    v = v > vhi ? vhi : v;
    acc_t lv = rne_near(v) + z;
    lv = lv < qn ? qn : lv;
    return lv > qp ? qp : lv;
  }
}

template <typename scalar_t, typename acc_t, bool kBinary>
SLIMOPS_ALWAYS_INLINE void fq_forward_block(const scalar_t* __restrict__ in, scalar_t* __restrict__ o, int64_t n,
                                            const QuantGrid<acc_t>& q) {
  const acc_t inv = q.inv_s, s = q.s, z = q.z, qn = q.qn, qp = q.qp, vlo = qn - z - 1, vhi = qp - z + 1;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t lv = level_of<acc_t, kBinary>(load<acc_t>(in[i]) * inv, z, qn, qp, vlo, vhi);
    put(o[i], (lv - z) * s);
  }
}

template <typename scalar_t, typename acc_t>
SLIMOPS_ALWAYS_INLINE void sign_block(const scalar_t* __restrict__ in, scalar_t* __restrict__ o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) put(o[i], binary_sign(load<acc_t>(in[i])));
}

// ---- FDA's surrogate in float, without libm: a loop that vectorises ----------------------------------------------
//
// cos_odd_sum (quant_math.h) calls sin twice and fmod once per element; glibc's sinf is scalar, so the float FDA
// backward ran at ~0.1 G elements/s on 2 threads, slower in bf16 than torch's own composite (whose sin is SLEEF's
// vector sin). Here the same closed form, sum_{i<n} cos((2i+1) d) = sin(2 n d) / (2 sin d) with u = k pi + d, in
// branch-free float arithmetic: rint by the 2^23 trick, sin by a reduction by pi (the same two-part pi as
// cos_odd_sum) and the odd Taylor polynomial to r^15/15! on [-pi/2, pi/2] (truncation below 1e-9). Measured against
// float64 over 10^6 draws, n 1..40: as close as the float32 reference's direct sum of cosines for |omega x| below
// 2^15 pi (where k pi_hi is exact; beyond it neither this nor the libm form reduces exactly). float64 keeps libm.

// Every value below is computed, then picked by select_bits (fused_apply.h): a float operation in the arm of a
// ?: may be moved under a branch, which GCC does not turn back into a select under -ftrapping-math (the default),
// and a branch keeps the loop scalar.
inline uint64_t mask_of(bool c) { return c ? ~uint64_t(0) : uint64_t(0); }

// Round half to even for any float: |t| < 2^23 by adding and subtracting 2^23 with t's sign; larger floats are
// integers already.
SLIMOPS_ALWAYS_INLINE float rint_float(float t) {
  const float m = std::copysign(8388608.0f, t);  // 2^23
  const float r = (t + m) - m;
  return select_bits(mask_of(std::fabs(t) < 8388608.0f), r, t);
}

// sin r for |r| <= pi/2 (+ a rounding): r + r^3 (-1/3! + r^2 (1/5! + ... r^2 (-1/15!))), Horner.
SLIMOPS_ALWAYS_INLINE float sin_half_period(float r) {
  const float r2 = r * r;
  float p = -7.6471637318198164759e-13f;     // -1/15!
  p = p * r2 + 1.6059043836821614599e-10f;   //  1/13!
  p = p * r2 - 2.5052108385441718775e-8f;    // -1/11!
  p = p * r2 + 2.7557319223985890653e-6f;    //  1/9!
  p = p * r2 - 1.9841269841269841270e-4f;    // -1/7!
  p = p * r2 + 8.3333333333333333333e-3f;    //  1/5!
  p = p * r2 - 1.6666666666666666667e-1f;    // -1/3!
  return r + r * r2 * p;
}

// 1 for an odd integer k, 0 for an even one (k a float integer).
SLIMOPS_ALWAYS_INLINE float odd_of(float k) {
  const float h = k * 0.5f;
  return rint_float(h) != h ? 1.0f : 0.0f;
}

constexpr float kInvPiF = 0.318309886183790671538f, kPiHiF = 3.140625f, kPiLoF = 9.67653589793e-4f;  // cos_odd_sum's

// sin v for any float v: reduced by pi (v = kv pi + rv), sin v = (-1)^kv sin rv.
SLIMOPS_ALWAYS_INLINE float sin_reduced(float v) {
  const float kv = rint_float(v * kInvPiF);
  const float rv = (v - kv * kPiHiF) - kv * kPiLoF;
  return sin_half_period(rv) * (1.0f - 2.0f * odd_of(kv));
}

SLIMOPS_ALWAYS_INLINE float fda_cos_odd_sum(float u, int n) {
  const float k = rint_float(u * kInvPiF);
  const float d = (u - k * kPiHiF) - k * kPiLoF;
  // sin d reduced again: |d| <= pi/2 only while k pi_hi is exact (|k| < 2^15); beyond, d is what cos_odd_sum (and
  // the Triton kernel) compute too, and its sine must still be right. For |d| <= pi/2 the reduction is exact (k 0).
  const float sd = sin_reduced(d);
  const float s2 = sin_reduced(static_cast<float>(2 * n) * d);
  const uint64_t at_zero = mask_of(sd == 0.0f);
  const float q = s2 / select_bits(at_zero, 1.0f, 2.0f * sd);
  const float r = select_bits(at_zero, static_cast<float>(n), q);
  return r * (1.0f - 2.0f * odd_of(k));
}

template <typename acc_t>
SLIMOPS_ALWAYS_INLINE acc_t surrogate_of(acc_t x, Surrogate S, int n_terms, acc_t w, acc_t fwp, acc_t c) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (S == Surrogate::kFda) {  // sign_surrogate's kFda case, clip and NaN rule, with the float closed form
      const float full = fwp * fda_cos_odd_sum(w * x, n_terms);
      const float d = select_bits(mask_of(std::fabs(x) <= c), full, 0.0f);
      return select_bits(mask_of(x != x), x, d);
    }
  }
  return sign_surrogate<acc_t>(x, S, n_terms, w, fwp, c);
}

template <typename scalar_t, typename acc_t, Surrogate S>
SLIMOPS_ALWAYS_INLINE void surrogate_block(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ o, int64_t n, int n_terms, acc_t w, acc_t fwp,
                                           acc_t c) {
  for (int64_t i = 0; i < n; ++i)
    put(o[i], load<acc_t>(g[i]) * surrogate_of<acc_t>(load<acc_t>(x[i]), S, n_terms, w, fwp, c));
}

constexpr int kLanes = 16;  // partial sums per reduction: one AVX-512 register of floats

// One element of the backward. Branch-free: `inside` as a bitwise & of the two compares (the short-circuit && of
// QuantGrid::inside is a branch per element, and a branch keeps the 16-lane loop below scalar; it ran at ~0.1 G
// elements/s), the selects on it as selects of values. The sums get the same terms as before: x - 0 == x.
template <typename scalar_t, typename acc_t, bool kBinary, bool kWantX, bool kWantS, bool kWantZ>
SLIMOPS_ALWAYS_INLINE void fq_backward_element(const scalar_t* __restrict__ xin, const scalar_t* __restrict__ gin,
                                               scalar_t* __restrict__ ox, int64_t i, acc_t inv_s, acc_t s, acc_t z,
                                               acc_t qn, acc_t qp, acc_t vlo, acc_t vhi, acc_t& ds, acc_t& dz) {
  const acc_t v = load<acc_t>(xin[i]) * inv_s;
  const acc_t gi = load<acc_t>(gin[i]);
  const acc_t vz = v + z;
  const bool in = (vz >= qn) & (vz <= qp);  // QuantGrid::inside, without the branch
  if constexpr (kWantX) put(ox[i], in ? gi : acc_t(0));
  if constexpr (kWantS) {
    const acc_t lv = level_of<acc_t, kBinary>(v, z, qn, qp, vlo, vhi);
    ds += gi * ((lv - z) - (in ? v : acc_t(0)));
  }
  if constexpr (kWantZ) dz += in ? acc_t(0) : -gi * s;
}

template <typename scalar_t, typename acc_t, bool kBinary, bool kWantX, bool kWantS, bool kWantZ>
SLIMOPS_ALWAYS_INLINE void fq_backward_block(const scalar_t* __restrict__ xin, const scalar_t* __restrict__ gin,
                                             scalar_t* __restrict__ ox, int64_t n, const QuantGrid<acc_t>& q,
                                             acc_t& ds_out, acc_t& dz_out) {
  const acc_t inv_s = q.inv_s, s = q.s, z = q.z, qn = q.qn, qp = q.qp, vlo = qn - z - 1, vhi = qp - z + 1;
  acc_t ds[kLanes] = {}, dz[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l)
      fq_backward_element<scalar_t, acc_t, kBinary, kWantX, kWantS, kWantZ>(xin, gin, ox, i + l, inv_s, s, z, qn, qp,
                                                                            vlo, vhi, ds[l], dz[l]);
  }
  for (int l = 0; i < n; ++i, ++l)
    fq_backward_element<scalar_t, acc_t, kBinary, kWantX, kWantS, kWantZ>(xin, gin, ox, i, inv_s, s, z, qn, qp, vlo,
                                                                          vhi, ds[l], dz[l]);
  acc_t ts = 0, tz = 0;
  for (int l = 0; l < kLanes; ++l) ts += ds[l], tz += dz[l];
  ds_out = ts;
  dz_out = tz;
}

// The block functions of one instruction set: NAME##_forward / NAME##_backward, compiled with ATTR.
#define SLIMOPS_QUANT_COPY(NAME, ATTR)                                                                            \
  template <typename scalar_t, typename acc_t, bool kBinary>                                                      \
  ATTR void NAME##_forward(const scalar_t* in, scalar_t* o, int64_t n, const QuantGrid<acc_t>& q) {               \
    fq_forward_block<scalar_t, acc_t, kBinary>(in, o, n, q);                                                      \
  }                                                                                                               \
  template <typename scalar_t, typename acc_t, bool kBinary, bool kWantX, bool kWantS, bool kWantZ>               \
  ATTR void NAME##_backward(const scalar_t* xin, const scalar_t* gin, scalar_t* ox, int64_t n,                    \
                            const QuantGrid<acc_t>& q, acc_t& ds, acc_t& dz) {                                    \
    fq_backward_block<scalar_t, acc_t, kBinary, kWantX, kWantS, kWantZ>(xin, gin, ox, n, q, ds, dz);              \
  }                                                                                                               \
  template <typename scalar_t, typename acc_t>                                                                    \
  ATTR void NAME##_sign(const scalar_t* in, scalar_t* o, int64_t n) {                                             \
    sign_block<scalar_t, acc_t>(in, o, n);                                                                        \
  }                                                                                                               \
  template <typename scalar_t, typename acc_t, Surrogate S>                                                       \
  ATTR void NAME##_surrogate(const scalar_t* g, const scalar_t* x, scalar_t* o, int64_t n, int n_terms, acc_t w,  \
                             acc_t fwp, acc_t c) {                                                                \
    surrogate_block<scalar_t, acc_t, S>(g, x, o, n, n_terms, w, fwp, c);                                          \
  }

SLIMOPS_QUANT_COPY(base, )
#if defined(__x86_64__) && defined(__GNUC__)
#define SLIMOPS_HAS_ISA_COPIES 1
SLIMOPS_QUANT_COPY(avx2, __attribute__((target("avx2"))))
SLIMOPS_QUANT_COPY(avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))))
#endif

// The copy of block function FN<...> for this CPU (a function pointer).
#ifdef SLIMOPS_HAS_ISA_COPIES
#define SLIMOPS_PICK_COPY(FN, ...)                                                                                \
  (cpu_isa() == CpuIsa::kAvx512 ? &avx512_##FN<__VA_ARGS__>                                                       \
                                : cpu_isa() == CpuIsa::kAvx2 ? &avx2_##FN<__VA_ARGS__> : &base_##FN<__VA_ARGS__>)
#else
#define SLIMOPS_PICK_COPY(FN, ...) (&base_##FN<__VA_ARGS__>)
#endif

// ---- fda_sign -------------------------------------------------------------------------------------------------

at::Tensor fda_sign_cpu(const at::Tensor& x, int64_t n_terms, double omega, c10::string_view surrogate, double clip) {
  check_fda_sign("fda_sign", x, n_terms, omega, surrogate, clip);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fda_sign", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const auto block = SLIMOPS_PICK_COPY(sign, scalar_t, acc_t);
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t b, int64_t e) { block(in + b, o + b, e - b); });
  });
  return out;
}

at::Tensor fda_sign_backward_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t n_terms, double omega,
                                 c10::string_view surrogate, double clip) {
  const char* op = "fda_sign_backward";
  const Surrogate s = check_fda_sign(op, x, n_terms, omega, surrogate, clip);
  check_quant_grad(op, grad, x);
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(xc);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fda_sign_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = omega, fwp = 4.0 * omega / M_PI;
    const acc_t c = clip;  // inf (no clipping) stays inf
    const int n = static_cast<int>(n_terms);
    const scalar_t* xin = xc.const_data_ptr<scalar_t>();
    const scalar_t* gin = gc.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_surrogate(s, [&](auto kind) {  // the surrogate is a constant of the loop
      const auto block = SLIMOPS_PICK_COPY(surrogate, scalar_t, acc_t, decltype(kind)::value);
      at::parallel_for(0, xc.numel(), kGrain, [&](int64_t b, int64_t e) {
        block(gin + b, xin + b, o + b, e - b, n, w, fwp, c);
      });
    });
  });
  return out;
}

// ---- fake_quantize ----------------------------------------------------------------------------------------------

at::Tensor fake_quantize_cpu(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                             int64_t bits, std::optional<int64_t> per_channel_axis, bool is_signed,
                             double grad_factor) {
  const QuantGeom g =
      check_fake_quantize("fake_quantize", x, scale, zero_point, bits, per_channel_axis, is_signed, grad_factor);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fake_quantize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grids = make_grids<acc_t>(g, scale, zero_point);
    const scalar_t* __restrict__ in = xc.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ o = out.data_ptr<scalar_t>();
    dispatch_bool(g.binary, [&](auto kBinary) {
      const auto block = SLIMOPS_PICK_COPY(forward, scalar_t, acc_t, decltype(kBinary)::value);
      for_blocks(g, grain_blocks(g), [&](int64_t, int64_t row, int64_t lo, int64_t hi) {
        block(in + lo, o + lo, hi - lo, grids[row % g.channels]);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
    int64_t bits, std::optional<int64_t> per_channel_axis, bool is_signed, double grad_factor,
    std::array<bool, 3> output_mask) {
  const char* op = "fake_quantize_backward";
  const QuantGeom g = check_fake_quantize(op, x, scale, zero_point, bits, per_channel_axis, is_signed, grad_factor);
  check_quant_grad(op, grad, x);
  const bool want_x = output_mask[0], want_s = output_mask[1], want_z = output_mask[2] && zero_point.has_value();
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  at::Tensor gx = want_x ? at::empty_like(xc) : x.new_empty({0});
  at::Tensor gs = want_s ? at::empty_like(scale, at::MemoryFormat::Contiguous) : scale.new_empty({0});
  at::Tensor gz = want_z ? at::empty_like(*zero_point, at::MemoryFormat::Contiguous)
                         : (zero_point.has_value() ? *zero_point : scale).new_empty({0});
  if (!want_x && !want_s && !want_z) return {gx, gs, gz};
  const int64_t per_row = blocks_per_row(g);
  const int64_t n_blocks = g.outer * g.channels * per_row;
  std::vector<double> ds_part(want_s ? n_blocks : 0, 0.0), dz_part(want_z ? n_blocks : 0, 0.0);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fake_quantize_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grids = make_grids<acc_t>(g, scale, zero_point);
    const scalar_t* xin = xc.const_data_ptr<scalar_t>();
    const scalar_t* gin = gc.const_data_ptr<scalar_t>();
    scalar_t* ox = want_x ? gx.data_ptr<scalar_t>() : nullptr;
    // The options are compile-time constants of the block loop (no branch on them per element).
    dispatch_bool(g.binary, [&](auto kB) {
      dispatch_bool(want_x, [&](auto kX) {
        dispatch_bool(want_s, [&](auto kS) {
          dispatch_bool(want_z, [&](auto kZ) {
            const auto block = SLIMOPS_PICK_COPY(backward, scalar_t, acc_t, decltype(kB)::value, decltype(kX)::value,
                                                 decltype(kS)::value, decltype(kZ)::value);
            for_blocks(g, grain_blocks(g), [&](int64_t blk, int64_t row, int64_t lo, int64_t hi) {
              acc_t ds = 0, dz = 0;
              block(xin + lo, gin + lo, ox ? ox + lo : nullptr, hi - lo, grids[row % g.channels], ds, dz);
              if (want_s) ds_part[blk] = static_cast<double>(ds);
              if (want_z) dz_part[blk] = static_cast<double>(dz);
            });
          });
        });
      });
    });
  });
  // Per channel: the blocks of its rows, in order.
  auto reduce = [&](const std::vector<double>& part, at::Tensor& out) {
    std::vector<double> acc(g.channels, 0.0);
    for (int64_t blk = 0; blk < n_blocks; ++blk) acc[(blk / per_row) % g.channels] += part[blk];
    at::Tensor t = at::empty({g.channels}, at::TensorOptions().dtype(at::kDouble));
    double* tp = t.data_ptr<double>();
    for (int64_t c = 0; c < g.channels; ++c) tp[c] = acc[c] * grad_factor;
    out.copy_(t.reshape(out.sizes()));
  };
  if (want_s) reduce(ds_part, gs);
  if (want_z) reduce(dz_part, gz);
  return {gx, gs, gz};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("fda_sign", &fda_sign_cpu);
  m.impl("fda_sign_backward", &fda_sign_backward_cpu);
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
}

}  // namespace cpu
}  // namespace slimops
