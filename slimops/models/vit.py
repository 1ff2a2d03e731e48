"""Vision transformers: DeiT's layouts (Touvron et al. 2021, on ViT, Dosovitskiy et al. 2021), the models that ViT
dimension pruning (VTP, SiDT) and patch slimming work on (docs/algorithms.md §6).

    name     dim (width 1)  heads  head dim  depth  MLP   params (224², patch 16, 1000 classes)
    vit_ti   192            3      64        12     4x    5,717,416   (DeiT-Ti: 5.7M)
    vit_s    384            6      64        12     4x    22,050,664  (DeiT-S: 22.1M)
    deit_b   768            12     64        12     4x    86,567,656  (DeiT-B: 86.6M)

(the counts are asserted in tests/test_vit_models.py). ``img_size`` and ``patch`` are build arguments: the
ImageNet models use 224 and 16 (14 x 14 = 196 patches + the class token); on 32 x 32 images (digits, CIFAR) the
zoo's default patch is 4 (8 x 8 = 64 patches), so that a small ViT trains in minutes. ``width`` scales the head
dim, not the head count, as SEMA-T's: ``d = 8 * max(1, round(64 * width / 8))``, ``dim = heads * d``.

State-dict keys are timm's ``VisionTransformer``'s (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1``,
``blocks.N.mlp.fc2``, ``norm``, ``head``), so a DeiT / timm checkpoint of the same layout loads with
``strict=True`` (no download here: the file is the user's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimops.models._gated import DimGated
from slimops.models._slim import SlimGroup, SlimmableModel
from slimops.nn.vit import ViTBlock

CONFIGS = {
    "vit_ti": dict(heads=3, head_dim=64, depth=12, mlp_ratio=4.0),
    "vit_s": dict(heads=6, head_dim=64, depth=12, mlp_ratio=4.0),
    "deit_b": dict(heads=12, head_dim=64, depth=12, mlp_ratio=4.0),
}
DEFAULT_IMG_SIZE = 224


def default_patch(img_size: int) -> int:
    """16 for ImageNet-sized inputs (>= 224), 4 below (32 x 32 images give 8 x 8 patches)."""
    return 16 if img_size >= 224 else 4


def check_resolution(where: str, img_size, patch) -> None:
    for name, v in (("img_size", img_size), ("patch", patch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    if patch > img_size:
        raise ValueError(f"{where}: patch ({patch}) must not exceed img_size ({img_size})")


class VisionTransformer(DimGated, SlimmableModel):
    """A DeiT-style ViT (class-token pooling, learned absolute positions, pre-LN blocks, GELU MLPs)::

        tokens = patch_embed.proj(x) flattened          (B, N, dim), N = (img_size / patch)²
        tokens = [cls_token, tokens] + pos_embed
        tokens = blocks(tokens)                          depth x ViTBlock
        logits = head(norm(tokens)[:, 0])

    Inputs of another size than ``img_size`` (at least one patch) interpolate the position embedding of the
    patch grid bicubically, as timm does when it resamples a ViT's positions. No dropout; stochastic depth
    ``drop_path`` grows linearly over the blocks, as DeiT's (0 by default).

    Initialisation as timm's ViT: ``pos_embed`` truncated normal (std 0.02), ``cls_token`` normal (std 1e-6),
    Linear weights truncated normal (std 0.02) with zero biases, LayerNorm (1, 0), the patch projection
    PyTorch's default.

    Slim groups: none. There is no BatchNorm for network slimming to prune by; ViTs are pruned by their own
    dimension gates (VTP / SiDT, ``gates=True`` or :meth:`add_gates`; :mod:`slimops.pruning.vit`), not by the
    BN-scale methods.
    """

    def __init__(self, arch: str = "vit_ti", num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                 img_size: int = DEFAULT_IMG_SIZE, patch: int | None = None, drop_path: float = 0.0,
                 gates: bool = False):
        where = "slimops.models.VisionTransformer"
        if arch not in CONFIGS:
            raise ValueError(f"{where}: arch must be one of {sorted(CONFIGS)}, got {arch!r}")
        super().__init__(arch, num_classes, in_channels, width)
        patch = default_patch(img_size) if patch is None else patch
        check_resolution(where, img_size, patch)
        if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0 <= drop_path < 1:
            raise ValueError(f"{where}: drop_path must be a float in [0, 1), got {drop_path!r}")
        cfg = CONFIGS[arch]
        heads = cfg["heads"]
        d = 8 * max(1, round(cfg["head_dim"] * width / 8))
        dim = heads * d
        self.img_size, self.patch, self.embed_dim = img_size, patch, dim
        self.grid = img_size // patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        depth = cfg["depth"]
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, int(dim * cfg["mlp_ratio"]), head_dim=d, drop_path=r)
                                      for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch slimming's token plan (set_token_plan): not in the state dict (a timm / dense checkpoint loads as it
        # is); model files carry it as their plan.
        self.register_buffer("token_order", None, persistent=False)
        self.token_keep: tuple | None = None
        if not isinstance(gates, bool):
            raise ValueError(f"{where}: gates must be True or False, got {gates!r}")
        if gates:
            self.add_gates()

    def no_weight_decay(self) -> set:
        """The parameters AdamW's weight decay leaves alone besides the 1-D ones (timm's name for the same hook)."""
        return {"pos_embed", "cls_token"}

    def gated_blocks(self) -> list:
        """The blocks that take dimension gates (:class:`slimops.models._gated.DimGated`): every block."""
        return list(self.blocks)

    def set_token_plan(self, plan) -> "VisionTransformer":
        """Patch slimming (:mod:`slimops.pruning.patch_slim`): block ``l`` computes only the tokens
        ``plan.order[:plan.keep[l]]`` (nested, so each block's tokens are a prefix of the ordered sequence: one
        gather of the embedded tokens per forward, then views). ``None`` removes the plan. The plan is for this
        model's patch grid: inputs must be ``img_size`` square. Returns the model."""
        if plan is None:
            self.token_order, self.token_keep = None, None
            return self
        n = 1 + self.grid * self.grid
        if plan.tokens != n or len(plan.keep) != len(self.blocks):
            raise ValueError(f"slimops.models.VisionTransformer.set_token_plan: the plan covers {plan.tokens} tokens and "
                             f"{len(plan.keep)} blocks, the model has {n} tokens ({self.grid}x{self.grid} patches + "
                             f"the class token) and {len(self.blocks)} blocks")
        self.token_order = torch.tensor(plan.order, dtype=torch.long, device=self.pos_embed.device)
        self.token_keep = tuple(int(k) for k in plan.keep)
        return self

    def config(self) -> dict:
        cfg = {**super().config(), "img_size": self.img_size, "patch": self.patch}
        return {**cfg, "gates": True} if self.gated else cfg

    def slim_groups(self) -> list[SlimGroup]:
        return []

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """The position embedding (1, 1 + gh gw, dim) of a gh x gw patch grid (class token first)."""
        pe = self.pos_embed
        if (gh, gw) == (self.grid, self.grid):
            return pe
        cls, grid = pe[:, :1], pe[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised tokens (B, 1 + N, dim), class token first."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < self.patch:
            raise ValueError(f"slimops.models.VisionTransformer: expected input (B, {self.in_channels}, H, W) with "
                             f"H, W >= {self.patch}, got {tuple(x.shape)}")
        t = self.patch_embed.proj(x)
        gh, gw = t.shape[2], t.shape[3]
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed_for(gh, gw)
        if self.token_keep is None:
            return self.norm(self.blocks(t))
        if (gh, gw) != (self.grid, self.grid):
            raise ValueError(f"slimops.models.VisionTransformer: a token plan is for {self.img_size}x{self.img_size} "
                             f"inputs ({self.grid}x{self.grid} patches), got {tuple(x.shape[2:])}")
        t = t.index_select(1, self.token_order)  # the kept sets become prefixes
        for blk, n in zip(self.blocks, self.token_keep):
            t = blk(t[:, :n])
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])
