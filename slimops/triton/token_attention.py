"""Triton kernels of the ``token_attention`` family (attention over a kept subset of tokens, for patch slimming),
registered as ``torch.ops.slimops_triton.*``.

Same schemas as ``csrc/registration.cpp`` and the same semantics as :mod:`slimops.reference.token_attention`
(docs/algorithms.md §10; patch slimming: Tang et al., CVPR 2022). q (B, heads, Lq, d), k, v (B, heads, Lk, d);
``q_idx`` (nq,) or (B, nq), ``kv_idx`` (nk,) or (B, nk), int64 or int32, in range, distinct within a row. Per
(sample b, head h)::

    out[b, h, i] = sum_j softmax_j(q[b, h, q_idx[b, i]] . k[b, h, kv_idx[b, j]] · scale) v[b, h, kv_idx[b, j]]

with ``scale = d^-1/2`` unless given.

- ``kept_token_attention(q, k, v, q_idx, kv_idx, scale=None)``: the output, (B, heads, nq, d) contiguous, dtype
  of q; its rows follow q_idx's order.
- ``kept_token_attention_backward(grad, q, k, v, q_idx, kv_idx, scale, output_mask)``: (grad_q, grad_k, grad_v)
  in the full (contiguous) shapes of q, k, v, zero on the rows no index keeps, recomputing the softmax (nothing
  is saved by the forward but its inputs); a gradient not asked for is an empty tensor. With P the softmax
  weights and g = grad: ``delta_i = sum_j P_ij (g_i . v_j)``, ``dS = P (g v^T - delta)``;
  ``grad_q[q_idx] = scale · dS k``, ``grad_k[kv_idx] = scale · dS^T q``, ``grad_v[kv_idx] = P^T g``.

Kernel design (flash-style: online softmax over key tiles, no attention matrix in memory, no gathered copies,
no atomics)
--------------------------------------------------------------------------------------------------------------
* **Indices read in the kernel.** A program loads the BM (BN) kept positions of its tile from ``q_idx``
  (``kv_idx``) and then the q (k, v) rows at those tokens, in place, with the tensors' (batch, head, token)
  strides (e.g. views of a fused qkv projection: token stride 3·heads·d); only a tensor whose head dim is not
  contiguous (and d > 1) is copied first. One (row stride, column stride) pair per index serves both shapes:
  the row stride is 0 for an index shared by the batch. int32 and int64 indices alike (the loaded value is
  widened to int64; every row offset is int64). The head dim is padded to ``D = max(16, next_pow2(d))`` lanes
  (masked; ``d`` is a constexpr, so the mask folds away when ``d = D``).
* **Programs.** One 1-D launch, ``pid = (b·heads + head)·tiles + tile``; ``tiles = cdiv(nq, BM)`` query tiles
  (forward, query-centric backward) or ``cdiv(nk, BN)`` key tiles (key-centric backward).
* **Forward** (``_fwd_kernel``): the q tile ``[BM, D]`` stays in registers; a loop over the kept keys, BN at a
  time: logits ``s = q k^T · scale·log2(e)`` (-inf on the padding lanes past nk), online softmax (running max m,
  sum l, ``exp2``), ``acc = acc·alpha + P v``; epilogue ``out = acc / l``, rounded once to the dtype of q, stored
  at the kept positions i (the output is (B, heads, nq, d)). No NaN guard is needed on padding rows: nk >= 1
  whenever nq >= 1 (the shared checks), so the first key tile holds a real key for every row (padding query rows
  are zero, logit 0), m is finite after it and padding keys get ``exp2(-inf) = 0``.
* **Backward**, two kernels (as sema's two-kernel backward). ``_bwd_q_kernel`` (query-centric, the forward's
  tiling): pass 1 over the key tiles recomputes m, l and ``delta_i = sum_j P_ij (g_i . v_j)`` online (rescaled
  like O) and writes ``lse = m + log2 l`` and delta to (B·heads, nq) float32 (float64) scratch rows; pass 2
  (if grad_q is asked for) recomputes ``P = exp2(s - lse)``, ``dS = P (g v^T - delta)`` and stores
  ``dq = scale · dS k`` at the rows ``q_idx``. ``_bwd_kv_kernel`` (key-centric, one key tile, only when grad_k
  or grad_v is asked for) loops over every query tile, recomputes ``P^T`` from lse, ``dv = P^T g``,
  ``dk = scale · dS^T q`` and stores them at the rows ``kv_idx``. The gradient outputs are zero-filled
  (torch.zeros) first; indices are distinct, so each kept row is written exactly once, by plain stores.

Global memory traffic per (sample, head) (e = element size, ``T = cdiv(nq, BM)`` query tiles,
``U = cdiv(nk, BN)`` key tiles; index reads of 4 or 8 B per kept position and tile not counted): forward reads
the nq kept q rows once and the nk kept k, v rows once per query tile (``(nq + 2·T·nk)·d·e``; T = 1, the minimum,
up to 64 kept queries; the re-reads come from L2 for the few hundred KB of a head) and writes nq·d·e. Backward:
the zero fill of the gradients (``(Lq + 2·Lk)·d·e``, what the full-shape contract costs), ``_bwd_q_kernel`` reads
q and g once and k, v twice per query tile (once without grad_q), writes dq and 8 B (16 B for float64) of
statistics per query; ``_bwd_kv_kernel`` reads k, v once and q, g and the statistics once per key tile, writes
dk, dv. No gathered copies of q, k, v (the "index_select + SDPA" baseline writes and re-reads three) and no
scatters of the gradients.

Tiles and launch configuration
------------------------------
``BM = min(64, max(16, next_pow2(nq)))`` queries and ``BN = min(64, max(16, next_pow2(nk)))`` keys per tile
(32 instead of 64 for float64), ``num_warps = 4``, ``num_stages = 2`` for bf16/fp16 and 1 for float32/float64 (the
choices of :mod:`slimops.triton.sema`, whose kernels have the same tile shapes and dots; see its ptxas
numbers). Every ``tl.dot`` dimension is a power of two >= 16. Module constants ``_BLOCK``, ``_BLOCK_FP64``,
``_NUM_WARPS``, ``_NUM_STAGES``, ``_FP32_DOT``.

Precision: logits, softmax statistics and accumulators in float32 for float32/bf16/fp16 inputs, float64 for
float64; one rounding of each output to its dtype. bf16/fp16: tl.dot on the stored dtype (P and dS rounded to it,
as FlashAttention does), float32 accumulation. float32 on CUDA: 3xTF32 dots (``input_precision="tf32x3"``), or
plain TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on (torch's policy for its float32 matmuls).
float64: float64 dots.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): bf16 tiles are multiplied as float32 with P and dS first
rounded to bf16 (its bf16 ``tl.dot`` is wrong), bf16 stores round to nearest even explicitly
(``_common.cvt_store``), row reductions use ``_common.rowsum`` / ``rowmax``.

Launches per call: forward 1 kernel; backward 1 zero fill per gradient asked for, ``_bwd_q_kernel`` and (for
grad_k / grad_v) ``_bwd_kv_kernel``, + two (B·heads, nq) scratch buffers. No kernel for an empty batch, no heads
or nq = 0 (the gradients are then all zero). The index values are checked on the host first
(``check_index_values``: one device sync per index).

Coverage: any Lq, Lk, nq, nk (nk >= 1 when nq >= 1), any d >= 1, float32 / float64 / bfloat16 / float16,
int32 / int64 indices, shared or per-sample, any strides with a contiguous head dim (else copied), fewer than
2^31 programs. Verified: correctness through the interpreter (tests/test_token_attention_triton.py). Not verified:
nothing was run on a GPU from here (compilation, register use and speed unmeasured); the tiles are sema's
first choices.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.opdefs import token_attention as _defs
from slimops.opdefs import wire
from slimops.triton._common import (EMULATE_RNE, INTERPRETED, TL_DTYPES, check_device, cvt_store, dot_operand, fail,
                                    head_rows, launching_attention, math_dtype, next_pow2, rowmax, rowsum, to_acc,
                                    token_strides)

__all__ = ["kept_token_attention", "kept_token_attention_backward"]

# Tiles (module docstring, "Tiles and launch configuration").
_BLOCK = 64  # the largest query / key tile
_BLOCK_FP64 = 32  # float64 (64-token fp64 tiles spill, as in sema)
_MIN_DOT = 16  # every tl.dot dimension is a power of two >= 16
_NUM_WARPS = 4
_NUM_STAGES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 1, torch.float64: 1}
# input_precision of float32 dots on CUDA when torch.backends.cuda.matmul.allow_tf32 is off (the default).
_FP32_DOT = "tf32x3"
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _base(b, hd, sb, sh):
    return b.to(tl.int64) * sb + hd.to(tl.int64) * sh


@triton.jit
def _load_idx(idx_ptr, b, pos, valid, sib, sin):
    """Token indices at the kept positions ``pos`` of sample b (row stride ``sib`` = 0 for a shared 1-D index),
    widened to int64; 0 on invalid lanes."""
    off = b.to(tl.int64) * sib + pos.to(tl.int64) * sin
    return tl.load(idx_ptr + off, mask=valid, other=0).to(tl.int64)


@triton.jit
def _load_rows(ptr, base, tok, valid, sn, HEAD_D: tl.constexpr, D: tl.constexpr):
    """The ``[len(tok), D]`` tile of rows ``tok`` (int64; token stride ``sn``, head dim contiguous), zero outside."""
    d = tl.arange(0, D)
    off = base + tok[:, None] * sn + d[None, :]
    return tl.load(ptr + off, mask=valid[:, None] & (d < HEAD_D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, base, tok, valid, sn, x, OUT_T: tl.constexpr, EMULATE_RNE: tl.constexpr,
                HEAD_D: tl.constexpr, D: tl.constexpr):
    d = tl.arange(0, D)
    off = base + tok[:, None] * sn + d[None, :]
    tl.store(ptr + off, cvt_store(x, OUT_T, EMULATE_RNE), mask=valid[:, None] & (d < HEAD_D)[None, :])


@triton.jit
def _program(NTILE, HEADS):
    """This program's (tile, b·heads + head, b, head): pid = bh * NTILE + tile."""
    pid = tl.program_id(0)
    bh = pid // NTILE
    return pid % NTILE, bh, bh // HEADS, bh % HEADS


