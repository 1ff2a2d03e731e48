"""The Triton kernels of the quant family (slimops/triton/quant.py) against the C++ CPU kernels and the reference
twins. Runs through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set here, before anything imports
triton). With ``TRITON_INTERPRET=0`` set explicitly and a GPU present, the same tests run the compiled kernels on
CUDA tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import slimops.ops as P  # noqa: E402
from slimops.reference import quant as ref  # noqa: E402
from slimops.triton import _common as _tcommon, quant as tq  # noqa: E402,F401  (registers slimops_triton.*)

INTERPRETED = _tcommon.INTERPRETED
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU")
OPS = torch.ops.slimops_triton
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("surrogate", ref.SURROGATES)
def test_fda_sign_matches_reference(dtype, surrogate):
    x = _randn((3, 700), dtype, 1, 3.0)
    x[0, :5] = 0
    x[1, :3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    g = _randn((3, 700), dtype, 2)
    assert torch.equal(OPS.fda_sign(x, 10, 0.1, surrogate, 1.0).nan_to_num(5), ref.fda_sign(x).nan_to_num(5))
    for clip in (1.0, math.inf):
        got = OPS.fda_sign_backward(g, x, 13, 0.4, surrogate, clip)
        truth = ref.fda_sign_backward(g.double(), x.double(), 13, 0.4, surrogate, clip)
        assert got.dtype == dtype
        fin = torch.isfinite(truth)
        assert torch.equal(fin, torch.isfinite(got)) and torch.equal(truth.isnan(), got.isnan())
        # fp32 math in both; the closed form vs the direct sum differ by a few ulp of (4ω/π)·n_terms
        unit = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        scale = (4 * 0.4 / math.pi) * 13 if surrogate == "fda" else 1.0
        err = (got.double() - truth).abs()[fin]
        assert (err <= unit * scale * (1 + g.double().abs()[fin])).all(), err.max()


CASES = [
    ((64, 33), 8, True, None, False),
    ((8, 6, 3, 3), 4, True, 0, False),
    ((8, 6, 3, 3), 3, False, 3, True),
    ((5, 2100), 8, False, None, True),  # three programs per row
    ((3, 7, 11), 1, True, 1, False),
    ((3, 7, 11), 1, False, None, True),
    ((), 2, True, None, False),
    ((0, 4), 4, True, 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{'s' if c[2] else 'u'}-ax{c[3]}-z{int(c[4])}")
def test_fake_quantize_matches_cpu_and_reference(dtype, case):
    shape, bits, signed, axis, with_zp = case
    x = _randn(shape, dtype, 3, 1.5)
    n = 1 if axis is None else shape[axis]
    qn, qp = ref.levels(bits, signed)
    s = (torch.rand(n, dtype=torch.float64) * 2.0 / qp + 0.02).float().to(DEVICE)
    zp = (torch.rand(n, dtype=torch.float64) * (qp - qn) * 0.5 + qn + 0.3).float().to(DEVICE) if with_zp else None
    if axis is None:
        s = s.reshape(())
        zp = zp.reshape(()) if zp is not None else None
    y = OPS.fake_quantize(x, s, zp, bits, axis, signed, 0.5)
    torch.testing.assert_close(y, ref.fake_quantize(x, s, zp, bits, axis, signed, 0.5), rtol=0, atol=0)
    g = _randn(shape, dtype, 4)
    for m in ([True, True, True], [False, True, False], [True, False, True]):
        got = OPS.fake_quantize_backward(g, x, s, zp, bits, axis, signed, 0.5, m)
        exp = ref.fake_quantize_backward(g, x, s, zp, bits, axis, signed, 0.5, m)
        for a, b in zip(got, exp):
            assert a.shape == b.shape and a.dtype == b.dtype
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1, g.numel() ** 0.5))


def test_public_ops_pick_triton_and_differentiate():
    x = _randn((6, 40), torch.float32, 5).requires_grad_()
    s = torch.full((6,), 0.05, device=DEVICE, requires_grad=True)
    y = P.fake_quantize(P.fda_sign(x, backend="triton") * x, s, bits=4, per_channel_axis=0, backend="triton")
    gx, gs = torch.autograd.grad(y.sum(), (x, s))
    y2 = P.fake_quantize(P.fda_sign(x, backend="reference") * x, s, bits=4, per_channel_axis=0, backend="reference")
    rx, rs = torch.autograd.grad(y2.sum(), (x, s))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    x = _randn((4, 5), torch.float32, 6)
    with pytest.raises(ValueError, match=r"slimops\.fake_quantize: scale must have shape \(4,\)"):
        OPS.fake_quantize(x, torch.ones(5, device=DEVICE), None, 4, 0, True, 1.0)
    with pytest.raises(ValueError, match=r"slimops\.fda_sign_backward: unknown surrogate"):
        OPS.fda_sign_backward(x, x, 10, 0.1, "nope", 1.0)


def test_fda_reduction_rounds_like_the_cpu_kernel_for_large_arguments():
    """u/π between 2^22 and 2^23 (fp32): the Triton round-half-to-even must round there too (the CPU kernel's
    nearbyint does), or the (-1)^k sign of the closed form flips."""
    x = torch.linspace(1.3e8, 2.6e8, 4096, dtype=torch.float32)
    g = torch.ones_like(x)
    got = OPS.fda_sign_backward(g.to(DEVICE), x.to(DEVICE), 10, 0.1, "fda", math.inf).cpu()
    cpu = torch.ops.slimops.fda_sign_backward(g, x, 10, 0.1, "fda", math.inf)
    torch.testing.assert_close(got, cpu, rtol=1e-4, atol=1e-4)
