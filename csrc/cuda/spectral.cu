// CUDA kernels of the spectral family (schemas in csrc/registration.cpp, exact semantics in
// slimops/reference/spectral.py, docs/algorithms.md §7): the "cuFFT path", any grid size.
//
// The transforms are cuFFT through ATen (at::fft_rfft2 / at::fft_irfft2 over dims (1, 2), "ortho"), in
// float32 for float32/bfloat16/float16 inputs (cuFFT's half precision only takes power-of-two sizes) and in
// float64 for float64. Everything between the transforms is a fused kernel of this file; the per-frequency
// complex MLP of the adaptive filter is a batched real GEMM (at::bmm, cuBLAS) on the spectrum viewed as real.
//
// Notation. x (B, H, W, C) channels last; the half spectrum X = rfft2(x) is (B, H, Wr, C) complex,
// Wr = W/2 + 1, N = B*H*Wr frequencies. alpha(k_w) = 1 on the k_w = 0 column and (even W) the k_w = W/2
// column, 2 elsewhere: irfft2(Z) = Re sum_k alpha Z[k] e^{+i theta_k} / sqrt(HW) (torch's semantics).
//
// Hermitian projection. cuFFT's C2R transform is only defined for Hermitian input, and it does not drop the
// imaginary parts of the k_w = 0 / W/2 columns the way torch's CPU FFT does (pytorch/pytorch#154496). Every
// kernel that writes a spectrum for irfft2 therefore replaces those two columns by their Hermitian part along
// H, Z[h] <- (Z[h] + conj(Z[(H-h) % H])) / 2. That leaves irfft2(Z) as defined above unchanged (the
// inverse H-transform of the projected column is the real part of the original one) and makes the input of
// cuFFT Hermitian, so its result no longer depends on how the C2R algorithm treats the rest.
//
// spectral_filter          x -> fp32 copy (low precision only) -> rfft2 -> [filter: Z = X K, K read in the
//                          weight's dtype, + projection] -> irfft2 -> cast to x's dtype (low precision only)
// spectral_filter_backward grad_x = irfft2(rfft2(grad) conj(K)) (the same filter kernel, conjugated);
//                          grad_weight = view_as_real(sum_b alpha rfft2(grad)_b conj(rfft2(x)_b)), a
//                          deterministic column reduction over b (one thread column per frequency-channel,
//                          8 row lanes and a fixed-order shared-memory sum; split in two kernels only when
//                          there are too few columns to fill the GPU), written in the weight's dtype.
// adaptive_spectral_filter X = rfft2(x); P1 = X W1 (bmm); [bias + ReLU in place]; P2 = O1 W2 (bmm);
//                          [Z = softshrink(P2 + b2) X + projection]; irfft2; [y = . + x, cast, one pass].
//                          The complex block matmul u W (u: Cb complex per block) is the real GEMM
//                          u~ W~ with u~ the interleaved (re, im) view of the spectrum, which needs no copy
//                          (X viewed as (k, N, 2Cb), strides (2Cb, 2C, 1)), and W~ (k, 2Cb, 2Hb) the real
//                          embedding of W (one small kernel): W~[2i+p, 2j+q] = Wr (p = q), Wi (p=0, q=1),
//                          -Wi (p=1, q=0).
// adaptive_..._backward    recomputes X, O1 = relu(X W1 + b1) and P2 (nothing is saved by the forward); then
//                          with G = rfft2(grad), in one kernel per frequency-channel: gP2 = [|P2+b2| > shrink]
//                          alpha G conj(X) (in place of P2) and D = G conj(M) (in place of G);
//                          gb2 = sum gP2, gW2~ = O1^T gP2 (bmm, collapsed to (2, k, Hb, Cb) by a small kernel);
//                          gP1 = (gP2 W2~^T) [O1 > 0]; gb1 = sum gP1; gW1~ = X~^T gP1;
//                          grad_x = irfft2(D + (gP1 W1~^T) / alpha, + projection) + grad (one pass with the cast).
//                          Gradients not asked for are not computed.
// Gradients use the real-vector convention of torch's autograd (g = dL/dRe + i dL/dIm); the formulas are
// checked against slimops.reference.spectral by the tests (the same composite written with ATen ops on the
// CPU matches the reference to rounding).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>

#include "slimops/checks.h"
#include "slimops/dispatch.h"
#include "slimops/spectral_checks.h"

namespace slimops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColTile = 32;   // columns per block of the column reductions (one warp wide)
constexpr int kRowLanes = 8;   // row lanes per block of the column reductions

// ---- device math --------------------------------------------------------------------------------

