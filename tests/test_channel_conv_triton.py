"""The Triton kernels of the channel_conv family (slimops/triton/channel_conv.py) against the reference twins.

Runs through the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 when no GPU is visible,
before anything imports triton). With a GPU and the interpreter off, the same tests run the compiled kernels
on CUDA tensors (fp32 then with TF32 switched off, so the tight fp32 tolerances hold).

fp32 / fp64: values and all three gradients within tight tolerances of the reference (same formula, fp32 /
fp64 accumulation, different summation order). bf16 / fp16: against the float64 truth, error at most twice
the reference's own error in that dtype plus a small floor (conftest.assert_close_lowp). Shapes are tiny:
the interpreter runs every tile operation in Python.
"""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import LOWP, assert_close_lowp  # noqa: E402
from slimops.reference import channel_conv as ref  # noqa: E402

OPS_NS = "slimops_triton"
FP_TOL = {torch.float32: (1e-5, 2e-5), torch.float64: (1e-10, 1e-10)}


@pytest.fixture(scope="module")
def tc():
    """The kernel module (imported here, after conftest switched the interpreter on)."""
    mod = importlib.import_module("slimops.triton.channel_conv")
    if not importlib.import_module("slimops.triton._common").INTERPRETED and not torch.cuda.is_available():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU")
    return mod


