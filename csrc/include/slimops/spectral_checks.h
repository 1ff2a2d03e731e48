// Argument checks of the spectral family (spectral_filter, adaptive_spectral_filter and their backwards),
// shared by the CPU and CUDA kernels: "slimops.<op>: <argument> ..." (ValueError / TypeError), the same
// conditions as slimops/ops/spectral.py checks in Python.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "slimops/checks.h"

namespace slimops {

// The grid of a spectral call: x (B, H, W, C) channels last; the half spectrum has W/2 + 1 columns.
struct SpectralGeom {
  int64_t b, h, w, c, wr;
};

inline void check_real_float(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(!t.is_complex(), "slimops.", op, ": ", arg,
                   " must be real (for a complex filter pass torch.view_as_real(filter)), got ", t.scalar_type());
  check_floating(op, arg, t);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "slimops.", op, ": ", arg, " must be a strided (dense) tensor");
  TORCH_CHECK_VALUE(t.device() == x.device(), "slimops.", op, ": ", arg, " is on ", t.device(), " but x is on ",
                    x.device());
}

inline SpectralGeom spectral_geometry(const char* op, const at::Tensor& x) {
  check_real_float(op, "x", x, x);
  TORCH_CHECK_VALUE(x.dim() == 4, "slimops.", op, ": x must be 4-D (B, H, W, C), channels last, got shape ",
                    x.sizes());
  const SpectralGeom g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2 + 1};
  TORCH_CHECK_VALUE(g.h >= 1 && g.w >= 1 && g.c >= 1, "slimops.", op, ": x must have H, W, C >= 1, got shape ",
                    x.sizes());
  return g;
}

inline void check_shape(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef want,
                        const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == want, "slimops.", op, ": ", arg, " must have shape ", what, " = ", want, ", got ",
                    t.sizes());
}

inline SpectralGeom check_spectral_filter(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  const SpectralGeom g = spectral_geometry(op, x);
  check_real_float(op, "weight", weight, x);
  TORCH_CHECK_VALUE(!(weight.dim() == 4 && weight.size(3) == 2 && weight.size(2) != g.c), "slimops.", op,
                    ": weight has ", weight.dim() == 4 ? weight.size(2) : 0, " channels but x has ", g.c);
  check_shape(op, "weight", weight, {g.h, g.wr, g.c, 2}, "(H, W//2+1, C, 2)");
  return g;
}

// Returns the hidden size per block (Hb) of the AFF weights w1 (2, k, C/k, Hb), b1 (2, k, Hb),
// w2 (2, k, Hb, C/k), b2 (2, k, C/k).
inline int64_t check_adaptive(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                              const at::Tensor& w2, const at::Tensor& b2, int64_t blocks, double shrink,
                              SpectralGeom* geom = nullptr) {
  const SpectralGeom g = spectral_geometry(op, x);
  TORCH_CHECK_VALUE(blocks >= 1, "slimops.", op, ": blocks must be a positive int, got ", blocks);
  TORCH_CHECK_VALUE(g.c % blocks == 0, "slimops.", op, ": blocks (", blocks, ") must divide the channels of x (",
                    g.c, ")");
  TORCH_CHECK_VALUE(std::isfinite(shrink) && shrink >= 0, "slimops.", op, ": shrink must be a finite float >= 0, got ",
                    shrink);
  check_real_float(op, "w1", w1, x);
  check_real_float(op, "b1", b1, x);
  check_real_float(op, "w2", w2, x);
  check_real_float(op, "b2", b2, x);
  const int64_t cb = g.c / blocks;
  TORCH_CHECK_VALUE(w1.dim() == 4, "slimops.", op, ": w1 must be 4-D (2, blocks, C/blocks, hidden/blocks), got shape ",
                    w1.sizes());
  TORCH_CHECK_VALUE(w1.size(1) == blocks, "slimops.", op, ": w1 has ", w1.size(1), " blocks but blocks=", blocks);
  TORCH_CHECK_VALUE(w1.size(2) == cb, "slimops.", op, ": w1 has ", w1.size(2), " channels per block but x has ", g.c,
                    " channels in ", blocks, " blocks (", cb, " each)");
  const int64_t hb = w1.size(3);
  TORCH_CHECK_VALUE(hb >= 1, "slimops.", op, ": w1 must have a hidden size >= 1");
  check_shape(op, "w1", w1, {2, blocks, cb, hb}, "(2, blocks, C/blocks, hidden/blocks)");
  check_shape(op, "b1", b1, {2, blocks, hb}, "(2, blocks, hidden/blocks)");
  check_shape(op, "w2", w2, {2, blocks, hb, cb}, "(2, blocks, hidden/blocks, C/blocks)");
  check_shape(op, "b2", b2, {2, blocks, cb}, "(2, blocks, C/blocks)");
  if (geom) *geom = g;
  return hb;
}

inline void check_spectral_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  check_real_float(op, "grad", grad, x);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "slimops.", op, ": grad must have the shape of x ", x.sizes(),
                    ", got ", grad.sizes());
}

}  // namespace slimops
