"""The quant family (fda_sign, fake_quantize): the reference twin (slimops/reference/quant.py) against independent
definitions, then the public ops and the C++ CPU kernels (csrc/cpu/quant.cpp) against the reference twin.

1. The reference itself: the FDA surrogate equals the autograd derivative of the truncated Fourier series of the
   sign (docs/algorithms.md §9), the closed form is stable at its singularities; the LSQ gradients equal autograd
   through the straight-through composite ``(round_ste(clamp(x/s + z)) - z)·s``; the forward equals torch's own
   ``fake_quantize_per_tensor_affine`` / ``_per_channel_affine``.
2. The "cpu" backend (and "auto") equals the reference: values and gradients (every output_mask), every surrogate,
   1..8 bits signed and unsigned, per tensor and per channel on every axis, with and without a zero point,
   NaN/inf inputs, empty tensors; float32/float64 tight, bfloat16/float16 against a float64 truth.
3. ``torch.library.opcheck`` on all four ops, torch.compile(fullgraph=True), the result independent of the number
   of threads (the block partial sums).
4. Bad input: clear errors naming the op and the argument, from the Python layer and the raw C++ ops.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import slimops  # noqa: F401  (registers torch.ops.slimops.*)
from slimops import ops as P
from slimops.ops import quant as Q
from slimops.reference import quant as ref
from tests.conftest import LOWP, assert_close, assert_close_lowp, device_params

OPS = torch.ops.slimops
pytestmark = pytest.mark.usefixtures("one_thread")
MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


# ---- 1. the reference against independent definitions ------------------------------------------------------------


@pytest.mark.parametrize("n_terms,omega", [(1, 0.1), (10, 0.1), (19, 0.1), (7, 1.3)])
def test_reference_fda_is_the_derivative_of_the_truncated_series(n_terms, omega):
    x = torch.linspace(-9.0, 9.0, 2001, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(ref.fda_series(x, n_terms, omega).sum(), x)
    got = ref.fda_sign_backward(torch.ones_like(x), x.detach(), n_terms, omega, "fda", math.inf)
    torch.testing.assert_close(got, auto, rtol=1e-12, atol=1e-12)


def test_fda_series_approaches_the_sign():
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64)
    approx = ref.fda_series(x, 2000, 0.1)  # period 2π/ω ≈ 62.8: |x| <= 2 is well inside the half periods
    torch.testing.assert_close(approx, torch.sign(x), atol=5e-3, rtol=0)


@pytest.mark.parametrize("surrogate,expected", [
    ("ste", lambda x: torch.ones_like(x)),
    ("tanh", lambda x: 1 - torch.tanh(x) ** 2),
    ("approx_sign", lambda x: (2 - 2 * x.abs()).clamp_min(0)),
])
def test_reference_surrogates_and_clip(surrogate, expected):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    g = torch.randn_like(x)
    got = ref.fda_sign_backward(g, x, 10, 0.1, surrogate, 1.5)
    want = g * expected(x) * (x.abs() <= 1.5)
    torch.testing.assert_close(got, want)


def test_reference_forward_is_sign_with_zero_to_minus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0, math.nan, math.inf, -math.inf])
    y = ref.fda_sign(x)
    assert y[:5].tolist() == [-1, -1, -1, 1, 1] and math.isnan(y[5]) and y[6:].tolist() == [1, -1]


def _ste_composite(x, s, zp, bits, axis, signed):
    """LSQ/LSQ+ as autograd sees it: straight-through rounding of clamp(x/s + z) (an independent oracle)."""
    qn, qp = ref.levels(bits, signed)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s_ = s.reshape(shape) if axis is not None else s.reshape(())
    if zp is None:
        z = torch.zeros(())
    else:
        zr = zp.round().clamp(qn, qp)
        z = (zp + (zr - zp).detach()).reshape(shape if axis is not None else ())
    w = (x * (1.0 / s_) + z).clamp(qn, qp)
    if signed and bits == 1:
        r = torch.where(w > 0, 1.0, -1.0).to(w.dtype)
    else:
        r = w.round()
    q = w + (r - w).detach()
    return (q - z) * s_


@pytest.mark.parametrize("bits,signed,axis,with_zp", [
    (8, True, None, False), (4, True, 0, False), (3, False, None, True), (2, False, 1, True), (1, True, 0, False),
    (1, False, None, True), (8, False, 0, True),
])
def test_reference_lsq_gradients_equal_autograd_of_the_ste_composite(bits, signed, axis, with_zp):
    x = (torch.randn(5, 6, 3, dtype=torch.float64) * 2).requires_grad_()
    n = 1 if axis is None else x.shape[axis]
    s = (torch.rand(n, dtype=torch.float64) * 0.3 + 0.05).requires_grad_()
    zp = (torch.rand(n, dtype=torch.float64) * 3 - 0.2).requires_grad_() if with_zp else None
    g = torch.randn_like(x)
    want = torch.autograd.grad(_ste_composite(x, s, zp, bits, axis, signed), [x, s] + ([zp] if with_zp else []), g)
    y = ref.fake_quantize(x, s, zp, bits, axis, signed, 1.0)
    torch.testing.assert_close(y, _ste_composite(x, s, zp, bits, axis, signed).detach(), rtol=0, atol=1e-12)
    got = torch.autograd.grad(y, [x, s] + ([zp] if with_zp else []), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_forward_equals_torchs_fake_quantize(axis):
    x = torch.randn(16, 12) * 3
    if axis is None:
        s, z = torch.tensor([0.07]), torch.tensor([3.0])
        want = torch.fake_quantize_per_tensor_affine(x, 0.07, 3, 0, 15)
    else:
        n = x.shape[axis]
        s = torch.rand(n) * 0.2 + 0.01
        z = torch.randint(-8, 8, (n,)).float()
        want = torch.fake_quantize_per_channel_affine(x, s, z.int(), axis, -8, 7)
    bits, signed = (4, False) if axis is None else (4, True)
    for b in ("cpu", "reference"):
        got = P.fake_quantize(x, s, z, bits=bits, per_channel_axis=axis, signed=signed, backend=b)
        assert torch.equal(got, want), b


# ---- 2. the C++ kernels against the reference ------------------------------------------------------------------------


def _x(shape, dtype, scale=2.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    return x.to(dtype)


def _check(got, want, truth=None):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype in LOWP:
        assert_close_lowp(got, want, truth)
    else:
        assert_close(got, want)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("surrogate", ref.SURROGATES)
def test_fda_sign_matches_reference(device, dtype, surrogate):
    x = _x((7, 33), dtype).to(device)
    x[0, :4] = 0
    g = torch.randn(7, 33, dtype=dtype, device=device)
    for clip in (1.0, 2.5, math.inf):
        y = P.fda_sign(x, n_terms=12, omega=0.3, surrogate=surrogate, clip=clip, backend="auto")
        assert torch.equal(y, ref.fda_sign(x))
        got = OPS.fda_sign_backward(g, x, 12, 0.3, surrogate, clip)
        want = ref.fda_sign_backward(g, x, 12, 0.3, surrogate, clip)
        truth = ref.fda_sign_backward(g.double(), x.double(), 12, 0.3, surrogate, clip)
        if surrogate == "fda" and dtype == torch.float32:
            # the closed form and the reference's direct sum of 12 cosines round differently: a few ulp of the
            # largest term sum, (4ω/π)·n_terms
            bound = 2e-6 * (4 * 0.3 / math.pi) * 12 * g.abs()
            assert ((got.double() - truth).abs() <= bound + 1e-7).all()
            assert ((want.double() - truth).abs() <= bound + 1e-7).all()
        else:
            _check(got, want, truth)


def test_fda_closed_form_is_stable_near_every_singularity():
    """u = ωx near kπ (sin u = 0): the kernel's closed form equals the direct sum of cosines (float64 truth)."""
    omega, n = 0.5, 15
    k = torch.arange(-6, 7, dtype=torch.float64)
    eps = torch.tensor([0.0, 1e-12, -1e-9, 1e-6, -1e-4, 1e-2], dtype=torch.float64)
    x = ((k[:, None] * math.pi + eps[None, :]) / omega).reshape(-1)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
        xd = x.to(dtype)
        got = OPS.fda_sign_backward(torch.ones_like(xd), xd, n, omega, "fda", math.inf).double()
        want = ref.fda_sign_backward(torch.ones_like(xd).double(), xd.double(), n, omega, "fda", math.inf)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * n)


