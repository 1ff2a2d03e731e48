// CPU kernels of the token_attention family (schemas in csrc/registration.cpp; maths in slimops/reference/token_attention.py,
// docs/algorithms.md §10): attention of the kept queries over the kept keys, for patch slimming,
//   out[b, h] = softmax(q[b, h, q_idx[b]] k[b, h, kv_idx[b]]^T scale) v[b, h, kv_idx[b]].
//
// Scheme: one work item is (sample, head). Its kept q, k, v rows are read in place by index (any strides) and packed once into cache-resident tiles in the accumulation dtype: Qs (q times the scale),
// K^T (head dim x keys, keys padded to 16) and V; then per chunk of kQueryChunk queries S = Qs K^T, the softmax of
// its rows and O = P V by the register-blocked product of small_mm.h, O stored once to the output rows. Nothing of
// size B x heads x n x d is gathered in memory (index_select + SDPA writes three such copies, and its backward
// three scatters); the n x n logits exist only as one chunk's tile.
//
// Backward (recomputing the softmax, nothing saved but the inputs): per chunk, P again, dV += P^T G,
// dP = G V^T, dS = P (dP - rowsum(P dP)), dK += dS^T Qs, dQ = scale dS K. The gradients are full-size planes:
// each work item zeroes its own (b, h) plane and writes its kept rows (indices are distinct: no accumulation
// across items, no atomics).
//
// Accumulation in float32 for float32/bfloat16/float16 (float64 for float64). The products and the row softmax
// run their AVX-512 or AVX2 + FMA copies where the CPU has them (attention_tiles.h, small_mm.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_tiles.h"
#include "slimops/dispatch.h"
#include "slimops/token_attention_checks.h"

