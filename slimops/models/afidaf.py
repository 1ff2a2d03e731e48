"""AFIDAF backbones: MobileViT-style hybrids whose token mixers alternate Fourier- and image-domain adaptive
filters (docs/algorithms.md §7).

The macro-architecture is AFFNet's (Huang et al., ICCV 2023; its official configurations "x_small" and
"small"), itself MobileViT-v2's: a 3x3 stride-2 conv stem, MobileNetV2 inverted-residual blocks (stages 1-2),
then three stages of [stride-2 inverted residual -> spectral stage], a 1x1 expansion conv and a linear
classifier. A spectral stage is AFFNet's AFF block: ``depth`` token-mixing blocks on the channels-last
tokens, a LayerNorm, a 1x1 projection and a 1x1 fusion conv over ``cat(stage input, projection)``. AFIDAF
replaces AFFNet's token-mixing block by :class:`slimops.nn.AFIDAFBlock` (image-domain adaptive filter ->
adaptive frequency filter -> MLP, each pre-normalised and residual).

Configurations (channels at width 1; every MV2 expansion is 4, MLP ratio 2, AFF 8 blocks, the IDAF's 1x1
conv in 2 groups; head = min(4 * C5, 960) channels)::

    name       stem  stage1  stage2    stage3 (C, depth)  stage4      stage5      head   params (1000 classes)
    afidaf_t   16    32      48 x 3    96, 2              160, 4      192, 3      768    2,848,792 (paper 3.0M)
    afidaf     16    32      64 x 3    128, 2             256, 4      320, 3      960    5,995,192 (paper 6.5M)

These are AFFNet's "x_small" and "small" stage layouts; without the image-domain filters they have
2,624,664 and 5,521,656 parameters (AFFNet-T 2.6M, AFFNet 5.5M), so the IDAFs add 0.22M / 0.47M where the
paper's AFIDAF adds 0.4M / 1.0M over AFFNet (its IDAF configuration is not published; a dense 1x1 conv would
give 2.96M / 6.30M but makes the channel shuffle a mere reparametrisation). Counts asserted in
tests/test_spectral_models.py.

``width`` scales every channel count to the nearest multiple of 8 (MobileNet's rounding; at least 8, never
below 90% of the scaled value), so that the AFF's 8 blocks and the IDAF's groups always divide it. No layer
depends on the grid: the models run at 224 x 224 (7 x 7 tokens in the last stage) as at 32 x 32 (1 x 1).

Departures from AFFNet, for slimming: ReLU everywhere (AFFNet: SiLU); the removed-channel fold of the
compaction engine is exact for ReLU only. BatchNorm (the slimming target) wherever a BN -> ReLU is read
only by ungrouped convs (or the classifier), GroupNorm(1, C) (MobileViT-v2's "LayerNorm2d") at the other
conv norms: the zoo's rule is that every BatchNorm2d is a slim group.

Slim groups (what :func:`slimops.pruning.compact` cuts):

- ``stem.norm``: the stem conv's output channels and the first MV2 block's expansion input (when that
  block has no residual, as in both configurations);
- ``<mv2>.bn`` of every inverted residual: the hidden channels after the depthwise conv, through a
  :class:`slimops.nn.ChannelSelect` (the engine cuts ungrouped convs only, so the depthwise conv keeps its
  width and the selection gathers the kept channels for the 1x1 projection, whose input is cut);
- ``<block>.mlp.bn`` of every AFIDAF block: the MLP's hidden channels (fc1 rows, fc2 columns);
- ``<stage>.fusion.norm``: the fusion conv's output channels and the next stride-2 block's expansion input
  (the last stage's: the head conv's input);
- ``head.norm``: the head conv's output channels and the classifier's inputs.

Not slimmed: the residual streams (MV2 block outputs, the token stream of each spectral stage), the MV2
expansion channels before the depthwise conv, the spectral filters' channels, the stage projection.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from slimops.models._slim import SlimGroup, SlimmableModel
from slimops.nn import AFIDAFBlock, ChannelSelect, ConvMlp


def divisible(c: float, d: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``d``, at least ``d``, not below 90% of ``c``."""
    v = max(d, int(c + d / 2) // d * d)
    return v + d if v < 0.9 * c else v


class ConvNormAct(nn.Module):
    """``conv -> norm [-> ReLU]``; the norm is a BatchNorm2d when ``slim`` (a slimming target), else
    GroupNorm(1, C)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, *, slim: bool, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout) if slim else nn.GroupNorm(1, cout)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: ``expand (1x1) -> GN -> ReLU -> dw (3x3, stride) -> select -> bn -> ReLU ->
    project (1x1) -> GN``, plus the input when ``stride == 1`` and the channel count is kept. ``bn`` (read
    through ``select``) is the block's slim group; ``expand`` is omitted for ``expand_ratio == 1``."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False) if expand_ratio != 1 else None
        self.expand_norm = nn.GroupNorm(1, hidden) if expand_ratio != 1 else None
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.select = ChannelSelect(hidden)
        self.bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_norm = nn.GroupNorm(1, cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand is None else self.act(self.expand_norm(self.expand(x)))
        h = self.project_norm(self.project(self.act(self.bn(self.select(self.dw(h))))))
        return x + h if self.use_res else h

    def entry_conv(self) -> Optional[str]:
        """The name of the one ungrouped conv reading this block's input, when nothing else reads it
        (no residual): where a preceding slim group's consumer is."""
        return "expand" if self.expand is not None and not self.use_res else None

    def slim_groups(self, prefix: str) -> list[SlimGroup]:
        return [SlimGroup(f"{prefix}bn", None, f"{prefix}select", (f"{prefix}project",))]


class SpectralStage(nn.Module):
    """AFFNet's AFF block with AFIDAF token mixers, on (B, C, H, W)::

        t = norm(blocks(tokens(x)))                  channels-last tokens (B, H, W, C)
        y = fusion(cat(x, proj(t)))                  proj: 1x1 conv -> GN; fusion: 1x1 conv -> BN -> ReLU
    """

    def __init__(self, channels: int, depth: int, mlp_ratio: float, blocks: int, groups: int):
        super().__init__()
        self.blocks = nn.Sequential(*[AFIDAFBlock(channels, mlp_ratio, blocks, groups) for _ in range(depth)])
        self.norm = nn.LayerNorm(channels)
        self.proj = ConvNormAct(channels, channels, 1, slim=False, act=False)
        self.fusion = ConvNormAct(2 * channels, channels, 1, slim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.blocks(x.permute(0, 2, 3, 1).contiguous()))
        return self.fusion(torch.cat([x, self.proj(t.permute(0, 3, 1, 2))], dim=1))

    def slim_groups(self, prefix: str, consumer: str) -> list[SlimGroup]:
        groups = [SlimGroup(*ConvMlp.slim_spec(f"{prefix}blocks.{i}.mlp.")) for i in range(len(self.blocks))]
        return groups + [SlimGroup(f"{prefix}fusion.norm", f"{prefix}fusion.conv", None, (consumer,))]


# Width-1 channels: stem, MV2 stages ((C, blocks) x 2), spectral stages ((C, depth) x 3); see the module docstring.
CONFIGS = {
    "afidaf_t": dict(stem=16, mv2=((32, 1), (48, 3)), spectral=((96, 2), (160, 4), (192, 3))),
    "afidaf": dict(stem=16, mv2=((32, 1), (64, 3)), spectral=((128, 2), (256, 4), (320, 3))),
}
EXPAND = 4
MLP_RATIO = 2.0
AFF_BLOCKS = 8
IDAF_GROUPS = 2
HEAD_EXPANSION, HEAD_CAP = 4, 960


class AFIDAFNet(SlimmableModel):
    """AFIDAF-T (``"afidaf_t"``) / AFIDAF (``"afidaf"``): see the module docstring for the configurations,
    the layout and the slim groups. Input (B, in_channels, H, W), any H, W >= 1; output logits."""

    def __init__(self, arch: str, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0):
        if arch not in CONFIGS:
            raise ValueError(f"slimops.models.AFIDAFNet: arch must be one of {sorted(CONFIGS)}, got {arch!r}")
        super().__init__(arch, num_classes, in_channels, width)
        cfg = CONFIGS[arch]
        ch = lambda c: divisible(c * width)  # noqa: E731
        stem = ch(cfg["stem"])
        layers: list[nn.Sequential] = []
        c = stem
        for i, (cout, n) in enumerate(cfg["mv2"]):
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(c, ch(cout), 2 if (i == 1 and j == 0) else 1, EXPAND))
                c = ch(cout)
            layers.append(nn.Sequential(*blocks))
        for cout, depth in cfg["spectral"]:
            down = InvertedResidual(c, ch(cout), 2, EXPAND)
            c = ch(cout)
            layers.append(nn.Sequential(down, SpectralStage(c, depth, MLP_RATIO, AFF_BLOCKS, IDAF_GROUPS)))
        # The stem BN is a slim group only when the first block's expansion conv alone reads it.
        self.stem = ConvNormAct(in_channels, stem, 3, 2, slim=layers[0][0].entry_conv() is not None)
        for i, layer in enumerate(layers, start=1):
            setattr(self, f"layer{i}", layer)
        self.num_layers = len(layers)
        head = min(HEAD_EXPANSION * c, divisible(HEAD_CAP * width))
        self.head = ConvNormAct(c, head, 1, slim=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        self.init_weights(linear_std=0.01)

    def layers(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(1, self.num_layers + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers():
            x = layer(x)
        return self.fc(torch.flatten(self.avgpool(self.head(x)), 1))

    def slim_groups(self) -> list[SlimGroup]:
        groups = []
        first = self.layer1[0].entry_conv()
        if first is not None:
            groups.append(SlimGroup("stem.norm", "stem.conv", None, (f"layer1.0.{first}",)))
        layers = self.layers()
        for i, layer in enumerate(layers, start=1):
            for j, m in enumerate(layer):
                p = f"layer{i}.{j}."
                if isinstance(m, InvertedResidual):
                    groups += m.slim_groups(p)
                else:  # a spectral stage: the next layer's stride-2 block (or the head) alone reads its output
                    consumer = f"layer{i + 1}.0.{layers[i][0].entry_conv()}" if i < len(layers) else "head.conv"
                    groups += m.slim_groups(p, consumer)
        groups.append(SlimGroup("head.norm", "head.conv", None, ("fc",)))
        return groups
