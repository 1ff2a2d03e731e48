"""Triton kernels of the ``spectral`` family, registered as ``torch.ops.slimops_triton.*``.

Same schemas as ``csrc/registration.cpp`` and the same semantics as :mod:`slimops.reference.spectral`
(docs/algorithms.md §7): ``x`` (B, H, W, C) real, channels last, any strides; orthonormal ``rfft2``/``irfft2``
over (H, W); float32 math for float32/bfloat16/float16 tensors, float64 math for float64 (the math dtype
follows ``x``; weights of another float dtype are converted on load); outputs rounded once to the dtype of
``x``, gradients to the dtype of their tensor; a gradient not asked for in ``output_mask`` is an empty
tensor. Grids up to ``MAX_FUSED_GRID`` x ``MAX_FUSED_GRID`` (64 x 64); larger ones raise
``NotImplementedError`` naming the op (also from the fake kernels, so ``torch.compile`` fails at trace time).

- ``spectral_filter(x, weight)``: ``irfft2(rfft2(x) * view_as_complex(weight), s=(H, W))``.
- ``spectral_filter_backward``: ``grad_x = spectral_filter(grad, conj(weight))``,
  ``grad_weight = view_as_real(sum_b alpha * rfft2(grad) * conj(rfft2(x)))``.
- ``adaptive_spectral_filter``: ``irfft2(M(X) * X) + x``, ``M`` AFF's complex block-diagonal channel MLP
  of the spectrum ``X = rfft2(x)`` followed by softshrink (formula in the reference module).
- ``adaptive_spectral_filter_backward``: all five gradients.

Kernel design (dense DFT matmuls, nothing complex in global memory)
--------------------------------------------------------------------
For grids this small a dense DFT is a handful of small GEMMs, so each transform is ``tl.dot`` against DFT
matrices, with the whole spectrum of a (sample, channel block) in registers: x (and grad) are read once,
y (grad_x) written once, and no spectrum, filter product or complex tensor ever goes to global memory.

* **DFT matrices.** Per (H, W, math dtype, device) one cached buffer ``[CW | SW | CH | SH | -SH]``, built
  on the host in float64 (angles reduced exactly, ``2 pi ((k n) mod N) / N``) and rounded to the math
  dtype: ``CW[kw, w] = cos / sqrt(W)``, ``SW[kw, w] = -sin / sqrt(W)`` (``[KWP, WP]``),
  ``CH[kh, h] = cos / sqrt(H)``, ``SH = sin / sqrt(H)`` (``[HP, HP]``, symmetric), zero outside the grid.
  ``HP, WP, KWP`` are the next powers of two >= 16 of ``H``, ``W``, ``W//2+1`` (every ``tl.dot`` dimension
  is a power of two >= 16); the zero padding makes the padded lanes of every stage exactly 0. ``-SH`` is
  stored rather than negated in the kernel (a negated operand is one more shared-memory buffer). The
  matrices are reloaded at each use (a few KB, L1/L2 resident) rather than held live.
* **One tile** (``BC`` channels of one sample) is a ``[HP*BC, WP]`` register tensor (rows (h, c), columns
  w: the data is always the M side of the dots, the DFT matrix the small N x K side, which is what lets
  Hopper's wgmma take the matrix from shared memory instead of every warp holding it in registers).
  W-direction real DFT ``Ar = x @ CW^T``, ``Ai = x @ SW^T`` (``[HP*BC, KWP]``, transposed views of the
  stored matrices); a register permute (``reshape / permute / reshape``: a shared-memory layout
  conversion when compiled) to ``[KWP*BC, HP]`` (rows (kw, c), columns h); H-direction complex DFT
  ``Xr = Ar @ CH + Ai @ SH``, ``Xi = Ai @ CH - Ar @ SH``. The spectrum layout is ``[KWP*BC, HP]``; filters
  are loaded in it. Inverse: ``Br = Zr @ CH - Zi @ SH``, ``Bi = Zi @ CH + Zr @ SH``, permute back to
  ``[HP*BC, KWP]``, c2r ``y = Br @ CW + Bi @ SW`` (``[HP*BC, WP]``). torch's c2r convention is
  ``y = sum_k alpha_kw Re(Z[k] e^{+i theta_k}) / sqrt(HW)``, ``alpha = 1`` for ``kw = 0`` (and ``kw = W/2``,
  W even), 2 elsewhere: the kernels multiply the spectrum by ``alpha`` before the inverse, and the
  imaginary parts of those columns then count only through the H transform, as in torch.fft.irfft2 (the
  ``SW`` rows vanish there). The adjoint of ``rfft2`` (AFF backward) is the same inverse without ``alpha``.
* **spectral_filter** (``_sf_fwd_kernel``): program = (sample, block of ``BC`` channels). ``BC``: the largest
  power of two with ``HP*WP*BC <= 2048`` (``_TILE_FWD``), raised to ``64 / min(HP, KWP)`` (64-row dots, a
  wgmma warpgroup) and capped at ``next_pow2(C)``: 8 for grids up to 16x16, 2 for 32x32, 1 for 64x64.
  4 warps, 8 when both transform dots have >= 128 rows. ``num_stages = 1`` everywhere (module constant).
* **spectral_filter_backward**: grad_x alone is ``_sf_fwd_kernel`` on ``grad`` with ``CONJ`` (conjugated
  filter). With grad_weight, ``_sf_bwd_kernel`` does both in one pass: program = (channel block, sample
  split) looping over its ``BPP`` samples: ``G = rfft2(grad_b)``, ``X = rfft2(x_b)``, ``P += G conj(X)`` in
  registers and (if asked) grad_x from ``G`` and the conjugated filter (re-read per sample: fewer live
  registers). Tile budget 1024 (``_TILE_BWD``: BC = 4 up to 16x16). Each program writes ``alpha * P`` to
  its slice of a float32 (float64) buffer ``(n_split, H, W//2+1, C, 2)``; one torch sum over the splits,
  one cast to the weight dtype. No atomics: bitwise deterministic run to run (the split depends only on
  the shapes). ``n_split`` aims at 512 programs (a few per SM).
* **adaptive_spectral_filter** (``_aff_fwd_kernel``): a program owns ``G`` whole AFF blocks of one sample
  (``G = 16 // Cb`` blocks when ``Cb = C/blocks < 16``, else 1; at most ``blocks``), their ``G*Cb``
  channels in ``BC = max(16, next_pow2(G*Cb))`` lanes. The spectrum is permuted to ``[KWP*HP, BC]`` (rows
  = frequencies) and the per-frequency complex MLP is 8 ``tl.dot`` against block-diagonal real/imaginary
  weight tiles ``W1 [BC, HBT]``, ``W2 [HBT, BC]`` (``HBT = max(16, next_pow2(G*Hb))``, zero off the
  diagonal blocks: one dense dot applies every block of the program). ReLU, softshrink,
  ``Z = alpha M X``, permute back, inverse, ``+ x`` (x re-read for the residual: an L2 hit), store.
* **adaptive_spectral_filter_backward** (``_aff_bwd_kernel``): fully fused, one launch. Program = (group of
  blocks, sample split) looping over its samples: ``X = rfft2(x_b)``, ``G = rfft2(grad_b)``, the MLP
  forward recomputed, ``dZ = alpha G``, ``dM = conj(X) dZ``, softshrink / ReLU masks (derivative 0 at the
  kinks, as torch), ``dO1 = dO2 W2^H``, and (if asked) ``dX = conj(M) dZ + dP1 W1^H`` through the adjoint
  transform plus ``grad`` (the residual) -> grad_x. Parameter gradients (``dW2 += O1^H dO2``,
  ``dW1 += X^H dP1``, bias column sums as dots with ones) are accumulated per chunk of 64 frequency rows
  with batched 3-D dots (a plain ``X^H dP1`` is a 16-row dot with K = all frequencies, whose operands every
  warp would hold whole) into ``(n_split * chunks, ...)`` float32 (float64) buffers summed by torch
  (deterministic, no atomics).

Precision: the DFTs need float32 accuracy; TF32 (10-bit mantissa) costs about three digits per transform
(numpy simulation of the forward transform, error relative to the largest coefficient: TF32 1e-3,
3xTF32 5e-7 - 1e-6, IEEE fp32 2e-7). So on CUDA, float32 dots use ``input_precision="tf32x3"`` (3xTF32 on
tensor cores), whatever torch's TF32 flags say, never plain TF32; ``_FP32_DOT = "ieee"`` switches to IEEE
FMA dots (exact fp32 products, no tensor cores; ptxas at 14x14: forward 219 registers instead of 91, fused
backward 856 B of spill, AFF backward 36 KB). The interpreter ignores the precision (numpy fp32
matmuls). float64 dots are float64. bfloat16/float16 tensors are converted to float32 on load (nothing is
multiplied in half precision, so the interpreter's wrong bf16 ``tl.dot`` does not arise); stores go
through ``cvt_store`` (round to nearest even, which the interpreter's fp32 -> bf16 conversion does not
do). Offsets along the batch axis (and of the partial buffers) are int64.

Launches per call: ``spectral_filter`` 1 kernel; ``spectral_filter_backward`` 1 kernel (the forward kernel
for grad_x alone; with grad_weight the fused backward, plus one torch sum over splits and a cast);
``adaptive_spectral_filter`` 1 kernel; ``adaptive_spectral_filter_backward`` 1 kernel (plus, when a
parameter gradient is asked for, a torch sum and a cast per asked parameter). The first call per grid,
dtype and device also builds the DFT buffer (one host-to-device copy). 0 kernels for an empty batch.

Coverage: H, W in [1, 64] (odd, non-square, 1xN, Nx1), any C >= 1 and channel-block remainder, any strides
of x and grad, float32/float64/bfloat16/float16 x with weights of any of those dtypes, ``blocks`` dividing
C, any hidden size, ``shrink >= 0``.

Verified: correctness through the interpreter (tests/test_spectral_triton.py). Every kernel variant (each
dtype, CONJ, NEED_DX / NEED_P, 3xTF32 and IEEE) was compiled for sm_90 with ``triton.compile`` on a machine
without a GPU, over grids 5x7 .. 64x64 and AFF blocks of 1 .. 48 channels. ptxas (sm_90a, fp32 math,
3xTF32; registers / spill stores / shared memory per CTA):

- spectral_filter forward, grids up to 16x16: 86-91 / 0 / 20 KB (wgmma); 32x32: 187 / 0 / 32 KB;
  64x33 and 64x64: 255 / 0.7-2.6 KB / 112 KB.
- fused backward, up to 16x16: 255 / 76-88 B / 18 KB (182 / 0 without grad_x); 32x32: 255 / 1.5 KB / 56 KB;
  64x64: 255 / 5.4 KB / 176-192 KB.
- AFF forward, 14x14 with 16 lanes (blocks of 8 channels): 237 / 0 / 36 KB; 7x7 with 32 lanes (24-channel
  blocks): 255 / 1.4 KB / 86 KB; 14x14 with 64 lanes (48-channel blocks): 255 / 7.5 KB / 198 KB.
- AFF backward, same cases: 255 / 3.5 KB / 86 KB; 10.6 KB / 198 KB; 41 KB / **518 KB**, more shared memory
  than any GPU has: such calls fail at launch with an error naming the op (``_launching``). 28x28 with 16
  lanes: 9.4 KB / 168 KB.
- float64: 14x14 fine (188 registers forward, mma.sync); at 64x64 ptxas falls back to 32 registers and
  85-126 KB of spill. bfloat16 / float16 as float32 (86-87 registers forward at 14x14).
- AFF on a 64x64 grid (16 lanes, 64K-element tiles) did not finish compiling within 8 minutes.

Not verified: nothing was run on a GPU; performance was never measured; the tile budgets and warp counts
are first guesses from the register counts above. Known limits: register and shared-memory pressure grow
with the grid (the DFT matrices are [64, 64] at 64x64) and, for the AFF ops, with the block width (``BC``
lanes); those configurations spill, the widest AFF backward does not fit at all, and beyond 16x16 they may
well lose to cuFFT, which ``slimops.ops.spectral.pick`` does not yet take into account below 64x64.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from slimops.opdefs import spectral as _defs
from slimops.opdefs import wire
from slimops.opdefs.spectral import MAX_FUSED_GRID
from slimops.triton._common import (EMULATE_RNE, TL_DTYPES, check_device, cvt_store, fail, math_dtype,
                                    next_pow2, on_device, to_acc)

__all__ = [
    "spectral_filter",
    "spectral_filter_backward",
    "adaptive_spectral_filter",
    "adaptive_spectral_filter_backward",
]

# Tile budgets (elements of one [HP*BC, WP] tile; they set the channel block BC), from ptxas for sm_90 with
# 3xTF32 dots on a 16x16 grid: forward BC=8, 8 warps: 91 registers; fused backward BC=4, 4 warps: 255
# registers and 88 B of spill stores (it holds two spectra and the weight-gradient accumulators).
_TILE_FWD = 2048
_TILE_BWD = 1024
# input_precision of float32 dots on CUDA: "tf32x3" (fp32-class accuracy on tensor cores) or "ieee" (FMA).
_FP32_DOT = "tf32x3"
_MIN_DOT = 16  # every tl.dot dimension is a power of two >= 16
# No software pipelining of the sample loops: staged copies of every shared-memory operand cost more than
# the loads they hide (sm_90, 64x33 grid backward: 491 KB of shared memory with 3 stages, 164 KB with 1).
_NUM_STAGES = 1
_TARGET_PROGRAMS = 512  # backward: split the batch until about this many programs run


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(b, B, c0, nch, H, W, C, sb, sh, sw, sc, HP: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr):
    """Offsets and mask of the ``[HP*BC, WP]`` tile (rows (h, c), columns w) of sample ``b`` (all masked off
    when ``b >= B``), channels ``c0 + c`` for lanes ``c < nch`` (and ``c0 + c < C``)."""
    j = tl.arange(0, HP * BC)
    h = j // BC
    c = j % BC
    w = tl.arange(0, WP)
    row = h.to(tl.int64) * sh + (c0 + c).to(tl.int64) * sc
    off = b.to(tl.int64) * sb + row[:, None] + (w.to(tl.int64) * sw)[None, :]
    # (the sample test as a vector compare: the interpreter turns `bool tensor & scalar bool` into ints)
    mask = ((h < H) & (c < nch) & (c0 + c < C) & (j * 0 + b < B))[:, None] & (w < W)[None, :]
    return off, mask


@triton.jit
def _freq_offsets(c0, nch, H, W, C, HP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Offsets (of the real part) into a ``(H, W//2+1, C, 2)`` tensor, mask, and the c2r weight ``alpha`` of the
    ``[KWP*BC, HP]`` spectrum tile (rows (kw, c), columns kh)."""
    KW = W // 2 + 1
    j = tl.arange(0, KWP * BC)
    kw = j // BC
    c = j % BC
    kh = tl.arange(0, HP)
    off = ((kh[None, :] * KW + kw[:, None]) * C + (c0 + c)[:, None]) * 2
    mask = ((kw < KW) & (c < nch) & (c0 + c < C))[:, None] & (kh < H)[None, :]
    one = tl.full([KWP * BC], 1.0, ACC)
    alpha = tl.where((kw == 0) | (2 * kw == W), one, one + one)
    return off, mask, alpha[:, None]


