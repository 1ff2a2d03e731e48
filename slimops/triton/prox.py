"""Triton kernels of the ``prox`` family, registered as ``torch.ops.slimops_triton.*``.

Same schemas (argument names, order, defaults) and the same arithmetic as the C++ kernels
(``csrc/cpu/prox.cpp``, ``csrc/include/slimops/prox_math.h``; maths in docs/algorithms.md §1-§5):
fp32 math for fp32/bf16/fp16 storage, fp64 math for fp64, scalars rounded from double to the math type
exactly like ``static_cast<acc_t>(double)``, IEEE division and square root in fp32 (``div_rn`` /
``sqrt_rn``), and the SGD momentum update reading the buffer *as stored* (after rounding).

Kernel design
-------------
* **Multi-tensor, one launch per list.** A small int64 "meta" tensor holds, for the ``NL`` tensor lists
  of an op, the data address of every tensor (list-major: ``meta[l*T + i]``), then every tensor's numel
  and group-row length, then two entries per program (``tensor index, tile index in that tensor``) built
  on the host from a prefix sum of tiles per tensor. A program casts an address to a typed pointer with
  ``tl.load(meta + l*T + i).to(tl.pointer_type(DTYPE))``. The meta tensor is cached per
  (addresses, sizes, tiling), so a steady optimizer loop does no host-to-device copy.
* **Elementwise penalties** (``none, l1, l0, tl1, l1_2``; also ``penalty_grad_`` without ``l21``): a program
  owns ``BLOCK*ITERS`` consecutive elements of one tensor.
* **Group penalties** (``l21, l0_l21``; groups = slices along dim 0, a 0-d tensor is one group): a program
  owns ``R`` whole rows (a ``[R, C]`` tile swept along the row). It makes two passes over its rows: the
  first recomputes the update *without writing anything* and accumulates the row's squared norm (fp32 /
  fp64), the second recomputes it, writes the optimizer state and stores the block-soft-thresholded
  row. So group penalties also take a single launch, and the value that is thresholded is the unrounded
  fp32 value (as in the CPU kernel, which buffers a row in fp32), never a rounded bf16/fp16 copy.
* **AMP.** ``grad_scale`` / ``found_inf`` are read on the device inside the kernel (a dummy pointer and a
  constexpr flag when absent); ``found_inf != 0`` masks every load and store, so nothing changes.
  ``prox_adamw_`` increments ``state_steps`` with ``torch._foreach_add_`` before the launch and subtracts
  ``found_inf != 0`` afterwards (like torch's fused Adam); each program loads its tensor's step and forms
  the bias corrections ``1 - beta^step`` in fp64.
* **Penalties** are a ``tl.constexpr`` int (the numbering of ``enum class Penalty`` in prox_math.h), so a
  launch compiles one branch. Thresholds (sqrt(2 lam), the Tl1 threshold, (3/2) lam^{2/3}) are computed
  on the host in double, like ``make_prox_params``. Scalars travel as fp64 kernel arguments.
* **acos / cos / pow.** Compiled for a GPU, the kernels call libdevice (``acos``, ``cos``, ``pow``: what
  the CUDA kernels' ``acos``/``cos``/``pow`` compile to). The interpreter has no libdevice, so there
  ``acos`` is fdlibm's rational approximation (evaluated in the math dtype), ``cos`` is ``tl.cos`` and
  ``pow`` is ``exp2(e * log2(x))`` in fp64. The interpreter also truncates fp32 -> bf16 where the GPU
  rounds to nearest even, so bf16 stores round explicitly there.
* **Vector access.** When every data address of a launch is 16-byte aligned and every numel (and, for
  group penalties, every row length) is a multiple of 16 bytes / element size, a constexpr ``ALIGNED``
  variant puts ``tl.multiple_of`` hints on the pointers and sizes, so loads and stores become 16-byte
  vector accesses (checked in the PTX for sm_90); otherwise accesses are scalar.
* FP contraction is off (``enable_fp_fusion=False``): no FMA contraction, like the CPU build; libdevice's
  own internals still use FMAs.

Launches per call (every penalty, elementwise or group): ``prox``, ``prox_backward``, ``prox_sgd_``,
``palm_slimming_``, ``penalty_grad_``, ``split_step_``: 1 Triton kernel (0 for an empty list or only
empty tensors). ``prox_adamw_``: 1 Triton kernel plus one ``_foreach_add_`` on the steps (and one
``_foreach_sub_`` when ``found_inf`` is given). A cache miss of the meta tensor adds one host-to-device
copy (so a CUDA-graph capture needs a warm cache: run the step once before capturing). Non-contiguous
read-only inputs (``x``, ``grads``, ...) are made contiguous first.
"""
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.opdefs import _checks, wire
from slimops.opdefs import prox as _defs
from slimops.penalties import GROUP as GROUP_PENALTIES, PROX as PROX_PENALTIES
from slimops.triton._common import (EMULATE_RNE, INTERPRETED, TL_DTYPES, check_device, cvt_store, device_of,
                                    math_dtype, next_pow2, on_device, rowsum, to_acc)
from slimops.triton._common import div_rn as _div  # IEEE division

try:  # GPU math library (absent from the interpreter, which cannot call it anyway)
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover - depends on the triton version
    libdevice = None

__all__ = [
    "prox",
    "prox_backward",
    "prox_sgd_",
    "prox_adamw_",
    "palm_slimming_",
    "penalty_grad_",
    "split_step_",
    "PENALTY_CODES",
]

