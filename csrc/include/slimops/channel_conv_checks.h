// Argument checks and geometry of the channel_conv family (channel_conv2d, masked_conv2d), shared by
// the CPU kernels and any device kernel: "slimops.<op>: <argument> ..." (ValueError / TypeError).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "slimops/checks.h"

namespace slimops {

// Everything a direct conv needs about one call: the input grid, kernel, stride/padding/dilation and
// the output grid. `cx` is the channel count of the x tensor as passed (compact when input_gathered).
struct ConvGeom {
  int64_t n, cx, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
  int64_t ohw() const { return oh * ow; }
  int64_t hw() const { return h * w; }
  int64_t taps() const { return kh * kw; }
};

inline int64_t pair_at(const char* op, const char* arg, at::IntArrayRef v, int i) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, "slimops.", op, ": ", arg,
                    " must be an int or a pair of ints, got ", v);
  return v.size() == 1 ? v[0] : v[i];
}

// Checks x (N, C, H, W), weight (C_out, C_in, kh, kw) and bias, and returns the conv geometry.
inline ConvGeom conv_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "slimops.", op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, "slimops.", op, ": weight must be 4-D (C_out, C_in, kh, kw), got shape ",
                    weight.sizes());
  check_floating(op, "x", x);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "slimops.", op, ": weight has dtype ",
                   weight.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "slimops.", op, ": weight is on ", weight.device(),
                    " but x is on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "slimops.", op,
                      ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "slimops.", op, ": bias has dtype ",
                     bias->scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "slimops.", op, ": bias is on ", bias->device(),
                      " but x is on ", x.device());
  }
  ConvGeom g;
  g.n = x.size(0), g.cx = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.kh = weight.size(2), g.kw = weight.size(3);
  g.sh = pair_at(op, "stride", stride, 0), g.sw = pair_at(op, "stride", stride, 1);
  g.ph = pair_at(op, "padding", padding, 0), g.pw = pair_at(op, "padding", padding, 1);
  g.dh = pair_at(op, "dilation", dilation, 0), g.dw = pair_at(op, "dilation", dilation, 1);
  TORCH_CHECK_VALUE(g.sh > 0 && g.sw > 0, "slimops.", op, ": stride must be > 0, got ", stride);
  TORCH_CHECK_VALUE(g.ph >= 0 && g.pw >= 0, "slimops.", op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(g.dh > 0 && g.dw > 0, "slimops.", op, ": dilation must be > 0, got ", dilation);
  TORCH_CHECK_VALUE(g.kh > 0 && g.kw > 0, "slimops.", op, ": weight must have a non-empty kernel, got shape ",
                    weight.sizes());
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 && g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0,
                    "slimops.", op, ": the input grid ", g.h, "x", g.w, " (padding ", padding, ") is smaller than the ",
                    "dilated kernel ", g.kh, "x", g.kw, " (dilation ", dilation, ")");
  return g;
}

// A 1-D integer index set: values in [0, limit), no repeats. Returns it as contiguous int64 on the CPU
// (the CPU kernels read it directly; a device kernel checks on its own device).
inline at::Tensor checked_index(const char* op, const char* arg, const at::Tensor& idx, int64_t limit,
                                const char* what, const at::Device& device) {
  TORCH_CHECK_TYPE(!at::isFloatingType(idx.scalar_type()) && !at::isComplexType(idx.scalar_type()) &&
                       idx.scalar_type() != at::kBool,
                   "slimops.", op, ": ", arg, " must be an integer tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1, "slimops.", op, ": ", arg, " must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.device() == device, "slimops.", op, ": ", arg, " is on ", idx.device(), " but x is on ",
                    device);
  at::Tensor i64 = idx.to(at::kLong).contiguous();
  if (i64.device().is_cpu()) {
    const int64_t* p = i64.const_data_ptr<int64_t>();
    std::vector<char> seen(static_cast<size_t>(limit), 0);
    for (int64_t k = 0; k < i64.numel(); ++k) {
      TORCH_CHECK_VALUE(p[k] >= 0 && p[k] < limit, "slimops.", op, ": ", arg, "[", k, "] = ", p[k],
                        " is out of range for ", limit, " ", what);
      TORCH_CHECK_VALUE(!seen[p[k]], "slimops.", op, ": ", arg, " holds ", p[k], " more than once");
      seen[p[k]] = 1;
    }
  }
  return i64;
}

// out_mask: (N, C_out) bool on x's device.
inline void check_out_mask(const char* op, const at::Tensor& mask, int64_t n, int64_t c_out, const at::Device& device) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "slimops.", op, ": out_mask must be a bool tensor, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == n && mask.size(1) == c_out, "slimops.", op,
                    ": out_mask must have shape (N, C_out) = (", n, ", ", c_out, "), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == device, "slimops.", op, ": out_mask is on ", mask.device(), " but x is on ",
                    device);
}

}  // namespace slimops
