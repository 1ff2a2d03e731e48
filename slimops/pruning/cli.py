"""``python -m slimops slim | prune | finetune | eval``: the slimming pipeline from the command line.

    python -m slimops slim --model vgg11 --width 0.5 --data digits --method proximal-ns --epochs 15 --out runs/ns
    torchrun --nproc_per_node=2 -m slimops slim ...        # data parallel (gloo on CPU, nccl on GPU)
    python -m slimops prune --weights runs/ns/dense.pt --percent 0.5 --out runs/ns-p50
    python -m slimops finetune --weights runs/ns/pruned.pt --epochs 5 --out runs/ns-ft
    python -m slimops eval --weights runs/ns/pruned.pt
    python -m slimops eval --weights runs/ns/dense.pt --sparse   # kept channels of the full model, timed
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

from slimops.pruning.config import COUNT_MAX, SlimConfig

# Typed option values: argparse turns a ValueError/ArgumentTypeError of these into
# "slimops <command>: error: argument --x: <message>" (status 2) before any work starts.


def _number(text: str, kind, what: str, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0", lo=0.0, lo_open=True)


def finite_float(text: str) -> float:
    return _number(text, float, "a finite number")


def nonneg_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lo=0.0)


def count(text: str) -> int:
    return _number(text, int, f"an integer in [0, {COUNT_MAX}]", lo=0, hi=COUNT_MAX)


def positive_count(text: str) -> int:
    return _number(text, int, f"an integer in [1, {COUNT_MAX}]", lo=1, hi=COUNT_MAX)


def seed(text: str) -> int:
    return _number(text, int, "an integer in [0, 2**63)", lo=0, hi=2**63, hi_open=True)


def percent(text: str) -> float:
    """``auto`` (-1: per method, the exact zeros or 0.5 for the subgradient methods) or a fraction in [0, 1).
    ``-1`` is accepted as the old spelling of ``auto``."""
    if text in ("auto", "-1"):
        return -1.0
    return _number(text, float, "'auto' or a fraction in [0, 1)", lo=0.0, hi=1.0, hi_open=True)


def token_fraction(text: str) -> float:
    return _number(text, float, "a fraction in (0, 1]", lo=0.0, lo_open=True, hi=1.0)


def open_fraction(text: str) -> float:
    return _number(text, float, "a fraction in (0, 1)", lo=0.0, lo_open=True, hi=1.0, hi_open=True)


def device(text: str) -> str:
    """``cpu`` or ``cuda[:N]`` for a GPU that this machine has."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu or cuda[:N])") from None
    if d.type == "cpu":
        if d.index not in (None, 0):
            raise argparse.ArgumentTypeError(f"{text!r}: the CPU has no index other than 0")
        return text
    if d.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: runs go on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible (torch.cuda.is_available() is False)")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="digits", choices=("digits", "cifar10", "cifar100"),
                    help="digits: scikit-learn's bundled digits at 32x32 (embedded default); cifar: --data-dir")
    ap.add_argument("--data-dir", default=None, help="folder with the CIFAR python-pickle files")
    ap.add_argument("--device", type=device, default="cpu",
                    help="cpu or cuda (torchrun: each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--threads", type=count, default=0, help="torch CPU threads (0: torch's default)")


def _train_opts(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=positive_count, default=64,
                    help="global batch size (split over torchrun processes)")
    ap.add_argument("--lr", type=positive_float, default=0.1,
                    help="peak lr (sgd: momentum 0.9; schedule step: /10 at 50%% and 75%%)")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                    help="sgd (the CNN recipes) or adamw (betas 0.9/0.999: the ViT recipe, with e.g. --lr 1e-3 "
                         "--schedule cosine --warmup-epochs 3)")
    ap.add_argument("--weight-decay", type=nonneg_float, default=None,
                    help="default: 1e-4 for sgd (on every weight), 0.05 for adamw (not on biases, norm scales, "
                         "position embeddings and class tokens, as DeiT)")
    ap.add_argument("--schedule", default="step", choices=("step", "cosine"),
                    help="step: lr /10 at 50%% and 75%% of the epochs; cosine: per step, after a linear warmup")
    ap.add_argument("--warmup-epochs", type=count, default=0, help="cosine: linear warmup over this many epochs")
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-<stage>.pt")
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--on-nonfinite", default="stop", choices=("stop", "skip"),
                    help="a NaN/inf loss or gradient stops the run (default; the last checkpoint stays good) or "
                         "skips that step")


