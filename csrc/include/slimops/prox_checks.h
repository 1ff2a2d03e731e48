// Argument checks of each op of the prox family, shared by the CPU and CUDA kernels so that every
// backend accepts and rejects the same calls with the same messages. Each returns the parsed penalty.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#include "slimops/checks.h"

namespace slimops {

inline constexpr std::initializer_list<Penalty> kProxPenalties = {
    Penalty::kL1, Penalty::kL0, Penalty::kTL1, Penalty::kL12, Penalty::kL21, Penalty::kL0L21};
inline constexpr std::initializer_list<Penalty> kStepPenalties = {
    Penalty::kNone, Penalty::kL1, Penalty::kL0, Penalty::kTL1, Penalty::kL12, Penalty::kL21, Penalty::kL0L21};
inline constexpr std::initializer_list<Penalty> kGradPenalties = {Penalty::kL1, Penalty::kTL1, Penalty::kLp,
                                                                  Penalty::kL21};

inline Penalty validate_prox(const at::Tensor& x, c10::string_view penalty, double lam, double a) {
  const Penalty p = parse_penalty("prox", std::string(penalty), kProxPenalties);
  check_penalty_args("prox", p, lam, a);
  check_floating("prox", "x", x);
  return p;
}

inline Penalty validate_prox_backward(const at::Tensor& grad, const at::Tensor& x, c10::string_view penalty,
                                      double lam, double a) {
  const char* op = "prox_backward";
  const Penalty p = parse_penalty(op, std::string(penalty), kProxPenalties);
  check_penalty_args(op, p, lam, a);
  check_floating(op, "x", x);
  check_floating(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "slimops.prox_backward: grad has shape ", grad.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(grad.device() == x.device(), "slimops.prox_backward: grad is on ", grad.device(),
                    " but x is on ", x.device());
  return p;
}

inline Penalty validate_prox_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                 double lr, double momentum, double dampening, bool nesterov, c10::string_view penalty,
                                 double lam, double a, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf) {
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
  // (without momentum the buffers are neither used nor checked)
  const at::TensorList buffers = momentum != 0.0 ? momentum_buffers : at::TensorList();
  check_no_overlap(op, {{"params", params}, {"momentum_buffers", buffers}},
                   {{"grads", grads}, {"grad_scale", grad_scale}, {"found_inf", found_inf}});
  return p;
}

inline Penalty validate_prox_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
                                   bool amsgrad, c10::string_view penalty, double lam, double a,
                                   const std::optional<at::Tensor>& grad_scale,
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
    TORCH_CHECK_TYPE(state_steps[i].scalar_type() == at::kFloat, "slimops.", op, ": state_steps[", i, "] has dtype ",
                     state_steps[i].scalar_type(), "; expected float32");
  }
  check_amp_scalar(op, "grad_scale", grad_scale, params);
  check_amp_scalar(op, "found_inf", found_inf, params);
  check_no_overlap(op,
                   {{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()}, {"state_steps", state_steps}},
                   {{"grads", grads}, {"grad_scale", grad_scale}, {"found_inf", found_inf}});
  return p;
}

inline Penalty validate_palm_slimming(at::TensorList gammas, at::TensorList xis, double alpha, double beta, double lam,
                                      c10::string_view penalty, double a) {
  const char* op = "palm_slimming_";
  const Penalty p = parse_penalty(op, std::string(penalty), kProxPenalties);
  check_penalty_args(op, p, lam, a);
  TORCH_CHECK_VALUE(alpha > 0.0 && std::isfinite(alpha), "slimops.", op, ": alpha (= 1/lr) must be > 0, got ", alpha);
  TORCH_CHECK_VALUE(beta >= 0.0 && std::isfinite(beta), "slimops.", op, ": beta must be >= 0, got ", beta);
  check_param_list(op, "gammas", gammas);
  check_tensor_list(op, "xis", xis, gammas, true, true, "gammas");
  check_no_overlap(op, {{"gammas", gammas}, {"xis", xis}}, {});
  return p;
}

inline Penalty validate_penalty_grad(at::TensorList grads, at::TensorList params, c10::string_view penalty, double s,
                                     double a, double eps) {
  const char* op = "penalty_grad_";
  const Penalty p = parse_penalty(op, std::string(penalty), kGradPenalties);
  check_penalty_args(op, p, s, a, "s");
  TORCH_CHECK_VALUE(eps > 0.0, "slimops.", op, ": eps must be > 0, got ", eps);
  check_param_list(op, "grads", grads);
  check_tensor_list(op, "params", params, grads, false, true, "grads");
  check_no_overlap(op, {{"grads", grads}}, {{"params", params}});
  return p;
}

inline Penalty validate_split_step(at::TensorList weights, at::TensorList grads, at::TensorList us, double lr,
                                   double beta, c10::string_view penalty, double lam, double a) {
  const char* op = "split_step_";
  const Penalty p = parse_penalty(op, std::string(penalty), kProxPenalties);
  check_penalty_args(op, p, lam, a);
  TORCH_CHECK_VALUE(lr >= 0.0, "slimops.", op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta > 0.0 && std::isfinite(beta), "slimops.", op, ": beta must be > 0, got ", beta);
  check_param_list(op, "weights", weights);
  check_tensor_list(op, "grads", grads, weights, false, true, "weights");
  check_tensor_list(op, "us", us, weights, true, true, "weights");
  check_no_overlap(op, {{"weights", weights}, {"us", us}}, {{"grads", grads}});
  return p;
}

}  // namespace slimops
