"""ViT and SEMA-T dimension pruning (VTP, SiDT; docs/algorithms.md §6): a plan from the dimension gates, and the
exact compaction of a gated model into a physically smaller one.

Per block, three gates (:class:`slimops.nn.DimGate`) decide what stays:

- ``attn.gate_in`` (``dim`` entries): the input dims of ``qkv``. A removed dim drops its column of ``qkv``.
  - ViT: the compacted block reads the kept dims of the normalised tokens (``attn.in_index``); the residual
    stream keeps every dim.
  - SEMA-T: the attention's input is made inside the block (``SiLU(dwc(in_proj(norm1(x))))``), so a removed
    dim also drops the ``in_proj`` row and the ``dwc`` channel that made it; the attention branch runs on the
    kept dims from ``in_proj`` to ``qkv``.
- ``attn.gate_out`` (``heads * head_dim``): the value dims of each head (the input of ``proj``). A removed dim
  drops its row of ``qkv``'s v part and its column of ``proj``. A head with no value dim left contributes nothing
  and goes whole (its q, k and v rows). Kept heads keep every q/k dim (those are not gated, so the attention
  logits are unchanged) and must have one value width: the compaction pads each kept head to the widest kept
  head (``ViTPlan.v_dim``) with its best removed dims, whose ``proj`` columns are set to 0. (The attention
  kernels want v as wide as q: v is zero-padded to ``head_dim`` at run time, :func:`slimops.nn.dim_gate.split_qkv`,
  so a narrower v saves ``qkv`` rows and ``proj`` columns, not attention work; removed heads save that too.)
- ``mlp.gate`` (``hidden``): the MLP hidden units; a removed unit drops its row of ``fc1`` and column of ``fc2``.

Gates are folded into the next layer's columns (``W diag(g)``) before cutting, so the compacted model computes
exactly what the gated model computes with its removed gates set to 0 (:func:`zero_removed_gates`), up to float
rounding. The plan is JSON (:class:`ViTPlan`), like the CNN plans of :mod:`slimops.pruning.plan`; SEMA-T's plans
list the widths of every block (its four stages differ).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from slimops.pruning.checkpoint import check_format, read_json_file
from slimops.pruning.plan import MAX_PLAN_BYTES, check_percent

if TYPE_CHECKING:
    from slimops.pruning.patch_slim import TokenPlan

VIT_PLAN_FORMAT = "slimops-vit-plan"
VIT_PLAN_VERSION = 1
VIT_PLAN_VERSION_TOKENS = 2  # a plan that also carries patch slimming's tokens: older readers refuse it, not ignore it

__all__ = ["ViTPlan", "vit_plan_from_gates", "compact_vit", "zero_removed_gates", "build_pruned_vit"]


def _err(msg: str) -> ValueError:
    return ValueError(f"slimops.pruning.ViTPlan: {msg}")


def _indices(where: str, kept, n: int, allow_empty: bool) -> list:
    if not isinstance(kept, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise _err(f"{where} must be a list of integer indices")
    kept = list(kept)
    if kept != sorted(set(kept)):
        raise _err(f"{where} must be sorted and without duplicates")
    if kept and (kept[0] < 0 or kept[-1] >= n):
        raise _err(f"{where} has an index out of range [0, {n}): {kept[0] if kept[0] < 0 else kept[-1]}")
    if not kept and not allow_empty:
        raise _err(f"{where} keeps nothing (at least one must stay)")
    return kept


def _check_dims(d, where: str) -> None:
    for key in ("dim", "heads", "head_dim", "hidden"):
        v = d.get(key) if isinstance(d, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _err(f"{where}['{key}'] must be a positive integer, got {v!r}")


@dataclass
class ViTPlan:
    """What stays of every block of one ViT.

    Attributes:
        arch: ``model.config()`` of the gated model the plan was made for.
        blocks: per block ``{"in": kept qkv input dims, "v": [kept value dims of head h, for every head] (an
            empty list removes the head), "hidden": kept MLP hidden units}``.
        dims: ``{"dim", "heads", "head_dim", "hidden"}`` of the unpruned blocks (checked against the model):
            one dict when every block has the same widths (the ViTs), else one per block (SEMA-T's stages).
        meta: how the plan was made (criterion, percent, threshold); informational.
        tokens: ViTs only: a :class:`~slimops.pruning.patch_slim.TokenPlan` (patch slimming) the dimension-pruned
            model also runs, so that one plan describes a ViT slimmed in both its widths and its tokens; None for
            dimensions only.
    """

    arch: dict
    blocks: list
    dims: dict
    meta: dict = field(default_factory=dict)
    tokens: Optional["TokenPlan"] = None

    def __post_init__(self):
        if not isinstance(self.blocks, list) or not self.blocks:
            raise _err("blocks must be a non-empty list")
        if isinstance(self.dims, list):
            if len(self.dims) != len(self.blocks):
                raise _err(f"dims must be one dict, or one per block ({len(self.blocks)}), got {len(self.dims)}")
            for i, d in enumerate(self.dims):
                _check_dims(d, f"dims[{i}]")
        else:
            _check_dims(self.dims, "dims")
        for i, b in enumerate(self.blocks):
            d = self.block_dims(i)
            if not isinstance(b, dict) or set(b) != {"in", "v", "hidden"}:
                raise _err(f"block {i} must have exactly the keys 'in', 'v', 'hidden'")
            b["in"] = _indices(f"block {i} 'in'", b["in"], d["dim"], False)
            b["hidden"] = _indices(f"block {i} 'hidden'", b["hidden"], d["hidden"], False)
            if not isinstance(b["v"], list) or len(b["v"]) != d["heads"]:
                raise _err(f"block {i} 'v' must list the kept value dims of each of the {d['heads']} heads")
            b["v"] = [_indices(f"block {i} head {h} 'v'", v, d["head_dim"], True) for h, v in enumerate(b["v"])]
            if not any(b["v"]):
                raise _err(f"block {i} removes every head (at least one must stay)")
        if self.tokens is not None:
            from slimops.models import VIT_MODELS
            from slimops.pruning.patch_slim import TokenPlan

            if not isinstance(self.tokens, TokenPlan):
                raise _err(f"tokens must be a TokenPlan or None, got {type(self.tokens).__name__}")
            if not isinstance(self.arch, dict) or self.arch.get("arch") not in VIT_MODELS:
                raise _err(f"tokens (patch slimming) are for the ViTs ({', '.join(VIT_MODELS)}), the plan is for "
                           f"{self.arch.get('arch') if isinstance(self.arch, dict) else self.arch!r}")
            if len(self.tokens.keep) != len(self.blocks):
                raise _err(f"tokens keep counts for {len(self.tokens.keep)} blocks, the plan has {len(self.blocks)}")

    # -- derived --------------------------------------------------------------------------------------
    def block_dims(self, i: int) -> dict:
        """``{"dim", "heads", "head_dim", "hidden"}`` of block i before pruning."""
        return self.dims[i] if isinstance(self.dims, list) else self.dims

    def heads_kept(self, i: int) -> list:
        return [h for h, v in enumerate(self.blocks[i]["v"]) if v]

    def v_dim(self, i: int) -> int:
        """The value width of block i's kept heads after padding: the widest kept head's."""
        return max(len(v) for v in self.blocks[i]["v"])

    def gated_total(self, i: int) -> int:
        """Block i's gated dims before pruning: qkv inputs + value dims + MLP units."""
        d = self.block_dims(i)
        return d["dim"] + d["heads"] * d["head_dim"] + d["hidden"]

    def summary(self) -> dict:
        """Kept heads, value dims, qkv input dims and MLP units per block, and the kept fraction of all gated
        dims (``gated_dims_kept``, of ``gated_dims_total``)."""
        per = [{"heads": len(self.heads_kept(i)), "v_dims": sum(len(v) for v in b["v"]), "in_dims": len(b["in"]),
                "hidden": len(b["hidden"])} for i, b in enumerate(self.blocks)]
        total = sum(self.gated_total(i) for i in range(len(self.blocks)))
        kept = sum(p["in_dims"] + p["v_dims"] + p["hidden"] for p in per)
        out = {"blocks": per, "gated_dims_kept": kept / total, "gated_dims_total": total}
        if self.tokens is not None:
            out["tokens"] = self.tokens.summary()
        return out

    # -- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": VIT_PLAN_FORMAT, "version": VIT_PLAN_VERSION, "arch": self.arch, "dims": self.dims,
             "blocks": self.blocks, "meta": self.meta}
        if self.tokens is not None:
            d.update(version=VIT_PLAN_VERSION_TOKENS, tokens=self.tokens.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTPlan":
        where = "slimops.pruning.ViTPlan"
        version = d.get("version") if isinstance(d, dict) else None
        check_format(d, VIT_PLAN_FORMAT, VIT_PLAN_VERSION_TOKENS if version == VIT_PLAN_VERSION_TOKENS
                     else VIT_PLAN_VERSION, where, "a ViT plan")
        tokens = None
        if version == VIT_PLAN_VERSION_TOKENS:
            from slimops.pruning.patch_slim import TokenPlan

            if "tokens" not in d:
                raise _err("missing field 'tokens' (a version-2 plan carries patch slimming's tokens)")
            tokens = TokenPlan.from_dict(d["tokens"])
        elif "tokens" in d:
            raise _err("a version-1 plan has no 'tokens' (version 2 carries them)")
        try:
            return cls(arch=d["arch"], blocks=copy.deepcopy(d["blocks"]), dims=d["dims"], meta=d.get("meta", {}),
                       tokens=tokens)
        except KeyError as e:
            raise _err(f"missing field {e}") from None

    def save(self, path: str) -> None:
        from slimops.pruning.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str) -> "ViTPlan":
        return cls.from_dict(read_json_file(path, MAX_PLAN_BYTES, "slimops.pruning.ViTPlan.load", "a plan"))


