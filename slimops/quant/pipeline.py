"""``quantize``: a full-precision teacher (any model file written by ``slim`` / ``prune`` / ``finetune``) becomes a
quantised or binary student, trained on the same loop as the slimming pipeline (atomic per-epoch checkpoints, exact
resume, DDP under ``torchrun``, the non-finite guard), then exported with packed integer weights.

Methods (``method=``):

- ``qat``: quantisation-aware training with LSQ quantisers, cross-entropy on the labels;
- ``kd``: the same student distilled from the teacher's logits (Hinton KD, ``T² KL``) plus the labels' cross-entropy;
  ``label_free=True`` drops the labels (the teacher's logits are the only supervision);
- ``faqd``: FAQD (Li, Yang, Yin, Qi, Xin 2023) with the authors' code's loss: KD + ``fa_weight`` (0.1) × the
  feature-affinity loss summed over the stage outputs + 0.3 × cross-entropy (0 with ``label_free``); the FA loss
  exact, or the fast projected one with ``fa_fast`` (``fa_k`` Gaussian vectors), ``fa_norm`` l1 (the paper's) or
  l2sq — :mod:`slimops.distill.affinity`;
- ``fda`` / ``ste``: a binary student (``wbits = abits = 1``) with the FDA sign gradient and noise adaptation
  (the paper's schedule per epoch), or the straight-through baseline; cross-entropy, or KD when ``label_free``.

The student starts from the teacher's weights; its first and last layer stay at ``first_last_bits`` (8).

Writes into ``out``: ``quantized.pt`` (the export: packed levels, scales, the rest of the state, and how to rebuild
the model: :func:`load_quantized_file`), ``metrics.json`` (accuracy of the teacher and the student, bits, bytes
before and after, the history), ``curves.png``, ``log.txt`` and ``checkpoint-quantize.pt``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
from torch import nn

from slimops.pruning import distributed as D
from slimops.pruning.checkpoint import FORMAT_VERSION, atomic_save, check_free_space, load_file, prepare_output_dir
from slimops.pruning.methods import MethodConfig
from slimops.pruning.metrics import accuracy
from slimops.pruning.pipeline import (build_model_of_file, load_model_file, run_bytes, setup_logging,
                                      write_metrics)
from slimops.pruning.train import OPTIMIZERS, SCHEDULES, TrainConfig, run_config_of, train_stage
from slimops.quant.convert import export, exported_nbytes, load_exported, quantize_model
from slimops.quant.modules import FULL_PRECISION, set_fda_schedule

log = logging.getLogger("slimops.pruning")

QUANT_FILE_FORMAT = "slimops-quantized"
QUANT_METHODS = ("qat", "kd", "faqd", "fda", "ste")
BINARY_METHODS = ("fda", "ste")


@dataclass
class QuantizeConfig:
    """Every option of a ``quantize`` run (validated on construction; messages name the option)."""

    teacher: str
    out: str = "runs/quantize"
    wbits: int = 4
    abits: int = 4
    method: str = "kd"
    label_free: bool = False
    epochs: int = 10
    temperature: float = 4.0
    kd_weight: float = 1.0
    fa_weight: float = 0.1
    fa_fast: bool = False
    fa_k: int = 256
    fa_norm: str = "l1"
    first_last_bits: int = 8
    data: str = "digits"
    data_dir: Optional[str] = None
    lr: float = 0.01
    batch: int = 64
    optimizer: str = "sgd"
    weight_decay: Optional[float] = None
    schedule: str = "cosine"
    seed: int = 0
    augment: bool = True
    resume: bool = False
    device: str = "cpu"
    progress: bool = True
    plots: bool = True
    on_nonfinite: str = "stop"

    def __post_init__(self):
        where = "slimops.quant.quantize"
        if self.method not in QUANT_METHODS:
            raise ValueError(f"{where}: method must be one of {', '.join(QUANT_METHODS)}, got {self.method!r}")
        for name in ("wbits", "abits", "first_last_bits"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or not (1 <= b <= 16 or b == FULL_PRECISION):
                raise ValueError(f"{where}: {name} must be an integer in [1, 16] or {FULL_PRECISION}, got {b!r}")
        binary = self.wbits == 1 and self.abits == 1
        if self.method in BINARY_METHODS and not binary:
            raise ValueError(f"{where}: method {self.method!r} trains a binary net: it needs wbits = abits = 1, "
                             f"got wbits={self.wbits}, abits={self.abits}")
        if self.method not in BINARY_METHODS and binary:
            raise ValueError(f"{where}: wbits = abits = 1 is a binary net: use method 'fda' or 'ste', not "
                             f"{self.method!r}")
        if self.label_free and self.method == "qat":
            raise ValueError(f"{where}: label_free needs a teacher's logits to learn from: method 'kd', 'fda' or "
                             f"'ste', not 'qat'")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{where}: temperature must be finite and > 0, got {self.temperature}")
        for name in ("kd_weight", "fa_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{where}: {name} must be finite and >= 0, got {v}")
        if isinstance(self.fa_k, bool) or not isinstance(self.fa_k, int) or self.fa_k < 1:
            raise ValueError(f"{where}: fa_k must be a positive integer, got {self.fa_k!r}")
        if self.fa_norm not in ("l1", "l2sq"):
            raise ValueError(f"{where}: fa_norm must be 'l1' or 'l2sq', got {self.fa_norm!r}")
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ValueError(f"{where}: optimizer must be one of {OPTIMIZERS} and schedule one of {SCHEDULES}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"{where}: on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")

    @property
    def uses_teacher_logits(self) -> bool:
        return self.method in ("kd", "faqd") or self.label_free

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch=self.batch, seed=self.seed, augment=self.augment,
                           optimizer=self.optimizer, weight_decay=self.weight_decay, schedule=self.schedule)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _criterion(cfg: QuantizeConfig, teacher: Optional[nn.Module], student: Optional[nn.Module] = None,
               fa_layers: Optional[list] = None):
    """The per-batch summed loss of the method: cross-entropy on the labels, KD on the teacher's logits and (faqd)
    the feature-affinity loss on the stage outputs ``fa_layers`` (hooks on ``student`` and ``teacher``)."""
    from slimops.distill import AffinityFeatures, feature_affinity_loss, kd_logit_loss

    faqd = cfg.method == "faqd"
    label_weight = 0.0 if cfg.label_free else (0.3 if faqd else 1.0)
    kd_weight = cfg.kd_weight if cfg.uses_teacher_logits else 0.0
    fa_weight = cfg.fa_weight if faqd else 0.0
    s_maps = AffinityFeatures(student, fa_layers) if fa_weight else None
    t_maps = AffinityFeatures(teacher, fa_layers) if fa_weight else None

    def loss(out, x, y):
        total = out.new_zeros(())
        if label_weight:
            total = total + label_weight * nn.functional.cross_entropy(out, y, reduction="sum")
        if kd_weight or fa_weight:
            with torch.no_grad():
                t = teacher(x)
            if kd_weight:
                total = total + kd_weight * kd_logit_loss(out, t, cfg.temperature)
        if fa_weight:
            for fs, ft in zip(s_maps.pop(), t_maps.pop()):
                total = total + fa_weight * feature_affinity_loss(fs, ft.detach(), fast=cfg.fa_fast, k=cfg.fa_k,
                                                                   norm=cfg.fa_norm)
        return total

    def close():
        for maps in (s_maps, t_maps):
            if maps is not None:
                maps.remove()

    loss.close = close  # the hooks go when training ends
    return loss


def _fa_per_layer(student: nn.Module, teacher: nn.Module, names: list, x) -> dict:
    """The exact FA loss per matched layer, per image, on a probe batch (metrics.json)."""
    from slimops.distill import AffinityFeatures, feature_affinity_loss

    s_maps, t_maps = AffinityFeatures(student, names), AffinityFeatures(teacher, names)
    try:
        with torch.no_grad():
            student.eval()(x)
            teacher(x)
            return {n: float(feature_affinity_loss(a, b)) / x.shape[0]
                    for n, a, b in zip(names, s_maps.pop(), t_maps.pop())}
    finally:
        s_maps.remove()
        t_maps.remove()


def _quantized(model: nn.Module, quant: dict, inplace: bool = False) -> nn.Module:
    """``model`` with the layers of a run's ``quant`` record (its wbits, abits, method, first_last_bits)."""
    method = quant["method"] if quant["method"] in BINARY_METHODS else "lsq"
    return quantize_model(model, quant["wbits"], quant["abits"], method=method,
                          first_last_bits=quant["first_last_bits"], inplace=inplace)