namespace slimops {
namespace cpu {
namespace {

// Queries per chunk: S (chunk x keys) stays small for long key lists.
constexpr int64_t kQueryChunk = 64;

// The checked indices of one call: rows of int64 (one row when shared by the batch).
struct KeptIndex {
  std::vector<int64_t> q, kv;
  int64_t nq, nk;
  bool q_shared, kv_shared;
  const int64_t* q_row(int64_t b) const { return q.data() + (q_shared ? 0 : b * nq); }
  const int64_t* kv_row(int64_t b) const { return kv.data() + (kv_shared ? 0 : b * nk); }
};

KeptIndex kept_index(const char* op, const KeptGeom& g, const at::Tensor& q_idx, const at::Tensor& kv_idx) {
  return {kept_index_rows(op, "q_idx", q_idx, g.lq), kept_index_rows(op, "kv_idx", kv_idx, g.lk), g.nq, g.nk,
          g.q_shared, g.kv_shared};
}

template <typename S, typename T>
void forward(const KeptGeom& g, const KeptIndex& ix, const Plane<S>& q, const Plane<S>& k, const Plane<S>& v, S* out) {
  const int64_t dm = pad16(g.d), nkp = pad16(g.nk), qc = std::min(g.nq, kQueryChunk);
  const T scale = static_cast<T>(g.scale);
  at::parallel_for(0, g.b * g.heads, grain(2 * g.nq * g.nk * g.d), [&](int64_t lo, int64_t hi) {
    std::vector<T> buf(static_cast<size_t>(g.nq * dm + g.nk * dm + g.d * nkp + qc * nkp + qc * dm));
    T *qs = buf.data(), *vp = qs + g.nq * dm, *kt = vp + g.nk * dm, *sc = kt + g.d * nkp, *op = sc + qc * nkp;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / g.heads, h = bh % g.heads;
      const int64_t *qt = ix.q_row(b), *kvt = ix.kv_row(b);
      pack(q, b, h, qt, g.nq, g.d, dm, scale, qs);
      pack(v, b, h, kvt, g.nk, g.d, dm, T(1), vp);
      pack_transposed(k, b, h, kvt, g.nk, g.d, nkp, kt);
      S* base = out + bh * g.nq * g.d;
      for (int64_t c0 = 0; c0 < g.nq; c0 += qc) {
        const int64_t m = std::min(qc, g.nq - c0);
        small_mm<T>(m, g.d, nkp, qs + c0 * dm, dm, 1, kt, nkp, sc, nkp, false);  // S = Qs K^T
        softmax_rows<T>(sc, m, g.nk, nkp);
        small_mm<T>(m, g.nk, dm, sc, nkp, 1, vp, dm, op, dm, false);  // O = P V
        store_rows<S, T>(base + c0 * g.d, g.d, nullptr, m, dm, op, nullptr);
      }
    }
  });
}

at::Tensor kept_token_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                    const at::Tensor& q_idx, const at::Tensor& kv_idx, std::optional<double> scale) {
  const char* op = "kept_token_attention";
  const KeptGeom g = check_kept_token(op, q_in, k_in, v_in, q_idx, kv_idx, scale);
  const KeptIndex ix = kept_index(op, g, q_idx, kv_idx);
  at::Tensor out = at::empty({g.b, g.heads, g.nq, g.d}, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // Read in place whatever the strides (a stride-0 broadcast too): only the kept rows are ever packed.
  const at::Tensor &q = q_in, &k = k_in, &v = v_in;
  SLIMOPS_DISPATCH_FLOATS(q.scalar_type(), "kept_token_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    forward<scalar_t, T>(g, ix, plane<scalar_t>(q), plane<scalar_t>(k), plane<scalar_t>(v), out.data_ptr<scalar_t>());
  });
  return out;
}

// ---- backward -----------------------------------------------------------------------------------------

template <typename S>
struct Grads {
  S *q, *k, *v;  // contiguous full-size outputs, null when not asked for
};

template <typename S, typename T>
void backward(const KeptGeom& g, const KeptIndex& ix, const Plane<S>& gr, const Plane<S>& q, const Plane<S>& k,
              const Plane<S>& v, const Grads<S>& out) {
  const int64_t dm = pad16(g.d), nkp = pad16(g.nk), qc = std::min(g.nq, kQueryChunk);
  const T scale = static_cast<T>(g.scale);
  at::parallel_for(0, g.b * g.heads, grain(5 * g.nq * g.nk * g.d), [&](int64_t lo, int64_t hi) {
    std::vector<T> buf(static_cast<size_t>(3 * g.nq * dm + 3 * g.nk * dm + 2 * g.d * nkp + 2 * qc * nkp));
    T *qs = buf.data(), *gp = qs + g.nq * dm, *dq = gp + g.nq * dm, *kp = dq + g.nq * dm, *dk = kp + g.nk * dm;
    T *dv = dk + g.nk * dm, *kt = dv + g.nk * dm, *vt = kt + g.d * nkp, *pm = vt + g.d * nkp, *ds = pm + qc * nkp;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / g.heads, h = bh % g.heads;
      const int64_t *qt = ix.q_row(b), *kvt = ix.kv_row(b);
      pack(q, b, h, qt, g.nq, g.d, dm, scale, qs);
      pack(gr, b, h, nullptr, g.nq, g.d, dm, T(1), gp);  // grad: (B, heads, nq, d), rows in order
      pack(k, b, h, kvt, g.nk, g.d, dm, T(1), kp);
      pack_transposed(k, b, h, kvt, g.nk, g.d, nkp, kt);
      pack_transposed(v, b, h, kvt, g.nk, g.d, nkp, vt);
      for (int64_t c0 = 0; c0 < g.nq; c0 += qc) {
        const int64_t m = std::min(qc, g.nq - c0);
        const bool first = c0 == 0;
        small_mm<T>(m, g.d, nkp, qs + c0 * dm, dm, 1, kt, nkp, pm, nkp, false);  // S = Qs K^T
        softmax_rows<T>(pm, m, g.nk, nkp);                                       // P
        if (out.v != nullptr)  // dV (+)= P^T G
          small_mm<T>(g.nk, m, dm, pm, 1, nkp, gp + c0 * dm, dm, dv, dm, !first);
        if (out.q == nullptr && out.k == nullptr) continue;
        small_mm<T>(m, g.d, nkp, gp + c0 * dm, dm, 1, vt, nkp, ds, nkp, false);  // dP = G V^T
        softmax_grad_rows<T>(pm, ds, m, g.nk, nkp);                              // dS
        if (out.k != nullptr)  // dK (+)= dS^T Qs
          small_mm<T>(g.nk, m, dm, ds, 1, nkp, qs + c0 * dm, dm, dk, dm, !first);
        if (out.q != nullptr)  // dQ = dS K (times the scale when stored)
          small_mm<T>(m, g.nk, dm, ds, nkp, 1, kp, dm, dq + c0 * dm, dm, false);
      }
      // Each item owns its (b, h) planes: zero them, then write the kept rows.
      if (out.q != nullptr) {
        S* base = out.q + bh * g.lq * g.d;
        std::fill(base, base + g.lq * g.d, S(0));
        store_rows<S, T>(base, g.d, qt, g.nq, dm, dq, nullptr, scale);
      }
      const std::pair<S*, const T*> kv[] = {{out.k, dk}, {out.v, dv}};
      for (const auto& [dst, src] : kv) {
        if (dst == nullptr) continue;
        S* base = dst + bh * g.lk * g.d;
        std::fill(base, base + g.lk * g.d, S(0));
        if (g.nq > 0) store_rows<S, T>(base, g.d, kvt, g.nk, dm, src, nullptr);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_token_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& q_idx, const at::Tensor& kv_idx, std::optional<double> scale, std::array<bool, 3> output_mask) {
  const char* op = "kept_token_attention_backward";
  const KeptGeom g = check_kept_token(op, q_in, k_in, v_in, q_idx, kv_idx, scale);
  check_kept_grad(op, grad_in, q_in, g);
  const KeptIndex ix = kept_index(op, g, q_idx, kv_idx);
  const at::Tensor* ins[] = {&q_in, &k_in, &v_in};
  at::Tensor outs[3];
  for (int i = 0; i < 3; ++i)
    outs[i] = output_mask[i] ? at::empty(ins[i]->sizes(), ins[i]->options().memory_format(at::MemoryFormat::Contiguous))
                             : ins[i]->new_empty({0});
  if (g.b * g.heads == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) return {outs[0], outs[1], outs[2]};
  const at::Tensor &q = q_in, &k = k_in, &v = v_in;
  const at::Tensor grad = grad_in.to(q.scalar_type());
  SLIMOPS_DISPATCH_FLOATS(q.scalar_type(), "kept_token_attention_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    auto ptr = [&](int i) { return output_mask[i] ? outs[i].data_ptr<scalar_t>() : nullptr; };
    backward<scalar_t, T>(g, ix, plane<scalar_t>(grad), plane<scalar_t>(q), plane<scalar_t>(k), plane<scalar_t>(v),
                          Grads<scalar_t>{ptr(0), ptr(1), ptr(2)});
  });
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("kept_token_attention", &kept_token_attention_cpu);
  m.impl("kept_token_attention_backward", &kept_token_attention_backward_cpu);
}

}  // namespace cpu
}  // namespace slimops
