"""Benchmark: a ViT or SEMA-T compacted by its dimension gates (slimops.pruning.vit) against the dense model it came
from.

The gates are drawn at random (uniform in [0, 1)): latency depends on the shapes a plan leaves, not on how the
gates were trained. For each fraction of the gated dims removed (one global |gate| threshold, VTP's rule), the
dense model and the compacted one run forward side by side, interleaved (bench/common.py), on the same batch.
Reported: parameters, MACs (attention products included), median ms and the speed-up.

Target (docs/vit.md; issue: "the compacted models run measurably faster than the dense ones"): a speed-up that
grows with the fraction removed, measured in the same run as the dense baseline.

    python bench/bench_vit_compact.py                          # vit_ti, 224², batch 16, CPU 2 threads
    python bench/bench_vit_compact.py --model vit_s --batch 8 --device cuda
    python bench/bench_vit_compact.py --model sema_t --batch 8             # SEMA-T's blocks, the same gates
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops.models as M  # noqa: E402
from slimops.pruning.metrics import count_macs, count_params  # noqa: E402
from slimops.pruning.vit import compact_vit, vit_plan_from_gates  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_ti", choices=M.GATED_MODELS)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fractions", default="0.2,0.4,0.6")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(common.provenance(dev), flush=True)
    print(f"ISA: torch CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    torch.manual_seed(0)
    size = {"img_size": args.img_size} if args.model in M.RESOLUTION_MODELS else {}  # SEMA-T runs at any size
    gated = M.build(args.model, num_classes=1000, gates=True, **size).eval()
    dense = M.build(args.model, num_classes=1000, **size).eval()
    dense.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in gated.gates().values():
            w.copy_(torch.rand(w.shape, generator=g))
    shape = (3, args.img_size, args.img_size)
    x = torch.randn(args.batch, *shape, device=dev)
    dense = dense.to(dev)
    rows = []
    for frac in (float(f) for f in args.fractions.split(",")):
        plan = vit_plan_from_gates(gated, percent=frac)
        small = compact_vit(gated, plan).to(dev)
        with torch.inference_mode():
            s = common.time_side_by_side({"dense": lambda: dense(x), "compact": lambda: small(x)}, dev, warmup=2,
                                         rounds=args.rounds)
        t_d, t_c = common.median_ms(s["dense"]), common.median_ms(s["compact"])
        ratios = sorted(a / b for a, b in zip(s["dense"], s["compact"]))
        heads = sum(len(plan.heads_kept(i)) for i in range(len(plan.blocks)))
        row = [args.model, frac, f"{plan.summary()['gated_dims_kept']:.2f}", heads, count_params(dense),
               count_params(small), count_macs(dense.cpu(), shape), count_macs(small.cpu(), shape), t_d, t_c,
               ratios[len(ratios) // 2]]
        dense, small = dense.to(dev), small.to(dev)
        print(" | ".join(common._fmt(v) for v in row), flush=True)
        rows.append(row)
    header = ["model", "removed", "gated dims kept", "heads kept", "params dense", "params compact", "MACs dense",
              "MACs compact", "dense ms", "compact ms", "speed-up (median of rounds)"]
    if not args.no_write:
        note = (f"Batch {args.batch} at {args.img_size}², forward only, random gates (one global |gate| threshold). "
                "Target (not a result): a speed-up that grows with the fraction removed.")
        title = f"{'SEMA-T' if args.model == 'sema_t' else 'ViT'} compaction ({args.model})"
        print("appended to", common.write_results(dev, title, header, rows, note))


if __name__ == "__main__":
    main()