def _blocks_of(model: nn.Module, where: str) -> list:
    from slimops.models._gated import DimGated

    if not isinstance(model, DimGated):
        raise TypeError(f"{where}: model must be a slimops ViT or SEMA-T (slimops.models.build('vit_ti' | 'sema_t', "
                        f"...)), got {type(model).__name__}")
    if not model.gated:
        raise ValueError(f"{where}: the model has no dimension gates (build it with gates=True or call add_gates())")
    return model.gated_blocks()


def _dims_of(model: nn.Module):
    """The unpruned widths of every gated block: one dict when they are all the same, else a list."""
    dims = [{"dim": b.attn.in_dim if hasattr(b.attn, "in_dim") else b.attn.dim, "heads": b.attn.num_heads,
             "head_dim": b.attn.head_dim, "hidden": b.mlp.hidden} for b in model.gated_blocks()]
    return dims[0] if all(d == dims[0] for d in dims) else dims


@torch.no_grad()
def vit_plan_from_gates(model: nn.Module, percent: Optional[float] = None) -> ViTPlan:
    """The plan of a gated ViT or SEMA-T: with ``percent=None`` the dims whose gate is exactly 0 go (SiDT's
    proximal training makes them so); with ``percent`` in [0, 1) the lowest ``percent`` of all gates by ``|g|``
    go, one threshold over every gate of the model (VTP). Each block keeps at least its best qkv input dim, its
    best MLP unit and the best value dim of its best head."""
    where = "slimops.pruning.vit_plan_from_gates"
    blocks = _blocks_of(model, where)
    check_percent(percent, where)
    scores = [(b.attn.gate_in.weight.abs(), b.attn.gate_out.weight.abs(), b.mlp.gate.weight.abs()) for b in blocks]
    if not all(torch.isfinite(t).all() for s in scores for t in s):
        raise ValueError(f"{where}: a gate is NaN or infinite; the model cannot be pruned by it")
    by_threshold = percent is not None and percent > 0
    threshold = 0.0
    if by_threshold:
        flat = torch.cat([t.float().flatten() for s in scores for t in s])
        k = int(percent * flat.numel())
        threshold = float(flat.kthvalue(k).values) if k > 0 else -1.0

    def keep_of(t: Tensor) -> Tensor:
        keep = t > threshold if by_threshold else t != 0
        if not keep.any():  # the best one stays (a block needs an input dim, a unit and a value dim)
            keep.view(-1)[int(t.flatten().argmax())] = True
        return keep

    plan_blocks = []
    for b, (g_in, g_out, g_mlp) in zip(blocks, scores):
        keep_v = keep_of(g_out.reshape(b.attn.num_heads, b.attn.head_dim))
        plan_blocks.append({"in": keep_of(g_in).nonzero().flatten().tolist(),
                            "v": [row.nonzero().flatten().tolist() for row in keep_v],
                            "hidden": keep_of(g_mlp).nonzero().flatten().tolist()})
    meta = {"criterion": "exact zeros" if percent is None else f"lowest {percent:.3g} of |gate|", "percent": percent,
            "threshold": threshold}
    return ViTPlan(arch=model.config(), blocks=plan_blocks, dims=_dims_of(model), meta=meta)


