// CPU kernels of the prox family (schemas in csrc/registration.cpp, maths in ALGORITHMS.md §1-§5).
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
#include "slimops/prox_math.h"

namespace slimops {
namespace cpu {
namespace {

constexpr std::initializer_list<Penalty> kProxPenalties = {Penalty::kL1,   Penalty::kL0,  Penalty::kTL1,
                                                           Penalty::kL12,  Penalty::kL21, Penalty::kL0L21};
constexpr std::initializer_list<Penalty> kStepPenalties = {Penalty::kNone, Penalty::kL1,  Penalty::kL0,
                                                           Penalty::kTL1,  Penalty::kL12, Penalty::kL21,
                                                           Penalty::kL0L21};

#define SLIMOPS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Reads a one-element AMP tensor as double (CPU: a plain read).
double scalar_value(const std::optional<at::Tensor>& t, double fallback) {
  return t.has_value() ? t->item<double>() : fallback;
}

std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

// ---- prox ----------------------------------------------------------------------------------

at::Tensor prox_cpu(const at::Tensor& x, c10::string_view penalty, double lam, double a) {
  const Penalty p = parse_penalty("prox", std::string(penalty), kProxPenalties);
  check_penalty_args("prox", p, lam, a);
  check_floating("prox", "x", x);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const ProxParams pp = make_prox_params(p, lam, a);
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.prox", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ in = xc.data_ptr<scalar_t>();
    fused_update_prox<scalar_t, acc_t>(
        {out}, pp, [&](int64_t, scalar_t*) { return [in](int64_t j) { return static_cast<acc_t>(in[j]); }; },
        no_post());
  });
  return out;
}

at::Tensor prox_backward_cpu(const at::Tensor& grad, const at::Tensor& x, c10::string_view penalty, double lam,
                             double a) {
  const Penalty p = parse_penalty("prox_backward", std::string(penalty), kProxPenalties);
  check_penalty_args("prox_backward", p, lam, a);
  check_floating("prox_backward", "x", x);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "slimops.prox_backward: grad has shape ", grad.sizes(),
              " but x has shape ", x.sizes());
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
        for (int64_t j = ch.begin; j < ch.end; ++j) {
          const acc_t y = xin[j];
          const acc_t z = prox_elementwise<acc_t>(y, p, l, aa, t);
          o[j] = static_cast<scalar_t>(static_cast<acc_t>(gin[j]) * prox_elementwise_derivative<acc_t>(y, z, p, l, aa, t));
        }
        return;
      }
      // Block soft threshold z -> (1 - t/n) z, n = ||z||: J^T g = (1 - t/n) g + t (z.g) z / n^3.
      const int64_t row_len = out.numel() / group_rows(out);
      std::vector<acc_t> z(row_len);
      for (int64_t r = ch.begin; r < ch.end; ++r) {
        const int64_t base = r * row_len;
        acc_t sq = 0, dot = 0;
        for (int64_t k = 0; k < row_len; ++k) {
          z[k] = prox_elementwise<acc_t>(static_cast<acc_t>(xin[base + k]), p, l, aa, t);
          sq += z[k] * z[k];
          dot += z[k] * static_cast<acc_t>(gin[base + k]);
        }
        const acc_t n = std::sqrt(sq);
        for (int64_t k = 0; k < row_len; ++k) {
          acc_t v = 0;
          if (n > gt) {
            const acc_t y = xin[base + k];
            const acc_t d = prox_elementwise_derivative<acc_t>(y, z[k], p, l, aa, t);
            v = ((acc_t(1) - gt / n) * static_cast<acc_t>(gin[base + k]) + gt * dot * z[k] / (n * n * n)) * d;
          }
          o[base + k] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

// ---- prox_sgd_ -----------------------------------------------------------------------------

void prox_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                  bool init_momentum, c10::string_view penalty, double lam, double a,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "prox_sgd_";
  const Penalty p = parse_penalty(op, std::string(penalty), kStepPenalties);
  check_penalty_args(op, p, lam, a);
  TORCH_CHECK_VALUE(lr >= 0.0, "slimops.", op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(momentum >= 0.0, "slimops.", op, ": momentum must be >= 0, got ", momentum);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0), "slimops.", op,
              ": nesterov needs momentum > 0 and dampening = 0");
  check_param_list(op, "params", params);
  check_tensor_list(op, "grads", grads, params, /*inplace=*/false);
  if (momentum != 0.0) check_tensor_list(op, "momentum_buffers", momentum_buffers, params, /*inplace=*/true);
  check_amp_scalar(op, "grad_scale", grad_scale, params);
  check_amp_scalar(op, "found_inf", found_inf, params);
  if (params.empty() || scalar_value(found_inf, 0.0) != 0.0) return;
  const double inv_scale = 1.0 / scalar_value(grad_scale, 1.0);
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lr * lam, a);

  SLIMOPS_DISPATCH_FLOATS(params[0].scalar_type(), "slimops.prox_sgd_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t lr_ = lr, mom = momentum, damp1 = 1.0 - dampening, wd = weight_decay;
    const acc_t gscale = maximize ? -inv_scale : inv_scale;
    const bool use_mom = momentum != 0.0;
    auto make_update = [&](int64_t i, const scalar_t* pp_) {
      const scalar_t* __restrict__ gp = g[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ bp = use_mom ? momentum_buffers[i].data_ptr<scalar_t>() : nullptr;
      return [=](int64_t j) {
        const acc_t w = pp_[j];
        acc_t d = static_cast<acc_t>(gp[j]) * gscale + wd * w;
        if (use_mom) {
          const acc_t b_new = init_momentum ? d : mom * static_cast<acc_t>(bp[j]) + damp1 * d;
          const scalar_t b_store = static_cast<scalar_t>(b_new);
          bp[j] = b_store;
          const acc_t b = static_cast<acc_t>(b_store);  // SGD reads the stored buffer
          d = nesterov ? d + mom * b : b;
        }
        return w - lr_ * d;
      };
    };
    fused_update_prox<scalar_t, acc_t>(params, pp, make_update, no_post());
  });
}

