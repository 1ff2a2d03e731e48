// CPU kernels of the sema family (schemas in csrc/registration.cpp; maths in docs/algorithms.md §8 and
// slimops/reference/sema.py): SEMA localised attention, out = A_W(q, k, v) + mean_N(v).
//
// Scheme, windows (default): one work item is (sample, head, window). Its q, k, v rows (at most
// wh * ww tokens, read in place through the tensors' strides) are packed once into cache-resident tiles in
// the accumulation dtype (q pre-scaled by d^-1/2, head dim zero-padded to the vector width); then per query:
// logits by vectorised dot products, softmax (vectorised exp), o = mean + P V, stored once. The mean of v
// (and, backward, the sum of the incoming gradient) is one pass per (sample, head) before. Nothing of size
// N x window is ever in memory: the partition, the attention matrix and the merge of the eager composition
// (partition -> SDPA -> merge -> + mean) all stay in the tiles.
// Neighbourhood mode: one work item is (sample, head) with its whole q/k/v plane packed (N x d); each query
// attends to the wh * ww keys of its clamped neighbourhood. (Keys are shared by overlapping neighbourhoods,
// so the backward accumulates dk / dv per plane; a plane per item keeps that race-free.)
//
// Backward (recomputing the softmax, nothing saved but q, k, v): per query with incoming gradient g,
//   D = sum_j p_j (g . v_j),  ds_j = p_j (g . v_j - D),  dq = d^-1/2 sum_j ds_j k_j,
//   dk_j += d^-1/2 ds_j q,    dv_j += p_j g,   and dv_j += (1/N) sum_i g_i (the mean term).
// In window mode every key belongs to one window, so each work item owns its dk / dv rows.
//
// Accumulation in float32 for float32/bfloat16/float16 (float64 for float64). The inner loops
// (sema_core.inc, through attention_tiles.h) are compiled for AVX-512, AVX2 + FMA and the base ISA, chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "slimops/dispatch.h"
#include "slimops/sema_checks.h"
#include "attention_tiles.h"

namespace slimops {
namespace cpu {

namespace {

template <typename T>
void attend_forward(const T* qs, const T* kp, const T* vp, const int32_t* keys, int64_t nk, int64_t dp,
                    const T* mean, T* p, T* o) {
  SLIMOPS_ATTN_CALL(attend_forward, T, qs, kp, vp, keys, nk, dp, mean, p, o)
}

template <typename T>
void attend_backward(const T* qs, const T* g, const T* kp, const T* vp, const int32_t* keys, int64_t nk, int64_t dp,
                     T scale, T* p, T* dpv, T* dq, T* dk, T* dv) {
  SLIMOPS_ATTN_CALL(attend_backward, T, qs, g, kp, vp, keys, nk, dp, scale, p, dpv, dq, dk, dv)
}

// Stores rows of dp elements (T) to tokens `toks` of a contiguous (B, heads, N, d) output, adding `add`
// (dp elements) when given.
template <typename S, typename T>
void store(S* out, const SemaGeom& g, int64_t b, int64_t h, const int64_t* toks, int64_t n, int64_t dp, const T* src,
           const T* add, T mul = T(1)) {
  store_rows<S, T>(out + (b * g.heads + h) * g.n * g.d, g.d, toks, n, dp, src, add, mul);
}

// Per (sample, head): sum over the N tokens of src, in T, into sums (B * heads rows of dp elements).
template <typename S, typename T>
std::vector<T> token_sums(const Plane<S>& src, const SemaGeom& g, int64_t dp, T mul) {
  std::vector<T> sums(static_cast<size_t>(g.b * g.heads * dp), T(0));
  at::parallel_for(0, g.b * g.heads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* s = sums.data() + i * dp;
      const int64_t b = i / g.heads, h = i % g.heads;
      for (int64_t n = 0; n < g.n; ++n) {
        const S* r = src.row(b, h, n);
        for (int64_t t = 0; t < g.d; ++t) s[t] += static_cast<T>(r[t]);
      }
      for (int64_t t = 0; t < g.d; ++t) s[t] *= mul;
    }
  });
  return sums;
}

// The windows of a grid: window w covers rows [wr wh, min(wr wh + wh, gh)) x columns likewise.
struct Windows {
  int64_t nh, nw;
  explicit Windows(const SemaGeom& g) : nh((g.gh + g.wh - 1) / g.wh), nw((g.gw + g.ww - 1) / g.ww) {}
  int64_t count() const { return nh * nw; }
  // The tokens of window w, row-major; returns how many.
  int64_t tokens(const SemaGeom& g, int64_t w, int64_t* toks) const {
    const int64_t r0 = (w / nw) * g.wh, c0 = (w % nw) * g.ww;
    const int64_t r1 = std::min(r0 + g.wh, g.gh), c1 = std::min(c0 + g.ww, g.gw);
    int64_t n = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) toks[n++] = r * g.gw + c;
    return n;
  }
};

