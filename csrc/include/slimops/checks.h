// Argument checks shared by every kernel. User errors raise ValueError (TypeError for dtypes) in Python
// with a message that names the op and the argument: "slimops.<op>: <arg> ...".
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "slimops/prox_math.h"

namespace slimops {

// Parses a penalty name. `allowed` is the set the op accepts (e.g. the prox op takes no "lp").
inline Penalty parse_penalty(const char* op, const std::string& name,
                             std::initializer_list<Penalty> allowed) {
  Penalty p;
  if (name == "none") p = Penalty::kNone;
  else if (name == "l1") p = Penalty::kL1;
  else if (name == "l0") p = Penalty::kL0;
  else if (name == "tl1") p = Penalty::kTL1;
  else if (name == "l1_2") p = Penalty::kL12;
  else if (name == "l21") p = Penalty::kL21;
  else if (name == "l0_l21") p = Penalty::kL0L21;
  else if (name == "lp") p = Penalty::kLp;
  else p = static_cast<Penalty>(-1);
  bool ok = false;
  std::string names;
  static const char* kNames[] = {"none", "l1", "l0", "tl1", "l1_2", "l21", "l0_l21", "lp"};
  for (Penalty q : allowed) {
    ok = ok || q == p;
    if (!names.empty()) names += ", ";
    names += kNames[static_cast<int>(q)];
  }
  TORCH_CHECK_VALUE(ok, "slimops.", op, ": unknown penalty '", name, "' (expected one of: ", names, ")");
  return p;
}

// Checks lam >= 0 (finite) and, where the penalty uses it, the shape parameter a.
inline void check_penalty_args(const char* op, Penalty p, double lam, double a, const char* lam_name = "lam") {
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0, "slimops.", op, ": ", lam_name,
                    " must be finite and >= 0, got ", lam);
  if (p == Penalty::kTL1) {
    TORCH_CHECK_VALUE(std::isfinite(a) && a > 0.0, "slimops.", op, ": a must be > 0 for penalty 'tl1', got ", a);
  } else if (p == Penalty::kL0L21) {
    TORCH_CHECK_VALUE(std::isfinite(a) && a >= 0.0, "slimops.", op,
                ": a (the group weight mu) must be >= 0 for penalty 'l0_l21', got ", a);
  } else if (p == Penalty::kLp) {
    TORCH_CHECK_VALUE(a > 0.0 && a < 1.0, "slimops.", op, ": a (the exponent p) must be in (0, 1) for penalty 'lp', got ", a);
  }
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "slimops.", op, ": ", arg,
              " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
}

// Checks a list of tensors that goes with `params` (named `params_name`): same length, and every
// tensor the same shape, dtype and device as its parameter, strided; contiguous when `inplace`.
inline void check_tensor_list(const char* op, const char* arg, at::TensorList list, at::TensorList params,
                              bool inplace, bool same_dtype = true, const char* params_name = "params") {
  TORCH_CHECK_VALUE(list.size() == params.size(), "slimops.", op, ": ", arg, " has ", list.size(),
                    " tensors but ", params_name, " has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "slimops.", op, ": ", arg, "[", i,
                "] is sparse; sparse gradients are not supported");
    TORCH_CHECK_VALUE(t.device() == p.device(), "slimops.", op, ": ", arg, "[", i, "] is on ", t.device(),
                " but its parameter is on ", p.device());
    TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == p.scalar_type(), "slimops.", op, ": ", arg, "[", i,
                "] has dtype ", t.scalar_type(), " but its parameter has dtype ", p.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == p.sizes(), "slimops.", op, ": ", arg, "[", i, "] has shape ", t.sizes(),
                " but its parameter has shape ", p.sizes());
    TORCH_CHECK_VALUE(!inplace || t.is_contiguous(), "slimops.", op, ": ", arg, "[", i,
                "] must be contiguous (it is updated in place)");
  }
}

// Checks the parameter list itself: floating, strided, contiguous (updated in place), one dtype
// and one device for the whole list (the optimizers group tensors by device and dtype).
inline void check_param_list(const char* op, const char* arg, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, "slimops.", op, ": ", arg, "[", i, "] must be a strided tensor");
    check_floating(op, arg, p);
    TORCH_CHECK_VALUE(p.is_contiguous(), "slimops.", op, ": ", arg, "[", i,
                "] must be contiguous (it is updated in place)");
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), "slimops.", op, ": ", arg, "[", i, "] has dtype ",
                p.scalar_type(), " but ", arg, "[0] has dtype ", params[0].scalar_type(),
                "; one call takes one dtype");
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "slimops.", op, ": ", arg, "[", i, "] is on ", p.device(),
                " but ", arg, "[0] is on ", params[0].device());
  }
}

// grad_scale / found_inf: optional one-element float tensors on the parameters' device.
inline void check_amp_scalar(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                             at::TensorList params) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1, "slimops.", op, ": ", arg, " must have exactly one element, got ", t->numel());
  TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), "slimops.", op, ": ", arg, " must be floating, got ",
              t->scalar_type());
  if (!params.empty()) {
    TORCH_CHECK_VALUE(t->device() == params[0].device(), "slimops.", op, ": ", arg, " is on ", t->device(),
                " but params are on ", params[0].device());
  }
}

}  // namespace slimops
