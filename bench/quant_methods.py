"""Compares the quantisation methods of ``slimops quantize`` on one teacher, through the real pipeline.

    python bench/quant_methods.py --teacher runs/fp/dense.pt           # the default table (digits)
    python bench/quant_methods.py --teacher T --runs kd:4/4 "fda:1/1:seeds=0,1,2" --epochs 15

Each run is ``METHOD:W/A[:label-free][:seeds=a,b,c]``; a run with several seeds reports the mean and the spread
(min..max) of the test accuracy. Every student trains ``--epochs`` epochs from the teacher's weights with the
pipeline's defaults (SGD, lr 0.01, cosine, batch 64). Writes ``--out``/<run>-s<seed>/ (what ``quantize`` writes)
and a markdown table (teacher accuracy, student accuracy, bytes, compression) appended to ``--results``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_RUNS = ["qat:4/4", "kd:4/4", "kd:4/4:label-free", "kd:2/2", "kd:2/2:label-free",
                "ste:1/1:seeds=0,1,2", "fda:1/1:seeds=0,1,2", "faqd:4/4", "faqd:4/4:label-free", "faqd:2/2"]


def parse_run(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) < 2 or "/" not in parts[1]:
        raise SystemExit(f"quant_methods: a run is METHOD:W/A[:label-free][:seeds=...], got {spec!r}")
    w, a = (int(v) for v in parts[1].split("/"))
    run = {"method": parts[0], "wbits": w, "abits": a, "label_free": False, "seeds": [0]}
    for p in parts[2:]:
        if p == "label-free":
            run["label_free"] = True
        elif p.startswith("seeds="):
            run["seeds"] = [int(s) for s in p[6:].split(",")]
        else:
            raise SystemExit(f"quant_methods: unknown part {p!r} in run {spec!r}")
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/quant_methods")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results", "quantization-digits.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from slimops.quant.pipeline import QuantizeConfig, quantize

    rows, t0 = [], time.time()
    for spec in args.runs:
        run = parse_run(spec)
        accs, last = [], None
        for seed in run["seeds"]:
            name = f"{run['method']}-w{run['wbits']}a{run['abits']}{'-lf' if run['label_free'] else ''}-s{seed}"
            last = quantize(QuantizeConfig(teacher=args.teacher, out=os.path.join(args.out, name), epochs=args.epochs,
                                           wbits=run["wbits"], abits=run["abits"], method=run["method"],
                                           label_free=run["label_free"], seed=seed, progress=False, plots=False))
            accs.append(last["acc"])
            print(f"{name}: acc {last['acc']:.4f} (teacher {last['acc_teacher']:.4f})", flush=True)
        rows.append({"run": spec, "acc_teacher": last["acc_teacher"], "accs": accs,
                     "bytes_float": last["bytes_float"], "bytes_quantized": last["bytes_quantized"]})
    write(args, rows, time.time() - t0)


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "?"


def write(args, rows, seconds: float) -> None:
    from slimops.info import cpu_isa

    lines = [f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, slimops @ {_git_sha()}, "
             f"torch {torch.__version__}, CPU ISA {cpu_isa()}, {args.threads} threads, {seconds / 60:.1f} min\n",
             f"`python bench/quant_methods.py --teacher {args.teacher} --epochs {args.epochs} --runs "
             f"{' '.join(repr(r) if ' ' in r else r for r in args.runs)}`\n",
             "| run | teacher acc | student acc (mean) | spread (min..max) | seeds | bytes float -> quantised | x |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        accs = r["accs"]
        spread = f"{min(accs):.4f}..{max(accs):.4f}" if len(accs) > 1 else "-"
        lines.append(f"| {r['run']} | {r['acc_teacher']:.4f} | {statistics.mean(accs):.4f} | {spread} | {len(accs)} | "
                     f"{r['bytes_float']:,} -> {r['bytes_quantized']:,} | {r['bytes_float'] / r['bytes_quantized']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    new = not os.path.exists(args.results)
    with open(args.results, "a", encoding="utf-8") as f:
        if new:
            f.write("# slimops quantize on the embedded digits (bench/quant_methods.py)\n\nStudents of one "
                    "full-precision teacher (its dense.pt); first and last layer at 8 bits; accuracy on the 450 "
                    "test images.\n")
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
