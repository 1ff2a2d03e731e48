"""ProximalSlimming: the gamma/xi scheme of proximal network slimming, owning (and saving) xi."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from slimops.ops.prox import palm_slimming_


def batchnorm_weights(model: nn.Module) -> list[Tensor]:
    """The scale factors gamma of every affine BatchNorm layer of ``model``, in module order."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]


class ProximalSlimming:
    r"""Proximal network slimming (Bui, Xue, Park, Qi, Xin 2023; docs/algorithms.md §4).

    Minimises ``L(W, gamma) + lam ||xi||_1 + (beta/2) ||gamma - xi||^2`` with xi an auxiliary, exactly
    sparse copy of the BN scales gamma. Call :meth:`step` right after the ordinary optimizer step of
    each mini-batch (which must carry *no* penalty gradient on gamma); with ``alpha = 1/lr`` read from
    the optimizer every step (so LR schedules are followed)::

        gamma <- (alpha gamma~ + beta xi) / (alpha + beta)
        xi    <- soft_{lam/(alpha+beta)}((alpha xi + beta gamma) / (alpha + beta))

    Channels with ``xi == 0`` are pruned: no threshold to pick. xi is part of :meth:`state_dict` (the
    reference code forgot to save it). Each (device, dtype, lr) bucket is one fused ``palm_slimming_``
    call.

    Args:
        gammas: the BN scale tensors (see :func:`batchnorm_weights`); they must be in ``optimizer``.
        optimizer: the optimizer that steps gamma; its param group's ``lr`` gives alpha.
        lam, beta: the paper's lambda and beta (e.g. VGG-19 on CIFAR: 0.0045, 100).
        penalty, a: the prox applied to xi (``"l1"`` in the paper; any ``slimops.ops.prox`` penalty).
        xi_init: initial xi; default: a copy of gamma (near 0.5 with network-slimming initialisation).
    """

    def __init__(self, gammas: Iterable[Tensor], optimizer: torch.optim.Optimizer, *, lam: float, beta: float,
                 penalty: str = "l1", a: float = 1.0, xi_init: Optional[float] = None, backend: str = "auto"):
        self.gammas = list(gammas)
        if not self.gammas:
            raise ValueError("slimops.optim.ProximalSlimming: gammas is empty (no BatchNorm scales found?)")
        if lam < 0 or beta < 0:
            raise ValueError(f"slimops.optim.ProximalSlimming: lam and beta must be >= 0, got lam={lam}, beta={beta}")
        self.optimizer = optimizer
        self.lam, self.beta, self.penalty, self.a, self.backend = lam, beta, penalty, a, backend
        owner = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        missing = [i for i, g in enumerate(self.gammas) if id(g) not in owner]
        if missing:
            raise ValueError(f"slimops.optim.ProximalSlimming: gammas {missing} are not in the optimizer's param groups")
        self._group_of = [owner[id(g)] for g in self.gammas]
        with torch.no_grad():
            self.xis = [torch.full_like(g, xi_init) if xi_init is not None else g.detach().clone() for g in self.gammas]

    @classmethod
    def from_model(cls, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs) -> "ProximalSlimming":
        """Slims every affine BatchNorm of ``model``."""
        return cls(batchnorm_weights(model), optimizer, **kwargs)

    @torch.no_grad()
    def step(self) -> None:
        buckets: dict = {}
        for gam, xi, gi in zip(self.gammas, self.xis, self._group_of):
            key = (gam.device, gam.dtype, gi)
            buckets.setdefault(key, ([], []))
            buckets[key][0].append(gam)
            buckets[key][1].append(xi)
        for (_dev, _dt, gi), (gams, xis) in buckets.items():
            lr = self.optimizer.param_groups[gi]["lr"]
            if lr <= 0:
                raise ValueError(f"slimops.optim.ProximalSlimming: lr must be > 0 (alpha = 1/lr), got {lr}")
            palm_slimming_(gams, xis, alpha=1.0 / lr, beta=self.beta, lam=self.lam, penalty=self.penalty,
                           a=self.a, backend=self.backend)

    def masks(self) -> list[Tensor]:
        """Boolean keep-masks per BN layer: ``xi != 0``."""
        return [xi != 0 for xi in self.xis]

    def kept_fraction(self) -> float:
        kept = sum(int((xi != 0).sum()) for xi in self.xis)
        total = sum(xi.numel() for xi in self.xis)
        return kept / max(total, 1)

    def state_dict(self) -> dict:
        return {"xis": [xi.clone() for xi in self.xis], "lam": self.lam, "beta": self.beta,
                "penalty": self.penalty, "a": self.a}

    def load_state_dict(self, state: dict) -> None:
        if len(state["xis"]) != len(self.xis):
            raise ValueError(f"slimops.optim.ProximalSlimming: state has {len(state['xis'])} xi tensors, expected {len(self.xis)}")
        with torch.no_grad():
            for xi, saved in zip(self.xis, state["xis"]):
                if saved.shape != xi.shape:
                    raise ValueError(f"slimops.optim.ProximalSlimming: xi shape {tuple(saved.shape)} does not match {tuple(xi.shape)}")
                xi.copy_(saved)
        self.lam, self.beta = state["lam"], state["beta"]
        self.penalty, self.a = state["penalty"], state["a"]
