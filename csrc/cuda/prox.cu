// CUDA kernels of the prox family (schemas in csrc/registration.cpp, maths in docs/algorithms.md §1-§5).
// They compute exactly what csrc/cpu/prox.cpp computes (same formulas, same order of roundings to
// the storage dtype), with fp32 math for fp32/bf16/fp16 storage and fp64 math for fp64.
//
// Structure. Every optimizer-like op is an "update" (a small struct below: which arrays it reads
// and writes, and the per-element formula that yields the value before the prox) combined with
// the prox of the penalty by one of two generic ops:
//   ElementwiseProxOp  elementwise penalties (none, l1, l0, tl1, l1_2): one pass, run by the
//                      chunked multi-tensor kernel (one launch per list, more only when the list
//                      overflows the 4 KiB kernel-argument metadata, see multi_tensor_apply.cuh);
//   GroupProxOp        group penalties (l21, l0_l21): a row kernel, one team of threads per group
//                      (slice along dim 0), also one launch per list. Pass 1 computes the updated
//                      row (without writing anything) and its norm after the elementwise part of
//                      the prox; pass 2 recomputes the update, writes the optimizer state and the
//                      block-soft-thresholded value. Recomputing instead of storing the
//                      intermediate keeps the single rounding to the storage dtype of the CPU
//                      kernel (bf16/fp16 included) and costs no extra DRAM traffic in practice:
//                      the second read of a row comes from L2.
// grad_scale and found_inf are read on the device inside the kernels (no host sync).
//
// Launches per op (for a list that fits one metadata block; see launch_list):
//   prox           elementwise: 1 grid-stride kernel;  l21/l0_l21: 1 row grid-stride kernel
//   prox_backward  same as prox
//   prox_sgd_      1 kernel (chunk kernel, or row kernel for l21/l0_l21)
//   prox_adamw_    _foreach_add_(state_steps, 1) + 1 kernel (+ _foreach_sub_(state_steps,
//                  found_inf) when found_inf is given); a copy of the steps (2 small ops) only
//                  if they are not all of one floating dtype
//   palm_slimming_ 1 kernel (chunk, or row for group penalties)
//   penalty_grad_  l1/tl1/lp: 1 chunk kernel; l21: 1 row kernel
//   split_step_    1 kernel: chunk for elementwise penalties; for l21/l0_l21 a row kernel that
//                  computes u = prox(w) row by row, then w from that u, in the same pass
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "slimops/checks.h"
#include "slimops/dispatch.h"
#include "slimops/prox_checks.h"
#include "slimops/prox_math.h"

namespace slimops {
namespace cuda {
namespace {

// ---- host helpers ---------------------------------------------------------------------------

template <Penalty P>
constexpr bool kIsGroup = P == Penalty::kL21 || P == Penalty::kL0L21;

// A one-element tensor of any floating dtype (grad_scale, found_inf, a step count), read inside
// the kernel. ptr == nullptr: absent, load() gives the fallback.
struct DeviceScalar {
  enum Kind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
  const void* ptr = nullptr;
  int kind = kF32;