@triton.jit
def _swap02(t, A: tl.constexpr, B: tl.constexpr, BC: tl.constexpr):
    """``[A*BC, B]`` (rows (a, c), columns b) -> ``[B*BC, A]`` (rows (b, c), columns a)."""
    return tl.reshape(tl.permute(tl.reshape(t, [A, BC, B]), (2, 1, 0)), [B * BC, A])


@triton.jit
def _swap12(t, A: tl.constexpr, B: tl.constexpr, D: tl.constexpr):
    """``[A*B, D]`` (rows (a, b), columns d) -> ``[A*D, B]`` (rows (a, d), columns b)."""
    return tl.reshape(tl.permute(tl.reshape(t, [A, B, D]), (0, 2, 1)), [A * D, B])


@triton.jit
def _h_mats(dft_ptr, HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr):
    """(CH, SH, -SH), each ``[HP, HP]`` and symmetric (-SH is stored: a negated operand would be one more
    shared-memory buffer)."""
    h = tl.arange(0, HP)
    m = 2 * KWP * WP + h[:, None] * HP + h[None, :]
    return tl.load(dft_ptr + m), tl.load(dft_ptr + HP * HP + m), tl.load(dft_ptr + 2 * HP * HP + m)


@triton.jit
def _rdft2(t, dft_ptr, HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr,
           PREC: tl.constexpr):
    """Orthonormal rfft2 of the ``[HP*BC, WP]`` tile ``t`` -> (re, im), each ``[KWP*BC, HP]``."""
    w = tl.arange(0, WP)
    kw = tl.arange(0, KWP)
    mt = w[:, None] + kw[None, :] * WP  # [WP, KWP]: CW^T, SW^T as transposed views
    ar = tl.dot(t, tl.load(dft_ptr + mt), input_precision=PREC)
    ai = tl.dot(t, tl.load(dft_ptr + KWP * WP + mt), input_precision=PREC)
    ar = _swap02(ar, HP, KWP, BC)
    ai = _swap02(ai, HP, KWP, BC)
    ch, sh, shn = _h_mats(dft_ptr, HP, WP, KWP)
    xr = tl.dot(ai, sh, tl.dot(ar, ch, input_precision=PREC), input_precision=PREC)
    xi = tl.dot(ar, shn, tl.dot(ai, ch, input_precision=PREC), input_precision=PREC)
    return xr, xi


