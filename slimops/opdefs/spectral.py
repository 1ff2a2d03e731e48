"""The ``spectral`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend shares,
the fake kernels, and the autograd of ``spectral_filter`` and ``adaptive_spectral_filter``. The maths and the
public functions: :mod:`slimops.ops.spectral`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.opdefs._checks import FLOATS as _FLOATS, fail as _fail

__all__ = ["DEFS", "MAX_FUSED_GRID", "check_spectral_filter", "check_adaptive", "check_grad"]

# The largest H and W of the fused dense-DFT kernels (Triton; the C++ CPU kernel's DFT-GEMM path). Beyond it
# a dense DFT costs O(H + W) per element against the FFT's O(log HW), so the FFT paths take over.
MAX_FUSED_GRID = 64


def _check_float(op: str, name: str, t, device: Optional[torch.device] = None):
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if t.is_complex():
        _fail(op, f"{name} must be real (for a complex filter pass torch.view_as_real(filter)), got {t.dtype}",
              TypeError)
    if t.dtype not in _FLOATS:
        _fail(op, f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got {t.dtype}",
              TypeError)
    if t.layout != torch.strided:
        _fail(op, f"{name} must be a strided (dense) tensor")
    if device is not None and t.device != device:
        _fail(op, f"{name} is on {t.device} but x is on {device}")


def _check_x(op: str, x) -> tuple:
    _check_float(op, "x", x)
    if x.dim() != 4:
        _fail(op, f"x must be 4-D (B, H, W, C), channels last, got shape {tuple(x.shape)}")
    b, h, w, c = x.shape
    if min(h, w, c) < 1:
        _fail(op, f"x must have H, W, C >= 1, got shape {tuple(x.shape)}")
    return b, h, w, c


def _check_shape(op: str, name: str, t: Tensor, want: Sequence[int], what: str):
    if tuple(t.shape) != tuple(want):
        _fail(op, f"{name} must have shape {what} = {tuple(want)}, got {tuple(t.shape)}")


def check_spectral_filter(op: str, x, weight):
    """Validates the arguments of ``spectral_filter`` (shared with its backward, the fake kernels and the
    Triton launchers, so that every backend fails the same way)."""
    _, h, w, c = _check_x(op, x)
    _check_float(op, "weight", weight, x.device)
    if weight.dim() == 4 and weight.shape[3] == 2 and weight.shape[2] != c:
        _fail(op, f"weight has {weight.shape[2]} channels but x has {c}")
    _check_shape(op, "weight", weight, (h, w // 2 + 1, c, 2), "(H, W//2+1, C, 2)")


def check_adaptive(op: str, x, w1, b1, w2, b2, blocks, shrink):
    """Validates the arguments of ``adaptive_spectral_filter`` (see :func:`check_spectral_filter`)."""
    _, _, _, c = _check_x(op, x)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        _fail(op, f"blocks must be a positive int, got {blocks!r}")
    if c % blocks:
        _fail(op, f"blocks ({blocks}) must divide the channels of x ({c})")
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not (math.isfinite(shrink) and shrink >= 0):
        _fail(op, f"shrink must be a finite float >= 0, got {shrink!r}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _check_float(op, name, t, x.device)
    cb = c // blocks
    if w1.dim() != 4:
        _fail(op, f"w1 must be 4-D (2, blocks, C/blocks, hidden/blocks), got shape {tuple(w1.shape)}")
    if w1.shape[1] != blocks:
        _fail(op, f"w1 has {w1.shape[1]} blocks but blocks={blocks}")
    if w1.shape[2] != cb:
        _fail(op, f"w1 has {w1.shape[2]} channels per block but x has {c} channels in {blocks} blocks ({cb} each)")
    hb = w1.shape[3]
    if hb < 1:
        _fail(op, "w1 must have a hidden size >= 1")
    _check_shape(op, "w1", w1, (2, blocks, cb, hb), "(2, blocks, C/blocks, hidden/blocks)")
    _check_shape(op, "b1", b1, (2, blocks, hb), "(2, blocks, hidden/blocks)")
    _check_shape(op, "w2", w2, (2, blocks, hb, cb), "(2, blocks, hidden/blocks, C/blocks)")
    _check_shape(op, "b2", b2, (2, blocks, cb), "(2, blocks, C/blocks)")


def check_grad(op: str, grad, x: Tensor):
    _check_float(op, "grad", grad, x.device)
    if grad.shape != x.shape:
        _fail(op, f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")


# ---- fake kernels ---------------------------------------------------------------------------------------


def _grad_like(t: Tensor, need: bool) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)


def _spectral_filter_fake(x, weight):
    check_spectral_filter("spectral_filter", x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _spectral_filter_backward_fake(grad, x, weight, output_mask):
    op = "spectral_filter_backward"
    check_spectral_filter(op, x, weight)
    check_grad(op, grad, x)
    return _grad_like(x, output_mask[0]), _grad_like(weight, output_mask[1])


def _adaptive_fake(x, w1, b1, w2, b2, blocks, shrink):
    check_adaptive("adaptive_spectral_filter", x, w1, b1, w2, b2, blocks, shrink)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _adaptive_backward_fake(grad, x, w1, b1, w2, b2, blocks, shrink, output_mask):
    op = "adaptive_spectral_filter_backward"
    check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink)
    check_grad(op, grad, x)
    return tuple(_grad_like(t, m) for t, m in zip((x, w1, b1, w2, b2), output_mask))


# ---- autograd: the backward is the family's own backward op, of the same backend ------------------------


def _filter_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _adaptive_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, blocks, shrink = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)
    ctx.args = (blocks, shrink)


def _make_filter_backward(backward_op):
    def _backward(ctx, grad):
        x, weight = ctx.saved_tensors
        m = [bool(v) for v in ctx.needs_input_grad[:2]]
        gx, gw = backward_op(grad.contiguous(), x, weight, m)
        return gx if m[0] else None, gw if m[1] else None

    return _backward


def _make_adaptive_backward(backward_op):
    def _backward(ctx, grad):
        saved = ctx.saved_tensors
        m = [bool(v) for v in ctx.needs_input_grad[:5]]
        grads = backward_op(grad.contiguous(), *saved, *ctx.args, m)
        return tuple(g if need else None for g, need in zip(grads, m)) + (None, None)

    return _backward


DEFS = (
    OpDef("spectral_filter", _spectral_filter_fake, _filter_setup, _make_filter_backward),
    OpDef("spectral_filter_backward", _spectral_filter_backward_fake),
    OpDef("adaptive_spectral_filter", _adaptive_fake, _adaptive_setup, _make_adaptive_backward),
    OpDef("adaptive_spectral_filter_backward", _adaptive_backward_fake),
)

wire(DEFS, "slimops")
