"""Pre-activation ResNet for CIFAR (He et al., ECCV 2016), as used by network slimming (Liu et al., 2017)."""
from __future__ import annotations

import torch
from torch import nn

from slimops.models._slim import SlimGroup, SlimmableModel, scaled
from slimops.nn import ChannelSelect


class PreActBasicBlock(nn.Module):
    """``x → select → bn1 → relu → conv1(3×3, stride) → bn2 → relu → conv2(3×3)``, plus the shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        # The block input is the residual stream, which the shortcut needs whole: bn1 is pruned
        # through a channel selection, never by cutting the stream.
        self.select = ChannelSelect(in_planes)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        # Projection on the raw (un-normalised) input, as in Liu et al.'s code.
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != out_planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(self.select(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))

    def slim_groups(self, prefix: str) -> list[SlimGroup]:
        return [SlimGroup(f"{prefix}bn1", None, f"{prefix}select", (f"{prefix}conv1",)),
                SlimGroup(f"{prefix}bn2", f"{prefix}conv1", None, (f"{prefix}conv2",))]


class PreActBottleneck(nn.Module):
    """``x → select → bn1 → relu → conv1(1×1) → bn2 → relu → conv2(3×3, stride) → bn3 → relu →
    conv3(1×1, ×4)``, plus the shortcut (stride on the 3×3 conv, as in Liu et al.'s code)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.select = ChannelSelect(in_planes)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != out_planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(self.select(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))

    def slim_groups(self, prefix: str) -> list[SlimGroup]:
        return [SlimGroup(f"{prefix}bn1", None, f"{prefix}select", (f"{prefix}conv1",)),
                SlimGroup(f"{prefix}bn2", f"{prefix}conv1", None, (f"{prefix}conv2",)),
                SlimGroup(f"{prefix}bn3", f"{prefix}conv2", None, (f"{prefix}conv3",))]


class PreResNet(SlimmableModel):
    """Pre-activation ResNet-``depth`` for CIFAR.

    ``bottleneck=False``: basic blocks, ``depth = 6n+2``; ``bottleneck=True``: bottleneck blocks
    (expansion 4), ``depth = 9n+2``. Three stages of ``n`` blocks with planes 16/32/64 (streams ×4
    for bottlenecks), strides 1/2/2, a 3×3 stem ``conv1`` (in_channels → 16) and
    ``select → bn → relu → global avgpool → fc`` at the end. Width-1, 10-class parameter counts:
    preresnet20 272,282 (0.27M), preresnet56 855,578 (0.85M), preresnet164 1,703,258 (paper: 1.70M).

    Slim groups per block: ``bn1`` through its ``select`` (consumer ``conv1``), ``bn2``/``bn3`` with
    producers ``conv1``/``conv2``; the final ``bn`` through ``select`` with consumer ``fc``.
    """

    def __init__(self, depth: int, bottleneck: bool, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        block = PreActBottleneck if bottleneck else PreActBasicBlock
        per_block = 9 if bottleneck else 6
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < per_block + 2 \
                or (depth - 2) % per_block:
            raise ValueError(f"slimops.models.PreResNet: depth must be {per_block}n+2 with n >= 1 for "
                             f"{'bottleneck' if bottleneck else 'basic'} blocks, got {depth!r}")
        super().__init__(f"preresnet{depth}", num_classes, in_channels, width)
        n = (depth - 2) // per_block
        stem = scaled(16, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        c = stem
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            planes = scaled(planes, width)
            blocks = []
            for i in range(n):
                blocks.append(block(c, planes, stride if i == 0 else 1))
                c = planes * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.add_stream_head(c, num_classes)
        self.init_weights(linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.stream_head(x)

    def slim_groups(self) -> list[SlimGroup]:
        groups = []
        for stage in (1, 2, 3):
            for i, blk in enumerate(getattr(self, f"layer{stage}")):
                groups += blk.slim_groups(f"layer{stage}.{i}.")
        groups.append(self.stream_head_group())
        return groups
