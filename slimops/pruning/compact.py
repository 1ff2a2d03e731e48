"""Compaction: turn a slimmed model and its :class:`Plan` into a physically smaller dense model.

Liu et al. (2017, docs/algorithms.md §2) cut, for every pruned BN channel, the producing conv's output
channel, the BN's parameters and running statistics, and the consuming layer's input channel; where
the BN reads a shared stream (pre-activation ResNet, DenseNet) a channel-selection gather picks the
kept channels instead of cutting the stream. :func:`compact` does that from the ``slim_groups()`` spec
every slimops model exposes, so one engine serves VGG, pre-ResNet and DenseNet.

A removed channel is not silent: with ``gamma_c = 0`` the BN emits the constant ``beta_c``, the ReLU
``relu(beta_c)``, and pooling keeps it constant. Dropping it changes the network (on digits, a VGG
pruned by proximal SGD falls from 99.7% to 96.1%). Folding the constant into the next layer's bias is
exact only away from the image border, because a padded consumer sees zeros outside the image. So
the plan instead gives such a layer one *constant channel*: BN ``gamma = 0, beta = 1`` (output 1 on
the image, 0 in the consumer's padding, exactly like the removed channels) whose consumer weights are
``sum_c relu(beta_c) * W[:, c]`` over the removed channels. That is exact everywhere, in eval and in
train mode, for any consumer (conv of any padding, or Linear after pooling), at the cost of one channel
per layer. A channel removed with ``gamma_c != 0`` (percentile pruning) is approximated by the constant
``relu(beta_c)``. With ``gamma = beta = 0`` on every removed channel nothing is added.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from slimops.pruning.plan import Plan


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _take(w: Tensor, dim: int, keep: Tensor, extra: Optional[Tensor]) -> Tensor:
    w = w.index_select(dim, keep)
    return w if extra is None else torch.cat([w, extra.to(w.dtype)], dim=dim)


def _sliced_conv(conv: nn.Conv2d, rows: Optional[tuple], cols: Optional[tuple]) -> nn.Conv2d:
    if conv.groups != 1:
        raise ValueError(f"slimops.pruning.compact: cannot cut the channels of a grouped conv (groups={conv.groups})")
    w = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()
    if cols is not None:  # first: the folded column spans every output channel
        w = _take(w, 1, *cols)
    if rows is not None:
        keep, const = rows
        zero_row = torch.zeros((1,) + w.shape[1:], dtype=w.dtype, device=w.device) if const else None
        w = _take(w, 0, keep, zero_row)  # the constant channel's BN has gamma = 0: its input is irrelevant
        if b is not None:
            b = _take(b, 0, keep, torch.zeros(1, dtype=b.dtype, device=b.device) if const else None)
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=b is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(conv.training)
    return new


def _sliced_linear(lin: nn.Linear, cols: tuple) -> nn.Linear:
    w = _take(lin.weight.detach(), 1, *cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    new.train(lin.training)
    return new


def _sliced_bn(bn: nn.BatchNorm2d, keep: Tensor, const: bool) -> nn.BatchNorm2d:
    """The kept channels' BN; with ``const`` one more channel that outputs exactly 1 (gamma 0, beta 1)."""
    if not (bn.affine and bn.track_running_stats):
        raise ValueError("slimops.pruning.compact: BatchNorm layers must be affine and track running statistics")
    new = type(bn)(len(keep) + int(const), eps=bn.eps, momentum=bn.momentum, device=keep.device, dtype=bn.weight.dtype)

    def one(v):
        return torch.full((1,), v, dtype=bn.weight.dtype, device=keep.device) if const else None

    with torch.no_grad():
        new.weight.copy_(_take(bn.weight, 0, keep, one(0.0)))
        new.bias.copy_(_take(bn.bias, 0, keep, one(1.0)))
        new.running_mean.copy_(_take(bn.running_mean, 0, keep, one(0.0)))
        new.running_var.copy_(_take(bn.running_var, 0, keep, one(1.0)))
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