@pytest.fixture(scope="module")
def dev(tc):
    return "cpu" if importlib.import_module("slimops.triton._common").INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """Compiled fp32 runs on a GPU: IEEE products, as the reference on the CPU (no-op in the interpreter)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _ops():
    return getattr(torch.ops, OPS_NS)


def _rand(shape, dtype, dev, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(dev)


def _noncontig(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "strided":  # a view with a stride-2 last dim
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        v = big[..., ::2]
        assert not v.is_contiguous()
        return v
    return x


def _check(actual, expected, truth=None, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.dtype in LOWP:
        assert_close_lowp(actual.cpu(), expected.cpu(), truth.cpu(), msg=what)
    else:
        rtol, atol = FP_TOL[actual.dtype]
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------------
# channel_conv2d
# ---------------------------------------------------------------------------------------------------

# (N, C_in, H, W, C_out, k, stride, padding, dilation, in_idx, out_idx, input_gathered, bias, layout).
# in_idx / out_idx: a list, or an int n for n random (unsorted) distinct channels.
CHANNEL_CASES = {
    "k3_basic": (2, 5, 7, 6, 6, 3, 1, 1, 1, [3, 0, 4], [5, 1], False, True, "contig"),
    "k1_odd": (3, 3, 5, 7, 4, 1, 1, 0, 1, [2, 0], [3, 0, 2], False, True, "contig"),
    "k5_pad2": (1, 4, 9, 8, 3, 5, 1, 2, 1, 3, 2, False, False, "contig"),
    "stride2_pad1": (2, 6, 9, 7, 5, 3, 2, 1, 1, 4, 3, False, True, "channels_last"),
    "dilation2": (2, 4, 9, 9, 4, 3, 1, 2, 2, 2, 4, False, True, "contig"),
    "mixed_geometry": (1, 5, 10, 9, 4, 3, (2, 1), (0, 2), (1, 2), 3, 3, False, True, "strided"),
    "one_channel": (2, 1, 6, 5, 1, 3, 1, 1, 1, [0], [0], False, True, "contig"),
    "single_idx": (1, 6, 5, 5, 7, 3, 1, 0, 1, [4], [6], False, True, "contig"),
    "gathered": (2, 7, 7, 6, 5, 3, 1, 1, 1, [6, 1, 3], [4, 0, 2], True, True, "contig"),
    "gathered_stride2": (1, 5, 8, 9, 3, 3, 2, 0, 1, 4, 2, True, False, "strided"),
    # several input / output channel blocks and pixel tiles that cross samples (k = 1 keeps it cheap)
    "wide": (3, 40, 3, 4, 70, 1, 1, 0, 1, 35, 67, False, True, "contig"),
    "wide_gathered": (2, 40, 4, 3, 20, 1, 1, 1, 1, 33, 18, True, True, "contig"),
}


def _pick(spec, n):
    if isinstance(spec, int):
        return torch.randperm(n)[:spec]
    return torch.tensor(spec, dtype=torch.int64)


def _channel_inputs(case, dtype, dev):
    N, C_in, H, W, C_out, k, stride, padding, dilation, in_spec, out_spec, gathered, has_bias, layout = case
    in_idx, out_idx = _pick(in_spec, C_in), _pick(out_spec, C_out)
    cx = in_idx.numel() if gathered else C_in
    x = _noncontig(_rand((N, cx, H, W), dtype, dev), layout)
    w = _rand((C_out, C_in, k, k), dtype, dev, scale=0.3)
    b = _rand((C_out,), dtype, dev) if has_bias else None
    geo = (ref.pair(stride), ref.pair(padding), ref.pair(dilation))
    return x, w, b, in_idx.to(dev), out_idx.to(dev), geo, gathered


def _run_channel(x, w, b, in_idx, out_idx, geo, gathered, mask=(True, True, True), go=None, seed=7):
    """(y, grads) of the Triton op and of the reference (the reference on the same device/dtype)."""
    stride, padding, dilation = geo
    y = _ops().channel_conv2d(x, w, b, in_idx, out_idx, stride, padding, dilation, gathered)
    y_ref = ref.channel_conv2d(x.cpu(), w.cpu(), None if b is None else b.cpu(), in_idx.cpu(), out_idx.cpu(),
                               stride, padding, dilation, gathered)
    if go is None:
        g = torch.Generator().manual_seed(seed)
        go = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(x.dtype)
    grads = _ops().channel_conv2d_backward(go.to(x.device), x, w, in_idx, out_idx, stride, padding, dilation,
                                           gathered, list(mask))
    grads_ref = ref.channel_conv2d_backward(go, x.cpu(), w.cpu(), in_idx.cpu(), out_idx.cpu(), stride, padding,
                                            dilation, gathered, list(mask))
    return y, grads, y_ref, grads_ref, go


@pytest.mark.parametrize("name", list(CHANNEL_CASES))
def test_channel_conv2d_fp32(tc, dev, name):
    x, w, b, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES[name], torch.float32, dev)
    y, grads, y_ref, grads_ref, _ = _run_channel(x, w, b, ii, oo, geo, gathered)
    _check(y, y_ref, what=f"{name} y")
    for label, g, gr in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        _check(g, gr, what=f"{name} {label}")
    # zero outside the used block
    if not gathered:
        unused = torch.ones(x.shape[1], dtype=torch.bool)
        unused[ii.cpu()] = False
        assert (grads[0].cpu()[:, unused] == 0).all()


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("name", ["k3_basic", "stride2_pad1", "gathered"])
def test_channel_conv2d_lowp(tc, dev, name, dtype):
    x, w, b, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES[name], dtype, dev)
    y, grads, y_ref, grads_ref, go = _run_channel(x, w, b, ii, oo, geo, gathered)
    x64, w64 = x.cpu().double(), w.cpu().double()
    b64 = None if b is None else b.cpu().double()
    y64 = ref.channel_conv2d(x64, w64, b64, ii.cpu(), oo.cpu(), *geo, gathered)
    g64 = ref.channel_conv2d_backward(go.double(), x64, w64, ii.cpu(), oo.cpu(), *geo, gathered, [True] * 3)
    _check(y, y_ref, y64, what=f"{name} {dtype} y")
    for label, g, gr, gt in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref, g64):
        _check(g, gr, gt, what=f"{name} {dtype} {label}")


def test_channel_conv2d_fp64(tc, dev):
    x, w, b, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["stride2_pad1"], torch.float64, dev)
    y, grads, y_ref, grads_ref, _ = _run_channel(x, w, b, ii, oo, geo, gathered)
    _check(y, y_ref, what="fp64 y")
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="fp64 grad")


@pytest.mark.parametrize("gathered", [False, True])
def test_channel_conv2d_empty_in_idx(tc, dev, gathered):
    """No input channel: the output is the bias (broadcast), grad_x / grad_weight are zero."""
    case = (2, 4, 5, 5, 3, 3, 1, 1, 1, [], [2, 0], gathered, True, "contig")
    x, w, b, ii, oo, geo, g_ = _channel_inputs(case, torch.float32, dev)
    y, grads, y_ref, grads_ref, _ = _run_channel(x, w, b, ii, oo, geo, g_)
    _check(y, y_ref, what="y")
    assert torch.equal(y.cpu(), b.cpu()[oo.cpu()][None, :, None, None].expand_as(y).cpu())
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="grad")
    assert (grads[0] == 0).all() and (grads[1] == 0).all()


def test_channel_conv2d_empty_out_idx_and_batch(tc, dev):
    x, w, b, ii, oo, geo, _ = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float32, dev)
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    y, grads, y_ref, grads_ref, _ = _run_channel(x, w, b, ii, empty, geo, False)
    assert y.shape == y_ref.shape == (2, 0, 7, 6)
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="empty out_idx grad")
    assert (grads[0] == 0).all() and (grads[1] == 0).all() and (grads[2] == 0).all()
    # empty batch
    y, grads, y_ref, grads_ref, _ = _run_channel(x[:0], w, b, ii, oo, geo, False)
    assert y.shape == y_ref.shape == (0, 2, 7, 6)
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="empty batch grad")


def test_channel_conv2d_output_mask(tc, dev):
    """Gradients not asked for are empty tensors; the others are unchanged."""
    x, w, b, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float32, dev)
    _, full, _, _, go = _run_channel(x, w, b, ii, oo, geo, gathered)
    for mask in ([False, True, False], [True, False, True], [False, False, False]):
        grads = _ops().channel_conv2d_backward(go.to(dev), x, w, ii, oo, *geo, gathered, mask)
        for g, f, m in zip(grads, full, mask):
            if m:
                torch.testing.assert_close(g, f, rtol=0, atol=0)
            else:
                assert g.numel() == 0 and g.dtype == f.dtype


def test_channel_conv2d_split_reduction(tc, dev, monkeypatch):
    """grad_weight with the pixel reduction split over many programs (atomic accumulation)."""
    monkeypatch.setattr(tc, "_DW_TARGET_PROGRAMS", 10 ** 6)
    x, w, b, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["k3_basic"], torch.float32, dev)
    _, grads, _, grads_ref, _ = _run_channel(x, w, b, ii, oo, geo, gathered, mask=(False, True, False))
    _check(grads[1], grads_ref[1], what="split grad_weight")


# ---------------------------------------------------------------------------------------------------
# masked_conv2d
# ---------------------------------------------------------------------------------------------------

# (N, C_in, H, W, C_out, k, stride, padding, dilation, mask kind, bias, layout)
MASKED_CASES = {
    "k3_random": (3, 4, 7, 6, 5, 3, 1, 1, 1, "random", True, "contig"),
    "k1_all_kept": (2, 3, 5, 7, 4, 1, 1, 0, 1, "all", True, "contig"),
    "k3_none_kept": (2, 3, 6, 5, 4, 3, 1, 1, 1, "none", True, "contig"),
    "k5_mixed_rows": (3, 2, 8, 7, 5, 5, 1, 2, 1, "mixed", True, "channels_last"),
    "stride2_dil2": (2, 3, 9, 10, 4, 3, 2, 1, 2, "random", False, "strided"),
    "one_channel": (2, 1, 5, 5, 1, 3, 1, 1, 1, "mixed", True, "contig"),
    # several channel blocks per sample (C_out > 64): blocks past counts[n] return at once
    "wide": (3, 36, 3, 3, 70, 1, 1, 0, 1, "mixed", True, "contig"),
}


def _mask(kind, N, C, dev):
    if kind == "all":
        m = torch.ones(N, C, dtype=torch.bool)
    elif kind == "none":
        m = torch.zeros(N, C, dtype=torch.bool)
    elif kind == "random":
        m = torch.rand(N, C) < 0.5
    else:  # row 0 all kept, row 1 none, the rest random
        m = torch.rand(N, C) < 0.4
        m[0] = True
        if N > 1:
            m[1] = False
    return m.to(dev)


def _masked_inputs(case, dtype, dev):
    N, C_in, H, W, C_out, k, stride, padding, dilation, kind, has_bias, layout = case
    x = _noncontig(_rand((N, C_in, H, W), dtype, dev), layout)
    w = _rand((C_out, C_in, k, k), dtype, dev, scale=0.3)
    b = _rand((C_out,), dtype, dev) if has_bias else None
    geo = (ref.pair(stride), ref.pair(padding), ref.pair(dilation))
    return x, w, b, _mask(kind, N, C_out, dev), geo


def _run_masked(x, w, b, m, geo, mask=(True, True, True), seed=11):
    y = _ops().masked_conv2d(x, w, b, m, *geo)
    y_ref = ref.masked_conv2d(x.cpu(), w.cpu(), None if b is None else b.cpu(), m.cpu(), *geo)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(x.dtype)
    grads = _ops().masked_conv2d_backward(go.to(x.device), x, w, m, *geo, list(mask))
    grads_ref = ref.masked_conv2d_backward(go, x.cpu(), w.cpu(), m.cpu(), *geo, list(mask))
    return y, grads, y_ref, grads_ref, go


@pytest.mark.parametrize("name", list(MASKED_CASES))
def test_masked_conv2d_fp32(tc, dev, name):
    x, w, b, m, geo = _masked_inputs(MASKED_CASES[name], torch.float32, dev)
    y, grads, y_ref, grads_ref, _ = _run_masked(x, w, b, m, geo)
    _check(y, y_ref, what=f"{name} y")
    assert (y.cpu()[~m.cpu()] == 0).all(), "masked channels must be exactly 0 (not the bias)"
    for label, g, gr in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        _check(g, gr, what=f"{name} {label}")


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("name", ["k3_random", "stride2_dil2"])
def test_masked_conv2d_lowp(tc, dev, name, dtype):
    x, w, b, m, geo = _masked_inputs(MASKED_CASES[name], dtype, dev)
    y, grads, y_ref, grads_ref, go = _run_masked(x, w, b, m, geo)
    x64, w64 = x.cpu().double(), w.cpu().double()
    b64 = None if b is None else b.cpu().double()
    y64 = ref.masked_conv2d(x64, w64, b64, m.cpu(), *geo)
    g64 = ref.masked_conv2d_backward(go.double(), x64, w64, m.cpu(), *geo, [True] * 3)
    _check(y, y_ref, y64, what=f"{name} {dtype} y")
    assert (y.cpu()[~m.cpu()] == 0).all()
    for label, g, gr, gt in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref, g64):
        _check(g, gr, gt, what=f"{name} {dtype} {label}")


def test_masked_conv2d_fp64(tc, dev):
    x, w, b, m, geo = _masked_inputs(MASKED_CASES["k3_random"], torch.float64, dev)
    y, grads, y_ref, grads_ref, _ = _run_masked(x, w, b, m, geo)
    _check(y, y_ref, what="fp64 y")
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="fp64 grad")


def test_masked_conv2d_output_mask_and_empty(tc, dev):
    x, w, b, m, geo = _masked_inputs(MASKED_CASES["k3_random"], torch.float32, dev)
    _, full, _, _, go = _run_masked(x, w, b, m, geo)
    grads = _ops().masked_conv2d_backward(go.to(dev), x, w, m, *geo, [True, False, True])
    torch.testing.assert_close(grads[0], full[0], rtol=0, atol=0)
    assert grads[1].numel() == 0
    torch.testing.assert_close(grads[2], full[2], rtol=0, atol=0)
    # empty batch, no output channel
    y, grads, y_ref, grads_ref, _ = _run_masked(x[:0], w, b, m[:0], geo)
    assert y.shape == y_ref.shape
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="empty batch grad")
    y, grads, y_ref, grads_ref, _ = _run_masked(x, w[:0], b[:0], m[:, :0], geo)
    assert y.shape == y_ref.shape == (x.shape[0], 0, 7, 6)
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="no output channel grad")
    # no input channel: the bias on the kept channels, zero elsewhere
    y, grads, y_ref, grads_ref, _ = _run_masked(x[:, :0], w[:, :0], b, m, geo)
    _check(y, y_ref, what="no input channel y")
    assert (y.cpu()[~m.cpu()] == 0).all()
    for g, gr in zip(grads, grads_ref):
        _check(g, gr, what="no input channel grad")


def test_bad_geometry(tc, dev):
    x = torch.zeros(1, 2, 3, 3, device=dev)
    w = torch.zeros(2, 2, 5, 5, device=dev)
    idx = torch.tensor([0, 1], device=dev)
    with pytest.raises(ValueError, match="slimops.channel_conv2d"):
        _ops().channel_conv2d(x, w, None, idx, idx)  # 5x5 kernel on a 3x3 input, no padding
    with pytest.raises(TypeError, match="dtype"):
        _ops().masked_conv2d(x, w.double(), None, torch.ones(1, 2, dtype=torch.bool, device=dev), padding=[1, 1])


def test_masked_conv2d_split_reduction(tc, dev, monkeypatch):
    monkeypatch.setattr(tc, "_DW_TARGET_PROGRAMS", 10 ** 6)
    x, w, b, m, geo = _masked_inputs(MASKED_CASES["k3_random"], torch.float32, dev)
    _, grads, _, grads_ref, _ = _run_masked(x, w, b, m, geo, mask=(False, True, False))
    _check(grads[1], grads_ref[1], what="split grad_weight")


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------

SCHEMAS = {
    "channel_conv2d": "(Tensor x, Tensor weight, Tensor? bias, Tensor in_idx, Tensor out_idx, "
                      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, bool input_gathered=False) -> Tensor",
    "channel_conv2d_backward": "(Tensor grad_out, Tensor x, Tensor weight, Tensor in_idx, Tensor out_idx, "
                               "int[2] stride, int[2] padding, int[2] dilation, bool input_gathered, "
                               "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "masked_conv2d": "(Tensor x, Tensor weight, Tensor? bias, Tensor out_mask, int[2] stride=1, "
                     "int[2] padding=0, int[2] dilation=1) -> Tensor",
    "masked_conv2d_backward": "(Tensor grad_out, Tensor x, Tensor weight, Tensor out_mask, int[2] stride, "
                              "int[2] padding, int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
}


@pytest.mark.parametrize("op", list(SCHEMAS))
def test_schema_mirrors_cpp(tc, op):
    """Same argument names, order and defaults as csrc/registration.cpp (and as the compiled library's
    torch.ops.slimops.<op>, when the loaded build has it)."""
    schema = str(getattr(_ops(), op).default._schema)
    assert schema == f"{OPS_NS}::{op}{SCHEMAS[op]}"
    try:
        cpp = getattr(torch.ops.slimops, op)
    except (AttributeError, RuntimeError):
        return  # the compiled library in use predates the channel_conv family
    assert schema.split("::", 1)[1] == str(cpp.default._schema).split("::", 1)[1]


def test_defaults_and_fake(tc, dev):
    """Defaults from the schema; fake kernels give the real shapes (opcheck: schema + fake tensor)."""
    x, w, b, ii, oo, geo, _ = _channel_inputs(CHANNEL_CASES["k1_odd"], torch.float32, dev)
    y = _ops().channel_conv2d(x, w, b, ii, oo)
    torch.testing.assert_close(y, _ops().channel_conv2d(x, w, b, ii, oo, [1, 1], [0, 0], [1, 1], False))
    m = _mask("random", x.shape[0], w.shape[0], dev)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(_ops().channel_conv2d.default, (x, w, b, ii, oo, [2, 1], [1, 0], [1, 1], False),
                          test_utils=tests)
    torch.library.opcheck(_ops().masked_conv2d.default, (x, w, None, m, [1, 1], [1, 1], [1, 1]), test_utils=tests)
    go = torch.randn(y.shape, device=dev)
    torch.library.opcheck(_ops().channel_conv2d_backward.default,
                          (go, x, w, ii, oo, [1, 1], [0, 0], [1, 1], False, [True, False, True]), test_utils=tests)
    gm = torch.randn(x.shape[0], w.shape[0], *y.shape[2:], device=dev)
    torch.library.opcheck(_ops().masked_conv2d_backward.default,
                          (gm, x, w, m, [1, 1], [0, 0], [1, 1], [True, True, False]), test_utils=tests)


def test_precision_policy(tc, dev):
    """fp32 uses TF32 only for CUDA tensors with torch.backends.cudnn.allow_tf32 (cuDNN's policy)."""
    x = torch.zeros(1, device=dev)
    torch.backends.cudnn.allow_tf32 = True
    assert tc._compute_dtypes(x, x)[2] == ("tf32" if x.device.type == "cuda" else "ieee")
    torch.backends.cudnn.allow_tf32 = False
    assert tc._compute_dtypes(x, x)[2] == "ieee"
    h = x.half()
    assert tc._compute_dtypes(h, h)[3] == torch.float32
    assert tc._compute_dtypes(x.double(), x)[3] == torch.float64


def test_autograd_through_ops_layer(tc, dev):
    """The module wires the autograd of slimops.opdefs.channel_conv: gradients of a loss through the Triton ops
    match the reference's autograd."""
    x, w, b, ii, oo, geo, gathered = _channel_inputs(CHANNEL_CASES["stride2_pad1"], torch.float32, dev)
    m = _mask("mixed", x.shape[0], w.shape[0], dev)
    for masked in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        leaves_ref = [t.detach().cpu().clone().requires_grad_() for t in (x, w, b)]
        if masked:
            y = _ops().masked_conv2d(*leaves, m, *geo)
            y_ref = ref.masked_conv2d(*leaves_ref, m.cpu(), *geo)
        else:
            y = _ops().channel_conv2d(*leaves, ii, oo, *geo, gathered)
            y_ref = ref.channel_conv2d(*leaves_ref, ii.cpu(), oo.cpu(), *geo, gathered)
        grads = torch.autograd.grad((y * y.detach()).sum(), leaves)
        grads_ref = torch.autograd.grad((y_ref * y_ref.detach()).sum(), leaves_ref)
        for g, gr in zip(grads, grads_ref):
            torch.testing.assert_close(g.cpu(), gr, rtol=1e-4, atol=1e-4)
