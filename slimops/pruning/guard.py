"""Non-finite training: a NaN or inf loss or gradient stops the run or skips the step, never reaches a file.

A diverging run (too high a learning rate, an fp16 overflow, a corrupt batch) first shows as a non-finite
loss or gradient. Stepping on it writes NaN into every weight it touches, and the next checkpoint
would preserve the damage. :class:`NonFiniteGuard` checks every step after ``backward()`` (the loss, and
all gradients in one fused pass per device and dtype: ``torch._amp_foreach_non_finite_check_and_unscale_``
with scale 1, the check ``GradScaler`` uses), agreed over all ranks under DDP, and

- ``on_nonfinite="stop"`` (the default) raises :class:`NonFiniteError` naming the stage, epoch and step;
  the last checkpoint (the previous epoch's) is untouched, so ``--resume`` can continue from it;
- ``"skip"`` drops the step as if the batch had not been seen: no optimizer or method update, and the
  BatchNorm running statistics the forward pass moved are put back. The count goes into the history.

:func:`check_finite_state` is the last line of defence: no checkpoint or model file is written from a
model whose parameters or buffers are not all finite.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from slimops.optim._common import group_by_device_dtype

log = logging.getLogger("slimops.pruning")

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training met a NaN/inf loss or gradient (``on_nonfinite="stop"``), or a model about to be saved has one."""


def check_on_nonfinite(value: str) -> str:
    if value not in ON_NONFINITE:
        raise ValueError(f"slimops.pruning: on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {value!r}")
    return value


def _grads_nonfinite(model: nn.Module, flag: Tensor) -> None:
    """Adds 1 to ``flag`` when some gradient of ``model`` holds a NaN or inf (fused, one pass per device/dtype)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for (device, _), bucket in group_by_device_dtype(grads).items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(bucket, found, torch.ones(1, device=device))
        flag += found.to(flag.device)


class NonFiniteGuard:
    """Per-step check of loss and gradients (see the module docstring); ``skipped`` counts skipped steps."""

    def __init__(self, model: nn.Module, on_nonfinite: str = "stop", distributed: bool = False):
        self.model = model
        self.mode = check_on_nonfinite(on_nonfinite)
        self.distributed = distributed
        self.skipped = 0
        self._saved: Optional[list] = None

    def before_forward(self) -> None:
        """Skip mode: remembers the buffers (BN running statistics) the forward pass is about to move."""
        if self.mode == "skip":
            self._saved = [b.detach().clone() for b in self.model.buffers()]

    def step_is_bad(self, loss: Tensor, where: str, saved: str = "") -> bool:
        """True when this step must not be applied (skip mode); raises in stop mode (``saved``: what the last
        checkpoint holds, for the message); False when all is finite."""
        flag = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        _grads_nonfinite(self.model, flag)
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag.item()):
            return False
        what = f"non-finite loss or gradient at {where} (loss {loss.detach().item():.4g} on this rank)"
        if self.mode == "stop":
            raise NonFiniteError(f"slimops.pruning: {what}; stopped, nothing of it written{saved} (lower --lr, or "
                                 "--on-nonfinite skip drops such steps)")
        with torch.no_grad():
            for b, s in zip(self.model.buffers(), self._saved or []):
                b.copy_(s)
        self.skipped += 1
        log.warning("skipped step: %s", what)
        return True


def check_finite_state(model: nn.Module, what: str) -> None:
    """Raises :class:`NonFiniteError` when a parameter or buffer of ``model`` holds a NaN or inf, naming it and
    ``what`` was about to be written, so no file ever stores a diverged model."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"slimops.pruning: {what} not written: '{name}' holds NaN or inf")
