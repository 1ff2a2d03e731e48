"""Distillation losses (docs/algorithms.md §9): the logit loss of knowledge distillation that the quantised students
of :mod:`slimops.quant` learn from. The feature-affinity loss of FAQD comes next (issue #15)."""
from slimops.distill.losses import kd_logit_loss

__all__ = ["kd_logit_loss"]
