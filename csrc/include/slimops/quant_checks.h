// Argument checks of the quant family (fda_sign, fake_quantize and their backwards): "slimops.<op>: <argument> ..."
// (ValueError / TypeError), the same conditions and words as slimops/opdefs/quant.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

#include "slimops/checks.h"
#include "slimops/quant_math.h"

namespace slimops {

constexpr int64_t kMaxTerms = 10000;  // slimops.opdefs.quant.MAX_TERMS
constexpr int64_t kMaxBits = 16;      // slimops.opdefs.quant.MAX_BITS

inline void check_strided_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "slimops.", op, ": ", arg, " must be a strided (dense) tensor, got layout ",
                    t.layout());
  check_floating(op, arg, t);
}

inline Surrogate check_fda_sign(const char* op, const at::Tensor& x, int64_t n_terms, double omega,
                                c10::string_view surrogate, double clip) {
  check_strided_floating(op, "x", x);
  TORCH_CHECK_VALUE(n_terms >= 1 && n_terms <= kMaxTerms, "slimops.", op, ": n_terms must be in [1, ", kMaxTerms,
                    "], got ", n_terms);
  TORCH_CHECK_VALUE(std::isfinite(omega) && omega > 0, "slimops.", op, ": omega must be finite and > 0, got ", omega);
  Surrogate s;
  if (surrogate == "fda") s = Surrogate::kFda;
  else if (surrogate == "ste") s = Surrogate::kSte;
  else if (surrogate == "tanh") s = Surrogate::kTanh;
  else if (surrogate == "approx_sign") s = Surrogate::kApproxSign;
  else TORCH_CHECK_VALUE(false, "slimops.", op, ": unknown surrogate '", std::string(surrogate),
                         "' (expected one of: fda, ste, tanh, approx_sign)");
  TORCH_CHECK_VALUE(clip > 0, "slimops.", op, ": clip must be > 0 (inf for none), got ", clip);
  return s;
}

// Calls f(std::integral_constant<Surrogate, S>{}): the surrogate is a compile-time constant of the kernel's loop.
template <typename F>
void dispatch_surrogate(Surrogate s, const F& f) {
  switch (s) {
    case Surrogate::kFda: f(std::integral_constant<Surrogate, Surrogate::kFda>{}); break;
    case Surrogate::kSte: f(std::integral_constant<Surrogate, Surrogate::kSte>{}); break;
    case Surrogate::kTanh: f(std::integral_constant<Surrogate, Surrogate::kTanh>{}); break;
    default: f(std::integral_constant<Surrogate, Surrogate::kApproxSign>{}); break;
  }
}

inline void check_quant_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  check_strided_floating(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.device() == x.device(), "slimops.", op, ": grad is on ", grad.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "slimops.", op, ": grad has shape ", grad.sizes(), " but x has shape ",
                    x.sizes());
}

// The geometry of one fake_quantize call: x seen as (outer, channels, inner) contiguous, one scale per channel.
struct QuantGeom {
  int64_t outer, channels, inner;
  double qn, qp;
  bool binary;
};

inline QuantGeom check_fake_quantize(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, int64_t bits,
                                     std::optional<int64_t> per_channel_axis, bool is_signed, double grad_factor) {
  check_strided_floating(op, "x", x);
  TORCH_CHECK_VALUE(bits >= 1 && bits <= kMaxBits, "slimops.", op, ": bits must be in [1, ", kMaxBits, "], got ", bits);
  TORCH_CHECK_VALUE(std::isfinite(grad_factor), "slimops.", op, ": grad_factor must be finite, got ", grad_factor);
  int64_t axis = -1;
  if (per_channel_axis.has_value()) {
    const int64_t a = *per_channel_axis, d = x.dim();
    TORCH_CHECK_VALUE(a >= -d && a < d, "slimops.", op, ": per_channel_axis ", a, " is out of range for x of ", d,
                      " dims");
    axis = a < 0 ? a + d : a;
  }
  const int64_t n_scales = axis < 0 ? 1 : x.size(axis);
  auto check_param = [&](const char* arg, const at::Tensor& t) {
    check_strided_floating(op, arg, t);
    TORCH_CHECK_VALUE(t.device() == x.device(), "slimops.", op, ": ", arg, " is on ", t.device(), " but x is on ",
                      x.device());
    if (axis < 0) {
      TORCH_CHECK_VALUE(t.numel() == 1, "slimops.", op, ": ", arg,
                        " must hold one value per tensor (per_channel_axis=None), got shape ", t.sizes());
    } else {
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n_scales, "slimops.", op, ": ", arg, " must have shape (",
                        n_scales, ",): one value per slice of x along per_channel_axis ", axis, ", got ", t.sizes());
    }
  };
  check_param("scale", scale);
  if (zero_point.has_value()) check_param("zero_point", *zero_point);
  TORCH_CHECK_VALUE(!(zero_point.has_value() && is_signed && bits == 1), "slimops.", op,
                    ": zero_point must be None for the signed 1-bit grid {-1, +1}");
  QuantGeom g;
  g.channels = n_scales;
  g.outer = 1;
  g.inner = 1;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (axis < 0 || d > axis) g.inner *= x.size(d);
    else if (d < axis) g.outer *= x.size(d);
  }
  g.binary = is_signed && bits == 1;
  if (g.binary) g.qn = -1, g.qp = 1;
  else if (is_signed) g.qn = -std::ldexp(1.0, static_cast<int>(bits) - 1), g.qp = std::ldexp(1.0, static_cast<int>(bits) - 1) - 1;
  else g.qn = 0, g.qp = std::ldexp(1.0, static_cast<int>(bits)) - 1;
  return g;
}

}  // namespace slimops
