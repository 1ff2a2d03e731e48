"""The token_attention family (attention over kept tokens, for patch slimming): the reference twin
(slimops/reference/token_attention.py) against a naive float64 oracle written from the definition, then the public op and
the C++ CPU kernel (slimops/ops/token_attention.py, csrc/cpu/token_attention.cpp) against the reference.

1. The reference: per sample and head, a Python loop over the kept queries with an explicit softmax over the kept
   keys; values and gradients (shared and per-sample indices, unsorted, Lq != Lk).
2. The "cpu" backend (and "auto" on CPU) equals the reference: values and gradients (every output_mask; rows not
   kept get zero gradients), head dims 1 .. 80, query chunks (nq > 64), key counts not a multiple of 16, nk = 1,
   nq = 0, empty batches, int32 and int64 indices, a custom scale; float32/float64 tight, bfloat16/float16 within 2x
   of the reference's own error; strided inputs (views of a fused qkv projection, a transposed head dim).
3. float64 gradcheck through the public op, ``torch.library.opcheck`` on both ops, torch.compile(fullgraph=True).
4. Bad input: clear errors naming the op and the argument (range, duplicates, shapes, dtypes), from the Python
   layer and from the raw C++ op, for the reference backend too.
"""
from __future__ import annotations

import math

import pytest
import torch

import slimops  # noqa: F401  (registers torch.ops.slimops.*)
from slimops.ops import token_attention as K
from slimops.reference import token_attention as ref
from tests.conftest import LOWP, assert_close_lowp

OPS = torch.ops.slimops
ALL = [True, True, True]

pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(q, k, v, q_idx, kv_idx, scale=None):
    """Loops over samples, heads and kept queries: softmax over the kept keys, in float64."""
    b, h, _, d = q.shape
    s = 1.0 / math.sqrt(d) if scale is None else scale
    qi = q_idx.long().expand(b, -1) if q_idx.dim() == 1 else q_idx.long()
    ki = kv_idx.long().expand(b, -1) if kv_idx.dim() == 1 else kv_idx.long()
    out = torch.zeros(b, h, qi.shape[1], d, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            kk, vv = k[bb, hh, ki[bb]].double(), v[bb, hh, ki[bb]].double()
            for i, t in enumerate(qi[bb].tolist()):
                w = torch.softmax(kk @ q[bb, hh, t].double() * s, 0)
                out[bb, hh, i] = w @ vv
    return out


def _case(b, h, lq, lk, d, nq, nk, per_sample, dtype=torch.float64, seed=0, int32=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64).to(dtype)
    if per_sample:
        qi = torch.stack([torch.randperm(lq, generator=g)[:nq] for _ in range(b)])
        ki = torch.stack([torch.randperm(lk, generator=g)[:nk] for _ in range(b)])
    else:
        qi, ki = torch.randperm(lq, generator=g)[:nq], torch.randperm(lk, generator=g)[:nk]
    if int32:
        qi, ki = qi.int(), ki.int()
    return q, k, v, qi, ki


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_reference_matches_oracle(per_sample):
    q, k, v, qi, ki = _case(2, 3, 9, 7, 5, 6, 4, per_sample)
    torch.testing.assert_close(ref.kept_token_attention(q, k, v, qi, ki), oracle(q, k, v, qi, ki), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.kept_token_attention(q, k, v, qi, ki, 0.3), oracle(q, k, v, qi, ki, 0.3),
                               rtol=0, atol=1e-12)
    g = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    got = ref.kept_token_attention_backward(g, q, k, v, qi, ki, None, ALL)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(oracle(qq, kk, vv, qi, ki), (qq, kk, vv), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    kept = torch.zeros(2, 9, dtype=torch.bool)
    kept[torch.arange(2)[:, None], qi if per_sample else qi.expand(2, -1)] = True
    assert got[0][~kept[:, None, :, None].expand_as(q)].abs().max() == 0  # rows not kept: zero gradient


# (b, h, lq, lk, d, nq, nk): query chunks (nq > 64), key counts not a multiple of 16, nk = 1, nq = 0, d = 1 .. 80.
CASES = [(2, 3, 20, 17, 5, 13, 9), (1, 2, 150, 140, 16, 130, 77), (2, 1, 8, 8, 1, 8, 8), (1, 2, 10, 12, 80, 3, 1),
         (2, 2, 12, 9, 24, 0, 5), (3, 1, 33, 40, 64, 33, 40)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(case, per_sample, dtype):
    q, k, v, qi, ki = _case(*case, per_sample, dtype=dtype, int32=per_sample)
    tol = dict(rtol=1e-4, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(OPS.kept_token_attention(q, k, v, qi, ki), ref.kept_token_attention(q, k, v, qi, ki),
                               **tol)
    g = torch.randn(case[0], case[1], case[5], case[4], dtype=dtype)
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, False, True]):
        got = OPS.kept_token_attention_backward(g, q, k, v, qi, ki, 0.7, mask)
        want = ref.kept_token_attention_backward(g, q, k, v, qi, ki, 0.7, mask)
        for a, b, m in zip(got, want, mask):
            assert a.shape == b.shape and (m or a.numel() == 0)
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_within_twice_the_references_error(dtype):
    q, k, v, qi, ki = _case(2, 2, 40, 40, 32, 25, 30, True)
    truth = ref.kept_token_attention(q, k, v, qi, ki)
    lq, lk, lv = (t.to(dtype) for t in (q, k, v))
    got = OPS.kept_token_attention(lq, lk, lv, qi, ki)
    assert got.dtype == dtype
    assert_close_lowp(got, ref.kept_token_attention(lq, lk, lv, qi, ki), truth)
    g = torch.randn(2, 2, 25, 32, dtype=torch.float64)
    want64 = ref.kept_token_attention_backward(g, q, k, v, qi, ki, None, ALL)
    lowref = ref.kept_token_attention_backward(g.to(dtype), lq, lk, lv, qi, ki, None, ALL)
    got = OPS.kept_token_attention_backward(g.to(dtype), lq, lk, lv, qi, ki, None, ALL)
    for a, r, t in zip(got, lowref, want64):
        assert_close_lowp(a, r, t)


@pytest.mark.parametrize("layout", ["fused_qkv", "transposed_d"])
def test_strided_inputs(layout):
    b, h, n, d = 2, 3, 20, 8
    if layout == "fused_qkv":  # (B, N, 3, heads, d) -> three (B, heads, N, d) views, token stride 3*heads*d
        qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = (torch.randn(b, h, d, n, dtype=torch.float64).transpose(2, 3) for _ in range(3))
    qi, ki = torch.tensor([3, 0, 17, 5]), torch.tensor([[1, 2, 19, 4, 0], [7, 8, 9, 3, 11]])
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = K.kept_token_attention(qq, kk, vv, qi, ki)
    torch.testing.assert_close(out, ref.kept_token_attention(q.contiguous(), k.contiguous(), v.contiguous(), qi, ki),
                               rtol=0, atol=1e-12)
    assert out.is_contiguous()


def test_empty_batch_and_no_queries():
    q, k, v, qi, ki = _case(0, 2, 5, 5, 4, 3, 3, False)
    assert OPS.kept_token_attention(q, k, v, qi, ki).shape == (0, 2, 3, 4)
    q, k, v, qi, ki = _case(2, 2, 5, 5, 4, 0, 3, False)
    qq = q.requires_grad_()
    out = K.kept_token_attention(qq, k, v, qi, ki)
    assert out.shape == (2, 2, 0, 4)
    out.sum().backward()
    assert torch.equal(qq.grad, torch.zeros_like(q))


def test_autograd_gradcheck_compile_and_auto():
    q, k, v, qi, ki = _case(2, 2, 7, 6, 3, 5, 4, True)
    qkv = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: K.kept_token_attention(a, b, c, qi, ki, backend="cpu"), qkv)
    assert torch.autograd.gradcheck(lambda a, b, c: K.kept_token_attention(a, b, c, qi[0], ki[1], scale=0.5), qkv)
    fn = torch.compile(lambda a, b, c: K.kept_token_attention(a, b, c, qi, ki), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), ref.kept_token_attention(q, k, v, qi, ki), rtol=0, atol=1e-12)
    from slimops import _backend
    assert _backend.resolve("kept_token_attention", "auto", q.device) == "cpu"


