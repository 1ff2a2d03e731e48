"""The channel_conv family's four CPU ops alone (``torch.ops.slimops.*``, no autograd, no baseline), on fixed
tensors: for before/after comparisons of two builds of slimops, which the side-by-side benchmark
(bench_channel_conv.py) cannot make in one process. Run it once per build, alternately, and compare the medians:

    git archive <commit> slimops csrc setup.py pyproject.toml CMakeLists.txt | tar -x -C /tmp/before
    (cd /tmp/before && python setup.py build_ext --inplace)
    for i in 1 2; do PYTHONPATH=/tmp/before python bench/time_channel_conv_ops.py
                     PYTHONPATH=. python bench/time_channel_conv_ops.py; done

Shapes: N = 32, 3x3, stride 1, padding 1; 128 channels at 28² kept 90% and 50%, 64 at 56² kept 50% (a random
per-sample mask with exactly that many rows for masked_conv2d, sorted random index sets for channel_conv2d).
Prints the ISA in use and one median (ms) per op and shape, the four ops of a shape timed in interleaved rounds
(bench/common.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401

CASES = [(128, 28, 0.9), (128, 28, 0.5), (64, 56, 0.5)]


def op_calls(c: int, h: int, keep: float, gen: torch.Generator) -> dict:
    ops = torch.ops.slimops
    x, w, b = torch.randn(32, c, h, h, generator=gen), torch.randn(c, c, 3, 3, generator=gen) * 0.05, \
        torch.randn(c, generator=gen)
    k = int(round(c * keep))
    order = torch.rand(32, c, generator=gen).argsort(1)[:, :k]
    mask = torch.zeros(32, c, dtype=torch.bool).scatter_(1, order, True)
    ii = torch.randperm(c, generator=gen)[:k].sort().values
    oi = torch.randperm(c, generator=gen)[:k].sort().values
    g, gc = torch.randn(32, c, h, h, generator=gen), torch.randn(32, k, h, h, generator=gen)
    geom = ([1, 1], [1, 1], [1, 1])
    return {
        "masked_conv2d": lambda: ops.masked_conv2d(x, w, b, mask, *geom),
        "masked_conv2d_backward": lambda: ops.masked_conv2d_backward(g, x, w, mask, *geom, [True, True, True]),
        "channel_conv2d": lambda: ops.channel_conv2d(x, w, b, ii, oi, *geom),
        "channel_conv2d_backward": lambda: ops.channel_conv2d_backward(gc, x, w, ii, oi, *geom, False,
                                                                       [True, True, True]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# slimops from {os.path.dirname(slimops.__file__)}; {common.provenance(torch.device('cpu'))}")
    gen = torch.Generator().manual_seed(0)
    for c, h, keep in CASES:
        samples = common.time_side_by_side(op_calls(c, h, keep, gen), torch.device("cpu"), warmup=1,
                                           rounds=args.rounds)
        for name, s in samples.items():
            print(f"{c} @ {h}², {keep:.0%}  {name:<24} {common.median_ms(s):8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
