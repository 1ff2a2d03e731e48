// Argument checks of the token_attention family (kept_token_attention and its backward): "slimops.<op>: <argument> ..."
// (ValueError / TypeError / IndexError), the same conditions as slimops/opdefs/token_attention.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "slimops/checks.h"

namespace slimops {

// One call: q (b, heads, lq, d), k and v (b, heads, lk, d); nq / nk kept tokens, indices shared by the batch
// (1-D) or per sample (2-D).
struct KeptGeom {
  int64_t b, heads, lq, lk, d, nq, nk;
  bool q_shared, kv_shared;
  double scale;
};

inline int64_t check_kept_index(const char* op, const char* name, const at::Tensor& idx, int64_t batch,
                                const at::Tensor& q) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, "slimops.", op, ": ", name,
                   " must be an int64 or int32 tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.layout() == at::kStrided, "slimops.", op, ": ", name, " must be a strided (dense) tensor");
  TORCH_CHECK_VALUE(idx.device() == q.device(), "slimops.", op, ": ", name, " is on ", idx.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(idx.dim() == 1 || idx.dim() == 2, "slimops.", op, ": ", name,
                    " must be 1-D (n,) (shared by the batch) or 2-D (B, n) (per sample), got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 1 || idx.size(0) == batch, "slimops.", op, ": ", name, " has ", idx.size(0),
                    " rows but q has batch size B = ", batch);
  return idx.size(-1);
}

inline KeptGeom check_kept_token(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_idx, const at::Tensor& kv_idx, std::optional<double> scale) {
  check_qkv(op, q, k, v);
  const char* names[] = {"q", "k", "v"};
  const at::Tensor* ts[] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(ts[i]->dim() == 4, "slimops.", op, ": ", names[i], " must be 4-D (B, heads, tokens, d), got shape ",
                      ts[i]->sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "slimops.", op, ": v must have the shape of k ", k.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "slimops.", op, ": k ",
                    k.sizes(), " must match q ", q.sizes(), " in batch, heads and head dim");
  TORCH_CHECK_VALUE(q.size(3) >= 1, "slimops.", op, ": q must have a head dim d >= 1, got shape ", q.sizes());
  KeptGeom g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0, 0, q_idx.dim() == 1, kv_idx.dim() == 1, 0.0};
  g.nq = check_kept_index(op, "q_idx", q_idx, g.b, q);
  g.nk = check_kept_index(op, "kv_idx", kv_idx, g.b, q);
  TORCH_CHECK_VALUE(g.nq <= g.lq, "slimops.", op, ": q_idx keeps ", g.nq, " tokens but q has ", g.lq);
  TORCH_CHECK_VALUE(g.nk <= g.lk, "slimops.", op, ": kv_idx keeps ", g.nk, " tokens but k has ", g.lk);
  TORCH_CHECK_VALUE(g.nk > 0 || g.nq == 0, "slimops.", op,
                    ": kv_idx must keep at least one key (the softmax of a query over no keys is undefined)");
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, "slimops.", op, ": scale must be a finite positive number, got ",
                      *scale);
    g.scale = *scale;
  } else {
    g.scale = 1.0 / std::sqrt(static_cast<double>(g.d));
  }
  return g;
}

// The indices as int64 rows (1 row when shared), checked: in [0, length) and distinct within each row (a sorted copy
// of each row: O(n log n) in the kept count, nothing of the size of the token dim).
inline std::vector<int64_t> kept_index_rows(const char* op, const char* name, const at::Tensor& idx, int64_t length) {
  const at::Tensor rows = idx.to(at::kLong).contiguous().reshape({idx.dim() == 2 ? idx.size(0) : 1, idx.size(-1)});
  const int64_t r = rows.size(0), n = rows.size(1);
  std::vector<int64_t> out(rows.data_ptr<int64_t>(), rows.data_ptr<int64_t>() + r * n);
  std::vector<int64_t> sorted(static_cast<size_t>(n));
  for (int64_t i = 0; i < r; ++i) {
    const int64_t* row = out.data() + i * n;
    for (int64_t j = 0; j < n; ++j)
      TORCH_CHECK_INDEX(row[j] >= 0 && row[j] < length, "slimops.", op, ": ", name, " holds token ", row[j],
                        ", outside [0, ", length, ")");
    std::copy(row, row + n, sorted.begin());
    std::sort(sorted.begin(), sorted.end());
    for (int64_t j = 1; j < n; ++j)
      TORCH_CHECK_VALUE(sorted[j] != sorted[j - 1], "slimops.", op, ": ", name, " repeats token ", sorted[j],
                        idx.dim() == 2 ? " in row " + std::to_string(i) : std::string(),
                        "; kept indices must be distinct");
  }
  return out;
}

inline void check_kept_grad(const char* op, const at::Tensor& grad, const at::Tensor& q, const KeptGeom& g) {
  check_floating(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.device() == q.device(), "slimops.", op, ": grad is on ", grad.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.b && grad.size(1) == g.heads && grad.size(2) == g.nq &&
                        grad.size(3) == g.d,
                    "slimops.", op, ": grad must have the output's shape [", g.b, ", ", g.heads, ", ", g.nq, ", ", g.d,
                    "], got ", grad.sizes());
}

}  // namespace slimops
