"""The weight gradient of a 3x3 conv, alone, across plane sizes: slimops' ``masked_conv2d_backward`` asked for
grad_w only (every channel kept, so it is the dense weight gradient) against oneDNN's
``aten.convolution_backward`` asked for the same. Which path slimops takes is in csrc/cpu/direct_conv.h: the direct
3x3 kernel for rows of 4 pixels or more (``kGwMinWidth``; 14 before 2026-12-06's second session; AVX-512, and AVX2
since its third), im2col + GEMM otherwise. ``python bench/as_isa.py avx2 bench/bench_conv_grad_w.py`` runs the AVX2
copy against oneDNN's AVX2 code.

Medians of interleaved rounds (bench/common.py), N = 32, stride 1, padding 1; GFLOP/s = 2 N H W C_out C_in 9 / time.

    python bench/bench_conv_grad_w.py                   # 256 channels at 4..20 px, 128 at 28, 64 at 56
    python bench/bench_conv_grad_w.py --rounds 5 --no-write
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401

CASES = [(256, 4), (256, 7), (256, 8), (256, 10), (256, 12), (256, 14), (256, 16), (256, 20), (128, 28), (64, 56)]
HEADER = ["plane", "channels", "slimops ms", "oneDNN ms", "slimops GFLOP/s", "oneDNN GFLOP/s", "x oneDNN"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(common.provenance(device), flush=True)
    one = [1, 1]
    rows = []
    for c, h in CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, c, h, h, generator=g)
        w = torch.randn(c, c, 3, 3, generator=g) * 0.05
        go = torch.randn(args.batch, c, h, h, generator=g)
        mask = torch.ones(args.batch, c, dtype=torch.bool)
        fns = {
            "slimops": lambda: torch.ops.slimops.masked_conv2d_backward(go, x, w, mask, one, one, one,
                                                                        [False, True, False]),
            "oneDNN": lambda: torch.ops.aten.convolution_backward(go, x, w, [c], one, one, one, False, [0, 0], 1,
                                                                  [False, True, False]),
        }
        t = {k: common.median_ms(v) for k, v in common.time_side_by_side(fns, device, warmup=2,
                                                                        rounds=args.rounds).items()}
        flop = 2.0 * args.batch * h * h * c * c * 9
        row = [f"{h}x{h}", c, t["slimops"], t["oneDNN"], flop / t["slimops"] / 1e6, flop / t["oneDNN"] / 1e6,
               t["oneDNN"] / t["slimops"]]
        rows.append(row)
        print(" | ".join(common._fmt(v) for v in row), flush=True)
    if not args.no_write:
        path = common.write_results(device, "3x3 conv weight gradient alone (masked_conv2d_backward, all kept)",
                                    HEADER, rows, f"`python bench/bench_conv_grad_w.py`, N = {args.batch}, medians "
                                    f"of {args.rounds} interleaved rounds, {args.threads} threads.")
        print("results appended to", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
