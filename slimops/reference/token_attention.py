"""Readable pure-PyTorch twin of the ``token_attention`` family (attention over a kept subset of tokens, for patch
slimming): the test oracle and the fallback backend (the benchmarks' baselines: index_select / gather + SDPA, and
+ this written-out softmax). Mirrors ``torch.ops.slimops``'s ``kept_token_attention`` and ``kept_token_attention_backward`` (schemas in
``csrc/registration.cpp``). docs/algorithms.md §10 (patch slimming, Tang et al., CVPR 2022).

Per sample b and head h, with ``Q = q[b, h, q_idx[b]]`` (nq rows) and ``K, V = k, v[b, h, kv_idx[b]]`` (nk rows)::

    out[b, h] = softmax(Q Kᵀ · scale) V          (nq, d),   scale = d^-1/2 unless given

An index of shape (n,) is shared by every sample, one of shape (B, n) is per sample. Indices are in range and
have no duplicates within a row (a duplicated query would need its gradient summed, a duplicated key would count
twice in the softmax: both are errors). The gradients of q, k and v have their full shapes, zero on the rows no
index keeps.

Precision: float16/bfloat16/float32 inputs are computed in float32 (softmax statistics included), float64 in
float64; the result is rounded once to the dtype of q.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from slimops.reference._common import compute_dtype, vjp


def default_scale(d: int, scale: Optional[float]) -> float:
    """The softmax scale: ``scale`` when given, else ``d^-1/2``."""
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (shape (n,) or (B, n)) of the token dim of t (B, heads, L, d) -> (B, heads, n, d)."""
    idx = idx.long()
    if idx.dim() == 1:
        return t.index_select(2, idx)
    b, h, _, d = t.shape
    return t.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def kept_token_attention(q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor,
                         scale: Optional[float] = None) -> Tensor:
    """``softmax(q[q_idx] k[kv_idx]ᵀ · scale) v[kv_idx]`` per sample and head (module docstring)."""
    dt = compute_dtype(q)
    s = default_scale(q.shape[-1], scale)
    qk, kk, vk = take_rows(q.to(dt), q_idx), take_rows(k.to(dt), kv_idx), take_rows(v.to(dt), kv_idx)
    # Written out rather than F.scaled_dot_product_attention: the same maths, but IEEE all through (torch's fused
    # CPU kernel returns zeros, not NaN, for a query row with a NaN), and empty query sets need no special case.
    return ((qk @ kk.transpose(-1, -2) * s).softmax(-1) @ vk).to(q.dtype).contiguous()


def kept_token_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor,
                                  scale: Optional[float], output_mask: Sequence[bool]):
    """``(grad_q, grad_k, grad_v)`` of :func:`kept_token_attention` by autograd, in the full shapes of q, k, v
    (zero on rows not kept); one not asked for in ``output_mask`` is an empty tensor.

    In closed form (what the kernels compute), per sample and head with P = softmax(Q Kᵀ·scale) and G the incoming
    gradient: ``dP = G Vᵀ``, ``delta_i = sum_j P_ij dP_ij``, ``dS = P (dP - delta)``; then ``dQ = scale·dS K``,
    ``dK = scale·dSᵀ Q``, ``dV = Pᵀ G``, scattered back to the rows ``q_idx`` / ``kv_idx``."""
    return vjp(lambda *qkv: kept_token_attention(*qkv, q_idx, kv_idx, scale), (q, k, v), grad, output_mask)
