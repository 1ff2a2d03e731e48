"""Triton kernels of the ``channel_conv`` family, registered as ``torch.ops.slimops_triton.*``.

Same schemas (argument names, order, defaults) as ``csrc/registration.cpp`` and the same semantics as the
reference twins of ``slimops/reference/channel_conv.py``: groups = 1, zero padding, x in NCHW (made
contiguous once), weight ``(C_out, C_in, kh, kw)``, fp32 accumulation for fp32/bf16/fp16 storage (fp64 for
fp64), outputs rounded once to the input dtype. ``in_idx`` / ``out_idx`` are int64 index sets that the
caller has validated (unique, in range); the kernels assume it.

- ``channel_conv2d``: ``conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx])``; with
  ``input_gathered`` x holds only the channels ``in_idx`` (channel j of x is weight input channel in_idx[j]).
- ``masked_conv2d``: ``conv2d(x, weight, bias) * out_mask[:, :, None, None]``; per sample, only the kept
  output channels are computed, the others are exactly 0.
- ``*_backward``: full-size ``(grad_x, grad_weight, grad_bias)`` (zero outside the used channels); a gradient
  whose ``output_mask`` entry is False is an empty tensor.

Kernel design (implicit GEMM, nothing gathered in memory)
---------------------------------------------------------
* **Forward** (``_conv_fwd_kernel``): a program owns a ``[BLOCK_M output pixels, BLOCK_N output channels]``
  tile. Reduction K = used input channels x taps: the taps ``(kh, kw)`` are the outer loops (the spatial
  index math and the zero-padding mask are computed once per tap), blocks of ``BLOCK_K`` input channels the
  inner loop. x is loaded through ``in_idx`` (``[BLOCK_M, BLOCK_K]``, out-of-image lanes masked to 0), the
  weight through ``out_idx`` x ``in_idx`` (``[BLOCK_K, BLOCK_N]``); ``tl.dot`` into an fp32 (fp64)
  accumulator; ``bias[out_idx]`` added; NCHW store.
  ``channel_conv2d``: M = N*OH*OW (tiles cross sample boundaries), N-dim = len(out_idx).
  ``masked_conv2d``: on the host ``counts = out_mask.sum(1)`` and ``order = argsort(~out_mask, 1, stable)``
  (kept channel ids first, per sample). Program = (sample, pixel block, channel block); a program whose
  channel block starts at ``>= counts[n]`` returns at once, so the work done is proportional to the
  number of kept channels. The output starts as zeros; programs write channels ``order[n, j]`` only.
* **grad_x** (``_conv_dx_kernel``): implicit GEMM over *input* pixels x used input channels; reduction over
  the (kept) output channels x taps. For input pixel ``ih`` and tap ``kh`` the output row is
  ``oh = (ih + ph - kh*dh) / sh``, used only when that is a non-negative multiple of ``sh`` and ``< OH``
  (same for w). Written to channel ``in_idx[j]`` of grad_x (``j`` when ``input_gathered``); grad_x is
  zero-initialised only when some channel of x is unused. Masked: tiles stay within one sample and the
  reduction runs over that sample's ``counts[n]`` kept channels. With stride > 1 a tap is valid for only
  ~1/(sh*sw) of the rows, and the masked-off lanes still cost MMA work (no sub-pixel decomposition).
* **grad_weight** (``_conv_dw_kernel``): per tap, a ``[BLOCK_N out channels, BLOCK_K in channels]`` tile;
  reduction over pixels M split across programs (chunks of ``BLOCK_M * iters`` rows), each program
  ``tl.atomic_add``-ing its partial sum into an fp32 (fp64) buffer of the full weight shape, cast to the
  weight dtype at the end (summation order is therefore not deterministic run to run). Masked: a program
  owns one sample's rows and that sample's kept-channel block ``order[n, j-block]`` (skipped past
  ``counts[n]``).
* **grad_bias**: torch reductions, ``grad_out.sum((0, 2, 3))`` (masked: of ``grad_out * out_mask``) in the
  accumulation dtype, scattered into a zero ``(C_out,)`` tensor.

Tiles: BLOCK_M = 64 pixels, BLOCK_N (output channels) = next power of two in [16, 64], BLOCK_K (input
channels) in [16, 32] (grad_weight: [16, 64] x [16, 64] tiles over 32 pixel rows); every ``tl.dot``
dimension is a power of two >= 16; ``num_warps=4``; no autotuning. fp32 inputs use
``input_precision="tf32"`` only for CUDA tensors with ``torch.backends.cudnn.allow_tf32`` (PyTorch's own
policy for cuDNN convolutions), else ``"ieee"``. x and weight share one dtype (TypeError otherwise, as
in the C++ checks); a grad_out of another dtype is multiplied in the promoted dtype (bf16 + fp16 -> fp32).
Offsets along the batch and channel axes are int64.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): its ``tl.dot`` on bf16 operands is wrong and its fp32 ->
bf16 conversion truncates, so there bf16 tiles are multiplied as fp32 (exact products, as the GPU's
bf16 MMA) and bf16 stores round to nearest even explicitly.

Launches per call: ``channel_conv2d`` 1 kernel (0 for an empty ``out_idx`` or batch; an empty ``in_idx``
gives the bias with torch ops). ``masked_conv2d`` 1 kernel plus the host ``sum``/``argsort`` and a zero
fill of the output. Backward: 1 kernel for grad_x (plus a zero fill when some x channel is unused),
1 kernel for grad_weight (plus the zero fp32 buffer and, for non-fp32 weights, a cast), torch reductions
for grad_bias; the masked backward recomputes ``counts``/``order`` (a few small torch ops).

Coverage: 4-D NCHW float32 / float64 / bfloat16 / float16, any kernel size, stride, padding, dilation,
groups = 1. Correctness is tested through the interpreter (tests/test_channel_conv_triton.py); every kernel
variant (each dtype, masked or not, gathered or not) was compiled for sm_80 and sm_90 with
``triton.compile`` on a machine without a GPU (bf16 forward lowers to wgmma on sm_90), but nothing was run
on a GPU from here: performance has never been measured and the tile sizes are untuned.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Shared with the prox kernels: the bf16-rounding store, and the argument errors / device check.
from slimops.opdefs import wire
from slimops.opdefs.channel_conv import DEFS
from slimops.triton._common import (EMULATE_RNE, INTERPRETED, TL_DTYPES, check_device, cvt_store, fail, on_device)

__all__ = [
    "channel_conv2d",
    "channel_conv2d_backward",
    "masked_conv2d",
    "masked_conv2d_backward",
]

_NUM_WARPS = 4
_BLOCK_M = 64  # output (forward) / input (grad_x) pixels per tile
_DW_BLOCK_M = 32  # pixel rows per reduction step of grad_weight
# grad_weight: split the pixel reduction until about this many programs run (a few per SM of an H100).
_DW_TARGET_PROGRAMS = 1024


# ---------------------------------------------------------------------------------------------------
# Device helpers and kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, in_idx_ptr, out_sel_ptr, counts_ptr, y_ptr,
    C_X, C_W, H, W, OH, OW, KH, KW,
    SH, SW, PH, PW, DH, DW,
    K_IN,  # input channels reduced over: len(in_idx) (channel_conv) or C_in (masked)
    N_OUT,  # channel_conv: len(out_idx); masked: C_out (the row length of `order`)
    M,  # channel_conv: N*OH*OW; masked: OH*OW
    N_PBLK,  # masked: pixel blocks per sample
    C_Y,  # channels of y
    MASKED: tl.constexpr, IDX_IN: tl.constexpr, X_GATHERED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, OUT_T: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    OHW = OH * OW
    HW = H * W
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        n_s = pid0 // N_PBLK
        pid_m = pid0 % N_PBLK
        cnt = tl.load(counts_ptr + n_s)
        if pid_n * BLOCK_N >= cnt:
            return
        j_mask = offs_j < cnt
        co = tl.load(out_sel_ptr + n_s.to(tl.int64) * N_OUT + offs_j, mask=j_mask, other=0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        img = tl.full([BLOCK_M], 0, tl.int64) + n_s
        p = offs_m
        y_ch = co
    else:
        j_mask = offs_j < N_OUT
        co = tl.load(out_sel_ptr + offs_j, mask=j_mask, other=0)
        offs_m = pid0 * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        img = (offs_m // OHW).to(tl.int64)
        p = offs_m % OHW
        y_ch = offs_j
    oh = p // OW
    ow = p % OW
    x_img = img * C_X * HW
    w_row = co.to(tl.int64) * (C_W * KH * KW)
    offs_c = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC)
    for kh in range(KH):
        ih = oh * SH - PH + kh * DH
        h_ok = m_mask & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * SW - PW + kw * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            x_pix = x_img + (ih * W + iw)
            w_tap = w_row + (kh * KW + kw)
            for c0 in range(0, K_IN, BLOCK_K):
                cj = c0 + offs_c
                c_mask = cj < K_IN
                if IDX_IN:
                    ci = tl.load(in_idx_ptr + cj, mask=c_mask, other=0).to(tl.int64)
                else:
                    ci = cj.to(tl.int64)
                if X_GATHERED:
                    xc = cj.to(tl.int64)
                else:
                    xc = ci
                a = tl.load(x_ptr + (x_pix[:, None] + xc[None, :] * HW),
                            mask=ok[:, None] & c_mask[None, :], other=0.0)
                b = tl.load(w_ptr + (w_tap[None, :] + ci[:, None] * (KH * KW)),
                            mask=c_mask[:, None] & j_mask[None, :], other=0.0)
                acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=j_mask, other=0.0).to(ACC)
        acc = acc + bias[None, :]
    y_off = (img * C_Y * OHW + p)[:, None] + y_ch.to(tl.int64)[None, :] * OHW
    tl.store(y_ptr + y_off, cvt_store(acc, OUT_T, EMULATE_RNE), mask=m_mask[:, None] & j_mask[None, :])


@triton.jit
def _conv_dx_kernel(
    go_ptr, w_ptr, in_idx_ptr, out_sel_ptr, counts_ptr, dx_ptr,
    C_DX, C_W, H, W, OH, OW, KH, KW,
    SH, SW, PH, PW, DH, DW,
    K_IN,  # columns: used input channels
    N_OUT,  # channel_conv: len(out_idx) (the reduction length); masked: C_out (row length of `order`)
    M,  # rows: channel_conv N*H*W; masked H*W
    N_PBLK,  # masked: pixel blocks per sample
    C_GO,  # channels of grad_out
    MASKED: tl.constexpr, IDX_IN: tl.constexpr, X_GATHERED: tl.constexpr,
    DOT_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, OUT_T: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    OHW = OH * OW
    HW = H * W
    if MASKED:
        n_s = pid0 // N_PBLK
        pid_m = pid0 % N_PBLK
        r_end = tl.load(counts_ptr + n_s)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        img = tl.full([BLOCK_M], 0, tl.int64) + n_s
        q = offs_m
    else:
        n_s = 0
        r_end = N_OUT
        offs_m = pid0 * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        img = (offs_m // HW).to(tl.int64)
        q = offs_m % HW
    ih = q // W
    iw = q % W
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < K_IN
    if IDX_IN:
        ci = tl.load(in_idx_ptr + offs_c, mask=c_mask, other=0).to(tl.int64)
    else:
        ci = offs_c.to(tl.int64)
    if X_GATHERED:
        xc = offs_c.to(tl.int64)
    else:
        xc = ci
    go_img = img * C_GO * OHW
    w_col = ci * (KH * KW)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC)
    for kh in range(KH):
        th = ih + PH - kh * DH
        thc = tl.where(th >= 0, th, 0)  # no negative // or % (C and numpy round differently)
        oh = thc // SH
        h_ok = m_mask & (th >= 0) & (thc % SH == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + PW - kw * DW
            twc = tl.where(tw >= 0, tw, 0)
            ow = twc // SW
            ok = h_ok & (tw >= 0) & (twc % SW == 0) & (ow < OW)
            go_pix = go_img + (oh * OW + ow)
            w_tap = w_col + (kh * KW + kw)
            for r0 in range(0, r_end, BLOCK_R):
                rj = r0 + offs_r
                r_mask = rj < r_end
                if MASKED:
                    co = tl.load(out_sel_ptr + n_s.to(tl.int64) * N_OUT + rj, mask=r_mask, other=0).to(tl.int64)
                    go_ch = co
                else:
                    co = tl.load(out_sel_ptr + rj, mask=r_mask, other=0).to(tl.int64)
                    go_ch = rj.to(tl.int64)
                a = tl.load(go_ptr + (go_pix[:, None] + go_ch[None, :] * OHW),
                            mask=ok[:, None] & r_mask[None, :], other=0.0)
                b = tl.load(w_ptr + (co[:, None] * (C_W * KH * KW) + w_tap[None, :]),
                            mask=r_mask[:, None] & c_mask[None, :], other=0.0)
                acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC)
    dx_off = (img * C_DX * HW + q)[:, None] + xc[None, :] * HW
    tl.store(dx_ptr + dx_off, cvt_store(acc, OUT_T, EMULATE_RNE), mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _conv_dw_kernel(
    go_ptr, x_ptr, in_idx_ptr, out_sel_ptr, counts_ptr, dw_ptr,
    C_X, C_W, H, W, OH, OW, KH, KW,
    SH, SW, PH, PW, DH, DW,
    K_IN, N_OUT,
    M,  # reduction rows: channel_conv N*OH*OW; masked OH*OW (one sample)
    M_PER_PROG,  # rows per program (a multiple of BLOCK_M)
    N_SPLIT,  # programs per row range (masked: per sample)
    N_CBLK,  # input-channel blocks
    C_GO,
    MASKED: tl.constexpr, IDX_IN: tl.constexpr, X_GATHERED: tl.constexpr,
    DOT_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(0)  # (sample,) split
    pid_b = tl.program_id(1)  # out-channel block * N_CBLK + in-channel block
    tap = tl.program_id(2)
    pid_j = pid_b // N_CBLK
    pid_c = pid_b % N_CBLK
    kh = tap // KW
    kw = tap % KW
    OHW = OH * OW
    HW = H * W
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        n_s = pid_s // N_SPLIT
        split = pid_s % N_SPLIT
        cnt = tl.load(counts_ptr + n_s)
        if pid_j * BLOCK_N >= cnt:
            return
        j_mask = offs_j < cnt
        co = tl.load(out_sel_ptr + n_s.to(tl.int64) * N_OUT + offs_j, mask=j_mask, other=0).to(tl.int64)
        go_ch = co
    else:
        n_s = 0
        split = pid_s
        j_mask = offs_j < N_OUT
        co = tl.load(out_sel_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
        go_ch = offs_j.to(tl.int64)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = offs_c < K_IN
    if IDX_IN:
        ci = tl.load(in_idx_ptr + offs_c, mask=c_mask, other=0).to(tl.int64)
    else:
        ci = offs_c.to(tl.int64)
    if X_GATHERED:
        xc = offs_c.to(tl.int64)
    else:
        xc = ci
    acc = tl.full([BLOCK_N, BLOCK_K], 0.0, ACC)
    m_start = split * M_PER_PROG
    for m0 in range(m_start, m_start + M_PER_PROG, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        if MASKED:
            img = tl.full([BLOCK_M], 0, tl.int64) + n_s
            p = offs_m
        else:
            img = (offs_m // OHW).to(tl.int64)
            p = offs_m % OHW
        oh = p // OW
        ow = p % OW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(go_ptr + ((img * C_GO * OHW + p)[None, :] + go_ch[:, None] * OHW),
                    mask=j_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(x_ptr + ((img * C_X * HW + (ih * W + iw))[:, None] + xc[None, :] * HW),
                    mask=ok[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC)
    dw_off = co[:, None] * (C_W * KH * KW) + ci[None, :] * (KH * KW) + (kh * KW + kw)
    tl.atomic_add(dw_ptr + dw_off, acc, mask=j_mask[:, None] & c_mask[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

if INTERPRETED:
    _DW_TARGET_PROGRAMS = 8  # each program is Python work: split the reduction only a little


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    return v if len(v) == 2 else (v[0], v[0])


def _pow2(n: int, lo: int, hi: int) -> int:
    p = 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
    return max(lo, min(hi, p))


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _Geom:
    """Shapes and conv parameters of one call (plain ints)."""

    def __init__(self, op: str, x: Tensor, weight: Tensor, stride, padding, dilation):
        if x.dim() != 4 or weight.dim() != 4:
            fail(op, f"x and weight must be 4-D (NCHW / (C_out, C_in, kh, kw)), got {tuple(x.shape)} and "
                      f"{tuple(weight.shape)}")
        for name, t in (("x", x), ("weight", weight)):
            if t.dtype not in TL_DTYPES:
                fail(op, f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}", TypeError)
        if weight.dtype != x.dtype:
            fail(op, f"weight has dtype {weight.dtype} but x has {x.dtype}", TypeError)
        self.N, self.C_x, self.H, self.W = (int(s) for s in x.shape)
        self.C_out, self.C_w, self.KH, self.KW = (int(s) for s in weight.shape)
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = _pair(stride), _pair(padding), _pair(dilation)
        if min(self.sh, self.sw, self.dh, self.dw) < 1 or min(self.ph, self.pw) < 0:
            fail(op, f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                      f"padding={padding}, dilation={dilation}")
        if self.KH <= 0 or self.KW <= 0:
            fail(op, f"weight must have a non-empty kernel, got shape {tuple(weight.shape)}")
        self.OH = (self.H + 2 * self.ph - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.OW = (self.W + 2 * self.pw - self.dw * (self.KW - 1) - 1) // self.sw + 1
        if self.OH <= 0 or self.OW <= 0:
            fail(op, f"the output would be empty ({self.OH}x{self.OW}) for an input of {self.H}x{self.W}, "
                      f"kernel {self.KH}x{self.KW}, stride {(self.sh, self.sw)}, padding {(self.ph, self.pw)}, "
                      f"dilation {(self.dh, self.dw)}")

    def conv_args(self):
        return (self.H, self.W, self.OH, self.OW, self.KH, self.KW,
                self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)


def _compute_dtypes(*ts: Tensor):
    """(tl dot-operand dtype, tl accumulator dtype, input_precision, torch accumulator dtype)."""
    dts = {t.dtype for t in ts}
    if len(dts) == 1:
        dot = dts.pop()
    elif torch.float64 in dts:
        dot = torch.float64
    else:
        dot = torch.float32
    acc = torch.float64 if dot == torch.float64 else torch.float32
    prec = "ieee"
    if dot == torch.float32 and ts[0].device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        prec = "tf32"
    if INTERPRETED and dot == torch.bfloat16:
        dot = torch.float32  # the interpreter's bf16 tl.dot is wrong; fp32 products of bf16 are exact
    return TL_DTYPES[dot], TL_DTYPES[acc], prec, acc


def _idx(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.int64).contiguous().reshape(-1)


def _mask_plan(out_mask: Tensor, g: _Geom, op: str, device: torch.device):
    """(counts int32 (N,), order int64 (N, C_out)): per sample, the kept output channels first."""
    if tuple(out_mask.shape) != (g.N, g.C_out):
        fail(op, f"out_mask must have shape (N, C_out) = {(g.N, g.C_out)}, got {tuple(out_mask.shape)}")
    keep = out_mask.to(device=device) != 0
    counts = keep.sum(1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    return keep, counts, order.contiguous()


class on_device:
    """``torch.cuda.device(dev)`` for CUDA tensors (Triton launches on the current device); a no-op on CPU."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _pixel_grid(n: int, pixels: int, cols: int, block_cols: int, masked: bool):
    """(M, pixel blocks per sample, grid) of an implicit GEMM over ``n`` samples of ``pixels`` each: masked
    tiles stay within one sample (its kept channels differ), unmasked ones run over all N * pixels."""
    if masked:
        n_pblk = _cdiv(pixels, _BLOCK_M)
        return pixels, n_pblk, (n * n_pblk, _cdiv(cols, block_cols))
    return n * pixels, 1, (_cdiv(n * pixels, _BLOCK_M), _cdiv(cols, block_cols))


