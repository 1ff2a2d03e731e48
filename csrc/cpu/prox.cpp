// CPU kernels of the prox family (schemas in csrc/registration.cpp, maths in docs/algorithms.md §1-§5).
// Every optimizer op is one parallel pass over all tensors of the list (fused_apply.h) with fp32
// math for fp32/bf16/fp16 storage and fp64 math for fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fused_apply.h"
#include "slimops/checks.h"
#include "slimops/dispatch.h"
#include "slimops/prox_checks.h"
#include "slimops/prox_math.h"

namespace slimops {
namespace cpu {
namespace {

// Reads a one-element AMP tensor as double (CPU: a plain read).
double scalar_value(const std::optional<at::Tensor>& t, double fallback) {
  return t.has_value() ? t->item<double>() : fallback;
}

// ---- prox ----------------------------------------------------------------------------------

at::Tensor prox_cpu(const at::Tensor& x, c10::string_view penalty, double lam, double a) {
  const Penalty p = validate_prox(x, penalty, lam, a);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const ProxParams pp = make_prox_params(p, lam, a);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.prox", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto streams = [&](int64_t) { return Streams<scalar_t, 1>{{xc.data_ptr<scalar_t>()}, 1u, 0u, false}; };
    auto make_step = [](int64_t, auto*, const auto& s) {
      const auto* __restrict__ in = s[0];
      return [=](int64_t j) { return load<acc_t>(in[j]); };
    };
    fused_update_prox<scalar_t, acc_t>({out}, pp, streams, make_step, no_post());
  });
  return out;
}

at::Tensor prox_backward_cpu(const at::Tensor& grad, const at::Tensor& x, c10::string_view penalty, double lam,
                             double a) {
  const Penalty p = validate_prox_backward(grad, x, penalty, lam, a);
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(xc);
  const ProxParams pp = make_prox_params(p, lam, a);
  const bool group = is_group_penalty(p);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.prox_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t l = lam, aa = a, t = pp.thresh;
    const acc_t gt = group_threshold<acc_t>(p, l, aa);
    const scalar_t* __restrict__ xin = xc.data_ptr<scalar_t>();
    const scalar_t* __restrict__ gin = gc.data_ptr<scalar_t>();
    scalar_t* __restrict__ o = out.data_ptr<scalar_t>();
    parallel_chunks({out}, group, [&](const Chunk& ch) {
      if (!group) {
        isa_for_range(ch.begin, ch.end, [=](int64_t j) {
          const acc_t y = load<acc_t>(xin[j]);
          const acc_t z = prox_elementwise<acc_t>(y, p, l, aa, t);
          put(o[j], load<acc_t>(gin[j]) * prox_elementwise_derivative<acc_t>(y, z, p, l, aa, t));
        });
        return;
      }
      // Block soft threshold z -> (1 - t/n) z, n = ||z||: J^T g = (1 - t/n) g + t (z.g) z / n^3.
      const int64_t row_len = out.numel() / group_rows(out), r0 = ch.begin, r1 = ch.end;
      std::vector<acc_t> buf(2 * row_len);
      acc_t *z = buf.data(), *gz = z + row_len;
      isa_run([=]() SLIMOPS_LAMBDA_INLINE {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t base = r * row_len;
          for (int64_t k = 0; k < row_len; ++k) {
            z[k] = prox_elementwise<acc_t>(load<acc_t>(xin[base + k]), p, l, aa, t);
            gz[k] = load<acc_t>(gin[base + k]);
          }
          const acc_t n = std::sqrt(lane_dot(z, z, row_len)), dot = lane_dot(z, gz, row_len);
          if (!(n > gt)) {  // the row is cut to 0 whatever the input's direction: a zero Jacobian
            for (int64_t k = 0; k < row_len; ++k) put(o[base + k], acc_t(0));
            continue;
          }
          const acc_t keep = acc_t(1) - gt / n, cross = gt * dot / (n * n * n);
          for (int64_t k = 0; k < row_len; ++k) {
            const acc_t d = prox_elementwise_derivative<acc_t>(load<acc_t>(xin[base + k]), z[k], p, l, aa, t);
            put(o[base + k], (keep * gz[k] + cross * z[k]) * d);
          }
        }
      });
    });
  });
  return out;
}

// ---- prox_sgd_ -----------------------------------------------------------------------------

