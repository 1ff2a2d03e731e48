"""Randomised bad-input suite over every public op of ``slimops.ops`` (issue 17, item 5; DESIGN.md "Testing rules").

For every public op there is a generator of a VALID call (small random shapes from a seeded ``random.Random``)
and a set of mutators, each of which breaks or stresses ONE thing: a wrong dtype, another device (a 'meta'
tensor stands in for it, as in test_bad_input.py), a wrong rank or mismatched shape, empty tensors, NaN/inf
values, negative/NaN/inf scalars, out-of-range / duplicate / wrong-dtype indices, non-contiguous views,
overlapping views (``expand``, stride 0; for the in-place ``_`` ops also aliased in-place outputs), and "huge"
sizes past int32 indexing built from stride-0 views, so that nothing huge is ever allocated.

The oracle of one case (op, mutator, repetition) on one backend:

- EITHER the op raises ValueError / TypeError / RuntimeError / IndexError whose message names the op
  (``slimops.<op>``) and, where the case targets an argument, that argument; an in-place op that raises
  has changed nothing;
- OR it returns a result equal (values, shape, dtype; tolerance per dtype; NaN where the oracle has NaN) to
  the reference twin (``slimops/reference``) or, for the convolutions, to the DESIGN.md formula evaluated in
  float64 on the same inputs; a functional op never writes into its inputs.

Each mutator says which of the two it allows: ``error`` (DESIGN.md: "wrong dtype, shape, device, out-of-range
or duplicate indices, NaN/inf where it matters, negative lambda" must be refused), ``ok`` (a valid call that
must give the right answer) or ``any`` (either outcome). A segfault, a hang, a silent wrong answer, an error
that does not name the op or an error on a valid call is a failure.

Aliasing for the in-place ops: two tensors the op updates in place that share memory (one tensor twice in a list,
a buffer that is also a parameter, overlapping views) must be refused; a read-only input that is also an in-place
output (``grads[i] is params[i]``) may be refused or give the result of reading a copy of it.

Huge cases run under a cap on the process's data segment (RLIMIT_DATA, current use + ``CAP_BYTES``): an
allocation past it fails cleanly instead of eating the machine. When the op's own result is larger than the
cap, a clean allocator error is a third acceptable outcome (counted as ``oom``); when the result is small,
running out of memory is a failure (the op materialises its input).

Every case runs on backend "cpu" (the C++ kernel) and "reference"; a few per op on "triton" (interpreted on
CPU; conftest sets TRITON_INTERPRET=1). ``test_zz_summary`` prints the per-op counts (run with ``-s``). Cases that
only a change of a kernel (C++ in csrc/, or a Triton kernel) can fix are in ``XFAIL`` (strict), with the reason.
"""
from __future__ import annotations

import collections
import contextlib
import math
import random
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import slimops.ops as P
from slimops.ops import distill as PD
from slimops.reference import channel_conv as RC
from slimops.reference import distill as RD
from slimops.reference import prox as RP
from slimops.reference import quant as RQ
from slimops.reference import sema as RSE
from slimops.reference import spectral as RS
from slimops.reference import token_attention as RTA

SEED = 17_05  # issue 17, item 5: every case derives its inputs from (SEED, op, mutator, repetition)
ERRORS = (ValueError, TypeError, RuntimeError, IndexError)
BACKENDS = ["cpu", "reference"]
VALID_REPS = 6  # random valid calls per op
MUT_REPS = 2  # random base calls per mutator
CAP_BYTES = 200 * 2**20  # memory a huge case may allocate
HUGE = 2**31 + 8  # elements: past int32 indexing

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
FLOAT_DTYPES = [F32, F32, F32, F64, F64, BF16, F16]  # the valid calls' dtypes (weighted towards exact checks)
# (rtol on the stored value, atol) per result dtype; reductions (conv, DFT, attention) also get RED_RTOL.
TOL = {F64: (1e-12, 1e-12), F32: (1e-6, 1e-6), BF16: (1.6e-2, 1e-2), F16: (2e-3, 1e-3)}
RED_TOL = {F64: (1e-10, 1e-10), F32: (2e-5, 2e-5), BF16: (2e-2, 2e-2), F16: (4e-3, 4e-3)}


# =============================================================================================================
# random inputs
# =============================================================================================================


class Rand:
    """Python and torch randomness of one case, both seeded from the case's key (reproducible, independent)."""

    def __init__(self, key: str):
        self.py = random.Random(f"{SEED}/{key}")
        self.g = torch.Generator().manual_seed(self.py.getrandbits(62))

    def randint(self, lo, hi):
        return self.py.randint(lo, hi)

    def choice(self, seq):
        return self.py.choice(seq)

    def uniform(self, lo, hi):
        return self.py.uniform(lo, hi)

    def random(self):
        return self.py.random()

    def randn(self, shape, dtype=F32, scale=1.0):
        return (torch.randn(tuple(shape), generator=self.g, dtype=F64) * scale).to(dtype)

    def rand(self, shape, dtype=F32, scale=1.0):
        return (torch.rand(tuple(shape), generator=self.g, dtype=F64) * scale).to(dtype)

    def perm(self, n, k=None):
        return torch.randperm(n, generator=self.g)[: n if k is None else k]

    def shape(self, rank=None, lo=1, hi=4):
        rank = self.randint(0, 3) if rank is None else rank
        return tuple(self.randint(lo, hi) for _ in range(rank))

    def dtype(self):
        return self.choice(FLOAT_DTYPES)


def to_dtype(t: Tensor, dt: torch.dtype) -> Tensor:
    if dt.is_complex or dt.is_floating_point:
        return t.to(dt)
    if dt == torch.bool:
        return t > 0
    return (t.double() * 3).round().to(dt)


def noncontig(t: Tensor, r: Rand) -> Tensor:
    """The same values in a non-contiguous layout: a transposed copy, or every other element of a wider buffer
    (the last dim of size > 1). Tensors with at most one dim of size > 1 use the wider buffer."""
    if not isinstance(t, Tensor) or t.dim() == 0 or t.numel() <= 1:
        return t
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1 and r.random() < 0.5:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    d = max(i for i in range(t.dim()) if t.shape[i] > 1)
    shape = list(t.shape)
    shape[d] *= 2
    big = torch.zeros(shape, dtype=t.dtype)
    idx = [slice(None)] * t.dim()
    idx[d] = slice(None, None, 2)
    big[tuple(idx)] = t
    out = big[tuple(idx)]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def expand0(t: Tensor) -> Tensor:
    """An overlapping view of t's shape: its first slice along the first dim of size > 1, expanded (stride 0)."""
    dims = [i for i in range(t.dim()) if t.shape[i] > 1]
    if not dims:
        return t
    d = dims[0]
    return t.narrow(d, 0, 1).expand(t.shape)


def poison(t: Tensor, r: Rand, value: float, count: int = 2) -> Tensor:
    """A copy of t with ``count`` random entries set to ``value`` (NaN, +inf or -inf; inf with a random sign)."""
    t = t.clone()
    if t.numel() == 0:
        return t
    flat = t.view(-1)
    for _ in range(count):
        v = value if not math.isinf(value) else r.choice([math.inf, -math.inf])
        flat[r.randint(0, t.numel() - 1)] = v
    return t


def huge_view(shape, dtype=F32, value=0.5) -> Tensor:
    """A tensor of a huge logical shape that owns one element (stride 0 everywhere)."""
    return torch.full((1,) * len(shape), value, dtype=dtype).expand(shape)


# =============================================================================================================
# the ops: generator of a valid call, the call, the oracle
# =============================================================================================================

ELEMENTWISE, REDUCTION = "elementwise", "reduction"


class Spec:
    """One public op: ``gen`` builds a valid call (a dict of argument name -> value), ``call`` runs the public op,
    ``expected`` runs the oracle on a fresh copy of the same call."""

    name: str
    mode = ELEMENTWISE  # how non-finite values compare (exact positions, or non-finite <-> non-finite)
    inplace = False
    written: tuple = ()  # in-place ops: the lists the op writes

    def tensors(self, c):
        """Every tensor argument, as (label, tensor)."""
        out = []
        for k, v in c.items():
            if isinstance(v, Tensor):
                out.append((k, v))
            elif isinstance(v, (list, tuple)):
                out += [(f"{k}[{i}]", t) for i, t in enumerate(v) if isinstance(t, Tensor)]
        return out


# ---- prox / prox_backward ------------------------------------------------------------------------------------


class Prox(Spec):
    name = "prox"

    def gen(self, r):
        dt = r.dtype()
        return dict(x=r.randn(r.shape(), dt), penalty=r.choice(RP.PROX_PENALTIES), lam=r.uniform(0, 0.6),
                    a=r.uniform(0.3, 2.0))

    def call(self, c, b):
        return P.prox(c["x"], c["penalty"], c["lam"], a=c["a"], backend=b)

    def expected(self, c):
        return RP.prox(c["x"], c["penalty"], c["lam"], c["a"])


class ProxBackward(Spec):
    name = "prox_backward"

    def gen(self, r):
        dt, s = r.dtype(), r.shape()
        return dict(grad=r.randn(s, dt), x=r.randn(s, dt), penalty=r.choice(RP.PROX_PENALTIES), lam=r.uniform(0, 0.6),
                    a=r.uniform(0.3, 2.0))

    def call(self, c, b):
        return P.prox_backward(c["grad"], c["x"], c["penalty"], c["lam"], a=c["a"], backend=b)

    def expected(self, c):
        return RP.prox_backward(c["grad"], c["x"], c["penalty"], c["lam"], c["a"])


# ---- the fused in-place list ops --------------------------------------------------------------------------------


class ListSpec(Spec):
    """An in-place op over lists of tensors. ``lists``: the list arguments in schema order; ``entry`` builds one
    tensor per list for a parameter of a given shape; ``scalars``: the keyword arguments."""

    inplace = True
    lists: tuple = ()
    scalars: tuple = ()

    def active(self, c, name):
        return True

    def add_entry(self, c, r, shape=None):
        """Appends one consistent entry (one tensor per active list) of ``shape`` (random when None)."""
        shape = r.shape() if shape is None else shape
        dt = c["_dtype"]
        for name, t in self.entry(r, shape, dt, c).items():
            if self.active(c, name):
                c[name].append(t)
        return len(c[self.lists[0]]) - 1

    def gen(self, r):
        c = {name: [] for name in self.lists}
        c["_dtype"] = r.dtype()
        self.gen_scalars(r, c)
        for _ in range(r.randint(1, 3)):
            self.add_entry(c, r)
        return c

    def call(self, c, b):
        getattr(P, self.name)(*(c[n] for n in self.lists), **{k: c[k] for k in self.scalars}, backend=b)
        return None

    def expected(self, c):
        getattr(RP, self.name)(*(c[n] for n in self.lists), **{k: c[k] for k in self.scalars})
        return None

    def result(self, c):
        """What an in-place op produced: every tensor of the lists it writes."""
        return [(f"{n}[{i}]", t) for n in self.written for i, t in enumerate(c[n])]


def _penalty_scalars(r, c, penalties):
    c["penalty"] = r.choice(penalties)
    c["lam"] = r.uniform(0, 0.5)
    c["a"] = r.uniform(0.3, 2.0)


class ProxSGD(ListSpec):
    name = "prox_sgd_"
    lists = ("params", "grads", "momentum_buffers")
    written = ("params", "momentum_buffers")
    scalars = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "init_momentum", "penalty",
               "lam", "a", "grad_scale", "found_inf")

    def active(self, c, name):
        return name != "momentum_buffers" or c["momentum"] != 0

    def gen_scalars(self, r, c):
        c["lr"] = r.uniform(0.01, 0.5)
        c["momentum"] = r.choice([0.0, 0.9])
        c["nesterov"] = c["momentum"] > 0 and r.random() < 0.4
        c["dampening"] = 0.0 if c["nesterov"] else r.choice([0.0, 0.1])
        c["weight_decay"] = r.choice([0.0, 1e-2])
        c["maximize"] = r.random() < 0.3
        c["init_momentum"] = r.random() < 0.3
        _penalty_scalars(r, c, RP.STEP_PENALTIES)
        c["grad_scale"] = torch.tensor(r.uniform(0.5, 4.0)) if r.random() < 0.3 else None
        c["found_inf"] = torch.tensor(0.0) if r.random() < 0.3 else None

    def entry(self, r, shape, dt, c):
        return dict(params=r.randn(shape, dt), grads=r.randn(shape, dt), momentum_buffers=r.randn(shape, dt))

    def use_momentum(self, c, r):
        if c["momentum"] == 0:
            c["momentum"] = 0.9
            c["momentum_buffers"] = [r.randn(p.shape, p.dtype) for p in c["params"]]


class ProxAdamW(ListSpec):
    name = "prox_adamw_"
    lists = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
    written = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
    scalars = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "penalty", "lam", "a",
               "grad_scale", "found_inf")

    def active(self, c, name):
        return name != "max_exp_avg_sqs" or c["amsgrad"]

    def gen_scalars(self, r, c):
        c["lr"] = r.uniform(1e-3, 0.1)
        c["beta1"], c["beta2"] = r.choice([0.9, 0.5, 0.0]), r.choice([0.999, 0.9])
        c["eps"] = r.choice([1e-8, 1e-3])
        c["weight_decay"] = r.choice([0.0, 1e-2])
        c["amsgrad"] = r.random() < 0.4
        c["maximize"] = r.random() < 0.3
        _penalty_scalars(r, c, RP.STEP_PENALTIES)
        c["lam"] *= 10
        c["grad_scale"] = torch.tensor(r.uniform(0.5, 4.0)) if r.random() < 0.3 else None
        c["found_inf"] = torch.tensor(0.0) if r.random() < 0.3 else None

    def entry(self, r, shape, dt, c):
        v = r.rand(shape, dt, 0.01)
        return dict(params=r.randn(shape, dt), grads=r.randn(shape, dt), exp_avgs=r.randn(shape, dt, 0.1),
                    exp_avg_sqs=v, max_exp_avg_sqs=(v.double() + r.rand(shape, F64, 0.01)).to(dt),
                    state_steps=torch.tensor(float(r.randint(0, 5))))


class PalmSlimming(ListSpec):
    name = "palm_slimming_"
    lists = ("gammas", "xis")
    written = ("gammas", "xis")
    scalars = ("alpha", "beta", "lam", "penalty", "a")

    def gen_scalars(self, r, c):
        c["alpha"], c["beta"] = r.uniform(1.0, 20.0), r.uniform(0.0, 2.0)
        _penalty_scalars(r, c, RP.PROX_PENALTIES)

    def entry(self, r, shape, dt, c):
        return dict(gammas=r.randn(shape, dt), xis=r.randn(shape, dt))


class PenaltyGrad(ListSpec):
    name = "penalty_grad_"
    lists = ("grads", "params")
    written = ("grads",)
    scalars = ("penalty", "s", "a", "eps")

    def gen_scalars(self, r, c):
        c["penalty"] = r.choice(RP.GRAD_PENALTIES)
        c["s"] = r.uniform(0, 0.5)
        c["a"] = r.uniform(0.1, 0.9) if c["penalty"] == "lp" else r.uniform(0.3, 2.0)
        c["eps"] = r.choice([1e-8, 1e-3])

    def entry(self, r, shape, dt, c):
        return dict(grads=r.randn(shape, dt), params=r.randn(shape, dt))


class SplitStep(ListSpec):
    name = "split_step_"
    lists = ("weights", "grads", "us")
    written = ("weights", "us")
    scalars = ("lr", "beta", "penalty", "lam", "a")

    def gen_scalars(self, r, c):
        c["lr"], c["beta"] = r.uniform(0.01, 0.5), r.uniform(0.1, 5.0)
        _penalty_scalars(r, c, RP.PROX_PENALTIES)

    def entry(self, r, shape, dt, c):
        return dict(weights=r.randn(shape, dt), grads=r.randn(shape, dt), us=r.randn(shape, dt))


