"""Static channel-sparse layers: a slimmed network run on its full-size tensors, computing only the kept
channels (``slimops.ops.channel_conv2d``), instead of being rebuilt smaller (``slimops.pruning.compact``).

A chain of these layers passes *compact* activations: a conv whose output channels are ``out_idx``
emits ``len(out_idx)`` channels, the BN after it normalises those channels with the matching entries of
its full parameters and statistics, and the next conv reads them as ``input_gathered`` channels. The
parameters stay the model's full tensors (shared, not copied), so training continues on them, their
state_dict keys are unchanged (plus the index buffers), and a plan can be changed without rebuilding.

Removed channels are not silent (see ``slimops.pruning.compact``): a BN channel with gamma = 0 emits
relu(beta) on the image and 0 in the consumer's padding. A consumer given ``const_in`` (relu(beta) of
each removed input channel, 0 elsewhere) adds that contribution exactly, border included, as the conv
of an all-ones image with the weight ``sum_c const_in[c] W[:, c]``: O(weight + one output map) per call.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.ops.channel_conv import channel_conv2d, check_index

_CONV = "slimops.nn.ChannelSparseConv2d"


def _index(where: str, name: str, idx, limit: int, device) -> Tensor:
    """Validates an index set once (the layers then skip the per-call check)."""
    if not isinstance(idx, Tensor):
        idx = torch.as_tensor(idx, dtype=torch.long)
    op = where[len("slimops."):] if where.startswith("slimops.") else where
    return check_index(op, name, idx.to(device), limit, "channels", torch.device(device)).clone()


def _frozen(*params: Optional[Tensor]) -> bool:
    """No autograd graph is needed through ``params`` (eval / inference): derived tensors may be cached."""
    return not torch.is_grad_enabled() or not any(p is not None and p.requires_grad for p in params)


def _key(*ts: Optional[Tensor]) -> tuple:
    """Identity and in-place version of tensors: a cached value derived from them is stale when it changes."""
    return tuple((id(t), t._version) if t is not None else None for t in ts)


def _const(where: str, const_in, n: int, device, dtype) -> Optional[Tensor]:
    if const_in is None:
        return None
    c = torch.as_tensor(const_in).detach().to(device=device, dtype=dtype).flatten()
    if c.numel() != n:
        raise ValueError(f"{where}: const_in must have {n} entries (one per input channel), got {c.numel()}")
    return c.clone()


class ChannelSparseConv2d(nn.Module):
    r"""Drop-in for ``nn.Conv2d`` (groups 1, zero padding) that computes only its kept channels:

    ``y = conv2d(x[:, in_idx], weight[out_idx][:, in_idx], bias[out_idx]) (+ the constant term)``

    from the full ``weight`` (C_out, C_in, kh, kw) and ``bias``, with ``in_idx``/``out_idx`` int64
    buffers (default: all channels). ``input_gathered=True``: x holds only the channels ``in_idx`` (the
    compact output of a previous sparse layer). Output: ``len(out_idx)`` channels. Build one with
    :meth:`from_conv` (shares the conv's parameters) or from a slimming plan with
    ``slimops.pruning.sparsify``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, in_idx=None, out_idx=None, input_gathered: bool = False,
                 const_in=None, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{_CONV}: {name} must be a positive int, got {v!r}")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels) + self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self._init_index(in_idx, out_idx, input_gathered, const_in)

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_idx=None, out_idx=None, *, input_gathered: bool = False,
                  const_in=None) -> "ChannelSparseConv2d":
        """A sparse view of ``conv``: the *same* weight and bias Parameters (no copy), kept channels
        ``in_idx``/``out_idx``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{_CONV}.from_conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{_CONV}.from_conv: only groups=1, zero padding given as ints is supported "
                             f"(got groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_channels, new.out_channels = conv.in_channels, conv.out_channels
        new.kernel_size, new.stride = tuple(conv.kernel_size), tuple(conv.stride)
        new.padding, new.dilation = tuple(conv.padding), tuple(conv.dilation)
        new.weight, new.bias = conv.weight, conv.bias
        new._init_index(in_idx, out_idx, input_gathered, const_in)
        new.train(conv.training)
        return new

    def _init_index(self, in_idx, out_idx, input_gathered: bool, const_in) -> None:
        """The index buffers (default: every channel) and flags, on the weight's device."""
        dev = self.weight.device
        self.register_buffer("in_idx", torch.arange(self.in_channels, device=dev))
        self.register_buffer("out_idx", torch.arange(self.out_channels, device=dev))
        self.register_buffer("const_in", None)
        self.input_gathered = False
        self.set_index(in_idx, out_idx, input_gathered=input_gathered, const_in=const_in)

    @torch.no_grad()
    def set_index(self, in_idx=None, out_idx=None, *, input_gathered: Optional[bool] = None, const_in=None) -> None:
        """Replaces the kept channels (``None`` keeps the current set), validated once here."""
        dev = self.weight.device
        if in_idx is not None:
            self.in_idx = _index(_CONV, "in_idx", in_idx, self.in_channels, dev)
        if out_idx is not None:
            self.out_idx = _index(_CONV, "out_idx", out_idx, self.out_channels, dev)
        if input_gathered is not None:
            self.input_gathered = bool(input_gathered)
        if const_in is not None:
            self.const_in = _const(_CONV, const_in, self.in_channels, dev, self.weight.dtype)

    def constant_term(self, height: int, width: int) -> Tensor:
        """(1, len(out_idx), OH, OW): what the removed input channels' constant outputs add. Cached while
        no gradient is needed (inference), until the weight, the indices or const_in change."""
        if not _frozen(self.weight):
            return self._constant_term(height, width)
        key = (height, width) + _key(self.weight, self.out_idx, self.const_in)
        cache = getattr(self, "_const_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, self._constant_term(height, width).detach())
            self._const_cache = cache
        return cache[1]

    def _constant_term(self, height: int, width: int) -> Tensor:
        w = self.weight.index_select(0, self.out_idx)
        folded = (w * self.const_in.to(w.dtype).view(1, -1, 1, 1)).sum(1, keepdim=True)
        ones = w.new_ones((1, 1, height, width))
        return F.conv2d(ones, folded, None, self.stride, self.padding, self.dilation)

    def compact_weight(self) -> tuple:
        """(weight[out_idx][:, in_idx], bias[out_idx], whether in_idx is every input channel in order), the weight
        and bias as contiguous detached tensors. Cached until the weight, the bias or the indices change (their
        in-place version counters); used where no gradient is needed for them."""
        key = _key(self.weight, self.bias, self.in_idx, self.out_idx)
        cache = getattr(self, "_weight_cache", None)
        if cache is None or cache[0] != key:
            w = self.weight.detach().index_select(0, self.out_idx).index_select(1, self.in_idx).contiguous()
            b = None if self.bias is None else self.bias.detach().index_select(0, self.out_idx).contiguous()
            every = self.in_idx.numel() == self.in_channels and bool(
                (self.in_idx == torch.arange(self.in_channels, device=self.in_idx.device)).all())
            cache = (key, w, b, every)
            self._weight_cache = cache
        return cache[1], cache[2], cache[3]

    def forward(self, x: Tensor) -> Tensor:
        if _frozen(self.weight, self.bias) and x.device.type == "cpu":
            # Static sparsity with fixed weights (inference): the kept block of the weight is cut once (cached) and
            # the fastest dense conv (torch's: oneDNN on CPU) runs on the compact tensors; x's kept channels are
            # gathered, and not at all when x is already compact (input_gathered, as sparsify chains layers) or
            # every channel is kept. Measured: `eval --sparse` on a VGG-11 x0.5 with every channel kept went from
            # 0.41x to 0.99x of the compacted model. (Gradients for x still flow: conv2d and index_select.)
            w, b, every = self.compact_weight()
            xs = x if self.input_gathered or every else x.index_select(1, self.in_idx)
            y = F.conv2d(xs, w.to(x.dtype), None if b is None else b.to(x.dtype), self.stride, self.padding,
                         self.dilation)
        else:
            y = channel_conv2d(x, self.weight, self.bias, self.in_idx, self.out_idx, self.stride, self.padding,
                               self.dilation, input_gathered=self.input_gathered, check_indices=False)
        if self.const_in is not None:
            y = y + self.constant_term(x.shape[2], x.shape[3])
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, kept in={self.in_idx.numel()} "
                f"out={self.out_idx.numel()}, input_gathered={self.input_gathered}, "
                f"constant={self.const_in is not None}")


