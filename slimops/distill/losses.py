"""Knowledge-distillation losses.

``kd_logit_loss(student, teacher, T)`` — Hinton et al. 2015: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``
summed over the batch (the training loop's convention: a per-batch sum it divides by the global batch size). The
``T²`` keeps the gradient's size independent of the temperature, so the weight of the term against the
cross-entropy means the same at every T.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_logit_loss"]


def kd_logit_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² Σ_batch KL(softmax(teacher/T) ‖ softmax(student/T))``; teacher logits are treated as constants."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"slimops.distill.kd_logit_loss: temperature must be finite and > 0, got {temperature}")
    if student.shape != teacher.shape:
        raise ValueError(f"slimops.distill.kd_logit_loss: student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape")
    t = float(temperature)
    log_p = F.log_softmax(student / t, dim=1)
    log_q = F.log_softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True) * (t * t)
