"""The channel_conv family's four CPU ops alone (``torch.ops.slimops.*``, no autograd, no baseline), on fixed
tensors: for before/after comparisons of two builds of slimops, which the side-by-side benchmark
(bench_channel_conv.py) cannot make in one process. Build the other one somewhere and name it with --against:

    git archive <commit> slimops csrc setup.py pyproject.toml CMakeLists.txt | tar -x -C /tmp/before
    (cd /tmp/before && python setup.py build_ext --inplace)
    python bench/time_channel_conv_ops.py --against /tmp/before

The other build runs in a worker process (PYTHONPATH=DIR) that takes turns with this one, call by call: each round
times every op once here and once there, so the host's drift (±15-30% within minutes on a shared 2-vCPU VM, more
than most kernel changes) hits both builds alike. Which build goes first alternates by round, and the ratio is taken
over pairs of rounds (one each way): while this build always went first, two identical builds read 0.90
(channel_conv2d, 512 @ 7²) to 0.98 (128 @ 28²), a bias as large as the changes the tool times (until 2026-12-06's
seventh session; its figures before then carry it). It prints both medians and the median of the per-pair ratios
(this build / the other; < 1: this one is faster). Without --against it times this build alone.

Shapes: N = 32, 3x3, stride 1, padding 1; 128 channels at 28² kept 90% and 50%, 64 at 56² kept 50%, with
--strided the last two at stride 2, and with --small 256 at 14² and 512 at 7², kept 50% (a random per-sample mask
with exactly that many rows for masked_conv2d, sorted random index sets for channel_conv2d).
Prints the ISA in use and the medians (ms) per op and shape.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401

CASES = [(128, 28, 0.9, 1), (128, 28, 0.5, 1), (64, 56, 0.5, 1)]  # channels, size, kept, stride
STRIDED = [(128, 28, 0.5, 2), (64, 56, 0.5, 2)]  # with --strided
SMALL = [(256, 14, 0.5, 1), (512, 7, 0.5, 1)]  # with --small: planes the kernels read from the padded buffer
ALL = CASES + STRIDED + SMALL  # the worker's case numbers index this


def op_calls(c: int, h: int, keep: float, stride: int, gen: torch.Generator) -> dict:
    ops = torch.ops.slimops
    x, w, b = torch.randn(32, c, h, h, generator=gen), torch.randn(c, c, 3, 3, generator=gen) * 0.05, \
        torch.randn(c, generator=gen)
    k = int(round(c * keep))
    order = torch.rand(32, c, generator=gen).argsort(1)[:, :k]
    mask = torch.zeros(32, c, dtype=torch.bool).scatter_(1, order, True)
    ii = torch.randperm(c, generator=gen)[:k].sort().values
    oi = torch.randperm(c, generator=gen)[:k].sort().values
    oh = (h - 1) // stride + 1
    g, gc = torch.randn(32, c, oh, oh, generator=gen), torch.randn(32, k, oh, oh, generator=gen)
    geom = ([stride, stride], [1, 1], [1, 1])
    return {
        "masked_conv2d": lambda: ops.masked_conv2d(x, w, b, mask, *geom),
        "masked_conv2d_backward": lambda: ops.masked_conv2d_backward(g, x, w, mask, *geom, [True, True, True]),
        "channel_conv2d": lambda: ops.channel_conv2d(x, w, b, ii, oi, *geom),
        "channel_conv2d_backward": lambda: ops.channel_conv2d_backward(gc, x, w, ii, oi, *geom, False,
                                                                       [True, True, True]),
    }


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _serve() -> int:
    """The --against worker: per input line "CASE OP", one timed call of that op; prints its seconds."""
    calls = {}
    print(f"{os.path.dirname(slimops.__file__)}", flush=True)
    for line in sys.stdin:
        case, name = line.split()
        if case not in calls:
            calls[case] = op_calls(*ALL[int(case)], torch.Generator().manual_seed(int(case)))
        print(_seconds(calls[case][name]), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (an even number: they pair up)")
    ap.add_argument("--strided", action="store_true", help="also the stride-2 shapes (3x3, stride 2, 50%% kept)")
    ap.add_argument("--small", action="store_true", help="also 256 @ 14² and 512 @ 7² (50%% kept)")
    ap.add_argument("--against", metavar="DIR", help="another build of slimops (its repository root), timed in turns")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.rounds % 2:
        ap.error("--rounds must be an even number >= 2 (the ratios are taken over pairs of rounds)")
    torch.set_num_threads(args.threads)
    if args.serve:
        return _serve()
    print(f"# slimops from {os.path.dirname(slimops.__file__)}; {common.provenance(torch.device('cpu'))}")
    worker = None
    if args.against:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.against))
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--threads", str(args.threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                  cwd=os.path.abspath(args.against))
        print(f"# against slimops from {worker.stdout.readline().strip()} (ratio: this / that, per round)")

    def there(case: int, name: str) -> float:
        worker.stdin.write(f"{case} {name}\n")
        worker.stdin.flush()
        return float(worker.stdout.readline())

    chosen = CASES + (STRIDED if args.strided else []) + (SMALL if args.small else [])
    for c, h, keep, stride in chosen:
        i = ALL.index((c, h, keep, stride))
        calls = op_calls(c, h, keep, stride, torch.Generator().manual_seed(i))
        here = {name: [] for name in calls}
        other = {name: [] for name in calls}
        for r in range(args.rounds + 1):  # round 0 warms both up
            for name, fn in calls.items():
                # who goes first alternates by round (the module docstring says why)
                if worker is not None and r % 2 == 1:
                    t_there, t_here = there(i, name), _seconds(fn)
                else:
                    t_here = _seconds(fn)
                    t_there = there(i, name) if worker is not None else 0.0
                if r:
                    here[name].append(t_here)
                    if worker is not None:
                        other[name].append(t_there)
        for name in calls:
            line = f"{c} @ {h}², {keep:.0%}{' s2' if stride == 2 else ''}  {name:<24} {common.median_ms(here[name]):8.2f} ms"
            if worker is not None:
                a, b = here[name], other[name]  # rounds in pairs, one with each build first: the order cancels
                ratio = statistics.median((a[k] + a[k + 1]) / (b[k] + b[k + 1]) for k in range(0, len(a) - 1, 2))
                line += f"   that {common.median_ms(other[name]):8.2f} ms   this/that {ratio:.3f}"
            print(line)
    if worker is not None:
        worker.stdin.close()
        worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
