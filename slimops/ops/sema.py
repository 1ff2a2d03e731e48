"""SEMA localised attention: the ``sema`` op family (docs/algorithms.md §8; Tran, Xue, Zhang et al. 2025).

``sema_attention(q, k, v, grid, window, *, neighborhood=False)``
    q, k, v (B, heads, N, d), N = grid[0]·grid[1] tokens in row-major order::

        out_i = sum_{j in W(i)} softmax_j(q_i . k_j / sqrt(d)) v_j + (1/N) sum_{j=1..N} v_j

    ``W(i)``: the non-overlapping ``window[0] x window[1]`` window holding token i (grids that are not a
    multiple of the window: the last windows are padded and the padded keys masked, i.e. they are
    smaller), or with ``neighborhood=True`` the window centred on i, shifted to stay inside the grid
    (neighbourhood attention). Exact definition: :mod:`slimops.reference.sema`. Linear in N.
    Differentiable in q, k and v.

float32/bfloat16/float16 inputs are computed with float32 logits, softmax statistics and accumulators,
float64 in float64; the output has the dtype of q (q, k and v share one dtype and shape). ``grid`` and
``window`` take an int (square) or a pair. Inputs may be strided views (e.g. slices of a fused qkv
projection): the kernels read them in place when the head dim is contiguous.

Backends (``backend=``):

- ``"cpu"``: C++, one task per (sample, head, window) (windows) or (sample, head, query row)
  (neighbourhood): the window's q/k/v rows are packed once into cache-resident float32 tiles, logits,
  softmax and output computed with AVX2 where the CPU has it, the mean added in the same pass;
- ``"triton"``: flash-style kernels reading q/k/v in place from (B, heads, N, d), online softmax over key
  tiles, the mean added in the epilogue; the backward recomputes the softmax (no saved attention);
- ``"reference"``: partition + ``scaled_dot_product_attention`` + merge + mean
  (:mod:`slimops.reference.sema`);
- ``"auto"``: the C++ kernel on CPU, Triton on CUDA (no CUDA C++ kernel: Triton's flash-style kernel
  already reads each operand once).
"""
from __future__ import annotations

from torch import Tensor

from slimops import _backend
from slimops.opdefs.sema import check_sema, pair
from slimops.reference import sema as ref

__all__ = ["sema_attention", "check_sema", "pair"]


# ---- public op ------------------------------------------------------------------------------------------


def sema_attention(q: Tensor, k: Tensor, v: Tensor, grid, window, *, neighborhood: bool = False,
                   backend: str = "auto") -> Tensor:
    """SEMA: softmax attention (scale d^-1/2) inside ``window`` windows of the ``grid`` of tokens, plus the
    mean of v over all tokens (module docstring). q, k, v (B, heads, N, d); returns (B, heads, N, d)."""
    op = "sema_attention"
    g, w = check_sema(op, q, k, v, grid, window, neighborhood)
    _, fn = _backend.pick(op, backend, q.device, ref)
    return fn(q, k, v, list(g), list(w), neighborhood)
