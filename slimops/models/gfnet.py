"""GFNet: global filter networks (Rao et al., NeurIPS 2021; docs/algorithms.md §7).

An isotropic ViT whose self-attention is replaced by a learned global filter in the Fourier domain
(:class:`slimops.nn.GlobalFilterBlock`). GFNet-Ti (``"gfnet_ti"``): 16 x 16 patches, embedding 256, depth
12, MLP ratio 4; 7.5M parameters at 1000 classes (paper: 7M; the exact count is asserted in
tests/test_spectral_models.py). ``width`` scales the embedding dimension (``max(1, round(256 * width))``;
the MLP follows at 4x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimops.models._slim import SlimGroup, SlimmableModel, scaled
from slimops.nn import ConvMlp, GlobalFilterBlock

CONFIGS = {"gfnet_ti": dict(embed=256, depth=12, mlp_ratio=4.0, patch=16, img_size=224)}


class GFNet(SlimmableModel):
    """GFNet for inputs of any size >= one patch::

        tokens = patch_embed(x) + pos_embed          (B, H/16, W/16, D) channels-last
        tokens = blocks(tokens)                       12 x GlobalFilterBlock
        logits = head(mean over tokens of norm(tokens))

    The filters and the position embedding are built for the 224 x 224 ImageNet grid (14 x 14 tokens).
    Another grid (32 x 32 inputs give 2 x 2 tokens) resizes them at every forward: each filter by
    bilinear interpolation of its complex weight (GFNet's transfer to other resolutions;
    :class:`slimops.nn.GlobalFilter`), the position embedding bilinearly (as ViTs transfer theirs). A
    GFNet-Ti at 32 x 32 is a coarse model (4 tokens); it is here so that every zoo model runs everywhere.

    Departures from GFNet: the MLP is ``1x1 conv -> BatchNorm -> ReLU -> 1x1 conv``
    (:class:`slimops.nn.ConvMlp`; GFNet: Linear -> GELU -> Linear) so that its hidden dimension can be
    slimmed; no dropout or stochastic depth. Initialisation as GFNet's: filters ``0.02 * randn``, MLP and
    head weights truncated normal (std 0.02) with zero biases, LayerNorm (1, 0), the patch embedding
    PyTorch's default; the MLP BatchNorms γ = 0.5, β = 0 (the zoo's slimming initialisation).

    Slim groups: the MLP hidden channels of every block (``blocks.<i>.mlp.bn``, producer ``fc1``,
    consumer ``fc2``). The embedding (the residual stream) and the filters are not slimmed.
    """

    def __init__(self, arch: str = "gfnet_ti", num_classes: int = 1000, in_channels: int = 3, width: float = 1.0):
        if arch not in CONFIGS:
            raise ValueError(f"slimops.models.GFNet: arch must be one of {sorted(CONFIGS)}, got {arch!r}")
        super().__init__(arch, num_classes, in_channels, width)
        cfg = CONFIGS[arch]
        dim, p = scaled(cfg["embed"], width), cfg["patch"]
        grid = cfg["img_size"] // p
        self.patch = p
        self.patch_embed = nn.Conv2d(in_channels, dim, p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.Sequential(*[GlobalFilterBlock(dim, grid, grid, cfg["mlp_ratio"])
                                      for _ in range(cfg["depth"])])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m is not self.patch_embed):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """The parameters AdamW's weight decay leaves alone besides the 1-D ones (as GFNet's own code)."""
        return {"pos_embed"}

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """The position embedding (1, h, w, D) of an h x w token grid."""
        pe = self.pos_embed
        if pe.shape[1:3] == (h, w):
            return pe
        return F.interpolate(pe.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[2:]) < self.patch:
            raise ValueError(f"slimops.models.GFNet: expected input (B, C, H, W) with H, W >= {self.patch}, "
                             f"got {tuple(x.shape)}")
        t = self.patch_embed(x).permute(0, 2, 3, 1).contiguous()
        t = self.blocks(t + self.pos_embed_for(t.shape[1], t.shape[2]))
        return self.head(self.norm(t).mean(dim=(1, 2)))

    def slim_groups(self) -> list[SlimGroup]:
        return [SlimGroup(*ConvMlp.slim_spec(f"blocks.{i}.mlp.")) for i in range(len(self.blocks))]
