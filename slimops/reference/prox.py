"""Readable pure-PyTorch twins of the ``prox`` family: the test oracle and the fallback backend.

Every function here mirrors one ``torch.ops.slimops`` op of the same name (schemas in
``csrc/registration.cpp``). The maths is docs/algorithms.md §1-§5; low-precision storage is computed in
float32 (float64 stays float64), exactly as the kernels do.

Convention: ``prox_{lam R}(y) = argmin_x 1/2 (x - y)^2 + lam R(x)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

# The names each kind of op takes, from the one penalty table (slimops.penalties).
from slimops.penalties import GRAD as GRAD_PENALTIES  # noqa: E402
from slimops.penalties import GROUP as GROUP_PENALTIES  # noqa: E402
from slimops.penalties import PROX as PROX_PENALTIES  # noqa: E402
from slimops.penalties import STEP as STEP_PENALTIES  # noqa: E402


def _acc(t: Tensor) -> Tensor:
    """Upcast to the accumulation dtype: float64 stays, everything else computes in float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


def tl1_threshold(lam: float, a: float) -> float:
    """Zero threshold of the transformed-l1 prox (Zhang & Xin)."""
    if lam <= a * a / (2.0 * (a + 1.0)):
        return lam * (a + 1.0) / a
    return math.sqrt(2.0 * lam * (a + 1.0)) - a / 2.0


def half_threshold(lam: float) -> float:
    """Zero threshold of half thresholding (Xu et al.) in the 1/2-convention: (3/2) lam^{2/3}."""
    return 1.5 * lam ** (2.0 / 3.0)


def zero_threshold(penalty: str, lam: float, a: float) -> float:
    """|y| <= threshold maps to 0 under the elementwise part of the prox."""
    if penalty == "l1":
        return lam
    if penalty in ("l0", "l0_l21"):
        return math.sqrt(2.0 * lam)
    if penalty == "tl1":
        return tl1_threshold(lam, a)
    if penalty == "l1_2":
        return half_threshold(lam)
    return 0.0


def _group_view(y: Tensor) -> Tensor:
    """Groups are slices along dim 0: one row per group (a 0-d tensor is one group)."""
    # explicit row length: reshape(rows, -1) is ambiguous for zero-size tensors such as (0, 3)
    return y.reshape(1, -1) if y.dim() == 0 else y.reshape(y.shape[0], math.prod(y.shape[1:]))


def _elementwise(y: Tensor, penalty: str, lam: float, a: float) -> Tensor:
    t = zero_threshold(penalty, lam, a)
    ay = y.abs()
    if penalty == "l1":
        return torch.sign(y) * torch.clamp(ay - lam, min=0)
    if penalty in ("l0", "l0_l21"):
        return torch.where(ay <= t, torch.zeros_like(y), y)  # NaN stays NaN
    if penalty == "tl1":
        s = a + ay
        c = torch.clamp(1 - 27 * lam * a * (a + 1) / (2 * s**3), -1, 1)
        phi = torch.acos(c)
        x = torch.sign(y) * (2.0 / 3.0 * s * torch.cos(phi / 3) - 2 * a / 3 + ay / 3)
        return torch.where(ay <= t, torch.zeros_like(y), x)
    if penalty == "l1_2":
        r = torch.clamp(ay / 3, min=1e-30)
        c = torch.clamp(lam / 4 * r ** (-1.5), max=1)
        phi = torch.acos(c)
        x = 2.0 / 3.0 * y * (1 + torch.cos(2 * math.pi / 3 - 2.0 / 3.0 * phi))
        return torch.where(ay <= t, torch.zeros_like(y), x)
    return y  # l21: the group part follows


def _group_threshold(penalty: str, lam: float, a: float) -> float:
    return lam * a if penalty == "l0_l21" else lam


def _block_soft(z: Tensor, t: float) -> Tensor:
    g = _group_view(z)
    norm = g.norm(dim=1, keepdim=True)
    scale = torch.where(norm > 0, torch.clamp(1 - t / norm.clamp_min(1e-300), min=0), torch.zeros_like(norm))
    return (g * scale).reshape(z.shape)


def prox_acc(y: Tensor, penalty: str, lam: float, a: float = 1.0) -> Tensor:
    """prox_{lam R}(y) computed in y's own (accumulation) dtype."""
    z = _elementwise(y, penalty, lam, a)
    if penalty in GROUP_PENALTIES:
        # l0_l21: hard threshold at sqrt(2 lam) first, then the block soft threshold (lam * mu, mu = a)
        # of the survivors.
        z = _block_soft(z, _group_threshold(penalty, lam, a))
    return z


def prox(x: Tensor, penalty: str, lam: float, a: float = 1.0) -> Tensor:
    """prox_{lam R}(x) (docs/algorithms.md §1), returned in x's dtype."""
    return prox_acc(_acc(x), penalty, lam, a).to(x.dtype)