void prox_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                  bool init_momentum, c10::string_view penalty, double lam, double a,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const Penalty p = validate_prox_sgd(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, penalty, lam, a,
                                    grad_scale, found_inf);
  if (params.empty() || scalar_value(found_inf, 0.0) != 0.0) return;
  const double inv_scale = 1.0 / scalar_value(grad_scale, 1.0);
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lr * lam, a);

  SLIMOPS_DISPATCH_FLOATS(params[0].scalar_type(), "slimops.prox_sgd_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t lr_ = lr, mom = momentum, damp1 = 1.0 - dampening, wd = weight_decay;
    const acc_t gscale = maximize ? -inv_scale : inv_scale;
    // The options are compile-time constants of the loop (5 variants: no momentum, or momentum with
    // {first step, later} x {nesterov, not}) so that it has no branch and vectorises.
    auto run = [&](auto kMom, auto kInit, auto kNesterov) {
      // Streams: the gradient (read) and the momentum buffer (written; read after the first step).
      auto streams = [&](int64_t i) {
        constexpr bool kReadsBuf = decltype(kMom)::value && !decltype(kInit)::value;
        scalar_t* buf = kMom ? momentum_buffers[i].data_ptr<scalar_t>() : nullptr;
        return Streams<scalar_t, 2>{{g[i].data_ptr<scalar_t>(), buf}, kReadsBuf ? 0b11u : 0b01u, kMom ? 0b10u : 0b00u};
      };
      auto make_step = [&](int64_t, auto* pp_, const auto& s) {
        const auto* __restrict__ gp = s[0];
        auto* __restrict__ bp = s[1];
        return [=](int64_t j) {
          const acc_t w = load<acc_t>(pp_[j]);
          acc_t d = load<acc_t>(gp[j]) * gscale + wd * w;
          if constexpr (decltype(kMom)::value) {
            acc_t b_new = d;
            if constexpr (!decltype(kInit)::value) b_new = mom * load<acc_t>(bp[j]) + damp1 * d;
            put(bp[j], b_new);
            const acc_t b = round_to<scalar_t>(b_new);  // SGD reads the stored (rounded) buffer
            if constexpr (decltype(kNesterov)::value) {
              d = d + mom * b;
            } else {
              d = b;
            }
          }
          return w - lr_ * d;
        };
      };
      fused_update_prox<scalar_t, acc_t>(params, pp, streams, make_step, no_post());
    };
    if (momentum == 0.0) {
      run(std::false_type{}, std::false_type{}, std::false_type{});
    } else {
      dispatch_bool(init_momentum, [&](auto kInit) {
        dispatch_bool(nesterov, [&](auto kNesterov) { run(std::true_type{}, kInit, kNesterov); });
      });
    }
  });
}

// ---- prox_adamw_ ---------------------------------------------------------------------------

