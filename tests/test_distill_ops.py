"""The distill family (FAQD's feature-affinity loss): the reference twin (slimops/reference/distill.py) against an
independent float64 oracle written from the definition, then the public op and the C++ CPU kernel
(slimops/ops/distill.py, csrc/cpu/distill.cpp) against the reference.

1. The reference itself: a loop over the pixels of each sample (row i of Δ = ŝ_iᵀŜ − t̂_iᵀT̂, times Z for the fast
   loss), values and both gradients (autograd of the loop; the normalisation's backward also in closed form, which
   gives g/1e-5 at an all-zero pixel).
2. The "cpu" backend (and "auto") equals the reference: values and gradients (every output_mask), exact and fast
   (a given projection, the seeded ``fast=True, k=...`` path), norms l1 and l2sq, Cs != Ct, 1x1 pixels, fewer than
   one 64-pixel block, several blocks, pixel counts not a multiple of 16, chunks of samples, B = 0, zero channels,
   all-zero pixels, NaN/inf; float32/float64 tight, bfloat16/float16 within twice the reference's own error against
   a float64 truth; strided inputs (channels_last, slices, a stride-0 expanded teacher) with contiguous gradients;
   the exact loss bit-identical with 1 and 2 threads.
3. The public wrapper: reductions, ``proj`` needs ``fast=True``, its own argument errors; float64 gradcheck,
   ``torch.library.opcheck`` on both ops, torch.compile(fullgraph=True) forward + backward.
4. Bad input: every check of slimops/opdefs/distill.py and csrc/include/slimops/distill_checks.h, through the public
   op (backends cpu and reference), the raw C++ ops and the fake kernels.
5. What the docstrings claim: the fast l2sq loss is an unbiased estimate of the exact l2sq loss; the fast l1 loss
   estimates √(2/π)·Σ_i ‖row_i Δ‖₂ / (HW)² (not the exact l1 loss); neither pass ever holds an HW x HW matrix (peak
   memory of a 128x128 feature map, in a subprocess).

Inputs: the teacher's features are drawn 10x smaller than the student's, so that the diagonal of Δ,
‖ŝ_i‖² − ‖t̂_i‖² ≈ 2·1e-5·(1/‖t_i‖ − 1/‖s_i‖), is far from 0 next to float32 rounding (its sign is the l1 gradient).
"""
from __future__ import annotations

import itertools
import math
import sys
import textwrap

import pytest
import torch

import slimops  # noqa: F401  (registers torch.ops.slimops.*)
from slimops import _backend
from slimops.ops import distill as K
from slimops.reference import distill as ref
from tests.conftest import LOWP, assert_close_lowp

OPS = torch.ops.slimops


def op_loss(*args):
    """The raw op's per-sample loss (its 1st output; the 2nd and 3rd are the fast loss's saved products)."""
    return OPS.feature_affinity_loss(*args)[0]
F32, F64 = torch.float32, torch.float64
EPS = 1e-5
NORMS = ("l1", "l2sq")
MASKS = [list(m) for m in itertools.product([True, False], repeat=2)]
RTOL = {F64: 1e-11, F32: 2e-5}  # relative to the largest entry of the expected tensor
# plus, for losses, an absolute tolerance: an entry of Δ is a difference of two sums of Cs (Ct) products of magnitude
# <= 1, so its rounding error is absolute (a few float32 ulps of 1), even where the loss itself is tiny (1x1 pixels:
# the loss is |‖ŝ‖² − ‖t̂‖²| ≈ 1e-4, all cancellation)
LOSS_ATOL = {F64: 1e-14, F32: 1e-6}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the independent oracle ----------------------------------------------------------------------------------------


def normalise(f):
    """(B, C, H, W) -> (B, C, HW) float64, each pixel's channel vector divided by its L2 norm + 1e-5."""
    f = f.double().flatten(2)
    return f / (f.square().sum(1, keepdim=True).sqrt() + EPS)


def oracle_normalised(s, t, proj=None, norm="l1"):
    """The per-sample loss from normalised features (B, C, HW), pixel row by pixel row, in float64."""
    b, _, hw = s.shape
    z = None if proj is None else proj.double()
    out = []
    for bb in range(b):
        total = s.new_zeros(())
        for i in range(hw):
            row = s[bb, :, i] @ s[bb] - t[bb, :, i] @ t[bb]  # Δ_i,: (cosine similarities of pixel i)
            v = row if z is None else row @ z
            total = total + (v.abs() if norm == "l1" else v.square()).sum()
        out.append(total / (hw * hw * (1 if z is None else z.shape[1])))
    return torch.stack(out) if out else s.new_zeros(0)


def oracle(fs, ft, proj=None, norm="l1"):
    return oracle_normalised(normalise(fs), normalise(ft), proj, norm)


def normalise_backward(f, g):
    """The normalisation's backward in closed form: g/(n + ε) − f̂ (f̂ᵀg)/n per pixel, the second term 0 at n = 0."""
    x = f.double().flatten(2)
    n = x.square().sum(1, keepdim=True).sqrt()
    fh = x / (n + EPS)
    corr = torch.where(n > 0, fh * (fh * g).sum(1, keepdim=True) / n.clamp_min(1e-300), torch.zeros_like(fh))
    return (g / (n + EPS) - corr).reshape(f.shape)


def oracle_grads(grad, fs, ft, proj=None, norm="l1"):
    """(grad_fs, grad_ft) in float64: autograd of the loop oracle w.r.t. the normalised features, then
    :func:`normalise_backward`."""
    s = normalise(fs).requires_grad_()
    t = normalise(ft).requires_grad_()
    gs, gt = torch.autograd.grad(oracle_normalised(s, t, proj, norm), (s, t), grad.double(), allow_unused=True)
    gs = torch.zeros_like(s) if gs is None else gs
    gt = torch.zeros_like(t) if gt is None else gt
    return normalise_backward(fs, gs), normalise_backward(ft, gt)