  __device__ double load(double fallback) const {
    if (ptr == nullptr) return fallback;
    switch (kind) {
      case kF64: return *static_cast<const double*>(ptr);
      case kF16: return static_cast<float>(*static_cast<const at::Half*>(ptr));
      case kBF16: return static_cast<float>(*static_cast<const at::BFloat16*>(ptr));
      default: return *static_cast<const float*>(ptr);
    }
  }
};

// Kind of a dtype DeviceScalar reads directly, or -1.
int scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DeviceScalar::kF32;
    case at::kDouble: return DeviceScalar::kF64;
    case at::kHalf: return DeviceScalar::kF16;
    case at::kBFloat16: return DeviceScalar::kBF16;
    default: return -1;
  }
}

// Other floating dtypes (float8 ...) are converted to fp32 on the device; `keep` holds the copy
// until the launch is enqueued (the caching allocator orders reuse on the stream).
DeviceScalar device_scalar(const std::optional<at::Tensor>& t, std::vector<at::Tensor>& keep) {
  DeviceScalar s;
  if (!t.has_value()) return s;
  at::Tensor v = *t;
  if (scalar_kind(v.scalar_type()) < 0) {
    v = v.to(at::kFloat);
    keep.push_back(v);
  }
  s.ptr = v.data_ptr();
  s.kind = scalar_kind(v.scalar_type());
  return s;
}

// The prox constants in the math type, as the CPU kernel casts them.
template <typename acc_t>
struct ProxArgs {
  acc_t lam, a, thresh, gthresh;
};

template <typename acc_t>
ProxArgs<acc_t> prox_args(const ProxParams& pp) {
  ProxArgs<acc_t> r;
  r.lam = static_cast<acc_t>(pp.lam);
  r.a = static_cast<acc_t>(pp.a);
  r.thresh = static_cast<acc_t>(pp.thresh);
  r.gthresh = group_threshold<acc_t>(pp.penalty, r.lam, r.a);
  return r;
}

// ---- updates --------------------------------------------------------------------------------
//
// An update names its arrays (list d of the launch = array d; kDepth may exceed kArrays for
// per-tensor scalars such as AdamW's step), which it reads (kReads) and writes besides the prox
// target (kWrites), and the slot that receives the prox result (kTarget). update(e, ctx) returns
// the value before the prox and may write state into e (stored only on the committing pass);
// post(e, v, ctx) sees the final target value v in the math type (split_step_ updates w from it).

struct NoCtx {};

template <typename scalar_t_>
struct UpdateBase {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  using Ctx = NoCtx;
  __device__ bool skip() const { return false; }
  template <typename Meta>
  __device__ Ctx context(const Meta&, int) const {
    return {};
  }
  template <int N>
  __device__ void post(scalar_t (&)[N], acc_t, const Ctx&) const {}
};

// prox: out = prox(x). Arrays: x, out.
template <typename scalar_t>
struct ProxUpdate : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kDepth = 2, kArrays = 2, kTarget = 1;
  static constexpr unsigned kReads = 0b01, kWrites = 0;
  __device__ acc_t update(scalar_t (&e)[kArrays], const NoCtx&) const { return static_cast<acc_t>(e[0]); }
};

// The gradient after AMP unscaling and maximize: g * gscale (CPU: 1 / grad_scale in double).
struct AmpArgs {
  DeviceScalar grad_scale, found_inf;
  bool maximize;
  __device__ bool skip() const { return found_inf.load(0.0) != 0.0; }
  template <typename acc_t>
  __device__ acc_t gscale() const {
    const double inv = 1.0 / grad_scale.load(1.0);
    return static_cast<acc_t>(maximize ? -inv : inv);
  }
};

// torch.optim.SGD. Arrays: param, grad, momentum buffer (nullptr when momentum == 0).
template <typename scalar_t>
struct SgdUpdate : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kDepth = 3, kArrays = 3, kTarget = 0;
  static constexpr unsigned kReads = 0b111, kWrites = 0b100;
  struct Ctx {
    acc_t gscale;
  };
  acc_t lr, mom, damp1, wd;
  bool use_mom, init_momentum, nesterov;
  AmpArgs amp;

  __device__ bool skip() const { return amp.skip(); }
  template <typename Meta>
  __device__ Ctx context(const Meta&, int) const {
    return {amp.template gscale<acc_t>()};
  }
  __device__ acc_t update(scalar_t (&e)[kArrays], const Ctx& c) const {
    const acc_t w = static_cast<acc_t>(e[0]);
    acc_t d = static_cast<acc_t>(e[1]) * c.gscale + wd * w;
    if (use_mom) {
      const acc_t b_new = init_momentum ? d : mom * static_cast<acc_t>(e[2]) + damp1 * d;
      e[2] = static_cast<scalar_t>(b_new);
      const acc_t b = static_cast<acc_t>(e[2]);  // SGD reads the stored (rounded) buffer
      d = nesterov ? d + mom * b : b;
    }
    return w - lr * d;
  }
  template <int N>
  __device__ void post(scalar_t (&)[N], acc_t, const Ctx&) const {}
};

