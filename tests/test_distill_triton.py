"""The Triton kernels of the distill family (slimops/triton/distill.py: FAQD's feature-affinity loss) against the
reference twin (slimops.reference.distill).

Runs through the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 when no GPU is visible, before
anything imports triton). With a GPU and the interpreter off, the same tests run the compiled kernels on CUDA
tensors (fp32 dots are 3xTF32 there, torch's TF32 flag forced off: a 1e-4 instead of 2e-5 fp32 tolerance).

- Values and both gradients, exact and fast (a given projection), norms l1 and l2sq: Cs != Ct, H*W spanning several
  pixel tiles and not a multiple of the tile (70 pixels: two 64-pixel float32 tiles, three 32-pixel float64 ones),
  one channel, channel counts needing several K chunks and several row blocks in the backward (K = 70), all-zero
  pixels, a 1x1 map, no student channels; float32 / float64 within tight tolerances relative to the size of the
  terms each result is computed from (``_terms``: the largest entry, losses and gradients being of order 1/HW, or
  more where the result is a near-cancelling difference: a 1x1 map's Δ, the normalisation's backward of a
  one-channel pixel); bfloat16 / float16 against the float64 truth, error at most twice the reference's own in that
  dtype (conftest.assert_close_lowp, with a floor relative to the largest entry).
- Every output_mask, B = 0, NaN propagation (only the sample holding the NaN; sign(NaN) = 0 in the l1 gradient, as
  the reference's autograd), strided inputs (channels_last,
  slices, transposed maps, a stride-0 expanded teacher, read in place), the fast loss's products in chunks of one
  sample, the tile plans, opcheck, autograd and gradcheck through the public op with backend="triton", bad input
  (the same errors as the C++ kernels), the wrong device.

Inputs: the teacher's features are drawn 10x smaller than the student's (as in tests/test_distill_ops.py), so that
the diagonal of Δ, ‖ŝ_i‖² − ‖t̂_i‖² ≈ 2·1e-5·(1/‖t_i‖ − 1/‖s_i‖), is far from 0 next to float32 rounding: its sign is
the l1 gradient, and two correct float32 implementations may disagree on the sign of an entry within rounding of 0.

Shapes are tiny and few: the interpreter runs every tile operation of every program in Python.
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from conftest import LOWP, LOWP_FLOOR, assert_close_lowp, triton_family
from slimops.ops import distill as K
from slimops.reference import distill as ref

td, INTERPRETED, DEV, NEEDS_TRITON = triton_family("distill")

pytestmark = [NEEDS_TRITON, pytest.mark.usefixtures("one_thread", "no_matmul_tf32")]

OPS_NS = "slimops_triton"
F32, F64 = torch.float32, torch.float64
# relative to the largest entry of the expected tensor
RTOL = {F32: 2e-5 if INTERPRETED else 1e-4, F64: 1e-11}
NORMS = ("l1", "l2sq")
MASKS = [list(m) for m in itertools.product([True, False], repeat=2)]
ALL = [True, True]




def _ops():
    return getattr(torch.ops, OPS_NS)


def _case(b, cs, ct, h, w, dtype=F32, k=None, tscale=0.1):
    """Student, teacher (10x smaller, module docstring) and for k a (HW, k) projection (float32, float64 for float64
    features), drawn in float64 and rounded to dtype."""
    fs = torch.randn(b, cs, h, w, dtype=F64).to(device=DEV, dtype=dtype)
    ft = (torch.randn(b, ct, h, w, dtype=F64) * tscale).to(device=DEV, dtype=dtype)
    proj = None
    if k is not None:
        proj = torch.randn(h * w, k, dtype=F64).to(device=DEV, dtype=F64 if dtype == F64 else F32)
    return fs, ft, proj


def _grad(b, dtype=F32):
    return torch.randn(b, dtype=F64).to(device=DEV, dtype=F64 if dtype == F64 else F32)


def _close(actual, expected, what="", rtol=None, terms=0.0):
    """Same dtype, shape and device; max |actual − expected| <= rtol · max(max |expected|, terms) (``terms``: the
    size of the terms the result is a difference of, :func:`_terms`); NaN where expected has NaN."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device.type == DEV, what
    if expected.numel() == 0:
        return
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = max(expected.detach().double().nan_to_num(0, 0, 0).abs().max().item(), terms, 1e-30)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=rtol * scale, equal_nan=True,
                               msg=lambda m: f"{what}\n{m}")


