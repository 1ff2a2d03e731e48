"""The ``prox`` op family (docs/algorithms.md §1-§5): maths, C++ CPU kernels vs the reference, opcheck,
AMP scalars and backend selection.

1. Every closed-form prox reaches the brute-force minimum of ``1/2 (x - y)^2 + lam R(x)`` (objective
   values, float64, vectorised grid search with refinement).
2. The C++ CPU backend equals the reference twin for every op, penalty and dtype, on awkward shapes;
   fp64 gradcheck of ``prox``; ``prox_backward`` vs the reference and vs autograd through the reference.
3. ``torch.library.opcheck`` on every ``torch.ops.slimops`` op.
4. ``found_inf`` / ``grad_scale`` of the fused optimizer ops.
5. Backend selection.
"""
from __future__ import annotations

import math

import pytest
import torch

import slimops  # noqa: F401  (registers torch.ops.slimops.*)
from slimops import _backend
import slimops.ops as P
from slimops.reference import prox as ref

from conftest import ALL_FLOATS, LOWP, assert_close, compare

PROX_PENALTIES = ("l1", "l0", "tl1", "l1_2", "l21", "l0_l21")
ELEMENTWISE = ("l1", "l0", "tl1", "l1_2")
GROUP = ("l21", "l0_l21")
STEP_PENALTIES = ("none",) + PROX_PENALTIES
GRAD_PENALTIES = ("l1", "tl1", "lp", "l21")


# =============================================================================================
# 1. Closed forms vs brute force
# =============================================================================================


def penalty_value(penalty: str, x: torch.Tensor, a: float, dim=None) -> torch.Tensor:
    """R(x), float64: elementwise when ``dim`` is None, else summed over ``dim`` (one group per row)."""
    ax = x.abs()
    if penalty in ("l21", "l0_l21"):
        n = x.norm(dim=dim) if dim is not None else ax
        nnz = (x != 0).to(x.dtype)
        nnz = nnz.sum(dim) if dim is not None else nnz
        return n if penalty == "l21" else nnz + a * n
    if penalty == "l1":
        r = ax
    elif penalty == "l0":
        r = (x != 0).to(x.dtype)
    elif penalty == "tl1":
        r = (a + 1) * ax / (a + ax)
    elif penalty == "l1_2":
        r = ax.sqrt()
    else:
        raise AssertionError(penalty)
    return r.sum(dim) if dim is not None else r


def objective_1d(penalty, x, y, lam, a):
    """1/2 (x - y)^2 + lam R(x), elementwise."""
    return 0.5 * (x - y) ** 2 + lam * penalty_value(penalty, x, a)


def objective(penalty, x, y, lam, a):
    """1/2 ||x - y||^2 + lam R(x) over the last dim (one group per row)."""
    return 0.5 * (x - y).pow(2).sum(-1) + lam * penalty_value(penalty, x, a, dim=-1)


def brute_min_1d(penalty: str, y: torch.Tensor, lam: float, a: float) -> torch.Tensor:
    """min_x 1/2 (x - y)^2 + lam R(x) for every entry of the 1-D float64 tensor y.

    Every penalty here is even and non-decreasing in |x|, so the minimiser lies in [0, y] (or [y, 0]).
    Candidates: x = 0 exactly (the kink / the l0 jump), and the best point of x = s y, s in (0, 1],
    found on a 2001-point grid then refined 5 times on a 41-point grid of +-2 cells (relative
    resolution < 1e-9): the nonzero branch has at most one local minimum (R is concave on x > 0).
    """
    f0 = objective_1d(penalty, torch.zeros_like(y), y, lam, a)
    lo = torch.full_like(y, 1e-12)
    hi = torch.ones_like(y)
    for n in (2001, 41, 41, 41, 41, 41):
        s = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, n, dtype=y.dtype)[None, :]
        f = objective_1d(penalty, s * y[:, None], y[:, None], lam, a)
        best, idx = f.min(dim=1)
        sb = s.gather(1, idx[:, None])[:, 0]
        h = (hi - lo) / (n - 1)
        lo = torch.clamp(sb - 2 * h, min=1e-300)
        hi = torch.clamp(sb + 2 * h, max=1.0)
    return torch.minimum(f0, best)


