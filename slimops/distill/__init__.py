"""Distillation losses (docs/algorithms.md §9): the logit loss of knowledge distillation and FAQD's feature-affinity
loss (the fused op slimops.ops.feature_affinity_loss, the teacher's features resized to the student's), which the quantised students of :mod:`slimops.quant` learn
from."""
from slimops.distill.affinity import AffinityFeatures, feature_affinity_loss
from slimops.distill.losses import kd_logit_loss

__all__ = ["kd_logit_loss", "feature_affinity_loss", "AffinityFeatures"]
