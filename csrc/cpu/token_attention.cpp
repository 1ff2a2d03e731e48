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
#include <cstring>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_tiles.h"
#include "amx_bf16.h"
#include "bf16_dot.h"
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

// ---- forward, bfloat16 on AVX512-BF16 ------------------------------------------------------------------------
// Both products on vdpbf16ps (bf16_dot.h), 32 multiply-adds per instruction against 16 for the float FMAs of the
// path above, which converts bf16 operands to float first; the softmax stays in float. q, k and v are bf16 already,
// so their pairs carry them exactly; P is rounded to bf16 for P V, as oneDNN's and SDPA's bf16 paths round it
// (at most 2^-9 relative to each weight). The scale multiplies S in float (the path above folds it into q).
// On a CPU with AMX (amx_bf16.h) both products run on the tiles instead, from the same pair layouts padded to whole
// tiles: on a Xeon with AMX, 2 threads, DeiT-Ti at 60% kept, forward, the vdpbf16ps products took 4.9 ms where
// index_select + a written-out softmax (oneDNN's bf16 matmuls on the tiles) took 3.9: 0.78x; on the tiles 2.8 ms,
// 1.38x (per-sample indices 2.6x). The results are the dot path's within the same bf16 tolerance
// (tests/test_base_isa.py runs both, SLIMOPS_CPU_AMX=0 for the dot path).
// Operands of one (b, h): qb, the kept q rows as pairs (dh = ceil(d / 2) per row, an odd d padded with a zero);
// kt, K^T pair-packed (dh rows of nkp keys, keys past nk zero); vp, V pair-packed (kh = ceil(nk / 2) rows of dm
// pairs of consecutive keys, a missing last key zero); pb, P rows as pairs (kh per row).

// The pair (x[2p], x[2p + 1]) of a row with stride st, x[d] read as 0.
inline uint32_t bf16_pair(const c10::BFloat16* r, int64_t st, int64_t p, int64_t d) {
  const uint32_t lo = r[2 * p * st].x, hi = 2 * p + 1 < d ? r[(2 * p + 1) * st].x : 0u;
  return lo | (hi << 16);
}

// The packers of the bf16 pair paths (forward and backward). A row of unit stride and even length is its own pairs:
// copied whole, or transposed 16 x 16 blocks at a time; two rows interleave by a permute. Other strides and odd head
// dims take the element loops.
using BF16 = c10::BFloat16;

// rows[i] of (b, h) as pairs along d into out (row i at out + i ldo; an odd d's last pair padded with 0).
void pairs_along_d(const Plane<BF16>& x, int64_t b, int64_t h, const int64_t* toks, int64_t n, int64_t d, uint32_t* out,
                   int64_t ldo) {
  for (int64_t i = 0; i < n; ++i) {
    const BF16* r = x.row(b, h, toks != nullptr ? toks[i] : i);
    if (x.st == 1 && d % 2 == 0) std::memcpy(out + i * ldo, r, static_cast<size_t>(d) * sizeof(BF16));
    else for (int64_t p = 0; p < (d + 1) / 2; ++p) out[i * ldo + p] = bf16_pair(r, x.st, p, d);
  }
}

// Rows r0 + 2p and r0 + 2p + 1 (of n rows from r0) of (b, h) interleaved: out[p][c] = (x[2p][c], x[2p + 1][c]).
void pairs_along_rows(const Plane<BF16>& x, int64_t b, int64_t h, const int64_t* toks, int64_t r0, int64_t n,
                      int64_t d, uint32_t* out, int64_t ldo) {
  for (int64_t p = 0; 2 * p < n; ++p) {
    const int64_t i0 = r0 + 2 * p, i1 = r0 + 2 * p + 1;
    const BF16* a = x.row(b, h, toks != nullptr ? toks[i0] : i0);
    const BF16* c = 2 * p + 1 < n ? x.row(b, h, toks != nullptr ? toks[i1] : i1) : nullptr;
    uint32_t* o = out + p * ldo;
    if (x.st == 1) {
      bf16_dot_interleave(&a->x, c != nullptr ? &c->x : nullptr, d, o, ldo);
      continue;
    }
    for (int64_t t = 0; t < d; ++t)
      o[t] = a[t * x.st].x | (c != nullptr ? static_cast<uint32_t>(c[t * x.st].x) << 16 : 0u);
    std::fill(o + d, o + ldo, 0u);
  }
}