// torch.optim.AdamW. Arrays: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (nullptr without
// amsgrad); list 5 holds each tensor's step (already incremented), read for the bias corrections.
template <typename scalar_t>
struct AdamWUpdate : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kDepth = 6, kArrays = 5, kTarget = 0, kStepList = 5;
  static constexpr unsigned kReads = 0b11111, kWrites = 0b11100;
  struct Ctx {
    acc_t gscale, step_size, inv_bc2_sqrt;
  };
  double lr, beta1, beta2;  // bias corrections in double, as the CPU kernel
  acc_t b1, b2, eps, decay;
  bool amsgrad;
  int step_kind;
  AmpArgs amp;

  __device__ bool skip() const { return amp.skip(); }
  template <typename Meta>
  __device__ Ctx context(const Meta& m, int slot) const {
    const double step = DeviceScalar{m.ptr[kStepList][slot], step_kind}.load(0.0);
    Ctx c;
    c.gscale = amp.template gscale<acc_t>();
    c.step_size = static_cast<acc_t>(lr / (1.0 - ::pow(beta1, step)));
    c.inv_bc2_sqrt = static_cast<acc_t>(1.0 / ::sqrt(1.0 - ::pow(beta2, step)));
    return c;
  }
  __device__ acc_t update(scalar_t (&e)[kArrays], const Ctx& c) const {
    const acc_t g = static_cast<acc_t>(e[1]) * c.gscale;
    const acc_t w = static_cast<acc_t>(e[0]) * decay;
    const acc_t m_old = static_cast<acc_t>(e[2]);
    // m <- lerp(m, g, 1 - b1) as torch's lerp_ computes it (so that inf/NaN come out as in torch.optim.AdamW):
    // m + w (g - m) for a weight w < 0.5, else g - (g - m) (1 - w) = g + (w - 1) (g - m). As on the CPU.
    const acc_t lw = acc_t(1) - b1;
    const bool lerp_small = ::fabs(lw) < acc_t(0.5);
    const acc_t m = (lerp_small ? m_old : g) + (lerp_small ? lw : lw - acc_t(1)) * (g - m_old);
    acc_t v = b2 * static_cast<acc_t>(e[3]) + (acc_t(1) - b2) * g * g;
    e[2] = static_cast<scalar_t>(m);
    e[3] = static_cast<scalar_t>(v);
    if (amsgrad) {
      const acc_t v_old = static_cast<acc_t>(e[4]);
      const acc_t vm = (v_old < v || v != v) ? v : v_old;  // torch.maximum: a NaN on either side wins
      e[4] = static_cast<scalar_t>(vm);
      v = vm;
    }
    return w - c.step_size * m / (::sqrt(v) * c.inv_bc2_sqrt + eps);
  }
  template <int N>
  __device__ void post(scalar_t (&)[N], acc_t, const Ctx&) const {}
};

// Proximal network slimming. Arrays: gamma (updated), xi (the prox target).
template <typename scalar_t>
struct PalmUpdate : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kDepth = 2, kArrays = 2, kTarget = 1;
  static constexpr unsigned kReads = 0b11, kWrites = 0b01;
  acc_t ca, cb;  // alpha / (alpha + beta), beta / (alpha + beta)
  __device__ acc_t update(scalar_t (&e)[kArrays], const NoCtx&) const {
    const acc_t x = static_cast<acc_t>(e[1]);
    const acc_t gam = ca * static_cast<acc_t>(e[0]) + cb * x;
    e[0] = static_cast<scalar_t>(gam);
    return ca * x + cb * gam;  // the unrounded new gamma, as on the CPU
  }
};

// penalty_grad_ for the elementwise (sub)gradients. Arrays: grad (in place), param. No prox.
template <typename scalar_t, Penalty R>
struct PenaltyGradUpdate : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kDepth = 2, kArrays = 2, kTarget = 0;
  static constexpr unsigned kReads = 0b11, kWrites = 0;
  acc_t s, a, eps;
  __device__ acc_t update(scalar_t (&e)[kArrays], const NoCtx&) const {
    return static_cast<acc_t>(e[0]) + s * penalty_subgradient<acc_t>(static_cast<acc_t>(e[1]), R, a, eps);
  }
};

