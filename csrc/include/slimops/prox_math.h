// Closed-form proximal operators shared by the CPU and CUDA kernels (and the C++ tests).
//
// Convention (docs/algorithms.md §1): prox_{lam R}(y) = argmin_x 1/2 (x - y)^2 + lam R(x).
// Every function is a template on the accumulation type T (float for fp32/bf16/fp16 storage,
// double for fp64) and is usable from host and device code.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SLIMOPS_HD __host__ __device__ __forceinline__
#else
#define SLIMOPS_HD inline
#endif

namespace slimops {

// The penalties R of docs/algorithms.md §1-§3. `kNone` means "no proximal step" in the fused optimizers.
// kLp is a (sub)gradient-only penalty (|x|^p, 0 < p < 1) used by penalty_grad_.
enum class Penalty : int {
  kNone = 0,
  kL1 = 1,
  kL0 = 2,
  kTL1 = 3,
  kL12 = 4,
  kL21 = 5,
  kL0L21 = 6,
  kLp = 7,
};

// True for penalties whose prox couples the elements of a group (a slice along dim 0).
SLIMOPS_HD bool is_group_penalty(Penalty p) {
  return p == Penalty::kL21 || p == Penalty::kL0L21;
}

template <typename T>
SLIMOPS_HD T sign_of(T y) {
  return static_cast<T>((y > T(0)) - (y < T(0)));
}

// prox of lam*|x|: soft threshold.
// Written as a select + copysign (no branch, no fmax libcall) so that CPU loops vectorise; zeroed
// entries may come out as -0.0 (== 0). NaN stays NaN (the compare is false for NaN).
template <typename T>
SLIMOPS_HD T soft_threshold(T y, T lam) {
  T m = fabs(y) - lam;
  m = m < T(0) ? T(0) : m;
  return copysign(m, y);
}

// prox of lam*||x||_0: hard threshold at sqrt(2 lam) (ties at the threshold go to 0).
template <typename T>
SLIMOPS_HD T hard_threshold(T y, T thresh) {
  return fabs(y) <= thresh ? T(0) : y;  // NaN stays NaN
}

// Thresholds are precomputed once per call on the host: they depend only on (lam, a).
struct ProxParams {
  Penalty penalty = Penalty::kNone;
  double lam = 0.0;    // lam of prox_{lam R}
  double a = 1.0;      // Tl1 shape a; group weight mu for l0_l21; p for lp
  double thresh = 0.0; // elementwise zero threshold: |y| <= thresh -> 0
};

// Zero threshold of Tl1 (Zhang & Xin): lam (a+1)/a when lam <= a^2 / (2 (a+1)), else
// sqrt(2 lam (a+1)) - a/2.
inline double tl1_threshold(double lam, double a) {
  if (lam <= a * a / (2.0 * (a + 1.0))) return lam * (a + 1.0) / a;
  return sqrt(2.0 * lam * (a + 1.0)) - a / 2.0;
}

// Zero threshold of half thresholding (Xu et al.) in the 1/2-convention: (3/2) lam^{2/3}.
inline double half_threshold(double lam) { return 1.5 * cbrt(lam * lam); }

inline ProxParams make_prox_params(Penalty penalty, double lam, double a) {
  ProxParams p;
  p.penalty = penalty;
  p.lam = lam;
  p.a = a;
  switch (penalty) {
    case Penalty::kL1: p.thresh = lam; break;
    case Penalty::kL0:
    case Penalty::kL0L21: p.thresh = sqrt(2.0 * lam); break;
    case Penalty::kTL1: p.thresh = tl1_threshold(lam, a); break;
    case Penalty::kL12: p.thresh = half_threshold(lam); break;
    default: p.thresh = 0.0; break;
  }
  return p;
}

// prox of lam * (a+1)|x| / (a+|x|) (transformed l1), for |y| > thresh:
// x = sign(y) [ (2/3)(a+|y|) cos(phi/3) - 2a/3 + |y|/3 ],
// phi = arccos(1 - 27 lam a (a+1) / (2 (a+|y|)^3)).
template <typename T>
SLIMOPS_HD T tl1_prox(T y, T lam, T a, T thresh) {
  const T ay = fabs(y);
  if (ay <= thresh) return T(0);
  const T s = a + ay;
  T c = T(1) - T(27) * lam * a * (a + T(1)) / (T(2) * s * s * s);
  c = c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c);
  const T phi = acos(c);
  return sign_of(y) * (T(2) / T(3) * s * cos(phi / T(3)) - T(2) * a / T(3) + ay / T(3));
}