def close(actual, expected, rtol, msg="", atol=0.0):
    """Same dtype and shape, max |actual − expected| <= rtol · max |expected| + atol (gradients are of order 1/HW: a
    fixed absolute tolerance alone would mean nothing), NaN where expected has NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{msg}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.detach().double().nan_to_num(0, 0, 0).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * max(scale, 1e-30) + atol, equal_nan=True,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def cancellation_scale(grad, fs, ft, proj=None, norm="l1"):
    """Per side, max over pixels of ‖ĝ_p‖/(n_p + ε), ĝ the gradient w.r.t. the normalised features (float64): the size
    of the two terms the normalisation's backward subtracts, g/(n + ε) − f̂ (f̂ᵀg)/n. The loss is nearly invariant
    to a pixel's scale, so the result is much smaller than either term where ĝ ∥ f̂ (1x1 pixels, one channel) and its
    rounding error is relative to this scale, not to the result."""
    s, t = normalise(fs).requires_grad_(), normalise(ft).requires_grad_()
    d = s.transpose(1, 2) @ s - t.transpose(1, 2) @ t
    if proj is not None:
        d = d @ proj.double()
    hw = s.shape[2]
    loss = (d.abs() if norm == "l1" else d.square()).sum((1, 2)) / (hw * hw * (1 if proj is None else proj.shape[1]))
    gs, gt = torch.autograd.grad(loss, (s, t), grad.double(), allow_unused=True)
    out = []
    for f, g in ((fs, gs), (ft, gt)):
        n = f.double().flatten(2).norm(dim=1)
        out.append(0.0 if g is None or g.numel() == 0 else (g.norm(dim=1) / (n + EPS)).max().item())
    return out


# the rounding error of a gradient relative to cancellation_scale (float32: ~ a hundred ulps)
GRAD_ATOL = {F64: 1e-13, F32: 1e-5}


def _case(b, cs, ct, h, w, dtype=F64, k=None, seed=0, tscale=0.1):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(b, cs, h, w, generator=g, dtype=F64).to(dtype)
    ft = (torch.randn(b, ct, h, w, generator=g, dtype=F64) * tscale).to(dtype)
    proj = None if k is None else torch.randn(h * w, k, generator=g, dtype=F64).to(F64 if dtype == F64 else F32)
    return fs, ft, proj


def _grad(b, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, generator=g, dtype=F64) + 0.5).to(F64 if dtype == F64 else F32)


# ---- 1. the reference against the oracle -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 7], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
def test_reference_matches_oracle(norm, k):
    fs, ft, proj = _case(2, 3, 5, 4, 5, k=k)
    close(ref.affinity_loss(fs, ft, proj, norm), oracle(fs, ft, proj, norm), 1e-12)
    g = _grad(2, F64)
    got = ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True])
    want = oracle_grads(g, fs, ft, proj, norm)
    # the closed-form normalisation backward against plain autograd through the oracle (no zero pixel here)
    a, b = fs.clone().requires_grad_(), ft.clone().requires_grad_()
    auto = torch.autograd.grad(oracle(a, b, proj, norm), (a, b), g)
    for x, y, z in zip(got, want, auto):
        close(x, y, 1e-10)
        close(y, z, 1e-10)


@pytest.mark.parametrize("k", [None, 4], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
def test_zero_pixel_gradient_is_g_over_eps(norm, k):
    """An all-zero pixel (f̂ = 0 there, ‖·‖ not differentiable): the loss and gradients stay finite and the gradient
    there is g/1e-5, g the gradient of f̂ (the oracle's autograd w.r.t. the normalised features)."""
    fs, ft, proj = _case(3, 4, 3, 5, 6, k=k)
    fs[0, :, 1, 2] = 0  # student only
    ft[1, :, 3, 4] = 0  # teacher only
    fs[2, :, 0, 0] = 0  # both, the same pixel
    ft[2, :, 0, 0] = 0
    g = _grad(3, F64)
    s, t = normalise(fs).requires_grad_(), normalise(ft).requires_grad_()
    gs_hat, gt_hat = torch.autograd.grad(oracle_normalised(s, t, proj, norm), (s, t), g)
    want = oracle_grads(g, fs, ft, proj, norm)
    for backend in ("cpu", "reference"):
        a, b = fs.clone().requires_grad_(), ft.clone().requires_grad_()
        loss = K.feature_affinity_loss(a, b, fast=k is not None, proj=proj, norm=norm, reduction="none",
                                       backend=backend)
        close(loss.detach(), oracle(fs, ft, proj, norm), 1e-11, backend)
        got = torch.autograd.grad(loss, (a, b), g)
        for x, y in zip(got, want):
            assert torch.isfinite(x).all()
            close(x, y, 1e-10, backend)
        torch.testing.assert_close(got[0][0, :, 1, 2], gs_hat[0, :, 1 * 6 + 2] / EPS, rtol=1e-10, atol=0)
        torch.testing.assert_close(got[1][1, :, 3, 4], gt_hat[1, :, 3 * 6 + 4] / EPS, rtol=1e-10, atol=0)
        torch.testing.assert_close(got[0][2, :, 0, 0], gs_hat[2, :, 0] / EPS, rtol=1e-10, atol=0)
        assert got[0][0, :, 1, 2].abs().max() > 10  # not silently zeroed


# ---- 2. the C++ kernel against the reference -------------------------------------------------------------------------

# (B, Cs, Ct, H, W): 1x1; 30 pixels (below one 64-pixel block); exactly one block; 99 (two blocks, not a multiple of
# 16); 340 (six blocks); one row of 13 with one student channel.
CASES = [(2, 3, 5, 1, 1), (2, 4, 6, 5, 6), (1, 2, 7, 8, 8), (1, 5, 3, 9, 11), (2, 3, 4, 20, 17), (3, 1, 2, 1, 13)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("k", [None, 6], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_cpu_matches_reference(case, k, norm, dtype):
    fs, ft, proj = _case(*case, dtype=dtype, k=k)
    rtol = RTOL[dtype]
    loss = op_loss(fs, ft, proj, norm)
    assert loss.dtype == dtype and loss.shape == (case[0],)
    close(loss, ref.affinity_loss(fs, ft, proj, norm), rtol, "loss", LOSS_ATOL[dtype])
    g = _grad(case[0], dtype)
    scales = cancellation_scale(g, fs, ft, proj, norm)
    for mask in MASKS:
        got = OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask)
        want = ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask)
        for name, a, b, m, t, sc in zip(("grad_fs", "grad_ft"), got, want, mask, (fs, ft), scales):
            assert a.dtype == t.dtype
            assert a.shape == (t.shape if m else (0,)), (name, mask, a.shape)
            close(a, b, rtol, f"{name} {mask}", GRAD_ATOL[dtype] * sc)
    if dtype == F64:  # and against the loop oracle
        close(loss, oracle(fs, ft, proj, norm), rtol, "loss vs oracle")
        for a, b, sc in zip(OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True]),
                            oracle_grads(g, fs, ft, proj, norm), scales):
            close(a, b, 1e-10, "grad vs oracle", GRAD_ATOL[dtype] * sc)


