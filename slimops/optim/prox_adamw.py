"""ProxAdamW: torch.optim.AdamW followed by a proximal step, fused into one kernel per parameter bucket."""
from __future__ import annotations

from typing import Optional

import torch

from slimops.ops.prox import prox_adamw_
from slimops.optim._common import ProxOptimizer, amp_scalars, check_penalty_settings, group_by_device_dtype


class ProxAdamW(ProxOptimizer):
    r"""AdamW with a proximal step.

    Exactly ``torch.optim.AdamW``'s update (decoupled weight decay, bias correction, amsgrad,
    maximize), then ``p <- prox_{lr lam R}(p)`` with the group's ``penalty`` (docs/algorithms.md §1).
    Per-param-group ``penalty``/``lam``/``a``; one fused kernel call per (device, dtype) bucket; the
    state keys match AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), with ``step`` a
    float32 tensor kept on the parameter's device so that the GPU kernels read it without a sync.
    Supports LR schedulers, ``state_dict`` round trips, DDP and ``torch.amp.GradScaler``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 penalty: Optional[str] = None, lam: float = 0.0, a: float = 1.0, backend: str = "auto"):
        if lr < 0:
            raise ValueError(f"slimops.optim.ProxAdamW: invalid learning rate {lr}")
        if eps < 0:
            raise ValueError(f"slimops.optim.ProxAdamW: invalid eps {eps}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"slimops.optim.ProxAdamW: invalid betas {betas}")
        if weight_decay < 0:
            raise ValueError(f"slimops.optim.ProxAdamW: invalid weight_decay {weight_decay}")
        check_penalty_settings("ProxAdamW", penalty, lam, a)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, penalty=penalty, lam=lam, a=a, backend=backend)
        super().__init__(params, defaults)

    def _state_of(self, p, amsgrad):
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif st["step"].device != p.device:  # Optimizer.load_state_dict leaves "step" where it was saved
            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        if amsgrad and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st

    def _step_group(self, group, params, penalty):
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        for (device, _dtype), ps in group_by_device_dtype(params).items():
            states = [self._state_of(p, amsgrad) for p in ps]
            grad_scale, found_inf = amp_scalars(self, device)
            prox_adamw_(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states],
                        [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                        [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2,
                        eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=amsgrad,
                        maximize=group["maximize"], penalty=penalty, lam=group["lam"], a=group["a"],
                        grad_scale=grad_scale, found_inf=found_inf, backend=group["backend"])
