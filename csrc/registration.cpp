// The one TORCH_LIBRARY(slimops) block: every schema of the package, in one place.
// Backends only implement (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu); the Python
// layer (slimops/ops/*.py) registers fake kernels and autograd next to the public functions.
//
// Penalty names (docs/algorithms.md §1-§3): "none", "l1", "l0", "tl1", "l1_2", "l21", "l0_l21"
// (prox penalties; "l21" groups are slices along dim 0) and "lp" (penalty_grad_ only).
#include <torch/library.h>

TORCH_LIBRARY(slimops, m) {
  // ---- prox family: fused proximal updates -------------------------------------------------
  // y = prox_{lam R}(x), R chosen by `penalty`; `a` is the Tl1 shape (or the group weight mu of
  // l0_l21).
  m.def("prox(Tensor x, str penalty, float lam, float a=1.0) -> Tensor");
  // Vector-Jacobian product of prox at x: grad_x = (d prox / d x)^T grad.
  m.def("prox_backward(Tensor grad, Tensor x, str penalty, float lam, float a=1.0) -> Tensor");

  // torch.optim.SGD's update (weight decay, momentum, dampening, nesterov, maximize) on every
  // tensor of `params`, then p <- prox_{lr lam R}(p). `init_momentum`: the buffers are new (their
  // content is ignored and set to the gradient, as SGD does on its first step). Grads are divided
  // by `grad_scale` when given; nothing changes when `found_inf` is given and non-zero.
  m.def(
      "prox_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool init_momentum, str penalty, float lam, float a, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");

  // torch.optim.AdamW's update (decoupled weight decay, bias correction, amsgrad, maximize), then
  // p <- prox_{lr lam R}(p). `state_steps` (one float32 scalar tensor per param, on the params'
  // device) are incremented by the op unless found_inf is non-zero.
  m.def(
      "prox_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "str penalty, float lam, float a, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // Proximal network slimming (docs/algorithms.md §4), after the SGD step produced gamma~ in place:
  //   gamma <- (alpha gamma~ + beta xi) / (alpha + beta)
  //   xi    <- prox_{lam/(alpha+beta) R}((alpha xi + beta gamma) / (alpha + beta))   (R = l1 in the paper)
  m.def(
      "palm_slimming_(Tensor(a!)[] gammas, Tensor(b!)[] xis, float alpha, float beta, float lam, "
      "str penalty=\"l1\", float a=1.0) -> ()");

  // grads += s * dR/dp for the sparsity penalties of docs/algorithms.md §2-§3 ("l1", "tl1", "lp" with
  // p = a, |p| clamped to >= eps) and "l21" (s sqrt(n_g) p_g / ||p_g||, groups along dim 0).
  m.def(
      "penalty_grad_(Tensor(a!)[] grads, Tensor[] params, str penalty, float s, float a=1.0, "
      "float eps=1e-8) -> ()");

  // Variable splitting (docs/algorithms.md §5): u <- prox_{(lam/beta) R}(w); w <- w - lr g - lr beta (w - u).
  m.def(
      "split_step_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] us, float lr, float beta, "
      "str penalty, float lam, float a=1.0) -> ()");

  // ---- channel_conv family: sparse channel convolution ----------------------------------------
  // y = conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx]) without materialising either
  // gather (groups = 1, zero padding). input_gathered: x already holds the channels in_idx, in that
  // order (x.size(1) == in_idx.size(0)); only the weight is indexed (a chain of sparse convs).
  m.def(
      "channel_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor in_idx, Tensor out_idx, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, bool input_gathered=False) -> Tensor");
  // (grad_x, grad_weight, grad_bias) of channel_conv2d, full-size (zero outside the kept channels);
  // a gradient not asked for in output_mask is returned as an empty tensor.
  m.def(
      "channel_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor in_idx, Tensor out_idx, "
      "int[2] stride, int[2] padding, int[2] dilation, bool input_gathered, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // y = conv2d(x, weight, bias) * out_mask[:, :, None, None]; out_mask (N, C_out) bool: per sample, only
  // the kept output channels are computed (dynamic channel gating).
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor out_mask, int[2] stride=1, "
      "int[2] padding=0, int[2] dilation=1) -> Tensor");
  m.def(
      "masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out_mask, int[2] stride, "
      "int[2] padding, int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- spectral family: Fourier-domain filtering (docs/algorithms.md §7) ---------------------------
  // x (B, H, W, C) real, channels last; spectra are rfft2 over (H, W), orthonormal.
  // GFNet global filter: y = irfft2(rfft2(x) * view_as_complex(weight), s=(H, W)); weight (H, W//2+1, C, 2).
  m.def("spectral_filter(Tensor x, Tensor weight) -> Tensor");
  // (grad_x, grad_weight); one not asked for in output_mask is an empty tensor.
  m.def(
      "spectral_filter_backward(Tensor grad, Tensor x, Tensor weight, bool[2] output_mask) -> (Tensor, Tensor)");
  // AFF adaptive frequency filter: y = irfft2(M(X) * X) + x, X = rfft2(x), M = softshrink(complex
  // block-diagonal two-layer channel MLP of X); w1 (2, blocks, C/blocks, Hb), b1 (2, blocks, Hb),
  // w2 (2, blocks, Hb, C/blocks), b2 (2, blocks, C/blocks) (index 0 real, 1 imaginary).
  m.def(
      "adaptive_spectral_filter(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int blocks, "
      "float shrink) -> Tensor");
  // (grad_x, grad_w1, grad_b1, grad_w2, grad_b2); one not asked for in output_mask is an empty tensor.
  m.def(
      "adaptive_spectral_filter_backward(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "int blocks, float shrink, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- sema family: SEMA localised attention (docs/algorithms.md §8) -------------------------------
  // q, k, v (B, heads, N, d), N = grid[0]*grid[1] tokens row-major: softmax attention (scale d^-1/2)
  // inside the non-overlapping window[0] x window[1] windows (the last ones smaller when the grid is
  // not a multiple of the window), or with neighborhood=True inside the window centred on each query
  // (shifted to stay in the grid), plus the mean of v over all N tokens. fp32 softmax statistics.
  m.def("sema_attention(Tensor q, Tensor k, Tensor v, int[2] grid, int[2] window, bool neighborhood=False) -> Tensor");
  // (grad_q, grad_k, grad_v), recomputing the softmax; one not asked for in output_mask is an empty tensor.
  m.def(
      "sema_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, int[2] grid, int[2] window, "
      "bool neighborhood, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- token_attention family: attention over kept tokens, for patch slimming (docs/algorithms.md §10) ---------------
  // q (B, heads, Lq, d), k and v (B, heads, Lk, d); q_idx (nq) or (B, nq), kv_idx (nk) or (B, nk), int64 or int32,
  // in range and distinct in each row: out (B, heads, nq, d) = softmax(q[q_idx] k[kv_idx]^T scale) v[kv_idx] per
  // sample and head, scale = d^-1/2 when None, q/k/v read in place by index. fp32 softmax statistics.
  m.def("kept_token_attention(Tensor q, Tensor k, Tensor v, Tensor q_idx, Tensor kv_idx, float? scale=None) -> Tensor");
  // (grad_q, grad_k, grad_v) in the full shapes of q, k, v (zero on rows not kept), recomputing the softmax; one
  // not asked for in output_mask is an empty tensor.
  m.def(
      "kept_token_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor q_idx, Tensor kv_idx, "
      "float? scale, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- quant family: binarisation and fake quantisation (docs/algorithms.md §9) ------------------------------
  // y = sign(x) with sign(0) = -1, in x's dtype. The backward is the surrogate gradient `surrogate`, zero where
  // |x| > clip: "fda" g (4 omega / pi) sum_{i<n_terms} cos((2i+1) omega x) (Fourier-domain approximation),
  // "ste" g, "tanh" g (1 - tanh^2 x), "approx_sign" g max(0, 2 - 2|x|).
  m.def("fda_sign(Tensor x, int n_terms=10, float omega=0.1, str surrogate=\"fda\", float clip=1.0) -> Tensor");
  m.def("fda_sign_backward(Tensor grad, Tensor x, int n_terms, float omega, str surrogate, float clip) -> Tensor");
  // y = (clamp(round(x / s) + z, Qn, Qp) - z) s, z = clamp(round(zero_point), Qn, Qp) (0 when None); s, z one
  // per tensor or one per slice along per_channel_axis; [Qn, Qp] the signed / unsigned `bits`-bit range (signed
  // 1 bit: {-1, +1}). LSQ gradients; grad_factor scales those of scale and zero_point.
  m.def(
      "fake_quantize(Tensor x, Tensor scale, Tensor? zero_point=None, int bits=8, int? per_channel_axis=None, "
      "bool signed=True, float grad_factor=1.0) -> Tensor");
  // (grad_x, grad_scale, grad_zero_point); one not asked for in output_mask (or without a zero point) is empty.
  m.def(
      "fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor? zero_point, int bits, "
      "int? per_channel_axis, bool signed, float grad_factor, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- distill family: distillation losses (docs/algorithms.md §9) --------------------------------------------
  // FAQD's feature-affinity loss, per sample: fs (B, Cs, H, W), ft (B, Ct, H, W); pixels normalised to unit length
  // (+1e-5), D = S^T S - T^T T (HW x HW, never formed); loss[b] = sum phi(D) / (HW)^2, or with proj (HW, k) the
  // fast loss sum phi(D proj) / (k (HW)^2); phi = |.| (norm "l1") or (.)^2 ("l2sq"). Returns (loss (B,), u, e) in
  // float32 (float64 for float64 features): the fast loss's products, saved for its backward (as SDPA's logsumexp),
  // u = [S proj; -T proj] (B, Cs + Ct, k) and e = phi'(D proj) (B, HW, k); for the exact loss both are empty.
  m.def("feature_affinity_loss(Tensor fs, Tensor ft, Tensor? proj=None, str norm=\"l1\") -> (Tensor, Tensor, Tensor)");
  // (grad_fs, grad_ft) for the per-sample gradient grad (B,); one not asked for in output_mask is an empty tensor.
  // proj gets no gradient. The fast loss's backward reads u and e when given (the forward's outputs: no product
  // is recomputed) and recomputes them when not; the exact loss recomputes its tiles.
  m.def(
      "feature_affinity_loss_backward(Tensor grad, Tensor fs, Tensor ft, Tensor? proj, str norm, bool[2] output_mask, "
      "Tensor? u=None, Tensor? e=None) -> (Tensor, Tensor)");
}