@triton.jit
def _irdft2(zr, zi, dft_ptr, HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr,
            PREC: tl.constexpr):
    """``y = sum_k Re(Z[k] e^{+i theta_k}) / sqrt(HW)`` of the ``[KWP*BC, HP]`` spectrum -> ``[HP*BC, WP]``
    (the c2r weight ``alpha`` is the caller's: multiply Z by it for irfft2, leave it out for the adjoint
    of rfft2)."""
    ch, sh, shn = _h_mats(dft_ptr, HP, WP, KWP)
    br = tl.dot(zi, shn, tl.dot(zr, ch, input_precision=PREC), input_precision=PREC)
    bi = tl.dot(zr, sh, tl.dot(zi, ch, input_precision=PREC), input_precision=PREC)
    br = _swap02(br, KWP, HP, BC)
    bi = _swap02(bi, KWP, HP, BC)
    kw = tl.arange(0, KWP)
    w = tl.arange(0, WP)
    m = kw[:, None] * WP + w[None, :]  # [KWP, WP]: CW, SW
    y = tl.dot(br, tl.load(dft_ptr + m), input_precision=PREC)
    return tl.dot(bi, tl.load(dft_ptr + KWP * WP + m), y, input_precision=PREC)


@triton.jit
def _softshrink(v, lam):  # NaN stays NaN, as in torch's softshrink
    return tl.where(v > lam, v - lam, tl.where(v < -lam, v + lam, tl.where(v != v, v, 0.0)))


