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

Run: `python bench/bench_prox.py [--device cuda] [--threads 2] [--compile]`.
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
from slimops.ops import prox_sgd_  # noqa: E402

LR, MOM, WD, LAM = 0.1, 0.9, 1e-4, 1e-4


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


def contenders(shapes, device, dtype, backends, with_compile):
    """name -> step function, each with its own copy of params/state (all start equal)."""
    fns = {}
    thresh = LR * LAM

    for b in backends:
        p, g = make_set(shapes, device, dtype)
        bufs = [torch.zeros_like(x) for x in p]

        def step(p=p, g=g, bufs=bufs, b=b):
            prox_sgd_(p, g, bufs, lr=LR, momentum=MOM, weight_decay=WD, penalty="l1", lam=LAM, backend=b)

        fns[f"slimops[{b}]"] = step

    def sgd_then_softshrink(**kw):
        """torch.optim.SGD(**kw).step(), then F.softshrink tensor by tensor, on a fresh copy of the set."""
        p, g = make_set(shapes, device, dtype)
        for x, gx in zip(p, g):
            x.grad = gx
        opt = torch.optim.SGD(p, lr=LR, momentum=MOM, weight_decay=WD, **kw)

        def step():
            opt.step()
            with torch.no_grad():
                for x in p:
                    x.copy_(F.softshrink(x, thresh))

        return p, opt, step

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


def run(device, dtype, backends, with_compile, rounds):
    rows = []
    bw = common.copy_bandwidth_gbs(device) if device.type == "cuda" else None
    for set_name, shapes in (("(a) ResNet-56, 167 tensors", resnet56_shapes()), ("(b) 25M params, 48 tensors", big_shapes())):
        numel = sum(torch.Size(s).numel() for s in shapes)
        fns = contenders(shapes, device, dtype, backends, with_compile)
        inner = 20 if numel < 2_000_000 else 1
        samples = common.time_side_by_side(fns, device, warmup=3, rounds=rounds, inner=inner)
        med = {k: common.median_ms(v) for k, v in samples.items()}
        torch_names = [k for k in med if not k.startswith("slimops")]
        best_torch = min(torch_names, key=lambda k: med[k])
        nbytes = 5 * numel * torch.tensor([], dtype=dtype).element_size()
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU targets use 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of SGD+prox")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    backends = [b for b in backends if slimops._backend.why_not("prox_sgd_", b, device) is None]
    header, rows = run(device, dtype, backends, args.compile, args.rounds)
    widths = [max(len(common._fmt(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(common._fmt(v).ljust(w) for v, w in zip(r, widths)))
    if not args.no_write:
        path = common.write_results(device, f"prox_sgd_ (SGD momentum 0.9 + l1 prox), {args.dtype}", header, rows,
                                    notes="Targets: CPU 2 threads >= 2x on (a), >= 1.3x on (b); GPU >= 85% "
                                          "of copy bandwidth on (b) and >= 1.8x over torch fused SGD + separate prox.")
        print("appended to", path)


if __name__ == "__main__":
    main()
