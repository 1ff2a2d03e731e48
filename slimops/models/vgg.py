"""VGG for CIFAR, as in network slimming (Liu et al., ICCV 2017; Simonyan & Zisserman, ICLR 2015)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from slimops.models._slim import SlimGroup, SlimmableModel, scaled

# The CIFAR configurations of Liu et al.'s code: channel counts of 3×3 convs, 'M' = 2×2 max-pool.
# No pool after the last stage: global average pooling follows.
CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(SlimmableModel):
    """VGG-{11,13,16,19} with BatchNorm for 32×32 inputs (the network-slimming variant).

    ``features`` is ``conv{i} → bn{i} → relu{i}`` per entry of the configuration (3×3, padding 1,
    no conv bias since BN follows) with ``pool{j}`` (MaxPool 2) at each 'M'; then global average
    pooling and one ``Linear`` classifier. Liu et al. average a 2×2 map with ``AvgPool2d(2)``;
    ``AdaptiveAvgPool2d(1)`` is the same at 32×32 and also accepts other resolutions.

    Slim groups: every ``bn{i}`` has producer ``conv{i}`` and consumer ``conv{i+1}`` (the classifier
    for the last one). Width-1 VGG-19 at 10 classes has 20,035,018 parameters (paper: 20.04M).
    """

    def __init__(self, depth: int = 19, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        if depth not in CFGS:
            raise ValueError(f"slimops.models.VGG: depth must be one of {sorted(CFGS)}, got {depth!r}")
        super().__init__(f"vgg{depth}", num_classes, in_channels, width)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, n_conv, n_pool = in_channels, 0, 0
        for v in CFGS[depth]:
            if v == "M":
                layers[f"pool{n_pool}"] = nn.MaxPool2d(2)
                n_pool += 1
                continue
            c_out = scaled(v, width)
            layers[f"conv{n_conv}"] = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            layers[f"bn{n_conv}"] = nn.BatchNorm2d(c_out)
            # Not in-place: hooks that record BN outputs (γ statistics, activation probes) stay valid.
            layers[f"relu{n_conv}"] = nn.ReLU()
            c_in, n_conv = c_out, n_conv + 1
        self.num_convs = n_conv
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self.init_weights(linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def slim_groups(self) -> list[SlimGroup]:
        groups = []
        for i in range(self.num_convs):
            consumer = f"features.conv{i + 1}" if i + 1 < self.num_convs else "classifier"
            groups.append(SlimGroup(bn=f"features.bn{i}", producer=f"features.conv{i}", select=None,
                                    consumers=(consumer,)))
        return groups