// Variable splitting. Arrays: w, grad, u (the prox target); post() updates w from the final u.
template <typename scalar_t>
struct SplitUpdate : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kDepth = 3, kArrays = 3, kTarget = 2;
  static constexpr unsigned kReads = 0b011, kWrites = 0b001;
  acc_t lr, lb;  // lr, lr * beta
  __device__ acc_t update(scalar_t (&e)[kArrays], const NoCtx&) const { return static_cast<acc_t>(e[0]); }
  __device__ void post(scalar_t (&e)[kArrays], acc_t u, const NoCtx&) const {
    const acc_t w = static_cast<acc_t>(e[0]);
    e[0] = static_cast<scalar_t>(w - lr * static_cast<acc_t>(e[1]) - lb * (w - u));
  }
};

// ---- generic ops: update + prox -------------------------------------------------------------

template <typename U, typename Meta>
__device__ __forceinline__ void update_ptrs(const Meta& m, int slot, int64_t offset,
                                            typename U::scalar_t* (&p)[U::kArrays]) {
#pragma unroll
  for (int k = 0; k < U::kArrays; ++k) p[k] = slot_ptr<typename U::scalar_t>(m, k, slot, offset);
}

// Elementwise penalty (or none): update, prox, store, in one pass (chunk or grid-stride work).
template <typename U, Penalty P>
struct ElementwiseProxOp {
  using scalar_t = typename U::scalar_t;
  using acc_t = typename U::acc_t;
  using Ctx = typename U::Ctx;
  static constexpr unsigned kStores = U::kWrites | (1u << U::kTarget);
  U upd;
  ProxArgs<acc_t> px;

  __device__ bool skip() const { return upd.skip(); }
  template <typename Meta>
  __device__ Ctx context(const Meta& m, int slot) const {
    return upd.context(m, slot);
  }
  template <typename Meta>
  __device__ void chunk(const Meta& m, int slot, const Ctx& c, int64_t begin, int64_t n, int64_t tid,
                        int64_t nthreads) const {
    scalar_t* p[U::kArrays];
    update_ptrs<U>(m, slot, begin, p);
    foreach_elements<scalar_t, U::kArrays, U::kReads, kStores>(p, n, tid, nthreads, [&](scalar_t(&e)[U::kArrays]) {
      const acc_t v = prox_elementwise<acc_t>(upd.update(e, c), P, px.lam, px.a, px.thresh);
      e[U::kTarget] = static_cast<scalar_t>(v);
      upd.post(e, v, c);
    });
  }
};

// Group penalty (l21: identity then block soft threshold; l0_l21: hard threshold then block soft
// threshold of the survivors), one row = one group. Pass 1 only reads; pass 2 commits.
template <typename U, Penalty P>
struct GroupProxOp {
  using scalar_t = typename U::scalar_t;
  using acc_t = typename U::acc_t;
  using Ctx = typename U::Ctx;
  static constexpr int kSums = 1;  // squared norm of the row after the elementwise part
  static constexpr unsigned kStores = U::kWrites | (1u << U::kTarget);
  U upd;
  ProxArgs<acc_t> px;

  __device__ bool skip() const { return upd.skip(); }
  template <typename Meta>
  __device__ Ctx context(const Meta& m, int slot) const {
    return upd.context(m, slot);
  }
  __device__ acc_t elementwise(scalar_t (&e)[U::kArrays], const Ctx& c) const {
    return prox_elementwise<acc_t>(upd.update(e, c), P, px.lam, px.a, px.thresh);
  }
  template <typename Meta>
  __device__ void row_partial(const Meta& m, int slot, const Ctx& c, int64_t base, int64_t row_len, int lane,
                              int team, acc_t (&sums)[kSums]) const {
    scalar_t* p[U::kArrays];
    update_ptrs<U>(m, slot, base, p);
    for (int64_t j = lane; j < row_len; j += team) {
      scalar_t e[U::kArrays] = {};
      load_slots<U::kReads>(p, j, e);
      const acc_t v = elementwise(e, c);
      sums[0] += v * v;
    }
  }
  template <typename Meta>
  __device__ void row_finish(const Meta& m, int slot, const Ctx& c, int64_t base, int64_t row_len, int lane,
                             int team, const acc_t (&sums)[kSums]) const {
    const acc_t scale = group_scale<acc_t>(sums[0], px.gthresh);
    scalar_t* p[U::kArrays];
    update_ptrs<U>(m, slot, base, p);
    for (int64_t j = lane; j < row_len; j += team) {
      scalar_t e[U::kArrays] = {};
      load_slots<U::kReads>(p, j, e);
      const acc_t v = elementwise(e, c) * scale;
      e[U::kTarget] = static_cast<scalar_t>(v);
      upd.post(e, v, c);
      store_slots<kStores>(p, j, e);
    }
  }
};

