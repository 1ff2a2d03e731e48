// CPU kernels of the spectral family (schemas in csrc/registration.cpp; maths in docs/algorithms.md §7 and
// slimops/reference/spectral.py): GFNet's global filter and AFF's adaptive frequency filter.
//
// Scheme: the 2-D orthonormal real DFT as dense DFT-matrix products on blocks of channels that stay in
// cache. One work item is (sample b, block of channels): its tile x[b, :, :, c0:c0+n] (H, W, n) is loaded
// once (converted to the accumulation dtype, channels zero-padded to a multiple of 16), transformed,
// filtered, transformed back and stored once; nothing complex is ever in memory at full size.
//   rfft2  : along W, per row h:  T[h] (2Wr x n) = FW (2Wr x W) x[h] (W x n)     (rows: k_w, re/im)
//            along H, complex:    X = C T + S (Im T, -Re T)                      (C, S: cos, sin / sqrt(H))
//   irfft2 : along H, complex:    U = C Z + S (-Im Z, Re Z)
//            along W, per row h:  y[h] (W x n) = IW (W x 2Wr) U[h] (2Wr x n)     (IW: c2r, alpha = 1 or 2)
// The spectrum of a tile is laid out (H, Wr, 2, n): per frequency, n real parts then n imaginary parts,
// so the AFF channel MLP is one real product per layer over all frequencies of the tile.
// The transforms cost O(H + W) flops per element (against an FFT's O(log HW)), all of it in a vectorised,
// register-blocked product (small_mm.h): up to 64 x 64 grids (the vision-model range) this beats
// pocketfft / MKL plus the separate multiply; beyond it the cost grows linearly with the grid side.
//
// Gradients (real-linear algebra of the maps above; autograd of torch.fft gives the same):
//   spectral_filter:  grad_x = irfft2(rfft2(g) conj(K)),  grad_K = sum_b alpha rfft2(g) conj(rfft2(x))
//   AFF:              gZ = alpha rfft2(g); back through Z = M X, softshrink, the two complex layers and
//                     ReLU; grad_x = R^T(gX) + g with R^T the adjoint of rfft2 (irfft2 with alpha = 1).
// Weight gradients are summed per thread and added at the end (deterministic for a fixed thread count).
//
// Threads: work items (samples x channel blocks) are split across threads.
// Accumulation in float32 for float32/bfloat16/float16 (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "slimops/dispatch.h"
#include "slimops/spectral_checks.h"
#include "small_mm.h"

namespace slimops {
namespace cpu {
namespace {

int64_t pad_cols(int64_t n) { return (n + kMMCols - 1) / kMMCols * kMMCols; }

// The DFT matrices of one (H, W) grid, orthonormal, in the accumulation dtype.
template <typename T>
struct Dft {
  int64_t h, w, wr;
  std::vector<T> fw;     // (2Wr, W): row (k, 0) = cos(2 pi k w / W) / sqrt(W), row (k, 1) = -sin(...) / sqrt(W)
  std::vector<T> iw;     // (W, 2Wr): c2r, col (k, 0) = alpha_k cos / sqrt(W), col (k, 1) = -alpha_k sin / sqrt(W)
  std::vector<T> iwt;    // (W, 2Wr): the adjoint of fw (alpha = 1): the r2c step's transpose
  std::vector<T> ch, sh, nsh;  // (H, H): cos(2 pi k h / H) / sqrt(H), sin(...) / sqrt(H), -sin(...) / sqrt(H)
  std::vector<T> alpha;  // (Wr): 1 for k = 0 and (even W) k = W/2, else 2 — the c2r weights

