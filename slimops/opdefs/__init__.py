"""What an op *is*, independent of the backend that runs it: argument checks, fake kernel, autograd.

The layer below both ``slimops.ops`` (the public functions) and ``slimops.triton`` (the Triton kernels):

    slimops.ops.<family>  ─┐
                           ├─> slimops.opdefs.<family> ─> slimops.reference.<family> (shape helpers)
    slimops.triton.<family>┘

Each family module declares its ops as :class:`OpDef` s (a fake kernel, and for a differentiable op the
autograd ``setup_context`` and a factory that turns the op's ``<op>_backward`` into its backward) and calls
:func:`wire` for the ``slimops`` namespace (the C++ schemas of ``csrc/registration.cpp``) when it is imported.
A Triton family module defines ``slimops_triton::<op>`` custom ops with the same schemas and calls
``wire(DEFS, "slimops_triton")``: the same fakes and the same autograd, backed by its own backward ops.
Nothing under ``slimops/triton`` imports ``slimops.ops``. ``tests/test_op_anatomy.py`` checks that every schema
has all of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["OpDef", "wire"]


@dataclass(frozen=True)
class OpDef:
    """One op's backend-independent registrations.

    ``fake(*schema_args)`` validates like the kernels and returns empty outputs of the right shapes.
    A differentiable op has ``setup_context(ctx, inputs, output)`` and ``make_backward(backward_op)``, which
    returns the autograd backward calling ``backward_op`` (the ``<name>_backward`` op of the same namespace,
    so a Triton forward is differentiated by the Triton backward)."""

    name: str
    fake: Callable
    setup_context: Optional[Callable] = None
    make_backward: Optional[Callable[[Callable], Callable]] = None

    @property
    def differentiable(self) -> bool:
        return self.make_backward is not None


def wire(defs: Sequence[OpDef], namespace: str, fake_wrapper: Optional[Callable] = None) -> None:
    """Registers every op's fake kernel and (when differentiable) autograd under ``namespace``.
    ``fake_wrapper(name, fake)`` lets a backend add its own limits to the fake (e.g. grid sizes a Triton
    kernel covers)."""
    ops = getattr(torch.ops, namespace)
    for d in defs:
        fake = d.fake if fake_wrapper is None else fake_wrapper(d.name, d.fake)
        torch.library.register_fake(f"{namespace}::{d.name}")(fake)
    for d in defs:
        if d.differentiable:
            torch.library.register_autograd(f"{namespace}::{d.name}", d.make_backward(getattr(ops, f"{d.name}_backward")),
                                            setup_context=d.setup_context)
