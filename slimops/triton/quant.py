"""Triton kernels of the ``quant`` family (``fda_sign``, ``fake_quantize`` and their backwards), registered as
``torch.ops.slimops_triton.*``.

Same schemas and the same arithmetic as the C++ kernels (``csrc/cpu/quant.cpp``,
``csrc/include/slimops/quant_math.h``; maths in docs/algorithms.md §9): fp32 math for fp32/bf16/fp16 storage,
fp64 for fp64, round half to even, IEEE division (``div_rn``), no FMA contraction.

* ``fda_sign`` / ``fda_sign_backward``: elementwise, ``BLOCK`` elements per program; the surrogate is a
  ``tl.constexpr`` (one branch compiled per launch). The FDA sum uses the closed form after reducing
  ``u = kπ + δ`` (π in two constants), as the C++ kernel. ``1 - tanh²`` is computed as ``4e/(1+e)²`` with
  ``e = exp(-2|x|)`` (no tanh builtin; no overflow).
* ``fake_quantize``: x seen as ``(outer, channels, inner)`` rows of ``inner`` contiguous elements, one scale per
  row's channel; a program owns ``BLOCK`` elements of one row, so it loads its scale and zero point once. The
  backward writes ``grad_x`` and one partial sum of the scale (and zero-point) gradient per program into a
  float32 / float64 buffer that torch then sums per channel: no atomics, so the result is deterministic.
  Rows shorter than ``BLOCK`` (a per-channel axis near the last dim) leave lanes idle: correct, not fast.
* Rounding: ``(|v| + 2^23) - 2^23`` with the sign put back (fp32; ``2^52`` for fp64) is round-half-to-even for
  every ``|v| < 2^23``, and larger values are integers already: exact for any v, like the C++ ``nearbyint``.
* Scalars travel as fp64 kernel arguments (annotated: compiled Triton would otherwise type a Python float fp32).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.opdefs import quant as _defs
from slimops.opdefs import wire
from slimops.triton._common import (EMULATE_RNE, TL_DTYPES, check_device, cvt_store, div_rn, math_dtype, on_device,
                                    to_acc, vecsum)

_BLOCK = 1024
_NUM_WARPS = 4
_SURROGATE_CODES = {"fda": 0, "ste": 1, "tanh": 2, "approx_sign": 3}  # enum class Surrogate (quant_math.h)


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _rint(v, ACC: tl.constexpr):
    """Round half to even: (|v| + 2^23) - 2^23 (2^52 in fp64) rounds |v| < 2^23 exactly, the sign is put back;
    from 2^23 (2^52) on every value is an integer already."""
    a = tl.abs(v)
    if ACC == tl.float32:
        r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    else:
        r = tl.where(a < 4503599627370496.0, (a + 4503599627370496.0) - 4503599627370496.0, a)
    return tl.where(v < 0.0, -r, tl.where(v != v, v, r))


@triton.jit
def _cos_odd_sum(u, n_terms, ACC: tl.constexpr):
    """sum_{i<n} cos((2i+1) u) = (-1)^k sin(2 n d) / (2 sin d), u = k pi + d; n at d = 0 (quant_math.h)."""
    k = _rint(u * 0.318309886183790671538, ACC)
    d = (u - k * 3.140625) - k * 9.67653589793e-4
    s = tl.sin(d)
    n = (n_terms + tl.zeros([], ACC)).to(ACC)
    r = tl.where(s == 0.0, n, div_rn(tl.sin(2.0 * n * d), 2.0 * s, ACC))
    odd = (k - 2.0 * tl.floor(k * 0.5)) != 0.0
    return tl.where(odd, -r, r)


@triton.jit
def _surrogate(x, n_terms, omega, four_omega_pi, clip, SURROGATE: tl.constexpr, ACC: tl.constexpr):
    """d sign / dx as the surrogate sees it, zero where |x| > clip, NaN for NaN (sign_surrogate in quant_math.h)."""
    ax = tl.abs(x)
    if SURROGATE == 0:
        d = four_omega_pi * _cos_odd_sum(omega * x, n_terms, ACC)
    elif SURROGATE == 1:
        d = tl.full(x.shape, 1.0, ACC)
    elif SURROGATE == 2:
        e = tl.exp(-2.0 * ax)
        d = div_rn(4.0 * e, (1.0 + e) * (1.0 + e), ACC)
    else:
        d = tl.where(ax < 1.0, 2.0 - 2.0 * ax, 0.0)
    d = tl.where(ax <= clip, d, 0.0)
    return tl.where(x != x, x, d)


@triton.jit
def _level(v, z, qn, qp, BINARY: tl.constexpr, ACC: tl.constexpr):
    """The integer level of v = x / s: clamp(round(v) + z, qn, qp), or +-1 on the binary grid; NaN stays NaN."""
    if BINARY:
        q = tl.where(v > 0.0, 1.0, tl.where(v != v, v, -1.0))
    else:
        vc = tl.where(v < qn - z - 1.0, qn - z - 1.0, v)
        vc = tl.where(vc > qp - z + 1.0, qp - z + 1.0, vc)
        q = _rint(vc, ACC) + z
        q = tl.where(q < qn, qn, q)
        q = tl.where(q > qp, qp, q)
    return q


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fda_fwd_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                    EMULATE_RNE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
    y = tl.where(x > 0.0, 1.0, tl.where(x != x, x, -1.0))
    tl.store(out_ptr + offs, cvt_store(y, DTYPE, EMULATE_RNE), mask=m)


@triton.jit
def _fda_bwd_kernel(g_ptr, x_ptr, out_ptr, n, n_terms, omega_d: tl.float64, four_omega_pi_d: tl.float64,
                    clip_d: tl.float64,
                    SURROGATE: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                    EMULATE_RNE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    omega, fwp, clip = to_acc(omega_d, ACC), to_acc(four_omega_pi_d, ACC), to_acc(clip_d, ACC)
    d = _surrogate(x, n_terms, omega, fwp, clip, SURROGATE, ACC)
    tl.store(out_ptr + offs, cvt_store(g * d, DTYPE, EMULATE_RNE), mask=m)


@triton.jit
def _grid_of(scale_ptr, zp_ptr, ch, qn, qp, HAS_Z: tl.constexpr, ACC: tl.constexpr):
    """(s, 1/s, z) of channel ``ch``: z = clamp(round(zero_point), qn, qp), 0 without one."""
    s = tl.load(scale_ptr + ch).to(ACC)
    inv = div_rn(tl.full([], 1.0, ACC), s, ACC)
    if HAS_Z:
        z = _rint(tl.load(zp_ptr + ch).to(ACC), ACC)
        z = tl.where(z < qn, qn, z)
        z = tl.where(z > qp, qp, z)
    else:
        z = tl.full([], 0.0, ACC)
    return s, inv, z


@triton.jit
def _block_of(pid, x_ptr, scale_ptr, zp_ptr, channels, inner, per_row, qn, qp, HAS_Z: tl.constexpr,
              ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``pid``'s block of its row: (offsets, mask, v = x / s, s, z)."""
    row = pid // per_row
    s, inv, z = _grid_of(scale_ptr, zp_ptr, row % channels, qn, qp, HAS_Z, ACC)
    cols = (pid % per_row) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inner
    offs = row * inner + cols
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC) * inv
    return offs, m, v, s, z


