"""The channel_conv family (``channel_conv2d``, ``masked_conv2d``) through the public ops: the C++ CPU backend
(``backend="cpu"``, and ``"auto"`` on CPU tensors) and the ``"reference"`` backend against the reference twins
of ``slimops/reference/channel_conv.py``.

1. Values and all three gradients (autograd through the public op, and the two backward ops called directly
   with every ``output_mask``) equal the reference on awkward shapes: odd sizes, one channel, unsorted and
   single-element index sets, empty ``in_idx`` / ``out_idx``, k = 1/3/5 and non-square kernels, stride 2,
   dilation 2, asymmetric pairs, ``input_gathered``, no bias, batch 1 and batch above the thread count,
   non-contiguous x; masks all-true, all-false, random.
   float32/float64: the reference's tolerance ``TOL``, applied to the conditioning of each sum (below).
   bfloat16/float16: error against a float64 truth at most 2x the reference's own (conftest.assert_close_lowp).
2. float64 ``gradcheck`` of both ops (no gradgradcheck: the backward ops are not differentiable).
3. ``torch.library.opcheck`` on the four ``torch.ops.slimops`` ops of the family.
4. ``torch.compile(fullgraph=True)`` matches eager.
5. Bad input: an error naming the op and the argument, from the public op and from the raw C++ op.
6. One thread and two threads give the same results.

Why the float32 tolerance is scaled: kernel and reference sum the same terms in a different order (a GEMM
over im2col tiles or the AVX2 direct kernel vs oneDNN); reordering a sum of n terms moves it by a few ulps
of ``sum |term|``, not of ``|sum|`` (which cancellation makes small; grad_weight sums over N * OH * OW
pixels). So an element may differ by ``atol + rtol * (|expected| + sum |term|)``, with (rtol, atol) =
``TOL[dtype]`` and ``sum |term|`` the same op evaluated in float64 on ``|x|``, ``|weight|``, ``|bias|``
(``|grad_out|``). A wrong tap, channel or offset is off by a whole term: orders of magnitude above that.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import slimops  # noqa: F401  (registers torch.ops.slimops.*)
import slimops.ops as P
from slimops import _backend
from slimops.reference import channel_conv as ref

from conftest import ALL_FLOATS, LOWP, TOL, assert_close_lowp

ERRORS = (ValueError, TypeError, RuntimeError)
OUTPUT_MASKS = [list(m) for m in itertools.product((False, True), repeat=3)]
GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")
OPS = torch.ops.slimops


# =============================================================================================
# helpers
# =============================================================================================


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "channels_last":
        out = x.contiguous(memory_format=torch.channels_last)
    elif how == "sliced":  # every other column of a wider tensor, at an offset
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        big[..., 1::2] = x
        out = big[..., 1::2]
    elif how == "contig":
        return x
    else:
        raise AssertionError(how)
    assert not out.is_contiguous() or x.shape[1] <= 1 or x.numel() == 0
    assert torch.equal(out, x)
    return out


def _pair(v):
    return list(ref.pair(v))


def _pick(spec, n: int) -> torch.Tensor:
    """An index set: a list, or an int k for k random distinct channels in random (unsorted) order."""
    if isinstance(spec, int):
        return torch.randperm(n)[:spec]
    return torch.tensor(spec, dtype=torch.int64)


def _check(actual, expected, truth, absum, what):
    """``expected``: the reference in the same dtype; ``truth``: float64 reference; ``absum``: float64 sum of
    the absolute terms of each element (see the module docstring)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.dtype in LOWP:
        assert_close_lowp(actual, expected, truth, msg=what)
        return
    rtol, atol = TOL[actual.dtype]
    e = expected.double()
    err = (actual.double() - e).abs()
    bound = atol + rtol * (e.abs() + absum.double())
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst error "
                           f"{err.max().item():.3g} (bound there {bound.flatten()[err.argmax()].item():.3g})")


def _check_grads(actual, expected, truth, absum, mask, what):
    for name, a, e, t, s, m in zip(GRAD_NAMES, actual, expected, truth, absum, mask):
        if not m:
            assert a.numel() == 0, f"{what} {name}: not requested but has shape {tuple(a.shape)}"
            continue
        _check(a, e, t, s, f"{what} {name}")


# =============================================================================================
# channel_conv2d cases
# =============================================================================================

# n, c_in, (h, w), c_out, (kh, kw), stride, padding, dilation, in_idx, out_idx, gathered, bias, layout.
# An index set is a list, or an int k for k random distinct channels in random order.
CHANNEL_CASES = {
    "k3_basic": (2, 5, (7, 6), 6, (3, 3), 1, 1, 1, [3, 0, 4], [5, 1], False, True, "contig"),
    "k1_odd": (3, 3, (5, 7), 4, (1, 1), 1, 0, 1, [2, 0], [3, 0, 2], False, True, "contig"),
    "k5_pad2_batch1": (1, 4, (9, 8), 3, (5, 5), 1, 2, 1, 3, 2, False, False, "contig"),
    "stride2_channels_last": (2, 6, (9, 7), 5, (3, 3), 2, 1, 1, 4, 3, False, True, "channels_last"),
    "dilation2_pad2": (2, 4, (9, 9), 4, (3, 3), 1, 2, 2, 2, 4, False, True, "contig"),
    "asym_sliced": (1, 5, (10, 9), 4, (3, 5), (2, 1), (0, 2), (1, 2), 3, 3, False, True, "sliced"),
    "stride_w2": (2, 3, (8, 11), 5, (2, 3), (1, 2), (1, 0), (2, 1), [1, 2], [4, 0, 3], False, True, "contig"),
    "one_channel": (2, 1, (6, 5), 1, (3, 3), 1, 1, 1, [0], [0], False, True, "contig"),
    "single_idx": (1, 6, (5, 5), 7, (3, 3), 1, 0, 1, [4], [6], False, True, "contig"),
    "gathered": (2, 7, (7, 6), 5, (3, 3), 1, 1, 1, [6, 1, 3], [4, 0, 2], True, True, "contig"),
    "gathered_stride2_nobias": (1, 5, (8, 9), 3, (3, 3), 2, 0, 1, 4, 2, True, False, "sliced"),
    "empty_in": (2, 4, (5, 5), 3, (3, 3), 1, 1, 1, [], [2, 0], False, True, "contig"),
    "empty_in_gathered": (2, 4, (5, 5), 3, (3, 3), 1, 1, 1, [], [2, 0], True, True, "contig"),
    "empty_out": (2, 4, (6, 5), 3, (3, 3), 1, 1, 1, [1, 3], [], False, True, "contig"),
    "exact_fit_1x1": (3, 3, (3, 5), 2, (3, 5), 1, 0, 1, [2, 1], [1], False, True, "contig"),
    # batch above the thread count; several 6-row output blocks and 16-pixel blocks with a tail
    "batch5_wide": (5, 11, (6, 37), 14, (3, 3), 1, 1, 1, 9, 13, False, True, "channels_last"),
    # the im2col tiles of 256 KB split the output rows (float64 forward, every backward)
    "tiled": (2, 16, (40, 40), 4, (3, 3), 1, 1, 1, 16, 3, False, True, "contig"),
    # rows >= 4 pixels (direct_conv.h's AVX-512 grad_w): 67 kept rows = a 48-row block and a 32-row one whose
    # last 13 lanes are padding; 36 rows at vertical stride 2 (one 48-row block)
    "gw_row_blocks": (2, 4, (9, 16), 70, (3, 3), 1, 1, 1, 3, 67, False, True, "contig"),
    "gw_stride_h2": (2, 3, (11, 15), 40, (3, 3), (2, 1), 1, 1, 3, 36, False, False, "contig"),
    # grad_x of strided convs by phases (direct_gx_strided.h): 3x3 stride 3 (nine one-tap phases) over 14 rows in
    # two paired blocks; a 1x1 stride 2 (three phases without taps: zeros); stride 4 past a 3x3 kernel with
    # padding 2 (input pixels no output reads); 5x5 at stride (3, 2) with asymmetric padding
    "gx_phases_s3": (2, 5, (13, 11), 14, (3, 3), 3, 1, 1, 4, 14, False, True, "contig"),
    "gx_phases_k1_s2": (2, 6, (9, 8), 4, (1, 1), 2, 0, 1, 5, 3, False, True, "sliced"),
    "gx_phases_s4_pad2": (1, 3, (10, 9), 5, (3, 3), 4, 2, 1, 3, 5, False, True, "contig"),
    "gx_phases_k5_s32": (2, 4, (12, 13), 6, (5, 5), (3, 2), (2, 1), 1, 4, 6, False, True, "contig"),
}
FAST_CASES = [c for c in CHANNEL_CASES if c != "tiled"]