@pytest.mark.parametrize("norm", NORMS)
def test_fast_with_one_column_and_more_columns_than_pixels(norm):
    for k in (1, 40):
        fs, ft, proj = _case(2, 3, 2, 3, 3, k=k)
        close(op_loss(fs, ft, proj, norm), oracle(fs, ft, proj, norm), 1e-11)
        g = _grad(2, F64)
        for a, b in zip(OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True]),
                        oracle_grads(g, fs, ft, proj, norm)):
            close(a, b, 1e-10)


@pytest.mark.parametrize("k", [None, 16], ids=["exact", "fast"])
def test_chunks_of_samples(k):
    """Batches the kernels cut into chunks (a 32 MiB workspace per chunk): the exact loss with 2000 channels at 4x4
    (131 samples per chunk), the fast loss with 2000 channels at 8x8 and k = 16 (65 samples per chunk forward, 32
    backward from the saved products, 28 recomputing them)."""
    fs, ft, proj = (_case(133, 1000, 1000, 4, 4) if k is None else _case(70, 1000, 1000, 8, 8, k=k))
    g = _grad(fs.shape[0], F64)
    for norm in NORMS:
        loss, u, e = OPS.feature_affinity_loss(fs, ft, proj, norm)
        close(loss, ref.affinity_loss(fs, ft, proj, norm), 1e-11)
        saved = [{}] if k is None else [{}, dict(u=u, e=e)]
        for mask in ([True, True], [False, True]):
            want = ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask)
            for kw in saved:
                for a, b in zip(OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask, **kw), want):
                    close(a, b, 1e-10, f"{norm} {mask} {sorted(kw)}")


# ---- 2b. the fast loss's saved products ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_saved_products_match_the_reference_and_the_recomputing_backward(case, norm, dtype):
    """The forward's u = [ŜZ; −T̂Z] and e = φ'(ΔZ) are the reference twin's, and the backward that reads them gives
    the gradients of the backward that recomputes them (and of the reference's autograd), for every output mask."""
    fs, ft, proj = _case(*case, dtype=dtype, k=6)
    b, kk, hw = case[0], case[1] + case[2], case[3] * case[4]
    loss, u, e = OPS.feature_affinity_loss(fs, ft, proj, norm)
    r_loss, r_u, r_e = ref.feature_affinity_loss(fs, ft, proj, norm)
    acc = F64 if dtype == F64 else F32
    assert u.shape == (b, kk, 6) and e.shape == (b, hw, 6) and u.dtype == e.dtype == acc
    close(loss, r_loss, RTOL[dtype], "loss", LOSS_ATOL[dtype])
    close(u, r_u, RTOL[dtype], "u")
    d = ref.feature_affinity_loss(fs, ft, proj, "l2sq")[2] / 2  # ΔZ
    if norm == "l1":  # signs: equal wherever ΔZ is not within rounding of 0
        clear = d.abs() > 1e-4 * d.abs().max()
        assert torch.equal(e[clear], r_e[clear]) and set(e.unique().tolist()) <= {-1.0, 0.0, 1.0}
    else:
        close(e, r_e, RTOL[dtype], "e", LOSS_ATOL[dtype])
    g = _grad(b, dtype)
    scales = cancellation_scale(g, fs, ft, proj, norm)
    for mask in MASKS:
        fast = OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask, u, e)
        again = OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask)
        want = ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask, r_u, r_e)
        for name, a, r, w, m, sc in zip(("grad_fs", "grad_ft"), fast, again, want, mask, scales):
            assert a.shape == r.shape == w.shape
            close(a, r, RTOL[dtype], f"{name} {mask} saved vs recomputed", GRAD_ATOL[dtype] * sc)
            close(a, w, RTOL[dtype], f"{name} {mask} saved vs reference", GRAD_ATOL[dtype] * sc)


def test_exact_loss_saves_nothing_and_autograd_saves_the_products():
    fs, ft, proj = _case(2, 3, 2, 4, 5, dtype=F32, k=3)
    _, u, e = OPS.feature_affinity_loss(fs, ft, None, "l1")
    assert u.shape == e.shape == (0,) and u.dtype == e.dtype == F32
    _, u, e = OPS.feature_affinity_loss(fs[:0], ft[:0], proj, "l1")
    assert u.shape == (0, 5, 3) and e.shape == (0, 20, 3)
    # through autograd: u and e are outputs that need no gradient, saved for the backward (which reads them)
    a = fs.clone().requires_grad_()
    loss, u, e = OPS.feature_affinity_loss(a, ft, proj, "l2sq")
    assert loss.requires_grad and not u.requires_grad and not e.requires_grad
    loss.sum().backward(retain_graph=True)
    first = a.grad.clone()
    close(first, ref.feature_affinity_loss_backward(torch.ones(2), fs, ft, proj, "l2sq", [True, False])[0], RTOL[F32])
    a.grad = None
    with torch.no_grad():
        e.mul_(2)  # a saved tensor changed in place: autograd's version check catches it, as for any saved input
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def _saved_good():
    fs, ft, proj, norm = _good()
    _, u, e = OPS.feature_affinity_loss(fs, ft, proj, norm)
    return fs, ft, proj, norm, u, e


SAVED_BAD = [
    ("u only", lambda u, e, p: (u, None, p), ValueError, "give both or neither"),
    ("e only", lambda u, e, p: (None, e, p), ValueError, "give both or neither"),
    ("exact loss", lambda u, e, p: (u, e, None), ValueError, "give them only with proj"),
    ("u dtype", lambda u, e, p: (u.double(), e, p), TypeError, "u has dtype"),
    ("e dtype", lambda u, e, p: (u, e.half(), p), TypeError, "e has dtype"),
    ("u device", lambda u, e, p: (u.to("meta"), e, p), ValueError, "u is on meta but fs is on cpu"),
    ("u rows", lambda u, e, p: (u[:, 1:], e, p), ValueError, "u must be (B, Cs + Ct, k) = (2, 5, 3), got shape"),
    ("u batch", lambda u, e, p: (u[:1], e, p), ValueError, "u must be (B, Cs + Ct, k)"),
    ("e pixels", lambda u, e, p: (u, e[:, :-1], p), ValueError, "e must be (B, H*W, k) = (2, 20, 3), got shape"),
    ("e 2-D", lambda u, e, p: (u, e[0], p), ValueError, "e must be (B, H*W, k)"),
    ("e columns", lambda u, e, p: (u, e[..., :2], p), ValueError, "e must be (B, H*W, k)"),
]