// The keys of query token `tok` in neighbourhood mode, as token indices (row-major in its window).
void neighborhood_keys(const SemaGeom& g, int64_t tok, int32_t* keys) {
  const int64_t r0 = neighborhood_start(tok / g.gw, g.wh, g.gh), c0 = neighborhood_start(tok % g.gw, g.ww, g.gw);
  int64_t j = 0;
  for (int64_t a = 0; a < g.wh; ++a)
    for (int64_t c = 0; c < g.ww; ++c) keys[j++] = static_cast<int32_t>((r0 + a) * g.gw + c0 + c);
}

// ---- forward ------------------------------------------------------------------------------------------

// Window mode works on matrices: S = Qs K^T (queries x keys), P = softmax(S), O = P V, with the register-
// blocked product of small_mm.h (operands: Qs, V rows of dm = d padded to 16; K^T d x nkp, keys padded to 16).
// Queries go in chunks of kQueryChunk rows so that S stays small for large (e.g. whole-grid) windows.
constexpr int64_t kQueryChunk = 64;

template <typename S, typename T>
void forward_windows(const SemaGeom& g, const Plane<S>& q, const Plane<S>& k, const Plane<S>& v, const T* means,
                     S* out) {
  const Windows win(g);
  const int64_t dm = pad16(g.d), wsz = g.wh * g.ww, nkp = pad16(wsz), qc = std::min(wsz, kQueryChunk);
  const T scale = T(1) / std::sqrt(static_cast<T>(g.d));
  at::parallel_for(0, g.b * g.heads * win.count(), grain(2 * wsz * wsz * g.d), [&](int64_t lo, int64_t hi) {
    std::vector<T> buf(static_cast<size_t>(2 * wsz * dm + g.d * nkp + qc * nkp + qc * dm));
    T *qs = buf.data(), *vp = qs + wsz * dm, *kt = vp + wsz * dm, *sc = kt + g.d * nkp, *op = sc + qc * nkp;
    std::vector<int64_t> toks(static_cast<size_t>(wsz));
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / win.count(), b = bh / g.heads, h = bh % g.heads;
      const int64_t n = win.tokens(g, item % win.count(), toks.data());
      pack(q, b, h, toks.data(), n, g.d, dm, scale, qs);
      pack(v, b, h, toks.data(), n, g.d, dm, T(1), vp);
      pack_transposed(k, b, h, toks.data(), n, g.d, nkp, kt);
      for (int64_t c0 = 0; c0 < n; c0 += qc) {
        const int64_t m = std::min(qc, n - c0);
        small_mm<T>(m, g.d, nkp, qs + c0 * dm, dm, 1, kt, nkp, sc, nkp, false);  // S = Qs K^T
        softmax_rows<T>(sc, m, n, nkp);
        small_mm<T>(m, n, dm, sc, nkp, 1, vp, dm, op, dm, false);  // O = P V
        store<S, T>(out, g, b, h, toks.data() + c0, m, dm, op, means + bh * dm);
      }
    }
  });
}

// All N tokens of (b, h) in order (the plane of neighbourhood mode).
std::vector<int64_t> all_tokens(const SemaGeom& g) {
  std::vector<int64_t> toks(static_cast<size_t>(g.n));
  for (int64_t i = 0; i < g.n; ++i) toks[i] = i;
  return toks;
}

template <typename S, typename T>
void forward_neighborhood(const SemaGeom& g, const Plane<S>& q, const Plane<S>& k, const Plane<S>& v, const T* means,
                          S* out) {
  const int64_t dp = pad16(g.d), wsz = g.wh * g.ww;
  const T scale = T(1) / std::sqrt(static_cast<T>(g.d));
  const std::vector<int64_t> toks = all_tokens(g);
  at::parallel_for(0, g.b * g.heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> buf(static_cast<size_t>(2 * g.n * dp + 2 * dp + wsz));
    T *kp = buf.data(), *vp = kp + g.n * dp, *qs = vp + g.n * dp, *o = qs + dp, *p = o + dp;
    std::vector<int32_t> keys(static_cast<size_t>(wsz));
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / g.heads, h = bh % g.heads;
      pack(k, b, h, toks.data(), g.n, g.d, dp, T(1), kp);
      pack(v, b, h, toks.data(), g.n, g.d, dp, T(1), vp);
      for (int64_t i = 0; i < g.n; ++i) {
        pack(q, b, h, &toks[i], 1, g.d, dp, scale, qs);
        neighborhood_keys(g, i, keys.data());
        attend_forward<T>(qs, kp, vp, keys.data(), wsz, dp, means + bh * dp, p, o);
        store<S, T>(out, g, b, h, &toks[i], 1, dp, o, nullptr);
      }
    }
  });
}

