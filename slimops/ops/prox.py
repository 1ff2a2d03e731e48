"""Fused proximal updates: the ``prox`` op family (docs/algorithms.md §1-§5).

Convention: ``prox_{lam R}(y) = argmin_x 1/2 (x - y)^2 + lam R(x)``, with R chosen by ``penalty``:

============ ========================================== ==============================================
``penalty``  R(x)                                       prox_{lam R}(y)
============ ========================================== ==============================================
``l1``       ||x||_1                                    sign(y) max(|y| - lam, 0)            (soft)
``l0``       ||x||_0                                    y if |y| > sqrt(2 lam) else 0        (hard)
``tl1``      sum (a+1)|x| / (a+|x|)   (Zhang & Xin)     closed-form cubic root, zero below its threshold
``l1_2``     sum |x|^{1/2}            (Xu et al.)       half thresholding, zero for |y| <= (3/2) lam^{2/3}
``l21``      sum_g ||x_g||_2  (g: slices along dim 0)   max(0, 1 - lam/||y_g||) y_g          (block soft)
``l0_l21``   ||x||_0 + a sum_g ||x_g||_2                hard threshold at sqrt(2 lam), then block soft
                                                        threshold at lam*a of the survivors
============ ========================================== ==============================================

``l0_l21`` is the composition ``prox_{lam a l21} o prox_{lam l0}`` named in docs/algorithms.md §1 (hard
threshold first, then the block soft threshold of the survivors). It is the exact prox of
``lam (||x||_0 + a sum_g ||x_g||_2)`` when ``a = 0``; for ``a > 0`` it is that splitting, not the joint
argmin (which keeps the top-k entries of a group for the best k).

The fused optimizer ops update every tensor of a list in one pass (one kernel launch per list on a GPU
for every penalty; group penalties use a row kernel that reads each group twice, for its norm and
for the update), with fp32 math for fp32/bf16/fp16 storage. All take ``backend=`` (see ``slimops._backend``).

Papers: Liu et al. 2017 (network slimming); Bui et al. (nonconvex network slimming; proximal network
slimming 2023; sparse group regularization 2021); Xue & Xin 2019 (relaxed variable splitting, RVSM); Zhang &
Xin (transformed l1); Xu et al. (l1/2 half thresholding).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from slimops import _backend
from slimops.opdefs import _checks, prox as _defs  # importing opdefs.prox registers fakes and autograd
from slimops.reference import prox as ref

__all__ = [
    "prox",
    "prox_backward",
    "prox_sgd_",
    "prox_adamw_",
    "palm_slimming_",
    "penalty_grad_",
    "split_step_",
    "PROX_PENALTIES",
    "STEP_PENALTIES",
    "GRAD_PENALTIES",
]

PROX_PENALTIES = ref.PROX_PENALTIES
STEP_PENALTIES = ref.STEP_PENALTIES
GRAD_PENALTIES = ref.GRAD_PENALTIES

_reals = _checks.reals  # the float arguments as floats, or a TypeError naming the op and the argument


def _device(op: str, tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if len(tensors) else torch.device("cpu")


def _pick(op: str, backend: str, device: torch.device):
    return _backend.pick(op, backend, device, ref)


def _pick_list(op: str, backend: str, tensors: Sequence[Tensor]):
    """``_pick`` for the fused list ops. An empty list has nothing to update, and the dispatcher cannot
    route a call without tensor arguments: it goes to the reference, which checks the arguments and returns."""
    b, fn = _pick(op, backend, _device(op, tensors))
    if len(tensors) == 0 and b != "reference":
        return "reference", getattr(ref, op)
    return b, fn


# ---- prox ------------------------------------------------------------------------------------


def prox(x: Tensor, penalty: str, lam: float, *, a: float = 1.0, backend: str = "auto") -> Tensor:
    """``prox_{lam R}(x)`` for the penalty R named by ``penalty`` (see the module docstring).

    ``a`` is the transformed-l1 shape parameter (``tl1``) or the group weight mu (``l0_l21``).
    ``l21`` and ``l0_l21`` groups are the slices ``x[i]`` along dim 0. Differentiable: the backward is
    ``prox_backward`` (the implicit-function derivative away from the thresholds, 0 on the zeroed set).
    """
    op = "prox"
    _defs.check_prox_input(op, "x", x)
    _checks.check_penalty(op, penalty, PROX_PENALTIES, lam, a)
    b, fn = _pick(op, backend, x.device)
    if b == "reference":
        return fn(x, penalty, lam, a)
    return fn(x, penalty, float(lam), float(a))


def prox_backward(grad: Tensor, x: Tensor, penalty: str, lam: float, *, a: float = 1.0, backend: str = "auto") -> Tensor:
    """Vector-Jacobian product of :func:`prox` at ``x``: ``(d prox / d x)^T grad``.

    Elementwise: ``dx/dy = 1 / (1 + lam R''(x))`` where the output is non-zero (implicit function theorem
    on ``x - y + lam R'(x) = 0``), 0 where the prox zeroes. Block soft threshold ``z -> (1 - t/n) z``:
    ``J^T g = (1 - t/n) g + t (z.g) z / n^3`` for ``n = ||z|| > t``, else 0.
    """
    op = "prox_backward"
    _defs.check_prox_backward_inputs(grad, x)
    _checks.check_penalty(op, penalty, PROX_PENALTIES, lam, a)
    b, fn = _pick(op, backend, x.device)
    if b == "reference":
        return fn(grad, x, penalty, lam, a)
    return fn(grad, x, penalty, float(lam), float(a))


# ---- fused optimizer steps ---------------------------------------------------------------------


def prox_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum: bool = False,
    penalty: str = "none",
    lam: float = 0.0,
    a: float = 1.0,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> None:
    """One fused SGD step plus proximal thresholding over a list of tensors, in place.

    Exactly ``torch.optim.SGD``'s update for each parameter p with gradient g::

        g <- g / grad_scale  (if given);  g <- -g if maximize;  g <- g + weight_decay p
        b <- g (first step, init_momentum)  or  b <- momentum b + (1 - dampening) g
        d <- g + momentum b (nesterov)  or  b
        p <- prox_{lr lam R}(p - lr d)

    ``momentum_buffers`` is empty when momentum is 0. When ``found_inf`` is given and non-zero (AMP
    overflow) nothing changes. All tensors of one call share device and dtype.
    """
    op = "prox_sgd_"
    b, fn = _pick_list(op, backend, params)
    if b == "reference":  # the C++ kernels and the Triton launchers check their own arguments
        _defs.validate_prox_sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                                maximize, init_momentum, penalty, lam, a, grad_scale, found_inf)
    r = _reals(op, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, lam=lam, a=a)
    fn(list(params), list(grads), list(momentum_buffers), r["lr"], r["momentum"], r["dampening"],
       r["weight_decay"], bool(nesterov), bool(maximize), bool(init_momentum), penalty, r["lam"], r["a"],
       grad_scale, found_inf)


def prox_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    penalty: str = "none",
    lam: float = 0.0,
    a: float = 1.0,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> None:
    """One fused AdamW step plus proximal thresholding over a list of tensors, in place.

    Exactly ``torch.optim.AdamW``: with t the incremented step count (``state_steps``, one float32
    one-element tensor per parameter on its device)::

        p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2  (v <- max(vmax, v) if amsgrad)
        p <- prox_{lr lam R}(p - lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps))

    ``max_exp_avg_sqs`` is empty unless amsgrad. Skipped entirely (steps unchanged) when ``found_inf`` != 0.
    """
    op = "prox_adamw_"
    b, fn = _pick_list(op, backend, params)
    if b == "reference":  # the C++ kernels and the Triton launchers check their own arguments
        _defs.validate_prox_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                                  weight_decay, amsgrad, maximize, penalty, lam, a, grad_scale, found_inf)
    r = _reals(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, lam=lam, a=a)
    fn(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
       r["lr"], r["beta1"], r["beta2"], r["eps"], r["weight_decay"], bool(amsgrad), bool(maximize),
       penalty, r["lam"], r["a"], grad_scale, found_inf)


def palm_slimming_(
    gammas: Sequence[Tensor],
    xis: Sequence[Tensor],
    *,
    alpha: float,
    beta: float,
    lam: float,
    penalty: str = "l1",
    a: float = 1.0,
    backend: str = "auto",
) -> None:
    """The gamma/xi update of proximal network slimming (Bui, Xue, Park, Qi, Xin 2023), in place.

    After an ordinary SGD step produced gamma~ (alpha = 1/lr)::

        gamma <- (alpha gamma~ + beta xi) / (alpha + beta)
        xi    <- prox_{lam/(alpha+beta) R}((alpha xi + beta gamma) / (alpha + beta))

    R = l1 (soft threshold) in the paper; any prox penalty is accepted. xi is exactly sparse.
    """
    op = "palm_slimming_"
    b, fn = _pick_list(op, backend, gammas)
    if b == "reference":  # the C++ kernels and the Triton launchers check their own arguments
        _defs.validate_palm_slimming(gammas, xis, alpha, beta, lam, penalty, a)
    r = _reals(op, alpha=alpha, beta=beta, lam=lam, a=a)
    fn(list(gammas), list(xis), r["alpha"], r["beta"], r["lam"], penalty, r["a"])


def penalty_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    penalty: str,
    s: float,
    a: float = 1.0,
    eps: float = 1e-8,
    backend: str = "auto",
) -> None:
    """Adds the sparsity (sub)gradient ``s dR/dp`` to every gradient, in place (docs/algorithms.md §2-§3, §5).

    ``l1``: s sign(p) (network slimming); ``tl1``: s a(a+1) sign(p)/(a+|p|)^2; ``lp``: s p sign(x)/|x|^{1-p}
    with p = a in (0, 1) and |x| clamped to >= eps; ``l21``: s sqrt(n_g) p_g/||p_g|| with groups along
    dim 0 and n_g the group size (the weighting of sparse group lasso, Bui et al. 2021).
    """
    op = "penalty_grad_"
    b, fn = _pick_list(op, backend, grads)
    if b == "reference":  # the C++ kernels and the Triton launchers check their own arguments
        _defs.validate_penalty_grad(grads, params, penalty, s, a, eps)
    r = _reals(op, s=s, a=a, eps=eps)
    fn(list(grads), list(params), penalty, r["s"], r["a"], r["eps"])


def split_step_(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    us: Sequence[Tensor],
    *,
    lr: float,
    beta: float,
    penalty: str,
    lam: float,
    a: float = 1.0,
    backend: str = "auto",
) -> None:
    """One relaxed variable-splitting step (RVSM, docs/algorithms.md §5), in place::

        u <- prox_{(lam/beta) R}(w);   w <- w - lr g - lr beta (w - u)

    The deployed (sparse) network uses u.
    """
    op = "split_step_"
    b, fn = _pick_list(op, backend, weights)
    if b == "reference":  # the C++ kernels and the Triton launchers check their own arguments
        _defs.validate_split_step(weights, grads, us, lr, beta, penalty, lam, a)
    r = _reals(op, lr=lr, beta=beta, lam=lam, a=a)
    fn(list(weights), list(grads), list(us), r["lr"], r["beta"], penalty, r["lam"], r["a"])
