"""Helpers shared by the proximal optimizers."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import Tensor

from slimops import penalties


def check_penalty_settings(owner: str, penalty: Optional[str], lam: float, a: float) -> str:
    """Validates a param group's penalty settings by the one penalty table (:mod:`slimops.penalties`); returns
    the penalty name ("none" for None)."""
    return penalties.check(f"slimops.optim.{owner}", "none" if penalty is None else penalty, lam, a, penalties.STEP)


def grads_of(owner: str, params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters of a group that have a gradient; sparse gradients are refused by name."""
    out = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"slimops.optim.{owner}: sparse gradients are not supported")
        out.append(p)
    return out


def group_by_device_dtype(params: list[Tensor], key=None) -> dict:
    """Buckets tensors by (device, dtype[, key(p)]): one fused call per bucket."""
    buckets = defaultdict(list)
    for p in params:
        k = (p.device, p.dtype) if key is None else (p.device, p.dtype, key(p))
        buckets[k].append(p)
    return buckets


def amp_scalars(opt: torch.optim.Optimizer, device: torch.device):
    """(grad_scale, found_inf) that torch.amp.GradScaler hands a `_step_supports_amp_scaling` optimizer,
    moved to ``device``; (None, None) outside AMP."""
    gs = getattr(opt, "grad_scale", None)
    fi = getattr(opt, "found_inf", None)
    if gs is not None and gs.device != device:
        gs = gs.to(device, non_blocking=True)
    if fi is not None and fi.device != device:
        fi = fi.to(device, non_blocking=True)
    return gs, fi


class ProxOptimizer(torch.optim.Optimizer):
    """What ProxSGD and ProxAdamW share: per-group penalty settings checked whenever a group is added,
    the closure, and the loop over groups of parameters that have a gradient. Subclasses implement
    ``_step_group(group, params, penalty)`` with one fused call per (device, dtype) bucket."""

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands us grad_scale / found_inf

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        check_penalty_settings(type(self).__name__, g["penalty"], g["lam"], g["a"])

    def _step_group(self, group: dict, params: list, penalty: str) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for group in self.param_groups:
            params = grads_of(name, group["params"])
            if params:
                self._step_group(group, params, check_penalty_settings(name, group["penalty"], group["lam"], group["a"]))
        return loss
