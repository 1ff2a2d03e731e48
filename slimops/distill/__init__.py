"""Distillation losses (docs/algorithms.md §9): the logit loss of knowledge distillation and FAQD's feature-affinity
loss (a PyTorch composite until its fused op lands), which the quantised students of :mod:`slimops.quant` learn
from."""
from slimops.distill.affinity import AffinityFeatures, feature_affinity_loss
from slimops.distill.losses import kd_logit_loss

__all__ = ["kd_logit_loss", "feature_affinity_loss", "AffinityFeatures"]