def test_fda_sign_autograd_uses_the_surrogate():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    for b in ("cpu", "reference"):
        (gx,) = torch.autograd.grad(P.fda_sign(x, n_terms=5, omega=0.2, backend=b).sum(), x)
        torch.testing.assert_close(gx, ref.fda_sign_backward(torch.ones_like(x), x.detach(), 5, 0.2, "fda", 1.0))


def test_fda_sign_nan_inf_and_empty():
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 0.5])
    g = torch.ones(5)
    assert torch.equal(P.fda_sign(x, backend="cpu").nan_to_num(7), ref.fda_sign(x).nan_to_num(7))
    for s in ref.SURROGATES:
        for clip in (1.0, math.inf):
            got = OPS.fda_sign_backward(g, x, 10, 0.1, s, clip)
            torch.testing.assert_close(got, ref.fda_sign_backward(g, x, 10, 0.1, s, clip), equal_nan=True)
    e = torch.empty(0, 3)
    assert P.fda_sign(e, backend="cpu").shape == (0, 3)
    assert OPS.fda_sign_backward(e, e, 10, 0.1, "fda", 1.0).shape == (0, 3)


def _fq_case(shape, dtype, bits, signed, axis, with_zp, device="cpu", sdtype=torch.float32):
    x = _x(shape, dtype, 1.5).to(device)
    n = 1 if axis is None else shape[axis]
    qn, qp = ref.levels(bits, signed)
    s = (torch.rand(n, dtype=torch.float64) * 2.0 / max(qp, 1) + 0.02).to(sdtype).to(device)
    zp = None
    if with_zp:
        zp = (torch.rand(n, dtype=torch.float64) * (qp - qn) * 0.5 + qn + 0.3).to(sdtype).to(device)
    if axis is None:
        s = s.reshape(())
        zp = zp.reshape(()) if zp is not None else None
    return x, s, zp


