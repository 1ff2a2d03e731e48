"""The ``token_attention`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend shares,
the fake kernels and the autograd of ``kept_token_attention``. The maths and the public function:
:mod:`slimops.ops.token_attention`."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.opdefs._checks import FLOATS as _FLOATS, check_qkv, fail as _fail, real as _real

__all__ = ["DEFS", "check_kept_token", "check_index_values", "check_grad", "INDEX_DTYPES"]

INDEX_DTYPES = (torch.int64, torch.int32)


def _check_index(op: str, name: str, idx, batch: int, device) -> int:
    """An index argument's dtype, device and shape ((n,) or (B, n)); returns n."""
    if not isinstance(idx, Tensor):
        _fail(op, f"{name} must be a tensor of token indices, got {type(idx).__name__}", TypeError)
    if idx.dtype not in INDEX_DTYPES:
        _fail(op, f"{name} must be an int64 or int32 tensor, got {idx.dtype}", TypeError)
    if idx.layout != torch.strided:
        _fail(op, f"{name} must be a strided (dense) tensor")
    if idx.device != device:
        _fail(op, f"{name} is on {idx.device} but q is on {device}")
    if idx.dim() not in (1, 2):
        _fail(op, f"{name} must be 1-D (n,) (shared by the batch) or 2-D (B, n) (per sample), got shape "
                  f"{tuple(idx.shape)}")
    if idx.dim() == 2 and idx.shape[0] != batch:
        _fail(op, f"{name} has {idx.shape[0]} rows but q has batch size B = {batch}")
    return int(idx.shape[-1])


def check_kept_token(op: str, q, k, v, q_idx, kv_idx, scale=None) -> Optional[float]:
    """Validates the arguments of ``kept_token_attention`` (shared with its backward, the fake kernels and the
    Triton launchers, so that every backend fails the same way): dtypes, devices, shapes and the scale — not the
    index values (:func:`check_index_values`, which reads them). Returns the scale as a float (or None)."""
    check_qkv(op, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            _fail(op, f"{name} must be 4-D (B, heads, tokens, d), got shape {tuple(t.shape)}")
    if v.shape != k.shape:
        _fail(op, f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        _fail(op, f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, heads and head dim")
    if q.shape[3] < 1:
        _fail(op, f"q must have a head dim d >= 1, got shape {tuple(q.shape)}")
    nq = _check_index(op, "q_idx", q_idx, q.shape[0], q.device)
    nk = _check_index(op, "kv_idx", kv_idx, q.shape[0], q.device)
    if nq > q.shape[2]:
        _fail(op, f"q_idx keeps {nq} tokens but q has {q.shape[2]}")
    if nk > k.shape[2]:
        _fail(op, f"kv_idx keeps {nk} tokens but k has {k.shape[2]}")
    if nk == 0 and nq > 0:
        _fail(op, "kv_idx must keep at least one key (the softmax of a query over no keys is undefined)")
    if scale is None:
        return None
    s = _real(op, "scale", scale)
    if not (math.isfinite(s) and s > 0):
        _fail(op, f"scale must be a finite positive number, got {s}")
    return s


def check_index_values(op: str, q: Tensor, k: Tensor, q_idx: Tensor, kv_idx: Tensor) -> None:
    """Index values in range and without duplicates in a row. Reads the indices: one host sync per index on a GPU
    (min, max and the duplicate count come back together; the details of a failure cost more)."""
    for name, idx, length in (("q_idx", q_idx, q.shape[2]), ("kv_idx", kv_idx, k.shape[2])):
        if idx.numel() == 0:
            continue
        rows = idx.reshape(-1, idx.shape[-1])
        s = rows.sort(dim=1).values
        same = s[:, 1:] == s[:, :-1]
        lo, hi, dups = torch.stack([rows.min().long(), rows.max().long(), same.sum()]).tolist()
        if lo < 0 or hi >= length:
            _fail(op, f"{name} holds token {lo if lo < 0 else hi}, outside [0, {length})", IndexError)
        if dups:
            r, c = (int(x) for x in same.nonzero()[0])
            where = f" in row {r}" if idx.dim() == 2 else ""
            _fail(op, f"{name} repeats token {int(s[r, c])}{where}; kept indices must be distinct")


# ---- fake kernels ---------------------------------------------------------------------------------------


def _fake(q, k, v, q_idx, kv_idx, scale=None):
    check_kept_token("kept_token_attention", q, k, v, q_idx, kv_idx, scale)
    return q.new_empty((q.shape[0], q.shape[1], q_idx.shape[-1], q.shape[3]))


def check_grad(op: str, grad, q: Tensor, q_idx: Tensor):
    if not isinstance(grad, Tensor) or grad.dtype not in _FLOATS:
        _fail(op, "grad must be a floating-point tensor", TypeError)
    if grad.device != q.device:
        _fail(op, f"grad is on {grad.device} but q is on {q.device}")
    want = (q.shape[0], q.shape[1], q_idx.shape[-1], q.shape[3])
    if tuple(grad.shape) != want:
        _fail(op, f"grad must have the output's shape {want}, got {tuple(grad.shape)}")


def _backward_fake(grad, q, k, v, q_idx, kv_idx, scale, output_mask):
    op = "kept_token_attention_backward"
    check_kept_token(op, q, k, v, q_idx, kv_idx, scale)
    check_grad(op, grad, q, q_idx)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if m else t.new_empty(0)
                 for t, m in zip((q, k, v), output_mask))


# ---- autograd: the backward is the family's own backward op, of the same backend ------------------------


def _setup(ctx, inputs, output):
    q, k, v, q_idx, kv_idx, scale = inputs
    ctx.save_for_backward(q, k, v, q_idx, kv_idx)
    ctx.scale = scale


def _make_backward(backward_op):
    def _backward(ctx, grad):
        q, k, v, q_idx, kv_idx = ctx.saved_tensors
        m = [bool(x) for x in ctx.needs_input_grad[:3]]
        gq, gk, gv = backward_op(grad.contiguous(), q, k, v, q_idx, kv_idx, ctx.scale, m)
        return gq if m[0] else None, gk if m[1] else None, gv if m[2] else None, None, None, None

    return _backward


DEFS = (
    OpDef("kept_token_attention", _fake, _setup, _make_backward),
    OpDef("kept_token_attention_backward", _backward_fake),
)

wire(DEFS, "slimops")