def _check_fits(model, plan: ViTPlan, where: str) -> list:
    blocks = _blocks_of(model, where)
    if _dims_of(model) != plan.dims or len(blocks) != len(plan.blocks):
        raise ValueError(f"{where}: the plan was made for {len(plan.blocks)} blocks of {plan.dims}, the model has "
                         f"{len(blocks)} blocks of {_dims_of(model)}")
    return blocks


@torch.no_grad()
def zero_removed_gates(model: nn.Module, plan: ViTPlan) -> nn.Module:
    """Sets to 0, in place, every gate entry the plan removes (and sets the plan's tokens, if it has some): the
    gated model then computes what :func:`compact_vit` of it computes. Returns the model."""
    for b, p in zip(_check_fits(model, plan, "slimops.pruning.zero_removed_gates"), plan.blocks):
        hd = b.attn.head_dim
        for gate, keep in ((b.attn.gate_in, p["in"]), (b.mlp.gate, p["hidden"]),
                           (b.attn.gate_out, [h * hd + j for h, v in enumerate(p["v"]) for j in v])):
            mask = torch.zeros_like(gate.weight, dtype=torch.bool)
            mask[keep] = True
            gate.weight.masked_fill_(~mask, 0)
    if plan.tokens is not None:
        model.set_token_plan(plan.tokens)
    return model


