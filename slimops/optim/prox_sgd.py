"""ProxSGD: torch.optim.SGD followed by a proximal step, fused into one kernel per parameter bucket."""
from __future__ import annotations

from typing import Optional

import torch

from slimops.ops.prox import prox_sgd_
from slimops.optim._common import ProxOptimizer, amp_scalars, check_penalty_settings, group_by_device_dtype


class ProxSGD(ProxOptimizer):
    r"""Proximal stochastic gradient descent.

    Each step is exactly ``torch.optim.SGD``'s update (weight decay, momentum, dampening, nesterov,
    maximize), then the proximal operator of the group's penalty with threshold scale ``lr * lam``:

    .. math::  p \leftarrow \operatorname{prox}_{\mathrm{lr}\,\lambda R}\big(p - \mathrm{lr}\, d(p, g)\big)

    so that ``penalty="l1"`` on BatchNorm scales is the "proximal SGD" form of network slimming
    (docs/algorithms.md §4) and ``l0``/``tl1``/``l1_2``/``l21``/``l0_l21`` give the nonconvex and group
    variants (§1). ``penalty``, ``lam`` and ``a`` are per-param-group settings, so one optimizer can
    threshold the BN scales and leave the conv weights dense::

        opt = ProxSGD([{"params": convs}, {"params": bn_weights, "penalty": "l1", "lam": 1e-4}],
                      lr=0.1, momentum=0.9, weight_decay=1e-4)

    All parameters of a group that share device and dtype are updated by one fused kernel call
    (one launch on a GPU). Works with LR schedulers (``lr`` is read every step), ``state_dict``
    round trips, DDP, and ``torch.amp.GradScaler`` (grads are unscaled and inf steps skipped inside
    the kernel).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, penalty: Optional[str] = None,
                 lam: float = 0.0, a: float = 1.0, maximize: bool = False, backend: str = "auto"):
        if lr < 0:
            raise ValueError(f"slimops.optim.ProxSGD: invalid learning rate {lr}")
        if momentum < 0:
            raise ValueError(f"slimops.optim.ProxSGD: invalid momentum {momentum}")
        if weight_decay < 0:
            raise ValueError(f"slimops.optim.ProxSGD: invalid weight_decay {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("slimops.optim.ProxSGD: nesterov momentum requires a momentum and zero dampening")
        check_penalty_settings("ProxSGD", penalty, lam, a)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, penalty=penalty, lam=lam, a=a, backend=backend)
        super().__init__(params, defaults)

    def _step_group(self, group, params, penalty):
        momentum = group["momentum"]
        # SGD creates a parameter's momentum buffer on its first step (buffer = grad): buckets keep
        # parameters with and without a buffer apart so each is one fused call.
        has_buf = (lambda p: "momentum_buffer" in self.state[p]) if momentum != 0 else None
        for (device, _dtype, *rest), ps in group_by_device_dtype(params, has_buf).items():
            init = bool(rest) and not rest[0]
            bufs = []
            if momentum != 0:
                for p in ps:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                    bufs.append(st["momentum_buffer"])
            grad_scale, found_inf = amp_scalars(self, device)
            prox_sgd_(ps, [p.grad for p in ps], bufs, lr=group["lr"], momentum=momentum,
                      dampening=group["dampening"], weight_decay=group["weight_decay"],
                      nesterov=group["nesterov"], maximize=group["maximize"], init_momentum=init,
                      penalty=penalty, lam=group["lam"], a=group["a"], grad_scale=grad_scale,
                      found_inf=found_inf, backend=group["backend"])
            if init and found_inf is not None and bool(found_inf.item() != 0):
                # The kernel skipped this step (AMP overflow), so the new buffers were never set to
                # the gradient: drop them so that the next real step initialises them, as SGD does
                # (SGD is not even called on a skipped step). A host read only on a first step.
                for p in ps:
                    del self.state[p]["momentum_buffer"]