def _distill_opts(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--teacher", default=None,
                    help="a model file (e.g. the dense run's dense.pt) whose logits the fine-tuning also learns: "
                         "CE + kd-weight * T^2 KL (docs/vit.md)")
    ap.add_argument("--kd-weight", type=nonneg_float, default=1.0, help="--teacher: weight of the KD term")
    ap.add_argument("--temperature", type=positive_float, default=4.0, help="--teacher: KD temperature")


def _parser(prog: str, build) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"slimops {prog}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    build(ap)
    return ap


def _parse(prog: str, build, argv):
    args = _parser(prog, build).parse_args(argv)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    return args


def _given(prog: str, build, argv) -> set:
    """The options written on the command line (their dests), as opposed to those left at their defaults."""
    ap = _parser(prog, build)
    for action in ap._actions:
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


def main_slim(argv=None) -> dict:
    from slimops.models import MODELS
    from slimops.pruning.methods import METHODS
    from slimops.pruning.pipeline import slim

    def build(ap):
        ap.add_argument("--model", default="vgg11", choices=MODELS)
        ap.add_argument("--width", type=positive_float, default=0.5, help="channel multiplier")
        ap.add_argument("--patch", type=positive_count, default=None,
                        help="ViTs: patch size (default 4 on 32x32 data, 16 from 224 up)")
        _common(ap)
        ap.add_argument("--method", default="proximal-ns", choices=METHODS)
        ap.add_argument("--penalty", default=None, choices=("l1", "l0", "tl1", "l1_2"),
                        help="prox-sgd, sidt: l1 | l0 | tl1 | l1_2 (default l1; sidt with --keep-dims: tl1); ns-*, vtp: "
                             "set by the method")
        ap.add_argument("--lam", type=nonneg_float, default=None,
                        help="sparsity strength; default: calibrated to the run's length (slimops.pruning.methods); "
                             "vtp / sidt (ViTs, SEMA-T) need it given (docs/vit.md)")
        ap.add_argument("--beta", type=nonneg_float, default=None, help="proximal-ns coupling beta (default 100)")
        ap.add_argument("--a", type=finite_float, default=None,
                        help="tl1 shape a (default 1), or the exponent p of ns-lp (default 0.5)")
        ap.add_argument("--percent", type=percent, default=-1.0,
                        help="fraction of channels to remove by global |score| rank; auto (default): the exact "
                             "zeros (none / prox-sgd / proximal-ns) or 0.5 (ns-*)")
        ap.add_argument("--keep-dims", type=open_fraction, default=None,
                        help="sidt: keep about this fraction of the gated dims; lam is adjusted during training, "
                             "starting from --lam (default 1) (docs/vit.md)")
        ap.add_argument("--keep-tokens", type=token_fraction, default=None,
                        help="patch-slim (ViTs): the mean fraction of the patch tokens the blocks keep, a linear "
                             "pyramid from all tokens in the first block (default 0.5; docs/vit.md); with vtp / sidt "
                             "on a ViT: patch slimming of the dimension-pruned model too, before fine-tuning")
        ap.add_argument("--epochs", type=count, default=15)
        ap.add_argument("--finetune-epochs", type=count, default=0)
        _distill_opts(ap)
        _train_opts(ap)
        ap.add_argument("--no-fold", dest="fold", action="store_false",
                        help="drop the removed channels' constant relu(beta) outputs instead of carrying them in one "
                             "constant channel per layer")
        ap.add_argument("--bn-recal", type=count, default=100,
                        help="re-estimate the pruned model's BN statistics from this many training batches (0: off)")
        ap.add_argument("--out", default="runs/slim")

    a = _parse("slim", build, argv)
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(SlimConfig) if hasattr(a, f.name)}
    fields["percent"] = "auto" if a.percent < 0 else a.percent
    saved = _saved_config(a.out) if a.resume else None
    if saved is not None:
        # --resume continues the run the folder holds: its saved configuration, with what this command line
        # says on top (the checkpoint then refuses a change that makes it another run).
        given = _given("slim", build, argv)
        fields = {**saved, **{k: v for k, v in fields.items() if k in given}, "resume": True}
    return slim(SlimConfig(**fields))


