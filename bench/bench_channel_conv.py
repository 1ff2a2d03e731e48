"""Benchmark of the channel_conv family against what a user of a slimmed network runs today.

Static sparsity (``channel_conv2d``, the same kept fraction of input and output channels) against:
  - ``dense``: ``F.conv2d`` on the full tensors (what a masked / un-rebuilt model pays);
  - ``gather``: ``index_select`` of x and of the weight block, then ``F.conv2d``;
  - ``compact``: ``F.conv2d`` on pre-compacted x and weight (the ideal: a physically pruned model).
Dynamic sparsity (``masked_conv2d``, a random per-sample mask keeping that fraction) against
``dense x mask`` (``F.conv2d(x, w, b) * mask``).

Shapes: ResNet-like 3x3 convs, N=32, 128->128 at 28x28 and 64->64 at 56x56, keep 25/50/75/90%;
forward, and forward+backward (grads of x, weight and bias). Times are medians of interleaved rounds
(bench/common.py). GFLOP/s counts the kept work (2 * N * OH * OW * |out| * |in| * 9). On a GPU the
table also gives that rate as a fraction of the measured dense-GEMM ceiling of the dtype.

Targets: CPU (2 threads) at 50% ``channel_conv2d`` >= 2.5x dense and >= 0.9x compact,
``masked_conv2d`` >= 1.4x dense x mask; GPU >= 0.9x compact (cuDNN) and dynamic >= 0.7/keep over
dense x mask; never slower than dense at 90%.

    python bench/bench_channel_conv.py                 # CPU, 2 threads, float32
    python bench/bench_channel_conv.py --device cuda --dtype bfloat16
    python bench/bench_channel_conv.py --stride 2 --keeps 0.5    # the downsampling convs (no target set)
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
from slimops.ops import channel_conv2d, masked_conv2d  # noqa: E402

SHAPES = [(32, 128, 28), (32, 64, 56)]
KEEPS = [0.25, 0.5, 0.75, 0.9]


def gemm_ceiling_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense GEMM rate (the FLOP roofline a conv can approach), in TFLOP/s."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = common.time_side_by_side({"mm": lambda: a @ b}, device, warmup=3, rounds=10)
    return 2 * n ** 3 / common.median_ms(s["mm"]) / 1e9


def _step(fn, inputs, backward: bool):
    """fn() or fn() then backward into the inputs' .grad (cleared first)."""
    if not backward:
        return lambda: fn()

    def run():
        for t in inputs:
            t.grad = None
        fn().sum().backward()
    return run


def static_contenders(device, dtype, n, c, h, keep, backward, backend, stride=1) -> dict:
    """The static contenders (dense, gather, compact, slimops) on seeded tensors, each a no-argument call (forward,
    or forward then backward into the inputs); also used by conv_order_effect.py."""
    g = torch.Generator(device="cpu").manual_seed(0)
    k = max(1, int(round(c * keep)))
    x = torch.randn(n, c, h, h, generator=g).to(device, dtype).requires_grad_(backward)
    w = (torch.randn(c, c, 3, 3, generator=g) * 0.05).to(device, dtype).requires_grad_(backward)
    b = torch.randn(c, generator=g).to(device, dtype).requires_grad_(backward)
    ii = torch.randperm(c, generator=g)[:k].sort().values.to(device)
    oi = torch.randperm(c, generator=g)[:k].sort().values.to(device)
    xc = x.detach().index_select(1, ii).contiguous().requires_grad_(backward)
    wc = w.detach()[oi][:, ii].contiguous().requires_grad_(backward)
    bc = b.detach()[oi].contiguous().requires_grad_(backward)
    return {
        "dense": _step(lambda: F.conv2d(x, w, b, stride, 1), (x, w, b), backward),
        "gather": _step(lambda: F.conv2d(x.index_select(1, ii), w.index_select(0, oi).index_select(1, ii),
                                         b.index_select(0, oi), stride, 1), (x, w, b), backward),
        "compact": _step(lambda: F.conv2d(xc, wc, bc, stride, 1), (xc, wc, bc), backward),
        "slimops": _step(lambda: channel_conv2d(x, w, b, ii, oi, stride, 1, check_indices=False, backend=backend),
                         (x, w, b), backward),
    }


def bench_static(device, dtype, n, c, h, keep, backward, rounds, backend, stride=1):
    fns = static_contenders(device, dtype, n, c, h, keep, backward, backend, stride)
    t = {name: common.median_ms(s) for name, s in common.time_side_by_side(fns, device, warmup=2, rounds=rounds).items()}
    oh, k = (h - 1) // stride + 1, max(1, int(round(c * keep)))  # 3x3, padding 1; kept channels
    flops = 2 * n * oh * oh * k * k * 9 * (3 if backward else 1)
    return t, flops


