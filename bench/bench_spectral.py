"""Benchmark of the spectral family against the torch.fft path a GFNet / AFFNet user runs today.

Contenders, timed side by side on the same inputs (bench/common.py):
  - ``torch.fft``: the reference twin (``rfft2`` in float32 -> multiply -> ``irfft2``; for the adaptive filter
    the AFNO/AFFNet einsum MLP in between), autograd for the backward — GFNet's and AFFNet's own code;
  - ``torch.compile``: the same function compiled (``--compile``; inductor fuses the pointwise work around
    the FFTs);
  - ``slimops``: ``slimops.ops.spectral_filter`` / ``adaptive_spectral_filter`` with ``--backend`` (auto:
    the C++ kernel on CPU; Triton's fused kernel for grids <= 64 on CUDA), plus on CUDA each GPU backend
    (``slimops[triton]``, ``slimops[cuda]``) separately.

Shapes (B, H, W, C) are GFNet/AFFNet stages: (64, 14, 14, 384), (32, 56, 56, 96), (64, 28, 28, 192),
(64, 7, 7, 768); forward, and forward + backward (grads of x and the filter). On a GPU the table gives the
achieved memory rate as a fraction of the measured copy bandwidth for the ideal traffic of the op: x read
and y written once in the input dtype (forward), plus grad read, x re-read and grad_x written (backward).

Targets: CPU (2 threads) >= 1.5x fwd+bwd over torch.fft at (64, 14, 14, 384); GPU >= 3x over the
torch.fft fp32 path and >= 70% of the memory roofline, bf16 included.

    python bench/bench_spectral.py                       # CPU, 2 threads, float32, both ops
    python bench/bench_spectral.py --device cuda --dtype bfloat16 --compile
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401
from slimops.ops import adaptive_spectral_filter, spectral_filter  # noqa: E402
from slimops.reference import spectral as ref  # noqa: E402

SHAPES = [(64, 14, 14, 384), (32, 56, 56, 96), (64, 28, 28, 192), (64, 7, 7, 768)]


def _inputs(op, shape, device, dtype, blocks):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, w, c = shape
    x = torch.randn(b, h, w, c, generator=g).to(device, dtype)
    if op == "spectral_filter":
        return x, [(torch.randn(h, w // 2 + 1, c, 2, generator=g) * 0.02).to(device)]
    cb = c // blocks
    ws = [torch.randn(2, blocks, cb, cb, generator=g) * 0.02, torch.randn(2, blocks, cb, generator=g) * 0.02,
          torch.randn(2, blocks, cb, cb, generator=g) * 0.02, torch.randn(2, blocks, cb, generator=g) * 0.02]
    return x, [t.to(device) for t in ws]  # float32 parameters, as under autocast


def _contenders(op, device, backend, compile_ref, blocks):
    if op == "spectral_filter":
        def ours(b):
            return lambda x, ws: spectral_filter(x, *ws, backend=b)
        base = ref.spectral_filter
    else:
        def ours(b):
            return lambda x, ws: adaptive_spectral_filter(x, *ws, blocks=blocks, backend=b)

        def base(x, *ws):
            return ref.adaptive_spectral_filter(x, *ws, blocks=blocks)
    fns = {"torch.fft": lambda x, ws: base(x, *ws)}
    if compile_ref:
        compiled = torch.compile(base, dynamic=False)
        fns["torch.compile"] = lambda x, ws: compiled(x, *ws)
    fns["slimops"] = ours(backend)
    if device.type == "cuda" and backend == "auto":
        for b in slimops._backend.available(op, device):
            if b in ("triton", "cuda"):
                fns[f"slimops[{b}]"] = ours(b)
    return fns


def _step(fn, x, ws, backward):
    if not backward:
        def run():
            with torch.no_grad():
                fn(x, ws)
        return run
    grad = torch.randn_like(x)
    leaves = [x.detach().requires_grad_()] + [w.detach().requires_grad_() for w in ws]

    def run():
        for t in leaves:
            t.grad = None
        fn(leaves[0], leaves[1:]).backward(grad)
    return run


def bench(op, shape, device, dtype, backward, rounds, backend, compile_ref, blocks):
    x, ws = _inputs(op, shape, device, dtype, blocks)
    fns = _contenders(op, device, backend, compile_ref, blocks)
    steps = {}
    for name, fn in fns.items():
        try:
            _step(fn, x, ws, backward)()  # warm up / compile; a contender that cannot run is reported, not fatal
            steps[name] = _step(fn, x, ws, backward)
        except Exception as e:  # pragma: no cover - depends on the machine
            print(f"  {name}: cannot run ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    samples = common.time_side_by_side(steps, device, warmup=1, rounds=rounds)
    times = {k: common.median_ms(v) for k, v in samples.items()}
    elem = torch.finfo(dtype).bits // 8
    traffic = x.numel() * elem * (5 if backward else 2)  # bytes the op must move at least
    return times, traffic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU target uses 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="auto", help="slimops backend (auto, cpu, cuda, triton, reference)")
    ap.add_argument("--ops", default="spectral_filter,adaptive_spectral_filter")
    ap.add_argument("--blocks", type=int, default=8, help="AFF channel blocks")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5 on CPU, 30 on CUDA)")
    ap.add_argument("--shapes", default=None, help="e.g. 64x14x14x384,32x56x56x96 (default: the four stages)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the torch.fft path")
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rounds = args.rounds or (30 if device.type == "cuda" else 5)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bw = common.copy_bandwidth_gbs(device) if device.type == "cuda" else None
    modes = [False, True] if args.backward else [False]
    for op in args.ops.split(","):
        rows = []
        for bwd in modes:
            for shape in shapes:
                times, traffic = bench(op, shape, device, dtype, bwd, rounds, args.backend, args.compile, args.blocks)
                base = times.get("torch.fft")
                best_torch = min(t for k, t in times.items() if not k.startswith("slimops"))
                for name, t in times.items():
                    rate = traffic / (t * 1e-3) / 1e9
                    row = ["fwd+bwd" if bwd else "fwd", "x".join(map(str, shape)), name, t,
                           base / t if base else float("nan"), best_torch / t,
                           rate if bw is None else rate / bw]
                    rows.append(row)
                    print(f"{op:<26}", " | ".join(common._fmt(v) for v in row), flush=True)
        rate_col = "GB/s (ideal traffic)" if bw is None else f"fraction of copy bandwidth ({bw:.0f} GB/s)"
        header = ["pass", "B x H x W x C", "contender", "median ms", "x torch.fft", "x best torch", rate_col]
        if not args.no_write:
            note = (f"backend `{args.backend}`, x {args.dtype} (filter weights float32), medians of {rounds} "
                    "interleaved rounds. CPU target: >= 1.5x fwd+bwd at 64x14x14x384 (spectral_filter); GPU: >= 3x "
                    "over torch.fft and >= 0.7 of copy bandwidth.")
            path = common.write_results(device, f"{op}, {args.dtype}", header, rows, note)
            print("results appended to", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
