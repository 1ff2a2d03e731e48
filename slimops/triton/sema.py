"""Triton kernels of the ``sema`` family (SEMA localised attention), registered as ``torch.ops.slimops_triton.*``.

Same schemas as ``csrc/registration.cpp`` and the same semantics as :mod:`slimops.reference.sema` (docs/algorithms.md
§8; SEMA: Tran, Xue, Zhang et al. 2025). q, k, v (B, heads, N, d), N = grid[0]·grid[1] tokens in row-major order
(token ``t = r·W + c`` on an H x W grid), per (sample, head)::

    out_i = sum_{j in W(i)} softmax_j(q_i . k_j / sqrt(d)) v_j  +  (1/N) sum_{j=1..N} v_j

``W(i)``: the non-overlapping ``wh x ww`` window holding i (windows from the top-left; the last row / column of
windows is smaller when the grid is not a multiple), or with ``neighborhood=True`` rows ``[s(r), s(r) + wh)`` with
``s(r) = clamp(r - wh // 2, 0, H - wh)``, columns likewise.

- ``sema_attention(q, k, v, grid, window, neighborhood=False)``: the output, (B, heads, N, d) contiguous, dtype of q.
- ``sema_attention_backward(grad, q, k, v, grid, window, neighborhood, output_mask)``: (grad_q, grad_k, grad_v),
  recomputing the softmax (nothing is saved by the forward but q, k, v); a gradient not asked for is an empty
  tensor. With P the softmax weights, ``delta_i = sum_j P_ij (g_i . v_j)``, ``dS = P (g v^T - delta)``:
  ``grad_q = dS k / sqrt(d)``, ``grad_k = dS^T q / sqrt(d)``, ``grad_v = P^T g + (1/N) sum_i g_i``.

Kernel design (flash-style: online softmax over key tiles, no attention matrix in memory, no atomics)
--------------------------------------------------------------------------------------------------------
* **In place.** q, k, v and grad are read where they lie, with their (batch, head, token) strides, e.g. as views
  of a fused qkv projection (token stride 3·heads·d) or a batch-broadcast k / v (stride 0); only a tensor whose
  head dim is not contiguous is copied first. No partition / pad / merge copies: a program maps its flat lane
  ``idx`` of a rectangle (row0, col0, rows, cols) to the token ``(row0 + idx // cols)·W + col0 + idx % cols``,
  and masks lanes ``idx >= rows·cols``. The head dim is padded to ``D = max(16, next_pow2(d))`` lanes (masked;
  d = 1 .. 15 too); ``d`` is a constexpr, so the mask folds away when ``d = D``. Row offsets are int64.
* **Programs.** One 1-D launch, ``pid = ((b·heads + head)·rects + rect)·chunks + chunk``.
  Window mode: a rectangle is a window (cropped at the grid's edge), a chunk ``BLOCK`` of its ``wh·ww`` flattened
  tokens (``BLOCK = min(64, max(16, next_pow2(wh·ww)))``: a 7x7 window, 49 tokens, is one 64-lane tile;
  56x56 = 3136 tokens are 49 chunks; chunks past a smaller edge window return at once). Neighbourhood mode: a
  rectangle is a ``TH x TW`` tile of grid positions (``TW = min(8, next_pow2(W))``, ``TH = min(64 / TW,
  next_pow2(H))``: 8x8 on real grids), one chunk.
* **Forward** (``_fwd_kernel``): the q tile (``[BLOCK, D]``) stays in registers; a loop over ``BLOCK``-key tiles of
  the key region: the window itself, or the union of the tile's neighbourhoods (rows ``s(r0) .. s(r1) + wh``,
  columns likewise; starts are monotone) with the exact per-(query, key) neighbourhood mask. Logits
  ``s = q k^T · log2(e)/sqrt(d)``, masked to -inf; online softmax (running max m, sum l, ``exp2``; a row whose
  logits are all -inf so far is kept at 0, never NaN: neighbourhood tiles can be fully masked for some rows);
  ``acc = acc·alpha + P v``. Epilogue: ``out = acc / l + mean(v)``, rounded once to the dtype of q.
  The mean, (B, heads, d) in the math dtype, is one torch reduction ``v.sum(2)`` / N before the launch.
* **Fused backward** (``_bwd_fused_kernel``, window mode, windows of at most 64 tokens, i.e. SEMA-T's 7x7):
  one program per (sample, head, window) loads q, k, v, grad once, computes the exact softmax of the single tile,
  ``dP = g v^T``, ``delta = rowsum(P dP)``, ``dS = P (dP - delta)``, and writes dq = dS k, dk = dS^T q (both
  · 1/sqrt(d)) and dv = P^T g + mean(g) (each only if asked for: constexpr flags). No scratch memory.
* **Two-kernel backward** (larger windows, and neighbourhood mode):
  ``_bwd_q_kernel`` (query-centric, the forward's tiling): pass 1 over the key tiles recomputes m, l and
  ``delta_i = sum_j P_ij (g_i . v_j)`` online (rescaled like O), and writes ``lse = m + log2 l`` and delta to
  (B·heads, N) float32 (float64) scratch rows; pass 2 (if grad_q is asked for) recomputes
  ``P = exp2(s - lse)``, ``dS = P (g v^T - delta)``, ``dq = dS k / sqrt(d)``.
  ``_bwd_kv_kernel`` (key-centric, per key tile): loops over the query tiles that can see it (window mode: its
  window; neighbourhood mode: the exact inverse range, query rows ``_nb_first_query(r0) .. _nb_last_query(r1)``,
  where query row r' sees key row r iff ``s(r') <= r < s(r') + wh``: first ``0 if r < wh else
  r - wh + 1 + wh // 2``, last ``H - 1 if r >= H - wh else min(H - 1, r + wh // 2)`` (tested exhaustively);
  columns likewise), recomputes ``P^T`` from lse, ``dv = P^T g + mean(g)``, ``dk = dS^T q / sqrt(d)``.
  The mean term's gradient ``(1/N) sum_i g_i`` is one torch reduction of grad (only when grad_v is asked for),
  added in the epilogue.

Global memory traffic per token and head (e = element size; SEMA-T stage 1, d = 32 bf16, in brackets):
forward reads q, k, v once and writes out once, plus one read of v by the mean reduction: 5·d·e (320 B; 256 B is
the minimum). Fused backward reads q, k, v, grad once, writes dq, dk, dv once, plus one read of grad by the mean
reduction: 8·d·e (512 B; 448 B minimum). Windows of more than 64 tokens re-read each key tile once per query chunk
of their window (L2-resident for a window's few hundred KB); neighbourhood mode reads each k / v row once per
query tile whose region holds it (about (8 + wh - 1)(8 + ww - 1) / 64 = 3x for 7x7, from L2). The two-kernel
backward: ``_bwd_q_kernel`` reads q, grad and twice (two passes) the key region's k, v, writes dq and 8 B of
statistics; ``_bwd_kv_kernel`` reads k, v and, per query tile of the inverse region, q, grad and the statistics,
writes dk, dv.

Tiles and launch configuration (sm_90)
--------------------------------------
``BLOCK = 64`` tokens per query and key tile (32 for float64), ``num_warps = 4`` (one warpgroup: a 64-row tile is
one wgmma M), ``num_stages = 2`` for bf16/fp16 (key / query loops pipelined), 1 for float32 and float64 (shared
memory, below) and for the loop-free fused backward. Every ``tl.dot`` dimension is a power of two >= 16. Module
constants: ``_BLOCK``, ``_BLOCK_FP64``, ``_NBHD_TILE_W``, ``_FUSED_MAX``, ``_NUM_WARPS``, ``_NUM_STAGES``,
``_FP32_DOT``.

Precision: logits, softmax statistics and accumulators in float32 for float32/bf16/fp16 inputs, float64 for
float64; one rounding of each output to its dtype. bf16/fp16: tl.dot on the stored dtype (q, k, v, grad as
stored; P and dS rounded to it, as FlashAttention does), float32 accumulation. float32 on CUDA: 3xTF32 dots
(``input_precision="tf32x3"``, fp32-class accuracy on tensor cores), or plain TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is on (torch's own policy for float32 matmuls). IEEE fp32 dots
(``_FP32_DOT = "ieee"``) were the first choice but are unusable as default: FMA dots need 255 registers and spill
32 B .. 1 KB per thread at d = 32 and 8 .. 13 KB at d = 64 (ptxas fell back to 32 registers). float64: float64
dots (DMMA). Division by l and ``exp2`` / ``log2`` use the GPU's approximate fp32 instructions (~2 ulp).

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): its bf16 ``tl.dot`` is wrong, so bf16 tiles are multiplied as
float32 with P and dS first rounded to bf16 (round to nearest even, ``_common.cvt_store``): the same products as a
bf16 MMA. Its fp32 -> bf16 conversion truncates, so bf16 stores round explicitly. Row sums and maxima use
``tl.reduce`` with tl.sum's / tl.max's own combine functions, which the interpreter runs as one numpy reduction
(any other combine function is called per element: ~30x slower for these kernels).

Compiled for sm_90a with ``triton.compile`` on a machine without a GPU (Triton 3.9; registers / local-memory stack
per thread / shared memory per CTA; fwd and fwd-nb the two modes of the forward, fused the fused backward,
bwd_q / bwd_kv the two-kernel backward in neighbourhood mode, the heavier mode):

- bf16 (fp16 alike), d = 32: fwd 93 / 0 / 20 KB, fwd-nb 122 / 0 / 20 KB, fused 104 / 0 / 16 KB, bwd_q 208 / 0 /
  24 KB, bwd_kv 190 / 0 / 24 KB (wgmma everywhere). d = 64: 130, 161, 124, 215, 255 registers, no spill, 32-48 KB.
  d = 128: 185, 201, 200, 255, 255 (bwd_kv 72 B stack), 64-96 KB.
- float32 (3xTF32, 1 stage), d = 32: 163, 201, 255, 254, 255 (bwd_kv 128 B stack), 32-48 KB. d = 64: 255
  everywhere, 0-792 B stack, 64-96 KB. d = 128: 255, 296-3336 B stack, 96-192 KB (2 stages: 256 KB, more than
  sm_90's 227 KB).
- float64 (32-token tiles, 1 stage), d = 32: 160-230 registers, no spill, 16-36 KB; d = 128: 255, 8-928 B stack,
  72-160 KB (64-token tiles: 255 registers and 200 B-3.4 KB of stack already at d = 32 / 64).

Launches per call: forward 1 kernel + 1 torch reduction (the mean of v); backward 1 kernel (fused) or 2
(``_bwd_q_kernel``, and ``_bwd_kv_kernel`` when grad_k or grad_v is asked for), + 1 torch reduction of grad
when grad_v is asked for, + two (B·heads, N) scratch buffers on the two-kernel path. 0 kernels for an empty
batch (or heads = 0).

Coverage: any grid and window (window <= grid), both modes, any d >= 1, float32 / float64 / bfloat16 / float16,
any strides (contiguous head dim read in place), fewer than 2^31 programs. Verified: correctness through the
interpreter (tests/test_sema_triton.py: 1x1, 7x7, padded, non-square, whole-grid and 100-token windows,
neighbourhoods with borders, even windows, whole-grid, multi-tile regions; d 1 .. 64; strided inputs; every
output_mask). Not verified: nothing was run on a GPU from here, so performance was never measured, the
target of >= 60 % of memory bandwidth for the fused 7x7 backward is unconfirmed, and block sizes / warps /
stages are first choices from the ptxas numbers above. Known costs: neighbourhood mode computes the full
tile x region products (for 7x7 neighbourhoods 4 key tiles of 64 for 49 useful keys per query: ~5x the minimal
FLOPs); windows of fewer than 16 tokens fill a 16-lane tile with one window (1x1 windows: 1/16 of the lanes
useful); float32 from d = 64 and float64 are register-bound and spill (correct, slow).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.opdefs import sema as _defs
from slimops.opdefs import wire
from slimops.triton._common import (EMULATE_RNE, INTERPRETED, TL_DTYPES, check_device, cvt_store, dot_operand, fail,
                                    head_rows, launching_attention, math_dtype, next_pow2, rowmax, rowsum, to_acc,
                                    token_strides)

__all__ = ["sema_attention", "sema_attention_backward"]

# Tiles (module docstring, "Tiles and launch configuration").
_BLOCK = 64  # tokens per query / key tile (both modes), and the largest loop tile
_BLOCK_FP64 = 32  # float64: 64-token tiles of fp64 spill and need up to 256 KB of shared memory (sm_90)
_MIN_DOT = 16  # every tl.dot dimension is a power of two >= 16
_NBHD_TILE_W = 8  # neighbourhood mode: a tile is TH x TW grid positions, TW <= 8, TH * TW <= the block
_FUSED_MAX = 64  # window mode: one-program fused backward for windows of at most this many tokens (<= block)
_NUM_WARPS = 4  # one warpgroup: a 64-row tile is one wgmma M
# Software pipelining of the key (query) loops: 2 stages for bf16/fp16; 1 for float32 (3xTF32 keeps big and
# small halves of every operand: 2 stages need 256 KB of shared memory at d = 128) and float64. The fused
# backward has no loop (1).
_NUM_STAGES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 1, torch.float64: 1}
# input_precision of float32 dots on CUDA when torch.backends.cuda.matmul.allow_tf32 is off (the default):
# "tf32x3" (3xTF32 on tensor cores, fp32-class accuracy) or "ieee" (FMA; spills kilobytes per thread from
# d = 64 on: module docstring). With allow_tf32 on, plain "tf32", as torch's own float32 matmuls.
_FP32_DOT = "tf32x3"
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _rect(rid, GH, GW, TR, TC):
    """(row0, col0, rows, cols) of rectangle ``rid`` of the row-major partition of the GH x GW grid into
    TR x TC rectangles (the last row / column of rectangles cropped to the grid)."""
    ncols = (GW + TC - 1) // TC
    r0 = (rid // ncols) * TR
    c0 = (rid % ncols) * TC
    return r0, c0, tl.minimum(GH - r0, TR), tl.minimum(GW - c0, TC)


@triton.jit
def _lanes(idx, r0, c0, w, n):
    """Grid row, column and validity of the flat indices ``idx`` of a rectangle at (r0, c0) that is ``w``
    columns wide and holds ``n`` tokens (row-major inside the rectangle)."""
    return r0 + idx // w, c0 + idx % w, idx < n


@triton.jit
def _nb_start(pos, WIN, EXT):
    """First row (column) of the neighbourhood of row (column) ``pos``: clamp(pos - WIN // 2, 0, EXT - WIN)."""
    return tl.minimum(tl.maximum(pos - WIN // 2, 0), EXT - WIN)


@triton.jit
def _nb_first_query(pos, WIN):
    """First query row (column) whose neighbourhood contains row (column) ``pos``: 0 when pos < WIN (the
    neighbourhood starting at 0 holds it), else pos - WIN + 1 + WIN // 2 (the first start >= pos - WIN + 1 > 0 is
    never clamped). (Not max(0, pos - WIN + 1 + WIN // 2): queries near the lower border all start at 0.)"""
    return tl.where(pos < WIN, 0, pos - WIN + 1 + WIN // 2)


@triton.jit
def _nb_last_query(pos, WIN, EXT):
    """Last query row (column) whose neighbourhood contains row (column) ``pos``: EXT - 1 when pos >= EXT - WIN
    (every later start is clamped to EXT - WIN <= pos), else min(EXT - 1, pos + WIN // 2)."""
    return tl.where(pos >= EXT - WIN, EXT - 1, tl.minimum(pos + WIN // 2, EXT - 1))


@triton.jit
def _in_nbhd(qr, qc, kr, kc, GH, GW, WH, WW):
    """Whether key (kr, kc) lies in the neighbourhood of query (qr, qc) (broadcasting operands)."""
    sr = _nb_start(qr, WH, GH)
    sc = _nb_start(qc, WW, GW)
    return (kr >= sr) & (kr < sr + WH) & (kc >= sc) & (kc < sc + WW)


@triton.jit
def _load_rows(ptr, base, tok, valid, sn, HEAD_D: tl.constexpr, D: tl.constexpr):
    """The ``[len(tok), D]`` tile of rows ``tok`` (token stride ``sn``, head dim contiguous), zero outside."""
    d = tl.arange(0, D)
    off = base + tok.to(tl.int64)[:, None] * sn + d[None, :]
    return tl.load(ptr + off, mask=valid[:, None] & (d < HEAD_D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, base, tok, valid, sn, x, OUT_T: tl.constexpr, EMULATE_RNE: tl.constexpr,
                HEAD_D: tl.constexpr, D: tl.constexpr):
    d = tl.arange(0, D)
    off = base + tok.to(tl.int64)[:, None] * sn + d[None, :]
    tl.store(ptr + off, cvt_store(x, OUT_T, EMULATE_RNE), mask=valid[:, None] & (d < HEAD_D)[None, :])


@triton.jit
def _head_vec(ptr, bh, HEAD_D: tl.constexpr, D: tl.constexpr):
    """Row ``bh`` of a contiguous (B*heads, HEAD_D) math-dtype tensor (the mean of v, or of grad), as [1, D]."""
    d = tl.arange(0, D)
    return tl.load(ptr + bh.to(tl.int64) * HEAD_D + d, mask=d < HEAD_D, other=0.0)[None, :]


@triton.jit
def _program(NRECT, NCHUNK, HEADS, GH, GW, TR, TC):
    """This program's (chunk, b, head, row0, col0, rows, cols): pid = (bh * NRECT + rect) * NCHUNK + chunk."""
    pid = tl.program_id(0)
    chunk = pid % NCHUNK
    rid = (pid // NCHUNK) % NRECT
    bh = pid // (NCHUNK * NRECT)
    r0, c0, h, w = _rect(rid, GH, GW, TR, TC)
    return chunk, bh, bh // HEADS, bh % HEADS, r0, c0, h, w


@triton.jit
def _base(b, hd, sb, sh):
    return b.to(tl.int64) * sb + hd.to(tl.int64) * sh


@triton.jit
def _own_rows(x_ptr, sxb, sxh, sxn, y_ptr, syb, syh, syn, b, hd, chunk, r0, c0, w, n, GW,
              HEAD_D: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr, DOT_T: tl.constexpr):
    """Lanes chunk*BLK .. +BLK of this program's rectangle: (rows, cols, valid, tokens) and the tiles of two
    (B, heads, N, d) tensors x, y at those tokens, as dot operands."""
    r, c, valid = _lanes(chunk * BLK + tl.arange(0, BLK), r0, c0, w, n)
    tok = r * GW + c
    x = _load_rows(x_ptr, _base(b, hd, sxb, sxh), tok, valid, sxn, HEAD_D, D).to(DOT_T)
    y = _load_rows(y_ptr, _base(b, hd, syb, syh), tok, valid, syn, HEAD_D, D).to(DOT_T)
    return r, c, valid, tok, x, y


@triton.jit
def _key_region(r0, c0, h, w, GH, GW, WH, WW, NEIGH: tl.constexpr):
    """(row0, col0, rows, cols) of the keys that queries r0..r0+h-1 x c0..c0+w-1 can see: their window
    (window mode: the rectangle itself), or the union of their neighbourhoods (from the first query's start
    to the last query's start + window; starts are monotone in the position)."""
    if NEIGH:
        kr0 = _nb_start(r0, WH, GH)
        kc0 = _nb_start(c0, WW, GW)
        kh = _nb_start(r0 + h - 1, WH, GH) + WH - kr0
        kw = _nb_start(c0 + w - 1, WW, GW) + WW - kc0
    else:
        kr0, kc0, kh, kw = r0, c0, h, w
    return kr0, kc0, kh, kw


@triton.jit
def _query_region(r0, c0, h, w, GH, GW, WH, WW, NEIGH: tl.constexpr):
    """(row0, col0, rows, cols) of the queries that can see keys r0..r0+h-1 x c0..c0+w-1: their window, or in
    neighbourhood mode the exact inverse range: query rows r' with s(r') <= r < s(r') + WH are
    _nb_first_query(r) .. _nb_last_query(r) (columns likewise; both are monotone in r)."""
    if NEIGH:
        qr0 = _nb_first_query(r0, WH)
        qc0 = _nb_first_query(c0, WW)
        qh = _nb_last_query(r0 + h - 1, WH, GH) + 1 - qr0
        qw = _nb_last_query(c0 + w - 1, WW, GW) + 1 - qc0
    else:
        qr0, qc0, qh, qw = r0, c0, h, w
    return qr0, qc0, qh, qw


@triton.jit
def _scores(q, qr, qc, qvalid, k_ptr, kbase, skn, v_ptr, vbase, svn, start, kr0, kc0, kw, nk, scale,
            GH, GW, WH, WW, NEIGH: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
            DOT_T: tl.constexpr, PREC: tl.constexpr):
    """Key tile ``start .. start+BN`` of the key region: (masked log2-domain logits s [BM, BN], k, v), s = -inf
    where the key is padding or (neighbourhood mode) outside the query's neighbourhood."""
    kr, kc, kvalid = _lanes(start + tl.arange(0, BN), kr0, kc0, kw, nk)
    ktok = kr * GW + kc
    k = _load_rows(k_ptr, kbase, ktok, kvalid, skn, HEAD_D, D).to(DOT_T)
    v = _load_rows(v_ptr, vbase, ktok, kvalid, svn, HEAD_D, D).to(DOT_T)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    ok = kvalid[None, :]
    if NEIGH:
        ok = ok & qvalid[:, None] & _in_nbhd(qr[:, None], qc[:, None], kr[None, :], kc[None, :], GH, GW, WH, WW)
    return tl.where(ok, s, float("-inf")), k, v


@triton.jit
def _online(m_i, s):
    """Online-softmax step: (new running max, rescale factor of the old sums, unnormalised P), guarded so that
    rows with every logit -inf so far give 0, not NaN."""
    m_new = tl.maximum(m_i, rowmax(s))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m_i - m_use), tl.exp2(s - m_use[:, None])


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, mean_ptr, o_ptr,
    HEADS, GH, GW, WH, WW, TR, TC, NRECT, NCHUNK,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    qk_scale: tl.float64,
    NEIGH: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ACC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, OUT_T: tl.constexpr, PREC: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    """out = softmax(q k^T / sqrt(d)) v over the key region + mean(v), for query lanes chunk*BM .. +BM of one
    rectangle (a window, or a TR x TC neighbourhood tile) of one (sample, head)."""
    chunk, bh, b, hd, r0, c0, h, w = _program(NRECT, NCHUNK, HEADS, GH, GW, TR, TC)
    nq = h * w
    if chunk * BM >= nq:  # (the last windows are smaller)
        return
    scale = to_acc(qk_scale, ACC)
    qr, qc, qvalid = _lanes(chunk * BM + tl.arange(0, BM), r0, c0, w, nq)
    qtok = qr * GW + qc
    q = _load_rows(q_ptr, _base(b, hd, sqb, sqh), qtok, qvalid, sqn, HEAD_D, D).to(DOT_T)
    kr0, kc0, kh, kw = _key_region(r0, c0, h, w, GH, GW, WH, WW, NEIGH)
    kbase = _base(b, hd, skb, skh)
    vbase = _base(b, hd, svb, svh)
    m_i = tl.full([BM], float("-inf"), ACC)
    l_i = tl.full([BM], 0.0, ACC)
    acc = tl.full([BM, D], 0.0, ACC)
    for start in range(0, kh * kw, BN):
        s, k, v = _scores(q, qr, qc, qvalid, k_ptr, kbase, skn, v_ptr, vbase, svn, start, kr0, kc0, kw, kh * kw,
                          scale, GH, GW, WH, WW, NEIGH, HEAD_D, D, BN, DOT_T, PREC)
        m_i, alpha, p = _online(m_i, s)
        l_i = l_i * alpha + rowsum(p)
        acc = tl.dot(dot_operand(p, IN_T, DOT_T, EMULATE_RNE), v, acc * alpha[:, None], input_precision=PREC)
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    out = acc * inv[:, None] + _head_vec(mean_ptr, bh, HEAD_D, D)
    _store_rows(o_ptr, _base(b, hd, sob, soh), qtok, qvalid, son, out, OUT_T, EMULATE_RNE, HEAD_D, D)


@triton.jit
def _bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr,
    N, HEADS, GH, GW, WH, WW, TR, TC, NRECT, NCHUNK,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, sob, soh, son,
    qk_scale: tl.float64, sm_scale: tl.float64,
    NEED_DQ: tl.constexpr, NEIGH: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, ACC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, OUT_T: tl.constexpr,
    PREC: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """Query-centric backward of one query tile (the forward's tiling). Pass 1 over the key tiles: the softmax
    statistics m, l and delta_i = sum_j P_ij (dO_i . v_j) online (rescaled like O); lse (log2 domain) and delta
    go to the scratch rows (B*heads, N). Pass 2 (NEED_DQ): P, dP = dO v^T, dS = P (dP - delta),
    dq = scale * dS k."""
    chunk, bh, b, hd, r0, c0, h, w = _program(NRECT, NCHUNK, HEADS, GH, GW, TR, TC)
    nq = h * w
    if chunk * BM >= nq:
        return
    scale = to_acc(qk_scale, ACC)
    qr, qc, qvalid, qtok, q, do = _own_rows(q_ptr, sqb, sqh, sqn, g_ptr, sgb, sgh, sgn, b, hd, chunk, r0, c0, w, nq,
                                            GW, HEAD_D, D, BM, DOT_T)
    kr0, kc0, kh, kw = _key_region(r0, c0, h, w, GH, GW, WH, WW, NEIGH)
    kbase = _base(b, hd, skb, skh)
    vbase = _base(b, hd, svb, svh)
    m_i = tl.full([BM], float("-inf"), ACC)
    l_i = tl.full([BM], 0.0, ACC)
    dd = tl.full([BM], 0.0, ACC)
    for start in range(0, kh * kw, BN):
        s, k, v = _scores(q, qr, qc, qvalid, k_ptr, kbase, skn, v_ptr, vbase, svn, start, kr0, kc0, kw, kh * kw,
                          scale, GH, GW, WH, WW, NEIGH, HEAD_D, D, BN, DOT_T, PREC)
        m_i, alpha, p = _online(m_i, s)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        l_i = l_i * alpha + rowsum(p)
        dd = dd * alpha + rowsum(p * dp)
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    delta = dd / l_safe
    lse = tl.where(has, m_i + tl.log2(l_safe), 0.0)
    srow = bh.to(tl.int64) * N + qtok
    tl.store(lse_ptr + srow, lse, mask=qvalid)
    tl.store(delta_ptr + srow, delta, mask=qvalid)
    if NEED_DQ:
        dq = tl.full([BM, D], 0.0, ACC)
        for start in range(0, kh * kw, BN):
            s, k, v = _scores(q, qr, qc, qvalid, k_ptr, kbase, skn, v_ptr, vbase, svn, start, kr0, kc0, kw,
                              kh * kw, scale, GH, GW, WH, WW, NEIGH, HEAD_D, D, BN, DOT_T, PREC)
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(dot_operand(ds, IN_T, DOT_T, EMULATE_RNE), k, dq, input_precision=PREC)
        dq = dq * to_acc(sm_scale, ACC)
        _store_rows(dq_ptr, _base(b, hd, sob, soh), qtok, qvalid, son, dq, OUT_T, EMULATE_RNE, HEAD_D, D)


@triton.jit
def _bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, gmean_ptr, dk_ptr, dv_ptr,
    N, HEADS, GH, GW, WH, WW, TR, TC, NRECT, NCHUNK,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, sob, soh, son,
    qk_scale: tl.float64, sm_scale: tl.float64,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NEIGH: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
    OUT_T: tl.constexpr, PREC: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """Key-centric backward of one key tile (lanes chunk*BN .. +BN of a rectangle): loops over the query tiles
    that can see it, recomputes P^T = exp2(s^T - lse) from the scratch statistics, dv = P^T dO + mean(dO)
    (NEED_DV), dk = scale * dS^T q with dS^T = P^T (dP^T - delta) (NEED_DK). No atomics."""
    chunk, bh, b, hd, r0, c0, h, w = _program(NRECT, NCHUNK, HEADS, GH, GW, TR, TC)
    nk = h * w
    if chunk * BN >= nk:
        return
    scale = to_acc(qk_scale, ACC)
    kr, kc, kvalid, ktok, k, v = _own_rows(k_ptr, skb, skh, skn, v_ptr, svb, svh, svn, b, hd, chunk, r0, c0, w, nk,
                                           GW, HEAD_D, D, BN, DOT_T)
    qr0, qc0, qh, qw = _query_region(r0, c0, h, w, GH, GW, WH, WW, NEIGH)
    qbase = _base(b, hd, sqb, sqh)
    gbase = _base(b, hd, sgb, sgh)
    srow = bh.to(tl.int64) * N
    dk = tl.full([BN, D], 0.0, ACC)
    dv = tl.full([BN, D], 0.0, ACC)
    for start in range(0, qh * qw, BM):
        qr, qc, qvalid = _lanes(start + tl.arange(0, BM), qr0, qc0, qw, qh * qw)
        qtok = qr * GW + qc
        q = _load_rows(q_ptr, qbase, qtok, qvalid, sqn, HEAD_D, D).to(DOT_T)
        do = _load_rows(g_ptr, gbase, qtok, qvalid, sgn, HEAD_D, D).to(DOT_T)
        lse = tl.load(lse_ptr + srow + qtok, mask=qvalid, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * scale  # [BN, BM]
        ok = qvalid[None, :]
        if NEIGH:
            ok = ok & kvalid[:, None] & _in_nbhd(qr[None, :], qc[None, :], kr[:, None], kc[:, None],
                                                 GH, GW, WH, WW)
        pt = tl.exp2(tl.where(ok, st, float("-inf")) - lse[None, :])
        if NEED_DV:
            dv = tl.dot(dot_operand(pt, IN_T, DOT_T, EMULATE_RNE), do, dv, input_precision=PREC)
        if NEED_DK:
            delta = tl.load(delta_ptr + srow + qtok, mask=qvalid, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dot_operand(dst, IN_T, DOT_T, EMULATE_RNE), q, dk, input_precision=PREC)
    obase = _base(b, hd, sob, soh)
    if NEED_DK:
        _store_rows(dk_ptr, obase, ktok, kvalid, son, dk * to_acc(sm_scale, ACC), OUT_T, EMULATE_RNE, HEAD_D, D)
    if NEED_DV:
        dv = dv + _head_vec(gmean_ptr, bh, HEAD_D, D)
        _store_rows(dv_ptr, obase, ktok, kvalid, son, dv, OUT_T, EMULATE_RNE, HEAD_D, D)


@triton.jit
def _bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, gmean_ptr, dq_ptr, dk_ptr, dv_ptr,
    HEADS, GH, GW, WH, WW, NRECT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, sob, soh, son,
    qk_scale: tl.float64, sm_scale: tl.float64,
    NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, ACC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, OUT_T: tl.constexpr,
    PREC: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """Window mode, a whole window in one BM tile: dq, dk, dv of one window of one (sample, head) together,
    reading q, k, v, dO once; the softmax is exact (one tile, no online rescaling) and needs no scratch."""
    _, bh, b, hd, r0, c0, h, w = _program(NRECT, 1, HEADS, GH, GW, WH, WW)
    n = h * w
    _, _, valid, tok, q, do = _own_rows(q_ptr, sqb, sqh, sqn, g_ptr, sgb, sgh, sgn, b, hd, 0, r0, c0, w, n, GW,
                                        HEAD_D, D, BM, DOT_T)
    _, _, _, _, k, v = _own_rows(k_ptr, skb, skh, skn, v_ptr, svb, svh, svn, b, hd, 0, r0, c0, w, n, GW,
                                 HEAD_D, D, BM, DOT_T)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * to_acc(qk_scale, ACC)
    s = tl.where(valid[None, :], s, float("-inf"))
    p = tl.exp2(s - rowmax(s)[:, None])
    p = p * (1.0 / rowsum(p))[:, None]
    obase = _base(b, hd, sob, soh)
    if NEED_DQ or NEED_DK:
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = dot_operand(p * (dp - rowsum(p * dp)[:, None]), IN_T, DOT_T, EMULATE_RNE)
        sm = to_acc(sm_scale, ACC)
        if NEED_DQ:
            dq = tl.dot(ds, k, input_precision=PREC, out_dtype=ACC) * sm
            _store_rows(dq_ptr, obase, tok, valid, son, dq, OUT_T, EMULATE_RNE, HEAD_D, D)
        if NEED_DK:
            dk = tl.dot(tl.trans(ds), q, input_precision=PREC, out_dtype=ACC) * sm
            _store_rows(dk_ptr, obase, tok, valid, son, dk, OUT_T, EMULATE_RNE, HEAD_D, D)
    if NEED_DV:
        dv = tl.dot(tl.trans(dot_operand(p, IN_T, DOT_T, EMULATE_RNE)), do, input_precision=PREC, out_dtype=ACC)
        dv = dv + _head_vec(gmean_ptr, bh, HEAD_D, D)
        _store_rows(dv_ptr, obase, tok, valid, son, dv, OUT_T, EMULATE_RNE, HEAD_D, D)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(q: Tensor) -> str:
    """input_precision of the dots: for float32 CUDA tensors "tf32" when torch.backends.cuda.matmul.allow_tf32
    is on (torch's policy for its own float32 matmuls), else ``_FP32_DOT``; "ieee" otherwise (bf16/fp16/fp64 dots
    are exact-product MMAs whatever it says; the interpreter ignores it)."""
    if q.dtype == torch.float32 and q.device.type == "cuda":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else _FP32_DOT
    return "ieee"


def _dot_dtype(q: Tensor) -> torch.dtype:
    """The tl.dot operand dtype: the input dtype, except bf16 in the interpreter (its bf16 dot is wrong: the
    bf16 values, and P / dS rounded to bf16 by _operand, are multiplied as float32 there, exactly)."""
    if INTERPRETED and q.dtype == torch.bfloat16:
        return torch.float32
    return q.dtype


class _Plan:
    """Geometry, tiling and dtypes of one call (module docstring, "Tiles and launch configuration")."""

    def __init__(self, op: str, q: Tensor, grid: Tuple[int, int], window: Tuple[int, int], neighborhood: bool):
        self.B, self.heads, self.N, self.d = (int(s) for s in q.shape)
        self.BH = self.B * self.heads
        (self.GH, self.GW), (self.WH, self.WW) = grid, window
        self.neigh = bool(neighborhood)
        self.D = max(_MIN_DOT, next_pow2(self.d))
        block = _BLOCK_FP64 if q.dtype == torch.float64 else _BLOCK
        if self.neigh:
            self.TC = min(_NBHD_TILE_W, next_pow2(self.GW))
            self.TR = min(block // self.TC, next_pow2(self.GH))
            self.own = max(_MIN_DOT, self.TR * self.TC)
            # the other side's region: at most (tile + 2 windows) per dimension, and the grid
            span = min(self.GH, self.TR + 2 * self.WH) * min(self.GW, self.TC + 2 * self.WW)
            self.loop = min(block, max(_MIN_DOT, next_pow2(span)))
            self.nchunk = 1
        else:
            self.TR, self.TC = self.WH, self.WW
            self.own = min(block, max(_MIN_DOT, next_pow2(self.WH * self.WW)))
            self.loop = self.own
            self.nchunk = _cdiv(self.WH * self.WW, self.own)
        self.nrect = _cdiv(self.GH, self.TR) * _cdiv(self.GW, self.TC)
        self.fused = (not self.neigh) and self.WH * self.WW <= min(_FUSED_MAX, self.own)
        self.programs = self.BH * self.nrect * self.nchunk
        if self.programs >= 2 ** 31:
            fail(op, f"{self.programs} programs exceed the launch grid (B*heads={self.BH}, grid {grid}, window "
                      f"{window})", NotImplementedError)
        self.acc = math_dtype(q)
        self.qk_scale = _LOG2E / math.sqrt(self.d)
        self.sm_scale = 1.0 / math.sqrt(self.d)
        self.meta = dict(HEAD_D=self.d, D=self.D, ACC=TL_DTYPES[self.acc], IN_T=TL_DTYPES[q.dtype],
                         DOT_T=TL_DTYPES[_dot_dtype(q)], OUT_T=TL_DTYPES[q.dtype], PREC=_precision(q),
                         EMULATE_RNE=EMULATE_RNE, num_warps=_NUM_WARPS)
        self.stages = _NUM_STAGES[q.dtype]


def _launch_fwd(op: str, p: _Plan, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = torch.empty((p.B, p.heads, p.N, p.d), dtype=q.dtype, device=q.device)
    if p.BH == 0:
        return out
    mean = v.sum(2, dtype=p.acc).div_(p.N)  # (B, heads, d) contiguous: the mean term, added in the epilogue
    with launching_attention(op, p.d, p.acc, q.device):
        _fwd_kernel[(p.programs,)](
            q, k, v, mean, out, p.heads, p.GH, p.GW, p.WH, p.WW, p.TR, p.TC, p.nrect, p.nchunk,
            *token_strides(q), *token_strides(k), *token_strides(v), *token_strides(out), p.qk_scale,
            NEIGH=p.neigh, BM=p.own, BN=p.loop, num_stages=p.stages, **p.meta)
    return out


def _launch_bwd(op: str, p: _Plan, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Sequence[bool]):
    want_q, want_k, want_v = mask
    shape = (p.B, p.heads, p.N, p.d)
    outs = [torch.empty(shape, dtype=t.dtype, device=t.device) if m else t.new_empty(0)
            for t, m in zip((q, k, v), mask)]
    if p.BH == 0 or not any(mask):
        return tuple(outs)
    ref = next(o for o, m in zip(outs, mask) if m)  # stands in for the outputs not asked for (dummy pointers)
    dq, dk, dv = (o if m else ref for o, m in zip(outs, mask))
    gmean = grad.sum(2, dtype=p.acc).div_(p.N) if want_v else ref  # (B, heads, d): the mean term's gradient
    common = (p.heads, p.GH, p.GW, p.WH, p.WW)
    strides = (*token_strides(q), *token_strides(k), *token_strides(v), *token_strides(grad), *token_strides(ref))
    with launching_attention(op, p.d, p.acc, q.device):
        if p.fused:
            _bwd_fused_kernel[(p.BH * p.nrect,)](
                q, k, v, grad, gmean, dq, dk, dv, *common, p.nrect, *strides, p.qk_scale, p.sm_scale,
                NEED_DQ=want_q, NEED_DK=want_k, NEED_DV=want_v, BM=p.own, num_stages=1, **p.meta)
        else:
            lse = torch.empty((p.BH, p.N), dtype=p.acc, device=q.device)
            delta = torch.empty_like(lse)
            args = (p.N, *common, p.TR, p.TC, p.nrect, p.nchunk, *strides, p.qk_scale, p.sm_scale)
            _bwd_q_kernel[(p.programs,)](
                q, k, v, grad, dq, lse, delta, *args,
                NEED_DQ=want_q, NEIGH=p.neigh, BM=p.own, BN=p.loop, num_stages=p.stages, **p.meta)
            if want_k or want_v:
                _bwd_kv_kernel[(p.programs,)](
                    q, k, v, grad, lse, delta, gmean, dk, dv, *args,
                    NEED_DK=want_k, NEED_DV=want_v, NEIGH=p.neigh, BM=p.loop, BN=p.own, num_stages=p.stages,
                    **p.meta)
    return tuple(outs)


# ---------------------------------------------------------------------------------------------------
# The custom ops (schemas of csrc/registration.cpp, namespace slimops_triton)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("slimops_triton::sema_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, int[2] grid, int[2] window, bool neighborhood=False) "
                                "-> Tensor")
def sema_attention(q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int], window: Sequence[int],
                   neighborhood: bool = False) -> Tensor:
    """Windowed (or neighbourhood) softmax attention + mean(v); 1 launch plus the torch sum of v."""
    op = "sema_attention"
    g, w = _defs.check_sema(op, q, k, v, grid, window, neighborhood)
    check_device(op, q.device)
    p = _Plan(op, q, g, w, neighborhood)
    return _launch_fwd(op, p, head_rows(q), head_rows(k), head_rows(v))


@torch.library.custom_op("slimops_triton::sema_attention_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor q, Tensor k, Tensor v, int[2] grid, int[2] window, "
                                "bool neighborhood, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
def sema_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int],
                            window: Sequence[int], neighborhood: bool,
                            output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v), recomputing the softmax; an entry not asked for is an empty tensor."""
    op = "sema_attention_backward"
    g, w = _defs.check_sema(op, q, k, v, grid, window, neighborhood)
    _defs.check_grad(op, grad, q)
    check_device(op, q.device)
    p = _Plan(op, q, g, w, neighborhood)
    mask = [bool(m) for m in output_mask]
    return _launch_bwd(op, p, head_rows(grad), head_rows(q), head_rows(k), head_rows(v), mask)


# The fakes and autograd every backend shares (the backward calls sema_attention_backward above).
wire(_defs.DEFS, "slimops_triton")
