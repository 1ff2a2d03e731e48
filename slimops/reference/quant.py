"""Readable pure-PyTorch twin of the ``quant`` family (binarisation and fake quantisation): the test oracle, the
fallback backend and the benchmarks' composite baseline. Mirrors ``torch.ops.slimops``'s ``fda_sign``,
``fda_sign_backward``, ``fake_quantize`` and ``fake_quantize_backward`` (schemas in ``csrc/registration.cpp``).
docs/algorithms.md §9.

``fda_sign(x, n_terms, omega, surrogate, clip)``
    Forward ``sign(x)`` with ``sign(0) = -1`` (a binary net has no zero level). The backward is a surrogate
    gradient chosen by ``surrogate``, zero where ``|x| > clip`` (the paper's code clips at 1):

    - ``"fda"`` (Xu et al. 2021, frequency-domain approximation): the derivative of the sign's Fourier series
      truncated to ``n_terms`` sine terms, ``sign(x) ≈ (4/π) Σ_{i<n_terms} sin((2i+1)ωx)/(2i+1)``::

          grad_x = grad · (4ω/π) · Σ_{i=0}^{n_terms-1} cos((2i+1)ωx)

      (the paper's ``Σ_{i=0}^{n}`` with ``n = n_terms - 1``; its code: ω = 0.1, n from 9 to 18 over training).
      The kernels use the closed form ``Σ cos((2i+1)u) = sin(2·n_terms·u) / (2 sin u)`` after reducing
      ``u = kπ + δ`` (``(-1)^k`` times the value at δ), with the limit ``n_terms`` at δ = 0;
    - ``"ste"``: the straight-through estimator, ``grad`` itself (Hubara et al. 2016);
    - ``"tanh"``: ``grad · (1 - tanh²(x))``;
    - ``"approx_sign"``: ApproxSign of Bi-Real Net (Liu et al. 2018), ``grad · max(0, 2 - 2|x|)``.

``fake_quantize(x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)``
    Uniform affine fake quantisation with the LSQ / LSQ+ gradients (Esser et al. 2020; Bhalgat et al. 2020).
    Levels ``[Qn, Qp]``: ``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]`` unsigned; ``bits = 1`` signed is
    the binary grid ``{-1, +1}`` (``q = +1`` where ``x/s > 0``, else ``-1``; no zero point). With
    ``v = x · (1/s)`` and ``z = clamp(round(zero_point), Qn, Qp)`` (0 without a zero point)::

        q = clamp(round(v) + z, Qn, Qp)          round half to even, as torch.fake_quantize_per_*_affine
        y = (q - z) · s

    ``scale`` (and ``zero_point``) hold one value (per tensor) or one per slice of ``x`` along
    ``per_channel_axis``. Gradients (LSQ eq. 3, STE through both roundings; ``in`` = ``Qn <= v + z <= Qp``)::

        grad_x = grad · in
        grad_s = grad_factor · Σ grad · (in ? (q - z) - v : q - z)      summed over each scale's slice
        grad_z = grad_factor · Σ grad · (in ? 0 : -s)

    ``grad_factor``: LSQ's gradient scale ``1/sqrt(numel_per_scale · Qp)`` (the modules pass it; 1 = plain).
    The ``in`` test is on the unrounded ``v + z`` (the paper); torch's learnable fake-quantise tests the rounded
    value, which differs only for ``v + z`` within half a step outside ``[Qn, Qp]``.

Precision: float16/bfloat16/float32 inputs are computed in float32, float64 in float64; outputs have the dtype
of ``x`` (``grad_x``) or of ``scale`` / ``zero_point`` (their gradients).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from slimops.reference._common import compute_dtype

__all__ = ["fda_sign", "fda_sign_backward", "fda_series", "fake_quantize", "fake_quantize_backward", "levels",
           "quant_levels", "SURROGATES"]

SURROGATES = ("fda", "ste", "tanh", "approx_sign")


# ---- fda_sign -----------------------------------------------------------------------------------------------------


def _sign(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype).where(~x.isnan(), x)


class _FdaSign(torch.autograd.Function):
    """sign forward, the surrogate backward (autograd of sign itself would give zero)."""

    @staticmethod
    def forward(ctx, x, n_terms, omega, surrogate, clip):
        ctx.save_for_backward(x)
        ctx.args = (n_terms, omega, surrogate, clip)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return fda_sign_backward(grad, x, *ctx.args), None, None, None, None


def fda_sign(x: Tensor, n_terms: int = 10, omega: float = 0.1, surrogate: str = "fda", clip: float = 1.0) -> Tensor:
    """``sign(x)`` with ``sign(0) = -1``, in the dtype of x (NaN stays NaN); differentiable with the surrogate
    gradient :func:`fda_sign_backward`."""
    return _FdaSign.apply(x, n_terms, omega, surrogate, clip)


def fda_series(x: Tensor, n_terms: int, omega: float) -> Tensor:
    """The truncated Fourier series of the sign, ``(4/π) Σ_{i<n_terms} sin((2i+1)ωx)/(2i+1)``: the smooth function
    whose derivative is the ``"fda"`` surrogate (tests differentiate it with autograd)."""
    return sum(torch.sin((2 * i + 1) * omega * x) / (2 * i + 1) for i in range(n_terms)) * (4.0 / math.pi)


def _surrogate_derivative(x: Tensor, n_terms: int, omega: float, surrogate: str) -> Tensor:
    if surrogate == "fda":
        u = omega * x
        return sum(torch.cos((2 * i + 1) * u) for i in range(n_terms)) * (4.0 * omega / math.pi)
    if surrogate == "ste":
        return torch.ones_like(x)
    if surrogate == "tanh":
        return 1.0 - torch.tanh(x) ** 2
    if surrogate == "approx_sign":
        return (2.0 - 2.0 * x.abs()).clamp_min(0.0)
    raise ValueError(f"slimops.fda_sign: unknown surrogate '{surrogate}' (expected one of: {', '.join(SURROGATES)})")


def fda_sign_backward(grad: Tensor, x: Tensor, n_terms: int, omega: float, surrogate: str, clip: float) -> Tensor:
    """The surrogate gradient of ``fda_sign`` (module docstring), in the dtype of x."""
    dt = compute_dtype(x)
    xs = x.to(dt)
    d = _surrogate_derivative(xs, n_terms, omega, surrogate)
    d = torch.where(xs.abs() <= clip, d, torch.zeros((), dtype=dt))
    d = torch.where(xs.isnan(), xs, d)  # NaN in, NaN out (the comparison above would drop it)
    return (grad.to(dt) * d).to(x.dtype)


# ---- fake_quantize -------------------------------------------------------------------------------------------------


def levels(bits: int, signed: bool) -> Tuple[int, int]:
    """(Qn, Qp): the integer range of a ``bits``-bit grid; the signed 1-bit grid is {-1, +1}."""
    if signed:
        return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return 0, 2 ** bits - 1


def _per_slice(t: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """``scale`` / ``zero_point`` broadcast against x: one value, or one per slice along ``axis``."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def _quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int, axis: Optional[int],
              signed: bool):
    """(v, z, q, in) in the compute dtype."""
    dt = compute_dtype(x)
    qn, qp = levels(bits, signed)
    xs = x.to(dt)
    s = _per_slice(scale.to(dt), x, axis)
    v = xs * (1.0 / s)
    if zero_point is None:
        z = torch.zeros((), dtype=dt)
    else:
        z = _per_slice(torch.round(zero_point.to(dt)).clamp(qn, qp), x, axis)
    if signed and bits == 1:
        q = torch.where(v > 0, 1.0, -1.0).to(dt)
    else:
        q = (torch.round(v) + z).clamp(qn, qp)
    inside = (v + z >= qn) & (v + z <= qp)
    q = torch.where(v.isnan(), v, q)  # NaN in, NaN out (clamp and where would hide it)
    return s, v, z, q, inside


