"""Pieces shared by the reference twins: the accumulation dtype and the autograd-built backward."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype (the kernels' accumulation dtype)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def vjp(fn, primals: Sequence[Tensor], grad: Tensor, output_mask: Sequence[bool]) -> Tuple[Tensor, ...]:
    """Gradients of ``fn`` at ``primals`` (computed in the compute dtype of ``primals[0]``, returned contiguous
    in each primal's dtype, as the kernels return them); a gradient not asked for in ``output_mask`` is an
    empty tensor."""
    dt = compute_dtype(primals[0])
    with torch.enable_grad():
        leaves = [p.detach().to(dt).requires_grad_(bool(m)) for p, m in zip(primals, output_mask)]
        out = fn(*leaves)
        wanted = [t for t, m in zip(leaves, output_mask) if m]
        grads = iter(torch.autograd.grad(out, wanted, grad.to(dt), allow_unused=True) if wanted else ())
    res = []
    for p, m in zip(primals, output_mask):
        if not m:
            res.append(p.new_empty(0))
            continue
        g = next(grads)
        res.append((torch.zeros_like(p) if g is None else g).to(p.dtype).contiguous())
    return tuple(res)