// prox of lam |x|^{1/2} (half thresholding), for |y| > (3/2) lam^{2/3}:
// x = (2/3) y [1 + cos(2 pi / 3 - (2/3) phi)], phi = arccos((lam/4) (|y|/3)^{-3/2}).
template <typename T>
SLIMOPS_HD T half_prox(T y, T lam, T thresh) {
  const T ay = fabs(y);
  if (ay <= thresh) return T(0);
  const T r = ay / T(3);
  T c = lam / T(4) / (r * sqrt(r));
  c = c > T(1) ? T(1) : c;
  const T phi = acos(c);
  const T two_pi_3 = T(2.0943951023931954923);  // 2 pi / 3
  return T(2) / T(3) * y * (T(1) + cos(two_pi_3 - T(2) / T(3) * phi));
}

// The elementwise part of a prox. For kL21 it is the identity and for kL0L21 the hard threshold:
// the group (block soft threshold) part is applied afterwards by group_scale().
template <typename T>
SLIMOPS_HD T prox_elementwise(T y, Penalty penalty, T lam, T a, T thresh) {
  switch (penalty) {
    case Penalty::kL1: return soft_threshold(y, lam);
    case Penalty::kL0:
    case Penalty::kL0L21: return hard_threshold(y, thresh);
    case Penalty::kTL1: return tl1_prox(y, lam, a, thresh);
    case Penalty::kL12: return half_prox(y, lam, thresh);
    default: return y;
  }
}

// d prox / d y of the elementwise part at y (x = prox_elementwise(y) passed in). Away from the
// threshold the prox is smooth; by the implicit function theorem on x - y + lam R'(x) = 0,
// dx/dy = 1 / (1 + lam R''(x)):
//   tl1:  R''(x) = -2 a (a+1) / (a+|x|)^3        l1_2: R''(x) = -(1/4) |x|^{-3/2}
// l1 / l0 / l0_l21: 1 where the input survives, else 0; l21 (group part handled outside): 1.
template <typename T>
SLIMOPS_HD T prox_elementwise_derivative(T y, T x, Penalty penalty, T lam, T a, T thresh) {
  switch (penalty) {
    case Penalty::kL1:
    case Penalty::kL0:
    case Penalty::kL0L21: return fabs(y) > thresh ? T(1) : T(0);
    case Penalty::kTL1: {
      if (x == T(0)) return T(0);
      const T d = a + fabs(x);
      return T(1) / (T(1) - T(2) * lam * a * (a + T(1)) / (d * d * d));
    }
    case Penalty::kL12: {
      if (x == T(0)) return T(0);
      const T ax = fabs(x);
      return T(1) / (T(1) - lam / (T(4) * ax * sqrt(ax)));
    }
    default: return T(1);
  }
}

// Block soft threshold factor max(0, 1 - t / ||y_g||_2) from the group's squared norm.
template <typename T>
SLIMOPS_HD T group_scale(T sq_norm, T t) {
  if (sq_norm <= T(0)) return T(0);
  const T f = T(1) - t / sqrt(sq_norm);
  return f > T(0) ? f : T(0);
}

// Group threshold of a group penalty: lam for l21, lam * mu (mu = a) for l0_l21.
template <typename T>
SLIMOPS_HD T group_threshold(Penalty penalty, T lam, T a) {
  return penalty == Penalty::kL0L21 ? lam * a : lam;
}

// (Sub)gradient of the sparsity penalties of docs/algorithms.md §2-§3 at x (scaled by s outside):
//   l1:  sign(x)
//   tl1: a (a+1) sign(x) / (a + |x|)^2
//   lp:  p sign(x) / max(|x|, eps)^{1-p}          (p = a, 0 < p < 1)
template <typename T>
SLIMOPS_HD T penalty_subgradient(T x, Penalty penalty, T a, T eps) {
  const T sg = sign_of(x);
  const T ax = fabs(x);
  switch (penalty) {
    case Penalty::kL1: return sg;
    case Penalty::kTL1: {
      const T d = a + ax;
      return a * (a + T(1)) * sg / (d * d);
    }
    case Penalty::kLp: {
      const T m = ax > eps ? ax : eps;
      return a * sg / pow(m, T(1) - a);
    }
    default: return T(0);
  }
}

}  // namespace slimops