// ---- prox_adamw_ ---------------------------------------------------------------------------

void prox_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    c10::string_view penalty, double lam, double a, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const char* op = "prox_adamw_";
  const Penalty p = parse_penalty(op, std::string(penalty), kStepPenalties);
  check_penalty_args(op, p, lam, a);
  TORCH_CHECK_VALUE(lr >= 0.0, "slimops.", op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "slimops.", op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "slimops.", op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "slimops.", op, ": eps must be >= 0, got ", eps);
  check_param_list(op, "params", params);
  check_tensor_list(op, "grads", grads, params, false);
  check_tensor_list(op, "exp_avgs", exp_avgs, params, true);
  check_tensor_list(op, "exp_avg_sqs", exp_avg_sqs, params, true);
  if (amsgrad) check_tensor_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, true);
  TORCH_CHECK_VALUE(state_steps.size() == params.size(), "slimops.", op, ": state_steps has ", state_steps.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK_VALUE(state_steps[i].numel() == 1 && state_steps[i].device() == params[i].device(), "slimops.", op,
                ": state_steps[", i, "] must be a one-element tensor on its parameter's device");
  }
  check_amp_scalar(op, "grad_scale", grad_scale, params);
  check_amp_scalar(op, "found_inf", found_inf, params);
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
    auto make_update = [&](int64_t i, const scalar_t* wp) {
      const scalar_t* __restrict__ gp = g[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ mp = exp_avgs[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ vp = exp_avg_sqs[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ vmaxp = amsgrad ? max_exp_avg_sqs[i].data_ptr<scalar_t>() : nullptr;
      const acc_t ss = step_size[i], ibc2 = inv_bc2_sqrt[i];
      return [=](int64_t j) {
        const acc_t gj = static_cast<acc_t>(gp[j]) * gscale;
        const acc_t w = static_cast<acc_t>(wp[j]) * decay;
        const acc_t m = static_cast<acc_t>(mp[j]) + (acc_t(1) - b1) * (gj - static_cast<acc_t>(mp[j]));
        acc_t v = b2 * static_cast<acc_t>(vp[j]) + (acc_t(1) - b2) * gj * gj;
        mp[j] = static_cast<scalar_t>(m);
        vp[j] = static_cast<scalar_t>(v);
        if (vmaxp != nullptr) {
          const acc_t vm = std::max(static_cast<acc_t>(vmaxp[j]), v);
          vmaxp[j] = static_cast<scalar_t>(vm);
          v = vm;
        }
        return w - ss * m / (std::sqrt(v) * ibc2 + eps_);
      };
    };
    fused_update_prox<scalar_t, acc_t>(params, pp, make_update, no_post());
  });
}

// ---- palm_slimming_ ------------------------------------------------------------------------

void palm_slimming_cpu(at::TensorList gammas, at::TensorList xis, double alpha, double beta, double lam,
                       c10::string_view penalty, double a) {
  const char* op = "palm_slimming_";
  const Penalty p = parse_penalty(op, std::string(penalty), kProxPenalties);
  check_penalty_args(op, p, lam, a);
  TORCH_CHECK_VALUE(alpha > 0.0 && std::isfinite(alpha), "slimops.", op, ": alpha (= 1/lr) must be > 0, got ", alpha);
  TORCH_CHECK_VALUE(beta >= 0.0 && std::isfinite(beta), "slimops.", op, ": beta must be >= 0, got ", beta);
  check_param_list(op, "gammas", gammas);
  check_tensor_list(op, "xis", xis, gammas, true, true, "gammas");
  if (gammas.empty()) return;
  const double denom = alpha + beta;
  const ProxParams pp = make_prox_params(p, lam / denom, a);
  SLIMOPS_DISPATCH_FLOATS(gammas[0].scalar_type(), "slimops.palm_slimming_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ca = alpha / denom, cb = beta / denom;
    auto make_update = [&](int64_t i, const scalar_t* xp) {
      scalar_t* __restrict__ gp = gammas[i].data_ptr<scalar_t>();
      return [=](int64_t j) {
        const acc_t x = xp[j];
        const acc_t gam = ca * static_cast<acc_t>(gp[j]) + cb * x;
        gp[j] = static_cast<scalar_t>(gam);
        return ca * x + cb * gam;
      };
    };
    fused_update_prox<scalar_t, acc_t>(xis, pp, make_update, no_post());
  });
}

