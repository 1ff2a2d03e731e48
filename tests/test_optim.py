"""The proximal optimizers: ProxSGD, ProxAdamW, ProximalSlimming.

- ProxSGD == torch.optim.SGD followed by the reference prox on the penalised groups; ProxAdamW ==
  torch.optim.AdamW followed by the reference prox (small MLP+BN model, float64, 60 steps, several
  param groups, an LR scheduler, a parameter whose first gradient arrives at step 5).
- state_dict round trips; ProximalSlimming against a hand-written loop of docs/algorithms.md §4.
- torch.amp.GradScaler (CPU), torch.compile(fullgraph=True) of ``opt.step()``, DDP with 2 gloo processes.
"""
from __future__ import annotations

import faulthandler
import io
import os
import sys

import pytest
import torch
from torch import nn

import torch._dynamo

import slimops  # noqa: F401
from slimops.optim import ProxAdamW, ProximalSlimming, ProxSGD, batchnorm_weights
from slimops.reference import prox as ref

from _proc import run_with_deadline

pytestmark = pytest.mark.usefixtures("one_thread")


FP64 = dict(rtol=1e-9, atol=1e-11)  # trajectory-level tolerance of float64 runs (60 steps)
# Adam divides by sqrt(v): ulp-level differences of the fused formula (sqrt(v) * (1/sqrt(bc2)) vs
# sqrt(v) / sqrt(bc2), lerp vs mul-add) are amplified on parameters whose gradients are tiny.
FP64_ADAM = dict(rtol=1e-7, atol=1e-9)

N_STEPS = 60
LATE_STEP = 5


