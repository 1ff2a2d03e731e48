"""VTP / SiDT's dimension gates (docs/algorithms.md §6) and what the gated attention modules share: the gate
itself, and the split of a fused qkv projection whose value part may be narrower than its q / k part (a
compacted block whose value dims were pruned).

Used by :class:`slimops.nn.vit.ViTAttention` / :class:`slimops.nn.vit.ViTMlp` (the ViTs) and by
:class:`slimops.nn.sema.SEMAAttention` / :class:`slimops.nn.sema.SEMAMlp` (SEMA-T); planned and compacted by
:mod:`slimops.pruning.vit`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DimGate", "GatedMlp", "split_qkv"]


class DimGate(nn.Module):
    """A learnable gate per dimension, ``x -> x * weight`` over the last dim (VTP / SiDT's dimension gates,
    docs/algorithms.md §6), initialised to 1 (the identity). Made sparse in training (an l1 penalty or its prox),
    folded into the next Linear layer's columns and cut where it is 0 (:func:`slimops.pruning.vit.compact_vit`)."""

    def __init__(self, n: int):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"slimops.nn.DimGate: n must be a positive int, got {n!r}")
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight

    def extra_repr(self) -> str:
        return f"n={self.weight.numel()}"


def split_qkv(qkv: Tensor, heads: int, head_dim: int, v_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, N, head_dim) from a fused projection ``qkv`` (B, N, heads (2 head_dim + v_dim)) laid out
    [q | k | v], heads major within each: strided views with a contiguous head dim, no copy.

    With ``v_dim < head_dim`` (a compacted block whose value dims were pruned; q / k are not gated, so the logits
    stay exact) v is zero-padded to ``head_dim``, one copy of v: the attention kernels (torch's fused SDPA, and
    slimops' SEMA) want v's head dim equal to q's (SDPA takes its math path otherwise, 2.4x slower at DeiT-Ti's
    shapes on CPU). The caller drops the padding from the output (``out[..., :v_dim]``)."""
    b, n = qkv.shape[:2]
    if v_dim == head_dim:  # (B, N, 3 heads d) -> (3, B, heads, N, d)
        q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v
    q, k = qkv[..., : 2 * heads * head_dim].reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    v = qkv[..., 2 * heads * head_dim:].reshape(b, n, heads, v_dim).transpose(1, 2)
    return q, k, F.pad(v, (0, head_dim - v_dim))


class GatedMlp(nn.Module):
    """``fc2(gate(act(fc1(x))))`` with ``hidden`` units and an optional :class:`DimGate` (VTP / SiDT's MLP gate) on
    the activations, so removing a gated-off unit (its fc1 row and fc2 column) is exact whatever the activation.
    Subclasses hold ``fc1``, ``act``, ``fc2`` under their own names (:meth:`_install` puts cut layers there)."""

    hidden: int
    gate: DimGate | None

    def _install(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        raise NotImplementedError

    def add_gates(self) -> None:
        if self.gate is None:
            self.gate = DimGate(self.hidden).to(self.fc1.weight.device)

    def resize(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Installs cut ``fc1`` / ``fc2`` layers (compaction); the gate goes (folded into fc2 by then)."""
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"slimops.nn.{type(self).__name__}.resize: fc1 has {fc1.out_features} outputs but fc2 "
                             f"{fc2.in_features} inputs")
        self._install(fc1, fc2)
        self.hidden, self.gate = fc1.out_features, None

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        if self.gate is not None:
            h = self.gate(h)
        return self.fc2(h)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}"
