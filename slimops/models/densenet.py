"""DenseNet-40 for CIFAR (Huang et al., CVPR 2017), as used by network slimming (Liu et al., 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimops.models._slim import SlimGroup, SlimmableModel, scaled
from slimops.nn import ChannelSelect


class DenseLayer(nn.Module):
    """``x → select → bn → relu → conv(3×3, → growth)``, concatenated to the stream ``x``."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        # The stream is concatenated onward in full, so the BN is pruned through a selection.
        self.select = ChannelSelect(in_channels)
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(self.relu(self.bn(self.select(x))))), 1)


class Transition(nn.Module):
    """``x → select → bn → relu → conv(1×1, same channel count) → avgpool 2`` (no compression)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.select = ChannelSelect(in_channels)
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(self.relu(self.bn(self.select(x)))), 2)


class DenseNet(SlimmableModel):
    """DenseNet-``depth`` (``depth = 3n+4``): basic layers, no bottleneck, no compression.

    Stem ``conv1`` (3×3, in_channels → 2·growth), three dense blocks ``dense{1,2,3}`` of ``n``
    layers separated by transitions ``trans{1,2}``, then ``select → bn → relu → global avgpool →
    fc``. ``width`` scales the growth rate (12) and the stem's channels (24). Width-1 DenseNet-40 at
    10 classes has 1,059,298 parameters; the paper reports 1.02M.

    Every BN reads a shared stream, so every slim group is a select group; its consumer is the conv
    of the same layer/transition (``fc`` for the final ``bn``).
    """

    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 7 or (depth - 4) % 3:
            raise ValueError(f"slimops.models.DenseNet: depth must be 3n+4 with n >= 1, got {depth!r}")
        super().__init__(f"densenet{depth}", num_classes, in_channels, width)
        n = (depth - 4) // 3
        self.growth = scaled(growth, width)
        c = scaled(2 * growth, width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        for b in (1, 2, 3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, self.growth))
                c += self.growth
            setattr(self, f"dense{b}", nn.Sequential(*layers))
            if b < 3:
                setattr(self, f"trans{b}", Transition(c, c))
        self.add_stream_head(c, num_classes)
        self.init_weights(linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.dense3(self.trans2(self.dense2(x)))
        return self.stream_head(x)

    def slim_groups(self) -> list[SlimGroup]:
        groups = []
        for b in (1, 2, 3):
            for i in range(len(getattr(self, f"dense{b}"))):
                p = f"dense{b}.{i}."
                groups.append(SlimGroup(f"{p}bn", None, f"{p}select", (f"{p}conv",)))
            if b < 3:
                p = f"trans{b}."
                groups.append(SlimGroup(f"{p}bn", None, f"{p}select", (f"{p}conv",)))
        groups.append(self.stream_head_group())
        return groups