def _launch_fwd(g: _Geom, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_sel: Optional[Tensor],
                out_sel: Tensor, counts: Optional[Tensor], y: Tensor, k_in: int, n_out: int,
                masked: bool, x_gathered: bool):
    dot_t, acc_t, prec, _ = _compute_dtypes(x, weight)
    block_n = _pow2(n_out, 16, 64)
    block_k = _pow2(k_in, 16, 32)
    m, n_pblk, grid = _pixel_grid(g.N, g.OH * g.OW, n_out, block_n, masked)
    dummy = out_sel
    with on_device(x.device):
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else dummy, in_sel if in_sel is not None else dummy, out_sel,
            counts if counts is not None else dummy, y,
            g.C_x, g.C_w, *g.conv_args(), k_in, n_out, m, n_pblk, y.shape[1],
            MASKED=masked, IDX_IN=in_sel is not None, X_GATHERED=x_gathered, HAS_BIAS=bias is not None,
            DOT_T=dot_t, ACC=acc_t, PREC=prec, OUT_T=TL_DTYPES[y.dtype], EMULATE_RNE=EMULATE_RNE,
            BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_NUM_WARPS,
        )


def _launch_dx(g: _Geom, grad_out: Tensor, weight: Tensor, in_sel: Optional[Tensor], out_sel: Tensor,
               counts: Optional[Tensor], dx: Tensor, k_in: int, n_out: int, masked: bool, x_gathered: bool):
    dot_t, acc_t, prec, _ = _compute_dtypes(grad_out, weight)
    block_n = _pow2(k_in, 16, 64)
    block_r = _pow2(n_out, 16, 32)
    m, n_pblk, grid = _pixel_grid(g.N, g.H * g.W, k_in, block_n, masked)
    dummy = out_sel
    with on_device(dx.device):
        _conv_dx_kernel[grid](
            grad_out, weight, in_sel if in_sel is not None else dummy, out_sel,
            counts if counts is not None else dummy, dx,
            dx.shape[1], g.C_w, *g.conv_args(), k_in, n_out, m, n_pblk, grad_out.shape[1],
            MASKED=masked, IDX_IN=in_sel is not None, X_GATHERED=x_gathered,
            DOT_T=dot_t, ACC=acc_t, PREC=prec, OUT_T=TL_DTYPES[dx.dtype], EMULATE_RNE=EMULATE_RNE,
            BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=_NUM_WARPS,
        )