# ---- channel_conv2d / masked_conv2d -------------------------------------------------------------------------------


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv64(x, w, b, stride, padding, dilation):
    """DESIGN.md's conv in float64 with explicit zero padding; empty channel sets / batches give the bias."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, h, wd = x.shape[0], x.shape[2], x.shape[3]
    oh, ow = RC.out_size(h, wd, w.shape[2:], (sh, sw), (ph, pw), (dh, dw))
    # strides past the padded grid (one output row/column) and dilations of a 1-wide kernel change nothing:
    # keep them small for F.conv2d (oneDNN takes int32 parameters)
    sh, sw = min(sh, h + 2 * ph + 1), min(sw, wd + 2 * pw + 1)
    dh, dw = (1 if w.shape[2] == 1 else dh), (1 if w.shape[3] == 1 else dw)
    if n == 0 or w.shape[0] == 0 or w.shape[1] == 0:
        y = torch.zeros(n, w.shape[0], oh, ow, dtype=F64)
    else:
        xp = F.pad(x.double(), (pw, pw, ph, ph))
        y = F.conv2d(xp, w.double(), None, (sh, sw), 0, (dh, dw))
    if b is not None:
        y = y + b.double()[None, :, None, None]
    return y


class ChannelConv(Spec):
    name = "channel_conv2d"
    mode = REDUCTION

    def gen(self, r, n=None, cin=None, cout=None):
        dt = r.dtype()
        n = r.randint(1, 3) if n is None else n
        cin = r.randint(1, 6) if cin is None else cin
        cout = r.randint(1, 5) if cout is None else cout
        kh, kw = r.choice([1, 2, 3]), r.choice([1, 3])
        stride = r.choice([1, 2, (1, 2), (2, 1)])
        padding = r.choice([0, 1, (0, 1), (2, 0)])
        dilation = r.choice([1, 1, 2, (2, 1)])
        (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
        h = max(1, dh * (kh - 1) + 1 - 2 * ph) + r.randint(0, 5)
        w = max(1, dw * (kw - 1) + 1 - 2 * pw) + r.randint(0, 5)
        in_idx = r.perm(cin, r.randint(0 if r.random() < 0.15 else min(1, cin), cin))
        out_idx = r.perm(cout, r.randint(0 if r.random() < 0.15 else min(1, cout), cout))
        gathered = r.random() < 0.3
        x = r.randn((n, in_idx.numel() if gathered else cin, h, w), dt)
        bias = r.randn((cout,), dt) if r.random() < 0.7 else None
        return dict(x=x, weight=r.randn((cout, cin, kh, kw), dt), bias=bias, in_idx=in_idx, out_idx=out_idx,
                    stride=stride, padding=padding, dilation=dilation, input_gathered=gathered, check_indices=True)

    def call(self, c, b):
        return P.channel_conv2d(c["x"], c["weight"], c["bias"], c["in_idx"], c["out_idx"], c["stride"], c["padding"],
                                c["dilation"], input_gathered=c["input_gathered"], check_indices=c["check_indices"],
                                backend=b)

    def _formula(self, c, absolute=False):
        f = torch.abs if absolute else (lambda t: t)
        ii, oi = c["in_idx"].long(), c["out_idx"].long()
        xs = c["x"] if c["input_gathered"] else c["x"][:, ii]  # gather first (x may be a huge view), in place
        ws = c["weight"].index_select(0, oi).index_select(1, ii)
        bs = None if c["bias"] is None else f(c["bias"].index_select(0, oi))
        return conv64(f(xs), f(ws), bs, c["stride"], c["padding"], c["dilation"])

    def expected(self, c):
        if c["x"].device.type == "meta":
            return RC.channel_conv2d(c["x"], c["weight"], c["bias"], c["in_idx"], c["out_idx"], c["stride"],
                                     c["padding"], c["dilation"], c["input_gathered"])
        return self._formula(c), self._formula(c, absolute=True), c["x"].dtype


class MaskedConv(Spec):
    name = "masked_conv2d"
    mode = REDUCTION

    def gen(self, r, n=None, cin=None, cout=None):
        c = ChannelConv().gen(r, n, cin, cout)
        x = c["x"] if not c["input_gathered"] else r.randn((c["x"].shape[0], c["weight"].shape[1], *c["x"].shape[2:]),
                                                          c["x"].dtype)
        mask = r.rand((x.shape[0], c["weight"].shape[0])) < r.choice([0.0, 0.5, 0.8, 1.0])
        return dict(x=x, weight=c["weight"], bias=c["bias"], out_mask=mask, stride=c["stride"], padding=c["padding"],
                    dilation=c["dilation"])

    def call(self, c, b):
        return P.masked_conv2d(c["x"], c["weight"], c["bias"], c["out_mask"], c["stride"], c["padding"], c["dilation"],
                               backend=b)

    def _formula(self, c, absolute=False):
        f = torch.abs if absolute else (lambda t: t)
        x, w, b, mask = c["x"], c["weight"], c["bias"], c["out_mask"]
        n, (h, wd) = x.shape[0], x.shape[2:]
        oh, ow = RC.out_size(h, wd, w.shape[2:], _pair(c["stride"]), _pair(c["padding"]), _pair(c["dilation"]))
        y = torch.zeros(n, w.shape[0], oh, ow, dtype=F64)
        rows = mask.any(1).nonzero().flatten()  # only the samples with a kept channel (x may be a huge view)
        if rows.numel():
            y[rows] = conv64(f(x[rows]), f(w), None if b is None else f(b), c["stride"], c["padding"], c["dilation"])
        return torch.where(mask[:, :, None, None], y, y.new_zeros(()))

    def expected(self, c):
        if c["x"].device.type == "meta":
            return RC.masked_conv2d(c["x"], c["weight"], c["bias"], c["out_mask"], c["stride"], c["padding"],
                                    c["dilation"])
        return self._formula(c), self._formula(c, absolute=True), c["x"].dtype


# ---- spectral ---------------------------------------------------------------------------------------------------


class Spectral(Spec):
    name = "spectral_filter"
    mode = REDUCTION

    def gen(self, r):
        dt = r.dtype()
        b, h, w, ch = r.randint(1, 2), r.randint(1, 9), r.randint(1, 9), r.randint(1, 5)
        wdt = dt if r.random() < 0.8 else F32
        return dict(x=r.randn((b, h, w, ch), dt), weight=r.randn((h, w // 2 + 1, ch, 2), wdt))

    def call(self, c, b):
        return P.spectral_filter(c["x"], c["weight"], backend=b)

    def expected(self, c):
        return RS.spectral_filter(c["x"], c["weight"])


class Adaptive(Spec):
    name = "adaptive_spectral_filter"
    mode = REDUCTION

    def gen(self, r):
        dt = r.dtype()
        blocks, cb, hb = r.randint(1, 3), r.randint(1, 3), r.randint(1, 4)
        b, h, w = r.randint(1, 2), r.randint(1, 7), r.randint(1, 7)
        wdt = dt if r.random() < 0.8 else F32
        return dict(x=r.randn((b, h, w, blocks * cb), dt), w1=r.randn((2, blocks, cb, hb), wdt, 0.5),
                    b1=r.randn((2, blocks, hb), wdt, 0.1), w2=r.randn((2, blocks, hb, cb), wdt, 0.5),
                    b2=r.randn((2, blocks, cb), wdt, 0.1), blocks=blocks, shrink=r.choice([0.0, 0.01, 0.05]))

    def call(self, c, b):
        return P.adaptive_spectral_filter(c["x"], c["w1"], c["b1"], c["w2"], c["b2"], blocks=c["blocks"],
                                          shrink=c["shrink"], backend=b)

    def expected(self, c):
        return RS.adaptive_spectral_filter(c["x"], c["w1"], c["b1"], c["w2"], c["b2"], c["blocks"], c["shrink"])


# ---- sema ---------------------------------------------------------------------------------------------------------


class Sema(Spec):
    name = "sema_attention"
    mode = REDUCTION

    def gen(self, r):
        dt = r.dtype()
        b, heads, d = r.randint(1, 2), r.randint(1, 2), r.randint(1, 6)
        gh, gw = r.randint(1, 5), r.randint(1, 5)
        wh, ww = r.randint(1, gh), r.randint(1, gw)
        shape = (b, heads, gh * gw, d)
        grid = gh if gh == gw and r.random() < 0.5 else (gh, gw)
        window = wh if wh == ww and r.random() < 0.5 else [wh, ww]
        return dict(q=r.randn(shape, dt), k=r.randn(shape, dt), v=r.randn(shape, dt), grid=grid, window=window,
                    neighborhood=r.random() < 0.4)

    def call(self, c, b):
        return P.sema_attention(c["q"], c["k"], c["v"], c["grid"], c["window"], neighborhood=c["neighborhood"],
                                backend=b)

    def expected(self, c):
        return RSE.sema_attention(c["q"], c["k"], c["v"], _pair(c["grid"]), _pair(c["window"]), c["neighborhood"])


# ---- token_attention ----------------------------------------------------------------------------------------------


class TokenAttention(Spec):
    name = "kept_token_attention"
    mode = REDUCTION

    def gen(self, r):
        dt = r.dtype()
        b, heads, d = r.randint(1, 2), r.randint(1, 2), r.randint(1, 6)
        lq, lk = r.randint(1, 9), r.randint(1, 9)
        nq, nk = r.randint(0, lq), r.randint(1, lk)
        per_sample = r.random() < 0.5
        idt = torch.int64 if r.random() < 0.7 else torch.int32

        def index(n, length):
            rows = [r.perm(length, n) for _ in range(b)] if per_sample else [r.perm(length, n)]
            t = torch.stack(rows) if per_sample else rows[0]
            return t.to(idt)

        return dict(q=r.randn((b, heads, lq, d), dt), k=r.randn((b, heads, lk, d), dt), v=r.randn((b, heads, lk, d), dt),
                    q_idx=index(nq, lq), kv_idx=index(nk, lk), scale=None if r.random() < 0.7 else r.uniform(0.1, 2.0))

    def call(self, c, b):
        return P.kept_token_attention(c["q"], c["k"], c["v"], c["q_idx"], c["kv_idx"], scale=c["scale"], backend=b)

    def expected(self, c):
        return RTA.kept_token_attention(c["q"], c["k"], c["v"], c["q_idx"], c["kv_idx"], c["scale"])


# ---- quant --------------------------------------------------------------------------------------------------------


class FdaSign(Spec):
    name = "fda_sign"

    def gen(self, r):
        x = r.randn(r.shape(), r.dtype(), 2.0)
        if x.numel() and r.random() < 0.3:  # sign(0) = sign(-0) = -1
            x.view(-1)[r.randint(0, x.numel() - 1)] = r.choice([0.0, -0.0])
        return dict(x=x, n_terms=r.choice([1, 10, 19, r.randint(1, 200)]), omega=r.uniform(0.01, 1.0),
                    surrogate=r.choice(RQ.SURROGATES), clip=r.choice([1.0, r.uniform(0.1, 3.0), math.inf]))

    def call(self, c, b):
        return P.fda_sign(c["x"], n_terms=c["n_terms"], omega=c["omega"], surrogate=c["surrogate"], clip=c["clip"],
                          backend=b)

    def expected(self, c):
        return RQ.fda_sign(c["x"], c["n_terms"], c["omega"], c["surrogate"], c["clip"])


def _fq_params(c, r, axis="keep"):
    """(Re)builds scale (and zero_point, when the call has one) for c's x, bits and signed, in their dtypes: one
    value, or one per slice of x along per_channel_axis. ``axis``: "keep" (the call's axis where it fits x's rank,
    else a random one), "random" (a random valid axis; None for a 0-d x) or an axis / None."""
    x = c["x"]
    if axis == "keep":
        axis = c.get("per_channel_axis")
        if axis is not None and not -x.dim() <= axis < x.dim():
            axis = "random"
    if axis == "random":
        axis = r.randint(-x.dim(), x.dim() - 1) if x.dim() else None
    c["per_channel_axis"] = axis
    qn, qp = RQ.levels(c["bits"], c["signed"])
    shape = r.choice([(), (1,)]) if axis is None else (x.shape[axis],)
    sdt = c["scale"].dtype if isinstance(c.get("scale"), Tensor) else x.dtype
    # steps that spread x (about 3 randn) over the grid and a bit past it (clamped)
    c["scale"] = ((r.rand(shape, F64, 1.8) + 0.2) * 6.0 / max(qp - qn, 1)).to(sdt)
    if isinstance(c.get("zero_point"), Tensor):
        c["zero_point"] = (r.rand(shape, F64, qp - qn + 4.0) + (qn - 2.0)).to(c["zero_point"].dtype)


class FakeQuantize(Spec):
    name = "fake_quantize"

    def gen(self, r):
        dt = r.dtype()
        c = dict(x=r.randn(r.shape(), dt, 3.0), bits=r.choice([1, 2, 3, 4, 8, 8, 16, r.randint(1, 16)]),
                 signed=r.random() < 0.7, grad_factor=r.choice([1.0, r.uniform(0.01, 2.0)]))
        c["scale"] = torch.ones((), dtype=r.choice([dt, dt, F32, F64]))
        # a zero point in x's dtype or float32: float64 with a float32 x is zero_point_float64_tie's case
        use_zp = not (c["signed"] and c["bits"] == 1) and r.random() < 0.5
        c["zero_point"] = torch.zeros((), dtype=r.choice([dt, F32])) if use_zp else None
        _fq_params(c, r, "random" if r.random() < 0.5 else None)
        return c

    def call(self, c, b):
        return P.fake_quantize(c["x"], c["scale"], c["zero_point"], bits=c["bits"],
                               per_channel_axis=c["per_channel_axis"], signed=c["signed"],
                               grad_factor=c["grad_factor"], backend=b)

    def expected(self, c):
        return RQ.fake_quantize(c["x"], c["scale"], c["zero_point"], c["bits"], c["per_channel_axis"], c["signed"],
                                c["grad_factor"])


# ---- distill ------------------------------------------------------------------------------------------------------


class FeatureAffinity(Spec):
    name = "feature_affinity_loss"
    mode = REDUCTION

    def gen(self, r, b=None, cs=None, ct=None, h=None, w=None):
        dt = r.dtype()
        b = r.randint(1, 3) if b is None else b
        cs = r.randint(1, 5) if cs is None else cs
        ct = r.randint(1, 5) if ct is None else ct
        h = r.randint(1, 9) if h is None else h
        w = r.randint(1, 9) if w is None else w
        fast = r.random() < 0.4
        # fast: a projection of the call (any float dtype: used in the compute dtype) or the seeded Gaussian one
        proj = r.randn((h * w, r.randint(1, 6)), r.choice([dt, F32, F64])) if fast and r.random() < 0.5 else None
        return dict(fs=r.randn((b, cs, h, w), dt), ft=r.randn((b, ct, h, w), dt, r.choice([0.1, 1.0])), proj=proj,
                    fast=fast, k=r.choice([1, 8, r.randint(1, 40)]), seed=r.randint(0, 2**31),
                    norm=r.choice(RD.NORMS), reduction=r.choice(PD.REDUCTIONS))

    def call(self, c, b):
        return P.feature_affinity_loss(c["fs"], c["ft"], fast=c["fast"], k=c["k"], seed=c["seed"], norm=c["norm"],
                                       reduction=c["reduction"], proj=c["proj"], backend=b)

    def expected(self, c):
        fs, proj = c["fs"], c["proj"]
        if c["fast"] and proj is None:  # the op's documented projection: N(0, 1) drawn in float64 from the seed
            proj = PD.gaussian_projection(fs.shape[2] * fs.shape[3], c["k"], c["seed"], fs.device,
                                          F64 if fs.dtype == F64 else F32)
        per = RD.affinity_loss(fs, c["ft"], proj, c["norm"])
        return {"none": per, "sum": per.sum(), "mean": per.mean()}[c["reduction"]]


SPECS = {s.name: s for s in (Prox(), ProxBackward(), ProxSGD(), ProxAdamW(), PalmSlimming(), PenaltyGrad(),
                             SplitStep(), ChannelConv(), MaskedConv(), Spectral(), Adaptive(), Sema(), FdaSign(),
                             FakeQuantize(), TokenAttention(), FeatureAffinity())}
assert set(SPECS) == set(P.__all__), "every public op has a fuzz spec"


# =============================================================================================================
# mutators
# =============================================================================================================


class Mut:
    """One way of breaking or stressing a valid call. ``fn(c, r)`` edits the call in place; ``expect`` is
    "error", "ok" or "any"; ``arg``: the argument (or alternatives) an error must name; ``huge``: run under the
    memory cap; ``oom_ok``: the op's own result exceeds the cap, so a clean allocator error is acceptable;
    ``dealias``: the oracle reads copies of the inputs (an input aliases an in-place output)."""

    def __init__(self, name, fn, expect, arg=None, huge=False, oom_ok=False, dealias=False, reps=None):
        self.name, self.fn, self.expect, self.huge, self.oom_ok, self.dealias = name, fn, expect, huge, oom_ok, dealias
        self.arg = (arg,) if isinstance(arg, str) else arg
        self.reps = reps if reps is not None else (VALID_REPS if name == "valid" else 1 if huge else MUT_REPS)


def _set(**kw):
    def f(c, r):
        c.update(kw)

    return f


def _tf(arg, how):
    """Replaces tensor argument ``arg`` by ``how(tensor, r)``."""

    def f(c, r):
        c[arg] = how(c[arg], r)

    return f


def _dt(dt):
    return lambda t, r: to_dtype(t, dt)


def _meta(t, r):
    return t.to("meta")


def _nan(t, r):
    return poison(t, r, math.nan)


def _inf(t, r):
    return poison(t, r, math.inf)


def _nc(t, r):
    return noncontig(t, r)


def _exp(t, r):
    return expand0(t)


def _all(how):
    """Applies ``how`` to every tensor argument."""

    def f(c, r):
        for k, v in list(c.items()):
            if isinstance(v, Tensor):
                c[k] = how(v, r)

    return f


def _chain(*fns):
    def f(c, r):
        for fn in fns:
            fn(c, r)

    return f


def scalar_muts(name, bad, expect="error", extra=()):
    """Mutators setting the float argument ``name`` to each value of ``bad`` (label, value)."""
    return [Mut(f"{name}_{label}", _set(**{name: v}), expect, name) for label, v in bad] + list(extra)


NEG_NAN_INF = [("negative", -0.5), ("nan", math.nan), ("inf", math.inf)]


def penalty_muts(op_penalties, lam="lam"):
    muts = scalar_muts(lam, NEG_NAN_INF + [("none", None), ("str", "0.1")])
    muts += [
        Mut("penalty_unknown", _set(penalty="l3"), "error", "penalty"),
        Mut("penalty_case", _set(penalty="L1"), "error", "penalty"),
        Mut("penalty_None", _set(penalty=None), "error", "penalty"),
        Mut("penalty_int", _set(penalty=1), "error", "penalty"),
        Mut("tl1_a_zero", _set(penalty="tl1", a=0.0), "error", "a"),
        Mut("tl1_a_nan", _set(penalty="tl1", a=math.nan), "error", "a"),
        Mut("tl1_a_inf", _set(penalty="tl1", a=math.inf), "error", "a"),
    ]
    if "l0_l21" in op_penalties:
        muts += [Mut("l0_l21_a_negative", _set(penalty="l0_l21", a=-1.0), "error", "a"),
                 Mut("l0_l21_a_nan", _set(penalty="l0_l21", a=math.nan), "error", "a")]
    if "none" not in op_penalties:
        muts.append(Mut("penalty_none", _set(penalty="none"), "error", "penalty"))
    if "lp" in op_penalties:
        muts += [Mut("lp_a_one", _set(penalty="lp", a=1.0), "error", "a"),
                 Mut("lp_a_nan", _set(penalty="lp", a=math.nan), "error", "a")]
    return muts


# ---- prox / prox_backward ------------------------------------------------------------------------------------------


def _x_shape(shape):
    def f(c, r):
        c["x"] = r.randn(shape, c["x"].dtype)

    return f


def _rank5(c, r):
    c["x"] = r.randn(r.shape(5, 1, 3), c["x"].dtype)


def _empty_x(c, r):
    s = list(r.shape(r.randint(1, 3)))
    s[r.randint(0, len(s) - 1)] = 0
    c["x"] = r.randn(s, c["x"].dtype)


def _wide(c, r):
    """A shape with a dim > 1, so that non-contiguous / overlapping views exist."""
    c["x"] = r.randn((r.randint(2, 4), r.randint(2, 5)), c["x"].dtype)


PROX_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
    Mut("x_bool", _tf("x", _dt(torch.bool)), "error", "x"),
    Mut("x_complex64", _tf("x", _dt(torch.complex64)), "error", "x"),
    Mut("x_list", _tf("x", lambda t, r: t.tolist()), "error", "x"),
    Mut("x_sparse", _chain(_wide, _tf("x", lambda t, r: t.to_sparse())), "error", "x"),
    Mut("x_meta", _tf("x", _meta), "any"),
    Mut("x_rank0", _x_shape(()), "ok"),
    Mut("x_rank5", _rank5, "ok"),
    Mut("x_empty", _empty_x, "ok"),
    Mut("x_nan", _tf("x", _nan), "any"),
    Mut("x_inf", _tf("x", _inf), "any"),
    Mut("x_noncontig", _chain(_wide, _tf("x", _nc)), "ok"),
    Mut("x_expanded", _chain(_wide, _tf("x", _exp)), "ok"),
    Mut("x_huge", _tf("x", lambda t, r: huge_view((HUGE,), t.dtype)), "any", "x", huge=True, oom_ok=True),
    Mut("x_huge_2d", _tf("x", lambda t, r: huge_view((2**16, 2**15 + 1), t.dtype)), "any", "x", huge=True,
        oom_ok=True),
] + penalty_muts(RP.PROX_PENALTIES)


def _pb_both(how):
    def f(c, r):
        c["x"], c["grad"] = how(c["x"], r), how(c["grad"], r)

    return f


def _pb_wide(c, r):
    s = (r.randint(2, 4), r.randint(2, 5))
    c["x"], c["grad"] = r.randn(s, c["x"].dtype), r.randn(s, c["grad"].dtype)


def _pb_empty(c, r):
    s = list(r.shape(r.randint(1, 3)))
    s[r.randint(0, len(s) - 1)] = 0
    c["x"], c["grad"] = r.randn(s, c["x"].dtype), r.randn(s, c["grad"].dtype)


PROX_BACKWARD_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("grad_f64", _tf("grad", _dt(F64)), "any", "grad"),  # documented: grad is converted to x's dtype
    Mut("grad_f16", _tf("grad", _dt(F16)), "any", "grad"),
    Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
    Mut("grad_int64", _tf("grad", _dt(torch.int64)), "error", "grad"),
    Mut("grad_bool", _tf("grad", _dt(torch.bool)), "error", "grad"),
    Mut("grad_complex64", _tf("grad", _dt(torch.complex64)), "error", "grad"),
    Mut("grad_meta", _tf("grad", _meta), "error", "grad"),
    Mut("x_meta", _tf("x", _meta), "error", ("x", "grad")),
    Mut("all_meta", _pb_both(_meta), "any"),
    Mut("grad_shape", _tf("grad", lambda t, r: r.randn(tuple(t.shape) + (2,), t.dtype)), "error", "grad"),
    Mut("grad_broadcastable", _chain(_pb_wide, _tf("grad", lambda t, r: r.randn((1,), t.dtype))), "error", "grad"),
    Mut("grad_scalar_float", _tf("grad", lambda t, r: 1.0), "error", "grad"),
    Mut("empty", _pb_empty, "ok"),
    Mut("rank0", _pb_both(lambda t, r: r.randn((), t.dtype)), "ok"),
    Mut("x_nan", _tf("x", _nan), "any"),
    Mut("grad_nan", _tf("grad", _nan), "any"),
    Mut("grad_inf", _tf("grad", _inf), "any"),
    Mut("x_inf", _tf("x", _inf), "any"),
    Mut("grad_noncontig", _chain(_pb_wide, _tf("grad", _nc)), "ok"),
    Mut("x_noncontig", _chain(_pb_wide, _tf("x", _nc)), "ok"),
    Mut("grad_expanded", _chain(_pb_wide, _tf("grad", _exp)), "ok"),
    Mut("x_expanded", _chain(_pb_wide, _tf("x", _exp)), "ok"),
    Mut("huge", _pb_both(lambda t, r: huge_view((HUGE,), t.dtype)), "any", "x", huge=True, oom_ok=True),
    Mut("huge_grad_small_x", _tf("grad", lambda t, r: huge_view((HUGE,), t.dtype)), "error", "grad", huge=True),
] + penalty_muts(RP.PROX_PENALTIES)


# ---- list ops --------------------------------------------------------------------------------------------------------


def _ensure_two(spec, c, r, shape=None):
    while len(c[spec.lists[0]]) < 2:
        spec.add_entry(c, r, shape)


def _wide_entry(spec, c, r):
    """Appends an entry with a dim > 1 (non-contiguous and overlapping views exist) and returns its index."""
    return spec.add_entry(c, r, (r.randint(2, 4), r.randint(2, 4)))


def _activate(spec, c, r, name):
    """Makes the optional list ``name`` part of the call (momentum > 0, amsgrad)."""
    if name == "momentum_buffers":
        spec.use_momentum(c, r)
    if name == "max_exp_avg_sqs" and not c["amsgrad"]:
        c["amsgrad"] = True
        c["max_exp_avg_sqs"] = [r.rand(p.shape, p.dtype, 0.02) for p in c["params"]]


def l_tf(spec, name, how, wide=False, idx=None):
    """Replaces one tensor of list ``name`` (a random one, or a new wide entry) by ``how(t, r)``."""

    def f(c, r):
        _activate(spec, c, r, name)
        i = _wide_entry(spec, c, r) if wide else (r.randint(0, len(c[name]) - 1) if idx is None else idx)
        c[name][i] = how(c[name][i], r)

    return f


def _l_empty_lists(spec):
    def f(c, r):
        for name in spec.lists:
            c[name] = []

    return f


def _l_empty_entry(spec):
    def f(c, r):
        s = list(r.shape(r.randint(1, 2)))
        s[0] = 0
        spec.add_entry(c, r, tuple(s))

    return f


def _l_len(spec, name):
    def f(c, r):
        _activate(spec, c, r, name)
        _ensure_two(spec, c, r)
        c[name] = c[name][:-1]

    return f


def _l_mixed_dtype(spec):
    """The second entry of every list in float64 while the first stays (the first list names the mismatch)."""

    def f(c, r):
        if c["_dtype"] == F64:
            for name in spec.lists:
                if name != "state_steps":
                    c[name] = [t.float() for t in c[name]]
            c["_dtype"] = F32
        _ensure_two(spec, c, r)
        for name in spec.lists:
            if name != "state_steps" and len(c[name]) > 1:
                c[name][1] = c[name][1].double()

    return f


def _l_param_meta(spec):
    def f(c, r):
        _ensure_two(spec, c, r)
        for name in spec.lists:
            if len(c[name]) > 1:
                c[name][1] = c[name][1].to("meta")

    return f


def _l_alias(spec, dst, src, partial=False):
    """``c[dst][i]`` becomes ``c[src][i]`` itself (``partial``: an overlapping view shifted by one element).
    ``dst == src``: the list holds the same tensor twice."""

    def f(c, r):
        _activate(spec, c, r, dst)
        _activate(spec, c, r, src)
        if dst == src:
            shape = (r.randint(2, 4),)
            i = spec.add_entry(c, r, shape)
            j = spec.add_entry(c, r, shape)
            c[dst][j] = c[dst][i]  # the same tensor twice in one list
            return
        if partial:
            n = r.randint(3, 6)
            i = spec.add_entry(c, r, (n,))
            buf = r.randn((n + 1,), c["_dtype"])
            c[src][i] = buf[:n]
            c[dst][i] = buf[1:]
            return
        i = r.randint(0, len(c[src]) - 1)
        c[dst][i] = c[src][i]

    return f


def list_muts(spec: ListSpec, extra_scalars, penalties, lam="lam"):
    first, second = spec.lists[0], spec.lists[1]
    inplace_state = [n for n in spec.written if n != first and n != "state_steps"]
    muts = [
        Mut("valid", _set(), "ok"),
        Mut(f"{first}_int64", l_tf(spec, first, _dt(torch.int64)), "error", first),
        Mut(f"{first}_bool", l_tf(spec, first, _dt(torch.bool)), "error", first),
        Mut(f"{first}_complex64", l_tf(spec, first, _dt(torch.complex64)), "error", first),
        Mut("mixed_float64", _l_mixed_dtype(spec), "error", first),
        Mut(f"{second}_float64", l_tf(spec, second, lambda t, r: t.double() if t.dtype != F64 else t.float()),
            "error", second),
        Mut(f"{second}_int32", l_tf(spec, second, _dt(torch.int32)), "error", second),
        Mut(f"{second}_bool", l_tf(spec, second, _dt(torch.bool)), "error", second),
        Mut(f"{second}_meta", l_tf(spec, second, _meta), "error", second),
        Mut(f"{first}_meta_second", _l_param_meta(spec), "error", first),
        Mut(f"{second}_shape", l_tf(spec, second, lambda t, r: r.randn(tuple(t.shape) + (2,), t.dtype)), "error",
            second),
        Mut(f"{second}_transposed_shape", l_tf(spec, second, lambda t, r: t.t().contiguous(), wide=True),
            "any", second),  # square shapes stay valid
        Mut(f"{second}_length", _l_len(spec, second), "error", second),
        Mut(f"{second}_not_tensor", l_tf(spec, second, lambda t, r: t.tolist()), "error", second),
        Mut(f"{second}_sparse", l_tf(spec, second, lambda t, r: t.to_sparse(), wide=True), "error", second),
        Mut("empty_lists", _l_empty_lists(spec), "ok"),
        Mut("empty_tensor", _l_empty_entry(spec), "ok"),
        Mut("rank0_tensor", lambda c, r: spec.add_entry(c, r, ()), "ok"),
        Mut(f"{second}_nan", l_tf(spec, second, _nan), "any"),
        Mut(f"{second}_inf", l_tf(spec, second, _inf), "any"),
        Mut(f"{first}_nan", l_tf(spec, first, _nan), "any"),
        Mut(f"{first}_noncontig", l_tf(spec, first, _nc, wide=True), "error", first),
        Mut(f"{first}_expanded", l_tf(spec, first, _exp, wide=True), "error", first),
        Mut(f"{first}_huge_expanded", l_tf(spec, first, lambda t, r: huge_view((HUGE,), t.dtype)), "error", first,
            huge=True),
        Mut(f"{second}_huge_expanded", l_tf(spec, second, lambda t, r: huge_view((HUGE,), t.dtype)), "error", second,
            huge=True),
        Mut(f"alias_{first}_twice", _l_alias(spec, first, first), "error", first),
    ]
    if second not in spec.written:  # a read-only input
        muts += [
            Mut(f"{second}_noncontig", l_tf(spec, second, _nc, wide=True), "ok"),
            Mut(f"{second}_expanded", l_tf(spec, second, _exp, wide=True), "ok"),
            Mut(f"alias_{second}_is_{first}", _l_alias(spec, second, first), "any", (first, second), dealias=True),
            Mut(f"alias_{second}_overlaps_{first}", _l_alias(spec, second, first, partial=True), "error",
                (first, second)),
        ]
    for name in inplace_state:
        muts += [m for m in [
            Mut(f"{name}_float64", l_tf(spec, name, lambda t, r: t.double() if t.dtype != F64 else t.float()), "error",
                name),
            Mut(f"{name}_meta", l_tf(spec, name, _meta), "error", name),
            Mut(f"{name}_noncontig", l_tf(spec, name, _nc, wide=True), "error", name),
            Mut(f"{name}_expanded", l_tf(spec, name, _exp, wide=True), "error", name),
            Mut(f"{name}_length", _l_len(spec, name), "error", name),
            Mut(f"alias_{name}_is_{first}", _l_alias(spec, name, first), "error", (first, name)),
        ] if m.name not in {u.name for u in muts}]
    muts += penalty_muts(penalties, lam)
    return muts + extra_scalars


def _amp_muts(spec):
    muts = []
    for name in ("grad_scale", "found_inf"):
        muts += [
            Mut(f"{name}_two_elements", _set(**{name: torch.ones(2)}), "error", name),
            Mut(f"{name}_empty", _set(**{name: torch.ones(0)}), "error", name),
            Mut(f"{name}_int64", _set(**{name: torch.ones((), dtype=torch.int64)}), "error", name),
            Mut(f"{name}_meta", _set(**{name: torch.ones((), device="meta")}), "error", name),
            Mut(f"{name}_expanded_huge", _set(**{name: huge_view((HUGE,))}), "error", name, huge=True),
        ]
    muts += [
        Mut("grad_scale_zero", _set(grad_scale=torch.tensor(0.0)), "any"),
        Mut("grad_scale_nan", _set(grad_scale=torch.tensor(math.nan)), "any"),
        Mut("grad_scale_float64", _set(grad_scale=torch.tensor(2.0, dtype=F64)), "ok"),
        Mut("grad_scale_shape_1", _set(grad_scale=torch.tensor([2.0])), "ok"),
        Mut("found_inf_one", _set(found_inf=torch.tensor(1.0)), "ok"),
        Mut("found_inf_nan", _set(found_inf=torch.tensor(math.nan)), "any"),
    ]
    return muts


_sgd = SPECS["prox_sgd_"]
SGD_MUTS = list_muts(_sgd, [
    *scalar_muts("lr", [("negative", -0.1), ("nan", math.nan)]),
    Mut("lr_inf", _set(lr=math.inf), "any", "lr"),
    Mut("lr_zero", _set(lr=0.0), "ok"),
    *scalar_muts("momentum", [("negative", -0.5), ("nan", math.nan)]),
    Mut("weight_decay_nan", _set(weight_decay=math.nan), "any", "weight_decay"),
    Mut("weight_decay_negative", _set(weight_decay=-0.1), "any", "weight_decay"),
    Mut("dampening_nan", lambda c, r: (_sgd.use_momentum(c, r), c.update(nesterov=False, dampening=math.nan)), "any",
        "dampening"),
    Mut("nesterov_without_momentum", _set(nesterov=True, momentum=0.0, momentum_buffers=[]), "error", "nesterov"),
    Mut("nesterov_with_dampening", lambda c, r: (_sgd.use_momentum(c, r), c.update(nesterov=True, dampening=0.1)),
        "error", "nesterov"),
    Mut("momentum_zero_with_buffers", lambda c, r: c.update(
        momentum=0.0, momentum_buffers=[r.randn(p.shape, p.dtype) for p in c["params"]]), "any"),
    Mut("alias_momentum_buffers_is_grads", _l_alias(_sgd, "momentum_buffers", "grads"), "any",
        ("momentum_buffers", "grads"), dealias=True),
    *_amp_muts(_sgd),
], RP.STEP_PENALTIES)


_adamw = SPECS["prox_adamw_"]


def _steps(how):
    def f(c, r):
        c["state_steps"] = [how(t, r) for t in c["state_steps"]]

    return f


ADAMW_MUTS = list_muts(_adamw, [
    *scalar_muts("lr", [("negative", -0.1), ("nan", math.nan)]),
    Mut("lr_inf", _set(lr=math.inf), "any", "lr"),
    *scalar_muts("beta1", [("one", 1.0), ("negative", -0.1), ("nan", math.nan)]),
    *scalar_muts("beta2", [("one", 1.0), ("nan", math.nan), ("inf", math.inf)]),
    *scalar_muts("eps", [("negative", -1e-8), ("nan", math.nan)]),
    Mut("eps_zero", _set(eps=0.0), "any"),
    Mut("weight_decay_nan", _set(weight_decay=math.nan), "any", "weight_decay"),
    Mut("state_steps_int64", _steps(lambda t, r: t.long()), "any", "state_steps"),
    Mut("state_steps_float64", _steps(lambda t, r: t.double()), "any", "state_steps"),
    Mut("state_steps_bool", _steps(lambda t, r: t > 0), "error", "state_steps"),
    Mut("state_steps_two_elements", _steps(lambda t, r: t.expand(2).clone()), "error", "state_steps"),
    Mut("state_steps_meta", _steps(lambda t, r: t.to("meta")), "error", "state_steps"),
    Mut("state_steps_length", _l_len(_adamw, "state_steps"), "error", "state_steps"),
    Mut("state_steps_nan", _steps(lambda t, r: torch.tensor(math.nan)), "any"),
    Mut("state_steps_huge_expanded", _steps(lambda t, r: huge_view((HUGE,))), "error", "state_steps", huge=True),
    Mut("alias_state_steps_twice", lambda c, r: (_ensure_two(_adamw, c, r),
                                                 c.update(state_steps=[c["state_steps"][0]] * len(c["params"]))),
        "error", "state_steps"),
    Mut("exp_avg_sqs_negative_values", l_tf(_adamw, "exp_avg_sqs", lambda t, r: -t - 1), "any"),
    # torch.optim.AdamW's exp_avg.lerp_(grad, 1 - beta1) takes its second form for weights >= 0.5: inf - inf = NaN
    Mut("inf_grad_beta1_half", _chain(_set(beta1=0.5), l_tf(_adamw, "grads", _inf)), "any"),
    # torch.maximum propagates NaN into max_exp_avg_sqs
    Mut("amsgrad_nan_grad", _chain(_set(beta1=0.9), l_tf(_adamw, "max_exp_avg_sqs", lambda t, r: t),
                                   l_tf(_adamw, "grads", _nan)), "any"),
    Mut("amsgrad_without_max", lambda c, r: c.update(amsgrad=True, max_exp_avg_sqs=[]), "error", "max_exp_avg_sqs"),
    Mut("alias_exp_avg_sqs_is_exp_avgs", _l_alias(_adamw, "exp_avg_sqs", "exp_avgs"), "error",
        ("exp_avgs", "exp_avg_sqs")),
    *_amp_muts(_adamw),
], RP.STEP_PENALTIES)


# With beta1 >= 0.5 (lerp's first form) and without amsgrad, non-finite values give the same NaN/inf in the kernels and
# in torch's formulas; the two cases above pin down where they part.
_FINITE_SAFE = {"grads_nan", "grads_inf", "params_nan", "grad_scale_zero", "grad_scale_nan",
                "exp_avg_sqs_negative_values"}
for _m in ADAMW_MUTS:
    if _m.name in _FINITE_SAFE:
        _m.fn = _chain(_m.fn, _set(beta1=0.9, amsgrad=False, max_exp_avg_sqs=[]))


_palm = SPECS["palm_slimming_"]
PALM_MUTS = list_muts(_palm, [
    *scalar_muts("alpha", [("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf)]),
    *scalar_muts("beta", [("negative", -1.0), ("nan", math.nan), ("inf", math.inf)]),
    Mut("beta_zero", _set(beta=0.0), "ok"),
], RP.PROX_PENALTIES)


_pg = SPECS["penalty_grad_"]
PENALTY_GRAD_MUTS = list_muts(_pg, [
    *scalar_muts("eps", [("zero", 0.0), ("negative", -1.0), ("nan", math.nan)]),
    Mut("eps_inf", _set(eps=math.inf), "any", "eps"),
    Mut("params_zero", l_tf(_pg, "params", lambda t, r: torch.zeros_like(t)), "ok"),
    Mut("lp_params_zero", _chain(_set(penalty="lp", a=0.5), l_tf(_pg, "params", lambda t, r: torch.zeros_like(t))),
        "ok"),
], RP.GRAD_PENALTIES, lam="s")


_split = SPECS["split_step_"]
SPLIT_MUTS = list_muts(_split, [
    *scalar_muts("lr", [("negative", -0.1), ("nan", math.nan)]),
    Mut("lr_inf", _set(lr=math.inf), "any", "lr"),
    *scalar_muts("beta", [("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf)]),
], RP.PROX_PENALTIES)


# ---- channel_conv2d / masked_conv2d --------------------------------------------------------------------------------


def _regen(spec, **kw):
    """Regenerates the call with some sizes fixed (e.g. an empty batch)."""

    def f(c, r):
        c.clear()
        c.update(spec.gen(r, **kw))

    return f


def _idx(name, how):
    def f(c, r):
        c[name] = how(c[name], c, r)

    return f


def _oob(name, negative=False):
    def how(t, c, r):
        limit = c["weight"].shape[1 if name == "in_idx" else 0]
        bad = -1 - r.randint(0, 2) if negative else limit + r.randint(0, 3)
        t = t.clone() if t.numel() else torch.zeros(1, dtype=torch.int64)
        t[r.randint(0, t.numel() - 1)] = bad
        return t

    return how


def _dup(name):
    def f(c, r):
        t = c[name]
        if t.numel() == 0:
            t = torch.zeros(1, dtype=torch.int64)
        c[name] = torch.cat([t, t[:1]])
        if name == "in_idx" and c.get("input_gathered"):
            c["x"] = r.randn((c["x"].shape[0], c[name].numel(), *c["x"].shape[2:]), c["x"].dtype)

    return f


def _conv_gen_wide(spec):
    def f(c, r):
        c.clear()
        c.update(spec.gen(r, n=2, cin=3, cout=3))
        if "input_gathered" in c and c["input_gathered"] and c["x"].shape[1] < 2:
            c["input_gathered"] = False
            c["x"] = r.randn((2, 3, *c["x"].shape[2:]), c["x"].dtype)

    return f


def _zero_spatial(spec):
    """An input grid of height 0: with padding, every output pixel reads only padding (the output is the bias)."""

    def f(c, r):
        _regen(spec)(c, r)
        c["weight"] = r.randn((c["weight"].shape[0], c["weight"].shape[1], 1, 1), c["weight"].dtype)
        c.update(stride=1, padding=1, dilation=1)
        c["x"] = r.randn((c["x"].shape[0], c["x"].shape[1], 0, c["x"].shape[3]), c["x"].dtype)

    return f


def _huge_x(spec, masked):
    """x of 2**31+ logical elements (a stride-0 batch of one random sample), a small result."""

    def f(c, r):
        n, cin, h, w = 2**17 + 3, 1024, 4, 4  # 2**31 + 3 * 2**14 elements
        base = r.randn((1, cin, h, w), c["x"].dtype)
        c["x"] = base.expand(n, cin, h, w)
        c["weight"] = r.randn((2, cin, 4, 4), c["x"].dtype)
        c["bias"] = r.randn((2,), c["x"].dtype)
        c.update(stride=1, padding=0, dilation=1)
        if masked:
            c["out_mask"] = torch.zeros(n, 2, dtype=torch.bool)
            c["out_mask"][-1, 1] = True
        else:
            c["in_idx"], c["out_idx"] = torch.tensor([cin - 1, 5]), torch.tensor([1])
            c["input_gathered"] = False

    return f


def _huge_padding(c, r):
    c["padding"] = 2**16  # a (2**17)**2-pixel output: past int32 and past the memory cap
    c["x"] = c["x"][:1]
    if "out_mask" in c:
        c["out_mask"] = c["out_mask"][:1]


def conv_common_muts(spec, masked):
    muts = [
        Mut("valid", _set(), "ok"),
        Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
        Mut("x_bool", _tf("x", _dt(torch.bool)), "error", "x"),
        Mut("x_complex64", _tf("x", _dt(torch.complex64)), "error", "x"),
        Mut("weight_float64", _tf("weight", lambda t, r: t.double() if t.dtype != F64 else t.float()), "error",
            "weight"),
        Mut("weight_int64", _tf("weight", _dt(torch.int64)), "error", "weight"),
        Mut("bias_float16", lambda c, r: c.update(bias=r.randn((c["weight"].shape[0],),
                                                               F16 if c["x"].dtype != F16 else F32)), "error", "bias"),
        Mut("x_meta", _tf("x", _meta), "error", ("x", "weight")),
        Mut("weight_meta", _tf("weight", _meta), "error", "weight"),
        Mut("bias_meta", lambda c, r: c.update(bias=r.randn((c["weight"].shape[0],), c["x"].dtype).to("meta")),
            "error", "bias"),
        Mut("all_meta", _all(_meta), "any"),
        Mut("x_3d", _tf("x", lambda t, r: t[0]), "error", "x"),
        Mut("x_5d", _tf("x", lambda t, r: t[None]), "error", "x"),
        Mut("weight_3d", _tf("weight", lambda t, r: t.flatten(2)), "error", "weight"),
        Mut("weight_list", _tf("weight", lambda t, r: t.tolist()), "error", "weight"),
        Mut("bias_shape", lambda c, r: c.update(bias=r.randn((c["weight"].shape[0] + 1,), c["x"].dtype)), "error",
            "bias"),
        Mut("bias_2d", lambda c, r: c.update(bias=r.randn((c["weight"].shape[0], 1), c["x"].dtype)), "error", "bias"),
        Mut("empty_batch", _regen(spec, n=0), "ok"),
        Mut("zero_input_channels", _regen(spec, cin=0), "ok"),
        Mut("zero_output_channels", _regen(spec, cout=0), "ok"),
        Mut("zero_height_with_padding", _zero_spatial(spec), "any"),
        Mut("x_nan", _tf("x", _nan), "any"),
        Mut("x_inf", _tf("x", _inf), "any"),
        Mut("weight_nan", _tf("weight", _nan), "any"),
        Mut("bias_inf", lambda c, r: c.update(bias=poison(r.randn((c["weight"].shape[0],), c["x"].dtype), r, math.inf,
                                                          1)), "any"),
        Mut("x_noncontig", _chain(_conv_gen_wide(spec), _tf("x", _nc)), "ok"),
        Mut("x_channels_last", _tf("x", lambda t, r: t.contiguous(memory_format=torch.channels_last)), "ok"),
        Mut("x_expanded", _chain(_conv_gen_wide(spec), _tf("x", _exp)), "ok"),
        Mut("weight_noncontig", _chain(_conv_gen_wide(spec), _tf("weight", _nc)), "ok"),
        Mut("weight_expanded", _chain(_conv_gen_wide(spec), _tf("weight", _exp)), "ok"),
        Mut("bias_noncontig", _chain(_conv_gen_wide(spec), lambda c, r: c.update(
            bias=noncontig(r.randn((c["weight"].shape[0],), c["x"].dtype), r))), "ok"),
        Mut("stride_zero", _set(stride=0), "error", "stride"),
        Mut("stride_negative", _set(stride=(1, -1)), "error", "stride"),
        Mut("stride_triple", _set(stride=(1, 1, 1)), "error", "stride"),
        Mut("stride_float", _set(stride=1.0), "error", "stride"),
        Mut("stride_bool", _set(stride=True), "error", "stride"),
        Mut("stride_none", _set(stride=None), "error", "stride"),
        Mut("stride_huge", _set(stride=2**40), "ok"),
        Mut("padding_negative", _set(padding=(0, -1)), "error", "padding"),
        Mut("padding_str", _set(padding="same"), "error", "padding"),
        Mut("dilation_zero", _set(dilation=0), "error", "dilation"),
        Mut("dilation_huge", _set(dilation=2**40), "any", "dilation"),
        Mut("kernel_larger_than_grid", lambda c, r: c.update(
            weight=r.randn((*c["weight"].shape[:2], c["x"].shape[2] + 2 * _pair(c["padding"])[0] + 1, 1),
                           c["x"].dtype)), "error"),
        Mut("x_huge_small_result", _huge_x(spec, masked), "ok", huge=True),
        Mut("padding_huge", _huge_padding, "any", "padding", huge=True, oom_ok=True),
    ]
    return muts


_cc = SPECS["channel_conv2d"]


def _unchecked_oob(c, r):
    c["check_indices"] = False
    c["in_idx"] = _oob("in_idx")(c["in_idx"], c, r)
    c["input_gathered"] = False
    c["x"] = r.randn((c["x"].shape[0], c["weight"].shape[1], *c["x"].shape[2:]), c["x"].dtype)


def _gathered_mismatch(c, r):
    c["input_gathered"] = True
    c["x"] = r.randn((c["x"].shape[0], c["in_idx"].numel() + 1, *c["x"].shape[2:]), c["x"].dtype)


def _x_channel_mismatch(c, r):
    c["input_gathered"] = False
    c["x"] = r.randn((c["x"].shape[0], c["weight"].shape[1] + 1, *c["x"].shape[2:]), c["x"].dtype)


def _nan_in_dropped_channel(c, r):
    """A NaN in a channel in_idx drops: the result stays finite (the kernel never reads it)."""
    cin = c["weight"].shape[1]
    if cin < 2:
        c.clear()
        c.update(_cc.gen(r, cin=3))
        cin = 3
    c["input_gathered"] = False
    c["in_idx"] = r.perm(cin, cin - 1)
    dropped = sorted(set(range(cin)) - set(c["in_idx"].tolist()))[0]
    c["x"] = r.randn((c["x"].shape[0], cin, *c["x"].shape[2:]), c["x"].dtype)
    c["x"][:, dropped] = math.nan
    c["weight"][:, dropped] = math.inf


def _huge_index(name):
    def f(c, r):
        c[name] = torch.zeros(1, dtype=torch.int64).expand(HUGE)

    return f


def _gathered_huge_index(c, r):
    _huge_index("in_idx")(c, r)
    c["input_gathered"] = True


CHANNEL_CONV_MUTS = conv_common_muts(_cc, False) + [
    Mut(f"{name}_{label}", fn, expect, name)
    for name in ("in_idx", "out_idx")
    for label, fn, expect in [
        ("out_of_range", _idx(name, _oob(name)), "error"),
        ("negative", _idx(name, _oob(name, negative=True)), "error"),
        ("duplicate", _dup(name), "error"),
        ("float", _idx(name, lambda t, c, r: t.float()), "error"),
        ("bool", _idx(name, lambda t, c, r: torch.ones(t.shape, dtype=torch.bool)), "error"),
        ("complex", _idx(name, lambda t, c, r: t.to(torch.complex64)), "error"),
        ("int32", _idx(name, lambda t, c, r: t.int()), "ok"),
        ("uint8", _idx(name, lambda t, c, r: t.to(torch.uint8)), "any"),
        ("2d", _idx(name, lambda t, c, r: t[None]), "error"),
        ("0d", _idx(name, lambda t, c, r: torch.tensor(0)), "error"),
        ("list", _idx(name, lambda t, c, r: t.tolist()), "error"),
        ("meta", _idx(name, lambda t, c, r: t.to("meta")), "error"),
        ("noncontig", _idx(name, lambda t, c, r: noncontig(t, r)), "ok"),
        ("expanded", _idx(name, lambda t, c, r: torch.zeros(1, dtype=torch.int64).expand(2)), "error"),
        ("empty", _idx(name, lambda t, c, r: t[:0]), "any"),
    ]
] + [
    Mut("in_idx_huge_expanded", _huge_index("in_idx"), "error", "in_idx", huge=True),
    Mut("out_idx_huge_expanded", _huge_index("out_idx"), "error", "out_idx", huge=True),
    Mut("gathered_in_idx_huge_expanded", _gathered_huge_index, "error", ("in_idx", "x"), huge=True),
    Mut("unchecked_out_of_range_index", _unchecked_oob, "error", "in_idx"),
    Mut("input_gathered_channel_mismatch", _gathered_mismatch, "error", ("in_idx", "input_gathered")),
    Mut("x_channel_mismatch", _x_channel_mismatch, "error", ("x", "weight")),
    Mut("nan_in_dropped_channel", _nan_in_dropped_channel, "ok"),
]
# an empty in_idx with input_gathered needs x with 0 channels: "any" above covers the mismatch error


_mc = SPECS["masked_conv2d"]


def _mask(how):
    def f(c, r):
        c["out_mask"] = how(c["out_mask"], c, r)

    return f


def _mask_expanded(c, r):
    _conv_gen_wide(_mc)(c, r)
    c["out_mask"] = (r.rand((1, c["weight"].shape[0])) < 0.5).expand(c["x"].shape[0], -1)


def _all_false_nan(c, r):
    c["out_mask"] = torch.zeros_like(c["out_mask"])
    c["x"] = torch.full_like(c["x"], math.nan)


MASKED_CONV_MUTS = conv_common_muts(_mc, True) + [
    Mut("out_mask_uint8", _mask(lambda m, c, r: m.to(torch.uint8)), "error", "out_mask"),
    Mut("out_mask_int64", _mask(lambda m, c, r: m.long()), "error", "out_mask"),
    Mut("out_mask_float", _mask(lambda m, c, r: m.float()), "error", "out_mask"),
    Mut("out_mask_extra_column", _mask(lambda m, c, r: torch.cat([m, m[:, :1]], 1)), "error", "out_mask"),
    Mut("out_mask_transposed", _chain(_conv_gen_wide(_mc), _mask(lambda m, c, r: m.t().contiguous())), "error",
        "out_mask"),
    Mut("out_mask_1d", _mask(lambda m, c, r: m[0]), "error", "out_mask"),
    Mut("out_mask_list", _mask(lambda m, c, r: m.tolist()), "error", "out_mask"),
    Mut("out_mask_meta", _mask(lambda m, c, r: m.to("meta")), "error", "out_mask"),
    Mut("out_mask_noncontig", _chain(_conv_gen_wide(_mc), _mask(lambda m, c, r: noncontig(m, r))), "ok"),
    Mut("out_mask_expanded", _mask_expanded, "ok"),
    Mut("all_false_nan_input", _all_false_nan, "ok"),
    Mut("all_true", _mask(lambda m, c, r: torch.ones_like(m)), "ok"),
    Mut("x_channel_mismatch", lambda c, r: c.update(
        x=r.randn((c["x"].shape[0], c["weight"].shape[1] + 1, *c["x"].shape[2:]), c["x"].dtype)), "error",
        ("x", "weight")),
    Mut("x_huge_all_masked", lambda c, r: (_huge_x(_mc, True)(c, r), c["out_mask"].zero_()), "ok", huge=True),
]


# ---- spectral ----------------------------------------------------------------------------------------------------


def _sp_regen(**sizes):
    def f(c, r):
        x = c["x"]
        b, h, w, ch = (sizes.get(k, v) for k, v in zip("bhwc", x.shape))
        c["x"] = r.randn((b, h, w, ch), x.dtype)
        c["weight"] = r.randn((h, w // 2 + 1, ch, 2), c["weight"].dtype)

    return f


def _sp_wide(c, r):
    x = c["x"]
    _sp_regen(b=2, h=max(2, x.shape[1]), w=max(2, x.shape[2]), c=max(2, x.shape[3]))(c, r)


SPECTRAL_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
    Mut("x_bool", _tf("x", _dt(torch.bool)), "error", "x"),
    Mut("x_complex64", _tf("x", _dt(torch.complex64)), "error", "x"),
    Mut("weight_complex64", _tf("weight", lambda t, r: torch.view_as_complex(t.float().contiguous())), "error",
        "weight"),
    Mut("weight_int64", _tf("weight", _dt(torch.int64)), "error", "weight"),
    Mut("weight_float64", _tf("weight", _dt(F64)), "ok"),
    Mut("weight_float16", _tf("weight", _dt(F16)), "ok"),
    Mut("x_list", _tf("x", lambda t, r: t.tolist()), "error", "x"),
    Mut("x_meta", _tf("x", _meta), "error", ("x", "weight")),
    Mut("weight_meta", _tf("weight", _meta), "error", "weight"),
    Mut("all_meta", _all(_meta), "any"),
    Mut("x_3d", _tf("x", lambda t, r: t[0]), "error", "x"),
    Mut("x_5d", _tf("x", lambda t, r: t[None]), "error", "x"),
    Mut("weight_full_spectrum", lambda c, r: c.update(weight=r.randn((*c["x"].shape[1:3], c["x"].shape[3], 2),
                                                                     c["weight"].dtype)), "any", "weight"),
    Mut("weight_wrong_channels", lambda c, r: c.update(weight=r.randn(
        (c["x"].shape[1], c["x"].shape[2] // 2 + 1, c["x"].shape[3] + 1, 2), c["weight"].dtype)), "error", "weight"),
    Mut("weight_last_dim_1", _tf("weight", lambda t, r: t[..., :1]), "error", "weight"),
    Mut("weight_3d", _tf("weight", lambda t, r: t[0]), "error", "weight"),
    Mut("empty_batch", _sp_regen(b=0), "ok"),
    Mut("zero_height", _sp_regen(h=0), "error", "x"),
    Mut("zero_channels", _sp_regen(c=0), "error", "x"),
    Mut("grid_1x1", _sp_regen(h=1, w=1), "ok"),
    Mut("grid_65x66", _sp_regen(b=1, h=65, w=66, c=2), "ok"),
    Mut("x_nan", _tf("x", _nan), "any"),
    Mut("x_inf", _tf("x", _inf), "any"),
    Mut("weight_nan", _tf("weight", _nan), "any"),
    Mut("x_noncontig", _chain(_sp_wide, _tf("x", _nc)), "ok"),
    Mut("x_permuted", _tf("x", lambda t, r: t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)), "ok"),
    Mut("x_expanded", _chain(_sp_wide, _tf("x", _exp)), "ok"),
    Mut("weight_noncontig", _chain(_sp_wide, _tf("weight", _nc)), "ok"),
    Mut("weight_expanded", _chain(_sp_wide, _tf("weight", _exp)), "ok"),
    Mut("x_huge", lambda c, r: c.update(x=huge_view((2**15, 2, 2, 2**16 + 1), c["x"].dtype),
                                        weight=r.randn((2, 2, 2**16 + 1, 2), c["weight"].dtype)), "any", "x",
        huge=True, oom_ok=True),
]


def _aff_regen(b=None, h=None, w=None, blocks=None, cb=None, hb=None):
    def f(c, r):
        x = c["x"]
        b_, h_, w_ = (v if v is not None else d for v, d in zip((b, h, w), x.shape[:3]))
        k = blocks if blocks is not None else c["blocks"]
        cb_ = cb if cb is not None else c["w1"].shape[2]
        hb_ = hb if hb is not None else c["w1"].shape[3]
        wdt = c["w1"].dtype
        c.update(x=r.randn((b_, h_, w_, k * cb_), x.dtype), w1=r.randn((2, k, cb_, hb_), wdt, 0.5),
                 b1=r.randn((2, k, hb_), wdt, 0.1), w2=r.randn((2, k, hb_, cb_), wdt, 0.5),
                 b2=r.randn((2, k, cb_), wdt, 0.1), blocks=k)

    return f


def _aff_wide(c, r):
    x = c["x"]
    _aff_regen(b=2, h=max(2, x.shape[1]), w=max(2, x.shape[2]), cb=max(2, c["w1"].shape[2]),
               hb=max(2, c["w1"].shape[3]))(c, r)


def _nan_channel0(t, r):
    """One NaN, in channel 0 (the other channels of its block see it only through the filter M)."""
    t = t.clone()
    t[r.randint(0, t.shape[0] - 1), r.randint(0, t.shape[1] - 1), r.randint(0, t.shape[2] - 1), 0] = math.nan
    return t


ADAPTIVE_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
    Mut("x_complex64", _tf("x", _dt(torch.complex64)), "error", "x"),
    Mut("w1_int64", _tf("w1", _dt(torch.int64)), "error", "w1"),
    Mut("b1_bool", _tf("b1", _dt(torch.bool)), "error", "b1"),
    Mut("w2_complex64", _tf("w2", _dt(torch.complex64)), "error", "w2"),
    Mut("b2_meta", _tf("b2", _meta), "error", "b2"),
    Mut("w1_meta", _tf("w1", _meta), "error", "w1"),
    Mut("x_meta", _tf("x", _meta), "error", ("x", "w1")),
    Mut("all_meta", _all(_meta), "any"),
    Mut("weights_float64", lambda c, r: [c.update({k: c[k].double()}) for k in ("w1", "b1", "w2", "b2")], "ok"),
    Mut("b2_float16", _tf("b2", _dt(F16)), "ok"),
    Mut("blocks_zero", _set(blocks=0), "error", "blocks"),
    Mut("blocks_negative", _set(blocks=-2), "error", "blocks"),
    Mut("blocks_float", lambda c, r: c.update(blocks=float(c["blocks"])), "error", "blocks"),
    Mut("blocks_bool", _set(blocks=True), "error", "blocks"),
    Mut("blocks_not_dividing", lambda c, r: (_aff_regen(blocks=2, cb=1)(c, r), c.update(blocks=3)), "error",
        "blocks"),
    Mut("blocks_huge", _set(blocks=2**40), "error", "blocks"),
    *scalar_muts("shrink", NEG_NAN_INF + [("none", None), ("str", "0.1")]),
    Mut("shrink_int", _set(shrink=0), "ok"),
    Mut("w1_shape", _tf("w1", lambda t, r: t[:, :, :, :0]), "error", "w1"),
    Mut("w1_3d", _tf("w1", lambda t, r: t[0]), "error", "w1"),
    Mut("b1_shape", _tf("b1", lambda t, r: torch.cat([t, t], -1)), "error", "b1"),
    Mut("w2_transposed", _chain(_aff_regen(cb=2, hb=3), _tf("w2", lambda t, r: t.transpose(2, 3).contiguous())),
        "error", "w2"),
    Mut("b2_shape", _tf("b2", lambda t, r: t[:1]), "error", "b2"),
    Mut("x_3d", _tf("x", lambda t, r: t[0]), "error", "x"),
    Mut("empty_batch", _aff_regen(b=0), "ok"),
    Mut("zero_width", _aff_regen(w=0), "error", "x"),
    Mut("grid_65x3", _aff_regen(b=1, h=65, w=3), "ok"),
    Mut("x_nan", _chain(_aff_regen(cb=2), _tf("x", _nan_channel0)), "any"),  # its block's other channel: M only
    Mut("x_inf", _tf("x", _inf), "any"),
    Mut("w1_nan", _tf("w1", _nan), "any"),
    Mut("b2_inf", _tf("b2", _inf), "any"),
    Mut("x_noncontig", _chain(_aff_wide, _tf("x", _nc)), "ok"),
    Mut("x_expanded", _chain(_aff_wide, _tf("x", _exp)), "ok"),
    Mut("w1_noncontig", _chain(_aff_wide, _tf("w1", _nc)), "ok"),
    Mut("w2_expanded", _chain(_aff_wide, _tf("w2", _exp)), "ok"),
    Mut("x_huge", lambda c, r: (_aff_regen(blocks=1, cb=2**16 + 1, hb=1)(c, r),
                                c.update(x=huge_view((2**15, 2, 2, 2**16 + 1), c["x"].dtype))), "any", "x",
        huge=True, oom_ok=True),
]


# ---- sema -----------------------------------------------------------------------------------------------------------


def _qkv(how):
    def f(c, r):
        for k in "qkv":
            c[k] = how(c[k], r)

    return f


def _sema_shape(b=None, heads=None, grid=None, d=None, window=None):
    def f(c, r):
        q = c["q"]
        gh, gw = _pair(c["grid"]) if grid is None else grid
        b_, h_, d_ = (v if v is not None else dflt for v, dflt in zip((b, heads, d), (q.shape[0], q.shape[1],
                                                                                      q.shape[3])))
        for k in "qkv":
            c[k] = r.randn((b_, h_, gh * gw, d_), q.dtype)
        c["grid"] = (gh, gw)
        wh, ww = _pair(c["window"]) if window is None else window
        c["window"] = (min(wh, gh), min(ww, gw))

    return f


def _sema_wide(c, r):
    gh, gw = _pair(c["grid"])
    _sema_shape(b=2, heads=2, d=max(2, c["q"].shape[3]), grid=(max(gh, 2), max(gw, 2)))(c, r)


def _fused_qkv(c, r):
    """q, k, v as slices of one fused (B, heads, N, 3d) projection (the head dim stays contiguous)."""
    b, h, n, d = c["q"].shape
    fused = r.randn((b, h, n, 3 * d), c["q"].dtype)
    c["q"], c["k"], c["v"] = fused[..., :d], fused[..., d:2 * d], fused[..., 2 * d:]


SEMA_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("q_int64", _tf("q", _dt(torch.int64)), "error", "q"),
    Mut("q_complex64", _tf("q", _dt(torch.complex64)), "error", "q"),
    Mut("k_float64", _tf("k", lambda t, r: t.double() if t.dtype != F64 else t.float()), "error", "k"),
    Mut("v_bool", _tf("v", _dt(torch.bool)), "error", "v"),
    Mut("v_list", _tf("v", lambda t, r: t.tolist()), "error", "v"),
    Mut("k_meta", _tf("k", _meta), "error", "k"),
    Mut("v_meta", _tf("v", _meta), "error", "v"),
    Mut("q_meta", _tf("q", _meta), "error", ("q", "k")),
    Mut("all_meta", _qkv(_meta), "any"),
    Mut("k_shape", _tf("k", lambda t, r: r.randn((*t.shape[:3], t.shape[3] + 1), t.dtype)), "error", "k"),
    Mut("v_batch", _tf("v", lambda t, r: torch.cat([t, t])), "error", "v"),
    Mut("q_3d", _qkv(lambda t, r: t[0]), "error", "q"),
    Mut("q_5d", _qkv(lambda t, r: t[None]), "error", "q"),
    Mut("grid_mismatch", lambda c, r: c.update(grid=(_pair(c["grid"])[0], _pair(c["grid"])[1] + 1)), "error", "grid"),
    Mut("grid_zero", _set(grid=(0, 3)), "error", "grid"),
    Mut("grid_negative", lambda c, r: c.update(grid=(-_pair(c["grid"])[0], -_pair(c["grid"])[1])), "error", "grid"),
    Mut("grid_triple", lambda c, r: c.update(grid=(*_pair(c["grid"]), 1)), "error", "grid"),
    Mut("grid_float", lambda c, r: c.update(grid=tuple(float(g) for g in _pair(c["grid"]))), "error", "grid"),
    Mut("grid_none", _set(grid=None), "error", "grid"),
    Mut("grid_tensor", lambda c, r: c.update(grid=torch.tensor(_pair(c["grid"]))), "any", "grid"),
    Mut("window_larger_than_grid", lambda c, r: c.update(window=(_pair(c["grid"])[0] + 1, 1)), "error", "window"),
    Mut("window_zero", _set(window=0), "error", "window"),
    Mut("window_bool", _set(window=True), "error", "window"),
    Mut("window_str", _set(window="2"), "error", "window"),
    Mut("neighborhood_int", _set(neighborhood=1), "error", "neighborhood"),
    Mut("neighborhood_none", _set(neighborhood=None), "error", "neighborhood"),
    Mut("empty_batch", _sema_shape(b=0), "ok"),
    Mut("zero_heads", _sema_shape(heads=0), "ok"),
    Mut("zero_head_dim", _sema_shape(d=0), "error", "q"),
    Mut("empty_tokens", lambda c, r: (_sema_shape(grid=(1, 1))(c, r), _qkv(lambda t, r: t[:, :, :0])(c, r)), "error",
        "grid"),
    Mut("window_equals_grid", lambda c, r: c.update(window=_pair(c["grid"])), "ok"),
    Mut("grid_1xN", _sema_shape(grid=(1, 7), window=(1, 3)), "ok"),
    Mut("q_nan", _tf("q", _nan), "any"),
    Mut("k_inf", _tf("k", _inf), "any"),
    Mut("v_nan", _tf("v", _nan), "any"),
    Mut("q_large", _tf("q", lambda t, r: t * 1e4 if t.dtype in (F32, F64) else t * 50), "ok"),
    Mut("fused_qkv_slices", _fused_qkv, "ok"),
    Mut("q_noncontig", _chain(_sema_wide, _tf("q", _nc)), "ok"),
    Mut("k_head_dim_strided", _chain(_sema_wide, _tf("k", lambda t, r: t.transpose(2, 3).contiguous().transpose(2, 3))),
        "ok"),
    Mut("v_expanded", _chain(_sema_wide, _tf("v", _exp)), "ok"),
    Mut("qkv_same_tensor", lambda c, r: c.update(k=c["q"], v=c["q"]), "ok"),
    Mut("grid_product_wraps_int64", lambda c, r: c.update(q=c["q"][:, :, :0], k=c["k"][:, :, :0], v=c["v"][:, :, :0],
                                                          grid=(2**32, 2**32), window=1), "error", "grid"),
    Mut("tokens_huge", lambda c, r: c.update(
        **{k: huge_view((1, 1, 2**31 + 2**16, 2), c["q"].dtype) for k in "qkv"}, grid=(2**15 + 1, 2**16), window=1),
        "any", "q", huge=True, oom_ok=True),
]


# ---- token_attention ----------------------------------------------------------------------------------------------


def _ta_oob(name, negative=False):
    def how(t, c, r):
        limit = c["q" if name == "q_idx" else "k"].shape[2]
        bad = -1 - r.randint(0, 2) if negative else limit + r.randint(0, 3)
        t = t.clone() if t.numel() else torch.zeros(*t.shape[:-1], 1, dtype=t.dtype)
        t.view(-1)[r.randint(0, t.numel() - 1)] = bad
        return t

    return how


def _ta_dup(name):
    def f(c, r):
        t = c[name]
        length = c["q" if name == "q_idx" else "k"].shape[2]
        if t.shape[-1] == 0:
            t = torch.zeros(*t.shape[:-1], 1, dtype=t.dtype)
        if length > t.shape[-1] - 1 >= 1 and t.shape[-1] >= length:  # make room for the repeat inside the length
            t = t[..., :-1]
        c[name] = torch.cat([t, t[..., :1]], -1)

    return f


def _fused_kept(c, r):
    """q, k, v of one length as slices of a fused (B, heads, L, 3d) projection; indices redrawn for that length."""
    b, h, _, d = c["q"].shape
    n = max(c["q"].shape[2], c["k"].shape[2])
    fused = r.randn((b, h, n, 3 * d), c["q"].dtype)
    c["q"], c["k"], c["v"] = fused[..., :d], fused[..., d:2 * d], fused[..., 2 * d:]


TOKEN_ATTENTION_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("q_int64", _tf("q", _dt(torch.int64)), "error", "q"),
    Mut("k_float64", _tf("k", lambda t, r: t.double() if t.dtype != F64 else t.float()), "error", "k"),
    Mut("v_meta", _tf("v", _meta), "error", "v"),
    Mut("q_3d", _tf("q", lambda t, r: t[0]), "error", "q"),
    Mut("v_shape", _tf("v", lambda t, r: r.randn((*t.shape[:3], t.shape[3] + 1), t.dtype)), "error", "v"),
    Mut("kv_head_dim", _chain(_tf("k", lambda t, r: r.randn((*t.shape[:3], t.shape[3] + 1), t.dtype)),
                              _tf("v", lambda t, r: r.randn((*t.shape[:3], t.shape[3] + 1), t.dtype))), "error", "k"),
    Mut("q_idx_float", _idx("q_idx", lambda t, c, r: t.float()), "error", "q_idx"),
    Mut("kv_idx_bool", _idx("kv_idx", lambda t, c, r: t.bool()), "error", "kv_idx"),
    Mut("q_idx_list", _idx("q_idx", lambda t, c, r: t.tolist()), "error", "q_idx"),
    Mut("kv_idx_meta", _idx("kv_idx", lambda t, c, r: t.to("meta")), "error", "kv_idx"),
    Mut("q_idx_3d", _idx("q_idx", lambda t, c, r: t.reshape(1, 1, -1)), "error", "q_idx"),
    Mut("kv_idx_rows", _idx("kv_idx", lambda t, c, r: t.reshape(-1)[None].expand(c["q"].shape[0] + 1, -1)),
        "error", "kv_idx"),
    Mut("q_idx_oob", _idx("q_idx", _ta_oob("q_idx")), "error", "q_idx"),
    Mut("kv_idx_negative", _idx("kv_idx", _ta_oob("kv_idx", negative=True)), "error", "kv_idx"),
    Mut("q_idx_duplicate", _ta_dup("q_idx"), "error", "q_idx"),
    Mut("kv_idx_duplicate", _ta_dup("kv_idx"), "error", "kv_idx"),
    Mut("kv_idx_empty", _idx("kv_idx", lambda t, c, r: t[..., :0]), "any", "kv_idx"),
    Mut("q_idx_empty", _idx("q_idx", lambda t, c, r: t[..., :0]), "ok"),
    Mut("q_idx_noncontig", _idx("q_idx", lambda t, c, r: t.flip(-1)), "ok"),
    Mut("q_idx_expanded", _idx("q_idx", lambda t, c, r: t if t.dim() == 2 else t[None].expand(c["q"].shape[0], -1)),
        "ok"),
    Mut("scale_zero", _set(scale=0.0), "error", "scale"),
    Mut("scale_nan", _set(scale=float("nan")), "error", "scale"),
    Mut("scale_str", _set(scale="1"), "error", "scale"),
    Mut("empty_batch", lambda c, r: c.update(**{k: c[k][:0] for k in "qkv"},
                                             **{n: c[n][:0] if c[n].dim() == 2 else c[n] for n in ("q_idx", "kv_idx")}),
        "ok"),
    Mut("q_nan", _tf("q", _nan), "any"),
    Mut("v_inf", _tf("v", _inf), "any"),
    Mut("q_large", _tf("q", lambda t, r: t * 1e4 if t.dtype in (F32, F64) else t * 50), "ok"),
    Mut("fused_qkv_slices", lambda c, r: _fused_kept(c, r), "ok"),
    Mut("q_noncontig", _tf("q", _nc), "ok"),
    Mut("k_expanded", _tf("k", _exp), "ok"),
    Mut("tokens_huge", lambda c, r: c.update(q=huge_view((1, 1, 2**31 + 8, 2), c["q"].dtype),
                                             k=huge_view((1, 1, 4, 2), c["q"].dtype),
                                             v=huge_view((1, 1, 4, 2), c["q"].dtype),
                                             q_idx=torch.tensor([2**31 + 7, 0]), kv_idx=torch.tensor([1, 3])),
        "any", "q", huge=True),
]


# ---- quant --------------------------------------------------------------------------------------------------------


FDA_SIGN_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
    Mut("x_bool", _tf("x", _dt(torch.bool)), "error", "x"),
    Mut("x_complex64", _tf("x", _dt(torch.complex64)), "error", "x"),
    Mut("x_list", _tf("x", lambda t, r: t.tolist()), "error", "x"),
    Mut("x_float", _set(x=0.5), "error", "x"),
    Mut("x_sparse", _chain(_wide, _tf("x", lambda t, r: t.to_sparse())), "error", "x"),
    Mut("x_meta", _tf("x", _meta), "any"),
    Mut("x_rank0", _x_shape(()), "ok"),
    Mut("x_rank5", _rank5, "ok"),
    Mut("x_empty", _empty_x, "ok"),
    Mut("x_signed_zeros", _tf("x", lambda t, r: torch.where(r.rand(t.shape) < 0.5, 0.0, -0.0).to(t.dtype)), "ok"),
    Mut("x_nan", _tf("x", _nan), "ok"),  # sign: NaN in, NaN out at the same places, exactly
    Mut("x_inf", _tf("x", _inf), "ok"),
    Mut("x_noncontig", _chain(_wide, _tf("x", _nc)), "ok"),
    Mut("x_expanded", _chain(_wide, _tf("x", _exp)), "ok"),
    Mut("x_huge", _tf("x", lambda t, r: huge_view((HUGE,), t.dtype)), "any", "x", huge=True, oom_ok=True),
    Mut("x_huge_2d", _tf("x", lambda t, r: huge_view((2**16, 2**15 + 1), t.dtype)), "any", "x", huge=True,
        oom_ok=True),
    *scalar_muts("n_terms", [("zero", 0), ("negative", -1), ("too_many", 10_001), ("huge", 2**40), ("float", 10.0),
                             ("bool", True), ("none", None), ("str", "10")]),
    Mut("n_terms_one", _set(n_terms=1), "ok"),
    Mut("n_terms_max", _set(n_terms=10_000), "ok"),
    *scalar_muts("omega", [("zero", 0.0)] + NEG_NAN_INF + [("none", None), ("str", "0.1"), ("bool", True),
                                                         ("two_elements", torch.ones(2))]),
    Mut("omega_tensor", _set(omega=torch.tensor(0.2)), "ok"),
    Mut("omega_int", _set(omega=1), "ok"),
    *scalar_muts("clip", [("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("minus_inf", -math.inf),
                          ("none", None), ("str", "1")]),
    Mut("clip_inf", _set(clip=math.inf), "ok"),
    Mut("clip_tiny", _set(clip=1e-300), "ok"),
    Mut("surrogate_unknown", _set(surrogate="sigmoid"), "error", "surrogate"),
    Mut("surrogate_case", _set(surrogate="FDA"), "error", "surrogate"),
    Mut("surrogate_none", _set(surrogate=None), "error", "surrogate"),
    Mut("surrogate_int", _set(surrogate=0), "error", "surrogate"),
]


def _fq_fit(axis="keep"):
    """Rebuilds scale / zero_point for the (new) x, with per_channel_axis ``axis`` (see _fq_params)."""
    return lambda c, r: _fq_params(c, r, axis)


def _fq_zp(how=None):
    """Makes the call have a zero point (a multi-bit grid, the zero point in the dtype of x), then ``how(zp, r)``."""

    def f(c, r):
        if c["signed"] and c["bits"] == 1:
            c["bits"] = r.choice([2, 4, 8])
        if c["zero_point"] is None:
            c["zero_point"] = torch.zeros((), dtype=c["x"].dtype)
        _fq_params(c, r)
        if how is not None:
            c["zero_point"] = how(c["zero_point"], r)

    return f


def _fq_per_channel(c, r):
    """A 2-D x with dims > 1 and a random per-channel axis."""
    _wide(c, r)
    _fq_params(c, r, "random")


def _fq_half_steps(c, r):
    """x exactly half-way between two levels (a power-of-two step): round half to even decides every entry."""
    c["scale"] = torch.full(c["scale"].shape, 0.25, dtype=c["scale"].dtype)
    k = torch.randint(-40, 40, tuple(c["x"].shape), generator=r.g).double()
    c["x"] = ((k + 0.5) * 0.25).to(c["x"].dtype)


def _fq_zp_tie(c, r):
    """A float64 zero point just above a tie (2.5 + 1e-10) with float32 x: the reference (and Triton) round it in
    float32 (2.5 -> 2), not in float64 (-> 3); x reaches both ends of the 4-bit unsigned grid, where z shows."""
    c.update(x=torch.tensor([-2.7, 14.0, 3.0, -0.6]), bits=4, signed=False, per_channel_axis=None,
             scale=torch.tensor(1.0), zero_point=torch.tensor(2.5 + 1e-10, dtype=F64))


def _fq_huge(shape, axis):
    def f(c, r):
        c["x"] = huge_view(shape, c["x"].dtype)
        _fq_params(c, r, axis)

    return f


FAKE_QUANTIZE_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("per_channel", _fq_per_channel, "ok"),
    Mut("x_int64", _tf("x", _dt(torch.int64)), "error", "x"),
    Mut("x_bool", _tf("x", _dt(torch.bool)), "error", "x"),
    Mut("x_complex64", _tf("x", _dt(torch.complex64)), "error", "x"),
    Mut("x_list", _tf("x", lambda t, r: t.tolist()), "error", "x"),
    Mut("x_sparse", _chain(_wide, _fq_fit(), _tf("x", lambda t, r: t.to_sparse())), "error", "x"),
    Mut("x_meta", _tf("x", _meta), "error", ("x", "scale")),
    Mut("all_meta", _all(_meta), "any"),
    Mut("scale_int64", _tf("scale", _dt(torch.int64)), "error", "scale"),
    Mut("scale_bool", _tf("scale", _dt(torch.bool)), "error", "scale"),
    Mut("scale_complex64", _tf("scale", _dt(torch.complex64)), "error", "scale"),
    Mut("scale_list", _tf("scale", lambda t, r: t.tolist()), "error", "scale"),
    Mut("scale_float", _set(scale=0.1), "error", "scale"),
    Mut("scale_none", _set(scale=None), "error", "scale"),
    Mut("scale_meta", _tf("scale", _meta), "error", "scale"),
    Mut("scale_float64", _tf("scale", _dt(F64)), "ok"),
    Mut("scale_float16", _tf("scale", _dt(F16)), "ok"),
    Mut("scale_bfloat16", _tf("scale", _dt(BF16)), "ok"),
    Mut("scale_two_values", _chain(_fq_fit(None), _tf("scale", lambda t, r: t.reshape(1).expand(2).clone())),
        "error", "scale"),
    Mut("scale_empty", _chain(_fq_fit(None), _tf("scale", lambda t, r: t.reshape(1)[:0])), "error", "scale"),
    Mut("scale_1x1", _chain(_fq_fit(None), _tf("scale", lambda t, r: t.reshape(1, 1))), "ok"),
    Mut("scale_length", _chain(_fq_per_channel, _tf("scale", lambda t, r: torch.cat([t, t[:1]]))), "error", "scale"),
    Mut("scale_broadcastable", _chain(_fq_per_channel, _tf("scale", lambda t, r: t[:1])), "error", "scale"),
    Mut("scale_2d", _chain(_fq_per_channel, _tf("scale", lambda t, r: t[:, None])), "error", "scale"),
    Mut("scale_per_tensor_with_axis", _chain(_fq_per_channel, _tf("scale", lambda t, r: t[0])), "error", "scale"),
    Mut("scale_noncontig", _chain(_fq_per_channel, _tf("scale", _nc)), "ok"),
    Mut("scale_expanded", _chain(_fq_per_channel, _tf("scale", _exp)), "ok"),
    # scale > 0 is documented, not checked (a GPU would synchronise): any outcome, but the backends agree
    Mut("scale_zero", _tf("scale", lambda t, r: torch.zeros_like(t)), "any"),
    Mut("scale_negative", _tf("scale", lambda t, r: -t), "any"),
    Mut("scale_nan", _tf("scale", _nan), "any"),
    Mut("scale_inf", _tf("scale", lambda t, r: torch.full_like(t, math.inf)), "any"),
    Mut("zero_point", _fq_zp(), "ok"),
    Mut("zero_point_per_channel", _chain(_fq_per_channel, _fq_zp()), "ok"),
    Mut("zero_point_int64", _fq_zp(_dt(torch.int64)), "error", "zero_point"),
    Mut("zero_point_bool", _fq_zp(_dt(torch.bool)), "error", "zero_point"),
    Mut("zero_point_complex64", _fq_zp(_dt(torch.complex64)), "error", "zero_point"),
    Mut("zero_point_list", _fq_zp(lambda t, r: t.tolist()), "error", "zero_point"),
    Mut("zero_point_float", _fq_zp(lambda t, r: 3.0), "error", "zero_point"),
    Mut("zero_point_meta", _fq_zp(_meta), "error", "zero_point"),
    Mut("zero_point_length", _chain(_fq_per_channel, _fq_zp(lambda t, r: torch.cat([t, t[:1]]))), "error",
        "zero_point"),
    Mut("zero_point_two_values", _chain(_fq_fit(None), _fq_zp(lambda t, r: t.reshape(1).expand(2).clone())), "error",
        "zero_point"),
    Mut("zero_point_float16", _fq_zp(_dt(F16)), "ok"),
    Mut("zero_point_out_of_grid", _fq_zp(lambda t, r: t * 0 + r.choice([-1e6, 1e6])), "ok"),  # clamped to the grid
    Mut("zero_point_nan", _fq_zp(_nan), "any"),
    Mut("zero_point_noncontig", _chain(_fq_per_channel, _fq_zp(_nc)), "ok"),
    Mut("zero_point_float64_tie", _fq_zp_tie, "ok", reps=1),  # no randomness: one case
    Mut("zero_point_signed_1bit", _chain(_fq_zp(), _set(signed=True, bits=1)), "error", "zero_point"),
    Mut("zero_point_unsigned_1bit", _chain(_fq_zp(), _set(signed=False, bits=1)), "ok"),
    Mut("binary_grid", _set(signed=True, bits=1, zero_point=None), "ok"),
    *scalar_muts("bits", [("zero", 0), ("negative", -8), ("17", 17), ("huge", 2**40), ("bool", True),
                          ("float", 8.0), ("none", None), ("str", "8")]),
    Mut("bits_16", _chain(_set(bits=16), _fq_fit()), "ok"),
    Mut("bits_2", _chain(_set(bits=2), _fq_fit()), "ok"),
    Mut("per_channel_axis_dim", lambda c, r: c.update(per_channel_axis=c["x"].dim()), "error", "per_channel_axis"),
    Mut("per_channel_axis_below", lambda c, r: c.update(per_channel_axis=-c["x"].dim() - 1), "error",
        "per_channel_axis"),
    Mut("per_channel_axis_huge", _set(per_channel_axis=2**40), "error", "per_channel_axis"),
    Mut("per_channel_axis_bool", _chain(_fq_per_channel, _set(per_channel_axis=False)), "error", "per_channel_axis"),
    Mut("per_channel_axis_float", _chain(_fq_per_channel, lambda c, r: c.update(
        per_channel_axis=float(c["per_channel_axis"]))), "error", "per_channel_axis"),
    Mut("per_channel_axis_str", _set(per_channel_axis="0"), "error", "per_channel_axis"),
    Mut("per_channel_axis_rank0", _chain(_x_shape(()), _fq_fit(None), _set(per_channel_axis=0)), "error",
        "per_channel_axis"),
    Mut("per_channel_axis_negative", _chain(_wide, lambda c, r: _fq_params(c, r, r.choice([-1, -2]))), "ok"),
    Mut("per_channel_axis_last", _chain(_rank5, lambda c, r: _fq_params(c, r, 4)), "ok"),
    Mut("signed_int", _set(signed=1), "error", "signed"),
    Mut("signed_none", _set(signed=None), "error", "signed"),
    Mut("signed_str", _set(signed="True"), "error", "signed"),
    *scalar_muts("grad_factor", [("nan", math.nan), ("inf", math.inf), ("minus_inf", -math.inf), ("none", None),
                                 ("str", "1.0"), ("bool", True)]),
    Mut("grad_factor_zero", _set(grad_factor=0.0), "ok"),
    Mut("grad_factor_negative", _set(grad_factor=-2.0), "ok"),
    Mut("grad_factor_tensor", _set(grad_factor=torch.tensor(0.5)), "ok"),
    Mut("x_rank0", _chain(_x_shape(()), _fq_fit()), "ok"),
    Mut("x_rank5", _chain(_rank5, _fq_fit()), "ok"),
    Mut("x_empty", _chain(_empty_x, _fq_fit()), "ok"),
    Mut("x_empty_per_channel", _chain(_empty_x, _fq_fit("random")), "ok"),
    Mut("x_nan", _tf("x", _nan), "ok"),  # NaN in, NaN out at the same places (the levels clamp nothing else)
    Mut("x_inf", _tf("x", _inf), "ok"),  # clamped to the end levels
    Mut("x_large", _tf("x", lambda t, r: t * 1e4), "ok"),
    Mut("x_half_steps", _fq_half_steps, "ok"),
    Mut("x_noncontig", _chain(_wide, _fq_fit(), _tf("x", _nc)), "ok"),
    Mut("x_noncontig_per_channel", _chain(_fq_per_channel, _tf("x", _nc)), "ok"),
    Mut("x_expanded", _chain(_wide, _fq_fit(), _tf("x", _exp)), "ok"),
    Mut("x_huge", _fq_huge((HUGE,), None), "any", "x", huge=True, oom_ok=True),
    Mut("x_huge_per_channel", _fq_huge((2**16, 2**15 + 1), "random"), "any", "x", huge=True, oom_ok=True),
]


# ---- distill ------------------------------------------------------------------------------------------------------


_fa = SPECS["feature_affinity_loss"]


def _fa_wide(c, r):
    """A call whose features have every dim > 1 (non-contiguous and overlapping views exist), its dtype kept."""
    dt = c["fs"].dtype
    c.clear()
    c.update(_fa.gen(r, b=2, cs=r.randint(2, 4), ct=r.randint(2, 4), h=r.randint(2, 6), w=r.randint(2, 6)))
    c["fs"], c["ft"] = c["fs"].to(dt), c["ft"].to(dt)
    if c["proj"] is not None:
        c["proj"] = c["proj"].to(dt)


def _fa_proj(how=None):
    """Makes the call a fast one with a projection of its own (HW x k), then ``how(proj, r)``."""

    def f(c, r):
        fs = c["fs"]
        if c["proj"] is None:
            c["proj"] = r.randn((fs.shape[2] * fs.shape[3], r.randint(1, 6)), F64 if fs.dtype == F64 else F32)
        c["fast"] = True
        if how is not None:
            c["proj"] = how(c["proj"], r)

    return f


def _fa_seeded(**kw):
    """Makes the call a fast one with the seeded projection (no proj), then sets ``kw``."""

    def f(c, r):
        c.update(fast=True, proj=None)
        c.update(kw)

    return f


def _fa_zero_pixel(c, r):
    """An all-zero pixel (f̂ = 0 there) in the student, the teacher or both (the same pixel)."""
    h, w = c["fs"].shape[2:]
    i, j = r.randint(0, h - 1), r.randint(0, w - 1)
    for name in r.choice([("fs",), ("ft",), ("fs", "ft")]):
        t = c[name].clone()
        t[:, :, i, j] = 0
        c[name] = t


def _fa_both(how):
    def f(c, r):
        c["fs"], c["ft"] = how(c["fs"], r), how(c["ft"], r)

    return f


def _fa_huge(shape_fs, shape_ft):
    """Stride-0 features of huge logical shapes (2**31+ channels or pixels); the exact loss."""

    def f(c, r):
        dt = c["fs"].dtype
        c.update(fs=huge_view(shape_fs, dt), ft=huge_view(shape_ft, dt, 0.25), fast=False, proj=None)

    return f


FEATURE_AFFINITY_MUTS = [
    Mut("valid", _set(), "ok"),
    Mut("fs_int64", _tf("fs", _dt(torch.int64)), "error", "fs"),
    Mut("ft_bool", _tf("ft", _dt(torch.bool)), "error", "ft"),
    Mut("fs_complex64", _tf("fs", _dt(torch.complex64)), "error", "fs"),
    Mut("fs_list", _tf("fs", lambda t, r: t.tolist()), "error", "fs"),
    Mut("ft_float", _set(ft=0.5), "error", "ft"),
    Mut("fs_sparse", _tf("fs", lambda t, r: t.to_sparse()), "error", "fs"),
    Mut("ft_float64", _tf("ft", lambda t, r: t.double() if t.dtype != F64 else t.float()), "error", "ft"),
    Mut("ft_float16", _tf("ft", lambda t, r: t.half() if t.dtype != F16 else t.bfloat16()), "error", "ft"),
    Mut("fs_meta", _tf("fs", _meta), "error", ("ft", "fs")),
    Mut("ft_meta", _tf("ft", _meta), "error", "ft"),
    Mut("all_meta", _all(_meta), "any"),
    Mut("fs_3d", _tf("fs", lambda t, r: t[0]), "error", "fs"),
    Mut("ft_5d", _tf("ft", lambda t, r: t[None]), "error", "ft"),
    Mut("ft_batch", _tf("ft", lambda t, r: torch.cat([t, t[:1]])), "error", "ft"),
    Mut("ft_pixels", _tf("ft", lambda t, r: r.randn((t.shape[0], t.shape[1], t.shape[2] + 1, t.shape[3]), t.dtype)),
        "error", "ft"),
    Mut("ft_pixels_transposed", _chain(_regen(_fa, h=3, w=5), _tf("ft", lambda t, r: t.transpose(2, 3).contiguous())),
        "error", "ft"),
    Mut("zero_height", _fa_both(lambda t, r: t[:, :, :0]), "error", "fs"),
    Mut("zero_width_seeded", _chain(_fa_seeded(), _fa_both(lambda t, r: t[..., :0])), "error", "fs"),
    Mut("empty_batch", _regen(_fa, b=0), "ok"),
    Mut("zero_student_channels", _regen(_fa, cs=0), "ok"),
    Mut("zero_teacher_channels", _regen(_fa, ct=0), "ok"),
    Mut("zero_channels", _regen(_fa, cs=0, ct=0), "ok"),
    Mut("one_channel", _regen(_fa, cs=1, ct=1), "ok"),
    Mut("grid_1x1", _regen(_fa, h=1, w=1), "ok"),
    Mut("grid_9x11", _regen(_fa, h=9, w=11), "ok"),  # two 64-pixel blocks, not a multiple of 16
    Mut("grid_20x17", _regen(_fa, b=1, h=20, w=17), "ok"),  # six blocks
    Mut("many_channels", _regen(_fa, b=1, cs=70, ct=33, h=3, w=4), "ok"),
    Mut("norm_unknown", _set(norm="l2"), "error", "norm"),
    Mut("norm_case", _set(norm="L1"), "error", "norm"),
    Mut("norm_none", _set(norm=None), "error", "norm"),
    Mut("norm_int", _set(norm=1), "error", "norm"),
    Mut("reduction_unknown", _set(reduction="max"), "error", "reduction"),
    Mut("reduction_none_value", _set(reduction=None), "error", "reduction"),
    Mut("fast_int", _set(fast=1), "error", "fast"),
    Mut("fast_none", _set(fast=None), "error", "fast"),
    Mut("exact", _set(fast=False, proj=None), "ok"),
    Mut("seeded", _fa_seeded(), "ok"),
    Mut("seeded_k_1", _fa_seeded(k=1), "ok"),
    Mut("seeded_k_zero", _fa_seeded(k=0), "error", "k"),
    Mut("seeded_k_negative", _fa_seeded(k=-4), "error", "k"),
    Mut("seeded_k_float", _fa_seeded(k=8.0), "error", "k"),
    Mut("seeded_k_bool", _fa_seeded(k=True), "error", "k"),
    Mut("seeded_k_str", _fa_seeded(k="8"), "error", "k"),
    Mut("seeded_seed_negative", _fa_seeded(seed=-1), "ok"),
    Mut("seeded_seed_float", _fa_seeded(seed=0.5), "error", "seed"),
    Mut("seeded_seed_bool", _fa_seeded(seed=True), "error", "seed"),
    Mut("seeded_seed_str", _fa_seeded(seed="1"), "error", "seed"),
    Mut("seeded_seed_huge", _fa_seeded(seed=2**64), "ok"),  # taken mod 2**64
    Mut("k_zero_exact", _set(fast=False, proj=None, k=0, seed="x"), "ok"),  # k, seed: only the seeded fast loss's
    Mut("proj_given", _fa_proj(), "ok"),
    Mut("proj_without_fast", _chain(_fa_proj(), _set(fast=False)), "error", "proj"),
    Mut("proj_int64", _fa_proj(_dt(torch.int64)), "error", "proj"),
    Mut("proj_list", _fa_proj(lambda t, r: t.tolist()), "error", "proj"),
    Mut("proj_meta", _fa_proj(_meta), "error", "proj"),
    Mut("proj_1d", _fa_proj(lambda t, r: t[:, 0]), "error", "proj"),
    Mut("proj_3d", _fa_proj(lambda t, r: t[None]), "error", "proj"),
    Mut("proj_rows", _fa_proj(lambda t, r: torch.cat([t, t[:1]])), "error", "proj"),
    Mut("proj_no_columns", _fa_proj(lambda t, r: t[:, :0]), "error", "proj"),
    Mut("proj_float64", _fa_proj(_dt(F64)), "ok"),
    Mut("proj_bfloat16", _fa_proj(_dt(BF16)), "ok"),
    Mut("proj_noncontig", _chain(_fa_wide, _fa_proj(_nc)), "ok"),
    Mut("proj_expanded", _chain(_fa_wide, _fa_proj(lambda t, r: t[:, :1].expand(-1, 3))), "ok"),
    Mut("proj_many_columns", _fa_proj(lambda t, r: r.randn((t.shape[0], 300), t.dtype)), "ok"),
    Mut("proj_nan", _fa_proj(_nan), "any"),
    Mut("fs_nan", _tf("fs", _nan), "any"),
    Mut("ft_inf", _tf("ft", _inf), "any"),
    Mut("fs_large", _tf("fs", lambda t, r: t * 1e4 if t.dtype in (F32, F64) else t * 50), "ok"),
    Mut("fs_tiny", _tf("fs", lambda t, r: t * 1e-7 if t.dtype in (F32, F64) else t * 1e-3), "any"),
    Mut("zero_pixel", _fa_zero_pixel, "ok"),
    Mut("ft_is_fs", lambda c, r: c.update(ft=c["fs"]), "ok"),
    Mut("fs_noncontig", _chain(_fa_wide, _tf("fs", _nc)), "ok"),
    Mut("fs_channels_last", _tf("fs", lambda t, r: t.contiguous(memory_format=torch.channels_last)), "ok"),
    Mut("ft_noncontig", _chain(_fa_wide, _tf("ft", _nc)), "ok"),
    Mut("ft_expanded", _chain(_fa_wide, _tf("ft", _exp)), "ok"),
    Mut("fs_pixels_expanded", _chain(_fa_wide, _tf("fs", lambda t, r: t[:, :, :1, :1].expand(t.shape))), "ok"),
    # oom_ok: the result is small, but the documented workspace is not (the normalised features, O(HW·(Cs + Ct)))
    Mut("channels_huge", _fa_huge((1, HUGE, 1, 1), (1, 2, 1, 1)), "any", "fs", huge=True, oom_ok=True),
    Mut("pixels_huge", _fa_huge((1, 1, 2**16, 2**15 + 1), (1, 1, 2**16, 2**15 + 1)), "any", "fs", huge=True,
        oom_ok=True),
]


MUTATORS = {
    "prox": PROX_MUTS, "prox_backward": PROX_BACKWARD_MUTS, "prox_sgd_": SGD_MUTS, "prox_adamw_": ADAMW_MUTS,
    "palm_slimming_": PALM_MUTS, "penalty_grad_": PENALTY_GRAD_MUTS, "split_step_": SPLIT_MUTS,
    "channel_conv2d": CHANNEL_CONV_MUTS, "masked_conv2d": MASKED_CONV_MUTS, "spectral_filter": SPECTRAL_MUTS,
    "adaptive_spectral_filter": ADAPTIVE_MUTS, "sema_attention": SEMA_MUTS, "fda_sign": FDA_SIGN_MUTS,
    "fake_quantize": FAKE_QUANTIZE_MUTS, "kept_token_attention": TOKEN_ATTENTION_MUTS,
    "feature_affinity_loss": FEATURE_AFFINITY_MUTS,
}
assert set(MUTATORS) == set(SPECS)
for _op, _muts in MUTATORS.items():
    _names = [m.name for m in _muts]
    assert len(_names) == len(set(_names)), f"{_op}: duplicate mutator names"


# =============================================================================================================
# the oracle
# =============================================================================================================


def build(op, mut: Mut, rep: int):
    """The call of case (op, mutator, rep): a valid random call, then the mutation. Deterministic: two builds of
    one case are equal and share nothing."""
    r = Rand(f"{op}/{mut.name}/{rep}")
    c = SPECS[op].gen(r)
    mut.fn(c, r)
    c.pop("_dtype", None)
    return c


@contextlib.contextmanager
def memory_cap(extra=CAP_BYTES):
    """Caps the process's data segment at its current size + ``extra`` (Linux: RLIMIT_DATA covers malloc'd and
    anonymous mmap'd memory); allocations past it fail with a clean error."""
    resource = pytest.importorskip("resource")
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration):
        pytest.skip("needs /proc/self/status (Linux) to cap memory")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "Cannot allocate memory" in str(e)