@triton.jit
def _aff_offsets(blk0, G, nblk, CB, HB, BC: tl.constexpr, HBT: tl.constexpr):
    """Offsets (into one real/imaginary half) and masks of the block-diagonal weight tiles of AFF blocks
    ``blk0 .. blk0+G-1`` (``nblk`` = blocks in all): w1 ``[BC, HBT]``, b1 ``[HBT]``, w2 ``[HBT, BC]``, b2 ``[BC]``."""
    c = tl.arange(0, BC)
    j = tl.arange(0, HBT)
    bc = c // CB
    bj = j // HB
    gbc = blk0 + bc
    gbj = blk0 + bj
    cv = (bc < G) & (gbc < nblk)
    jv = (bj < G) & (gbj < nblk)
    oc = gbc * CB + c % CB  # the channel; also b2's offset
    oj = gbj * HB + j % HB  # the hidden unit; also b1's offset
    m1 = cv[:, None] & jv[None, :] & (bc[:, None] == bj[None, :])
    o1 = oc[:, None] * HB + (j % HB)[None, :]
    m2 = jv[:, None] & cv[None, :] & (bj[:, None] == bc[None, :])
    o2 = oj[:, None] * CB + (c % CB)[None, :]
    return o1, m1, oj, jv, o2, m2, oc, cv


@triton.jit
def _cmm(ar, ai, br, bi, PREC: tl.constexpr):
    """Complex ``A B`` from real and imaginary parts (4 tl.dot; negations on the register operand A)."""
    r = tl.dot(-ai, bi, tl.dot(ar, br, input_precision=PREC), input_precision=PREC)
    i = tl.dot(ar, bi, tl.dot(ai, br, input_precision=PREC), input_precision=PREC)
    return r, i


@triton.jit
def _cmm_bh(ar, ai, br, bi, PREC: tl.constexpr):
    """Complex ``A B^H``: the gradient of ``A`` through a product with ``B`` (``A``, ``B`` complex)."""
    r = tl.dot(ai, tl.trans(bi), tl.dot(ar, tl.trans(br), input_precision=PREC), input_precision=PREC)
    i = tl.dot(-ar, tl.trans(bi), tl.dot(ai, tl.trans(br), input_precision=PREC), input_precision=PREC)
    return r, i


@triton.jit
def _weight_grad_acc(ar, ai, dr, di, wr, wi, br, bi, RC: tl.constexpr, PREC: tl.constexpr):
    """The gradients of ``W`` and ``b`` in ``A W + b`` (complex; ``A`` ``[R, N1]``, ``D`` ``[R, N2]``, R rows of
    frequencies), accumulated per chunk of 64 rows: ``W[rc] += A[rc]^H D[rc]`` (``[RC, N1, N2]``) and
    ``b[rc] +=`` the column sums of ``D[rc]`` (``[RC, 16, N2]``, replicated over 16 rows: a dot with ones).
    Batched dots over the chunks keep every operand small (a plain ``A^H D`` would be a 16-row dot with
    K = R, whose operands every warp holds whole); the host sums the chunks."""
    a3r = tl.permute(tl.reshape(ar, [RC, 64, ar.shape[1]]), (0, 2, 1))
    a3i = tl.permute(tl.reshape(ai, [RC, 64, ai.shape[1]]), (0, 2, 1))
    d3r = tl.reshape(dr, [RC, 64, dr.shape[1]])
    d3i = tl.reshape(di, [RC, 64, di.shape[1]])
    wr = tl.dot(a3i, d3i, tl.dot(a3r, d3r, wr, input_precision=PREC), input_precision=PREC)
    wi = tl.dot(-a3i, d3r, tl.dot(a3r, d3i, wi, input_precision=PREC), input_precision=PREC)
    ones = tl.full([RC, 16, 64], 1.0, dr.dtype)
    return wr, wi, tl.dot(ones, d3r, br, input_precision=PREC), tl.dot(ones, d3i, bi, input_precision=PREC)


@triton.jit
def _aff_mlp(xr, xi, w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i, PREC: tl.constexpr):
    """Per frequency row: P1 = X W1 + b1, O1 = relu(P1), O2 = O1 W2 + b2 (complex, parts separately)."""
    p1r, p1i = _cmm(xr, xi, w1r, w1i, PREC)
    p1r += b1r[None, :]
    p1i += b1i[None, :]
    o1r = tl.where(p1r < 0, 0.0, p1r)  # ReLU that keeps NaN, as torch's relu
    o1i = tl.where(p1i < 0, 0.0, p1i)
    o2r, o2i = _cmm(o1r, o1i, w2r, w2i, PREC)
    return p1r, p1i, o1r, o1i, o2r + b2r[None, :], o2i + b2i[None, :]


