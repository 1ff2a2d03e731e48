"""The spectral family's public ops and C++ kernels (slimops.ops.spectral, csrc/cpu/spectral.cpp) against the
torch.fft reference twin (slimops.reference.spectral).

1. Values and gradients (every output_mask) equal the reference on random shapes: odd and non-square grids,
   1xN and Nx1, one channel, channel counts that are not a multiple of the 16-wide blocks, non-contiguous x,
   weights of another dtype than x; float32/float64 tight, bfloat16/float16 within 2x of torch's own error.
2. float64 gradcheck of both ops through the public functions (autograd registered on the C++ op).
3. ``torch.library.opcheck`` on all four ops; torch.compile(fullgraph=True) forward and backward.
4. Bad input: clear errors naming the op and the argument, from the Python layer and from the raw C++ ops.
5. The kernels' GPU backends (CUDA cuFFT, Triton) against the reference, where a GPU is present.
"""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops.ops import spectral as S
from slimops.reference import spectral as ref
from tests.conftest import assert_close_lowp, device_params

OPS = torch.ops.slimops

SHAPES = [  # (B, H, W, C)
    (2, 7, 7, 5),
    (3, 14, 14, 40),
    (2, 5, 8, 17),   # non-square, even W
    (1, 1, 9, 3),    # 1 x N
    (2, 6, 1, 4),    # N x 1
    (1, 9, 4, 1),    # one channel
    (2, 12, 11, 70),  # channels past one 64-wide block
]