@triton.jit
def _key_tile(q, b, start, NK, ki_ptr, sjb, sjn, k_ptr, kbase, skn, v_ptr, vbase, svn, scale,
              HEAD_D: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """Kept keys ``start .. start+BN``: (log2-domain logits s [BM, BN], -inf past nk; k; v)."""
    kpos = start + tl.arange(0, BN)
    kvalid = kpos < NK
    ktok = _load_idx(ki_ptr, b, kpos, kvalid, sjb, sjn)
    k = _load_rows(k_ptr, kbase, ktok, kvalid, skn, HEAD_D, D).to(DOT_T)
    v = _load_rows(v_ptr, vbase, ktok, kvalid, svn, HEAD_D, D).to(DOT_T)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    return tl.where(kvalid[None, :], s, float("-inf")), k, v


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, qi_ptr, ki_ptr, o_ptr,
    HEADS, NQ, NK, NTILE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sib, sin, sjb, sjn,
    qk_scale: tl.float64,
    HEAD_D: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, OUT_T: tl.constexpr, PREC: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """out[i] = softmax_j(q[q_idx[i]] . k[kv_idx[j]] · scale) v[kv_idx[j]] for kept queries tile*BM .. +BM of one
    (sample, head): online softmax over the kept keys, BN at a time."""
    tile, bh, b, hd = _program(NTILE, HEADS)
    scale = to_acc(qk_scale, ACC)
    pos = tile * BM + tl.arange(0, BM)
    qvalid = pos < NQ
    qtok = _load_idx(qi_ptr, b, pos, qvalid, sib, sin)
    q = _load_rows(q_ptr, _base(b, hd, sqb, sqh), qtok, qvalid, sqn, HEAD_D, D).to(DOT_T)
    kbase = _base(b, hd, skb, skh)
    vbase = _base(b, hd, svb, svh)
    m_i = tl.full([BM], float("-inf"), ACC)
    l_i = tl.full([BM], 0.0, ACC)
    acc = tl.full([BM, D], 0.0, ACC)
    for start in range(0, NK, BN):
        s, k, v = _key_tile(q, b, start, NK, ki_ptr, sjb, sjn, k_ptr, kbase, skn, v_ptr, vbase, svn, scale,
                            HEAD_D, D, BN, DOT_T, PREC)
        m_new = tl.maximum(m_i, rowmax(s))  # finite from the first tile on (module docstring)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + rowsum(p)
        acc = tl.dot(dot_operand(p, IN_T, DOT_T, EMULATE_RNE), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    out = acc * (1.0 / l_i)[:, None]
    _store_rows(o_ptr, _base(b, hd, sob, soh), pos.to(tl.int64), qvalid, son, out, OUT_T, EMULATE_RNE, HEAD_D, D)


@triton.jit
def _bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, qi_ptr, ki_ptr, dq_ptr, lse_ptr, delta_ptr,
    HEADS, NQ, NK, NTILE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, sdb, sdh, sdn, sib, sin, sjb, sjn,
    qk_scale: tl.float64, sm_scale: tl.float64,
    NEED_DQ: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ACC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, OUT_T: tl.constexpr, PREC: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    """Query-centric backward of one query tile (the forward's tiling). Pass 1 over the key tiles: m, l and
    delta_i = sum_j P_ij (g_i . v_j) online; lse (log2 domain) and delta go to the scratch rows (B*heads, nq).
    Pass 2 (NEED_DQ): P = exp2(s - lse), dS = P (g v^T - delta), dq = scale * dS k at the rows q_idx."""
    tile, bh, b, hd = _program(NTILE, HEADS)
    scale = to_acc(qk_scale, ACC)
    pos = tile * BM + tl.arange(0, BM)
    qvalid = pos < NQ
    qtok = _load_idx(qi_ptr, b, pos, qvalid, sib, sin)
    q = _load_rows(q_ptr, _base(b, hd, sqb, sqh), qtok, qvalid, sqn, HEAD_D, D).to(DOT_T)
    do = _load_rows(g_ptr, _base(b, hd, sgb, sgh), pos.to(tl.int64), qvalid, sgn, HEAD_D, D).to(DOT_T)
    kbase = _base(b, hd, skb, skh)
    vbase = _base(b, hd, svb, svh)
    m_i = tl.full([BM], float("-inf"), ACC)
    l_i = tl.full([BM], 0.0, ACC)
    dd = tl.full([BM], 0.0, ACC)
    for start in range(0, NK, BN):
        s, k, v = _key_tile(q, b, start, NK, ki_ptr, sjb, sjn, k_ptr, kbase, skn, v_ptr, vbase, svn, scale,
                            HEAD_D, D, BN, DOT_T, PREC)
        m_new = tl.maximum(m_i, rowmax(s))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        l_i = l_i * alpha + rowsum(p)
        dd = dd * alpha + rowsum(p * dp)
        m_i = m_new
    delta = dd / l_i
    lse = m_i + tl.log2(l_i)
    srow = bh.to(tl.int64) * NQ + pos
    tl.store(lse_ptr + srow, lse, mask=qvalid)
    tl.store(delta_ptr + srow, delta, mask=qvalid)
    if NEED_DQ:
        dq = tl.full([BM, D], 0.0, ACC)
        for start in range(0, NK, BN):
            s, k, v = _key_tile(q, b, start, NK, ki_ptr, sjb, sjn, k_ptr, kbase, skn, v_ptr, vbase, svn, scale,
                                HEAD_D, D, BN, DOT_T, PREC)
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(dot_operand(ds, IN_T, DOT_T, EMULATE_RNE), k, dq, input_precision=PREC)
        dq = dq * to_acc(sm_scale, ACC)
        _store_rows(dq_ptr, _base(b, hd, sdb, sdh), qtok, qvalid, sdn, dq, OUT_T, EMULATE_RNE, HEAD_D, D)


@triton.jit
def _bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, qi_ptr, ki_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    HEADS, NQ, NK, NTILE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, sdb, sdh, sdn, sib, sin, sjb, sjn,
    qk_scale: tl.float64, sm_scale: tl.float64,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, ACC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, OUT_T: tl.constexpr,
    PREC: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """Key-centric backward of kept keys tile*BN .. +BN: loops over every query tile, recomputes
    P^T = exp2(s^T - lse) from the scratch statistics, dv = P^T g (NEED_DV), dk = scale * dS^T q with
    dS^T = P^T (dP^T - delta) (NEED_DK), stored at the rows kv_idx (dk and dv share the strides sd*)."""
    tile, bh, b, hd = _program(NTILE, HEADS)
    scale = to_acc(qk_scale, ACC)
    kpos = tile * BN + tl.arange(0, BN)
    kvalid = kpos < NK
    ktok = _load_idx(ki_ptr, b, kpos, kvalid, sjb, sjn)
    k = _load_rows(k_ptr, _base(b, hd, skb, skh), ktok, kvalid, skn, HEAD_D, D).to(DOT_T)
    v = _load_rows(v_ptr, _base(b, hd, svb, svh), ktok, kvalid, svn, HEAD_D, D).to(DOT_T)
    qbase = _base(b, hd, sqb, sqh)
    gbase = _base(b, hd, sgb, sgh)
    srow = bh.to(tl.int64) * NQ
    dk = tl.full([BN, D], 0.0, ACC)
    dv = tl.full([BN, D], 0.0, ACC)
    for start in range(0, NQ, BM):
        pos = start + tl.arange(0, BM)
        qvalid = pos < NQ
        qtok = _load_idx(qi_ptr, b, pos, qvalid, sib, sin)
        q = _load_rows(q_ptr, qbase, qtok, qvalid, sqn, HEAD_D, D).to(DOT_T)
        do = _load_rows(g_ptr, gbase, pos.to(tl.int64), qvalid, sgn, HEAD_D, D).to(DOT_T)
        lse = tl.load(lse_ptr + srow + pos, mask=qvalid, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * scale  # [BN, BM]
        # (padding query lanes have g = 0, so they add nothing even unmasked; masked anyway, P = 0 there)
        pt = tl.exp2(tl.where(qvalid[None, :], st, float("-inf")) - lse[None, :])
        if NEED_DV:
            dv = tl.dot(dot_operand(pt, IN_T, DOT_T, EMULATE_RNE), do, dv, input_precision=PREC)
        if NEED_DK:
            delta = tl.load(delta_ptr + srow + pos, mask=qvalid, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dot_operand(dst, IN_T, DOT_T, EMULATE_RNE), q, dk, input_precision=PREC)
    obase = _base(b, hd, sdb, sdh)
    if NEED_DK:
        _store_rows(dk_ptr, obase, ktok, kvalid, sdn, dk * to_acc(sm_scale, ACC), OUT_T, EMULATE_RNE, HEAD_D, D)
    if NEED_DV:
        _store_rows(dv_ptr, obase, ktok, kvalid, sdn, dv, OUT_T, EMULATE_RNE, HEAD_D, D)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(q: Tensor) -> str:
    """input_precision of the dots: for float32 CUDA tensors "tf32" when torch.backends.cuda.matmul.allow_tf32
    is on, else ``_FP32_DOT``; "ieee" otherwise (the interpreter ignores it)."""
    if q.dtype == torch.float32 and q.device.type == "cuda":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else _FP32_DOT
    return "ieee"


def _dot_dtype(q: Tensor) -> torch.dtype:
    """The tl.dot operand dtype: the input dtype, except bf16 in the interpreter (its bf16 dot is wrong)."""
    if INTERPRETED and q.dtype == torch.bfloat16:
        return torch.float32
    return q.dtype


def _tile(n: int, block: int) -> int:
    return min(block, max(_MIN_DOT, next_pow2(n)))


class _Plan:
    """Sizes, tiles and dtypes of one call (module docstring, "Tiles and launch configuration")."""

    def __init__(self, op: str, q: Tensor, k: Tensor, q_idx: Tensor, kv_idx: Tensor, scale: Optional[float]):
        self.B, self.heads, self.Lq, self.d = (int(s) for s in q.shape)
        self.Lk = int(k.shape[2])
        self.BH = self.B * self.heads
        self.nq, self.nk = int(q_idx.shape[-1]), int(kv_idx.shape[-1])
        self.D = max(_MIN_DOT, next_pow2(self.d))
        block = _BLOCK_FP64 if q.dtype == torch.float64 else _BLOCK
        self.BM, self.BN = _tile(self.nq, block), _tile(self.nk, block)
        self.qtiles, self.ktiles = _cdiv(self.nq, self.BM), _cdiv(self.nk, self.BN)
        programs = self.BH * max(self.qtiles, self.ktiles)
        if programs >= 2 ** 31:
            fail(op, f"{programs} programs exceed the launch grid (B*heads={self.BH}, nq={self.nq}, nk={self.nk})",
                 NotImplementedError)
        self.acc = math_dtype(q)
        s = 1.0 / math.sqrt(self.d) if scale is None else float(scale)
        self.qk_scale = s * _LOG2E
        self.sm_scale = s
        self.meta = dict(HEAD_D=self.d, D=self.D, BM=self.BM, BN=self.BN, ACC=TL_DTYPES[self.acc],
                         IN_T=TL_DTYPES[q.dtype], DOT_T=TL_DTYPES[_dot_dtype(q)], OUT_T=TL_DTYPES[q.dtype],
                         PREC=_precision(q), EMULATE_RNE=EMULATE_RNE, num_warps=_NUM_WARPS,
                         num_stages=_NUM_STAGES[q.dtype])

    @property
    def empty(self) -> bool:
        return self.BH == 0 or self.nq == 0


def _idx_strides(idx: Tensor):
    """(row, column) strides of an index: row stride 0 for one shared by the batch."""
    return (0, int(idx.stride(0))) if idx.dim() == 1 else (int(idx.stride(0)), int(idx.stride(1)))


def _launch_fwd(op: str, p: _Plan, q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    out = torch.empty((p.B, p.heads, p.nq, p.d), dtype=q.dtype, device=q.device)
    if p.empty:
        return out
    with launching_attention(op, p.d, p.acc, q.device):
        _fwd_kernel[(p.BH * p.qtiles,)](
            q, k, v, q_idx, kv_idx, out, p.heads, p.nq, p.nk, p.qtiles,
            *token_strides(q), *token_strides(k), *token_strides(v), *token_strides(out), *_idx_strides(q_idx), *_idx_strides(kv_idx),
            p.qk_scale, **p.meta)
    return out


def _launch_bwd(op: str, p: _Plan, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor,
                mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    want_q, want_k, want_v = mask
    outs = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if m else t.new_empty(0)
            for t, m in zip((q, k, v), mask)]
    if p.empty or not any(mask):
        return tuple(outs)
    dq, dk, dv = outs
    lse = torch.empty((p.BH, p.nq), dtype=p.acc, device=q.device)
    delta = torch.empty_like(lse)
    # contiguous (B, heads, L, d) strides of the gradients (a gradient not asked for: never written, its pointer
    # stands in for a dummy)
    dq_strides = (p.heads * p.Lq * p.d, p.Lq * p.d, p.d)
    dkv_strides = (p.heads * p.Lk * p.d, p.Lk * p.d, p.d)
    common = (p.heads, p.nq, p.nk)
    strides = (*token_strides(q), *token_strides(k), *token_strides(v), *token_strides(grad))
    idx = (*_idx_strides(q_idx), *_idx_strides(kv_idx))
    with launching_attention(op, p.d, p.acc, q.device):
        _bwd_q_kernel[(p.BH * p.qtiles,)](
            q, k, v, grad, q_idx, kv_idx, dq if want_q else lse, lse, delta, *common, p.qtiles,
            *strides, *dq_strides, *idx, p.qk_scale, p.sm_scale, NEED_DQ=want_q, **p.meta)
        if want_k or want_v:
            _bwd_kv_kernel[(p.BH * p.ktiles,)](
                q, k, v, grad, q_idx, kv_idx, lse, delta, dk if want_k else lse, dv if want_v else lse,
                *common, p.ktiles, *strides, *dkv_strides, *idx, p.qk_scale, p.sm_scale,
                NEED_DK=want_k, NEED_DV=want_v, **p.meta)
    return tuple(outs)


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("slimops_triton::kept_token_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor q_idx, Tensor kv_idx, float? scale=None) "
                                "-> Tensor")
def kept_token_attention(q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor,
                         scale: Optional[float] = None) -> Tensor:
    """Softmax attention of the kept queries over the kept keys; 1 launch."""
    op = "kept_token_attention"
    s = _defs.check_kept_token(op, q, k, v, q_idx, kv_idx, scale)
    _defs.check_index_values(op, q, k, q_idx, kv_idx)
    check_device(op, q.device)
    p = _Plan(op, q, k, q_idx, kv_idx, s)
    return _launch_fwd(op, p, head_rows(q), head_rows(k), head_rows(v), q_idx, kv_idx)


@torch.library.custom_op("slimops_triton::kept_token_attention_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor q_idx, Tensor kv_idx, "
                                "float? scale, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
def kept_token_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor,
                                  scale: Optional[float],
                                  output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v) in the full shapes of q, k, v (zero on rows not kept), recomputing the softmax;
    an entry not asked for is an empty tensor."""
    op = "kept_token_attention_backward"
    s = _defs.check_kept_token(op, q, k, v, q_idx, kv_idx, scale)
    _defs.check_grad(op, grad, q, q_idx)
    _defs.check_index_values(op, q, k, q_idx, kv_idx)
    check_device(op, q.device)
    p = _Plan(op, q, k, q_idx, kv_idx, s)
    mask = [bool(m) for m in output_mask]
    return _launch_bwd(op, p, head_rows(grad), head_rows(q), head_rows(k), head_rows(v), q_idx, kv_idx, mask)


# The fakes and autograd every backend shares (the backward calls kept_token_attention_backward above).
wire(_defs.DEFS, "slimops_triton")