def quant_levels(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, bits: int = 8,
                 per_channel_axis: Optional[int] = None, signed: bool = True) -> Tensor:
    """The integer levels ``q = clamp(round(x/s) + z, Qn, Qp)`` (±1 on the signed 1-bit grid) that ``fake_quantize``
    maps back to ``(q - z)·s``, in the compute dtype (what an export packs)."""
    return _quantize(x, scale, zero_point, bits, per_channel_axis, signed)[3]


def _fake_quantize(x, scale, zero_point, bits, axis, signed):
    s, v, z, q, _ = _quantize(x, scale, zero_point, bits, axis, signed)
    return ((q - z) * s).to(x.dtype)


class _FakeQuantize(torch.autograd.Function):
    """The quantiser forward, the LSQ backward :func:`fake_quantize_backward`."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, axis, signed, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.has_zero_point = zero_point is not None
        ctx.args = (bits, axis, signed, grad_factor)
        return _fake_quantize(x, scale, zero_point, bits, axis, signed)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_zero_point and ctx.needs_input_grad[2]]
        gx, gs, gz = fake_quantize_backward(grad, x, scale, zero_point if ctx.has_zero_point else None, *ctx.args,
                                            mask)
        return (gx if mask[0] else None, gs if mask[1] else None, gz if mask[2] else None, None, None, None, None)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, bits: int = 8,
                  per_channel_axis: Optional[int] = None, signed: bool = True, grad_factor: float = 1.0) -> Tensor:
    """``(clamp(round(x/s) + z, Qn, Qp) - z) · s`` in the dtype of x (module docstring); differentiable in x,
    scale and zero_point with the LSQ gradients of :func:`fake_quantize_backward`."""
    return _FakeQuantize.apply(x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)


def _reduce_to(t: Tensor, like: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Sums ``t`` (x's shape) over every dim but ``axis`` (all of them per tensor), shaped and typed like ``like``."""
    if axis is None:
        r = t.sum()
    else:
        ax = axis % x.dim()
        r = t.sum(dim=[d for d in range(x.dim()) if d != ax]) if x.dim() > 1 else t
    return r.reshape(like.shape).to(like.dtype)


def fake_quantize_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int,
                           per_channel_axis: Optional[int], signed: bool, grad_factor: float,
                           output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_scale, grad_zero_point) of ``fake_quantize`` (LSQ; module docstring); an entry not asked
    for in ``output_mask`` (or grad_zero_point without a zero point) is an empty tensor."""
    s, v, z, q, inside = _quantize(x, scale, zero_point, bits, per_channel_axis, signed)
    g = grad.to(s.dtype)
    gx = torch.where(inside, g, torch.zeros((), dtype=g.dtype)).to(x.dtype) if output_mask[0] else x.new_empty(0)
    if output_mask[1]:
        ds = g * torch.where(inside, (q - z) - v, q - z) * grad_factor
        gs = _reduce_to(ds, scale, x, per_channel_axis)
    else:
        gs = scale.new_empty(0)
    if output_mask[2] and zero_point is not None:
        dz = g * torch.where(inside, torch.zeros((), dtype=g.dtype), -s) * grad_factor
        gz = _reduce_to(dz, zero_point, x, per_channel_axis)
    else:
        gz = scale.new_empty(0) if zero_point is None else zero_point.new_empty(0)
    return gx, gs, gz
