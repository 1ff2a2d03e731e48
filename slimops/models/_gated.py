"""What a model with VTP / SiDT dimension gates offers (docs/algorithms.md §6): the ViTs and SEMA-T.

A gated model lists its transformer blocks (:meth:`DimGated.gated_blocks`); each block has an ``attn`` and an
``mlp`` with ``add_gates()`` and gate attributes (``attn.gate_in``, ``attn.gate_out``, ``mlp.gate``), which
:mod:`slimops.pruning.vit` plans and compacts and :mod:`slimops.pruning.methods` trains (the gates are a model's
``gates()``)."""
from __future__ import annotations

from torch import nn

from slimops.nn.dim_gate import DimGate


class DimGated:
    """Mixin for an ``nn.Module`` whose blocks (:meth:`gated_blocks`) take dimension gates."""

    def gated_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def gated(self) -> bool:
        return any(b.mlp.gate is not None for b in self.gated_blocks())

    def add_gates(self):
        """Installs VTP / SiDT's dimension gates (:class:`slimops.nn.DimGate`, all 1: the model computes the same
        function) in every block: on the input of ``qkv`` (``<block>.attn.gate_in``), of ``proj``
        (``<block>.attn.gate_out``) and on the MLP hidden units (``<block>.mlp.gate``). Returns the model."""
        for b in self.gated_blocks():
            b.attn.add_gates()
            b.mlp.add_gates()
        return self

    def gates(self) -> dict:
        """Every gate vector by module name (``blocks.N.attn.gate_in`` ...), in module order."""
        return {n: m.weight for n, m in self.named_modules() if isinstance(m, DimGate)}
