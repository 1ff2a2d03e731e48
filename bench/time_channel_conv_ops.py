"""The channel_conv family's four CPU ops alone (``torch.ops.slimops.*``, no autograd, no baseline), on fixed
tensors: for before/after comparisons of two builds of slimops, which the side-by-side benchmark
(bench_channel_conv.py) cannot make in one process. Build the other one somewhere and name it with --against:

    git archive <commit> slimops csrc setup.py pyproject.toml CMakeLists.txt | tar -x -C /tmp/before
    (cd /tmp/before && python setup.py build_ext --inplace)
    python bench/time_channel_conv_ops.py --against /tmp/before

The other build runs in a worker process (PYTHONPATH=DIR) that takes turns with this one, call by call: each round
times every op once here and once there, so the host's drift (±15-30% within minutes on a shared 2-vCPU VM, more
than most kernel changes) hits both builds alike. It prints both medians and the median of the per-round ratios
(this build / the other; < 1: this one is faster). Without --against it times this build alone.

Shapes: N = 32, 3x3, stride 1, padding 1; 128 channels at 28² kept 90% and 50%, 64 at 56² kept 50%, and with
--strided the last two at stride 2 (a random
per-sample mask with exactly that many rows for masked_conv2d, sorted random index sets for channel_conv2d).
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


def _serve() -> int:
    """The --against worker: per input line "CASE OP", one timed call of that op; prints its seconds."""
    calls = {}
    print(f"{os.path.dirname(slimops.__file__)}", flush=True)
    for line in sys.stdin:
        case, name = line.split()
        if case not in calls:
            calls[case] = op_calls(*(CASES + STRIDED)[int(case)], torch.Generator().manual_seed(int(case)))
        t0 = time.perf_counter()
        calls[case][name]()
        print(time.perf_counter() - t0, flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--strided", action="store_true", help="also the stride-2 shapes (3x3, stride 2, 50%% kept)")
    ap.add_argument("--against", metavar="DIR", help="another build of slimops (its repository root), timed in turns")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
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

    for i, (c, h, keep, stride) in enumerate(CASES + (STRIDED if args.strided else [])):
        calls = op_calls(c, h, keep, stride, torch.Generator().manual_seed(i))
        here = {name: [] for name in calls}
        other = {name: [] for name in calls}
        for r in range(args.rounds + 1):  # round 0 warms both up
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
                if r:
                    here[name].append(t)
                if worker is not None:
                    t = there(i, name)
                    if r:
                        other[name].append(t)
        for name in calls:
            line = f"{c} @ {h}², {keep:.0%}{' s2' if stride == 2 else ''}  {name:<24} {common.median_ms(here[name]):8.2f} ms"
            if worker is not None:
                ratio = statistics.median(a / b for a, b in zip(here[name], other[name]))
                line += f"   that {common.median_ms(other[name]):8.2f} ms   this/that {ratio:.3f}"
            print(line)
    if worker is not None:
        worker.stdin.close()
        worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
