"""Distillation losses as fused ops: the ``distill`` family (docs/algorithms.md §9; FAQD: Li, Yang, Yin, Qi, Xin 2023).

``feature_affinity_loss(fs, ft, *, fast=False, k=256, seed=0, norm="l1", reduction="sum")``
    fs (B, Cs, H, W) student features, ft (B, Ct, H, W) teacher features (the channel counts may differ; the
    pixels may not: resize first, as :func:`slimops.distill.feature_affinity_loss` does). Per sample, each pixel's
    channel vector is normalised (``f̂ = f / (‖f‖₂ + 1e-5)``, giving ``Ŝ`` and ``T̂``) and with ``Δ = ŜᵀŜ − T̂ᵀT̂``
    (``HW × HW``) and ``φ = |·|`` (``norm="l1"``, the paper's) or ``(·)²`` (``"l2sq"``)::

        exact:  loss[b] = Σ φ(Δ) / (HW)²
        fast:   loss[b] = Σ φ(ΔZ) / (k·(HW)²),   Z ∈ ℝ^{HW×k} fixed, i.i.d. N(0, 1) (drawn from ``seed``)

    then summed over the batch (``reduction="sum"``, the FAQD code's convention), averaged (``"mean"``) or returned
    per sample (``"none"``). ``Z`` is a pure function of ``seed`` (any int, taken mod 2⁶⁴; counter-based, no RNG
    state: the same on every device, and traced by ``torch.compile(fullgraph=True)``); ``proj=`` takes your own
    ``HW × k`` projection instead.

    Which loss: the paper's fast loss (``fast=True, norm="l1"``) is a different, cheaper affinity loss, not an
    estimate of the exact one: ``E|(ΔZ)_ij| = √(2/π)‖row_i Δ‖₂`` (an ℓ2,1 norm). With ``norm="l2sq"`` the fast loss
    is an unbiased estimate of the exact ``l2sq`` loss (relative standard deviation at most ``√(2/k)``, far less
    when Δ has many comparable singular values).

Memory: the kernels never form an ``HW × HW`` matrix, in either pass: the exact loss is computed tile by tile
(flash-style: O(HW·(Cs + Ct)) memory, (HW)²·(Cs + Ct) multiply-adds, the backward recomputes the tiles), the fast
one from ``ŜZ`` and ``ΔZ`` (O(HW·k)). The exact loss saves nothing for the backward but the inputs; the fast one
also saves ``[ŜZ; −T̂Z]`` and ``φ'(ΔZ)`` (the raw op's 2nd and 3rd outputs: ``4·HW·k`` bytes per sample in float32,
3.2 MB at 56 × 56 and k = 256), so that its backward recomputes no product. Differentiable in fs and ft (detach the
teacher's features yourself); ``proj`` gets no gradient.

float16/bfloat16/float32 features are computed in float32 (the loss is float32), float64 in float64.

Backends (``backend=``):

- ``"cpu"``: C++; exact: per sample and pair of 64-pixel blocks, the ``Δ`` tile by the register-blocked product of
  ``small_mm.h`` (its AVX-512 / AVX2 copies), only the upper triangle in the forward (Δ is symmetric), the
  gradient ``Σ_J X_J φ'(Δ_JI)`` accumulated per block of columns; fast: the products on small_mm's panels (its
  AVX-512 copy beats torch's MKL, which takes its AVX2 code on AMD CPUs), φ and the normalisation's backward on each
  64-pixel block while it is in cache;
- ``"triton"``: the same tiling in Triton (``tl.dot`` tiles), the fast products by cuBLAS;
- ``"reference"``: the composite that forms Δ (:mod:`slimops.reference.distill`);
- ``"auto"``: the C++ kernel on CPU, Triton on CUDA.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from slimops import _backend
from slimops.opdefs.distill import check_feature_affinity
from slimops.opdefs._checks import fail
from slimops.reference import distill as ref
from slimops.reference._common import compute_dtype

__all__ = ["feature_affinity_loss", "gaussian_projection", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean", "none")


_MASK32 = 0xFFFFFFFF


def _hash32(x):
    """A 32-bit integer mixer (two xorshift-multiply rounds, multiplier 0x45d9f3b) on Python ints or int64 tensors
    holding values in [0, 2³²): the product stays below 2⁵⁹, so nothing overflows int64 on any device or compiler."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _counter_normal(hw: int, k: int, seed: int, device: torch.device) -> Tensor:
    """``HW × k`` i.i.d. N(0, 1) entries in float64, a pure function of (entry, seed): two 32-bit hashes of the
    entry's counter keyed by the seed, Box–Muller. No generator object: the same numbers on every device (to the
    rounding of log and cos), and ``torch.compile(fullgraph=True)`` traces it."""
    s = seed % (1 << 64)
    key = _hash32((s & _MASK32) ^ _hash32(s >> 32))  # Python ints: the mixer works on both
    out = torch.empty(hw * k, dtype=torch.float64, device=device)
    step = 1 << 20  # entries per chunk: the integer temporaries stay a few MiB whatever HW·k is
    for start in range(0, hw * k, step):
        n = torch.arange(start, min(start + step, hw * k), dtype=torch.int64, device=device)
        lo, hi = n & _MASK32, n >> 32  # hi is 0 below 2³² entries; mixed in so larger ones do not repeat
        h = _hash32(lo ^ _hash32(hi ^ key))
        u1 = (_hash32(h ^ 0x68E31DA4).double() + 0.5) / 2.0 ** 32  # (0, 1): the log is finite
        u2 = (_hash32(h ^ 0x1B56C4E9).double() + 0.5) / 2.0 ** 32
        out[start:start + n.numel()] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return out.view(hw, k)