def test_opcheck():
    q, k, v, qi, ki = _case(2, 2, 7, 6, 3, 5, 4, True, dtype=torch.float32)
    torch.library.opcheck(OPS.kept_token_attention, (q, k, v, qi, ki), {"scale": 0.4})
    g = torch.randn(2, 2, 5, 3)
    torch.library.opcheck(OPS.kept_token_attention_backward, (g, q, k, v, qi, ki, None, [True, False, True]))


def test_thread_count_does_not_change_results():
    q, k, v, qi, ki = _case(4, 3, 30, 30, 16, 20, 25, True, dtype=torch.float32)
    one = OPS.kept_token_attention(q, k, v, qi, ki)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(OPS.kept_token_attention(q, k, v, qi, ki), one)
    finally:
        torch.set_num_threads(old)


# ---- bad input ----------------------------------------------------------------------------------------------------


def _good():
    return _case(2, 2, 6, 5, 4, 3, 2, False, dtype=torch.float32)


BAD = [
    ("out of range q", lambda q, k, v, qi, ki: (q, k, v, torch.tensor([0, 6]), ki), IndexError,
     "q_idx holds token 6, outside [0, 6)"),
    ("negative kv", lambda q, k, v, qi, ki: (q, k, v, qi, torch.tensor([-1, 2])), IndexError,
     "kv_idx holds token -1, outside [0, 5)"),
    ("duplicate q", lambda q, k, v, qi, ki: (q, k, v, torch.tensor([1, 4, 1]), ki), ValueError,
     "q_idx repeats token 1; kept indices must be distinct"),
    ("duplicate kv row", lambda q, k, v, qi, ki: (q, k, v, qi, torch.tensor([[0, 1], [3, 3]])), ValueError,
     "kv_idx repeats token 3 in row 1"),
    ("float index", lambda q, k, v, qi, ki: (q, k, v, qi.float(), ki), TypeError, "q_idx must be an int64 or int32"),
    ("3-D index", lambda q, k, v, qi, ki: (q, k, v, qi[None, None], ki), ValueError, "q_idx must be 1-D"),
    ("index rows", lambda q, k, v, qi, ki: (q, k, v, qi, ki.expand(3, -1)), ValueError,
     "kv_idx has 3 rows but q has batch size B = 2"),
    ("too many kept", lambda q, k, v, qi, ki: (q, k, v, qi, torch.arange(6)), ValueError,
     "kv_idx keeps 6 tokens but k has 5"),
    ("no keys", lambda q, k, v, qi, ki: (q, k, v, qi, ki[:0]), ValueError, "kv_idx must keep at least one key"),
    ("head dim", lambda q, k, v, qi, ki: (q, k[..., :3], v[..., :3], qi, ki), ValueError,
     "must match q"),
    ("v shape", lambda q, k, v, qi, ki: (q, k, v[:, :, :4], qi, ki), ValueError, "v must have the shape of k"),
    ("3-D q", lambda q, k, v, qi, ki: (q[0], k, v, qi, ki), ValueError, "q must be 4-D"),
    ("dtype", lambda q, k, v, qi, ki: (q, k.double(), v, qi, ki), TypeError, "q, k and v must share one dtype"),
    ("int q", lambda q, k, v, qi, ki: (q.int(), k, v, qi, ki), TypeError, "q must be a floating-point tensor"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "raw"])
@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, mutate, exc, msg):
    args = mutate(*_good())
    with pytest.raises(exc) as e:
        if backend == "raw":
            OPS.kept_token_attention(*args)
        else:
            K.kept_token_attention(*args, backend=backend)
    assert "slimops.kept_token_attention" in str(e.value) and msg in str(e.value), str(e.value)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    q, k, v, qi, ki = _good()
    for call in (lambda: K.kept_token_attention(q, k, v, qi, ki, scale=scale),
                 lambda: OPS.kept_token_attention(q, k, v, qi, ki, scale)):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            call()


def test_bad_grad_shape():
    q, k, v, qi, ki = _good()
    with pytest.raises(ValueError, match=r"slimops.kept_token_attention_backward: grad must have the output's shape"):
        OPS.kept_token_attention_backward(torch.zeros(2, 2, 4, 4), q, k, v, qi, ki, None, ALL)