def brute_min_2d(penalty: str, y: torch.Tensor, lam: float, a: float) -> torch.Tensor:
    """min_x 1/2 ||x - y||^2 + lam R(x) over x in R^2 for every row of y (B, 2), float64.

    The supports are enumerated ({}, {0}, {1}, {0, 1}) so that the l0 jumps are hit exactly; on each
    support the objective is convex (in the region where the support's entries are nonzero), so a
    grid search over the box [-M, M]^k refined 8 times (x 21/4 per pass) around the best point finds it.
    """
    B = y.shape[0]
    M = y.abs().max().item() + 0.5
    results = [objective(penalty, torch.zeros_like(y), y, lam, a)]
    for support in ((0,), (1,), (0, 1)):
        k = len(support)
        lo = torch.full((B, k), -M, dtype=y.dtype)
        hi = torch.full((B, k), M, dtype=y.dtype)
        for n in ((161,) + (21,) * 9 if k == 2 else (2001,) + (41,) * 5):
            t = torch.linspace(0, 1, n, dtype=y.dtype)
            axes = [lo[:, i, None] + (hi - lo)[:, i, None] * t[None, :] for i in range(k)]  # (B, n) each
            if k == 1:
                x = torch.zeros(B, n, 2, dtype=y.dtype)
                x[..., support[0]] = axes[0]
            else:
                x = torch.stack(torch.broadcast_tensors(axes[0][:, :, None], axes[1][:, None, :]), -1).reshape(B, n * n, 2)
            f = objective(penalty, x, y[:, None, :], lam, a)
            fbest, idx = f.min(dim=1)
            xb = x.gather(1, idx[:, None, None].expand(B, 1, 2))[:, 0, list(support)]
            h = (hi - lo) / (n - 1)
            lo, hi = xb - 2 * h, xb + 2 * h
        results.append(fbest)
    return torch.stack(results, 0).min(0).values


def _tl1_boundary(a: float) -> float:
    return a * a / (2 * (a + 1))


# (penalty, lam, a): tl1 on both sides of (and exactly at) lam = a^2 / (2 (a+1)), for several a.
ELEMENTWISE_CASES = (
    [("l1", lam, 1.0) for lam in (0.05, 0.4, 1.3)]
    + [("l0", lam, 1.0) for lam in (0.05, 0.4, 1.3)]
    + [("l1_2", lam, 1.0) for lam in (0.05, 0.4, 1.3)]
    + [("tl1", f * _tl1_boundary(a), a) for a in (0.3, 1.0, 4.0) for f in (0.3, 1.0, 3.0)]
    + [("tl1", 2.0, 1.0)]
)


def _inputs_1d(penalty: str, lam: float, a: float, n: int = 400) -> torch.Tensor:
    """Random y in [-4, 4] plus points on both sides of the zero threshold (objective ties are fine)."""
    t = ref.zero_threshold(penalty, lam, a)
    y = (torch.rand(n, dtype=torch.float64) * 2 - 1) * 4
    near = torch.tensor([t - 1e-3, t + 1e-3, t + 0.05, 0.5 * t, 1.5 * t + 0.01], dtype=torch.float64)
    return torch.cat([y, near, -near, torch.zeros(1, dtype=torch.float64)])


def _assert_reaches(penalty, lam, a, y, x, f_closed, f_brute, backend):
    gap = f_closed - f_brute
    worst = int(gap.argmax())
    assert (gap <= 1e-9 * (1 + f_brute.abs())).all(), (
        f"{backend} {penalty} lam={lam} a={a}: closed form misses the minimum at y={y[worst].tolist()!r}: "
        f"x={x[worst].tolist()!r}, objective {f_closed[worst].item()!r} vs brute force {f_brute[worst].item()!r}")


@pytest.mark.parametrize("penalty,lam,a", ELEMENTWISE_CASES, ids=lambda v: str(round(v, 4)) if isinstance(v, float) else v)
def test_closed_form_reaches_brute_force_minimum(penalty, lam, a):
    y = _inputs_1d(penalty, lam, a)
    f_brute = brute_min_1d(penalty, y, lam, a)
    t = ref.zero_threshold(penalty, lam, a)
    for backend in ("cpu", "reference"):
        x = P.prox(y, penalty, lam, a=a, backend=backend)
        f_closed = objective_1d(penalty, x, y, lam, a)
        _assert_reaches(penalty, lam, a, y, x, f_closed, f_brute, backend)
        # the brute force is (up to its resolution) the true minimum: the closed form cannot beat it
        assert (f_closed - f_brute >= -1e-9).all()
        # zero at and below the documented threshold, nonzero above it
        assert (x[y.abs() <= t] == 0).all()
        assert (x[y.abs() > t] != 0).all()


@pytest.mark.parametrize("penalty", ELEMENTWISE + GROUP)
def test_prox_lam_zero_is_identity(penalty):
    y = torch.randn(7, 3, dtype=torch.float64)
    for backend in ("cpu", "reference"):
        assert_close(P.prox(y, penalty, 0.0, backend=backend), y)


