"""``python -m slimops quantize``: a full-precision teacher distilled into a quantised or binary student.

    python -m slimops slim --model vgg11 --width 0.5 --method none --epochs 30 --out runs/fp
    python -m slimops quantize --teacher runs/fp/dense.pt --wbits 4 --abits 4 --method kd --epochs 10 --out runs/q4
    python -m slimops quantize --teacher runs/fp/dense.pt --wbits 4 --abits 4 --method kd --label-free --out runs/q4lf
    python -m slimops quantize --teacher runs/fp/dense.pt --wbits 1 --abits 1 --method fda --epochs 20 --out runs/bnn
    python -m slimops quantize --teacher runs/ns/pruned.pt ...      # a slimmed model quantised: the two compose

Methods: qat (labels only), kd (teacher logits + labels; --label-free: logits only), faqd (kd + the
feature-affinity loss on the stage outputs, 0.3 x labels), fda / ste (binary:
the FDA sign gradient with noise adaptation, or straight-through). Writes OUT/quantized.pt (packed integer weights),
metrics.json, curves.png, log.txt; --resume continues from OUT/checkpoint-quantize.pt.
"""
from __future__ import annotations

import argparse
import dataclasses

from slimops.pruning.cli import _common, count, nonneg_float, positive_count, positive_float, seed


def _bits(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not (1 <= v <= 16 or v == 32):
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 16] or 32 (full precision), got {text}")
    return v


def main_quantize(argv=None) -> dict:
    from slimops.quant.pipeline import QUANT_METHODS, QuantizeConfig, quantize

    ap = argparse.ArgumentParser(prog="slimops quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a dense.pt / pruned.pt / finetuned.pt written by slimops")
    ap.add_argument("--wbits", type=_bits, default=4, help="weight bits of the inner layers (1-16)")
    ap.add_argument("--abits", type=_bits, default=4, help="activation bits of the inner layers (1-16, 32: float)")
    ap.add_argument("--method", default="kd", choices=QUANT_METHODS,
                    help="qat | kd | faqd | fda | ste (fda / ste: binary, --wbits 1 --abits 1)")
    ap.add_argument("--label-free", action="store_true",
                    help="no labels: the teacher's logits are the only supervision")
    ap.add_argument("--epochs", type=count, default=10)
    ap.add_argument("--temperature", type=positive_float, default=4.0, help="KD temperature")
    ap.add_argument("--kd-weight", type=nonneg_float, default=1.0, help="weight of the KD term")
    ap.add_argument("--fa-weight", type=nonneg_float, default=0.1,
                    help="faqd: weight of the feature-affinity loss (summed over the stage outputs)")
    ap.add_argument("--fa-fast", action="store_true",
                    help="faqd: the fast projected affinity loss (O(HW k) memory) instead of the exact one")
    ap.add_argument("--fa-k", type=positive_count, default=256, help="faqd --fa-fast: Gaussian vectors")
    ap.add_argument("--fa-norm", default="l1", choices=("l1", "l2sq"),
                    help="faqd: l1 (the paper's |.| of the affinity difference) or l2sq (its square; the fast l2sq "
                         "loss is an unbiased estimate of the exact one)")
    ap.add_argument("--first-last-bits", type=_bits, default=8, help="bits of the first and last layer (32: float)")
    _common(ap)
    ap.add_argument("--batch", type=positive_count, default=64)
    ap.add_argument("--lr", type=positive_float, default=0.01, help="peak lr (the student starts from the teacher)")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    ap.add_argument("--weight-decay", type=nonneg_float, default=None, help="default: 1e-4 for sgd, 0.05 for adamw")
    ap.add_argument("--schedule", default="cosine", choices=("step", "cosine"))
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-quantize.pt")
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    ap.add_argument("--on-nonfinite", default="stop", choices=("stop", "skip"))
    ap.add_argument("--out", default="runs/quantize")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(QuantizeConfig) if hasattr(a, f.name)}
    m = quantize(QuantizeConfig(**kw))
    print(f"quantize: acc {m['acc']:.4f} (teacher {m['acc_teacher']:.4f}); {a.wbits}/{a.abits} bits; "
          f"{m['bytes_float']:,} -> {m['bytes_quantized']:,} bytes (x{m['compression']:.1f}); {a.out}/quantized.pt")
    return m