void prox_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    c10::string_view penalty, double lam, double a, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const Penalty p = validate_prox_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                                      beta2, eps, amsgrad, penalty, lam, a, grad_scale, found_inf);
  if (params.empty() || scalar_value(found_inf, 0.0) != 0.0) return;
  const double inv_scale = 1.0 / scalar_value(grad_scale, 1.0);
  const std::vector<at::Tensor> g = contiguous_all(grads);
  // Per-tensor bias corrections from the incremented step counts (read once, on the host).
  std::vector<double> step_size(params.size()), inv_bc2_sqrt(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    state_steps[i].add_(1);
    const double step = state_steps[i].item<double>();
    step_size[i] = lr / (1.0 - std::pow(beta1, step));
    inv_bc2_sqrt[i] = 1.0 / std::sqrt(1.0 - std::pow(beta2, step));
  }
  const ProxParams pp = make_prox_params(p, lr * lam, a);

  SLIMOPS_DISPATCH_FLOATS(params[0].scalar_type(), "slimops.prox_adamw_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t b1 = beta1, b2 = beta2, eps_ = eps, decay = 1.0 - lr * weight_decay;
    const acc_t gscale = maximize ? -inv_scale : inv_scale;
    // m <- lerp(m, g, 1 - b1) as torch's lerp_ computes it (so that inf/NaN come out as in torch.optim.AdamW):
    // m + w (g - m) for a weight w < 0.5, else g - (g - m) (1 - w) = g + (w - 1) (g - m).
    const acc_t lw = acc_t(1) - b1;
    const bool lerp_small = std::abs(lw) < acc_t(0.5);
    const acc_t lerp_coeff = lerp_small ? lw : lw - acc_t(1);
    const uint64_t lerp_mask = lerp_small ? ~uint64_t(0) : uint64_t(0);  // picks m (all ones) or g
    dispatch_bool(amsgrad, [&](auto kAmsgrad) {  // a compile-time option: no branch in the loop
      // Streams: the gradient (read), the two moments (read and written) and, with amsgrad, their running maximum.
      auto streams = [&](int64_t i) {
        return Streams<scalar_t, 4>{{g[i].data_ptr<scalar_t>(), exp_avgs[i].data_ptr<scalar_t>(),
                                     exp_avg_sqs[i].data_ptr<scalar_t>(),
                                     kAmsgrad ? max_exp_avg_sqs[i].data_ptr<scalar_t>() : nullptr},
                                    kAmsgrad ? 0b1111u : 0b0111u, kAmsgrad ? 0b1110u : 0b0110u};
      };
      auto make_step = [&](int64_t i, auto* wp, const auto& s) {
        const auto* __restrict__ gp = s[0];
        auto* __restrict__ mp = s[1];
        auto* __restrict__ vp = s[2];
        auto* __restrict__ vmaxp = s[3];
        const acc_t ss = step_size[i], ibc2 = inv_bc2_sqrt[i];
        return [=](int64_t j) {
          const acc_t gj = load<acc_t>(gp[j]) * gscale;
          const acc_t w = load<acc_t>(wp[j]) * decay;
          const acc_t m_old = load<acc_t>(mp[j]);
          const acc_t m = select_bits(lerp_mask, m_old, gj) + lerp_coeff * (gj - m_old);
          acc_t v = b2 * load<acc_t>(vp[j]) + (acc_t(1) - b2) * gj * gj;
          put(mp[j], m);
          put(vp[j], v);
          if constexpr (decltype(kAmsgrad)::value) {
            const acc_t v_old = load<acc_t>(vmaxp[j]);
            const acc_t vm = (v_old < v || v != v) ? v : v_old;  // torch.maximum: a NaN on either side wins
            put(vmaxp[j], vm);
            v = vm;
          }
          return w - ss * m / (std::sqrt(v) * ibc2 + eps_);
        };
      };
      fused_update_prox<scalar_t, acc_t>(params, pp, streams, make_step, no_post());
    });
  });
}

// ---- palm_slimming_ ------------------------------------------------------------------------

void palm_slimming_cpu(at::TensorList gammas, at::TensorList xis, double alpha, double beta, double lam,
                       c10::string_view penalty, double a) {
  const Penalty p = validate_palm_slimming(gammas, xis, alpha, beta, lam, penalty, a);
  if (gammas.empty()) return;
  const double denom = alpha + beta;
  const ProxParams pp = make_prox_params(p, lam / denom, a);
  SLIMOPS_DISPATCH_FLOATS(gammas[0].scalar_type(), "slimops.palm_slimming_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ca = alpha / denom, cb = beta / denom;
    auto streams = [&](int64_t i) { return Streams<scalar_t, 1>{{gammas[i].data_ptr<scalar_t>()}, 1u, 1u}; };
    auto make_step = [&](int64_t, auto* xp, const auto& s) {
      auto* __restrict__ gp = s[0];
      return [=](int64_t j) {
        const acc_t x = load<acc_t>(xp[j]);
        const acc_t gam = ca * load<acc_t>(gp[j]) + cb * x;
        put(gp[j], gam);
        return ca * x + cb * gam;
      };
    };
    fused_update_prox<scalar_t, acc_t>(xis, pp, streams, make_step, no_post());
  });
}

// ---- penalty_grad_ -------------------------------------------------------------------------

