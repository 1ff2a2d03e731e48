"""The sema family (SEMA localised attention): the reference twin (slimops/reference/sema.py) against an independent
naive oracle, then the public op and the C++ CPU kernel (slimops/ops/sema.py, csrc/cpu/sema.cpp) against the
reference twin.

1. The reference itself: an explicit N x N boolean mask built from the definition (docs/algorithms.md §8), masked
   softmax attention in float64 plus the mean of v; values and gradients on square, non-square and padded grids
   (9x11 with 7x7 windows, 5x3 with 2x2), 1x1 and whole-grid windows, both modes (neighbourhood: even windows,
   borders, window == grid).
2. The "cpu" backend (and "auto" on CPU) equals the reference: values and gradients (every output_mask, empty
   tensors for the gradients not asked for), d in {1, 16, 24, 32, 64, 128}, empty batches; float32/float64 tight,
   bfloat16/float16 within 2x of torch's own error; strided inputs (views of a fused qkv projection, a transposed
   head dim, a broadcast batch). CUDA variants (the Triton backend) are parametrised alongside and skip without
   a GPU.
3. float64 gradcheck through the public op, ``torch.library.opcheck`` on both ops, torch.compile(fullgraph=True).
4. Bad input: clear errors naming the op and the argument, from the Python layer and from the raw C++ op.

The tests of the C++ kernel skip (with the reason) while the extension has no CPU kernel for
``slimops::sema_attention``; the reference-vs-oracle tests and the Python-side checks run regardless.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import slimops  # noqa: F401  (registers torch.ops.slimops.*)
from slimops import _backend
from slimops.ops import sema as S
from slimops.reference import sema as ref
from tests.conftest import LOWP, assert_close_lowp, device_params

OPS = torch.ops.slimops

pytestmark = pytest.mark.usefixtures("one_thread")


def _has_cpu_kernel() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("slimops::sema_attention", "CPU")
    except RuntimeError:  # the extension predates the sema schemas
        return False


HAS_CPU_KERNEL = _has_cpu_kernel()
NO_CPU_KERNEL = ("the extension has no CPU kernel for slimops::sema_attention yet (csrc/cpu/sema.cpp not built: "
                 "rebuild with `make build`)")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason=NO_CPU_KERNEL)

MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


# ---- the independent oracle -----------------------------------------------------------------------------


def oracle_mask(grid, window, neighborhood):
    """(N, N) bool, [i, j] = key j is in W(i), built query by query from the definition: token t sits at row
    t // W, column t % W; a window of the partition covers rows [a*wh, min((a+1)*wh, H)) (columns likewise);
    a neighbourhood covers rows [s, s + wh) with s the centred start r - wh//2 pushed back inside the grid."""
    (gh, gw), (wh, ww) = grid, window
    n = gh * gw
    key_row = torch.arange(n) // gw
    key_col = torch.arange(n) % gw
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        r, c = divmod(i, gw)
        if neighborhood:
            r0 = r - wh // 2
            r0 = 0 if r0 < 0 else (gh - wh if r0 > gh - wh else r0)
            c0 = c - ww // 2
            c0 = 0 if c0 < 0 else (gw - ww if c0 > gw - ww else c0)
            r1, c1 = r0 + wh, c0 + ww
        else:
            r0, c0 = (r // wh) * wh, (c // ww) * ww
            r1, c1 = min(r0 + wh, gh), min(c0 + ww, gw)
        mask[i] = (key_row >= r0) & (key_row < r1) & (key_col >= c0) & (key_col < c1)
    return mask


def oracle(q, k, v, grid, window, neighborhood=False):
    """Masked softmax attention over all N keys in float64, plus the mean of v (differentiable)."""
    q, k, v = (t.double() for t in (q, k, v))
    mask = oracle_mask(grid, window, neighborhood).to(q.device)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = s.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return p @ v + v.mean(dim=2, keepdim=True)


def _qkv(b, h, grid, d, dtype=torch.float64, device="cpu", scale=1.0):
    n = grid[0] * grid[1]
    return [(torch.randn(b, h, n, d, dtype=torch.float64) * scale).to(device=device, dtype=dtype) for _ in range(3)]


# (grid, window, neighborhood)
ORACLE_CASES = [
    ((7, 7), (7, 7), False),     # one window == the grid
    ((14, 14), (7, 7), False),   # 2x2 windows
    ((9, 11), (7, 7), False),    # padded both ways
    ((5, 3), (2, 2), False),     # padded, odd sizes
    ((4, 6), (1, 1), False),     # 1x1 windows: out = v + mean(v)
    ((3, 5), (3, 5), False),     # whole grid, non-square
    ((6, 4), (2, 3), False),     # non-square window, padded columns
    ((1, 9), (1, 4), False),     # a single row of tokens
    ((8, 1), (3, 1), False),     # a single column
    ((7, 7), (3, 3), True),      # neighbourhood, borders
    ((9, 11), (4, 6), True),     # even windows: centre lower-right of the middle
    ((5, 5), (5, 5), True),      # window == grid: every query sees every key
    ((6, 8), (2, 2), True),
    ((4, 7), (1, 3), True),
    ((10, 3), (3, 3), True),     # window as wide as the grid
    ((3, 4), (1, 1), True),      # 1x1 neighbourhood
]


def _case_id(c):
    (grid, window, nb) = c
    return f"{grid[0]}x{grid[1]}-w{window[0]}x{window[1]}-{'nbhd' if nb else 'win'}"


# ---- 1. the reference twin against the oracle ----------------------------------------------------------


@pytest.mark.parametrize("case", ORACLE_CASES, ids=_case_id)
def test_oracle_mask_sizes(case):
    """The oracle's mask itself: windows are disjoint blocks of the clipped sizes; every neighbourhood has exactly
    wh*ww keys, holds its query and, away from the borders, is centred on it; the reference's gathered index
    (neighborhood_index) names the same keys."""
    grid, window, nb = case
    (gh, gw), (wh, ww) = grid, window
    m = oracle_mask(grid, window, nb)
    n = gh * gw
    assert m.diagonal().all()
    counts = m.sum(1)
    for i in range(n):
        r, c = divmod(i, gw)
        if nb:
            assert counts[i] == wh * ww
            if wh // 2 <= r < gh - (wh - 1 - wh // 2) and ww // 2 <= c < gw - (ww - 1 - ww // 2):
                rows = {j // gw for j in m[i].nonzero().flatten().tolist()}
                assert rows == set(range(r - wh // 2, r - wh // 2 + wh))
        else:
            a, b = r // wh, c // ww
            assert counts[i] == (min(wh, gh - a * wh)) * (min(ww, gw - b * ww))
    if not nb:
        assert torch.equal(m, m.T)  # same window is an equivalence relation
        assert torch.equal((m.double() @ m.double() > 0), m)
    else:
        idx = ref.neighborhood_index(grid, window)
        assert idx.shape == (n, wh * ww)
        from_idx = torch.zeros(n, n, dtype=torch.bool)
        from_idx.scatter_(1, idx, True)
        assert torch.equal(from_idx, m)


@pytest.mark.parametrize("case", ORACLE_CASES, ids=_case_id)
def test_reference_matches_oracle(case):
    grid, window, nb = case
    q, k, v = _qkv(2, 3, grid, 5)
    want = oracle(q, k, v, grid, window, nb)
    got = ref.sema_attention(q, k, v, grid, window, nb)
    assert got.dtype == torch.float64 and got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # float32 inputs: the reference computes in float32, rounded once
    got32 = ref.sema_attention(*(t.float() for t in (q, k, v)), grid, window, nb)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), oracle(*(t.float() for t in (q, k, v)), grid, window, nb),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ORACLE_CASES, ids=_case_id)
def test_reference_backward_matches_oracle(case):
    grid, window, nb = case
    q, k, v = _qkv(2, 2, grid, 4)
    g = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(oracle(*leaves, grid, window, nb), leaves, g)
    for mask in MASKS:
        got = ref.sema_attention_backward(g, q, k, v, grid, window, nb, mask)
        for a, b, m in zip(got, want, mask):
            if m:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            else:
                assert a.numel() == 0


def test_reference_special_cases():
    """1x1 windows: every query sees only itself, out = v + mean(v) exactly; window == grid: plain global softmax
    attention (SDPA) + mean, in both modes."""
    q, k, v = _qkv(2, 2, (4, 6), 8)
    torch.testing.assert_close(ref.sema_attention(q, k, v, (4, 6), (1, 1)), v + v.mean(2, keepdim=True),
                               rtol=1e-14, atol=1e-14)
    full = F.scaled_dot_product_attention(q, k, v) + v.mean(2, keepdim=True)
    for nb in (False, True):
        torch.testing.assert_close(ref.sema_attention(q, k, v, (4, 6), (4, 6), nb), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nb", [False, True], ids=["win", "nbhd"])
@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["B0", "heads0"])
def test_reference_empty(shape, nb):
    q, k, v = _qkv(*shape, (3, 4), 8, torch.float32)
    assert ref.sema_attention(q, k, v, (3, 4), (2, 2), nb).shape == q.shape
    gq, gk, gv = ref.sema_attention_backward(q, q, k, v, (3, 4), (2, 2), nb, [True, False, True])
    assert gq.shape == q.shape and gk.numel() == 0 and gv.shape == q.shape


def test_public_reference_backend_and_low_precision_dtype():
    q, k, v = _qkv(1, 2, (5, 3), 6, torch.float32)
    out = S.sema_attention(q, k, v, (5, 3), 2, backend="reference")
    torch.testing.assert_close(out, ref.sema_attention(q, k, v, (5, 3), (2, 2)), rtol=0, atol=0)
    for dt in LOWP:
        lo = [t.to(dt) for t in (q, k, v)]
        y = S.sema_attention(*lo, (5, 3), (2, 2), neighborhood=True, backend="reference")
        assert y.dtype == dt and y.shape == q.shape
        truth = oracle(*lo, (5, 3), (2, 2), True)  # float32 math, rounded once: within one rounding of the truth
        assert (y.double() - truth).abs().max() <= torch.finfo(dt).eps * truth.abs().max() + 1e-5


# ---- 2. the kernels against the reference --------------------------------------------------------------


def _kernel(device):
    """(backend name, backward op) of the kernel under test on ``device``: the C++ kernel on CPU (skips while it is
    not built), Triton on CUDA."""
    if device == "cpu":
        if not HAS_CPU_KERNEL:
            pytest.skip(NO_CPU_KERNEL)
        return "cpu", OPS.sema_attention_backward
    return "triton", _backend.triton_op("sema_attention_backward")


def _tol(device, dtype):
    if dtype == torch.float64:
        return 1e-10
    return 1e-5 if device == "cpu" else 2e-3  # GPU: Triton's fp32 dots may run in TF32


# (B, heads, grid, window, d, neighborhood)
KERNEL_CASES = [
    (2, 2, (7, 7), (7, 7), 32, False),
    (2, 3, (14, 14), (7, 7), 16, False),
    (1, 2, (9, 11), (7, 7), 24, False),
    (2, 1, (5, 3), (2, 2), 1, False),
    (1, 2, (8, 8), (2, 4), 64, False),
    (1, 1, (12, 10), (7, 7), 128, False),
    (2, 2, (4, 6), (1, 1), 16, False),
    (1, 2, (3, 5), (3, 5), 32, False),
    (1, 3, (1, 9), (1, 4), 8, False),
    (2, 2, (7, 7), (3, 3), 32, True),
    (1, 2, (9, 11), (4, 6), 24, True),
    (1, 1, (5, 5), (5, 5), 64, True),
    (2, 1, (6, 8), (2, 2), 1, True),
    (1, 1, (10, 13), (7, 7), 128, True),
    (1, 2, (4, 7), (1, 3), 16, True),
]
# every output_mask on these (all eight subsets); the others ask for all three gradients
ALL_MASKS_ON = set(KERNEL_CASES[:4] + KERNEL_CASES[9:11])
# and the grids/windows the reference was checked on against the oracle
KERNEL_CASES += [(2, 2, grid, window, 16, nb) for grid, window, nb in ORACLE_CASES
                 if (2, 2, grid, window, 16, nb) not in KERNEL_CASES]


def _kid(c):
    b, h, grid, window, d, nb = c
    return f"{b}x{h}-{grid[0]}x{grid[1]}-w{window[0]}x{window[1]}-d{d}-{'nbhd' if nb else 'win'}"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_kid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference(device, case, dtype):
    backend, backward = _kernel(device)
    b, h, grid, window, d, nb = case
    q, k, v = _qkv(b, h, grid, d, dtype, device)
    tol = _tol(device, dtype)
    out = S.sema_attention(q, k, v, grid, window, neighborhood=nb, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    torch.testing.assert_close(out, ref.sema_attention(q, k, v, grid, window, nb), rtol=tol, atol=tol)
    g = torch.randn_like(q)
    for mask in MASKS if case in ALL_MASKS_ON else [[True, True, True]]:
        got = backward(g, q, k, v, list(grid), list(window), nb, mask)
        want = ref.sema_attention_backward(g, q, k, v, grid, window, nb, mask)
        assert len(got) == 3
        for name, a, w, m in zip("qkv", got, want, mask):
            assert a.dtype == dtype and a.device == q.device, name
            if m:
                assert a.shape == q.shape, name
                torch.testing.assert_close(a, w, rtol=tol, atol=tol, msg=lambda s: f"grad_{name} {mask}: {s}")
            else:
                assert a.numel() == 0, f"grad_{name} not asked for must be empty, got shape {tuple(a.shape)}"


@pytest.mark.parametrize("device", device_params())
def test_autograd_through_public_op(device):
    """Gradients via loss.backward() (autograd registered on the op) equal the reference's autograd, for every
    subset of inputs that require grad."""
    backend, _ = _kernel(device)
    grid, window = (9, 11), (7, 7)
    base = _qkv(2, 2, grid, 16, torch.float32, device)
    g = torch.randn_like(base[0])
    tol = _tol(device, torch.float32)
    for nb in (False, True):
        for req in ([True, True, True], [True, False, False], [False, True, True]):
            ours = [t.clone().requires_grad_(r) for t, r in zip(base, req)]
            theirs = [t.clone().requires_grad_(r) for t, r in zip(base, req)]
            S.sema_attention(*ours, grid, window, neighborhood=nb, backend=backend).backward(g)
            ref.sema_attention(*theirs, grid, window, nb).backward(g)
            for a, w, r in zip(ours, theirs, req):
                assert (a.grad is None) == (not r)
                if r:
                    torch.testing.assert_close(a.grad, w.grad, rtol=tol, atol=tol)


@needs_cpu_kernel
def test_auto_on_cpu_is_the_cpu_kernel():
    q, k, v = _qkv(2, 2, (9, 11), 32, torch.float32)
    assert _backend.resolve("sema_attention", "auto", q.device) == "cpu"
    for nb in (False, True):
        a = S.sema_attention(q, k, v, (9, 11), 7, neighborhood=nb)
        assert torch.equal(a, S.sema_attention(q, k, v, (9, 11), 7, neighborhood=nb, backend="cpu"))
        torch.testing.assert_close(a, ref.sema_attention(q, k, v, (9, 11), (7, 7), nb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["B0", "heads0"])
@pytest.mark.parametrize("nb", [False, True])
def test_empty(device, shape, nb):
    backend, backward = _kernel(device)
    q, k, v = _qkv(*shape, (3, 4), 8, torch.float32, device)
    out = S.sema_attention(q, k, v, (3, 4), 2, neighborhood=nb, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    gq, gk, gv = backward(torch.zeros_like(q), q, k, v, [3, 4], [2, 2], nb, [True, False, True])
    assert gq.shape == q.shape and gk.numel() == 0 and gv.shape == q.shape


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("nb", [False, True], ids=["win", "nbhd"])
def test_low_precision_within_twice_torchs_error(device, dtype, nb):
    """bf16/fp16: the kernel's error against the float64 truth is at most 2x that of torch's own low-precision
    path (the reference on the low-precision inputs: fp32 logits/softmax/accumulation, rounded once), values and
    every gradient."""
    backend, backward = _kernel(device)
    grid, window = (9, 11), (7, 7)
    q, k, v = (t.to(dtype) for t in _qkv(2, 2, grid, 32, torch.float32, device))
    got = S.sema_attention(q, k, v, grid, window, neighborhood=nb, backend=backend)
    assert got.dtype == dtype
    hi = [t.double() for t in (q, k, v)]
    assert_close_lowp(got, ref.sema_attention(q, k, v, grid, window, nb), ref.sema_attention(*hi, grid, window, nb),
                      "sema_attention")
    g = torch.randn(q.shape, device=device).to(dtype)
    got = backward(g, q, k, v, list(grid), list(window), nb, [True, True, True])
    low = ref.sema_attention_backward(g, q, k, v, grid, window, nb, [True, True, True])
    truth = ref.sema_attention_backward(g.double(), *hi, grid, window, nb, [True, True, True])
    for name, a, lo, t in zip("qkv", got, low, truth):
        assert a.dtype == dtype
        assert_close_lowp(a, lo, t, f"grad_{name}")


def _strided(layout, b, h, n, d, device):
    """(leaves, make): the tensors that own the memory, and the function that makes the strided q, k, v views of
    them (so that gradients land in the leaves through the views)."""
    if layout == "fused_qkv":  # one (B, N, 3, heads, d) projection output, as a ViT's qkv Linear writes it
        return [torch.randn(b, n, 3, h, d, device=device)], lambda ls: ls[0].permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "transposed_d":  # the head dim strided (stride N): the kernel must still be right
        return [torch.randn(b, h, d, n, device=device) for _ in range(3)], lambda ls: [t.transpose(2, 3) for t in ls]
    # k and v shared by the batch: stride 0 along B
    leaves = [torch.randn(b, h, n, d, device=device)] + [torch.randn(1, h, n, d, device=device) for _ in range(2)]
    return leaves, lambda ls: [ls[0], ls[1].expand(b, h, n, d), ls[2].expand(b, h, n, d)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["fused_qkv", "transposed_d", "broadcast_batch"])
@pytest.mark.parametrize("nb", [False, True], ids=["win", "nbhd"])
def test_strided_inputs(device, layout, nb):
    backend, _ = _kernel(device)
    b, h, grid, window, d = 2, 2, (9, 11), (7, 7), 24
    n = grid[0] * grid[1]
    leaves, make = _strided(layout, b, h, n, d, device)
    q, k, v = make(leaves)
    assert q.shape == k.shape == v.shape == (b, h, n, d)
    if layout == "fused_qkv":
        assert q.stride() == (n * 3 * h * d, d, 3 * h * d, 1)
    elif layout == "transposed_d":
        assert q.stride(-1) == n
    else:
        assert k.stride(0) == 0
    tol = _tol(device, torch.float32)
    out = S.sema_attention(q, k, v, grid, window, neighborhood=nb, backend=backend)
    want = ref.sema_attention(q.contiguous(), k.contiguous(), v.contiguous(), grid, window, nb)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    # gradients through the views: into the fused tensor, the transposed storage, summed over the broadcast batch
    g = torch.randn_like(want)
    ours = [t.clone().requires_grad_() for t in leaves]
    theirs = [t.clone().requires_grad_() for t in leaves]
    S.sema_attention(*make(ours), grid, window, neighborhood=nb, backend=backend).backward(g)
    ref.sema_attention(*(t.contiguous() for t in make(theirs)), grid, window, nb).backward(g)
    for a, w in zip(ours, theirs):
        torch.testing.assert_close(a.grad, w.grad, rtol=tol, atol=tol)


@needs_cpu_kernel
def test_thread_count_does_not_change_results():
    q, k, v = _qkv(3, 2, (9, 11), 16)
    g = torch.randn_like(q)
    n = torch.get_num_threads()
    res = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for nb in (False, True):
                res.append(S.sema_attention(q, k, v, (9, 11), 7, neighborhood=nb, backend="cpu"))
                res.extend(OPS.sema_attention_backward(g, q, k, v, [9, 11], [7, 7], nb, [True] * 3))
    finally:
        torch.set_num_threads(n)
    half = len(res) // 2
    torch.testing.assert_close(res[:half], res[half:], rtol=1e-12, atol=1e-12)


# ---- 3. gradcheck, opcheck, compile --------------------------------------------------------------------


@needs_cpu_kernel
@pytest.mark.parametrize("grid,window,nb", [((3, 4), (2, 2), False), ((5, 3), (2, 2), False),
                                            ((4, 3), (3, 2), True), ((3, 3), (2, 2), True)], ids=str)
def test_gradcheck(grid, window, nb):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, grid, 3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: S.sema_attention(a, b, c, grid, window, neighborhood=nb, backend="cpu"), (q, k, v))


@needs_cpu_kernel
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("nb", [False, True], ids=["win", "nbhd"])
def test_opcheck(requires_grad, nb):
    q, k, v = _qkv(2, 2, (3, 5), 4)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(OPS.sema_attention, (q, k, v, [3, 5], [2, 2], nb))
    g = torch.randn(q.shape, dtype=q.dtype)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(OPS.sema_attention_backward,
                              (g, q.detach(), k.detach(), v.detach(), [3, 5], [2, 2], nb, mask))


@pytest.mark.parametrize("device", device_params())
def test_compile_fullgraph_matches_eager(device):
    backend, _ = _kernel(device)
    base = _qkv(2, 2, (5, 6), 8, torch.float32, device)

    def loss(q, k, v):
        a = S.sema_attention(q, k, v, (5, 6), 3, backend=backend)
        return (a * S.sema_attention(q, k, v, (5, 6), (2, 4), neighborhood=True, backend=backend)).sum()

    def grads(fn):
        ts = [t.clone().requires_grad_() for t in base]
        out = fn(*ts)
        out.backward()
        return [out] + [t.grad for t in ts]

    graphs = []

    def record(gm, example_inputs):  # Dynamo's graph must hold the op itself (traced, not inlined or broken)
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=record)
    for a, b in zip(grads(compiled), grads(loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("sema_attention" in t for t in targets) == 2, targets


# ---- 4. bad input ---------------------------------------------------------------------------------------


def _bad_cases():
    """(argument the message names, the check_sema message, exception, (q, k, v), grid, window)."""
    q, k, v = _qkv(2, 2, (3, 4), 8, torch.float32)
    return [
        ("N", "q has N = 12 tokens but grid \\(3, 5\\) holds grid\\[0\\]\\*grid\\[1\\] = 15", ValueError,
         (q, k, v), (3, 5), (2, 2)),
        ("k", "k must have the shape of q", ValueError, (q, k[:, :1], v), (3, 4), (2, 2)),
        ("v", "v must have the shape of q", ValueError, (q, k, v[..., :4]), (3, 4), (2, 2)),
        ("k", "k has dtype torch.float64 but q has dtype torch.float32", TypeError, (q, k.double(), v), (3, 4), (2, 2)),
        ("q", "q must be 4-D \\(B, heads, N, d\\)", ValueError, (q[0], k[0], v[0]), (3, 4), (2, 2)),
        ("q", "q must be 4-D \\(B, heads, N, d\\)", ValueError,
         (q[None], k[None], v[None]), (3, 4), (2, 2)),
        ("window", "window \\(4, 2\\) is larger than the grid \\(3, 4\\)", ValueError, (q, k, v), (3, 4), (4, 2)),
        ("window", "window \\(2, 5\\) is larger than the grid \\(3, 4\\)", ValueError, (q, k, v), (3, 4), (2, 5)),
        ("grid", "grid must be positive, got \\(0, 4\\)", ValueError, (q, k, v), (0, 4), (2, 2)),
        ("grid", "grid must be positive, got \\(-3, -4\\)", ValueError, (q, k, v), (-3, -4), (2, 2)),
        ("window", "window must be positive, got \\(2, 0\\)", ValueError, (q, k, v), (3, 4), (2, 0)),
        ("q", "q must be a floating-point tensor", TypeError,
         (torch.ones(2, 2, 12, 8, dtype=torch.int32),) * 3, (3, 4), (2, 2)),
        ("v", "v must be a floating-point tensor", TypeError, (q, k, v.to(torch.int64)), (3, 4), (2, 2)),
        ("q", "q must have a head dim d >= 1", ValueError, (q[..., :0], k[..., :0], v[..., :0]), (3, 4), (2, 2)),
        ("k", "k is on meta but q is on cpu", ValueError, (q, k.to("meta"), v), (3, 4), (2, 2)),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{c[0]}:{c[1][:28]}" for c in BAD])
def test_bad_input_public(case):
    _, msg, exc, tensors, grid, window = _bad_cases()[case]
    for nb in (False, True):
        with pytest.raises(exc, match=f"slimops.sema_attention: {msg}"):
            S.sema_attention(*tensors, grid, window, neighborhood=nb)
        with pytest.raises(exc, match=f"slimops.sema_attention: {msg}"):
            S.sema_attention(*tensors, grid, window, neighborhood=nb, backend="reference")


def _raw_pattern(msg):
    """The C++ checks print shapes and pairs as [a, b] and dtypes by their ATen names (Float, Double)."""
    msg = msg.replace("\\(", "[\\[(]").replace("\\)", "[\\])]")
    return msg.replace("torch.float64", "(torch.float64|Double)").replace("torch.float32", "(torch.float32|Float)")


@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{c[0]}:{c[1][:28]}" for c in BAD])
def test_bad_input_raw_op(case):
    """The raw ops go through the C++ checks (the fake kernels' for the meta-device case, which the dispatcher
    sends to the Meta kernel): same exception type and the same message, naming the op and the argument."""
    _, msg, exc, tensors, grid, window = _bad_cases()[case]
    if "meta" not in msg and not HAS_CPU_KERNEL:
        pytest.skip(NO_CPU_KERNEL)
    pat = _raw_pattern(msg)
    with pytest.raises(exc, match=f"slimops.sema_attention: {pat}"):
        OPS.sema_attention(*tensors, list(grid), list(window), False)
    g = torch.zeros(tensors[0].shape) if tensors[0].dtype.is_floating_point else tensors[0]
    with pytest.raises(exc, match=f"slimops.sema_attention_backward: {pat}"):
        OPS.sema_attention_backward(g, *tensors, list(grid), list(window), True, [True, True, True])


def test_bad_input_public_python_only():
    """What the schema cannot carry: grid/window that are not an int or a pair, a non-bool neighborhood."""
    q, k, v = _qkv(2, 2, (3, 4), 8, torch.float32)
    with pytest.raises(TypeError, match="slimops.sema_attention: grid must be an int or a pair of ints"):
        S.sema_attention(q, k, v, (3, 4, 1), 2)
    with pytest.raises(TypeError, match="slimops.sema_attention: window must be an int or a pair of ints"):
        S.sema_attention(q, k, v, (3, 4), 2.0)
    with pytest.raises(TypeError, match="slimops.sema_attention: window must be an int or a pair of ints"):
        S.sema_attention(q, k, v, (3, 4), True)
    with pytest.raises(TypeError, match="slimops.sema_attention: neighborhood must be a bool"):
        S.sema_attention(q, k, v, (3, 4), 2, neighborhood=1)
    with pytest.raises(TypeError, match="slimops.sema_attention: k must be a tensor"):
        S.sema_attention(q, k.tolist(), v, (3, 4), 2)
    with pytest.raises(ValueError, match="slimops.sema_attention: v must be a strided"):
        S.sema_attention(q, k, v.to_sparse(), (3, 4), 2)


@needs_cpu_kernel
def test_bad_input_backward_grad():
    q, k, v = _qkv(2, 2, (3, 4), 8, torch.float32)
    with pytest.raises(ValueError, match="slimops.sema_attention_backward: grad must have the shape of q"):
        OPS.sema_attention_backward(q[:1], q, k, v, [3, 4], [2, 2], False, [True, True, True])
    with pytest.raises(TypeError, match="slimops.sema_attention_backward: grad must be a floating-point"):
        OPS.sema_attention_backward(q.int(), q, k, v, [3, 4], [2, 2], False, [True, True, True])


def test_bad_backend(monkeypatch):
    q, k, v = _qkv(1, 2, (3, 4), 8, torch.float32)
    with pytest.raises(ValueError, match="slimops.sema_attention: unknown backend 'nope'"):
        S.sema_attention(q, k, v, (3, 4), 2, backend="nope")
    with pytest.raises(RuntimeError, match="slimops.sema_attention: backend 'cuda' cannot run: the tensors are on cpu"):
        S.sema_attention(q, k, v, (3, 4), 2, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="slimops.sema_attention: backend 'triton' cannot run: "
                                           "(the tensors are on cpu; Triton runs on CUDA|triton is not installed)"):
        S.sema_attention(q, k, v, (3, 4), 2, backend="triton")
    if not HAS_CPU_KERNEL:  # until the kernel is built, asking for it says so (and auto falls back)
        with pytest.raises(RuntimeError, match="slimops.sema_attention: backend 'cpu' cannot run: "
                                               "the extension has no CPU kernel"):
            S.sema_attention(q, k, v, (3, 4), 2, backend="cpu")
        torch.testing.assert_close(S.sema_attention(q, k, v, (3, 4), 2), ref.sema_attention(q, k, v, (3, 4), (2, 2)))


@pytest.mark.gpu
def test_wrong_device():
    q, k, v = _qkv(1, 2, (3, 4), 8, torch.float32)
    with pytest.raises(ValueError, match="slimops.sema_attention: v is on cpu but q is on cuda"):
        S.sema_attention(q.cuda(), k.cuda(), v, (3, 4), 2)
    with pytest.raises(ValueError, match="slimops.sema_attention: k is on cuda"):
        S.sema_attention(q, k.cuda(), v, (3, 4), 2)


@pytest.mark.gpu
def test_auto_on_cuda_is_triton():
    assert _backend.resolve("sema_attention", "auto", torch.device("cuda")) == "triton"
