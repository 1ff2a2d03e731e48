"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images): slimops' embedded default data.

Shipped inside scikit-learn, so it loads on a machine with no network. The train/test split is
stratified and fixed by ``seed``, so every run and every process sees the same split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def digits_split(size: int = 8, test_fraction: float = 0.25, seed: int = 0):
    """Returns ``(x, train_idx, test_idx, y)``: all 1,797 images as float32 (N, 1, size, size) in
    [0, 1] (not standardised), the seeded stratified split's indices, and int64 labels 0-9.

    Shared by :func:`load_digits` and ``slimops.data.load("digits")`` so both see the same split.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"slimops.data.load_digits: size must be a positive int, got {size!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"slimops.data.load_digits: test_fraction must be in [0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("slimops.data.load_digits needs scikit-learn (pip install scikit-learn)") from e
    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # Stratified split: the same fraction of every class goes to the test set, in a seeded order.
    g = torch.Generator().manual_seed(seed)
    test_idx, train_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return x, torch.cat(train_idx), torch.cat(test_idx), y


def load_digits(size: int = 8, test_fraction: float = 0.25, seed: int = 0):
    """Returns ``(x_train, y_train, x_test, y_test)``: float32 images (N, 1, size, size) scaled to
    [0, 1] then standardised with the training mean/std, and int64 labels 0-9.

    ``size`` other than 8 resizes bilinearly (e.g. 32 for CIFAR-shaped models).
    """
    x, tr, te, y = digits_split(size, test_fraction, seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def digits_data(size: int = 32, seed: int = 0):
    """The digits as :class:`~slimops.data.image_data.ImageData`: float32 images in [0, 1] resized to
    ``size``, the same split as :func:`load_digits`, mean/std of the training split, and 2-pixel random
    crops (small translations) but no flips, since a mirrored digit is a different digit (or none)."""
    from slimops.data.image_data import ImageData

    x, tr, te, y = digits_split(size, 0.25, seed)
    x_tr = x[tr]
    mean, std = x_tr.mean().reshape(1), x_tr.std().reshape(1)
    return ImageData(name="digits", num_classes=10, in_channels=1, size=size, x_train=x_tr, y_train=y[tr],
                     x_test=x[te], y_test=y[te], mean=mean, std=std, pad=2, flip=False)
