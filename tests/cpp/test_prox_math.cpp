// C++ tests of the closed-form proximal operators (csrc/include/slimops/prox_math.h) and of the
// CPU prox kernel reached through the dispatcher. Built and run by CMakeLists.txt / ctest.
//
//  (a) every elementwise closed form against a brute-force argmin of 1/2 (x-y)^2 + lam R(x)
//      (fine grid, then golden-section refinement of every grid local minimum), comparing
//      objective values so that ties at the threshold do not matter;
//  (b) the group prox (block soft threshold) against a brute-force 2-D argmin;
//  (c) slimops::prox (CPU) through the dispatcher against the header, and its penalty errors;
//  (d) prox_elementwise_derivative against central finite differences away from thresholds.
//
// No test framework: EXPECT counts passes and failures, prints the first failures in detail, and
// main() prints "N passed, M failed" and returns non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "slimops/prox_math.h"

using slimops::Penalty;

namespace {

// ---- harness ---------------------------------------------------------------------------------
long g_passed = 0;
long g_failed = 0;
constexpr long kMaxReported = 30;

#define EXPECT(cond, ...)                                               \
  do {                                                                 \
    if (cond) {                                                        \
      ++g_passed;                                                      \
    } else {                                                           \
      if (++g_failed <= kMaxReported) {                                \
        std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                             \
        std::fprintf(stderr, "\n");                                    \
      }                                                                \
    }                                                                  \
  } while (0)

const char* name_of(Penalty p) {
  switch (p) {
    case Penalty::kL1: return "l1";
    case Penalty::kL0: return "l0";
    case Penalty::kTL1: return "tl1";
    case Penalty::kL12: return "l1_2";
    case Penalty::kL21: return "l21";
    case Penalty::kL0L21: return "l0_l21";
    default: return "?";
  }
}

// R(x) of the elementwise penalties (docs/algorithms.md §1).
double penalty_value(Penalty p, double x, double a) {
  const double ax = std::fabs(x);
  switch (p) {
    case Penalty::kL1: return ax;
    case Penalty::kL0: return ax != 0.0 ? 1.0 : 0.0;
    case Penalty::kTL1: return (a + 1.0) * ax / (a + ax);
    case Penalty::kL12: return std::sqrt(ax);
    default: return 0.0;
  }
}

double objective(Penalty p, double x, double y, double lam, double a) {
  return 0.5 * (x - y) * (x - y) + lam * penalty_value(p, x, a);
}

// Golden-section search of f on [lo, hi]; returns the best point seen (f need not be unimodal).
double golden_min(const std::function<double(double)>& f, double lo, double hi, double best_x) {
  const double g = 0.5 * (std::sqrt(5.0) - 1.0);
  double best_f = f(best_x);
  double c = hi - g * (hi - lo), d = lo + g * (hi - lo);
  double fc = f(c), fd = f(d);
  for (int it = 0; it < 200 && hi - lo > 1e-15 * (1.0 + std::fabs(lo)); ++it) {
    if (fc < fd) {
      hi = d; d = c; fd = fc; c = hi - g * (hi - lo); fc = f(c);
    } else {
      lo = c; c = d; fc = fd; d = lo + g * (hi - lo); fd = f(d);
    }
  }
  for (double x : {c, d, lo, hi}) {
    const double v = f(x);
    if (v < best_f) { best_f = v; best_x = x; }
  }
  return best_x;
}

// Brute-force min over x of 1/2 (x-y)^2 + lam R(x). The minimiser lies between 0 and y, so the grid
// covers [-|y|-1, |y|+1] (x = 0 exactly on it: the l0 / l1_2 minimum at 0 is a single point) and
// every grid local minimum is refined by golden section on its two neighbouring cells.
double brute_min_objective(Penalty p, double y, double lam, double a) {
  const int M = 20000;
  const double X = std::fabs(y) + 1.0;
  const double h = X / M;
  auto f = [&](double x) { return objective(p, x, y, lam, a); };
  std::vector<double> v(2 * M + 1);
  for (int k = 0; k <= 2 * M; ++k) v[k] = f((k - M) * h);
  double best = f(0.0);
  for (int k = 0; k <= 2 * M; ++k) {
    const bool local = (k == 0 || v[k] <= v[k - 1]) && (k == 2 * M || v[k] <= v[k + 1]);
    if (!local) continue;
    const double xk = (k - M) * h;
    const double xr = golden_min(f, xk - h, xk + h, xk);
    best = std::min(best, f(xr));
  }
  return best;
}

std::vector<double> linspace(double lo, double hi, int n) {
  std::vector<double> out(n);
  for (int i = 0; i < n; ++i) out[i] = lo + (hi - lo) * i / (n - 1);
  return out;
}

// Inputs around the zero threshold t: a uniform sweep plus points just either side of +-t.
std::vector<double> test_inputs(double t) {
  const double span = 3.0 * t + 1.0;
  std::vector<double> ys = linspace(-span, span, 241);
  for (double e : {1e-7, 1e-4, 1e-2}) {
    for (double s : {-1.0, 1.0}) {
      ys.push_back(s * (t + e));
      ys.push_back(s * (t - e));
    }
  }
  return ys;
}

// ---- (a) elementwise closed forms vs brute force -------------------------------------------
void check_closed_form(Penalty p, double lam, double a) {
  const slimops::ProxParams pp = slimops::make_prox_params(p, lam, a);
  for (double y : test_inputs(pp.thresh)) {
    const double x = slimops::prox_elementwise<double>(y, p, lam, a, pp.thresh);
    const double fc = objective(p, x, y, lam, a);
    const double fb = brute_min_objective(p, y, lam, a);
    const double tol = 1e-10 * (1.0 + y * y);
    // fc < fb - tol would mean the brute force is broken; fc > fb + tol that the closed form is.
    EXPECT(std::isfinite(x) && std::fabs(fc - fb) <= tol,
          "%s lam=%g a=%g y=%.12g: prox=%.12g objective %.15g, brute-force min %.15g", name_of(p), lam, a, y,
          x, fc, fb);
    // The prox shrinks: same sign as y, |x| <= |y|.
    EXPECT(x * y >= 0.0 && std::fabs(x) <= std::fabs(y) + 1e-12, "%s lam=%g a=%g y=%.12g: prox=%.12g",
          name_of(p), lam, a, y, x);
  }
}

void test_closed_forms() {
  const long before = g_failed;
  for (double lam : {0.0, 0.01, 0.3, 1.0, 2.5}) {
    check_closed_form(Penalty::kL1, lam, 1.0);
    check_closed_form(Penalty::kL0, lam, 1.0);
    check_closed_form(Penalty::kL12, lam, 1.0);
  }
  // Tl1: the threshold switches from lam (a+1)/a to sqrt(2 lam (a+1)) - a/2 at lam = a^2/(2(a+1)).
  for (double a : {0.05, 0.5, 1.0, 3.0, 20.0}) {
    const double r = a * a / (2.0 * (a + 1.0));
    // The two threshold formulas agree at the switch (the threshold is continuous in lam).
    const double t_lin = r * (a + 1.0) / a, t_sqrt = std::sqrt(2.0 * r * (a + 1.0)) - a / 2.0;
    EXPECT(std::fabs(t_lin - t_sqrt) <= 1e-12 * (1.0 + t_lin), "tl1 a=%g: thresholds %.15g vs %.15g at the switch",
          a, t_lin, t_sqrt);
    for (double f : {0.1, 0.5, 0.99, 1.0, 1.01, 2.0, 10.0}) check_closed_form(Penalty::kTL1, f * r, a);
    check_closed_form(Penalty::kTL1, 1.0, a);
  }
  std::printf("(a) closed forms vs brute force: %s\n", g_failed == before ? "ok" : "FAILED");
}

// ---- (b) group prox vs brute force -----------------------------------------------------------
// prox of lam ||x||_2 on R^2: x = group_scale(||y||^2, lam) y. Brute force: a 2-D grid on the box
// around 0 and y, then repeated 21x21 zooms around the best point (the problem is convex).
void test_group_prox() {
  const long before = g_failed;
  int seed = 12345;
  auto uniform = [&]() {
    seed = seed * 1103515245 + 12345;
    return ((seed >> 8) & 0xffff) / 65535.0;
  };
  for (double lam : {0.0, 0.1, 0.7, 2.0}) {
    std::vector<std::pair<double, double>> ys = {{0.0, 0.0}, {lam, 0.0}, {0.0, -lam}, {1e-3, 2e-3}};
    for (int i = 0; i < 40; ++i) ys.push_back({6.0 * uniform() - 3.0, 6.0 * uniform() - 3.0});
    for (auto [y0, y1] : ys) {
      const double sq = y0 * y0 + y1 * y1;
      const double s = slimops::group_scale<double>(sq, lam);
      const double x0 = s * y0, x1 = s * y1;
      auto f = [&](double u, double v) {
        return 0.5 * ((u - y0) * (u - y0) + (v - y1) * (v - y1)) + lam * std::sqrt(u * u + v * v);
      };
      double cu = 0.0, cv = 0.0, half = std::max(std::fabs(y0), std::fabs(y1)) + 1.0;
      double fb = f(0.0, 0.0);
      for (int zoom = 0; zoom < 40; ++zoom) {
        const int n = zoom == 0 ? 200 : 10;
        const double step = half / n;
        double bu = cu, bv = cv;
        for (int i = -n; i <= n; ++i) {
          for (int j = -n; j <= n; ++j) {
            const double u = cu + i * step, v = cv + j * step;
            const double val = f(u, v);
            if (val < fb) { fb = val; bu = u; bv = v; }
          }
        }
        cu = bu; cv = bv; half = 2.0 * step;
      }
      const double fc = f(x0, x1);
      EXPECT(std::fabs(fc - fb) <= 1e-10 * (1.0 + sq), "l21 lam=%g y=(%.10g, %.10g): objective %.15g, brute %.15g",
            lam, y0, y1, fc, fb);
    }
  }
  std::printf("(b) group prox vs brute force: %s\n", g_failed == before ? "ok" : "FAILED");
}

// ---- (c) the registered CPU op through the dispatcher ------------------------------------------
using ProxFn = at::Tensor(const at::Tensor&, c10::string_view, double, double);

bool close_in(double got, double want, double rel) {
  return got == want || std::fabs(got - want) <= rel * std::max(1.0, std::fabs(want));
}

void check_op_elementwise(const c10::TypedOperatorHandle<ProxFn>& op, Penalty p, double lam, double a,
                          at::ScalarType dtype, int64_t n) {
  const slimops::ProxParams pp = slimops::make_prox_params(p, lam, a);
  at::Tensor x = at::linspace(-3.0 * pp.thresh - 1.0, 3.0 * pp.thresh + 1.0, n, at::kDouble).to(dtype);
  at::Tensor out = op.call(x, name_of(p), lam, a);
  EXPECT(out.scalar_type() == dtype && out.sizes() == x.sizes(), "%s: op output dtype/shape", name_of(p));
  const at::Tensor xd = x.to(at::kDouble), od = out.to(at::kDouble);
  const double* xin = xd.data_ptr<double>();
  const double* o = od.data_ptr<double>();
  long bad = 0;
  int64_t first_bad = -1;
  for (int64_t j = 0; j < n; ++j) {
    double want;
    double rel;
    if (dtype == at::kDouble) {
      want = slimops::prox_elementwise<double>(xin[j], p, lam, a, pp.thresh);
      rel = 1e-14;
    } else {
      // fp32 math for fp32 / bf16 / fp16 storage, then rounded to the storage type.
      const float w = slimops::prox_elementwise<float>(static_cast<float>(xin[j]), p, static_cast<float>(lam),
                                                       static_cast<float>(a), static_cast<float>(pp.thresh));
      want = at::scalar_tensor(w, at::kFloat).to(dtype).item<double>();
      rel = dtype == at::kFloat ? 4e-7 : (dtype == at::kBFloat16 ? 8e-3 : 1e-3);  // <= ~1 ulp
    }
    if (!close_in(o[j], want, rel)) {
      if (bad++ == 0) first_bad = j;
    }
  }
  EXPECT(bad == 0, "op %s lam=%g a=%g dtype=%s n=%lld: %ld mismatches, first at y=%.10g: op %.10g", name_of(p), lam,
        a, c10::toString(dtype), static_cast<long long>(n), bad, first_bad >= 0 ? xin[first_bad] : 0.0,
        first_bad >= 0 ? o[first_bad] : 0.0);
}

void test_dispatcher_op() {
  const long before = g_failed;
  // Throws if libslimops_ops was not loaded (its TORCH_LIBRARY registrations dropped by the linker).
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("slimops::prox", "").typed<ProxFn>();
  EXPECT(op.hasKernelForDispatchKey(c10::DispatchKey::CPU), "slimops::prox has no CPU kernel");
  for (at::ScalarType dt : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    for (Penalty p : {Penalty::kL1, Penalty::kL0, Penalty::kTL1, Penalty::kL12}) {
      for (double lam : {0.05, 0.8}) {
        check_op_elementwise(op, p, lam, p == Penalty::kTL1 ? 0.7 : 1.0, dt, 1001);
      }
    }
  }
  // Large enough for the parallel chunked path (> 1 << 16 elements).
  check_op_elementwise(op, Penalty::kTL1, 0.3, 2.0, at::kFloat, 300001);
  check_op_elementwise(op, Penalty::kL1, 0.3, 1.0, at::kDouble, 300001);

  // Non-contiguous input: the op makes it contiguous, the result matches the contiguous one.
  {
    at::Tensor x = at::randn({64, 33}, at::kDouble).t();
    at::Tensor got = op.call(x, "tl1", 0.4, 1.5);
    at::Tensor want = op.call(x.contiguous(), "tl1", 0.4, 1.5);
    EXPECT(at::equal(got.contiguous(), want), "op on a non-contiguous input");
  }

  // Group penalties: rows (dim 0) are the groups.
  for (Penalty p : {Penalty::kL21, Penalty::kL0L21}) {
    const double lam = 0.5, a = 0.8;
    at::Tensor x = at::randn({50, 2, 3}, at::kDouble) * 1.5;
    x[3].zero_();
    at::Tensor out = op.call(x, name_of(p), lam, a);
    const slimops::ProxParams pp = slimops::make_prox_params(p, lam, a);
    const double gt = slimops::group_threshold<double>(p, lam, a);
    const at::Tensor xc = x.contiguous();
    const double* xin = xc.data_ptr<double>();
    const double* o = out.data_ptr<double>();
    long bad = 0;
    for (int64_t r = 0; r < 50; ++r) {
      double z[6], sq = 0.0;
      for (int k = 0; k < 6; ++k) {
        z[k] = slimops::prox_elementwise<double>(xin[r * 6 + k], p, lam, a, pp.thresh);
        sq += z[k] * z[k];
      }
      const double s = slimops::group_scale<double>(sq, gt);
      for (int k = 0; k < 6; ++k) bad += close_in(o[r * 6 + k], s * z[k], 1e-14) ? 0 : 1;
    }
    EXPECT(bad == 0, "op %s: %ld mismatches against hard threshold + group_scale", name_of(p), bad);
  }

  // Unknown (or not accepted) penalties raise c10::Error naming the op.
  for (const char* name : {"bogus", "lp", "L1", ""}) {
    bool threw = false;
    std::string msg;
    try {
      op.call(at::ones({3}), name, 0.1, 1.0);
    } catch (const c10::Error& e) {
      threw = true;
      msg = e.what();
    }
    EXPECT(threw && msg.find("slimops.prox") != std::string::npos &&
              msg.find(std::string("'") + name + "'") != std::string::npos,
          "penalty '%s': threw=%d message: %s", name, threw, msg.substr(0, 300).c_str());
  }
  // Argument errors also name the op.
  {
    bool threw = false;
    std::string msg;
    try {
      op.call(at::ones({3}), "tl1", 0.1, -1.0);
    } catch (const c10::Error& e) {
      threw = true;
      msg = e.what();
    }
    EXPECT(threw && msg.find("slimops.prox") != std::string::npos, "tl1 with a < 0: threw=%d message: %s", threw,
          msg.substr(0, 300).c_str());
  }
  std::printf("(c) slimops::prox through the dispatcher: %s\n", g_failed == before ? "ok" : "FAILED");
}

// ---- (d) derivative vs central finite differences ----------------------------------------------
void check_derivative(Penalty p, double lam, double a) {
  const slimops::ProxParams pp = slimops::make_prox_params(p, lam, a);
  const double t = pp.thresh;
  const double h = 1e-6;
  auto prox = [&](double y) { return slimops::prox_elementwise<double>(y, p, lam, a, t); };
  for (double y : linspace(-3.0 * t - 1.0, 3.0 * t + 1.0, 397)) {
    if (std::fabs(std::fabs(y) - t) < 1e-3 * (1.0 + t)) continue;  // the prox jumps or kinks there
    const double fd = (prox(y + h) - prox(y - h)) / (2.0 * h);
    const double d = slimops::prox_elementwise_derivative<double>(y, prox(y), p, lam, a, t);
    EXPECT(std::fabs(fd - d) <= 1e-5 * (1.0 + std::fabs(d)), "%s lam=%g a=%g y=%.12g: derivative %.10g, fd %.10g",
          name_of(p), lam, a, y, d, fd);
  }
}

void test_derivatives() {
  const long before = g_failed;
  for (double lam : {0.01, 0.3, 1.0, 2.5}) {
    check_derivative(Penalty::kL1, lam, 1.0);
    check_derivative(Penalty::kL0, lam, 1.0);
    check_derivative(Penalty::kL12, lam, 1.0);
    check_derivative(Penalty::kL0L21, lam, 1.0);  // elementwise part: the hard threshold
  }
  for (double a : {0.05, 0.5, 1.0, 3.0, 20.0}) {
    const double r = a * a / (2.0 * (a + 1.0));
    for (double f : {0.1, 0.5, 0.9, 1.1, 2.0, 10.0}) check_derivative(Penalty::kTL1, f * r, a);
  }
  std::printf("(d) derivative vs finite differences: %s\n", g_failed == before ? "ok" : "FAILED");
}

}  // namespace

int main() {
  try {
    test_closed_forms();
    test_group_prox();
    test_dispatcher_op();
    test_derivatives();
  } catch (const std::exception& e) {
    ++g_failed;
    std::fprintf(stderr, "FAIL: uncaught exception: %s\n", e.what());
  }
  if (g_failed > kMaxReported) std::fprintf(stderr, "(%ld more failures not shown)\n", g_failed - kMaxReported);
  std::printf("%ld passed, %ld failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