class Net(nn.Module):
    """MLP with BatchNorm; ``late`` only joins the graph from step LATE_STEP on (its state is created late)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.bn1 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc3 = nn.Linear(8, 3)
        self.late = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.05, 1.0)  # network-slimming style small scales: some get thresholded

    def forward(self, x, step):
        h = torch.relu(self.bn1(self.fc1(x)))
        h = torch.relu(self.bn2(self.fc2(h)))
        out = self.fc3(h)
        if step >= LATE_STEP:
            out = out + self.late(x)
        return out


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def batch(step, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loss_fn(net, step, sign=1.0):
    x, y = batch(step)
    return sign * nn.functional.cross_entropy(net(x, step), y)


def groups(net, pens):
    """Four param groups with different lrs and penalties; ``pens`` names the penalties of groups 1-3."""
    p1, p2, p3 = pens
    return [
        {"params": [net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias, net.fc3.bias, net.bn1.bias, net.bn2.bias]},
        {"params": [net.bn1.weight, net.bn2.weight], "lr": 0.05, "penalty": p1, "lam": 0.4, "a": 1.0},
        {"params": [net.fc3.weight], "lr": 0.08, "penalty": p2, "lam": 0.3, "a": 0.5},
        {"params": [net.late.weight], "lr": 0.12, "penalty": p3, "lam": 0.05, "a": 2.0},
    ]


def plain_groups(gs):
    """The same groups for a torch.optim optimizer (penalty keys dropped)."""
    return [{k: v for k, v in g.items() if k not in ("penalty", "lam", "a")} for g in gs]


@torch.no_grad()
def apply_reference_prox(torch_opt, pen_groups):
    """p <- prox_{lr lam R}(p) on every parameter of a penalised group that was stepped (has a grad)."""
    for g, pg in zip(torch_opt.param_groups, pen_groups):
        pen = pg.get("penalty")
        if pen is None:
            continue
        for p in g["params"]:
            if p.grad is not None:
                p.copy_(ref.prox(p, pen, g["lr"] * pg["lam"], pg["a"]))


def assert_same_params(net_a, net_b, **tol):
    tol = tol or FP64
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def assert_same_state(opt_a, opt_b, **tol):
    tol = tol or FP64
    for pa, pb in zip([p for g in opt_a.param_groups for p in g["params"]], [p for g in opt_b.param_groups for p in g["params"]]):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k in sa:
            if sa[k] is None and sb[k] is None:
                continue
            torch.testing.assert_close(torch.as_tensor(sa[k]).double(), torch.as_tensor(sb[k]).double(), **tol,
                                       msg=lambda m: f"state {k}: {m}")


# =============================================================================================
# ProxSGD == SGD + reference prox
# =============================================================================================

SGD_VARIANTS = [
    (dict(momentum=0.9, nesterov=True, weight_decay=1e-3), ("l1", "l21", "tl1"), False),
    (dict(momentum=0.9, dampening=0.2, weight_decay=0.0), ("l0", "l0_l21", "l1_2"), False),
    (dict(momentum=0.0, weight_decay=1e-3), ("tl1", None, "l1"), True),  # maximize the negated loss
]


@pytest.mark.parametrize("cfg,pens,maximize", SGD_VARIANTS, ids=["nesterov", "dampening", "plain-maximize"])
def test_prox_sgd_equals_sgd_plus_reference_prox(cfg, pens, maximize):
    net, net_ref = make_net(), make_net()
    gs, gs_ref = groups(net, pens), groups(net_ref, pens)
    opt = ProxSGD(gs, lr=0.1, maximize=maximize, **cfg)
    opt_ref = torch.optim.SGD(plain_groups(gs_ref), lr=0.1, maximize=maximize, **cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=20, gamma=0.5)
    sign = -1.0 if maximize else 1.0
    for step in range(N_STEPS):
        for o, n in ((opt, net), (opt_ref, net_ref)):
            o.zero_grad()
            loss_fn(n, step, sign).backward()
            o.step()
        apply_reference_prox(opt_ref, gs_ref)
        sched.step()
        sched_ref.step()
        if step == LATE_STEP - 1:
            assert net.late.weight in opt.param_groups[3]["params"] and net.late.weight not in opt.state
            assert torch.equal(net.late.weight, net_ref.late.weight)
        if step % 10 == 9:
            assert_same_params(net, net_ref)
    assert_same_params(net, net_ref)
    assert_same_state(opt, opt_ref)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05 * 0.5**3)
    # the penalties did something: some BN scales are exactly zero (l1 / l0 / tl1 on group 1)
    assert (net.bn1.weight == 0).any() or (net.bn2.weight == 0).any()


ADAMW_VARIANTS = [
    (dict(amsgrad=False, weight_decay=1e-2), ("l1", "l21", "tl1"), False),
    (dict(amsgrad=True, weight_decay=0.0, betas=(0.8, 0.99)), ("l0", "l0_l21", "l1_2"), False),
    (dict(amsgrad=True, weight_decay=5e-2, eps=1e-6), ("tl1", None, "l1"), True),
]


@pytest.mark.parametrize("cfg,pens,maximize", ADAMW_VARIANTS, ids=["adamw", "amsgrad", "amsgrad-maximize"])
def test_prox_adamw_equals_adamw_plus_reference_prox(cfg, pens, maximize):
    net, net_ref = make_net(), make_net()
    gs, gs_ref = groups(net, pens), groups(net_ref, pens)
    for g in gs + gs_ref:  # AdamW-sized steps and thresholds
        if "lr" in g:
            g["lr"] *= 0.1
    opt = ProxAdamW(gs, lr=1e-2, maximize=maximize, **cfg)
    opt_ref = torch.optim.AdamW(plain_groups(gs_ref), lr=1e-2, maximize=maximize, **cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=20, gamma=0.5)
    sign = -1.0 if maximize else 1.0
    for step in range(N_STEPS):
        for o, n in ((opt, net), (opt_ref, net_ref)):
            o.zero_grad()
            loss_fn(n, step, sign).backward()
            o.step()
        apply_reference_prox(opt_ref, gs_ref)
        sched.step()
        sched_ref.step()
        if step % 10 == 9:
            assert_same_params(net, net_ref, **FP64_ADAM)
    assert_same_params(net, net_ref, **FP64_ADAM)
    assert_same_state(opt, opt_ref, **FP64_ADAM)
    assert opt.state[net.late.weight]["step"].item() == N_STEPS - LATE_STEP
    assert opt.state[net.fc1.weight]["step"].item() == N_STEPS


# =============================================================================================
# state_dict round trips
# =============================================================================================


def _train(net, opt, sched, steps, slim=None):
    for step in steps:
        opt.zero_grad()
        loss_fn(net, step).backward()
        opt.step()
        if slim is not None:
            slim.step()
        sched.step()


def _roundtrip(obj_state):
    buf = io.BytesIO()
    torch.save(obj_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _make_opt(kind, net):
    pens = ("l1", "l21", "tl1")
    if kind == "sgd":
        return ProxSGD(groups(net, pens), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    gs = groups(net, pens)
    for g in gs:
        if "lr" in g:
            g["lr"] *= 0.1
    return ProxAdamW(gs, lr=1e-2, amsgrad=True)


@pytest.mark.parametrize("save_at", [3, 10])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_dict_round_trip(kind, save_at):
    total = 20
    net = make_net()
    opt = _make_opt(kind, net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    _train(net, opt, sched, range(total))

    net2 = make_net()
    opt2 = _make_opt(kind, net2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.5)
    _train(net2, opt2, sched2, range(save_at))
    saved = _roundtrip({"model": net2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()})

    net3 = make_net(seed=99)  # different init: everything must come from the checkpoint
    opt3 = _make_opt(kind, net3)
    sched3 = torch.optim.lr_scheduler.StepLR(opt3, step_size=7, gamma=0.5)
    net3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    assert opt3.param_groups[1]["penalty"] == "l1" and opt3.param_groups[2]["lam"] == 0.3
    _train(net3, opt3, sched3, range(save_at, total))
    assert_same_params(net, net3, rtol=0, atol=0)
    assert_same_state(opt, opt3, rtol=0, atol=0)


# =============================================================================================
# ProximalSlimming (docs/algorithms.md §4)
# =============================================================================================

SLIM = dict(lam=0.6, beta=2.0)


def _slim_setup(seed=0):
    net = make_net(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return net, opt, sched


def test_proximal_slimming_matches_hand_written_loop():
    net, opt, sched = _slim_setup()
    slim = ProximalSlimming.from_model(net, opt, **SLIM)
    net_r, opt_r, sched_r = _slim_setup()
    gammas = batchnorm_weights(net_r)
    assert len(gammas) == 2 and gammas[0] is net_r.bn1.weight
    xis = [g.detach().clone() for g in gammas]
    lam, beta = SLIM["lam"], SLIM["beta"]
    for step in range(30):
        for o, n in ((opt, net), (opt_r, net_r)):
            o.zero_grad()
            loss_fn(n, step).backward()
            o.step()
        slim.step()
        # docs/algorithms.md §4 written out: alpha = 1/lr, read every step (the scheduler changes lr)
        alpha = 1.0 / opt_r.param_groups[0]["lr"]
        with torch.no_grad():
            for gam, xi in zip(gammas, xis):
                gam.copy_((alpha * gam + beta * xi) / (alpha + beta))
                v = (alpha * xi + beta * gam) / (alpha + beta)
                t = lam / (alpha + beta)
                xi.copy_(torch.sign(v) * torch.clamp(v.abs() - t, min=0))
        sched.step()
        sched_r.step()
        assert_same_params(net, net_r)
        for xi, xr in zip(slim.xis, xis):
            torch.testing.assert_close(xi, xr, **FP64)
            assert torch.equal(xi == 0, xr == 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # xi is exactly sparse, with some channels kept: no threshold to pick
    zeros = sum(int((xi == 0).sum()) for xi in slim.xis)
    assert 0 < zeros < 18, zeros
    assert [torch.equal(m, xi != 0) for m, xi in zip(slim.masks(), slim.xis)] == [True, True]
    assert slim.kept_fraction() == pytest.approx(1 - zeros / 18)


def test_proximal_slimming_alpha_follows_each_group_lr():
    """Gammas in two param groups with different lrs each use alpha = 1/(their group's current lr)."""
    g1 = nn.Parameter(torch.rand(5, dtype=torch.float64))
    g2 = nn.Parameter(torch.rand(3, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [g1], "lr": 0.1}, {"params": [g2], "lr": 0.02}])
    slim = ProximalSlimming([g1, g2], opt, lam=0.3, beta=5.0, xi_init=0.4)
    for lr1, lr2 in ((0.1, 0.02), (0.05, 0.5)):
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr1, lr2
        before = [g1.detach().clone(), g2.detach().clone()], [x.clone() for x in slim.xis]
        slim.step()
        for i, lr in enumerate((lr1, lr2)):
            gam, xi = before[0][i].clone(), before[1][i].clone()
            ref.palm_slimming_([gam], [xi], 1.0 / lr, 5.0, 0.3)
            torch.testing.assert_close((g1, g2)[i].detach(), gam, **FP64)
            torch.testing.assert_close(slim.xis[i], xi, **FP64)