@pytest.mark.parametrize("backend", ["raw", "fake"])
@pytest.mark.parametrize("name,mutate,exc,msg", SAVED_BAD, ids=[b[0] for b in SAVED_BAD])
def test_bad_saved_products(backend, name, mutate, exc, msg):
    fs, ft, proj, norm, u, e = _saved_good()
    u, e, proj = mutate(u, e, proj)
    g = torch.ones(2)
    if backend == "fake":
        meta = lambda t: t if t is None else (  # noqa: E731
            torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t.to("meta"))
        g, fs, ft, proj, u, e = (meta(t) for t in (g, fs, ft, proj, u, e))
        msg = msg.replace("on meta but fs is on cpu", "on cpu but fs is on meta")
    with pytest.raises(exc) as err:
        OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True], u, e)
    assert "slimops.feature_affinity_loss_backward: " in str(err.value) and msg in str(err.value), str(err.value)


@pytest.mark.parametrize("cs,ct", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("k", [None, 5], ids=["exact", "fast"])
def test_zero_channels(cs, ct, k):
    """A side without channels has Ŝ (or T̂) empty: its Gram matrix is 0, the loss that of the other side alone."""
    fs, ft, proj = _case(2, cs, ct, 4, 5, k=k)
    g = _grad(2, F64)
    for norm in NORMS:
        want = oracle(fs, ft, proj, norm)
        if cs == ct == 0:
            assert torch.equal(want, torch.zeros(2, dtype=F64))
        for backend in ("cpu", "reference"):
            a, b = fs.clone().requires_grad_(), ft.clone().requires_grad_()
            loss = K.feature_affinity_loss(a, b, fast=k is not None, proj=proj, norm=norm, reduction="none",
                                           backend=backend)
            close(loss.detach(), want, 1e-11, backend)
            got = torch.autograd.grad(loss, (a, b), g, allow_unused=True)
            for x, y, t in zip(got, oracle_grads(g, fs, ft, proj, norm), (fs, ft)):
                x = torch.zeros_like(t) if x is None else x
                assert x.shape == t.shape
                close(x, y, 1e-10, backend)
        for mask in MASKS:
            for x, y in zip(OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask),
                            ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask)):
                close(x, y, 1e-10)


@pytest.mark.parametrize("k", [None, 3], ids=["exact", "fast"])
def test_empty_batch(k):
    fs, ft, proj = _case(0, 3, 2, 4, 5, k=k)
    for backend in ("cpu", "reference"):
        a, b = fs.clone().requires_grad_(), ft.clone().requires_grad_()
        kw = dict(fast=k is not None, proj=proj, backend=backend)
        assert K.feature_affinity_loss(a, b, reduction="none", **kw).shape == (0,)
        assert math.isnan(K.feature_affinity_loss(a, b, reduction="mean", **kw).item())
        loss = K.feature_affinity_loss(a, b, reduction="sum", **kw)
        assert loss.item() == 0.0
        ga, gb = torch.autograd.grad(loss, (a, b))
        assert ga.shape == fs.shape and gb.shape == ft.shape
    for norm in NORMS:
        assert op_loss(fs, ft, proj, norm).shape == (0,)
        for mask in MASKS:
            got = OPS.feature_affinity_loss_backward(torch.zeros(0, dtype=F64), fs, ft, proj, norm, mask)
            assert [t.shape for t in got] == [fs.shape if mask[0] else (0,), ft.shape if mask[1] else (0,)]


@pytest.mark.parametrize("k", [None, 4], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_reach_only_their_sample(norm, k, bad):
    fs, ft, proj = _case(3, 4, 2, 5, 6, k=k)
    clean = op_loss(fs, ft, proj, norm)
    g = _grad(3, F64)
    clean_grads = OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True])
    for side in ("fs", "ft"):
        x, y = fs.clone(), ft.clone()
        (x if side == "fs" else y)[1, 1, 3, 4] = bad
        for backend in ("cpu", "reference"):
            loss = K.feature_affinity_loss(x, y, fast=k is not None, proj=proj, norm=norm, reduction="none",
                                           backend=backend)
            assert math.isnan(loss[1].item()), (side, backend, loss)
            close(loss[[0, 2]], clean[[0, 2]], 1e-12, f"{side} {backend}")
        got = OPS.feature_affinity_loss_backward(g, x, y, proj, norm, [True, True])
        for a, c in zip(got, clean_grads):  # the other samples' gradients are untouched
            close(a[[0, 2]], c[[0, 2]], 1e-12, side)
        assert got[0 if side == "fs" else 1][1].isnan().all()  # the poisoned side's own gradient of that sample


@pytest.mark.parametrize("norm,k", [("l1", None), ("l1", 4), ("l2sq", None),
                                    ("l2sq", 4)], ids=["l1-exact", "l1-fast", "l2sq-exact", "l2sq-fast"])
def test_nan_gradients_match_the_reference(norm, k):
    """Where the NaN goes in the gradients of the poisoned sample: the kernel as the reference twin."""
    fs, ft, proj = _case(3, 4, 2, 5, 6, k=k)
    fs[1, 2, 3, 4] = math.nan
    g = _grad(3, F64)
    got = OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True])
    want = ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True])
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
        close(a, b, 1e-10)


@pytest.mark.parametrize("k", [None, 6], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_within_twice_the_references_error(dtype, norm, k):
    fs, ft, proj = _case(2, 8, 6, 9, 11, k=k, tscale=1.0)
    truth = ref.affinity_loss(fs, ft, proj, norm)
    lf, lt = fs.to(dtype), ft.to(dtype)
    got = op_loss(lf, lt, proj, norm)
    assert got.dtype == F32  # computed (and returned) in float32
    assert_close_lowp(got, ref.affinity_loss(lf, lt, proj, norm), truth, floor=1e-6 * truth.abs().max().item())
    g = _grad(2, F64)
    want64 = ref.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True])
    lowref = ref.feature_affinity_loss_backward(g.to(dtype), lf, lt, proj, norm, [True, True])
    got = OPS.feature_affinity_loss_backward(g.to(dtype), lf, lt, proj, norm, [True, True])
    for a, r, t in zip(got, lowref, want64):
        assert a.dtype == dtype
        assert_close_lowp(a, r, t, floor=1e-3 * t.abs().max().item())


def test_proj_dtype_is_the_compute_dtype():
    """A float64 projection with float32 features is used in float32 (and a float32 one with float64 features in
    float64), as the reference does."""
    fs, ft, proj = _case(2, 3, 2, 4, 4, dtype=F32, k=5)
    for p in (proj.double(), proj.to(torch.bfloat16)):
        close(op_loss(fs, ft, p, "l1"), ref.affinity_loss(fs, ft, p, "l1"), RTOL[F32])
    fs, ft, proj = _case(2, 3, 2, 4, 4, k=5)
    close(op_loss(fs, ft, proj.float(), "l2sq"),
          ref.affinity_loss(fs, ft, proj.float(), "l2sq"), RTOL[F64])