def _terms(fs, ft, proj, norm, g):
    """The size of the terms the results are computed from (float64), against which float32 results are accurate:
    (loss, grad_fs, grad_ft). For the loss, per sample ``Σ φ'-weighted |Ŝ|ᵀ|Ŝ| + |T̂|ᵀ|T̂|`` (times |Z| for the fast
    loss): Δ is a difference of two such products, nearly equal where the maps have few pixels (a 1x1 map: Δ = ‖ŝ‖² −
    ‖t̂‖², of order ε). For a gradient, max over pixels of ‖∂L/∂f̂‖ / (n + ε): the normalisation's backward,
    g/(n + ε) − f̂ (f̂ᵀg)/n, nearly cancels where a pixel's vector has one channel."""
    with torch.enable_grad():
        s = ref.normalize_pixels(fs.cpu(), F64).requires_grad_()
        t = ref.normalize_pixels(ft.cpu(), F64).requires_grad_()
        hw = s.shape[2]
        z = torch.eye(hw, dtype=F64) if proj is None else proj.cpu().double()
        d = s.transpose(1, 2) @ (s @ z) - t.transpose(1, 2) @ (t @ z)
        denom = hw * hw * (1 if proj is None else z.shape[1])
        loss = (d.abs() if norm == "l1" else d.square()).flatten(1).sum(1) / denom
        grads = torch.autograd.grad(loss, (s, t), g.cpu().double())
    with torch.no_grad():
        sa, ta, za = s.abs(), t.abs(), z.abs()
        dabs = sa.transpose(1, 2) @ (sa @ za) + ta.transpose(1, 2) @ (ta @ za)
        w = dabs if norm == "l1" else 2 * d.abs() * dabs
        out = [(w.flatten(1).sum(1) / denom).nan_to_num(0, 0, 0).max().item() if w.shape[0] else 0.0]
    for f, gr in zip((fs, ft), grads):
        n = f.cpu().double().flatten(2).norm(dim=1)
        v = gr.norm(dim=1) / (n + ref.EPS)
        out.append(v.nan_to_num(0, 0, 0).max().item() if v.numel() else 0.0)
    return out


def _close_lowp(actual, ref_lowp, truth, what=""):
    """bf16 / fp16 features: within twice the reference's own error against the float64 truth, plus a floor relative
    to the largest entry (the float32 one for float32 losses, the dtype's for its gradients)."""
    assert actual.dtype == ref_lowp.dtype and actual.shape == ref_lowp.shape, what
    scale = max(truth.double().nan_to_num(0, 0, 0).abs().max().item(), 1e-30) if truth.numel() else 1.0
    floor = (1e-6 if actual.dtype == F32 else LOWP_FLOOR[actual.dtype] * 0.1) * scale
    assert_close_lowp(actual.cpu(), ref_lowp.cpu(), truth.cpu(), msg=what, floor=floor)


def _check_case(fs, ft, proj, norm, g, what="", mask=ALL):
    """Loss and the gradients asked for, Triton ops against the reference (on CPU copies; bf16/fp16 also against the
    float64 truth); a gradient not asked for is an empty tensor, the others contiguous."""
    lowp = fs.dtype in LOWP
    fsc, ftc, gc = fs.cpu(), ft.cpu(), g.cpu()
    pc = None if proj is None else proj.cpu()
    hi = (fsc.double(), ftc.double(), None if pc is None else pc.double())
    terms = _terms(fsc, ftc, pc, norm, gc)
    loss, u, e_saved = _ops().feature_affinity_loss(fs, ft, proj, norm)
    want = ref.affinity_loss(fsc, ftc, pc, norm)
    if lowp:
        _close_lowp(loss, want, ref.affinity_loss(*hi, norm), f"{what} loss")
    else:
        _close(loss, want, f"{what} loss", terms=terms[0])
    exp = ref.feature_affinity_loss_backward(gc, fsc, ftc, pc, norm, mask)
    truths = ref.feature_affinity_loss_backward(gc.double(), *hi, norm, mask) if lowp else (None, None)
    # the fast loss's backward twice: recomputing the products, and reading the forward's saved u and e
    variants = [("", ())] if proj is None else [("", ()), (" (saved u, e)", (u, e_saved))]
    for how, saved in variants:
        got = _ops().feature_affinity_loss_backward(g, fs, ft, proj, norm, list(mask), *saved)
        assert len(got) == 2
        for name, a, e, t, m, size in zip(("fs", "ft"), got, exp, truths, mask, terms[1:]):
            if not m:
                assert a.numel() == 0, f"{what} grad_{name}{how}: not asked for, must be empty"
                continue
            assert a.is_contiguous() and a.device.type == DEV, f"{what} grad_{name}{how}"
            if lowp:
                _close_lowp(a, e, t, f"{what} grad_{name}{how}")
            else:
                _close(a, e, f"{what} grad_{name}{how}", terms=size)
    if proj is None:
        assert u.shape == e_saved.shape == (0,), what
    elif not lowp:  # u = [ŜZ; −T̂Z] is the reference twin's
        _close(u, ref.feature_affinity_loss(fsc, ftc, pc, norm)[1], f"{what} u", terms=terms[0])
    return loss, got


