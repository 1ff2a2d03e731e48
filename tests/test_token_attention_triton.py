"""The Triton kernels of the token_attention family (slimops/triton/token_attention.py) against the reference twin
(slimops.reference.token_attention).

Runs through the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 when no GPU is visible, before
anything imports triton). With a GPU and the interpreter off, the same tests run the compiled kernels on CUDA
tensors (fp32 dots are 3xTF32 there, torch's TF32 flag forced off: a 1e-4 instead of 1e-5 fp32 tolerance).

- Values and every gradient: indices shared by the batch and per sample, int32 and int64 (and one of each),
  unsorted; nq below one query tile and spanning two, nk spanning two key tiles (the online softmax and its
  rescaling, with large logits), nk = 1, nq = 0, everything kept, Lq != Lk; head dims 1, 5, 16, 64; a custom
  scale. float32 / float64 within tight tolerances; bfloat16 / float16 against the float64 truth, error at most
  twice the reference's own in that dtype plus a small floor (conftest.assert_close_lowp).
- Strided inputs (views of a fused qkv projection, a transposed head dim, non-contiguous indices and grad), every
  output_mask, empty batches, opcheck, autograd and gradcheck through the public op with backend="triton", bad
  input (out-of-range and duplicate indices).

Shapes are tiny and few: the interpreter runs every tile operation of every program in Python.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import LOWP, assert_close_lowp, triton_family
from slimops.ops import token_attention as K
from slimops.reference import token_attention as ref

tk, INTERPRETED, DEV, NEEDS_TRITON = triton_family("token_attention")

pytestmark = [NEEDS_TRITON, pytest.mark.usefixtures("one_thread", "no_matmul_tf32")]

OPS_NS = "slimops_triton"
FP_TOL = {torch.float32: 1e-5 if INTERPRETED else 1e-4, torch.float64: 1e-10}
ALL = [True, True, True]




def _ops():
    return getattr(torch.ops, OPS_NS)


def _idx(b, length, n, per_sample, int32):
    """n distinct unsorted tokens of ``length`` (one row shared by the batch, or one per sample)."""
    if per_sample:
        idx = torch.stack([torch.randperm(length)[:n] for _ in range(b)]) if b else torch.zeros(0, n, dtype=torch.long)
    else:
        idx = torch.randperm(length)[:n]
    return idx.to(device=DEV, dtype=torch.int32 if int32 else torch.int64)


def _inputs(b, h, lq, lk, d, nq, nk, q_per=False, kv_per=False, q32=False, kv32=False, dtype=torch.float32, mul=1.0):
    q = (torch.randn(b, h, lq, d, dtype=torch.float64) * mul).to(device=DEV, dtype=dtype)
    k, v = ((torch.randn(b, h, lk, d, dtype=torch.float64) * mul).to(device=DEV, dtype=dtype) for _ in range(2))
    return q, k, v, _idx(b, lq, nq, q_per, q32), _idx(b, lk, nk, kv_per, kv32)


def _check(actual, expected, truth=None, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device.type == DEV, what
    if actual.dtype in LOWP:
        assert_close_lowp(actual.cpu(), expected.cpu(), truth.cpu(), msg=what)
    else:
        tol = FP_TOL[actual.dtype]
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _check_case(q, k, v, qi, ki, g, scale=None, what="", mask=ALL):
    """Forward and backward of the Triton ops against the reference (on CPU copies; low precision also against
    the float64 truth); gradients not asked for must be empty tensors, rows not kept zero."""
    lowp = q.dtype in LOWP
    qc, kc, vc, gc, qic, kic = (t.cpu() for t in (q, k, v, g, qi, ki))
    hi = [t.double() for t in (qc, kc, vc, gc)]
    out = _ops().kept_token_attention(q, k, v, qi, ki, scale)
    assert out.is_contiguous(), what
    _check(out, ref.kept_token_attention(qc, kc, vc, qic, kic, scale),
           ref.kept_token_attention(*hi[:3], qic, kic, scale) if lowp else None, f"{what} out")
    got = _ops().kept_token_attention_backward(g, q, k, v, qi, ki, scale, list(mask))
    want = ref.kept_token_attention_backward(gc, qc, kc, vc, qic, kic, scale, mask)
    truth = ref.kept_token_attention_backward(hi[3], *hi[:3], qic, kic, scale, mask) if lowp else (None,) * 3
    assert len(got) == 3
    for name, a, e, t, m in zip("qkv", got, want, truth, mask):
        if m:
            assert a.is_contiguous(), what
            _check(a, e, t, f"{what} grad_{name}")
        else:
            assert a.numel() == 0, f"{what} grad_{name}: not asked for, must be empty"


# name: ((B, heads, Lq, Lk, d, nq, nk), options of _inputs, scale)
CASES = {
    # nq < one query tile, unsorted shared int64 indices, Lq != Lk
    "shared": ((2, 2, 10, 12, 16, 6, 7), {}, None),
    "per-sample-int32": ((2, 1, 12, 9, 5, 5, 9), dict(q_per=True, kv_per=True, q32=True, kv32=True), None),
    "mixed-shapes-dtypes": ((2, 1, 9, 11, 16, 9, 4), dict(q_per=True, q32=True), None),  # every query kept
    "nq-2-tiles": ((1, 1, 80, 20, 8, 70, 13), dict(q_per=True), None),
    # two key tiles, logits of size ~20 (saturated rows: the online rescaling must stay exact), custom scale
    "nk-2-tiles-large-logits": ((2, 1, 8, 80, 16, 5, 67), dict(kv_per=True, kv32=True, mul=2.0), 0.7),
    "nk1": ((2, 1, 6, 4, 16, 6, 1), dict(kv_per=True), None),
    "d1": ((1, 2, 7, 9, 1, 4, 5), dict(q_per=True, kv_per=True), None),
    "d64": ((1, 1, 9, 10, 64, 3, 10), dict(q32=True), 0.05),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32(name):
    shape, opts, scale = CASES[name]
    q, k, v, qi, ki = _inputs(*shape, **opts)
    g = torch.randn(q.shape[0], q.shape[1], qi.shape[-1], q.shape[3], device=DEV)
    _check_case(q, k, v, qi, ki, g, scale, name)


@pytest.mark.parametrize("name", ["per-sample-int32", "nq-2-tiles", "nk-2-tiles-large-logits"])
def test_fp64(name):
    """float64 (32-token tiles: nq = 70 is three query tiles, nk = 67 three key tiles)."""
    shape, opts, scale = CASES[name]
    q, k, v, qi, ki = _inputs(*shape, **opts, dtype=torch.float64)
    g = torch.randn(q.shape[0], q.shape[1], qi.shape[-1], q.shape[3], device=DEV, dtype=torch.float64)
    _check_case(q, k, v, qi, ki, g, scale, name)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("name", ["shared", "nk-2-tiles-large-logits"])
def test_low_precision(name, dtype):
    """bf16 / fp16 storage, P and dS rounded to it for the dots (as on the GPU): within 2x of torch's own error."""
    shape, opts, scale = CASES[name]
    q, k, v, qi, ki = _inputs(*shape, **opts, dtype=dtype)
    g = torch.randn(q.shape[0], q.shape[1], qi.shape[-1], q.shape[3], device=DEV).to(dtype)
    _check_case(q, k, v, qi, ki, g, scale, f"{name} {dtype}")


