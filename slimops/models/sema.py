"""SEMANet: a hierarchical backbone of SEMA attention in Mamba-like blocks (docs/algorithms.md §8; Tran, Xue,
Zhang et al. 2025, on MLLA's macro-architecture, Han et al. 2024).

Four stages of :class:`slimops.nn.SEMABlock` on channels-last tokens, MLLA-T's layout::

    stem         conv 3x3 s2 -> BN -> ReLU -> conv 3x3 s2 -> LN         /4,  C0 channels
    stage i      [downsample: conv 3x3 s2 -> LN (i > 0)] + depth_i x SEMABlock(C_i, heads_i, window 7)
    head         LN -> global average pool -> Linear

    name     C (width 1)         depths      heads        head dim  window  MLP  params (1000 classes)
    sema_t   64/128/256/512      2/4/8/4     2/4/8/16     32        7       4x   27,001,288

(MLLA-T, the same layout with linear attention: 25M.) Every 3x3 convolution is padded by 1, so each stride 2
maps H to ceil(H / 2) and the model runs at any input size: 224 x 224 gives 56/28/14/7 grids, 32 x 32 gives
8/4/2/1, 8 x 8 gives 2/1/1/1. The attention window is clipped to each grid (``min(7, H) x min(7, W)``,
:class:`slimops.nn.SEMAAttention`), so on the small late-stage grids SEMA is global softmax attention plus
the mean; no parameter depends on the grid, so a model trained at one resolution runs at any other.

``width`` scales the head dim, not the head count: ``d = 8 * max(1, round(32 * width / 8))`` (the nearest
multiple of 8 to 32 * width, at least 8), every stage ``C_i = heads_i * d`` and the stem's hidden
channels ``C0 / 2``. Width 0.5 gives 32/64/128/256 (d = 16), width 0.25 16/32/64/128 (d = 8).

Departures from MLLA (simpler, and within the zoo's slimming rule that every BatchNorm is a slim group read
through a ReLU): MLLA's stem is conv/BN/ReLU with a residual conv pair and a 1x1 projection, its downsampling
an MBConv; here the stem is two stride-2 convs (the first followed by BN -> ReLU, the second by a LayerNorm
of the token stream) and the downsampling a stride-2 conv with a LayerNorm. No stochastic depth by default (MLLA-T trains with 0.2; ``SEMANet(drop_path=...)`` sets a
rate growing linearly over the blocks, as MLLA does).

Initialisation as MLLA's (and the zoo's transformers'): Linear weights truncated normal (std 0.02) with zero
biases, LayerNorm (1, 0), convolutions PyTorch's default; the stem BatchNorm γ = 0.5, β = 0 (the zoo's
slimming initialisation).

Dimension gates (VTP / SiDT, ``gates=True`` or :meth:`add_gates`; docs/vit.md): per block on the input of the
attention's ``qkv``, on its value dims (the input of ``proj``) and on the MLP hidden units, as the ViTs have them;
:mod:`slimops.pruning.vit` plans and compacts them (a qkv input dim that goes takes its ``in_proj`` row and
``dwc`` channel along).

Slim groups: ``stem.bn`` (producer ``stem.conv1``, consumer ``stem.conv2``), the model's one BatchNorm. The
token stream (the residual of every block), the attention heads and the MLP hidden channels are not slimmed
(the blocks' MLPs are Linear -> GELU -> Linear, with no BN to prune by).
"""
from __future__ import annotations

import torch
from torch import nn

from slimops.models._gated import DimGated
from slimops.models._slim import SlimGroup, SlimmableModel
from slimops.nn import SEMABlock

CONFIGS = {"sema_t": dict(dims=(64, 128, 256, 512), depths=(2, 4, 8, 4), heads=(2, 4, 8, 16), window=7,
                          mlp_ratio=4.0)}


def head_dim_for(width: float, base: int = 32) -> int:
    """The head dim at ``width``: the nearest multiple of 8 to ``base * width``, at least 8."""
    return 8 * max(1, int(base * width / 8 + 0.5))


class Stem(nn.Module):
    """``conv1 (3x3 s2) -> bn -> ReLU -> conv2 (3x3 s2) -> norm`` on (B, C_in, H, W); returns channels-last
    tokens (B, ceil(H/4), ceil(W/4), C). ``bn`` is a slim group (``conv1`` rows, ``conv2`` columns)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        hidden = max(1, dim // 2)
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.bn(self.conv1(x)))).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """``conv (3x3 s2, padding 1) -> LN`` on channels-last tokens: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C')."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class SEMAStage(nn.Module):
    """``[downsample ->] blocks`` on channels-last tokens."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float, drop_paths, *,
                 in_dim: int | None = None):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else nn.Identity()
        self.blocks = nn.Sequential(*[SEMABlock(dim, heads, window, mlp_ratio, dp) for dp in drop_paths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SEMANet(DimGated, SlimmableModel):
    """SEMA-T (``"sema_t"``): see the module docstring for the layout, width rule and slim group. Input
    (B, in_channels, H, W), any H, W >= 1; output logits (B, num_classes)."""

    def __init__(self, arch: str = "sema_t", num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, *,
                 drop_path: float = 0.0, gates: bool = False):
        if arch not in CONFIGS:
            raise ValueError(f"slimops.models.SEMANet: arch must be one of {sorted(CONFIGS)}, got {arch!r}")
        super().__init__(arch, num_classes, in_channels, width)
        if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0 <= drop_path < 1:
            raise ValueError(f"slimops.models.SEMANet: drop_path must be a float in [0, 1), got {drop_path!r}")
        cfg = CONFIGS[arch]
        d = head_dim_for(width, cfg["dims"][0] // cfg["heads"][0])
        dims = [h * d for h in cfg["heads"]]
        total = sum(cfg["depths"])
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        self.dims = tuple(dims)
        self.stem = Stem(in_channels, dims[0])
        stages, start = [], 0
        for i, (dim, depth, heads) in enumerate(zip(dims, cfg["depths"], cfg["heads"])):
            stages.append(SEMAStage(dim, depth, heads, cfg["window"], cfg["mlp_ratio"], rates[start:start + depth],
                                    in_dim=dims[i - 1] if i else None))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)
        if not isinstance(gates, bool):
            raise ValueError(f"slimops.models.SEMANet: gates must be True or False, got {gates!r}")
        if gates:
            self.add_gates()

    def gated_blocks(self) -> list:
        """The 18 SEMA blocks, stage by stage: what dimension pruning gates (:meth:`add_gates`)."""
        return [b for s in self.stages for b in s.blocks]

    def config(self) -> dict:
        cfg = super().config()
        return {**cfg, "gates": True} if self.gated else cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"slimops.models.SEMANet: expected input (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        t = self.stages(self.stem(x))
        return self.head(self.norm(t).mean(dim=(1, 2)))

    def slim_groups(self) -> list[SlimGroup]:
        return [SlimGroup("stem.bn", "stem.conv1", None, ("stem.conv2",))]
