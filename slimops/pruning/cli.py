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
import json


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="digits", choices=("digits", "cifar10", "cifar100"),
                    help="digits: scikit-learn's bundled digits at 32x32 (embedded default); cifar: --data-dir")
    ap.add_argument("--data-dir", default=None, help="folder with the CIFAR python-pickle files")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (torchrun: each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _train_opts(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=64, help="global batch size (split over torchrun processes)")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD lr (momentum 0.9, wd 1e-4; /10 at 50%% and 75%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-<stage>.pt")
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--on-nonfinite", default="stop", choices=("stop", "skip"),
                    help="a NaN/inf loss or gradient stops the run (default; the last checkpoint stays good) or "
                         "skips that step")


def _parse(prog: str, build, argv):
    ap = argparse.ArgumentParser(prog=f"slimops {prog}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    build(ap)
    args = ap.parse_args(argv)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    return args


def main_slim(argv=None) -> dict:
    from slimops.models import MODELS
    from slimops.pruning.methods import METHODS
    from slimops.pruning.pipeline import slim

    def build(ap):
        ap.add_argument("--model", default="vgg11", choices=MODELS)
        ap.add_argument("--width", type=float, default=0.5, help="channel multiplier")
        _common(ap)
        ap.add_argument("--method", default="proximal-ns", choices=METHODS)
        ap.add_argument("--penalty", default=None,
                        help="prox-sgd: l1 | l0 | tl1 | l1_2 (default l1); ns-*: set by the method")
        ap.add_argument("--lam", type=float, default=None,
                        help="sparsity strength; default: calibrated to the run's length (slimops.pruning.methods)")
        ap.add_argument("--beta", type=float, default=None, help="proximal-ns coupling beta (default 100)")
        ap.add_argument("--a", type=float, default=None,
                        help="tl1 shape a (default 1), or the exponent p of ns-lp (default 0.5)")
        ap.add_argument("--percent", type=float, default=-1.0,
                        help="fraction of channels to remove by global |score| rank; default: the exact zeros "
                             "(none / prox-sgd / proximal-ns) or 0.5 (ns-*)")
        ap.add_argument("--epochs", type=int, default=15)
        ap.add_argument("--finetune-epochs", type=int, default=0)
        _train_opts(ap)
        ap.add_argument("--no-fold", dest="fold", action="store_false",
                        help="drop the removed channels' constant relu(beta) outputs instead of carrying them in one "
                             "constant channel per layer")
        ap.add_argument("--bn-recal", type=int, default=100,
                        help="re-estimate the pruned model's BN statistics from this many training batches (0: off)")
        ap.add_argument("--out", default="runs/slim")

    a = _parse("slim", build, argv)
    return slim(model=a.model, width=a.width, data=a.data, data_dir=a.data_dir, method=a.method, penalty=a.penalty,
                lam=a.lam, beta=a.beta, a=a.a, percent=a.percent, epochs=a.epochs, finetune_epochs=a.finetune_epochs,
                batch=a.batch, lr=a.lr, seed=a.seed, out=a.out, resume=a.resume, device=a.device,
                augment=a.augment, fold=a.fold, bn_recal=a.bn_recal, progress=a.progress,
                on_nonfinite=a.on_nonfinite)


def main_prune(argv=None) -> dict:
    from slimops.pruning.pipeline import prune

    def build(ap):
        ap.add_argument("--weights", required=True, help="a dense.pt written by `slim`")
        ap.add_argument("--percent", type=float, default=None, help="default: remove the exact zeros")
        _common(ap)
        ap.add_argument("--no-fold", dest="fold", action="store_false")
        ap.add_argument("--bn-recal", type=int, default=100, help="training batches to re-estimate BN statistics (0: off)")
        ap.add_argument("--out", default="runs/prune")

    a = _parse("prune", build, argv)
    return prune(weights=a.weights, percent=a.percent, data=a.data, data_dir=a.data_dir, out=a.out,
                 device=a.device, fold=a.fold, bn_recal=a.bn_recal)


def main_finetune(argv=None) -> dict:
    from slimops.pruning.pipeline import finetune

    def build(ap):
        ap.add_argument("--weights", required=True, help="a pruned.pt (or dense.pt)")
        ap.add_argument("--epochs", type=int, default=5)
        _common(ap)
        _train_opts(ap)
        ap.add_argument("--out", default="runs/finetune")

    a = _parse("finetune", build, argv)
    return finetune(weights=a.weights, epochs=a.epochs, data=a.data, data_dir=a.data_dir, lr=a.lr, batch=a.batch,
                    seed=a.seed, out=a.out, resume=a.resume, device=a.device, augment=a.augment, progress=a.progress,
                    on_nonfinite=a.on_nonfinite)


def main_eval(argv=None) -> dict:
    from slimops.pruning.pipeline import evaluate_file

    def build(ap):
        ap.add_argument("--weights", required=True, help="a dense.pt / pruned.pt / finetuned.pt")
        _common(ap)
        ap.add_argument("--latency-batch", type=int, default=64)
        ap.add_argument("--sparse", action="store_true",
                        help="run a dense.pt channel-sparse by its plan (slimops.pruning.sparsify) and time it "
                             "against the dense and the compacted model")
        ap.add_argument("--plan", default=None, help="plan for --sparse (default: plan.json beside --weights)")
        ap.add_argument("--bn-recal", type=int, default=100,
                        help="--sparse: training batches to re-estimate BN statistics, as prune does (0: off)")

    a = _parse("eval", build, argv)
    m = evaluate_file(weights=a.weights, data=a.data, data_dir=a.data_dir, device=a.device,
                      latency_batch=a.latency_batch, sparse=a.sparse, plan=a.plan, bn_recal=a.bn_recal)
    print(json.dumps({k: v for k, v in m.items() if k != "latency"}, indent=1))
    return m