def _channel_inputs(case, dtype):
    n, c_in, (h, w), c_out, k, stride, padding, dilation, in_spec, out_spec, gathered, has_bias, layout = case
    in_idx, out_idx = _pick(in_spec, c_in), _pick(out_spec, c_out)
    cx = in_idx.numel() if gathered else c_in
    x = _layout(_rand((n, cx, h, w), dtype), layout)
    weight = _rand((c_out, c_in, *k), dtype, scale=0.3)
    bias = _rand((c_out,), dtype) if has_bias else None
    return x, weight, bias, in_idx, out_idx, (_pair(stride), _pair(padding), _pair(dilation)), gathered


def _channel_expected(go, x, weight, bias, in_idx, out_idx, geo, gathered, mask=(True, True, True)):
    """(y, grads) of the reference in x's dtype, in float64 (truth), and their absolute-term sums."""
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    absf = lambda t: None if t is None else t.double().abs()  # noqa: E731
    out = []
    for cast in ((lambda t: t), f64, absf):
        y = ref.channel_conv2d(cast(x), cast(weight), cast(bias), in_idx, out_idx, *geo, gathered)
        g = ref.channel_conv2d_backward(cast(go), cast(x), cast(weight), in_idx, out_idx, *geo, gathered, list(mask))
        out.append((y, g))
    return out


def _grad_out(shape, dtype, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _autograd(fn, x, weight, bias, go):
    """fn's output and the grads of x, weight and bias (None bias: an empty grad) for the upstream ``go``."""
    xr = x.detach().clone().requires_grad_()
    wr = weight.detach().clone().requires_grad_()
    br = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(xr, wr, br)
    y.backward(go)
    # an input the result does not depend on (the reference backend with an empty index set) gets no
    # .grad at all: autograd's zero
    zero_if_none = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731
    return y.detach(), (zero_if_none(xr), zero_if_none(wr), None if br is None else zero_if_none(br))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("name", list(CHANNEL_CASES))
def test_channel_conv2d_matches_reference(name, dtype, backend):
    """Values, and the three gradients by autograd through the public op."""
    if backend == "reference" and name == "tiled":
        pytest.skip("nothing tiled in the reference")
    x, weight, bias, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES[name], dtype)
    go = _grad_out((x.shape[0], oo.numel(), *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)), dtype)
    fn = lambda a, w, b: P.channel_conv2d(a, w, b, ii, oo, *geo, input_gathered=gathered, backend=backend)  # noqa: E731
    y, grads = _autograd(fn, x, weight, bias, go)
    (y_ref, g_ref), (y64, g64), (y_abs, g_abs) = _channel_expected(go, x, weight, bias, ii, oo, geo, gathered)
    what = f"{name} {dtype} {backend}"
    _check(y, y_ref, y64, y_abs, f"{what} y")
    if bias is None:
        assert grads[2] is None
        grads, g_ref, g64, g_abs = grads[:2], g_ref[:2], g64[:2], g_abs[:2]
    _check_grads(grads, g_ref, g64, g_abs, (True,) * 3, what)
    # gradients are full-size and exactly zero outside the kept block
    keep_in = torch.zeros(weight.shape[1], dtype=torch.bool)
    keep_in[ii] = True
    keep_out = torch.zeros(weight.shape[0], dtype=torch.bool)
    keep_out[oo] = True
    if not gathered:
        assert (grads[0][:, ~keep_in] == 0).all()
    assert (grads[1][~keep_out] == 0).all() and (grads[1][:, ~keep_in] == 0).all()
    if bias is not None:
        assert (grads[2][~keep_out] == 0).all()


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("name", FAST_CASES)
def test_channel_conv2d_backward_op_every_output_mask(name, dtype):
    """``torch.ops.slimops.channel_conv2d_backward`` called directly: every ``output_mask``; a gradient
    not asked for is an empty tensor."""
    x, weight, bias, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES[name], dtype)
    go = _grad_out((x.shape[0], oo.numel(), *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)), dtype)
    (_, g_ref), (_, g64), (_, g_abs) = _channel_expected(go, x, weight, bias, ii, oo, geo, gathered)
    for mask in OUTPUT_MASKS:
        grads = OPS.channel_conv2d_backward(go, x, weight, ii, oo, *geo, gathered, mask)
        _check_grads(grads, g_ref, g64, g_abs, mask, f"{name} {dtype} output_mask={mask}")


def test_channel_conv2d_backward_op_non_contiguous_grad_out_and_int32_indices():
    x, weight, _, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float32)
    go = _grad_out((2, oo.numel(), 7, 6), torch.float32)
    expected = OPS.channel_conv2d_backward(go, x, weight, ii, oo, *geo, gathered, [True] * 3)
    got = OPS.channel_conv2d_backward(_layout(go, "sliced"), x, weight, ii.int(), oo.int(), *geo, gathered,
                                      [True] * 3)
    for name, a, e in zip(GRAD_NAMES, got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)
    y = P.channel_conv2d(x, weight, None, ii.int(), oo.to(torch.int16), *geo, backend="cpu")
    torch.testing.assert_close(y, P.channel_conv2d(x, weight, None, ii, oo, *geo, backend="cpu"), rtol=0, atol=0)


def test_channel_conv2d_non_contiguous_weight_and_bias():
    x, weight, bias, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["stride2_channels_last"], torch.float32)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    b_view = torch.stack([bias, torch.zeros_like(bias)], 1)[:, 0]
    assert not b_view.is_contiguous() and not w_cl.is_contiguous()
    expected = P.channel_conv2d(x, weight, bias, ii, oo, *geo, backend="cpu")
    torch.testing.assert_close(P.channel_conv2d(x, w_cl, b_view, ii, oo, *geo, backend="cpu"), expected, rtol=0, atol=0)
    go = _grad_out(expected.shape, torch.float32)
    for a, e in zip(OPS.channel_conv2d_backward(go, x, w_cl, ii, oo, *geo, gathered, [True] * 3),
                    OPS.channel_conv2d_backward(go, x, weight, ii, oo, *geo, gathered, [True] * 3)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["k3_basic", "asym_sliced", "stride_w2", "batch5_wide", "empty_in"])
