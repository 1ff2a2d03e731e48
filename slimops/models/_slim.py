"""The slimming spec shared by the model zoo: which BatchNorms can be pruned and what they touch.

Network slimming (Liu et al., ICCV 2017; docs/algorithms.md §2) prunes channels by the magnitude of
their BatchNorm scale γ. A compaction engine needs, for every BN, the layers whose shapes change with
it; :class:`SlimGroup` records exactly that, and every model of :mod:`slimops.models` lists its groups
through :meth:`SlimmableModel.slim_groups`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from slimops.nn import ChannelSelect


@dataclass(frozen=True)
class SlimGroup:
    """One prunable BatchNorm2d and the modules whose channel counts follow it.

    The data path is always ``[select →] bn → ReLU → [max/avg pool →] consumers``; the activation
    between the BN and its consumers is ReLU in every model of the zoo, so a pruned channel (γ and β
    cut together with the consumer's matching input slice) removes exactly its contribution.

    Attributes:
        bn: qualified module name of the ``BatchNorm2d`` whose channels get pruned.
        producer: the ``Conv2d`` whose output channels feed this BN one-to-one (its out-channels are
            cut), or ``None`` when the BN reads a shared stream.
        select: the :class:`slimops.nn.ChannelSelect` right before the BN when the BN reads a shared
            stream (residual sum or dense concatenation) that cannot be cut: its ``index`` shrinks
            instead. ``None`` when ``producer`` is set. Exactly one of ``producer``/``select`` is set.
        consumers: modules reading ``relu(bn(.))`` (possibly after pooling): ``Conv2d`` (in-channels
            cut) or ``Linear`` (in-features cut).
    """

    bn: str
    producer: Optional[str]
    select: Optional[str]
    consumers: tuple[str, ...]

    def __post_init__(self):
        if (self.producer is None) == (self.select is None):
            raise ValueError(f"slimops.models.SlimGroup: exactly one of producer/select must be set for "
                             f"bn {self.bn!r}, got producer={self.producer!r}, select={self.select!r}")
        if not isinstance(self.consumers, tuple) or not self.consumers:
            raise ValueError(f"slimops.models.SlimGroup: consumers of bn {self.bn!r} must be a non-empty tuple")


def check_config(where: str, num_classes, in_channels, width) -> None:
    """Raise ``ValueError`` naming ``where`` and the bad argument."""
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {arg} must be an int >= 1, got {value!r}")
    if (isinstance(width, bool) or not isinstance(width, (int, float))
            or not math.isfinite(width) or width <= 0):
        raise ValueError(f"{where}: width must be a finite number > 0, got {width!r}")


def scaled(channels: int, width: float) -> int:
    """The zoo's width rule: every channel count ``c`` becomes ``max(1, round(c * width))``."""
    return max(1, int(round(channels * width)))


class SlimmableModel(nn.Module):
    """Base of the zoo's models: build configuration plus the slimming spec.

    Subclasses set the four configuration attributes through ``super().__init__`` and implement
    :meth:`slim_groups`. A pruning result is data (kept indices per group, keyed by ``bn`` names) that
    can be replayed on ``slimops.models.build(**model.config())``.
    """

    def __init__(self, arch: str, num_classes: int, in_channels: int, width: float):
        super().__init__()
        check_config(f"slimops.models.{type(self).__name__}", num_classes, in_channels, width)
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = float(width)

    def config(self) -> dict:
        """``{"arch", "width", "num_classes", "in_channels"}``: the arguments that rebuild this model."""
        return {"arch": self.arch, "width": self.width, "num_classes": self.num_classes,
                "in_channels": self.in_channels}

    def slim_groups(self) -> list[SlimGroup]:
        """Every ``BatchNorm2d`` of the model exactly once, in module order."""
        raise NotImplementedError(f"slimops.models.{type(self).__name__}.slim_groups")

    # -- the classifier head of a model whose last features are a shared stream ----------------
    def add_stream_head(self, channels: int, num_classes: int) -> None:
        """``select → bn → relu → global average pool → fc`` (pre-ResNet, DenseNet): the last stream
        cannot be cut, so its BN is pruned through the selection (:meth:`stream_head_group`)."""
        self.select = ChannelSelect(channels)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def stream_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(self.select(x)))), 1))

    @staticmethod
    def stream_head_group() -> SlimGroup:
        return SlimGroup("bn", None, "select", ("fc",))

    def init_weights(self, linear_std: Optional[float] = None) -> None:
        """Liu et al.'s initialisation: convs He-normal (fan_out, i.e. N(0, 2/(k²·C_out))), BN γ = 0.5 and
        β = 0 (the sparsity penalty starts every channel at the same scale), Linear N(0, linear_std)
        with zero bias when ``linear_std`` is given (their VGG) else PyTorch's default (their
        ResNet/DenseNet)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
                nn.init.zeros_(m.bias)


def arch_summary(model: nn.Module) -> dict[str, int]:
    """Map each slim group's BN name to its current channel count (``bn.num_features``)."""
    if not isinstance(model, SlimmableModel):
        raise TypeError(f"slimops.models.arch_summary: model must be a slimops.models model "
                        f"(SlimmableModel), got {type(model).__name__}")
    return {g.bn: model.get_submodule(g.bn).num_features for g in model.slim_groups()}
