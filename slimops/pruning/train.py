"""The training loop shared by the slimming and fine-tuning stages: SGD (or AdamW) + the method's sparsity
updates, a per-epoch atomic checkpoint, exact resume, and data parallelism under ``torchrun``.

Optimizers and schedules (:class:`TrainConfig`): ``sgd`` (momentum 0.9, weight decay 1e-4: the CNN recipes of
network slimming) or ``adamw`` (betas 0.9/0.999, weight decay 0.05: DeiT's recipe, what a ViT needs), both through
slimops' fused optimizers; ``step`` (lr / 10 at 50% and 75% of the epochs, per epoch) or ``cosine`` (per step:
linear warmup over ``warmup_epochs``, then half a cosine to 0).

Exact resume: the sample order of epoch ``e`` is a permutation seeded with ``seed + e`` (what
``DistributedSampler`` draws), each sample's augmentation a function of ``(seed, e, index)``
(``ImageData.train_batch``), and the checkpoint holds the model, optimizer, LR scheduler, method state
(xi) and RNG states. A run killed at any point and resumed from its last checkpoint therefore replays
the remaining epochs bit for bit on the same machine and thread count.

Data parallelism: every global batch of that order is dealt to the ranks round-robin (rank r takes
positions r, r+N, ...: ``DistributedSampler``'s split, applied per batch). ``DistributedSampler``
itself pads the epoch by repeating samples when N does not divide the data set, which would make the
last batch differ from the 1-process run; dealing per batch never pads, and each rank's loss is
weighted by its share of the global batch, so DDP's gradient average is the global batch mean.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slimops.pruning import distributed as D
from slimops.pruning.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, load_file, rng_state, set_rng_state
from slimops.pruning.guard import NonFiniteGuard, check_finite_state
from slimops.pruning.methods import MethodConfig, SlimMethod
from slimops.pruning.metrics import accuracy

log = logging.getLogger("slimops.pruning")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}


@dataclass
class TrainConfig:
    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: Optional[float] = None  # None: 1e-4 for sgd, 0.05 for adamw
    batch: int = 64                       # global batch (split over DDP ranks)
    seed: int = 0
    milestones: tuple = (0.5, 0.75)       # schedule "step": lr /10 at these fractions of the epochs (Liu et al.)
    augment: bool = True
    optimizer: str = "sgd"                # sgd | adamw
    schedule: str = "step"                # step | cosine
    warmup_epochs: int = 0                # schedule "cosine": linear warmup over this many epochs

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"slimops.pruning: epochs must be >= 0, got {self.epochs}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"slimops.pruning: lr must be a finite number > 0, got {self.lr}")
        if self.batch < 1:
            raise ValueError(f"slimops.pruning: batch must be >= 1, got {self.batch}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"slimops.pruning: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"slimops.pruning: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.schedule != "cosine"):
            raise ValueError(f"slimops.pruning: warmup_epochs must be >= 0 and needs schedule 'cosine', got "
                             f"{self.warmup_epochs} with schedule {self.schedule!r}")
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"slimops.pruning: weight_decay must be a finite number >= 0, got {self.weight_decay}")
        self.milestones = tuple(self.milestones)

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch)


@dataclass
class StageResult:
    history: list = field(default_factory=list)
    method: Optional[SlimMethod] = None
    resumed_from: int = 0


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, device: torch.device, *, batches: int = 100, batch: int = 64,
                   seed: int = 0) -> int:
    """Re-estimates every BatchNorm's running statistics of ``model`` from training images.

    Pruning changes the distribution each BN downstream sees (a removed channel with a small but
    nonzero gamma, or any channel removed by a percentile, no longer contributes), and proximal NS
    moves gamma every step, so the running statistics a model was saved with are stale for the
    pruned network. One forward pass in train mode without gradients over ``batches`` training
    batches (no augmentation, cumulative average: ``momentum=None``) re-estimates them; no labels and
    no weight is touched (the "BN calibration" of Yu & Huang 2019 and the adaptive BN of Li et al.
    2020). Returns the number of images used.
    """
    from slimops.nn import ChannelSparseBatchNorm2d

    bns = [m for m in model.modules()
           if isinstance(m, (nn.modules.batchnorm._BatchNorm, ChannelSparseBatchNorm2d)) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    saved = [(m, m.momentum) for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=g)[:batches * batch]
    try:
        for i in range(0, len(order), batch):
            x, _ = data.train_batch(order[i:i + batch], 0, seed, augment=False)
            model(x.to(device))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return len(order)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: ``DistributedSampler``'s permutation (seeded with seed + epoch)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def _cosine(warmup: int, total: int):
    """The lr factor of step s: (s + 1) / warmup during the warmup, then 0.5 (1 + cos(pi t)), t from 0 to 1."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))

    return factor


