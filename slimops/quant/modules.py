"""Quantised and binary drop-in layers (docs/algorithms.md §9), built on the ``quant`` ops.

- :class:`LSQQuantizer` — a learnable-step fake quantiser (LSQ, Esser et al. 2020; LSQ+'s learnable zero point,
  Bhalgat et al. 2020, for unsigned grids when asked): ``slimops.ops.fake_quantize`` with the scale (and zero
  point) as parameters, the LSQ gradient scale ``1/sqrt(n·Qp)``, and the LSQ initialisation
  ``s = 2·mean|x|/sqrt(Qp)`` from the first batch it sees (per channel for weights).
- :class:`QuantConv2d` / :class:`QuantLinear` — ``nn.Conv2d`` / ``nn.Linear`` whose weight (per output channel,
  signed) and input (per tensor; unsigned when the first batch is non-negative, e.g. after a ReLU) are fake
  quantised to ``wbits`` / ``abits``; ``bits = 32`` leaves that side in full precision.
- :class:`BinaryConv2d` / :class:`BinaryLinear` — 1-bit weights and activations trained with the FDA sign
  gradient (Xu et al. 2021): ``sign`` forward, the Fourier-series surrogate backward
  (``slimops.ops.fda_sign``), weights scaled per output channel by ``mean|W|`` (detached, as the paper's code),
  and the noise-adaptation module ``e(t) = W2 relu(W1 t) + 0.1 sin(t)`` added as ``α·e`` to the binary weight
  and activation during training (the paper's learnable residual that absorbs the truncation error of the
  series; computed whenever training, so that its parameters always get a gradient, zero when α = 0). :func:`set_fda_schedule` applies the paper's schedule: ``n_terms`` from 10 to 19 and
  ``α = 0.05 (1 + cos(π (epoch+1)/epochs))`` (α reaches 0 at the last epoch, so the trained model is the
  plain binary net). ``surrogate="ste"`` without noise adaptation is the straight-through baseline.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.ops.quant import fake_quantize, fda_sign, levels, lsq_grad_factor

__all__ = ["LSQQuantizer", "QuantConv2d", "QuantLinear", "BinaryConv2d", "BinaryLinear", "NoiseAdaptation",
           "set_fda_schedule", "FULL_PRECISION"]

FULL_PRECISION = 32  # bits meaning "not quantised"
_MIN_SCALE = 1e-8


class LSQQuantizer(nn.Module):
    """Fake quantiser with a learnable step. ``per_channel_axis``: one scale per slice along it (weights: 0);
    ``signed=None``: decided from the first batch (non-negative -> unsigned); ``zero_point``: learn an LSQ+ offset
    (unsigned grids only make use of it; a signed 1-bit grid has none)."""

    def __init__(self, bits: int, *, per_channel_axis: Optional[int] = None, channels: int = 1,
                 signed: Optional[bool] = True, zero_point: bool = False):
        super().__init__()
        if not 1 <= int(bits) <= 16:
            raise ValueError(f"slimops.quant: bits must be in [1, 16] (or {FULL_PRECISION} for full precision), "
                             f"got {bits}")
        self.bits = int(bits)
        self.per_channel_axis = per_channel_axis
        self.signed = signed
        n = channels if per_channel_axis is not None else 1
        shape = (n,) if per_channel_axis is not None else ()
        self.scale = nn.Parameter(torch.ones(shape))
        self.zero_point = nn.Parameter(torch.zeros(shape)) if zero_point else None
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_flag", torch.tensor(bool(signed) if signed is not None else True))

    @property
    def is_signed(self) -> bool:
        return bool(self.signed_flag)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, per_channel_axis={self.per_channel_axis}, signed={self.signed}, "
                f"zero_point={self.zero_point is not None}")

    @torch.no_grad()
    def _initialise(self, x: Tensor):
        if self.signed is None:
            self.signed_flag.fill_(bool((x < 0).any()))
        qp = max(1, levels(self.bits, self.is_signed)[1])
        a = x.detach().abs().float()
        if self.per_channel_axis is None:
            mean = a.mean()
        else:
            ax = self.per_channel_axis % x.dim()
            mean = a.transpose(0, ax).reshape(x.shape[ax], -1).mean(1)
        self.scale.copy_((2 * mean / math.sqrt(qp)).clamp_min(1e-4).reshape(self.scale.shape))
        if self.zero_point is not None:
            self.zero_point.zero_()
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            self._initialise(x)
        signed = self.is_signed
        zp = self.zero_point if (self.zero_point is not None and not (signed and self.bits == 1)) else None
        if self.per_channel_axis is None:  # activations: LSQ's N_F counts the features of one sample
            n_per_scale = x[0].numel() if x.dim() > 1 else x.numel()
        else:
            n_per_scale = x.numel() // max(1, self.scale.numel())
        gf = lsq_grad_factor(n_per_scale, self.bits, signed)
        scale = self.scale.clamp_min(_MIN_SCALE).to(torch.float32)
        return fake_quantize(x, scale, zp, bits=self.bits, per_channel_axis=self.per_channel_axis, signed=signed,
                             grad_factor=gf)


def _conv_args(m: nn.Conv2d):
    """The constructor arguments of a conv like ``m`` (positional, in nn.Conv2d's order)."""
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            m.bias is not None, m.padding_mode)