def _launch_dw(g: _Geom, grad_out: Tensor, x: Tensor, weight: Tensor, in_sel: Optional[Tensor],
               out_sel: Tensor, counts: Optional[Tensor], k_in: int, n_out: int, masked: bool,
               x_gathered: bool) -> Tensor:
    """grad_weight of the full weight shape (zero outside the used block), in the weight's dtype."""
    dot_t, acc_t, prec, acc = _compute_dtypes(grad_out, x)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    block_n = _pow2(n_out, 16, 64)
    block_k = _pow2(k_in, 16, 64)
    n_cblk = _cdiv(k_in, block_k)
    taps = g.KH * g.KW
    m = g.OH * g.OW if masked else g.N * g.OH * g.OW
    m_blocks = _cdiv(m, _DW_BLOCK_M)
    tiles = _cdiv(n_out, block_n) * n_cblk * taps * (g.N if masked else 1)
    split = max(1, min(m_blocks, _cdiv(_DW_TARGET_PROGRAMS, tiles)))
    iters = _cdiv(m_blocks, split)
    split = _cdiv(m_blocks, iters)
    grid = ((g.N if masked else 1) * split, _cdiv(n_out, block_n) * n_cblk, taps)
    dummy = out_sel
    with on_device(x.device):
        _conv_dw_kernel[grid](
            grad_out, x, in_sel if in_sel is not None else dummy, out_sel,
            counts if counts is not None else dummy, dw,
            x.shape[1], g.C_w, *g.conv_args(), k_in, n_out, m, iters * _DW_BLOCK_M, split, n_cblk,
            grad_out.shape[1],
            MASKED=masked, IDX_IN=in_sel is not None, X_GATHERED=x_gathered,
            DOT_T=dot_t, ACC=acc_t, PREC=prec,
            BLOCK_M=_DW_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_NUM_WARPS,
        )
    return dw if dw.dtype == weight.dtype else dw.to(weight.dtype)