def test_channel_conv2d_never_reads_dropped_channels(name, dtype):
    """NaN in every input channel outside in_idx and in every weight entry outside the kept block changes
    nothing: the kernel reads only the kept channels (forward and backward)."""
    x, weight, bias, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES[name], dtype)
    keep_in = torch.zeros(weight.shape[1], dtype=torch.bool)
    keep_in[ii] = True
    keep_out = torch.zeros(weight.shape[0], dtype=torch.bool)
    keep_out[oo] = True
    x_nan, w_nan, b_nan = x.clone(), weight.clone(), bias.clone()
    x_nan[:, ~keep_in] = float("nan")
    w_nan[~keep_out] = float("nan")
    w_nan[:, ~keep_in] = float("nan")
    b_nan[~keep_out] = float("nan")
    y = P.channel_conv2d(x, weight, bias, ii, oo, *geo, backend="cpu")
    torch.testing.assert_close(P.channel_conv2d(x_nan, w_nan, b_nan, ii, oo, *geo, backend="cpu"), y, rtol=0, atol=0)
    go = _grad_out(y.shape, dtype)
    clean = OPS.channel_conv2d_backward(go, x, weight, ii, oo, *geo, gathered, [True] * 3)
    dirty = OPS.channel_conv2d_backward(go, x_nan, w_nan, ii, oo, *geo, gathered, [True] * 3)
    for name_, a, e in zip(GRAD_NAMES, dirty, clean):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name_)


def test_channel_conv2d_kernel_checks_indices_when_the_ops_layer_does_not():
    a = _channel_args(in_idx=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"slimops\.channel_conv2d: in_idx\[1\] = 5 is out of range for 5 input "
                                         r"channels of weight"):
        P.channel_conv2d(a["x"], a["weight"], a["bias"], a["in_idx"], a["out_idx"], 1, 1, check_indices=False,
                         backend="cpu")
    with pytest.raises(ValueError, match=r"slimops\.channel_conv2d: out_idx holds 1 more than once"):
        P.channel_conv2d(a["x"], a["weight"], a["bias"], torch.tensor([0]), torch.tensor([1, 1]), 1, 1,
                         check_indices=False, backend="cpu")


def test_channel_conv2d_empty_batch():
    x, weight, bias, ii, oo, geo, _ = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float32)
    x = x[:0]
    for backend in ("cpu", "reference"):
        y = P.channel_conv2d(x, weight, bias, ii, oo, *geo, backend=backend)
        assert y.shape == (0, 2, 7, 6)
    grads = OPS.channel_conv2d_backward(torch.zeros(0, 2, 7, 6), x, weight, ii, oo, *geo, False, [True] * 3)
    assert grads[0].shape == x.shape and all((g == 0).all() for g in grads)


def test_channel_conv2d_empty_in_idx_gives_the_bias():
    x, weight, bias, ii, oo, geo, _ = _channel_inputs(CHANNEL_CASES["empty_in"], torch.float32)
    y = P.channel_conv2d(x, weight, bias, ii, oo, *geo, backend="cpu")
    assert torch.equal(y, bias[oo][None, :, None, None].expand_as(y))


@pytest.mark.parametrize("name", ["k3_basic", "asym_sliced", "gathered", "batch5_wide"])
def test_auto_is_the_cpu_kernel(name):
    assert _backend.resolve("channel_conv2d", "auto", torch.device("cpu")) == "cpu"
    assert _backend.resolve("masked_conv2d", "auto", torch.device("cpu")) == "cpu"
    x, weight, bias, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES[name], torch.float32)
    go = _grad_out((x.shape[0], oo.numel(), *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)),
                   torch.float32)
    outs = {}
    for backend in ("auto", "cpu"):
        fn = lambda a, w, b: P.channel_conv2d(a, w, b, ii, oo, *geo, input_gathered=gathered,  # noqa: E731
                                              backend=backend)
        outs[backend] = _autograd(fn, x, weight, bias, go)
    (ya, ga), (yc, gc) = outs["auto"], outs["cpu"]
    torch.testing.assert_close(ya, yc, rtol=0, atol=0)
    for a, c in zip(ga, gc):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    x, weight, bias, mask, geo = _masked_inputs(MASKED_CASES["mixed_rows"], torch.float32)
    go = _grad_out((4, 7, 5, 9), torch.float32)
    ya, ga = _autograd(lambda a, w, b: P.masked_conv2d(a, w, b, mask, *geo), x, weight, bias, go)
    yc, gc = _autograd(lambda a, w, b: P.masked_conv2d(a, w, b, mask, *geo, backend="cpu"), x, weight, bias, go)
    torch.testing.assert_close(ya, yc, rtol=0, atol=0)
    for a, c in zip(ga, gc):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["channel_conv2d", "masked_conv2d"])
def test_autograd_asks_only_for_the_needed_gradients(op):
    """Only some inputs require grad: the backward op runs with that output_mask, the others get no .grad,
    and the gradients computed equal those of a call where all three require grad."""
    if op == "channel_conv2d":
        x, weight, bias, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float64)
        fn = lambda a, w, b: P.channel_conv2d(a, w, b, ii, oo, *geo, backend="cpu")  # noqa: E731
    else:
        x, weight, bias, mask, geo = _masked_inputs(MASKED_CASES["k3_random"], torch.float64)
        fn = lambda a, w, b: P.masked_conv2d(a, w, b, mask, *geo, backend="cpu")  # noqa: E731
    go = _grad_out(fn(x, weight, bias).shape, torch.float64)
    _, full = _autograd(fn, x, weight, bias, go)
    for need in OUTPUT_MASKS[1:]:
        ts = [t.detach().clone().requires_grad_(r) for t, r in zip((x, weight, bias), need)]
        fn(*ts).backward(go)
        for name, t, r, f in zip(GRAD_NAMES, ts, need, full):
            if r:
                torch.testing.assert_close(t.grad, f, rtol=TOL[torch.float64][0], atol=TOL[torch.float64][1],
                                           msg=f"{name} with requires_grad {need}")
            else:
                assert t.grad is None


# =============================================================================================
# masked_conv2d cases
# =============================================================================================

# n, c_in, (h, w), c_out, (kh, kw), stride, padding, dilation, mask, bias, layout
MASKED_CASES = {
    "k3_random": (3, 5, (7, 6), 6, (3, 3), 1, 1, 1, "random", True, "contig"),
    "k3_all": (2, 4, (6, 7), 5, (3, 3), 1, 1, 1, "all", True, "contig"),
    "k3_none": (2, 4, (6, 7), 5, (3, 3), 1, 1, 1, "none", True, "contig"),
    "mixed_rows": (4, 3, (5, 9), 7, (3, 3), 1, 1, 1, "mixed", True, "channels_last"),
    "k1_batch1": (1, 6, (5, 5), 4, (1, 1), 1, 0, 1, "random", False, "contig"),
    "k5_pad2": (2, 3, (9, 8), 4, (5, 5), 1, 2, 1, "random", True, "sliced"),
    "stride2_dilation2": (2, 4, (11, 10), 5, (3, 3), 2, 2, 2, "random", True, "contig"),
    "asym": (2, 5, (10, 9), 4, (3, 5), (2, 1), (0, 2), (1, 2), "mixed", True, "sliced"),
    "stride_w2_nobias": (3, 3, (8, 11), 5, (2, 3), (1, 2), (1, 0), (2, 1), "random", False, "contig"),
    "one_channel": (2, 1, (6, 5), 1, (3, 3), 1, 1, 1, "mixed", True, "contig"),
    "batch5_wide": (5, 9, (6, 37), 13, (3, 3), 1, 1, 1, "random", True, "contig"),
    # rows >= 14 pixels: the direct grad_w adds each sample's kept rows (about 35, one with all 70) into the full
    # accumulator through its row map; grad_x selects them from the call's transposed panel
    "gw_row_map": (4, 3, (8, 16), 70, (3, 3), 1, 1, 1, "mixed", True, "contig"),
    # grad_x of strided convs by phases, each sample's kept rows selected from the phased panels
    "gx_phases_s2": (4, 5, (14, 13), 20, (3, 3), 2, 1, 1, "mixed", True, "contig"),
    "gx_phases_k5_s3": (2, 4, (12, 13), 6, (5, 5), 3, 2, 1, "random", False, "contig"),
}