// One complex number in the layout of c10::complex<T> (and of view_as_real's last axis of size 2); aligned
// so that a load is one vector load. Only used on buffers this file allocates or gets from at::fft / at::bmm
// (fresh allocations); user tensors (the filter weight) are read element by element.
template <typename T>
struct alignas(2 * sizeof(T)) Cx {
  T re, im;
};

template <typename T>
__device__ __forceinline__ Cx<T> cmul(Cx<T> a, Cx<T> b) {
  return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}

// a * conj(b)
template <typename T>
__device__ __forceinline__ Cx<T> cmul_conj(Cx<T> a, Cx<T> b) {
  return {a.re * b.re + a.im * b.im, a.im * b.re - a.re * b.im};
}

template <typename T>
__device__ __forceinline__ T softshrink(T v, T lam) {  // NaN stays NaN, as in torch's softshrink
  return v > lam ? v - lam : (v < -lam ? v + lam : (v != v ? v : T(0)));
}

// d softshrink / dv as torch takes it: 0 on [-lam, lam], kinks included; 1 elsewhere, NaN included (the gradient
// passes through a NaN, as in torch's softshrink_backward).
template <typename T>
__device__ __forceinline__ bool shrink_passes(T v, T lam) {
  return !(v >= -lam && v <= lam);
}

// ReLU that keeps NaN (as torch's relu does).
template <typename T>
__device__ __forceinline__ T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// The geometry of a (B, H, Wr, C) half spectrum, flattened: element e = ((b*H + h)*Wr + kw)*C + c.
struct SpecGrid {
  int64_t h, wr, c;
  bool even_w;

  // k_w = 0 and (even W) k_w = W/2: the columns irfft2 counts once (alpha = 1), whose imaginary parts
  // count only through the H-transform.
  __device__ __forceinline__ bool real_column(int64_t kw) const { return kw == 0 || (even_w && kw == wr - 1); }
};

SpecGrid spec_grid(const SpectralGeom& g) { return {g.h, g.wr, g.c, g.w % 2 == 0}; }

