"""The ``prox`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend shares
(the C++ ones of csrc/include/slimops/prox_checks.h, with their messages), the fake kernels, the autograd of
``prox`` (its backward is ``prox_backward``), and the clear error for sparse tensors. The maths and the public
functions: :mod:`slimops.ops.prox`."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.opdefs._checks import (FLOATS, check_amp, check_list, check_no_overlap, check_params, check_penalty,
                                    fail, real, reals)
from slimops.penalties import GRAD as GRAD_PENALTIES, PROX as PROX_PENALTIES, STEP as STEP_PENALTIES

__all__ = ["DEFS", "check_prox_input", "check_prox_backward_inputs", "validate_prox_sgd", "validate_prox_adamw",
           "validate_palm_slimming", "validate_penalty_grad", "validate_split_step"]


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



# The scalar checks below are the C++ ones of csrc/include/slimops/prox_checks.h, with their messages: NaN fails
# every one of them (a NaN learning rate would silently turn every parameter into NaN).


def validate_prox_sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
                       init_momentum, penalty, lam, a, grad_scale=None, found_inf=None):
    op = "prox_sgd_"
    check_penalty(op, penalty, STEP_PENALTIES, lam, a)
    v = reals(op, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if not v["lr"] >= 0:
        fail(op, f"lr must be >= 0, got {v['lr']}")
    if not v["momentum"] >= 0:
        fail(op, f"momentum must be >= 0, got {v['momentum']}")
    if nesterov and (v["momentum"] <= 0 or v["dampening"] != 0):
        fail(op, "nesterov needs momentum > 0 and dampening = 0")
    check_params(op, "params", params)
    check_list(op, "grads", grads, params, "params", False)
    if v["momentum"] != 0:
        check_list(op, "momentum_buffers", momentum_buffers, params, "params", True)
    check_amp(op, "grad_scale", grad_scale, params)
    check_amp(op, "found_inf", found_inf, params)
    check_no_overlap(op, {"params": params, "momentum_buffers": momentum_buffers if v["momentum"] != 0 else []},
                     {"grads": grads, "grad_scale": [grad_scale], "found_inf": [found_inf]})


def validate_prox_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                         weight_decay, amsgrad, maximize, penalty, lam, a, grad_scale=None, found_inf=None):
    op = "prox_adamw_"
    check_penalty(op, penalty, STEP_PENALTIES, lam, a)
    v = reals(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if not v["lr"] >= 0:
        fail(op, f"lr must be >= 0, got {v['lr']}")
    for name in ("beta1", "beta2"):
        if not 0 <= v[name] < 1:
            fail(op, f"{name} must be in [0, 1), got {v[name]}")
    if not v["eps"] >= 0:
        fail(op, f"eps must be >= 0, got {v['eps']}")
    check_params(op, "params", params)
    check_list(op, "grads", grads, params, "params", False)
    check_list(op, "exp_avgs", exp_avgs, params, "params", True)
    check_list(op, "exp_avg_sqs", exp_avg_sqs, params, "params", True)
    if amsgrad:
        check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, "params", True)
    if len(state_steps) != len(params):
        fail(op, f"state_steps has {len(state_steps)} tensors but params has {len(params)}")
    for i, (st, p) in enumerate(zip(state_steps, params)):
        if not isinstance(st, Tensor) or st.numel() != 1 or st.device != p.device:
            fail(op, f"state_steps[{i}] must be a one-element tensor on its parameter's device")
        if st.dtype != torch.float32:
            fail(op, f"state_steps[{i}] has dtype {st.dtype}; expected float32", TypeError)
    check_amp(op, "grad_scale", grad_scale, params)
    check_amp(op, "found_inf", found_inf, params)
    check_no_overlap(op, {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                          "max_exp_avg_sqs": max_exp_avg_sqs if amsgrad else [], "state_steps": state_steps},
                     {"grads": grads, "grad_scale": [grad_scale], "found_inf": [found_inf]})


def validate_palm_slimming(gammas, xis, alpha, beta, lam, penalty="l1", a=1.0):
    op = "palm_slimming_"
    check_penalty(op, penalty, PROX_PENALTIES, lam, a)
    v = reals(op, alpha=alpha, beta=beta)
    if not (v["alpha"] > 0 and math.isfinite(v["alpha"])):
        fail(op, f"alpha (= 1/lr) must be > 0, got {v['alpha']}")
    if not (v["beta"] >= 0 and math.isfinite(v["beta"])):
        fail(op, f"beta must be >= 0, got {v['beta']}")
    check_params(op, "gammas", gammas)
    check_list(op, "xis", xis, gammas, "gammas", True)
    check_no_overlap(op, {"gammas": gammas, "xis": xis}, {})


def validate_penalty_grad(grads, params, penalty, s, a=1.0, eps=1e-8):
    op = "penalty_grad_"
    check_penalty(op, penalty, GRAD_PENALTIES, s, a, lam_name="s")
    eps = real(op, "eps", eps)
    if not eps > 0:
        fail(op, f"eps must be > 0, got {eps}")
    check_params(op, "grads", grads)
    check_list(op, "params", params, grads, "grads", False)
    check_no_overlap(op, {"grads": grads}, {"params": params})


def validate_split_step(weights, grads, us, lr, beta, penalty, lam, a=1.0):
    op = "split_step_"
    check_penalty(op, penalty, PROX_PENALTIES, lam, a)
    v = reals(op, lr=lr, beta=beta)
    if not v["lr"] >= 0:
        fail(op, f"lr must be >= 0, got {v['lr']}")
    if not (v["beta"] > 0 and math.isfinite(v["beta"])):
        fail(op, f"beta must be > 0, got {v['beta']}")
    check_params(op, "weights", weights)
    check_list(op, "grads", grads, weights, "weights", False)
    check_list(op, "us", us, weights, "weights", True)
    check_no_overlap(op, {"weights": weights, "us": us}, {"grads": grads})


# ---- fake kernels -----------------------------------------------------------------------------------------
# They check the same metadata as the C++ kernels: they also run for real calls whose tensors mix a device with
# 'meta' (the dispatcher picks the Meta kernel then), which must fail loudly instead of returning nothing.


def _prox_fake(x, penalty, lam, a=1.0):
    check_prox_input("prox", "x", x)
    check_penalty("prox", penalty, PROX_PENALTIES, lam, a)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _prox_backward_fake(grad, x, penalty, lam, a=1.0):
    check_prox_backward_inputs(grad, x)
    check_penalty("prox_backward", penalty, PROX_PENALTIES, lam, a)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _in_place_fake(validate):
    """The fake of an in-place list op: the checks, then nothing (it only mutates its inputs)."""
    def _fake(*args, **kwargs):
        validate(*args, **kwargs)
        return None

    return _fake


# ---- autograd of prox: the backward is prox_backward of the same backend ----------------------------------


def _prox_setup(ctx, inputs, output):
    x, penalty, lam, a = inputs
    ctx.save_for_backward(x)
    ctx.args = (penalty, lam, a)


def _make_prox_backward(backward_op):
    def _backward(ctx, grad):
        (x,) = ctx.saved_tensors
        penalty, lam, a = ctx.args
        return backward_op(grad.contiguous(), x, penalty, lam, a), None, None, None

    return _backward


VALIDATORS = {
    "prox_sgd_": validate_prox_sgd,
    "prox_adamw_": validate_prox_adamw,
    "palm_slimming_": validate_palm_slimming,
    "penalty_grad_": validate_penalty_grad,
    "split_step_": validate_split_step,
}

DEFS = (
    OpDef("prox", _prox_fake, _prox_setup, _make_prox_backward),
    OpDef("prox_backward", _prox_backward_fake),
    *(OpDef(name, _in_place_fake(validate)) for name, validate in VALIDATORS.items()),
)

wire(DEFS, "slimops")


# Sparse tensors dispatch to the Sparse* keys, where the C++ library registers nothing: give those calls the same
# clear error as the dense checks instead of the dispatcher's "Could not run ... 'SparseCPU'".
def _sparse_error(op, validate):
    def _sparse(*args, **kwargs):
        validate(*args, **kwargs)  # raises: some tensor is not strided
        fail(op, "sparse tensors are not supported")

    return _sparse


_sparse_lib = torch.library.Library("slimops", "IMPL")  # the registrations live as long as the module
for _name, _validate in {**VALIDATORS,
                         "prox": lambda x, *rest: check_prox_input("prox", "x", x),
                         "prox_backward": lambda grad, x, *rest: check_prox_backward_inputs(grad, x)}.items():
    for _key in ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA"):
        _sparse_lib.impl(_name, _sparse_error(_name, _validate), _key)
