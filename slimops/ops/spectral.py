"""Fourier-domain filtering: the ``spectral`` op family (docs/algorithms.md §7).

Global filters (GFNet, Rao et al. 2021) and adaptive frequency filters (AFFNet, Huang et al. 2023; AFIDAF)
replace attention by ``rfft2 -> multiply by a filter -> irfft2``. In PyTorch that is three or more kernels
with complex intermediates in memory, in float32 (torch.fft rejects half precision on the non-power-of-two
grids vision models use). These ops do it in one op, forward and backward, for float32/bfloat16/float16
(float32 math) and float64 inputs. Tokens are channels-last, ``x`` (B, H, W, C); transforms are orthonormal
over (H, W):

``spectral_filter(x, weight)``
    ``= irfft2(rfft2(x) * view_as_complex(weight), s=(H, W))``, ``weight`` (H, W//2+1, C, 2) real.
    Differentiable in x and weight.

``adaptive_spectral_filter(x, w1, b1, w2, b2, *, blocks=8, shrink=0.01)``
    ``= irfft2(M * X, s=(H, W)) + x`` with ``X = rfft2(x)`` and the filter computed from the spectrum by a
    complex block-diagonal two-layer channel MLP shared by all frequencies,
    ``M = softshrink(W2 relu(W1 X + b1) + b2, shrink)`` (ReLU and softshrink on real and imaginary parts
    separately). AFNO's weight layout: ``w1`` (2, blocks, C/blocks, Hb), ``b1`` (2, blocks, Hb), ``w2``
    (2, blocks, Hb, C/blocks), ``b2`` (2, blocks, C/blocks), index 0 real and 1 imaginary. Differentiable in
    every tensor. The exact formula is in :mod:`slimops.reference.spectral`.

Outputs have the dtype of ``x``; gradients the dtype of their tensor. Filter weights may have another
floating dtype than ``x`` (float32 parameters under bf16 autocast).

Backends (``backend=``):

- ``"cpu"``: C++, the transforms as dense DFT matrix products (GEMMs over blocks of channels that stay in cache;
  no complex tensor in memory) at every grid size. A dense DFT costs O(H + W) per element against the FFT's
  O(log HW): it wins at GFNet's 14x14 .. 56x56 grids, and loses beyond (the C++ kernel has no FFT path), so
  ``auto`` on CPU takes torch.fft (the reference) for grids larger than :data:`MAX_FUSED_GRID`.
- ``"triton"``: one fused kernel per (sample, channel block) that does the transforms as small dense DFT
  matmuls, reading x once and writing y once; grids up to 64x64 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
- ``"cuda"``: cuFFT (``at::fft``) with fused CUDA kernels for the filter multiply and the weight-gradient
  reduction; any grid size.
- ``"reference"``: torch.fft, :mod:`slimops.reference.spectral`.
- ``"auto"``: on CPU the C++ kernel up to 64x64 and torch.fft beyond; on CUDA, Triton where its fused kernels
  fit (grids up to 32x32; AFF channel blocks up to 32), cuFFT elsewhere (see :data:`AUTO_TRITON_GRID`).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from slimops import _backend
from slimops.opdefs.spectral import MAX_FUSED_GRID, check_adaptive, check_spectral_filter  # registers fakes, autograd
from slimops.reference import spectral as ref

__all__ = ["spectral_filter", "adaptive_spectral_filter", "MAX_FUSED_GRID", "check_spectral_filter", "check_adaptive"]

def _why_not_fused(x: Tensor) -> Optional[str]:
    h, w = x.shape[1], x.shape[2]
    if max(h, w) > MAX_FUSED_GRID:
        return (f"the fused Triton kernel covers grids up to {MAX_FUSED_GRID}x{MAX_FUSED_GRID}, x has {h}x{w} "
                "(use backend='cuda', the cuFFT path)")
    return None


# Where ``auto`` prefers the fused Triton kernel on CUDA. Nothing has been timed on a GPU yet, so this follows
# what the sm_90 compiles showed (slimops/triton/spectral.py): up to 32x32 the fused kernels fit in registers
# without spilling; beyond that they spill, and the AFF backward cannot launch for channel blocks wider than 32
# (shared memory). Elsewhere ``auto`` takes cuFFT. To be replaced by bench/bench_spectral.py's GPU figures.
AUTO_TRITON_GRID = 32
AUTO_TRITON_AFF_BLOCK = 32


def _auto_prefers_triton(x: Tensor, blocks: Optional[int]) -> bool:
    if max(x.shape[1], x.shape[2]) > AUTO_TRITON_GRID:
        return False
    return blocks is None or x.shape[3] // blocks <= AUTO_TRITON_AFF_BLOCK


def pick(op: str, backend: str, x: Tensor, blocks: Optional[int] = None):
    """(backend name, callable) for ``op`` on ``x`` (``blocks``: the AFF channel blocks): on CUDA ``auto`` takes
    Triton's fused kernel where it fits (grids up to :data:`AUTO_TRITON_GRID`, AFF channel blocks up to
    :data:`AUTO_TRITON_AFF_BLOCK`) and the cuFFT kernel elsewhere; a forced backend that cannot run says why."""
    dev = x.device
    if backend == "triton":
        reason = _why_not_fused(x)
        if reason is not None:
            raise RuntimeError(f"slimops.{op}: backend 'triton' cannot run: {reason}")
    if backend == "auto" and dev.type == "cpu" and _why_not_fused(x) is not None:
        # Beyond the fused-DFT range the C++ kernel's dense DFT (O(H + W) per element) loses to torch.fft's
        # FFT (O(log HW)): measured on 2 threads, fwd+bwd 0.6-1.1x at 72x72, and forward 1.6x / 2.3x / 3.4x
        # slower at 96 / 128 / 192. Up to 64x64 the two are within noise or the C++ kernel wins.
        return _backend.pick(op, "reference", dev, ref)
    if backend == "auto" and dev.type == "cuda":
        order = ("triton", "cuda") if _auto_prefers_triton(x, blocks) else ("cuda", "triton")
        for cand in order:
            if cand == "triton" and _why_not_fused(x) is not None:
                continue
            if _backend.why_not(op, cand, dev) is None:
                return _backend.pick(op, cand, dev, ref)
    return _backend.pick(op, backend, dev, ref)


# ---- public ops -----------------------------------------------------------------------------------------


def spectral_filter(x: Tensor, weight: Tensor, *, backend: str = "auto") -> Tensor:
    """GFNet's global filter ``irfft2(rfft2(x) * view_as_complex(weight), s=(H, W))`` over dims (1, 2),
    orthonormal; ``x`` (B, H, W, C) real, ``weight`` (H, W//2+1, C, 2). Differentiable in x and weight."""
    op = "spectral_filter"
    check_spectral_filter(op, x, weight)
    _, fn = pick(op, backend, x)
    return fn(x, weight)


def adaptive_spectral_filter(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, *, blocks: int = 8,
                             shrink: float = 0.01, backend: str = "auto") -> Tensor:
    """AFF's adaptive frequency filter ``irfft2(M(X) * X, s=(H, W)) + x``, ``X = rfft2(x)``,
    ``M = softshrink(W2 relu(W1 X + b1) + b2, shrink)`` (complex, block-diagonal in ``blocks`` channel blocks,
    shared by every frequency; see the module docstring for the weight layout). Differentiable in all tensors."""
    op = "adaptive_spectral_filter"
    check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink)
    _, fn = pick(op, backend, x, blocks)
    return fn(x, w1, b1, w2, b2, int(blocks), float(shrink))
