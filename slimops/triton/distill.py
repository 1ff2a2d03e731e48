"""Triton kernels of the ``distill`` family (FAQD's feature-affinity loss), registered as
``torch.ops.slimops_triton.*``.

Same schemas as ``csrc/registration.cpp`` and the same semantics as :mod:`slimops.reference.distill`
(docs/algorithms.md §9; FAQD: Li, Yang, Yin, Qi, Xin 2023). fs (B, Cs, H, W) student and ft (B, Ct, H, W) teacher
features (any strides; the channel counts may differ), per sample b each pixel's channel vector normalised,
``f̂ = f / (‖f‖₂ + 1e-5)``, giving ``Ŝ`` (Cs x HW) and ``T̂`` (Ct x HW); ``Δ = ŜᵀŜ − T̂ᵀT̂`` (HW x HW, never formed);
``φ = |·|`` (``norm="l1"``) or ``(·)²`` (``"l2sq"``)::

    exact (proj None):      loss[b] = Σ φ(Δ) / (HW)²
    fast  (proj = Z, HW x k): loss[b] = Σ φ(ΔZ) / (k·(HW)²),   ΔZ = Ŝᵀ(ŜZ) − T̂ᵀ(T̂Z)

- ``feature_affinity_loss(fs, ft, proj=None, norm="l1")``: ``(loss, u, e)``, the per-sample losses (B,) and, for
  the fast loss, its products saved for the backward, ``u = [ŜZ; −T̂Z]`` (B, K, k) and ``e = φ'(ΔZ)`` (B, HW, k)
  (both empty for the exact loss); float32 (float64 for float64 features).
- ``feature_affinity_loss_backward(grad, fs, ft, proj, norm, output_mask, u=None, e=None)``: (grad_fs, grad_ft),
  contiguous, in the features' dtype; the exact loss recomputes its tiles, the fast one reads ``u`` and ``e``
  (recomputing them when not given); one not asked for is an empty tensor; proj gets no gradient.

Kernel design (the tiling of the C++ CPU kernel, ``csrc/cpu/distill.cpp``; no atomics anywhere: deterministic)
------------------------------------------------------------------------------------------------------------------
* **Operand.** Per sample, ``X = [Ŝ; T̂]`` (K = Cs + Ct rows, pixel-major rows like the NCHW input) in the math
  dtype, written by ``_normalize_kernel`` (one program per (sample, block of pixels), launched once per part):
  it reads the features in place with their four strides (channels_last, slices, expanded views: no copy),
  sums the squares over the channels, ``n = sqrt(Σ f²)`` (IEEE ``sqrt_rn`` in float32), then stores
  ``f / (n + ε)`` (IEEE division, ``_common.div_rn``: the reference's rounding) and the per-pixel norms
  ``nrm`` (B, 2, LD) (student, teacher). Rows are zero-padded to ``LD`` pixels: ``LD = cdiv(HW, BM)·BM`` for the
  exact loss (so the tile kernels never read past a row), ``LD = HW`` for the fast one.
* **Exact forward** (``_fwd_kernel``): the pixels are cut into ``nblk = cdiv(HW, BM)`` blocks; one program per
  (sample, pair I <= J) (the pair table of ``torch.triu_indices``): the tile ``Δ_IJ = X_Iᵀ diag(±1) X_J``
  (``_delta_tile``: ``tl.dot`` over K in chunks of BK rows, the teacher's rows negated) and the sum of φ over
  it, doubled off the diagonal (Δ is symmetric). Each program writes its partial sum; torch adds them per sample
  in float64 in a fixed order and divides by (HW)². Padding pixels are zero vectors (Δ = 0 there) and masked
  anyway.
* **Exact backward**: with ``E = φ'(Δ)`` (symmetric): for l1 the sign, 0 at 0 and at NaN (``torch.sign``'s
  convention, which the reference's autograd of ``|·|`` follows: a NaN feature makes its own part's gradient NaN
  through the products, ``NaN·0``, but not the other part's); for l2sq ``2Δ`` (NaN kept);
  ``∂/∂Ŝ = (2·g[b]/(HW)²)·ŜE`` and ``∂/∂T̂ = −(2·g[b]/(HW)²)·T̂E``. ``_bwd_kernel``: one program per (sample,
  pixel block I, block of BR output rows of X) loops over every pixel block J, recomputes ``Δ_JI`` (over all K)
  and accumulates ``G[rows, I] += X[rows, J] · E_JI`` (``tl.dot``); only the rows of the parts asked for in
  output_mask (``[R0, R1)``: the student's, the teacher's or both). G (B, R1 − R0, LD) in the math dtype is the
  one scratch buffer. Then ``_norm_bwd_kernel`` (one program per (sample, pixel block), launched once per part
  asked for) applies the scale (``±2·g[b]/(HW)²``, a (B,) tensor) and the normalisation's backward per pixel,
  ``∂/∂f = s·(G/(n + ε) − f̂ (f̂ᵀG)/n)`` (the second term 0 where n = 0, the limit of the formula), and stores
  the gradient, rounded once, contiguous in the features' dtype.
* **Fast** (products by torch: cuBLAS on a GPU): ``U_y = [Ŝ Z; −T̂ Z]`` (K x k per sample) into the output ``u``,
  ``D = Xᵀ U_y`` (HW x k) into the output ``e``, loss ``Σ φ(D) / (k·(HW)²)`` (summed in float64), then ``e = φ'(D)``
  in place; backward with ``G = φ'(D)`` read from ``e``: ``∂/∂X[rows] = U[rows] Gᵀ + (X[rows] G) Zᵀ`` (only the
  rows asked for; U unsigned), then ``_norm_bwd_kernel`` with the scale ``±g[b]/(k·(HW)²)``: 3 products instead
  of 7 when u and e are given. Samples go through the products in chunks of about ``_FAST_CHUNK_ELEMS`` workspace
  elements: memory O(HW·k) per sample (the saved e) plus O(HW·K) scratch per sample of a chunk, never an HW x HW
  tensor.

Tiles and launch configuration
------------------------------
``BM = min(64, max(16, next_pow2(HW)))`` pixels per tile side (32 instead of 64 for float64, as sema and
token_attention), ``BK = min(32, max(16, next_pow2(K)))`` rows per chunk of the Δ products (16 for float64),
``BR = min(64, max(16, next_pow2(R1 − R0)))`` output rows per backward program (32 for float64);
normalisation programs take 64 pixels and loop over the channels 32 at a time. ``num_warps = 4``,
``num_stages = 1``. Every ``tl.dot`` dimension is a power of two >= 16. Module constants ``_BLOCK``,
``_BLOCK_FP64``, ``_BK``, ``_BK_FP64``, ``_ROWS``, ``_ROWS_FP64``, ``_NORM_PIX``, ``_NORM_CH``,
``_FAST_CHUNK_ELEMS``, ``_FP32_DOT``.

Cost. Forward: ``(nblk(nblk+1)/2)·BM²·K`` multiply-adds per sample (half the full product: symmetry).
Backward: every program recomputes the Δ tiles of its column block, so the Δ work is repeated once per row
block: ``nblk²·BM²·K·cdiv(R1 − R0, BR)`` plus ``nblk²·BM²·(R1 − R0)`` for the accumulation. Up to 64 rows
(Cs + Ct <= 64 with both gradients; 32 in float64) there is no repetition; beyond, the Δ work grows with
``cdiv(R1 − R0, 64)`` (e.g. 512 + 512 channels, both gradients: 16 full products, 32x the forward's symmetric one,
still O(HW·K) memory). A variant that keeps
``E_JI`` in registers and streams the rows of G through memory would avoid it; not done (needs measuring on a
GPU). Channel counts of any size are handled by the K loop (BK rows at a time) and the row blocks.

Precision: the math dtype is float32 for float32/bfloat16/float16 features (X, the dots, the accumulators: the
dots take float32 operands, so bf16/fp16 features are computed exactly like float32 ones), float64 for float64
(float64 ``tl.dot``, as token_attention). float32 on CUDA: 3xTF32 dots (``input_precision="tf32x3"``), or plain
TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on (torch's policy, which also governs the fast loss's
cuBLAS products). The gradients are rounded once to the features' dtype (round to nearest even, emulated in the
interpreter: ``_common.cvt_store``). For ``norm="l1"``, ``φ'`` is the sign of Δ: entries of Δ within rounding
of 0 (e.g. ``Δ_ii = ‖ŝ_i‖² − ‖t̂_i‖²`` when the student's and teacher's pixel norms are nearly equal) may take
either sign in any two implementations.

Launches per call: forward 2 normalisation launches (one per part with channels) and 1 tile kernel (exact) or
two torch products per chunk (fast); backward the same normalisation, 1 tile kernel (exact) or five products per
chunk (fast: U, D, X G, (X G) Zᵀ, U Gᵀ), and 1 normalisation-backward launch per gradient asked for. No kernel for
an empty batch or when no gradient is asked for; K = 0 (no channels at all) gives zero losses.

Coverage: any B, Cs, Ct, H, W (HW >= 1: the shared checks), any strides, float32 / float64 / bfloat16 / float16,
proj of any float dtype (taken in the math dtype), fewer than 2^31 programs per launch (offsets are int64).
Verified: correctness through the interpreter (tests/test_distill_triton.py). Not verified:
nothing was run on a GPU from here (compilation, register use and speed unmeasured).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.opdefs import distill as _defs
from slimops.opdefs import wire
from slimops.reference.distill import EPS
from slimops.triton._common import (EMULATE_RNE, TL_DTYPES, check_device, cvt_store, div_rn, fail, math_dtype,
                                    next_pow2, on_device, rowsum, to_acc, vecsum)

__all__ = ["feature_affinity_loss", "feature_affinity_loss_backward"]

# Tiles (module docstring, "Tiles and launch configuration").
_BLOCK = 64  # pixels per tile side
_BLOCK_FP64 = 32
_BK = 32  # rows of X per chunk of the Δ products
_BK_FP64 = 16
_ROWS = 64  # output rows of X per backward program
_ROWS_FP64 = 32
_MIN_DOT = 16  # every tl.dot dimension is a power of two >= 16
_NORM_PIX = 64  # pixels per normalisation (and normalisation-backward) program
_NORM_CH = 32  # channels per chunk of their loops
_NUM_WARPS = 4
_NUM_STAGES = 1
# Workspace elements per chunk of samples of the fast loss's products (U, D / G, X G, and the gradient rows).
_FAST_CHUNK_ELEMS = 1 << 26
# input_precision of float32 dots on CUDA when torch.backends.cuda.matmul.allow_tf32 is off (the default).
_FP32_DOT = "tf32x3"
_MAX_PROGRAMS = 2 ** 31 - 1


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """IEEE square root (Triton's float32 sqrt is an approximation on NVIDIA GPUs; float64's is exact)."""
    if ACC == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _dphi(d, L1: tl.constexpr):
    """φ'(d): the sign of d for l1 (0 at 0 and at NaN: torch.sign's, hence the reference's autograd of |·|), 2d for
    l2sq (NaN kept)."""
    if L1:
        r = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, tl.zeros_like(d)))
    else:
        r = 2.0 * d
    return r


@triton.jit
def _delta_tile(xb, pa, pb, K, CS, LD, BM: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """``Δ[pa, pb] = X[:, pa]ᵀ diag(±1) X[:, pb]`` ([BM, BM]; rows >= CS, the teacher's, negated) of one sample's X
    (base ``xb``, row stride LD), over K in chunks of BK rows."""
    acc = tl.zeros([BM, BM], ACC)
    amask = pa < LD
    bmask = pb < LD
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        kin = k < K
        rows = k.to(tl.int64) * LD
        a = tl.load(xb + rows[:, None] + pa[None, :], mask=kin[:, None] & amask[None, :], other=0.0)
        b = tl.load(xb + rows[:, None] + pb[None, :], mask=kin[:, None] & bmask[None, :], other=0.0)
        b = tl.where((k < CS)[:, None], b, -b)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
    return acc


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _normalize_kernel(
    f_ptr, x_ptr, n_ptr,
    C, W, HW, LD, NPB, sxb, snb, sfb, sfc, sfh, sfw,
    eps_d: tl.float64,
    BP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
):
    """Pixels ``BP·(pid % NPB) ..`` of sample ``pid // NPB`` of one part (C channels, read with the strides sf*):
    ``x[c, p] = f[c, p] / (n_p + ε)`` (rows of stride LD, zero past HW) and ``n[p] = ‖f[:, p]‖``."""
    pid = tl.program_id(0)
    b = (pid // NPB).to(tl.int64)
    p = (pid % NPB) * BP + tl.arange(0, BP)
    pin = p < HW
    pst = p < LD
    foff = b * sfb + (p // W).to(tl.int64) * sfh + (p % W).to(tl.int64) * sfw
    ss = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m = pin[:, None] & (c < C)[None, :]
        v = tl.load(f_ptr + foff[:, None] + c.to(tl.int64)[None, :] * sfc, mask=m, other=0.0).to(ACC)
        ss += rowsum(v * v)
    n = _sqrt(ss, ACC)
    den = n + to_acc(eps_d, ACC)
    xoff = b * sxb + p
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cin = (c < C)[None, :]
        v = tl.load(f_ptr + foff[:, None] + c.to(tl.int64)[None, :] * sfc, mask=pin[:, None] & cin, other=0.0)
        v = v.to(ACC)
        y = div_rn(v, tl.zeros_like(v) + den[:, None], ACC)
        tl.store(x_ptr + xoff[:, None] + c.to(tl.int64)[None, :] * LD, y, mask=pst[:, None] & cin)
    tl.store(n_ptr + b * snb + p, n, mask=pst)


@triton.jit
def _fwd_kernel(
    x_ptr, pair_ptr, part_ptr,
    K, CS, HW, LD, NPAIR, sxb,
    L1: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Σ φ over the tile Δ_IJ of sample ``pid // NPAIR``, pair ``(I, J) = pairs[:, pid % NPAIR]`` (I <= J), doubled
    off the diagonal, to ``part[pid]``."""
    pid = tl.program_id(0)
    b = (pid // NPAIR).to(tl.int64)
    t = pid % NPAIR
    bi = tl.load(pair_ptr + t).to(tl.int32)
    bj = tl.load(pair_ptr + NPAIR + t).to(tl.int32)
    pi = bi * BM + tl.arange(0, BM)
    pj = bj * BM + tl.arange(0, BM)
    d = _delta_tile(x_ptr + b * sxb, pi, pj, K, CS, LD, BM, BK, ACC, PREC)
    if L1:
        v = tl.abs(d)
    else:
        v = d * d
    v = tl.where((pi < HW)[:, None] & (pj < HW)[None, :], v, 0.0)
    s = vecsum(rowsum(v))
    s = tl.where(bi == bj, s, 2.0 * s)
    tl.store(part_ptr + pid, s)


@triton.jit
def _bwd_kernel(
    x_ptr, g_ptr,
    K, CS, HW, LD, NBLK, NRB, R0, R1, sxb, sgb,
    L1: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """``G[r − R0, I] = Σ_J X[r, J] φ'(Δ_JI)`` for the rows r of row block ``pid % NRB`` (within [R0, R1)) and the
    pixel block I of sample b (``pid // NRB = b·NBLK + I``), recomputing every Δ_JI."""
    pid = tl.program_id(0)
    rb = pid % NRB
    t = pid // NRB
    bi = t % NBLK
    b = (t // NBLK).to(tl.int64)
    xb = x_ptr + b * sxb
    pi = bi * BM + tl.arange(0, BM)
    r = R0 + rb * BR + tl.arange(0, BR)
    rin = r < R1
    rows = r.to(tl.int64) * LD
    ivalid = pi < HW
    acc = tl.zeros([BR, BM], ACC)
    for j0 in range(0, LD, BM):
        pj = j0 + tl.arange(0, BM)
        d = _delta_tile(xb, pj, pi, K, CS, LD, BM, BK, ACC, PREC)  # Δ_JI
        e = tl.where((pj < HW)[:, None] & ivalid[None, :], _dphi(d, L1), 0.0)
        xr = tl.load(xb + rows[:, None] + pj[None, :], mask=rin[:, None] & (pj < LD)[None, :], other=0.0)
        acc = tl.dot(xr, e, acc, input_precision=PREC)
    gout = g_ptr + b * sgb + (r - R0).to(tl.int64)[:, None] * LD + pi[None, :]
    tl.store(gout, acc, mask=rin[:, None] & (pi < LD)[None, :])


@triton.jit
def _norm_bwd_kernel(
    g_ptr, x_ptr, n_ptr, s_ptr, o_ptr,
    C, HW, NPB, sgb, sgr, sxb, sxr, snb,
    eps_d: tl.float64,
    BP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, OUT_T: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """The normalisation's backward for pixels ``BP·(pid % NPB) ..`` of sample b = ``pid // NPB`` of one part:
    ``o[c, p] = s_b·(G[c, p]/(n_p + ε) − x̂[c, p]·(x̂[:, p]ᵀG[:, p])/n_p)`` (the second term 0 where n_p = 0), with
    G (rows of stride sgr), x̂ (stride sxr), n and the output (contiguous (C, HW) per sample)."""
    pid = tl.program_id(0)
    b = (pid // NPB).to(tl.int64)
    p = (pid % NPB) * BP + tl.arange(0, BP)
    pin = p < HW
    s = tl.load(s_ptr + b)
    n = tl.load(n_ptr + b * snb + p, mask=pin, other=1.0)
    goff = b * sgb + p
    xoff = b * sxb + p
    dot = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        c = (c0 + tl.arange(0, BC)).to(tl.int64)
        m = pin[:, None] & (c < C)[None, :]
        g = tl.load(g_ptr + goff[:, None] + c[None, :] * sgr, mask=m, other=0.0)
        x = tl.load(x_ptr + xoff[:, None] + c[None, :] * sxr, mask=m, other=0.0)
        dot += rowsum(x * g)
    dot = tl.where(n > 0.0, div_rn(s * dot, tl.where(n > 0.0, n, 1.0), ACC), 0.0)
    den = n + to_acc(eps_d, ACC)
    ooff = b * C * HW + p
    for c0 in range(0, C, BC):
        c = (c0 + tl.arange(0, BC)).to(tl.int64)
        m = pin[:, None] & (c < C)[None, :]
        g = tl.load(g_ptr + goff[:, None] + c[None, :] * sgr, mask=m, other=0.0)
        x = tl.load(x_ptr + xoff[:, None] + c[None, :] * sxr, mask=m, other=0.0)
        o = s * div_rn(g, tl.zeros_like(g) + den[:, None], ACC) - x * dot[:, None]
        tl.store(o_ptr + ooff[:, None] + c[None, :] * HW, cvt_store(o, OUT_T, EMULATE_RNE), mask=m)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(t: Tensor) -> str:
    """input_precision of the dots: for float32 math on CUDA "tf32" when torch.backends.cuda.matmul.allow_tf32 is
    on, else ``_FP32_DOT``; "ieee" otherwise (float64; the interpreter ignores it)."""
    if t.dtype != torch.float64 and t.device.type == "cuda":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else _FP32_DOT
    return "ieee"


def _tile(n: int, block: int) -> int:
    return min(block, max(_MIN_DOT, next_pow2(n)))


def _check_grid(op: str, programs: int, what: str):
    if programs > _MAX_PROGRAMS:
        fail(op, f"{programs} programs exceed the launch grid ({what})", NotImplementedError)


class _Plan:
    """Sizes, tiles and dtypes of one call (module docstring, "Tiles and launch configuration")."""

    def __init__(self, op: str, fs: Tensor, ft: Tensor, proj: Optional[Tensor], norm: str):
        self.op = op
        hw, k = _defs.check_feature_affinity(op, fs, ft, proj, norm)
        check_device(op, fs.device)
        self.B, self.cs, self.h, self.w = (int(s) for s in fs.shape)
        self.ct = int(ft.shape[1])
        self.K = self.cs + self.ct
        self.hw, self.k = hw, k
        self.l1 = norm == "l1"
        self.acc = math_dtype(fs)
        fp64 = self.acc == torch.float64
        self.BM = _tile(hw, _BLOCK_FP64 if fp64 else _BLOCK)
        self.BK = _tile(self.K, _BK_FP64 if fp64 else _BK)
        self.rows_max = _ROWS_FP64 if fp64 else _ROWS
        self.nblk = _cdiv(hw, self.BM)
        # exact: rows padded to whole tiles; fast: the products take the rows as they are
        self.LD = self.nblk * self.BM if k is None else hw
        self.prec = _precision(fs)
        self.device = fs.device
        self.meta = dict(ACC=TL_DTYPES[self.acc], num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)

    @property
    def empty(self) -> bool:
        return self.B == 0 or self.K == 0


def _normalise(p: _Plan, fs: Tensor, ft: Tensor) -> Tuple[Tensor, Tensor]:
    """X (B, K, LD) = [Ŝ; T̂] in the math dtype, zero past HW, and the per-pixel norms (B, 2, LD)."""
    x = torch.empty((p.B, p.K, p.LD), dtype=p.acc, device=p.device)
    nrm = torch.empty((p.B, 2, p.LD), dtype=p.acc, device=p.device)
    bp = min(_NORM_PIX, next_pow2(p.LD))
    npb = _cdiv(p.LD, bp)
    _check_grid(p.op, p.B * npb, f"B={p.B}, H*W={p.hw}")
    with on_device(p.device):
        for part, (f, row0, c) in enumerate(((fs, 0, p.cs), (ft, p.cs, p.ct))):
            if c == 0:
                continue
            _normalize_kernel[(p.B * npb,)](
                f, x[:, row0:], nrm[:, part], c, p.w, p.hw, p.LD, npb, x.stride(0), nrm.stride(0),
                *(int(s) for s in f.stride()), EPS,
                BP=bp, BC=min(_NORM_CH, next_pow2(c)), **p.meta)
    return x, nrm


def _exact_forward(p: _Plan, x: Tensor) -> Tensor:
    pairs = torch.triu_indices(p.nblk, p.nblk, device=p.device)  # (2, npair): I <= J
    npair = pairs.shape[1]
    _check_grid(p.op, p.B * npair, f"B={p.B}, {p.nblk} pixel blocks")
    part = torch.empty(p.B * npair, dtype=p.acc, device=p.device)
    with on_device(p.device):
        _fwd_kernel[(p.B * npair,)](
            x, pairs, part, p.K, p.cs, p.hw, p.LD, npair, x.stride(0),
            L1=p.l1, BM=p.BM, BK=p.BK, PREC=p.prec, **p.meta)
    return part.view(p.B, npair).sum(1, dtype=torch.float64)


def _chunks(p: _Plan, per_sample: int):
    """Sample ranges of the fast loss's products, each with about _FAST_CHUNK_ELEMS workspace elements."""
    step = max(1, min(p.B, _FAST_CHUNK_ELEMS // max(1, per_sample)))
    for b0 in range(0, p.B, step):
        yield b0, min(p.B, b0 + step)


def _signs(p: _Plan) -> Tensor:
    """(K, 1): +1 on the student's rows, −1 on the teacher's."""
    s = torch.ones((p.K, 1), dtype=p.acc, device=p.device)
    s[p.cs:] = -1
    return s


def _fast_products(x: Tensor, z: Tensor, signs: Tensor, u: Tensor, d: Tensor):
    """U_y = [Ŝ Z; −T̂ Z] into u (nb, K, k) and D = Xᵀ U_y into d (nb, HW, k)."""
    torch.mul(torch.matmul(x, z), signs, out=u)
    torch.bmm(x.transpose(1, 2), u, out=d)


def _dphi_(d: Tensor, l1: bool) -> Tensor:
    """φ'(D) in place: sign for l1 (sign(NaN) = 0, as _dphi), 2D for l2sq."""
    return torch.sign(d, out=d) if l1 else d.mul_(2)


def _fast_forward(p: _Plan, x: Tensor, z: Tensor, u: Tensor, e: Tensor) -> Tensor:
    """Σ φ(D) per sample (float64), filling u with U_y and e with φ'(D) (the backward's saved products)."""
    out = torch.empty(p.B, dtype=torch.float64, device=p.device)
    signs = _signs(p)
    for b0, b1 in _chunks(p, p.K * p.k):
        d = e[b0:b1]
        _fast_products(x[b0:b1], z, signs, u[b0:b1], d)
        out[b0:b1] = (d.abs() if p.l1 else d.square()).sum((1, 2), dtype=torch.float64)
        _dphi_(d, p.l1)
    return out


def _rows_wanted(p: _Plan, want_s: bool, want_t: bool) -> Tuple[int, int]:
    """The rows [R0, R1) of X whose gradient is asked for."""
    return (0 if want_s else p.cs), (p.K if want_t else p.cs)


def _exact_backward_rows(p: _Plan, x: Tensor, r0: int, r1: int) -> Tensor:
    """G (B, R1 − R0, LD) = X[R0:R1] φ'(Δ), unscaled."""
    nr = r1 - r0
    br = _tile(nr, p.rows_max)
    nrb = _cdiv(nr, br)
    _check_grid(p.op, p.B * p.nblk * nrb, f"B={p.B}, {p.nblk} pixel blocks, {nrb} row blocks")
    g = torch.empty((p.B, nr, p.LD), dtype=p.acc, device=p.device)
    with on_device(p.device):
        _bwd_kernel[(p.B * p.nblk * nrb,)](
            x, g, p.K, p.cs, p.hw, p.LD, p.nblk, nrb, r0, r1, x.stride(0), g.stride(0),
            L1=p.l1, BM=p.BM, BK=p.BK, BR=br, PREC=p.prec, **p.meta)
    return g


def _fast_backward_rows(p: _Plan, x: Tensor, z: Tensor, r0: int, r1: int, u: Optional[Tensor],
                        e: Optional[Tensor]) -> Tensor:
    """G (B, R1 − R0, HW) = U[R0:R1] φ'(D)ᵀ + (X[R0:R1] φ'(D)) Zᵀ, unscaled (U unsigned: the teacher's sign is in its
    scale), from the forward's saved u (U_y) and e (φ'(D)) when given, else recomputing them per chunk."""
    nr = r1 - r0
    g = torch.empty((p.B, nr, p.hw), dtype=p.acc, device=p.device)
    signs = _signs(p)
    zt = z.t()
    scratch = 0 if u is not None else p.K * p.k + p.hw * p.k
    for b0, b1 in _chunks(p, scratch + nr * p.k + nr * p.hw):
        xc = x[b0:b1]
        if u is not None:
            uc, ec = u[b0:b1], e[b0:b1]
        else:
            uc = torch.empty((b1 - b0, p.K, p.k), dtype=p.acc, device=p.device)
            ec = torch.empty((b1 - b0, p.hw, p.k), dtype=p.acc, device=p.device)
            _fast_products(xc, z, signs, uc, ec)
            _dphi_(ec, p.l1)
        rows = uc[:, r0:r1] * signs[r0:r1]
        torch.baddbmm(torch.matmul(torch.bmm(xc[:, r0:r1], ec), zt), rows, ec.transpose(1, 2), out=g[b0:b1])
    return g


def _norm_backward(p: _Plan, g: Tensor, x: Tensor, nrm: Tensor, scale: Tensor, out: Tensor):
    """out (B, C, H, W contiguous) = the normalisation's backward of the scaled G of one part (module docstring)."""
    c = int(out.shape[1])
    if c == 0:
        return
    bp = min(_NORM_PIX, next_pow2(p.hw))
    npb = _cdiv(p.hw, bp)
    _check_grid(p.op, p.B * npb, f"B={p.B}, H*W={p.hw}")
    with on_device(p.device):
        _norm_bwd_kernel[(p.B * npb,)](
            g, x, nrm, scale, out, c, p.hw, npb, g.stride(0), g.stride(1), x.stride(0), x.stride(1), nrm.stride(0),
            EPS, BP=bp, BC=min(_NORM_CH, next_pow2(c)), OUT_T=TL_DTYPES[out.dtype], EMULATE_RNE=EMULATE_RNE,
            **p.meta)


def _projection(p: _Plan, proj: Tensor) -> Tensor:
    return proj.to(device=p.device, dtype=p.acc).contiguous()


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "slimops_triton::feature_affinity_loss", mutates_args=(),
    schema="(Tensor fs, Tensor ft, Tensor? proj=None, str norm=\"l1\") -> (Tensor, Tensor, Tensor)")
def feature_affinity_loss(fs: Tensor, ft: Tensor, proj: Optional[Tensor] = None,
                          norm: str = "l1") -> Tuple[Tensor, Tensor, Tensor]:
    """(loss (B,), u, e): the per-sample feature-affinity losses, exact (tiles of Δ) or fast (through proj), and the
    fast loss's saved products u = [ŜZ; −T̂Z] (B, K, k) and e = φ'(ΔZ) (B, HW, k) (empty for the exact loss)."""
    p = _Plan("feature_affinity_loss", fs, ft, proj, norm)
    u_shape, e_shape = _defs.saved_shapes(fs, ft, p.k)
    u = torch.empty(u_shape, dtype=p.acc, device=p.device)
    e = torch.empty(e_shape, dtype=p.acc, device=p.device)
    if p.B == 0:
        return torch.empty(0, dtype=p.acc, device=p.device), u, e
    if p.K == 0:  # no channels: Δ = 0, and so are U and φ'(ΔZ)
        return torch.zeros(p.B, dtype=p.acc, device=p.device), u, e.zero_()
    x, _ = _normalise(p, fs, ft)
    if p.k is None:
        sums = _exact_forward(p, x)
        denom = float(p.hw) * float(p.hw)
    else:
        sums = _fast_forward(p, x, _projection(p, proj), u, e)
        denom = float(p.k) * float(p.hw) * float(p.hw)
    return (sums / denom).to(p.acc), u, e


@torch.library.custom_op("slimops_triton::feature_affinity_loss_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor fs, Tensor ft, Tensor? proj, str norm, bool[2] output_mask, "
                                "Tensor? u=None, Tensor? e=None) -> (Tensor, Tensor)")
def feature_affinity_loss_backward(grad: Tensor, fs: Tensor, ft: Tensor, proj: Optional[Tensor], norm: str,
                                   output_mask: Sequence[bool], u: Optional[Tensor] = None,
                                   e: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(grad_fs, grad_ft), contiguous in the features' dtype, recomputing the tiles (exact) or reading the fast
    loss's saved products u and e (recomputing them when not given); one not asked for is an empty tensor."""
    op = "feature_affinity_loss_backward"
    p = _Plan(op, fs, ft, proj, norm)
    _defs.check_grad(op, grad, fs)
    saved = _defs.check_saved(op, fs, ft, p.k, u, e)
    want_s, want_t = (bool(m) for m in output_mask)
    gs = torch.empty(fs.shape, dtype=fs.dtype, device=fs.device) if want_s else fs.new_empty(0)
    gt = torch.empty(ft.shape, dtype=ft.dtype, device=ft.device) if want_t else ft.new_empty(0)
    r0, r1 = _rows_wanted(p, want_s, want_t)
    if p.B == 0 or r1 == r0:  # nothing asked for, or only parts without channels (empty gradients)
        return gs, gt
    x, nrm = _normalise(p, fs, ft)
    g = grad.to(device=p.device, dtype=p.acc)
    if p.k is None:
        rows = _exact_backward_rows(p, x, r0, r1)
        scale = g * (2.0 / (float(p.hw) * float(p.hw)))
    else:
        rows = _fast_backward_rows(p, x, _projection(p, proj), r0, r1, u if saved else None, e if saved else None)
        scale = g * (1.0 / (float(p.k) * float(p.hw) * float(p.hw)))
    scale = scale.contiguous()
    if want_s:
        _norm_backward(p, rows, x[:, :p.cs], nrm[:, 0], scale, gs)
    if want_t:
        _norm_backward(p, rows[:, p.cs - r0:], x[:, p.cs:], nrm[:, 1], (-scale).contiguous(), gt)
    return gs, gt


# The fakes and autograd every backend shares (the backward calls feature_affinity_loss_backward above).
wire(_defs.DEFS, "slimops_triton")
