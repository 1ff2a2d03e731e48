"""The slimming methods: how each one trains the BN scales gamma toward a sparse channel structure.

Every method is SGD (momentum, weight decay) on all weights plus one sparsity mechanism on gamma,
and every update goes through slimops' fused kernels:

====================  ==========================================================================
``none``              plain SGD: the baseline (``ProxSGD`` without a penalty is exactly SGD)
``ns``                network slimming (Liu et al. 2017): ``gamma.grad += s sign(gamma)``
``ns-tl1``            nonconvex slimming (Bui et al.): ``+= s a(a+1) sign(gamma)/(a+|gamma|)^2``
``ns-lp``             nonconvex slimming: ``+= s p sign(gamma)/|gamma|^{1-p}`` (|gamma| >= eps)
``prox-sgd``          proximal SGD: SGD step, then ``gamma <- prox_{lr lam R}(gamma)``, R any §1 penalty
``proximal-ns``       proximal network slimming (Bui et al. 2023): the gamma/xi scheme, xi exactly sparse
``vtp``               ViTs, SEMA-T: VTP's l1 on the dimension gates g, ``g.grad += s sign(g)``; the plan removes the
                      lowest ``percent`` of |g|
``sidt``              ViTs, SEMA-T: SiDT's proximal step on the gates after each optimizer step,
                      ``g <- prox_{lr lam R}(g)`` (R = l1, l0, tl1 or l1_2): exact zeros, no threshold
``patch-slim``        ViTs: trains as ``none``; then patch slimming (Tang et al. 2022) keeps, per block, the
                      tokens with the largest top-down impact (:mod:`slimops.pruning.patch_slim`)
====================  ==========================================================================

(docs/algorithms.md §2-§4, §6; the ViT methods act on the gates of :meth:`VisionTransformer.add_gates` (and of
SEMA-T's :meth:`SEMANet.add_gates`) instead of the BN scales, and run with SGD or AdamW.) The subgradient methods go through ``penalty_grad_``, proximal SGD through one
``prox_sgd_`` call per param group, proximal network slimming through ``palm_slimming_``.

Strength calibration. Every method's total shrinkage of gamma grows with the number of SGD steps
``T``: proximal SGD moves gamma by ``lr*lam`` per step, proximal NS moves xi by ``lam/(1/lr + beta)``.
The papers' values are for CIFAR (160 epochs of 782 steps, ``T_ref = 125,120``); a run of ``T`` steps
needs about ``T_ref/T`` times their lam to shrink as far. :func:`default_lam` applies that rule to the
reference values below, which were themselves chosen on digits (see docs/slimming.md for the runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from slimops.ops.prox import penalty_grad_
from slimops.pruning.keep_target import KeepTarget
from slimops.penalties import ELEMENTWISE_PROX
from slimops.optim import ProxAdamW, ProximalSlimming, ProxSGD

METHODS = ("none", "ns", "ns-tl1", "ns-lp", "prox-sgd", "proximal-ns", "vtp", "sidt", "patch-slim")
VIT_METHODS = ("vtp", "sidt")  # on the dimension gates of a ViT or SEMA-T; the others act on BN scales
TOKEN_METHODS = ("patch-slim",)  # ViTs, on the tokens each block computes (no sparsity term in training)
# The methods that are not defined on an SGD step (prox-sgd's prox step and proximal NS's alpha = 1/lr are), so
# that they run with AdamW too: the subgradient methods add to the gradient whatever the optimizer does with it.
ADAMW_METHODS = ("none", "ns", "ns-tl1", "ns-lp", "vtp", "sidt", "patch-slim")

# Reference step count the lam defaults are expressed for (CIFAR, 160 epochs at batch 64).
T_REF = 125_120
# lam at T_REF steps, per method (prox-sgd per penalty), calibrated on digits (vgg11 width 0.5, 15 epochs,
# 330 steps: docs/slimming.md) and rescaled by T_REF/330. For comparison, the papers' CIFAR values are
# s = 1e-4 (ns, VGG) and lam = 0.0045 with beta = 100 (proximal NS, VGG-19).
# The subgradient methods add s*dR/dgamma to the gradient, which SGD's momentum (0.9) then
# accumulates into a step 1/(1 - 0.9) = 10 times larger than the prox's lr*lam: their s is a tenth of
# prox-sgd's lam (s = 0.05 at 330 steps stops training on digits altogether).
LAM_AT_T_REF = {
    "ns": 0.005 * 330 / T_REF, "ns-tl1": 0.005 * 330 / T_REF, "ns-lp": 0.005 * 330 / T_REF,
    "prox-sgd": {"l1": 0.05 * 330 / T_REF, "l0": 0.05 * 330 / T_REF, "tl1": 0.025 * 330 / T_REF,
                 "l1_2": 0.05 * 330 / T_REF},
    "proximal-ns": 0.4 * 330 / T_REF,
}
DEFAULT_BETA = 100.0
DEFAULT_PENALTY = {"prox-sgd": "l1", "proximal-ns": "l1", "ns": "l1", "ns-tl1": "tl1", "ns-lp": "lp", "vtp": "l1",
                   "sidt": "l1"}
# SiDT with a target (keep_dims) defaults to transformed l1 instead: its prox shrinks a gate by lr lam rho'(|g|),
# rho'(|g|) = a(a + 1)/(a + |g|)^2, so at a = 1 a gate near 0 goes 4x faster than one near 1, and the pressure that
# pulls the target's zeros spares the gates that stay. Measured on digits (ViT-Ti patch 8, 30 + 10 FT epochs, five
# seeds, Xeon; docs/vit.md): keep 0.6 93.11% with l1, 94.27% with tl1, against 94.22% for `none` at 40 epochs;
# keep 0.5 with tl1 94.84%; before fine-tuning 66-78% (l1) against 83-94% (tl1). A fixed lam keeps l1: its useful
# range was calibrated for l1.
DEFAULT_PENALTY_KEEP_DIMS = "tl1"
CHOOSES_PENALTY = ("prox-sgd", "sidt")  # the methods that take any elementwise prox penalty
PROX_SGD_PENALTIES = ELEMENTWISE_PROX  # the elementwise ones: a BN scale vector has no groups


# The shortest run the defaults were calibrated on; shorter runs get that run's lam, not more: a lam
# scaled up without bound would zero every channel within the first steps of a very short run.
T_MIN = 330


def default_lam(method: str, steps: int, penalty: Optional[str] = None) -> float:
    """The calibrated lam for ``method`` over a run of ``steps`` SGD steps:
    ``LAM_AT_T_REF * T_REF / max(steps, T_MIN)``."""
    ref = LAM_AT_T_REF.get(method)
    if ref is None:
        return 0.0
    if isinstance(ref, dict):
        ref = ref[penalty or DEFAULT_PENALTY[method]]
    return ref * T_REF / max(int(steps), T_MIN)


def bn_gammas(model: nn.Module) -> list[Tensor]:
    """The BN scales of every prunable group, in ``slim_groups()`` order."""
    return [model.get_submodule(g.bn).weight for g in model.slim_groups()]


@dataclass
class MethodConfig:
    method: str = "none"
    penalty: Optional[str] = None
    lam: float = 0.0
    beta: float = DEFAULT_BETA
    a: float = 1.0
    eps: float = 1e-3   # ns-lp: |gamma| is clamped to >= eps, so the p/|gamma|^(1-p) kick stays <= p/eps^(1-p)
    keep_dims: Optional[float] = None  # sidt: keep about this fraction of the gated dims, lam adjusted (keep_target)
    steps: int = 0                     # the run's optimizer steps: keep_dims' path is laid out over them

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"slimops.pruning: unknown method '{self.method}' (expected one of: {', '.join(METHODS)})")
        if self.penalty is None:
            self.penalty = DEFAULT_PENALTY_KEEP_DIMS if self.method == "sidt" and self.keep_dims is not None \
                else DEFAULT_PENALTY.get(self.method)
        if self.method in CHOOSES_PENALTY and self.penalty not in PROX_SGD_PENALTIES:
            raise ValueError(f"slimops.pruning: method '{self.method}' takes penalty in {PROX_SGD_PENALTIES}, "
                             f"got '{self.penalty}'")
        if self.method not in CHOOSES_PENALTY and self.penalty != DEFAULT_PENALTY.get(self.method):
            # every other method has its penalty built in: a different one would be silently ignored
            raise ValueError(f"slimops.pruning: method '{self.method}' uses penalty "
                             f"{DEFAULT_PENALTY.get(self.method)!r}; penalty {self.penalty!r} does not apply to it "
                             "(penalties are chosen with methods 'prox-sgd' and 'sidt')")
        if self.method == "ns-lp" and not 0 < self.a < 1:
            raise ValueError(f"slimops.pruning: method 'ns-lp' needs the exponent p = a in (0, 1), got a={self.a}")
        if self.method in ("ns-tl1", "prox-sgd", "sidt") and self.penalty == "tl1" and not self.a > 0:
            raise ValueError(f"slimops.pruning: the tl1 penalty needs a > 0, got a={self.a}")
        if not self.eps > 0:
            raise ValueError(f"slimops.pruning: eps must be > 0, got {self.eps}")
        if not self.lam >= 0 or not self.beta >= 0:
            raise ValueError(f"slimops.pruning: lam and beta must be >= 0, got lam={self.lam}, beta={self.beta}")
        for name in ("lam", "beta", "a", "eps"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"slimops.pruning: {name} must be a finite number, got {getattr(self, name)}")
        if self.keep_dims is not None:
            if self.method != "sidt":
                raise ValueError(f"slimops.pruning: keep_dims sets SiDT's target (method 'sidt'), not {self.method!r}")
            if isinstance(self.keep_dims, bool) or not isinstance(self.keep_dims, (int, float)) \
                    or not 0 < self.keep_dims < 1:
                raise ValueError(f"slimops.pruning: keep_dims must be a fraction in (0, 1), got {self.keep_dims!r}")
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"slimops.pruning: keep_dims needs the run's steps (a positive int), got {self.steps!r}")


def adamw_decay_split(model: nn.Module, params: list) -> tuple[list, list]:
    """AdamW's two groups of ``params``: those weight decay acts on, and those it leaves alone.

    Decoupled weight decay pulls a weight toward 0. That regularises the matrices and kernels (ndim >= 2), but
    pulling a LayerNorm / BatchNorm scale toward 0 shrinks the whole normalised signal, a bias toward 0 only moves
    it, and a position embedding or class token toward 0 erases what it learned. So, as DeiT and timm
    (``param_groups_weight_decay``), the 1-D parameters and the names in the model's ``no_weight_decay()`` (the
    ViTs' ``pos_embed`` and ``cls_token``) get none. Measured on digits (docs/vit.md, "AdamW's weight decay"):
    ViT-Ti x0.25 at patch 4, 30 epochs, seed 1, ended at 48.7% with decay on every parameter, 82.7% with these
    groups.
    """
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    skip_ids = {id(p) for name, p in model.named_parameters() if p.ndim <= 1 or name in skip}
    decay = [p for p in params if id(p) not in skip_ids]
    no_decay = [p for p in params if id(p) in skip_ids]
    return decay, no_decay


class SlimMethod:
    """Builds the optimizer of a method and applies its per-step sparsity updates.

    The training loop calls ``after_backward()`` between ``loss.backward()`` and ``opt.step()``, and
    ``after_step()`` after it. ``scores()`` gives the per-layer channel scores the plan is made from
    (xi for proximal NS, gamma otherwise); ``state_dict()`` holds xi.
    """

    def __init__(self, cfg: MethodConfig, model: nn.Module, *, lr: float, momentum: float = 0.9,
                 weight_decay: float = 1e-4, nesterov: bool = False, optimizer: str = "sgd"):
        self.cfg = cfg
        if cfg.method in VIT_METHODS:
            if not getattr(model, "gated", False):
                raise ValueError(f"slimops.pruning: method {cfg.method!r} trains the dimension gates of a ViT or "
                                 "SEMA-T; the model has none (build it with gates=True)")
            self.gammas = list(model.gates().values())  # the gates take the BN scales' place
        else:
            self.gammas = bn_gammas(model)
        ids = {id(g) for g in self.gammas}
        rest = [p for p in model.parameters() if id(p) not in ids]
        # The ViT gates get no weight decay (their penalty is their regulariser); under AdamW neither do the BN
        # scales, as no 1-D parameter does (adamw_decay_split). SGD decays the BN scales, as network slimming's code.
        gamma_group = {"params": self.gammas}
        if cfg.method in VIT_METHODS or optimizer == "adamw":
            gamma_group["weight_decay"] = 0.0
        if cfg.method in CHOOSES_PENALTY:
            gamma_group.update(penalty=cfg.penalty, lam=cfg.lam, a=cfg.a)
        if optimizer == "adamw":
            if cfg.method not in ADAMW_METHODS:
                raise ValueError(f"slimops.pruning: method {cfg.method!r} is defined on SGD steps; optimizer "
                                 f"'adamw' works with {', '.join(ADAMW_METHODS)}")
            decay, no_decay = adamw_decay_split(model, rest)
            self.optimizer = ProxAdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}, gamma_group],
                                       lr=lr, weight_decay=weight_decay)
        else:
            self.optimizer = ProxSGD([{"params": rest}, gamma_group], lr=lr, momentum=momentum,
                                     weight_decay=weight_decay, nesterov=nesterov)
        self.slim: Optional[ProximalSlimming] = None
        if cfg.method == "proximal-ns":
            self.slim = ProximalSlimming(self.gammas, self.optimizer, lam=cfg.lam, beta=cfg.beta, penalty="l1")
        self.target: Optional[KeepTarget] = None
        if cfg.keep_dims is not None:  # SiDT with a target: lam is adjusted after every step
            self.target = KeepTarget(self.gammas, self.optimizer, cfg.keep_dims, cfg.steps)

    def after_backward(self) -> None:
        if self.cfg.method in ("ns", "ns-tl1", "ns-lp", "vtp"):
            params = [g for g in self.gammas if g.grad is not None]
            if params:
                penalty_grad_([g.grad for g in params], params, penalty=self.cfg.penalty, s=self.cfg.lam, a=self.cfg.a,
                              eps=self.cfg.eps)

    def after_step(self) -> None:
        if self.slim is not None:
            self.slim.step()
        if self.target is not None:
            self.target.step()

    def current_lam(self) -> Optional[float]:
        """The lam a target (``keep_dims``) has set, None without one."""
        return None if self.target is None else self.target.lam

    def scores(self) -> Optional[list[Tensor]]:
        """xi for proximal NS (what the plan prunes on), None for the gamma-based methods."""
        return None if self.slim is None else self.slim.xis

    def zero_fraction(self) -> float:
        s = self.scores() or [g.detach() for g in self.gammas]
        return sum(int((t == 0).sum()) for t in s) / max(sum(t.numel() for t in s), 1)

    def state_dict(self) -> dict:
        state = {"xi": None if self.slim is None else self.slim.state_dict()}
        if self.target is not None:
            state["keep_target"] = self.target.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if (state.get("xi") is None) != (self.slim is None):
            raise ValueError("slimops.pruning: checkpoint method state does not match the method (xi present/absent)")
        if self.slim is not None:
            self.slim.load_state_dict(state["xi"])
        if ("keep_target" in state) != (self.target is not None):
            raise ValueError("slimops.pruning: checkpoint method state does not match the method (keep_dims target "
                             "present/absent)")
        if self.target is not None:
            self.target.load_state_dict(state["keep_target"])