def prox_backward(grad: Tensor, x: Tensor, penalty: str, lam: float, a: float = 1.0) -> Tensor:
    """Vector-Jacobian product of ``prox`` at x.

    Elementwise parts follow the implicit-function rule dx/dy = 1 / (1 + lam R''(x)); the block soft
    threshold z -> (1 - t/||z||) z has J^T g = (1 - t/n) g + t (z.g) z / n^3 for n = ||z|| > t, else 0.
    """
    y, g = _acc(x), _acc(grad)
    t = zero_threshold(penalty, lam, a)
    z = _elementwise(y, penalty, lam, a)
    if penalty in ("l1", "l0", "l0_l21"):
        d = (y.abs() > t).to(y.dtype)
    elif penalty == "tl1":
        d = 1 / (1 - 2 * lam * a * (a + 1) / (a + z.abs()) ** 3)
        d = torch.where(z != 0, d, torch.zeros_like(d))
    elif penalty == "l1_2":
        az = z.abs().clamp_min(1e-30)
        d = torch.where(z != 0, 1 / (1 - lam / (4 * az**1.5)), torch.zeros_like(z))
    else:
        d = torch.ones_like(y)
    if penalty in GROUP_PENALTIES:
        gt = _group_threshold(penalty, lam, a)
        zg, gg = _group_view(z), _group_view(g)
        n = zg.norm(dim=1, keepdim=True)
        safe = n.clamp_min(1e-300)
        dot = (zg * gg).sum(dim=1, keepdim=True)
        out = (1 - gt / safe) * gg + gt * dot * zg / safe**3
        g = torch.where(n > gt, out, torch.zeros_like(out)).reshape(y.shape)
    return (g * d).to(x.dtype)


def _skip(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _unscale(g: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    # the scale is one element, whatever its shape ((), (1,)): it must not broadcast a 0-d gradient up
    # in g's dtype: a float64 scale must not promote a 0-d float32 gradient (type promotion of two 0-d tensors)
    return g / grad_scale.reshape(()).to(g.dtype) if grad_scale is not None else g


def prox_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_momentum: bool,
    penalty: str,
    lam: float,
    a: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """torch.optim.SGD's update, then ``p <- prox_{lr lam R}(p)``; in place."""
    if _skip(found_inf):
        return
    for i, p in enumerate(params):
        w = _acc(p)
        g = _unscale(_acc(grads[i]), grad_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = momentum_buffers[i]
            b = g.clone() if init_momentum else _acc(buf) * momentum + (1 - dampening) * g
            buf.copy_(b)
            b = _acc(buf)  # the stored (possibly rounded) buffer is what SGD uses next
            g = g + momentum * b if nesterov else b
        w = w - lr * g
        if penalty != "none":
            w = prox_acc(w, penalty, lr * lam, a)
        p.copy_(w)


def prox_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    penalty: str,
    lam: float,
    a: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """torch.optim.AdamW's update, then ``p <- prox_{lr lam R}(p)``; in place; steps += 1."""
    if _skip(found_inf):
        return
    for i, p in enumerate(params):
        state_steps[i].add_(1)
        step = float(state_steps[i].item())
        w = _acc(p)
        g = _unscale(_acc(grads[i]), grad_scale)
        if maximize:
            g = -g
        w = w * (1 - lr * weight_decay)
        m = _acc(exp_avgs[i]).lerp(g, 1 - beta1)
        v = _acc(exp_avg_sqs[i]) * beta2 + (1 - beta2) * g * g
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        if amsgrad:
            vmax = torch.maximum(_acc(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(vmax)
            v = vmax
        denom = v.sqrt() / math.sqrt(bc2) + eps
        w = w - (lr / bc1) * m / denom
        if penalty != "none":
            w = prox_acc(w, penalty, lr * lam, a)
        p.copy_(w)


def palm_slimming_(
    gammas: Sequence[Tensor],
    xis: Sequence[Tensor],
    alpha: float,
    beta: float,
    lam: float,
    penalty: str = "l1",
    a: float = 1.0,
) -> None:
    """Proximal network slimming (docs/algorithms.md §4), the gamma/xi half of the step, in place."""
    for gam, xi in zip(gammas, xis):
        g, x = _acc(gam), _acc(xi)
        g_new = (alpha * g + beta * x) / (alpha + beta)
        x_new = prox_acc((alpha * x + beta * g_new) / (alpha + beta), penalty, lam / (alpha + beta), a)
        gam.copy_(g_new)
        xi.copy_(x_new)


def penalty_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    penalty: str,
    s: float,
    a: float = 1.0,
    eps: float = 1e-8,
) -> None:
    """grads += s * dR/dp (docs/algorithms.md §2-§3 and the weighted l21 of §5), in place."""
    for g, p in zip(grads, params):
        w = _acc(p)
        sg = torch.sign(w)
        if penalty == "l1":
            d = sg
        elif penalty == "tl1":
            d = a * (a + 1) * sg / (a + w.abs()) ** 2
        elif penalty == "lp":
            d = a * sg / w.abs().clamp_min(eps) ** (1 - a)
        else:  # l21: sqrt(n_g) w_g / ||w_g|| (0 for an all-zero group)
            wg = _group_view(w)
            n = wg.norm(dim=1, keepdim=True)
            d = torch.where(n > 0, wg / n.clamp_min(1e-300), torch.zeros_like(wg))
            d = (d * math.sqrt(wg.shape[1])).reshape(w.shape)
        g.copy_(_acc(g) + s * d)


def split_step_(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    us: Sequence[Tensor],
    lr: float,
    beta: float,
    penalty: str,
    lam: float,
    a: float = 1.0,
) -> None:
    """Variable splitting (docs/algorithms.md §5): u <- prox_{(lam/beta) R}(w); w <- w - lr g - lr beta (w - u)."""
    for w_t, g_t, u_t in zip(weights, grads, us):
        w = _acc(w_t)
        u = prox_acc(w, penalty, lam / beta, a)
        u_t.copy_(u)
        w_t.copy_(w - lr * _acc(g_t) - lr * beta * (w - u))