  Dft(int64_t h_, int64_t w_) : h(h_), w(w_), wr(w_ / 2 + 1) {
    const double two_pi = 6.283185307179586476925286766559;
    const double sw = 1.0 / std::sqrt(static_cast<double>(w)), shh = 1.0 / std::sqrt(static_cast<double>(h));
    fw.resize(2 * wr * w);
    iw.resize(w * 2 * wr);
    iwt.resize(w * 2 * wr);
    alpha.resize(wr);
    for (int64_t k = 0; k < wr; ++k) {
      alpha[k] = (k == 0 || 2 * k == w) ? T(1) : T(2);
      for (int64_t j = 0; j < w; ++j) {
        const double t = two_pi * static_cast<double>((k * j) % w) / static_cast<double>(w);
        const T c = static_cast<T>(std::cos(t) * sw), s = static_cast<T>(std::sin(t) * sw);
        fw[(2 * k) * w + j] = c;
        fw[(2 * k + 1) * w + j] = -s;
        iwt[j * 2 * wr + 2 * k] = c;
        iwt[j * 2 * wr + 2 * k + 1] = -s;
        iw[j * 2 * wr + 2 * k] = alpha[k] * c;
        iw[j * 2 * wr + 2 * k + 1] = -alpha[k] * s;
      }
    }
    ch.resize(h * h);
    sh.resize(h * h);
    nsh.resize(h * h);
    for (int64_t k = 0; k < h; ++k) {
      for (int64_t j = 0; j < h; ++j) {
        const double t = two_pi * static_cast<double>((k * j) % h) / static_cast<double>(h);
        ch[k * h + j] = static_cast<T>(std::cos(t) * shh);
        sh[k * h + j] = static_cast<T>(std::sin(t) * shh);
        nsh[k * h + j] = -sh[k * h + j];
      }
    }
  }
  int64_t points() const { return h * wr; }
  int64_t spec_size(int64_t n) const { return h * wr * 2 * n; }
};

// Complex DFT along H of a (H, Wr, 2, n) array `in` into `out`: out = C in + S' swap(in), where the sign
// pattern of S' gives the forward (e^{-i}) or the inverse (e^{+i}) transform.
template <typename T>
void dft_h(const Dft<T>& d, const T* in, T* out, int64_t n, bool inverse) {
  const int64_t ld = 2 * d.wr * n;
  small_mm<T>(d.h, d.h, ld, d.ch.data(), d.h, 1, in, ld, out, ld, false);
  // forward: Re += S Im, Im -= S Re; inverse: Re -= S Im, Im += S Re.
  const T* to_re = inverse ? d.nsh.data() : d.sh.data();
  const T* to_im = inverse ? d.sh.data() : d.nsh.data();
  for (int64_t k = 0; k < d.wr; ++k) {
    const T* re = in + k * 2 * n;
    T* ore = out + k * 2 * n;
    small_mm<T>(d.h, d.h, n, to_re, d.h, 1, re + n, ld, ore, ld, true);
    small_mm<T>(d.h, d.h, n, to_im, d.h, 1, re, ld, ore + n, ld, true);
  }
}

// rfft2 of a tile x (H, W, n) into spec (H, Wr, 2, n); tmp holds spec_size(n).
template <typename T>
void rfft2_tile(const Dft<T>& d, const T* x, T* tmp, T* spec, int64_t n) {
  for (int64_t r = 0; r < d.h; ++r)
    small_mm<T>(2 * d.wr, d.w, n, d.fw.data(), d.w, 1, x + r * d.w * n, n, tmp + r * 2 * d.wr * n, n, false);
  dft_h(d, tmp, spec, n, false);
}

// irfft2 of spec (H, Wr, 2, n) into a tile y (H, W, n) with the W-step matrix `iw` (d.iw: irfft2;
// d.iwt: the adjoint of rfft2); tmp holds spec_size(n).
template <typename T>
void irfft2_tile(const Dft<T>& d, const T* spec, T* tmp, T* y, int64_t n, const T* iw) {
  dft_h(d, spec, tmp, n, true);
  for (int64_t r = 0; r < d.h; ++r)
    small_mm<T>(d.w, 2 * d.wr, n, iw, 2 * d.wr, 1, tmp + r * 2 * d.wr * n, n, y + r * d.w * n, n, false);
}

// One (sample, channel block) tile of a channels-last (B, H, W, C) tensor: nc channels from c0, padded
// to n columns.
struct Tile {
  int64_t b, c0, nc, n;
};

template <typename scalar_t, typename T>
void load_tile(const scalar_t* src, const SpectralGeom& g, const Tile& t, T* dst) {
  const scalar_t* s = src + (t.b * g.h * g.w) * g.c + t.c0;
  for (int64_t p = 0; p < g.h * g.w; ++p, s += g.c, dst += t.n) {
    for (int64_t j = 0; j < t.nc; ++j) dst[j] = static_cast<T>(s[j]);
    for (int64_t j = t.nc; j < t.n; ++j) dst[j] = T(0);
  }
}

// dst tile = src (+ add, a second tile, when given), rounded once to scalar_t.
template <typename scalar_t, typename T>
void store_tile(const T* src, const T* add, const SpectralGeom& g, const Tile& t, scalar_t* dst) {
  scalar_t* o = dst + (t.b * g.h * g.w) * g.c + t.c0;
  for (int64_t p = 0; p < g.h * g.w; ++p, o += g.c, src += t.n) {
    if (add) {
      for (int64_t j = 0; j < t.nc; ++j) o[j] = static_cast<scalar_t>(src[j] + add[j]);
      add += t.n;
    } else {
      for (int64_t j = 0; j < t.nc; ++j) o[j] = static_cast<scalar_t>(src[j]);
    }
  }
}

// Per-thread accumulators of a weight gradient, summed once at the end.
template <typename T>
struct ThreadSums {
  int64_t size;
  std::vector<T> data;
  explicit ThreadSums(int64_t n) : size(n), data(static_cast<size_t>(n * at::get_num_threads()), T(0)) {}
  T* mine() { return data.data() + at::get_thread_num() * size; }
  at::Tensor total(at::ScalarType acc) const {
    at::Tensor out = at::zeros({size}, at::TensorOptions().dtype(acc));
    if (size == 0) return out;
    T* o = out.data_ptr<T>();
    for (int64_t t = 0; t < static_cast<int64_t>(data.size()) / size; ++t)
      for (int64_t i = 0; i < size; ++i) o[i] += data[t * size + i];
    return out;
  }
};

// Channel block of the global filter's tiles: as many channels as keep a tile within ~64 KB (L2 holds the
// tile, its spectrum and the scratch), 16 to 64.
int64_t filter_block(const SpectralGeom& g, size_t elem) {
  const int64_t per = std::max<int64_t>(1, g.h * g.w * static_cast<int64_t>(elem));
  int64_t n = (64 * 1024 / per) / kMMCols * kMMCols;
  n = std::clamp<int64_t>(n, kMMCols, 64);
  return std::min(n, pad_cols(g.c));
}

at::Tensor empty_grad(const at::Tensor& t) { return at::empty({0}, t.options()); }

// Tiles per task: enough that a task is worth waking a thread for (~2 MFLOP of transforms), so small calls
// (one image, a handful of channels) run on the calling thread.
int64_t tile_grain(const SpectralGeom& g, int64_t n) {
  const int64_t flops = 8 * g.h * g.w * n * (g.h + g.w);
  return std::max<int64_t>(1, (2000000 + flops - 1) / flops);
}

// ---- spectral_filter -----------------------------------------------------------------------------------

// Z = X * K (or X * conj(K)) over one tile's spectrum; k_acc (H, Wr, C, 2) in the accumulation dtype.
template <typename T>
void filter_multiply(const Dft<T>& d, const SpectralGeom& g, const Tile& t, const T* k_acc, T* spec, bool conj) {
  const T sgn = conj ? T(-1) : T(1);
  for (int64_t p = 0; p < d.points(); ++p) {
    T* re = spec + p * 2 * t.n;
    T* im = re + t.n;
    const T* kp = k_acc + (p * g.c + t.c0) * 2;
    for (int64_t j = 0; j < t.nc; ++j) {
      const T kr = kp[2 * j], ki = sgn * kp[2 * j + 1];
      const T xr = re[j], xi = im[j];
      re[j] = xr * kr - xi * ki;
      im[j] = xr * ki + xi * kr;
    }
  }
}

template <typename F>
void for_tiles(const SpectralGeom& g, int64_t n, const F& f) {
  const int64_t nblk = (g.c + n - 1) / n;
  at::parallel_for(0, g.b * nblk, tile_grain(g, n), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t c0 = (i % nblk) * n;
      f(Tile{i / nblk, c0, std::min(n, g.c - c0), n});
    }
  });
}

at::Tensor spectral_filter_cpu(const at::Tensor& x_in, const at::Tensor& weight) {
  const char* op = "spectral_filter";
  const SpectralGeom g = check_spectral_filter(op, x_in, weight);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "spectral_filter_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Dft<T> d(g.h, g.w);
    const at::Tensor k = weight.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* kp = k.data_ptr<T>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n = filter_block(g, sizeof(T));
    for_tiles(g, n, [&](const Tile& t) {
      thread_local std::vector<T> buf;
      buf.resize(static_cast<size_t>(g.h * g.w * n + 2 * d.spec_size(n)));
      T* tile = buf.data();
      T* spec = tile + g.h * g.w * n;
      T* tmp = spec + d.spec_size(n);
      load_tile(xp, g, t, tile);
      rfft2_tile(d, tile, tmp, spec, n);
      filter_multiply(d, g, t, kp, spec, false);
      irfft2_tile(d, spec, tmp, tile, n, d.iw.data());
      store_tile<scalar_t, T>(tile, nullptr, g, t, yp);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> spectral_filter_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                const at::Tensor& weight,
                                                                std::array<bool, 2> output_mask) {
  const char* op = "spectral_filter_backward";
  const SpectralGeom g = check_spectral_filter(op, x_in, weight);
  check_spectral_grad(op, grad_in, x_in);
  const bool need_x = output_mask[0], need_w = output_mask[1];
  at::Tensor gx = need_x ? at::empty_like(x_in, at::MemoryFormat::Contiguous) : empty_grad(x_in);
  at::Tensor gw = need_w ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : empty_grad(weight);
  if ((!need_x && !need_w) || x_in.numel() == 0) return {gx, gw};
  const at::Tensor x = x_in.contiguous();
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "spectral_filter_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
    const Dft<T> d(g.h, g.w);
    const at::Tensor k = weight.to(acc).contiguous();
    const T* kp = k.data_ptr<T>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? gx.data_ptr<scalar_t>() : nullptr;
    const int64_t n = filter_block(g, sizeof(T));
    ThreadSums<T> sums(need_w ? d.points() * g.c * 2 : 0);
    for_tiles(g, n, [&](const Tile& t) {
      thread_local std::vector<T> buf;
      buf.resize(static_cast<size_t>(g.h * g.w * n + 3 * d.spec_size(n)));
      T* tile = buf.data();
      T* gs = tile + g.h * g.w * n;    // rfft2(grad)
      T* xs = gs + d.spec_size(n);     // rfft2(x)
      T* tmp = xs + d.spec_size(n);
      load_tile(gp, g, t, tile);
      rfft2_tile(d, tile, tmp, gs, n);
      if (need_w) {
        load_tile(xp, g, t, tile);
        rfft2_tile(d, tile, tmp, xs, n);
        T* acc_w = sums.mine();
        for (int64_t p = 0; p < d.points(); ++p) {
          const T a = d.alpha[p % d.wr];
          const T *gr = gs + p * 2 * n, *gi = gr + n, *xr = xs + p * 2 * n, *xi = xr + n;
          T* o = acc_w + (p * g.c + t.c0) * 2;
          for (int64_t j = 0; j < t.nc; ++j) {  // alpha * G * conj(X)
            o[2 * j] += a * (gr[j] * xr[j] + gi[j] * xi[j]);
            o[2 * j + 1] += a * (gi[j] * xr[j] - gr[j] * xi[j]);
          }
        }
      }
      if (need_x) {
        filter_multiply(d, g, t, kp, gs, true);
        irfft2_tile(d, gs, tmp, tile, n, d.iw.data());
        store_tile<scalar_t, T>(tile, nullptr, g, t, gxp);
      }
    });
    if (need_w) gw.copy_(sums.total(acc).view(weight.sizes()));
  });
  return {gx, gw};
}

// ---- adaptive_spectral_filter --------------------------------------------------------------------------

// The AFF weights of every block as real products over a tile's interleaved spectrum rows [Re | Im]:
//   layer 1: [O1r | O1i] = [Xr | Xi] W1big + b1big,  W1big = [[W1r, W1i], [-W1i, W1r]]  (2n x 2hp)
//   layer 2: [O2r | O2i] = [O1r | O1i] W2big + b2big, W2big = [[W2r, W2i], [-W2i, W2r]] (2hp x 2n)
// n = Cb and hp = Hb padded to 16 columns (zeros), plus the transposes the backward multiplies by.
template <typename T>
struct AffWeights {
  int64_t k, cb, hb, n, hp;
  std::vector<T> w1, b1, w2, b2, w1t, w2t;  // per block: w1 (2n, 2hp), b1 (2hp), w2 (2hp, 2n), b2 (2n), w1t, w2t