def _mask(kind, n, c_out):
    if kind == "all":
        return torch.ones(n, c_out, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(n, c_out, dtype=torch.bool)
    m = torch.rand(n, c_out) < 0.5
    if kind == "mixed":  # one sample with nothing kept, one with everything
        m[0] = False
        m[-1] = True
    return m


def _masked_inputs(case, dtype):
    n, c_in, (h, w), c_out, k, stride, padding, dilation, kind, has_bias, layout = case
    x = _layout(_rand((n, c_in, h, w), dtype), layout)
    weight = _rand((c_out, c_in, *k), dtype, scale=0.3)
    bias = _rand((c_out,), dtype) if has_bias else None
    return x, weight, bias, _mask(kind, n, c_out), (_pair(stride), _pair(padding), _pair(dilation))


def _masked_expected(go, x, weight, bias, mask, geo, output_mask=(True, True, True)):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    absf = lambda t: None if t is None else t.double().abs()  # noqa: E731
    out = []
    for cast in ((lambda t: t), f64, absf):
        y = ref.masked_conv2d(cast(x), cast(weight), cast(bias), mask, *geo)
        g = ref.masked_conv2d_backward(cast(go), cast(x), cast(weight), mask, *geo, list(output_mask))
        out.append((y, g))
    return out


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("name", list(MASKED_CASES))
def test_masked_conv2d_matches_reference(name, dtype, backend):
    x, weight, bias, mask, geo = _masked_inputs(MASKED_CASES[name], dtype)
    go = _grad_out((x.shape[0], weight.shape[0], *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)), dtype)
    fn = lambda a, w, b: P.masked_conv2d(a, w, b, mask, *geo, backend=backend)  # noqa: E731
    y, grads = _autograd(fn, x, weight, bias, go)
    (y_ref, g_ref), (y64, g64), (y_abs, g_abs) = _masked_expected(go, x, weight, bias, mask, geo)
    what = f"{name} {dtype} {backend}"
    _check(y, y_ref, y64, y_abs, f"{what} y")
    assert (y[~mask] == 0).all(), f"{what}: masked output channels are not exactly 0"
    if bias is None:
        assert grads[2] is None
        grads, g_ref, g64, g_abs = grads[:2], g_ref[:2], g64[:2], g_abs[:2]
    _check_grads(grads, g_ref, g64, g_abs, (True,) * 3, what)
    dropped = ~mask.any(0)  # output channels no sample keeps get no gradient
    assert (grads[1][dropped] == 0).all()
    if bias is not None:
        assert (grads[2][dropped] == 0).all()


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("name", list(MASKED_CASES))
def test_masked_conv2d_backward_op_every_output_mask(name, dtype):
    x, weight, bias, mask, geo = _masked_inputs(MASKED_CASES[name], dtype)
    go = _grad_out((x.shape[0], weight.shape[0], *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)), dtype)
    (_, g_ref), (_, g64), (_, g_abs) = _masked_expected(go, x, weight, bias, mask, geo)
    for om in OUTPUT_MASKS:
        grads = OPS.masked_conv2d_backward(go, x, weight, mask, *geo, om)
        _check_grads(grads, g_ref, g64, g_abs, om, f"{name} {dtype} output_mask={om}")


