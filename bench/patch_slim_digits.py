"""Patch slimming of a trained ViT on the embedded digits data (the API slice of issue 14: slimops.pruning.patch_slim).

From a dense ViT run (``python -m slimops slim --model vit_ti ... --method none``, its ``dense.pt``): scores every
token top down on training images, keeps a linear pyramid of tokens with mean patch fraction ``--keep``, evaluates
the slimmed model without and with ``--epochs`` of fine-tuning (AdamW, cosine, no augmentation: the dense run's
recipe), and reports accuracy, MACs (all, and attention + MLP: the blocks), the tokens per block, and the latency of
the slimmed model against the dense one side by side (batch 64). The baseline is the dense model fine-tuned with the
same recipe for the same epochs (the slimmed model gets that much more training). Writes ``--out``/patch_slim.json and
``tokens.json`` (the plan) and prints a markdown row.

    python -m slimops slim --model vit_ti --width 0.25 --patch 4 --no-augment --optimizer adamw --lr 2e-3 \\
        --schedule cosine --warmup-epochs 3 --epochs 30 --method none --out runs/vit-dense
    python bench/patch_slim_digits.py --dense runs/vit-dense/dense.pt --keep 0.5 --epochs 10 --out runs/vit-ps
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import slimops  # noqa: F401
from slimops import data as sdata
from slimops.pruning import distributed as D
from slimops.pruning.methods import MethodConfig
from slimops.pruning.metrics import accuracy, compare_latency, count_macs, count_params
from slimops.pruning.patch_slim import plan_tokens
from slimops.pruning.pipeline import load_model_file, score_batches
from slimops.pruning.train import TrainConfig, train_stage


def block_macs(model, size) -> int:
    """MACs of the transformer blocks only (attention + MLP)."""
    total = count_macs(model, size)
    saved = model.blocks
    model.blocks = torch.nn.Sequential()
    try:
        rest = count_macs(model, size)
    finally:
        model.blocks = saved
    return total - rest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, help="dense.pt of a ViT run on digits")
    ap.add_argument("--keep", type=float, default=0.5, help="mean fraction of the patch tokens the blocks compute")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs with the token plan")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up epochs of the fine-tuning lr")
    ap.add_argument("--score-images", type=int, default=512, help="training images the impact scores average over")
    ap.add_argument("--seed", type=int, default=0, help="the fine-tuning seed (batch order)")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="the digits split of the dense run (its --seed): the test images it never trained on")
    ap.add_argument("--no-dense-ft", action="store_true",
                    help="skip the baseline: the dense model fine-tuned with the same recipe and epochs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    dense, _ = load_model_file(args.dense)
    dense.eval()
    ds = sdata.load("digits", size=dense.img_size, seed=args.data_seed)
    size = (dense.in_channels, dense.img_size, dense.img_size)
    acc_dense = accuracy(dense, ds)
    t0 = time.perf_counter()
    batches = score_batches(ds, torch.device("cpu"), images=args.score_images)  # seeded random training images
    slim = copy.deepcopy(dense)
    plan = plan_tokens(slim, batches, args.keep)
    slim.set_token_plan(plan)
    plan.save(os.path.join(args.out, "tokens.json"))
    score_s = time.perf_counter() - t0
    acc_noft = accuracy(slim, ds)
    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, augment=False, optimizer="adamw",
                       schedule="cosine", warmup_epochs=args.warmup_epochs)
    if args.epochs:
        train_stage(slim, ds, MethodConfig("none"), tcfg, stage="patch-slim-finetune", ckpt_path=None, resume=False,
                    device=torch.device("cpu"), dist_info=D.DistInfo(), run_config={"patch_slim": vars(args)},
                    progress=False)
    slim.eval()
    acc_ft = accuracy(slim, ds)
    acc_dense_ft = None
    if args.epochs and not args.no_dense_ft:  # the same budget without the plan: the fair baseline
        dft = copy.deepcopy(dense)
        train_stage(dft, ds, MethodConfig("none"), tcfg, stage="dense-finetune", ckpt_path=None, resume=False,
                    device=torch.device("cpu"), dist_info=D.DistInfo(), run_config={"dense_ft": vars(args)},
                    progress=False)
        acc_dense_ft = accuracy(dft.eval(), ds)
    macs_d, macs_s = count_macs(dense, size), count_macs(slim, size)
    blk_d, blk_s = block_macs(dense, size), block_macs(slim, size)
    lat = compare_latency(dense, slim, size, batch=64)
    res = {"dense": args.dense, "keep": args.keep, "epochs": args.epochs, "lr": args.lr,
           "warmup_epochs": args.warmup_epochs, "seed": args.seed,
           "tokens_per_block": list(plan.keep), "tokens": plan.tokens, "params": count_params(slim),
           "acc_dense": acc_dense, "acc_dense_ft": acc_dense_ft, "acc_slim_no_ft": acc_noft, "acc_slim_ft": acc_ft, "macs_dense": macs_d,
           "macs_slim": macs_s, "block_macs_dense": blk_d, "block_macs_slim": blk_s,
           "block_macs_removed": 1 - blk_s / blk_d, "latency": lat, "score_seconds": score_s,
           "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, "patch_slim.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    print(f"| keep {args.keep} + {args.epochs} FT | {plan.keep[0]}→{plan.keep[-1]} of {plan.tokens} | "
          f"{100 * (1 - blk_s / blk_d):.1f}% | {100 * (1 - macs_s / macs_d):.1f}% | {100 * acc_dense:.2f}% | "
          f"{'-' if acc_dense_ft is None else f'{100 * acc_dense_ft:.2f}%'} | "
          f"{100 * acc_noft:.2f}% | {100 * acc_ft:.2f}% | {lat['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
