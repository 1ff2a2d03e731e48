"""Compares the slimming methods on one model and data set through the real pipeline (``slim``).

    python bench/slim_methods.py                          # the default table: digits, vgg11 width 0.5
    python bench/slim_methods.py --runs "proximal-ns:lam=1.5,beta=100" "prox-sgd:penalty=l0"

Each run is ``METHOD[:key=value,...]`` (keys: penalty, lam, beta, a, percent, finetune); unset lam/beta
take the calibrated CLI defaults. Writes ``--out``/<run>/ (everything ``slim`` writes) and a markdown +
csv table (accuracy, channels kept, params, FLOPs, latency) to ``--results``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

DEFAULT_RUNS = ["none", "ns", "ns-tl1", "ns-lp:a=0.5", "prox-sgd:penalty=l1", "prox-sgd:penalty=tl1",
                "prox-sgd:penalty=l0", "proximal-ns"]


def parse_run(spec: str) -> tuple:
    method, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k == "penalty":
            kw[k] = v
        elif k == "finetune":
            kw["finetune_epochs"] = int(v)
        elif k in ("lam", "beta", "a", "percent"):
            kw[k] = float(v)
        else:
            raise SystemExit(f"slim_methods: unknown key '{k}' in run '{spec}'")
    return method, kw


def main(argv=None) -> None:
    from slimops.pruning.pipeline import slim

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--out", default="runs/methods")
    ap.add_argument("--results", default="bench/results/slimming-digits")
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for spec in args.runs:
            method, kw = parse_run(spec)
            name = spec.replace(":", "_").replace(",", "_").replace("=", "") + f"_s{seed}"
            t0 = time.perf_counter()
            m = slim(model=args.model, width=args.width, data=args.data, data_dir=args.data_dir, method=method,
                     epochs=args.epochs, seed=seed, out=os.path.join(args.out, name), progress=False, **kw)
            rows.append({"run": spec, "seed": seed, "method": method, "penalty": m["method"]["penalty"],
                         "lam": m["method"]["lam"], "beta": m["method"]["beta"], "percent": m["percent"],
                         "acc_before_prune": m["acc_before_prune"], "acc_pruned": m["acc_pruned_no_finetune"],
                         "acc": m["acc"], "finetune_epochs": m["finetune_epochs"],
                         "channels_kept": m["channels_kept"], "channels_total": m["channels_total"],
                         "params_pruned": m["params_pruned"], "params_dense": m["params_dense"],
                         "flops_pruned": m["flops_pruned"], "flops_dense": m["flops_dense"],
                         "latency_speedup": m["latency_speedup"], "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    write(args, rows)


def write(args, rows) -> None:
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# Slimming methods on {args.data}: {args.model} width {args.width}, {args.epochs} epochs",
             "",
             f"{datetime.date.today()}, git {sha}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads. Command: `python bench/slim_methods.py {' '.join(sys.argv[1:])}`.",
             "SGD lr 0.1 (/10 at 50% and 75%), momentum 0.9, wd 1e-4, batch 64; lam and beta are the CLI defaults "
             "unless the run names them. `acc pruned` is the compacted model with no fine-tuning, its BN statistics "
             "re-estimated from 100 training batches (`--bn-recal`); `acc before prune` is the dense model as "
             "trained. FLOPs are 2 x MACs per 32x32 image; the latency speed-up is dense / compacted, eval mode, "
             "batch 64, both timed in alternating rounds.", "",
             "| run | seed | lam | beta | prune rule | acc before prune | acc pruned | channels kept | params | FLOPs | latency speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rule = "exact zeros" if r["percent"] in (None, "") else f"lowest {float(r['percent']):.0%}"
        beta = f"{float(r['beta']):g}" if r["method"] == "proximal-ns" else "–"
        lines.append(f"| {r['run']} | {r['seed']} | {float(r['lam']):.3g} | {beta} | {rule} | {r['acc_before_prune']:.2%} | "
                     f"{r['acc']:.2%} | {r['channels_kept']}/{r['channels_total']} ({r['channels_kept'] / r['channels_total']:.0%}) | "
                     f"{r['params_pruned'] / 1e6:.3f}M / {r['params_dense'] / 1e6:.3f}M | "
                     f"{r['flops_pruned'] / 1e6:.1f}M / {r['flops_dense'] / 1e6:.1f}M | {r['latency_speedup']:.2f}x |")
    with open(args.results + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.results}.md and .csv")


if __name__ == "__main__":
    main()
