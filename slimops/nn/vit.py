"""The vision-transformer modules of the zoo's ViTs (DeiT's pre-LN block; Touvron et al. 2021, on Dosovitskiy et
al. 2021), with timm's ``VisionTransformer`` attribute names so that a timm / DeiT state dict loads as it is.

Every width is an attribute, not derived from another: ``ViTAttention`` holds ``num_heads`` and ``head_dim``
separately from the embedding ``dim`` (their product is the attention width, which dimension pruning shrinks
while the residual stream keeps ``dim``), and ``ViTMlp`` holds ``hidden``. A compaction that cuts the Linear
layers updates these attributes with them (:meth:`ViTAttention.resize`, :meth:`ViTMlp.resize`), so the modules
never describe a shape they no longer have.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.nn.dim_gate import DimGate, GatedMlp, split_qkv
from slimops.nn.sema import DropPath

__all__ = ["DimGate", "ViTAttention", "ViTMlp", "ViTBlock"]


def _positive_int(where: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"slimops.nn.{where}: {name} must be a positive int, got {v!r}")
    return v


class ViTAttention(nn.Module):
    """Multi-head softmax self-attention on tokens ``x`` (B, N, dim)::

        x' = x[..., in_index]        (a compacted block: only the kept input dims; else x' = x)
        q, k, v = split(qkv(gate_in(x')))      heads of head_dim (q, k) and v_dim (v) dims
        y = proj(gate_out(merge_heads(softmax(q k^T / sqrt(head_dim)) v)))

    The attention is ``torch.nn.functional.scaled_dot_product_attention`` (its fused CPU and GPU kernels). The
    gates (:class:`DimGate`, absent by default) are VTP / SiDT's dimension gates on the input of ``qkv`` and of
    ``proj``. ``v_dim`` equals ``head_dim`` except in a compacted block whose value dims were pruned (the q/k
    dims are not gated, so the logits stay exact). timm names: ``qkv``, ``proj``; ``num_heads``, ``head_dim``,
    ``scale`` as timm's ``Attention``; ``qkv``'s outputs are [q | k | v], heads major within each.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, *, qkv_bias: bool = True):
        super().__init__()
        _positive_int("ViTAttention", "dim", dim)
        _positive_int("ViTAttention", "num_heads", num_heads)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"slimops.nn.ViTAttention: num_heads ({num_heads}) must divide dim ({dim}) "
                                 "when head_dim is not given")
            head_dim = dim // num_heads
        _positive_int("ViTAttention", "head_dim", head_dim)
        self.dim = dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.gate_in: DimGate | None = None
        self.gate_out: DimGate | None = None
        self.register_buffer("in_index", None)
        self._set_heads(num_heads, head_dim, head_dim)

    def _set_heads(self, num_heads: int, head_dim: int, v_dim: int) -> None:
        self.num_heads, self.head_dim, self.v_dim = num_heads, head_dim, v_dim
        self.scale = head_dim ** -0.5

    @property
    def attn_dim(self) -> int:
        """The attention output width ``num_heads * v_dim`` (the input of ``proj``; the residual stream is ``dim``)."""
        return self.num_heads * self.v_dim

    def add_gates(self) -> None:
        """Installs the two dimension gates (identity at first) if they are not there."""
        if self.gate_in is None:
            self.gate_in = DimGate(self.qkv.in_features).to(self.qkv.weight.device)
        if self.gate_out is None:
            self.gate_out = DimGate(self.attn_dim).to(self.qkv.weight.device)

    def resize(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, v_dim: int | None = None,
               in_index: Tensor | None = None) -> None:
        """Installs cut ``qkv`` / ``proj`` layers and the head shape they have (compaction); the gates go (they
        are folded into the layers by then). ``in_index``: the kept input dims ``qkv`` reads."""
        v_dim = head_dim if v_dim is None else v_dim
        n_in = self.dim if in_index is None else in_index.numel()
        want = (num_heads * (2 * head_dim + v_dim), num_heads * v_dim, n_in)
        if (qkv.out_features, proj.in_features, qkv.in_features) != want or proj.out_features != self.dim:
            raise ValueError(f"slimops.nn.ViTAttention.resize: qkv ({qkv.in_features} -> {qkv.out_features}) and proj "
                             f"({proj.in_features} -> {proj.out_features}) do not fit {num_heads} heads of q/k dim "
                             f"{head_dim} and v dim {v_dim} on {n_in} of {self.dim} input dims")
        self.qkv, self.proj = qkv, proj
        self.gate_in = self.gate_out = None
        self.in_index = None if in_index is None else in_index.to(device=qkv.weight.device, dtype=torch.long)
        self._set_heads(num_heads, head_dim, v_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"slimops.nn.ViTAttention: expected input (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        if self.gate_in is not None:
            x = self.gate_in(x)
        q, k, v = split_qkv(self.qkv(x), self.num_heads, self.head_dim, self.v_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)[..., : self.v_dim]
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        if self.gate_out is not None:
            out = self.gate_out(out)
        return self.proj(out)

    def extra_repr(self) -> str:
        extra = f", v_dim={self.v_dim}" if self.v_dim != self.head_dim else ""
        kept = f", in_dims={self.in_index.numel()}" if self.in_index is not None else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}{extra}{kept}"


class ViTMlp(GatedMlp):
    """``fc2(gate(act(fc1(x))))`` with ``hidden`` units (timm's ``Mlp``: ``fc1``, ``act``, ``fc2``; the
    :class:`DimGate` is absent by default). GELU, as DeiT: the gate multiplies ``act(fc1(x))``, so removing a
    gated-off unit is exact whatever the activation."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        _positive_int("ViTMlp", "dim", dim)
        _positive_int("ViTMlp", "hidden", hidden)
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.gate: DimGate | None = None
        self.fc2 = nn.Linear(hidden, dim)

    def _install(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        self.fc1, self.fc2 = fc1, fc2


class ViTBlock(nn.Module):
    """DeiT's pre-LN transformer block on tokens (B, N, dim)::

        x = x + drop_path(attn(norm1(x)))
        x = x + drop_path(mlp(norm2(x)))

    (LayerNorm eps 1e-6, as timm's ViTs.) timm names: ``norm1``, ``attn``, ``norm2``, ``mlp``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, head_dim: int | None = None,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads, head_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