QUANT_CASES = [
    # (shape, bits, signed, axis, with_zp)
    ((64, 33), 8, True, None, False),
    ((64, 33), 4, True, 0, False),
    ((8, 6, 3, 3), 4, True, 0, False),
    ((8, 6, 3, 3), 2, True, 1, False),
    ((8, 6, 3, 3), 3, False, 3, True),
    ((5, 9000), 8, False, None, True),  # more than one block per row
    ((3, 7, 11), 1, True, None, False),
    ((3, 7, 11), 1, True, 2, False),
    ((3, 7, 11), 1, False, 1, True),
    ((17,), 4, False, 0, True),
    ((), 4, True, None, False),
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{'s' if c[2] else 'u'}-ax{c[3]}-z{int(c[4])}")
def test_fake_quantize_matches_reference(device, dtype, case):
    shape, bits, signed, axis, with_zp = case
    x, s, zp = _fq_case(shape, dtype, bits, signed, axis, with_zp, device)
    gf = 0.37
    y = P.fake_quantize(x, s, zp, bits=bits, per_channel_axis=axis, signed=signed, grad_factor=gf, backend="auto")
    want = ref.fake_quantize(x, s, zp, bits, axis, signed, gf)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, want, rtol=0, atol=0)  # the same fp32 (fp64) arithmetic, then one rounding
    g = torch.randn(shape, dtype=dtype, device=device)
    for m in MASKS:
        got = OPS.fake_quantize_backward(g, x, s, zp, bits, axis, signed, gf, m)
        exp = ref.fake_quantize_backward(g, x, s, zp, bits, axis, signed, gf, m)
        for name, a, b in zip(("grad_x", "grad_scale", "grad_zero_point"), got, exp):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            if name == "grad_x":
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:  # sums: block order vs torch's order
                tol = 1e-10 if dtype == torch.float64 else 2e-5
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1, g.numel() ** 0.5))


def test_fake_quantize_autograd_and_grad_factor():
    x, s, zp = _fq_case((6, 10), torch.float64, 4, False, 0, True)
    x.requires_grad_(), s.requires_grad_(), zp.requires_grad_()
    outs = {}
    for b in ("cpu", "reference"):
        y = P.fake_quantize(x, s, zp, bits=4, per_channel_axis=0, signed=False, grad_factor=0.25, backend=b)
        outs[b] = torch.autograd.grad((y * torch.arange(60.0).reshape(6, 10)).sum(), (x, s, zp))
    for a, e in zip(outs["cpu"], outs["reference"]):
        torch.testing.assert_close(a, e)
    y = P.fake_quantize(x, s, zp, bits=4, per_channel_axis=0, signed=False, grad_factor=1.0, backend="cpu")
    full = torch.autograd.grad((y * torch.arange(60.0).reshape(6, 10)).sum(), (x, s, zp))
    torch.testing.assert_close(outs["cpu"][1] * 4, full[1])
    torch.testing.assert_close(outs["cpu"][2] * 4, full[2])
    torch.testing.assert_close(outs["cpu"][0], full[0])


