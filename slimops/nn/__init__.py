"""Drop-in ``torch.nn`` modules: channel selection, sparse / dynamically gated convolutions, the
Fourier-domain token mixers (global filter, adaptive frequency filter) with the blocks built on them, and
SEMA attention with its Mamba-like block, and the vision-transformer block."""
from slimops.nn.channel_select import ChannelSelect
from slimops.nn.channel_sparse import ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseLinear
from slimops.nn.dynamic_gate import DynamicGatedConv2d
from slimops.nn.dim_gate import DimGate
from slimops.nn.sema import SEMAAttention, SEMABlock, SEMAMlp, set_sema_backend
from slimops.nn.spectral import (AdaptiveFrequencyFilter, AFIDAFBlock, ConvMlp, GlobalFilter, GlobalFilterBlock,
                                 ImageDomainAdaptiveFilter, set_spectral_backend)
from slimops.nn.vit import ViTAttention, ViTBlock, ViTMlp

__all__ = ["ChannelSelect", "ChannelSparseConv2d", "ChannelSparseBatchNorm2d", "ChannelSparseLinear",
           "DynamicGatedConv2d", "GlobalFilter", "AdaptiveFrequencyFilter", "ImageDomainAdaptiveFilter", "ConvMlp",
           "GlobalFilterBlock", "AFIDAFBlock", "set_spectral_backend", "SEMAAttention", "SEMABlock",
           "set_sema_backend", "SEMAMlp", "DimGate", "ViTAttention", "ViTMlp", "ViTBlock"]
