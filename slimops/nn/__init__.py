"""Drop-in ``torch.nn`` modules: channel selection and sparse / dynamically gated convolutions."""
from slimops.nn.channel_select import ChannelSelect
from slimops.nn.channel_sparse import ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseLinear
from slimops.nn.dynamic_gate import DynamicGatedConv2d

__all__ = ["ChannelSelect", "ChannelSparseConv2d", "ChannelSparseBatchNorm2d", "ChannelSparseLinear",
           "DynamicGatedConv2d"]
