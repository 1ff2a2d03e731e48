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

- ``"cpu"``: C++. Grids up to 64x64: the transforms are dense DFT matrix products (GEMMs over blocks of
  channels that stay in cache; no complex tensor in memory); larger grids: pocketfft/MKL (``at::fft``) with
  the filter step fused.
- ``"triton"``: one fused kernel per (sample, channel block) that does the transforms as small dense DFT
  matmuls, reading x once and writing y once; grids up to 64x64 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
- ``"cuda"``: cuFFT (``at::fft``) with fused CUDA kernels for the filter multiply and the weight-gradient
  reduction; any grid size.
- ``"reference"``: torch.fft, :mod:`slimops.reference.spectral`.
- ``"auto"``: the C++ kernel on CPU; on CUDA, Triton where its fused kernels fit (grids up to 32x32; AFF
  channel blocks up to 32), cuFFT elsewhere (see :data:`AUTO_TRITON_GRID`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from slimops import _backend
from slimops.opdefs._checks import FLOATS as _FLOATS, fail as _fail
from slimops.reference import spectral as ref

__all__ = ["spectral_filter", "adaptive_spectral_filter", "MAX_FUSED_GRID"]

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


def _check_grad(op: str, grad, x: Tensor):
    _check_float(op, "grad", grad, x.device)
    if grad.shape != x.shape:
        _fail(op, f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")


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


# ---- fake kernels ---------------------------------------------------------------------------------------


def _grad_like(t: Tensor, need: bool) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)


def _spectral_filter_fake(x, weight):
    check_spectral_filter("spectral_filter", x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _spectral_filter_backward_fake(grad, x, weight, output_mask):
    op = "spectral_filter_backward"
    check_spectral_filter(op, x, weight)
    _check_grad(op, grad, x)
    return _grad_like(x, output_mask[0]), _grad_like(weight, output_mask[1])


def _adaptive_fake(x, w1, b1, w2, b2, blocks, shrink):
    check_adaptive("adaptive_spectral_filter", x, w1, b1, w2, b2, blocks, shrink)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _adaptive_backward_fake(grad, x, w1, b1, w2, b2, blocks, shrink, output_mask):
    op = "adaptive_spectral_filter_backward"
    check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink)
    _check_grad(op, grad, x)
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


def _register(ns: str):
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(f"{ns}::spectral_filter", _make_filter_backward(ops.spectral_filter_backward),
                                    setup_context=_filter_setup)
    torch.library.register_autograd(f"{ns}::adaptive_spectral_filter",
                                    _make_adaptive_backward(ops.adaptive_spectral_filter_backward),
                                    setup_context=_adaptive_setup)


FAKES = (("spectral_filter", _spectral_filter_fake), ("spectral_filter_backward", _spectral_filter_backward_fake),
         ("adaptive_spectral_filter", _adaptive_fake), ("adaptive_spectral_filter_backward", _adaptive_backward_fake))

for _name, _fake in FAKES:
    torch.library.register_fake(f"slimops::{_name}")(_fake)
_register("slimops")


def register_triton_autograd():
    """Called by ``slimops.triton.spectral`` once its custom ops exist: they are differentiable too."""
    _register("slimops_triton")