def _linear(w: Tensor, b: Optional[Tensor]) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    lin.weight.copy_(w)
    if b is not None:
        lin.bias.copy_(b)
    return lin


def _cut_attention(att: nn.Module, p: dict, v_width: int, cols: Tensor) -> tuple:
    """``qkv`` and ``proj`` of one block with its plan entry ``p`` applied, gates folded: qkv reads the input
    dims ``cols``; kept heads keep q / k whole and ``v_width`` value dims (the kept ones, padded with the head's
    best removed ones, whose ``proj`` columns are 0); removed heads go. Returns (qkv, proj, kept heads)."""
    h, hd = att.num_heads, att.head_dim
    dev = att.qkv.weight.device
    w, bias = (att.qkv.weight * att.gate_in.weight[None, :])[:, cols], att.qkv.bias
    heads = [hh for hh, v in enumerate(p["v"]) if v]
    g_out = att.gate_out.weight.reshape(h, hd)
    q_rows = torch.cat([torch.arange(hh * hd, (hh + 1) * hd, device=dev) for hh in heads])
    v_rows, zero_cols = [], []
    for hh in heads:
        keep = list(p["v"][hh])
        pad = [j for j in g_out[hh].abs().argsort(descending=True).tolist() if j not in keep][: v_width - len(keep)]
        dims = sorted(keep + pad)
        v_rows += [hh * hd + j for j in dims]
        zero_cols += [len(v_rows) - len(dims) + k for k, j in enumerate(dims) if j in pad]
    v_rows_t = torch.tensor(v_rows, device=dev)
    rows = torch.cat([q_rows, h * hd + q_rows, 2 * h * hd + v_rows_t])
    qkv = _linear(w[rows], None if bias is None else bias[rows])
    pw = (att.proj.weight * att.gate_out.weight[None, :])[:, v_rows_t].clone()
    if zero_cols:
        pw[:, zero_cols] = 0
    return qkv, _linear(pw, att.proj.bias), heads


