"""Bad input gets a clear error that names the op and the argument, never a crash or a silent no-op
(DESIGN.md "Testing rules"): for every op of the prox family on the C++ backend and on the reference,
and for the optimizers.

A 'meta' tensor stands for "another device" (it needs no GPU): mixing it into a CPU call must fail with
the op's own message (the dispatcher routes such calls to the fake kernels, which check too).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimops.ops as P
from slimops.optim import ProxAdamW, ProximalSlimming, ProxSGD

ERRORS = (ValueError, TypeError, RuntimeError)
BACKENDS = ["cpu", "reference"]

# ---- one well-formed call per fused op: (list names in schema order, lists, scalar kwargs) ---------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def good_call(op):
    """A valid call of ``op``: (dict of list name -> 2 tensors, kwargs). The first list is the one the
    others are checked against ("its parameter")."""
    shapes = [(3,), (2, 4)]
    mk = lambda: [_t(*s) for s in shapes]  # noqa: E731
    if op == "prox_sgd_":
        return {"params": mk(), "grads": mk(), "momentum_buffers": mk()}, dict(lr=0.1, momentum=0.9, penalty="l1", lam=0.1)
    if op == "prox_adamw_":
        return ({"params": mk(), "grads": mk(), "exp_avgs": [torch.zeros(s) for s in shapes],
                 "exp_avg_sqs": [torch.zeros(s) for s in shapes], "max_exp_avg_sqs": [torch.zeros(s) for s in shapes],
                 "state_steps": [torch.tensor(0.0), torch.tensor(0.0)]},
                dict(lr=0.1, amsgrad=True, penalty="l1", lam=0.1))
    if op == "palm_slimming_":
        return {"gammas": mk(), "xis": mk()}, dict(alpha=10.0, beta=1.0, lam=0.1, penalty="l1")
    if op == "penalty_grad_":
        return {"grads": mk(), "params": mk()}, dict(penalty="l1", s=0.1)
    if op == "split_step_":
        return {"weights": mk(), "grads": mk(), "us": mk()}, dict(lr=0.1, beta=1.0, penalty="l0", lam=0.1)
    raise AssertionError(op)


LIST_OPS = ["prox_sgd_", "prox_adamw_", "palm_slimming_", "penalty_grad_", "split_step_"]
# the checked list of each op (the second one) and the name the op gives the first
SECOND = {"prox_sgd_": "grads", "prox_adamw_": "grads", "palm_slimming_": "xis", "penalty_grad_": "params",
          "split_step_": "grads"}
LAM = {"penalty_grad_": "s"}


def call(op, lists, kwargs, backend):
    getattr(P, op)(*lists.values(), **kwargs, backend=backend)


def expect(op, what):
    return pytest.raises(ERRORS, match=rf"slimops\.{op}: {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_good_call_runs(op, backend):
    lists, kw = good_call(op)
    call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_list_length_mismatch(op, backend):
    lists, kw = good_call(op)
    name = SECOND[op]
    lists[name] = lists[name][:1]
    with expect(op, rf"{name} has 1 tensors but \w+ has 2"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_dtype_mismatch(op, backend):
    lists, kw = good_call(op)
    name = SECOND[op]
    lists[name][1] = lists[name][1].double()
    with pytest.raises(TypeError, match=rf"slimops\.{op}: {name}\[1\] has dtype \S+ but its parameter has dtype"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_mixed_dtypes_in_the_parameter_list(op, backend):
    lists, kw = good_call(op)
    for name in lists:  # every list: the second tensor in float64
        if name != "state_steps":
            lists[name][1] = lists[name][1].double()
    first = next(iter(lists))
    with pytest.raises(TypeError, match=rf"slimops\.{op}: {first}\[1\] has dtype \S+ but {first}\[0\] has dtype"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_device_mismatch(op, backend):
    lists, kw = good_call(op)
    name = SECOND[op]
    before = [t.clone() for t in next(iter(lists.values()))]
    lists[name][0] = lists[name][0].to("meta")
    with expect(op, rf"{name}\[0\] is on meta but its parameter is on cpu"):
        call(op, lists, kw, backend)
    # nothing was updated
    for u, v in zip(before, next(iter(lists.values()))):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_parameter_list_spans_devices(op, backend):
    lists, kw = good_call(op)
    first = next(iter(lists))
    for name in lists:
        lists[name][1] = lists[name][1].to("meta")
    with expect(op, rf"{first}\[1\] is on meta but {first}\[0\] is on cpu"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_sparse_tensor(op, backend):
    lists, kw = good_call(op)
    name = SECOND[op]
    lists[name][1] = lists[name][1].to_sparse()
    with expect(op, rf"{name}\[1\] is sparse"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_unknown_penalty(op, backend):
    lists, kw = good_call(op)
    kw["penalty"] = "l3"
    with expect(op, r"unknown penalty 'l3' \(expected one of: "):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("lam", [-0.1, math.nan, math.inf], ids=["negative", "nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_bad_lam(op, backend, lam):
    lists, kw = good_call(op)
    name = LAM.get(op, "lam")
    kw[name] = lam
    with expect(op, rf"{name} must be finite and >= 0, got {lam}"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("a", [0.0, -1.0, math.nan])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_tl1_needs_positive_a(op, backend, a):
    lists, kw = good_call(op)
    kw.update(penalty="tl1", a=a)
    with expect(op, r"a must be > 0 for penalty 'tl1', got (-?[01](\.0)?|nan)$"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["prox_sgd_", "prox_adamw_", "palm_slimming_", "split_step_"])
def test_l0_l21_needs_nonnegative_mu(op, backend):
    lists, kw = good_call(op)
    kw.update(penalty="l0_l21", a=-0.5)
    with expect(op, r"a \(the group weight mu\) must be >= 0 for penalty 'l0_l21', got -0.5"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("p", [0.0, 1.0, 1.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lp_exponent_range(backend, p):
    lists, kw = good_call("penalty_grad_")
    kw.update(penalty="lp", a=p)
    with expect("penalty_grad_", r"a \(the exponent p\) must be in \(0, 1\) for penalty 'lp'"):
        call("penalty_grad_", lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_non_float_tensors(op, backend):
    lists, kw = good_call(op)
    for name in lists:
        if name != "state_steps":
            lists[name] = [torch.ones(t.shape, dtype=torch.int32) for t in lists[name]]
    first = next(iter(lists))
    with pytest.raises(TypeError, match=rf"slimops\.{op}: {first}(\[0\])? must be a floating-point tensor"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_non_contiguous_params(op, backend):
    lists, kw = good_call(op)
    first = next(iter(lists))
    lists[first][1] = _t(4, 2).t()
    with expect(op, rf"{first}\[1\] must be contiguous \(it is updated in place\)"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["prox_sgd_", "prox_adamw_", "split_step_"])
def test_non_contiguous_state(op, backend):
    lists, kw = good_call(op)
    name = {"prox_sgd_": "momentum_buffers", "prox_adamw_": "exp_avg_sqs", "split_step_": "us"}[op]
    lists[name][1] = torch.zeros(4, 2).t()
    with expect(op, rf"{name}\[1\] must be contiguous"):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LIST_OPS)
def test_shape_mismatch(op, backend):
    lists, kw = good_call(op)
    name = SECOND[op]
    lists[name][1] = _t(4, 2)
    with expect(op, rf"{name}\[1\] has shape .+ but its parameter has shape"):
        call(op, lists, kw, backend)


# ---- op-specific scalar arguments ---------------------------------------------------------------------

SCALAR_CASES = [
    ("prox_sgd_", dict(lr=-0.1), r".*lr"),
    ("prox_sgd_", dict(momentum=-0.5), r".*momentum"),
    ("prox_sgd_", dict(nesterov=True, dampening=0.1), r"nesterov needs momentum > 0 and dampening = 0"),
    ("prox_adamw_", dict(lr=-1.0), r".*lr"),
    ("prox_adamw_", dict(beta1=1.0), r".*beta"),
    ("prox_adamw_", dict(beta2=-0.1), r".*beta"),
    ("prox_adamw_", dict(eps=-1e-8), r".*eps"),
    ("palm_slimming_", dict(alpha=0.0), r".*alpha"),
    ("palm_slimming_", dict(alpha=math.inf), r".*alpha"),
    ("palm_slimming_", dict(beta=-1.0), r".*beta"),
    ("penalty_grad_", dict(eps=0.0), r"eps must be > 0"),
    ("split_step_", dict(lr=-0.1), r".*lr"),
    ("split_step_", dict(beta=0.0), r".*beta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,bad,what", SCALAR_CASES, ids=lambda v: v if isinstance(v, str) and not v.startswith((".", "n", "e")) else None)
def test_bad_scalar_arguments(op, bad, what, backend):
    lists, kw = good_call(op)
    kw.update(bad)
    with expect(op, what):
        call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["prox_sgd_", "prox_adamw_"])
def test_bad_amp_scalars(op, backend):
    for name, value, what in (("grad_scale", torch.ones(2), r"grad_scale must have exactly one element"),
                              ("found_inf", torch.zeros(3), r"found_inf must have exactly one element"),
                              ("grad_scale", torch.ones(1, device="meta"), r"grad_scale is on meta but params are on cpu"),
                              ("found_inf", torch.zeros((), device="meta"), r"found_inf is on meta but params are on cpu")):
        lists, kw = good_call(op)
        kw[name] = value
        with expect(op, what):
            call(op, lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_state_steps(backend):
    lists, kw = good_call("prox_adamw_")
    lists["state_steps"] = lists["state_steps"][:1]
    with expect("prox_adamw_", r"state_steps has 1 tensors but params has 2"):
        call("prox_adamw_", lists, kw, backend)
    lists, kw = good_call("prox_adamw_")
    lists["state_steps"][1] = torch.zeros(2)
    with expect("prox_adamw_", r"state_steps\[1\] must be a one-element tensor"):
        call("prox_adamw_", lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_amsgrad_needs_max_exp_avg_sqs(backend):
    lists, kw = good_call("prox_adamw_")
    lists["max_exp_avg_sqs"] = []
    with expect("prox_adamw_", r"max_exp_avg_sqs has 0 tensors but params has 2"):
        call("prox_adamw_", lists, kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_needs_buffers(backend):
    lists, kw = good_call("prox_sgd_")
    lists["momentum_buffers"] = []
    with expect("prox_sgd_", r"momentum_buffers has 0 tensors but params has 2"):
        call("prox_sgd_", lists, kw, backend)


# ---- prox / prox_backward ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_prox_bad_input(backend):
    x = _t(3, 2)
    with pytest.raises(TypeError, match=r"slimops\.prox: x must be a floating-point tensor"):
        P.prox(torch.ones(3, dtype=torch.int64), "l1", 0.1, backend=backend)
    with pytest.raises(TypeError, match=r"slimops\.prox: x must be a tensor"):
        P.prox([1.0, 2.0], "l1", 0.1, backend=backend)
    with expect("prox", r"x must be a strided \(dense\) tensor"):
        P.prox(x.to_sparse(), "l1", 0.1, backend=backend)
    with expect("prox", r"unknown penalty 'lp' \(expected one of: l1, l0, tl1, l1_2, l21, l0_l21\)"):
        P.prox(x, "lp", 0.1, backend=backend)
    for lam in (-1.0, math.nan, math.inf):
        with expect("prox", rf"lam must be finite and >= 0, got {lam}"):
            P.prox(x, "l1", lam, backend=backend)
    for a in (0.0, -2.0):
        with expect("prox", rf"a must be > 0 for penalty 'tl1', got {a}"):
            P.prox(x, "tl1", 0.1, a=a, backend=backend)
    with expect("prox", r"a \(the group weight mu\) must be >= 0"):
        P.prox(x, "l0_l21", 0.1, a=-1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prox_backward_bad_input(backend):
    x, g = _t(3, 2), _t(3, 2)
    with expect("prox_backward", r"grad has shape \(2, 3\) but x has shape \(3, 2\)"):
        P.prox_backward(_t(2, 3), x, "l1", 0.1, backend=backend)
    with expect("prox_backward", r"grad is on meta but x is on cpu"):
        P.prox_backward(g.to("meta"), x, "l1", 0.1, backend=backend)
    with pytest.raises(TypeError, match=r"slimops\.prox_backward: x must be a floating-point tensor"):
        P.prox_backward(g, torch.ones(3, 2, dtype=torch.int64), "l1", 0.1, backend=backend)
    with pytest.raises(TypeError, match=r"slimops\.prox_backward: grad must be a floating-point tensor"):
        P.prox_backward(torch.ones(3, 2, dtype=torch.int64), x, "l1", 0.1, backend=backend)
    with expect("prox_backward", r"grad must be a strided \(dense\) tensor"):
        P.prox_backward(g.to_sparse(), x, "l1", 0.1, backend=backend)
    with expect("prox_backward", r"unknown penalty 'none'"):
        P.prox_backward(g, x, "none", 0.1, backend=backend)
    with expect("prox_backward", r"lam must be finite and >= 0"):
        P.prox_backward(g, x, "l1", -0.1, backend=backend)
    with expect("prox_backward", r"a must be > 0 for penalty 'tl1'"):
        P.prox_backward(g, x, "tl1", 0.1, a=0.0, backend=backend)


def test_direct_torch_ops_calls_check_too():
    """torch.ops.slimops.* called directly (no Python wrapper): the kernels, the fakes (mixed with meta)
    and the sparse registrations still give the op's own message."""
    p, g = [_t(3)], [_t(3)]
    args = (0.1, 0.0, 0.0, 0.0, False, False, False, "l1", 0.1, 1.0)
    with expect("prox_sgd_", r"grads\[0\] is on meta"):
        torch.ops.slimops.prox_sgd_(p, [g[0].to("meta")], [], *args)
    with expect("prox_sgd_", r"grads\[0\] is sparse"):
        torch.ops.slimops.prox_sgd_(p, [g[0].to_sparse()], [], *args)
    with expect("prox", r"x must be a strided"):
        torch.ops.slimops.prox(_t(3).to_sparse(), "l1", 0.1)
    with expect("prox_backward", r"grad is on meta but x is on cpu"):
        torch.ops.slimops.prox_backward(torch.empty(3, device="meta"), _t(3), "l1", 0.1)
    with expect("palm_slimming_", r"xis\[0\] is on meta"):
        torch.ops.slimops.palm_slimming_([_t(3)], [torch.empty(3, device="meta")], 1.0, 1.0, 0.1)
    with expect("split_step_", r"us\[0\] is on meta"):
        torch.ops.slimops.split_step_([_t(3)], [_t(3)], [torch.empty(3, device="meta")], 0.1, 1.0, "l0", 0.1)
    with expect("penalty_grad_", r"params\[0\] is on meta"):
        torch.ops.slimops.penalty_grad_([_t(3)], [torch.empty(3, device="meta")], "l1", 0.1)