def test_no_query_kept():
    """nq = 0 (per sample and shared; nk = 0 too): an empty output, all-zero gradients, no launch."""
    for per, nk in ((True, 3), (False, 0)):
        q, k, v, qi, ki = _inputs(2, 1, 5, 6, 8, 0, nk, q_per=per, kv_per=per)
        out = _ops().kept_token_attention(q, k, v, qi, ki)
        assert out.shape == (2, 1, 0, 8) and out.dtype == q.dtype
        gq, gk, gv = _ops().kept_token_attention_backward(out, q, k, v, qi, ki, None, ALL)
        assert gq.shape == q.shape and gk.shape == gv.shape == k.shape
        assert not (gq.any() or gk.any() or gv.any())


def test_fused_qkv_views_and_strided():
    """q, k, v as views of one (B, L, 3, heads, d) projection output (token stride 3*heads*d, head stride d), read
    in place; a non-contiguous grad and non-contiguous index rows; then a transposed head dim (copied). Autograd
    into the fused tensor through the public op."""
    b, h, n, d = 2, 2, 11, 16
    base = torch.randn(b, n, 3, h, d, device=DEV)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    assert q.stride() == (n * 3 * h * d, d, 3 * h * d, 1)
    qi = torch.stack([torch.randperm(n) for _ in range(2 * b)]).to(DEV)[::2, :7]  # row stride 2n, not contiguous
    ki = torch.randperm(n).repeat_interleave(2).to(DEV)[:12:2]  # 1-D, column stride 2
    assert ki.stride() == (2,) and ki.unique().numel() == 6
    assert not qi.is_contiguous()
    g = torch.randn(b, 7, h, d, device=DEV).transpose(1, 2)
    _check_case(q, k, v, qi, ki, g, what="fused qkv")
    _check_case(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, qi, ki, g, what="strided head dim")
    assert q.transpose(2, 3).contiguous().transpose(2, 3).stride(-1) == n
    leaf = base.clone().requires_grad_()
    leaf_ref = base.cpu().clone().requires_grad_()
    K.kept_token_attention(*leaf.permute(2, 0, 3, 1, 4).unbind(0), qi, ki, backend="triton").backward(g)
    ref.kept_token_attention(*[t.contiguous() for t in leaf_ref.permute(2, 0, 3, 1, 4).unbind(0)], qi.cpu(),
                             ki.cpu()).backward(g.cpu())
    _check(leaf.grad, leaf_ref.grad, what="grad of the fused qkv")


MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


def test_output_mask():
    """Every subset of gradients (the key-centric kernel skipped when neither grad_k nor grad_v is asked for)."""
    q, k, v, qi, ki = _inputs(1, 2, 9, 7, 8, 5, 6, q_per=True)
    g = torch.randn(1, 2, 5, 8, device=DEV)
    for mask in MASKS:
        _check_case(q, k, v, qi, ki, g, what=f"mask={mask}", mask=mask)


@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["B0", "heads0"])
def test_empty(shape):
    for per in (False, True):
        q, k, v, qi, ki = _inputs(*shape, 5, 6, 8, 3, 4, q_per=per, kv_per=per)
        out = _ops().kept_token_attention(q, k, v, qi, ki)
        assert out.shape == (*shape, 3, 8) and out.dtype == q.dtype
        gq, gk, gv = _ops().kept_token_attention_backward(out, q, k, v, qi, ki, None, [True, False, True])
        assert gq.shape == q.shape and gk.numel() == 0 and gv.shape == k.shape


def test_plans():
    """The tiles the docstring describes: 16 .. 64 kept tokens per tile (32 for float64), the head dim padded."""
    q = torch.zeros(2, 3, 200, 5, device=DEV)
    qi = torch.arange(200, device=DEV)
    p = tk._Plan("t", q, q, qi[:70], qi[:3], None)
    assert (p.BM, p.BN, p.qtiles, p.ktiles, p.D, p.BH) == (64, 16, 2, 1, 16, 6)
    p = tk._Plan("t", q.double(), q, qi[:70], qi[:33], 2.0)
    assert (p.BM, p.BN, p.qtiles, p.ktiles, p.sm_scale) == (32, 32, 3, 2, 2.0)
    p = tk._Plan("t", q[..., :1].expand(2, 3, 200, 40), q, qi[:0], qi[:17], None)
    assert (p.BM, p.BN, p.D, p.empty) == (16, 32, 64, True)


# ---- registration, autograd, errors ---------------------------------------------------------------------


def test_schemas_mirror_cpp():
    """Same argument names, order and defaults as the slimops:: schemas of csrc/registration.cpp."""
    for op in ("kept_token_attention", "kept_token_attention_backward"):
        ours = str(getattr(_ops(), op).default._schema)
        cpp = str(getattr(torch.ops.slimops, op).default._schema)
        assert ours.split("::", 1) == [OPS_NS, cpp.split("::", 1)[1]], (ours, cpp)


def test_opcheck():
    q, k, v, qi, ki = _inputs(2, 1, 6, 5, 4, 3, 4, q_per=True, kv32=True)
    torch.library.opcheck(_ops().kept_token_attention.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), qi, ki, None))
    fast = ("test_schema", "test_faketensor", "test_autograd_registration")  # (AOT dispatch costs seconds)
    torch.library.opcheck(_ops().kept_token_attention.default, (q, k, v, qi, ki, 0.5), test_utils=fast)
    g = torch.randn(2, 1, 3, 4, device=DEV)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(_ops().kept_token_attention_backward.default,
                              (g, q.detach(), k.detach(), v.detach(), qi, ki, None, mask), test_utils=fast)


def test_autograd_through_public_op():
    """loss.backward() through slimops.ops.kept_token_attention(backend="triton") equals the reference's autograd
    for subsets of inputs that require grad; and a float64 gradcheck of the op."""
    q, k, v, qi, ki = _inputs(2, 2, 7, 6, 8, 4, 5, kv_per=True)
    base = (q, k, v)
    g = torch.randn(2, 2, 4, 8, device=DEV)
    for req in ([True, True, True], [True, False, False], [False, True, True]):
        ours = [t.clone().requires_grad_(r) for t, r in zip(base, req)]
        theirs = [t.cpu().clone().requires_grad_(r) for t, r in zip(base, req)]
        K.kept_token_attention(*ours, qi, ki, backend="triton").backward(g)
        ref.kept_token_attention(*theirs, qi.cpu(), ki.cpu()).backward(g.cpu())
        for a, w, r in zip(ours, theirs, req):
            assert (a.grad is None) == (not r)
            if r:
                _check(a.grad, w.grad, what=f"autograd req={req}")
    q, k, v, qi, ki = _inputs(2, 1, 5, 6, 3, 3, 4, q_per=True, kv32=True, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: K.kept_token_attention(a, b, c, qi, ki, scale=0.8,
                                                                          backend="triton"),
                                    (q, k, v), fast_mode=True)