  int64_t w1_size() const { return 4 * n * hp; }
  AffWeights(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& w2_, const at::Tensor& b2_,
             at::ScalarType acc)
      : k(w1_.size(1)), cb(w1_.size(2)), hb(w1_.size(3)), n(pad_cols(cb)), hp(pad_cols(hb)) {
    const at::Tensor a1 = w1_.to(acc).contiguous(), c1 = b1_.to(acc).contiguous();
    const at::Tensor a2 = w2_.to(acc).contiguous(), c2 = b2_.to(acc).contiguous();
    const T *p1 = a1.data_ptr<T>(), *q1 = c1.data_ptr<T>(), *p2 = a2.data_ptr<T>(), *q2 = c2.data_ptr<T>();
    const int64_t sw = w1_size();
    w1.assign(k * sw, T(0));
    w2.assign(k * sw, T(0));
    w1t.assign(k * sw, T(0));
    w2t.assign(k * sw, T(0));
    b1.assign(k * 2 * hp, T(0));
    b2.assign(k * 2 * n, T(0));
    for (int64_t blk = 0; blk < k; ++blk) {
      T *W1 = &w1[blk * sw], *W2 = &w2[blk * sw], *W1t = &w1t[blk * sw], *W2t = &w2t[blk * sw];
      for (int64_t i = 0; i < cb; ++i) {
        for (int64_t o = 0; o < hb; ++o) {
          const T r = p1[(0 * k + blk) * cb * hb + i * hb + o], im = p1[(1 * k + blk) * cb * hb + i * hb + o];
          // W1big (2n x 2hp), row-major
          W1[i * 2 * hp + o] = r;
          W1[i * 2 * hp + hp + o] = im;
          W1[(n + i) * 2 * hp + o] = -im;
          W1[(n + i) * 2 * hp + hp + o] = r;
          const T r2 = p2[(0 * k + blk) * hb * cb + o * cb + i], im2 = p2[(1 * k + blk) * hb * cb + o * cb + i];
          // W2big (2hp x 2n)
          W2[o * 2 * n + i] = r2;
          W2[o * 2 * n + n + i] = im2;
          W2[(hp + o) * 2 * n + i] = -im2;
          W2[(hp + o) * 2 * n + n + i] = r2;
        }
      }
      for (int64_t r = 0; r < 2 * n; ++r)
        for (int64_t c = 0; c < 2 * hp; ++c) {
          W1t[c * 2 * n + r] = W1[r * 2 * hp + c];
          W2t[r * 2 * hp + c] = W2[c * 2 * n + r];
        }
      for (int64_t o = 0; o < hb; ++o) {
        b1[blk * 2 * hp + o] = q1[(0 * k + blk) * hb + o];
        b1[blk * 2 * hp + hp + o] = q1[(1 * k + blk) * hb + o];
      }
      for (int64_t i = 0; i < cb; ++i) {
        b2[blk * 2 * n + i] = q2[(0 * k + blk) * cb + i];
        b2[blk * 2 * n + n + i] = q2[(1 * k + blk) * cb + i];
      }
    }
  }
};

// o (P x cols) = in (P x kdim) w (kdim x cols) + bias, then ReLU when asked.
template <typename T>
void dense_layer(int64_t pts, int64_t kdim, int64_t cols, const T* in, const T* w, const T* bias, T* o, bool relu) {
  small_mm<T>(pts, kdim, cols, in, kdim, 1, w, cols, o, cols, false);
  for (int64_t p = 0; p < pts; ++p) {
    T* r = o + p * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const T v = r[j] + bias[j];
      r[j] = relu ? std::max(v, T(0)) : v;
    }
  }
}