@triton.jit
def _aff_load(w1_ptr, b1_ptr, w2_ptr, b2_ptr, o1, m1, oj, jv, o2, m2, oc, cv, NW, NB1, NB2,
              ACC: tl.constexpr):
    """(w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i) tiles in the math dtype; NW, NB1, NB2: the sizes of one
    real/imaginary half of w1 (= of w2), b1 and b2."""
    w1r = tl.load(w1_ptr + o1, mask=m1, other=0.0).to(ACC)
    w1i = tl.load(w1_ptr + NW + o1, mask=m1, other=0.0).to(ACC)
    b1r = tl.load(b1_ptr + oj, mask=jv, other=0.0).to(ACC)
    b1i = tl.load(b1_ptr + NB1 + oj, mask=jv, other=0.0).to(ACC)
    w2r = tl.load(w2_ptr + o2, mask=m2, other=0.0).to(ACC)
    w2i = tl.load(w2_ptr + NW + o2, mask=m2, other=0.0).to(ACC)
    b2r = tl.load(b2_ptr + oc, mask=cv, other=0.0).to(ACC)
    b2i = tl.load(b2_ptr + NB2 + oc, mask=cv, other=0.0).to(ACC)
    return w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _sf_fwd_kernel(
    x_ptr, w_ptr, dft_ptr, y_ptr,
    B, H, W, C, sxb, sxh, sxw, sxc,
    CONJ: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, OUT_T: tl.constexpr, EMULATE_RNE: tl.constexpr,
    HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr,
):
    """y = irfft2(rfft2(x) * K) for one (sample, channel block); K = conj(weight) with CONJ."""
    b = tl.program_id(0)
    c0 = tl.program_id(1) * BC
    off, mask = _tile_offsets(b, B, c0, BC, H, W, C, sxb, sxh, sxw, sxc, HP, WP, BC)
    t = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    xr, xi = _rdft2(t, dft_ptr, HP, WP, KWP, BC, PREC)
    foff, fmask, alpha = _freq_offsets(c0, BC, H, W, C, HP, KWP, BC, ACC)
    kr = tl.load(w_ptr + foff, mask=fmask, other=0.0).to(ACC) * alpha
    ki = tl.load(w_ptr + foff + 1, mask=fmask, other=0.0).to(ACC) * alpha
    if CONJ:
        ki = -ki
    y = _irdft2(xr * kr - xi * ki, xr * ki + xi * kr, dft_ptr, HP, WP, KWP, BC, PREC)
    yoff, _ = _tile_offsets(b, B, c0, BC, H, W, C, H * W * C, W * C, C, 1, HP, WP, BC)
    tl.store(y_ptr + yoff, cvt_store(y, OUT_T, EMULATE_RNE), mask=mask)


@triton.jit
def _sf_bwd_kernel(
    g_ptr, x_ptr, w_ptr, dft_ptr, dx_ptr, part_ptr,
    B, H, W, C, BPP,
    sgb, sgh, sgw, sgc, sxb, sxh, sxw, sxc,
    NEED_DX: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, OUT_T: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr,
):
    """For samples split*BPP .. +BPP of one channel block: part[split] = alpha * sum_b G conj(X) and (NEED_DX)
    grad_x = irfft2(G * conj(weight)); G = rfft2(grad), X = rfft2(x)."""
    c0 = tl.program_id(0) * BC
    split = tl.program_id(1)
    foff, fmask, alpha = _freq_offsets(c0, BC, H, W, C, HP, KWP, BC, ACC)
    pr = tl.full([KWP * BC, HP], 0.0, ACC)
    pi = tl.full([KWP * BC, HP], 0.0, ACC)
    for i in range(BPP):
        b = split * BPP + i
        goff, gmask = _tile_offsets(b, B, c0, BC, H, W, C, sgb, sgh, sgw, sgc, HP, WP, BC)
        gr, gi = _rdft2(tl.load(g_ptr + goff, mask=gmask, other=0.0).to(ACC), dft_ptr, HP, WP, KWP, BC, PREC)
        xoff, xmask = _tile_offsets(b, B, c0, BC, H, W, C, sxb, sxh, sxw, sxc, HP, WP, BC)
        xr, xi = _rdft2(tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(ACC), dft_ptr, HP, WP, KWP, BC, PREC)
        pr += gr * xr + gi * xi
        pi += gi * xr - gr * xi
        if NEED_DX:  # (the filter is re-read per sample, from L1/L2: fewer live registers)
            kr = tl.load(w_ptr + foff, mask=fmask, other=0.0).to(ACC) * alpha
            ki = tl.load(w_ptr + foff + 1, mask=fmask, other=0.0).to(ACC) * alpha
            d = _irdft2(gr * kr + gi * ki, gi * kr - gr * ki, dft_ptr, HP, WP, KWP, BC, PREC)
            doff, _ = _tile_offsets(b, B, c0, BC, H, W, C, H * W * C, W * C, C, 1, HP, WP, BC)
            tl.store(dx_ptr + doff, cvt_store(d, OUT_T, EMULATE_RNE), mask=xmask)
    poff = split.to(tl.int64) * (H * (W // 2 + 1) * C * 2) + foff
    tl.store(part_ptr + poff, pr * alpha, mask=fmask)
    tl.store(part_ptr + poff + 1, pi * alpha, mask=fmask)


@triton.jit
def _aff_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dft_ptr, y_ptr,
    B, H, W, C, NBLK, CB, HB, G, sxb, sxh, sxw, sxc, shrink: tl.float64,
    ACC: tl.constexpr, PREC: tl.constexpr, OUT_T: tl.constexpr, EMULATE_RNE: tl.constexpr,
    HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr, HBT: tl.constexpr,
):
    """y = irfft2(M(X) X) + x for AFF blocks pid*G .. +G of one sample."""
    b = tl.program_id(0)
    blk0 = tl.program_id(1) * G
    c0 = blk0 * CB
    nch = G * CB
    lam = to_acc(shrink, ACC)
    off, mask = _tile_offsets(b, B, c0, nch, H, W, C, sxb, sxh, sxw, sxc, HP, WP, BC)
    xr, xi = _rdft2(tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC), dft_ptr, HP, WP, KWP, BC, PREC)
    xr = _swap12(xr, KWP, BC, HP)  # [KWP*HP, BC]: rows = frequencies (kw, kh)
    xi = _swap12(xi, KWP, BC, HP)
    o1, m1, oj, jv, o2, m2, oc, cv = _aff_offsets(blk0, G, NBLK, CB, HB, BC, HBT)
    w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i = _aff_load(w1_ptr, b1_ptr, w2_ptr, b2_ptr, o1, m1, oj, jv, o2, m2,
                                                       oc, cv, NBLK * CB * HB, NBLK * HB, NBLK * CB, ACC)
    _, _, _, _, o2r, o2i = _aff_mlp(xr, xi, w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i, PREC)
    kw = tl.arange(0, KWP * HP) // HP
    one = tl.full([KWP * HP], 1.0, ACC)
    alpha = tl.where((kw == 0) | (2 * kw == W), one, one + one)[:, None]
    mr = _softshrink(o2r, lam) * alpha
    mi = _softshrink(o2i, lam) * alpha
    zr = _swap12(mr * xr - mi * xi, KWP, HP, BC)
    zi = _swap12(mr * xi + mi * xr, KWP, HP, BC)
    y = _irdft2(zr, zi, dft_ptr, HP, WP, KWP, BC, PREC)
    y += tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    yoff, _ = _tile_offsets(b, B, c0, nch, H, W, C, H * W * C, W * C, C, 1, HP, WP, BC)
    tl.store(y_ptr + yoff, cvt_store(y, OUT_T, EMULATE_RNE), mask=mask)


