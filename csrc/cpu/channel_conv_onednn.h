// channel_conv's bfloat16 calls on a CPU with AMX: through oneDNN's convolution (at::conv2d), not the direct kernel.
//
// The direct kernel (direct_conv.h) computes a bf16 call in float FMAs after converting the operands. oneDNN runs
// bf16 convolutions on AMX tiles, where a tile multiply does 16 x 16 x 32 bf16 multiply-adds: on a Xeon with AMX
// (2 threads, 32 x 128 -> 128 at 28², 3x3, 50% of the channels kept), the direct kernel took 5.8-6.1 ms, the dense
// bf16 conv on every channel 4.4-5.0 ms, and a gather of the kept channels then oneDNN's conv 1.9 ms. Without the
// tiles oneDNN's bf16 conv is the slower one: capped at AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA) the gather + conv took
// 8.4 ms and the direct kernel 6.0 (64 @ 56²: 9.3 against 6.7). So bf16 goes this way only where AMX runs:
//   - channel_conv2d: gather the kept input channels (unless x is already compact) and the kept weight block,
//     at::conv2d; the backward is at::convolution_backward on the same gathered tensors, its gradients scattered
//     into the full-size ones (zero outside the kept block, as the direct path leaves them);
//   - masked_conv2d: one conv over the samples that keep a channel and the rows some sample keeps, then each
//     sample's masked rows set to 0 (a kept-rows-only oneDNN call per sample lost to it at 28²: 7.8 against
//     4.5 ms); the backward runs the same conv's backward on grad_out with the masked entries zeroed. About the
//     dense x mask baseline's cost, instead of 2.3x it through the direct kernel.
// Few kept channels favour the direct kernel still (its work shrinks with them, oneDNN's gathers and fixed costs do
// not; per-sample masks need the conv of every row some sample keeps). Measured (bf16, 2 threads, 3x3, both paths):
// channel_conv2d at 10% kept (1% of the MACs) fwd 0.60 / 0.67 ms direct / oneDNN at 28², 0.76 / 0.98 at 56²; at
// 25% (6%) 1.98 / 1.02 and 2.45 / 1.77. masked_conv2d at 10% fwd 3.75 / 5.83 and 4.53 / 11.4; at 25% 6.85 / 5.72
// (28²) but 8.15 / 10.5 (56²); at 50% 11.4 / 5.6 and 10.6 / 10.2. Hence the two thresholds below.
constexpr double kOnednnMinMacs = 0.02;       // channel_conv2d: |out| |in| / (C_out C_in)
constexpr double kOnednnMinMaskedKeep = 0.3;  // masked_conv2d: the kept fraction of the mask

// float16 keeps the direct kernel (oneDNN's fp16 conv took 33 ms on the same Xeon, 7x its bf16 one).
// SLIMOPS_CPU_BF16_CONV=direct keeps bf16 on the direct kernel too (the tests run both paths this way).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/TensorIndexing.h>
#include <ATen/cpu/Utils.h>

#include <cctype>
#include <array>
#include <cstdlib>
#include <string>
#include <string_view>

#include "amx_bf16.h"
#include "isa.h"
#include "slimops/channel_conv_checks.h"

