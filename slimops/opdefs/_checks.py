"""Argument checks shared by the op families (the error form, float dtypes, real scalars, penalties, and the
tensor-list checks of the fused in-place ops), used by the public ops, the fake kernels and the Triton
launchers, so that every backend fails the same way: ``slimops.<op>: <argument> ...``, ValueError (TypeError
for dtypes), like the C++ checks in csrc/include/slimops/checks.h. Each family's own checks live in
``slimops/opdefs/<family>.py``."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from slimops import penalties

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def fail(op: str, msg: str, exc=ValueError):
    raise exc(f"slimops.{op}: {msg}")


def check_float_tensor(op: str, name: str, t) -> None:
    """``name`` is a strided float tensor (float32, float64, bfloat16 or float16), else a TypeError / ValueError
    naming it (the C++ check_floating and strided-layout checks' words)."""
    if not isinstance(t, Tensor):
        fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if t.layout != torch.strided:
        fail(op, f"{name} must be a strided (dense) tensor, got layout {t.layout}")
    if t.dtype not in FLOATS:
        fail(op, f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got {t.dtype}",
             TypeError)


def check_qkv(op: str, q, k, v) -> None:
    """q, k and v of an attention op: floating-point strided tensors, k and v of q's dtype and device (their shapes
    are each op's own rule)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t.dtype not in FLOATS:
            fail(op, f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got {t.dtype}",
                 TypeError)
        if t.layout != torch.strided:
            fail(op, f"{name} must be a strided (dense) tensor")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            fail(op, f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; q, k and v must share one dtype", TypeError)
        if t.device != q.device:
            fail(op, f"{name} is on {t.device} but q is on {q.device}")


def real(op: str, name: str, v) -> float:
    """A float argument as a Python float: a real number (not a bool) or a one-element tensor, else a TypeError
    naming it (``float()`` would accept strings, ``math.isfinite`` fails without saying which op)."""
    return penalties.real(f"slimops.{op}", name, v)


def check_penalty(op: str, penalty: str, allowed: Sequence[str], lam: float, a: float, lam_name: str = "lam"):
    """``penalty``/``lam``/``a`` of ``op`` by the one penalty table (:mod:`slimops.penalties`: the C++
    check_penalty_args' rules and words)."""
    penalties.check(f"slimops.{op}", penalty, lam, a, allowed, lam_name)


def check_params(op: str, name: str, params: Sequence[Tensor]):
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            fail(op, f"{name}[{i}] is not a tensor", TypeError)
        if p.layout != torch.strided:
            fail(op, f"{name}[{i}] must be a strided tensor")
        if p.dtype not in FLOATS:
            fail(op, f"{name}[{i}] must be a floating-point tensor (float32, float64, bfloat16 or float16), got {p.dtype}", TypeError)
        if not p.is_contiguous():
            fail(op, f"{name}[{i}] must be contiguous (it is updated in place)")
        if p.dtype != params[0].dtype:
            fail(op, f"{name}[{i}] has dtype {p.dtype} but {name}[0] has dtype {params[0].dtype}; one call takes one dtype", TypeError)
        if p.device != params[0].device:
            fail(op, f"{name}[{i}] is on {p.device} but {name}[0] is on {params[0].device}")


def check_list(op: str, name: str, lst: Sequence[Tensor], params: Sequence[Tensor], pname: str, inplace: bool):
    if len(lst) != len(params):
        fail(op, f"{name} has {len(lst)} tensors but {pname} has {len(params)}")
    for i, (t, p) in enumerate(zip(lst, params)):
        if not isinstance(t, Tensor):
            fail(op, f"{name}[{i}] is not a tensor", TypeError)
        if t.layout != torch.strided:
            fail(op, f"{name}[{i}] is sparse; sparse gradients are not supported")
        if t.device != p.device:
            fail(op, f"{name}[{i}] is on {t.device} but its parameter is on {p.device}")
        if t.dtype != p.dtype:
            fail(op, f"{name}[{i}] has dtype {t.dtype} but its parameter has dtype {p.dtype}", TypeError)
        if t.shape != p.shape:
            fail(op, f"{name}[{i}] has shape {tuple(t.shape)} but its parameter has shape {tuple(p.shape)}")
        if inplace and not t.is_contiguous():
            fail(op, f"{name}[{i}] must be contiguous (it is updated in place)")


def check_amp(op: str, name: str, t: Optional[Tensor], params: Sequence[Tensor]):
    if t is None:
        return
    if t.numel() != 1:
        fail(op, f"{name} must have exactly one element, got {t.numel()}")
    if not t.dtype.is_floating_point:
        fail(op, f"{name} must be floating, got {t.dtype}", TypeError)
    if params and t.device != params[0].device:
        fail(op, f"{name} is on {t.device} but params are on {params[0].device}")


try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - older torch
    def _is_fake(t):
        return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _span(t: Tensor):
    """(storage address, first byte, one past the last byte) of the memory ``t`` can touch; None when it has none
    that can be compared (no elements, meta or fake tensors)."""
    if not isinstance(t, Tensor) or t.is_meta or t.layout != torch.strided:
        return None
    if type(t) not in _PLAIN_TENSORS and _is_fake(t):  # the fake kernels (tracing) run these checks too
        return None
    start = t.data_ptr()
    if t.is_contiguous():
        nbytes = t.numel() * t.element_size()
    elif t.numel():
        nbytes = (1 + sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride()))) * t.element_size()
    else:
        nbytes = 0
    if nbytes == 0:
        return None
    base = start - t.storage_offset() * t.element_size()  # the storage's address: views of one storage share it
    return base, start, start + nbytes


def check_no_overlap(op: str, written: Dict[str, Sequence[Tensor]], read: Dict[str, Sequence[Tensor]]):
    """No tensor the op updates in place shares memory with another argument: one tensor twice in a list, a
    buffer that is also a parameter, or partly overlapping views would make the result depend on the order of
    the (parallel) updates. Read-only arguments may overlap each other."""
    if torch.compiler.is_compiling():
        return
    spans = []
    for is_written, group in ((True, written), (False, read)):
        for name, lst in group.items():
            for i, t in enumerate(lst):
                sp = _span(t)
                if sp is not None:
                    spans.append((sp[0], sp[1], sp[2], name, i, is_written))
    spans.sort(key=lambda e: (e[0], e[1]))
    base = None
    for b, lo, hi, name, i, is_written in spans:
        if b != base:  # a new storage
            base, end_all, end_written = b, (-1, None), (-1, None)
        other = end_all if is_written else end_written  # the furthest-reaching earlier span it must not meet
        if other[0] > lo:
            fail(op, f"{other[1]} and {name}[{i}] overlap in memory; a tensor updated in place must not share "
                     "memory with another argument")
        if hi > end_all[0]:
            end_all = (hi, f"{name}[{i}]")
        if is_written and hi > end_written[0]:
            end_written = (hi, f"{name}[{i}]")


def reals(op: str, **values) -> Dict[str, float]:
    """The float arguments as floats (:func:`real` each)."""
    return {name: real(op, name, v) for name, v in values.items()}