def quantize(config: Optional[QuantizeConfig] = None, /, **kw) -> dict:
    """Runs ``quantize`` (module docstring); returns the metrics it writes."""
    from slimops.data import load as load_data

    cfg = config if config is not None else QuantizeConfig(**kw)
    dev, info = D.init_run(cfg.device)
    try:
        teacher, obj = load_model_file(cfg.teacher, dev)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        ds = load_data(cfg.data, cfg.data_dir)
        if info.is_main:
            prepare_output_dir(cfg.out, "slimops.quant.quantize")
            check_free_space(cfg.out, run_bytes(teacher), "slimops.quant.quantize")
            write_metrics(cfg.out, {"status": "running", "config": cfg.to_dict()})
        setup_logging(cfg.out, info.is_main)
        torch.manual_seed(cfg.seed)
        quant = {"wbits": cfg.wbits, "abits": cfg.abits, "method": cfg.method, "label_free": cfg.label_free,
                 "first_last_bits": cfg.first_last_bits, "temperature": cfg.temperature, "kd_weight": cfg.kd_weight}
        if cfg.method == "faqd":
            quant.update(fa_weight=cfg.fa_weight, fa_fast=cfg.fa_fast, fa_k=cfg.fa_k, fa_norm=cfg.fa_norm)
        student = _quantized(teacher, quant).to(dev)
        for p in student.parameters():
            p.requires_grad_(True)
        tcfg = cfg.train_config()
        probe = ds.train_batch(torch.arange(min(16, len(ds.y_train))), 0, cfg.seed, augment=False)[0].to(dev)
        from slimops.distill import AffinityFeatures

        fa_layers = AffinityFeatures.stage_outputs(teacher, probe)
        if cfg.method == "faqd" and not fa_layers:
            raise ValueError(f"slimops.quant.quantize: method 'faqd' found no NCHW stage outputs (convolution, batch "
                             f"norm or activation modules called once per forward) in {teacher.config().get('name')}")
        # The LSQ scales are initialised from the first batch a quantiser sees: the probe batch, the same on every
        # rank and before DDP wraps the student, so that every rank starts from the same scales (a resumed run then
        # loads them from its checkpoint)
        with torch.no_grad():
            student.eval()(probe)
        run = run_config_of(teacher.config(), cfg.data, MethodConfig("none"), tcfg, quant=quant, teacher=cfg.teacher)
        acc_teacher = accuracy(teacher, ds, device=dev)
        if info.is_main:
            log.info("quantize: %s -> %d/%d-bit student (%s%s), teacher acc %.4f", cfg.teacher, cfg.wbits, cfg.abits,
                     cfg.method, ", label-free" if cfg.label_free else "", acc_teacher)
        on_epoch = (lambda e: set_fda_schedule(student, e, cfg.epochs)) if cfg.method == "fda" else None
        criterion = _criterion(cfg, teacher, student, fa_layers)
        try:
            res = train_stage(student, ds, MethodConfig("none"), tcfg, stage="quantize",
                              ckpt_path=os.path.join(cfg.out, "checkpoint-quantize.pt"), resume=cfg.resume,
                              device=dev, dist_info=info, run_config=run, progress=cfg.progress,
                              on_nonfinite=cfg.on_nonfinite, criterion=criterion, on_epoch=on_epoch)
        finally:
            criterion.close()
        if cfg.method == "fda":
            set_fda_schedule(student, cfg.epochs - 1, cfg.epochs)  # alpha = 0: the plain binary net is evaluated
        blob = export(student.eval())
        float_bytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
        metrics = {"status": "done", "config": cfg.to_dict(), "teacher": cfg.teacher, "model": teacher.config(),
                   "quant": quant, "acc_teacher": acc_teacher, "acc": accuracy(student, ds, device=dev),
                   "bytes_float": float_bytes, "bytes_quantized": exported_nbytes(blob),
                   "fa_loss_per_layer": _fa_per_layer(student, teacher, fa_layers, probe), "history": res.history}
        metrics["compression"] = metrics["bytes_float"] / max(1, metrics["bytes_quantized"])
        if info.is_main:
            atomic_save({"format": QUANT_FILE_FORMAT, "version": FORMAT_VERSION, "model_file": _model_file_of(obj),
                         "quant": quant, "export": blob}, os.path.join(cfg.out, "quantized.pt"))
            write_metrics(cfg.out, metrics)
            if cfg.plots:
                metrics["plots"] = _plot_curves(cfg.out, res.history)
                write_metrics(cfg.out, metrics)
            log.info("quantize: acc %.4f (teacher %.4f); %d/%d bits; %s -> %s bytes (x%.1f)", metrics["acc"],
                     acc_teacher, cfg.wbits, cfg.abits, f"{float_bytes:,}", f"{metrics['bytes_quantized']:,}",
                     metrics["compression"])
        D.barrier(info)
        return metrics
    finally:
        D.shutdown(info)


