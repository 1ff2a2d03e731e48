"""``DynamicGatedConv2d``: per-sample (dynamic) channel pruning with a real speed-up.

ManiDP (Tang et al., "Manifold Regularized Dynamic Network Pruning", CVPR 2021; docs/algorithms.md §11) gives
every sample its own set of output channels: a small gate reads the input and predicts a saliency per
output channel,

    pi = clamp(ReLU(fc2(ReLU(fc1(GAP(x))))), max=1),

and the layer keeps the channels with the largest saliency. Here the kept set is the top
``ceil(keep * C_out)`` saliencies of each sample (exactly the target keep rate; channels of zero
saliency are never kept), or ``pi >= threshold`` when a threshold is given. The conv is
``slimops.ops.masked_conv2d``, which computes only each sample's kept channels, and the output is
scaled by the saliency so that the gate learns through the kept channels:

    y = masked_conv2d(x, W, b, mask) * pi[:, :, None, None].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.ops.channel_conv import masked_conv2d

_NAME = "slimops.nn.DynamicGatedConv2d"


class DynamicGatedConv2d(nn.Module):
    """A conv whose output channels are gated per sample (see the module docstring).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``
            (groups 1, zero padding).
        keep: target fraction of output channels kept per sample, in (0, 1].
        reduction: the gate's hidden width is ``max(4, in_channels // reduction)``.
        threshold: if given, keep ``pi >= threshold`` instead of the top-``keep`` channels.

    After a forward, ``last_saliency`` (N, C_out) and ``last_mask`` hold the gate's output (for a
    sparsity loss on the saliency, as ManiDP uses, and for measuring the realised keep rate).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, keep: float = 0.5, reduction: int = 4, threshold: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
            raise ValueError(f"{_NAME}: keep must be in (0, 1], got {keep!r}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"{_NAME}: threshold must be finite, got {threshold!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"{_NAME}: reduction must be a positive int, got {reduction!r}")
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias, **kw)
        hidden = max(4, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden, **kw)
        self.fc2 = nn.Linear(hidden, out_channels, **kw)
        nn.init.constant_(self.fc2.bias, 1.0)  # start with every channel salient: training begins dense-like
        self.keep, self.threshold = float(keep), threshold
        self.last_saliency: Optional[Tensor] = None
        self.last_mask: Optional[Tensor] = None

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv.bias

    def saliency(self, x: Tensor) -> Tensor:
        """pi (N, C_out) in [0, 1]."""
        h = F.relu(self.fc1(x.mean(dim=(2, 3))))
        return F.relu(self.fc2(h)).clamp(max=1.0)

    def mask_of(self, pi: Tensor) -> Tensor:
        """The kept channels (N, C_out) bool of saliencies ``pi``."""
        with torch.no_grad():
            if self.threshold is not None:
                return (pi >= self.threshold) & (pi > 0)
            k = max(1, math.ceil(self.keep * pi.shape[1]))
            top = pi.topk(k, dim=1).indices
            mask = torch.zeros_like(pi, dtype=torch.bool).scatter_(1, top, True)
            return mask & (pi > 0)

    def forward(self, x: Tensor) -> Tensor:
        pi = self.saliency(x)
        mask = self.mask_of(pi)
        self.last_saliency, self.last_mask = pi, mask
        c = self.conv
        y = masked_conv2d(x, c.weight, c.bias, mask, c.stride, c.padding, c.dilation)
        return y * pi.to(y.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        rule = f"threshold={self.threshold}" if self.threshold is not None else f"keep={self.keep}"
        return rule
