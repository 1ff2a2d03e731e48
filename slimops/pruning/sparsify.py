"""Sparsify: run a slimmed model on its full-size tensors, computing only the kept channels.

:func:`slimops.pruning.compact` copies the kept channels into a physically smaller model;
:func:`sparsify` keeps every tensor where it is and swaps the layers of each slim group (docs/algorithms.md
§2) for channel-sparse ones (``slimops.nn.ChannelSparseConv2d`` and friends), so that

- the producer conv computes only the kept output channels (``out_idx``) and the BN normalises them
  with the matching entries of its full parameters and statistics;
- every consumer reads that compact activation as ``input_gathered`` channels (``in_idx``), and adds the
  removed channels' constant output relu(beta) exactly, border included (the plan's constant layers,
  see :mod:`slimops.pruning.compact`);
- a stream BN (pre-ResNet, DenseNet) narrows its channel selection to the kept channels, as in compact.

The result computes what ``compact(model, plan)`` computes (same outputs up to float reassociation, in
eval and train mode) with the same work, but training continues on the full parameters (shared with
``model`` when ``inplace=True``), and its state_dict holds the full tensors plus the index buffers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from slimops.nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseLinear
from slimops.pruning.compact import _set_module
from slimops.pruning.plan import Plan


@torch.no_grad()
def sparsify(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """``model`` with the layers of every slim group replaced by channel-sparse layers keeping ``plan``'s
    channels (a deep copy unless ``inplace``). See the module docstring."""
    plan.check(model)
    new = model if inplace else copy.deepcopy(model)
    out_rows: dict = {}   # conv name -> kept output channels
    in_cols: dict = {}    # conv/linear name -> (kept input channels, constant inputs or None)
    for g in new.slim_groups():
        bn = new.get_submodule(g.bn)
        dev = bn.weight.device
        keep = torch.tensor(plan.layers[g.bn], dtype=torch.long, device=dev)
        const_in = None
        if g.bn in plan.constant:
            const_in = torch.relu(bn.bias.detach()).clone()
            const_in[keep] = 0
        if g.producer is not None:
            out_rows[g.producer] = keep
        else:
            sel = new.get_submodule(g.select)
            sel.set_index(sel.index.index_select(0, keep.to(sel.index.device)))
        for c in g.consumers:
            in_cols[c] = (keep, const_in)
        _set_module(new, g.bn, ChannelSparseBatchNorm2d(bn, keep))
    for name in sorted(set(out_rows) | set(in_cols)):
        mod = new.get_submodule(name)
        cols = in_cols.get(name)
        if isinstance(mod, nn.Linear):
            if name in out_rows:
                raise TypeError(f"slimops.pruning.sparsify: '{name}' is a Linear producer; only convs produce BN inputs")
            _set_module(new, name, ChannelSparseLinear(mod, cols[0], cols[1]))
        elif isinstance(mod, nn.Conv2d):
            in_idx, const_in = cols if cols is not None else (None, None)
            # A const layer's compact input never carries the removed channels: their const_in entries only.
            const = None if const_in is None else const_in.to(mod.weight.dtype)
            _set_module(new, name, ChannelSparseConv2d.from_conv(mod, in_idx, out_rows.get(name),
                                                                 input_gathered=cols is not None, const_in=const))
        else:
            raise TypeError(f"slimops.pruning.sparsify: '{name}' is a {type(mod).__name__}; Conv2d or Linear expected")
    new.slim_plan = plan
    return new
