"""Fourier-domain token mixers and the blocks built from them (docs/algorithms.md §7): GFNet's global filter
(Rao et al., NeurIPS 2021), the adaptive frequency filter of AFFNet (Huang et al., ICCV 2023) and the AFIDAF
block, which puts an image-domain adaptive filter in front of it.

Every module here works on channels-last tokens ``x`` (B, H, W, C), the layout of
:func:`slimops.ops.spectral_filter` and :func:`slimops.ops.adaptive_spectral_filter`; the convolutions
inside the blocks run on the NCHW view ``x.permute(0, 3, 1, 2)`` of the same memory (channels_last
strides, which PyTorch's convolutions keep), so no layout copy is made between the convolutions and the
spectral ops.

``backend``: the spectral modules take the ops' ``backend=`` (``"auto"`` by default) as a constructor
argument and a plain attribute; :func:`set_spectral_backend` sets it on every spectral module of a model
(``"reference"`` runs the pure-PyTorch twins of :mod:`slimops.reference.spectral`).

Slimming: the only BatchNorms here are the ones of :class:`ConvMlp` (``fc1 -> bn -> ReLU -> fc2``, all
1x1 convolutions), the one pattern of these blocks that the compaction engine of
:mod:`slimops.pruning` cuts (:meth:`ConvMlp.slim_spec`). The token norms are LayerNorms: they sit on the
residual stream, whose channels cannot be cut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimops.ops.spectral import adaptive_spectral_filter, spectral_filter

__all__ = ["GlobalFilter", "AdaptiveFrequencyFilter", "ImageDomainAdaptiveFilter", "GridCroppedConv2d", "ConvMlp",
           "GlobalFilterBlock", "AFIDAFBlock", "resize_filter", "set_spectral_backend"]


def _positive_int(where: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"slimops.nn.{where}: {name} must be a positive int, got {v!r}")
    return v


def _nchw(x: Tensor) -> Tensor:
    """The (B, C, H, W) view of channels-last tokens (B, H, W, C): no copy."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def resize_filter(weight: Tensor, h: int, w_half: int) -> Tensor:
    """A global filter ``weight`` (h0, w0, C, 2) resized to (h, w_half, C, 2) by bilinear interpolation of its
    real and imaginary parts (``align_corners=True``: the corner entries, among them the DC term, are kept
    exactly). This is GFNet's transfer of a filter to another resolution (its code interpolates bicubically;
    bilinear never overshoots), done over the stored frequency-index grid. Differentiable."""
    h0, w0, c, _ = weight.shape
    if (h0, w0) == (h, w_half):
        return weight
    img = weight.reshape(1, h0, w0, c * 2).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=(h, w_half), mode="bilinear", align_corners=True)
    return out.permute(0, 2, 3, 1).reshape(h, w_half, c, 2)