// penalty_grad_ "l21": grads += s sqrt(n_g) w_g / ||w_g|| (0 for an all-zero group).
// Arrays: grad (in place), param.
template <typename scalar_t>
struct PenaltyGradL21Op : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kSums = 1;
  acc_t s;
  template <typename Meta>
  __device__ void row_partial(const Meta& m, int slot, const NoCtx&, int64_t base, int64_t row_len, int lane,
                              int team, acc_t (&sums)[kSums]) const {
    const scalar_t* w = slot_ptr<scalar_t>(m, 1, slot, base);
    for (int64_t j = lane; j < row_len; j += team) {
      const acc_t v = static_cast<acc_t>(w[j]);
      sums[0] += v * v;
    }
  }
  template <typename Meta>
  __device__ void row_finish(const Meta& m, int slot, const NoCtx&, int64_t base, int64_t row_len, int lane,
                             int team, const acc_t (&sums)[kSums]) const {
    const acc_t weight = ::sqrt(static_cast<acc_t>(row_len));
    const acc_t f = sums[0] > acc_t(0) ? s * weight / ::sqrt(sums[0]) : acc_t(0);
    scalar_t* g = slot_ptr<scalar_t>(m, 0, slot, base);
    const scalar_t* w = slot_ptr<scalar_t>(m, 1, slot, base);
    for (int64_t j = lane; j < row_len; j += team)
      g[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) + f * static_cast<acc_t>(w[j]));
  }
};

// prox_backward, elementwise penalties: out = grad * d prox / d x. Arrays: x, grad, out.
template <typename scalar_t, Penalty P>
struct ProxBackwardOp : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  ProxArgs<acc_t> px;
  template <typename Meta>
  __device__ void chunk(const Meta& m, int slot, const NoCtx&, int64_t begin, int64_t n, int64_t tid,
                        int64_t nthreads) const {
    scalar_t* p[3] = {slot_ptr<scalar_t>(m, 0, slot, begin), slot_ptr<scalar_t>(m, 1, slot, begin),
                      slot_ptr<scalar_t>(m, 2, slot, begin)};
    foreach_elements<scalar_t, 3, 0b011, 0b100>(p, n, tid, nthreads, [&](scalar_t(&e)[3]) {
      const acc_t y = static_cast<acc_t>(e[0]);
      const acc_t z = prox_elementwise<acc_t>(y, P, px.lam, px.a, px.thresh);
      const acc_t d = prox_elementwise_derivative<acc_t>(y, z, P, px.lam, px.a, px.thresh);
      e[2] = static_cast<scalar_t>(static_cast<acc_t>(e[1]) * d);
    });
  }
};