def test_proximal_slimming_state_dict_round_trip():
    total, save_at = 20, 10
    net, opt, sched = _slim_setup()
    slim = ProximalSlimming.from_model(net, opt, **SLIM)
    _train(net, opt, sched, range(total), slim)

    net2, opt2, sched2 = _slim_setup()
    slim2 = ProximalSlimming.from_model(net2, opt2, **SLIM)
    _train(net2, opt2, sched2, range(save_at), slim2)
    saved = _roundtrip({"model": net2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict(),
                        "slim": slim2.state_dict()})
    assert any((xi == 0).any() for xi in saved["slim"]["xis"]), "xi must be saved with its zeros"

    net3, opt3, sched3 = _slim_setup(seed=5)
    slim3 = ProximalSlimming.from_model(net3, opt3, lam=0.0, beta=0.0, xi_init=0.9)  # overwritten by the load
    net3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    slim3.load_state_dict(saved["slim"])
    assert (slim3.lam, slim3.beta, slim3.penalty) == (SLIM["lam"], SLIM["beta"], "l1")
    _train(net3, opt3, sched3, range(save_at, total), slim3)
    assert_same_params(net, net3, rtol=0, atol=0)
    for a, b in zip(slim.xis, slim3.xis):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# =============================================================================================
# torch.amp.GradScaler
# =============================================================================================