def _check_grad_out(op: str, grad_out: Tensor, shape):
    if tuple(grad_out.shape) != tuple(shape):
        fail(op, f"grad_out must have shape {tuple(shape)}, got {tuple(grad_out.shape)}")
    if grad_out.dtype not in TL_DTYPES:
        fail(op, f"grad_out must be a floating tensor, got {grad_out.dtype}", TypeError)


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "slimops_triton::channel_conv2d", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor in_idx, Tensor out_idx, int[2] stride=1, "
           "int[2] padding=0, int[2] dilation=1, bool input_gathered=False) -> Tensor",
)
def channel_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_idx: Tensor, out_idx: Tensor,
                   stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                   dilation: Sequence[int] = (1, 1), input_gathered: bool = False) -> Tensor:
    """conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx]) without either gather; 1 launch."""
    op = "channel_conv2d"
    check_device(op, x.device)
    g = _Geom(op, x, weight, stride, padding, dilation)
    dev = x.device
    in_sel, out_sel = _idx(in_idx, dev), _idx(out_idx, dev)
    k_in, n_out = in_sel.numel(), out_sel.numel()
    if input_gathered and g.C_x != k_in:
        fail(op, f"input_gathered: x must have len(in_idx) = {k_in} channels, got {g.C_x}")
    y = torch.empty((g.N, n_out, g.OH, g.OW), dtype=x.dtype, device=dev)
    if y.numel() == 0:
        return y
    if k_in == 0:  # no input channel: the bias, broadcast
        y.zero_()
        if bias is not None:
            y += bias.index_select(0, out_sel.to(bias.device)).to(device=dev, dtype=x.dtype)[None, :, None, None]
        return y
    b = None if bias is None else bias.to(dev).contiguous()
    _launch_fwd(g, x.contiguous(), weight.contiguous(), b, in_sel, out_sel, None, y, k_in, n_out,
                masked=False, x_gathered=bool(input_gathered))
    return y