at::Tensor sema_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                              at::IntArrayRef grid, at::IntArrayRef window, bool neighborhood) {
  const SemaGeom g = check_sema("sema_attention", q_in, k_in, v_in, grid, window, neighborhood);
  at::Tensor out = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  SLIMOPS_DISPATCH_FLOATS(q.scalar_type(), "sema_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Plane<scalar_t> qp = plane<scalar_t>(q), kp = plane<scalar_t>(k), vp = plane<scalar_t>(v);
    const std::vector<T> means = token_sums<scalar_t, T>(vp, g, pad16(g.d), T(1) / static_cast<T>(g.n));
    if (neighborhood) forward_neighborhood<scalar_t, T>(g, qp, kp, vp, means.data(), out.data_ptr<scalar_t>());
    else forward_windows<scalar_t, T>(g, qp, kp, vp, means.data(), out.data_ptr<scalar_t>());
  });
  return out;
}

// ---- backward -----------------------------------------------------------------------------------------

template <typename S>
struct Grads {
  S *q, *k, *v;  // contiguous (B, heads, N, d) outputs, null when not asked for
};

template <typename S, typename T>
void backward_windows(const SemaGeom& g, const Plane<S>& gr, const Plane<S>& q, const Plane<S>& k, const Plane<S>& v,
                      const T* gmeans, const Grads<S>& out) {
  const Windows win(g);
  const int64_t dm = pad16(g.d), wsz = g.wh * g.ww, nkp = pad16(wsz), qc = std::min(wsz, kQueryChunk);
  const T scale = T(1) / std::sqrt(static_cast<T>(g.d));
  at::parallel_for(0, g.b * g.heads * win.count(), grain(4 * wsz * wsz * g.d), [&](int64_t lo, int64_t hi) {
    std::vector<T> buf(static_cast<size_t>(6 * wsz * dm + 2 * g.d * nkp + 2 * qc * nkp + qc * dm));
    T *qs = buf.data(), *kp = qs + wsz * dm, *gp = kp + wsz * dm, *dk = gp + wsz * dm, *dv = dk + wsz * dm;
    T *dq = dv + wsz * dm, *kt = dq + wsz * dm, *vt = kt + g.d * nkp, *pm = vt + g.d * nkp, *ds = pm + qc * nkp;
    std::vector<int64_t> toks(static_cast<size_t>(wsz));
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / win.count(), b = bh / g.heads, h = bh % g.heads;
      const int64_t n = win.tokens(g, item % win.count(), toks.data());
      pack(q, b, h, toks.data(), n, g.d, dm, scale, qs);
      pack(k, b, h, toks.data(), n, g.d, dm, T(1), kp);
      pack(gr, b, h, toks.data(), n, g.d, dm, T(1), gp);
      pack_transposed(k, b, h, toks.data(), n, g.d, nkp, kt);
      pack_transposed(v, b, h, toks.data(), n, g.d, nkp, vt);
      for (int64_t c0 = 0; c0 < n; c0 += qc) {
        const int64_t m = std::min(qc, n - c0);
        const bool first = c0 == 0;
        small_mm<T>(m, g.d, nkp, qs + c0 * dm, dm, 1, kt, nkp, pm, nkp, false);  // S = Qs K^T
        softmax_rows<T>(pm, m, n, nkp);                                          // P
        if (out.v != nullptr)  // dV (+)= P^T G
          small_mm<T>(n, m, dm, pm, 1, nkp, gp + c0 * dm, dm, dv, dm, !first);
        if (out.q == nullptr && out.k == nullptr) continue;
        small_mm<T>(m, g.d, nkp, gp + c0 * dm, dm, 1, vt, nkp, ds, nkp, false);  // dP = G V^T
        softmax_grad_rows<T>(pm, ds, m, n, nkp);                                 // dS
        if (out.k != nullptr)  // dK (+)= dS^T Qs
          small_mm<T>(n, m, dm, ds, 1, nkp, qs + c0 * dm, dm, dk, dm, !first);
        if (out.q != nullptr)  // dQ = dS K (times the scale when stored)
          small_mm<T>(m, n, dm, ds, nkp, 1, kp, dm, dq + c0 * dm, dm, false);
      }
      if (out.q != nullptr) store<S, T>(out.q, g, b, h, toks.data(), n, dm, dq, nullptr, scale);
      if (out.k != nullptr) store<S, T>(out.k, g, b, h, toks.data(), n, dm, dk, nullptr);
      if (out.v != nullptr) store<S, T>(out.v, g, b, h, toks.data(), n, dm, dv, gmeans + bh * dm);
    }
  });
}