# ``enum class Penalty`` of csrc/include/slimops/prox_math.h.
PENALTY_CODES = {"none": 0, "l1": 1, "l0": 2, "tl1": 3, "l1_2": 4, "l21": 5, "l0_l21": 6, "lp": 7}
_PROX_PENALTIES = PROX_PENALTIES
_GROUP_PENALTIES = GROUP_PENALTIES

# Op codes of the fused "update then prox" kernel.
_OP_PROX, _OP_SGD, _OP_ADAMW, _OP_PALM, _OP_SPLIT = 0, 1, 2, 3, 4

# Tiling. Elementwise: a program owns _EW_BLOCK * _EW_ITERS elements. Group: a [R, C] tile of at most
# _GROUP_TILE elements, C = next power of two >= the longest row (at most _GROUP_MAX_C).
_EW_BLOCK = 1024
_EW_ITERS = 4  # set to 1 below for the interpreter, where each iteration costs Python time
_GROUP_TILE = 2048
_GROUP_MAX_C = 1024
_NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """IEEE square root (``tl.sqrt`` is approximate in fp32)."""
    if ACC == tl.float32:
        r = tl.math.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _sign(y):
    """(y > 0) - (y < 0), as sign_of in prox_math.h (0 for 0 and NaN)."""
    return (y > 0).to(y.dtype) - (y < 0).to(y.dtype)


@triton.jit
def _acos_poly(x, ACC: tl.constexpr):
    """acos on [-1, 1]: fdlibm's e_acos.c rational approximation, evaluated in the math dtype."""
    # (Constants are inline literals: a tl.constexpr global on the left of a tensor breaks the interpreter.)
    ax = tl.abs(x)
    small = ax <= 0.5
    zb = (1.0 - ax) * 0.5
    z = tl.where(small, x * x, zb)
    p = z * (1.66666666666666657415e-01 + z * (-3.25565818622400915405e-01 + z * (
        2.01212532134862925881e-01 + z * (-4.00555345006794114027e-02 + z * (
            7.91534994289814532176e-04 + z * 3.47933107596021167570e-05)))))
    q = 1.0 + z * (-2.40339491173441421878e00 + z * (2.02094576023350569471e00 + z * (
        -6.88283971605453293030e-01 + z * 7.70381505559019352791e-02)))
    r = _div(p, q, ACC)
    pio2_lo = 6.12323399573676603587e-17
    res_small = 1.57079632679489655800e00 - (x - (pio2_lo - x * r))
    s = _sqrt(zb, ACC)
    w = r * s
    res_pos = 2.0 * (s + w)  # x > 0.5: 2 asin(sqrt((1-x)/2))
    res_neg = 3.14159265358979311600e00 - 2.0 * (s + (w - pio2_lo))  # x < -0.5: pi - 2 asin(sqrt((1+x)/2))
    return tl.where(small, res_small, tl.where(x > 0, res_pos, res_neg))