template <typename T>
T softshrink(T v, T l) {  // NaN stays NaN, as in torch's softshrink
  return v > l ? v - l : (v < -l ? v + l : (v != v ? v : T(0)));
}

// The forward of one AFF tile up to the filter: spectrum X, post-ReLU hidden O1, pre-shrink O2.
template <typename T>
struct AffTile {
  T *tile, *x, *o1, *o2, *tmp;
};

template <typename T>
void aff_forward_tile(const Dft<T>& d, const AffWeights<T>& aw, int64_t blk, const AffTile<T>& s) {
  const int64_t n = aw.n, hp = aw.hp, pts = d.points(), sw = aw.w1_size();
  rfft2_tile(d, s.tile, s.tmp, s.x, n);
  dense_layer(pts, 2 * n, 2 * hp, s.x, &aw.w1[blk * sw], &aw.b1[blk * 2 * hp], s.o1, true);
  dense_layer(pts, 2 * hp, 2 * n, s.o1, &aw.w2[blk * sw], &aw.b2[blk * 2 * n], s.o2, false);
}

template <typename T>
std::vector<T> aff_buffer(const Dft<T>& d, const SpectralGeom& g, const AffWeights<T>& aw, int64_t extra_specs) {
  const int64_t spec = d.spec_size(aw.n);
  return std::vector<T>(static_cast<size_t>(g.h * g.w * aw.n * 2 + (3 + extra_specs) * spec +
                                            d.points() * 2 * aw.hp));
}