@pytest.mark.parametrize("lam", [0.1, 0.7, 2.0])
def test_l21_reaches_brute_force_minimum_2d(lam):
    y = torch.randn(30, 2, dtype=torch.float64) * 1.5
    y[0] = torch.tensor([lam * 0.6, lam * 0.8])  # norm exactly lam
    y[1] = 0
    y[2] = torch.tensor([0.0, -1.3])
    f_brute = brute_min_2d("l21", y, lam, 1.0)
    for backend in ("cpu", "reference"):
        x = P.prox(y, "l21", lam, backend=backend)
        _assert_reaches("l21", lam, 1.0, y, x, objective("l21", x, y, lam, 1.0), f_brute, backend)


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_l0_l21_without_group_weight_reaches_brute_force_minimum_2d(lam):
    """mu = 0: l0_l21 is the l0 prox, exact."""
    y = torch.randn(30, 2, dtype=torch.float64) * 1.5
    f_brute = brute_min_2d("l0_l21", y, lam, 0.0)
    for backend in ("cpu", "reference"):
        x = P.prox(y, "l0_l21", lam, a=0.0, backend=backend)
        _assert_reaches("l0_l21", lam, 0.0, y, x, objective("l0_l21", x, y, lam, 0.0), f_brute, backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_l0_l21_is_the_documented_composition(backend):
    """What the op does (module docstring): hard threshold at sqrt(2 lam), then the block soft threshold
    at lam * mu of the survivors, rows = slices along dim 0."""
    lam, mu = 0.4, 0.7
    y = torch.randn(9, 2, 3, dtype=torch.float64)
    h = torch.where(y.abs() > math.sqrt(2 * lam), y, torch.zeros_like(y))
    n = h.reshape(9, -1).norm(dim=1)
    expected = h * torch.clamp(1 - lam * mu / n.clamp_min(1e-300), min=0)[:, None, None]
    assert_close(P.prox(y, "l0_l21", lam, a=mu, backend=backend), expected)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_group_penalties_group_along_dim0(backend):
    """l21 of a (G, ...) tensor equals l21 of its (G, -1) flattening; a 0-d tensor is one group."""
    y = torch.randn(5, 2, 3, dtype=torch.float64)
    for pen in GROUP:
        flat = P.prox(y.reshape(5, 6), pen, 0.5, a=0.5, backend=backend).reshape(5, 2, 3)
        assert_close(P.prox(y, pen, 0.5, a=0.5, backend=backend), flat)
    s = torch.tensor(-0.7, dtype=torch.float64)
    assert_close(P.prox(s, "l21", 0.5, backend=backend), torch.tensor(-0.2, dtype=torch.float64))
    assert_close(P.prox(s, "l21", 0.8, backend=backend), torch.tensor(0.0, dtype=torch.float64))


# =============================================================================================
# 2. C++ CPU backend vs the reference
# =============================================================================================

# Awkward single-tensor shapes: 0-d, one element, odd sizes, zero-size.
SHAPES = [(), (1,), (7,), (3, 5), (5, 3, 3), (1, 9), (0,), (0, 3), (3, 0)]
# A list of mixed-size tensors (zero-size ones included).
LIST_SHAPES = [(), (1,), (5, 3), (3, 2, 3), (0, 4), (17,)]


def _lam_a(penalty):
    """A (lam, a) per penalty that thresholds a fair share of N(0, 1) entries."""
    return {"l1": (0.3, 1.0), "l0": (0.3, 1.0), "tl1": (0.4, 0.8), "l1_2": (0.3, 1.0), "l21": (0.9, 1.0),
            "l0_l21": (0.3, 0.6), "none": (0.0, 1.0), "lp": (0.3, 0.5)}[penalty]


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor equal to t (every other element of a twice-as-long buffer)."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    v = big[..., ::2]
    v.copy_(t)
    assert not v.is_contiguous() or t.shape[-1] <= 1
    return v


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_prox_cpu_matches_reference(penalty, dtype):
    lam, a = _lam_a(penalty)
    for shape in SHAPES:
        x64 = _rand(shape, torch.float64, 1.5)
        x = x64.to(dtype)
        for inp in (x, _noncontig(x)):
            out = P.prox(inp, penalty, lam, a=a, backend="cpu")
            assert out.is_contiguous() and out.shape == x.shape and out.dtype == dtype
            compare(out, ref.prox(x, penalty, lam, a), ref.prox(x.double(), penalty, lam, a), f"{penalty} {shape}")


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_prox_backward_cpu_matches_reference(penalty, dtype):
    lam, a = _lam_a(penalty)
    for shape in SHAPES:
        x = _rand(shape, dtype, 1.5)
        g = _rand(shape, dtype)
        for gi in (g, _noncontig(g)):
            out = P.prox_backward(gi, x, penalty, lam, a=a, backend="cpu")
            assert out.shape == x.shape and out.dtype == dtype
            compare(out, ref.prox_backward(g, x, penalty, lam, a), ref.prox_backward(g.double(), x.double(), penalty, lam, a),
                    f"{penalty} {shape}")


def _away_from_thresholds(penalty, lam, a, shape, margin=0.15):
    """float64 inputs whose entries (and, for group penalties, row norms after the elementwise part)
    stay at least ``margin`` away from every threshold, so that prox is smooth there."""
    t = ref.zero_threshold(penalty, lam, a)
    n = math.prod(shape)
    mag = torch.where(torch.rand(n) < 0.3, torch.rand(n) * max(t - margin, 0.0), t + margin + torch.rand(n) * 2)
    x = (mag * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)).double().reshape(shape)
    if penalty in GROUP:
        gt = lam * a if penalty == "l0_l21" else lam
        z = ref._elementwise(x, penalty, lam, a)  # l0_l21: the hard-threshold part; l21: identity
        norms = z.reshape(shape[0], -1).norm(dim=1)
        bad = (norms - gt).abs() < margin
        # push rows with a norm near the group threshold out of the way (zero them entirely)
        x[bad] = 0.0
    return x