// The (k, N, Cb) complex index, in the block-major layout of the GEMM operands, of channel ch at frequency n.
__device__ __forceinline__ int64_t mlp_index(int64_t n, int64_t ch, int64_t n_freq, int64_t cb) {
  return ((ch / cb) * n_freq + n) * cb + (ch % cb);
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_step() { return static_cast<int64_t>(blockDim.x) * gridDim.x; }

// ---- kernels ------------------------------------------------------------------------------------

// out[e] = f(e, kw) for every element of a (B, H, Wr, C) spectrum, with the Hermitian projection of the
// k_w = 0 / W/2 columns along H (see the top of the file): there out[e] = (f(e) + conj(f(mirror(e)))) / 2,
// mirror(e) the element at row (H - h) % H. f is a pure function of its inputs, so out must not alias them.
template <typename T, typename F>
__global__ void spectrum_store_kernel(F f, Cx<T>* __restrict__ out, int64_t n, SpecGrid g) {
  for (int64_t e = grid_start(); e < n; e += grid_step()) {
    const int64_t row = e / g.c;  // (b*H + h)*Wr + kw
    const int64_t kw = row % g.wr;
    Cx<T> z = f(e, kw);
    if (g.real_column(kw)) {
      const int64_t h = (row / g.wr) % g.h;
      const int64_t mh = h == 0 ? 0 : g.h - h;
      const Cx<T> zm = f(e + (mh - h) * g.wr * g.c, kw);
      z = {(z.re + zm.re) * T(0.5), (z.im - zm.im) * T(0.5)};
    }
    out[e] = z;
  }
}

// GFNet filter: X[e] * K or X[e] * conj(K), K = weight[h, kw, c] read in the weight's own dtype
// (weight (H, Wr, C, 2) contiguous, indexed by e mod H*Wr*C).
template <typename T, typename wT, bool kConj>
struct GlobalFilterFn {
  const Cx<T>* __restrict__ x;
  const wT* __restrict__ w;
  int64_t hwc;

  __device__ __forceinline__ Cx<T> operator()(int64_t e, int64_t) const {
    const int64_t k = e % hwc;
    const Cx<T> kk{static_cast<T>(w[2 * k]), static_cast<T>(w[2 * k + 1])};
    return kConj ? cmul_conj(x[e], kk) : cmul(x[e], kk);
  }
};

// AFF filter applied to the spectrum: softshrink(P2 + b2) * X[e]. P2 (k, N, Cb) complex (the second GEMM's
// output), b2 (2, k, Cb) in the compute dtype: channel ch's bias is (b2[ch], b2[C + ch]).
template <typename T>
struct AffFilterFn {
  const Cx<T>* __restrict__ x;
  const Cx<T>* __restrict__ p2;
  const T* __restrict__ b2;
  T lam;
  int64_t n_freq, c, cb;

  __device__ __forceinline__ Cx<T> operator()(int64_t e, int64_t) const {
    const int64_t n = e / c, ch = e % c;
    const Cx<T> v = p2[mlp_index(n, ch, n_freq, cb)];
    const Cx<T> m{softshrink(v.re + b2[ch], lam), softshrink(v.im + b2[c + ch], lam)};
    return cmul(m, x[e]);
  }
};

// AFF backward, the spectrum of grad_x before the projection: D[e] + E / alpha, E (k, N, Cb) the gradient of
// X through the MLP (gP1 W1~^T) and D = G conj(M) the direct term (alpha already cancelled).
template <typename T>
struct AffGradXFn {
  const Cx<T>* __restrict__ d;
  const Cx<T>* __restrict__ emlp;
  int64_t n_freq, c, cb, wr;
  bool even_w;

  __device__ __forceinline__ Cx<T> operator()(int64_t e, int64_t kw) const {
    const int64_t n = e / c, ch = e % c;
    const T inv_alpha = (kw == 0 || (even_w && kw == wr - 1)) ? T(1) : T(0.5);
    const Cx<T> a = d[e];
    const Cx<T> b = emlp[mlp_index(n, ch, n_freq, cb)];
    return {a.re + inv_alpha * b.re, a.im + inv_alpha * b.im};
  }
};

// O1 = relu(P1 + b1) in place, P1 (k, N, Hb) complex, b1 (2, k, Hb) compute dtype.
template <typename T>
__global__ void bias_relu_kernel(Cx<T>* __restrict__ p1, const T* __restrict__ b1, int64_t n, int64_t n_freq,
                                 int64_t k, int64_t hb) {
  for (int64_t e = grid_start(); e < n; e += grid_step()) {
    const int64_t bj = (e / (n_freq * hb)) * hb + e % hb;  // blk*Hb + j
    const Cx<T> v = p1[e];
    p1[e] = {relu(v.re + b1[bj]), relu(v.im + b1[k * hb + bj])};
  }
}

// gP1 = gO1 * [O1 > 0] in place (each real component on its own).
template <typename T>
__global__ void relu_mask_kernel(Cx<T>* __restrict__ g, const Cx<T>* __restrict__ o1, int64_t n) {
  for (int64_t e = grid_start(); e < n; e += grid_step()) {
    const Cx<T> o = o1[e];
    const Cx<T> v = g[e];
    // torch's relu backward: 0 where the output is <= 0; a NaN output passes the gradient.
    g[e] = {o.re <= T(0) ? T(0) : v.re, o.im <= T(0) ? T(0) : v.im};
  }
}

// AFF backward, per frequency-channel e of the (B, H, Wr, C) spectrum: with v = P2 + b2, M = softshrink(v),
//   gP2 = [|v| > lam] * alpha G conj(X)   written over P2 (the (k, N, Cb) GEMM layout)
//   D   = G conj(M)                      written over G
template <typename T>
__global__ void aff_backward_mid_kernel(const Cx<T>* __restrict__ x, Cx<T>* __restrict__ g, Cx<T>* __restrict__ p2,
                                        const T* __restrict__ b2, T lam, int64_t n, int64_t n_freq, int64_t c,
                                        int64_t cb, SpecGrid sg) {
  for (int64_t e = grid_start(); e < n; e += grid_step()) {
    const int64_t nf = e / c, ch = e % c;
    const T alpha = sg.real_column(nf % sg.wr) ? T(1) : T(2);
    const int64_t m = mlp_index(nf, ch, n_freq, cb);
    const Cx<T> p = p2[m];
    const T vr = p.re + b2[ch], vi = p.im + b2[c + ch];
    const Cx<T> mm{softshrink(vr, lam), softshrink(vi, lam)};
    const Cx<T> gg = g[e];
    const Cx<T> gm = cmul_conj(gg, x[e]);
    p2[m] = {shrink_passes(vr, lam) ? alpha * gm.re : T(0), shrink_passes(vi, lam) ? alpha * gm.im : T(0)};
    g[e] = cmul_conj(gg, mm);
  }
}

// out = y + r in out's dtype: the residual of the adaptive filter (r = x in its own dtype) and of its input
// gradient (r = grad in the compute dtype), with the final rounding.
template <typename T, typename rT, typename oT>
__global__ void add_cast_kernel(const T* __restrict__ y, const rT* __restrict__ r, oT* __restrict__ out, int64_t n) {
  for (int64_t e = grid_start(); e < n; e += grid_step()) {
    out[e] = static_cast<oT>(y[e] + static_cast<T>(r[e]));
  }
}

// The real embedding W~ (k, 2I, 2O) (layout (k, I, 2, O, 2)) of the complex block weights w (2, k, I, O)
// read in their own dtype: W~[blk, 2i+p, 2j+q] = Wr (p = q), Wi (p = 0, q = 1), -Wi (p = 1, q = 0).
template <typename T, typename wT>
__global__ void expand_weight_kernel(const wT* __restrict__ w, T* __restrict__ out, int64_t n, int64_t k, int64_t in,
                                     int64_t o) {
  for (int64_t idx = grid_start(); idx < n; idx += grid_step()) {
    const int64_t q = idx & 1;
    int64_t r = idx >> 1;
    const int64_t j = r % o;
    r /= o;
    const int64_t p = r & 1;
    r >>= 1;  // blk*I + i
    const int64_t off = r * o + j;
    const T wr = static_cast<T>(w[off]);
    const T wi = static_cast<T>(w[k * in * o + off]);
    out[idx] = p == q ? wr : (p == 0 ? wi : -wi);
  }
}

// The gradient of w (2, k, I, O), in w's dtype, from the gradient of its embedding gW~ (k, 2I, 2O):
// g_wr = gW~[2i, 2j] + gW~[2i+1, 2j+1], g_wi = gW~[2i, 2j+1] - gW~[2i+1, 2j].
template <typename T, typename wT>
__global__ void collapse_weight_grad_kernel(const T* __restrict__ gb, wT* __restrict__ gw, int64_t n, int64_t k,
                                            int64_t in, int64_t o) {
  for (int64_t idx = grid_start(); idx < n; idx += grid_step()) {
    const int64_t j = idx % o;
    const int64_t r = idx / o;          // (part*k + blk)*I + i
    const int64_t bi = r % (k * in);    // blk*I + i
    const bool imag = r >= k * in;
    const T* row0 = gb + (2 * bi) * 2 * o + 2 * j;  // p = 0
    const T* row1 = row0 + 2 * o;                   // p = 1
    gw[idx] = static_cast<wT>(imag ? row0[1] - row1[0] : row0[0] + row1[1]);
  }
}

// ---- deterministic column reductions ------------------------------------------------------------
// out(col) = sum_row ld(row, col) (complex), summed in a fixed order: a block owns kColTile columns and a
// range of rows; kRowLanes lanes stride the rows, then lane 0 adds the lanes in order. With more than one row
// range (too few columns to fill the GPU) the partial sums go to a buffer and a second kernel adds them in
// order, so the result does not depend on scheduling.

template <typename T, typename Load, typename Store>
__global__ void colsum_kernel(Load ld, Store st, Cx<T>* __restrict__ partial, int64_t rows, int64_t cols,
                              int64_t rows_per_split) {
  __shared__ Cx<T> lanes[kRowLanes][kColTile];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  Cx<T> acc{T(0), T(0)};
  if (col < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const Cx<T> v = ld(r, col);
      acc.re += v.re;
      acc.im += v.im;
    }
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    Cx<T> s = lanes[0][threadIdx.x];
    for (int l = 1; l < kRowLanes; ++l) {
      s.re += lanes[l][threadIdx.x].re;
      s.im += lanes[l][threadIdx.x].im;
    }
    if (partial == nullptr) {
      st(col, s);
    } else {
      partial[static_cast<int64_t>(blockIdx.y) * cols + col] = s;
    }
  }
}

