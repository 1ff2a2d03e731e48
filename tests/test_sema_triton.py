"""The Triton kernels of the sema family (slimops/triton/sema.py) against the reference twin (slimops.reference.sema).

Runs through the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 when no GPU is visible, before
anything imports triton). With a GPU and the interpreter off, the same tests run the compiled kernels on CUDA
tensors (fp32 dots are 3xTF32 there, torch's TF32 flag forced off: a 1e-4 instead of 1e-5 fp32 tolerance).

- Values and every gradient on both modes: 1x1, 7x7 (14x14, and 9x11 padded), whole-grid, non-square windows, a
  window of 100 tokens (more than one query and key tile: the online softmax and the two-kernel backward instead of
  the fused one), neighbourhoods with borders, even windows, the whole grid, 1xN / Nx1 grids and regions of several
  key / query tiles; head dims 1, 5, 16, 24, 32, 64. float32 / float64 within tight tolerances; bfloat16 / float16
  against the float64 truth, error at most twice the reference's own in that dtype plus a small floor
  (conftest.assert_close_lowp). Large logits (saturated softmax).
- Strided inputs (views of a fused qkv projection, a batch-broadcast k / v with stride 0, a strided head dim), every
  output_mask, empty batches, opcheck, autograd and gradcheck through the public op with backend="triton", bad input.

Shapes are tiny and few: the interpreter runs every tile operation of every program in Python.
"""
from __future__ import annotations

import collections
import itertools

import pytest
import torch

from conftest import LOWP, assert_close_lowp, triton_family
from slimops.ops import sema as S
from slimops.reference import sema as ref

ts, INTERPRETED, DEV, NEEDS_TRITON = triton_family("sema")

pytestmark = [NEEDS_TRITON, pytest.mark.usefixtures("one_thread", "no_matmul_tf32")]

OPS_NS = "slimops_triton"
# float32 compiled on a GPU: 3xTF32 dots (~1e-6 of the logits' size per product sum; the large-logit cases have
# logits ~10), hence the looser compiled tolerance.
FP_TOL = {torch.float32: 1e-5 if INTERPRETED else 1e-4, torch.float64: 1e-10}
ALL = [True, True, True]




def _ops():
    return getattr(torch.ops, OPS_NS)


