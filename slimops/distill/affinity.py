"""The feature-affinity (FA) loss of FAQD (Li, Yang, Yin, Qi, Xin 2023; docs/algorithms.md §9), as the authors'
code computes it, written with PyTorch ops. The fused ``feature_affinity_loss`` op of issue #15 (C++ / Triton, O(HW·k)
memory in both passes) is not implemented yet; this composite is what the ``faqd`` method of ``slimops quantize``
uses meanwhile.

Per image, every pixel's channel vector is divided by ``‖·‖₂ + 1e-5`` (``F̂ ∈ ℝ^{C×HW}``) and the affinity matrix is
``A = F̂ᵀF̂`` (``HW × HW``, pixel-to-pixel cosine similarity: teacher and student may have different channel counts).

- exact: ``L_FA = Σ_b ‖A_S − A_T‖₁ / (HW)²`` (entrywise ℓ1, summed over the batch). Forms the ``HW × HW`` matrices:
  O(B·(HW)²) memory.
- fast (``fast=True``): with a fixed ``Z ∈ ℝ^{HW×k}`` of i.i.d. N(0, 1) entries (seeded: the same at every call),
  ``L_FFA = Σ_b ‖F̂_Sᵀ(F̂_S Z) − F̂_Tᵀ(F̂_T Z)‖₁ / (k·(HW)²)``: O(B·HW·k) memory, never the ``HW × HW`` matrix. Its
  expectation is ``√(2/π)·Σ_b Σ_i ‖row_i(A_S − A_T)‖₂ / (HW)²``, not ``L_FA`` (a cheaper affinity loss, see §9).

The teacher's features are resized bilinearly to the student's ``H × W`` when they differ (the authors' code).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["feature_affinity_loss", "normalize_pixels", "gaussian_projection", "AffinityFeatures"]

EPS = 1e-5


def normalize_pixels(f: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, HW), each pixel's channel vector divided by its L2 norm + 1e-5."""
    f = f.flatten(2)
    return f / (f.norm(dim=1, keepdim=True) + EPS)


@lru_cache(maxsize=16)
def _projection_cpu(hw: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hw, k, generator=g, dtype=torch.float64)


def gaussian_projection(hw: int, k: int, seed: int, device, dtype) -> Tensor:
    """The fixed ``HW × k`` matrix of N(0, 1) entries (drawn once on the CPU from ``seed``: the same on any device)."""
    return _projection_cpu(int(hw), int(k), int(seed)).to(device=device, dtype=dtype)


def _check(fs: Tensor, ft: Tensor, k: int):
    where = "slimops.distill.feature_affinity_loss"
    for name, t in (("fs", fs), ("ft", ft)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
            raise ValueError(f"{where}: {name} must be a 4-D float tensor (B, C, H, W), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"{where}: fs has batch {fs.shape[0]} but ft has {ft.shape[0]}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: k must be a positive int, got {k!r}")


def feature_affinity_loss(fs: Tensor, ft: Tensor, *, fast: bool = False, k: int = 256, seed: int = 0) -> Tensor:
    """FA (or with ``fast=True`` FFA) loss between student features ``fs`` and teacher features ``ft``, summed over
    the batch (module docstring). Differentiable in both (detach the teacher's yourself)."""
    _check(fs, ft, k)
    if ft.shape[2:] != fs.shape[2:]:
        ft = F.interpolate(ft, size=fs.shape[2:], mode="bilinear", align_corners=True)
    dt = torch.float64 if fs.dtype == torch.float64 else torch.float32
    s, t = normalize_pixels(fs.to(dt)), normalize_pixels(ft.to(dt))
    hw = s.shape[2]
    if fast:
        z = gaussian_projection(hw, k, seed, s.device, dt)
        d = s.transpose(1, 2) @ (s @ z) - t.transpose(1, 2) @ (t @ z)  # (B, HW, k)
        return d.abs().sum() / (k * hw * hw)
    total = s.new_zeros(())
    for b in range(s.shape[0]):  # one HW x HW pair at a time (the forward's peak; autograd keeps what it needs)
        total = total + (s[b].t() @ s[b] - t[b].t() @ t[b]).abs().sum()
    return total / (hw * hw)


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
