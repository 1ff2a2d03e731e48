"""Demo: proximal network slimming of a VGG on the embedded digits data, against its unpruned baseline.

Runs the slimming pipeline (``slimops.pruning.pipeline.slim``) twice with the same seed on
scikit-learn's bundled handwritten digits at 32×32:
  * ``baseline``: plain SGD (method ``none``), nothing pruned;
  * ``proximal-ns``: proximal network slimming (Bui et al. 2023) with the CLI's calibrated defaults:
    xi becomes exactly sparse, the channels with xi = 0 are cut, the network is compacted into a
    smaller dense VGG (no fine-tuning) and measured.
It prints a table — accuracy, channels kept, params and FLOPs before/after, and the measured CPU
latency ratio of the compacted model — and writes each run's files (metrics.json, plan.json, the
compacted weights, plots) under ``--out``, plus ``summary.json``.

Run: ``python -m slimops demo [--model vgg11] [--width 0.5] [--epochs 15] [--out runs/demo]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def table(base: dict, pns: dict) -> str:
    rows = [
        ("test accuracy", f"{base['acc']:.2%}", f"{pns['acc']:.2%}"),
        ("dense model, as trained", f"{base['acc_before_prune']:.2%}", f"{pns['acc_before_prune']:.2%} (BN statistics lag gamma)"),
        ("BN channels kept", f"{base['channels_kept']}/{base['channels_total']}",
         f"{pns['channels_kept']}/{pns['channels_total']} ({pns['kept_fraction']:.0%})"),
        ("params", f"{base['params_pruned']:,}", f"{pns['params_pruned']:,} ({pns['params_pruned'] / base['params_pruned']:.0%})"),
        ("FLOPs (2*MACs) per image", f"{base['flops_pruned']:.3g}", f"{pns['flops_pruned']:.3g} ({pns['flops_pruned'] / base['flops_pruned']:.0%})"),
        # both latencies from the proximal-ns run, where the dense and compacted VGG were timed side by side
        (f"CPU latency, batch {pns['latency_batch']}", f"{pns['latency_ms_dense']:.2f} ms",
         f"{pns['latency_ms_pruned']:.2f} ms ({pns['latency_speedup']:.2f}x faster)"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "baseline", "")])
    lines = [f"{'':<{w0}} | {'baseline':>{w1}} | proximal-ns (compacted)"]
    lines.append("-" * len(lines[0]) + "-" * 12)
    lines += [f"{a:<{w0}} | {b:>{w1}} | {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    from slimops.pruning.checkpoint import atomic_write_text
    from slimops.models import MODELS
    from slimops.pruning.cli import count, positive_float, seed
    from slimops.pruning.pipeline import slim

    ap = argparse.ArgumentParser(prog="slimops demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg11", choices=MODELS)
    ap.add_argument("--width", type=positive_float, default=0.5)
    ap.add_argument("--epochs", type=count, default=15)
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--threads", type=count, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {}
    for name, method in (("baseline", "none"), ("proximal-ns", "proximal-ns")):
        t0 = time.perf_counter()
        runs[name] = slim(model=args.model, width=args.width, data="digits", method=method, epochs=args.epochs,
                          seed=args.seed, out=os.path.join(args.out, name))
        runs[name]["seconds"] = time.perf_counter() - t0
    base, pns = runs["baseline"], runs["proximal-ns"]
    print(f"\n{args.model} (width {args.width}) on digits 32x32, {args.epochs} epochs, seed {args.seed}; "
          f"proximal-ns lam={pns['method']['lam']:.3g}, beta={pns['method']['beta']:g}, no fine-tuning\n")
    print(table(base, pns))
    print("\ntest accuracy of the compacted model is measured after re-estimating its BN statistics from training "
          "images (no labels, no weight changes): docs/slimming.md")
    summary = {"args": vars(args), "runs": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in runs.items()}}
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {args.out}/summary.json and, per run, metrics.json, plan.json, pruned.pt and plots "
          f"(scores.png, channels.png, curves.png)")
    return runs


if __name__ == "__main__":
    main()