def _qkv(b, h, grid, d, dtype, scale=1.0):
    n = grid[0] * grid[1]
    return [(torch.randn(b, h, n, d, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype) for _ in range(3)]


def _check(actual, expected, truth=None, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device.type == DEV, what
    if actual.dtype in LOWP:
        assert_close_lowp(actual.cpu(), expected.cpu(), truth.cpu(), msg=what)
    else:
        tol = FP_TOL[actual.dtype]
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _check_case(q, k, v, g, grid, window, nb, what, mask=ALL):
    """Forward and backward of the Triton ops against the reference (on CPU copies; low precision also against
    the float64 truth); gradients not asked for must be empty tensors."""
    lowp = q.dtype in LOWP
    qc, kc, vc, gc = (t.cpu() for t in (q, k, v, g))
    hi = [t.double() for t in (qc, kc, vc, gc)]
    out = _ops().sema_attention(q, k, v, list(grid), list(window), nb)
    _check(out, ref.sema_attention(qc, kc, vc, grid, window, nb),
           ref.sema_attention(*hi[:3], grid, window, nb) if lowp else None, f"{what} out")
    got = _ops().sema_attention_backward(g, q, k, v, list(grid), list(window), nb, list(mask))
    want = ref.sema_attention_backward(gc, qc, kc, vc, grid, window, nb, mask)
    truth = ref.sema_attention_backward(hi[3], *hi[:3], grid, window, nb, mask) if lowp else (None,) * 3
    assert len(got) == 3
    for name, a, e, t, m in zip("qkv", got, want, truth, mask):
        if m:
            _check(a, e, t, f"{what} grad_{name}")
        else:
            assert a.numel() == 0, f"{what} grad_{name}: not asked for, must be empty"


# (B, heads, grid, window, d, neighborhood)
CASES = {
    "win1x1": (2, 1, (4, 6), (1, 1), 16, False),
    "win7-14x14": (1, 2, (14, 14), (7, 7), 32, False),
    "win7-9x11-padded": (1, 1, (9, 11), (7, 7), 24, False),
    "win-whole-grid": (1, 2, (5, 7), (5, 7), 16, False),
    "win-nonsquare": (1, 1, (6, 8), (2, 4), 64, False),
    "win10x10-multitile": (1, 1, (10, 12), (10, 10), 16, False),  # 100-token windows (and a 10x2 one)
    "win-small-d": (1, 1, (5, 7), (2, 3), 5, False),
    "win-1xN": (1, 2, (1, 9), (1, 4), 8, False),
    "nb3-7x7": (1, 1, (7, 7), (3, 3), 32, True),
    "nb-even-9x11": (1, 1, (9, 11), (4, 6), 24, True),
    "nb-whole-grid": (1, 1, (5, 5), (5, 5), 16, True),
    "nb7-multitile": (1, 1, (12, 13), (7, 7), 16, True),  # 2x2 tiles of 8x8 queries, 14x14-key regions
    "nb-d1": (2, 1, (6, 8), (2, 2), 1, True),
    "nb-Nx1": (1, 1, (9, 1), (3, 1), 16, True),
    "nb1x1": (1, 1, (3, 4), (1, 1), 16, True),
    # key tiles starting at row / column 8 < window - 1: their queries reach back to row / column 0
    "nb10-tile-border": (1, 1, (12, 11), (10, 10), 16, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32(name):
    b, h, grid, window, d, nb = CASES[name]
    q, k, v = _qkv(b, h, grid, d, torch.float32)
    _check_case(q, k, v, torch.randn_like(q), grid, window, nb, name)


@pytest.mark.parametrize("name", ["win7-9x11-padded", "win10x10-multitile", "nb-even-9x11", "nb7-multitile"])
def test_fp64(name):
    b, h, grid, window, d, nb = CASES[name]
    q, k, v = _qkv(b, h, grid, d, torch.float64)
    _check_case(q, k, v, torch.randn_like(q), grid, window, nb, name)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("name", ["win7-9x11-padded", "win10x10-multitile", "nb-even-9x11"])
def test_low_precision(name, dtype):
    """bf16 / fp16 storage, P and dS rounded to it for the dots (as on the GPU): within 2x of torch's own error."""
    b, h, grid, window, d, nb = CASES[name]
    q, k, v = _qkv(b, h, grid, d, dtype)
    _check_case(q, k, v, torch.randn(q.shape, device=DEV).to(dtype), grid, window, nb, f"{name} {dtype}")


@pytest.mark.parametrize("name", ["win7-14x14", "win10x10-multitile", "nb7-multitile"])
def test_large_logits(name):
    """Logits of size ~100: saturated softmax rows, the online rescaling across key tiles must stay exact."""
    b, h, grid, window, d, nb = CASES[name]
    q, k, v = _qkv(b, h, grid, d, torch.float32)
    _check_case(q * 3, k * 3, v, torch.randn_like(q), grid, window, nb, name)


@pytest.mark.parametrize("nb", [False, True], ids=["win", "nbhd"])
def test_fused_qkv_views(nb):
    """q, k, v as views of one (B, N, 3, heads, d) projection output (token stride 3*heads*d, head stride d),
    read in place; a non-contiguous grad."""
    b, h, grid, window, d = 1, 2, (9, 11), (7, 7), 16
    n = grid[0] * grid[1]
    base = torch.randn(b, n, 3, h, d, device=DEV)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    assert q.stride() == (n * 3 * h * d, d, 3 * h * d, 1)
    g = torch.randn(b, n, h, d, device=DEV).transpose(1, 2)
    _check_case(q, k, v, g, grid, window, nb, "fused qkv")
    # autograd into the fused tensor
    leaf = base.clone().requires_grad_()
    leaf_ref = base.cpu().clone().requires_grad_()
    S.sema_attention(*leaf.permute(2, 0, 3, 1, 4).unbind(0), grid, window, neighborhood=nb,
                     backend="triton").backward(g)
    ref.sema_attention(*[t.contiguous() for t in leaf_ref.permute(2, 0, 3, 1, 4).unbind(0)], grid, window,
                       nb).backward(g.cpu())
    _check(leaf.grad, leaf_ref.grad, what="grad of the fused qkv")


def test_broadcast_batch_and_strided_head_dim():
    """k, v shared by the batch (stride 0 along B, read in place), q with a strided head dim (copied)."""
    b, h, grid, window, d = 2, 1, (5, 7), (3, 3), 16
    n = grid[0] * grid[1]
    q = torch.randn(b, h, d, n, device=DEV).transpose(2, 3)
    k, v = (torch.randn(1, h, n, d, device=DEV).expand(b, h, n, d) for _ in range(2))
    assert q.stride(-1) == n and k.stride(0) == 0
    for nb in (False, True):
        _check_case(q, k, v, torch.randn(b, h, n, d, device=DEV), grid, window, nb, f"strided nb={nb}")


MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("name", ["win7-9x11-padded", "win10x10-multitile", "nb-even-9x11"])
def test_output_mask(name):
    """Every subset of gradients, on the fused backward, the two-kernel window backward and neighbourhoods."""
    b, h, grid, window, d, nb = CASES[name]
    q, k, v = _qkv(b, h, grid, d, torch.float32)
    g = torch.randn_like(q)
    for mask in MASKS[1:]:
        _check_case(q, k, v, g, grid, window, nb, f"{name} mask={mask}", mask)


@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["B0", "heads0"])
def test_empty(shape):
    q, k, v = _qkv(*shape, (3, 4), 8, torch.float32)
    for nb in (False, True):
        out = _ops().sema_attention(q, k, v, [3, 4], [2, 2], nb)
        assert out.shape == q.shape and out.dtype == q.dtype
        gq, gk, gv = _ops().sema_attention_backward(q, q, k, v, [3, 4], [2, 2], nb, [True, False, True])
        assert gq.shape == q.shape and gk.numel() == 0 and gv.shape == q.shape


def test_plans():
    """The tiling the docstring describes: a 7x7 window is one 64-lane tile and takes the fused backward, a 10x10
    window two chunks and the two-kernel path; neighbourhood tiles are 8x8 positions (fewer on small grids)."""
    q = torch.zeros(2, 3, 56 * 56, 32, device=DEV)
    p = ts._Plan("t", q, (56, 56), (7, 7), False)
    assert (p.own, p.loop, p.nchunk, p.nrect, p.fused, p.D) == (64, 64, 1, 64, True, 32)
    assert p.programs == 6 * 64
    p = ts._Plan("t", q[:, :, :100], (10, 10), (10, 10), False)
    assert (p.own, p.nchunk, p.nrect, p.fused) == (64, 2, 1, False)
    p = ts._Plan("t", q[..., :5], (56, 56), (7, 7), True)
    assert (p.TR, p.TC, p.own, p.loop, p.nchunk, p.nrect, p.fused, p.D) == (8, 8, 64, 64, 1, 49, False, 16)
    p = ts._Plan("t", q[:, :, :9], (9, 1), (3, 1), True)
    assert (p.TR, p.TC, p.own, p.loop) == (16, 1, 16, 16)
    p = ts._Plan("t", q[:, :, :24], (4, 6), (1, 1), False)
    assert (p.own, p.nchunk, p.nrect, p.fused) == (16, 1, 24, True)
    # float64: 32-token tiles (a 7x7 window takes two chunks and the two-kernel backward), 8x4 neighbourhood tiles
    p = ts._Plan("t", q.double(), (56, 56), (7, 7), False)
    assert (p.own, p.nchunk, p.fused, p.stages) == (32, 2, False, 1)
    p = ts._Plan("t", q.double(), (56, 56), (7, 7), True)
    assert (p.TR, p.TC, p.own, p.loop) == (4, 8, 32, 32)
    assert ts._Plan("t", q.half(), (56, 56), (7, 7), False).stages == 2


def test_inverse_neighbourhood_range():
    """The key-centric backward's query range (sema._nb_first_query / _nb_last_query): query rows r' with
    s(r') <= r < s(r') + wh are exactly (0 if r < wh else r - wh + 1 + wh//2) .. (H - 1 if r >= H - wh else
    min(H - 1, r + wh//2)), every H, wh, r. (max(0, r - wh + 1 + wh//2) is not the first one: queries near the
    lower border all start at 0; the "nb10-tile-border" case runs the kernel where that differs.)"""
    for gh in range(1, 13):
        for wh in range(1, gh + 1):
            s = ref.neighborhood_start(torch.arange(gh), wh, gh)
            for r in range(gh):
                sees = [rq for rq in range(gh) if s[rq] <= r < s[rq] + wh]
                lo = 0 if r < wh else r - wh + 1 + wh // 2
                hi = gh - 1 if r >= gh - wh else min(gh - 1, r + wh // 2)
                assert sees == list(range(lo, hi + 1)), (gh, wh, r)


def test_precision_policy():
    """fp32 dots on CUDA: 3xTF32 (plain TF32 only when torch's matmul TF32 flag is on), IEEE elsewhere; the
    interpreter's bf16 dots as fp32 products."""
    x = torch.zeros(1, device=DEV)
    assert ts._FP32_DOT == "tf32x3"
    for allow in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = allow
        assert ts._precision(x) == ("ieee" if DEV == "cpu" else "tf32" if allow else "tf32x3")
        assert ts._precision(x.half()) == ts._precision(x.double()) == "ieee"
    assert ts.math_dtype(x.bfloat16()) == torch.float32 and ts.math_dtype(x.double()) == torch.float64
    assert ts._dot_dtype(x.bfloat16()) == (torch.float32 if INTERPRETED else torch.bfloat16)
    assert ts._dot_dtype(x.half()) == torch.float16


# ---- registration, autograd, errors ---------------------------------------------------------------------

def test_schemas_mirror_cpp():
    """Same argument names, order and defaults as the slimops:: schemas of csrc/registration.cpp (which
    slimops.ops.sema needs at import, so they are loaded here)."""
    for op in ("sema_attention", "sema_attention_backward"):
        ours = str(getattr(_ops(), op).default._schema)
        cpp = str(getattr(torch.ops.slimops, op).default._schema)
        assert ours.split("::", 1) == [OPS_NS, cpp.split("::", 1)[1]], (ours, cpp)


@pytest.mark.parametrize("nb", [False, True], ids=["win", "nbhd"])
def test_opcheck(nb):
    q, k, v = _qkv(1, 2, (3, 5), 4, torch.float32)
    torch.library.opcheck(_ops().sema_attention.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), [3, 5], [2, 2], nb))
    fast = ("test_schema", "test_faketensor", "test_autograd_registration")  # (AOT dispatch costs seconds)
    g = torch.randn(q.shape, device=DEV)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(_ops().sema_attention_backward.default,
                              (g, q.detach(), k.detach(), v.detach(), [3, 5], [2, 2], nb, mask), test_utils=fast)


def test_autograd_through_public_op():
    """loss.backward() through slimops.ops.sema_attention(backend="triton") equals the reference's autograd, for
    subsets of inputs that require grad; and a float64 gradcheck of the op."""
    grid, window = (5, 7), (3, 4)
    base = _qkv(1, 2, grid, 8, torch.float32)
    g = torch.randn_like(base[0])
    for nb in (False, True):
        for req in ([True, True, True], [True, False, False], [False, True, True]):
            ours = [t.clone().requires_grad_(r) for t, r in zip(base, req)]
            theirs = [t.cpu().clone().requires_grad_(r) for t, r in zip(base, req)]
            S.sema_attention(*ours, grid, window, neighborhood=nb, backend="triton").backward(g)
            ref.sema_attention(*theirs, grid, window, nb).backward(g.cpu())
            for a, w, r in zip(ours, theirs, req):
                assert (a.grad is None) == (not r)
                if r:
                    _check(a.grad, w.grad, what=f"autograd nb={nb} req={req}")
    for nb in (False, True):
        q, k, v = (t.requires_grad_() for t in _qkv(1, 1, (3, 4), 3, torch.float64))
        assert torch.autograd.gradcheck(
            lambda a, b, c: S.sema_attention(a, b, c, (3, 4), (2, 3), neighborhood=nb, backend="triton"),
            (q, k, v), fast_mode=True)


def test_bad_input():
    """The shared checks of slimops.ops.sema: the same errors as every other backend, from the ops and the fakes."""
    q, k, v = _qkv(1, 2, (3, 4), 8, torch.float32)
    with pytest.raises(ValueError, match=r"slimops\.sema_attention: q has N = 12 tokens but grid \(3, 5\)"):
        _ops().sema_attention(q, k, v, [3, 5], [2, 2], False)
    with pytest.raises(ValueError, match=r"slimops\.sema_attention: window \(4, 2\) is larger than the grid"):
        _ops().sema_attention(q, k, v, [3, 4], [4, 2], True)
    with pytest.raises(TypeError, match=r"slimops\.sema_attention: k has dtype torch\.float64 but q has dtype"):
        _ops().sema_attention(q, k.double(), v, [3, 4], [2, 2], False)
    with pytest.raises(ValueError, match=r"slimops\.sema_attention_backward: window \(2, 5\) is larger"):
        _ops().sema_attention_backward(q, q, k, v, [3, 4], [2, 5], False, ALL)
    with pytest.raises(ValueError, match=r"slimops\.sema_attention_backward: grad must have the shape of q"):
        _ops().sema_attention_backward(q[:, :1], q, k, v, [3, 4], [2, 2], False, ALL)
    with pytest.raises(ValueError, match=r"slimops\.sema_attention: q has N = 12 tokens"):
        S.sema_attention(q, k, v, (3, 5), 2, backend="triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match=r"slimops\.sema_attention: window \(4, 2\)"):
        _ops().sema_attention(*(mode.from_tensor(t) for t in (q, k, v)), [3, 4], [4, 2], False)


def test_out_of_resources(monkeypatch):
    """A configuration that does not fit the GPU (Triton's OutOfResources at the first launch): an error naming the
    op and the way out."""
    from triton.runtime.errors import OutOfResources

    def too_big(*args, **kwargs):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(ts, "_fwd_kernel", collections.defaultdict(lambda: too_big))  # kernel[grid] -> launcher
    q, k, v = _qkv(1, 1, (2, 1), 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"slimops\.sema_attention: the Triton kernel does not fit .*shared "
                                           r"memory.*backend='reference'"):
        _ops().sema_attention(q, k, v, [2, 1], [1, 1], False)


def test_wrong_device_for_backend():
    """The interpreter runs CPU tensors only, compiled Triton CUDA tensors only: a clear error otherwise."""
    other = "cuda" if DEV == "cpu" else "cpu"
    if other == "cuda" and not torch.cuda.is_available():
        pytest.skip("no second device to try")
    q, k, v = (t.to(other) for t in _qkv(1, 1, (3, 4), 8, torch.float32))
    with pytest.raises(ValueError, match=r"slimops\.sema_attention: .*(Triton|interpreter)"):
        _ops().sema_attention(q, k, v, [3, 4], [2, 2], False)


# ---- GPU only: realistic sizes ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("grid,window,nb", [((56, 56), (7, 7), False), ((28, 28), (28, 28), False),
                                            ((56, 56), (7, 7), True)], ids=["sema-t", "whole-28x28", "nbhd"])
def test_realistic_sizes_gpu(grid, window, nb):
    """SEMA-T stage-1 shapes (56x56 tokens, 7x7 windows, d=32) in bf16, a 784-token whole-grid window in fp32."""
    if DEV != "cuda":
        pytest.skip("compiled kernels only")
    dtype = torch.float32 if window == grid else torch.bfloat16
    q, k, v = _qkv(4, 2, grid, 32, dtype)
    _check_case(q, k, v, torch.randn(q.shape, device=DEV).to(dtype), grid, window, nb, f"{grid} {window}")
