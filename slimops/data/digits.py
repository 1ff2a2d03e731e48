"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images): slimops' embedded default data.

Shipped inside scikit-learn, so it loads on a machine with no network. The train/test split is
stratified and fixed by ``seed``, so every run and every process sees the same split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits(size: int = 8, test_fraction: float = 0.25, seed: int = 0):
    """Returns ``(x_train, y_train, x_test, y_test)``: float32 images (N, 1, size, size) scaled to
    [0, 1] then standardised with the training mean/std, and int64 labels 0-9.

    ``size`` other than 8 resizes bilinearly (e.g. 32 for CIFAR-shaped models).
    """
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
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]
