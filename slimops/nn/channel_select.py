"""``ChannelSelect``: the "channel selection" layer of network slimming (Liu et al., ICCV 2017)."""
from __future__ import annotations

import torch
from torch import nn

_NAME = "slimops.nn.ChannelSelect"


class ChannelSelect(nn.Module):
    r"""Keep a subset of the channels of a shared feature stream: ``y = x.index_select(1, index)``.

    In pre-activation ResNets and DenseNets a pruned BatchNorm reads a stream that other layers
    (the residual sum, later concatenations) still need in full, so the stream itself cannot be cut.
    Liu et al., "Learning Efficient Convolutional Networks through Network Slimming" (ICCV 2017),
    insert a "channel selection" gather instead. Our models put it *before* the BN it serves:
    BN is per-channel, so ``select∘BN = BN_kept∘select``, and gathering first normalises only the
    kept channels.

    ``index`` is a persistent ``int64`` buffer (initially ``arange(num_channels)``) so that a compacted
    ``state_dict`` carries the selection and can be loaded into a fresh model, whatever its length.
    While ``index`` is the full identity the layer returns ``x`` itself: an unpruned model pays
    nothing. The flag is a plain Python bool recomputed by :meth:`set_index` and on state-dict load,
    so it never syncs with the device in ``forward``.

    Args:
        num_channels: channel count of the input stream (``x.shape[1]``); fixed for the layer's life.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"{_NAME}: num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.register_buffer("index", torch.arange(num_channels, dtype=torch.long), persistent=True)
        self.is_identity = True

    def _check_index(self, index, where: str = "set_index") -> torch.Tensor:
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"{_NAME}.{where}: index must be a torch.Tensor, got {type(index).__name__}")
        if index.dim() != 1:
            raise ValueError(f"{_NAME}.{where}: index must be 1-D, got shape {tuple(index.shape)}")
        if index.dtype == torch.bool or index.dtype.is_floating_point or index.dtype.is_complex:
            raise TypeError(f"{_NAME}.{where}: index must have an integer dtype, got {index.dtype}")
        index = index.detach().to(torch.long)
        if index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_channels:
                raise ValueError(f"{_NAME}.{where}: index values must lie in [0, {self.num_channels}), "
                                 f"got min {lo}, max {hi}")
            if torch.unique(index).numel() != index.numel():
                raise ValueError(f"{_NAME}.{where}: index has duplicate entries")
        return index

    def _identity_of(self, index: torch.Tensor) -> bool:
        return index.numel() == self.num_channels and bool(
            torch.equal(index.cpu(), torch.arange(self.num_channels)))

    @torch.no_grad()
    def set_index(self, index: torch.Tensor) -> None:
        """Replace the kept channels (any order, no duplicates); an empty index is allowed."""
        index = self._check_index(index)
        # A new tensor rather than copy_: the kept count usually changes when a model is compacted.
        self.index = index.clone().to(self.index.device)
        self.is_identity = self._identity_of(self.index)

    @property
    def num_selected(self) -> int:
        return self.index.numel()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "index"
        if key in state_dict:
            # The saved index may be shorter than ours (a compacted model): adopt its length so the
            # default shape check in nn.Module does not reject it, after validating it like set_index.
            try:
                incoming = self._check_index(state_dict[key], "load_state_dict")
            except (TypeError, ValueError) as e:
                error_msgs.append(f"while loading {key!r}: {e}")
                return
            if incoming.shape != self.index.shape:
                self.index = torch.empty_like(incoming, device=self.index.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.is_identity = self._identity_of(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return x
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"{_NAME}: expected input with {self.num_channels} channels in dim 1, "
                             f"got shape {tuple(x.shape)}")
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, selected={self.num_selected}"