# name: (B, Cs, Ct, H, W)
CASES = {
    "70px-2-tiles": (2, 3, 5, 7, 10),  # Cs != Ct, 70 pixels: two float32 tiles (three float64 ones), not a multiple
    "1-channel": (2, 1, 2, 3, 4),
    "K70-chunks-rowblocks": (1, 40, 30, 3, 3),  # three K chunks of 32, two backward row blocks of 64
    "1x1": (3, 4, 3, 1, 1),
}


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_fp32(name, norm, fast):
    b, cs, ct, h, w = CASES[name]
    fs, ft, proj = _case(b, cs, ct, h, w, k=6 if fast else None)
    _check_case(fs, ft, proj, norm, _grad(b), f"{name} {norm} {'fast' if fast else 'exact'}")


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["70px-2-tiles", "K70-chunks-rowblocks"])
def test_fp64(name, norm, fast):
    """float64 (32-pixel tiles, 16-row K chunks, 32-row backward blocks): 70 pixels are three tiles, K = 70 five
    chunks and three row blocks."""
    b, cs, ct, h, w = CASES[name]
    fs, ft, proj = _case(b, cs, ct, h, w, dtype=F64, k=5 if fast else None)
    _check_case(fs, ft, proj, norm, _grad(b, F64), f"{name} {norm} {'fast' if fast else 'exact'} fp64")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_low_precision(fast, dtype):
    """bf16 / fp16 features are computed in float32 like float32 ones; gradients rounded once to the dtype."""
    fs, ft, proj = _case(2, 3, 5, 7, 10, dtype=dtype, k=6 if fast else None)
    for norm in NORMS:
        _check_case(fs, ft, proj, norm, _grad(2), f"{norm} {'fast' if fast else 'exact'} {dtype}")


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_zero_pixels(fast):
    """All-zero pixels (the student's, the teacher's, both): f̂ = 0 there, the normalisation's backward g/ε."""
    fs, ft, proj = _case(2, 3, 4, 5, 4, k=4 if fast else None)
    fs[0, :, 1, 2] = 0
    ft[1, :, 0, 3] = 0
    fs[1, :, 4, 0] = 0
    ft[1, :, 4, 0] = 0
    for norm in NORMS:
        _check_case(fs, ft, proj, norm, _grad(2), f"zero pixels {norm}")


def test_output_mask():
    """Every subset of gradients, exact and fast: only the rows asked for are computed."""
    for fast in (False, True):
        fs, ft, proj = _case(2, 3, 5, 4, 5, k=3 if fast else None)
        g = _grad(2)
        for mask in MASKS:
            _check_case(fs, ft, proj, "l1", g, f"mask={mask} fast={fast}", mask=mask)


def test_no_student_channels():
    """Cs = 0 (Ŝ empty: Δ = −T̂ᵀT̂): an empty gradient of fs's shape, the teacher's as usual; no channels at all:
    zero losses."""
    for fast in (False, True):
        fs, ft, proj = _case(2, 0, 3, 3, 4, k=3 if fast else None)
        _check_case(fs, ft, proj, "l2sq", _grad(2), f"Cs=0 fast={fast}")
    fs, ft, _ = _case(2, 0, 0, 3, 4)
    assert torch.equal(_ops().feature_affinity_loss(fs, ft, None, "l1")[0].cpu(), torch.zeros(2))
    gs, gt = _ops().feature_affinity_loss_backward(_grad(2), fs, ft, None, "l1", ALL)
    assert gs.shape == fs.shape and gt.shape == ft.shape