def test_fake_quantize_scale_dtype_may_differ_and_grads_keep_it():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    s = torch.full((4,), 0.05, dtype=torch.float32, requires_grad=True)
    y = P.fake_quantize(x, s, None, bits=4, per_channel_axis=0, backend="cpu")
    (gs,) = torch.autograd.grad(y.float().sum(), s)
    assert y.dtype == torch.bfloat16 and gs.dtype == torch.float32 and gs.shape == (4,)


def test_fake_quantize_nan_inf_and_empty():
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.3, -5.0])
    s = torch.tensor(0.1)
    for bits, signed in ((4, True), (1, True), (2, False)):
        got = P.fake_quantize(x, s, bits=bits, signed=signed, backend="cpu")
        torch.testing.assert_close(got, ref.fake_quantize(x, s, None, bits, None, signed), equal_nan=True)
        g = torch.ones(5)
        a = OPS.fake_quantize_backward(g, x, s, None, bits, None, signed, 1.0, [True, True, False])
        e = ref.fake_quantize_backward(g, x, s, None, bits, None, signed, 1.0, [True, True, False])
        torch.testing.assert_close(a[0], e[0], equal_nan=True)
        assert math.isnan(a[1].item()) and math.isnan(e[1].item())  # NaN x: the scale gradient is NaN
    e = torch.empty(0, 4)
    sc = torch.full((4,), 0.1)
    assert P.fake_quantize(e, sc, per_channel_axis=1, backend="cpu").shape == (0, 4)
    gx, gs, gz = OPS.fake_quantize_backward(e, e, sc, None, 8, 1, True, 1.0, [True, True, True])
    assert gx.shape == (0, 4) and torch.equal(gs, torch.zeros(4)) and gz.numel() == 0


def test_backward_is_independent_of_the_thread_count():
    x, s, zp = _fq_case((4, 300_000), torch.float32, 4, False, None, True)
    g = torch.randn(4, 300_000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.fake_quantize_backward(g, x, s, zp, 4, None, False, 1.0, [True, True, True])
        torch.set_num_threads(max(2, old))
        many = OPS.fake_quantize_backward(g, x, s, zp, 4, None, False, 1.0, [True, True, True])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_lsq_grad_factor():
    assert Q.lsq_grad_factor(1000, 4) == pytest.approx(1 / math.sqrt(1000 * 7))
    assert Q.lsq_grad_factor(10, 1, signed=True) == pytest.approx(1 / math.sqrt(10))
    assert Q.lsq_grad_factor(10, 2, signed=False) == pytest.approx(1 / math.sqrt(30))


# ---- 3. opcheck, compile ---------------------------------------------------------------------------------------


def test_opcheck_all_four():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    torch.library.opcheck(OPS.fda_sign.default, (x, 7, 0.2, "approx_sign", 1.5))
    torch.library.opcheck(OPS.fda_sign_backward.default, (g, x.detach(), 7, 0.2, "fda", 1.0))
    s = torch.full((6,), 0.1, dtype=torch.float64, requires_grad=True)
    z = torch.full((6,), 2.0, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.fake_quantize.default, (x, s, z, 3, 1, False, 0.5))
    torch.library.opcheck(OPS.fake_quantize.default, (x, s[:1].detach().reshape(()), None, 8, None, True, 1.0))
    torch.library.opcheck(OPS.fake_quantize_backward.default,
                          (g, x.detach(), s.detach(), z.detach(), 3, 1, False, 0.5, [True, True, True]))


def test_torch_compile_fullgraph():
    def f(x, s):
        return P.fake_quantize(P.fda_sign(x, backend="cpu") * x, s, bits=4, backend="cpu").sum()

    x = torch.randn(8, 8, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    eager = torch.autograd.grad(f(x, s), (x, s))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, s), (x, s))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# ---- 4. bad input ------------------------------------------------------------------------------------------------