namespace slimops {
namespace cpu {

// The geometry as at::conv2d's pairs.
struct ConvArgs {
  std::array<int64_t, 2> stride, padding, dilation;
  explicit ConvArgs(const ConvGeom& g) : stride{g.sh, g.sw}, padding{g.ph, g.pw}, dilation{g.dh, g.dw} {}
};

// Whether oneDNN may use AMX in this process: no ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA below it (bench/as_isa.py
// caps it that way).
inline bool onednn_isa_allows_amx() {
  for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') continue;
    std::string s(v);
    for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    if (s != "ALL" && s.find("AMX") == std::string::npos) return false;
  }
  return true;
}

// Whether bf16 channel_conv calls run through oneDNN (see above): cpu_amx_bf16() (amx_bf16.h: the avx512 ISA, AMX-BF16
// usable, SLIMOPS_CPU_AMX not 0), torch has oneDNN, oneDNN not capped below AMX, and SLIMOPS_CPU_BF16_CONV is not
// "direct". Read once.
inline bool bf16_conv_onednn() {
  static const bool on = [] {
    if (const char* v = std::getenv("SLIMOPS_CPU_BF16_CONV"); v != nullptr && std::string_view(v) == "direct")
      return false;
    return cpu_amx_bf16() && at::hasMKLDNN() && onednn_isa_allows_amx();
  }();
  return on;
}

// Whether a channel_conv2d call (forward or backward) goes to oneDNN: bf16, AMX usable, at least kOnednnMinMacs of
// the MACs kept (nr of c_out rows, nc of c_in channels).
inline bool channel_conv_takes_onednn(const at::Tensor& x, int64_t nr, int64_t nc, int64_t c_out, int64_t c_in) {
  return x.scalar_type() == at::kBFloat16 && nr > 0 && nc > 0 && bf16_conv_onednn() &&
         static_cast<double>(nr * nc) >= kOnednnMinMacs * static_cast<double>(c_out * c_in);
}

// Whether a masked_conv2d call (forward or backward) goes to oneDNN: bf16, AMX usable, at least kOnednnMinMaskedKeep
// of out_mask set.
inline bool masked_conv_takes_onednn(const at::Tensor& x, const at::Tensor& out_mask, int64_t c_in) {
  if (x.scalar_type() != at::kBFloat16 || c_in == 0 || out_mask.numel() == 0 || !bf16_conv_onednn()) return false;
  const double kept = static_cast<double>(out_mask.sum().item<int64_t>()) / static_cast<double>(out_mask.numel());
  return kept >= kOnednnMinMaskedKeep;
}

// x's channels idx (dim 1) or samples idx (dim 0), by indexing: index_select would make a non-contiguous x (a
// stride-0 view of a huge batch) contiguous first.
inline at::Tensor take(const at::Tensor& x, int64_t dim, const at::Tensor& idx) {
  using at::indexing::Slice;
  return dim == 0 ? x.index({idx}) : x.index({Slice(), idx});
}

// channel_conv2d through oneDNN: x[:, in_idx] (x itself when input_gathered) conv weight[out_idx][:, in_idx].
inline at::Tensor channel_conv2d_onednn(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                                        const at::Tensor& out_idx, const ConvGeom& g, bool input_gathered) {
  const ConvArgs a(g);
  const at::Tensor xs = input_gathered ? x : take(x, 1, in_idx);
  const at::Tensor w = weight.index_select(0, out_idx).index_select(1, in_idx);
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->index_select(0, out_idx)) : std::nullopt;
  return at::conv2d(xs, w, b, a.stride, a.padding, a.dilation).contiguous();
}

// Its backward: the gradients of the gathered call, scattered into full-size ones (empty where not asked for).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_conv2d_backward_onednn(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, const ConvGeom& g, bool input_gathered,
    std::array<bool, 3> need) {
  const ConvArgs a(g);
  const at::Tensor xs = input_gathered ? x : take(x, 1, in_idx);
  const at::Tensor w = weight.index_select(0, out_idx).index_select(1, in_idx);
  const std::array<int64_t, 1> bias_sizes{out_idx.numel()};
  auto [gxs, gws, gbs] = at::convolution_backward(grad_out.contiguous(), xs, w, bias_sizes, a.stride, a.padding,
                                                  a.dilation, false, {0, 0}, 1, need);
  at::Tensor gx = x.new_empty({0}), gw = weight.new_empty({0}), gb = weight.new_empty({0});
  if (need[0])
    gx = input_gathered ? gxs.contiguous()
                        : at::zeros_like(x, at::MemoryFormat::Contiguous).index_copy_(1, in_idx, gxs);
  if (need[1]) {
    const at::Tensor rows = at::zeros({out_idx.numel(), weight.size(1), weight.size(2), weight.size(3)},
                                      weight.options()).index_copy_(1, in_idx, gws);
    gw = at::zeros_like(weight, at::MemoryFormat::Contiguous).index_copy_(0, out_idx, rows);
  }
  if (need[2]) gb = at::zeros({weight.size(0)}, weight.options()).index_copy_(0, out_idx, gbs);
  return {gx, gw, gb};
}