def test_empty_batch():
    """B = 0: an empty (0,) loss of the math dtype, gradients of the (empty) input shapes; no launch."""
    for dtype, fast in ((F32, False), (F64, True), (torch.bfloat16, False)):
        fs, ft, proj = _case(0, 3, 2, 4, 4, dtype=dtype, k=3 if fast else None)
        loss = _ops().feature_affinity_loss(fs, ft, proj, "l1")[0]
        assert loss.shape == (0,) and loss.dtype == (F64 if dtype == F64 else F32)
        gs, gt = _ops().feature_affinity_loss_backward(_grad(0, dtype), fs, ft, proj, "l1", [True, False])
        assert gs.shape == fs.shape and gs.dtype == dtype and gt.numel() == 0


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_nan_propagates(fast):
    """A NaN in one student pixel of sample 0: that sample's loss and its student gradient are NaN, its teacher
    gradient NaN exactly where the reference's is (l2sq: everywhere; l1: nowhere, sign(NaN) = 0 as torch's),
    sample 1 untouched."""
    fs, ft, proj = _case(2, 3, 4, 4, 5, k=3 if fast else None)
    fs[0, 1, 2, 3] = math.nan
    g = _grad(2)
    for norm in NORMS:
        loss, (gs, gt) = _check_case(fs, ft, proj, norm, g, f"nan {norm}")
        assert loss[0].isnan() and loss[1].isfinite()
        assert gs[0].isnan().all() and (gt[0].isnan().all() if norm == "l2sq" else gt[0].isfinite().all())
        assert gs[1].isfinite().all() and gt[1].isfinite().all()


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_strided_inputs(fast):
    """Features read in place with any strides: channels_last, slices of a larger map, a transposed map, a stride-0
    expanded teacher; the gradients come back contiguous."""
    b, cs, ct, h, w = 2, 3, 4, 5, 6
    k = 4 if fast else None
    fs, ft, proj = _case(b, cs, ct, h, w, k=k)
    big = torch.randn(b, 2 * cs + 1, h + 3, 2 * w, device=DEV)
    views = {
        "channels_last": (fs.to(memory_format=torch.channels_last), ft.to(memory_format=torch.channels_last)),
        "slices": (big[:, 1::2, 2:2 + h, ::2], ft[:, :, :, :]),
        "transposed": tuple(t.transpose(2, 3).contiguous().transpose(2, 3) for t in (fs, ft)),
        "expanded-teacher": (fs, (ft[:1] * 1.0).expand(b, ct, h, w)),
    }
    assert not views["slices"][0].is_contiguous() and views["expanded-teacher"][1].stride(0) == 0
    g = _grad(b)
    for name, (a, t) in views.items():
        _check_case(a, t, proj, "l1", g, f"{name} fast={fast}")


def test_fast_in_chunks(monkeypatch):
    """The fast loss's products sample by sample (a workspace limit of one element): the same values."""
    fs, ft, proj = _case(3, 2, 3, 4, 3, k=5)
    g = _grad(3)
    whole = _check_case(fs, ft, proj, "l2sq", g, "one chunk")
    monkeypatch.setattr(td, "_FAST_CHUNK_ELEMS", 1)
    parts = _check_case(fs, ft, proj, "l2sq", g, "per-sample chunks")
    torch.testing.assert_close(parts[0], whole[0], rtol=0, atol=0)


def test_deterministic():
    """No atomics: two calls give bit-identical results."""
    fs, ft, _ = _case(2, 3, 4, 7, 10)
    g = _grad(2)
    a = _ops().feature_affinity_loss(fs, ft, None, "l1")[0]
    ga = _ops().feature_affinity_loss_backward(g, fs, ft, None, "l1", ALL)
    assert torch.equal(a, _ops().feature_affinity_loss(fs, ft, None, "l1")[0])
    for x, y in zip(ga, _ops().feature_affinity_loss_backward(g, fs, ft, None, "l1", ALL)):
        assert torch.equal(x, y)


