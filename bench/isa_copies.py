"""The CPU kernels' ISA copies side by side (issue 16): the same calls timed under SLIMOPS_CPU_ISA=base, avx2 and
avx512 (each copy this CPU can run; one subprocess per copy, since the extension reads the variable once), with
torch's own op timed in the same processes as the baseline.

Cases (2 threads by default, float32): SEMA attention forward and fwd+bwd at SEMA-T stage 1 (16, 4 heads, 56x56,
d 32, window 7); the GFNet global filter fwd+bwd at (16, 14, 14, 384); kept_token_attention forward at DeiT-Ti
(64, 3 heads, 197 tokens, d 64, 60% kept); the fused prox_sgd_ and prox_adamw_ steps (l1) on bench_prox.py's
25M-parameter set in bfloat16. Baselines: partition + SDPA (sema's reference), torch.fft (spectral's reference),
index_select + SDPA, SGD(foreach=False) + softshrink and AdamW(fused) + softshrink (bench_prox.py's fastest torch
contenders in bfloat16).

    python bench/isa_copies.py                     # prints the table (and appends it to bench/results/<device>.md)
    python bench/isa_copies.py --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r'''
import json, statistics, sys, time
import torch
import torch.nn.functional as F
import slimops.ops as P
from slimops.info import cpu_isa
from slimops.reference import sema as RS, spectral as RF
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)

def med(f, reps):
    for _ in range(2):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

reps = int(sys.argv[2])
res = {"isa": cpu_isa()}
q, k, v = (torch.randn(16, 4, 56 * 56, 32, requires_grad=True) for _ in range(3))
g = torch.randn(16, 4, 56 * 56, 32)
res["sema fwd"] = (med(lambda: P.sema_attention(q, k, v, (56, 56), 7), reps),
                   med(lambda: RS.sema_attention(q, k, v, (56, 56), (7, 7)), reps))
res["sema fwd+bwd"] = (med(lambda: torch.autograd.grad(P.sema_attention(q, k, v, (56, 56), 7), (q, k, v), g), reps),
                       med(lambda: torch.autograd.grad(RS.sema_attention(q, k, v, (56, 56), (7, 7)), (q, k, v), g),
                           reps))
x = torch.randn(16, 14, 14, 384, requires_grad=True)
w = torch.randn(14, 8, 384, 2)
gy = torch.randn(16, 14, 14, 384)
res["spectral fwd+bwd"] = (med(lambda: torch.autograd.grad(P.spectral_filter(x, w), (x,), gy), reps),
                           med(lambda: torch.autograd.grad(RF.spectral_filter(x, w), (x,), gy), reps))
qt, kt, vt = (torch.randn(64, 3, 197, 64) for _ in range(3))
idx = torch.cat([torch.zeros(1, dtype=torch.long), (torch.randperm(196)[:117] + 1).sort().values])
res["kept_token fwd"] = (med(lambda: P.kept_token_attention(qt, kt, vt, idx, idx), reps),
                         med(lambda: F.scaled_dot_product_attention(qt.index_select(2, idx), kt.index_select(2, idx),
                                                                    vt.index_select(2, idx)), reps))
# the prox family on the 25M-parameter set of bench_prox.py (24 x 1024x1024 + 24 vectors), bfloat16: one SGD
# (momentum 0.9) + l1 prox step, and one AdamW + l1 prox step, against the fastest torch contender bench_prox.py
# found for each (the plain per-tensor SGD loop + softshrink; AdamW(fused) + softshrink)
shapes = [(1024, 1024)] * 24 + [(1024,)] * 24
bf = torch.bfloat16
ps = [torch.randn(s_, dtype=bf) * 0.1 for s_ in shapes]
gs = [torch.randn(s_, dtype=bf) * 0.01 for s_ in shapes]
bs = [torch.zeros(s_, dtype=bf) for s_ in shapes]
ms, vs = [torch.zeros(s_, dtype=bf) for s_ in shapes], [torch.zeros(s_, dtype=bf) for s_ in shapes]
steps = [torch.zeros(()) for _ in shapes]
tp = [p_.clone().requires_grad_() for p_ in ps]
for t_, g_ in zip(tp, gs):
    t_.grad = g_.clone()
sgd = torch.optim.SGD(tp, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
adamw = torch.optim.AdamW(tp, lr=1e-3, weight_decay=1e-2, fused=True)

def torch_step(opt, thresh):
    opt.step()
    with torch.no_grad():
        for t_ in tp:
            t_.copy_(F.softshrink(t_, thresh))

res["prox_sgd_ bf16 25M"] = (
    med(lambda: P.prox_sgd_(ps, gs, bs, lr=0.1, momentum=0.9, weight_decay=1e-4, penalty="l1", lam=1e-4), reps),
    med(lambda: torch_step(sgd, 1e-5), reps))
res["prox_adamw_ bf16 25M"] = (
    med(lambda: P.prox_adamw_(ps, gs, ms, vs, [], steps, lr=1e-3, penalty="l1", lam=0.1), reps),
    med(lambda: torch_step(adamw, 1e-4), reps))
print(json.dumps(res))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7, help="timed calls per case (median)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for isa in ("base", "avx2", "avx512"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMOPS_CPU_")}
        env.update(SLIMOPS_CPU_ISA=isa, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(args.threads), str(args.reps)], env=env,
                             capture_output=True, text=True, check=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        if res["isa"] != isa:  # the CPU caps it: that copy cannot run here
            print(f"{isa}: not on this CPU (runs {res['isa']})")
            continue
        for case, (ours, base) in ((c, t) for c, t in res.items() if c != "isa"):
            rows.append([case, isa, ours, base, base / ours])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    import common

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(common.provenance(device))
    header = ["case", "ISA copy", "slimops ms", "baseline ms", "speed-up"]
    for r in sorted(rows, key=lambda r: (r[0], r[1])):
        print(" | ".join(common._fmt(x) for x in r))
    if not args.no_write:
        notes = (f"`python bench/isa_copies.py {' '.join(sys.argv[1:] if argv is None else argv)}`. Medians of "
                 f"{args.reps} calls, {args.threads} threads, one process per ISA copy (SLIMOPS_CPU_ISA); the baseline "
                 "(partition + SDPA, torch.fft, index_select + SDPA, the torch optimizer + softshrink) is timed in the "
                 "same process.")
        print("appended to", common.write_results(device, "CPU kernels per ISA copy", header,
                                                  sorted(rows, key=lambda r: (r[0], r[1])), notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
