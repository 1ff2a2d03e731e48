"""A frozen teacher for distillation, and the per-batch loss that learns from its logits.

``load_teacher(path, device, probe, student, where)`` loads a model file written by slimops (``dense.pt`` /
``pruned.pt`` / ``finetuned.pt`` / ``quantized.pt``'s float teacher), puts it in eval mode with its parameters
frozen, and checks on a probe batch that it reads the student's images and predicts the student's classes — a
teacher trained on other data fails here, before any training, with an error naming the teacher.

``logit_kd_criterion(teacher, kd_weight, temperature, label_weight)`` is the Hinton et al. (2015) objective

    loss = label_weight · Σ_batch CE(student, y) + kd_weight · T² · Σ_batch KL(softmax(t/T) ‖ softmax(s/T))

as a ``criterion(out, x, y)`` for :func:`slimops.pruning.train.train_stage` (a per-batch sum, as the training loop
expects). It is what DeiT, VTP and patch slimming fine-tune with: the pruned student learns the dense teacher's
soft predictions, not only the labels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from slimops.distill.losses import kd_logit_loss

__all__ = ["load_teacher", "logit_kd_criterion", "check_kd_options"]


def check_kd_options(kd_weight: float, temperature: float, where: str) -> None:
    """kd_weight finite and >= 0, temperature finite and > 0; errors name the option and ``where``."""
    for name, v, ok in (("kd_weight", kd_weight, lambda v: v >= 0), ("temperature", temperature, lambda v: v > 0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{where}: {name} must be a finite number {'>= 0' if name == 'kd_weight' else '> 0'}, "
                             f"got {v!r}")


@torch.no_grad()
def load_teacher(path: str, device, probe: torch.Tensor, student: nn.Module, where: str) -> nn.Module:
    """The model in ``path``, frozen and in eval mode, after checking that on ``probe`` (a batch of the run's
    images) its logits have the student's shape."""
    from slimops.pruning.pipeline import load_model_file

    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: teacher must be the path of a model file, got {path!r}")
    teacher, _ = load_model_file(path, device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    was_training = student.training
    student.eval()
    try:
        s = student(probe)
        try:
            t = teacher(probe)
        except RuntimeError as e:
            raise ValueError(f"{where}: teacher '{path}' cannot read this run's images "
                             f"{tuple(probe.shape[1:])}: {e}") from None
    finally:
        student.train(was_training)
    if t.shape != s.shape:
        raise ValueError(f"{where}: teacher '{path}' predicts {t.shape[-1]} classes, the student "
                         f"{s.shape[-1]}: distil from a model trained on the same data")
    return teacher


def logit_kd_criterion(teacher: nn.Module, *, kd_weight: float = 1.0, temperature: float = 4.0,
                       label_weight: float = 1.0):
    """``criterion(out, x, y)``: ``label_weight · CE + kd_weight · T² KL`` summed over the batch (module docstring).
    The teacher runs without autograd on the same (augmented) batch as the student."""
    check_kd_options(kd_weight, temperature, "slimops.distill.logit_kd_criterion")

    def loss(out, x, y):
        total = out.new_zeros(())
        if label_weight:
            total = total + label_weight * nn.functional.cross_entropy(out, y, reduction="sum")
        if kd_weight:
            with torch.no_grad():
                t = teacher(x)
            total = total + kd_weight * kd_logit_loss(out, t, temperature)
        return total

    return loss
