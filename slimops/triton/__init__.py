"""Triton kernels of slimops (``slimops.triton.<family>``), registered as ``torch.ops.slimops_triton.*``.

Each family module holds ``@triton.jit`` kernels and their launchers, wrapped with
``torch.library.custom_op`` (namespace ``slimops_triton``; the ``slimops`` namespace schemas live in C++).
The kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before triton (or any kernel module) was imported.

Nothing here is imported by ``import slimops``: ``slimops._backend.triton_op`` imports a family module on
first use.
"""
from __future__ import annotations

import os

__all__ = ["is_available", "interpreting"]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (kernels then run on CPU tensors through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """True when triton imports and there is something to run it on: a CUDA device, or the interpreter."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    if interpreting():
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False