def _layouts(dtype=F64):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    cl = r(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    sliced = r(2, 12, 9, 22)[:, ::2, :, 1::2]  # every other channel and column
    expanded = (r(1, 5, 9, 11) * 0.1).expand(2, -1, -1, -1)  # stride 0 over the batch
    pixel_expanded = (r(2, 4, 1, 1) * 0.1).expand(-1, -1, 9, 11)  # one vector at every pixel
    expanded_student = r(1, 3, 9, 11).expand(2, -1, -1, -1)
    return {"channels_last": (cl, sliced), "sliced": (sliced, expanded), "expanded_teacher": (cl, expanded),
            "expanded_pixels": (sliced, pixel_expanded), "expanded_both": (expanded_student, expanded)}


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded_teacher", "expanded_pixels", "expanded_both"])
@pytest.mark.parametrize("k", [None, 3], ids=["exact", "fast"])
def test_strided_inputs(layout, k):
    fs, ft = _layouts()[layout]
    assert not (fs.is_contiguous() and ft.is_contiguous())
    proj = None if k is None else torch.randn(3, 99, dtype=F64).t()  # a transposed projection too
    g = _grad(2, F64)
    for norm in NORMS:
        want = ref.affinity_loss(fs.contiguous(), ft.contiguous(), proj, norm)
        close(op_loss(fs, ft, proj, norm), want, 1e-11, layout)
        for mask in MASKS:
            got = OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, mask)
            exp = ref.feature_affinity_loss_backward(g, fs.contiguous(), ft.contiguous(), proj, norm, mask)
            for a, b in zip(got, exp):
                assert a.is_contiguous()  # never channels_last nor stride 0, whatever the input's layout
                close(a, b, 1e-10, f"{layout} {mask}")
    # through autograd: the gradients reach the bases of the views
    base = torch.randn(1, 5, 9, 11, dtype=F64, requires_grad=True)
    student = torch.randn(2, 12, 9, 22, dtype=F64, requires_grad=True)
    losses = []
    for backend in ("cpu", "reference"):
        loss = K.feature_affinity_loss(student[:, ::2, :, 1::2], base.expand(2, -1, -1, -1), fast=k is not None,
                                       proj=proj, backend=backend)
        losses.append((loss.detach(), *torch.autograd.grad(loss, (student, base))))
    for a, b in zip(*losses):
        close(a, b, 1e-10)


@pytest.mark.parametrize("k", [None, 37])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_cpu_kernel_is_independent_of_the_thread_count(dtype, k):
    """Exact: per-pair partial sums added in a fixed order (forward), per-block accumulation over every J in order
    (backward). Fast: one partial sum per (sample, 64-pixel block), products whose sums run over k in order, chunks
    of samples (their size follows the thread count) that do not touch a sample's arithmetic. Bit-identical results
    with 1 and 2 threads; 340 pixels make 6 blocks and 2 panels of 256, k = 37 a partial column vector."""
    fs, ft, proj = _case(3, 6, 5, 20, 17, k=k, dtype=dtype)
    fs = fs.contiguous(memory_format=torch.channels_last)
    g = _grad(3, dtype)
    old = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = []
            for norm in NORMS:
                loss, u, e = OPS.feature_affinity_loss(fs, ft, proj, norm)
                out += [loss, u, e, *OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True])]
                if proj is not None:  # the backward from the saved products, too
                    out += OPS.feature_affinity_loss_backward(g, fs, ft, proj, norm, [True, True], u, e)
            runs.append(out)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- 3. the public wrapper, autograd, opcheck, compile ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_reductions_and_autograd(backend):
    fs, ft, proj = _case(3, 4, 3, 5, 5, k=6)
    for kw in (dict(), dict(fast=True, proj=proj), dict(fast=True, k=9, seed=2, norm="l2sq")):
        a = fs.clone().requires_grad_()
        per = K.feature_affinity_loss(a, ft, reduction="none", backend=backend, **kw)
        assert per.shape == (3,) and per.dtype == F64
        s = K.feature_affinity_loss(a, ft, backend=backend, **kw)  # "sum" by default
        m = K.feature_affinity_loss(a, ft, reduction="mean", backend=backend, **kw)
        assert s.shape == m.shape == ()
        close(s.detach(), per.detach().sum(), 1e-12)
        close(m.detach(), per.detach().mean(), 1e-12)
        (gs,) = torch.autograd.grad(s, a)  # the teacher needs no gradient: the backward's output_mask [True, False]
        (gm,) = torch.autograd.grad(m, a)
        close(gm, gs / 3, 1e-12)
        z = kw.get("proj", K.gaussian_projection(25, kw.get("k", 1), kw.get("seed", 0), dtype=F64)) \
            if kw.get("fast") else None
        want = ref.feature_affinity_loss_backward(torch.ones(3, dtype=F64), fs, ft, z, kw.get("norm", "l1"),
                                                  [True, False])[0]
        close(gs, want, 1e-10)
    assert _backend.resolve("feature_affinity_loss", "auto", fs.device) == "cpu"


def test_seeded_fast_path_is_the_gaussian_projection():
    fs, ft, _ = _case(2, 3, 4, 5, 6)
    z = K.gaussian_projection(30, 11, 5, dtype=F64)
    # A pure function of (entry, seed), pinned: the projection is part of the loss's definition.
    assert z[0, :3].tolist() == pytest.approx([1.2788989075464958, 0.9588865065744093, -1.0844108023894612], rel=1e-12)
    assert z[29, 10].item() == pytest.approx(-0.2341149454141983, rel=1e-12)
    assert torch.equal(K.gaussian_projection(30, 11, 5), z.float())
    assert torch.equal(K.gaussian_projection(30, 11, 5 + 2 ** 64, dtype=F64), z)  # the seed is taken mod 2**64
    assert not torch.equal(K.gaussian_projection(30, 11, 6, dtype=F64), z)
    for norm in NORMS:
        seeded = K.feature_affinity_loss(fs, ft, fast=True, k=11, seed=5, norm=norm, reduction="none")
        assert torch.equal(seeded, K.feature_affinity_loss(fs, ft, fast=True, proj=z, norm=norm, reduction="none"))
        close(seeded, oracle(fs, ft, z, norm), 1e-11)
        other = K.feature_affinity_loss(fs, ft, fast=True, k=11, seed=6, norm=norm, reduction="none")
        assert not torch.equal(seeded, other)
        f32 = K.feature_affinity_loss(fs.float(), ft.float(), fast=True, k=11, seed=5, norm=norm, reduction="none")
        close(f32, ref.affinity_loss(fs.float(), ft.float(), z.float(), norm), RTOL[F32])
        close(K.feature_affinity_loss(fs, ft, fast=True, k=11, seed=5, norm=norm, backend="reference"),
              seeded.sum(), 1e-12)