@torch.no_grad()
def _copy_float(new: nn.Module, m: nn.Module) -> nn.Module:
    """``new`` with the weight and bias of the float layer ``m``, on its device."""
    new.weight.copy_(m.weight)
    if m.bias is not None:
        new.bias.copy_(m.bias)
    return new.to(device=m.weight.device)


def _maybe(bits: int, **kw) -> Optional[LSQQuantizer]:
    return None if int(bits) >= FULL_PRECISION else LSQQuantizer(bits, **kw)


class _QuantMixin:
    """The quantisers of a conv / linear layer and the layer copied from a float one."""

    def _setup_quant(self, wbits: int, abits: int):
        self.wbits, self.abits = int(wbits), int(abits)
        self.weight_quant = _maybe(wbits, per_channel_axis=0, channels=self.weight.shape[0], signed=True)
        self.act_quant = _maybe(abits, signed=None, zero_point=False)

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    @classmethod
    def from_float(cls, m, wbits: int, abits: int):
        return _copy_float(cls._empty_like(m, wbits, abits), m)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with LSQ fake-quantised weights (per output channel) and inputs (per tensor)."""

    def __init__(self, *args, wbits: int = 4, abits: int = 4, **kw):
        super().__init__(*args, **kw)
        self._setup_quant(wbits, abits)

    @classmethod
    def _empty_like(cls, m: nn.Conv2d, wbits, abits):
        return cls(*_conv_args(m), wbits=wbits, abits=abits)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with LSQ fake-quantised weights (per output feature) and inputs (per tensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, wbits: int = 4, abits: int = 4):
        super().__init__(in_features, out_features, bias)
        self._setup_quant(wbits, abits)

    @classmethod
    def _empty_like(cls, m: nn.Linear, wbits, abits):
        return cls(m.in_features, m.out_features, m.bias is not None, wbits=wbits, abits=abits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


# ---- binary layers (FDA) ---------------------------------------------------------------------------------------


class NoiseAdaptation(nn.Module):
    """``e(t) = W2 relu(W1 t) + 0.1 sin(t)`` over the last dim (``features``), hidden width ``features // k``
    (at least 1): FDA's learnable residual that compensates the truncation error of the sign's series."""

    def __init__(self, features: int, k: int = 64):
        super().__init__()
        hidden = max(1, features // k)
        self.fc1 = nn.Linear(features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, features, bias=False)
        nn.init.zeros_(self.fc2.weight)  # starts as 0.1 sin(t): no random perturbation of the binary path

    def forward(self, t: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(t))) + 0.1 * torch.sin(t)


class _BinaryMixin:
    def _setup_binary(self, surrogate: str, noise_adaptation: bool, in_features_act: int, weight_features: int):
        self.surrogate = surrogate
        self.register_buffer("n_terms", torch.tensor(10))
        self.register_buffer("alpha", torch.tensor(0.1 if noise_adaptation else 0.0))
        self.weight_noise = NoiseAdaptation(weight_features) if noise_adaptation else None
        self.act_noise = NoiseAdaptation(in_features_act) if noise_adaptation else None

    def _sign(self, t: Tensor) -> Tensor:
        return fda_sign(t, n_terms=int(self.n_terms), surrogate=self.surrogate)

    def binary_weight(self) -> Tensor:
        w = self.weight
        bw = self._sign(w)
        # while training the residual is always computed, α = 0 included: its parameters then get a zero gradient,
        # which DDP needs (a parameter without one stops the next step's reduction)
        if self.weight_noise is not None and self.training:
            bw = bw + self.alpha * self.weight_noise(w.reshape(w.shape[0], -1)).reshape(w.shape)
        # mean |W| per output channel (detached), summed in float64: the mean of an exported layer's ±m weights is
        # then exactly m (a binary net turns a one-ulp change of a scale into flipped activations)
        scale = w.detach().abs().reshape(w.shape[0], -1).mean(1, dtype=torch.float64).to(w.dtype)
        return bw * scale.reshape(-1, *([1] * (w.dim() - 1)))

    def binary_input(self, x: Tensor, channel_dim: int) -> Tensor:
        bx = self._sign(x)
        if self.act_noise is not None and self.training:
            e = self.act_noise(x.movedim(channel_dim, -1)).movedim(-1, channel_dim)
            bx = bx + self.alpha * e
        return bx

    def set_schedule(self, epoch: int, epochs: int):
        """FDA's schedule (the paper's code): n_terms from 10 (first epoch) to 19 (last) and
        α = 0.05 (1 + cos(π (epoch+1) / epochs)), 0 at the last epoch."""
        epochs = max(1, int(epochs))
        self.n_terms.fill_(10 + round(9 * epoch / max(1, epochs - 1)))
        if self.weight_noise is not None:
            self.alpha.fill_(0.05 * (1 + math.cos(math.pi * (epoch + 1) / epochs)))

    @classmethod
    def from_float(cls, m, surrogate: str = "fda", noise_adaptation: bool = True):
        return _copy_float(cls._empty_like(m, surrogate, noise_adaptation), m)


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """1-bit weights and activations (sign, 0 -> -1) with the FDA (or another) surrogate gradient, weights scaled
    by mean|W| per output channel, FDA's noise adaptation while training."""

    def __init__(self, *args, surrogate: str = "fda", noise_adaptation: bool = True, **kw):
        super().__init__(*args, **kw)
        self._setup_binary(surrogate, noise_adaptation, self.in_channels,
                           self.weight[0].numel())

    @classmethod
    def _empty_like(cls, m: nn.Conv2d, surrogate, noise_adaptation):
        return cls(*_conv_args(m), surrogate=surrogate, noise_adaptation=noise_adaptation)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.binary_input(x, 1), self.binary_weight(), self.bias)


class BinaryLinear(_BinaryMixin, nn.Linear):
    """The linear twin of :class:`BinaryConv2d`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, surrogate: str = "fda",
                 noise_adaptation: bool = True):
        super().__init__(in_features, out_features, bias)
        self._setup_binary(surrogate, noise_adaptation, in_features, in_features)

    @classmethod
    def _empty_like(cls, m: nn.Linear, surrogate, noise_adaptation):
        return cls(m.in_features, m.out_features, m.bias is not None, surrogate=surrogate,
                   noise_adaptation=noise_adaptation)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.binary_input(x, -1), self.binary_weight(), self.bias)


def set_fda_schedule(model: nn.Module, epoch: int, epochs: int) -> None:
    """Applies FDA's per-epoch schedule to every binary layer of ``model``."""
    for m in model.modules():
        if isinstance(m, _BinaryMixin):
            m.set_schedule(epoch, epochs)