@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_prox_gradcheck(penalty):
    lam, a = _lam_a(penalty)
    x = _away_from_thresholds(penalty, lam, a, (6, 3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: P.prox(t, penalty, lam, a=a, backend="cpu"), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_prox_backward_matches_autograd_through_reference(penalty):
    """An independent oracle: autograd differentiates the reference's closed form (smooth region)."""
    lam, a = _lam_a(penalty)
    x = _away_from_thresholds(penalty, lam, a, (8, 4)).requires_grad_()
    g = torch.randn(8, 4, dtype=torch.float64)
    (expected,) = torch.autograd.grad(ref.prox(x, penalty, lam, a), x, g)
    assert_close(P.prox_backward(g, x.detach(), penalty, lam, a=a, backend="cpu"), expected)


# ---- fused list ops: builders of (args, mutated tensors) -----------------------------------------


def _list(shapes, dtype, scale=1.0, positive=False):
    out = [_rand(s, dtype, scale) for s in shapes]
    return [t.abs() for t in out] if positive else out


def _clone_to(tensors, dtype=None):
    return [t.to(dtype) if dtype is not None else t.clone() for t in tensors]


def _run_list_op(op, state, kwargs, dtype, backend, device="cpu"):
    """Runs ``op`` (a slimops.ops function) on a copy of ``state`` (dict of name -> list of tensors, in
    call order) cast to ``dtype`` on ``device``; returns the copy after the call, on the CPU."""
    st = {k: [(t.to(dtype) if k != "state_steps" else t).to(device, copy=True) for t in v] for k, v in state.items()}
    getattr(P, op)(*st.values(), **kwargs, backend=backend)
    return {k: [t.cpu() for t in v] for k, v in st.items()}


def _check_list_op(op, state, kwargs, dtype, noncontig=()):
    """C++ CPU vs reference (same dtype), with a float64 reference as truth for bf16/fp16."""
    kern = _run_list_op(op, state, kwargs, dtype, "cpu")
    if noncontig:  # the same call with non-contiguous read-only inputs must give the same result
        st = {k: [t.to(dtype).clone() if k != "state_steps" else t.clone() for t in v] for k, v in state.items()}
        for k in noncontig:
            st[k] = [_noncontig(t) for t in st[k]]
        getattr(P, op)(*st.values(), **kwargs, backend="cpu")
        for k in state:
            for i, (u, v) in enumerate(zip(st[k], kern[k])):
                torch.testing.assert_close(u, v, rtol=0, atol=0, msg=f"{op} non-contiguous {k}[{i}]")
    refd = _run_list_op(op, state, kwargs, dtype, "reference")
    truth = _run_list_op(op, state, kwargs, torch.float64, "reference") if dtype in LOWP else None
    for k in state:
        for i, t in enumerate(kern[k]):
            compare(t, refd[k][i], truth[k][i] if truth else None, f"{op} {dtype} {k}[{i}] {kwargs}")


SGD_CONFIGS = [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, init_momentum=True, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.3, maximize=True),
    dict(momentum=0.8, nesterov=True, weight_decay=5e-2),
]


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", STEP_PENALTIES)
def test_prox_sgd_cpu_matches_reference(penalty, dtype):
    lam, a = _lam_a(penalty)
    for cfg in SGD_CONFIGS:
        state = {"params": _list(LIST_SHAPES, torch.float64, 1.5), "grads": _list(LIST_SHAPES, torch.float64),
                 "momentum_buffers": _list(LIST_SHAPES, torch.float64) if cfg["momentum"] else []}
        kwargs = dict(lr=0.3, penalty=penalty, lam=lam, a=a, **cfg)
        _check_list_op("prox_sgd_", state, kwargs, dtype, noncontig=("grads",))


ADAMW_CONFIGS = [
    dict(weight_decay=1e-2, amsgrad=False),
    dict(weight_decay=0.0, amsgrad=True, maximize=True),
    dict(weight_decay=0.1, amsgrad=True, beta1=0.5, beta2=0.9, eps=1e-3),
]


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", STEP_PENALTIES)
def test_prox_adamw_cpu_matches_reference(penalty, dtype):
    lam, a = _lam_a(penalty)
    for cfg in ADAMW_CONFIGS:
        for step0 in (0.0, 4.0):
            state = {"params": _list(LIST_SHAPES, torch.float64, 1.5), "grads": _list(LIST_SHAPES, torch.float64),
                     "exp_avgs": _list(LIST_SHAPES, torch.float64, 0.1),
                     "exp_avg_sqs": _list(LIST_SHAPES, torch.float64, 0.1, positive=True),
                     "max_exp_avg_sqs": _list(LIST_SHAPES, torch.float64, 0.2, positive=True) if cfg["amsgrad"] else [],
                     "state_steps": [torch.tensor(step0) for _ in LIST_SHAPES]}
            if step0 == 0:  # a fresh AdamW state
                for k in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
                    state[k] = [torch.zeros_like(t) for t in state[k]]
            kwargs = dict(lr=0.05, penalty=penalty, lam=lam * 4, a=a, **cfg)
            _check_list_op("prox_adamw_", state, kwargs, dtype, noncontig=("grads",))


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_palm_slimming_cpu_matches_reference(penalty, dtype):
    lam, a = _lam_a(penalty)
    for alpha, beta in ((10.0, 100.0), (4.0, 0.25), (2.0, 0.0)):
        state = {"gammas": _list(LIST_SHAPES, torch.float64), "xis": _list(LIST_SHAPES, torch.float64)}
        kwargs = dict(alpha=alpha, beta=beta, lam=lam * (alpha + beta), penalty=penalty, a=a)
        _check_list_op("palm_slimming_", state, kwargs, dtype)


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", GRAD_PENALTIES)
def test_penalty_grad_cpu_matches_reference(penalty, dtype):
    _, a = _lam_a(penalty)
    params = _list(LIST_SHAPES, torch.float64)
    params[2][1] = 0.0  # an exact zero (sign 0) and, for l21, an all-zero group
    params[-1][3] = 0.0
    state = {"grads": _list(LIST_SHAPES, torch.float64), "params": params}
    _check_list_op("penalty_grad_", state, dict(penalty=penalty, s=0.1, a=a), dtype, noncontig=("params",))
    if penalty == "lp":  # tiny |p| hits the eps clamp
        state["params"] = [t * 1e-9 for t in params]
        _check_list_op("penalty_grad_", state, dict(penalty=penalty, s=0.1, a=a, eps=1e-6), dtype)


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_split_step_cpu_matches_reference(penalty, dtype):
    lam, a = _lam_a(penalty)
    for beta in (0.5, 4.0):
        state = {"weights": _list(LIST_SHAPES, torch.float64, 1.5), "grads": _list(LIST_SHAPES, torch.float64),
                 "us": _list(LIST_SHAPES, torch.float64)}
        _check_list_op("split_step_", state, dict(lr=0.1, beta=beta, penalty=penalty, lam=lam * beta, a=a), dtype,
                       noncontig=("grads",))


def test_fused_ops_on_empty_lists():
    """An empty list is a no-op for every fused op, on both backends."""
    for backend in ("cpu", "reference"):
        P.prox_sgd_([], [], [], lr=0.1, momentum=0.9, penalty="l1", lam=0.1, backend=backend)
        P.prox_adamw_([], [], [], [], [], [], lr=0.1, penalty="l1", lam=0.1, backend=backend)
        P.palm_slimming_([], [], alpha=10, beta=1, lam=0.1, backend=backend)
        P.penalty_grad_([], [], penalty="l1", s=0.1, backend=backend)
        P.split_step_([], [], [], lr=0.1, beta=1.0, penalty="l0", lam=0.1, backend=backend)


def test_prox_sgd_list_equals_per_tensor_calls():
    """Fusing a list changes nothing: one call over the list == one call per tensor (large tensors too,
    so the parallel chunking of the CPU kernel is exercised)."""
    shapes = [(70000,), (3, 5), (300, 257)]
    params = _list(shapes, torch.float32)
    grads = _list(shapes, torch.float32)
    bufs = _list(shapes, torch.float32)
    for pen in ("l1", "l21"):
        a = [t.clone() for t in params], [t.clone() for t in bufs]
        b = [t.clone() for t in params], [t.clone() for t in bufs]
        kw = dict(lr=0.1, momentum=0.9, penalty=pen, lam=0.5, backend="cpu")
        P.prox_sgd_(a[0], grads, a[1], **kw)
        for i in range(len(shapes)):
            P.prox_sgd_([b[0][i]], [grads[i]], [b[1][i]], **kw)
        for u, v in zip(a[0] + a[1], b[0] + b[1]):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
        ra = [t.clone() for t in params], [t.clone() for t in bufs]
        P.prox_sgd_(ra[0], grads, ra[1], **{**kw, "backend": "reference"})
        for u, v in zip(a[0] + a[1], ra[0] + ra[1]):
            assert_close(u, v)


def _list_op_cases():
    """One representative call per fused op and penalty (for the GPU test)."""
    for pen in STEP_PENALTIES:
        lam, a = _lam_a(pen)
        yield "prox_sgd_", {"params": _list(LIST_SHAPES, torch.float64, 1.5), "grads": _list(LIST_SHAPES, torch.float64),
                            "momentum_buffers": _list(LIST_SHAPES, torch.float64)}, \
            dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-2, penalty=pen, lam=lam, a=a)
        yield "prox_adamw_", {"params": _list(LIST_SHAPES, torch.float64, 1.5), "grads": _list(LIST_SHAPES, torch.float64),
                              "exp_avgs": _list(LIST_SHAPES, torch.float64, 0.1),
                              "exp_avg_sqs": _list(LIST_SHAPES, torch.float64, 0.1, positive=True),
                              "max_exp_avg_sqs": _list(LIST_SHAPES, torch.float64, 0.2, positive=True),
                              "state_steps": [torch.tensor(4.0) for _ in LIST_SHAPES]}, \
            dict(lr=0.05, amsgrad=True, penalty=pen, lam=lam * 4, a=a)
        if pen == "none":
            continue
        yield "palm_slimming_", {"gammas": _list(LIST_SHAPES, torch.float64), "xis": _list(LIST_SHAPES, torch.float64)}, \
            dict(alpha=10.0, beta=1.0, lam=lam * 11, penalty=pen, a=a)
        yield "split_step_", {"weights": _list(LIST_SHAPES, torch.float64, 1.5), "grads": _list(LIST_SHAPES, torch.float64),
                              "us": _list(LIST_SHAPES, torch.float64)}, dict(lr=0.1, beta=2.0, penalty=pen, lam=lam * 2, a=a)
    for pen in GRAD_PENALTIES:
        yield "penalty_grad_", {"grads": _list(LIST_SHAPES, torch.float64), "params": _list(LIST_SHAPES, torch.float64)}, \
            dict(penalty=pen, s=0.1, a=_lam_a(pen)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_fused_ops_on_gpu_match_reference(backend, dtype):
    """Every fused op on CUDA tensors vs the reference: fp64 tight; fp32/bf16/fp16 by the 2x principle
    against a float64 truth (the GPU's libm may differ from the CPU's in the last bits)."""
    from conftest import assert_close_lowp

    dev = torch.device("cuda")
    if backend != "auto" and _backend.why_not("prox_sgd_", backend, dev) is not None:
        pytest.skip(_backend.why_not("prox_sgd_", backend, dev))
    for op, state, kwargs in _list_op_cases():
        got = _run_list_op(op, state, kwargs, dtype, backend, device="cuda")
        refd = _run_list_op(op, state, kwargs, dtype, "reference")
        truth = _run_list_op(op, state, kwargs, torch.float64, "reference")
        for k in state:
            for i, t in enumerate(got[k]):
                msg = f"{op} {backend} {dtype} {k}[{i}] {kwargs}"
                if dtype == torch.float64:
                    assert_close(t, refd[k][i], msg)
                else:
                    assert_close_lowp(t, refd[k][i], truth[k][i], msg)


# =============================================================================================
# 3. opcheck
# =============================================================================================


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})