@pytest.fixture
def nan_filled_empty():
    """torch's deterministic mode fills what ``at::empty`` returns with NaN: a gradient element the kernels forget to
    write shows up, where fresh pages from the system would read as zeros."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(8).isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_writes_every_element_of_grad_x(nan_filled_empty, dtype):
    """grad_x is allocated uninitialised (csrc/cpu/channel_conv.cpp, grad_buffers): its kept planes are written by
    the direct grad_x or zeroed before col2im adds, the dropped channels' planes and the samples that keep nothing
    are zeroed. Every case, every output mask asking for grad_x, against the reference."""
    for name, case in CHANNEL_CASES.items():
        if name == "tiled":
            continue
        x, weight, bias, ii, oo, geo, gathered = _channel_inputs(case, dtype)
        go = _grad_out((x.shape[0], oo.numel(), *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)),
                       dtype)
        (_, g_ref), (_, g64), (_, g_abs) = _channel_expected(go, x, weight, bias, ii, oo, geo, gathered)
        for mask in ([True, False, False], [True, True, True]):
            grads = OPS.channel_conv2d_backward(go, x, weight, ii, oo, *geo, gathered, mask)
            _check_grads(grads, g_ref, g64, g_abs, mask, f"{name} {dtype} {mask}")
    for name, case in MASKED_CASES.items():
        x, weight, bias, mask, geo = _masked_inputs(case, dtype)
        go = _grad_out((x.shape[0], weight.shape[0], *ref.out_size(x.shape[2], x.shape[3], weight.shape[2:], *geo)),
                       dtype)
        (_, g_ref), (_, g64), (_, g_abs) = _masked_expected(go, x, weight, bias, mask, geo)
        for om in ([True, False, False], [True, True, True]):
            grads = OPS.masked_conv2d_backward(go, x, weight, mask, *geo, om)
            _check_grads(grads, g_ref, g64, g_abs, om, f"masked {name} {dtype} {om}")
    # no output channels at all: the early return must still give a zero grad_x
    x, w = _rand((2, 3, 5, 5), dtype), _rand((0, 3, 3, 3), dtype)
    gx = OPS.masked_conv2d_backward(torch.zeros(2, 0, 5, 5, dtype=dtype), x, w, torch.zeros(2, 0, dtype=torch.bool),
                                    [1, 1], [1, 1], [1, 1], [True, True, False])[0]
    assert gx.shape == x.shape and (gx == 0).all()


def test_masked_conv2d_non_contiguous_mask_and_grad_out():
    x, weight, bias, _, geo = _masked_inputs(MASKED_CASES["k3_random"], torch.float32)
    mask_t = torch.rand(6, 3) < 0.5  # (C_out, N), transposed: a non-contiguous (N, C_out) view
    mask = mask_t.t()
    assert not mask.is_contiguous()
    y = P.masked_conv2d(x, weight, bias, mask, *geo, backend="cpu")
    torch.testing.assert_close(y, P.masked_conv2d(x, weight, bias, mask.contiguous(), *geo, backend="cpu"),
                               rtol=0, atol=0)
    go = _grad_out(y.shape, torch.float32)
    expected = OPS.masked_conv2d_backward(go, x, weight, mask.contiguous(), *geo, [True] * 3)
    got = OPS.masked_conv2d_backward(_layout(go, "channels_last"), x, weight, mask, *geo, [True] * 3)
    for name, a, e in zip(GRAD_NAMES, got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["k3_random", "mixed_rows", "stride_w2_nobias", "batch5_wide"])
def test_masked_conv2d_never_reads_dropped_weight_rows(name, dtype):
    """NaN in the weight rows and bias entries of output channels no sample keeps changes nothing (the masked
    channels are exactly 0, their rows never read), forward and backward."""
    x, weight, bias, mask, geo = _masked_inputs(MASKED_CASES[name], dtype)
    mask[:, 0] = False  # at least one dropped channel
    dropped = ~mask.any(0)
    w_nan = weight.clone()
    w_nan[dropped] = float("nan")
    b_nan = None
    if bias is not None:
        b_nan = bias.clone()
        b_nan[dropped] = float("nan")
    y = P.masked_conv2d(x, weight, bias, mask, *geo, backend="cpu")
    torch.testing.assert_close(P.masked_conv2d(x, w_nan, b_nan, mask, *geo, backend="cpu"), y, rtol=0, atol=0)
    go = _grad_out(y.shape, dtype)
    go_nan = go.clone()
    go_nan[~mask] = float("nan")  # the gradient of a masked output is never read either
    clean = OPS.masked_conv2d_backward(go, x, weight, mask, *geo, [True] * 3)
    dirty = OPS.masked_conv2d_backward(go_nan, x, w_nan, mask, *geo, [True] * 3)
    for name_, a, e in zip(GRAD_NAMES, dirty, clean):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name_)


def test_masked_conv2d_all_true_is_a_plain_conv():
    x, weight, bias, _, geo = _masked_inputs(MASKED_CASES["asym"], torch.float64)
    mask = torch.ones(x.shape[0], weight.shape[0], dtype=torch.bool)
    y = P.masked_conv2d(x, weight, bias, mask, *geo, backend="cpu")
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, weight, bias, *geo), rtol=1e-12, atol=1e-12)


# =============================================================================================
# 2. gradcheck (float64, through the public ops)
# =============================================================================================


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("gathered", [False, True])
def test_channel_conv2d_gradcheck(gathered, has_bias):
    ii, oo = torch.tensor([2, 0]), torch.tensor([3, 1, 0])
    x = _rand((2, 2 if gathered else 3, 5, 4), torch.float64).requires_grad_()
    w = _rand((4, 3, 3, 2), torch.float64, 0.5).requires_grad_()
    b = _rand((4,), torch.float64).requires_grad_() if has_bias else None
    inputs = (x, w, b) if has_bias else (x, w)

    def fn(x, w, b=None):
        return P.channel_conv2d(x, w, b, ii, oo, (2, 1), 1, (1, 2), input_gathered=gathered, backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("has_bias", [True, False])
def test_masked_conv2d_gradcheck(has_bias):
    x = _rand((3, 3, 5, 4), torch.float64).requires_grad_()
    w = _rand((4, 3, 2, 3), torch.float64, 0.5).requires_grad_()
    b = _rand((4,), torch.float64).requires_grad_() if has_bias else None
    mask = _mask("mixed", 3, 4)
    inputs = (x, w, b) if has_bias else (x, w)

    def fn(x, w, b=None):
        return P.masked_conv2d(x, w, b, mask, (1, 2), (1, 0), 1, backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# =============================================================================================
# 3. opcheck
# =============================================================================================


def _opcheck_inputs(has_bias, requires_grad, gathered=False):
    x = _rand((2, 3 if gathered else 5, 6, 5), torch.float32)
    w = _rand((4, 5, 3, 3), torch.float32, 0.3)
    b = _rand((4,), torch.float32) if has_bias else None
    if requires_grad:
        x.requires_grad_(), w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return x, w, b


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("gathered", [False, True])
def test_opcheck_channel_conv2d(gathered, has_bias, requires_grad):
    x, w, b = _opcheck_inputs(has_bias, requires_grad, gathered)
    ii, oo = torch.tensor([4, 0, 2]), torch.tensor([3, 1])
    torch.library.opcheck(OPS.channel_conv2d.default, (x, w, b, ii, oo, [2, 1], [1, 0], [1, 1], gathered))
    torch.library.opcheck(OPS.channel_conv2d.default, (x, w, b, ii, oo),
                          {"padding": [1, 1], "input_gathered": gathered})


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_opcheck_masked_conv2d(has_bias, requires_grad):
    x, w, b = _opcheck_inputs(has_bias, requires_grad)
    mask = _mask("mixed", 2, 4)
    torch.library.opcheck(OPS.masked_conv2d.default, (x, w, b, mask, [1, 2], [1, 1], [2, 1]))
    torch.library.opcheck(OPS.masked_conv2d.default, (x, w, b, mask))


@pytest.mark.parametrize("output_mask", [[True, True, True], [True, False, True], [False, True, False]])
def test_opcheck_backward_ops(output_mask):
    x, w, _ = _opcheck_inputs(False, False)
    ii, oo = torch.tensor([4, 0, 2]), torch.tensor([3, 1])
    go = _rand((2, 2, 3, 5), torch.float32)
    torch.library.opcheck(OPS.channel_conv2d_backward.default,
                          (go, x, w, ii, oo, [2, 1], [1, 1], [1, 1], False, output_mask))
    torch.library.opcheck(OPS.channel_conv2d_backward.default,
                          (go, x[:, :3], w, ii, oo, [2, 1], [1, 1], [1, 1], True, output_mask))
    mask = _mask("mixed", 2, 4)
    go = _rand((2, 4, 6, 5), torch.float32)
    torch.library.opcheck(OPS.masked_conv2d_backward.default, (go, x, w, mask, [1, 1], [1, 1], [1, 1], output_mask))


def test_every_channel_conv_op_has_a_kernel_and_an_opcheck():
    """Guard: the family is the four ops above, each with a CPU kernel."""
    family = {op for op, mod in _backend._TRITON_MODULES.items() if mod.endswith(".channel_conv")}
    assert family == {"channel_conv2d", "channel_conv2d_backward", "masked_conv2d", "masked_conv2d_backward"}
    for op in family:
        assert _backend.has_kernel(op, "CPU"), op


# =============================================================================================
# 4. torch.compile
# =============================================================================================


def test_compile_fullgraph_matches_eager():
    x, w, b = _opcheck_inputs(True, False)
    ii, oo = torch.tensor([4, 0, 2]), torch.tensor([3, 1])
    mask = _mask("mixed", 2, 4)

    def f(x, w, b):  # no pointwise work around the ops: inductor has no C++ to build (keeps the test fast)
        return (P.channel_conv2d(x, w, b, ii, oo, 1, 1), P.channel_conv2d(x[:, :3], w, None, ii, oo, 2, 0,
                                                                          input_gathered=True),
                P.masked_conv2d(x, w, b, mask, (1, 1), 1), P.masked_conv2d(x, w, None, mask, (2, 1), (0, 1), 2))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for got, expected in zip(compiled(x, w, b), f(x, w, b)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_compile_fullgraph_training_matches_eager():
    """Forward and backward (the backward ops in the AOT graph) of both ops, compiled without a break."""
    x, w, b = _opcheck_inputs(True, False)
    ii, oo = torch.tensor([4, 0, 2]), torch.tensor([3, 1])
    mask = _mask("mixed", 2, 4)

    def loss(x, w, b):
        y = P.channel_conv2d(x, w, b, ii, oo, (2, 1), 1).square().sum()
        return y + P.masked_conv2d(x, w, None, mask, 1, (0, 1)).sin().sum()

    def grads(fn):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs)
        out.backward()
        return out.detach(), xs.grad, ws.grad, bs.grad

    torch._dynamo.reset()
    got = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    expected = grads(loss)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-5)


# =============================================================================================
# 5. bad input
# =============================================================================================


def _channel_args(**over):
    """A valid channel_conv2d call (as a dict), with entries replaced by ``over``."""
    a = dict(x=_rand((2, 5, 6, 6), torch.float32), weight=_rand((4, 5, 3, 3), torch.float32),
             bias=_rand((4,), torch.float32), in_idx=torch.tensor([3, 0, 4]), out_idx=torch.tensor([1, 2]),
             stride=1, padding=1, dilation=1, input_gathered=False)
    a.update(over)
    return a


def _call_channel_public(a, backend):
    return P.channel_conv2d(a["x"], a["weight"], a["bias"], a["in_idx"], a["out_idx"], a["stride"], a["padding"],
                            a["dilation"], input_gathered=a["input_gathered"], backend=backend)


def _call_channel_raw(a):
    return OPS.channel_conv2d(a["x"], a["weight"], a["bias"], a["in_idx"], a["out_idx"], _pair(a["stride"]),
                              _pair(a["padding"]), _pair(a["dilation"]), a["input_gathered"])


def _call_channel_backward_raw(a):
    go = torch.zeros(2, 2, 6, 6)  # the argument checks come first
    return OPS.channel_conv2d_backward(go, a["x"], a["weight"], a["in_idx"], a["out_idx"], _pair(a["stride"]),
                                       _pair(a["padding"]), _pair(a["dilation"]), a["input_gathered"], [True] * 3)


def _meta(t):
    return t.to("meta")


# (label, replacements, the message after "slimops.<op>: "); the raw C++ op takes lists for stride/padding/dilation,
# so the cases of PUBLIC_ONLY are checked on the public op only.
CHANNEL_BAD = [
    ("in_idx_out_of_range", dict(in_idx=torch.tensor([0, 5])), r"in_idx.* out of range for 5 input channels of weight"),
    ("out_idx_out_of_range", dict(out_idx=torch.tensor([4])),
     r"out_idx.* out of range for 4 output channels of weight"),
    ("in_idx_negative", dict(in_idx=torch.tensor([1, -1])), r"in_idx.*-1.* out of range for 5"),
    ("out_idx_negative", dict(out_idx=torch.tensor([-2])), r"out_idx.*-2.* out of range for 4"),
    ("in_idx_duplicated", dict(in_idx=torch.tensor([2, 0, 2])), r"in_idx holds .*more than once"),
    ("out_idx_duplicated", dict(out_idx=torch.tensor([1, 1])), r"out_idx holds .*more than once"),
    ("in_idx_float", dict(in_idx=torch.tensor([0.0, 1.0])), r"in_idx must be an integer tensor"),
    ("out_idx_bool", dict(out_idx=torch.tensor([True, False])), r"out_idx must be an integer tensor"),
    ("in_idx_2d", dict(in_idx=torch.tensor([[0, 1]])), r"in_idx must be 1-D, got shape"),
    ("out_idx_0d", dict(out_idx=torch.tensor(1)), r"out_idx must be 1-D, got shape"),
    ("in_idx_meta", dict(in_idx=_meta(torch.tensor([0, 1]))), r"in_idx is on meta but x is on cpu"),
    ("out_idx_meta", dict(out_idx=_meta(torch.tensor([0]))), r"out_idx is on meta but x is on cpu"),
    ("gathered_channel_count", dict(input_gathered=True), r"input_gathered: x has 5 channels but in_idx has 3"),
    ("x_channel_mismatch", dict(x=_rand((2, 4, 6, 6), torch.float32)),
     r"x has 4 channels but weight has 5 input channels"),
    ("weight_dtype", dict(weight=_rand((4, 5, 3, 3), torch.float64)), r"weight has dtype \S+ but x has dtype"),
    ("bias_dtype", dict(bias=_rand((4,), torch.float16)), r"bias has dtype \S+ but x has dtype"),
    ("bias_shape", dict(bias=_rand((5,), torch.float32)), r"bias must have shape \(4,\), got"),
    ("bias_2d", dict(bias=_rand((4, 1), torch.float32)), r"bias must have shape \(4,\), got"),
    ("weight_meta", dict(weight=_meta(_rand((4, 5, 3, 3), torch.float32))), r"weight is on meta but x is on cpu"),
    ("bias_meta", dict(bias=_meta(_rand((4,), torch.float32))), r"bias is on meta but x is on cpu"),
    ("x_3d", dict(x=_rand((5, 6, 6), torch.float32)), r"x must be 4-D \(N, C, H, W\), got shape"),
    ("weight_3d", dict(weight=_rand((4, 5, 9), torch.float32)), r"weight must be 4-D"),
    ("x_integer", dict(x=torch.ones(2, 5, 6, 6, dtype=torch.int32)), r"x must be a floating-point tensor"),
    ("stride_0", dict(stride=0), r"stride must be >"),
    ("stride_pair_0", dict(stride=(1, 0)), r"stride must be >"),
    ("padding_negative", dict(padding=(0, -1)), r"padding must be >= 0"),
    ("dilation_0", dict(dilation=0), r"dilation must be >"),
    ("grid_smaller_than_kernel", dict(x=_rand((2, 5, 2, 6), torch.float32), padding=0),
     r"the input grid 2x6 \(padding .*\) is smaller than the dilated kernel 3x3"),
    ("grid_smaller_than_dilated_kernel", dict(dilation=(1, 4), padding=1),
     r"the input grid 6x6 \(padding .*\) is smaller than the dilated kernel 3x3 \(dilation"),
    ("stride_triple", dict(stride=(1, 1, 1)), r"stride must be an int or a pair of ints"),
    ("padding_float", dict(padding=1.5), r"padding must be an int or a pair of ints"),
]


PUBLIC_ONLY = {"stride_triple", "padding_float"}


def _params(table, raw=False):
    return [pytest.param(over, msg, id=label) for label, over, msg in table if not (raw and label in PUBLIC_ONLY)]


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("over,msg", _params(CHANNEL_BAD))
def test_channel_conv2d_bad_input(over, msg, backend):
    with pytest.raises(ERRORS, match=rf"slimops\.channel_conv2d: {msg}"):
        _call_channel_public(_channel_args(**over), backend)


@pytest.mark.parametrize("over,msg", _params(CHANNEL_BAD, raw=True))
def test_channel_conv2d_raw_op_bad_input(over, msg):
    """The C++ op (and, for a meta argument, its fake kernel) called directly, forward and backward."""
    a = _channel_args(**over)
    with pytest.raises(ERRORS, match=rf"slimops\.channel_conv2d: {msg}"):
        _call_channel_raw(a)
    if "bias" in over:
        return  # the backward op takes no bias
    with pytest.raises(ERRORS, match=rf"slimops\.channel_conv2d_backward: {msg}"):
        _call_channel_backward_raw(a)


def test_channel_conv2d_errors_are_value_and_type_errors():
    with pytest.raises(ValueError):
        _call_channel_raw(_channel_args(in_idx=torch.tensor([0, 5])))
    with pytest.raises(TypeError):
        _call_channel_raw(_channel_args(in_idx=torch.tensor([0.0])))
    with pytest.raises(TypeError):
        _call_channel_public(_channel_args(weight=_rand((4, 5, 3, 3), torch.float64)), "cpu")
    with pytest.raises(ValueError):
        _call_channel_public(_channel_args(stride=0), "cpu")


def test_backward_ops_check_grad_out():
    a = _channel_args()
    x, w, ii, oo = a["x"], a["weight"], a["in_idx"], a["out_idx"]
    geo = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(ERRORS, match=r"slimops\.channel_conv2d_backward: grad_out has shape \[2, 3, 6, 6\] but the "
                                     r"output has shape \(2, 2, 6, 6\)"):
        OPS.channel_conv2d_backward(torch.zeros(2, 3, 6, 6), x, w, ii, oo, *geo, False, [True] * 3)
    with pytest.raises(ERRORS, match=r"slimops\.channel_conv2d_backward: grad_out has dtype"):
        OPS.channel_conv2d_backward(torch.zeros(2, 2, 6, 6, dtype=torch.float64), x, w, ii, oo, *geo, False, [True] * 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ERRORS, match=r"slimops\.masked_conv2d_backward: grad_out has shape \[2, 4, 5, 6\] but the "
                                     r"output has shape \(2, 4, 6, 6\)"):
        OPS.masked_conv2d_backward(torch.zeros(2, 4, 5, 6), x, w, mask, *geo, [True] * 3)
    with pytest.raises(ERRORS, match=r"slimops\.masked_conv2d_backward: grad_out has dtype"):
        OPS.masked_conv2d_backward(torch.zeros(2, 4, 6, 6, dtype=torch.bfloat16), x, w, mask, *geo, [True] * 3)


def _masked_args(**over):
    a = dict(x=_rand((2, 5, 6, 6), torch.float32), weight=_rand((4, 5, 3, 3), torch.float32),
             bias=_rand((4,), torch.float32), out_mask=torch.tensor([[True, False, True, True], [False] * 4]),
             stride=1, padding=1, dilation=1)
    a.update(over)
    return a


def _call_masked_public(a, backend):
    return P.masked_conv2d(a["x"], a["weight"], a["bias"], a["out_mask"], a["stride"], a["padding"], a["dilation"],
                           backend=backend)


def _call_masked_raw(a):
    return OPS.masked_conv2d(a["x"], a["weight"], a["bias"], a["out_mask"], _pair(a["stride"]), _pair(a["padding"]),
                             _pair(a["dilation"]))


def _call_masked_backward_raw(a):
    go = torch.zeros(a["x"].shape[0], 4, 6, 6)
    return OPS.masked_conv2d_backward(go, a["x"], a["weight"], a["out_mask"], _pair(a["stride"]), _pair(a["padding"]),
                                      _pair(a["dilation"]), [True] * 3)


MASKED_BAD = [
    ("mask_shape", dict(out_mask=torch.ones(2, 5, dtype=torch.bool)),
     r"out_mask must have shape \(N, C_out\) = \(2, 4\), got"),
    ("mask_transposed", dict(out_mask=torch.ones(4, 2, dtype=torch.bool)),
     r"out_mask must have shape \(N, C_out\) = \(2, 4\)"),
    ("mask_1d", dict(out_mask=torch.ones(4, dtype=torch.bool)), r"out_mask must have shape \(N, C_out\)"),
    ("mask_uint8", dict(out_mask=torch.ones(2, 4, dtype=torch.uint8)), r"out_mask must be a bool tensor, got"),
    ("mask_float", dict(out_mask=torch.ones(2, 4)), r"out_mask must be a bool tensor, got"),
    ("mask_meta", dict(out_mask=torch.ones(2, 4, dtype=torch.bool, device="meta")),
     r"out_mask is on meta but x is on cpu"),
    ("x_channel_mismatch", dict(x=_rand((2, 3, 6, 6), torch.float32)),
     r"x has 3 channels but weight has 5 input channels"),
    ("weight_dtype", dict(weight=_rand((4, 5, 3, 3), torch.bfloat16)), r"weight has dtype \S+ but x has dtype"),
    ("bias_dtype", dict(bias=_rand((4,), torch.float64)), r"bias has dtype \S+ but x has dtype"),
    ("bias_shape", dict(bias=_rand((3,), torch.float32)), r"bias must have shape \(4,\), got"),
    ("x_5d", dict(x=_rand((2, 5, 6, 6, 1), torch.float32)), r"x must be 4-D"),
    ("x_integer", dict(x=torch.ones(2, 5, 6, 6, dtype=torch.int64)), r"x must be a floating-point tensor"),
    ("stride_0", dict(stride=(0, 1)), r"stride must be >"),
    ("padding_negative", dict(padding=-1), r"padding must be >= 0"),
    ("dilation_0", dict(dilation=(1, 0)), r"dilation must be >"),
    ("grid_smaller_than_kernel", dict(x=_rand((2, 5, 6, 1), torch.float32), padding=0),
     r"the input grid 6x1 \(padding .*\) is smaller than the dilated kernel 3x3"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("over,msg", _params(MASKED_BAD))
def test_masked_conv2d_bad_input(over, msg, backend):
    with pytest.raises(ERRORS, match=rf"slimops\.masked_conv2d: {msg}"):
        _call_masked_public(_masked_args(**over), backend)


@pytest.mark.parametrize("over,msg", _params(MASKED_BAD, raw=True))
def test_masked_conv2d_raw_op_bad_input(over, msg):
    a = _masked_args(**over)
    with pytest.raises(ERRORS, match=rf"slimops\.masked_conv2d: {msg}"):
        _call_masked_raw(a)
    if "bias" in over:
        return  # the backward op takes no bias
    with pytest.raises(ERRORS, match=rf"slimops\.masked_conv2d_backward: {msg}"):
        _call_masked_backward_raw(a)


# ---- backend selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["channel_conv2d", "masked_conv2d"])
def test_unknown_backend_errors(op):
    call = (lambda b: _call_channel_public(_channel_args(), b)) if op == "channel_conv2d" else (
        lambda b: _call_masked_public(_masked_args(), b))
    with pytest.raises(ValueError, match=rf"slimops\.{op}: unknown backend 'gpu' \(expected one of auto, cuda, "
                                         r"triton, cpu, reference\)"):
        call("gpu")
    with pytest.raises(RuntimeError, match=rf"slimops\.{op}: backend 'cuda' cannot run: the tensors are on cpu, "
                                           r"not a CUDA device"):
        call("cuda")


@pytest.mark.parametrize("op", ["channel_conv2d", "masked_conv2d"])
def test_triton_backend_unavailable_says_why(op, monkeypatch):
    call = (lambda: _call_channel_public(_channel_args(), "triton")) if op == "channel_conv2d" else (
        lambda: _call_masked_public(_masked_args(), "triton"))
    monkeypatch.setattr(_backend, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match=rf"slimops\.{op}: backend 'triton' cannot run: triton is not installed"):
        call()
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=rf"slimops\.{op}: backend 'triton' cannot run: the tensors are on cpu; "
                                           r"Triton runs on CUDA \(or on CPU with TRITON_INTERPRET=1\)"):
        call()


def test_masked_conv2d_cpu_backend_on_meta_tensors_says_why():
    a = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _masked_args().items()}
    with pytest.raises(RuntimeError, match=r"slimops\.masked_conv2d: backend 'cpu' cannot run: the tensors are on "
                                           r"meta"):
        _call_masked_public(a, "cpu")
    assert _call_masked_public(a, "auto").shape == (2, 4, 6, 6)


def _meta_channel_args():
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _channel_args().items()}


def test_channel_conv2d_cpu_backend_on_meta_tensors_says_why():
    with pytest.raises(RuntimeError, match=r"slimops\.channel_conv2d: backend 'cpu' cannot run: the tensors are on "
                                           r"meta"):
        _call_channel_public(_meta_channel_args(), "cpu")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_channel_conv2d_on_meta_tensors_gives_the_shape(backend):
    assert _call_channel_public(_meta_channel_args(), backend).shape == (2, 2, 6, 6)


def test_channel_conv2d_on_meta_tensors_without_index_check():
    a = _meta_channel_args()
    y = P.channel_conv2d(a["x"], a["weight"], a["bias"], a["in_idx"], a["out_idx"], 1, 1, check_indices=False)
    assert y.shape == (2, 2, 6, 6) and y.device.type == "meta"


# =============================================================================================
# 6. thread count
# =============================================================================================


def _all_results(dtype):
    """(result, float64 sum of its absolute terms) for the forward and the backward op of both ops, on shapes of
    every threading path: batch 1 (threaded GEMM / im2col), batch 2 = the thread count and batch 5 (samples
    split across threads, per-thread weight-gradient partials)."""
    out = []
    absd = lambda t: None if t is None else t.double().abs()  # noqa: E731
    for n in (1, 2, 5):
        case = (n, 9, (7, 19), 8, (3, 3), 1, 1, 1, [8, 0, 3, 5, 1, 7, 2], [7, 1, 4, 0, 6, 2, 5], False, True, "contig")
        x, w, b, ii, oo, geo, gathered = _channel_inputs(case, dtype)
        y = P.channel_conv2d(x, w, b, ii, oo, *geo, backend="cpu")
        go = _grad_out(y.shape, dtype)
        grads = OPS.channel_conv2d_backward(go, x, w, ii, oo, *geo, gathered, [True] * 3)
        y_abs = ref.channel_conv2d(absd(x), absd(w), absd(b), ii, oo, *geo, gathered)
        g_abs = ref.channel_conv2d_backward(absd(go), absd(x), absd(w), ii, oo, *geo, gathered, [True] * 3)
        out += list(zip((y, *grads), (y_abs, *g_abs)))
        for stride in ((1, 2), 1):  # horizontal stride 1: the direct kernel of the forward
            case = (n, 9, (7, 19), 8, (3, 3), stride, 1, 1, "random", True, "contig")
            x, w, b, mask, geo = _masked_inputs(case, dtype)
            y = P.masked_conv2d(x, w, b, mask, *geo, backend="cpu")
            go = _grad_out(y.shape, dtype)
            grads = OPS.masked_conv2d_backward(go, x, w, mask, *geo, [True] * 3)
            y_abs = ref.masked_conv2d(absd(x), absd(w), absd(b), mask, *geo)
            g_abs = ref.masked_conv2d_backward(absd(go), absd(x), absd(w), mask, *geo, [True] * 3)
            out += list(zip((y, *grads), (y_abs, *g_abs)))
    return out


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
def test_one_and_two_threads_agree(dtype):
    """Same inputs, same accumulation dtype: only the split of the work (and of the weight-gradient sums into
    per-thread partials) differs, so the results agree within TOL on the sums' conditioning (the forward
    happens to be bitwise equal today)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(5)
        one = _all_results(dtype)
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
        torch.manual_seed(5)
        two = _all_results(dtype)
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old
    assert len(one) == len(two) == 3 * 12
    rtol, atol = TOL[dtype]
    for i, ((a, absum), (b, _)) in enumerate(zip(one, two)):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = (a.double() - b.double()).abs()
        bound = atol + rtol * (b.double().abs() + absum)
        assert (err <= bound).all(), f"result {i}: 1 vs 2 threads differ by up to {err.max().item():.3g}"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_masked_channels_are_zero_even_for_nonfinite_inputs(backend):
    """A masked channel is never computed: it is exactly 0 even where the conv would give NaN/inf, and the
    kernel and its reference twin agree on that."""
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    y = P.masked_conv2d(x, w, b, mask, 1, 1, backend=backend)
    assert (y[~mask] == 0).all()
    assert torch.isnan(y[0, 0]).any() and torch.isfinite(y[1]).all()


