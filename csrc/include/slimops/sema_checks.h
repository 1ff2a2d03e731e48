// Argument checks of the sema family (sema_attention and its backward): "slimops.<op>: <argument> ..."
// (ValueError / TypeError), the same conditions as check_sema in slimops/ops/sema.py.
#pragma once

#include <ATen/ATen.h>

#include "slimops/checks.h"

namespace slimops {

// One SEMA call: q, k, v (B, heads, N, d), N = gh * gw tokens row-major, windows wh x ww.
struct SemaGeom {
  int64_t b, heads, n, d, gh, gw, wh, ww;
  bool neighborhood;
};

inline SemaGeom check_sema(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           at::IntArrayRef grid, at::IntArrayRef window, bool neighborhood) {
  check_qkv(op, q, k, v);
  TORCH_CHECK_VALUE(q.dim() == 4, "slimops.", op, ": q must be 4-D (B, heads, N, d), got shape ", q.sizes());
  const char* names[] = {"q", "k", "v"};
  const at::Tensor* ts[] = {&q, &k, &v};
  for (int i = 1; i < 3; ++i) {
    TORCH_CHECK_VALUE(ts[i]->sizes() == q.sizes(), "slimops.", op, ": ", names[i], " must have the shape of q ",
                      q.sizes(), ", got ", ts[i]->sizes());
  }
  TORCH_CHECK_VALUE(grid.size() == 2 && window.size() == 2, "slimops.", op, ": grid and window must be pairs");
  TORCH_CHECK_VALUE(grid[0] >= 1 && grid[1] >= 1, "slimops.", op, ": grid must be positive, got ", grid);
  TORCH_CHECK_VALUE(window[0] >= 1 && window[1] >= 1, "slimops.", op, ": window must be positive, got ", window);
  const SemaGeom g{q.size(0), q.size(1), q.size(2), q.size(3), grid[0], grid[1], window[0], window[1], neighborhood};
  TORCH_CHECK_VALUE(g.d >= 1, "slimops.", op, ": q must have a head dim d >= 1, got shape ", q.sizes());
  TORCH_CHECK_VALUE(g.n == g.gh * g.gw, "slimops.", op, ": q has N = ", g.n, " tokens but grid ", grid,
                    " holds grid[0]*grid[1] = ", g.gh * g.gw);
  TORCH_CHECK_VALUE(g.wh <= g.gh && g.ww <= g.gw, "slimops.", op, ": window ", window, " is larger than the grid ",
                    grid);
  return g;
}

inline void check_sema_grad(const char* op, const at::Tensor& grad, const at::Tensor& q) {
  check_floating(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.device() == q.device(), "slimops.", op, ": grad is on ", grad.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(grad.sizes() == q.sizes(), "slimops.", op, ": grad must have the shape of q ", q.sizes(),
                    ", got ", grad.sizes());
}

// First row (column) of the neighbourhood of query row (column) `pos`: clamp(pos - size / 2, 0, extent - size).
inline int64_t neighborhood_start(int64_t pos, int64_t size, int64_t extent) {
  const int64_t s = pos - size / 2;
  return s < 0 ? 0 : (s > extent - size ? extent - size : s);
}

}  // namespace slimops
