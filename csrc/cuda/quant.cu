// CUDA kernels of the quant family's elementwise op fda_sign (schemas in csrc/registration.cpp, maths in
// csrc/include/slimops/quant_math.h and docs/algorithms.md §9): one grid-stride launch each for the forward and
// the surrogate backward, fp32 math for fp32/bf16/fp16 storage, fp64 for fp64. fake_quantize has no CUDA C++
// kernel: its GPU backend is Triton (slimops/triton/quant.py; tools/cuda_check.py lists it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "slimops/dispatch.h"
#include "slimops/quant_checks.h"
#include "slimops/quant_math.h"

namespace slimops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, cap)));
}

template <typename scalar_t, typename T>
__global__ void fda_sign_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(binary_sign(static_cast<T>(x[i])));
  }
}

template <typename scalar_t, typename T, Surrogate S>
__global__ void fda_sign_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                         scalar_t* __restrict__ out, int64_t n, int n_terms, T omega, T fwp, T clip) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<T>(g[i]) *
                                   sign_surrogate<T>(static_cast<T>(x[i]), S, n_terms, omega, fwp, clip));
  }
}

at::Tensor fda_sign_cuda(const at::Tensor& x, int64_t n_terms, double omega, c10::string_view surrogate, double clip) {
  check_fda_sign("fda_sign", x, n_terms, omega, surrogate, clip);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fda_sign", [&] {
    using T = at::opmath_type<scalar_t>;
    fda_sign_kernel<scalar_t, T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor fda_sign_backward_cuda(const at::Tensor& grad, const at::Tensor& x, int64_t n_terms, double omega,
                                  c10::string_view surrogate, double clip) {
  const char* op = "fda_sign_backward";
  const Surrogate s = check_fda_sign(op, x, n_terms, omega, surrogate, clip);
  check_quant_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.fda_sign_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const T w = omega, fwp = 4.0 * omega / M_PI;
    const T c = clip;  // inf (no clipping) stays inf
    auto launch = [&](auto kind) {
      fda_sign_backward_kernel<scalar_t, T, decltype(kind)::value>
          <<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
              static_cast<int>(n_terms), w, fwp, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    dispatch_surrogate(s, launch);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CUDA, m) {
  m.impl("fda_sign", &fda_sign_cuda);
  m.impl("fda_sign_backward", &fda_sign_backward_cuda);
}

}  // namespace cuda
}  // namespace slimops