def _milestone_epochs(cfg: TrainConfig) -> list:
    return sorted({max(1, int(round(f * cfg.epochs))) for f in cfg.milestones if 0 < f < 1})


def train_stage(model: nn.Module, data, method_cfg: MethodConfig, cfg: TrainConfig, *, stage: str,
                ckpt_path: Optional[str], resume: bool, device: torch.device, dist_info: D.DistInfo,
                run_config: dict, progress: bool = True, on_nonfinite: str = "stop",
                criterion: Optional[Callable] = None, on_epoch: Optional[Callable[[int], None]] = None) -> StageResult:
    """Trains ``model`` in place for ``cfg.epochs`` epochs with ``method_cfg``'s sparsity updates.

    ``criterion(out, x, y)`` returns the loss summed over the samples of the batch (default: cross-entropy; the
    distillation losses of :mod:`slimops.quant` also look at x); ``on_epoch(epoch)`` runs before every epoch,
    resumed ones included (per-epoch schedules such as FDA's).

    ``ckpt_path`` (rank 0 writes it) receives a checkpoint after every epoch; with ``resume`` an
    existing one is loaded first and must have been written by the same ``run_config`` and ``stage``.
    A NaN/inf loss or gradient stops the stage or skips the step (``on_nonfinite``, see
    :mod:`slimops.pruning.guard`); it is not part of the run's identity, so a stopped run can be resumed
    with ``on_nonfinite="skip"``.
    """
    model.to(device)
    method = SlimMethod(method_cfg, model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        optimizer=cfg.optimizer)
    opt = method.optimizer
    steps_per_epoch = cfg.steps_per_epoch(len(data.y_train))
    per_step = cfg.schedule == "cosine"
    if per_step:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.warmup_epochs * steps_per_epoch,
                                                               cfg.epochs * steps_per_epoch))
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestone_epochs(cfg), gamma=0.1)
    result = StageResult(method=method)
    guard = NonFiniteGuard(model, on_nonfinite, distributed=dist_info.enabled)
    start = 0
    if resume and ckpt_path and os.path.exists(ckpt_path):
        ck = load_file(ckpt_path, CHECKPOINT_FORMAT, "slimops.pruning.resume")
        if ck.get("stage") != stage or ck.get("run_config") != run_config:
            raise ValueError(f"slimops.pruning.resume: '{ckpt_path}' was written by a different run or stage "
                             f"(stage {ck.get('stage')!r}; run config {ck.get('run_config')} != {run_config})")
        model.load_state_dict(ck["model"])
        try:
            opt.load_state_dict(ck["optimizer"])
        except ValueError as e:  # e.g. a checkpoint from before AdamW's decay / no-decay groups (2026-12-06)
            raise ValueError(f"slimops.pruning.resume: the optimizer state in '{ckpt_path}' does not fit this run's "
                             f"optimizer ({e}); it was written by another version of slimops: start the run again "
                             "without --resume") from e
        sched.load_state_dict(ck["scheduler"])
        method.load_state_dict(ck["method"])
        set_rng_state(ck["rng"])
        result.history = list(ck["history"])
        start = result.resumed_from = int(ck["epoch"])
        if dist_info.is_main:
            log.info("%s: resumed from %s after epoch %d", stage, ckpt_path, start)

    net = model
    if dist_info.enabled:
        D.convert_batchnorm(model, device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n = len(data.y_train)
    world, rank = dist_info.world, dist_info.rank

    bar = None
    if progress and dist_info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start, desc=stage, unit="epoch", leave=False)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            order = epoch_order(n, cfg.seed, epoch)
            if on_epoch is not None:
                on_epoch(epoch)
            net.train()
            totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen (this rank)
            skipped0 = guard.skipped
            saved = (f" (the checkpoint after epoch {epoch} is intact: --resume continues from it)"
                     if ckpt_path and epoch > 0 else "")  # for the non-finite guard's message
            for step, i in enumerate(range(0, n, cfg.batch)):
                gidx = order[i:i + cfg.batch]
                # A last global batch smaller than the world leaves some ranks an empty share: they still
                # step (zero loss; GlobalBatchNorm2d counts no samples for them), so nothing is dropped.
                idx = gidx[rank::world]
                x, y = data.train_batch(idx, epoch, cfg.seed, augment=cfg.augment)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                guard.before_forward()
                out = net(x)
                # sum / global size * world: DDP's average over ranks is then the global-batch mean
                per_batch = F.cross_entropy(out, y, reduction="sum") if criterion is None else criterion(out, x, y)
                loss = per_batch * (world / len(gidx))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if guard.step_is_bad(loss, f"{stage} epoch {epoch + 1}, step {step + 1} of the epoch", saved):
                    continue
                method.after_backward()
                opt.step()
                method.after_step()
                if per_step:
                    sched.step()
                totals += torch.tensor([loss.detach().double().item() * len(gidx) / world,
                                        float((out.detach().argmax(1) == y).sum()), float(len(idx))],
                                       dtype=torch.float64)
            if dist_info.enabled:  # the history describes the global batch, not rank 0's share
                dist.all_reduce(totals)
            tot_loss, tot_correct, seen = totals.tolist()
            lr = opt.param_groups[0]["lr"]
            if not per_step:
                sched.step()
            rec = {"stage": stage, "epoch": epoch + 1, "lr": lr, "loss": tot_loss / max(seen, 1),
                   "train_acc": tot_correct / max(seen, 1), "test_acc": accuracy(model, data, device=device),
                   "zero_fraction": method.zero_fraction(), "skipped_steps": guard.skipped - skipped0,
                   "seconds": time.perf_counter() - t0}
            if method.current_lam() is not None:  # SiDT with a keep_dims target: the lam it has set
                rec["lam"] = method.current_lam()
            result.history.append(rec)
            if dist_info.is_main:
                log.info("%s epoch %d/%d: loss %.4f, train %.4f, test %.4f, lr %.4g, zero %.3f, %.1fs", stage,
                         rec["epoch"], cfg.epochs, rec["loss"], rec["train_acc"], rec["test_acc"], lr,
                         rec["zero_fraction"], rec["seconds"])
                if ckpt_path:
                    check_finite_state(model, f"the {stage} checkpoint of epoch {epoch + 1}")
                    D.restore_batchnorm(model)  # the checkpoint holds a plain model
                    atomic_save({"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "stage": stage,
                                 "epoch": epoch + 1, "run_config": run_config, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "method": method.state_dict(), "rng": rng_state(),
                                 "history": result.history}, ckpt_path)
                    if dist_info.enabled:
                        D.convert_batchnorm(model, device)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['test_acc']:.3f}",
                                    zero=f"{rec['zero_fraction']:.2f}")
            D.barrier(dist_info)
    finally:
        if bar is not None:
            bar.close()
        D.restore_batchnorm(model)
    return result


def run_config_of(model_cfg: dict, data_name: str, method_cfg: MethodConfig, cfg: TrainConfig, **extra) -> dict:
    """What a checkpoint must agree with to be resumed (plain JSON-able data)."""
    d = {"model": dict(model_cfg), "data": data_name, "method": asdict(method_cfg), "train": asdict(cfg)}
    d["train"]["milestones"] = list(cfg.milestones)
    # The options added after the first checkpoints were written, at their defaults, are left out: a checkpoint of
    # an SGD run written before they existed still matches (and resumes).
    for key, default in (("optimizer", "sgd"), ("schedule", "step"), ("warmup_epochs", 0)):
        if d["train"][key] == default:
            del d["train"][key]
    for key, default in (("keep_dims", None), ("steps", 0)):
        if d["method"].get(key, default) == default:
            d["method"].pop(key, None)
    d.update(extra)
    return d