// prox_backward, group penalties. The block soft threshold z -> (1 - t/n) z, n = ||z||, has
// J^T g = (1 - t/n) g + t (z.g) z / n^3 for n > t (else 0), times the elementwise derivative.
template <typename scalar_t, Penalty P>
struct ProxBackwardGroupOp : UpdateBase<scalar_t> {
  using acc_t = typename UpdateBase<scalar_t>::acc_t;
  static constexpr int kSums = 2;  // ||z||^2, z.g
  ProxArgs<acc_t> px;
  template <typename Meta>
  __device__ void row_partial(const Meta& m, int slot, const NoCtx&, int64_t base, int64_t row_len, int lane,
                              int team, acc_t (&sums)[kSums]) const {
    const scalar_t* x = slot_ptr<scalar_t>(m, 0, slot, base);
    const scalar_t* g = slot_ptr<scalar_t>(m, 1, slot, base);
    for (int64_t j = lane; j < row_len; j += team) {
      const acc_t z = prox_elementwise<acc_t>(static_cast<acc_t>(x[j]), P, px.lam, px.a, px.thresh);
      sums[0] += z * z;
      sums[1] += z * static_cast<acc_t>(g[j]);
    }
  }
  template <typename Meta>
  __device__ void row_finish(const Meta& m, int slot, const NoCtx&, int64_t base, int64_t row_len, int lane,
                             int team, const acc_t (&sums)[kSums]) const {
    const scalar_t* x = slot_ptr<scalar_t>(m, 0, slot, base);
    const scalar_t* g = slot_ptr<scalar_t>(m, 1, slot, base);
    scalar_t* out = slot_ptr<scalar_t>(m, 2, slot, base);
    const acc_t gt = px.gthresh;
    const acc_t n = ::sqrt(sums[0]);
    const acc_t dot = sums[1];
    for (int64_t j = lane; j < row_len; j += team) {
      acc_t v = 0;
      if (n > gt) {
        const acc_t y = static_cast<acc_t>(x[j]);
        const acc_t z = prox_elementwise<acc_t>(y, P, px.lam, px.a, px.thresh);
        const acc_t d = prox_elementwise_derivative<acc_t>(y, z, P, px.lam, px.a, px.thresh);
        v = ((acc_t(1) - gt / n) * static_cast<acc_t>(g[j]) + gt * dot * z / (n * n * n)) * d;
      }
      out[j] = static_cast<scalar_t>(v);
    }
  }
};

// Runs update U followed by the prox of pp.penalty over the lists: one chunk-kernel launch for
// elementwise penalties, one row-kernel launch for group penalties.
template <typename U>
void run_update(const std::array<at::TensorList, U::kDepth>& lists, const U& upd, const ProxParams& pp) {
  using acc_t = typename U::acc_t;
  const ProxArgs<acc_t> px = prox_args<acc_t>(pp);
  dispatch_penalty(pp.penalty, [&](auto P) {
    constexpr Penalty kP = decltype(P)::value;
    if constexpr (kIsGroup<kP>) {
      launch_list_rows<U::kDepth>(lists, GroupProxOp<U, kP>{upd, px});
    } else {
      launch_list_chunks<U::kDepth>(lists, ElementwiseProxOp<U, kP>{upd, px});
    }
  });
}

// ---- prox ------------------------------------------------------------------------------------

at::Tensor prox_cuda(const at::Tensor& x, c10::string_view penalty, double lam, double a) {
  const Penalty p = validate_prox(x, penalty, lam, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  const ProxParams pp = make_prox_params(p, lam, a);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.prox", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ProxArgs<acc_t> px = prox_args<acc_t>(pp);
    dispatch_penalty(p, [&](auto P) {
      constexpr Penalty kP = decltype(P)::value;
      using U = ProxUpdate<scalar_t>;
      if constexpr (kIsGroup<kP>) {
        launch_tensor_rows<U::kDepth>({xc, out}, GroupProxOp<U, kP>{U{}, px});
      } else {
        launch_tensor_elementwise<U::kDepth>({xc, out}, ElementwiseProxOp<U, kP>{U{}, px});
      }
    });
  });
  return out;
}

at::Tensor prox_backward_cuda(const at::Tensor& grad, const at::Tensor& x, c10::string_view penalty, double lam,
                              double a) {
  const Penalty p = validate_prox_backward(grad, x, penalty, lam, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  const ProxParams pp = make_prox_params(p, lam, a);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.prox_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ProxArgs<acc_t> px = prox_args<acc_t>(pp);
    dispatch_penalty(p, [&](auto P) {
      constexpr Penalty kP = decltype(P)::value;
      if constexpr (kIsGroup<kP>) {
        ProxBackwardGroupOp<scalar_t, kP> op;
        op.px = px;
        launch_tensor_rows<3>({xc, gc, out}, op);
      } else {
        ProxBackwardOp<scalar_t, kP> op;
        op.px = px;
        launch_tensor_elementwise<3>({xc, gc, out}, op);
      }
    });
  });
  return out;
}

// ---- prox_sgd_ -------------------------------------------------------------------------------