@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_opcheck_prox(penalty):
    lam, a = _lam_a(penalty)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    _opcheck(torch.ops.slimops.prox.default, (x, penalty, lam, a))
    _opcheck(torch.ops.slimops.prox.default, (torch.randn(5), penalty, lam), {"a": a})
    _opcheck(torch.ops.slimops.prox_backward.default, (torch.randn(4, 3), torch.randn(4, 3), penalty, lam, a))


@pytest.mark.parametrize("penalty", ["none", "l1", "l21"])
def test_opcheck_prox_sgd_(penalty):
    shapes = [(3, 2), (5,)]
    params, grads, bufs = _list(shapes, torch.float32), _list(shapes, torch.float32), _list(shapes, torch.float32)
    _opcheck(torch.ops.slimops.prox_sgd_.default,
             (params, grads, bufs, 0.1, 0.9, 0.0, 1e-2, True, False, False, penalty, 0.2, 1.0))
    _opcheck(torch.ops.slimops.prox_sgd_.default,
             (params, grads, [], 0.1, 0.0, 0.0, 0.0, False, False, False, penalty, 0.2, 1.0),
             {"grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)})


@pytest.mark.parametrize("penalty", ["none", "tl1", "l0_l21"])
def test_opcheck_prox_adamw_(penalty):
    shapes = [(3, 2), (5,)]
    params, grads = _list(shapes, torch.float32), _list(shapes, torch.float32)
    m, v, vmax = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    steps = [torch.tensor(0.0) for _ in shapes]
    _opcheck(torch.ops.slimops.prox_adamw_.default,
             (params, grads, m, v, vmax, steps, 1e-2, 0.9, 0.999, 1e-8, 1e-2, True, False, penalty, 0.3, 0.5))
    _opcheck(torch.ops.slimops.prox_adamw_.default,
             (params, grads, m, v, [], steps, 1e-2, 0.9, 0.999, 1e-8, 1e-2, False, True, penalty, 0.3, 0.5),
             {"grad_scale": torch.tensor([4.0]), "found_inf": torch.tensor([0.0])})


def test_opcheck_palm_penalty_split():
    shapes = [(3, 2), (5,)]
    _opcheck(torch.ops.slimops.palm_slimming_.default,
             (_list(shapes, torch.float32), _list(shapes, torch.float32), 10.0, 100.0, 0.5, "l1", 1.0))
    _opcheck(torch.ops.slimops.palm_slimming_.default, (_list(shapes, torch.float64), _list(shapes, torch.float64), 10.0, 1.0, 0.5))
    for pen, a in (("l1", 1.0), ("lp", 0.5), ("l21", 1.0)):
        _opcheck(torch.ops.slimops.penalty_grad_.default, (_list(shapes, torch.float32), _list(shapes, torch.float32), pen, 0.1, a, 1e-8))
    _opcheck(torch.ops.slimops.split_step_.default,
             (_list(shapes, torch.float32), _list(shapes, torch.float32), _list(shapes, torch.float32), 0.1, 2.0, "l0", 0.3, 1.0))


def test_every_slimops_op_has_an_opcheck():
    """Guard: a new op of the family must get an opcheck test here."""
    covered = {"prox", "prox_backward", "prox_sgd_", "prox_adamw_", "palm_slimming_", "penalty_grad_", "split_step_"}
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("slimops::")}
    family = {op for op, mod in _backend._TRITON_MODULES.items() if mod.endswith(".prox")}
    assert covered <= schemas
    assert family == covered, family ^ covered
    for op in covered:
        assert _backend.has_kernel(op, "CPU"), op


# =============================================================================================
# 4. AMP: found_inf skips, grad_scale divides
# =============================================================================================


def _sgd_state(dtype=torch.float32):
    shapes = [(4, 3), (5,)]
    return {"params": _list(shapes, dtype), "grads": _list(shapes, dtype), "momentum_buffers": _list(shapes, dtype)}


def _adamw_state(dtype=torch.float32):
    shapes = [(4, 3), (5,)]
    return {"params": _list(shapes, dtype), "grads": _list(shapes, dtype), "exp_avgs": _list(shapes, dtype, 0.1),
            "exp_avg_sqs": _list(shapes, dtype, 0.1, positive=True), "max_exp_avg_sqs": _list(shapes, dtype, 0.2, positive=True),
            "state_steps": [torch.tensor(3.0), torch.tensor(3.0)]}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", ["prox_sgd_", "prox_adamw_"])
def test_found_inf_skips_the_step(op, backend):
    state = _sgd_state() if op == "prox_sgd_" else _adamw_state()
    kw = (dict(lr=0.1, momentum=0.9, penalty="l1", lam=0.2) if op == "prox_sgd_"
          else dict(lr=0.1, amsgrad=True, penalty="l1", lam=0.2))
    before = {k: [t.clone() for t in v] for k, v in state.items()}
    for fi in (torch.tensor(1.0), torch.tensor([float("inf")]), torch.tensor(3.0, dtype=torch.float64)):
        getattr(P, op)(*state.values(), **kw, grad_scale=torch.tensor(2.0), found_inf=fi, backend=backend)
        for k in state:
            for u, v in zip(state[k], before[k]):
                torch.testing.assert_close(u, v, rtol=0, atol=0, msg=f"{op} changed {k} although found_inf={fi}")
    # found_inf == 0 steps normally (adamw steps incremented)
    getattr(P, op)(*state.values(), **kw, found_inf=torch.tensor(0.0), backend=backend)
    assert not torch.equal(state["params"][0], before["params"][0])
    if op == "prox_adamw_":
        assert [s.item() for s in state["state_steps"]] == [4.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", ["prox_sgd_", "prox_adamw_"])
def test_grad_scale_divides_the_grads(op, backend, dtype):
    state = _sgd_state(dtype) if op == "prox_sgd_" else _adamw_state(dtype)
    kw = (dict(lr=0.1, momentum=0.9, nesterov=True, penalty="tl1", lam=0.2, a=0.5) if op == "prox_sgd_"
          else dict(lr=0.1, amsgrad=True, penalty="l0", lam=0.02))
    scaled = {k: [t.clone() for t in v] for k, v in state.items()}
    scaled["grads"] = [g * 1024 for g in scaled["grads"]]  # exact in every float dtype
    getattr(P, op)(*state.values(), **kw, backend=backend)
    getattr(P, op)(*scaled.values(), **kw, grad_scale=torch.tensor(1024.0), backend=backend)
    for k in state:
        if k == "grads":
            continue
        for u, v in zip(scaled[k], state[k]):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


# =============================================================================================
# 5. Backend selection
# =============================================================================================


def test_backend_reference_and_auto_agree_with_cpu():
    x = torch.randn(6, 5)
    for pen in PROX_PENALTIES:
        out = P.prox(x, pen, 0.3)
        assert_close(out, P.prox(x, pen, 0.3, backend="cpu"))
        assert_close(out, P.prox(x, pen, 0.3, backend="reference"))
    assert _backend.resolve("prox", "auto", torch.device("cpu")) == "cpu"
    assert {"cpu", "reference"} <= set(_backend.available("prox", torch.device("cpu")))


def test_unknown_backend_errors():
    with pytest.raises(ValueError, match=r"slimops\.prox: unknown backend 'gpu'"):
        P.prox(torch.randn(3), "l1", 0.1, backend="gpu")
    with pytest.raises(ValueError, match=r"slimops\.prox_sgd_: unknown backend 'fast'"):
        P.prox_sgd_([torch.randn(3)], [torch.randn(3)], [], lr=0.1, backend="fast")


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match=r"slimops\.prox: backend 'cuda' cannot run: the tensors are on cpu, not a CUDA device"):
        P.prox(torch.randn(3), "l1", 0.1, backend="cuda")
    with pytest.raises(RuntimeError, match=r"slimops\.prox_adamw_: backend 'cuda' cannot run: .*not a CUDA device"):
        P.prox_adamw_([torch.randn(3)], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.tensor(0.0)],
                      lr=0.1, backend="cuda")


