"""Readable pure-PyTorch twins of the ``spectral`` family (Fourier-domain filtering): the test oracle and
the fallback backend. Each function mirrors the ``torch.ops.slimops`` op of the same name (schemas in
``csrc/registration.cpp``). docs/algorithms.md §7.

Layout: tokens are channels-last, ``x`` (B, H, W, C) real; spectra are the half spectrum
``rfft2(x, dim=(1, 2), norm="ortho")`` of shape (B, H, W//2+1, C).

``spectral_filter(x, weight)`` — GFNet's global filter (Rao et al., NeurIPS 2021)::

    y = irfft2(rfft2(x) * view_as_complex(weight), s=(H, W))          weight (H, W//2+1, C, 2)

``adaptive_spectral_filter(x, w1, b1, w2, b2, blocks, shrink)`` — the adaptive frequency filter of AFFNet
(Huang et al., 2023) and AFIDAF: the filter is computed from the spectrum itself by a complex
block-diagonal two-layer channel MLP, shared by every frequency (AFNO's weight layout, Guibas et al. 2022;
index 0 of the first axis is the real part, 1 the imaginary part; k = ``blocks``, Cb = C/k, Hb = hidden/k)::

    X  = rfft2(x)                                  per block b, X_b (..., Cb) complex
    O1 = relu(Re(X_b W1_b) + b1_b[0]) + i relu(Im(X_b W1_b) + b1_b[1])   W1_b = w1[0,b] + i w1[1,b]  (Cb, Hb)
    O2 = O1 W2_b + (b2_b[0] + i b2_b[1])                                  W2_b = w2[0,b] + i w2[1,b]  (Hb, Cb)
    M  = softshrink(Re O2, shrink) + i softshrink(Im O2, shrink)
    y  = irfft2(M * X, s=(H, W)) + x

    w1 (2, k, Cb, Hb), b1 (2, k, Hb), w2 (2, k, Hb, Cb), b2 (2, k, Cb)

(ReLU acts on the real and imaginary parts separately, as in AFNO/AFFNet's code.) ``rfft2``/``irfft2`` are
orthonormal (``norm="ortho"``) over dims (1, 2). ``irfft2`` takes the half spectrum as torch's does: the
imaginary parts of the ``k_w = 0`` (and, for even W, ``k_w = W/2``) columns count only through the
H-transform, i.e. ``y = Re sum_k alpha_{k_w} Z[k] e^{+i theta_k} / sqrt(HW)`` with ``alpha = 1`` on those
columns and 2 elsewhere.

Precision: float16/bfloat16/float32 inputs are transformed in float32 (torch.fft rejects half precision
for the non-power-of-two grids vision models use), float64 in float64; results are rounded once to the
dtype of ``x`` and gradients to the dtype of the tensor they belong to. Filter weights may have another
floating dtype than ``x`` (a float32 parameter under bf16 autocast).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from slimops.reference._common import compute_dtype, vjp as _vjp


def _complex(w: Tensor, dt: torch.dtype) -> Tensor:
    return torch.view_as_complex(w.to(dt).contiguous())


def spectral_filter(x: Tensor, weight: Tensor) -> Tensor:
    """``irfft2(rfft2(x) * view_as_complex(weight), s=(H, W))`` over dims (1, 2), orthonormal."""
    dt = compute_dtype(x)
    h, w = x.shape[1], x.shape[2]
    if x.shape[0] == 0:  # MKL's FFT refuses an empty batch
        return x * 0
    xf = torch.fft.rfft2(x.to(dt), dim=(1, 2), norm="ortho")
    y = torch.fft.irfft2(xf * _complex(weight, dt), s=(h, w), dim=(1, 2), norm="ortho")
    return y.to(x.dtype)


def spectral_filter_backward(grad: Tensor, x: Tensor, weight: Tensor, output_mask: Sequence[bool]):
    """``(grad_x, grad_weight)`` of :func:`spectral_filter` by autograd through torch.fft.

    In closed form (what the kernels compute): ``grad_x = spectral_filter(grad, conj(weight))`` and
    ``grad_weight = view_as_real(sum_b alpha * rfft2(grad) * conj(rfft2(x)))``."""
    return _vjp(spectral_filter, (x, weight), grad, output_mask)


def aff_mask(xf: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, blocks: int, shrink: float) -> Tensor:
    """The AFF filter ``M`` (B, H, W//2+1, C) complex computed from the spectrum ``xf`` (same shape)."""
    *lead, c = xf.shape
    dt = xf.real.dtype
    w1, b1, w2, b2 = (t.to(dt) for t in (w1, b1, w2, b2))
    xb = xf.reshape(*lead, blocks, c // blocks)
    xr, xi = xb.real, xb.imag

    def mm(a: Tensor, w: Tensor) -> Tensor:  # per block: (..., k, i) x (k, i, o) -> (..., k, o)
        return torch.einsum("...ki,kio->...ko", a, w)

    o1r = F.relu(mm(xr, w1[0]) - mm(xi, w1[1]) + b1[0])
    o1i = F.relu(mm(xi, w1[0]) + mm(xr, w1[1]) + b1[1])
    o2r = mm(o1r, w2[0]) - mm(o1i, w2[1]) + b2[0]
    o2i = mm(o1i, w2[0]) + mm(o1r, w2[1]) + b2[1]
    m = torch.complex(F.softshrink(o2r, shrink), F.softshrink(o2i, shrink))
    return m.reshape(*lead, c)


def adaptive_spectral_filter(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, blocks: int = 8,
                             shrink: float = 0.01) -> Tensor:
    """``irfft2(M(X) * X, s=(H, W)) + x`` with ``X = rfft2(x)`` and ``M`` the AFF filter (module docstring)."""
    dt = compute_dtype(x)
    h, w = x.shape[1], x.shape[2]
    if x.shape[0] == 0:  # MKL's FFT refuses an empty batch
        return x * 0
    xs = x.to(dt)
    xf = torch.fft.rfft2(xs, dim=(1, 2), norm="ortho")
    m = aff_mask(xf, w1, b1, w2, b2, blocks, shrink)
    y = torch.fft.irfft2(m * xf, s=(h, w), dim=(1, 2), norm="ortho") + xs
    return y.to(x.dtype)


def adaptive_spectral_filter_backward(grad: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                                      blocks: int, shrink: float, output_mask: Sequence[bool]):
    """``(grad_x, grad_w1, grad_b1, grad_w2, grad_b2)`` of :func:`adaptive_spectral_filter` by autograd.
    (ReLU and softshrink take derivative 0 at their kinks, as torch's do.)"""
    return _vjp(lambda *a: adaptive_spectral_filter(*a, blocks=blocks, shrink=shrink), (x, w1, b1, w2, b2), grad,
                output_mask)