def bench_dynamic(device, dtype, n, c, h, keep, backward, rounds, backend, stride=1):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(n, c, h, h, generator=g).to(device, dtype).requires_grad_(backward)
    w = (torch.randn(c, c, 3, 3, generator=g) * 0.05).to(device, dtype).requires_grad_(backward)
    b = torch.randn(c, generator=g).to(device, dtype).requires_grad_(backward)
    k = max(1, int(round(c * keep)))
    order = torch.rand(n, c, generator=g).argsort(1)[:, :k]
    mask = torch.zeros(n, c, dtype=torch.bool).scatter_(1, order, True).to(device)
    mf = mask[:, :, None, None].to(dtype)
    fns = {
        "dense x mask": _step(lambda: F.conv2d(x, w, b, stride, 1) * mf, (x, w, b), backward),
        "slimops": _step(lambda: masked_conv2d(x, w, b, mask, stride, 1, backend=backend), (x, w, b), backward),
    }
    t = {name: common.median_ms(s) for name, s in common.time_side_by_side(fns, device, warmup=2, rounds=rounds).items()}
    oh = (h - 1) // stride + 1
    flops = 2 * n * oh * oh * k * c * 9 * (3 if backward else 1)
    return t, flops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU targets use 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="auto", help="slimops backend (auto, cpu, triton, reference)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--keeps", default=",".join(str(k) for k in KEEPS))
    ap.add_argument("--stride", type=int, default=1, help="the convs' stride (2: ResNet's downsampling 3x3 convs)")
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    keeps = [float(k) for k in args.keeps.split(",")]
    ceiling = gemm_ceiling_tflops(device, dtype) if device.type == "cuda" else None
    modes = [False, True] if args.backward else [False]

    static_rows, dynamic_rows = [], []
    for bwd in modes:
        for n, c, h in SHAPES:
            for keep in keeps:
                t, fl = bench_static(device, dtype, n, c, h, keep, bwd, args.rounds, args.backend, args.stride)
                rate = fl / (t["slimops"] * 1e-3) / 1e9  # GFLOP/s
                row = ["fwd+bwd" if bwd else "fwd", f"{n}x{c}->{c} {h}x{h}{' s' + str(args.stride) if args.stride != 1 else ''}", f"{keep:.0%}", t["dense"], t["gather"],
                       t["compact"], t["slimops"], t["dense"] / t["slimops"], t["gather"] / t["slimops"],
                       t["compact"] / t["slimops"], rate if ceiling is None else rate / 1e3 / ceiling]
                static_rows.append(row)
                print("static ", " | ".join(common._fmt(v) for v in row), flush=True)
                t, fl = bench_dynamic(device, dtype, n, c, h, keep, bwd, args.rounds, args.backend, args.stride)
                rate = fl / (t["slimops"] * 1e-3) / 1e9  # GFLOP/s
                row = ["fwd+bwd" if bwd else "fwd", f"{n}x{c}->{c} {h}x{h}{' s' + str(args.stride) if args.stride != 1 else ''}", f"{keep:.0%}", t["dense x mask"],
                       t["slimops"], t["dense x mask"] / t["slimops"], 0.7 / keep,
                       rate if ceiling is None else rate / 1e3 / ceiling]
                dynamic_rows.append(row)
                print("dynamic", " | ".join(common._fmt(v) for v in row), flush=True)

    rate_col = "GFLOP/s (kept work)" if ceiling is None else f"fraction of GEMM ceiling ({ceiling:.0f} TFLOP/s)"
    static_header = ["pass", "shape", "kept in & out", "dense ms", "gather ms", "compact ms", "slimops ms",
                     "x dense", "x gather", "x compact", rate_col]
    dynamic_header = ["pass", "shape", "kept per sample", "dense x mask ms", "slimops ms", "x dense x mask",
                      "GPU target 0.7/keep", rate_col]
    if not args.no_write:
        note = (f"backend `{args.backend}`, {args.dtype}, medians of {args.rounds} interleaved rounds. "
                "`x compact` >= 0.9 and, at 50%, `x dense` >= 2.5 are the CPU targets.")
        common.write_results(device, f"channel_conv2d (static kept channels), {args.dtype}", static_header,
                             static_rows, note)
        path = common.write_results(device, f"masked_conv2d (per-sample kept channels), {args.dtype}", dynamic_header,
                                    dynamic_rows, f"backend `{args.backend}`, {args.dtype}; CPU target at 50%: >= 1.4x.")
        print("results appended to", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