class ChannelSparseBatchNorm2d(nn.Module):
    """The channels ``index`` of a ``BatchNorm2d``, on compact input (``len(index)`` channels).

    Holds the BN's *own* parameter and running-statistic tensors (shared, not copied): in training
    mode the batch statistics of the kept channels update the matching entries of the full running
    statistics, exactly as the full BN would update them for those channels.
    """

    def __init__(self, bn: nn.BatchNorm2d, index):
        super().__init__()
        if not isinstance(bn, nn.BatchNorm2d) or not (bn.affine and bn.track_running_stats):
            raise TypeError("slimops.nn.ChannelSparseBatchNorm2d: expected an affine nn.BatchNorm2d that tracks "
                            "running statistics")
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.track_running_stats = True
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.register_buffer("index", _index("slimops.nn.ChannelSparseBatchNorm2d", "index", index, bn.num_features,
                                             bn.weight.device))
        self.train(bn.training)

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """Resets the kept entries of the running statistics (mean 0, var 1) and the batch count, like
        ``BatchNorm2d.reset_running_stats`` (used by BN re-estimation after pruning)."""
        self.running_mean.index_fill_(0, self.index, 0.0)
        self.running_var.index_fill_(0, self.index, 1.0)
        self.num_batches_tracked.zero_()

    def _gathered(self):
        idx = self.index
        return (self.weight.index_select(0, idx), self.bias.index_select(0, idx),
                self.running_mean.index_select(0, idx), self.running_var.index_select(0, idx))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            if _frozen(self.weight, self.bias):  # inference: gather the kept entries once, not per call
                key = _key(self.index, self.weight, self.bias, self.running_mean, self.running_var)
                cache = getattr(self, "_cache", None)
                if cache is None or cache[0] != key:
                    cache = (key, tuple(t.detach() for t in self._gathered()))
                    self._cache = cache
                w, b, rm, rv = cache[1]
            else:
                w, b, rm, rv = self._gathered()
            return F.batch_norm(x, rm, rv, w, b, False, 0.0, self.eps)
        w, b, rm, rv = self._gathered()
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y = F.batch_norm(x, rm, rv, w, b, True, factor, self.eps)  # updates the gathered copies
        with torch.no_grad():
            self.running_mean.index_copy_(0, self.index, rm)
            self.running_var.index_copy_(0, self.index, rv)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, kept={self.index.numel()}, eps={self.eps}, momentum={self.momentum}"


class ChannelSparseLinear(nn.Module):
    """The input features ``in_idx`` of an ``nn.Linear`` (shared weight and bias), on compact input, plus
    the removed features' constant inputs ``const_in`` folded into the bias."""

    def __init__(self, linear: nn.Linear, in_idx, const_in=None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"slimops.nn.ChannelSparseLinear: expected an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        dev = linear.weight.device
        self.register_buffer("in_idx", _index("slimops.nn.ChannelSparseLinear", "in_idx", in_idx, self.in_features, dev))
        self.register_buffer("const_in", _const("slimops.nn.ChannelSparseLinear", const_in, self.in_features, dev,
                                                linear.weight.dtype))
        self.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias
        if self.const_in is not None:
            extra = self.weight @ self.const_in.to(self.weight.dtype)
            b = extra if b is None else b + extra
        return F.linear(x, self.weight.index_select(1, self.in_idx), b)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, kept in={self.in_idx.numel()}"