def test_bad_input():
    """Index values (range, duplicates) checked by the Triton ops themselves, forward and backward, and through
    the public op; the shared argument checks give the same errors as every other backend."""
    q, k, v, qi, ki = _inputs(2, 1, 6, 5, 8, 3, 4)
    g = torch.randn(2, 1, 3, 8, device=DEV)
    fwd = _ops().kept_token_attention
    bwd = _ops().kept_token_attention_backward
    bad_range = torch.tensor([0, 6], device=DEV)
    with pytest.raises(IndexError, match=r"slimops\.kept_token_attention: q_idx holds token 6, outside \[0, 6\)"):
        fwd(q, k, v, bad_range, ki)
    with pytest.raises(IndexError, match=r"slimops\.kept_token_attention: kv_idx holds token -1"):
        fwd(q, k, v, qi, torch.tensor([[0, -1], [1, 2]], device=DEV, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"slimops\.kept_token_attention: kv_idx repeats token 3"):
        fwd(q, k, v, qi, torch.tensor([3, 1, 3], device=DEV))
    with pytest.raises(ValueError, match=r"slimops\.kept_token_attention: q_idx repeats token 2 in row 1"):
        K.kept_token_attention(q, k, v, torch.tensor([[0, 1], [2, 2]], device=DEV), ki, backend="triton")
    with pytest.raises(IndexError, match=r"slimops\.kept_token_attention_backward: kv_idx holds token 5"):
        bwd(g, q, k, v, qi, torch.tensor([5, 0, 1, 2], device=DEV), None, ALL)
    with pytest.raises(ValueError, match=r"slimops\.kept_token_attention_backward: q_idx repeats token 1"):
        bwd(g, q, k, v, torch.tensor([1, 4, 1], device=DEV), ki, None, ALL)
    with pytest.raises(ValueError, match=r"slimops\.kept_token_attention_backward: grad must have the output's"):
        bwd(g[:, :, :2], q, k, v, qi, ki, None, ALL)
    with pytest.raises(TypeError, match=r"slimops\.kept_token_attention: q_idx must be an int64 or int32"):
        fwd(q, k, v, qi.float(), ki)
    with pytest.raises(ValueError, match=r"slimops\.kept_token_attention: kv_idx must keep at least one key"):
        fwd(q, k, v, qi, ki[:0])


def test_out_of_resources(monkeypatch):
    """A configuration that does not fit the GPU (Triton's OutOfResources at the first launch): an error naming the
    op and the way out."""
    import collections

    from triton.runtime.errors import OutOfResources

    def too_big(*args, **kwargs):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(tk, "_fwd_kernel", collections.defaultdict(lambda: too_big))  # kernel[grid] -> launcher
    q, k, v, qi, ki = _inputs(1, 1, 4, 4, 8, 2, 2)
    with pytest.raises(RuntimeError, match=r"slimops\.kept_token_attention: the Triton kernel does not fit .*shared "
                                           r"memory.*backend='reference'"):
        _ops().kept_token_attention(q, k, v, qi, ki)


def test_wrong_device_for_backend():
    """The interpreter runs CPU tensors only, compiled Triton CUDA tensors only: a clear error otherwise."""
    other = "cuda" if DEV == "cpu" else "cpu"
    if other == "cuda" and not torch.cuda.is_available():
        pytest.skip("no second device to try")
    q, k, v, qi, ki = (t.to(other) for t in _inputs(1, 1, 4, 4, 8, 2, 2))
    with pytest.raises(ValueError, match=r"slimops\.kept_token_attention: .*(Triton|interpreter)"):
        _ops().kept_token_attention(q, k, v, qi, ki)


# ---- GPU only: realistic sizes ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_realistic_sizes_gpu(dtype):
    """DeiT-S-like shapes: 197 tokens, 6 heads, d = 64, 60 % of the tokens kept per sample."""
    if DEV != "cuda":
        pytest.skip("compiled kernels only")
    q, k, v, qi, ki = _inputs(8, 6, 197, 197, 64, 118, 118, q_per=True, kv_per=True, dtype=dtype)
    g = torch.randn(8, 6, 118, 64, device=DEV).to(dtype)
    _check_case(q, k, v, qi, ki, g, what=f"deit-s {dtype}")