// ---- penalty_grad_ -------------------------------------------------------------------------

void penalty_grad_cpu(at::TensorList grads, at::TensorList params, c10::string_view penalty, double s, double a,
                      double eps) {
  const char* op = "penalty_grad_";
  const Penalty p =
      parse_penalty(op, std::string(penalty), {Penalty::kL1, Penalty::kTL1, Penalty::kLp, Penalty::kL21});
  check_penalty_args(op, p, s, a, "s");
  TORCH_CHECK_VALUE(eps > 0.0, "slimops.", op, ": eps must be > 0, got ", eps);
  check_param_list(op, "grads", grads);
  check_tensor_list(op, "params", params, grads, false, true, "grads");
  if (grads.empty()) return;
  const std::vector<at::Tensor> w = contiguous_all(params);
  const bool group = p == Penalty::kL21;
  SLIMOPS_DISPATCH_FLOATS(grads[0].scalar_type(), "slimops.penalty_grad_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s_ = s, a_ = a, eps_ = eps;
    parallel_chunks(grads, group, [&](const Chunk& ch) {
      scalar_t* __restrict__ gp = grads[ch.tensor].data_ptr<scalar_t>();
      const scalar_t* __restrict__ wp = w[ch.tensor].data_ptr<scalar_t>();
      if (!group) {
        for (int64_t j = ch.begin; j < ch.end; ++j) {
          const acc_t d = penalty_subgradient<acc_t>(static_cast<acc_t>(wp[j]), p, a_, eps_);
          gp[j] = static_cast<scalar_t>(static_cast<acc_t>(gp[j]) + s_ * d);
        }
        return;
      }
      // Weighted group lasso (sparse group lasso, ALGORITHMS.md §5): s sqrt(n_g) w_g / ||w_g||.
      const int64_t row_len = grads[ch.tensor].numel() / group_rows(grads[ch.tensor]);
      const acc_t weight = std::sqrt(static_cast<acc_t>(row_len));
      for (int64_t r = ch.begin; r < ch.end; ++r) {
        const int64_t base = r * row_len;
        acc_t sq = 0;
        for (int64_t k = 0; k < row_len; ++k) sq += static_cast<acc_t>(wp[base + k]) * static_cast<acc_t>(wp[base + k]);
        const acc_t f = sq > 0 ? s_ * weight / std::sqrt(sq) : acc_t(0);
        for (int64_t k = 0; k < row_len; ++k)
          gp[base + k] = static_cast<scalar_t>(static_cast<acc_t>(gp[base + k]) + f * static_cast<acc_t>(wp[base + k]));
      }
    });
  });
}

// ---- split_step_ ---------------------------------------------------------------------------

void split_step_cpu(at::TensorList weights, at::TensorList grads, at::TensorList us, double lr, double beta,
                    c10::string_view penalty, double lam, double a) {
  const char* op = "split_step_";
  const Penalty p = parse_penalty(op, std::string(penalty), kProxPenalties);
  check_penalty_args(op, p, lam, a);
  TORCH_CHECK_VALUE(lr >= 0.0, "slimops.", op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta > 0.0 && std::isfinite(beta), "slimops.", op, ": beta must be > 0, got ", beta);
  check_param_list(op, "weights", weights);
  check_tensor_list(op, "grads", grads, weights, false, true, "weights");
  check_tensor_list(op, "us", us, weights, true, true, "weights");
  if (weights.empty()) return;
  const std::vector<at::Tensor> g = contiguous_all(grads);
  const ProxParams pp = make_prox_params(p, lam / beta, a);
  SLIMOPS_DISPATCH_FLOATS(weights[0].scalar_type(), "slimops.split_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t lr_ = lr, lb = lr * beta;
    // u = prox(w) is the prox target; w is updated from the final u in the post hook.
    auto make_update = [&](int64_t i, const scalar_t*) {
      const scalar_t* __restrict__ wp = weights[i].data_ptr<scalar_t>();
      return [=](int64_t j) { return static_cast<acc_t>(wp[j]); };
    };
    auto make_post = [&](int64_t i) {
      scalar_t* __restrict__ wp = weights[i].data_ptr<scalar_t>();
      const scalar_t* __restrict__ gp = g[i].data_ptr<scalar_t>();
      return [=](int64_t j, acc_t u) {
        const acc_t w = wp[j];
        wp[j] = static_cast<scalar_t>(w - lr_ * static_cast<acc_t>(gp[j]) - lb * (w - u));
      };
    };
    fused_update_prox<scalar_t, acc_t>(us, pp, make_update, make_post);
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