BAD_FDA = [
    (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "x"),
    (dict(n_terms=0), ValueError, "n_terms"),
    (dict(n_terms=10_001), ValueError, "n_terms"),
    (dict(n_terms=2.5), TypeError, "n_terms"),
    (dict(omega=0.0), ValueError, "omega"),
    (dict(omega=math.nan), ValueError, "omega"),
    (dict(surrogate="sigmoid"), ValueError, "surrogate"),
    (dict(clip=0.0), ValueError, "clip"),
    (dict(clip=math.nan), ValueError, "clip"),
]


@pytest.mark.parametrize("bad,exc,word", BAD_FDA, ids=lambda v: str(v)[:30])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fda_sign_bad_input(bad, exc, word, backend):
    kw = dict(x=torch.ones(3), n_terms=10, omega=0.1, surrogate="fda", clip=1.0)
    kw.update(bad)
    x = kw.pop("x")
    with pytest.raises(exc, match=rf"slimops\.fda_sign: .*{word}"):
        P.fda_sign(x, **kw, backend=backend)


def test_raw_cpp_fda_ops_name_the_argument():
    x = torch.ones(3)
    with pytest.raises(ValueError, match=r"slimops\.fda_sign: omega"):
        OPS.fda_sign(x, 10, -1.0, "fda", 1.0)
    with pytest.raises(ValueError, match=r"slimops\.fda_sign_backward: unknown surrogate"):
        OPS.fda_sign_backward(x, x, 10, 0.1, "nope", 1.0)
    with pytest.raises(ValueError, match=r"slimops\.fda_sign_backward: grad has shape"):
        OPS.fda_sign_backward(torch.ones(4), x, 10, 0.1, "fda", 1.0)


def _fq_kw(**over):
    kw = dict(x=torch.randn(4, 5), scale=torch.full((4,), 0.1), zero_point=None, bits=4, per_channel_axis=0,
              signed=True, grad_factor=1.0)
    kw.update(over)
    return kw


BAD_FQ = [
    (_fq_kw(x=torch.ones(4, 5, dtype=torch.int32)), TypeError, "x"),
    (_fq_kw(bits=0), ValueError, "bits"),
    (_fq_kw(bits=17), ValueError, "bits"),
    (_fq_kw(bits=True), TypeError, "bits"),
    (_fq_kw(per_channel_axis=2), ValueError, "per_channel_axis"),
    (_fq_kw(scale=torch.full((5,), 0.1)), ValueError, "scale"),
    (_fq_kw(scale=torch.full((4, 1), 0.1)), ValueError, "scale"),
    (_fq_kw(per_channel_axis=None), ValueError, "scale"),
    (_fq_kw(scale=torch.full((4,), 1, dtype=torch.int64)), TypeError, "scale"),
    (_fq_kw(scale=torch.full((4,), 0.1, device="meta")), ValueError, "scale"),
    (_fq_kw(zero_point=torch.zeros(3)), ValueError, "zero_point"),
    (_fq_kw(zero_point=torch.zeros(4), bits=1), ValueError, "zero_point"),
    (_fq_kw(signed=1), TypeError, "signed"),
    (_fq_kw(grad_factor=math.inf), ValueError, "grad_factor"),
]


# Ids that do not print the (random) tensors: pytest-xdist's workers must collect the same names.
@pytest.mark.parametrize("kw,exc,word", BAD_FQ, ids=[f"{i}-{word}" for i, (_, _, word) in enumerate(BAD_FQ)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fake_quantize_bad_input(kw, exc, word, backend):
    kw = dict(kw)
    x, scale, zp = kw.pop("x"), kw.pop("scale"), kw.pop("zero_point")
    with pytest.raises(exc, match=rf"slimops\.fake_quantize: .*{word}"):
        P.fake_quantize(x, scale, zp, **kw, backend=backend)


def test_raw_cpp_fake_quantize_names_the_argument():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"slimops\.fake_quantize: scale must have shape \(4,\)"):
        OPS.fake_quantize(x, torch.ones(5), None, 4, 0, True, 1.0)
    with pytest.raises(ValueError, match=r"slimops\.fake_quantize: bits"):
        OPS.fake_quantize(x, torch.ones(()), None, 20, None, True, 1.0)
    with pytest.raises(ValueError, match=r"slimops\.fake_quantize_backward: grad has shape"):
        OPS.fake_quantize_backward(torch.ones(3), x, torch.ones(()), None, 4, None, True, 1.0, [True, True, True])