def names(msg: str, word: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", msg) is not None


def names_op(msg: str, op: str) -> bool:
    return re.search(rf"slimops(\.|::){re.escape(op)}(?!\w)", msg) is not None


def same(a, b) -> bool:
    """Equal values (NaN equal to NaN), shape and dtype; 'meta' tensors compare by shape and dtype."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "meta" or b.device.type == "meta" or a.numel() == 0:
        return True
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def compare(actual: Tensor, expected, mode: str, what: str) -> str | None:
    """None when ``actual`` matches the oracle, else what differs. ``expected``: a tensor of the result's dtype
    (the reference twin), or (float64 value, float64 sum of |terms|, dtype) for the convolution formula."""
    if isinstance(expected, tuple):
        exp64, absum, dtype = expected
    else:
        exp64, absum, dtype = expected, None, expected.dtype
    if not isinstance(actual, Tensor):
        return f"{what}: returned {type(actual).__name__}, expected a tensor"
    if actual.dtype != dtype or tuple(actual.shape) != tuple(exp64.shape):
        return (f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {dtype} {tuple(exp64.shape)}")
    if actual.device.type == "meta" or exp64.device.type == "meta":
        return None if actual.device == exp64.device else f"{what}: on {actual.device}, expected {exp64.device}"
    if actual.numel() == 0:
        return None
    if not dtype.is_floating_point:  # e.g. int64 step counts
        return None if torch.equal(actual, exp64) else f"{what}: {actual.tolist()} != {exp64.tolist()}"
    a, e = actual.detach().double(), exp64.double()
    fin = torch.isfinite(e)
    if mode == ELEMENTWISE:
        nan_ok = bool((e.isnan() == a.isnan()).all())
        inf_ok = bool(((e.isinf() == a.isinf()) & (~e.isinf() | (a == e))).all())
        if not (nan_ok and inf_ok):
            bad = ((e.isnan() != a.isnan()) | (e.isinf() != a.isinf())).nonzero()[:3].tolist()
            return f"{what}: NaN/inf differ from the oracle at {bad}"
    elif not bool((torch.isfinite(a) == fin).all()):
        bad = (torch.isfinite(a) != fin).nonzero()[:3].tolist()
        return f"{what}: non-finite entries differ from the oracle at {bad} (actual {a.flatten()[:4].tolist()})"
    rtol, atol = (TOL if mode == ELEMENTWISE else RED_TOL)[dtype]
    bound = atol + rtol * e.abs()
    if absum is not None:
        bound = bound + RED_TOL[F64 if dtype == F64 else F32][0] * absum.double()
    err = (a - e).abs()
    over = fin & ~(err <= bound)
    if bool(over.any()):
        i = over.nonzero()[0].tolist()
        return (f"{what}: {int(over.sum())} entries differ from the oracle beyond tolerance, e.g. at {i}: "
                f"{a[tuple(i)].item()!r} vs {e[tuple(i)].item()!r}")
    return None


def evaluate(op: str, mut: Mut, rep: int, backend: str):
    """Runs one case; returns its outcome ("error", "correct" or "oom") or raises AssertionError saying why it
    failed the oracle."""
    spec = SPECS[op]
    c = build(op, mut, rep)
    before = build(op, mut, rep) if not mut.huge else None
    where = f"slimops.{op} [{mut.name} #{rep}, backend={backend}]"
    with memory_cap() if mut.huge else contextlib.nullcontext():
        try:
            out = spec.call(c, backend)
        except ERRORS + (MemoryError,) as e:  # MemoryError: a C++ std::bad_alloc (std::vector workspaces)
            msg = f"{type(e).__name__}: {e}".split("\nException raised from")[0]
            if is_oom(e):
                assert mut.oom_ok, f"{where}: ran out of memory although its result is small: {msg[:300]}"
                return "oom"
            assert names_op(msg, op), f"{where}: the error does not name the op: {msg[:500]}"
            if mut.arg:
                assert any(names(msg, a) for a in mut.arg), \
                    f"{where}: the error does not name {' or '.join(mut.arg)}: {msg[:500]}"
            assert mut.expect != "ok", f"{where}: a valid call raised {msg[:500]}"
            if before is not None:  # nothing changed: no partial update, no write into an input
                for (label, t), (_, t0) in zip(spec.tensors(c), spec.tensors(before)):
                    assert same(t, t0), f"{where}: raised ({msg[:200]}) but changed {label}"
            return "error"
        assert mut.expect != "error", f"{where}: returned instead of raising an error naming " \
                                      f"{' or '.join(mut.arg or ('the op',))}"
        fresh = build(op, mut, rep)
        if mut.dealias:  # the oracle reads copies: an input aliasing an in-place output keeps its old value
            for k, v in fresh.items():
                if isinstance(v, list):
                    fresh[k] = [t.clone() if isinstance(t, Tensor) else t for t in v]
        expected = spec.expected(fresh)
    if spec.inplace:
        for (label, t), (_, e) in zip(spec.result(c), spec.result(fresh)):
            problem = compare(t, e, spec.mode, label)
            assert problem is None, f"{where}: {problem}"
        written = {id(t) for n in spec.written for t in c[n]}
        if not mut.dealias and before is not None:
            for (label, t), (_, t0) in zip(spec.tensors(c), spec.tensors(before)):
                if id(t) not in written and label.split("[")[0] not in spec.written:
                    assert same(t, t0), f"{where}: wrote into its input {label}"
        return "correct"
    problem = compare(out, expected, spec.mode, "result")
    assert problem is None, f"{where}: {problem}"
    if before is not None:
        for (label, t), (_, t0) in zip(spec.tensors(c), spec.tensors(before)):
            assert same(t, t0), f"{where}: wrote into its input {label}"
    return "correct"


# =============================================================================================================
# the cases
# =============================================================================================================

# Cases only a change of the C++ kernels (csrc/) or of the Triton kernels fixes: (op, mutator, backend) -> why.
# Strict: each must still fail, so that the entry goes when the kernel is fixed. (Also a few that only a change of
# the Python op layer, slimops/ops, fixes: said so in the reason.)
XFAIL: dict = {}

TALLY: dict = collections.defaultdict(collections.Counter)  # (op, backend) -> outcome counts


def _cases(backends):
    out = []
    for op, muts in MUTATORS.items():
        for m in muts:
            for rep in range(m.reps):
                for b in backends:
                    marks = []
                    reason = XFAIL.get((op, m.name, b))
                    if reason:
                        marks.append(pytest.mark.xfail(strict=True, reason=reason))
                    out.append(pytest.param(op, m, rep, b, id=f"{op}-{m.name}-{rep}-{b}", marks=marks))
    return out


@pytest.mark.parametrize("op,mut,rep,backend", _cases(BACKENDS))
def test_fuzz(op, mut, rep, backend):
    try:
        outcome = evaluate(op, mut, rep, backend)
    except BaseException:
        TALLY[(op, backend)]["failed"] += 1
        raise
    TALLY[(op, backend)][outcome] += 1


# The Triton backend (interpreted on CPU here): a few cases per op.
TRITON_MUTS = {
    "prox": ["valid", "x_int64", "x_noncontig", "x_nan", "lam_negative", "x_empty"],
    "prox_backward": ["valid", "grad_meta", "grad_expanded", "x_nan"],
    "prox_sgd_": ["valid", "grads_float64", "params_noncontig", "grads_noncontig", "lr_nan", "alias_params_twice"],
    "prox_adamw_": ["valid", "exp_avgs_meta", "state_steps_bool", "grads_nan"],
    "palm_slimming_": ["valid", "xis_float64", "alpha_nan", "empty_tensor"],
    "penalty_grad_": ["valid", "params_expanded", "eps_nan", "grads_noncontig"],
    "split_step_": ["valid", "us_noncontig", "lr_nan", "rank0_tensor"],
    "channel_conv2d": ["valid", "in_idx_duplicate", "x_noncontig", "empty_batch", "nan_in_dropped_channel"],
    "masked_conv2d": ["valid", "out_mask_uint8", "x_expanded", "all_false_nan_input"],
    "spectral_filter": ["valid", "weight_complex64", "x_noncontig", "x_nan"],
    "adaptive_spectral_filter": ["valid", "blocks_not_dividing", "w1_noncontig", "x_nan"],
    "sema_attention": ["valid", "grid_mismatch", "fused_qkv_slices", "q_nan"],
    "kept_token_attention": ["valid", "q_idx_duplicate", "fused_qkv_slices", "q_nan"],
    "feature_affinity_loss": ["valid", "fs_int64", "proj_given", "seeded", "grid_9x11", "fs_channels_last",
                              "ft_expanded", "zero_pixel", "fs_nan"],
    "fda_sign": ["valid", "x_int64", "x_noncontig", "x_nan", "x_empty", "x_rank0", "n_terms_zero", "clip_inf"],
    "fake_quantize": ["valid", "per_channel", "scale_int64", "x_noncontig", "x_noncontig_per_channel", "x_nan",
                      "x_half_steps", "zero_point", "zero_point_per_channel", "binary_grid", "x_empty_per_channel",
                      "zero_point_float64_tie"],
}


def _triton_cases():
    out = []
    for op, wanted in TRITON_MUTS.items():
        by_name = {m.name: m for m in MUTATORS[op]}
        for name in wanted:
            m = by_name[name]
            marks = []
            reason = XFAIL.get((op, name, "triton"))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(op, m, 0, "triton", id=f"{op}-{name}-0-triton", marks=marks))
    return out


@pytest.mark.parametrize("op,mut,rep,backend", _triton_cases())
def test_fuzz_triton(op, mut, rep, backend):
    pytest.importorskip("triton")
    test_fuzz(op, mut, rep, backend)


def test_zz_summary():
    """Prints the per-op counts of the cases run in this session (``pytest -s`` shows them)."""
    if not TALLY:
        pytest.skip("no fuzz case ran in this session")
    cases = {op: sum(m.reps for m in muts) for op, muts in MUTATORS.items()}
    backends = sorted({b for _, b in TALLY}, key=["cpu", "reference", "triton"].index)
    lines = [f"fuzz cases (seed {SEED}): {sum(cases.values())} cases "
             f"({sum(len(m) for m in MUTATORS.values())} mutators), each on {', '.join(BACKENDS)}; "
             f"a few on triton. Per op and backend: runs = errors as expected + correct results + "
             f"oom (result > {CAP_BYTES >> 20} MiB cap) + failed (xfail included)",
             f"{'op':26s} {'cases':>5s}  " + "  ".join(f"{b + ': runs/err/ok/oom/fail':>30s}" for b in backends)]
    total = collections.Counter()
    for op in MUTATORS:
        cells = []
        for b in backends:
            t = TALLY.get((op, b), collections.Counter())
            runs = sum(t.values())
            total[b, "runs"] += runs
            for k in ("error", "correct", "oom", "failed"):
                total[b, k] += t[k]
            cells.append(f"{runs:>10d}/{t['error']:>4d}/{t['correct']:>4d}/{t['oom']:>3d}/{t['failed']:>3d}")
        lines.append(f"{op:26s} {cases[op]:>5d}  " + "  ".join(f"{c:>30s}" for c in cells))
    lines.append(f"{'total':26s} {sum(cases.values()):>5d}  " + "  ".join(
        f"{total[b, 'runs']:>10d}/{total[b, 'error']:>4d}/{total[b, 'correct']:>4d}/{total[b, 'oom']:>3d}/"
        f"{total[b, 'failed']:>3d}".rjust(30) for b in backends))
    print("\n" + "\n".join(lines), file=sys.stderr)