@torch.library.custom_op(
    "slimops_triton::channel_conv2d_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor in_idx, Tensor out_idx, int[2] stride, "
           "int[2] padding, int[2] dilation, bool input_gathered, bool[3] output_mask) "
           "-> (Tensor, Tensor, Tensor)",
)
def channel_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor,
                            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                            input_gathered: bool, output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of channel_conv2d, full-size; 1 launch per requested x / weight grad."""
    op = "channel_conv2d_backward"
    check_device(op, x.device)
    g = _Geom(op, x, weight, stride, padding, dilation)
    dev = x.device
    in_sel, out_sel = _idx(in_idx, dev), _idx(out_idx, dev)
    k_in, n_out = in_sel.numel(), out_sel.numel()
    if input_gathered and g.C_x != k_in:
        fail(op, f"input_gathered: x must have len(in_idx) = {k_in} channels, got {g.C_x}")
    _check_grad_out(op, grad_out, (g.N, n_out, g.OH, g.OW))
    go = grad_out.contiguous()
    want_x, want_w, want_b = (bool(m) for m in output_mask)
    gx = gw = gb = None
    busy = g.N > 0 and k_in > 0 and n_out > 0  # otherwise every gradient is zero
    if want_x:
        full = input_gathered or k_in == g.C_x  # every channel of x is written
        if busy and full:
            gx = torch.empty(x.shape, dtype=x.dtype, device=dev)
        else:
            gx = torch.zeros(x.shape, dtype=x.dtype, device=dev)
        if busy and x.numel():
            _launch_dx(g, go, weight.contiguous(), in_sel, out_sel, None, gx, k_in, n_out,
                       masked=False, x_gathered=bool(input_gathered))
    if want_w:
        if busy:
            gw = _launch_dw(g, go, x.contiguous(), weight, in_sel, out_sel, None, k_in, n_out,
                            masked=False, x_gathered=bool(input_gathered))
        else:
            gw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if want_b:
        acc = _compute_dtypes(go, weight)[3]
        gb32 = torch.zeros(g.C_out, dtype=acc, device=weight.device)
        if n_out:
            gb32.index_copy_(0, out_sel.to(weight.device), go.sum((0, 2, 3), dtype=acc).to(weight.device))
        gb = gb32.to(weight.dtype)
    return (gx if want_x else x.new_empty(0), gw if want_w else weight.new_empty(0),
            gb if want_b else weight.new_empty(0))



@torch.library.custom_op(
    "slimops_triton::masked_conv2d", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor out_mask, int[2] stride=1, int[2] padding=0, "
           "int[2] dilation=1) -> Tensor",
)
def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor,
                  stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                  dilation: Sequence[int] = (1, 1)) -> Tensor:
    """conv2d(x, weight, bias) * out_mask[..., None, None], computing only the kept channels; 1 launch."""
    op = "masked_conv2d"
    check_device(op, x.device)
    g = _Geom(op, x, weight, stride, padding, dilation)
    if g.C_x != g.C_w:
        fail(op, f"x has {g.C_x} channels but weight expects {g.C_w}")
    dev = x.device
    keep, counts, order = _mask_plan(out_mask, g, op, dev)
    y = torch.zeros((g.N, g.C_out, g.OH, g.OW), dtype=x.dtype, device=dev)
    if y.numel() == 0:
        return y
    if g.C_x == 0:  # no input channel: the bias on the kept channels
        if bias is not None:
            y += (bias.to(device=dev, dtype=x.dtype)[None, :] * keep.to(x.dtype))[:, :, None, None]
        return y
    b = None if bias is None else bias.to(dev).contiguous()
    _launch_fwd(g, x.contiguous(), weight.contiguous(), b, None, order, counts, y, g.C_x, g.C_out,
                masked=True, x_gathered=False)
    return y



@torch.library.custom_op(
    "slimops_triton::masked_conv2d_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor out_mask, int[2] stride, int[2] padding, "
           "int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
)
def masked_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, out_mask: Tensor,
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                           output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of masked_conv2d; per sample only kept channels are reduced over."""
    op = "masked_conv2d_backward"
    check_device(op, x.device)
    g = _Geom(op, x, weight, stride, padding, dilation)
    if g.C_x != g.C_w:
        fail(op, f"x has {g.C_x} channels but weight expects {g.C_w}")
    _check_grad_out(op, grad_out, (g.N, g.C_out, g.OH, g.OW))
    dev = x.device
    keep, counts, order = _mask_plan(out_mask, g, op, dev)
    go = grad_out.contiguous()
    want_x, want_w, want_b = (bool(m) for m in output_mask)
    gx = gw = gb = None
    busy = g.N > 0 and g.C_x > 0 and g.C_out > 0
    if want_x:
        if busy:
            gx = torch.empty(x.shape, dtype=x.dtype, device=dev)  # every channel is written
            _launch_dx(g, go, weight.contiguous(), None, order, counts, gx, g.C_x, g.C_out,
                       masked=True, x_gathered=False)
        else:
            gx = torch.zeros(x.shape, dtype=x.dtype, device=dev)
    if want_w:
        if busy:
            gw = _launch_dw(g, go, x.contiguous(), weight, None, order, counts, g.C_x, g.C_out,
                            masked=True, x_gathered=False)
        else:
            gw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if want_b:
        acc = _compute_dtypes(go, weight)[3]
        gb = (go * keep[:, :, None, None].to(go.dtype)).sum((0, 2, 3), dtype=acc)
        gb = gb.to(device=weight.device, dtype=weight.dtype)
    return (gx if want_x else x.new_empty(0), gw if want_w else weight.new_empty(0),
            gb if want_b else weight.new_empty(0))


# The fakes and autograd every backend shares (the backward calls the *_backward custom ops above).
wire(DEFS, "slimops_triton")
