"""The feature-affinity (FA) loss of FAQD (Li, Yang, Yin, Qi, Xin 2023; docs/algorithms.md §9) as the distillation
pipeline uses it: the teacher's features resized bilinearly to the student's ``H × W`` when they differ and cast to
the student's dtype (the authors' code), then the fused op :func:`slimops.ops.feature_affinity_loss` (C++ / Triton:
no ``HW × HW`` matrix in either pass, exact or fast).

Per image, every pixel's channel vector is divided by ``‖·‖₂ + 1e-5`` (``F̂ ∈ ℝ^{C×HW}``) and the affinity matrix is
``A = F̂ᵀF̂`` (``HW × HW``, pixel-to-pixel cosine similarity: teacher and student may have different channel counts).

- exact: ``L_FA = Σ_b ‖A_S − A_T‖₁ / (HW)²`` (entrywise ℓ1, summed over the batch).
- fast (``fast=True``): with a fixed ``Z ∈ ℝ^{HW×k}`` of i.i.d. N(0, 1) entries (seeded: the same at every call),
  ``L_FFA = Σ_b ‖F̂_Sᵀ(F̂_S Z) − F̂_Tᵀ(F̂_T Z)‖₁ / (k·(HW)²)``. Its expectation is
  ``√(2/π)·Σ_b Σ_i ‖row_i(A_S − A_T)‖₂ / (HW)²``, not ``L_FA`` (a cheaper affinity loss, see §9); ``norm="l2sq"``
  gives the squared variant, whose fast value is an unbiased estimate of its exact one.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.ops.distill import feature_affinity_loss as _fa_op, gaussian_projection
from slimops.reference.distill import normalize_pixels as _normalize

__all__ = ["feature_affinity_loss", "normalize_pixels", "gaussian_projection", "AffinityFeatures"]


def normalize_pixels(f: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, HW), each pixel's channel vector divided by its L2 norm + 1e-5 (float64 stays float64,
    other dtypes are computed in float32)."""
    return _normalize(f, torch.float64 if f.dtype == torch.float64 else torch.float32)


def feature_affinity_loss(fs: Tensor, ft: Tensor, *, fast: bool = False, k: int = 256, seed: int = 0,
                          norm: str = "l1") -> Tensor:
    """FA (or with ``fast=True`` FFA) loss between student features ``fs`` and teacher features ``ft``, summed over
    the batch (module docstring). Differentiable in both (detach the teacher's yourself)."""
    if isinstance(fs, Tensor) and isinstance(ft, Tensor) and fs.dim() == 4 and ft.dim() == 4:
        if ft.shape[2:] != fs.shape[2:]:
            ft = F.interpolate(ft, size=fs.shape[2:], mode="bilinear", align_corners=True)
        if ft.dtype != fs.dtype and ft.dtype.is_floating_point:
            ft = ft.to(fs.dtype)
    return _fa_op(fs, ft, fast=fast, k=k, seed=seed, norm=norm, reduction="sum")


class AffinityFeatures:
    """Captures the feature maps FAQD matches: the output of the last module at each spatial resolution larger than
    1×1 (for VGG: the ReLU before each pooling; for ResNets: the stage outputs), found from one probe forward.
    ``names`` are module names, the same in a teacher and the student made from it by ``quantize_model``."""

    def __init__(self, model: nn.Module, names: List[str]):
        self.names = list(names)
        self.maps: Dict[str, Tensor] = {}
        self._hooks = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.maps[name] = output

        return hook

    def pop(self) -> List[Tensor]:
        out = [self.maps[n] for n in self.names]
        self.maps = {}
        return out

    def remove(self):
        for h in self._hooks:
            h.remove()

    @staticmethod
    @torch.no_grad()
    def stage_outputs(model: nn.Module, x: Tensor) -> List[str]:
        """The names of the last module of each run of equal (H, W) outputs, in execution order, among the NCHW
        modules (convolutions, batch norms, activations, pooling) that run once per forward: a module called twice
        (shared) keeps only its last output in a hook, and the 4-D outputs of token mixers are channels-last."""
        seen: List[tuple] = []
        calls: Dict[str, int] = {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, _NCHW_MODULES):
                def hook(mod, i, o, name=name):
                    calls[name] = calls.get(name, 0) + 1
                    if isinstance(o, Tensor) and o.dim() == 4:
                        seen.append((name, tuple(o.shape[2:])))

                hooks.append(m.register_forward_hook(hook))
        was = model.training
        model.eval()
        try:
            model(x)
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        seen = [(n, hw) for n, hw in seen if calls[n] == 1]
        names = []
        for i, (name, hw) in enumerate(seen):
            last_of_run = i + 1 == len(seen) or seen[i + 1][1] != hw
            if last_of_run and hw[0] * hw[1] > 1:
                names.append(name)
        return names


_NCHW_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.SiLU, nn.MaxPool2d,
                 nn.AvgPool2d)