template <typename S, typename T>
void backward_neighborhood(const SemaGeom& g, const Plane<S>& gr, const Plane<S>& q, const Plane<S>& k,
                           const Plane<S>& v, const T* gmeans, const Grads<S>& out) {
  const int64_t dp = pad16(g.d), wsz = g.wh * g.ww;
  const T scale = T(1) / std::sqrt(static_cast<T>(g.d));
  const std::vector<int64_t> toks = all_tokens(g);
  at::parallel_for(0, g.b * g.heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> buf(static_cast<size_t>(4 * g.n * dp + 3 * dp + 2 * wsz));
    T *kp = buf.data(), *vp = kp + g.n * dp, *dk = vp + g.n * dp, *dv = dk + g.n * dp;
    T *qs = dv + g.n * dp, *gi = qs + dp, *dq = gi + dp, *p = dq + dp, *dpv = p + wsz;
    std::vector<int32_t> keys(static_cast<size_t>(wsz));
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / g.heads, h = bh % g.heads;
      pack(k, b, h, toks.data(), g.n, g.d, dp, T(1), kp);
      pack(v, b, h, toks.data(), g.n, g.d, dp, T(1), vp);
      std::fill(dk, dk + 2 * g.n * dp, T(0));  // dk and dv
      for (int64_t i = 0; i < g.n; ++i) {
        pack(q, b, h, &toks[i], 1, g.d, dp, scale, qs);
        pack(gr, b, h, &toks[i], 1, g.d, dp, T(1), gi);
        neighborhood_keys(g, i, keys.data());
        attend_backward<T>(qs, gi, kp, vp, keys.data(), wsz, dp, scale, p, dpv, out.q != nullptr ? dq : nullptr,
                           out.k != nullptr ? dk : nullptr, out.v != nullptr ? dv : nullptr);
        if (out.q != nullptr) store<S, T>(out.q, g, b, h, &toks[i], 1, dp, dq, nullptr);
      }
      if (out.k != nullptr) store<S, T>(out.k, g, b, h, toks.data(), g.n, dp, dk, nullptr);
      if (out.v != nullptr) store<S, T>(out.v, g, b, h, toks.data(), g.n, dp, dv, gmeans + bh * dp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sema_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    at::IntArrayRef grid, at::IntArrayRef window, bool neighborhood, std::array<bool, 3> output_mask) {
  const char* op = "sema_attention_backward";
  const SemaGeom g = check_sema(op, q_in, k_in, v_in, grid, window, neighborhood);
  check_sema_grad(op, grad_in, q_in);
  const at::Tensor* ins[] = {&q_in, &k_in, &v_in};
  at::Tensor outs[3];
  for (int i = 0; i < 3; ++i)
    outs[i] = output_mask[i] ? at::empty(q_in.sizes(), ins[i]->options().memory_format(at::MemoryFormat::Contiguous))
                             : ins[i]->new_empty({0});
  const bool any = output_mask[0] || output_mask[1] || output_mask[2];
  if (!any || q_in.numel() == 0) return {outs[0], outs[1], outs[2]};
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor grad = unit_last_stride(grad_in.to(q.scalar_type()));
  SLIMOPS_DISPATCH_FLOATS(q.scalar_type(), "sema_attention_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Plane<scalar_t> gp = plane<scalar_t>(grad), qp = plane<scalar_t>(q), kp = plane<scalar_t>(k),
                          vp = plane<scalar_t>(v);
    // The mean term: dv_j += (1/N) sum_i g_i for every key j.
    const std::vector<T> gmeans = token_sums<scalar_t, T>(gp, g, pad16(g.d), T(1) / static_cast<T>(g.n));
    auto ptr = [&](int i) { return output_mask[i] ? outs[i].data_ptr<scalar_t>() : nullptr; };
    const Grads<scalar_t> o{ptr(0), ptr(1), ptr(2)};
    if (neighborhood) backward_neighborhood<scalar_t, T>(g, gp, qp, kp, vp, gmeans.data(), o);
    else backward_windows<scalar_t, T>(g, gp, qp, kp, vp, gmeans.data(), o);
  });
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("sema_attention", &sema_attention_cpu);
  m.impl("sema_attention_backward", &sema_attention_backward_cpu);
}

}  // namespace cpu
}  // namespace slimops
