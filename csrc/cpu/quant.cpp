// CPU kernels of the quant family (schemas in csrc/registration.cpp, maths in docs/algorithms.md §9 and
// csrc/include/slimops/quant_math.h): fda_sign and its surrogate gradients, the LSQ fake quantiser and its
// gradients. fp32 math for fp32/bf16/fp16 storage, fp64 for fp64.
//
// fake_quantize_backward reduces the scale / zero-point gradients over fixed blocks of each channel (partial sums
// in double, added in block order): the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "fused_apply.h"
#include "slimops/dispatch.h"
#include "slimops/quant_checks.h"
#include "slimops/quant_math.h"

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

// ---- fda_sign -------------------------------------------------------------------------------------------------

at::Tensor fda_sign_cpu(const at::Tensor& x, int64_t n_terms, double omega, c10::string_view surrogate, double clip) {
  check_fda_sign("fda_sign", x, n_terms, omega, surrogate, clip);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fda_sign", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ in = xc.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ o = out.data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t v = load<acc_t>(in[i]);
        // sign(0) = -1; NaN stays NaN (v + 0 keeps its payload)
        put(o[i], v > acc_t(0) ? acc_t(1) : (v != v ? v : acc_t(-1)));
      }
    });
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
    const acc_t c = std::isinf(clip) ? std::numeric_limits<acc_t>::infinity() : acc_t(clip);
    const int n = static_cast<int>(n_terms);
    const scalar_t* __restrict__ xin = xc.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ gin = gc.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ o = out.data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t b, int64_t e) {
      auto run = [&](auto kind) {
        constexpr Surrogate k = decltype(kind)::value;  // the surrogate is a constant of the loop
        for (int64_t i = b; i < e; ++i) {
          put(o[i], load<acc_t>(gin[i]) * sign_surrogate<acc_t>(load<acc_t>(xin[i]), k, n, w, fwp, c));
        }
      };
      dispatch_surrogate(s, run);
    });
  });
  return out;
}

// ---- fake_quantize ----------------------------------------------------------------------------------------------

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
    double zc = 0;
    if (z.defined()) {
      zc = std::nearbyint(z.const_data_ptr<double>()[c]);
      zc = zc < g.qn ? g.qn : (zc > g.qp ? g.qp : zc);  // NaN stays NaN
    }
    const T sc = static_cast<T>(sp[c]);
    grids[c] = QuantGrid<T>{T(g.qn), T(g.qp), T(zc), sc, T(1) / sc, g.binary};
  }
  return grids;
}

// Visits x as rows (outer * channels rows of `inner` contiguous elements, one grid per row) cut into blocks of at
// most kBlock elements: f(block index, row, first element, one past the last).
template <typename F>
void for_blocks(const QuantGeom& g, int64_t grain_blocks, const F& f) {
  const int64_t per_row = std::max<int64_t>(1, (g.inner + kBlock - 1) / kBlock);
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
    for_blocks(g, grain_blocks(g), [&](int64_t, int64_t row, int64_t lo, int64_t hi) {
      const QuantGrid<acc_t> q = grids[row % g.channels];
      if (q.binary) {
        for (int64_t i = lo; i < hi; ++i) put(o[i], binary_sign(load<acc_t>(in[i]) * q.inv_s) * q.s);
        return;
      }
      // v clamped to one step outside the grid before rounding: same levels, and rne_near's bound holds.
      const acc_t vlo = q.qn - q.z - 1, vhi = q.qp - q.z + 1;
      for (int64_t i = lo; i < hi; ++i) {
        acc_t v = load<acc_t>(in[i]) * q.inv_s;
        v = v < vlo ? vlo : v;
        v = v > vhi ? vhi : v;
        acc_t lv = rne_near(v) + q.z;
        lv = lv < q.qn ? q.qn : lv;
        lv = lv > q.qp ? q.qp : lv;
        put(o[i], (lv - q.z) * q.s);
      }
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
  const int64_t per_row = std::max<int64_t>(1, (g.inner + kBlock - 1) / kBlock);
  const int64_t n_blocks = g.outer * g.channels * per_row;
  std::vector<double> ds_part(want_s ? n_blocks : 0, 0.0), dz_part(want_z ? n_blocks : 0, 0.0);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fake_quantize_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grids = make_grids<acc_t>(g, scale, zero_point);
    const scalar_t* __restrict__ xin = xc.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ gin = gc.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ ox = want_x ? gx.data_ptr<scalar_t>() : nullptr;
    for_blocks(g, grain_blocks(g), [&](int64_t blk, int64_t row, int64_t lo, int64_t hi) {
      const QuantGrid<acc_t> q = grids[row % g.channels];
      const acc_t vlo = q.qn - q.z - 1, vhi = q.qp - q.z + 1;
      acc_t ds = 0, dz = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t v = load<acc_t>(xin[i]) * q.inv_s;
        const acc_t gi = load<acc_t>(gin[i]);
        acc_t lv;
        if (q.binary) {
          lv = binary_sign(v);
        } else {
          acc_t vc = v < vlo ? vlo : v;
          vc = vc > vhi ? vhi : vc;
          lv = rne_near(vc) + q.z;
          lv = lv < q.qn ? q.qn : lv;
          lv = lv > q.qp ? q.qp : lv;
        }
        const bool in = q.inside(v);
        if (ox) put(ox[i], in ? gi : acc_t(0));
        ds += gi * (in ? (lv - q.z) - v : lv - q.z);
        dz += in ? acc_t(0) : -gi * q.s;
      }
      if (want_s) ds_part[blk] = static_cast<double>(ds);
      if (want_z) dz_part[blk] = static_cast<double>(dz);
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
