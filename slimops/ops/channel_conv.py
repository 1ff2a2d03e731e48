"""Sparse channel convolution: the ``channel_conv`` op family.

A slimmed network (network slimming, Liu et al. 2017; proximal slimming, Bui et al.) keeps a subset of
each conv's channels; a dynamically pruned one (ManiDP, Tang et al. 2021) keeps a different subset per
sample. These ops compute only the kept work from the full-size weights, so a slimmed model runs fast
without being rebuilt and keeps training on its full tensors:

``channel_conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation)``
    ``= F.conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx], stride, padding, dilation)``,
    shape (N, len(out_idx), OH, OW), without building ``x[:, in_idx]`` or the weight block in memory.
    ``input_gathered=True``: x already holds the channels ``in_idx`` in that order (a chain of sparse
    convs passes compact activations), so only the weight is indexed.

``masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation)``
    ``= F.conv2d(x, weight, bias, ...) * out_mask[:, :, None, None]`` with ``out_mask`` (N, C_out) bool:
    per sample only the kept output channels are computed; the others are exactly 0.

Work is proportional to the kept channels: ``|out| * |in|`` for ``channel_conv2d``, and per sample the
number of kept output channels for ``masked_conv2d``. Both are differentiable in x, weight and bias
(gradients are full-size, zero outside the kept block), with float32 accumulation for bf16/fp16.
``groups = 1`` and zero padding only. Index sets are 1-D integer tensors without repeats, in any order;
they are checked (range and repeats) on every call unless ``check_indices=False`` (the modules check
once when their indices are set: on a GPU the check synchronises; the reference backend always checks, and the
C++ CPU kernel reads them on the host anyway). An index set longer than the channels it indexes is refused from
its shape alone.

Backends (``backend=``): ``"cpu"`` (C++: per-sample im2col of the kept channels read through the index,
one GEMM against the packed kept weight block, tiled to stay in cache), ``"triton"`` (implicit GEMM whose
loads follow the indices; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (gather, then
``F.conv2d``). ``"auto"``: the C++ kernel on CPU, Triton on CUDA.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from slimops import _backend
from slimops.reference import channel_conv as ref

__all__ = ["channel_conv2d", "masked_conv2d"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"slimops.{op}: {msg}")


def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list, torch.Size)):
        _fail(op, f"{name} must be an int or a pair of ints, got {v!r}", TypeError)
    p = (v, v) if isinstance(v, int) else tuple(v)
    if len(p) == 1:
        p = (p[0], p[0])
    if len(p) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in p):
        _fail(op, f"{name} must be an int or a pair of ints, got {v!r}", TypeError)
    if min(p) < minimum:
        _fail(op, f"{name} must be >= {minimum}, got {v!r}")
    return p


def _check_conv(op: str, x, weight, bias, stride, padding, dilation):
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        _fail(op, "x and weight must be tensors", TypeError)
    if x.dim() != 4:
        _fail(op, f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        _fail(op, f"weight must be 4-D (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOATS:
        _fail(op, f"x must be a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}", TypeError)
    if weight.dtype != x.dtype:
        _fail(op, f"weight has dtype {weight.dtype} but x has dtype {x.dtype}", TypeError)
    if weight.device != x.device:
        _fail(op, f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            _fail(op, f"bias must have shape ({weight.shape[0]},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != x.dtype:
            _fail(op, f"bias has dtype {bias.dtype} but x has dtype {x.dtype}", TypeError)
        if bias.device != x.device:
            _fail(op, f"bias is on {bias.device} but x is on {x.device}")
    s, p, d = _pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0), _pair(op, "dilation", dilation, 1)
    oh, ow = ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], s, p, d)
    if oh < 1 or ow < 1:
        _fail(op, f"the input grid {x.shape[2]}x{x.shape[3]} (padding {p}) is smaller than the dilated kernel "
                  f"{weight.shape[2]}x{weight.shape[3]} (dilation {d})")
    return s, p, d, (oh, ow)


def check_index(op: str, name: str, idx, limit: int, what: str, device: torch.device, values: bool = True) -> Tensor:
    """A 1-D integer index set on ``device`` with values in [0, limit) and no repeats, as int64."""
    if not isinstance(idx, Tensor):
        _fail(op, f"{name} must be a tensor, got {type(idx).__name__}", TypeError)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        _fail(op, f"{name} must be an integer tensor, got {idx.dtype}", TypeError)
    if idx.dim() != 1:
        _fail(op, f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.device != device:
        _fail(op, f"{name} is on {idx.device} but x is on {device}")
    if idx.numel() > limit:  # a metadata check: also for huge stride-0 views, whose values are never read
        _fail(op, f"{name} has {idx.numel()} entries but there are {limit} {what}: it holds a channel more than once")
    idx = idx.long()
    # Value checks read the data: skipped while tracing and for meta tensors (shape-only calls); the C++
    # kernel still checks on the CPU.
    if values and idx.numel() and idx.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            _fail(op, f"{name} holds {bad}, out of range for {limit} {what}")
        if torch.unique(idx).numel() != idx.numel():
            _fail(op, f"{name} holds a channel more than once")
    return idx.contiguous()


def _check_mask(op: str, out_mask, n: int, c_out: int, device):
    if not isinstance(out_mask, Tensor):
        _fail(op, f"out_mask must be a tensor, got {type(out_mask).__name__}", TypeError)
    if out_mask.dtype != torch.bool:
        _fail(op, f"out_mask must be a bool tensor, got {out_mask.dtype}", TypeError)
    if tuple(out_mask.shape) != (n, c_out):
        _fail(op, f"out_mask must have shape (N, C_out) = ({n}, {c_out}), got {tuple(out_mask.shape)}")
    if out_mask.device != device:
        _fail(op, f"out_mask is on {out_mask.device} but x is on {device}")


def _channel_args(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation, input_gathered, values=True):
    s, p, d, grid = _check_conv(op, x, weight, bias, stride, padding, dilation)
    ii = check_index(op, "in_idx", in_idx, weight.shape[1], "input channels of weight", x.device, values)
    oi = check_index(op, "out_idx", out_idx, weight.shape[0], "output channels of weight", x.device, values)
    if input_gathered and x.shape[1] != ii.numel():
        _fail(op, f"input_gathered: x has {x.shape[1]} channels but in_idx has {ii.numel()}")
    if not input_gathered and x.shape[1] != weight.shape[1]:
        _fail(op, f"x has {x.shape[1]} channels but weight has {weight.shape[1]} input channels")
    return ii, oi, s, p, d, grid


def _masked_args(op, x, weight, bias, out_mask, stride, padding, dilation):
    s, p, d, grid = _check_conv(op, x, weight, bias, stride, padding, dilation)
    if x.shape[1] != weight.shape[1]:
        _fail(op, f"x has {x.shape[1]} channels but weight has {weight.shape[1]} input channels")
    _check_mask(op, out_mask, x.shape[0], weight.shape[0], x.device)
    return s, p, d, grid


def _pick(op: str, backend: str, device: torch.device):
    return _backend.pick(op, backend, device, ref)


# ---- public ops -----------------------------------------------------------------------------------------


def channel_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_idx: Tensor, out_idx: Tensor,
                   stride=1, padding=0, dilation=1, *, input_gathered: bool = False, check_indices: bool = True,
                   backend: str = "auto") -> Tensor:
    """``F.conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx], stride, padding, dilation)``
    computed from the full-size tensors (see the module docstring). Differentiable in x, weight, bias."""
    op = "channel_conv2d"
    ii, oi, s, p, d, _ = _channel_args(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation,
                                       input_gathered, check_indices)
    b, fn = _pick(op, backend, x.device)
    if b == "reference" and not check_indices:
        # The reference gathers by indexing, which fails on a bad index without naming the op (on a GPU: a
        # device-side assert): it checks the values whatever check_indices says (it synchronises anyway).
        _channel_args(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation, input_gathered, True)
    return fn(x, weight, bias, ii, oi, list(s), list(p), list(d), bool(input_gathered))


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor, stride=1, padding=0,
                  dilation=1, *, backend: str = "auto") -> Tensor:
    """``F.conv2d(x, weight, bias, ...) * out_mask[:, :, None, None]``, computing per sample only the kept
    output channels (``out_mask`` (N, C_out) bool). Differentiable in x, weight and bias."""
    op = "masked_conv2d"
    s, p, d, _ = _masked_args(op, x, weight, bias, out_mask, stride, padding, dilation)
    _, fn = _pick(op, backend, x.device)
    return fn(x, weight, bias, out_mask, list(s), list(p), list(d))


# ---- fake kernels ---------------------------------------------------------------------------------------


def _grad_like(t: Tensor, need: bool) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)


def _channel_conv2d_fake(x, weight, bias, in_idx, out_idx, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         input_gathered=False):
    _, _, _, _, _, (oh, ow) = _channel_args("channel_conv2d", x, weight, bias, in_idx, out_idx, stride, padding,
                                            dilation, input_gathered, values=False)
    return x.new_empty((x.shape[0], out_idx.shape[0], oh, ow))


def _channel_conv2d_backward_fake(grad_out, x, weight, in_idx, out_idx, stride, padding, dilation, input_gathered,
                                  output_mask):
    _channel_args("channel_conv2d_backward", x, weight, None, in_idx, out_idx, stride, padding, dilation,
                  input_gathered, values=False)
    return (_grad_like(x, output_mask[0]), _grad_like(weight, output_mask[1]),
            weight.new_empty(weight.shape[0] if output_mask[2] else 0))


def _masked_conv2d_fake(x, weight, bias, out_mask, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    _, _, _, (oh, ow) = _masked_args("masked_conv2d", x, weight, bias, out_mask, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


def _masked_conv2d_backward_fake(grad_out, x, weight, out_mask, stride, padding, dilation, output_mask):
    _masked_args("masked_conv2d_backward", x, weight, None, out_mask, stride, padding, dilation)
    return (_grad_like(x, output_mask[0]), _grad_like(weight, output_mask[1]),
            weight.new_empty(weight.shape[0] if output_mask[2] else 0))


# ---- autograd: the backward is the family's own backward op, of the same backend ------------------------


def _channel_setup(ctx, inputs, output):
    x, weight, bias, in_idx, out_idx, stride, padding, dilation, input_gathered = inputs
    ctx.save_for_backward(x, weight, in_idx, out_idx)
    ctx.args = (stride, padding, dilation, input_gathered)
    ctx.has_bias = bias is not None


def _masked_setup(ctx, inputs, output):
    x, weight, bias, out_mask, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, out_mask)
    ctx.args = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _mask_of(ctx):
    need = ctx.needs_input_grad
    return [bool(need[0]), bool(need[1]), bool(need[2] and ctx.has_bias)]


def _make_channel_backward(backward_op):
    def _backward(ctx, grad):
        x, weight, in_idx, out_idx = ctx.saved_tensors
        stride, padding, dilation, gathered = ctx.args
        m = _mask_of(ctx)
        gx, gw, gb = backward_op(grad.contiguous(), x, weight, in_idx, out_idx, stride, padding, dilation, gathered, m)
        return (gx if m[0] else None, gw if m[1] else None, gb if m[2] else None) + (None,) * 6

    return _backward


def _make_masked_backward(backward_op):
    def _backward(ctx, grad):
        x, weight, out_mask = ctx.saved_tensors
        stride, padding, dilation = ctx.args
        m = _mask_of(ctx)
        gx, gw, gb = backward_op(grad.contiguous(), x, weight, out_mask, stride, padding, dilation, m)
        return (gx if m[0] else None, gw if m[1] else None, gb if m[2] else None) + (None,) * 4

    return _backward


def _register(ns: str):
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(f"{ns}::channel_conv2d", _make_channel_backward(ops.channel_conv2d_backward),
                                    setup_context=_channel_setup)
    torch.library.register_autograd(f"{ns}::masked_conv2d", _make_masked_backward(ops.masked_conv2d_backward),
                                    setup_context=_masked_setup)


for _name, _fake in (("channel_conv2d", _channel_conv2d_fake), ("channel_conv2d_backward", _channel_conv2d_backward_fake),
                     ("masked_conv2d", _masked_conv2d_fake), ("masked_conv2d_backward", _masked_conv2d_backward_fake)):
    torch.library.register_fake(f"slimops::{_name}")(_fake)
_register("slimops")


def register_triton_autograd():
    """Called by ``slimops.triton.channel_conv`` once its custom ops exist: they are differentiable too."""
    _register("slimops_triton")
