"""The ``quant`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend shares (the
C++ ones of csrc/include/slimops/quant_checks.h, with their messages), the fake kernels, and the autograd of
``fda_sign`` and ``fake_quantize``. The maths and the public functions: :mod:`slimops.ops.quant`."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.opdefs._checks import check_float_tensor, fail, real
from slimops.reference.quant import SURROGATES, levels

__all__ = ["DEFS", "SURROGATES", "MAX_TERMS", "MAX_BITS", "check_fda_sign", "check_fake_quantize", "check_grad",
           "levels"]

MAX_TERMS = 10_000  # more cosine terms than any schedule uses (the paper's: 10 to 19)
MAX_BITS = 16


def _int(op: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        fail(op, f"{name} must be an int, got {v!r}", TypeError)
    return int(v)


def check_grad(op: str, grad, x: Tensor):
    """``grad`` of a backward op: a float tensor of x's shape on x's device (its dtype may differ)."""
    check_float_tensor(op, "grad", grad)
    if grad.device != x.device:
        fail(op, f"grad is on {grad.device} but x is on {x.device}")
    if grad.shape != x.shape:
        fail(op, f"grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")


def check_fda_sign(op: str, x, n_terms, omega, surrogate, clip) -> Tuple[int, float, float]:
    """Validates the arguments of ``fda_sign`` (shared with its backward, the fakes and the Triton launchers);
    returns (n_terms, omega, clip)."""
    check_float_tensor(op, "x", x)
    n = _int(op, "n_terms", n_terms)
    if not 1 <= n <= MAX_TERMS:
        fail(op, f"n_terms must be in [1, {MAX_TERMS}], got {n}")
    w = real(op, "omega", omega)
    if not (math.isfinite(w) and w > 0):
        fail(op, f"omega must be finite and > 0, got {w}")
    if not isinstance(surrogate, str) or surrogate not in SURROGATES:
        fail(op, f"unknown surrogate {surrogate!r} (expected one of: {', '.join(SURROGATES)})")
    c = real(op, "clip", clip)
    if not c > 0:  # +inf: no clipping
        fail(op, f"clip must be > 0 (inf for none), got {c}")
    return n, w, c


def check_fake_quantize(op: str, x, scale, zero_point, bits, per_channel_axis, signed, grad_factor) \
        -> Tuple[Optional[int], int]:
    """Validates the arguments of ``fake_quantize`` (shared with its backward, the fakes and the Triton launchers);
    returns (the per-channel axis in [0, x.dim()) or None, the number of scales)."""
    check_float_tensor(op, "x", x)
    b = _int(op, "bits", bits)
    if not 1 <= b <= MAX_BITS:
        fail(op, f"bits must be in [1, {MAX_BITS}], got {b}")
    if not isinstance(signed, bool):
        fail(op, f"signed must be a bool, got {signed!r}", TypeError)
    gf = real(op, "grad_factor", grad_factor)
    if not math.isfinite(gf):
        fail(op, f"grad_factor must be finite, got {gf}")
    axis = None
    if per_channel_axis is not None:
        a = _int(op, "per_channel_axis", per_channel_axis)
        if not -x.dim() <= a < x.dim():
            fail(op, f"per_channel_axis {a} is out of range for x of {x.dim()} dims")
        axis = a % x.dim()
    n_scales = 1 if axis is None else x.shape[axis]
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None and name == "zero_point":
            continue
        check_float_tensor(op, name, t)
        if t.device != x.device:
            fail(op, f"{name} is on {t.device} but x is on {x.device}")
        if axis is None and t.numel() != 1:
            fail(op, f"{name} must hold one value per tensor (per_channel_axis=None), got shape {tuple(t.shape)}")
        if axis is not None and (t.dim() != 1 or t.shape[0] != n_scales):
            fail(op, f"{name} must have shape ({n_scales},): one value per slice of x along per_channel_axis "
                     f"{axis}, got {tuple(t.shape)}")
    if zero_point is not None and signed and b == 1:
        fail(op, "zero_point must be None for the signed 1-bit grid {-1, +1}")
    return axis, n_scales


# ---- fake kernels ---------------------------------------------------------------------------------------------


def _fda_fake(x, n_terms=10, omega=0.1, surrogate="fda", clip=1.0):
    check_fda_sign("fda_sign", x, n_terms, omega, surrogate, clip)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fda_backward_fake(grad, x, n_terms, omega, surrogate, clip):
    op = "fda_sign_backward"
    check_fda_sign(op, x, n_terms, omega, surrogate, clip)
    check_grad(op, grad, x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fq_fake(x, scale, zero_point=None, bits=8, per_channel_axis=None, signed=True, grad_factor=1.0):
    check_fake_quantize("fake_quantize", x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fq_backward_fake(grad, x, scale, zero_point, bits, per_channel_axis, signed, grad_factor, output_mask):
    op = "fake_quantize_backward"
    check_fake_quantize(op, x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)
    check_grad(op, grad, x)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty(0)
    gs = torch.empty_like(scale, memory_format=torch.contiguous_format) if output_mask[1] else scale.new_empty(0)
    if zero_point is not None and output_mask[2]:
        gz = torch.empty_like(zero_point, memory_format=torch.contiguous_format)
    else:
        gz = (scale if zero_point is None else zero_point).new_empty(0)
    return gx, gs, gz


# ---- autograd: the backward is the family's own backward op, of the same backend ---------------------------------


def _fda_setup(ctx, inputs, output):
    x, *args = inputs
    ctx.save_for_backward(x)
    ctx.args = args


def _fda_make_backward(backward_op):
    def _backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = backward_op(grad.contiguous(), x, *ctx.args) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None

    return _backward


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, *args = inputs
    ctx.has_zero_point = zero_point is not None
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = args


def _fq_make_backward(backward_op):
    def _backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        if not ctx.has_zero_point:
            zero_point = None
        m = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bool(ctx.has_zero_point and ctx.needs_input_grad[2])]
        gx, gs, gz = backward_op(grad.contiguous(), x, scale, zero_point, *ctx.args, m)
        return gx if m[0] else None, gs if m[1] else None, gz if m[2] else None, None, None, None, None

    return _backward


DEFS = (
    OpDef("fda_sign", _fda_fake, _fda_setup, _fda_make_backward),
    OpDef("fda_sign_backward", _fda_backward_fake),
    OpDef("fake_quantize", _fq_fake, _fq_setup, _fq_make_backward),
    OpDef("fake_quantize_backward", _fq_backward_fake),
)

wire(DEFS, "slimops")