void prox_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool init_momentum, c10::string_view penalty, double lam, double a,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const Penalty p = validate_prox_sgd(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, penalty, lam, a,
                                    grad_scale, found_inf);
  const bool use_mom = momentum != 0.0;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  const AmpArgs amp{device_scalar(grad_scale, keep), device_scalar(found_inf, keep), maximize};
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lr * lam, a);
  SLIMOPS_DISPATCH_FLOATS(params[0].scalar_type(), "slimops.prox_sgd_", [&] {
    using U = SgdUpdate<scalar_t>;
    using acc_t = typename U::acc_t;
    U upd;
    upd.lr = static_cast<acc_t>(lr);
    upd.mom = static_cast<acc_t>(momentum);
    upd.damp1 = static_cast<acc_t>(1.0 - dampening);
    upd.wd = static_cast<acc_t>(weight_decay);
    upd.use_mom = use_mom;
    upd.init_momentum = init_momentum;
    upd.nesterov = nesterov;
    upd.amp = amp;
    // Without momentum the buffer list is not used (nor checked): its slots are nullptr.
    run_update<U>({params, g, use_mom ? momentum_buffers : at::TensorList()}, upd, pp);
  });
}

// ---- prox_adamw_ -----------------------------------------------------------------------------

// The step tensors the kernel reads: the steps themselves when they share one floating dtype,
// else a float64 copy (one element per step) taken after the increment.
std::vector<at::Tensor> readable_steps(at::TensorList steps, int& kind) {
  kind = scalar_kind(steps[0].scalar_type());
  bool uniform = kind >= 0;
  for (const auto& s : steps) uniform = uniform && s.scalar_type() == steps[0].scalar_type();
  if (uniform) return steps.vec();
  std::vector<at::Tensor> flat;
  flat.reserve(steps.size());
  for (const auto& s : steps) flat.push_back(s.reshape({}));
  const at::Tensor copy = at::stack(flat).to(at::kDouble);
  kind = DeviceScalar::kF64;
  std::vector<at::Tensor> out;
  out.reserve(steps.size());
  for (int64_t i = 0; i < static_cast<int64_t>(steps.size()); ++i) out.push_back(copy[i]);
  return out;
}

void prox_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                     double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                     bool maximize, c10::string_view penalty, double lam, double a,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const Penalty p = validate_prox_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                                      beta2, eps, amsgrad, penalty, lam, a, grad_scale, found_inf);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  const AmpArgs amp{device_scalar(grad_scale, keep), device_scalar(found_inf, keep), maximize};
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lr * lam, a);

  // As torch's fused Adam: count the step on the device, undo it afterwards where found_inf says
  // the step was skipped (the kernel itself returns without writing). No host sync.
  at::_foreach_add_(state_steps, 1);
  int step_kind = DeviceScalar::kF32;
  const std::vector<at::Tensor> steps = readable_steps(state_steps, step_kind);

  SLIMOPS_DISPATCH_FLOATS(params[0].scalar_type(), "slimops.prox_adamw_", [&] {
    using U = AdamWUpdate<scalar_t>;
    using acc_t = typename U::acc_t;
    U upd;
    upd.lr = lr;
    upd.beta1 = beta1;
    upd.beta2 = beta2;
    upd.b1 = static_cast<acc_t>(beta1);
    upd.b2 = static_cast<acc_t>(beta2);
    upd.eps = static_cast<acc_t>(eps);
    upd.decay = static_cast<acc_t>(1.0 - lr * weight_decay);
    upd.amsgrad = amsgrad;
    upd.step_kind = step_kind;
    upd.amp = amp;
    run_update<U>({params, g, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(), steps}, upd,
                  pp);
  });

  if (found_inf.has_value()) {
    // One 0-d copy of found_inf per step dtype: the in-place subtraction keeps the step's dtype
    // and broadcasts over a step of shape (1,).
    std::map<at::ScalarType, at::Tensor> by_dtype;
    std::vector<at::Tensor> sub;
    sub.reserve(state_steps.size());
    for (const auto& s : state_steps) {
      const at::ScalarType dt = s.scalar_type();
      auto it = by_dtype.find(dt);
      if (it == by_dtype.end()) it = by_dtype.emplace(dt, found_inf->reshape({}).to(dt)).first;
      sub.push_back(it->second);
    }
    at::_foreach_sub_(state_steps, sub);
  }
}

