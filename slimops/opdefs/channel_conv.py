"""The ``channel_conv`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend
shares, the fake kernels and the autograd of ``channel_conv2d`` and ``masked_conv2d``. The maths and the public
functions: :mod:`slimops.ops.channel_conv`."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.reference import channel_conv as ref

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


def channel_args(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation, input_gathered, values=True):
    s, p, d, grid = _check_conv(op, x, weight, bias, stride, padding, dilation)
    ii = check_index(op, "in_idx", in_idx, weight.shape[1], "input channels of weight", x.device, values)
    oi = check_index(op, "out_idx", out_idx, weight.shape[0], "output channels of weight", x.device, values)
    if input_gathered and x.shape[1] != ii.numel():
        _fail(op, f"input_gathered: x has {x.shape[1]} channels but in_idx has {ii.numel()}")
    if not input_gathered and x.shape[1] != weight.shape[1]:
        _fail(op, f"x has {x.shape[1]} channels but weight has {weight.shape[1]} input channels")
    return ii, oi, s, p, d, grid


def masked_args(op, x, weight, bias, out_mask, stride, padding, dilation):
    s, p, d, grid = _check_conv(op, x, weight, bias, stride, padding, dilation)
    if x.shape[1] != weight.shape[1]:
        _fail(op, f"x has {x.shape[1]} channels but weight has {weight.shape[1]} input channels")
    _check_mask(op, out_mask, x.shape[0], weight.shape[0], x.device)
    return s, p, d, grid


# ---- fake kernels ---------------------------------------------------------------------------------------


def _grad_like(t: Tensor, need: bool) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)


def _channel_conv2d_fake(x, weight, bias, in_idx, out_idx, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         input_gathered=False):
    _, _, _, _, _, (oh, ow) = channel_args("channel_conv2d", x, weight, bias, in_idx, out_idx, stride, padding,
                                            dilation, input_gathered, values=False)
    return x.new_empty((x.shape[0], out_idx.shape[0], oh, ow))


def _channel_conv2d_backward_fake(grad_out, x, weight, in_idx, out_idx, stride, padding, dilation, input_gathered,
                                  output_mask):
    channel_args("channel_conv2d_backward", x, weight, None, in_idx, out_idx, stride, padding, dilation,
                  input_gathered, values=False)
    return (_grad_like(x, output_mask[0]), _grad_like(weight, output_mask[1]),
            weight.new_empty(weight.shape[0] if output_mask[2] else 0))


def _masked_conv2d_fake(x, weight, bias, out_mask, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    _, _, _, (oh, ow) = masked_args("masked_conv2d", x, weight, bias, out_mask, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


def _masked_conv2d_backward_fake(grad_out, x, weight, out_mask, stride, padding, dilation, output_mask):
    masked_args("masked_conv2d_backward", x, weight, None, out_mask, stride, padding, dilation)
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


DEFS = (
    OpDef("channel_conv2d", _channel_conv2d_fake, _channel_setup, _make_channel_backward),
    OpDef("channel_conv2d_backward", _channel_conv2d_backward_fake),
    OpDef("masked_conv2d", _masked_conv2d_fake, _masked_setup, _make_masked_backward),
    OpDef("masked_conv2d_backward", _masked_conv2d_backward_fake),
)

wire(DEFS, "slimops")