def _filter_inputs(shape, dtype=torch.float64, wdtype=None, device="cpu"):
    b, h, w, c = shape
    x = torch.randn(b, h, w, c, dtype=dtype, device=device)
    k = torch.randn(h, w // 2 + 1, c, 2, dtype=wdtype or dtype, device=device)
    return x, k


def _aff_inputs(shape, blocks, hidden_factor=1, dtype=torch.float64, wdtype=None, device="cpu", scale=0.3):
    b, h, w, c = shape
    cb = c // blocks
    hb = max(1, int(round(cb * hidden_factor)))
    wd = wdtype or dtype
    x = torch.randn(b, h, w, c, dtype=dtype, device=device)

    def r(*s, sc=scale):
        return (torch.randn(*s, dtype=torch.float64) * sc).to(device=device, dtype=wd)

    return x, r(2, blocks, cb, hb), r(2, blocks, hb, sc=0.1), r(2, blocks, hb, cb), r(2, blocks, cb, sc=0.1)


def _blocks_for(c):
    return next(k for k in (4, 3, 2, 1) if c % k == 0)


def _close(a, b, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- 1. values and gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_filter_matches_reference(shape, dtype):
    x, k = _filter_inputs(shape, dtype)
    _close(S.spectral_filter(x, k, backend="cpu"), ref.spectral_filter(x, k), dtype)
    g = torch.randn_like(x)
    for mask in ([True, True], [True, False], [False, True]):
        got = OPS.spectral_filter_backward(g, x, k, mask)
        want = ref.spectral_filter_backward(g, x, k, mask)
        for a, b, m in zip(got, want, mask):
            assert a.dtype == b.dtype
            if m:
                _close(a, b, dtype)
            else:
                assert a.numel() == 0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hidden_factor", [1, 2, 0.5])
def test_adaptive_matches_reference(shape, hidden_factor):
    blocks = _blocks_for(shape[3])
    args = _aff_inputs(shape, blocks, hidden_factor)
    # shrink 0.05: the softshrink dead zone is hit by some entries, so its gradient mask is exercised.
    y = S.adaptive_spectral_filter(*args, blocks=blocks, shrink=0.05, backend="cpu")
    _close(y, ref.adaptive_spectral_filter(*args, blocks=blocks, shrink=0.05), torch.float64)
    g = torch.randn_like(args[0])
    for mask in ([True] * 5, [True, False, False, False, False], [False, True, False, True, False],
                 [False, False, True, False, True]):
        got = OPS.adaptive_spectral_filter_backward(g, *args, blocks, 0.05, mask)
        want = ref.adaptive_spectral_filter_backward(g, *args, blocks, 0.05, mask)
        for a, b, m in zip(got, want, mask):
            assert a.dtype == b.dtype and (a.shape == b.shape)
            if m:
                _close(a, b, torch.float64)


@pytest.mark.parametrize("where", ["b1", "b2"])
def test_adaptive_backward_passes_gradients_through_nan_as_torch(where):
    """A NaN hidden unit (b1) or filter entry (b2): ReLU and softshrink pass the gradient through a NaN, as torch's
    relu and softshrink backward do, so the bias gradients there are finite sums, not zeros, and every gradient
    has torch's values and NaN pattern."""
    x, w1, b1, w2, b2 = _aff_inputs((2, 5, 6, 4), blocks=2)
    (b1 if where == "b1" else b2)[0, 0, 0] = float("nan")
    g = torch.randn_like(x)
    got = torch.ops.slimops.adaptive_spectral_filter_backward(g, x, w1, b1, w2, b2, 2, 0.01, [True] * 5)
    want = ref.adaptive_spectral_filter_backward(g, x, w1, b1, w2, b2, 2, 0.01, [True] * 5)
    for name, a, e in zip(("x", "w1", "b1", "w2", "b2"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, equal_nan=True, msg=lambda m: f"grad_{name}: {m}")
    bias_grad = got[2] if where == "b1" else got[4]
    assert torch.isfinite(bias_grad[0, 0, 0]) and bias_grad[0, 0, 0] != 0


def test_noncontiguous_and_mixed_weight_dtype():
    base = torch.randn(2, 8, 9, 12, dtype=torch.float32)
    x = base.permute(0, 2, 1, 3)  # (2, 9, 8, 12), not contiguous
    k = torch.randn(9, 5, 12, 2, dtype=torch.float64)  # weight in float64 while x is float32
    y = S.spectral_filter(x, k, backend="cpu")
    assert y.dtype == torch.float32
    _close(y, ref.spectral_filter(x.contiguous(), k), torch.float32)
    xg = x.detach().requires_grad_()
    kg = k.detach().requires_grad_()
    S.spectral_filter(xg, kg).square().sum().backward()
    assert kg.grad.dtype == torch.float64 and xg.grad.dtype == torch.float32
    xr, kr = x.detach().requires_grad_(), k.detach().requires_grad_()
    ref.spectral_filter(xr, kr).square().sum().backward()
    _close(xg.grad, xr.grad, torch.float32)
    torch.testing.assert_close(kg.grad, kr.grad, rtol=2e-5, atol=2e-4)


def test_empty_batch():
    x, k = _filter_inputs((0, 5, 6, 3))
    assert S.spectral_filter(x, k).shape == x.shape
    args = _aff_inputs((0, 5, 6, 4), 2)
    assert S.adaptive_spectral_filter(*args, blocks=2).shape == args[0].shape
    gx, gk = OPS.spectral_filter_backward(torch.zeros_like(x), x, k, [True, True])
    assert gx.shape == x.shape and torch.equal(gk, torch.zeros_like(k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torchs_error(dtype):
    """bf16/fp16 x with float32 weights (autocast-style): the kernel's error against the float64 truth is at most
    2x that of torch's own low-precision path (fp32 transforms of the low-precision input, rounded once)."""
    shape = (2, 14, 14, 24)
    x, k = _filter_inputs(shape, torch.float32)
    xl = x.to(dtype)
    got = S.spectral_filter(xl, k, backend="cpu")
    assert got.dtype == dtype
    assert_close_lowp(got, ref.spectral_filter(xl, k), ref.spectral_filter(xl.double(), k.double()), "spectral_filter")
    g = torch.randn(shape).to(dtype)
    gx, gk = OPS.spectral_filter_backward(g, xl, k, [True, True])
    rx, rk = ref.spectral_filter_backward(g, xl, k, [True, True])
    tx, tk = ref.spectral_filter_backward(g.double(), xl.double(), k.double(), [True, True])
    assert_close_lowp(gx, rx, tx, "grad_x")
    assert_close_lowp(gk, rk, tk, "grad_weight", floor=1e-4)
    args = _aff_inputs(shape, 4, dtype=torch.float32, scale=0.2)
    la = (args[0].to(dtype),) + args[1:]
    got = S.adaptive_spectral_filter(*la, blocks=4, backend="cpu")
    assert_close_lowp(got, ref.adaptive_spectral_filter(*la, blocks=4),
                      ref.adaptive_spectral_filter(*(t.double() for t in la), blocks=4), "adaptive")


def test_thread_count_does_not_change_results():
    x, k = _filter_inputs((4, 10, 10, 33), torch.float64)
    g = torch.randn_like(x)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.spectral_filter_backward(g, x, k, [True, True])
        torch.set_num_threads(max(2, n))
        two = OPS.spectral_filter_backward(g, x, k, [True, True])
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)


# ---- 2. gradcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 6, 3), (1, 1, 7, 2), (2, 4, 3, 5)], ids=str)
def test_gradcheck_spectral_filter(shape):
    x, k = _filter_inputs(shape)
    assert torch.autograd.gradcheck(lambda a, b: S.spectral_filter(a, b, backend="cpu"),
                                    (x.requires_grad_(), k.requires_grad_()))


@pytest.mark.parametrize("shape,blocks", [((2, 5, 6, 4), 2), ((1, 3, 1, 3), 1)], ids=str)
def test_gradcheck_adaptive(shape, blocks):
    # shrink 0: no kink of softshrink is met by the finite differences (ReLU kinks are measure-zero).
    args = [t.requires_grad_() for t in _aff_inputs(shape, blocks, 1.5)]
    assert torch.autograd.gradcheck(lambda *a: S.adaptive_spectral_filter(*a, blocks=blocks, shrink=0.0,
                                                                           backend="cpu"), args)


# ---- 3. opcheck and compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x, k = _filter_inputs((2, 5, 6, 3))
    x.requires_grad_(requires_grad)
    k.requires_grad_(requires_grad)
    torch.library.opcheck(OPS.spectral_filter, (x, k))
    torch.library.opcheck(OPS.spectral_filter_backward, (torch.randn(2, 5, 6, 3, dtype=torch.float64), x.detach(),
                                                         k.detach(), [True, True]))
    args = _aff_inputs((2, 5, 6, 4), 2)
    for t in args:
        t.requires_grad_(requires_grad)
    torch.library.opcheck(OPS.adaptive_spectral_filter, (*args, 2, 0.01))
    torch.library.opcheck(OPS.adaptive_spectral_filter_backward,
                          (torch.randn(2, 5, 6, 4, dtype=torch.float64), *(t.detach() for t in args), 2, 0.01,
                           [True, True, False, True, True]))


def test_compile_fullgraph_training_matches_eager():
    x, k = _filter_inputs((2, 6, 5, 4), torch.float32)
    args = _aff_inputs((2, 6, 5, 4), 2, dtype=torch.float32)

    def loss(x, k, w1, b1, w2, b2):
        y = S.spectral_filter(x, k)
        return S.adaptive_spectral_filter(y, w1, b1, w2, b2, blocks=2).sum()

    def grads(fn):
        ts = [t.detach().clone().requires_grad_() for t in (x, k, *args[1:])]
        fn(*ts).backward()
        return [t.grad for t in ts]

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    for a, b in zip(grads(compiled), grads(loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- 4. bad input ---------------------------------------------------------------------------------------


def _bad_filter_cases():
    x, k = _filter_inputs((2, 6, 8, 3), torch.float32)
    return [
        ("weight must have shape", ValueError, (x, k[:, :4])),                      # W//2+1 wrong
        ("weight must have shape", ValueError, (x, k[..., :1])),                    # not (.., 2)
        ("weight has 4 channels but x has 3", ValueError, (x, torch.randn(6, 5, 4, 2))),
        ("x must be 4-D", ValueError, (x[0], k)),
        ("x must be real", TypeError, (torch.randn(2, 6, 8, 3, dtype=torch.complex64), k)),
        ("x must be a floating-point", TypeError, (torch.ones(2, 6, 8, 3, dtype=torch.int32), k)),
        ("weight must be real", TypeError, (x, torch.view_as_complex(k.contiguous()))),
        ("x must have H, W, C >= 1", ValueError, (torch.randn(2, 6, 8, 0), torch.randn(6, 5, 0, 2))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_filter_cases())))
def test_bad_input_spectral_filter(case):
    msg, exc, args = _bad_filter_cases()[case]
    with pytest.raises(exc, match=f"slimops.spectral_filter: {msg}"):
        S.spectral_filter(*args)
    with pytest.raises(exc, match=f"slimops.spectral_filter: {msg}"):
        OPS.spectral_filter(*args)


def _bad_adaptive_cases():
    x, w1, b1, w2, b2 = _aff_inputs((2, 5, 6, 8), 4, dtype=torch.float32)
    return [
        ("blocks \\(3\\) must divide the channels of x \\(8\\)", ValueError, (x, w1, b1, w2, b2), 3, 0.01),
        ("w1 has 4 blocks but blocks=2", ValueError, (x, w1, b1, w2, b2), 2, 0.01),
        ("w1 has 1 channels per block", ValueError, (x, w1[:, :, :1], b1, w2, b2), 4, 0.01),
        ("b1 must have shape", ValueError, (x, w1, b1[:, :, :1], w2, b2), 4, 0.01),
        ("w2 must have shape", ValueError, (x, w1, b1, w2.transpose(2, 3)[:, :, :1], b2), 4, 0.01),
        ("b2 must have shape", ValueError, (x, w1, b1, w2, b2[:1]), 4, 0.01),
        ("shrink must be a finite float >= 0", ValueError, (x, w1, b1, w2, b2), 4, -0.1),
        ("blocks must be a positive int", ValueError, (x, w1, b1, w2, b2), 0, 0.01),
        ("x must be real", TypeError, (x.to(torch.complex64), w1, b1, w2, b2), 4, 0.01),
        ("w1 must be a floating-point", TypeError, (x, w1.to(torch.int64), b1, w2, b2), 4, 0.01),
    ]


@pytest.mark.parametrize("case", range(len(_bad_adaptive_cases())))
def test_bad_input_adaptive(case):
    msg, exc, tensors, blocks, shrink = _bad_adaptive_cases()[case]
    with pytest.raises(exc, match=f"slimops.adaptive_spectral_filter: {msg}"):
        S.adaptive_spectral_filter(*tensors, blocks=blocks, shrink=shrink)
    if blocks >= 1 or "positive" in msg:
        with pytest.raises(exc, match=f"slimops.adaptive_spectral_filter: {msg}"):
            OPS.adaptive_spectral_filter(*tensors, blocks, shrink)


def test_bad_input_backward_and_backend():
    x, k = _filter_inputs((2, 6, 8, 3), torch.float32)
    with pytest.raises(ValueError, match="slimops.spectral_filter_backward: grad must have the shape of x"):
        OPS.spectral_filter_backward(x[:1], x, k, [True, True])
    with pytest.raises(ValueError, match="slimops.spectral_filter: unknown backend 'nope'"):
        S.spectral_filter(x, k, backend="nope")
    with pytest.raises(RuntimeError, match="slimops.spectral_filter: backend 'cuda' cannot run"):
        S.spectral_filter(x, k, backend="cuda")
    big = torch.randn(1, 65, 8, 3)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: the fused Triton kernel covers grids up to 64x64"):
        S.spectral_filter(big, torch.randn(65, 5, 3, 2), backend="triton")


@pytest.mark.gpu
def test_wrong_device():
    x, k = _filter_inputs((2, 6, 8, 3), torch.float32)
    with pytest.raises(ValueError, match="slimops.spectral_filter: weight is on"):
        S.spectral_filter(x.cuda(), k)


# ---- 5. GPU backends ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(2, 7, 7, 40), (2, 14, 9, 17), (1, 1, 12, 3), (2, 70, 66, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_reference(backend, shape, dtype):
    if backend == "triton" and max(shape[1:3]) > S.MAX_FUSED_GRID:
        pytest.skip("grid beyond the fused kernel")
    x, k = _filter_inputs(shape, torch.float32, device="cuda")
    xl = x.to(dtype)
    y = S.spectral_filter(xl, k, backend=backend)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref.spectral_filter(xl, k), rtol=1e-4, atol=1e-4)
    else:
        assert_close_lowp(y, ref.spectral_filter(xl, k), ref.spectral_filter(xl.double(), k.double()), backend)
    g = torch.randn_like(x)
    got = torch.ops.slimops.spectral_filter_backward(g, x, k, [True, True]) if backend == "cuda" else \
        slimops._backend.triton_op("spectral_filter_backward")(g, x, k, [True, True])
    for a, b in zip(got, ref.spectral_filter_backward(g, x, k, [True, True])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    blocks = _blocks_for(shape[3])
    args = _aff_inputs(shape, blocks, dtype=torch.float32, device="cuda", scale=0.2)
    torch.testing.assert_close(S.adaptive_spectral_filter(*args, blocks=blocks, backend=backend),
                               ref.adaptive_spectral_filter(*args, blocks=blocks), rtol=1e-3, atol=1e-3)
    fn = torch.ops.slimops.adaptive_spectral_filter_backward if backend == "cuda" else \
        slimops._backend.triton_op("adaptive_spectral_filter_backward")
    got = fn(g, *args, blocks, 0.01, [True] * 5)
    for a, b in zip(got, ref.adaptive_spectral_filter_backward(g, *args, blocks, 0.01, [True] * 5)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_auto_on_cpu_takes_torch_fft_beyond_the_dense_dft_range():
    """The C++ kernel's dense DFT up to 64x64, torch.fft (the reference) beyond, where it is faster; results agree."""
    small, _ = _filter_inputs((1, 64, 64, 2), torch.float32)
    assert S.pick("spectral_filter", "auto", small)[0] == "cpu"
    x, k = _filter_inputs((1, 65, 40, 2), torch.float32)
    assert S.pick("spectral_filter", "auto", x)[0] == "reference"
    assert S.pick("spectral_filter", "cpu", x)[0] == "cpu"  # a forced backend still runs
    _close(S.spectral_filter(x, k), S.spectral_filter(x, k, backend="cpu"), torch.float32)
    xa, *params = _aff_inputs((1, 70, 8, 4), blocks=2, dtype=torch.float32)
    assert S.pick("adaptive_spectral_filter", "auto", xa, 2)[0] == "reference"


@pytest.mark.gpu
def test_auto_picks_triton_small_and_cuda_large():
    x, k = _filter_inputs((1, 14, 14, 8), torch.float32, device="cuda")
    assert S.pick("spectral_filter", "auto", x)[0] in ("triton", "cuda")
    big = torch.randn(1, 96, 96, 8, device="cuda")
    assert S.pick("spectral_filter", "auto", big)[0] == "cuda"