@torch.no_grad()
def compact(model: nn.Module, plan: Plan) -> nn.Module:
    """A physically smaller dense copy of ``model`` that keeps only ``plan``'s channels.

    ``model`` is left untouched. The result has the same module tree with narrower layers (its
    ``slim_groups()`` still hold, so it can be slimmed again), and
    ``compact(build_from_config(plan.arch), plan)`` gives the same architecture, so a compacted
    ``state_dict`` loads into a replayed plan. Layers listed in ``plan.constant`` get one extra,
    last channel carrying the removed channels' constant output (see the module docstring).
    """
    plan.check(model)
    new = copy.deepcopy(model)
    groups = new.slim_groups()
    out_rows: dict = {}   # conv name -> (kept output channels, append a zero row?)
    in_cols: dict = {}    # conv/linear name -> (kept input channels, folded column or None)
    for g in groups:
        bn = new.get_submodule(g.bn)
        dev = bn.weight.device
        keep = torch.tensor(plan.layers[g.bn], dtype=torch.long, device=dev)
        const = g.bn in plan.constant
        removed = None
        if const:
            mask = torch.ones(bn.num_features, dtype=torch.bool, device=dev)
            mask[keep] = False
            removed = torch.nonzero(mask).flatten()
            value = torch.relu(bn.bias.detach().index_select(0, removed))
        if g.producer is not None:
            out_rows[g.producer] = (keep, const)
        else:
            sel = new.get_submodule(g.select)
            idx = sel.index.index_select(0, keep.to(sel.index.device))
            if const:  # any removed stream channel: gamma = 0 ignores its values, and it is unique
                idx = torch.cat([idx, sel.index[removed[:1].to(sel.index.device)]])
            sel.set_index(idx)
        for c in g.consumers:
            cons = new.get_submodule(c)
            col = None
            if const:
                w = cons.weight.detach().index_select(1, removed)
                shape = (1, -1) + (1,) * (w.dim() - 2)
                col = (w * value.to(w.dtype).view(shape)).sum(dim=1, keepdim=True)
            in_cols[c] = (keep, col)
        _set_module(new, g.bn, _sliced_bn(bn, keep, const))
    for name in sorted(set(out_rows) | set(in_cols)):
        mod = new.get_submodule(name)
        rows = out_rows.get(name)
        cols = in_cols.get(name)
        if isinstance(mod, nn.Linear):
            if rows is not None:
                raise TypeError(f"slimops.pruning.compact: '{name}' is a Linear producer; only convs produce BN inputs")
            _set_module(new, name, _sliced_linear(mod, cols))
        elif isinstance(mod, nn.Conv2d):
            _set_module(new, name, _sliced_conv(mod, rows, cols))
        else:
            raise TypeError(f"slimops.pruning.compact: '{name}' is a {type(mod).__name__}; Conv2d or Linear expected")
    new.slim_plan = plan
    return new


def build_pruned(plan: Plan, device=None) -> nn.Module:
    """A freshly built model of ``plan``'s architecture, compacted by ``plan``: the module tree a
    compacted ``state_dict`` loads into."""
    from slimops.models import build_from_config

    model = build_from_config(plan.arch)
    if device is not None:
        model = model.to(device)
    return compact(model, plan)


@torch.no_grad()
def compaction_error(original: nn.Module, compacted: nn.Module, x: Tensor) -> dict:
    """How far the compacted model's eval-mode outputs are from the original's on ``x``:
    max absolute difference, its ratio to the largest output, and top-1 agreement."""
    modes = (original.training, compacted.training)
    original.eval(), compacted.eval()
    try:
        a, b = original(x).float(), compacted(x).float()
    finally:
        original.train(modes[0]), compacted.train(modes[1])
    diff = (a - b).abs().max().item()
    return {"max_abs_diff": diff, "rel_diff": diff / max(a.abs().max().item(), 1e-12),
            "top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item()}