@lru_cache(maxsize=16)
def _projection(hw: int, k: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _counter_normal(hw, k, seed, device).to(dtype)


def gaussian_projection(hw: int, k: int, seed: int = 0, device=None, dtype=torch.float32) -> Tensor:
    """The fixed ``HW × k`` matrix of i.i.d. N(0, 1) entries of the fast loss, a pure function of ``seed``
    (counter-based: :func:`_counter_normal`), computed in float64 and cached per device and dtype."""
    return _projection(int(hw), int(k), int(seed), torch.device(device or "cpu"), dtype)


def feature_affinity_loss(fs: Tensor, ft: Tensor, *, fast: bool = False, k: int = 256, seed: int = 0,
                          norm: str = "l1", reduction: str = "sum", proj: Optional[Tensor] = None,
                          backend: str = "auto") -> Tensor:
    """FAQD's feature-affinity loss between student features ``fs`` and teacher features ``ft`` (module docstring):
    exact, or with ``fast=True`` through a fixed Gaussian ``HW × k`` projection; a scalar (``reduction`` "sum" or
    "mean") or the per-sample losses (B,) ("none"), float32 (float64 for float64 features)."""
    op = "feature_affinity_loss"
    if not isinstance(fast, bool):
        fail(op, f"fast must be a bool, got {fast!r}", TypeError)
    if reduction not in REDUCTIONS:
        fail(op, f"unknown reduction {reduction!r} (expected one of: {', '.join(REDUCTIONS)})")
    if proj is not None and not fast:
        fail(op, "proj is the projection of the fast loss: pass fast=True with it")
    if fast and proj is None:
        if isinstance(k, bool) or not isinstance(k, int):
            fail(op, f"k must be a positive int, got {k!r}", TypeError)
        if k < 1:
            fail(op, f"k must be a positive int, got {k!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            fail(op, f"seed must be an int, got {seed!r}", TypeError)
        check_feature_affinity(op, fs, ft, None, norm)  # before the projection is drawn for a bad fs
        proj = gaussian_projection(fs.shape[2] * fs.shape[3], k, seed, fs.device, compute_dtype(fs))
    check_feature_affinity(op, fs, ft, proj, norm)
    _, fn = _backend.pick(op, backend, fs.device, ref)
    per_sample = fn(fs, ft, proj, norm)[0]  # (loss, u, e): u and e are the fast loss's saved products
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