def _cut_mlp(mlp: nn.Module, units: Tensor) -> tuple:
    """``fc1`` / ``fc2`` keeping the hidden ``units``, the gate folded into fc2's columns."""
    fc1 = _linear(mlp.fc1.weight[units], mlp.fc1.bias[units])
    return fc1, _linear((mlp.fc2.weight * mlp.gate.weight[None, :])[:, units], mlp.fc2.bias)


def _cut_sema_input(block: nn.Module, cols: Tensor) -> None:
    """SEMA-T: the ``in_proj`` rows and ``dwc`` channels that make the attention's kept input dims (the others
    feed only qkv columns that are gone)."""
    from slimops.nn.sema import DepthwiseConv3

    ip, dw = block.in_proj, block.dwc
    dwc = DepthwiseConv3(cols.numel()).to(device=dw.weight.device, dtype=dw.weight.dtype)
    dwc.weight.copy_(dw.weight[cols])
    dwc.bias.copy_(dw.bias[cols])
    block.resize_attention_input(_linear(ip.weight[cols], ip.bias[cols]), dwc)


@torch.no_grad()
def compact_vit(model: nn.Module, plan: ViTPlan) -> nn.Module:
    """A physically smaller copy of the gated ViT or SEMA-T ``model`` with ``plan`` applied (module docstring):
    gates folded and gone, ``qkv`` / ``proj`` / ``fc1`` / ``fc2`` cut (and SEMA-T's ``in_proj`` / ``dwc``),
    ``num_heads`` / ``v_dim`` / ``hidden`` updated, and the plan's tokens set when it has some
    (:meth:`~slimops.models.VisionTransformer.set_token_plan`). ``model`` is not changed."""
    from slimops.nn.sema import SEMABlock

    _check_fits(model, plan, "slimops.pruning.compact_vit")
    out = copy.deepcopy(model)
    for i, (b, p) in enumerate(zip(out.gated_blocks(), plan.blocks)):
        att = b.attn
        cols = torch.tensor(p["in"], device=att.qkv.weight.device)
        qkv, proj, heads = _cut_attention(att, p, plan.v_dim(i), cols)
        if isinstance(b, SEMABlock):  # the attention's input is made in the block: cut where it is made
            att.resize(qkv, proj, num_heads=len(heads), head_dim=att.head_dim, v_dim=plan.v_dim(i))
            _cut_sema_input(b, cols)
        else:  # a ViT block reads the residual stream, which keeps every dim: read the kept ones
            in_index = None if len(p["in"]) == att.dim else cols
            att.resize(qkv, proj, num_heads=len(heads), head_dim=att.head_dim, v_dim=plan.v_dim(i),
                       in_index=in_index)
        b.mlp.resize(*_cut_mlp(b.mlp, torch.tensor(p["hidden"], device=att.qkv.weight.device)))
    if plan.tokens is not None:  # patch slimming too: each block runs its kept tokens
        out.set_token_plan(plan.tokens)
    return out


def build_pruned_vit(plan: ViTPlan, device=None) -> nn.Module:
    """The compacted architecture of ``plan`` with fresh weights (to load a compacted state dict into)."""
    from slimops.models import build_from_config

    model = build_from_config(plan.arch)
    if device is not None:
        model = model.to(device)
    if not model.gated:
        model.add_gates()
    return compact_vit(model, plan)