template <typename T>
AffTile<T> aff_views(T* buf, const Dft<T>& d, const SpectralGeom& g, const AffWeights<T>& aw) {
  const int64_t spec = d.spec_size(aw.n);
  AffTile<T> s;
  s.tile = buf;
  s.x = buf + 2 * g.h * g.w * aw.n;  // two tiles: x (kept for the residual) and a scratch tile
  s.o2 = s.x + spec;
  s.tmp = s.o2 + spec;
  s.o1 = s.tmp + spec;
  return s;
}

at::Tensor adaptive_spectral_filter_cpu(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
                                        const at::Tensor& w2, const at::Tensor& b2, int64_t blocks, double shrink) {
  const char* op = "adaptive_spectral_filter";
  SpectralGeom g;
  check_adaptive(op, x_in, w1, b1, w2, b2, blocks, shrink, &g);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "adaptive_spectral_filter_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Dft<T> d(g.h, g.w);
    const AffWeights<T> aw(w1, b1, w2, b2, c10::CppTypeToScalarType<T>::value);
    const T lam = static_cast<T>(shrink);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n = aw.n, pts = d.points();
    at::parallel_for(0, g.b * blocks, tile_grain(g, n), [&](int64_t lo, int64_t hi) {
      std::vector<T> buf = aff_buffer(d, g, aw, 0);
      const AffTile<T> s = aff_views(buf.data(), d, g, aw);
      T* out = s.tile + g.h * g.w * n;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t blk = i % blocks;
        const Tile t{i / blocks, blk * aw.cb, aw.cb, n};
        load_tile(xp, g, t, s.tile);
        aff_forward_tile(d, aw, blk, s);
        for (int64_t p = 0; p < pts; ++p) {  // Z = softshrink(O2) * X, into o2
          T *xr = s.x + p * 2 * n, *xi = xr + n, *mr = s.o2 + p * 2 * n, *mi = mr + n;
          for (int64_t j = 0; j < n; ++j) {
            const T a = softshrink(mr[j], lam), b = softshrink(mi[j], lam);
            mr[j] = a * xr[j] - b * xi[j];
            mi[j] = a * xi[j] + b * xr[j];
          }
        }
        irfft2_tile(d, s.o2, s.tmp, out, n, d.iw.data());
        store_tile<scalar_t, T>(out, s.tile, g, t, yp);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_spectral_filter_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t blocks, double shrink, std::array<bool, 5> output_mask) {
  const char* op = "adaptive_spectral_filter_backward";
  SpectralGeom g;
  const int64_t hb = check_adaptive(op, x_in, w1, b1, w2, b2, blocks, shrink, &g);
  check_spectral_grad(op, grad_in, x_in);
  const bool need_x = output_mask[0];
  const bool need_w = output_mask[1] || output_mask[2] || output_mask[3] || output_mask[4];
  at::Tensor gx = need_x ? at::empty_like(x_in, at::MemoryFormat::Contiguous) : empty_grad(x_in);
  std::array<at::Tensor, 4> gws;
  const std::array<const at::Tensor*, 4> ws{&w1, &b1, &w2, &b2};
  for (int i = 0; i < 4; ++i)
    gws[i] = output_mask[i + 1] ? at::zeros_like(*ws[i], at::MemoryFormat::Contiguous) : empty_grad(*ws[i]);
  if ((!need_x && !need_w) || x_in.numel() == 0) return {gx, gws[0], gws[1], gws[2], gws[3]};
  const at::Tensor x = x_in.contiguous();
  SLIMOPS_DISPATCH_FLOATS(x.scalar_type(), "adaptive_spectral_filter_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
    const Dft<T> d(g.h, g.w);
    const AffWeights<T> aw(w1, b1, w2, b2, acc);
    const T lam = static_cast<T>(shrink);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? gx.data_ptr<scalar_t>() : nullptr;
    const int64_t n = aw.n, hp = aw.hp, pts = d.points(), sw = aw.w1_size();
    // Per block: gW1big (2n x 2hp), gb1big (2hp), gW2big (2hp x 2n), gb2big (2n).
    const int64_t per_blk = 2 * sw + 2 * hp + 2 * n;
    ThreadSums<T> sums(need_w ? blocks * per_blk : 0);
    at::parallel_for(0, g.b * blocks, tile_grain(g, n), [&](int64_t lo, int64_t hi) {
      std::vector<T> buf = aff_buffer(d, g, aw, 2);
      const AffTile<T> s = aff_views(buf.data(), d, g, aw);
      T* gtile = s.tile + g.h * g.w * n;
      T* gz = s.o1 + pts * 2 * hp;  // alpha * rfft2(grad), then the gradient of the spectrum X
      T* gm = gz + d.spec_size(n);  // gradient of O2 (pre-shrink)
      std::vector<T> go1(static_cast<size_t>(pts * 2 * hp));
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t blk = i % blocks;
        const Tile t{i / blocks, blk * aw.cb, aw.cb, n};
        load_tile(xp, g, t, s.tile);
        aff_forward_tile(d, aw, blk, s);
        load_tile(gp, g, t, gtile);
        rfft2_tile(d, gtile, s.tmp, gz, n);
        for (int64_t p = 0; p < pts; ++p) {
          const T a = d.alpha[p % d.wr];
          T *xr = s.x + p * 2 * n, *xi = xr + n, *zr = gz + p * 2 * n, *zi = zr + n;
          T *o2r = s.o2 + p * 2 * n, *o2i = o2r + n, *mr = gm + p * 2 * n, *mi = mr + n;
          for (int64_t j = 0; j < n; ++j) {
            const T gr = a * zr[j], gi = a * zi[j];           // gZ
            const T m_r = softshrink(o2r[j], lam), m_i = softshrink(o2i[j], lam);
            // gM = gZ conj(X), through softshrink: derivative 0 on [-lam, lam], 1 elsewhere and at NaN (as torch)
            mr[j] = std::abs(o2r[j]) <= lam ? T(0) : gr * xr[j] + gi * xi[j];
            mi[j] = std::abs(o2i[j]) <= lam ? T(0) : gi * xr[j] - gr * xi[j];
            zr[j] = gr * m_r + gi * m_i;                      // gX (direct) = gZ conj(M)
            zi[j] = gi * m_r - gr * m_i;
          }
        }
        // Layer 2: gO1 = gO2 W2big^T, masked by ReLU; weight sums.
        small_mm<T>(pts, 2 * n, 2 * hp, gm, 2 * n, 1, &aw.w2t[blk * sw], 2 * hp, go1.data(), 2 * hp, false);
        for (int64_t e = 0; e < pts * 2 * hp; ++e)
          if (s.o1[e] <= T(0)) go1[e] = T(0);  // torch's relu backward: a NaN output passes the gradient
        if (need_w) {
          T* acc_b = sums.mine() + blk * per_blk;
          T *gw1 = acc_b, *gb1 = gw1 + sw, *gw2 = gb1 + 2 * hp, *gb2 = gw2 + sw;
          small_mm<T>(2 * hp, pts, 2 * n, s.o1, 1, 2 * hp, gm, 2 * n, gw2, 2 * n, true);  // O1^T gO2
          small_mm<T>(2 * n, pts, 2 * hp, s.x, 1, 2 * n, go1.data(), 2 * hp, gw1, 2 * hp, true);  // X^T gP1
          for (int64_t p = 0; p < pts; ++p) {
            for (int64_t j = 0; j < 2 * n; ++j) gb2[j] += gm[p * 2 * n + j];
            for (int64_t j = 0; j < 2 * hp; ++j) gb1[j] += go1[p * 2 * hp + j];
          }
        }
        if (need_x) {
          // gX += gP1 W1big^T; grad_x = R^T(gX) + grad.
          small_mm<T>(pts, 2 * hp, 2 * n, go1.data(), 2 * hp, 1, &aw.w1t[blk * sw], 2 * n, gz, 2 * n, true);
          irfft2_tile(d, gz, s.tmp, s.tile, n, d.iwt.data());
          store_tile<scalar_t, T>(s.tile, gtile, g, t, gxp);
        }
      }
    });
    if (need_w) {
      const at::Tensor tot = sums.total(acc);
      const T* sp = tot.data_ptr<T>();
      const int64_t k = blocks, cb = aw.cb;
      at::Tensor r1 = at::zeros({2, k, cb, hb}, at::TensorOptions().dtype(acc)), q1 = at::zeros({2, k, hb}, r1.options());
      at::Tensor r2 = at::zeros({2, k, hb, cb}, r1.options()), q2 = at::zeros({2, k, cb}, r1.options());
      T *pr1 = r1.data_ptr<T>(), *pq1 = q1.data_ptr<T>(), *pr2 = r2.data_ptr<T>(), *pq2 = q2.data_ptr<T>();
      for (int64_t blk = 0; blk < k; ++blk) {
        const T *gw1 = sp + blk * per_blk, *gb1 = gw1 + sw, *gw2 = gb1 + 2 * hp, *gb2 = gw2 + sw;
        // W1r sits at [i][o] and [n+i][hp+o] of W1big, W1i at [i][hp+o] and (negated) [n+i][o]; same for W2.
        for (int64_t i = 0; i < cb; ++i)
          for (int64_t o = 0; o < hb; ++o) {
            pr1[(0 * k + blk) * cb * hb + i * hb + o] = gw1[i * 2 * hp + o] + gw1[(n + i) * 2 * hp + hp + o];
            pr1[(1 * k + blk) * cb * hb + i * hb + o] = gw1[i * 2 * hp + hp + o] - gw1[(n + i) * 2 * hp + o];
            pr2[(0 * k + blk) * hb * cb + o * cb + i] = gw2[o * 2 * n + i] + gw2[(hp + o) * 2 * n + n + i];
            pr2[(1 * k + blk) * hb * cb + o * cb + i] = gw2[o * 2 * n + n + i] - gw2[(hp + o) * 2 * n + i];
          }
        for (int64_t o = 0; o < hb; ++o) {
          pq1[(0 * k + blk) * hb + o] = gb1[o];
          pq1[(1 * k + blk) * hb + o] = gb1[hp + o];
        }
        for (int64_t i = 0; i < cb; ++i) {
          pq2[(0 * k + blk) * cb + i] = gb2[i];
          pq2[(1 * k + blk) * cb + i] = gb2[n + i];
        }
      }
      const std::array<at::Tensor, 4> full{r1, q1, r2, q2};
      for (int i = 0; i < 4; ++i)
        if (output_mask[i + 1]) gws[i].copy_(full[i]);
    }
  });
  return {gx, gws[0], gws[1], gws[2], gws[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("spectral_filter", &spectral_filter_cpu);
  m.impl("spectral_filter_backward", &spectral_filter_backward_cpu);
  m.impl("adaptive_spectral_filter", &adaptive_spectral_filter_cpu);
  m.impl("adaptive_spectral_filter_backward", &adaptive_spectral_filter_backward_cpu);
}

}  // namespace cpu
}  // namespace slimops
