"""Readable pure-PyTorch twin of the ``distill`` family: the feature-affinity (FA) loss of FAQD (Li, Yang, Yin, Qi,
Xin 2023, "Feature Affinity Assisted Knowledge Distillation and Quantization of Deep Neural Networks on Label-Free
Data"; docs/algorithms.md §9). The test oracle and the fallback backend; mirrors ``torch.ops.slimops``'s
``feature_affinity_loss`` and ``feature_affinity_loss_backward`` (schemas in ``csrc/registration.cpp``).

Per sample b, every pixel's channel vector is divided by ``‖·‖₂ + 1e-5`` (the authors' code), giving
``Ŝ ∈ ℝ^{Cs×HW}`` (student) and ``T̂ ∈ ℝ^{Ct×HW}`` (teacher: the channel counts may differ, the pixels may not), and
the affinity difference is ``Δ = ŜᵀŜ − T̂ᵀT̂`` (``HW × HW``: pixel-to-pixel cosine similarities). With ``φ`` the
entrywise ``|·|`` (``norm="l1"``, the paper's) or ``(·)²`` (``norm="l2sq"``):

- exact (``proj`` None): ``loss[b] = Σ_ij φ(Δ_ij) / (HW)²``;
- fast (``proj = Z``, ``HW × k``): ``loss[b] = Σ_ij φ((ΔZ)_ij) / (k·(HW)²)``, with ``ΔZ = Ŝᵀ(ŜZ) − T̂ᵀ(T̂Z)``: the
  ``HW × HW`` matrix is never needed. For Z of i.i.d. N(0, 1) entries, ``E[(ΔZ)²_ij] = ‖row_i Δ‖²``, so with ``l2sq``
  the fast loss is an unbiased estimate of the exact one; with ``l1`` (the paper's FFA loss) its expectation is
  ``√(2/π)·Σ_i ‖row_i Δ‖₂ / (HW)²``, an ℓ2,1 norm, not the exact ℓ1 loss.

This twin forms ``Δ`` (``B × HW × HW``) outright; the kernels never do (O(HW·(Cs + Ct)) memory exact, O(HW·k)
fast). :func:`affinity_loss` returns the per-sample losses (B,) in the compute dtype (float32 for
float16/bfloat16/float32 features, float64 for float64); :func:`feature_affinity_loss`, the op's twin, returns them
with the fast loss's saved products ``(loss, u, e)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from slimops.reference._common import compute_dtype, vjp

__all__ = [
    "EPS", "NORMS", "normalize_pixels", "affinity_loss", "feature_affinity_loss", "feature_affinity_loss_backward",
]

EPS = 1e-5
NORMS = ("l1", "l2sq")


def normalize_pixels(f: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, C, H, W) -> (B, C, HW) in ``dtype``, each pixel's channel vector divided by its L2 norm + 1e-5."""
    f = f.to(dtype).flatten(2)
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)


def _delta(fs: Tensor, ft: Tensor, proj: Optional[Tensor]):
    """(Δ or ΔZ, the denominator, U_y = [ŜZ; −T̂Z] or None) of one batch, in the compute dtype."""
    dt = compute_dtype(fs)
    s, t = normalize_pixels(fs, dt), normalize_pixels(ft, dt)
    hw = s.shape[2]
    if proj is None:
        return s.transpose(1, 2) @ s - t.transpose(1, 2) @ t, hw * hw, None
    z = proj.to(dt)
    u = torch.cat([s @ z, -(t @ z)], dim=1)
    return s.transpose(1, 2) @ u[:, : s.shape[1]] + t.transpose(1, 2) @ u[:, s.shape[1]:], hw * hw * z.shape[1], u


def _loss(d: Tensor, denom: int, norm: str) -> Tensor:
    return (d.abs() if norm == "l1" else d.square()).flatten(1).sum(1) / denom


def affinity_loss(fs: Tensor, ft: Tensor, proj: Optional[Tensor] = None, norm: str = "l1") -> Tensor:
    """Per-sample FA loss (B,) (exact, or fast with ``proj``) between student ``fs`` (B, Cs, H, W) and teacher ``ft``
    (B, Ct, H, W); module docstring. The composite a user writes: the loss alone."""
    d, denom, _ = _delta(fs, ft, proj)
    return _loss(d, denom, norm)


def feature_affinity_loss(fs: Tensor, ft: Tensor, proj: Optional[Tensor] = None, norm: str = "l1"):
    """The op's twin: ``(loss, u, e)``, the per-sample loss of :func:`affinity_loss` and, for the fast loss, the
    products the kernels save for their backward, ``u = [ŜZ; −T̂Z]`` (B, Cs + Ct, k) and ``e = φ'(ΔZ)`` (B, HW, k:
    ``sign`` for l1, 0 at 0 and NaN; ``2ΔZ`` for l2sq); both empty for the exact loss."""
    d, denom, u = _delta(fs, ft, proj)
    loss = _loss(d, denom, norm)
    if u is None:
        empty = loss.new_empty(0)
        return loss, empty, empty.clone()
    d = d.detach()
    return loss, u.detach(), torch.sign(d) if norm == "l1" else 2 * d


def feature_affinity_loss_backward(grad: Tensor, fs: Tensor, ft: Tensor, proj: Optional[Tensor], norm: str,
                                   output_mask: Sequence[bool], u: Optional[Tensor] = None,
                                   e: Optional[Tensor] = None):
    """``(grad_fs, grad_ft)`` of :func:`affinity_loss` for the incoming per-sample gradient ``grad`` (B,), by
    autograd (the sign of ``|·|`` at 0 is 0, as torch's); one not asked for in ``output_mask`` is an empty tensor.
    ``u`` and ``e`` (the forward's saved products, which the kernels read instead of recomputing them) are not
    needed here.

    In closed form (what the kernels compute), with ``E = φ'(Δ)·grad[b]/(HW)²`` (exact; symmetric):
    ``∂/∂Ŝ = 2ŜE``, ``∂/∂T̂ = −2T̂E``; fast, with ``G = φ'(ΔZ)·grad[b]/(k·(HW)²)``, ``U = ŜZ``:
    ``∂/∂Ŝ = U Gᵀ + (ŜG) Zᵀ`` (and the teacher's with a minus sign); then through the normalisation, per pixel,
    ``∂/∂f = g/(n + ε) − f̂ (f̂ᵀg)/n`` (the second term 0 where n = 0)."""
    return vjp(lambda a, b: affinity_loss(a, b, proj, norm), (fs, ft), grad, output_mask)