def test_cpu_backend_on_meta_tensors_says_why():
    with pytest.raises(RuntimeError, match=r"slimops\.prox: backend 'cpu' cannot run: the tensors are on meta"):
        P.prox(torch.empty(3, device="meta"), "l1", 0.1, backend="cpu")


@pytest.mark.skipif(_backend.triton_importable() and _backend.triton_interpreting(), reason="triton interpreter active")
def test_triton_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match=r"slimops\.prox: backend 'triton' cannot run: "):
        P.prox(torch.randn(3), "l1", 0.1, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "reference"])
@pytest.mark.parametrize("penalty", PROX_PENALTIES)
def test_prox_cuda_matches_reference(backend, penalty):
    if backend == "cuda" and not _backend.has_kernel("prox", "CUDA"):
        pytest.skip("built without CUDA kernels")
    lam, a = _lam_a(penalty)
    x = torch.randn(33, 7, dtype=torch.float64)
    out = P.prox(x.cuda(), penalty, lam, a=a, backend=backend)
    assert out.device.type == "cuda"
    assert_close(out.cpu(), ref.prox(x, penalty, lam, a))


# =============================================================================================
# Non-finite inputs: the prox never hides a NaN (or an inf) by thresholding it to zero
# =============================================================================================


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("penalty", ["l1", "l0", "tl1", "l1_2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prox_propagates_nan_and_inf(penalty, dtype, backend):
    y = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.01, 3.0], dtype=dtype)
    x = P.prox(y, penalty, 0.1, a=1.0, backend=backend)
    assert torch.isnan(x[0])
    assert x[1] == float("inf") and x[2] == -float("inf")
    assert x[3] == 0 and x[4] != 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_prox_sgd_step_keeps_nan_gradients_visible(backend):
    p = torch.ones(4)
    g = torch.tensor([float("nan"), 0.0, 0.0, 0.0])
    P.prox_sgd_([p], [g], [], lr=0.1, penalty="l1", lam=100.0, backend=backend)
    assert torch.isnan(p[0]) and (p[1:] == 0).all()


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_sgd_float16_reads_back_exactly_the_buffer_it_stores(momentum):
    """prox_sgd_ reads back the rounded momentum buffer inside the step (csrc/cpu/fused_apply.h round_to: for float16
    a vectorisable rounding, round_through_half, while the store converts by F16C or c10). With lr = 1 and no penalty
    the new weight is w - buffer, rounded once more; the buffers span every float16 range: subnormal, normal, past
    65504 (inf), and, with momentum 0.5 (exact products), ties between two float16 values."""
    gen = torch.Generator().manual_seed(3)
    n = 4099  # stages of 128 and a remainder
    scales = torch.tensor([1e-7, 3e-5, 6.1e-5, 1.0, 3e4, 6.5e4]).repeat_interleave(n // 6 + 1)[:n]
    b, g, w = ((torch.randn(n, generator=gen, dtype=torch.float64) * scales).clamp(-65504, 65504).half()
               for _ in "bgw")
    b[:4] = torch.tensor([2.0**-24, 2.0**-24, 65504.0, 1.0]).half()  # 0.5 b + g: a tie below 2^-24, a tie at 1 ulp
    g[:4] = torch.tensor([0.0, 2.0**-24, 65504.0, 2.0**-11]).half()
    params, buf = [w.clone()], [b.clone()]
    P.prox_sgd_(params, [g], buf, lr=1.0, momentum=momentum, penalty="none", lam=0.0, backend="cpu")
    b_new = b.float() * momentum + g.float()
    want = b_new.half()  # the buffer as torch rounds it
    assert torch.equal(buf[0], want)  # values: the kernel's d = g + 0 * w turns -0 into +0
    assert torch.equal(params[0], (w.float() - want.float()).half())
    assert not torch.equal(params[0], (w.float() - b_new).half())  # reading back the unrounded buffer would show
    assert buf[0].isinf().any() and (buf[0].abs() < 2.0**-14).any()
