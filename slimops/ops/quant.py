"""Binarisation and fake quantisation: the ``quant`` op family (docs/algorithms.md §9).

``fda_sign(x, *, n_terms=10, omega=0.1, surrogate="fda", clip=1.0)``
    Forward ``sign(x)`` with ``sign(0) = -1``. The backward is a surrogate gradient, zero where ``|x| > clip``:
    ``"fda"`` — the frequency-domain approximation of binary nets (FDA, Xu et al. 2021): the derivative of the
    sign's Fourier series truncated to ``n_terms`` terms,
    ``grad · (4ω/π) Σ_{i<n_terms} cos((2i+1)ωx) = grad · (4ω/π) sin(2·n_terms·ωx) / (2 sin ωx)``
    (closed form, stable at its removable singularities); ``"ste"`` — straight-through; ``"tanh"`` —
    ``1 - tanh²(x)``; ``"approx_sign"`` — Bi-Real Net's ``max(0, 2 - 2|x|)``. The FDA paper's schedule (its
    code): ω = 0.1, clip 1, n_terms growing from 10 to 19 over training (:mod:`slimops.quant`).

``fake_quantize(x, scale, zero_point=None, *, bits=8, per_channel_axis=None, signed=True, grad_factor=1.0)``
    ``(clamp(round(x/s) + z, Qn, Qp) - z) · s`` with ``z = clamp(round(zero_point), Qn, Qp)``; one scale (and
    zero point) per tensor, or one per slice of x along ``per_channel_axis`` (weights: per output channel).
    Levels: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned; signed 1 bit is ``{-s, +s}``. The
    forward equals ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` (round half to even).
    Differentiable in x (straight-through inside the grid), scale and zero point (LSQ, Esser et al. 2020, and
    LSQ+, Bhalgat et al. 2020), their gradients multiplied by ``grad_factor`` (LSQ's ``1/sqrt(n·Qp)``); one
    fused pass forward and one backward, where torch's learnable fake-quantise composite makes several. The
    exact formulas: :mod:`slimops.reference.quant`. ``scale`` must be positive (not checked: that would
    synchronise a GPU; the modules keep it above a floor).

float32/bfloat16/float16 inputs are computed in float32, float64 in float64; outputs have the dtype of x,
gradients of scale / zero point their dtypes. ``scale`` and ``zero_point`` may have another float dtype than x.

Backends (``backend=``):

- ``"cpu"``: C++, one parallel pass (per-channel scales read once; the scale / zero-point gradient summed over
  fixed blocks in double, independent of the thread count);
- ``"cuda"``: CUDA C++ kernels for ``fda_sign`` (an elementwise op: one launch, no Python);
- ``"triton"``: elementwise kernels for ``fda_sign``; for ``fake_quantize`` a forward kernel and a backward that
  writes per-block partial sums of the scale / zero-point gradient (no atomics: deterministic);
- ``"reference"``: :mod:`slimops.reference.quant`;
- ``"auto"``: the C++ kernel on CPU; on CUDA the CUDA kernel for ``fda_sign`` and Triton for ``fake_quantize``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from slimops import _backend
from slimops.opdefs.quant import SURROGATES, check_fake_quantize, check_fda_sign, levels  # registers fakes, autograd
from slimops.reference import quant as ref

__all__ = ["fda_sign", "fake_quantize", "levels", "lsq_grad_factor", "SURROGATES"]


def fda_sign(x: Tensor, *, n_terms: int = 10, omega: float = 0.1, surrogate: str = "fda", clip: float = 1.0,
             backend: str = "auto") -> Tensor:
    """``sign(x)`` (0 ↦ -1) with the surrogate gradient ``surrogate`` (module docstring)."""
    op = "fda_sign"
    n, w, c = check_fda_sign(op, x, n_terms, omega, surrogate, clip)
    _, fn = _backend.pick(op, backend, x.device, ref)
    return fn(x, n, w, surrogate, c)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, *, bits: int = 8,
                  per_channel_axis: Optional[int] = None, signed: bool = True, grad_factor: float = 1.0,
                  backend: str = "auto") -> Tensor:
    """Uniform fake quantisation with LSQ gradients (module docstring)."""
    op = "fake_quantize"
    axis, _ = check_fake_quantize(op, x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)
    _, fn = _backend.pick(op, backend, x.device, ref)
    return fn(x, scale, zero_point, int(bits), axis, signed, float(grad_factor))


def lsq_grad_factor(numel_per_scale: int, bits: int, signed: bool = True) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel_per_scale · Qp)`` (Esser et al. 2020, §2.2): keeps the scale's update
    in proportion to the weights' whatever the layer size and bit width."""
    qp = levels(int(bits), bool(signed))[1]
    return float((max(1, int(numel_per_scale)) * max(1, qp)) ** -0.5)