void penalty_grad_cpu(at::TensorList grads, at::TensorList params, c10::string_view penalty, double s, double a,
                      double eps) {
  const Penalty p = validate_penalty_grad(grads, params, penalty, s, a, eps);
  if (grads.empty()) return;
  const std::vector<at::Tensor> w = contiguous_all(params);
  SLIMOPS_DISPATCH_FLOATS(grads[0].scalar_type(), "slimops.penalty_grad_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s_ = s, a_ = a, eps_ = eps;
    // Elementwise penalties: the penalty is a compile-time constant of the loop, so penalty_subgradient's switch
    // folds away and the l1 / tl1 loops vectorise (with the switch per element they stayed scalar, 2-3x slower
    // than torch's own sign on 25M parameters).
    auto elementwise = [&](auto P) {
      constexpr Penalty kP = decltype(P)::value;
      parallel_chunks(grads, false, [&](const Chunk& ch) {
        scalar_t* __restrict__ gp = grads[ch.tensor].data_ptr<scalar_t>();
        const scalar_t* __restrict__ wp = w[ch.tensor].data_ptr<scalar_t>();
        isa_for_range(ch.begin, ch.end, [=](int64_t j) {
          const acc_t d = penalty_subgradient<acc_t>(load<acc_t>(wp[j]), kP, a_, eps_);
          put(gp[j], load<acc_t>(gp[j]) + s_ * d);
        });
      });
    };
    switch (p) {
      case Penalty::kL1: return elementwise(std::integral_constant<Penalty, Penalty::kL1>{});
      case Penalty::kTL1: return elementwise(std::integral_constant<Penalty, Penalty::kTL1>{});
      case Penalty::kLp: return elementwise(std::integral_constant<Penalty, Penalty::kLp>{});
      default: break;  // l21, below
    }
    parallel_chunks(grads, true, [&](const Chunk& ch) {
      scalar_t* __restrict__ gp = grads[ch.tensor].data_ptr<scalar_t>();
      const scalar_t* __restrict__ wp = w[ch.tensor].data_ptr<scalar_t>();
      // Weighted group lasso (sparse group lasso, docs/algorithms.md §5): s sqrt(n_g) w_g / ||w_g||.
      const int64_t row_len = grads[ch.tensor].numel() / group_rows(grads[ch.tensor]), r0 = ch.begin, r1 = ch.end;
      const acc_t weight = std::sqrt(static_cast<acc_t>(row_len));
      std::vector<acc_t> w_buf(row_len);
      acc_t* w_row = w_buf.data();
      isa_run([=]() SLIMOPS_LAMBDA_INLINE {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t base = r * row_len;
          for (int64_t k = 0; k < row_len; ++k) w_row[k] = load<acc_t>(wp[base + k]);
          const acc_t sq = lane_dot(w_row, w_row, row_len);
          const acc_t f = sq > 0 ? s_ * weight / std::sqrt(sq) : acc_t(0);
          for (int64_t k = 0; k < row_len; ++k)
            put(gp[base + k], load<acc_t>(gp[base + k]) + f * w_row[k]);
        }
      });
    });
  });
}

// ---- split_step_ ---------------------------------------------------------------------------

void split_step_cpu(at::TensorList weights, at::TensorList grads, at::TensorList us, double lr, double beta,
                    c10::string_view penalty, double lam, double a) {
  const Penalty p = validate_split_step(weights, grads, us, lr, beta, penalty, lam, a);
  if (weights.empty()) return;
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lam / beta, a);
  SLIMOPS_DISPATCH_FLOATS(weights[0].scalar_type(), "slimops.split_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t lr_ = lr, lb = lr * beta;
    // u = prox(w) is the prox target; w is updated from the final u in the post hook.
    auto streams = [&](int64_t i) { return Streams<scalar_t, 1>{{weights[i].data_ptr<scalar_t>()}, 1u, 0u, false}; };
    auto make_step = [](int64_t, auto*, const auto& s) {
      const auto* __restrict__ wp = s[0];
      return [=](int64_t j) { return load<acc_t>(wp[j]); };
    };
    auto make_post = [&](int64_t i) {
      scalar_t* __restrict__ wp = weights[i].data_ptr<scalar_t>();
      const scalar_t* __restrict__ gp = g[i].data_ptr<scalar_t>();
      return [=](int64_t j, acc_t u) {
        const acc_t w = load<acc_t>(wp[j]);
        put(wp[j], w - lr_ * load<acc_t>(gp[j]) - lb * (w - u));
      };
    };
    fused_update_prox<scalar_t, acc_t>(us, pp, streams, make_step, make_post);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("prox", &slimops::cpu::prox_cpu);
  m.impl("prox_backward", &slimops::cpu::prox_backward_cpu);
  m.impl("prox_sgd_", &slimops::cpu::prox_sgd_cpu);
  m.impl("prox_adamw_", &slimops::cpu::prox_adamw_cpu);
  m.impl("palm_slimming_", &slimops::cpu::palm_slimming_cpu);
  m.impl("penalty_grad_", &slimops::cpu::penalty_grad_cpu);
  m.impl("split_step_", &slimops::cpu::split_step_cpu);
}
