// Argument checks of the distill family (feature_affinity_loss and its backward): "slimops.<op>: <argument> ..."
// (ValueError / TypeError), the same conditions and words as slimops/opdefs/distill.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

#include "slimops/checks.h"

namespace slimops {

struct AffinityGeom {
  int64_t b, cs, ct, h, w, hw, k;  // k = 0: the exact loss
  bool l1;                         // norm "l1" (|.|), else "l2sq" ((.)^2)
};

inline void check_affinity_tensor(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "slimops.", op, ": ", arg, " must be a strided (dense) tensor, got layout ",
                    t.layout());
  check_floating(op, arg, t);
}

inline AffinityGeom check_feature_affinity(const char* op, const at::Tensor& fs, const at::Tensor& ft,
                                           const std::optional<at::Tensor>& proj, c10::string_view norm) {
  check_affinity_tensor(op, "fs", fs);
  check_affinity_tensor(op, "ft", ft);
  TORCH_CHECK_VALUE(fs.dim() == 4, "slimops.", op, ": fs must be 4-D (B, C, H, W), got shape ", fs.sizes());
  TORCH_CHECK_VALUE(ft.dim() == 4, "slimops.", op, ": ft must be 4-D (B, C, H, W), got shape ", ft.sizes());
  TORCH_CHECK_TYPE(ft.scalar_type() == fs.scalar_type(), "slimops.", op, ": ft has dtype ", ft.scalar_type(),
                   " but fs has dtype ", fs.scalar_type(), "; the features must share one dtype");
  TORCH_CHECK_VALUE(ft.device() == fs.device(), "slimops.", op, ": ft is on ", ft.device(), " but fs is on ",
                    fs.device());
  TORCH_CHECK_VALUE(ft.size(0) == fs.size(0), "slimops.", op, ": ft has batch size ", ft.size(0), " but fs has ",
                    fs.size(0));
  TORCH_CHECK_VALUE(ft.size(2) == fs.size(2) && ft.size(3) == fs.size(3), "slimops.", op, ": ft has ", ft.size(2), "x",
                    ft.size(3), " pixels but fs has ", fs.size(2), "x", fs.size(3),
                    "; resize the teacher's features first (slimops.distill.feature_affinity_loss does it bilinearly)");
  AffinityGeom g{fs.size(0), fs.size(1), ft.size(1), fs.size(2), fs.size(3), fs.size(2) * fs.size(3), 0, true};
  TORCH_CHECK_VALUE(g.hw >= 1, "slimops.", op, ": fs must have at least one pixel, got shape ", fs.sizes());
  if (norm == "l1") g.l1 = true;
  else if (norm == "l2sq") g.l1 = false;
  else TORCH_CHECK_VALUE(false, "slimops.", op, ": unknown norm '", std::string(norm), "' (expected one of: l1, l2sq)");
  if (proj.has_value()) {
    const at::Tensor& z = *proj;
    check_affinity_tensor(op, "proj", z);
    TORCH_CHECK_VALUE(z.device() == fs.device(), "slimops.", op, ": proj is on ", z.device(), " but fs is on ",
                      fs.device());
    TORCH_CHECK_VALUE(z.dim() == 2 && z.size(0) == g.hw && z.size(1) >= 1, "slimops.", op,
                      ": proj must be 2-D (H*W, k) = (", g.hw, ", k) with k >= 1, got shape ", z.sizes());
    g.k = z.size(1);
  }
  return g;
}

inline void check_affinity_grad(const char* op, const at::Tensor& grad, const at::Tensor& fs) {
  check_affinity_tensor(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.device() == fs.device(), "slimops.", op, ": grad is on ", grad.device(), " but fs is on ",
                    fs.device());
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == fs.size(0), "slimops.", op,
                    ": grad must have the output's shape (", fs.size(0), ",), got ", grad.sizes());
}

}  // namespace slimops