// ---- palm_slimming_ --------------------------------------------------------------------------

void palm_slimming_cuda(at::TensorList gammas, at::TensorList xis, double alpha, double beta, double lam,
                        c10::string_view penalty, double a) {
  const Penalty p = validate_palm_slimming(gammas, xis, alpha, beta, lam, penalty, a);
  if (gammas.empty()) return;
  const c10::cuda::CUDAGuard guard(gammas[0].device());
  const double denom = alpha + beta;
  const ProxParams pp = make_prox_params(p, lam / denom, a);
  SLIMOPS_DISPATCH_FLOATS(gammas[0].scalar_type(), "slimops.palm_slimming_", [&] {
    using U = PalmUpdate<scalar_t>;
    using acc_t = typename U::acc_t;
    U upd;
    upd.ca = static_cast<acc_t>(alpha / denom);
    upd.cb = static_cast<acc_t>(beta / denom);
    run_update<U>({gammas, xis}, upd, pp);
  });
}

// ---- penalty_grad_ ---------------------------------------------------------------------------

void penalty_grad_cuda(at::TensorList grads, at::TensorList params, c10::string_view penalty, double s, double a,
                       double eps) {
  const Penalty p = validate_penalty_grad(grads, params, penalty, s, a, eps);
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const std::vector<at::Tensor> w = contiguous_all(params);
  SLIMOPS_DISPATCH_FLOATS(grads[0].scalar_type(), "slimops.penalty_grad_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::array<at::TensorList, 2> lists = {grads, w};
    // The subgradient penalty as a compile-time constant; the "prox" after it is the identity.
    auto run = [&](auto R) {
      using U = PenaltyGradUpdate<scalar_t, decltype(R)::value>;
      U upd;
      upd.s = static_cast<acc_t>(s);
      upd.a = static_cast<acc_t>(a);
      upd.eps = static_cast<acc_t>(eps);
      launch_list_chunks<U::kDepth>(lists, ElementwiseProxOp<U, Penalty::kNone>{upd, ProxArgs<acc_t>{}});
    };
    switch (p) {
      case Penalty::kL1: run(std::integral_constant<Penalty, Penalty::kL1>{}); break;
      case Penalty::kTL1: run(std::integral_constant<Penalty, Penalty::kTL1>{}); break;
      case Penalty::kLp: run(std::integral_constant<Penalty, Penalty::kLp>{}); break;
      default: {
        PenaltyGradL21Op<scalar_t> l21;
        l21.s = static_cast<acc_t>(s);
        launch_list_rows<2>(lists, l21);
      }
    }
  });
}

// ---- split_step_ -----------------------------------------------------------------------------

void split_step_cuda(at::TensorList weights, at::TensorList grads, at::TensorList us, double lr, double beta,
                     c10::string_view penalty, double lam, double a) {
  const Penalty p = validate_split_step(weights, grads, us, lr, beta, penalty, lam, a);
  if (weights.empty()) return;
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lam / beta, a);
  SLIMOPS_DISPATCH_FLOATS(weights[0].scalar_type(), "slimops.split_step_", [&] {
    using U = SplitUpdate<scalar_t>;
    using acc_t = typename U::acc_t;
    U upd;
    upd.lr = static_cast<acc_t>(lr);
    upd.lb = static_cast<acc_t>(lr * beta);
    run_update<U>({weights, g, us}, upd, pp);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CUDA, m) {
  m.impl("prox", &slimops::cuda::prox_cuda);
  m.impl("prox_backward", &slimops::cuda::prox_backward_cuda);
  m.impl("prox_sgd_", &slimops::cuda::prox_sgd_cuda);
  m.impl("prox_adamw_", &slimops::cuda::prox_adamw_cuda);
  m.impl("palm_slimming_", &slimops::cuda::palm_slimming_cuda);
  m.impl("penalty_grad_", &slimops::cuda::penalty_grad_cuda);
  m.impl("split_step_", &slimops::cuda::split_step_cuda);
}