def test_proj_gets_no_gradient_and_proj_needs_fast():
    fs, ft, proj = _case(2, 3, 2, 4, 4, k=3)
    a, p = fs.clone().requires_grad_(), proj.clone().requires_grad_()
    K.feature_affinity_loss(a, ft, fast=True, proj=p).backward()
    assert a.grad is not None and p.grad is None
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss: proj .* pass fast=True"):
            K.feature_affinity_loss(fs, ft, proj=proj, backend=backend)


@pytest.mark.parametrize("k", [None, 3], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(norm, k):
    fs, ft, proj = _case(2, 2, 3, 2, 3, k=k)
    inputs = (fs.requires_grad_(), ft.requires_grad_())
    for backend in ("cpu", "reference"):
        assert torch.autograd.gradcheck(
            lambda a, b: K.feature_affinity_loss(a, b, fast=k is not None, proj=proj, norm=norm, reduction="none",
                                                 backend=backend), inputs)


def test_opcheck():
    fs, ft, proj = _case(2, 3, 4, 5, 3, dtype=F32, k=4)
    fs.requires_grad_(), ft.requires_grad_()
    g = _grad(2, F32)
    for p, norm in ((None, "l1"), (proj, "l2sq"), (proj, "l1")):
        torch.library.opcheck(OPS.feature_affinity_loss.default, (fs, ft, p, norm))
        saved = OPS.feature_affinity_loss(fs.detach(), ft.detach(), p, norm)[1:] if p is not None else (None, None)
        for mask in ([True, True], [False, True]):
            torch.library.opcheck(OPS.feature_affinity_loss_backward.default,
                                  (g, fs.detach(), ft.detach(), p, norm, mask))
            torch.library.opcheck(OPS.feature_affinity_loss_backward.default,
                                  (g, fs.detach(), ft.detach(), p, norm, mask, *saved))
    torch.library.opcheck(OPS.feature_affinity_loss.default, (fs, ft))  # the schema's defaults
    torch.library.opcheck(OPS.feature_affinity_loss.default, (fs[:0], ft[:0], None, "l1"))


@pytest.mark.parametrize("kw", [dict(), dict(norm="l2sq", reduction="mean"), "fast_proj"],
                         ids=["exact", "exact_l2sq_mean", "fast_proj"])
def test_torch_compile_fullgraph(kw):
    fs, ft, proj = _case(2, 3, 4, 5, 6, dtype=F32, k=8)
    if kw == "fast_proj":
        kw = dict(fast=True, proj=proj, reduction="none")

    def f(a, b):
        return K.feature_affinity_loss(a, b, **kw).sum()

    a, b = fs.requires_grad_(), ft.requires_grad_()
    eager = (f(a, b), *torch.autograd.grad(f(a, b), (a, b)))
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    compiled = (out, *torch.autograd.grad(out, (a, b)))
    for x, y in zip(compiled, eager):
        close(x.detach(), y.detach(), RTOL[F32])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Dynamo's note that it ignores the lru_cache
def test_torch_compile_fullgraph_seeded_fast():
    fs, ft, _ = _case(2, 3, 4, 5, 6, dtype=F32)
    f = torch.compile(lambda a, b: K.feature_affinity_loss(a, b, fast=True, k=8, seed=1), fullgraph=True,
                      backend="aot_eager")
    close(f(fs, ft), K.feature_affinity_loss(fs, ft, fast=True, k=8, seed=1), RTOL[F32])


# ---- 4. bad input ----------------------------------------------------------------------------------------------------


def _good():
    """fs (2, 3, 4, 5), ft (2, 2, 4, 5), proj (20, 3), float32; norm l1."""
    fs, ft, proj = _case(2, 3, 2, 4, 5, dtype=F32, k=3)
    return fs, ft, proj, "l1"


def _sub(**kw):
    """Replaces some of (fs, ft, proj, norm) by functions of the good call's values."""

    def f(fs, ft, proj, norm):
        c = dict(fs=fs, ft=ft, proj=proj, norm=norm)
        for k, how in kw.items():
            c[k] = how(c)
        return c["fs"], c["ft"], c["proj"], c["norm"]

    return f


PROJ_SHAPE = "proj must be 2-D (H*W, k) = (20, k) with k >= 1"
BAD = [
    ("fs int64", _sub(fs=lambda c: c["fs"].long()), TypeError, "fs must be a floating-point tensor"),
    ("ft bool", _sub(ft=lambda c: c["ft"] > 0), TypeError, "ft must be a floating-point tensor"),
    ("fs complex", _sub(fs=lambda c: c["fs"].to(torch.complex64)), TypeError, "fs must be a floating-point tensor"),
    ("fs 3-D", _sub(fs=lambda c: c["fs"][0]), ValueError, "fs must be 4-D (B, C, H, W), got shape"),
    ("ft 5-D", _sub(ft=lambda c: c["ft"][None]), ValueError, "ft must be 4-D (B, C, H, W), got shape"),
    ("ft 2-D", _sub(ft=lambda c: c["ft"][0, 0]), ValueError, "ft must be 4-D"),
    ("dtype mismatch", _sub(ft=lambda c: c["ft"].double()), TypeError, "the features must share one dtype"),
    ("dtype mismatch lowp", _sub(ft=lambda c: c["ft"].half()), TypeError, "ft has dtype"),
    ("ft device", _sub(ft=lambda c: c["ft"].to("meta")), ValueError, "ft is on meta but fs is on cpu"),
    ("batch", _sub(ft=lambda c: c["ft"][:1]), ValueError, "ft has batch size 1 but fs has 2"),
    ("pixels", _sub(ft=lambda c: c["ft"][:, :, :3]), ValueError,
     "ft has 3x5 pixels but fs has 4x5; resize the teacher's features first"),
    ("pixels transposed", _sub(ft=lambda c: c["ft"].transpose(2, 3)), ValueError, "ft has 5x4 pixels but fs has 4x5"),
    ("no pixels", _sub(fs=lambda c: c["fs"][:, :, :0], ft=lambda c: c["ft"][:, :, :0]), ValueError,
     "fs must have at least one pixel"),
    ("no columns", _sub(fs=lambda c: c["fs"][..., :0], ft=lambda c: c["ft"][..., :0], proj=lambda c: None),
     ValueError, "fs must have at least one pixel"),
    ("norm", _sub(norm=lambda c: "l3"), ValueError, "unknown norm 'l3' (expected one of: l1, l2sq)"),
    ("norm case", _sub(norm=lambda c: "L1"), ValueError, "unknown norm 'L1'"),
    ("norm l2", _sub(norm=lambda c: "l2"), ValueError, "unknown norm 'l2'"),
    ("proj int", _sub(proj=lambda c: c["proj"].int()), TypeError, "proj must be a floating-point tensor"),
    ("proj device", _sub(proj=lambda c: c["proj"].to("meta")), ValueError, "proj is on meta but fs is on cpu"),
    ("proj 1-D", _sub(proj=lambda c: c["proj"][:, 0]), ValueError, PROJ_SHAPE),
    ("proj 3-D", _sub(proj=lambda c: c["proj"][None]), ValueError, PROJ_SHAPE),
    ("proj rows", _sub(proj=lambda c: c["proj"][:-1]), ValueError, PROJ_SHAPE),
    ("proj transposed", _sub(proj=lambda c: c["proj"].t()), ValueError, PROJ_SHAPE),
    ("proj no column", _sub(proj=lambda c: c["proj"][:, :0]), ValueError, PROJ_SHAPE),
    ("proj scalar", _sub(proj=lambda c: c["proj"][0, 0]), ValueError, PROJ_SHAPE),
]


def _public(fs, ft, proj, norm, backend):
    return K.feature_affinity_loss(fs, ft, fast=proj is not None, proj=proj, norm=norm, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference", "raw", "raw_backward", "fake"])
@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, mutate, exc, msg):
    fs, ft, proj, norm = mutate(*_good())
    op = "feature_affinity_loss_backward" if backend == "raw_backward" else "feature_affinity_loss"
    with pytest.raises(exc) as e:
        if backend == "raw":
            op_loss(fs, ft, proj, norm)
        elif backend == "raw_backward":
            OPS.feature_affinity_loss_backward(torch.ones(2), fs, ft, proj, norm, [True, True])
        elif backend == "fake":  # fs on meta, the others too (those a case put on meta: back on the CPU)
            flip = lambda t: t if t is None else (  # noqa: E731
                torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t.to("meta"))
            op_loss(fs.to("meta"), flip(ft), flip(proj), norm)
        else:
            _public(fs, ft, proj, norm, backend)
    text = str(e.value)
    if backend == "fake" and "is on meta but" in msg:
        msg = msg.replace("on meta but fs is on cpu", "on cpu but fs is on meta")  # everything else went to meta
    assert f"slimops.{op}: " in text and msg in text, text


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input_fast_seeded(backend):
    """fast=True without proj: the features are checked before a projection is drawn."""
    fs, ft, _, _ = _good()
    with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss: fs must have at least one pixel"):
        K.feature_affinity_loss(fs[:, :, :0], ft[:, :, :0], fast=True, k=4, backend=backend)
    with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss: ft has batch size"):
        K.feature_affinity_loss(fs, ft[:1], fast=True, backend=backend)
    with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss: unknown norm"):
        K.feature_affinity_loss(fs, ft, fast=True, norm="fro", backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_not_tensors_and_sparse(backend):
    fs, ft, proj, _ = _good()
    for args, word in (((fs.tolist(), ft), "fs"), ((fs, 1.0), "ft")):
        with pytest.raises(TypeError, match=rf"slimops\.feature_affinity_loss: {word} must be a tensor, got"):
            K.feature_affinity_loss(*args, backend=backend)
    with pytest.raises(TypeError, match=r"slimops\.feature_affinity_loss: proj must be a tensor, got list"):
        K.feature_affinity_loss(fs, ft, fast=True, proj=proj.tolist(), backend=backend)
    sparse = fs.to_sparse()
    for args, word in (((sparse, ft, None), "fs"), ((fs, ft.to_sparse(), None), "ft"),
                       ((fs, ft, proj.to_sparse()), "proj")):
        with pytest.raises(ValueError, match=rf"slimops\.feature_affinity_loss: {word} must be a strided \(dense\)"):
            K.feature_affinity_loss(args[0], args[1], fast=args[2] is not None, proj=args[2], backend=backend)
    # the raw op: the dispatcher has no sparse kernel, and says so naming the op
    with pytest.raises(NotImplementedError, match="slimops::feature_affinity_loss"):
        op_loss(sparse, ft, None, "l1")


BAD_WRAPPER = [
    (dict(fast=1), TypeError, "fast must be a bool, got 1"),
    (dict(fast="yes"), TypeError, "fast must be a bool"),
    (dict(fast=None), TypeError, "fast must be a bool"),
    (dict(reduction="max"), ValueError, "unknown reduction 'max' (expected one of: sum, mean, none)"),
    (dict(reduction=None), ValueError, "unknown reduction None"),
    (dict(fast=True, k=0), ValueError, "k must be a positive int, got 0"),
    (dict(fast=True, k=-3), ValueError, "k must be a positive int, got -3"),
    (dict(fast=True, k=2.0), TypeError, "k must be a positive int, got 2.0"),
    (dict(fast=True, k="8"), TypeError, "k must be a positive int"),
    (dict(fast=True, k=None), TypeError, "k must be a positive int"),
    (dict(fast=True, k=True), (TypeError, ValueError), "k must be a positive int, got True"),
    (dict(fast=True, seed=1.5), TypeError, "seed must be an int, got 1.5"),
    (dict(fast=True, seed="0"), TypeError, "seed must be an int"),
    (dict(fast=True, seed=None), TypeError, "seed must be an int"),
    (dict(fast=True, seed=False), TypeError, "seed must be an int"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_WRAPPER, ids=lambda v: str(v)[:24])
def test_wrapper_errors(kw, exc, msg):
    fs, ft, _, _ = _good()
    with pytest.raises(exc) as e:
        K.feature_affinity_loss(fs, ft, **kw)
    assert "slimops.feature_affinity_loss: " in str(e.value) and msg in str(e.value), str(e.value)


def test_k_and_seed_are_ignored_without_fast_and_with_proj():
    fs, ft, proj, _ = _good()
    exact = K.feature_affinity_loss(fs, ft)
    assert torch.equal(K.feature_affinity_loss(fs, ft, k=0, seed="x"), exact)
    assert torch.equal(K.feature_affinity_loss(fs, ft, fast=True, proj=proj, k=0),
                       K.feature_affinity_loss(fs, ft, fast=True, proj=proj))


BAD_GRAD = [
    (lambda g: g.long(), TypeError, "grad must be a floating-point tensor"),
    (lambda g: g[:1], ValueError, "grad must have the output's shape (2,), got"),
    (lambda g: g[:, None], ValueError, "grad must have the output's shape (2,), got"),
    (lambda g: g.sum(), ValueError, "grad must have the output's shape (2,), got"),
    # the raw op: the dispatcher has no sparse kernel (the C++ layout check is for other backends); the fake: no
    # sparse meta tensors
    (lambda g: g.to_sparse(), NotImplementedError, "slimops::feature_affinity_loss_backward"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["raw", "fake"])
@pytest.mark.parametrize("how,exc,msg", BAD_GRAD, ids=["int", "short", "2-D", "0-D", "sparse"])
def test_bad_grad(how, exc, msg, fake):
    fs, ft, proj, norm = _good()
    g = how(torch.ones(2))
    if fake:
        if g.layout != torch.strided:
            pytest.skip("no sparse meta tensors")
        g, fs, ft = g.to("meta"), fs.to("meta"), ft.to("meta")
    for p in (None, proj.to(fs.device)):
        with pytest.raises(exc) as e:
            OPS.feature_affinity_loss_backward(g, fs, ft, p, norm, [True, True])
        text = str(e.value)
        assert msg in text and (msg.startswith("slimops::") or "slimops.feature_affinity_loss_backward: " in text), text


def test_bad_grad_device():
    fs, ft, _, norm = _good()
    with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss_backward: grad is on meta but fs is on cpu"):
        OPS.feature_affinity_loss_backward(torch.ones(2, device="meta"), fs, ft, None, norm, [True, True])


def test_raw_op_refuses_float8():
    """float8 passes C++'s at::isFloatingType but has no kernel: an error naming the op, never a crash."""
    x = torch.randn(1, 2, 3, 3).to(torch.float8_e4m3fn)
    with pytest.raises((TypeError, RuntimeError), match="feature_affinity_loss"):
        op_loss(x, x, None, "l1")
    with pytest.raises(TypeError, match=r"slimops\.feature_affinity_loss: fs must be a floating-point tensor"):
        K.feature_affinity_loss(x, x)


# ---- 5. what the docstrings claim ------------------------------------------------------------------------------------


def _delta(fs, ft):
    s, t = normalise(fs), normalise(ft)
    return s.transpose(1, 2) @ s - t.transpose(1, 2) @ t  # (B, HW, HW), in float64


def test_fast_l2sq_is_an_unbiased_estimate_of_the_exact_l2sq():
    fs, ft, _ = _case(1, 4, 3, 6, 6, tscale=1.0)
    d = _delta(fs, ft)
    exact = K.feature_affinity_loss(fs, ft, norm="l2sq").item()
    assert exact == pytest.approx(d.square().sum().item() / 36**2, rel=1e-10)
    # one projection of 8192 columns (relative std <= sqrt(2/k) = 1.6%), and the mean over 20 small ones
    big = K.feature_affinity_loss(fs, ft, fast=True, k=8192, seed=0, norm="l2sq").item()
    assert big == pytest.approx(exact, rel=0.06) and big != exact
    small = [K.feature_affinity_loss(fs, ft, fast=True, k=64, seed=s, norm="l2sq").item() for s in range(20)]
    assert sum(small) / 20 == pytest.approx(exact, rel=0.08)
    assert max(small) - min(small) > 0.05 * exact  # the small ones do vary


def test_fast_l1_estimates_the_l21_norm_not_the_exact_l1():
    fs, ft, _ = _case(1, 4, 3, 6, 6, tscale=1.0)
    d = _delta(fs, ft)[0]
    l21 = math.sqrt(2 / math.pi) * d.norm(dim=1).sum().item() / 36**2
    fast = K.feature_affinity_loss(fs, ft, fast=True, k=8192, seed=1).item()
    assert fast == pytest.approx(l21, rel=0.02)
    exact = K.feature_affinity_loss(fs, ft).item()
    assert exact == pytest.approx(d.abs().sum().item() / 36**2, rel=1e-10)
    assert abs(fast - exact) > 0.2 * exact  # a different loss, not an estimate of the exact one


_MEMORY_SCRIPT = textwrap.dedent("""
    import torch, slimops
    from slimops.ops import feature_affinity_loss as fal
    torch.set_num_threads(2)
    torch.manual_seed(0)
    def peak():  # this process's peak RSS in bytes (the kernel's high-water mark of its memory map)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    c = {c}
    fs = torch.randn(1, c, 128, 128, requires_grad=True)
    ft = torch.randn(1, c, 128, 128, requires_grad=True)
    for fast in (False, True):  # warm up (lazy initialisation of BLAS and the thread pool) on a small map
        fal(fs[:, :, :8, :8], ft[:, :, :8, :8], fast=fast, k=4).backward()
    try:  # start the high-water mark afresh at the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = peak()
    fal(fs, ft, norm="l1").backward()
    exact = peak() - base
    fal(fs, ft, fast=True, k=256, norm="l2sq").backward()
    fast = peak() - base
    probe = torch.ones(80 * 2**20)  # 320 MiB of float32: the measurement must see it
    seen = peak() - base
    print(exact, fast, seen, probe.numel())
""")


def test_peak_memory_never_holds_an_hw_by_hw_matrix():
    """B = 1, C = 8, 128x128: (HW)² float32 would be 1 GiB; forward + backward of the exact and of the fast loss
    (k = 256) raise the peak RSS by far less. In a fresh process, measured by VmHWM (/proc/self/status), not
    getrusage's ru_maxrss: Linux carries ru_maxrss over exec(), so a child of a large pytest process starts with the
    parent's RSS as its peak and would hide any growth below it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status (Linux)")
    from _proc import run_with_deadline

    p = run_with_deadline([sys.executable, "-c", _MEMORY_SCRIPT.format(c=8)], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    exact, fast, seen, _ = (int(v) for v in p.stdout.split())
    mib = 2**20
    assert seen >= 300 * mib, f"the measurement missed a 320 MiB allocation ({seen / mib:.0f} MiB: {p.stdout})"
    assert exact < 64 * mib, f"exact loss: peak RSS grew by {exact / mib:.0f} MiB"
    assert fast < 256 * mib, f"fast loss: peak RSS grew by {fast / mib:.0f} MiB"
