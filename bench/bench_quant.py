"""Benchmark of the ``quant`` op family (``slimops.ops.fda_sign``, ``slimops.ops.fake_quantize``) against what users
run today. Every number is forward + backward (the ops exist for their gradients), median of interleaved rounds
(bench/common.py), every contender on the same inputs in the same process.

``fda_sign`` (sign forward, surrogate gradient backward), x of 4M and 25M elements, upstream gradient random:
  - ``slimops[<backend>]``: the kernel (``cpu`` here; ``cuda`` / ``triton`` on a GPU) and ``slimops[reference]``
    (:mod:`slimops.reference.quant`, the readable torch twin: a baseline, not the kernel);
  - surrogate ``"fda"`` (n_terms 10 and 19, the FDA paper's schedule ends; omega 0.1, clip 1): the public FDA-BNN
    composite, a ``torch.autograd.Function`` with ``torch.sign`` forward and the backward
    ``4*omega/pi * sum([torch.cos((2*i+1)*omega*x) for i in range(n_terms)]) * grad``, zeroed where ``|x| > clip``
    (as the paper's code writes it);
  - surrogate ``"ste"`` (clip 1): the two usual torch STEs, ``xc = x.clamp(-1, 1); xc + (torch.sign(x) - xc).detach()``
    and a Function (``torch.sign`` forward, ``grad * (|x| <= 1)`` backward).
  float32 and bfloat16 (``--dtypes``); the composites run in the storage dtype, slimops computes in float32.

``fake_quantize`` (LSQ / LSQ+ gradients), the loss the sum of the outputs, gradients of x and scale (and zero point):
  - (w) a 25M-parameter weight list: the 54 conv / fc weights of a ResNet-50 (shapes written out below; 25.5M
    parameters), 4-bit signed per output channel (axis 0), scale learnable (LSQ init ``2 mean|w| / sqrt(Qp)``,
    grad_factor ``1/sqrt(numel_per_channel * Qp)``), no zero point; every contender loops over the 54 tensors;
  - (a) an activation, (64, 256, 28, 28), 4-bit unsigned per tensor with a learnable scale and zero point (LSQ+).
  Contenders: ``slimops[<backend>]`` and ``slimops[reference]``; torch's own learnable fake quantiser with autograd,
  ``torch._fake_quantize_learnable_per_channel_affine`` (w; zero point all 0, not learnt) /
  ``torch._fake_quantize_learnable_per_tensor_affine`` (a); and the common LSQ composite in plain torch ops
  (grad-scale trick + round-STE: ``s = s*g + (s - s*g).detach(); w = (x/s).clamp(qn, qp);
  q = w + (w.round() - w).detach(); y = q*s``, for (a) with the zero point as LSQ+ writes it).
  The issue's bar: fake_quantize fwd+bwd >= 2x torch's own fake-quant + autograd LSQ composite on (w).

The "speed-up vs best baseline" is against the fastest contender that is not a slimops kernel (the torch ones and
slimops[reference]), measured in the same run. GB/s counts the bytes a fused fwd+bwd must move (read x, write y;
read grad and x, write grad_x: 5 elements). Before timing, every contender runs once and is checked against
slimops[reference]: equal outputs and close gradients, except where the contender's own definition differs, which is
counted and reported (``torch.sign(0) = 0``, slimops gives -1; torch's learnable fake quantiser tests "inside the
grid" on the rounded ``x/s + z``, slimops and LSQ on the unrounded value, so elements within half a step outside the
grid differ; the composites' ``x/s`` and grad-scale trick may move a value by an ulp, and an element at a rounding tie
by one level). A contender that computes something else fails the run.

    python bench/bench_quant.py                       # 2 threads, fda_sign and fake_quantize, float32 + bfloat16
    python bench/bench_quant.py --ops fake_quantize --dtypes float32 --rounds 9
    python bench/bench_quant.py --device cuda --rounds 30
    python bench/bench_quant.py --quick               # tiny sizes, prints only (CI smoke)
    python bench/bench_quant.py --json out.json       # also write every table as JSON
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401
from slimops import _backend  # noqa: E402
from slimops.ops import fake_quantize, fda_sign  # noqa: E402
from slimops.ops.quant import lsq_grad_factor  # noqa: E402
from slimops.reference.quant import levels  # noqa: E402

OPS = ("fda_sign", "fake_quantize")
OMEGA, CLIP = 0.1, 1.0
FDA_SIZES = [("4M", 4_000_000), ("25M", 25_000_000)]
FDA_CASES = [("fda", 10), ("fda", 19), ("ste", None)]  # (surrogate, n_terms)
QUICK_FDA_SIZES = [("64K", 65_536)]
BITS = 4
ACT_SHAPE = (64, 256, 28, 28)
QUICK_ACT_SHAPE = (4, 16, 14, 14)
ACT_ZERO_POINT = 7.6  # rounds to 8: the activation grid [0, 15] centred on the data
BAR = 2.0  # the bar for fake_quantize on the weight list


def resnet50_weight_shapes(width_div: int = 1):
    """The conv and fc weight shapes of torchvision's ResNet-50 (bottleneck blocks 3, 4, 6, 3; stride on the 3x3),
    written out: 53 convs + the 1000-way fc, 25.50M parameters. ``width_div`` shrinks every width (quick mode)."""
    d = width_div
    shapes = [(64 // d, 3, 7, 7)]
    c_in = 64 // d
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w, out = width // d, 4 * width // d
        for b in range(blocks):
            shapes += [(w, c_in, 1, 1), (w, w, 3, 3), (out, w, 1, 1)]
            if b == 0:
                shapes.append((out, c_in, 1, 1))  # the projection shortcut
            c_in = out
    return shapes + [(1000 // d, c_in)]


# ---- fda_sign: contenders ------------------------------------------------------------------------------------


class FdaBnnSign(torch.autograd.Function):
    """The public FDA-BNN composite (Xu et al. 2021's code): torch.sign forward, the truncated Fourier series'
    derivative backward, in the storage dtype, zeroed outside [-clip, clip]."""

    @staticmethod
    def forward(ctx, x, n_terms, omega, clip):
        ctx.save_for_backward(x)
        ctx.n_terms, ctx.omega, ctx.clip = n_terms, omega, clip
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        n, w = ctx.n_terms, ctx.omega
        gx = 4 * w / math.pi * sum([torch.cos((2 * i + 1) * w * x) for i in range(n)]) * grad
        gx[x.abs() > ctx.clip] = 0
        return gx, None, None, None


class SteSign(torch.autograd.Function):
    """Straight-through sign as a Function: torch.sign forward, grad * (|x| <= clip) backward."""

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip), None


def ste_detach(x, clip):
    """The straight-through sign as a clamp + detach trick (Hubara et al.'s STE as most code writes it)."""
    xc = x.clamp(-clip, clip)
    return xc + (torch.sign(x) - xc).detach()


def fda_contenders(surrogate, n_terms, kernel_backends):
    """name -> (is a baseline, fn(x) -> y)."""
    n = n_terms or 10
    fns = {}
    for b in kernel_backends + ["reference"]:
        fns[f"slimops[{b}]"] = (b == "reference", lambda x, b=b: fda_sign(x, n_terms=n, omega=OMEGA,
                                                                       surrogate=surrogate, clip=CLIP, backend=b))
    if surrogate == "fda":
        fns["FDA-BNN composite (Function)"] = (True, lambda x: FdaBnnSign.apply(x, n, OMEGA, CLIP))
    else:
        fns["torch STE (clamp + detach)"] = (True, lambda x: ste_detach(x, CLIP))
        fns["torch STE (Function)"] = (True, lambda x: SteSign.apply(x, CLIP))
    return fns


def fda_inputs(numel, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(numel, generator=g).to(device, dtype)  # ~68% inside the clip
    grad = torch.randn(numel, generator=g).to(device, dtype)
    return x, grad


def fda_once(fn, x, grad):
    """(y, grad_x) of one fwd+bwd."""
    xl = x.detach().clone().requires_grad_()
    y = fn(xl)
    y.backward(grad)
    return y.detach(), xl.grad


def check_fda(name, fn, want, x, grad, dtype, n_terms):
    """One fwd+bwd of ``fn`` against ``want`` = slimops[reference]'s (y, grad_x): (max |grad_x error|, note). Raises
    if they disagree."""
    (y0, g0), (y1, g1) = want, fda_once(fn, x, grad)
    zeros = int((x == 0).sum())
    bad_y = int((y1 != y0).sum())
    assert bad_y <= zeros, f"fda_sign: {name} forward differs from slimops[reference] at {bad_y} elements"
    err = (g1.float() - g0.float()).abs().max().item()
    # float32: a few ulps of the largest derivative (the composite sums n cosines, slimops uses the closed form).
    # bfloat16: the composite evaluates and sums every cosine in bfloat16; allow 2^-5 of the largest derivative.
    peak = (4 * OMEGA / math.pi * (n_terms or 10) if n_terms else 1.0) * grad.float().abs().max().item()
    tol = peak * (1e-5 if dtype == torch.float32 else 2 ** -5 if not name.startswith("slimops") else 2 ** -7)
    assert err <= tol, f"fda_sign: {name} grad_x differs from slimops[reference] by {err:.3g} (> {tol:.3g})"
    note = f"grad max abs err {err:.2g}"
    if bad_y:
        note += f"; {bad_y} outputs differ (x == 0: torch.sign gives 0)"
    return err, note


def fda_step(fn, x, grad):
    xl = x.detach().clone().requires_grad_()

    def run():
        xl.grad = None
        fn(xl).backward(grad)

    return run


# ---- fake_quantize: contenders --------------------------------------------------------------------------------


def grad_scale(t, g):
    """LSQ's gradient scale: forward value t, backward grad * g."""
    tg = t * g
    return tg + (t - tg).detach()


def round_ste(t):
    return t + (t.round() - t).detach()


def lsq_composite(x, s, z, qn, qp, g, axis):
    """The usual LSQ (z None) / LSQ+ fake quantiser in plain torch ops, autograd through it."""
    s = grad_scale(s, g)
    if axis is not None:
        s = s.reshape([-1] + [1] * (x.dim() - 1))
    if z is None:
        w = (x / s).clamp(qn, qp)
        return round_ste(w) * s
    z = round_ste(grad_scale(z, g))
    if axis is not None:
        z = z.reshape([-1] + [1] * (x.dim() - 1))
    w = (x / s + z).clamp(qn, qp)
    return (round_ste(w) - z) * s


def fq_problem(case, device, dtype, quick):
    """(tensors, scales, zero points or Nones, grad factors, per-channel axis, signed, label, numel)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    if case == "w":
        shapes = resnet50_weight_shapes(8 if quick else 1)
        xs, ss, gfs = [], [], []
        qp = levels(BITS, True)[1]
        for shp in shapes:
            fan_in = math.prod(shp[1:])
            w = torch.randn(shp, generator=g) * math.sqrt(2.0 / fan_in)
            s = 2 * w.abs().reshape(shp[0], -1).mean(1) / math.sqrt(qp)  # LSQ init, per channel
            xs.append(w.to(device, dtype))
            ss.append(s.to(device))  # scales stay float32 (torch's learnable op wants float32 scales)
            gfs.append(lsq_grad_factor(fan_in, BITS, True))
        numel = sum(math.prod(s) for s in shapes)
        label = f"(w) ResNet-50 weights, {len(shapes)} tensors, {numel / 1e6:.1f}M, {BITS}-bit signed per-channel"
        return xs, ss, [None] * len(xs), gfs, 0, True, label, numel
    shape = QUICK_ACT_SHAPE if quick else ACT_SHAPE
    x = torch.randn(shape, generator=g)
    qp = levels(BITS, False)[1]
    s = torch.tensor([6.0 * x.std().item() / qp])
    z = torch.tensor([ACT_ZERO_POINT])
    numel = x.numel()
    label = f"(a) activation {'x'.join(map(str, shape))}, {BITS}-bit unsigned per-tensor, learnt zero point"
    return [x.to(device, dtype)], [s.to(device)], [z.to(device)], [lsq_grad_factor(numel, BITS, False)], None, \
        False, label, numel


def fq_contenders(axis, signed, kernel_backends):
    """name -> (is a baseline, fn(x, s, z, grad_factor) -> y)."""
    qn, qp = levels(BITS, signed)
    fns = {}
    for b in kernel_backends + ["reference"]:
        fns[f"slimops[{b}]"] = (b == "reference", lambda x, s, z, gf, b=b: fake_quantize(
            x, s, z, bits=BITS, per_channel_axis=axis, signed=signed, grad_factor=gf, backend=b))
    if axis is not None:
        def torch_learnable(x, s, z, gf):
            zp = torch.zeros_like(s) if z is None else z
            return torch._fake_quantize_learnable_per_channel_affine(x, s, zp, axis, qn, qp, gf)

        fns["torch learnable per-channel"] = (True, torch_learnable)
    else:
        def torch_learnable(x, s, z, gf):
            zp = torch.zeros_like(s) if z is None else z
            return torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, qn, qp, gf)

        fns["torch learnable per-tensor"] = (True, torch_learnable)
    fns["LSQ composite (grad-scale + round-STE)"] = (True, lambda x, s, z, gf: lsq_composite(x, s, z, qn, qp, gf,
                                                                                              axis))
    return fns


def fq_leaves(xs, ss, zs):
    return ([x.detach().clone().requires_grad_() for x in xs], [s.detach().clone().requires_grad_() for s in ss],
            [None if z is None else z.detach().clone().requires_grad_() for z in zs])


def fq_forward_backward(fn, xl, sl, zl, gfs):
    ys = [fn(x, s, z, gf) for x, s, z, gf in zip(xl, sl, zl, gfs)]
    sum(y.sum() for y in ys).backward()
    return ys


def fq_step(fn, xs, ss, zs, gfs):
    xl, sl, zl = fq_leaves(xs, ss, zs)
    leaves = xl + sl + [z for z in zl if z is not None]

    def run():
        for t in leaves:
            t.grad = None
        fq_forward_backward(fn, xl, sl, zl, gfs)

    return run


def _per_slice(t, x, axis):
    return t.reshape(()) if axis is None else t.reshape([-1] + [1] * (x.dim() - 1))


def _reduce(t, x, axis):
    return t.sum() if axis is None else t.reshape(x.shape[0], -1).sum(1)


def fq_once(fn, xs, ss, zs, gfs):
    """(outputs, grad_x, grad_scale, grad_zero_point) of one fwd+bwd, per tensor."""
    xl, sl, zl = fq_leaves(xs, ss, zs)
    ys = fq_forward_backward(fn, xl, sl, zl, gfs)
    return ([y.detach() for y in ys], [x.grad for x in xl], [s.grad for s in sl],
            [None if z is None else z.grad for z in zl])


def check_fq(name, fn, want, xs, ss, zs, gfs, axis, signed, dtype):
    """One fwd+bwd of ``fn`` against ``want``, slimops[reference]'s :func:`fq_once`; returns a note.

    Outputs must agree up to an ulp (or one level at a rounding tie), grad_x everywhere but at "suspect" elements
    (half a step outside the grid, where torch's op tests the rounded value, or a level flip), and the scale /
    zero-point gradients within what the suspect elements can move them (|v| or a level, resp. a scale, each, times
    grad_factor) plus a summation tolerance."""
    qn, qp = levels(BITS, signed)
    (y0, gx0, gs0, gz0), (y1, gx1, gs1, gz1) = want, fq_once(fn, xs, ss, zs, gfs)
    flips = boundary = ulp_y = bad_gx = 0
    eps = 1e-6 if dtype == torch.float32 else 2 ** -7
    for i, (x, s, z, gf) in enumerate(zip(xs, ss, zs, gfs)):
        xf = x.float()
        sb = _per_slice(s.float(), x, axis)
        zr = torch.zeros(()) if z is None else _per_slice(z.float().round().clamp(qn, qp), x, axis)
        vz = xf * (1.0 / sb) + zr
        near = ((vz > qp) & (vz.round() <= qp)) | ((vz < qn) & (vz.round() >= qn))  # half a step outside
        d = (y1[i].float() - y0[i].float()).abs()
        flip = d > 0.5 * sb
        ulp_y += int(((d > 0) & ~flip).sum())
        assert (d[~flip] <= eps * sb.expand_as(d)[~flip] * (qp - qn)).all(), \
            f"fake_quantize: {name} output differs from slimops[reference] by more than an ulp (tensor {i})"
        suspect = near | flip
        flips += int(flip.sum())
        boundary += int(near.sum())
        gdiff = gx1[i] != gx0[i]
        bad_gx += int(gdiff.sum())
        assert not (gdiff & ~suspect).any(), \
            f"fake_quantize: {name} grad_x differs from slimops[reference] away from the grid's edges (tensor {i})"
        # dL/dy = 1 everywhere (the loss is the sum). A suspect element's scale term may differ by up to |v| (inside:
        # (q - z) - v, outside: q - z) or one level: at most qp - qn + 1 either way; its zero-point term by s.
        slack = gf * _reduce(suspect.float(), x, axis)
        summ = gf * 1e-4 * (qp - qn + 1) * (x[0].numel() if axis is not None else x.numel())
        tol_s = slack * (qp - qn + 1) + summ + 1e-6
        assert ((gs1[i] - gs0[i]).abs() <= tol_s).all(), \
            f"fake_quantize: {name} grad_scale differs from slimops[reference] (tensor {i}): " \
            f"{(gs1[i] - gs0[i]).abs().max().item():.3g}"
        if z is not None:
            tol_z = slack * s.float() + summ * s.float() + 1e-6
            assert ((gz1[i] - gz0[i]).abs() <= tol_z).all(), \
                f"fake_quantize: {name} grad_zero_point differs from slimops[reference] (tensor {i})"
    numel = sum(x.numel() for x in xs)
    assert flips <= 1e-5 * numel + 2, f"fake_quantize: {name}: {flips} of {numel} outputs one level off"
    parts = [f"{bad_gx} grad_x differ ({boundary} elements within half a step outside the grid)"]
    if ulp_y or flips:
        parts.append(f"{ulp_y} outputs an ulp off, {flips} a level off")
    return "; ".join(parts)


# ---- driver ---------------------------------------------------------------------------------------------------


def kernel_backends(op, device):
    names = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    return [b for b in names if _backend.why_not(op, b, device) is None]


def summarise(case, dtype, fns, samples, nbytes, notes_by_name):
    """Rows: case, dtype, contender, median ms, speed-up vs best baseline, GB/s, check."""
    med = {k: common.median_ms(v) for k, v in samples.items()}
    base = [k for k in med if fns[k][0]]
    best = min(base, key=lambda k: med[k])
    rows = []
    for name, ms in med.items():
        rows.append([case, str(dtype).replace("torch.", ""), name, ms, med[best] / ms, nbytes / (ms / 1e3) / 1e9,
                     notes_by_name.get(name, "")])
    return rows, med, best


def print_rows(header, rows):
    widths = [max(len(common._fmt(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  " + "  ".join(common._fmt(v).ljust(w) for v, w in zip(r, widths)), flush=True)


HEADER = ["case", "dtype", "contender", "median ms", "speed-up vs best baseline", "GB/s", "check vs slimops[reference]"]


def run_fda(device, dtypes, rounds, quick):
    rows = []
    kb = kernel_backends("fda_sign", device)
    for dtype in dtypes:
        for label, numel in (QUICK_FDA_SIZES if quick else FDA_SIZES):
            x, grad = fda_inputs(numel, device, dtype)
            for surrogate, n_terms in FDA_CASES:
                case = f"{label}, {surrogate}" + (f" n_terms {n_terms}" if n_terms else "")
                fns = fda_contenders(surrogate, n_terms, kb)
                want = fda_once(fns["slimops[reference]"][1], x, grad)
                notes = {name: check_fda(name, fn, want, x, grad, dtype, n_terms)[1] for name, (_, fn) in fns.items()
                         if name != "slimops[reference]"}
                del want
                steps = {name: fda_step(fn, x, grad) for name, (_, fn) in fns.items()}
                t0 = time.perf_counter()
                samples = common.time_side_by_side(steps, device, warmup=1, rounds=rounds)
                nbytes = 5 * numel * x.element_size()
                r, med, best = summarise(case, dtype, fns, samples, nbytes, notes)
                rows += r
                print(f"[fda_sign {case}, {str(dtype)[6:]}] best baseline {best} ({med[best]:.3g} ms); "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
                print_rows(HEADER, r)
            del x, grad
    return rows


def run_fq(device, dtypes, rounds, quick):
    rows, bars = [], []
    kb = kernel_backends("fake_quantize", device)
    for dtype in dtypes:
        for case in ("w", "a"):
            xs, ss, zs, gfs, axis, signed, label, numel = fq_problem(case, device, dtype, quick)
            fns = fq_contenders(axis, signed, kb)
            want = fq_once(fns["slimops[reference]"][1], xs, ss, zs, gfs)
            notes = {}
            for name, (_, fn) in fns.items():
                if name != "slimops[reference]":
                    notes[name] = check_fq(name, fn, want, xs, ss, zs, gfs, axis, signed, dtype)
            del want
            steps = {name: fq_step(fn, xs, ss, zs, gfs) for name, (_, fn) in fns.items()}
            t0 = time.perf_counter()
            samples = common.time_side_by_side(steps, device, warmup=1, rounds=rounds)
            nbytes = 5 * numel * xs[0].element_size()
            r, med, best = summarise(label, dtype, fns, samples, nbytes, notes)
            rows += r
            print(f"[fake_quantize {label}, {str(dtype)[6:]}] best baseline {best} ({med[best]:.3g} ms); "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            print_rows(HEADER, r)
            if case == "w":
                torch_name = "torch learnable per-channel"
                comp = "LSQ composite (grad-scale + round-STE)"
                for b in kb:
                    k = med[f"slimops[{b}]"]
                    rt, rc = med[torch_name] / k, med[comp] / k
                    met = "MET" if min(rt, rc) >= BAR else "NOT met"
                    bars.append(f"Bar (fake_quantize fwd+bwd >= {BAR:g}x torch's learnable fake-quant and the autograd "
                                f"LSQ composite on the 25M-parameter weight list), slimops[{b}], "
                                f"{str(dtype)[6:]}: {met} ({rt:.2f}x torch learnable per-channel, {rc:.2f}x LSQ "
                                f"composite).")
                    if quick:
                        bars[-1] += " (quick sizes: not the bar's workload)"
                    print(bars[-1], flush=True)
            del xs, ss, zs
    return rows, bars


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated, of " + ", ".join(OPS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU results use 2)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, of float32, bfloat16")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5 on CPU, 30 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds; prints only (no results appended)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write provenance and every table to PATH")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if any(o not in OPS for o in ops):
        ap.error(f"--ops: expected some of {', '.join(OPS)}, got {args.ops}")
    dtypes = []
    for d in args.dtypes.split(","):
        if d.strip() not in ("float32", "bfloat16"):
            ap.error(f"--dtypes: float32 and/or bfloat16, got {d!r}")
        dtypes.append(getattr(torch, d.strip()))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 30 if device.type == "cuda" else 5)
    write = not (args.no_write or args.quick)
    prov = common.provenance(device)
    print(prov, flush=True)
    command = "python bench/bench_quant.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dnames = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    sections = []
    t_start = time.perf_counter()
    if "fda_sign" in ops:
        rows = run_fda(device, dtypes, rounds, args.quick)
        notes = (f"`{command.strip()}`. fwd+bwd (grad_x), omega {OMEGA}, clip {CLIP}, medians of {rounds} interleaved "
                 f"rounds, {args.threads} threads. Baselines: the FDA-BNN composite (torch.sign + a Function summing "
                 f"n_terms cosines in the storage dtype), the torch STEs, and slimops[reference]. GB/s: 5 elements "
                 f"moved per element (x, y; grad, x, grad_x).")
        sections.append((f"fda_sign (sign, surrogate gradient), fwd+bwd, {dnames}", rows, notes))
    if "fake_quantize" in ops:
        rows, bars = run_fq(device, dtypes, rounds, args.quick)
        notes = (f"`{command.strip()}`. fwd+bwd of the sum of the outputs (grads of x, scale and, for (a), zero "
                 f"point), loop over the tensors for every contender, medians of {rounds} interleaved rounds, "
                 f"{args.threads} threads. Baselines: torch._fake_quantize_learnable_per_channel_affine / "
                 f"_per_tensor_affine with autograd, the LSQ composite (grad-scale + round-STE) and "
                 f"slimops[reference]. Scales and zero points are float32 (torch's learnable op needs it); in "
                 f"bfloat16 the LSQ composite thus computes and returns float32 (its outputs are not rounded to "
                 f"bfloat16). " + " ".join(bars))
        sections.append((f"fake_quantize (LSQ, {BITS}-bit), fwd+bwd, {dnames}", rows, notes))
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    for title, rows, notes in sections:
        if write:
            path = common.write_results(device, title, HEADER, rows, notes)
            print("appended to", path, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"provenance": prov, "command": command.strip(), "header": HEADER,
                       "sections": [{"title": t, "rows": r, "notes": n} for t, r, n in sections]}, f, indent=1)
        print("wrote", args.json, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