@triton.jit
def _aff_bwd_kernel(
    g_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dft_ptr, dx_ptr, pw1_ptr, pb1_ptr, pw2_ptr, pb2_ptr,
    B, H, W, C, NBLK, CB, HB, G, BPP,
    sgb, sgh, sgw, sgc, sxb, sxh, sxw, sxc, shrink: tl.float64,
    NEED_DX: tl.constexpr, NEED_P: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, OUT_T: tl.constexpr, EMULATE_RNE: tl.constexpr,
    HP: tl.constexpr, WP: tl.constexpr, KWP: tl.constexpr, BC: tl.constexpr, HBT: tl.constexpr,
    RC: tl.constexpr,
):
    """All gradients of the AFF op for samples split*BPP .. +BPP and AFF blocks pid*G .. +G: grad_x (NEED_DX)
    and this split's partial sums of the four parameter gradients per chunk of 64 frequencies (NEED_P; RC =
    KWP*HP/64 chunks)."""
    blk0 = tl.program_id(0) * G
    split = tl.program_id(1)
    c0 = blk0 * CB
    nch = G * CB
    lam = to_acc(shrink, ACC)
    NW = NBLK * CB * HB
    o1, m1, oj, jv, o2, m2, oc, cv = _aff_offsets(blk0, G, NBLK, CB, HB, BC, HBT)
    w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i = _aff_load(w1_ptr, b1_ptr, w2_ptr, b2_ptr, o1, m1, oj, jv, o2, m2,
                                                       oc, cv, NW, NBLK * HB, NBLK * CB, ACC)
    kw = tl.arange(0, KWP * HP) // HP
    one = tl.full([KWP * HP], 1.0, ACC)
    alpha = tl.where((kw == 0) | (2 * kw == W), one, one + one)[:, None]
    dw1r = tl.full([RC, BC, HBT], 0.0, ACC)  # per chunk of frequencies (see _weight_grad_acc)
    dw1i = tl.full([RC, BC, HBT], 0.0, ACC)
    dw2r = tl.full([RC, HBT, BC], 0.0, ACC)
    dw2i = tl.full([RC, HBT, BC], 0.0, ACC)
    db1r = tl.full([RC, 16, HBT], 0.0, ACC)
    db1i = tl.full([RC, 16, HBT], 0.0, ACC)
    db2r = tl.full([RC, 16, BC], 0.0, ACC)
    db2i = tl.full([RC, 16, BC], 0.0, ACC)
    for i in range(BPP):
        b = split * BPP + i
        xoff, xmask = _tile_offsets(b, B, c0, nch, H, W, C, sxb, sxh, sxw, sxc, HP, WP, BC)
        xr, xi = _rdft2(tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(ACC), dft_ptr, HP, WP, KWP, BC, PREC)
        xr = _swap12(xr, KWP, BC, HP)
        xi = _swap12(xi, KWP, BC, HP)
        goff, gmask = _tile_offsets(b, B, c0, nch, H, W, C, sgb, sgh, sgw, sgc, HP, WP, BC)
        gt = tl.load(g_ptr + goff, mask=gmask, other=0.0).to(ACC)
        gr, gi = _rdft2(gt, dft_ptr, HP, WP, KWP, BC, PREC)
        dzr = _swap12(gr, KWP, BC, HP) * alpha  # dL/dZ = alpha * rfft2(grad)
        dzi = _swap12(gi, KWP, BC, HP) * alpha
        p1r, p1i, o1r, o1i, o2r, o2i = _aff_mlp(xr, xi, w1r, w1i, b1r, b1i, w2r, w2i, b2r, b2i, PREC)
        # dM = conj(X) dZ through softshrink: 0 on [-lam, lam], passed elsewhere and at NaN (as torch)
        do2r = tl.where((o2r >= -lam) & (o2r <= lam), 0.0, xr * dzr + xi * dzi)
        do2i = tl.where((o2i >= -lam) & (o2i <= lam), 0.0, xr * dzi - xi * dzr)
        do1r, do1i = _cmm_bh(do2r, do2i, w2r, w2i, PREC)
        dp1r = tl.where(p1r <= 0, 0.0, do1r)  # torch's relu backward: a NaN passes the gradient
        dp1i = tl.where(p1i <= 0, 0.0, do1i)
        if NEED_P:
            dw2r, dw2i, db2r, db2i = _weight_grad_acc(o1r, o1i, do2r, do2i, dw2r, dw2i, db2r, db2i, RC, PREC)
            dw1r, dw1i, db1r, db1i = _weight_grad_acc(xr, xi, dp1r, dp1i, dw1r, dw1i, db1r, db1i, RC, PREC)
        if NEED_DX:
            mr = _softshrink(o2r, lam)
            mi = _softshrink(o2i, lam)
            # dX = conj(M) dZ + dP1 W1^H, then the adjoint of rfft2 (no alpha) and the residual's grad
            dxr, dxi = _cmm_bh(dp1r, dp1i, w1r, w1i, PREC)
            dxr += mr * dzr + mi * dzi
            dxi += mr * dzi - mi * dzr
            d = _irdft2(_swap12(dxr, KWP, HP, BC), _swap12(dxi, KWP, HP, BC), dft_ptr, HP, WP, KWP, BC,
                        PREC) + gt
            doff, _ = _tile_offsets(b, B, c0, nch, H, W, C, H * W * C, W * C, C, 1, HP, WP, BC)
            tl.store(dx_ptr + doff, cvt_store(d, OUT_T, EMULATE_RNE), mask=xmask)
    if NEED_P:  # partial sums: row (split * RC + chunk) of the (n_split * RC, ...) buffers
        rc = split.to(tl.int64) * RC + tl.arange(0, RC)[:, None, None]
        r16 = tl.arange(0, 16)[None, :, None]  # row 0 of the replicated bias sums
        tl.store(pw1_ptr + rc * (2 * NW) + o1[None, :, :], dw1r, mask=m1[None, :, :])
        tl.store(pw1_ptr + rc * (2 * NW) + NW + o1[None, :, :], dw1i, mask=m1[None, :, :])
        tl.store(pw2_ptr + rc * (2 * NW) + o2[None, :, :], dw2r, mask=m2[None, :, :])
        tl.store(pw2_ptr + rc * (2 * NW) + NW + o2[None, :, :], dw2i, mask=m2[None, :, :])
        ob1 = rc * (2 * NBLK * HB) + oj[None, None, :] + r16 * 0
        ob2 = rc * (2 * C) + oc[None, None, :] + r16 * 0
        tl.store(pb1_ptr + ob1, db1r, mask=(r16 == 0) & jv[None, None, :])
        tl.store(pb1_ptr + ob1 + NBLK * HB, db1i, mask=(r16 == 0) & jv[None, None, :])
        tl.store(pb2_ptr + ob2, db2r, mask=(r16 == 0) & cv[None, None, :])
        tl.store(pb2_ptr + ob2 + C, db2i, mask=(r16 == 0) & cv[None, None, :])


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