def test_plans():
    """The tiles the module docstring describes."""
    f = torch.zeros(2, 3, 7, 10, device=DEV)
    p = td._Plan("t", f, torch.zeros(2, 5, 7, 10, device=DEV), None, "l1")
    assert (p.BM, p.nblk, p.LD, p.BK, p.K, p.l1) == (64, 2, 128, 16, 8, True)
    p = td._Plan("t", f.double(), torch.zeros(2, 70, 7, 10, device=DEV, dtype=F64), None, "l2sq")
    assert (p.BM, p.nblk, p.LD, p.BK, p.rows_max, p.acc) == (32, 3, 96, 16, 32, F64)
    p = td._Plan("t", f[:, :, :1, :1], f[:, :, :1, :1], torch.zeros(1, 4, device=DEV), "l1")
    assert (p.BM, p.nblk, p.LD, p.k) == (16, 1, 1, 4)  # fast: the rows are not padded
    p = td._Plan("t", torch.zeros(1, 40, 3, 3, device=DEV), torch.zeros(1, 30, 3, 3, device=DEV), None, "l1")
    assert (p.BM, p.BK, p.K) == (16, 32, 70)


# ---- registration, autograd, errors ---------------------------------------------------------------------


def test_schemas_mirror_cpp():
    """Same argument names, order and defaults as the slimops:: schemas of csrc/registration.cpp."""
    for op in ("feature_affinity_loss", "feature_affinity_loss_backward"):
        ours = str(getattr(_ops(), op).default._schema)
        cpp = str(getattr(torch.ops.slimops, op).default._schema)
        assert ours.split("::", 1) == [OPS_NS, cpp.split("::", 1)[1]], (ours, cpp)


def test_opcheck():
    fs, ft, proj = _case(2, 2, 3, 3, 3, k=2)
    fast = ("test_schema", "test_faketensor", "test_autograd_registration")  # (AOT dispatch costs seconds)
    torch.library.opcheck(_ops().feature_affinity_loss.default,
                          (fs.clone().requires_grad_(), ft.clone().requires_grad_(), None, "l1"))
    torch.library.opcheck(_ops().feature_affinity_loss.default, (fs, ft, proj, "l2sq"), test_utils=fast)
    g = _grad(2)
    for p, mask in ((None, [True, True]), (proj, [False, True]), (None, [False, False])):
        torch.library.opcheck(_ops().feature_affinity_loss_backward.default, (g, fs, ft, p, "l1", mask),
                              test_utils=fast)
    u, e = _ops().feature_affinity_loss(fs, ft, proj, "l1")[1:]
    torch.library.opcheck(_ops().feature_affinity_loss_backward.default, (g, fs, ft, proj, "l1", ALL, u, e),
                          test_utils=fast)


def test_autograd_through_public_op():
    """loss.backward() through slimops.ops.feature_affinity_loss(backend="triton") equals the reference's autograd
    for subsets of inputs that require grad (exact and fast, reductions "sum" and "none"); float64 gradchecks."""
    fs, ft, proj = _case(2, 3, 2, 4, 3, k=4)
    for req, fast, red in (([True, True], False, "sum"), ([True, False], True, "none"), ([False, True], False, "mean")):
        ours = [t.clone().requires_grad_(r) for t, r in zip((fs, ft), req)]
        theirs = [t.cpu().clone().requires_grad_(r) for t, r in zip((fs, ft), req)]
        kw = dict(fast=fast, proj=proj if fast else None, reduction=red)
        out = K.feature_affinity_loss(*ours, backend="triton", **kw)
        want = K.feature_affinity_loss(*theirs, backend="reference", **{**kw, "proj": proj.cpu() if fast else None})
        _close(out, want, f"value req={req}")
        w = torch.randn(out.shape, dtype=out.dtype)
        out.backward(w.to(DEV))
        want.backward(w)
        for a, t, r in zip(ours, theirs, req):
            assert (a.grad is None) == (not r)
            if r:
                _close(a.grad, t.grad, f"autograd req={req}")
    fs, ft, proj = _case(2, 2, 3, 3, 2, dtype=F64, k=3)
    fs, ft = fs.requires_grad_(), ft.requires_grad_()
    for norm, fast in (("l1", False), ("l2sq", False), ("l1", True)):
        assert torch.autograd.gradcheck(
            lambda a, b: K.feature_affinity_loss(a, b, fast=fast, proj=proj if fast else None, norm=norm,
                                                 reduction="none", backend="triton"),
            (fs, ft), fast_mode=True)


