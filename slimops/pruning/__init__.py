"""Slimming pipelines: train toward sparse channels, plan, compact, fine-tune (docs/algorithms.md §2-§5).

    model = slimops.models.build("vgg11", width=0.5)
    ...train with a method (slimops.pruning.methods / the CLI `python -m slimops slim`)...
    plan = slimops.pruning.plan_from_bn(model)            # the exact zeros; or percent=0.5
    small = slimops.pruning.compact(model, plan)          # a physically smaller dense model
    same_arch = slimops.pruning.build_pruned(Plan.from_json(plan.to_json()))
    fast = slimops.pruning.sparsify(model, plan)          # same outputs, full tensors, kept channels only

    vit.set_token_plan(slimops.pruning.plan_tokens(vit, batches, keep=0.5))   # patch slimming (ViTs)

    plan = slimops.pruning.vit_plan_from_gates(gated)     # ViT / SEMA-T dimension gates (VTP, SiDT)
    small = slimops.pruning.compact_vit(gated, plan)      # plan.tokens (patch slimming) runs there too
"""
from slimops.pruning.compact import build_pruned, compact, compaction_error
from slimops.pruning.config import SlimConfig
from slimops.pruning.methods import METHODS, MethodConfig, SlimMethod, default_lam
from slimops.pruning.patch_slim import TokenPlan, plan_tokens
from slimops.pruning.plan import Plan, plan_from_bn
from slimops.pruning.keep_target import KeepTarget
from slimops.pruning.sparsify import sparsify
from slimops.pruning.vit import ViTPlan, build_pruned_vit, compact_vit, vit_plan_from_gates

__all__ = ["SlimConfig", "Plan", "plan_from_bn", "compact", "build_pruned", "compaction_error", "sparsify", "METHODS", "MethodConfig",
           "SlimMethod", "default_lam", "TokenPlan", "plan_tokens", "ViTPlan", "vit_plan_from_gates", "compact_vit",
           "build_pruned_vit", "KeepTarget"]
