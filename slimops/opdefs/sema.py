"""The ``sema`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend shares,
the fake kernels and the autograd of ``sema_attention``. The maths and the public function:
:mod:`slimops.ops.sema`."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.opdefs._checks import FLOATS as _FLOATS, check_qkv, fail as _fail

__all__ = ["DEFS", "check_sema", "check_grad", "pair"]


def pair(op: str, name: str, value) -> Tuple[int, int]:
    """``value`` (an int or a sequence of two ints) as a pair of positive ints, or a clear error."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        value = (value, value)
    try:
        items = tuple(value)
    except TypeError:
        _fail(op, f"{name} must be an int or a pair of ints, got {value!r}", TypeError)
    if len(items) != 2 or any(isinstance(i, bool) or not isinstance(i, (int, torch.SymInt)) for i in items):
        _fail(op, f"{name} must be an int or a pair of ints, got {value!r}", TypeError)
    if items[0] < 1 or items[1] < 1:
        _fail(op, f"{name} must be positive, got {tuple(items)}")
    return int(items[0]), int(items[1])


def check_sema(op: str, q, k, v, grid, window, neighborhood=False) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Validates the arguments of ``sema_attention`` (shared with its backward, the fake kernels and the
    Triton launchers, so that every backend fails the same way); returns (grid, window) as int pairs."""
    check_qkv(op, q, k, v)
    if q.dim() != 4:
        _fail(op, f"q must be 4-D (B, heads, N, d), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            _fail(op, f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    if not isinstance(neighborhood, bool):
        _fail(op, f"neighborhood must be a bool, got {neighborhood!r}", TypeError)
    g, w = pair(op, "grid", grid), pair(op, "window", window)
    n, d = q.shape[2], q.shape[3]
    if d < 1:
        _fail(op, f"q must have a head dim d >= 1, got shape {tuple(q.shape)}")
    if n != g[0] * g[1]:
        _fail(op, f"q has N = {n} tokens but grid {g} holds grid[0]*grid[1] = {g[0] * g[1]}")
    if w[0] > g[0] or w[1] > g[1]:
        _fail(op, f"window {w} is larger than the grid {g}")
    return g, w


# ---- fake kernels ---------------------------------------------------------------------------------------


def _sema_fake(q, k, v, grid, window, neighborhood=False):
    check_sema("sema_attention", q, k, v, grid, window, neighborhood)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def check_grad(op: str, grad, q: Tensor):
    if not isinstance(grad, Tensor) or grad.dtype not in _FLOATS:
        _fail(op, "grad must be a floating-point tensor", TypeError)
    if grad.device != q.device:
        _fail(op, f"grad is on {grad.device} but q is on {q.device}")
    if grad.shape != q.shape:
        _fail(op, f"grad must have the shape of q {tuple(q.shape)}, got {tuple(grad.shape)}")


def _sema_backward_fake(grad, q, k, v, grid, window, neighborhood, output_mask):
    op = "sema_attention_backward"
    check_sema(op, q, k, v, grid, window, neighborhood)
    check_grad(op, grad, q)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if m else t.new_empty(0)
                 for t, m in zip((q, k, v), output_mask))


# ---- autograd: the backward is the family's own backward op, of the same backend ------------------------


def _setup(ctx, inputs, output):
    q, k, v, grid, window, neighborhood = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (grid, window, neighborhood)


def _make_backward(backward_op):
    def _backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        m = [bool(x) for x in ctx.needs_input_grad[:3]]
        gq, gk, gv = backward_op(grad.contiguous(), q, k, v, *ctx.args, m)
        return gq if m[0] else None, gk if m[1] else None, gv if m[2] else None, None, None, None

    return _backward


DEFS = (
    OpDef("sema_attention", _sema_fake, _setup, _make_backward),
    OpDef("sema_attention_backward", _sema_backward_fake),
)

wire(DEFS, "slimops")