def _error_of(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.value


def _words(e: Exception) -> str:
    """The message's first line with the shape and dtype spellings of C++ and Python made alike ([3, 4] / (3, 4),
    Int / torch.int32)."""
    msg = str(e).splitlines()[0]
    msg = re.sub(r"[\[\]()]", "", msg.replace(",)", ")"))
    names = {"int32": "Int", "int64": "Long", "float64": "Double", "float32": "Float", "float16": "Half",
             "bfloat16": "BFloat16"}
    return re.sub(r"torch\.(\w+)", lambda m: names.get(m.group(1), m.group(1)), msg)


def test_bad_input():
    """The shared argument checks: the same exception types and words as the C++ kernels (torch.ops.slimops), forward
    and backward, through the raw ops and the public op."""
    fs, ft, _ = _case(2, 3, 4, 4, 5)
    fs, ft = fs.cpu(), ft.cpu()
    bad = {
        "int features": (fs.int(), ft.int(), None, "l1"),
        "dtypes differ": (fs, ft.double(), None, "l1"),
        "3-D": (fs[0], ft, None, "l1"),
        "batch": (fs, ft[:1], None, "l1"),
        "pixels": (fs, ft[..., :4], None, "l1"),
        "no pixel": (fs[:, :, :0], ft[:, :, :0], None, "l1"),
        "norm": (fs, ft, None, "l3"),
        "proj rows": (fs, ft, torch.randn(19, 3), "l1"),
        "proj k=0": (fs, ft, torch.randn(20, 0), "l1"),
        "proj int": (fs, ft, torch.ones(20, 3, dtype=torch.int64), "l1"),
    }
    for name, args in bad.items():
        cpp = _error_of(torch.ops.slimops.feature_affinity_loss, *args)
        ours = _error_of(_ops().feature_affinity_loss, *(a.to(DEV) if isinstance(a, torch.Tensor) else a
                                                         for a in args))
        assert type(ours) is type(cpp) and _words(ours) == _words(cpp), f"{name}: {ours!r} vs {cpp!r}"
        assert str(ours).startswith("slimops.feature_affinity_loss: "), name
    g = torch.randn(2)
    for name, gg in (("grad shape", g[:1]), ("grad dtype", g.int())):
        cpp = _error_of(torch.ops.slimops.feature_affinity_loss_backward, gg, fs, ft, None, "l1", ALL)
        ours = _error_of(_ops().feature_affinity_loss_backward, gg.to(DEV), fs.to(DEV), ft.to(DEV), None, "l1", ALL)
        assert type(ours) is type(cpp) and _words(ours) == _words(cpp), f"{name}: {ours!r} vs {cpp!r}"
    proj = torch.randn(20, 3)
    _, u, e = torch.ops.slimops.feature_affinity_loss(fs, ft, proj, "l1")
    for name, saved in (("u only", (u, None)), ("saved with exact", (u, e)), ("u rows", (u[:, 1:], e)),
                        ("e dtype", (u, e.double())), ("e pixels", (u, e[:, 1:]))):
        p = None if name == "saved with exact" else proj
        cpp = _error_of(torch.ops.slimops.feature_affinity_loss_backward, g, fs, ft, p, "l1", ALL, *saved)
        ours = _error_of(_ops().feature_affinity_loss_backward, *(None if a is None else a.to(DEV) for a in
                                                                  (g, fs, ft, p)), "l1", ALL,
                         *(None if a is None else a.to(DEV) for a in saved))
        assert type(ours) is type(cpp) and _words(ours) == _words(cpp), f"{name}: {ours!r} vs {cpp!r}"
    with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss: ft has batch size 1 but fs has 2"):
        K.feature_affinity_loss(fs.to(DEV), ft[:1].to(DEV), backend="triton")


def test_wrong_device_for_backend():
    """The interpreter runs CPU tensors only, compiled Triton CUDA tensors only: a clear error otherwise."""
    other = "cuda" if DEV == "cpu" else "cpu"
    if other == "cuda" and not torch.cuda.is_available():
        pytest.skip("no second device to try")
    fs, ft, _ = (t.to(other) if t is not None else t for t in _case(1, 2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"slimops\.feature_affinity_loss: .*(Triton|interpreter)"):
        _ops().feature_affinity_loss(fs, ft, None, "l1")[0]


# ---- GPU only: realistic sizes ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_realistic_sizes_gpu(dtype):
    """A ResNet stage: 28x28 maps, 128 student and 256 teacher channels (13 pixel tiles, K chunks, row blocks),
    exact and fast."""
    if DEV != "cuda":
        pytest.skip("compiled kernels only")
    for k in (None, 64):
        fs, ft, proj = _case(4, 128, 256, 28, 28, dtype=dtype, k=k)
        _check_case(fs, ft, proj, "l1", _grad(4), f"resnet stage {dtype} k={k}")