def test_grad_x_planes_no_kernel_writes_are_zero_in_reused_memory():
    """fp32 grad_x starts uninitialised where the transposed direct convolution stores every kept plane: the planes
    of the channels not kept (channel_conv2d) and the samples with no row (masked_conv2d) must still be 0. Small
    tensors, allocated right after a NaN-filled one of the same size was freed, so that malloc hands the same
    memory back (big ones come fresh from mmap, already 0, and would hide a missing fill)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 9, 9, generator=g)
    w = torch.randn(6, 8, 3, 3, generator=g)
    in_idx, out_idx = torch.tensor([1, 4, 6]), torch.tensor([0, 2, 5])
    go = torch.randn(3, 3, 9, 9, generator=g)
    mask = torch.tensor([[True, False, True, False, True, True], [False] * 6, [True] * 6])
    go_m = torch.randn(3, 6, 9, 9, generator=g)
    ref_c = ref.channel_conv2d_backward(go, x, w, in_idx, out_idx, [1, 1], [1, 1], [1, 1], False, [True] * 3)[0]
    ref_m = ref.masked_conv2d_backward(go_m, x, w, mask, [1, 1], [1, 1], [1, 1], [True] * 3)[0]
    for _ in range(4):
        junk = torch.full_like(x, float("nan"))
        del junk
        gx = torch.ops.slimops.channel_conv2d_backward(go, x, w, in_idx, out_idx, [1, 1], [1, 1], [1, 1], False,
                                                       [True, False, False])[0]
        torch.testing.assert_close(gx, ref_c, rtol=1e-4, atol=1e-4)
        junk = torch.full_like(x, float("nan"))
        del junk
        gx = torch.ops.slimops.masked_conv2d_backward(go_m, x, w, mask, [1, 1], [1, 1], [1, 1], [True, False, False])[0]
        torch.testing.assert_close(gx, ref_m, rtol=1e-4, atol=1e-4)
        assert (gx[1] == 0).all()


# =============================================================================================
# bfloat16 through oneDNN on AMX (csrc/cpu/channel_conv_onednn.h)
# =============================================================================================


def test_bf16_convs_take_onednn_exactly_where_amx_runs():
    """The route is on with the avx512 ISA on a CPU with AMX-BF16 (unless SLIMOPS_CPU_BF16_CONV=direct or oneDNN is
    capped below AMX) and off elsewhere; the bf16 value tests above run whichever path is on, and
    tests/test_base_isa.py runs the direct kernel's bf16 copies (SLIMOPS_CPU_BF16_CONV=direct) on such a CPU."""
    import os
    import sys

    from _proc import run_with_deadline
    from slimops.info import cpu_flags, cpu_isa

    probe = "from slimops.info import cpu_bf16_conv_onednn as f; print(f())"

    def route(**env):
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("SLIMOPS_CPU_", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"))}
        res = run_with_deadline([sys.executable, "-c", probe], env=dict(clean, **env), timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip() == "True"

    amx = "amx_bf16" in cpu_flags() and cpu_isa() == "avx512"
    assert route() == amx
    assert not route(SLIMOPS_CPU_BF16_CONV="direct")
    assert not route(SLIMOPS_CPU_ISA="avx2")
    assert not route(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")
    if amx:
        assert route(ONEDNN_MAX_CPU_ISA="AVX512_CORE_AMX")


@pytest.mark.parametrize("stride", [2**40, 9, (5, 7)], ids=str)
def test_backward_at_strides_past_the_phase_split(stride):
    """grad_x by phases is bounded (direct_gx_strided.h: at most 64 phases, no stride past the padded input); beyond
    that the call takes im2col + col2im, and either way equals the reference."""
    x, weight, bias, ii, oo, _, _ = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float32)
    geo = (_pair(stride), (1, 1), (1, 1))
    y = OPS.channel_conv2d(x, weight, bias, ii, oo, *geo, False)
    go = _grad_out(y.shape, torch.float32)
    got = OPS.channel_conv2d_backward(go, x, weight, ii, oo, *geo, False, [True] * 3)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
    ref.channel_conv2d(xd, wd, bd, ii, oo, *geo).backward(go.double())
    for name_, a, e in zip(GRAD_NAMES, got, (xd.grad, wd.grad, bd.grad)):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=name_)
