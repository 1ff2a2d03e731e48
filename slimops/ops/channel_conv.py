"""Sparse channel convolution: the ``channel_conv`` op family.

A slimmed network (network slimming, Liu et al. 2017; proximal slimming, Bui et al.) keeps a subset of
each conv's channels; a dynamically pruned one (ManiDP, Tang et al. 2021) keeps a different subset per
sample. These ops compute only the kept work from the full-size weights, so a slimmed model runs fast
without being rebuilt and keeps training on its full tensors:

``channel_conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation)``
    ``= F.conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx], stride, padding, dilation)``,
    shape (N, len(out_idx), OH, OW), without building ``x[:, in_idx]`` or the weight block in memory.
    ``input_gathered=True``: x already holds the channels ``in_idx`` in that order (a chain of sparse
    convs passes compact activations), so only the weight is indexed.

``masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation)``
    ``= F.conv2d(x, weight, bias, ...) * out_mask[:, :, None, None]`` with ``out_mask`` (N, C_out) bool:
    per sample only the kept output channels are computed; the others are exactly 0.

Work is proportional to the kept channels: ``|out| * |in|`` for ``channel_conv2d``, and per sample the
number of kept output channels for ``masked_conv2d``. Both are differentiable in x, weight and bias
(gradients are full-size, zero outside the kept block), with float32 accumulation for bf16/fp16.
``groups = 1`` and zero padding only. Index sets are 1-D integer tensors without repeats, in any order;
they are checked (range and repeats) on every call unless ``check_indices=False`` (the modules check
once when their indices are set: on a GPU the check synchronises; the reference backend always checks, and the
C++ CPU kernel reads them on the host anyway). An index set longer than the channels it indexes is refused from
its shape alone.

Backends (``backend=``): ``"cpu"`` (C++: per-sample im2col of the kept channels read through the index,
one GEMM against the packed kept weight block, tiled to stay in cache), ``"triton"`` (implicit GEMM whose
loads follow the indices; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (gather, then
``F.conv2d``). ``"auto"``: the C++ kernel on CPU, Triton on CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from slimops import _backend
from slimops.opdefs.channel_conv import channel_args, masked_args, check_index  # noqa: F401  (check_index: nn)
from slimops.reference import channel_conv as ref

__all__ = ["channel_conv2d", "masked_conv2d"]


def _pick(op: str, backend: str, device: torch.device):
    return _backend.pick(op, backend, device, ref)


# ---- public ops -----------------------------------------------------------------------------------------


def channel_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_idx: Tensor, out_idx: Tensor,
                   stride=1, padding=0, dilation=1, *, input_gathered: bool = False, check_indices: bool = True,
                   backend: str = "auto") -> Tensor:
    """``F.conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx], stride, padding, dilation)``
    computed from the full-size tensors (see the module docstring). Differentiable in x, weight, bias."""
    op = "channel_conv2d"
    ii, oi, s, p, d, _ = channel_args(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation,
                                       input_gathered, check_indices)
    b, fn = _pick(op, backend, x.device)
    if b == "reference" and not check_indices:
        # The reference gathers by indexing, which fails on a bad index without naming the op (on a GPU: a
        # device-side assert): it checks the values whatever check_indices says (it synchronises anyway).
        channel_args(op, x, weight, bias, in_idx, out_idx, stride, padding, dilation, input_gathered, True)
    return fn(x, weight, bias, ii, oi, list(s), list(p), list(d), bool(input_gathered))


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor, stride=1, padding=0,
                  dilation=1, *, backend: str = "auto") -> Tensor:
    """``F.conv2d(x, weight, bias, ...) * out_mask[:, :, None, None]``, computing per sample only the kept
    output channels (``out_mask`` (N, C_out) bool). Differentiable in x, weight and bias."""
    op = "masked_conv2d"
    s, p, d, _ = masked_args(op, x, weight, bias, out_mask, stride, padding, dilation)
    _, fn = _pick(op, backend, x.device)
    return fn(x, weight, bias, out_mask, list(s), list(p), list(d))