def _fp32_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _amp_opt(kind, net):
    gs = [{"params": [net[0].weight, net[0].bias, net[3].weight, net[3].bias, net[1].bias]},
          {"params": [net[1].weight], "penalty": "l1", "lam": 0.1}]
    if kind == "sgd":
        return ProxSGD(gs, lr=0.1, momentum=0.9)
    if kind == "sgd-dampening":
        return ProxSGD(gs, lr=0.1, momentum=0.9, dampening=0.3)
    return ProxAdamW(gs, lr=1e-2, amsgrad=True)


def _snapshot(net, opt):
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters() if p in opt.state}
    return [p.detach().clone() for p in net.parameters()], state


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-unscale", "scaler.unscale_"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_grad_scaler_unscales_and_skips_inf_steps(kind, unscale_first):
    net, net_ref = _fp32_net(), _fp32_net()
    opt, opt_ref = _amp_opt(kind, net), _amp_opt(kind, net_ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    assert scaler.is_enabled()
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    for step in range(4):
        opt.zero_grad()
        opt_ref.zero_grad()
        scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
        nn.functional.cross_entropy(net_ref(x), y).backward()
        if step == 2:  # an overflow: the whole step is skipped and the scale backs off
            net[0].weight.grad[0, 0] = float("inf")
            before = _snapshot(net, opt)
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        if step == 2:
            after = _snapshot(net, opt)
            for a, b in zip(before[0], after[0]):
                assert torch.equal(a, b)
            for pid, st in before[1].items():
                for k, v in st.items():
                    assert torch.equal(v, after[1][pid][k]), k
            assert scaler.get_scale() == 2.0**9
            with torch.no_grad():  # keep the reference in sync (its step 2 is skipped too)
                for p, q in zip(net.parameters(), net_ref.parameters()):
                    q.copy_(p)
            continue
        opt_ref.step()
        # power-of-two scales are exact: the scaled run equals the unscaled one
        for p, q in zip(net.parameters(), net_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if kind == "adamw":
        assert opt.state[net[0].weight]["step"].item() == 3


@pytest.mark.parametrize("kind", ["sgd", "sgd-dampening", "adamw"])
def test_skipped_first_step_then_scaled_step(kind):
    """The attribute contract of `_step_supports_amp_scaling` optimizers, set by hand: an overflow on the
    very first step (common with GradScaler's large initial scale) must leave no half-made state behind
    (e.g. momentum buffers that were allocated but never set to the gradient)."""
    torch.manual_seed(0)
    net, net_ref = _fp32_net(), _fp32_net()
    with torch.no_grad():  # wide enough that uninitialised memory would not happen to be zeros
        net[0].weight.normal_()
        net_ref[0].weight.copy_(net[0].weight)
    opt, opt_ref = _amp_opt(kind, net), _amp_opt(kind, net_ref)
    x = torch.randn(8, 6)
    (8 * net(x).sum()).backward()
    net_ref(x).sum().backward()
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    before = _snapshot(net, opt)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before[0], net.parameters()))
    if kind == "adamw":
        assert all(opt.state[p]["step"].item() == 0 for p in net.parameters())
    else:
        assert not any("momentum_buffer" in opt.state[p] for p in net.parameters())
    opt.found_inf = torch.tensor(0.0)
    for _ in range(2):
        opt.step()
        opt_ref.step()
        for p, q in zip(net.parameters(), net_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# =============================================================================================
# torch.compile
# =============================================================================================

@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_compiled_optimizer_step_fullgraph_matches_eager(kind):
    """``opt.step()`` (after an eager backward) compiles without a graph break and matches eager exactly;
    the first compiled step also creates the optimizer state."""
    torch._dynamo.reset()
    net, net_ref = _fp32_net(), _fp32_net()
    if kind == "sgd":
        make = lambda n: ProxSGD([{"params": [n[0].weight, n[3].weight, n[0].bias, n[3].bias, n[1].bias]},  # noqa: E731
                                  {"params": [n[1].weight], "penalty": "l1", "lam": 0.2}],
                                 lr=0.1, momentum=0.9, nesterov=True)
    else:
        make = lambda n: ProxAdamW([{"params": [n[0].weight, n[3].weight, n[0].bias, n[3].bias, n[1].bias]},  # noqa: E731
                                    {"params": [n[1].weight], "penalty": "tl1", "lam": 0.5}], lr=0.05)
    opt, opt_ref = make(net), make(net_ref)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def compiled_step():
        opt.step()

    x = torch.randn(16, 6)
    for _ in range(3):
        for o, n in ((opt, net), (opt_ref, net_ref)):
            o.zero_grad()
            n(x).pow(2).mean().backward()  # eager backward
        compiled_step()
        opt_ref.step()
        for p, q in zip(net.parameters(), net_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch._dynamo.reset()


# =============================================================================================
# DDP: 2 gloo processes == 1 process on the same global batch
# =============================================================================================

DDP_STEPS = 5


def _ddp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _ddp_opt(model):
    return ProxSGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3, penalty="l1", lam=0.05)


def _global_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _ddp_worker(out_file):
    """One torchrun worker (rank, world size and rendezvous from the environment torchrun sets)."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # A hang anywhere (not only in a collective) prints every thread's stack and exits, well before the test's
    # deadline, so a CI failure says where it stuck.
    faulthandler.dump_traceback_later(120, exit=True)
    # a dead peer turns into an error after 60 s rather than gloo's default 30-minute wait
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = nn.parallel.DistributedDataParallel(_ddp_model())
        opt = _ddp_opt(model)
        for step in range(DDP_STEPS):
            x, y = _global_batch(step)
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()  # DDP averages the grads over ranks
            opt.step()
        if rank == 0:
            torch.save([p.detach() for p in model.module.parameters()], out_file)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done, and the result is on disk: leave without gloo's teardown, which holds nothing the test needs. It once
    # deadlocked here (rank 0's gloo thread blocked on a mutex after rank 1 had exited), and a CI run on 2026-12-05
    # hung silently past the 180 s deadline without the error a stuck collective gives after 60 s — which points
    # at the teardown again.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_processes_match_one_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # The workers run this file as a script under torchrun, in their own process group with a deadline (not
    # mp.spawn(join=True), which once hung for 24 minutes on a gloo shutdown deadlock); see tests/_proc.py.
    out_file = tmp_path / "params.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = run_with_deadline([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out_file)], timeout=180, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ddp_params = torch.load(out_file, weights_only=True)
    model = _ddp_model()
    opt = _ddp_opt(model)
    for step in range(DDP_STEPS):
        x, y = _global_batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), ddp_params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    assert any((p == 0).any() for p in model.parameters()), "l1 prox should zero some weights"


if __name__ == "__main__":  # a torchrun worker of test_ddp_two_processes_match_one_process
    _ddp_worker(sys.argv[1])
