"""Distillation losses (docs/algorithms.md §9): the logit loss of knowledge distillation and FAQD's feature-affinity
loss (the fused op slimops.ops.feature_affinity_loss, the teacher's features resized to the student's), which the quantised students of :mod:`slimops.quant` learn
from; a frozen teacher and the logit-KD criterion that the pruned models' fine-tuning (``--teacher``) learns with."""
from slimops.distill.affinity import AffinityFeatures, feature_affinity_loss
from slimops.distill.losses import kd_logit_loss
from slimops.distill.teacher import check_kd_options, load_teacher, logit_kd_criterion

__all__ = ["kd_logit_loss", "feature_affinity_loss", "AffinityFeatures", "load_teacher", "logit_kd_criterion",
           "check_kd_options"]
