// Dispatch helpers shared by the CPU and CUDA kernels: storage dtypes, compile-time penalties, and
// contiguous copies of read-only lists.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>
#include <vector>

#include "slimops/prox_math.h"

// fp32 / fp64 / bf16 / fp16 storage (math in at::opmath_type<scalar_t>: fp32, or fp64 for fp64).
#define SLIMOPS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace slimops {

// Calls f(std::integral_constant<Penalty, P>{}) so that the penalty is a compile-time constant of
// the kernel: the per-element switch of prox_elementwise folds away and the inner loops stay
// branch-light (vectorisable on the CPU for none/l1/l0).
template <typename F>
void dispatch_penalty(Penalty p, const F& f) {
  switch (p) {
    case Penalty::kL1: f(std::integral_constant<Penalty, Penalty::kL1>{}); break;
    case Penalty::kL0: f(std::integral_constant<Penalty, Penalty::kL0>{}); break;
    case Penalty::kTL1: f(std::integral_constant<Penalty, Penalty::kTL1>{}); break;
    case Penalty::kL12: f(std::integral_constant<Penalty, Penalty::kL12>{}); break;
    case Penalty::kL21: f(std::integral_constant<Penalty, Penalty::kL21>{}); break;
    case Penalty::kL0L21: f(std::integral_constant<Penalty, Penalty::kL0L21>{}); break;
    default: f(std::integral_constant<Penalty, Penalty::kNone>{}); break;
  }
}

// Calls f(std::true_type{}) or f(std::false_type{}): a loop-invariant option of an optimizer
// (momentum, nesterov, amsgrad) becomes a compile-time constant, so the inner loop has no branch on
// it and the CPU compiler can vectorise it.
template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Read-only inputs (grads, params read by penalty_grad_) may be strided: the kernels take dense copies
// (no copy when already contiguous).
inline std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

}  // namespace slimops
