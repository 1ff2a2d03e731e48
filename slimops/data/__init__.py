"""Data sets read from local files or shipped with a package: nothing is downloaded at run time.

``load(name, data_dir, size=, seed=)`` returns an :class:`ImageData` whose ``train_batch`` augments each
sample as a function of ``(seed, epoch, index)`` only, so resumed and multi-rank runs see the same data.
"""
from __future__ import annotations

from slimops.data.cifar import load_cifar
from slimops.data.digits import digits_data, load_digits
from slimops.data.image_data import ImageData

DATASETS = ("digits", "cifar10", "cifar100")


def load(name: str, data_dir=None, *, size: int = 32, seed: int = 0) -> ImageData:
    """Loads data set ``name`` (one of :data:`DATASETS`).

    - ``digits``: scikit-learn's bundled 8x8 digits resized to ``size``; ``seed`` fixes the stratified
      25% test split; ``data_dir`` is ignored.
    - ``cifar10`` / ``cifar100``: read from ``data_dir`` (python pickle format, never downloaded);
      ``size`` must be 32. Missing files raise ``FileNotFoundError``, corrupt ones ``ValueError``.
    """
    if name == "digits":
        return digits_data(size=size, seed=seed)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, size=size)
    raise ValueError(f"slimops.data.load: unknown data set name {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "ImageData", "load", "load_digits"]