# ---- optimizers -----------------------------------------------------------------------------------------

OPTIMIZERS = {
    "ProxSGD": lambda params, **kw: ProxSGD(params, lr=0.1, momentum=0.9, **kw),
    "ProxAdamW": lambda params, **kw: ProxAdamW(params, lr=0.01, **kw),
}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_bad_penalty_settings(name, backend):
    make = OPTIMIZERS[name]
    w = nn.Parameter(_t(3))
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: unknown penalty 'l3'"):
        make([w], penalty="l3", backend=backend)
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: lam must be finite and >= 0, got -0.1"):
        make([w], penalty="l1", lam=-0.1, backend=backend)
    # the one penalty table's rules (slimops.penalties): also an infinite lam, and a for l0_l21
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: lam must be finite and >= 0, got inf"):
        make([w], penalty="l1", lam=float("inf"), backend=backend)
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: a \(the group weight mu\) must be >= 0"):
        make([w], penalty="l0_l21", lam=0.1, a=-1.0, backend=backend)
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: a must be > 0 for penalty 'tl1', got 0"):
        make([w], penalty="tl1", lam=0.1, a=0, backend=backend)
    # per param group, including groups added later (checked when they are added)
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: unknown penalty 'l3'"):
        make([{"params": [w], "penalty": "l3"}], backend=backend)
    opt = make([w], backend=backend)
    w2 = nn.Parameter(_t(3))
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: a must be > 0 for penalty 'tl1'"):
        opt.add_param_group({"params": [w2], "penalty": "tl1", "lam": 0.1, "a": -1.0})
    # settings edited in place after construction are checked again when the group is stepped
    opt.param_groups[0]["lam"] = -1.0
    w.grad = _t(3)
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: lam must be finite and >= 0"):
        opt.step()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_sparse_grads(name, backend):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = OPTIMIZERS[name](emb.parameters(), penalty="l1", lam=0.1, backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match=rf"slimops\.optim\.{name}: sparse gradients are not supported"):
        opt.step()
    assert torch.equal(before, emb.weight)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_bad_hyperparameters(name):
    w = [nn.Parameter(_t(3))]
    with pytest.raises(ValueError, match=rf"slimops\.optim\.{name}: invalid learning rate"):
        (ProxSGD if name == "ProxSGD" else ProxAdamW)(w, lr=-1.0)
    if name == "ProxSGD":
        with pytest.raises(ValueError, match=r"slimops\.optim\.ProxSGD: invalid momentum"):
            ProxSGD(w, lr=0.1, momentum=-0.1)
        with pytest.raises(ValueError, match=r"slimops\.optim\.ProxSGD: nesterov"):
            ProxSGD(w, lr=0.1, momentum=0.0, nesterov=True)
        with pytest.raises(ValueError, match=r"slimops\.optim\.ProxSGD: invalid weight_decay"):
            ProxSGD(w, lr=0.1, weight_decay=-1.0)
    else:
        with pytest.raises(ValueError, match=r"slimops\.optim\.ProxAdamW: invalid betas"):
            ProxAdamW(w, betas=(1.0, 0.999))
        with pytest.raises(ValueError, match=r"slimops\.optim\.ProxAdamW: invalid eps"):
            ProxAdamW(w, eps=-1.0)
        with pytest.raises(ValueError, match=r"slimops\.optim\.ProxAdamW: invalid weight_decay"):
            ProxAdamW(w, weight_decay=-1.0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_unknown_backend(name):
    w = nn.Parameter(_t(3))
    opt = OPTIMIZERS[name]([w], backend="fast")
    w.grad = _t(3)
    op = "prox_sgd_" if name == "ProxSGD" else "prox_adamw_"
    with pytest.raises(ValueError, match=rf"slimops\.{op}: unknown backend 'fast'"):
        opt.step()


def test_proximal_slimming_bad_input():
    bn = nn.BatchNorm1d(4)
    opt = torch.optim.SGD(bn.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"slimops\.optim\.ProximalSlimming: gammas is empty"):
        ProximalSlimming([], opt, lam=0.1, beta=1.0)
    with pytest.raises(ValueError, match=r"slimops\.optim\.ProximalSlimming: gammas \[0\] are not in the optimizer"):
        ProximalSlimming([nn.Parameter(torch.ones(4))], opt, lam=0.1, beta=1.0)
    with pytest.raises(ValueError, match=r"slimops\.optim\.ProximalSlimming: lam and beta must be >= 0"):
        ProximalSlimming([bn.weight], opt, lam=-0.1, beta=1.0)
    slim = ProximalSlimming([bn.weight], opt, lam=0.1, beta=1.0)
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match=r"slimops\.optim\.ProximalSlimming: lr must be > 0"):
        slim.step()
    with pytest.raises(ValueError, match=r"slimops\.optim\.ProximalSlimming: state has 2 xi tensors, expected 1"):
        slim.load_state_dict({"xis": [torch.ones(4), torch.ones(4)], "lam": 0.1, "beta": 1.0, "penalty": "l1", "a": 1.0})
    with pytest.raises(ValueError, match=r"slimops\.optim\.ProximalSlimming: xi shape \(3,\) does not match \(4,\)"):
        slim.load_state_dict({"xis": [torch.ones(3)], "lam": 0.1, "beta": 1.0, "penalty": "l1", "a": 1.0})
    opt.param_groups[0]["lr"] = 0.1
    bad = ProximalSlimming([bn.weight], opt, lam=0.1, beta=1.0, penalty="l3")
    with pytest.raises(ValueError, match=r"slimops\.palm_slimming_: unknown penalty 'l3'"):
        bad.step()