def _saved_config(out: str):
    """The SlimConfig fields recorded in ``out``/metrics.json, or None (no such file, or a run of before the
    record existed)."""
    path = os.path.join(out, "metrics.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f).get("config")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"slimops.pruning.slim: cannot read the run's record '{path}' to resume it") from None
    if d is None:
        return None
    cfg = SlimConfig.from_dict(d)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SlimConfig)}


def main_prune(argv=None) -> dict:
    from slimops.pruning.pipeline import prune

    def build(ap):
        ap.add_argument("--weights", required=True, help="a dense.pt written by `slim`")
        ap.add_argument("--percent", type=percent, default=None, help="default (auto): remove the exact zeros")
        ap.add_argument("--keep-tokens", type=token_fraction, default=None,
                        help="ViTs: patch slimming instead, the mean fraction of the patch tokens the blocks keep "
                             "(of a dense.pt, or of a dimension-pruned pruned.pt: dims and tokens)")
        _common(ap)
        ap.add_argument("--no-fold", dest="fold", action="store_false")
        ap.add_argument("--bn-recal", type=count, default=100, help="training batches to re-estimate BN statistics (0: off)")
        ap.add_argument("--out", default="runs/prune")

    a = _parse("prune", build, argv)
    return prune(weights=a.weights, percent=None if a.percent is None or a.percent < 0 else a.percent, data=a.data,
                 data_dir=a.data_dir, out=a.out, device=a.device, fold=a.fold, bn_recal=a.bn_recal,
                 keep_tokens=a.keep_tokens)


def main_finetune(argv=None) -> dict:
    from slimops.pruning.pipeline import finetune

    def build(ap):
        ap.add_argument("--weights", required=True, help="a pruned.pt (or dense.pt)")
        ap.add_argument("--epochs", type=count, default=5)
        _common(ap)
        _distill_opts(ap)
        _train_opts(ap)
        ap.add_argument("--out", default="runs/finetune")

    a = _parse("finetune", build, argv)
    return finetune(weights=a.weights, epochs=a.epochs, data=a.data, data_dir=a.data_dir, lr=a.lr, batch=a.batch,
                    seed=a.seed, out=a.out, resume=a.resume, device=a.device, augment=a.augment, progress=a.progress,
                    on_nonfinite=a.on_nonfinite, optimizer=a.optimizer, weight_decay=a.weight_decay,
                    schedule=a.schedule, warmup_epochs=a.warmup_epochs, teacher=a.teacher, kd_weight=a.kd_weight,
                    temperature=a.temperature)


def main_eval(argv=None) -> dict:
    from slimops.pruning.pipeline import evaluate_file

    def build(ap):
        ap.add_argument("--weights", required=True, help="a dense.pt / pruned.pt / finetuned.pt")
        _common(ap)
        ap.add_argument("--latency-batch", type=positive_count, default=64)
        ap.add_argument("--sparse", action="store_true",
                        help="run a dense.pt channel-sparse by its plan (slimops.pruning.sparsify) and time it "
                             "against the dense and the compacted model")
        ap.add_argument("--plan", default=None, help="plan for --sparse (default: plan.json beside --weights)")
        ap.add_argument("--bn-recal", type=count, default=100,
                        help="--sparse: training batches to re-estimate BN statistics, as prune does (0: off)")

    a = _parse("eval", build, argv)
    m = evaluate_file(weights=a.weights, data=a.data, data_dir=a.data_dir, device=a.device,
                      latency_batch=a.latency_batch, sparse=a.sparse, plan=a.plan, bn_recal=a.bn_recal)
    print(json.dumps({k: v for k, v in m.items() if k != "latency"}, indent=1))
    return m
