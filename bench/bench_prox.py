"""Benchmark of the fused proximal SGD step (`slimops.ops.prox_sgd_`) against what users run today.

One step = SGD (lr 0.1, momentum 0.9, weight decay 1e-4) followed by the l1 prox (soft threshold at
lr*lam) on every tensor. Parameter sets:
  (a) ResNet-56 (CIFAR): 167 small tensors, 0.85M parameters — launch/dispatch-bound;
  (b) a 25M-parameter set (24 x 1024x1024 matrices + 24 vectors) — memory-bound.
Contenders, timed side by side in one process, interleaved:
  slimops[<backend>]           the fused kernel (one pass, one launch per list on a GPU)
  torch SGD(foreach)+softshrink   torch.optim.SGD(foreach=True).step() then F.softshrink per tensor
  torch SGD(foreach)+foreach-prox  the same SGD, then the soft threshold as _foreach_ ops
  torch SGD(fused)+softshrink  (GPU only) torch's fused SGD kernel, then a per-tensor softshrink
  python loop                  SGD(foreach=False) + per-tensor softshrink (the plain loop)
  torch.compile(SGD+prox)      (--compile) inductor over the whole step
The ratio is against the fastest torch contender. GB/s counts the bytes the fused step must move
(read p, g, buf; write p, buf). On a GPU the fraction of the measured copy bandwidth is reported.

The other four ops of the family (`--op`, default all), and prox_sgd_ with the group lasso (in `--op prox_sgd_`),
on the same two parameter sets, each against
its eager torch composite in two forms, the `_foreach` ops and the per-tensor loop (which one is faster
depends on the op and the set), the ratio again against the fastest torch contender. Every contender
takes one step from the same start and must match slimops before anything is timed (fp32: assert_close,
rtol 1e-5, atol 1e-6; bf16/fp16: within 4 ulps bar 1 entry in 10^4, as the baselines round every
intermediate):
  prox_adamw_     AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2) + l1 prox at lr*lam,
                  lam 0.1. Against torch.optim.AdamW(foreach=True).step() + per-tensor softshrink or
                  + _foreach soft threshold, AdamW(fused=True) + softshrink (where torch has the fused
                  kernel for the device), the plain loop (foreach=False), and --compile. Bytes: read
                  p, g, m, v; write p, m, v. Skipped in float16: torch's AdamW keeps its moments in
                  float16, where g*g underflows and the first step overflows (no baseline).
  palm_slimming_  gamma <- lerp(gamma, xi, beta/(alpha+beta)); xi <- soft(lerp(xi, gamma, ...),
                  lam/(alpha+beta)): alpha 10 (= 1/lr, lr 0.1), beta 100, lam 0.0045 (the paper's VGG-19
                  setting). Against two _foreach_lerp_ + a _foreach soft threshold, and the per-tensor loop
                  (lerp_, lerp_, softshrink). In training it runs on the BN scales only; (a) and (b) bound
                  that from above. Bytes: read gamma, xi; write gamma, xi.
  penalty_grad_   grads += s dR/dp, s 1e-4, for l1 (s sign(p)) and tl1 (a = 1: s a(a+1) sign(p)/(a+|p|)^2),
                  each its own table. Against _foreach sign (+ abs, add, mul) + _foreach_add_/addcdiv_,
                  and the per-tensor loop. Bytes: read g, p; write g.
  prox_sgd_ l21   the same SGD step + the group lasso's block soft threshold of every slice along dim 0
                  (lam 20: threshold 2), against SGD(foreach) + per-tensor row norms (vector_norm) and one
                  multiply, and the plain loop. Bytes as prox_sgd_'s.
  split_step_     u <- hard threshold of w at sqrt(2 lam/beta) (l0, RVSM's penalty); w <- w - lr g -
                  lr beta (w - u): lr 0.1, beta 1, lam 1e-4. Against a _foreach composite (the l0 mask
                  as clamp_min(sign(|w| - t), 0)) and the per-tensor loop (F.hardshrink). Bytes: read w, g;
                  write w, u.
The hyperparameters make the thresholds large enough that a baseline with a wrong prox fails the check.
Targets for these four (targets, not results): CPU 2 threads >= 1.5x the fastest eager torch contender
(_foreach, per-tensor loop or, for AdamW, torch's fused kernel; torch.compile not counted) on (a) and (b).
No GPU target is set yet.

Run: `python bench/bench_prox.py [--op all|prox_sgd_|prox_adamw_|palm_slimming_|penalty_grad_|split_step_]
[--device cuda] [--threads 2] [--dtype float32] [--compile] [--rounds 30] [--no-write]`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401
from slimops.ops import palm_slimming_, penalty_grad_, prox_adamw_, prox_sgd_, split_step_  # noqa: E402

LR, MOM, WD, LAM = 0.1, 0.9, 1e-4, 1e-4
# prox_adamw_: lr, beta1, beta2, eps, weight decay, l1 lam (threshold lr*lam = 1e-4)
A_LR, A_B1, A_B2, A_EPS, A_WD, A_LAM = 1e-3, 0.9, 0.999, 1e-8, 1e-2, 0.1
# palm_slimming_: alpha = 1/lr, beta, lam (threshold lam/(alpha+beta) = 4.1e-5)
P_ALPHA, P_BETA, P_LAM = 10.0, 100.0, 0.0045
# penalty_grad_: s, the tl1 shape a
G_S, G_A = 1e-4, 1.0
# split_step_: lr, beta, l0 lam (hard threshold sqrt(2 lam/beta) = 0.0141)
S_LR, S_BETA, S_LAM = 0.1, 1.0, 1e-4
# prox_sgd_ with the group lasso (l21, groups = slices along dim 0): lam; the group threshold lr*lam = 2 cuts most
# rows of a vector (|x| < 2) and shrinks the rows of the matrices and conv weights (norms 12-32) by 6-16%
GROUP_LAM = 20.0

OPS = ["prox_sgd_", "prox_adamw_", "palm_slimming_", "penalty_grad_", "split_step_"]


def resnet56_shapes():
    """Parameter shapes of the CIFAR ResNet-56 (3 stages x 9 basic blocks, 16/32/64 channels)."""
    shapes = [(16, 3, 3, 3), (16,), (16,)]
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(9):
            shapes += [(c, c_in, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
            c_in = c
    return shapes + [(10, 64), (10,)]


def big_shapes():
    return [(1024, 1024), (1024,)] * 24


def make_set(shapes, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device, dtype) * 1e-3 for s in shapes]
    return params, grads


def slimops_sgd_steps(shapes, device, dtype, backends, penalty, lam):
    """name -> (step, written tensors): prox_sgd_ with `penalty` on a fresh copy of the set, per backend."""
    fns = {}
    for b in backends:
        p, g = make_set(shapes, device, dtype)
        bufs = [torch.zeros_like(x) for x in p]

        def step(p=p, g=g, bufs=bufs, b=b):
            prox_sgd_(p, g, bufs, lr=LR, momentum=MOM, weight_decay=WD, penalty=penalty, lam=lam, backend=b)

        fns[f"slimops[{b}]"] = (step, lambda p=p, bufs=bufs: p + bufs)
    return fns


def torch_sgd_then(shapes, device, dtype, prox_all_, **kw):
    """torch.optim.SGD(**kw).step(), then prox_all_(params) without autograd, on a fresh copy of the set:
    (params, optimizer, step)."""
    p, g = make_set(shapes, device, dtype)
    for x, gx in zip(p, g):
        x.grad = gx
    opt = torch.optim.SGD(p, lr=LR, momentum=MOM, weight_decay=WD, **kw)

    def step():
        opt.step()
        with torch.no_grad():
            prox_all_(p)

    return p, opt, step


def contenders(shapes, device, dtype, backends, with_compile):
    """name -> step function, each with its own copy of params/state (all start equal)."""
    thresh = LR * LAM
    fns = {k: v[0] for k, v in slimops_sgd_steps(shapes, device, dtype, backends, "l1", LAM).items()}

    def sgd_then_softshrink(**kw):
        """torch.optim.SGD(**kw).step(), then F.softshrink tensor by tensor, on a fresh copy of the set."""
        return torch_sgd_then(shapes, device, dtype, lambda ps: softshrink_each_(ps, thresh), **kw)

    fns["torch SGD(foreach)+softshrink"] = sgd_then_softshrink(foreach=True)[2]

    p2, o2, _ = sgd_then_softshrink(foreach=True)

    def sgd_foreach_foreach_prox():
        o2.step()
        with torch.no_grad():
            mag = torch._foreach_abs(p2)
            torch._foreach_sub_(mag, thresh)
            torch._foreach_clamp_min_(mag, 0.0)
            sgn = torch._foreach_sign(p2)
            torch._foreach_mul_(mag, sgn)
            torch._foreach_copy_(p2, mag)

    fns["torch SGD(foreach)+foreach-prox"] = sgd_foreach_foreach_prox
    if device.type == "cuda":
        fns["torch SGD(fused)+softshrink"] = sgd_then_softshrink(fused=True)[2]
    fns["python loop"] = sgd_then_softshrink(foreach=False)[2]
    if with_compile:
        fns["torch.compile(SGD+prox)"] = torch.compile(sgd_then_softshrink(foreach=True)[2], fullgraph=False)
    return fns


def run(device, dtype, backends, with_compile, rounds, build=None, bytes_per_elem=5):
    """Times every contender of `build(shapes, ...)` (default: prox_sgd_'s) on sets (a) and (b).

    `build` returns name -> step function, or name -> (step function, state) where state() gives the
    tensors a step writes; then every contender takes one step first and must match the first (slimops).
    """
    build = build or contenders
    rows = []
    bw = common.copy_bandwidth_gbs(device) if device.type == "cuda" else None
    for set_name, shapes in (("(a) ResNet-56, 167 tensors", resnet56_shapes()), ("(b) 25M params, 48 tensors", big_shapes())):
        numel = sum(torch.Size(s).numel() for s in shapes)
        fns = build(shapes, device, dtype, backends, with_compile)
        if any(isinstance(v, tuple) for v in fns.values()):
            check_same_step(fns, dtype, set_name)
            fns = {k: v[0] for k, v in fns.items()}
        inner = 20 if numel < 2_000_000 else 1
        samples = common.time_side_by_side(fns, device, warmup=3, rounds=rounds, inner=inner)
        med = {k: common.median_ms(v) for k, v in samples.items()}
        torch_names = [k for k in med if not k.startswith("slimops")]
        best_torch = min(torch_names, key=lambda k: med[k])
        nbytes = bytes_per_elem * numel * torch.tensor([], dtype=dtype).element_size()
        for name, ms in med.items():
            gbs = nbytes / (ms / 1e3) / 1e9
            row = [set_name, str(dtype).replace("torch.", ""), name, ms, med[best_torch] / ms, gbs]
            if bw is not None:
                row.append(gbs / bw)
            rows.append(row)
        print(f"{set_name}: strongest torch baseline = {best_torch} ({med[best_torch]:.3f} ms)")
    header = ["param set", "dtype", "contender", "median ms", "speed-up vs best torch", "GB/s"]
    if bw is not None:
        header.append(f"fraction of copy BW ({bw:.0f} GB/s)")
    return header, rows


def check_same_step(built, dtype, set_name):
    """One step of every contender from the same start; each must write what the first (slimops) writes.

    Run before timing, so that no benchmark times a baseline that computes something else.
    """
    for fn, _ in built.values():
        fn()
    names = list(built)
    want = built[names[0]][1]()
    for name in names[1:]:
        got = built[name][1]()
        assert len(got) == len(want), (name, len(got), len(want))
        if dtype in (torch.float32, torch.float64):
            for i, (x, y) in enumerate(zip(got, want)):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, i=i, name=name: (
                    f"{set_name}: {name} does not compute what {names[0]} does (written tensor {i}): {m}"))
            continue
        # bf16/fp16: a loose check. The baselines round every intermediate to the storage dtype and slimops
        # rounds once, so where a step cancels they may differ by an ulp of the tensor's largest entry, and
        # an entry within rounding of a threshold may fall on either side (at most 1 in 10^4 entries).
        eps, bad, total = torch.finfo(dtype).eps, 0, 0
        for x, y in zip(got, want):
            atol = eps * y.abs().amax().float().item() if y.numel() else 0.0
            bad += int((~torch.isclose(x.float(), y.float(), rtol=4 * eps, atol=atol)).sum())
            total += y.numel()
        assert bad <= 1e-4 * total, (f"{set_name}: {name} does not compute what {names[0]} does: {bad} of {total} "
                                     f"written entries differ by more than 4 ulps")


# ---- the other ops of the family: eager torch composites ---------------------------------------


def foreach_soft_threshold_(xs, t):
    """xs <- sign(x) max(|x| - t, 0) as _foreach ops: x - clamp(x, -t, t) (exact; 3 passes, not 6)."""
    c = torch._foreach_clamp_min(xs, -t)
    torch._foreach_clamp_max_(c, t)
    torch._foreach_sub_(xs, c)


def softshrink_each_(xs, t):
    for x in xs:
        x.copy_(F.softshrink(x, t))


def randn_set(shapes, device, dtype, seed, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(device, dtype) for s in shapes]


def adamw_contenders(shapes, device, dtype, backends, with_compile):
    """prox_adamw_ against torch.optim.AdamW + a separate l1 prox. name -> (step, written tensors)."""
    fns = {}
    thresh = A_LR * A_LAM
    for b in backends:
        p, g = make_set(shapes, device, dtype)
        m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
        steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in p]

        def step(p=p, g=g, m=m, v=v, steps=steps, b=b):
            prox_adamw_(p, g, m, v, [], steps, lr=A_LR, beta1=A_B1, beta2=A_B2, eps=A_EPS, weight_decay=A_WD,
                        penalty="l1", lam=A_LAM, backend=b)

        fns[f"slimops[{b}]"] = (step, lambda p=p, m=m, v=v: p + m + v)

    def adamw_then(prox, **kw):
        """torch.optim.AdamW(**kw).step(), then `prox` on the whole list, on a fresh copy of the set."""
        p, g = make_set(shapes, device, dtype)
        for x, gx in zip(p, g):
            x.grad = gx
        opt = torch.optim.AdamW(p, lr=A_LR, betas=(A_B1, A_B2), eps=A_EPS, weight_decay=A_WD, **kw)

        def step():
            opt.step()
            with torch.no_grad():
                prox(p, thresh)

        def state():
            return p + [opt.state[x]["exp_avg"] for x in p] + [opt.state[x]["exp_avg_sq"] for x in p]

        return step, state

    fns["torch AdamW(foreach)+softshrink"] = adamw_then(softshrink_each_, foreach=True)
    fns["torch AdamW(foreach)+foreach-prox"] = adamw_then(foreach_soft_threshold_, foreach=True)
    try:  # torch has a fused AdamW kernel on CUDA, and on CPU since 2.4
        fns["torch AdamW(fused)+softshrink"] = adamw_then(softshrink_each_, fused=True)
    except (RuntimeError, ValueError):
        pass
    fns["python loop"] = adamw_then(softshrink_each_, foreach=False)
    if with_compile:
        step, state = adamw_then(softshrink_each_, foreach=True)
        fns["torch.compile(AdamW+prox)"] = (torch.compile(step, fullgraph=False), state)
    return fns


def palm_contenders(shapes, device, dtype, backends, with_compile):
    """palm_slimming_ against its eager composite (the reference twin's formula, as lerps + soft threshold)."""
    fns = {}
    w = P_BETA / (P_ALPHA + P_BETA)
    thresh = P_LAM / (P_ALPHA + P_BETA)

    def fresh():
        return randn_set(shapes, device, dtype, 1), randn_set(shapes, device, dtype, 2)

    for b in backends:
        gam, xi = fresh()

        def step(gam=gam, xi=xi, b=b):
            palm_slimming_(gam, xi, alpha=P_ALPHA, beta=P_BETA, lam=P_LAM, penalty="l1", backend=b)

        fns[f"slimops[{b}]"] = (step, lambda gam=gam, xi=xi: gam + xi)

    gam1, xi1 = fresh()

    def foreach_palm():
        torch._foreach_lerp_(gam1, xi1, w)   # gamma <- (alpha gamma + beta xi) / (alpha + beta)
        torch._foreach_lerp_(xi1, gam1, w)   # xi <- (alpha xi + beta gamma_new) / (alpha + beta)
        foreach_soft_threshold_(xi1, thresh)

    fns["torch foreach (lerp + soft threshold)"] = (foreach_palm, lambda: gam1 + xi1)

    def loop_palm(gam, xi):
        for g_t, x_t in zip(gam, xi):
            g_t.lerp_(x_t, w)
            x_t.copy_(F.softshrink(x_t.lerp_(g_t, w), thresh))

    gam2, xi2 = fresh()
    fns["python loop (lerp_ + softshrink)"] = (lambda: loop_palm(gam2, xi2), lambda: gam2 + xi2)
    if with_compile:
        gam3, xi3 = fresh()
        compiled = torch.compile(loop_palm, fullgraph=False)
        fns["torch.compile(loop)"] = (lambda: compiled(gam3, xi3), lambda: gam3 + xi3)
    return fns


def penalty_grad_contenders(penalty):
    """penalty_grad_ (l1 or tl1) against grads += s dR/dp as _foreach ops and as a per-tensor loop."""
    s, a = G_S, G_A
    c = s * a * (a + 1.0)  # tl1: s a(a+1) sign(p) / (a + |p|)^2

    def loop_grad(grads, params):
        for g_t, p_t in zip(grads, params):
            if penalty == "l1":
                g_t.add_(p_t.sign(), alpha=s)
            else:
                g_t.addcdiv_(p_t.sign(), (p_t.abs() + a).square_(), value=c)

    def build(shapes, device, dtype, backends, with_compile):
        fns = {}
        for b in backends:
            p, g = make_set(shapes, device, dtype)

            def step(p=p, g=g, b=b):
                penalty_grad_(g, p, penalty=penalty, s=s, a=a, backend=b)

            fns[f"slimops[{b}]"] = (step, lambda g=g: g)

        p1, g1 = make_set(shapes, device, dtype)

        def foreach_grad():
            sg = torch._foreach_sign(p1)
            if penalty == "l1":
                torch._foreach_add_(g1, sg, alpha=s)
            else:
                den = torch._foreach_abs(p1)
                torch._foreach_add_(den, a)
                torch._foreach_mul_(den, den)
                torch._foreach_addcdiv_(g1, sg, den, value=c)

        name = "sign" if penalty == "l1" else "sign, abs, add, mul + addcdiv_"
        fns[f"torch foreach ({name})"] = (foreach_grad, lambda: g1)
        p2, g2 = make_set(shapes, device, dtype)
        fns["python loop"] = (lambda: loop_grad(g2, p2), lambda: g2)
        if with_compile:
            p3, g3 = make_set(shapes, device, dtype)
            compiled = torch.compile(loop_grad, fullgraph=False)
            fns["torch.compile(loop)"] = (lambda: compiled(g3, p3), lambda: g3)
        return fns

    return build


def split_contenders(shapes, device, dtype, backends, with_compile):
    """split_step_ (l0) against u = hard threshold of w; w -= lr g + lr beta (w - u), eager."""
    fns = {}
    thresh = (2.0 * S_LAM / S_BETA) ** 0.5

    def fresh():
        w, g = make_set(shapes, device, dtype)
        return w, g, [torch.zeros_like(x) for x in w]

    for b in backends:
        w, g, u = fresh()

        def step(w=w, g=g, u=u, b=b):
            split_step_(w, g, u, lr=S_LR, beta=S_BETA, penalty="l0", lam=S_LAM, backend=b)

        fns[f"slimops[{b}]"] = (step, lambda w=w, u=u: w + u)

    w1, g1, u1 = fresh()

    def foreach_split():
        keep = torch._foreach_abs(w1)          # 1 where |w| > t, else 0
        torch._foreach_sub_(keep, thresh)
        torch._foreach_sign_(keep)
        torch._foreach_clamp_min_(keep, 0.0)
        torch._foreach_mul_(keep, w1)          # keep = u
        torch._foreach_copy_(u1, keep)
        torch._foreach_sub_(keep, w1)          # keep = u - w
        torch._foreach_add_(w1, g1, alpha=-S_LR)
        torch._foreach_add_(w1, keep, alpha=S_LR * S_BETA)

    fns["torch foreach (l0 mask + 2 axpy)"] = (foreach_split, lambda: w1 + u1)

    def loop_split(w, g, u):
        for w_t, g_t, u_t in zip(w, g, u):
            u_t.copy_(F.hardshrink(w_t, thresh))
            d = w_t - u_t
            w_t.add_(g_t, alpha=-S_LR).add_(d, alpha=-S_LR * S_BETA)

    w2, g2, u2 = fresh()
    fns["python loop (hardshrink)"] = (lambda: loop_split(w2, g2, u2), lambda: w2 + u2)
    if with_compile:
        w3, g3, u3 = fresh()
        compiled = torch.compile(loop_split, fullgraph=False)
        fns["torch.compile(loop)"] = (lambda: compiled(w3, g3, u3), lambda: w3 + u3)
    return fns


# op -> [(results title without dtype, build, bytes moved per element in the storage dtype, notes)]
def group_contenders(shapes, device, dtype, backends, with_compile):
    """prox_sgd_ with penalty l21 (block soft threshold of every slice along dim 0) against torch.optim.SGD(foreach)
    + the block soft threshold per tensor (row norms by torch.linalg.vector_norm, then one multiply), and the plain
    loop. name -> (step, written tensors)."""
    t = LR * GROUP_LAM
    fns = slimops_sgd_steps(shapes, device, dtype, backends, "l21", GROUP_LAM)

    def block_soft_threshold_(xs):
        for x in xs:
            rows = x.reshape(x.shape[0], -1)
            n = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=torch.float32)
            rows.mul_((1 - t / n).clamp_min_(0).nan_to_num_(0.0).to(x.dtype))  # a zero row (n = 0) stays 0

    def sgd_then_group(**kw):
        p, opt, step = torch_sgd_then(shapes, device, dtype, block_soft_threshold_, **kw)
        return step, lambda: p + [opt.state[x]["momentum_buffer"] for x in p]

    fns["torch SGD(foreach)+row norms"] = sgd_then_group(foreach=True)
    fns["python loop"] = sgd_then_group(foreach=False)
    if with_compile:
        step, state = sgd_then_group(foreach=True)
        fns["torch.compile(SGD+group prox)"] = (torch.compile(step, fullgraph=False), state)
    return fns


def benchmarks():
    target = ("Target (not a result): CPU 2 threads >= 1.5x the fastest eager torch contender (torch.compile not "
              "counted) on (a) and (b).")
    return {
        "prox_sgd_": [("prox_sgd_ (SGD momentum 0.9 + l1 prox)", contenders, 5,
                       "Targets: CPU 2 threads >= 2x on (a), >= 1.3x on (b); GPU >= 85% "
                       "of copy bandwidth on (b) and >= 1.8x over torch fused SGD + separate prox."),
                      ("prox_sgd_ (SGD momentum 0.9 + group lasso l21 prox, groups along dim 0)", group_contenders, 5,
                       f"lam {GROUP_LAM} (group threshold {LR * GROUP_LAM:g}). No target set; the l1 step's targets "
                       "are the reference (a group step reads each row twice, the second time from cache).")],
        "prox_adamw_": [("prox_adamw_ (AdamW + l1 prox)", adamw_contenders, 7,
                         f"lr {A_LR}, betas ({A_B1}, {A_B2}), eps {A_EPS}, weight decay {A_WD}, lam {A_LAM}. "
                         f"{target}")],
        "palm_slimming_": [("palm_slimming_ (proximal network slimming gamma/xi update, l1)", palm_contenders, 4,
                            f"alpha {P_ALPHA}, beta {P_BETA}, lam {P_LAM}. {target}")],
        "penalty_grad_": [(f"penalty_grad_ ({pen} subgradient added to grads)", penalty_grad_contenders(pen), 3,
                           f"s {G_S}" + (f", a {G_A}" if pen == "tl1" else "") + f". {target}")
                          for pen in ("l1", "tl1")],
        "split_step_": [("split_step_ (relaxed variable splitting, l0)", split_contenders, 4,
                         f"lr {S_LR}, beta {S_BETA}, lam {S_LAM}. {target}")],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="all", choices=["all"] + OPS, help="which op of the family to time (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU targets use 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the torch composite")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(common.provenance(device))
    print(f"ISA: torch CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    table = benchmarks()
    for op in OPS if args.op == "all" else [args.op]:
        backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
        backends = [b for b in backends if slimops._backend.why_not(op, b, device) is None]
        if op == "prox_adamw_" and dtype == torch.float16:
            # torch.optim.AdamW keeps its moments in the parameter dtype: in float16, g*g of a 1e-3
            # gradient is 0, and its first step divides by eps (p -> inf); slimops computes in float32.
            print("\nprox_adamw_, float16: skipped (torch.optim.AdamW on float16 parameters overflows on this "
                  "set, so it is no baseline)")
            continue
        for title, build, bytes_per_elem, notes in table[op]:
            if args.op == "all" or len(table[op]) > 1:
                print(f"\n{title}, {args.dtype}")
            header, rows = run(device, dtype, backends, args.compile, args.rounds, build, bytes_per_elem)
            widths = [max(len(common._fmt(r[i])) for r in rows + [header]) for i in range(len(header))]
            for r in [header] + rows:
                print("  ".join(common._fmt(v).ljust(w) for v, w in zip(r, widths)))
            if not args.no_write:
                path = common.write_results(device, f"{title}, {args.dtype}", header, rows, notes=notes)
                print("appended to", path)


if __name__ == "__main__":
    main()