def _model_file_of(obj: dict) -> dict:
    """What rebuilds the teacher's architecture (no weights): the model file's kind, config and plan."""
    return {k: obj.get(k) for k in ("format", "version", "kind", "config", "plan")}


def load_quantized_file(path: str, device=None) -> tuple:
    """(student model in eval mode, file dict) from a ``quantized.pt``; a foreign or corrupted file raises."""
    obj = load_file(path, QUANT_FILE_FORMAT, "slimops.quant.load_quantized_file")
    try:
        model = _quantized(build_model_of_file(obj["model_file"]), obj["quant"], inplace=True)
        load_exported(model, obj["export"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"slimops.quant.load_quantized_file: '{path}' does not hold a loadable quantised model "
                         f"({e})") from e
    if device is not None:
        model.to(device)
    return model.eval(), obj


def _plot_curves(out: str, history: list) -> list:
    from slimops.pruning.plots import _save, pyplot

    plt = pyplot()
    if plt is None or not history:
        return []
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(ep, [h["loss"] for h in history])
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss")
    axes[1].plot(ep, [h["train_acc"] for h in history], label="train")
    axes[1].plot(ep, [h["test_acc"] for h in history], label="test")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("accuracy")
    axes[1].legend()
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    _save(fig, path)
    plt.close(fig)
    return [path]
