"""Attention over kept tokens: the ``token_attention`` op family (docs/algorithms.md §10, patch slimming: Tang et al.,
"Patch Slimming for Efficient Vision Transformers", CVPR 2022).

``kept_token_attention(q, k, v, q_idx, kv_idx, *, scale=None)``
    q (B, heads, Lq, d), k and v (B, heads, Lk, d); per sample b and head h::

        out[b, h] = softmax(q[b, h, q_idx[b]] · k[b, h, kv_idx[b]]ᵀ · scale) · v[b, h, kv_idx[b]]     (nq, d)

    ``scale = d^-1/2`` unless given. ``q_idx`` (nq,) / ``kv_idx`` (nk,) are shared by the batch, (B, nq) /
    (B, nk) are per sample; int64 or int32, in range, distinct within a row (else a clear error naming the
    argument). The output rows follow ``q_idx``'s order. Differentiable in q, k and v: their gradients have the
    full shapes, zero on rows no index keeps (what ``index_select``'s backward gives).

It computes exactly ``scaled_dot_product_attention(q[:, :, q_idx], k[:, :, kv_idx], v[:, :, kv_idx])``, without the
three gathered copies of the operands and the three scatters of their gradients: the kernels read the kept rows
in place by index (any strides with a contiguous head dim, e.g. views of a fused qkv projection).

float32/bfloat16/float16 are computed with float32 logits, softmax statistics and accumulators, float64 in float64;
the output has the dtype of q.

Backends (``backend=``):

- ``"cpu"``: C++, one task per (sample, head): the kept rows are packed once into cache-resident float32 tiles
  (q pre-scaled, kᵀ, v), logits ``Q Kᵀ`` and ``P V`` by the register-blocked product of ``small_mm.h``, the softmax
  vectorised, the output stored once; the backward recomputes the softmax (nothing saved but the inputs) and
  writes the gradient rows in place, zeroing the others;
- ``"triton"``: flash-style kernels reading the indices and the kept rows in place, online softmax over key tiles;
- ``"reference"``: ``index_select`` / ``gather`` + ``scaled_dot_product_attention`` (:mod:`slimops.reference.token_attention`);
- ``"auto"``: the C++ kernel on CPU, Triton on CUDA.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from slimops import _backend
from slimops.opdefs.token_attention import check_index_values, check_kept_token
from slimops.reference import token_attention as ref

__all__ = ["kept_token_attention"]


def kept_token_attention(q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor, *,
                         scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Softmax attention of the kept queries ``q_idx`` over the kept keys ``kv_idx`` (module docstring); returns
    (B, heads, nq, d) in the dtype of q."""
    op = "kept_token_attention"
    s = check_kept_token(op, q, k, v, q_idx, kv_idx, scale)
    name, fn = _backend.pick(op, backend, q.device, ref)
    if name == "reference":  # the kernels check the index values themselves
        check_index_values(op, q, k, q_idx, kv_idx)
    return fn(q, k, v, q_idx, kv_idx, s)
