"""The vision-transformer modules of the zoo's ViTs (DeiT's pre-LN block; Touvron et al. 2021, on Dosovitskiy et
al. 2021), with timm's ``VisionTransformer`` attribute names so that a timm / DeiT state dict loads as it is.

Every width is an attribute, not derived from another: ``ViTAttention`` holds ``num_heads`` and ``head_dim``
separately from the embedding ``dim`` (their product is the attention width, which dimension pruning shrinks
while the residual stream keeps ``dim``), and ``ViTMlp`` holds ``hidden``. A compaction that cuts the Linear
layers updates these attributes with them (:meth:`ViTAttention.resize`, :meth:`ViTMlp.resize`), so the modules
never describe a shape they no longer have.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from slimops.nn.sema import DropPath

__all__ = ["ViTAttention", "ViTMlp", "ViTBlock"]


def _positive_int(where: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"slimops.nn.{where}: {name} must be a positive int, got {v!r}")
    return v


class ViTAttention(nn.Module):
    """Multi-head softmax self-attention on tokens ``x`` (B, N, dim)::

        q, k, v = split(qkv(x))                       Linear(dim, 3 heads d), heads of d = head_dim
        y = proj(merge_heads(softmax(q k^T / sqrt(d)) v))    Linear(heads d, dim)

    The attention is ``torch.nn.functional.scaled_dot_product_attention`` (its fused CPU and GPU kernels).
    timm names: ``qkv``, ``proj``; ``num_heads``, ``head_dim``, ``scale`` as timm's ``Attention``.
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
        self._set_heads(num_heads, head_dim)

    def _set_heads(self, num_heads: int, head_dim: int) -> None:
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5

    @property
    def attn_dim(self) -> int:
        """The attention width ``num_heads * head_dim`` (the residual stream is ``dim``)."""
        return self.num_heads * self.head_dim

    def resize(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int) -> None:
        """Installs cut ``qkv`` / ``proj`` layers and the head shape they have (compaction)."""
        if qkv.out_features != 3 * num_heads * head_dim or proj.in_features != num_heads * head_dim:
            raise ValueError(f"slimops.nn.ViTAttention.resize: qkv has {qkv.out_features} outputs and proj "
                             f"{proj.in_features} inputs; {num_heads} heads of {head_dim} need "
                             f"{3 * num_heads * head_dim} and {num_heads * head_dim}")
        self.qkv, self.proj = qkv, proj
        self._set_heads(num_heads, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"slimops.nn.ViTAttention: expected input (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        # (B, N, 3 heads d) -> (3, B, heads, N, d)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.attn_dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


class ViTMlp(nn.Module):
    """``fc2(act(fc1(x)))`` with ``hidden`` units (timm's ``Mlp``: ``fc1``, ``act``, ``fc2``). GELU, as DeiT: a
    dimension gate on the hidden units multiplies ``act(fc1(x))``, so removing a gated-off unit is exact whatever
    the activation."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        _positive_int("ViTMlp", "dim", dim)
        _positive_int("ViTMlp", "hidden", hidden)
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def resize(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Installs cut ``fc1`` / ``fc2`` layers (compaction)."""
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"slimops.nn.ViTMlp.resize: fc1 has {fc1.out_features} outputs but fc2 "
                             f"{fc2.in_features} inputs")
        self.fc1, self.fc2, self.hidden = fc1, fc2, fc1.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}"


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
