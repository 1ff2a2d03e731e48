// Argument checks of the distill family (feature_affinity_loss and its backward): "slimops.<op>: <argument> ..."
// (ValueError / TypeError), the same conditions and words as slimops/opdefs/distill.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

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

// The fast loss's saved products, given to the backward (the forward's 2nd and 3rd outputs): both or neither,
// only with proj; u (B, Cs + Ct, k) and e (B, HW, k) in the compute dtype (float64 for float64 features, else
// float32), on the features' device. Returns whether they are given.
inline bool check_affinity_saved(const char* op, const AffinityGeom& g, const at::Tensor& fs,
                                 const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& e) {
  TORCH_CHECK_VALUE(u.has_value() == e.has_value(), "slimops.", op,
                    ": u and e are the fast loss's saved products (the forward's 2nd and 3rd outputs): give both "
                    "or neither");
  if (!u.has_value()) return false;
  TORCH_CHECK_VALUE(g.k > 0, "slimops.", op,
                    ": u and e are the fast loss's saved products: give them only with proj (the exact loss saves "
                    "nothing)");
  const at::ScalarType want = fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::pair<const char*, const at::Tensor*> saved[] = {{"u", &*u}, {"e", &*e}};
  for (const auto& [name, t] : saved) {
    TORCH_CHECK_VALUE(t->layout() == at::kStrided, "slimops.", op, ": ", name, " must be a strided (dense) tensor, got "
                      "layout ", t->layout());
    TORCH_CHECK_TYPE(t->scalar_type() == want, "slimops.", op, ": ", name, " has dtype ", t->scalar_type(),
                     " but the forward saves it in ", want, " for ", fs.scalar_type(), " features");
    TORCH_CHECK_VALUE(t->device() == fs.device(), "slimops.", op, ": ", name, " is on ", t->device(), " but fs is on ",
                      fs.device());
  }
  TORCH_CHECK_VALUE(u->dim() == 3 && u->size(0) == g.b && u->size(1) == g.cs + g.ct && u->size(2) == g.k, "slimops.",
                    op, ": u must be (B, Cs + Ct, k) = (", g.b, ", ", g.cs + g.ct, ", ", g.k, "), got shape ",
                    u->sizes());
  TORCH_CHECK_VALUE(e->dim() == 3 && e->size(0) == g.b && e->size(1) == g.hw && e->size(2) == g.k, "slimops.", op,
                    ": e must be (B, H*W, k) = (", g.b, ", ", g.hw, ", ", g.k, "), got shape ", e->sizes());
  return true;
}

}  // namespace slimops