template <typename T, typename Store>
__global__ void colsum_finish_kernel(Store st, const Cx<T>* __restrict__ partial, int64_t splits, int64_t cols) {
  for (int64_t col = grid_start(); col < cols; col += grid_step()) {
    Cx<T> s = partial[col];
    for (int64_t i = 1; i < splits; ++i) {
      s.re += partial[i * cols + col].re;
      s.im += partial[i * cols + col].im;
    }
    st(col, s);
  }
}

// GFNet weight gradient: row b, column (h, kw, c): alpha * G[b] conj(X[b]).
template <typename T>
struct FilterGradLoad {
  const Cx<T>* __restrict__ g;
  const Cx<T>* __restrict__ x;
  int64_t hwc;
  SpecGrid sg;

  __device__ __forceinline__ Cx<T> operator()(int64_t row, int64_t col) const {
    const int64_t e = row * hwc + col;
    const Cx<T> v = cmul_conj(g[e], x[e]);
    const T alpha = sg.real_column((col / sg.c) % sg.wr) ? T(1) : T(2);
    return {alpha * v.re, alpha * v.im};
  }
};

// Stores column col of a complex sum interleaved (view_as_real layout) in the output's dtype.
template <typename T, typename oT>
struct InterleavedStore {
  oT* __restrict__ out;
  __device__ __forceinline__ void operator()(int64_t col, Cx<T> v) const {
    out[2 * col] = static_cast<oT>(v.re);
    out[2 * col + 1] = static_cast<oT>(v.im);
  }
};

