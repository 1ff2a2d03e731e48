"""How much the op that ran just before moves a conv's time: the side-by-side benchmark's contenders each timed
right after each of the others (and after themselves), in shuffled pairs.

bench_channel_conv.py times its contenders round-robin in a fixed order (dense, gather, compact, slimops), so each
one always runs after the same neighbour. On the Xeon with AVX-512 and AMX (2026-12-06), as AVX2, the conv on
pre-compacted tensors took 8.88-8.97 ms after itself or after `gather` (whose last step is the same conv), 9.26
after the dense conv and 9.63 after channel_conv2d, while channel_conv2d took 9.98-10.42 whatever ran before it:
x compact at 128 @ 28², 50% kept, was 0.85-0.96 by pairing alone (another run: 0.885-0.995). This script measures
that table, so that a ratio from the benchmark can be read with its spread (docs/channel_conv.md).

    python bench/conv_order_effect.py                       # 128 -> 128 @ 28², 50% kept, 2 threads, float32
    python bench/as_isa.py avx2 bench/conv_order_effect.py --channels 64 --size 56

Each round runs every (predecessor, op) pair once, in a shuffled order (seeded): the predecessor untimed, then the
op timed. Prints the median time of each op after each predecessor (ms) and the range of x compact it implies.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (also fixes malloc's thresholds, as for the benchmark)
from bench_channel_conv import static_contenders  # noqa: E402

TIMED = ("compact", "slimops")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args(argv)
    if args.channels < 1 or args.size < 1 or not 0 < args.keep <= 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--channels, --size, --threads and --rounds must be positive and --keep in (0, 1]")
    torch.set_num_threads(args.threads)
    fns = static_contenders(torch.device("cpu"), torch.float32, 32, args.channels, args.size, args.keep, False, "auto")
    for fn in fns.values():
        fn(), fn()
    pairs = [(before, op) for before in fns for op in TIMED]
    times = {p: [] for p in pairs}
    order = random.Random(0)
    for _ in range(args.rounds):
        order.shuffle(pairs)
        for before, op in pairs:
            fns[before]()
            t0 = time.perf_counter()
            fns[op]()
            times[(before, op)].append(time.perf_counter() - t0)
    ms = {p: statistics.median(v) * 1e3 for p, v in times.items()}
    print(f"# {common.provenance(torch.device('cpu'))}")
    print(f"# {args.channels} -> {args.channels} @ {args.size}², {args.keep:.0%} kept, N = 32, 3x3, float32, "
          f"medians of {args.rounds} shuffled rounds (ms)")
    for op in TIMED:
        print(f"{op:8s}" + "".join(f"  after {before}: {ms[(before, op)]:.2f}" for before in fns))
    ratios = [ms[(b1, "compact")] / ms[(b2, "slimops")] for b1 in fns for b2 in fns]
    print(f"x compact (compact / slimops over every pairing): {min(ratios):.3f} - {max(ratios):.3f}; "
          f"the benchmark's own order (compact after gather, slimops after compact): "
          f"{ms[('gather', 'compact')] / ms[('compact', 'slimops')]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
