"""Argument checks of the prox family, shared by the public ops, the fake kernels and the Triton
launchers, so that every backend fails the same way: ``slimops.<op>: <argument> ...``, ValueError (TypeError
for dtypes), like the C++ checks in csrc/include/slimops/checks.h."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from slimops.reference.prox import GRAD_PENALTIES, PROX_PENALTIES, STEP_PENALTIES

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def fail(op: str, msg: str, exc=ValueError):
    raise exc(f"slimops.{op}: {msg}")


def check_penalty(op: str, penalty: str, allowed: Sequence[str], lam: float, a: float, lam_name: str = "lam"):
    if penalty not in allowed:
        fail(op, f"unknown penalty '{penalty}' (expected one of: {', '.join(allowed)})")
    if not (math.isfinite(lam) and lam >= 0):
        fail(op, f"{lam_name} must be finite and >= 0, got {lam}")
    if penalty == "tl1" and not a > 0:
        fail(op, f"a must be > 0 for penalty 'tl1', got {a}")
    if penalty == "l0_l21" and not a >= 0:
        fail(op, f"a (the group weight mu) must be >= 0 for penalty 'l0_l21', got {a}")
    if penalty == "lp" and not 0 < a < 1:
        fail(op, f"a (the exponent p) must be in (0, 1) for penalty 'lp', got {a}")


def check_params(op: str, name: str, params: Sequence[Tensor]):
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            fail(op, f"{name}[{i}] is not a tensor", TypeError)
        if p.layout != torch.strided:
            fail(op, f"{name}[{i}] must be a strided tensor")
        if p.dtype not in FLOATS:
            fail(op, f"{name}[{i}] must be a floating-point tensor (float32, float64, bfloat16 or float16), got {p.dtype}", TypeError)
        if not p.is_contiguous():
            fail(op, f"{name}[{i}] must be contiguous (it is updated in place)")
        if p.dtype != params[0].dtype:
            fail(op, f"{name}[{i}] has dtype {p.dtype} but {name}[0] has dtype {params[0].dtype}; one call takes one dtype", TypeError)
        if p.device != params[0].device:
            fail(op, f"{name}[{i}] is on {p.device} but {name}[0] is on {params[0].device}")


def check_list(op: str, name: str, lst: Sequence[Tensor], params: Sequence[Tensor], pname: str, inplace: bool):
    if len(lst) != len(params):
        fail(op, f"{name} has {len(lst)} tensors but {pname} has {len(params)}")
    for i, (t, p) in enumerate(zip(lst, params)):
        if t.layout != torch.strided:
            fail(op, f"{name}[{i}] is sparse; sparse gradients are not supported")
        if t.device != p.device:
            fail(op, f"{name}[{i}] is on {t.device} but its parameter is on {p.device}")
        if t.dtype != p.dtype:
            fail(op, f"{name}[{i}] has dtype {t.dtype} but its parameter has dtype {p.dtype}", TypeError)
        if t.shape != p.shape:
            fail(op, f"{name}[{i}] has shape {tuple(t.shape)} but its parameter has shape {tuple(p.shape)}")
        if inplace and not t.is_contiguous():
            fail(op, f"{name}[{i}] must be contiguous (it is updated in place)")


def check_amp(op: str, name: str, t: Optional[Tensor], params: Sequence[Tensor]):
    if t is None:
        return
    if t.numel() != 1:
        fail(op, f"{name} must have exactly one element, got {t.numel()}")
    if not t.dtype.is_floating_point:
        fail(op, f"{name} must be floating, got {t.dtype}", TypeError)
    if params and t.device != params[0].device:
        fail(op, f"{name} is on {t.device} but params are on {params[0].device}")


def check_prox_input(op: str, name: str, x):
    if not isinstance(x, Tensor):
        fail(op, f"{name} must be a tensor", TypeError)
    if x.layout != torch.strided:
        fail(op, f"{name} must be a strided (dense) tensor, got layout {x.layout}")
    if x.dtype not in FLOATS:
        fail(op, f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}", TypeError)


def check_prox_backward_inputs(grad, x):
    op = "prox_backward"
    check_prox_input(op, "x", x)
    check_prox_input(op, "grad", grad)  # its dtype may differ from x's: it is converted to x's dtype
    if grad.shape != x.shape:
        fail(op, f"grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")
    if grad.device != x.device:
        fail(op, f"grad is on {grad.device} but x is on {x.device}")



def validate_prox_sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
                       init_momentum, penalty, lam, a, grad_scale=None, found_inf=None):
    op = "prox_sgd_"
    check_penalty(op, penalty, STEP_PENALTIES, lam, a)
    if lr < 0 or momentum < 0:
        fail(op, f"lr and momentum must be >= 0, got lr={lr}, momentum={momentum}")
    if nesterov and (momentum <= 0 or dampening != 0):
        fail(op, "nesterov needs momentum > 0 and dampening = 0")
    check_params(op, "params", params)
    check_list(op, "grads", grads, params, "params", False)
    if momentum != 0:
        check_list(op, "momentum_buffers", momentum_buffers, params, "params", True)
    check_amp(op, "grad_scale", grad_scale, params)
    check_amp(op, "found_inf", found_inf, params)


def validate_prox_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                         weight_decay, amsgrad, maximize, penalty, lam, a, grad_scale=None, found_inf=None):
    op = "prox_adamw_"
    check_penalty(op, penalty, STEP_PENALTIES, lam, a)
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or lr < 0 or eps < 0:
        fail(op, f"need lr >= 0, eps >= 0 and betas in [0, 1), got lr={lr}, betas=({beta1}, {beta2}), eps={eps}")
    check_params(op, "params", params)
    check_list(op, "grads", grads, params, "params", False)
    check_list(op, "exp_avgs", exp_avgs, params, "params", True)
    check_list(op, "exp_avg_sqs", exp_avg_sqs, params, "params", True)
    if amsgrad:
        check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, "params", True)
    if len(state_steps) != len(params):
        fail(op, f"state_steps has {len(state_steps)} tensors but params has {len(params)}")
    for i, (st, p) in enumerate(zip(state_steps, params)):
        if st.numel() != 1 or st.device != p.device:
            fail(op, f"state_steps[{i}] must be a one-element tensor on its parameter's device")
        if st.dtype != torch.float32:
            fail(op, f"state_steps[{i}] has dtype {st.dtype}; expected float32", TypeError)
    check_amp(op, "grad_scale", grad_scale, params)
    check_amp(op, "found_inf", found_inf, params)


def validate_palm_slimming(gammas, xis, alpha, beta, lam, penalty="l1", a=1.0):
    op = "palm_slimming_"
    check_penalty(op, penalty, PROX_PENALTIES, lam, a)
    if not (alpha > 0 and math.isfinite(alpha)) or not (beta >= 0 and math.isfinite(beta)):
        fail(op, f"need alpha (= 1/lr) > 0 and beta >= 0, got alpha={alpha}, beta={beta}")
    check_params(op, "gammas", gammas)
    check_list(op, "xis", xis, gammas, "gammas", True)


def validate_penalty_grad(grads, params, penalty, s, a=1.0, eps=1e-8):
    op = "penalty_grad_"
    check_penalty(op, penalty, GRAD_PENALTIES, s, a, lam_name="s")
    if not eps > 0:
        fail(op, f"eps must be > 0, got {eps}")
    check_params(op, "grads", grads)
    check_list(op, "params", params, grads, "grads", False)


def validate_split_step(weights, grads, us, lr, beta, penalty, lam, a=1.0):
    op = "split_step_"
    check_penalty(op, penalty, PROX_PENALTIES, lam, a)
    if lr < 0 or not (beta > 0 and math.isfinite(beta)):
        fail(op, f"need lr >= 0 and beta > 0, got lr={lr}, beta={beta}")
    check_params(op, "weights", weights)
    check_list(op, "grads", grads, weights, "weights", False)
    check_list(op, "us", us, weights, "weights", True)
