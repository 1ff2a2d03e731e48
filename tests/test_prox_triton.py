"""The Triton kernels of the prox family (slimops/triton/prox.py) against the reference twins.

Runs through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set here, before anything imports
triton). With ``TRITON_INTERPRET=0`` set explicitly and a GPU present, the same tests run the compiled
kernels on CUDA tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from slimops.reference import prox as ref  # noqa: E402
from slimops.triton import _common as _tcommon, prox as tp  # noqa: E402  (registers torch.ops.slimops_triton.*)

INTERPRETED = _tcommon.INTERPRETED
DEVICE = "cpu" if INTERPRETED else "cuda"

pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU",
)

OPS = torch.ops.slimops_triton
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (rtol, atol) per storage dtype. fp32/fp64: the kernels do the reference's arithmetic up to the order of
# operations; bf16/fp16: the same fp32 math, so at most an ulp of the storage type apart.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-13),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
PROX = ref.PROX_PENALTIES
STEP = ref.STEP_PENALTIES
# A list of awkward shapes: 0-d, one element, odd sizes, an empty tensor, rows of different lengths.
LIST_SHAPES = [(5, 7), (), (1,), (0, 3), (4, 3, 2), (2, 40)]


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _rand_list(dtype, seed, shapes=LIST_SHAPES, scale=1.0):
    return [_randn(s, dtype, seed * 101 + i, scale) for i, s in enumerate(shapes)]


def _close(actual, expected, dtype=None, what=""):
    dtype = dtype or expected.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _clone(ts):
    return [t.clone() for t in ts]


# ---- prox ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", PROX)
def test_prox_matches_reference(penalty, dtype):
    for i, shape in enumerate([(), (1,), (7,), (5, 13), (3, 4, 5), (0, 4)]):
        x = _randn(shape, dtype, 10 + i)
        for lam, a in ((0.3, 0.7), (0.02, 2.0)):
            y = OPS.prox(x, penalty, lam, a)
            assert y.shape == x.shape and y.dtype == x.dtype
            _close(y, ref.prox(x, penalty, lam, a), what=f"{penalty} {shape} lam={lam}")


@pytest.mark.parametrize("penalty", ["tl1", "l1_2"])
def test_prox_nonconvex_closed_forms_relative_error(penalty):
    # Dense inputs through the whole range, both Tl1 threshold branches (lam <= a^2/(2(a+1)) and above),
    # against the reference evaluated in float64 on the same (rounded) inputs. Just above a continuous
    # threshold the exact result is ~1e-9 and comes out of a cancellation between terms of size ~(a + |y|)
    # in every fp32 implementation (the C++ kernel's too), so the error is taken relative to
    # max(|exact|, (a + |y|) / 4) for tl1 (max(|exact|, |y| / 4) for l1_2).
    y = torch.linspace(-4, 4, 4001, dtype=torch.float64)
    for lam, a in ((0.05, 1.0), (0.8, 0.5), (0.3, 3.0)):
        for dtype, bound in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
            x = y.to(dtype).to(DEVICE)
            exact = ref.prox(x.double(), penalty, lam, a)
            got = OPS.prox(x, penalty, lam, a).double()
            keep = (x.double().abs() - ref.zero_threshold(penalty, lam, a)).abs() > 1e-6  # no ties at the threshold
            assert torch.equal((got == 0)[keep], (exact == 0)[keep])
            size = (a + x.double().abs()) if penalty == "tl1" else x.double().abs()  # the terms that cancel
            rel = ((got - exact).abs() / torch.maximum(exact.abs(), 0.25 * size))[keep].max().item()
            assert rel <= bound, f"{penalty} {dtype} lam={lam} a={a}: relative error {rel:.3g}"


def _objective(x, y, penalty, lam, a):
    ax = x.abs()
    if penalty == "l1":
        r = ax
    elif penalty == "l0":
        r = (x != 0).double()
    elif penalty == "tl1":
        r = (a + 1) * ax / (a + ax)
    else:
        r = ax.sqrt()
    return 0.5 * (x - y) ** 2 + lam * r


@pytest.mark.parametrize("penalty", ["l1", "l0", "tl1", "l1_2"])
def test_prox_is_the_argmin(penalty):
    # The closed forms against a brute-force minimisation of 1/2 (x - y)^2 + lam R(x) on a fine grid.
    lam, a = 0.4, 0.8
    y = torch.linspace(-3, 3, 61, dtype=torch.float64).to(DEVICE)
    grid = torch.linspace(-3.5, 3.5, 70001, dtype=torch.float64).to(DEVICE)
    x = OPS.prox(y, penalty, lam, a)
    best = _objective(grid[None, :], y[:, None], penalty, lam, a).min(dim=1).values
    mine = _objective(x, y, penalty, lam, a)
    assert (mine <= best + 1e-7).all(), (mine - best).max()


def test_prox_noncontiguous_and_multi_tile():
    x = _randn((40, 130), torch.float32, 3).t()  # non-contiguous, 5200 elements: two elementwise tiles
    for penalty in PROX:
        _close(OPS.prox(x, penalty, 0.2, 0.9), ref.prox(x, penalty, 0.2, 0.9), what=penalty)
    # Group tiles: many short rows (several [R, C] tiles) and long rows (the row loop runs 3 times).
    for shape in ((3000, 3), (2, 2500)):
        x = _randn(shape, torch.float32, 4, scale=0.05)
        for penalty in ("l21", "l0_l21"):
            _close(OPS.prox(x, penalty, 0.5, 0.3), ref.prox(x, penalty, 0.5, 0.3), what=f"{penalty} {shape}")


def test_prox_group_edge_cases():
    x = torch.zeros(4, 5, device=DEVICE)  # all-zero groups: scale 0, no NaN
    assert torch.equal(OPS.prox(x, "l21", 0.1), x)
    x = _randn((6, 5), torch.float32, 5)
    assert torch.equal(OPS.prox(x, "l21", 0.0), x)  # lam = 0: identity
    assert torch.equal(OPS.prox(x, "l21", 100.0), torch.zeros_like(x))  # every group below the threshold


# ---- prox_backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", PROX)
def test_prox_backward_matches_reference(penalty, dtype):
    for i, shape in enumerate([(), (1,), (9,), (5, 13), (3, 2, 4), (0, 2)]):
        x = _randn(shape, dtype, 20 + i)
        g = _randn(shape, dtype, 40 + i)
        out = OPS.prox_backward(g, x, penalty, 0.3, 0.7)
        _close(out, ref.prox_backward(g, x, penalty, 0.3, 0.7), what=f"{penalty} {shape}")


def test_prox_backward_grad_other_dtype():
    x = _randn((4, 6), torch.float32, 1)
    g = _randn((4, 6), torch.float64, 2)
    _close(OPS.prox_backward(g, x, "tl1", 0.2, 1.0), ref.prox_backward(g.float(), x, "tl1", 0.2, 1.0))


# ---- prox_sgd_ ---------------------------------------------------------------------------------------

SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, init_momentum=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False, init_momentum=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True, maximize=False, init_momentum=False),
    dict(momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True, init_momentum=True),
    dict(momentum=0.8, dampening=0.0, weight_decay=5e-2, nesterov=True, maximize=True, init_momentum=True),
]


def _run_sgd(dtype, penalty, cfg, seed, shapes=LIST_SHAPES, grad_scale=None, found_inf=None):
    params = _rand_list(dtype, seed, shapes)
    grads = _rand_list(dtype, seed + 1, shapes)
    bufs = _rand_list(dtype, seed + 2, shapes)
    args = dict(lr=0.1, penalty=penalty, lam=0.5, a=0.8, **cfg)
    p_ref, b_ref = _clone(params), _clone(bufs)
    ref.prox_sgd_(p_ref, grads, b_ref, args["lr"], cfg["momentum"], cfg["dampening"], cfg["weight_decay"],
                  cfg["nesterov"], cfg["maximize"], cfg["init_momentum"], penalty, args["lam"], args["a"],
                  grad_scale=grad_scale, found_inf=found_inf)
    OPS.prox_sgd_(params, grads, bufs, args["lr"], cfg["momentum"], cfg["dampening"], cfg["weight_decay"],
                  cfg["nesterov"], cfg["maximize"], cfg["init_momentum"], penalty, args["lam"], args["a"],
                  grad_scale, found_inf)
    return params, bufs, p_ref, b_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", STEP)
def test_prox_sgd_matches_reference(penalty, dtype):
    cfg = SGD_CONFIGS[(STEP.index(penalty) + DTYPES.index(dtype)) % len(SGD_CONFIGS)]
    params, bufs, p_ref, b_ref = _run_sgd(dtype, penalty, cfg, seed=7)
    for i in range(len(params)):
        _close(params[i], p_ref[i], what=f"param {i} {cfg}")
        if cfg["momentum"]:
            _close(bufs[i], b_ref[i], what=f"buf {i}")


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("penalty", ["l1", "l0_l21"])
def test_prox_sgd_configs(cfg, penalty):
    params, bufs, p_ref, b_ref = _run_sgd(torch.float32, penalty, cfg, seed=8)
    for i in range(len(params)):
        _close(params[i], p_ref[i], what=f"param {i}")
        if cfg["momentum"]:
            _close(bufs[i], b_ref[i], what=f"buf {i}")


@pytest.mark.parametrize("penalty", ["tl1", "l21"])
def test_prox_sgd_grad_scale_and_found_inf(penalty):
    cfg = SGD_CONFIGS[1]
    for dtype in (torch.float32, torch.bfloat16):
        gs = torch.tensor(4.0, device=DEVICE)  # 0-d
        params, bufs, p_ref, b_ref = _run_sgd(dtype, penalty, cfg, 9, grad_scale=gs,
                                              found_inf=torch.zeros((), device=DEVICE))
        for i in range(len(params)):
            _close(params[i], p_ref[i], what=f"param {i}")
            _close(bufs[i], b_ref[i], what=f"buf {i}")
    params = _rand_list(torch.float32, 10)
    before_p = _clone(params)
    bufs = _rand_list(torch.float32, 11)
    before_b = _clone(bufs)
    OPS.prox_sgd_(params, _rand_list(torch.float32, 12), bufs, 0.1, 0.9, 0.0, 0.0, False, False, False, penalty,
                  0.5, 1.0, torch.tensor([2.0], device=DEVICE), torch.tensor([1.0], device=DEVICE))
    for i in range(len(params)):
        assert torch.equal(params[i], before_p[i]) and torch.equal(bufs[i], before_b[i])


# ---- prox_adamw_ -------------------------------------------------------------------------------------

ADAM_CONFIGS = [
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=False),
    dict(beta1=0.0, beta2=0.9, eps=1e-3, weight_decay=0.1, amsgrad=True, maximize=True),
]


def _adam_state(dtype, seed, shapes=LIST_SHAPES, step0=3.0):
    params = _rand_list(dtype, seed, shapes)
    grads = _rand_list(dtype, seed + 1, shapes)
    m = _rand_list(dtype, seed + 2, shapes, scale=0.1)
    v = [t.abs() for t in _rand_list(dtype, seed + 3, shapes, scale=0.1)]
    vmax = [t * 1.5 for t in v]
    steps = [torch.tensor(step0 + i, dtype=torch.float32, device=DEVICE) for i in range(len(shapes))]
    return params, grads, m, v, vmax, steps


def _run_adam(dtype, penalty, cfg, seed, grad_scale=None, found_inf=None, shapes=LIST_SHAPES):
    params, grads, m, v, vmax, steps = _adam_state(dtype, seed, shapes)
    state_ref = [_clone(t) for t in (params, m, v, vmax, steps)]
    lr, lam, a = 0.05, 0.4, 0.7
    c = cfg
    ref.prox_adamw_(state_ref[0], grads, state_ref[1], state_ref[2], state_ref[3], state_ref[4], lr, c["beta1"],
                    c["beta2"], c["eps"], c["weight_decay"], c["amsgrad"], c["maximize"], penalty, lam, a,
                    grad_scale=grad_scale, found_inf=found_inf)
    OPS.prox_adamw_(params, grads, m, v, vmax, steps, lr, c["beta1"], c["beta2"], c["eps"], c["weight_decay"],
                    c["amsgrad"], c["maximize"], penalty, lam, a, grad_scale, found_inf)
    return (params, m, v, vmax, steps), state_ref


def _check_adam(got, exp, amsgrad, dtype):
    names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for k, name in enumerate(names):
        if k == 3 and not amsgrad:
            continue
        for i in range(len(got[k])):
            _close(got[k][i], exp[k][i], dtype, what=f"{name} {i}")
    for s, s_ref in zip(got[4], exp[4]):
        assert torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", STEP)
def test_prox_adamw_matches_reference(penalty, dtype):
    cfg = ADAM_CONFIGS[(STEP.index(penalty) + DTYPES.index(dtype)) % len(ADAM_CONFIGS)]
    got, exp = _run_adam(dtype, penalty, cfg, seed=30)
    _check_adam(got, exp, cfg["amsgrad"], dtype)


@pytest.mark.parametrize("cfg", ADAM_CONFIGS)
def test_prox_adamw_configs(cfg):
    got, exp = _run_adam(torch.float32, "l21", cfg, seed=31)
    _check_adam(got, exp, cfg["amsgrad"], torch.float32)


def test_prox_adamw_grad_scale_and_found_inf():
    cfg = ADAM_CONFIGS[1]
    for dtype in (torch.float32, torch.float16):
        # (0-d AMP scalars, as GradScaler makes them: the reference cannot broadcast shape (1,) into 0-d params)
        got, exp = _run_adam(dtype, "l1", cfg, 32, grad_scale=torch.tensor(0.5, device=DEVICE),
                             found_inf=torch.tensor(0.0, device=DEVICE))
        _check_adam(got, exp, True, dtype)
    params, grads, m, v, vmax, steps = _adam_state(torch.float32, 33)
    before = [_clone(t) for t in (params, m, v, vmax, steps)]
    OPS.prox_adamw_(params, grads, m, v, vmax, steps, 0.1, 0.9, 0.99, 1e-8, 0.1, True, False, "l0_l21", 0.3, 0.5,
                    torch.tensor(8.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))
    for k, ts in enumerate((params, m, v, vmax, steps)):
        for t, t0 in zip(ts, before[k]):
            assert torch.equal(t, t0)


def test_prox_adamw_repeated_steps():
    # Several steps in a row, with the step counts growing, against the reference.
    cfg = ADAM_CONFIGS[0]
    shapes = [(6, 5), (11,)]
    state = _adam_state(torch.float32, 34, shapes, step0=0.0)
    state_ref = [_clone(t) for t in state]
    for it in range(3):
        grads = _rand_list(torch.float32, 40 + it, shapes)
        for s, args in ((state, OPS.prox_adamw_), (state_ref, ref.prox_adamw_)):
            args(s[0], grads, s[2], s[3], s[4], s[5], 0.01, cfg["beta1"], cfg["beta2"], cfg["eps"],
                 cfg["weight_decay"], False, False, "tl1", 0.5, 1.0)
    for k in (0, 2, 3, 5):
        for t, t_ref in zip(state[k], state_ref[k]):
            _close(t, t_ref, torch.float32)


# ---- palm_slimming_ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", PROX)
def test_palm_slimming_matches_reference(penalty, dtype):
    gammas = _rand_list(dtype, 50)
    xis = _rand_list(dtype, 51)
    g_ref, x_ref = _clone(gammas), _clone(xis)
    alpha, beta, lam = 10.0, 3.0, 2.5
    ref.palm_slimming_(g_ref, x_ref, alpha, beta, lam, penalty, 0.6)
    OPS.palm_slimming_(gammas, xis, alpha, beta, lam, penalty, 0.6)
    for i in range(len(gammas)):
        _close(gammas[i], g_ref[i], what=f"gamma {i}")
        _close(xis[i], x_ref[i], what=f"xi {i}")


# ---- penalty_grad_ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", ref.GRAD_PENALTIES)
def test_penalty_grad_matches_reference(penalty, dtype):
    grads = _rand_list(dtype, 60)
    params = _rand_list(dtype, 61)
    params[0][0, :3] = 0  # sign(0) = 0; lp clamps |p| at eps
    params[-1][1].zero_()  # an all-zero l21 group
    g_ref = _clone(grads)
    a = 0.5 if penalty == "lp" else 0.8
    ref.penalty_grad_(g_ref, params, penalty, 1e-2, a, 1e-6)
    OPS.penalty_grad_(grads, params, penalty, 1e-2, a, 1e-6)
    for i in range(len(grads)):
        _close(grads[i], g_ref[i], what=f"grad {i}")


def test_penalty_grad_noncontiguous_params():
    w = _randn((6, 9), torch.float32, 62).t()
    g = _randn((9, 6), torch.float32, 63)
    g_ref = g.clone()
    ref.penalty_grad_([g_ref], [w], "l21", 0.1)
    OPS.penalty_grad_([g], [w], "l21", 0.1)
    _close(g, g_ref)


# ---- split_step_ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty", PROX)
def test_split_step_matches_reference(penalty, dtype):
    weights = _rand_list(dtype, 70)
    grads = _rand_list(dtype, 71)
    us = _rand_list(dtype, 72)
    w_ref, u_ref = _clone(weights), _clone(us)
    ref.split_step_(w_ref, grads, u_ref, 0.1, 4.0, penalty, 0.8, 0.9)
    OPS.split_step_(weights, grads, us, 0.1, 4.0, penalty, 0.8, 0.9)
    for i in range(len(weights)):
        _close(weights[i], w_ref[i], what=f"w {i}")
        _close(us[i], u_ref[i], what=f"u {i}")


# ---- tiling ------------------------------------------------------------------------------------------


def test_other_tilings(monkeypatch):
    # Tiny tiles (many programs per tensor, several static iterations per program as on a GPU, rows split
    # over several [R, C] tiles and swept in several column steps) give the same results.
    monkeypatch.setattr(tp, "_EW_BLOCK", 16)
    monkeypatch.setattr(tp, "_EW_ITERS", 4)
    monkeypatch.setattr(tp, "_GROUP_TILE", 32)
    monkeypatch.setattr(tp, "_GROUP_MAX_C", 8)
    shapes = [(7, 30), (70,), (), (9, 2)]
    x = _randn((9, 21), torch.float32, 90)
    for penalty in ("tl1", "l21", "l0_l21"):
        _close(OPS.prox(x, penalty, 0.3, 0.5), ref.prox(x, penalty, 0.3, 0.5), what=penalty)
        g = _randn((9, 21), torch.float32, 91)
        _close(OPS.prox_backward(g, x, penalty, 0.3, 0.5), ref.prox_backward(g, x, penalty, 0.3, 0.5), what=penalty)
    for penalty in ("l1_2", "l21"):
        params, bufs, p_ref, b_ref = _run_sgd(torch.float32, penalty, SGD_CONFIGS[2], 92, shapes=shapes)
        for i in range(len(params)):
            _close(params[i], p_ref[i], what=f"sgd param {i}")
            _close(bufs[i], b_ref[i], what=f"sgd buf {i}")
    got, exp = _run_adam(torch.float32, "l0_l21", ADAM_CONFIGS[1], 93, shapes=shapes)
    _check_adam(got, exp, True, torch.float32)
    grads, params = _rand_list(torch.float32, 94, shapes), _rand_list(torch.float32, 95, shapes)
    g_ref = _clone(grads)
    ref.penalty_grad_(g_ref, params, "l21", 0.1)
    OPS.penalty_grad_(grads, params, "l21", 0.1)
    for i in range(len(grads)):
        _close(grads[i], g_ref[i], what=f"grad {i}")


# ---- empty inputs, bad inputs ------------------------------------------------------------------------


def test_empty_lists_and_empty_tensors():
    OPS.prox_sgd_([], [], [], 0.1, 0.9, 0.0, 0.0, False, False, False, "l1", 0.1, 1.0)
    OPS.prox_adamw_([], [], [], [], [], [], 0.1, 0.9, 0.99, 1e-8, 0.0, False, False, "l21", 0.1, 1.0)
    OPS.palm_slimming_([], [], 1.0, 1.0, 0.1)
    OPS.penalty_grad_([], [], "l1", 0.1)
    OPS.split_step_([], [], [], 0.1, 1.0, "l0", 0.1)
    e = torch.empty(0, 5, device=DEVICE)
    assert OPS.prox(e, "l21", 0.1).shape == (0, 5)
    assert OPS.prox_backward(e, e, "l1", 0.1).shape == (0, 5)
    steps = [torch.zeros((), device=DEVICE)]
    OPS.prox_adamw_([e], [e], [e.clone()], [e.clone()], [e.clone()], steps, 0.1, 0.9, 0.99, 1e-8, 0.0, True, False,
                    "l1", 0.1, 1.0)
    assert steps[0].item() == 1.0  # the step still counts, as in the CPU kernel
    OPS.prox_sgd_([e], [e], [e.clone()], 0.1, 0.9, 0.0, 0.0, False, False, False, "l0_l21", 0.1, 1.0)


def test_bad_arguments():
    x = _randn((3, 4), torch.float32, 80)
    with pytest.raises(ValueError, match="unknown penalty"):
        OPS.prox(x, "l3", 0.1)
    with pytest.raises(ValueError, match="lam must be"):
        OPS.prox(x, "l1", -1.0)
    with pytest.raises(ValueError, match="a must be > 0"):
        OPS.prox(x, "tl1", 0.1, 0.0)
    with pytest.raises(ValueError, match="unknown penalty"):
        OPS.prox(x, "none", 0.1)  # "none" is for the optimizers only
    with pytest.raises(ValueError, match="contiguous"):
        OPS.prox_sgd_([x.t()], [x.t()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, "l1", 0.1, 1.0)
    with pytest.raises(ValueError, match="shape"):
        OPS.split_step_([x], [x[:2]], [x.clone()], 0.1, 1.0, "l1", 0.1)
    with pytest.raises(TypeError, match="dtype"):
        OPS.palm_slimming_([x], [x.double()], 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="nesterov"):
        OPS.prox_sgd_([x], [x], [x.clone()], 0.1, 0.9, 0.5, 0.0, True, False, False, "l1", 0.1, 1.0)
    with pytest.raises(ValueError, match="exactly one element"):
        OPS.prox_sgd_([x], [x], [], 0.1, 0.0, 0.0, 0.0, False, False, False, "l1", 0.1, 1.0,
                      torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="floating"):
        OPS.prox(torch.ones(3, dtype=torch.int64, device=DEVICE), "l1", 0.1)


# ---- opcheck -----------------------------------------------------------------------------------------


def _opcheck_cases():
    f = torch.float32

    def small(seed, shapes=((3, 4), (5,))):
        return _rand_list(f, seed, shapes)

    steps = [torch.tensor(1.0, device=DEVICE), torch.tensor(2.0, device=DEVICE)]
    v = [t.abs() for t in small(4)]
    return [
        ("prox", (_randn((3, 5), f, 1), "tl1", 0.2, 1.0)),
        ("prox", (_randn((3, 5), f, 1), "l0_l21", 0.2, 0.5)),
        ("prox_backward", (_randn((3, 5), f, 2), _randn((3, 5), f, 3), "l1_2", 0.2, 1.0)),
        ("prox_sgd_", (small(1), small(2), small(3), 0.1, 0.9, 0.0, 1e-4, True, False, False, "l21", 0.1, 1.0,
                       torch.tensor(2.0, device=DEVICE), torch.tensor(0.0, device=DEVICE))),
        ("prox_adamw_", (small(1), small(2), small(3), v, [t.clone() for t in v], steps, 0.01, 0.9, 0.99, 1e-8,
                         1e-2, True, False, "l1", 0.1, 1.0, None, None)),
        ("palm_slimming_", (small(5), small(6), 10.0, 1.0, 0.5, "l1", 1.0)),
        ("penalty_grad_", (small(7), small(8), "lp", 1e-3, 0.5, 1e-8)),
        ("penalty_grad_", (small(7), small(8), "l21", 1e-3, 1.0, 1e-8)),
        ("split_step_", (small(9), small(10), small(11), 0.1, 2.0, "l0", 0.2, 1.0)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args)