_DFT_CACHE: dict = {}


def _pads(h: int, w: int) -> Tuple[int, int, int]:
    """(HP, WP, KWP): the padded dot sizes of H, W and W//2+1."""
    return tuple(max(_MIN_DOT, next_pow2(n)) for n in (h, w, w // 2 + 1))


def _dft_mats(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The packed DFT buffer ``[CW | SW | CH | SH | -SH]`` of an H x W grid (module docstring), cached."""
    key = (h, w, dtype, device)
    buf = _DFT_CACHE.get(key)
    if buf is None:
        hp, wp, kwp = _pads(h, w)

        def trig(rows: int, n: int, rp: int, cp: int):
            k = torch.arange(rows, dtype=torch.int64)[:, None]
            j = torch.arange(n, dtype=torch.int64)[None, :]
            ang = (k * j % n).to(torch.float64) * (2 * math.pi / n)
            c = torch.zeros(rp, cp, dtype=torch.float64)
            s = torch.zeros(rp, cp, dtype=torch.float64)
            c[:rows, :n] = torch.cos(ang) / math.sqrt(n)
            s[:rows, :n] = torch.sin(ang) / math.sqrt(n)
            return c, s

        cw, sw = trig(w // 2 + 1, w, kwp, wp)
        ch, sh = trig(h, h, hp, hp)
        buf = torch.cat([cw.reshape(-1), -sw.reshape(-1), ch.reshape(-1), sh.reshape(-1), -sh.reshape(-1)])
        buf = buf.to(device=device, dtype=dtype).contiguous()
        _DFT_CACHE[key] = buf
    return buf


def _precision(x: Tensor) -> str:
    """input_precision of the float32 dots: 3xTF32 on CUDA (module docstring), IEEE in the interpreter (which
    ignores it)."""
    if x.dtype != torch.float64 and x.device.type == "cuda":
        return _FP32_DOT
    return "ieee"


def _check_grid(op: str, x: Tensor):
    h, w = x.shape[1], x.shape[2]
    if max(h, w) > MAX_FUSED_GRID:
        fail(op, f"the fused Triton kernel covers grids up to {MAX_FUSED_GRID}x{MAX_FUSED_GRID}, x has {h}x{w} "
                  "(use backend='cuda', the cuFFT path, or 'cpu')", NotImplementedError)


def _warps(hp: int, kwp: int, bc: int) -> int:
    """4 warps, or 8 when the smaller M of the transform dots (HP*BC, KWP*BC) holds two wgmma warpgroups of
    64 rows."""
    return 8 if min(hp, kwp) * bc >= 128 else 4


class _Plan:
    """Geometry, tiles and dtypes of one call."""

    def __init__(self, x: Tensor, bc: int):
        self.B, self.H, self.W, self.C = (int(s) for s in x.shape)
        self.HP, self.WP, self.KWP = _pads(self.H, self.W)
        self.BC = bc
        self.acc = math_dtype(x)
        self.dft = _dft_mats(self.H, self.W, self.acc, x.device)
        self.meta = dict(ACC=TL_DTYPES[self.acc], PREC=_precision(x), EMULATE_RNE=EMULATE_RNE,
                         HP=self.HP, WP=self.WP, KWP=self.KWP, BC=bc,
                         num_warps=_warps(self.HP, self.KWP, bc), num_stages=_NUM_STAGES)

    def split(self, n_cols: int) -> Tuple[int, int]:
        """(n_split, samples per split) of a backward over ``n_cols`` channel blocks."""
        n_split = max(1, min(self.B, -(-_TARGET_PROGRAMS // n_cols)))
        bpp = -(-self.B // n_split)
        return -(-self.B // bpp), bpp


def _filter_plan(x: Tensor, backward: bool) -> _Plan:
    """spectral_filter: ``BC`` = the largest power of two whose tile fits the kernel's budget, but at least
    enough for 64-row transform dots (wgmma's M) and at most next_pow2(C)."""
    hp, wp, kwp = _pads(x.shape[1], x.shape[2])
    budget = _TILE_BWD if backward else _TILE_FWD
    bc = max(budget // (hp * wp), 64 // min(hp, kwp), 1)
    return _Plan(x, min(next_pow2(x.shape[3]), bc))


def _aff_plan(x: Tensor, w1: Tensor, blocks: int) -> Tuple[_Plan, int, int, int, int]:
    """(plan, Cb, Hb, G blocks per program, HBT)."""
    cb, hb = x.shape[3] // blocks, int(w1.shape[3])
    g = max(1, min(blocks, _MIN_DOT // cb))
    plan = _Plan(x, max(_MIN_DOT, next_pow2(g * cb)))
    return plan, cb, hb, g, max(_MIN_DOT, next_pow2(g * hb))


class _launching(on_device):
    """The launch context, plus a clear error naming the op when a configuration needs more shared memory
    or registers than the GPU has (Triton raises that at the first launch; see "Known limits")."""

    def __init__(self, op: str, device: torch.device):
        super().__init__(device)
        self.op = op

    def __exit__(self, et, ev, tb):
        super().__exit__(et, ev, tb)
        if isinstance(ev, OutOfResources):
            fail(self.op, f"the fused Triton kernel does not fit this GPU for this grid / channel block ({ev}); "
                           "use backend='cuda' (cuFFT)", RuntimeError)
        return False


def _strides(t: Tensor):
    return tuple(int(s) for s in t.stride())


def _launch_filter(op: str, src: Tensor, weight: Tensor, out_dtype: torch.dtype, conj: bool) -> Tensor:
    p = _filter_plan(src, backward=False)
    y = torch.empty(src.shape, dtype=out_dtype, device=src.device)
    if p.B == 0:
        return y
    grid = (p.B, -(-p.C // p.BC))
    with _launching(op, src.device):
        _sf_fwd_kernel[grid](src, weight, p.dft, y, p.B, p.H, p.W, p.C, *_strides(src),
                             CONJ=conj, OUT_T=TL_DTYPES[out_dtype], **p.meta)
    return y


def _reduce_splits(part: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum of the per-split partials (dim 0) in the math dtype, then one rounding to ``dtype``."""
    out = part[0] if part.shape[0] == 1 else part.sum(0)
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("slimops_triton::spectral_filter", mutates_args=(),
                         schema="(Tensor x, Tensor weight) -> Tensor")
def spectral_filter(x: Tensor, weight: Tensor) -> Tensor:
    """irfft2(rfft2(x) * view_as_complex(weight), s=(H, W)); 1 launch."""
    op = "spectral_filter"
    _defs.check_spectral_filter(op, x, weight)
    check_device(op, x.device)
    _check_grid(op, x)
    return _launch_filter(op, x, weight.contiguous(), x.dtype, conj=False)


@torch.library.custom_op("slimops_triton::spectral_filter_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor weight, bool[2] output_mask) -> (Tensor, Tensor)")
def spectral_filter_backward(grad: Tensor, x: Tensor, weight: Tensor,
                             output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_weight) of spectral_filter; one fused pass when both are asked for."""
    op = "spectral_filter_backward"
    _defs.check_spectral_filter(op, x, weight)
    _defs.check_grad(op, grad, x)
    check_device(op, x.device)
    _check_grid(op, x)
    want_x, want_w = (bool(m) for m in output_mask)
    wt = weight.contiguous()
    if not want_w:
        gx = _launch_filter(op, grad, wt, x.dtype, conj=True) if want_x else x.new_empty(0)
        return gx, weight.new_empty(0)
    p = _filter_plan(x, backward=True)
    if p.B == 0:
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_x else x.new_empty(0)
        return gx, torch.zeros_like(weight, memory_format=torch.contiguous_format)
    n_cblk = -(-p.C // p.BC)
    n_split, bpp = p.split(n_cblk)
    part = torch.empty((n_split, *weight.shape), dtype=p.acc, device=x.device)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_x else part  # (a dummy pointer)
    with _launching(op, x.device):
        _sf_bwd_kernel[(n_cblk, n_split)](grad, x, wt, p.dft, gx, part, p.B, p.H, p.W, p.C, bpp,
                                          *_strides(grad), *_strides(x),
                                          NEED_DX=want_x, OUT_T=TL_DTYPES[x.dtype], **p.meta)
    return (gx if want_x else x.new_empty(0)), _reduce_splits(part, weight.dtype)


@torch.library.custom_op("slimops_triton::adaptive_spectral_filter", mutates_args=(),
                         schema="(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int blocks, float shrink) "
                                "-> Tensor")
def adaptive_spectral_filter(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, blocks: int,
                             shrink: float) -> Tensor:
    """irfft2(M(X) * X) + x, M AFF's complex block-diagonal MLP of X = rfft2(x); 1 launch."""
    op = "adaptive_spectral_filter"
    _defs.check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink)
    check_device(op, x.device)
    _check_grid(op, x)
    p, cb, hb, g, hbt = _aff_plan(x, w1, blocks)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if p.B == 0:
        return y
    with _launching(op, x.device):
        _aff_fwd_kernel[(p.B, -(-blocks // g))](
            x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), p.dft, y,
            p.B, p.H, p.W, p.C, blocks, cb, hb, g, *_strides(x), float(shrink),
            OUT_T=TL_DTYPES[x.dtype], HBT=hbt, **p.meta)
    return y


@torch.library.custom_op("slimops_triton::adaptive_spectral_filter_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int blocks, "
                                "float shrink, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def adaptive_spectral_filter_backward(grad: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                                      blocks: int, shrink: float, output_mask: Sequence[bool]
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_w1, grad_b1, grad_w2, grad_b2) of adaptive_spectral_filter; 1 fused launch."""
    op = "adaptive_spectral_filter_backward"
    _defs.check_adaptive(op, x, w1, b1, w2, b2, blocks, shrink)
    _defs.check_grad(op, grad, x)
    check_device(op, x.device)
    _check_grid(op, x)
    mask = [bool(m) for m in output_mask]
    params = (w1, b1, w2, b2)
    need_p = any(mask[1:])
    out = [x.new_empty(0)] + [t.new_empty(0) for t in params]
    if not any(mask):
        return tuple(out)
    p, cb, hb, g, hbt = _aff_plan(x, w1, blocks)
    if mask[0]:
        out[0] = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if p.B == 0:
        for k in range(1, 5):
            if mask[k]:
                out[k] = torch.zeros_like(params[k - 1], memory_format=torch.contiguous_format)
        return tuple(out)
    n_gblk = -(-blocks // g)
    n_split, bpp = p.split(n_gblk) if need_p else (p.B, 1)
    rc = p.KWP * p.HP // 64  # chunks of 64 frequencies of the parameter-gradient partials
    parts = [torch.empty((n_split * rc if need_p else 1, *t.shape), dtype=p.acc, device=x.device) for t in params]
    dx = out[0] if mask[0] else parts[0]  # (a dummy pointer without grad_x)
    with _launching(op, x.device):
        _aff_bwd_kernel[(n_gblk, n_split)](
            grad, x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), p.dft, dx, *parts,
            p.B, p.H, p.W, p.C, blocks, cb, hb, g, bpp, *_strides(grad), *_strides(x), float(shrink),
            NEED_DX=mask[0], NEED_P=need_p, OUT_T=TL_DTYPES[x.dtype], HBT=hbt, RC=rc, **p.meta)
    for k in range(1, 5):
        if mask[k]:
            out[k] = _reduce_splits(parts[k - 1], params[k - 1].dtype)
    return tuple(out)


# The fakes of slimops.opdefs.spectral (same checks, same errors), plus this backend's grid limit.
def _with_grid_check(op: str, fake):
    def _fake(*args):
        out = fake(*args)
        _check_grid(op, args[1] if op.endswith("_backward") else args[0])
        return out

    return _fake


wire(_defs.DEFS, "slimops_triton", _with_grid_check)