@triton.jit
def _acos(x, ACC: tl.constexpr, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        r = libdevice.acos(x)
    else:
        r = _acos_poly(x, ACC)
    return r


@triton.jit
def _cos(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        r = libdevice.cos(x)
    else:
        r = tl.cos(x)
    return r


@triton.jit
def _pow(x, e, ACC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """x ** e for x > 0 (std::pow in the math dtype)."""
    if LIBDEVICE:
        r = libdevice.pow(x, e + tl.full(x.shape, 0.0, x.dtype))
    else:
        x64 = x.to(tl.float64)
        r = tl.exp2(e.to(tl.float64) * tl.log2(x64)).to(ACC)
    return r


@triton.jit
def _pow64(b, e, LIBDEVICE: tl.constexpr):
    """b ** e in fp64 for scalars b >= 0 (a beta), e > 0 (a step count)."""
    if LIBDEVICE:
        r = libdevice.pow(b, e)
    else:
        pos = b > 0
        r = tl.where(pos, tl.exp2(e * tl.log2(tl.where(pos, b, 1.0))), 0.0)
    return r


@triton.jit
def _prox_elem(y, PENALTY: tl.constexpr, lam, a, thresh, ACC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """prox_elementwise of prox_math.h: the elementwise part of prox_{lam R}(y).

    l21: identity; l0_l21: the hard threshold (the group part is applied by the caller)."""
    if PENALTY == 1:  # l1: soft threshold
        # NaN propagates, as in prox_math.h (the comparisons are false for NaN)
        m = tl.abs(y) - lam
        r = tl.where(m < 0, 0.0, _sign(y) * m)
    elif PENALTY == 2 or PENALTY == 6:  # l0, l0_l21: hard threshold at sqrt(2 lam)
        r = tl.where(tl.abs(y) <= thresh, 0.0, y)
    elif PENALTY == 3:  # tl1
        ay = tl.abs(y)
        s = a + ay
        c = 1.0 - _div(27.0 * lam * a * (a + 1.0), 2.0 * s * s * s, ACC)
        c = tl.where(c < -1.0, -1.0, tl.where(c > 1.0, 1.0, c))
        phi = _acos(c, ACC, LIBDEVICE)
        x = _sign(y) * (
            (2.0 / 3.0) * s * _cos(_div(phi, 3.0, ACC), LIBDEVICE) - _div(2.0 * a, 3.0, ACC) + _div(ay, 3.0, ACC)
        )
        r = tl.where(ay <= thresh, 0.0, x)
    elif PENALTY == 4:  # l1_2: half thresholding
        ay = tl.abs(y)
        q = _div(ay, 3.0, ACC)
        c = _div(lam * 0.25, q * _sqrt(q, ACC), ACC)
        c = tl.where(c > 1.0, 1.0, c)
        phi = _acos(c, ACC, LIBDEVICE)
        # 2 pi / 3: the literal of prox_math.h
        x = (2.0 / 3.0) * y * (1.0 + _cos(2.0943951023931954923 - (2.0 / 3.0) * phi, LIBDEVICE))
        r = tl.where(ay <= thresh, 0.0, x)
    else:  # none, l21
        r = y
    return r


@triton.jit
def _prox_deriv(y, x, PENALTY: tl.constexpr, lam, a, thresh, ACC: tl.constexpr):
    """prox_elementwise_derivative of prox_math.h: d prox / d y at y (x = the elementwise prox of y)."""
    if PENALTY == 1 or PENALTY == 2 or PENALTY == 6:
        d = tl.where(tl.abs(y) > thresh, 1.0, 0.0).to(ACC)
    elif PENALTY == 3:
        dd = a + tl.abs(x)
        d = _div(1.0, 1.0 - _div(2.0 * lam * a * (a + 1.0), dd * dd * dd, ACC), ACC)
        d = tl.where(x == 0, 0.0, d)
    elif PENALTY == 4:
        ax = tl.abs(x)
        d = _div(1.0, 1.0 - _div(lam, 4.0 * ax * _sqrt(ax, ACC), ACC), ACC)
        d = tl.where(x == 0, 0.0, d)
    else:
        d = tl.full(y.shape, 1.0, ACC)
    return d


@triton.jit
def _group_scale(sq, t, ACC: tl.constexpr):
    """group_scale of prox_math.h: max(0, 1 - t / sqrt(sq)), 0 for sq <= 0."""
    f = 1.0 - _div(t + tl.full(sq.shape, 0.0, sq.dtype), _sqrt(sq, ACC), ACC)
    return tl.where(sq <= 0, 0.0, tl.where(f > 0, f, 0.0))


@triton.jit
def _subgrad(x, PENALTY: tl.constexpr, a, eps, ACC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """penalty_subgradient of prox_math.h (l1, tl1, lp)."""
    sg = _sign(x)
    ax = tl.abs(x)
    if PENALTY == 1:
        d = sg
    elif PENALTY == 3:
        dd = a + ax
        d = _div(a * (a + 1.0) * sg, dd * dd, ACC)
    else:  # lp, p = a
        m = tl.where(ax > eps, ax, eps)
        d = _div(a * sg, _pow(m, 1.0 - a, ACC, LIBDEVICE), ACC)
    return d


@triton.jit
def _locate(meta, T, NL: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """This program's (tensor index, tile index in that tensor, numel, group-row length), read from the
    meta layout: NL address lists, then numels at NL*T, row lengths at (NL+1)*T, the program table at
    (NL+2)*T."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(meta + (NL + 2) * T + 2 * pid)
    tile = tl.load(meta + (NL + 2) * T + 2 * pid + 1)
    n = tl.load(meta + NL * T + ti)
    L = tl.load(meta + (NL + 1) * T + ti)
    if ALIGNED:  # every numel (and row length) a multiple of VEC: lets the compiler vectorise
        n = tl.multiple_of(n, VEC)
        L = tl.multiple_of(L, VEC)
    return ti, tile, n, L


@triton.jit
def _load_base(meta, k: tl.constexpr, T, ti, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address of tensor ``ti`` of list ``k`` as a typed pointer (16-byte aligned when ALIGNED)."""
    ptr = tl.load(meta + k * T + ti).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # (the hint must sit on the pointer: it does not travel through the int -> pointer cast)
        ptr = tl.multiple_of(ptr, 16)
    return ptr



@triton.jit
def _update(OP: tl.constexpr, b0, b1, b2, b3, b4, offs, mask, c0, c1, c2, c3, c4, gscale, ss, ibc2,
            DTYPE: tl.constexpr, ACC: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
            EMULATE_RNE: tl.constexpr, WRITE: tl.constexpr):
    """The optimizer step of one op for the elements ``offs`` (any shape): returns the value before the
    prox and, when WRITE, stores the op's state. Pure when not WRITE (the group pass-1 recomputation)."""
    if OP == 0:  # prox: b1 = x
        v = tl.load(b1 + offs, mask=mask, other=0.0).to(ACC)
    elif OP == 1:  # SGD: b0 p, b1 g, b2 buf; c0 lr, c1 momentum, c2 1-dampening, c3 weight decay
        w = tl.load(b0 + offs, mask=mask, other=0.0).to(ACC)
        d = tl.load(b1 + offs, mask=mask, other=0.0).to(ACC) * gscale + c3 * w
        if F0:  # momentum != 0
            if F2:  # init_momentum: the buffer starts as the gradient
                b_new = d
            else:
                b_new = c1 * tl.load(b2 + offs, mask=mask, other=0.0).to(ACC) + c2 * d
            b_store = cvt_store(b_new, DTYPE, EMULATE_RNE)
            if WRITE:
                tl.store(b2 + offs, b_store, mask=mask)
            b = b_store.to(ACC)  # SGD reads the stored buffer
            if F1:  # nesterov
                d = d + c1 * b
            else:
                d = b
        v = w - c0 * d
    elif OP == 2:  # AdamW: b0 p, b1 g, b2 m, b3 v, b4 vmax; c1 beta1, c2 beta2, c3 eps, c4 1-lr*wd
        gj = tl.load(b1 + offs, mask=mask, other=0.0).to(ACC) * gscale
        w = tl.load(b0 + offs, mask=mask, other=0.0).to(ACC) * c4
        mp = tl.load(b2 + offs, mask=mask, other=0.0).to(ACC)
        # m <- lerp(m, g, 1 - beta1) as torch's lerp_ (and the C++ kernels): m + w (g - m) for w < 0.5, else
        # g + (w - 1) (g - m), so that inf/NaN come out as in torch.optim.AdamW
        lw = 1.0 - c1
        m = tl.where(lw < 0.5, mp, gj) + tl.where(lw < 0.5, lw, lw - 1.0) * (gj - mp)
        vv = c2 * tl.load(b3 + offs, mask=mask, other=0.0).to(ACC) + (1.0 - c2) * gj * gj
        if WRITE:
            tl.store(b2 + offs, cvt_store(m, DTYPE, EMULATE_RNE), mask=mask)
            tl.store(b3 + offs, cvt_store(vv, DTYPE, EMULATE_RNE), mask=mask)
        if F0:  # amsgrad
            vm = tl.maximum(tl.load(b4 + offs, mask=mask, other=0.0).to(ACC), vv,
                            propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
            if WRITE:
                tl.store(b4 + offs, cvt_store(vm, DTYPE, EMULATE_RNE), mask=mask)
            vv = vm
        v = w - _div(ss * m, _sqrt(vv, ACC) * ibc2 + c3, ACC)
    elif OP == 3:  # palm slimming: b0 xi (target), b1 gamma; c0 alpha/(alpha+beta), c1 beta/(alpha+beta)
        x = tl.load(b0 + offs, mask=mask, other=0.0).to(ACC)
        gam = c0 * tl.load(b1 + offs, mask=mask, other=0.0).to(ACC) + c1 * x
        if WRITE:
            tl.store(b1 + offs, cvt_store(gam, DTYPE, EMULATE_RNE), mask=mask)
        v = c0 * x + c1 * gam
    else:  # split step: b0 u (target), b1 w, b2 g: u = prox(w)
        v = tl.load(b1 + offs, mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _post(OP: tl.constexpr, b1, b2, offs, mask, u, c0, c1, DTYPE: tl.constexpr, ACC: tl.constexpr,
          EMULATE_RNE: tl.constexpr):
    """After the prox: split_step_ updates w from the final (unrounded) u; the other ops do nothing."""
    if OP == 4:  # c0 lr, c1 lr*beta
        w = tl.load(b1 + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(b2 + offs, mask=mask, other=0.0).to(ACC)
        tl.store(b1 + offs, cvt_store(w - c0 * g - c1 * (w - u), DTYPE, EMULATE_RNE), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _fused_step_kernel(
    meta, T, gs_ptr, fi_ptr,
    s0: tl.float64, s1: tl.float64, s2: tl.float64, s3: tl.float64, s4: tl.float64, sgn: tl.float64,
    lam_: tl.float64, a_: tl.float64, thresh_: tl.float64,
    OP: tl.constexpr, NL: tl.constexpr, PENALTY: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
    STEP_DTYPE: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    EMULATE_RNE: tl.constexpr, LIBDEVICE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
):
    """``target <- prox(update(...))`` over every tensor of the lists in ``meta`` (list 0 is the target)."""
    ti, tile, n, L = _locate(meta, T, NL, ALIGNED, VEC)
    b0 = _load_base(meta, 0, T, ti, DTYPE, ALIGNED)
    if NL > 1:
        b1 = _load_base(meta, 1, T, ti, DTYPE, ALIGNED)
    else:
        b1 = b0
    if NL > 2:
        b2 = _load_base(meta, 2, T, ti, DTYPE, ALIGNED)
    else:
        b2 = b0
    if NL > 3:
        b3 = _load_base(meta, 3, T, ti, DTYPE, ALIGNED)
    else:
        b3 = b0
    if NL > 4:
        b4 = _load_base(meta, 4, T, ti, DTYPE, ALIGNED)
    else:
        b4 = b0

    lam = to_acc(lam_, ACC)
    a = to_acc(a_, ACC)
    thresh = to_acc(thresh_, ACC)
    if PENALTY == 6:
        gt = lam * a  # group_threshold: lam * mu for l0_l21
    else:
        gt = lam
    c0 = to_acc(s0, ACC)
    c1 = to_acc(s1, ACC)
    c2 = to_acc(s2, ACC)
    c3 = to_acc(s3, ACC)
    c4 = to_acc(s4, ACC)

    if HAS_FI:  # found_inf != 0: treat every tensor as empty, so that nothing is loaded or stored
        n = tl.where(tl.load(fi_ptr) == 0, n, 0)
    if HAS_GS:
        gscale = to_acc(sgn * (1.0 / tl.load(gs_ptr).to(tl.float64)), ACC)
    else:
        gscale = to_acc(sgn, ACC)
    if OP == 2:  # per-tensor AdamW bias corrections from the (already incremented) step
        step_ptr = tl.load(meta + 5 * T + ti).to(tl.pointer_type(STEP_DTYPE))
        step = tl.load(step_ptr).to(tl.float64)
        bc1 = 1.0 - _pow64(s1 + tl.full([], 0.0, tl.float64), step, LIBDEVICE)
        bc2 = 1.0 - _pow64(s2 + tl.full([], 0.0, tl.float64), step, LIBDEVICE)
        ss = to_acc(s0 / bc1, ACC)  # lr / (1 - beta1^step)
        ibc2 = to_acc(1.0 / tl.sqrt(bc2), ACC)  # 1 / sqrt(1 - beta2^step)
    else:
        ss = tl.full([], 0.0, ACC)
        ibc2 = tl.full([], 0.0, ACC)

    if not GROUP:
        start = tile * (BLOCK * ITERS)
        for it in tl.static_range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            v = _update(OP, b0, b1, b2, b3, b4, offs, mask, c0, c1, c2, c3, c4, gscale, ss, ibc2,
                        DTYPE, ACC, F0, F1, F2, EMULATE_RNE, True)
            v = _prox_elem(v, PENALTY, lam, a, thresh, ACC, LIBDEVICE)
            tl.store(b0 + offs, cvt_store(v, DTYPE, EMULATE_RNE), mask=mask)
            _post(OP, b1, b2, offs, mask, v, c0, c1, DTYPE, ACC, EMULATE_RNE)
    else:
        nrows = n // L
        rows = tile * R + tl.arange(0, R)
        rmask = rows < nrows
        cols = tl.arange(0, C)
        sq = tl.full([R], 0.0, ACC)
        for k0 in tl.range(0, L, C):  # pass 1: the row norms of the updated, elementwise-proxed rows
            cc = k0 + cols
            offs = rows[:, None] * L + cc[None, :]
            mask = rmask[:, None] & (cc[None, :] < L)
            v = _update(OP, b0, b1, b2, b3, b4, offs, mask, c0, c1, c2, c3, c4, gscale, ss, ibc2,
                        DTYPE, ACC, F0, F1, F2, EMULATE_RNE, False)
            v = tl.where(mask, _prox_elem(v, PENALTY, lam, a, thresh, ACC, LIBDEVICE), 0.0)
            sq += rowsum(v * v)
        scale = _group_scale(sq, gt, ACC)
        for k0 in tl.range(0, L, C):  # pass 2: recompute, write the state and the thresholded rows
            cc = k0 + cols
            offs = rows[:, None] * L + cc[None, :]
            mask = rmask[:, None] & (cc[None, :] < L)
            v = _update(OP, b0, b1, b2, b3, b4, offs, mask, c0, c1, c2, c3, c4, gscale, ss, ibc2,
                        DTYPE, ACC, F0, F1, F2, EMULATE_RNE, True)
            v = _prox_elem(v, PENALTY, lam, a, thresh, ACC, LIBDEVICE) * scale[:, None]
            tl.store(b0 + offs, cvt_store(v, DTYPE, EMULATE_RNE), mask=mask)
            _post(OP, b1, b2, offs, mask, v, c0, c1, DTYPE, ACC, EMULATE_RNE)


@triton.jit(do_not_specialize=["T"])
def _prox_backward_kernel(
    meta, T, lam_: tl.float64, a_: tl.float64, thresh_: tl.float64,
    PENALTY: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    EMULATE_RNE: tl.constexpr, LIBDEVICE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
):
    """Lists: 0 out, 1 x, 2 grad. out = (d prox / d x)^T grad."""
    ti, tile, n, L = _locate(meta, T, 3, ALIGNED, VEC)
    bo = _load_base(meta, 0, T, ti, DTYPE, ALIGNED)
    bx = _load_base(meta, 1, T, ti, DTYPE, ALIGNED)
    bg = _load_base(meta, 2, T, ti, DTYPE, ALIGNED)
    lam = to_acc(lam_, ACC)
    a = to_acc(a_, ACC)
    thresh = to_acc(thresh_, ACC)
    if PENALTY == 6:
        gt = lam * a
    else:
        gt = lam
    if not GROUP:
        start = tile * (BLOCK * ITERS)
        for it in tl.static_range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            y = tl.load(bx + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(bg + offs, mask=mask, other=0.0).to(ACC)
            z = _prox_elem(y, PENALTY, lam, a, thresh, ACC, LIBDEVICE)
            d = _prox_deriv(y, z, PENALTY, lam, a, thresh, ACC)
            tl.store(bo + offs, cvt_store(g * d, DTYPE, EMULATE_RNE), mask=mask)
    else:
        # Block soft threshold z -> (1 - t/n) z, n = ||z||: J^T g = (1 - t/n) g + t (z.g) z / n^3.
        nrows = n // L
        rows = tile * R + tl.arange(0, R)
        rmask = rows < nrows
        cols = tl.arange(0, C)
        sq = tl.full([R], 0.0, ACC)
        dot = tl.full([R], 0.0, ACC)
        for k0 in tl.range(0, L, C):
            cc = k0 + cols
            offs = rows[:, None] * L + cc[None, :]
            mask = rmask[:, None] & (cc[None, :] < L)
            y = tl.load(bx + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(bg + offs, mask=mask, other=0.0).to(ACC)
            z = tl.where(mask, _prox_elem(y, PENALTY, lam, a, thresh, ACC, LIBDEVICE), 0.0)
            sq += rowsum(z * z)
            dot += rowsum(z * g)
        nrm = _sqrt(sq, ACC)
        active = nrm > gt
        fac = 1.0 - _div(gt + tl.full(nrm.shape, 0.0, nrm.dtype), nrm, ACC)
        gd = gt * dot
        n3 = nrm * nrm * nrm
        for k0 in tl.range(0, L, C):
            cc = k0 + cols
            offs = rows[:, None] * L + cc[None, :]
            mask = rmask[:, None] & (cc[None, :] < L)
            y = tl.load(bx + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(bg + offs, mask=mask, other=0.0).to(ACC)
            z = _prox_elem(y, PENALTY, lam, a, thresh, ACC, LIBDEVICE)
            d = _prox_deriv(y, z, PENALTY, lam, a, thresh, ACC)
            v = (fac[:, None] * g + _div(gd[:, None] * z, n3[:, None] + tl.full(z.shape, 0.0, z.dtype), ACC)) * d
            v = tl.where(active[:, None], v, 0.0)
            tl.store(bo + offs, cvt_store(v, DTYPE, EMULATE_RNE), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _penalty_grad_kernel(
    meta, T, s_: tl.float64, a_: tl.float64, eps_: tl.float64,
    PENALTY: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    EMULATE_RNE: tl.constexpr, LIBDEVICE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
):
    """Lists: 0 grads (updated), 1 params. grads += s dR/dp."""
    ti, tile, n, L = _locate(meta, T, 2, ALIGNED, VEC)
    bg = _load_base(meta, 0, T, ti, DTYPE, ALIGNED)
    bw = _load_base(meta, 1, T, ti, DTYPE, ALIGNED)
    s = to_acc(s_, ACC)
    a = to_acc(a_, ACC)
    eps = to_acc(eps_, ACC)
    if not GROUP:
        start = tile * (BLOCK * ITERS)
        for it in tl.static_range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            w = tl.load(bw + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(bg + offs, mask=mask, other=0.0).to(ACC)
            d = _subgrad(w, PENALTY, a, eps, ACC, LIBDEVICE)
            tl.store(bg + offs, cvt_store(g + s * d, DTYPE, EMULATE_RNE), mask=mask)
    else:
        # Weighted group lasso: s sqrt(n_g) w_g / ||w_g|| (0 for an all-zero group).
        nrows = n // L
        rows = tile * R + tl.arange(0, R)
        rmask = rows < nrows
        cols = tl.arange(0, C)
        sq = tl.full([R], 0.0, ACC)
        for k0 in tl.range(0, L, C):
            cc = k0 + cols
            offs = rows[:, None] * L + cc[None, :]
            mask = rmask[:, None] & (cc[None, :] < L)
            w = tl.load(bw + offs, mask=mask, other=0.0).to(ACC)
            sq += rowsum(w * w)
        weight = _sqrt(L.to(ACC), ACC)
        f = tl.where(sq > 0, _div(s * weight + tl.full(sq.shape, 0.0, sq.dtype), _sqrt(sq, ACC), ACC), 0.0)
        for k0 in tl.range(0, L, C):
            cc = k0 + cols
            offs = rows[:, None] * L + cc[None, :]
            mask = rmask[:, None] & (cc[None, :] < L)
            w = tl.load(bw + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(bg + offs, mask=mask, other=0.0).to(ACC)
            tl.store(bg + offs, cvt_store(g + f[:, None] * w, DTYPE, EMULATE_RNE), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

_TL_STEP_DTYPES = {**TL_DTYPES, torch.int32: tl.int32, torch.int64: tl.int64}

# GPU builds call libdevice; the interpreter cannot (and truncates to bf16, see cvt_store).
_LIBDEVICE = (not INTERPRETED) and libdevice is not None
if INTERPRETED:
    _EW_ITERS = 1


def _group_rows(t: Tensor) -> int:
    """Rows of the group view: dim 0 (a 0-d tensor is one group of one element)."""
    if t.dim() == 0:
        return 1
    return 0 if t.numel() == 0 else t.shape[0]


_META_CACHE: "OrderedDict[tuple, Tuple[Tensor, int]]" = OrderedDict()
_META_CACHE_SIZE = 64


def _plan(lists: Sequence[Sequence[Tensor]], group: bool, n_data: Optional[int] = None):
    """(meta tensor on the tensors' device, number of programs, group tile R, C, aligned, VEC).

    ``lists[0]`` sets the geometry; every list holds tensors of the same numel. ``aligned``: the first
    ``n_data`` lists (default all; the rest hold one-element state such as AdamW's steps) have 16-byte
    aligned data, and every numel (and group row length) is a multiple of VEC = 16 bytes / element size,
    so that the kernel may use 16-byte vector accesses."""
    targets = lists[0]
    T = len(targets)
    numels = [t.numel() for t in targets]
    if group:
        rows = [_group_rows(t) for t in targets]
        row_lens = [n // r if r else 1 for n, r in zip(numels, rows)]
        max_len = max([ln for ln, n in zip(row_lens, numels) if n] or [1])
        max_rows = max(rows or [1])
        C = min(next_pow2(max_len), _GROUP_MAX_C)
        R = max(1, min(next_pow2(max_rows), _GROUP_TILE // C))
        tiles = [(r + R - 1) // R for r in rows]
    else:
        row_lens = [1] * T
        R, C = 1, 1
        chunk = _EW_BLOCK * _EW_ITERS
        tiles = [(n + chunk - 1) // chunk for n in numels]
    n_tiles = sum(tiles)
    vec = max(1, 16 // targets[0].element_size()) if T else 1
    if n_tiles == 0:
        return None, 0, R, C, False, vec
    data = lists if n_data is None else lists[:n_data]
    aligned = (
        all(n % vec == 0 for n in numels)
        and (not group or all(ln % vec == 0 for ln, n in zip(row_lens, numels) if n))
        and all(t.data_ptr() % 16 == 0 for ts in data for t in ts if t.numel())
    )
    device = targets[0].device
    header = [t.data_ptr() for ts in lists for t in ts] + numels + row_lens
    key = (device, group, R, C, _EW_BLOCK * _EW_ITERS, tuple(header))
    hit = _META_CACHE.get(key)
    if hit is not None:
        _META_CACHE.move_to_end(key)
        return hit[0], hit[1], R, C, aligned, vec
    counts = torch.tensor(tiles, dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    tile_idx = torch.arange(n_tiles, dtype=torch.int64) - torch.repeat_interleave(first, counts)
    meta = torch.cat([torch.tensor(header, dtype=torch.int64), torch.stack([tensor_idx, tile_idx], 1).reshape(-1)])
    meta = meta.to(device)
    _META_CACHE[key] = (meta, n_tiles)
    while len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return meta, n_tiles, R, C, aligned, vec


def _prox_params(penalty: str, lam: float, a: float) -> Tuple[int, float, float, float]:
    """make_prox_params: (code, lam, a, thresh), thresholds in double as in prox_math.h."""
    if penalty == "l1":
        thresh = lam
    elif penalty in ("l0", "l0_l21"):
        thresh = math.sqrt(2.0 * lam)
    elif penalty == "tl1":
        if lam <= a * a / (2.0 * (a + 1.0)):
            thresh = lam * (a + 1.0) / a
        else:
            thresh = math.sqrt(2.0 * lam * (a + 1.0)) - a / 2.0
    elif penalty == "l1_2":
        thresh = 1.5 * _cbrt(lam * lam)
    else:
        thresh = 0.0
    return PENALTY_CODES[penalty], float(lam), float(a), float(thresh)


def _cbrt(x: float) -> float:
    cbrt = getattr(math, "cbrt", None)  # Python >= 3.11
    if cbrt is not None:
        return cbrt(x)
    return math.copysign(abs(x) ** (1.0 / 3.0), x)  # pragma: no cover


def _launch_step(op_code: int, lists: Sequence[Sequence[Tensor]], penalty: str, lam: float, a: float,
                 scalars: Sequence[float] = (), sgn: float = 1.0, grad_scale: Optional[Tensor] = None,
                 found_inf: Optional[Tensor] = None, flags: Sequence[bool] = (),
                 steps: Optional[Sequence[Tensor]] = None):
    """One launch of _fused_step_kernel over ``lists`` (list 0 is the target)."""
    code, lam_d, a_d, thresh = _prox_params(penalty, lam, a)
    group = penalty in _GROUP_PENALTIES
    all_lists = list(lists) + ([list(steps)] if steps is not None else [])
    meta, n_tiles, R, C, aligned, vec = _plan(all_lists, group, n_data=len(lists))
    if n_tiles == 0:
        return
    target = lists[0][0]
    dtype = TL_DTYPES[target.dtype]
    acc = TL_DTYPES[math_dtype(target)]
    step_dtype = _TL_STEP_DTYPES[steps[0].dtype] if steps is not None else tl.float32
    sc = [float(s) for s in scalars] + [0.0] * (5 - len(scalars))
    fl = [bool(f) for f in flags] + [False] * (3 - len(flags))
    with on_device(target.device):
        _fused_step_kernel[(n_tiles,)](
            meta, len(lists[0]),
            grad_scale if grad_scale is not None else meta,
            found_inf if found_inf is not None else meta,
            sc[0], sc[1], sc[2], sc[3], sc[4], float(sgn),
            lam_d, a_d, thresh,
            OP=op_code, NL=len(all_lists), PENALTY=code, DTYPE=dtype, ACC=acc, STEP_DTYPE=step_dtype,
            HAS_GS=grad_scale is not None, HAS_FI=found_inf is not None,
            F0=fl[0], F1=fl[1], F2=fl[2],
            GROUP=group, BLOCK=_EW_BLOCK, ITERS=_EW_ITERS, R=R, C=C,
            EMULATE_RNE=EMULATE_RNE, LIBDEVICE=_LIBDEVICE, ALIGNED=aligned, VEC=vec,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )


def _contig(ts: Sequence[Tensor]) -> List[Tensor]:
    return [t.contiguous() for t in ts]


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("slimops_triton::prox", mutates_args=())
def prox(x: Tensor, penalty: str, lam: float, a: float = 1.0) -> Tensor:
    """y = prox_{lam R}(x) (docs/algorithms.md §1); one launch."""
    op = "prox"
    _defs.check_prox_input(op, "x", x)
    _checks.check_penalty(op, penalty, _PROX_PENALTIES, lam, a)
    check_device(op, x.device)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    _launch_step(_OP_PROX, [[out], [xc]], penalty, lam, a)
    return out


@torch.library.custom_op("slimops_triton::prox_backward", mutates_args=())
def prox_backward(grad: Tensor, x: Tensor, penalty: str, lam: float, a: float = 1.0) -> Tensor:
    """grad_x = (d prox / d x)^T grad; one launch."""
    op = "prox_backward"
    _defs.check_prox_backward_inputs(grad, x)
    _checks.check_penalty(op, penalty, _PROX_PENALTIES, lam, a)
    check_device(op, x.device)
    xc = x.contiguous()
    gc = grad.to(x.dtype).contiguous()
    out = torch.empty_like(xc)
    code, lam_d, a_d, thresh = _prox_params(penalty, lam, a)
    group = penalty in _GROUP_PENALTIES
    meta, n_tiles, R, C, aligned, vec = _plan([[out], [xc], [gc]], group)
    if n_tiles:
        with on_device(x.device):
            _prox_backward_kernel[(n_tiles,)](
                meta, 1, lam_d, a_d, thresh,
                PENALTY=code, DTYPE=TL_DTYPES[x.dtype], ACC=TL_DTYPES[math_dtype(x)],
                GROUP=group, BLOCK=_EW_BLOCK, ITERS=_EW_ITERS, R=R, C=C,
                EMULATE_RNE=EMULATE_RNE, LIBDEVICE=_LIBDEVICE, ALIGNED=aligned, VEC=vec,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
            )
    return out


@torch.library.custom_op("slimops_triton::prox_sgd_", mutates_args=("params", "momentum_buffers"))
def prox_sgd_(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_momentum: bool,
    penalty: str,
    lam: float,
    a: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """torch.optim.SGD's update, then p <- prox_{lr lam R}(p); one launch for the whole list."""
    op = "prox_sgd_"
    _defs.validate_prox_sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                            maximize, init_momentum, penalty, lam, a, grad_scale, found_inf)
    check_device(op, device_of(params))
    use_mom = momentum != 0
    if len(params) == 0:
        return
    lists = [list(params), _contig(grads)] + ([list(momentum_buffers)] if use_mom else [])
    _launch_step(
        _OP_SGD, lists, penalty, lr * lam, a,
        scalars=(lr, momentum, 1.0 - dampening, weight_decay), sgn=-1.0 if maximize else 1.0,
        grad_scale=grad_scale, found_inf=found_inf, flags=(use_mom, nesterov, init_momentum),
    )


@torch.library.custom_op(
    "slimops_triton::prox_adamw_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)
def prox_adamw_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    state_steps: List[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    penalty: str,
    lam: float,
    a: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """torch.optim.AdamW's update, then p <- prox_{lr lam R}(p); steps += 1 unless found_inf != 0.

    One launch for the whole list, plus ``_foreach_add_`` on the steps (and ``_foreach_sub_`` of
    ``found_inf != 0`` when found_inf is given)."""
    op = "prox_adamw_"
    _defs.validate_prox_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                              eps, weight_decay, amsgrad, maximize, penalty, lam, a, grad_scale, found_inf)
    check_device(op, device_of(params))
    if len(params) == 0:
        return
    steps = list(state_steps)
    torch._foreach_add_(steps, 1)
    lists = [list(params), _contig(grads), list(exp_avgs), list(exp_avg_sqs)]
    lists.append(list(max_exp_avg_sqs) if amsgrad else list(params))  # list 4 (unused without amsgrad)
    _launch_step(
        _OP_ADAMW, lists, penalty, lr * lam, a,
        scalars=(lr, beta1, beta2, eps, 1.0 - lr * weight_decay), sgn=-1.0 if maximize else 1.0,
        grad_scale=grad_scale, found_inf=found_inf, flags=(amsgrad,), steps=steps,
    )
    if found_inf is not None:
        skipped = (found_inf.reshape(()) != 0).to(steps[0].dtype)
        torch._foreach_sub_(steps, [skipped] * len(steps))


@torch.library.custom_op("slimops_triton::palm_slimming_", mutates_args=("gammas", "xis"))
def palm_slimming_(
    gammas: List[Tensor],
    xis: List[Tensor],
    alpha: float,
    beta: float,
    lam: float,
    penalty: str = "l1",
    a: float = 1.0,
) -> None:
    """gamma <- (alpha gamma + beta xi) / (alpha + beta);
    xi <- prox_{lam/(alpha+beta) R}((alpha xi + beta gamma) / (alpha + beta)) (gamma the new value); one launch."""
    op = "palm_slimming_"
    _defs.validate_palm_slimming(gammas, xis, alpha, beta, lam, penalty, a)
    check_device(op, device_of(gammas))
    if len(gammas) == 0:
        return
    denom = alpha + beta
    _launch_step(_OP_PALM, [list(xis), list(gammas)], penalty, lam / denom, a, scalars=(alpha / denom, beta / denom))


@torch.library.custom_op("slimops_triton::penalty_grad_", mutates_args=("grads",))
def penalty_grad_(
    grads: List[Tensor],
    params: List[Tensor],
    penalty: str,
    s: float,
    a: float = 1.0,
    eps: float = 1e-8,
) -> None:
    """grads += s dR/dp (l1, tl1, lp with p = a, weighted l21); one launch."""
    op = "penalty_grad_"
    _defs.validate_penalty_grad(grads, params, penalty, s, a, eps)
    check_device(op, device_of(grads))
    if len(grads) == 0:
        return
    group = penalty == "l21"
    wc = _contig(params)
    meta, n_tiles, R, C, aligned, vec = _plan([list(grads), wc], group)
    if n_tiles == 0:
        return
    g0 = grads[0]
    with on_device(g0.device):
        _penalty_grad_kernel[(n_tiles,)](
            meta, len(grads), float(s), float(a), float(eps),
            PENALTY=PENALTY_CODES[penalty], DTYPE=TL_DTYPES[g0.dtype],
            ACC=TL_DTYPES[math_dtype(g0)],
            GROUP=group, BLOCK=_EW_BLOCK, ITERS=_EW_ITERS, R=R, C=C,
            EMULATE_RNE=EMULATE_RNE, LIBDEVICE=_LIBDEVICE, ALIGNED=aligned, VEC=vec,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )


@torch.library.custom_op("slimops_triton::split_step_", mutates_args=("weights", "us"))
def split_step_(
    weights: List[Tensor],
    grads: List[Tensor],
    us: List[Tensor],
    lr: float,
    beta: float,
    penalty: str,
    lam: float,
    a: float = 1.0,
) -> None:
    """u <- prox_{(lam/beta) R}(w); w <- w - lr g - lr beta (w - u); one launch."""
    op = "split_step_"
    _defs.validate_split_step(weights, grads, us, lr, beta, penalty, lam, a)
    check_device(op, device_of(weights))
    if len(weights) == 0:
        return
    _launch_step(_OP_SPLIT, [list(us), list(weights), _contig(grads)], penalty, lam / beta, a,
                 scalars=(lr, lr * beta))


wire(_defs.DEFS, "slimops_triton")  # the fakes and autograd of slimops.opdefs.prox, as for slimops::
