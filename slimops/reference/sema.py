"""Readable pure-PyTorch twin of the ``sema`` family (SEMA localised attention): the test oracle, the
fallback backend and the benchmarks' "partition + SDPA + mean" baseline. Mirrors ``torch.ops.slimops``'s
``sema_attention`` and ``sema_attention_backward`` (schemas in ``csrc/registration.cpp``). docs/algorithms.md §8.

SEMA (Tran, Xue, Zhang et al. 2025), per sample and head, over N = grid[0]·grid[1] tokens in row-major
order (token ``t = r·grid[1] + c``)::

    SEMA(Q, K, V)_i = sum_{j in W(i)} softmax_j(q_i . k_j / sqrt(d)) v_j  +  (1/N) sum_{j=1..N} v_j

``W(i)`` is the set of keys query ``i`` sees:

- windows (default): the non-overlapping ``window[0] x window[1]`` window holding ``i`` (Swin-style
  partition from the top-left corner). When the grid is not a multiple of the window the last windows
  are padded and the padded keys masked, i.e. the last row/column of windows is smaller: window
  ``(a, b)`` covers rows ``[a·wh, min((a+1)·wh, H))`` and columns ``[b·ww, min((b+1)·ww, W))``.
- ``neighborhood=True``: the ``window[0] x window[1]`` window centred on ``i``, shifted to stay inside
  the grid (neighbourhood attention, Hassani et al. 2023): query row ``r`` sees rows
  ``[s, s + wh)`` with ``s = clamp(r - wh // 2, 0, H - wh)`` (columns likewise). Every query sees
  exactly ``wh·ww`` keys; for an even window the centre is the lower-right of the middle four.

The two terms are added with no gate. Cost O(N·|W|·d): linear in the number of tokens.

Precision: float16/bfloat16/float32 inputs are computed in float32 (softmax statistics included), float64
in float64; the result is rounded once to the dtype of ``q`` (q, k and v share one dtype).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from slimops.reference._common import compute_dtype, vjp


def neighborhood_start(pos: Tensor, size: int, extent: int) -> Tensor:
    """First row (column) of the neighbourhood of query row (column) ``pos``: ``clamp(pos - size // 2, 0,
    extent - size)``."""
    return (pos - size // 2).clamp(0, extent - size)


def _partition(t: Tensor, grid: Tuple[int, int], window: Tuple[int, int]) -> Tensor:
    """(B, h, N, d) -> (B, h, windows, wh·ww, d), zero-padding the grid up to a multiple of the window."""
    b, nh, _, d = t.shape
    (gh, gw), (wh, ww) = grid, window
    ph, pw = -gh % wh, -gw % ww
    t = F.pad(t.reshape(b, nh, gh, gw, d), (0, 0, 0, pw, 0, ph))
    nwh, nww = (gh + ph) // wh, (gw + pw) // ww
    t = t.reshape(b, nh, nwh, wh, nww, ww, d).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(b, nh, nwh * nww, wh * ww, d)


def _merge(t: Tensor, grid: Tuple[int, int], window: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`_partition`, cropping the padding."""
    b, nh, _, _, d = t.shape
    (gh, gw), (wh, ww) = grid, window
    nwh, nww = -(-gh // wh), -(-gw // ww)
    t = t.reshape(b, nh, nwh, nww, wh, ww, d).permute(0, 1, 2, 4, 3, 5, 6)
    t = t.reshape(b, nh, nwh * wh, nww * ww, d)[:, :, :gh, :gw]
    return t.reshape(b, nh, gh * gw, d)


def _windowed(q: Tensor, k: Tensor, v: Tensor, grid, window) -> Tensor:
    """Softmax attention inside non-overlapping windows: partition -> SDPA -> merge."""
    qw, kw, vw = (_partition(t, grid, window) for t in (q, k, v))
    mask = None
    if grid[0] % window[0] or grid[1] % window[1]:
        # Which window slots hold real tokens: the padded keys are masked (every window keeps >= 1 real key,
        # so no row is all -inf; padded query rows are computed and then cropped by _merge).
        real = torch.ones(1, 1, grid[0] * grid[1], 1, dtype=q.dtype, device=q.device)
        mask = _partition(real, grid, window)[..., 0].bool()[:, :, :, None, :]  # (1, 1, windows, 1, keys)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask)
    return _merge(out, grid, window)


def neighborhood_index(grid: Sequence[int], window: Sequence[int], device=None) -> Tensor:
    """(N, wh·ww) int64: the tokens each query sees in ``neighborhood=True`` mode, row-major in its window."""
    (gh, gw), (wh, ww) = grid, window
    rs = neighborhood_start(torch.arange(gh, device=device), wh, gh)[:, None] + torch.arange(wh, device=device)
    cs = neighborhood_start(torch.arange(gw, device=device), ww, gw)[:, None] + torch.arange(ww, device=device)
    idx = rs[:, None, :, None] * gw + cs[None, :, None, :]  # (gh, gw, wh, ww)
    return idx.reshape(gh * gw, wh * ww)


def _neighborhood(q: Tensor, k: Tensor, v: Tensor, grid, window) -> Tensor:
    """Softmax attention of each query over the window centred on it (gathered keys)."""
    idx = neighborhood_index(grid, window, q.device)
    kn, vn = k[:, :, idx], v[:, :, idx]  # (B, h, N, wh·ww, d)
    s = torch.einsum("bhnd,bhnkd->bhnk", q, kn) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnk,bhnkd->bhnd", s.softmax(-1), vn)


def sema_attention(q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int], window: Sequence[int],
                   neighborhood: bool = False) -> Tensor:
    """``A_W(q, k, v) + mean_N(v)`` (module docstring); q, k, v (B, heads, N, d), N = grid[0]·grid[1]."""
    dt = compute_dtype(q)
    grid, window = (int(grid[0]), int(grid[1])), (int(window[0]), int(window[1]))
    qf, kf, vf = (t.to(dt) for t in (q, k, v))
    local = (_neighborhood if neighborhood else _windowed)(qf, kf, vf, grid, window)
    return (local + vf.mean(dim=2, keepdim=True)).to(q.dtype)


def sema_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int],
                            window: Sequence[int], neighborhood: bool, output_mask: Sequence[bool]):
    """``(grad_q, grad_k, grad_v)`` of :func:`sema_attention` by autograd; one not asked for in
    ``output_mask`` is an empty tensor, as the kernels return it.

    In closed form (what the kernels compute), per query i with P_ij its softmax weights over W(i) and
    g the incoming gradient: ``D_i = sum_j P_ij (g_i . v_j)``, ``dS_ij = P_ij (g_i . v_j - D_i)``,
    ``grad_q_i = sum_j dS_ij k_j / sqrt(d)``, ``grad_k_j = sum_i dS_ij q_i / sqrt(d)``,
    ``grad_v_j = sum_i P_ij g_i + (1/N) sum_i g_i``."""
    return vjp(lambda *qkv: sema_attention(*qkv, grid, window, neighborhood), (q, k, v), grad, output_mask)