// masked_conv2d through oneDNN: the conv of the samples that keep a row (a fully gated sample is all zeros, and a
// stride-0 batch is never materialised whole) with the rows some sample keeps (the others' weights are never read,
// as in the direct path), each sample's masked rows then set to 0 (never computed values: 0 even where the conv
// overflows).
struct MaskedLive {
  at::Tensor samples, rows, mask;  // the live samples, the kept rows, the mask of those samples and rows
  bool all_samples, all_rows;
  explicit MaskedLive(const at::Tensor& out_mask) {
    samples = out_mask.any(1).nonzero().flatten(), rows = out_mask.any(0).nonzero().flatten();
    all_samples = samples.numel() == out_mask.size(0), all_rows = rows.numel() == out_mask.size(1);
    mask = all_samples ? out_mask : out_mask.index_select(0, samples);
    if (!all_rows) mask = mask.index_select(1, rows);
  }
  bool empty() const { return samples.numel() == 0; }
  at::Tensor dropped() const { return mask.logical_not().view({mask.size(0), mask.size(1), 1, 1}); }
  // a full-size (N, C, ...) tensor from t (live samples x kept rows x ...), zero elsewhere
  at::Tensor scatter(const at::Tensor& t, at::IntArrayRef full) const {
    if (all_samples && all_rows) return t;
    at::Tensor out = at::zeros(full, t.options());
    if (all_rows) return out.index_copy_(0, samples, t);
    at::Tensor by_row = all_samples ? out : at::zeros({samples.numel(), full[1], full[2], full[3]}, t.options());
    by_row.index_copy_(1, rows, t);
    return all_samples ? by_row : out.index_copy_(0, samples, by_row);
  }
};

inline at::Tensor masked_conv2d_onednn(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& out_mask,
                                       const ConvGeom& g, at::IntArrayRef out_shape) {
  const MaskedLive L(out_mask);
  if (L.empty()) return at::zeros(out_shape, x.options());
  const ConvArgs a(g);
  const at::Tensor w = L.all_rows ? weight : weight.index_select(0, L.rows);
  std::optional<at::Tensor> b = bias;
  if (bias.has_value() && !L.all_rows) b = bias->index_select(0, L.rows);
  const at::Tensor ys = at::conv2d(L.all_samples ? x : take(x, 0, L.samples), w, b, a.stride, a.padding, a.dilation);
  return L.scatter(ys.contiguous().masked_fill_(L.dropped(), 0), out_shape);
}

// Its backward: the same samples and rows, grad_out's masked entries zeroed (never read, as in the direct path).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_onednn(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_mask,
    const ConvGeom& g, std::array<bool, 3> need) {
  const MaskedLive L(out_mask);
  const auto contiguous = at::MemoryFormat::Contiguous;
  if (L.empty())
    return {need[0] ? at::zeros_like(x, contiguous) : x.new_empty({0}),
            need[1] ? at::zeros_like(weight, contiguous) : weight.new_empty({0}),
            need[2] ? at::zeros({weight.size(0)}, weight.options()) : weight.new_empty({0})};
  at::Tensor go = L.all_samples ? grad_out : take(grad_out, 0, L.samples);
  if (!L.all_rows) go = go.index_select(1, L.rows);
  go = go.masked_fill(L.dropped(), 0).contiguous();  // a new tensor: grad_out itself is left as it is
  const at::Tensor w = L.all_rows ? weight : weight.index_select(0, L.rows);
  const std::array<int64_t, 1> bias_sizes{w.size(0)};
  const ConvArgs a(g);
  auto [gxs, gws, gbs] = at::convolution_backward(go, L.all_samples ? x : take(x, 0, L.samples), w, bias_sizes,
                                                  a.stride, a.padding, a.dilation, false, {0, 0}, 1, need);
  at::Tensor gx = x.new_empty({0}), gw = weight.new_empty({0}), gb = weight.new_empty({0});
  if (need[0])
    gx = L.all_samples ? gxs.contiguous() : at::zeros_like(x, contiguous).index_copy_(0, L.samples, gxs);
  if (need[1]) gw = L.all_rows ? gws.contiguous() : at::zeros_like(weight, contiguous).index_copy_(0, L.rows, gws);
  if (need[2]) gb = L.all_rows ? gbs : at::zeros({weight.size(0)}, weight.options()).index_copy_(0, L.rows, gbs);
  return {gx, gw, gb};
}

}  // namespace cpu
}  // namespace slimops