class GlobalFilter(nn.Module):
    """GFNet's global filter on tokens ``x`` (B, H, W, C)::

        y = irfft2(rfft2(x) * K, s=(H, W))        (orthonormal, over H and W)

    ``K`` is a learned complex filter stored as the real parameter ``weight`` (h, w//2+1, dim, 2) (real and
    imaginary parts), initialised ``randn * 0.02`` as in GFNet. The filter belongs to the grid (h, w) it was
    built for; an input whose half-spectrum grid (H, W//2+1) differs gets the filter resized to it at every
    forward by :func:`resize_filter` (bilinear interpolation of the complex weight, as GFNet transfers its
    filters to other resolutions); the gradient flows back through the interpolation to ``weight``.
    """

    def __init__(self, dim: int, h: int, w: int, *, backend: str = "auto"):
        super().__init__()
        for name, v in (("dim", dim), ("h", h), ("w", w)):
            _positive_int("GlobalFilter", name, v)
        self.dim, self.h, self.w = dim, h, w
        self.backend = backend
        self.weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def filter_for(self, h: int, w: int) -> Tensor:
        """The filter (h, w//2+1, dim, 2) applied to an h x w grid."""
        return resize_filter(self.weight, h, w // 2 + 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"slimops.nn.GlobalFilter: expected input (B, H, W, {self.dim}), got {tuple(x.shape)}")
        return spectral_filter(x, self.filter_for(x.shape[1], x.shape[2]), backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid=({self.h}, {self.w}), backend={self.backend!r}"


class AdaptiveFrequencyFilter(nn.Module):
    """AFF token mixer (AFFNet) on tokens ``x`` (B, H, W, C)::

        y = irfft2(M(X) * X, s=(H, W)) + x,   X = rfft2(x)
        M = softshrink(W2 relu(W1 X + b1) + b2, shrink)

    a complex two-layer channel MLP, block-diagonal in ``blocks`` channel blocks and shared by every
    frequency, computes the filter from the spectrum itself (:func:`slimops.ops.adaptive_spectral_filter`).
    The ``+ x`` residual is part of the op (as in AFNO/AFFNet's code): ``forward`` returns it included.

    Parameters in AFNO's layout, index 0 real and 1 imaginary, ``Cb = dim/blocks``, ``Hb = Cb*hidden_factor``:
    ``w1`` (2, blocks, Cb, Hb), ``b1`` (2, blocks, Hb), ``w2`` (2, blocks, Hb, Cb), ``b2`` (2, blocks, Cb), all
    initialised ``0.02 * randn`` as in AFNO. They do not depend on the grid: any H x W works.
    """

    def __init__(self, dim: int, blocks: int = 8, hidden_factor: int = 1, shrink: float = 0.01, *,
                 backend: str = "auto"):
        super().__init__()
        _positive_int("AdaptiveFrequencyFilter", "dim", dim)
        _positive_int("AdaptiveFrequencyFilter", "blocks", blocks)
        _positive_int("AdaptiveFrequencyFilter", "hidden_factor", hidden_factor)
        if dim % blocks:
            raise ValueError(f"slimops.nn.AdaptiveFrequencyFilter: blocks ({blocks}) must divide dim ({dim})")
        if not (isinstance(shrink, (int, float)) and not isinstance(shrink, bool) and shrink >= 0):
            raise ValueError(f"slimops.nn.AdaptiveFrequencyFilter: shrink must be a float >= 0, got {shrink!r}")
        self.dim, self.blocks, self.hidden_factor, self.shrink = dim, blocks, hidden_factor, float(shrink)
        self.backend = backend
        cb = dim // blocks
        hb = cb * hidden_factor
        scale = 0.02
        self.w1 = nn.Parameter(scale * torch.randn(2, blocks, cb, hb))
        self.b1 = nn.Parameter(scale * torch.randn(2, blocks, hb))
        self.w2 = nn.Parameter(scale * torch.randn(2, blocks, hb, cb))
        self.b2 = nn.Parameter(scale * torch.randn(2, blocks, cb))

    def forward(self, x: Tensor) -> Tensor:
        return adaptive_spectral_filter(x, self.w1, self.b1, self.w2, self.b2, blocks=self.blocks,
                                        shrink=self.shrink, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, blocks={self.blocks}, hidden_factor={self.hidden_factor}, shrink={self.shrink}, "
                f"backend={self.backend!r}")


class GridCroppedConv2d(nn.Conv2d):
    """A stride-1, zero-padded ``nn.Conv2d`` that skips the kernel taps which, on the input's grid, can only
    read padding: a tap at offset ``o = dilation * (i - k//2)`` touches the image only if ``|o| < H`` (``W``
    for columns). On grids smaller than the receptive field (a 7x7 kernel of dilation 3 spans 19 pixels;
    the last stages of a 32x32 input are 4x4 to 1x1) the output is computed exactly with the remaining taps
    only, and the skipped taps get a zero gradient, as they do in the full convolution. Only for "same"
    convolutions: stride 1, odd kernels, zero padding ``dilation * (k//2)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        same = tuple(d * (k // 2) for k, d in zip(self.kernel_size, self.dilation))
        if (self.stride != (1, 1) or self.padding != same or self.padding_mode != "zeros"
                or any(k % 2 == 0 for k in self.kernel_size)):
            raise ValueError("slimops.nn.GridCroppedConv2d: only stride-1 'same' convolutions (odd kernels, zero "
                             f"padding dilation * (k//2) = {same}) are supported")

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        keep_h = min(kh // 2, (x.shape[-2] - 1) // dh)
        keep_w = min(kw // 2, (x.shape[-1] - 1) // dw)
        if (keep_h, keep_w) == (kh // 2, kw // 2):
            return super().forward(x)
        w = self.weight[:, :, kh // 2 - keep_h:kh // 2 + keep_h + 1, kw // 2 - keep_w:kw // 2 + keep_w + 1]
        return F.conv2d(x, w, self.bias, 1, (dh * keep_h, dw * keep_w), self.dilation, self.groups)


class ImageDomainAdaptiveFilter(nn.Module):
    """AFIDAF's image-domain adaptive filter on tokens ``x`` (B, H, W, C), large-kernel-attention style::

        a = channel_shuffle(pw(dw_dilated(dw(x))), groups)
        y = x * a

    ``dw`` a depthwise 5x5 conv, ``dw_dilated`` a depthwise 7x7 conv of dilation 3 (receptive field 23x23),
    ``pw`` a 1x1 conv in ``groups`` channel groups (all with bias, as in LKA; the depthwise convs skip the
    taps that only read padding on small grids, :class:`GridCroppedConv2d`). The channel shuffle interleaves
    the groups, so the gate of every channel is computed from another group's features: with the grouped
    1x1 conv it mixes information across groups at 1/groups of a dense 1x1 conv's cost (kernel sizes, groups
    and the shuffle's place are not published; docs/algorithms.md §7 gives the 5x5 / 7x7-dilation-3 choice).
    """

    def __init__(self, dim: int, groups: int = 2, kernel_size: int = 5, dilated_kernel_size: int = 7,
                 dilation: int = 3):
        super().__init__()
        for name, v in (("dim", dim), ("groups", groups), ("kernel_size", kernel_size),
                        ("dilated_kernel_size", dilated_kernel_size), ("dilation", dilation)):
            _positive_int("ImageDomainAdaptiveFilter", name, v)
        if dim % groups:
            raise ValueError(f"slimops.nn.ImageDomainAdaptiveFilter: groups ({groups}) must divide dim ({dim})")
        if kernel_size % 2 == 0 or dilated_kernel_size % 2 == 0:
            raise ValueError("slimops.nn.ImageDomainAdaptiveFilter: kernel sizes must be odd")
        self.groups = groups
        self.dw = GridCroppedConv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.dw_dilated = GridCroppedConv2d(dim, dim, dilated_kernel_size,
                                            padding=dilation * (dilated_kernel_size // 2), dilation=dilation,
                                            groups=dim)
        self.pw = nn.Conv2d(dim, dim, 1, groups=groups)

    def gate(self, x: Tensor) -> Tensor:
        """The gate ``a`` (B, C, H, W) of channels-last tokens ``x``."""
        a = self.pw(self.dw_dilated(self.dw(_nchw(x))))
        return F.channel_shuffle(a, self.groups) if self.groups > 1 else a

    def forward(self, x: Tensor) -> Tensor:
        return x * _nhwc(self.gate(x))


class ConvMlp(nn.Module):
    """The channel MLP of the blocks on tokens ``x`` (B, H, W, C): ``fc2(relu(bn(fc1(x))))`` with ``fc1``,
    ``fc2`` 1x1 convolutions (``fc1`` without bias: the BN follows) and a BatchNorm2d on the hidden channels.

    A ViT MLP (Linear -> GELU -> Linear) written in the pattern the slimming engine prunes: the hidden
    dimension is one slim group (:meth:`slim_spec`; network slimming on the MLP's hidden dimension, which
    is what ViT dimension pruning removes too, docs/algorithms.md §6). ReLU replaces GELU because the
    compaction's constant-channel fold of a removed channel is ``relu(beta)`` (``slimops.pruning.compact``).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        _positive_int("ConvMlp", "dim", dim)
        _positive_int("ConvMlp", "hidden", hidden)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return _nhwc(self.fc2(self.act(self.bn(self.fc1(_nchw(x))))))

    @staticmethod
    def slim_spec(prefix: str) -> tuple:
        """``(bn, producer, select, consumers)`` of the hidden-dimension slim group for a ConvMlp at module
        path ``prefix`` (ending in '.'): the arguments of ``slimops.models.SlimGroup``."""
        return f"{prefix}bn", f"{prefix}fc1", None, (f"{prefix}fc2",)


class GlobalFilterBlock(nn.Module):
    """GFNet's block on tokens (B, H, W, C), with GFNet's single residual::

        x = x + mlp(norm2(filter(norm1(x))))

    ``filter`` a :class:`GlobalFilter` for the (h, w) grid, ``norm1``/``norm2`` LayerNorms, ``mlp`` a
    :class:`ConvMlp` of ``hidden`` channels (GFNet: Linear -> GELU -> Linear; here BN + ReLU, slimmable).
    No drop path (GFNet trains with stochastic depth 0.1 on ImageNet; not needed here)."""

    def __init__(self, dim: int, h: int, w: int, mlp_ratio: float = 4.0, *, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.filter = GlobalFilter(dim, h, w, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, max(1, int(round(dim * mlp_ratio))))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm2(self.filter(self.norm1(x))))


class AFIDAFBlock(nn.Module):
    """The AFIDAF block on tokens ``x`` (B, H, W, C): image-domain adaptive filter, then the Fourier-domain
    adaptive frequency filter, then the channel MLP, each pre-normalised and residual::

        x = x + idaf(norm1(x))          ImageDomainAdaptiveFilter (LKA-style gate, grouped 1x1 + shuffle)
        x = x + aff(norm2(x))           AdaptiveFrequencyFilter; aff(u) = irfft2(M(U) * U) + u includes
                                        its own +u (AFFNet's AFNO filter), so this adds norm2(x) + filtered
        x = x + mlp(norm3(x))           ConvMlp, hidden = mlp_ratio * dim (AFFNet: ffn_dim = 2 * dim)

    Norms are LayerNorms over channels (they normalise the residual stream, which cannot be slimmed); the
    MLP's BatchNorm is the block's slim group (:meth:`slim_specs`). Grid-free: every H x W works.
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0, blocks: int = 8, groups: int = 2,
                 hidden_factor: int = 1, shrink: float = 0.01, *, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.idaf = ImageDomainAdaptiveFilter(dim, groups=groups)
        self.norm2 = nn.LayerNorm(dim)
        self.aff = AdaptiveFrequencyFilter(dim, blocks, hidden_factor, shrink, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, max(1, int(round(dim * mlp_ratio))))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.idaf(self.norm1(x))
        x = x + self.aff(self.norm2(x))
        return x + self.mlp(self.norm3(x))


def set_spectral_backend(module: nn.Module, backend: str) -> nn.Module:
    """Sets ``backend`` on every :class:`GlobalFilter` and :class:`AdaptiveFrequencyFilter` inside
    ``module``; returns ``module``."""
    for m in module.modules():
        if isinstance(m, (GlobalFilter, AdaptiveFrequencyFilter)):
            m.backend = backend
    return module