@triton.jit
def _fq_fwd_kernel(x_ptr, scale_ptr, zp_ptr, out_ptr, channels, inner, per_row, qn_d: tl.float64, qp_d: tl.float64,
                   HAS_Z: tl.constexpr, BINARY: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    qn, qp = to_acc(qn_d, ACC), to_acc(qp_d, ACC)
    offs, m, v, s, z = _block_of(pid, x_ptr, scale_ptr, zp_ptr, channels, inner, per_row, qn, qp, HAS_Z, ACC, BLOCK)
    q = _level(v, z, qn, qp, BINARY, ACC)
    tl.store(out_ptr + offs, cvt_store((q - z) * s, DTYPE, EMULATE_RNE), mask=m)


@triton.jit
def _fq_bwd_kernel(g_ptr, x_ptr, scale_ptr, zp_ptr, gx_ptr, ds_ptr, dz_ptr, channels, inner, per_row, qn_d: tl.float64,
                   qp_d: tl.float64,
                   HAS_Z: tl.constexpr, BINARY: tl.constexpr, NEED_X: tl.constexpr, NEED_S: tl.constexpr,
                   NEED_Z: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                   EMULATE_RNE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    qn, qp = to_acc(qn_d, ACC), to_acc(qp_d, ACC)
    offs, m, v, s, z = _block_of(pid, x_ptr, scale_ptr, zp_ptr, channels, inner, per_row, qn, qp, HAS_Z, ACC, BLOCK)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    inside = (v + z >= qn) & (v + z <= qp)
    if NEED_X:
        tl.store(gx_ptr + offs, cvt_store(tl.where(inside, g, 0.0), DTYPE, EMULATE_RNE), mask=m)
    if NEED_S:
        q = _level(v, z, qn, qp, BINARY, ACC)
        ds = tl.where(m, g * tl.where(inside, (q - z) - v, q - z), 0.0)
        tl.store(ds_ptr + pid, vecsum(ds))
    if NEED_Z:
        dz = tl.where(m & ~inside, -g * s, 0.0)
        tl.store(dz_ptr + pid, vecsum(dz))


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


class _Rows:
    """x as (outer, channels, inner) rows; ``per_row`` programs of ``_BLOCK`` elements each."""

    def __init__(self, x: Tensor, axis: Optional[int]):
        shape = list(x.shape)
        self.channels = 1 if axis is None else shape[axis]
        self.inner = x.numel() if axis is None else int(torch.Size(shape[axis + 1:]).numel())
        outer = 1 if axis is None else int(torch.Size(shape[:axis]).numel())
        self.outer = outer
        self.per_row = max(1, triton.cdiv(self.inner, _BLOCK))
        self.programs = 0 if x.numel() == 0 else outer * self.channels * self.per_row


def _flat_params(scale: Tensor, zero_point: Optional[Tensor]):
    s = scale.reshape(-1).contiguous()
    z = zero_point.reshape(-1).contiguous() if zero_point is not None else s  # a dummy pointer when absent
    return s, z


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("slimops_triton::fda_sign", mutates_args=(),
                         schema="(Tensor x, int n_terms=10, float omega=0.1, str surrogate=\"fda\", float clip=1.0) "
                                "-> Tensor")
def fda_sign(x: Tensor, n_terms: int = 10, omega: float = 0.1, surrogate: str = "fda", clip: float = 1.0) -> Tensor:
    """sign(x) (0 -> -1); one launch."""
    op = "fda_sign"
    _defs.check_fda_sign(op, x, n_terms, omega, surrogate, clip)
    check_device(op, x.device)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    if n:
        with on_device(x.device):
            _fda_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
                xc, out, n, DTYPE=TL_DTYPES[x.dtype], ACC=TL_DTYPES[math_dtype(x)], BLOCK=_BLOCK, EMULATE_RNE=EMULATE_RNE,
                num_warps=_NUM_WARPS)
    return out


@torch.library.custom_op("slimops_triton::fda_sign_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, int n_terms, float omega, str surrogate, float clip) -> Tensor")
def fda_sign_backward(grad: Tensor, x: Tensor, n_terms: int, omega: float, surrogate: str, clip: float) -> Tensor:
    """The surrogate gradient of fda_sign; one launch."""
    op = "fda_sign_backward"
    n_terms, omega, clip = _defs.check_fda_sign(op, x, n_terms, omega, surrogate, clip)
    _defs.check_grad(op, grad, x)
    check_device(op, x.device)
    xc = x.contiguous()
    gc = grad.to(x.dtype).contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    if n:
        with on_device(x.device):
            _fda_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
                gc, xc, out, n, n_terms, omega, 4.0 * omega / math.pi, clip,
                SURROGATE=_SURROGATE_CODES[surrogate], DTYPE=TL_DTYPES[x.dtype], ACC=TL_DTYPES[math_dtype(x)], BLOCK=_BLOCK,
                EMULATE_RNE=EMULATE_RNE, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return out


@torch.library.custom_op("slimops_triton::fake_quantize", mutates_args=(),
                         schema="(Tensor x, Tensor scale, Tensor? zero_point=None, int bits=8, "
                                "int? per_channel_axis=None, bool signed=True, float grad_factor=1.0) -> Tensor")
def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, bits: int = 8,
                  per_channel_axis: Optional[int] = None, signed: bool = True, grad_factor: float = 1.0) -> Tensor:
    """(clamp(round(x/s) + z, Qn, Qp) - z) s; one launch."""
    op = "fake_quantize"
    axis, _ = _defs.check_fake_quantize(op, x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)
    check_device(op, x.device)
    qn, qp = _defs.levels(bits, signed)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    r = _Rows(xc, axis)
    if r.programs:
        s, z = _flat_params(scale, zero_point)
        with on_device(x.device):
            _fq_fwd_kernel[(r.programs,)](
                xc, s, z, out, r.channels, r.inner, r.per_row, float(qn), float(qp),
                HAS_Z=zero_point is not None, BINARY=signed and bits == 1, DTYPE=TL_DTYPES[x.dtype], ACC=TL_DTYPES[math_dtype(x)],
                BLOCK=_BLOCK, EMULATE_RNE=EMULATE_RNE, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return out


@torch.library.custom_op("slimops_triton::fake_quantize_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor scale, Tensor? zero_point, int bits, "
                                "int? per_channel_axis, bool signed, float grad_factor, bool[3] output_mask) "
                                "-> (Tensor, Tensor, Tensor)")
def fake_quantize_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int,
                           per_channel_axis: Optional[int], signed: bool, grad_factor: float,
                           output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_scale, grad_zero_point) with the LSQ gradients; one launch plus torch's per-channel sum of
    the per-program partials."""
    op = "fake_quantize_backward"
    axis, n_scales = _defs.check_fake_quantize(op, x, scale, zero_point, bits, per_channel_axis, signed, grad_factor)
    _defs.check_grad(op, grad, x)
    check_device(op, x.device)
    want_x, want_s = bool(output_mask[0]), bool(output_mask[1])
    want_z = bool(output_mask[2]) and zero_point is not None
    qn, qp = _defs.levels(bits, signed)
    xc = x.contiguous()
    gc = grad.to(x.dtype).contiguous()
    r = _Rows(xc, axis)
    acc = math_dtype(x)
    gx = torch.empty_like(xc) if want_x else x.new_empty(0)
    ds = torch.zeros(r.programs, dtype=acc, device=x.device) if want_s else None
    dz = torch.zeros(r.programs, dtype=acc, device=x.device) if want_z else None
    if r.programs and (want_x or want_s or want_z):
        s, z = _flat_params(scale, zero_point)
        dummy = gx if want_x else xc
        with on_device(x.device):
            _fq_bwd_kernel[(r.programs,)](
                gc, xc, s, z, dummy, ds if want_s else dummy, dz if want_z else dummy,
                r.channels, r.inner, r.per_row, float(qn), float(qp),
                HAS_Z=zero_point is not None, BINARY=signed and bits == 1, NEED_X=want_x, NEED_S=want_s,
                NEED_Z=want_z, DTYPE=TL_DTYPES[x.dtype], ACC=TL_DTYPES[math_dtype(x)], BLOCK=_BLOCK, EMULATE_RNE=EMULATE_RNE,
                num_warps=_NUM_WARPS, enable_fp_fusion=False)

    def per_channel(part: Tensor, like: Tensor) -> Tensor:
        sums = part.view(r.outer, r.channels, r.per_row).sum((0, 2), dtype=torch.float64) if r.programs else \
            torch.zeros(n_scales, dtype=torch.float64, device=x.device)
        return (sums * float(grad_factor)).to(like.dtype).reshape(like.shape)

    gs = per_channel(ds, scale) if want_s else scale.new_empty(0)
    if want_z:
        gz = per_channel(dz, zero_point)
    else:
        gz = (scale if zero_point is None else zero_point).new_empty(0)
    return gx, gs, gz


# The fakes and autograd every backend shares (the backwards call the Triton backward ops above).
wire(_defs.DEFS, "slimops_triton")
