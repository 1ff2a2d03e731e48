"""An in-memory image classification data set with reproducible, batch-independent augmentation.

The trainer must give bit-identical results whether a run is resumed mid-epoch or its global batch is
split across DDP ranks. So the augmentation of a training sample (random crop offset and horizontal
flip) is a pure function of ``(seed, epoch, sample index)``: one table of per-sample offsets and flips
is drawn per ``(seed, epoch)`` from a private ``torch.Generator`` (never the global RNG) and indexed by
sample, so neither batch composition nor call order can change what a sample looks like.

Crops follow torchvision's ``RandomCrop(size, padding=pad)`` then ``RandomHorizontalFlip`` then
``Normalize``: the image is zero-padded in *unnormalised* pixel space, a ``size x size`` window at offset
``(oy, ox) in [0, 2*pad]^2`` is cut out, optionally mirrored, and only then normalised.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _stream_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed for ``(seed, epoch)`` (splitmix64 finaliser): nearby pairs such as
    (0, 1) and (1, 0) get unrelated streams, which ``seed + epoch`` would not."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(eq=False)
class ImageData:
    """Train/test images held compactly in memory (uint8 for CIFAR, float32 in [0, 1] for digits),
    int64 labels, per-channel ``mean``/``std`` (C,) in [0, 1] pixel units, and the augmentation
    recipe: ``pad`` (random-crop padding, 0 = no crops) and ``flip`` (random horizontal flips)."""

    name: str
    num_classes: int
    in_channels: int
    size: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: Tensor
    std: Tensor
    pad: int
    flip: bool
    # The last (seed, epoch) table: the trainer asks for the same epoch many times in a row.
    _table: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        where = f"slimops.data.ImageData({self.name!r})"
        shape = (self.in_channels, self.size, self.size)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dim() != 4 or tuple(x.shape[1:]) != shape:
                raise ValueError(f"{where}: x_{split} must have shape (N, {', '.join(map(str, shape))}), "
                                 f"got {tuple(x.shape)}")
            if x.dtype not in (torch.uint8, torch.float32):
                raise ValueError(f"{where}: x_{split} must be uint8 or float32, got {x.dtype}")
            if y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"{where}: y_{split} must be int64 of shape ({x.shape[0]},), "
                                 f"got {y.dtype} {tuple(y.shape)}")
        for stat in ("mean", "std"):
            got = tuple(getattr(self, stat).shape)
            if got != (self.in_channels,):
                raise ValueError(f"{where}: {stat} must have shape ({self.in_channels},), got {got}")
        if self.pad < 0:
            raise ValueError(f"{where}: pad must be >= 0, got {self.pad}")

    def __repr__(self) -> str:
        return (f"ImageData({self.name!r}, classes={self.num_classes}, shape=({self.in_channels}, {self.size}, "
                f"{self.size}), train={len(self.y_train)}, test={len(self.y_test)}, {self.x_train.dtype}, "
                f"pad={self.pad}, flip={self.flip}, device={self.x_train.device})")

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    def to(self, device) -> "ImageData":
        """A copy with every tensor on ``device`` (e.g. to augment on the GPU without host copies)."""
        moved = {k: getattr(self, k).to(device) for k in
                 ("x_train", "y_train", "x_test", "y_test", "mean", "std")}
        return replace(self, **moved)

    def normalise(self, x: Tensor) -> Tensor:
        """Stored images (uint8 0-255 or float [0, 1]) to float32 ``(x - mean) / std`` per channel."""
        out = x.to(torch.float32, copy=True)  # a copy: the in-place ops below must never touch the stored set
        if x.dtype == torch.uint8:
            out = out.mul_(1.0 / 255.0)
        mean = self.mean.to(out.device, torch.float32)[:, None, None]
        std = self.std.to(out.device, torch.float32)[:, None, None]
        return out.sub_(mean).div_(std)

    def augment_table(self, epoch: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(offsets, flips)`` for every training sample in this ``(seed, epoch)``: int64 (N, 2) crop
        offsets ``(oy, ox)`` in ``[0, 2*pad]`` and bool (N,) flips (all False when ``flip`` is off).
        Drawn on the CPU from a generator seeded by ``(seed, epoch)`` only; the last table is cached."""
        key = (int(seed), int(epoch))
        if self._table is not None and self._table[0] == key:
            return self._table[1]
        g = torch.Generator().manual_seed(_stream_seed(*key))
        n = self.num_train
        # Both draws always happen, in this order, so the stream does not depend on pad/flip settings.
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool() & self.flip
        self._table = (key, (offsets, flips))
        return offsets, flips

    def train_batch(self, idx: Tensor, epoch: int, seed: int, augment: bool = True) -> tuple[Tensor, Tensor]:
        """Normalised float32 images (B, C, size, size) and int64 labels (B,) of training samples ``idx``,
        augmented (when ``augment``) as a function of ``(seed, epoch, idx[i])`` only."""
        if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"slimops.data.ImageData.train_batch: idx must be a 1-D int64 tensor, got {got}")
        dev = self.x_train.device
        idx = idx.to(dev, torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_train):
            raise ValueError(f"slimops.data.ImageData.train_batch: idx must lie in [0, {self.num_train}), got "
                             f"values in [{int(idx.min())}, {int(idx.max())}]")
        x, y = self.x_train[idx], self.y_train[idx]
        if augment and (self.pad > 0 or self.flip):
            offsets, flips = self.augment_table(epoch, seed)
            # The table lives on the CPU (where its generator is); move only this batch's rows.
            sel = idx.cpu()
            x = crop_flip(x, offsets[sel].to(dev), flips[sel].to(dev), self.pad)
        return self.normalise(x), y

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields normalised ``(x, y)`` test batches in order, without augmentation."""
        if batch_size < 1:
            raise ValueError(f"slimops.data.ImageData.test_batches: batch_size must be >= 1, got {batch_size}")
        for i in range(0, self.num_test, batch_size):
            yield self.normalise(self.x_test[i:i + batch_size]), self.y_test[i:i + batch_size]


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Batched ``RandomCrop(padding=pad)`` + ``RandomHorizontalFlip`` with given parameters: image ``b``
    becomes ``zero_pad(x[b], pad)[:, oy:oy+H, ox:ox+W]``, mirrored left-right where ``flips[b]``.

    Pads the batch once, views every possible window with ``unfold`` (no copy) and picks each image's
    window with one advanced-indexing copy: about 1.5x faster than two ``gather`` passes on CPU.
    """
    b, c, h, w = x.shape
    if b == 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    windows = xp.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W), a view
    # Index dims 0, 2, 3 are split by a slice, so the result is (B, C, H, W).
    out = windows[torch.arange(b, device=x.device), :, offsets[:, 0], offsets[:, 1]]
    if flips.any():
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out
