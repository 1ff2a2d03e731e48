"""Readable pure-PyTorch twins of the ``channel_conv`` family: the test oracle and the fallback backend.

Each function mirrors the ``torch.ops.slimops`` op of the same name (schemas in
``csrc/registration.cpp``); it materialises the gathers the kernels avoid and calls ``F.conv2d``.

- ``channel_conv2d``: ``F.conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx], ...)``. With
  ``input_gathered=True`` x already holds the channels ``in_idx`` (in that order), so only the weight is
  indexed: this is how a chain of sparse convs passes compact activations from layer to layer.
- ``masked_conv2d``: ``F.conv2d(x, weight, bias, ...) * out_mask[:, :, None, None]``, ``out_mask`` (N, C_out)
  bool, one set of kept output channels per sample (dynamic channel gating, ManiDP). Masked channels are
  exactly 0, also where the conv would give inf/NaN (the kernels never compute them); samples with no kept
  channel are not convolved at all.

Empty index sets are allowed: no input channel leaves the bias (broadcast over the output), no output
channel gives an (N, 0, OH, OW) result. Low-precision inputs are convolved in float32 and rounded once,
as the kernels do (float32 accumulation).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    return v if len(v) == 2 else (v[0], v[0])


def out_size(h: int, w: int, kernel: Sequence[int], stride, padding, dilation) -> Tuple[int, int]:
    """The output grid of a conv, as ``F.conv2d`` computes it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, pair(stride), pair(padding), pair(dilation)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _acc(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t if t.dtype == torch.float64 else t.float()


def _conv(x: Tensor, w: Tensor, b: Optional[Tensor], stride, padding, dilation) -> Tensor:
    """F.conv2d in the accumulation dtype, tolerating zero input channels (the output is the bias)."""
    n, (h, wd) = x.shape[0], x.shape[2:]
    if w.shape[1] == 0 or w.shape[0] == 0:
        oh, ow = out_size(h, wd, w.shape[2:], stride, padding, dilation)
        y = _acc(x).new_zeros((n, w.shape[0], oh, ow))
        return y if b is None else y + _acc(b)[None, :, None, None]
    if h == 0 or wd == 0:  # F.conv2d refuses an empty grid; with padding, every output reads only zeros
        (ph, pw) = pair(padding)
        x, padding = F.pad(x, (pw, pw, ph, ph)), 0
    return F.conv2d(_acc(x), _acc(w), _acc(b), pair(stride), pair(padding), pair(dilation))


def channel_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_idx: Tensor, out_idx: Tensor,
                   stride=1, padding=0, dilation=1, input_gathered: bool = False) -> Tensor:
    in_idx, out_idx = in_idx.long(), out_idx.long()
    # x[:, in_idx], not index_select: index_select makes a non-contiguous x contiguous first (a stride-0 view of a
    # huge batch would be materialised whole)
    xs = x if input_gathered else x[:, in_idx]
    w = weight.index_select(0, out_idx).index_select(1, in_idx)
    b = None if bias is None else bias.index_select(0, out_idx)
    return _conv(xs, w, b, stride, padding, dilation).to(x.dtype)


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor,
                  stride=1, padding=0, dilation=1) -> Tensor:
    # Only the samples that keep a channel are convolved (a fully gated sample is all zeros, and a stride-0 batch
    # is never materialised whole); `where`, not a product: a masked channel is never computed, so it is 0 even
    # where the conv would be inf/NaN (the kernels skip it).
    if out_mask.device.type == "meta" or torch.compiler.is_compiling():  # no values to skip by: every sample
        y = _conv(x, weight, bias, stride, padding, dilation)
        return torch.where(out_mask[:, :, None, None], y, y.new_zeros(())).to(x.dtype)
    live = out_mask.any(1).nonzero().flatten()
    y_live = _conv(x[live], weight, bias, stride, padding, dilation)
    y_live = torch.where(out_mask[live][:, :, None, None], y_live, y_live.new_zeros(()))
    y = y_live.new_zeros((x.shape[0], *y_live.shape[1:]))
    return y.index_copy(0, live, y_live).to(x.dtype)


def _grads(fn, x: Tensor, weight: Tensor, output_mask: Sequence[bool], grad_out: Tensor):
    """(grad_x, grad_weight, grad_bias) of ``fn(x, weight, bias)`` by autograd in the accumulation
    dtype; a gradient not asked for in ``output_mask`` is an empty tensor, as in the kernels."""
    xa = _acc(x).detach().requires_grad_(bool(output_mask[0]))
    wa = _acc(weight).detach().requires_grad_(bool(output_mask[1]))
    ba = wa.new_zeros(weight.shape[0]).requires_grad_(bool(output_mask[2]))
    with torch.enable_grad():
        y = fn(xa, wa, ba)
        want = [t for t, m in zip((xa, wa, ba), output_mask) if m]
        got = torch.autograd.grad(y, want, _acc(grad_out), allow_unused=True) if want else ()
    got = list(got)
    out = []
    for t, m, like in zip((xa, wa, ba), output_mask, (x, weight, weight)):
        if not m:
            out.append(like.new_empty(0))
            continue
        g = got.pop(0)
        out.append((torch.zeros_like(t) if g is None else g).to(like.dtype))
    return tuple(out)


def channel_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor,
                            stride, padding, dilation, input_gathered: bool, output_mask: Sequence[bool]):
    """Gradients of :func:`channel_conv2d` for x (x's shape: zero on channels not in ``in_idx``), the
    full weight (zero outside the kept block) and the full bias (zero outside ``out_idx``)."""
    return _grads(lambda xa, wa, ba: channel_conv2d(xa, wa, ba, in_idx, out_idx, stride, padding, dilation,
                                                    input_gathered),
                  x, weight, output_mask, grad_out)


def masked_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, out_mask: Tensor,
                           stride, padding, dilation, output_mask: Sequence[bool]):
    """Gradients of :func:`masked_conv2d` for x, weight and bias (the mask is not differentiable)."""
    return _grads(lambda xa, wa, ba: masked_conv2d(xa, wa, ba, out_mask, stride, padding, dilation),
                  x, weight, output_mask, grad_out)
