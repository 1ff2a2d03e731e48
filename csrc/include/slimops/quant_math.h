// Elementwise maths of the quant family (docs/algorithms.md §9), shared by the CPU and CUDA kernels: the surrogate
// gradients of fda_sign and the LSQ fake quantiser. Templates on the math type T (float for fp32/bf16/fp16
// storage, double for fp64), usable from host and device code.
#pragma once

#include <math.h>

#include "slimops/prox_math.h"  // SLIMOPS_HD

namespace slimops {

// The surrogate gradients of fda_sign (the order of the names in quant_checks.h).
enum class Surrogate : int { kFda = 0, kSte = 1, kTanh = 2, kApproxSign = 3 };

template <typename T>
SLIMOPS_HD T quant_rint(T v) {  // round half to even (the default rounding mode), as torch's fake quantisers
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return nearbyint(v);
#endif
}

// sum_{i<n} cos((2i+1) u) in closed form, stable at its removable singularities: with u = k pi + d (|d| <= pi/2;
// pi split in two constants, Cody-Waite, so that d stays accurate for large k), every term is (-1)^k cos((2i+1) d)
// and the sum is (-1)^k sin(2 n d) / (2 sin d), whose limit at d = 0 is n. sin d loses no relative accuracy near
// 0, so only d == 0 itself needs the limit.
template <typename T>
SLIMOPS_HD T cos_odd_sum(T u, int n) {
  const T kInvPi = T(0.318309886183790671538);
  const T kPiHi = T(3.140625);  // 8 significant bits: k * kPiHi is exact for |k| < 2^15 (float)
  const T kPiLo = T(9.67653589793e-4);
  const T k = quant_rint(u * kInvPi);
  const T d = (u - k * kPiHi) - k * kPiLo;
  const T s = sin(d);
  const T r = s == T(0) ? T(n) : sin(T(2 * n) * d) / (T(2) * s);
  return fmod(k, T(2)) != T(0) ? -r : r;
}

// d sign(x) / dx as the surrogate `s` sees it, zero where |x| > clip (NaN stays NaN). four_omega_pi = 4 omega / pi.
// Written as selects, not early returns, so that a loop over it vectorises where the surrogate allows (ste,
// approx_sign; the fda and tanh surrogates call sin / tanh).
template <typename T>
SLIMOPS_HD T sign_surrogate(T x, Surrogate s, int n_terms, T omega, T four_omega_pi, T clip) {
  const T ax = fabs(x);
  T d;
  switch (s) {
    case Surrogate::kFda: d = four_omega_pi * cos_odd_sum<T>(omega * x, n_terms); break;
    case Surrogate::kSte: d = T(1); break;
    case Surrogate::kTanh: {
      const T t = tanh(x);
      d = T(1) - t * t;
      break;
    }
    default: d = ax < T(1) ? T(2) - T(2) * ax : T(0); break;  // ApproxSign
  }
  d = ax <= clip ? d : T(0);
  return x != x ? x : d;
}

// sign(x) with sign(0) = -1 (NaN stays NaN).
template <typename T>
SLIMOPS_HD T binary_sign(T x) {
  return x > T(0) ? T(1) : (x != x ? x : T(-1));
}

// One fake-quantisation grid: levels [qn, qp], zero point z (an integer in [qn, qp]), scale s and its reciprocal.
template <typename T>
struct QuantGrid {
  T qn, qp, z, s, inv_s;

  // LSQ: whether v = x / s is inside the grid (the gradient of x passes).
  SLIMOPS_HD bool inside(T v) const { return v + z >= qn && v + z <= qp; }
};

}  // namespace slimops
