"""Drop-in ``torch.nn`` modules used by the slimming pipelines."""
from slimops.nn.channel_select import ChannelSelect

__all__ = ["ChannelSelect"]