// Bias gradient: row n, column blk*O + j of a (k, N, O) complex GEMM-layout tensor.
template <typename T>
struct BiasGradLoad {
  const Cx<T>* __restrict__ g;
  int64_t n_freq, o;
  __device__ __forceinline__ Cx<T> operator()(int64_t row, int64_t col) const {
    return g[((col / o) * n_freq + row) * o + col % o];
  }
};

// Stores column blk*O + j of a bias gradient in the (2, k, O) layout: real part at col, imaginary at k*O + col.
template <typename T>
struct SplitStore {
  T* __restrict__ out;
  int64_t ko;
  __device__ __forceinline__ void operator()(int64_t col, Cx<T> v) const {
    out[col] = v.re;
    out[ko + col] = v.im;
  }
};

// ---- host helpers -------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of a grid-stride launch over n elements.
unsigned grid_for(int64_t n) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, kThreads), cap)));
}

at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous copy in dtype dt (no copy when t already is one).
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dt) {
  return t.to(dt, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// X = rfft2(x) over (H, W), orthonormal: (B, H, Wr, C) complex, contiguous.
at::Tensor spectrum(const at::Tensor& x_ct) {
  return at::fft_rfft2(x_ct, std::nullopt, {1, 2}, "ortho").contiguous();
}

// irfft2 of a (projected) half spectrum back to (B, H, W, C), compute dtype, contiguous.
at::Tensor inverse_spectrum(const at::Tensor& z, const SpectralGeom& g) {
  const std::array<int64_t, 2> s{g.h, g.w};
  return at::fft_irfft2(z, at::IntArrayRef(s), {1, 2}, "ortho").contiguous();
}

template <typename T>
Cx<T>* cx_ptr(const at::Tensor& t) {
  return reinterpret_cast<Cx<T>*>(t.mutable_data_ptr());
}

template <typename T>
const Cx<T>* cx_cptr(const at::Tensor& t) {
  return reinterpret_cast<const Cx<T>*>(t.const_data_ptr());
}

template <typename T, typename F>
void launch_spectrum_store(const F& f, const at::Tensor& out, const SpecGrid& sg) {
  const int64_t n = out.numel();
  spectrum_store_kernel<T, F><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(f, cx_ptr<T>(out), n, sg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out(col) = sum over rows of ld(row, col) for cols columns, stored by st; opts: the compute dtype.
template <typename T, typename Load, typename Store>
void launch_colsum(const Load& ld, const Store& st, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t tiles = ceil_div(cols, kColTile);
  const int64_t target = static_cast<int64_t>(sm_count()) * 4;
  int64_t splits = 1;
  if (tiles < target) {
    // at least 64 rows (8 per lane) per split
    splits = std::min<int64_t>({ceil_div(target, tiles), ceil_div(rows, 64), 65535});
    splits = std::max<int64_t>(splits, 1);
  }
  const int64_t rows_per_split = std::max<int64_t>(1, ceil_div(rows, splits));
  splits = std::max<int64_t>(1, ceil_div(rows, rows_per_split));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const dim3 block(kColTile, kRowLanes);
  if (splits == 1) {
    colsum_kernel<T, Load, Store><<<grid, block, 0, stream>>>(ld, st, nullptr, rows, cols, rows_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor partial = at::empty({splits * cols * 2}, opts);
  colsum_kernel<T, Load, Store><<<grid, block, 0, stream>>>(ld, st, cx_ptr<T>(partial), rows, cols, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  colsum_finish_kernel<T, Store><<<grid_for(cols), kThreads, 0, stream>>>(st, cx_cptr<T>(partial), splits, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The real embedding (k, 2I, 2O) in dtype ct of complex block weights w (2, k, I, O).
at::Tensor expand_weight(const at::Tensor& w, at::ScalarType ct) {
  const at::Tensor wc = w.contiguous();
  const int64_t k = w.size(1), in = w.size(2), o = w.size(3);
  at::Tensor out = at::empty({k, 2 * in, 2 * o}, w.options().dtype(ct));
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(ct, "slimops.spectral_expand", [&] {
    using T = scalar_t;
    SLIMOPS_DISPATCH_FLOATS(wc.scalar_type(), "slimops.spectral_expand", [&] {
      expand_weight_kernel<T, scalar_t><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<T>(), n, k, in, o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// The gradient of w (2, k, I, O), in w's dtype, from the gradient gb (k, 2I, 2O) of its embedding.
at::Tensor collapse_weight_grad(const at::Tensor& gb, const at::Tensor& w) {
  const at::Tensor gbc = gb.contiguous();
  const int64_t k = w.size(1), in = w.size(2), o = w.size(3);
  at::Tensor gw = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = gw.numel();
  AT_DISPATCH_FLOATING_TYPES(gbc.scalar_type(), "slimops.spectral_collapse", [&] {
    using T = scalar_t;
    SLIMOPS_DISPATCH_FLOATS(gw.scalar_type(), "slimops.spectral_collapse", [&] {
      collapse_weight_grad_kernel<T, scalar_t><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gbc.const_data_ptr<T>(), gw.mutable_data_ptr<scalar_t>(), n, k, in, o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gw;
}

// The gradient of a bias b (2, k, O), in b's dtype, from the gradient gp (k, N, 2O) (complex (k, N, O)) of the
// GEMM output it is added to: the sum over the N frequencies.
at::Tensor bias_grad(const at::Tensor& gp, const at::Tensor& b, int64_t n_freq) {
  const int64_t k = b.size(1), o = b.size(2);
  at::Tensor out = at::empty({2, k, o}, gp.options());
  AT_DISPATCH_FLOATING_TYPES(gp.scalar_type(), "slimops.spectral_bias_grad", [&] {
    using T = scalar_t;
    launch_colsum<T>(BiasGradLoad<T>{cx_cptr<T>(gp), n_freq, o}, SplitStore<T>{out.mutable_data_ptr<T>(), k * o},
                     n_freq, k * o, gp.options());
  });
  return contiguous_as(out, b.scalar_type());
}

// The interleaved (re, im) view of a (B, H, Wr, C) spectrum as the (k, N, 2Cb) batch of GEMM rows (block-major,
// strides (2Cb, 2C, 1): no copy; cuBLAS takes the row stride as its leading dimension).
at::Tensor mlp_rows(const at::Tensor& spec, int64_t blocks, int64_t n_freq) {
  const int64_t c = spec.size(3);
  return at::view_as_real(spec).view({n_freq, blocks, 2 * (c / blocks)}).transpose(0, 1);
}

at::Tensor empty_grad(const at::Tensor& t) { return at::empty({0}, t.options()); }

// ---- spectral_filter ----------------------------------------------------------------------------

// Z = X * K (or X * conj(K)) with the projection, for X (B, H, Wr, C) complex in the compute dtype.
at::Tensor global_filter(const at::Tensor& spec, const at::Tensor& weight, const SpectralGeom& g, bool conj) {
  const at::Tensor wc = weight.contiguous();
  at::Tensor z = at::empty_like(spec);
  const SpecGrid sg = spec_grid(g);
  const int64_t hwc = g.h * g.wr * g.c;
  AT_DISPATCH_FLOATING_TYPES(c10::toRealValueType(spec.scalar_type()), "slimops.spectral_filter", [&] {
    using T = scalar_t;
    SLIMOPS_DISPATCH_FLOATS(wc.scalar_type(), "slimops.spectral_filter", [&] {
      if (conj) {
        launch_spectrum_store<T>(GlobalFilterFn<T, scalar_t, true>{cx_cptr<T>(spec), wc.const_data_ptr<scalar_t>(), hwc},
                                 z, sg);
      } else {
        launch_spectrum_store<T>(
            GlobalFilterFn<T, scalar_t, false>{cx_cptr<T>(spec), wc.const_data_ptr<scalar_t>(), hwc}, z, sg);
      }
    });
  });
  return z;
}

at::Tensor spectral_filter_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "spectral_filter";
  const SpectralGeom g = check_spectral_filter(op, x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const at::Tensor spec = spectrum(contiguous_as(x, compute_dtype(x)));
  const at::Tensor y = inverse_spectrum(global_filter(spec, weight, g, /*conj=*/false), g);
  return contiguous_as(y, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> spectral_filter_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& weight,
                                                                 std::array<bool, 2> output_mask) {
  const char* op = "spectral_filter_backward";
  const SpectralGeom g = check_spectral_filter(op, x, weight);
  check_spectral_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = empty_grad(x), gw = empty_grad(weight);
  if (!output_mask[0] && !output_mask[1]) return {gx, gw};
  if (x.numel() == 0) {
    if (output_mask[0]) gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (output_mask[1]) gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
    return {gx, gw};
  }
  const at::ScalarType ct = compute_dtype(x);
  const at::Tensor gspec = spectrum(contiguous_as(grad, ct));
  if (output_mask[0]) {
    gx = contiguous_as(inverse_spectrum(global_filter(gspec, weight, g, /*conj=*/true), g), x.scalar_type());
  }
  if (output_mask[1]) {
    const at::Tensor xspec = spectrum(contiguous_as(x, ct));
    gw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
    const SpecGrid sg = spec_grid(g);
    const int64_t hwc = g.h * g.wr * g.c;
    AT_DISPATCH_FLOATING_TYPES(ct, "slimops.spectral_filter_backward", [&] {
      using T = scalar_t;
      const FilterGradLoad<T> ld{cx_cptr<T>(gspec), cx_cptr<T>(xspec), hwc, sg};
      SLIMOPS_DISPATCH_FLOATS(gw.scalar_type(), "slimops.spectral_filter_backward", [&] {
        launch_colsum<T>(ld, InterleavedStore<T, scalar_t>{gw.mutable_data_ptr<scalar_t>()}, g.b, hwc,
                         x.options().dtype(ct));
      });
    });
  }
  return {gx, gw};
}

// ---- adaptive_spectral_filter -------------------------------------------------------------------

// The forward intermediates of the AFF MLP: X, O1 = relu(X W1 + b1) (k, N, 2Hb) and P2 = O1 W2 (k, N, 2Cb)
// (before b2), all in the compute dtype.
struct AffForward {
  at::Tensor spec, o1, p2, w1e, w2e, b2;
};

AffForward aff_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2, int64_t blocks, const SpectralGeom& g) {
  const at::ScalarType ct = compute_dtype(x);
  const int64_t n_freq = g.b * g.h * g.wr;
  const int64_t hb = w1.size(3);
  AffForward f;
  f.spec = spectrum(contiguous_as(x, ct));
  f.w1e = expand_weight(w1, ct);
  f.w2e = expand_weight(w2, ct);
  f.b2 = contiguous_as(b2, ct);
  const at::Tensor b1c = contiguous_as(b1, ct);
  f.o1 = at::bmm(mlp_rows(f.spec, blocks, n_freq), f.w1e).contiguous();  // (k, N, 2Hb)
  const int64_t n1 = f.o1.numel() / 2;
  AT_DISPATCH_FLOATING_TYPES(ct, "slimops.adaptive_spectral_filter", [&] {
    using T = scalar_t;
    bias_relu_kernel<T><<<grid_for(n1), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        cx_ptr<T>(f.o1), b1c.const_data_ptr<T>(), n1, n_freq, blocks, hb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  f.p2 = at::bmm(f.o1, f.w2e).contiguous();  // (k, N, 2Cb)
  return f;
}

at::Tensor adaptive_spectral_filter_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2, int64_t blocks, double shrink) {
  const char* op = "adaptive_spectral_filter";
  SpectralGeom g{};
  check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink, &g);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const at::ScalarType ct = compute_dtype(x);
  const int64_t n_freq = g.b * g.h * g.wr;
  const int64_t cb = g.c / blocks;
  at::Tensor z;
  {
    AffForward f = aff_forward(x, w1, b1, w2, b2, blocks, g);
    f.o1 = at::Tensor();  // not needed any more: its memory can take z
    z = at::empty_like(f.spec);
    AT_DISPATCH_FLOATING_TYPES(ct, "slimops.adaptive_spectral_filter", [&] {
      using T = scalar_t;
      launch_spectrum_store<T>(AffFilterFn<T>{cx_cptr<T>(f.spec), cx_cptr<T>(f.p2), f.b2.const_data_ptr<T>(),
                                              static_cast<T>(shrink), n_freq, g.c, cb},
                               z, spec_grid(g));
    });
  }
  const at::Tensor y = inverse_spectrum(z, g);
  z = at::Tensor();
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.adaptive_spectral_filter", [&] {
    using T = at::opmath_type<scalar_t>;
    add_cast_kernel<T, scalar_t, scalar_t><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        y.const_data_ptr<T>(), xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_spectral_filter_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, int64_t blocks, double shrink, std::array<bool, 5> output_mask) {
  const char* op = "adaptive_spectral_filter_backward";
  SpectralGeom g{};
  check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink, &g);
  check_spectral_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = empty_grad(x), gw1 = empty_grad(w1), gb1 = empty_grad(b1), gw2 = empty_grad(w2),
             gb2 = empty_grad(b2);
  const bool need_x = output_mask[0], need_w1 = output_mask[1], need_b1 = output_mask[2], need_w2 = output_mask[3],
             need_b2 = output_mask[4];
  if (!(need_x || need_w1 || need_b1 || need_w2 || need_b2)) return {gx, gw1, gb1, gw2, gb2};
  if (x.numel() == 0) {  // B = 0: nothing flows to x, and the weight sums are empty
    if (need_x) gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (need_w1) gw1 = at::zeros_like(w1, at::MemoryFormat::Contiguous);
    if (need_b1) gb1 = at::zeros_like(b1, at::MemoryFormat::Contiguous);
    if (need_w2) gw2 = at::zeros_like(w2, at::MemoryFormat::Contiguous);
    if (need_b2) gb2 = at::zeros_like(b2, at::MemoryFormat::Contiguous);
    return {gx, gw1, gb1, gw2, gb2};
  }
  const at::ScalarType ct = compute_dtype(x);
  const int64_t n_freq = g.b * g.h * g.wr;
  const int64_t cb = g.c / blocks;
  const SpecGrid sg = spec_grid(g);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AffForward f = aff_forward(x, w1, b1, w2, b2, blocks, g);
  const at::Tensor grad_ct = contiguous_as(grad, ct);
  at::Tensor gspec = spectrum(grad_ct);  // becomes D = G conj(M)
  at::Tensor gp2 = f.p2;                 // becomes gP2, then (need_x) E = gP1 W1~^T
  f.p2 = at::Tensor();
  const int64_t ns = gspec.numel();
  AT_DISPATCH_FLOATING_TYPES(ct, "slimops.adaptive_spectral_filter_backward", [&] {
    using T = scalar_t;
    aff_backward_mid_kernel<T><<<grid_for(ns), kThreads, 0, stream>>>(
        cx_cptr<T>(f.spec), cx_ptr<T>(gspec), cx_ptr<T>(gp2), f.b2.const_data_ptr<T>(), static_cast<T>(shrink), ns,
        n_freq, g.c, cb, sg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (need_b2) gb2 = bias_grad(gp2, b2, n_freq);
  if (need_w2) gw2 = collapse_weight_grad(at::bmm(f.o1.transpose(1, 2), gp2), w2);
  if (need_x || need_w1 || need_b1) {
    const at::Tensor gp1 = at::bmm(gp2, f.w2e.transpose(1, 2)).contiguous();  // gO1 (k, N, 2Hb)
    const int64_t n1 = gp1.numel() / 2;
    AT_DISPATCH_FLOATING_TYPES(ct, "slimops.adaptive_spectral_filter_backward", [&] {
      using T = scalar_t;
      relu_mask_kernel<T><<<grid_for(n1), kThreads, 0, stream>>>(cx_ptr<T>(gp1), cx_cptr<T>(f.o1), n1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    f.o1 = at::Tensor();
    if (need_b1) gb1 = bias_grad(gp1, b1, n_freq);
    if (need_w1) gw1 = collapse_weight_grad(at::bmm(mlp_rows(f.spec, blocks, n_freq).transpose(1, 2), gp1), w1);
    if (need_x) {
      at::bmm_out(gp2, gp1, f.w1e.transpose(1, 2));  // E (k, N, 2Cb), over gP2 (no longer needed)
      at::Tensor zg = f.spec;                        // X is no longer needed either: its memory takes Z
      AT_DISPATCH_FLOATING_TYPES(ct, "slimops.adaptive_spectral_filter_backward", [&] {
        using T = scalar_t;
        launch_spectrum_store<T>(
            AffGradXFn<T>{cx_cptr<T>(gspec), cx_cptr<T>(gp2), n_freq, g.c, cb, g.wr, sg.even_w}, zg, sg);
      });
      f.spec = at::Tensor();
      gspec = at::Tensor();
      gp2 = at::Tensor();
      const at::Tensor gy = inverse_spectrum(zg, g);
      zg = at::Tensor();
      gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
      const int64_t n = gx.numel();
      SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "slimops.adaptive_spectral_filter_backward", [&] {
        using T = at::opmath_type<scalar_t>;
        add_cast_kernel<T, T, scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
            gy.const_data_ptr<T>(), grad_ct.const_data_ptr<T>(), gx.mutable_data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return {gx, gw1, gb1, gw2, gb2};
}

}  // namespace
}  // namespace cuda
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CUDA, m) {
  m.impl("spectral_filter", &slimops::cuda::spectral_filter_cuda);
  m.impl("spectral_filter_backward", &slimops::cuda::spectral_filter_backward_cuda);
  m.impl("adaptive_spectral_filter", &slimops::cuda::adaptive_spectral_filter_cuda);
  m.impl("adaptive_spectral_filter_backward", &slimops::cuda::adaptive_spectral_filter_backward_cuda);
}