// Rows toks[j] of (b, h) transposed into pairs along d: out[p * ldo + j] = (x_j[2p], x_j[2p + 1]), columns past n 0.
// `rows`: n pointers of scratch.
void pairs_transposed(const Plane<BF16>& x, int64_t b, int64_t h, const int64_t* toks, int64_t n, int64_t d,
                      uint32_t* out, int64_t ldo, std::vector<const uint32_t*>& rows) {
  const int64_t dh = (d + 1) / 2;
  if (x.st == 1 && d % 2 == 0) {
    for (int64_t j = 0; j < n; ++j) rows[j] = reinterpret_cast<const uint32_t*>(x.row(b, h, toks[j]));
    bf16_dot_pack_transposed(rows.data(), n, dh, out, ldo);
    return;
  }
  std::fill(out, out + dh * ldo, 0u);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < dh; ++p) out[p * ldo + j] = bf16_pair(x.row(b, h, toks[j]), x.st, p, d);
}

void forward_bf16_dot(const KeptGeom& g, const KeptIndex& ix, const Plane<c10::BFloat16>& q,
                      const Plane<c10::BFloat16>& k, const Plane<c10::BFloat16>& v, c10::BFloat16* out) {
  const int64_t dh = (g.d + 1) / 2, kh = (g.nk + 1) / 2, dm = pad16(g.d), nkp = pad16(g.nk);
  const int64_t qc = std::min(g.nq, kQueryChunk);
  const float scale = static_cast<float>(g.scale);
  // On AMX the products run on tiles (amx_bf16.h), whose operands are whole tiles: the pair counts (dhp, khp) and
  // the rows of q, P, S and O (nqp, qcp) are padded to 16, the padding zero (written once: the loops below never
  // touch it) or, for rows past a chunk, values whose products are not stored.
  const bool amx = cpu_amx_bf16();
  const int64_t dhp = amx ? amx_pad16(dh) : dh, khp = amx ? amx_pad16(kh) : kh;
  const int64_t nqp = amx ? amx_pad16(g.nq) : g.nq, qcp = amx ? amx_pad16(qc) : qc;
  at::parallel_for(0, g.b * g.heads, grain(2 * g.nq * g.nk * g.d), [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> pairs(static_cast<size_t>(nqp * dhp + dhp * nkp + khp * dm + qcp * khp));
    uint32_t *qb = pairs.data(), *kt = qb + nqp * dhp, *vp = kt + dhp * nkp, *pb = vp + khp * dm;
    std::vector<float> buf(static_cast<size_t>(qcp * nkp + qcp * dm));
    float *sc = buf.data(), *op = sc + qcp * nkp;
#if SLIMOPS_AMX
    if (amx) amx_bf16_begin();
#endif
    std::vector<const uint32_t*> krows(static_cast<size_t>(g.nk));
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / g.heads, h = bh % g.heads;
      const int64_t *qt = ix.q_row(b), *kvt = ix.kv_row(b);
      pairs_along_d(q, b, h, qt, g.nq, g.d, qb, dhp);
      pairs_transposed(k, b, h, kvt, g.nk, g.d, kt, nkp, krows);
      pairs_along_rows(v, b, h, kvt, 0, g.nk, g.d, vp, dm);
      c10::BFloat16* base = out + bh * g.nq * g.d;
      for (int64_t c0 = 0; c0 < g.nq; c0 += qc) {
        const int64_t m = std::min(qc, g.nq - c0);
#if SLIMOPS_AMX
        if (amx) amx_bf16_mm(amx_pad16(m), dhp, nkp, qb + c0 * dhp, dhp, kt, nkp, sc, nkp);  // S = Q K^T
        else
#endif
          bf16_dot_mm(m, dh, nkp, qb + c0 * dhp, dhp, kt, nkp, sc, nkp);  // S = Q K^T
        bf16_dot_scale_rows(sc, m, g.nk, nkp, scale);
        softmax_rows<float>(sc, m, g.nk, nkp);
        bf16_dot_round_rows(sc, m, 2 * kh, nkp, pb, khp);  // P in bf16; an odd nk's pad column is S's 0
#if SLIMOPS_AMX
        if (amx) amx_bf16_mm(amx_pad16(m), khp, dm, pb, khp, vp, dm, op, dm);  // O = P V
        else
#endif
          bf16_dot_mm(m, kh, dm, pb, khp, vp, dm, op, dm);  // O = P V
        bf16_dot_store_rows(&base[c0 * g.d].x, g.d, op, m, dm);
      }
    }
#if SLIMOPS_AMX
    if (amx) amx_bf16_end();
#endif
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
  if (q.scalar_type() == at::kBFloat16 && cpu_bf16_dot()) {
    forward_bf16_dot(g, ix, plane<c10::BFloat16>(q), plane<c10::BFloat16>(k), plane<c10::BFloat16>(v),
                     out.data_ptr<c10::BFloat16>());
    return out;
  }
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

// ---- backward, bfloat16 on AMX tiles ----------------------------------------------------------------------------
// The float backward's five products on tiles (amx_bf16.h), the softmax and its gradient in float as there; P and dS
// are rounded to bf16 for the products that take them (as flash attention's bf16 backward rounds them). Per (b, h):
// qb, gb (the kept q rows and grad's rows as pairs along d), kt, vt (K^T and V^T as pairs along d), kp (K as pairs
// of consecutive keys). Per chunk of m queries: S = Q K^T (scaled), P, dP = G V^T, dS; dQ = dS K (dS rounded to
// pairs along the keys); and, contracted over the chunk's queries, dV^T += G^T P and dK^T += Q^T dS, with G^T and
// Q^T as pairs of consecutive queries (interleaved, then transposed 16 x 16) and P, dS interleaved the same way.
// dV^T and dK^T are transposed into the output rows at the end. Every operand is padded to whole tiles with zeros.
// Measured (Xeon with AMX, 2 threads, DeiT-Ti at 60% kept, bf16 fwd+bwd, bench/bench_token_attention.py): 14.0 ms
// with the float backward (1.37x the best baseline), 9.4-10.1 ms on the tiles (1.77-1.87x). What is left is mostly
// the float softmax's exps (23% of a profile) and packing; the products take ~22%.
#if SLIMOPS_AMX
void backward_bf16_amx(const KeptGeom& g, const KeptIndex& ix, const Plane<BF16>& gr, const Plane<BF16>& q,
                       const Plane<BF16>& k, const Plane<BF16>& v, const Grads<BF16>& out) {
  const int64_t dh = (g.d + 1) / 2, dhp = amx_pad16(dh), kh = (g.nk + 1) / 2, khp = amx_pad16(kh);
  const int64_t dm = pad16(g.d), nkp = pad16(g.nk), nqp = amx_pad16(g.nq);
  const int64_t qc = std::min(g.nq, kQueryChunk), qcp = amx_pad16(qc), mhp = amx_pad16((qcp + 1) / 2);
  const float scale = static_cast<float>(g.scale);
  at::parallel_for(0, g.b * g.heads, grain(5 * g.nq * g.nk * g.d), [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> pairs(static_cast<size_t>(2 * nqp * dhp + 2 * dhp * nkp + khp * dm + qcp * khp +
                                                    2 * dm * mhp + 2 * mhp * nkp + mhp * dm));
    uint32_t *qb = pairs.data(), *gb = qb + nqp * dhp, *kt = gb + nqp * dhp, *vt = kt + dhp * nkp;
    uint32_t *kp = vt + dhp * nkp, *dsb = kp + khp * dm, *gT = dsb + qcp * khp, *qT = gT + dm * mhp;
    uint32_t *pq = qT + dm * mhp, *dsq = pq + mhp * nkp, *tmp = dsq + mhp * nkp;
    std::vector<float> buf(static_cast<size_t>(2 * qcp * nkp + qcp * dm + 3 * dm * nkp));
    float *sc = buf.data(), *dp = sc + qcp * nkp, *dqf = dp + qcp * nkp, *dvt = dqf + qcp * dm, *dkt = dvt + dm * nkp;
    float* kv_rows = dkt + dm * nkp;  // dK or dV transposed back
    std::vector<const uint32_t*> rows(static_cast<size_t>(g.nk));
    amx_bf16_begin();
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / g.heads, h = bh % g.heads;
      const int64_t *qt = ix.q_row(b), *kvt = ix.kv_row(b);
      pairs_along_d(q, b, h, qt, g.nq, g.d, qb, dhp);
      pairs_along_d(gr, b, h, nullptr, g.nq, g.d, gb, dhp);
      pairs_transposed(k, b, h, kvt, g.nk, g.d, kt, nkp, rows);  // K^T, V^T: pairs along d, keys in the columns
      pairs_transposed(v, b, h, kvt, g.nk, g.d, vt, nkp, rows);
      pairs_along_rows(k, b, h, kvt, 0, g.nk, g.d, kp, dm);
      std::fill(dvt, dvt + 2 * dm * nkp, 0.f);
      if (out.q != nullptr)  // each item owns its (b, h) plane: zeroed, then the chunks write the kept rows
        std::fill_n(out.q + bh * g.lq * g.d, g.lq * g.d, BF16(0));
      for (int64_t c0 = 0; c0 < g.nq; c0 += qc) {
        const int64_t m = std::min(qc, g.nq - c0), m16 = amx_pad16(m), mh = (m + 1) / 2;
        amx_bf16_mm(m16, dhp, nkp, qb + c0 * dhp, dhp, kt, nkp, sc, nkp);  // S = Q K^T
        bf16_dot_scale_rows(sc, m, g.nk, nkp, scale);
        softmax_rows<float>(sc, m, g.nk, nkp);                              // P
        amx_bf16_mm(m16, dhp, nkp, gb + c0 * dhp, dhp, vt, nkp, dp, nkp);  // dP = G V^T
        softmax_grad_rows<float>(sc, dp, m, g.nk, nkp);                     // dS
        if (out.q != nullptr) {  // dQ = dS K (times the scale when stored)
          bf16_dot_round_rows(dp, m, 2 * kh, nkp, dsb, khp);
          amx_bf16_mm(m16, khp, dm, dsb, khp, kp, dm, dqf, dm);
          store_rows<BF16, float>(out.q + bh * g.lq * g.d, g.d, qt + c0, m, dm, dqf, nullptr, scale);
        }
        // P and dS as pairs of consecutive queries (rows past m: 0), G^T and Q^T likewise (transposed)
        for (int64_t p = 0; p < mhp; ++p) {
          if (p < mh) {
            const float* n1 = 2 * p + 1 < m ? sc + (2 * p + 1) * nkp : nullptr;
            amx_round_interleave(sc + 2 * p * nkp, n1, nkp, pq + p * nkp);
            amx_round_interleave(dp + 2 * p * nkp, 2 * p + 1 < m ? dp + (2 * p + 1) * nkp : nullptr, nkp,
                                 dsq + p * nkp);
          } else {
            std::fill_n(pq + p * nkp, nkp, 0u), std::fill_n(dsq + p * nkp, nkp, 0u);
          }
        }
        const std::pair<std::pair<const Plane<BF16>*, const int64_t*>, uint32_t*> qg[] = {{{&gr, nullptr}, gT},
                                                                                          {{&q, qt}, qT}};
        for (const auto& [src, dst] : qg) {
          std::fill(tmp, tmp + mhp * dm, 0u);
          pairs_along_rows(*src.first, b, h, src.second, c0, m, g.d, tmp, dm);
          amx_transpose_pairs(tmp, mhp, dm, dm, dst, mhp);
        }
        if (out.v != nullptr) amx_bf16_mm<true>(dm, mhp, nkp, gT, mhp, pq, nkp, dvt, nkp);   // dV^T += G^T P
        if (out.k != nullptr) amx_bf16_mm<true>(dm, mhp, nkp, qT, mhp, dsq, nkp, dkt, nkp);  // dK^T += Q^T dS
      }
      const std::tuple<BF16*, const float*, float> kv[] = {{out.k, dkt, scale}, {out.v, dvt, 1.f}};
      for (const auto& [dst, src, mul] : kv) {
        if (dst == nullptr) continue;
        BF16* base = dst + bh * g.lk * g.d;
        std::fill(base, base + g.lk * g.d, BF16(0));
        // d x keys -> keys x d (16 x 16 register blocks; the 32-bit moves carry floats as they are), then the rows
        amx_transpose_pairs(reinterpret_cast<const uint32_t*>(src), dm, nkp, nkp, reinterpret_cast<uint32_t*>(kv_rows),
                            dm);
        store_rows<BF16, float>(base, g.d, kvt, g.nk, dm, kv_rows, nullptr, mul);
      }
    }
    amx_bf16_end();
  });
}
#endif

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
#if SLIMOPS_AMX
  if (q.scalar_type() == at::kBFloat16 && cpu_bf16_dot() && cpu_amx_bf16() && g.nq > 0 && g.nk > 0) {
    auto ptr = [&](int i) { return output_mask[i] ? outs[i].data_ptr<c10::BFloat16>() : nullptr; };
    backward_bf16_amx(g, ix, plane<c10::BFloat16>(grad), plane<c10::BFloat16>(q), plane<c10::BFloat16>(k),
                      plane<c10::BFloat16>(v), Grads<c10::BFloat16>{ptr(0), ptr(1), ptr(2)});
    return {outs[0], outs[1], outs[2]};
  }
#endif
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
